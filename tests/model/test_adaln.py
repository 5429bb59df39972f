"""The adaLN modulation linear: with ``gradient_accumulation_fusion`` its weight gradient is accumulated straight
into Megatron DDP's ``main_grad`` (the contract TE's linears follow), everything else as a plain linear."""

import pytest
import torch

from flux_nemo.model import FluxConfig
from flux_nemo.model.adaln import Modulation


def modulation(fusion: bool, num_chunks: int = 6) -> Modulation:
    config = FluxConfig.from_flavor("tiny", gradient_accumulation_fusion=fusion)
    torch.manual_seed(0)
    mod = Modulation(config, num_chunks=num_chunks)
    for p in mod.parameters():
        p.data.normal_()
    return mod


def micro_batch(mod: Modulation, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward + backward; returns the input and its gradient."""
    gen = torch.Generator().manual_seed(seed)
    vec = torch.randn(3, mod.config.hidden_size, generator=gen, requires_grad=True)
    chunks = [t for out in mod(vec) for t in (out.shift, out.scale, out.gate) if t is not None]
    probe = torch.randn(torch.cat(chunks, -1).shape, generator=gen)
    (torch.cat(chunks, -1) * probe).sum().backward()
    return vec, vec.grad


@pytest.mark.parametrize("main_grad_dtype", [torch.float32, torch.bfloat16])
def test_weight_gradients_of_micro_batches_accumulate_into_main_grad(megatron_world, main_grad_dtype):
    reference, fused = modulation(False), modulation(True)
    weight = fused.linear.weight
    start = torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)).to(main_grad_dtype)
    weight.main_grad = start.clone()  # what Megatron DDP attaches (a view into its gradient buffer)
    buffer = weight.main_grad
    weight.grad_added_to_main_grad = False
    for seed in (1, 2):  # two micro-batches
        ref_vec, ref_grad = micro_batch(reference, seed)
        vec, grad = micro_batch(fused, seed)
        torch.testing.assert_close(grad, ref_grad)  # input gradient unchanged
        assert weight.grad_added_to_main_grad
        assert (
            weight.grad is not None and weight.grad.shape == weight.shape
        )  # DDP's hook drops this placeholder
        weight.grad = None  # as DDP's hook does
    assert weight.main_grad is buffer  # accumulated in place
    expected = start.float() + reference.linear.weight.grad
    tol = dict(rtol=1e-5, atol=1e-5) if main_grad_dtype == torch.float32 else dict(rtol=2e-2, atol=0.1)
    torch.testing.assert_close(weight.main_grad.float(), expected, **tol)
    torch.testing.assert_close(fused.linear.bias.grad, reference.linear.bias.grad)  # bias: plain autograd


def test_zero_out_wgrad_gets_a_zero_placeholder(megatron_world):
    mod = modulation(True, num_chunks=3)
    weight = mod.linear.weight
    weight.main_grad = torch.zeros_like(weight)
    weight.grad_added_to_main_grad, weight.zero_out_wgrad = False, True
    micro_batch(mod, 1)
    assert torch.count_nonzero(weight.grad) == 0
    assert torch.count_nonzero(weight.main_grad) > 0


@pytest.mark.parametrize("fusion", [False, True])
def test_plain_autograd_without_a_main_grad_or_the_flag(megatron_world, fusion):
    """No DDP buffer (CPU training, a bare module) or the flag off: the weight gradient lands in ``.grad``."""
    reference, mod = modulation(False), modulation(fusion)
    micro_batch(reference, 1)
    micro_batch(mod, 1)
    assert not hasattr(mod.linear.weight, "grad_added_to_main_grad")
    torch.testing.assert_close(mod.linear.weight.grad, reference.linear.weight.grad)
