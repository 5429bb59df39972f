"""``flux_nemo.model.main_grad``: with ``gradient_accumulation_fusion`` the weight gradients of the model's own
linears (adaLN modulations: ``[b, h]`` inputs; embedders and final layer: ``[s, b, in]`` inputs) are accumulated
straight into Megatron DDP's ``main_grad`` (the contract TE's linears follow); everything else as a plain linear."""

import pytest
import torch

from flux_nemo.model import FluxConfig
from flux_nemo.model.adaln import Modulation
from flux_nemo.model.embeddings import ReplicatedLinear


def layer(kind: str, fusion: bool) -> tuple[torch.nn.Module, torch.nn.Linear | torch.nn.Module]:
    """The module and the one holding its ``weight`` and ``bias``, with random values."""
    config = FluxConfig.from_flavor("tiny", gradient_accumulation_fusion=fusion)
    torch.manual_seed(0)
    module = Modulation(config, num_chunks=6) if kind == "modulation" else ReplicatedLinear(config, 24, 40)
    for p in module.parameters():
        p.data.normal_()
    return module, (module.linear if kind == "modulation" else module)


def micro_batch(module: torch.nn.Module, seed: int) -> torch.Tensor:
    """One forward + backward with a random probe; returns the input's gradient."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(module, Modulation):
        x = torch.randn(3, module.config.hidden_size, generator=gen, requires_grad=True)
        out = module(x)  # [b, 6h]
    else:
        x = torch.randn(5, 3, module.in_features, generator=gen, requires_grad=True)  # [s, b, in]
        out = module(x)
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    return x.grad


@pytest.mark.parametrize("kind", ["modulation", "replicated"])
@pytest.mark.parametrize("main_grad_dtype", [torch.float32, torch.bfloat16])
def test_weight_gradients_of_micro_batches_accumulate_into_main_grad(megatron_world, kind, main_grad_dtype):
    (reference, ref_linear), (fused, linear) = layer(kind, False), layer(kind, True)
    start = torch.randn(linear.weight.shape, generator=torch.Generator().manual_seed(5)).to(main_grad_dtype)
    linear.weight.main_grad = start.clone()  # what Megatron DDP attaches (a view into its gradient buffer)
    buffer = linear.weight.main_grad
    linear.weight.grad_added_to_main_grad = False
    for seed in (1, 2):  # two micro-batches
        torch.testing.assert_close(micro_batch(fused, seed), micro_batch(reference, seed))  # input gradient
        assert linear.weight.grad_added_to_main_grad
        assert (
            linear.weight.grad is not None and linear.weight.grad.shape == linear.weight.shape
        )  # a placeholder
        linear.weight.grad = None  # as DDP's hook does
    assert linear.weight.main_grad is buffer  # accumulated in place
    expected = start.float() + ref_linear.weight.grad
    tol = dict(rtol=1e-5, atol=1e-5) if main_grad_dtype == torch.float32 else dict(rtol=2e-2, atol=0.1)
    torch.testing.assert_close(linear.weight.main_grad.float(), expected, **tol)
    torch.testing.assert_close(linear.bias.grad, ref_linear.bias.grad)  # bias: plain autograd


def test_zero_out_wgrad_gets_a_zero_placeholder(megatron_world):
    module, linear = layer("modulation", True)
    linear.weight.main_grad = torch.zeros_like(linear.weight)
    linear.weight.grad_added_to_main_grad, linear.weight.zero_out_wgrad = False, True
    micro_batch(module, 1)
    assert torch.count_nonzero(linear.weight.grad) == 0
    assert torch.count_nonzero(linear.weight.main_grad) > 0


@pytest.mark.parametrize("kind", ["modulation", "replicated"])
@pytest.mark.parametrize("fusion", [False, True])
def test_plain_autograd_without_a_main_grad_or_the_flag(megatron_world, kind, fusion):
    """No DDP buffer (CPU training, a bare module) or the flag off: the weight gradient lands in ``.grad``."""
    (reference, ref_linear), (module, linear) = layer(kind, False), layer(kind, fusion)
    micro_batch(reference, 1)
    micro_batch(module, 1)
    assert not hasattr(linear.weight, "grad_added_to_main_grad")
    torch.testing.assert_close(linear.weight.grad, ref_linear.weight.grad)


def test_the_model_linears_outside_the_blocks_are_replicated_linears(megatron_world):
    """Embedders and the final layer take part (names and shapes are those of ``nn.Linear``). (The flag is off
    here: the local spec's Megatron linears refuse it without Apex; the ``te`` spec sets it on GPU.)"""
    from flux_nemo.model import build_flux

    flux = build_flux(FluxConfig.from_flavor("tiny"), backend="local")
    linears = (
        flux.img_in,
        flux.txt_in,
        flux.time_in.in_layer,
        flux.vector_in.out_layer,
        flux.final_layer.linear,
    )
    assert all(isinstance(m, ReplicatedLinear) and not m.accumulate_into_main_grad for m in linears)
