"""``flux_nemo.training.micro_batches.accumulate``: the adaLN modulations computed once for all micro-batches give
the gradients of the plain micro-batch loop, and their backward runs inside the last micro-batch's sync context."""

import contextlib

import pytest
import torch
from flux_testing import make_inputs, randomize_

from flux_nemo.flow_matching import ModelInputs
from flux_nemo.model import FluxConfig, build_flux
from flux_nemo.training.micro_batches import accumulate


def tiny_flux():
    config = FluxConfig.from_flavor(
        "tiny", params_dtype=torch.float64, num_double_blocks=2, num_single_blocks=2
    )  # fmt: skip
    torch.manual_seed(0)
    return randomize_(build_flux(config, backend="local"), seed=0), config


def micro_batches(config, sizes) -> list[ModelInputs]:
    out = []
    for i, size in enumerate(sizes):
        raw = make_inputs(config, size, 2, 2, 3, seed=10 + i, dtype=torch.float64)
        target = torch.randn(
            raw["img"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i)
        )
        out.append(ModelInputs(**raw, target=target))
    return out


def mse(prediction, x):
    return ((prediction - x.target) ** 2).mean()


def loss_of(model):
    """``accumulate``'s ``loss_fn``: the micro-batch's prediction with the conditioning rows it is given."""

    def loss_fn(x, conditioning):
        ids = x.img_ids[:1], x.txt_ids[:1]
        return mse(model(x.img, x.txt, x.y, x.timesteps, *ids, conditioning=conditioning), x)

    return loss_fn


def test_gradients_equal_the_plain_micro_batch_loop(megatron_world):
    model, config = tiny_flux()
    inputs = micro_batches(config, [3, 2, 3])  # unequal sizes: each micro-batch gets its own rows

    plain_total = 0.0
    for x in inputs:  # Flux.forward computes the modulations itself, micro-batch by micro-batch
        loss = mse(model(x.img, x.txt, x.y, x.timesteps, x.img_ids[:1], x.txt_ids[:1]), x)
        (loss / len(inputs)).backward()
        plain_total += loss.item()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    total = accumulate(model, inputs, loss_of(model))
    assert abs(total.item() - plain_total) < 1e-12
    for name, grad in plain.items():
        got = model.get_parameter(name).grad
        assert got is not None, name
        torch.testing.assert_close(got, grad, rtol=1e-10, atol=1e-13, msg=name)
    assert plain["double_blocks.0.img_mod.linear.weight"].abs().sum() > 0  # the modulations do get gradients


@pytest.mark.parametrize("once_per_step", [True, False])
def test_the_modulations_backward_runs_inside_the_last_sync_context(megatron_world, once_per_step):
    """Megatron DDP reduces the gradients when the last micro-batch's context says so: every modulation gradient
    must exist by the end of that context, and (once per step) none before it. Once per step the modulation runs
    once for the three micro-batches; with ``train.modulations_once_per_step=false``, once in each."""
    model, config = tiny_flux()
    inputs = micro_batches(config, [2, 2, 2])
    modulation = model.double_blocks[1].txt_mod
    weight, calls = modulation.linear.weight, []
    modulation.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    seen = []

    @contextlib.contextmanager
    def grad_sync(last):
        yield
        seen.append((last, weight.grad is not None))

    accumulate(model, inputs, loss_of(model), grad_sync, once_per_step=once_per_step)
    if once_per_step:
        assert seen == [(False, False), (False, False), (True, True)]
        assert calls == [6]  # one forward, over the 6 samples of the 3 micro-batches
    else:
        assert seen == [(False, True), (False, True), (True, True)]
        assert calls == [2, 2, 2]


class _Wrapper(torch.nn.Module):
    """Stands in for Megatron's DDP and ``Float16Module``: the network is ``.module``, calls pass through."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_the_network_is_found_inside_nested_wrappers(megatron_world):
    """On GPU the model is DDP(Float16Module(Flux)): the modulations are computed by the Flux inside both."""
    model, config = tiny_flux()
    inputs = micro_batches(config, [2, 2])
    accumulate(model, inputs, loss_of(model))
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    wrapped = _Wrapper(_Wrapper(model))
    accumulate(wrapped, inputs, loss_of(wrapped))
    for name, grad in plain.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-12, atol=0, msg=name)


def test_each_modulation_backpropagates_as_the_last_backward_passes_its_block(megatron_world):
    """Megatron DDP reduces a gradient bucket once all its parameters have their gradient: a block's modulation
    gradient comes during the last micro-batch's backward, right after that block's, not at the end of the step."""
    model, config = tiny_flux()
    arrivals = []
    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(lambda _p, name=name: arrivals.append(name))
    accumulate(model, micro_batches(config, [2, 2]), loss_of(model))

    def last_arrival(name):
        return len(arrivals) - 1 - arrivals[::-1].index(name)

    modulations = [n for n in dict(model.named_parameters()) if "_mod." in n or ".modulation." in n]
    assert modulations and all(arrivals.count(n) == 1 for n in modulations)  # once per step
    assert last_arrival("single_blocks.1.modulation.linear.weight") < last_arrival(
        "single_blocks.0.mlp.linear_fc2.weight"
    )  # before the backward reaches the earlier block
    assert last_arrival("double_blocks.1.txt_mod.linear.weight") < last_arrival(
        "double_blocks.0.txt_mlp.linear_fc1.weight"
    )
    assert last_arrival("time_in.out_layer.weight") > max(last_arrival(n) for n in modulations)


def test_a_modulation_the_loss_does_not_use_is_an_error(megatron_world):
    """A modulation whose rows get no gradient would leave its weights without one: refused, not skipped."""
    model, config = tiny_flux()

    def loss_fn(x, conditioning):
        return sum(t.sum() for t in conditioning.tensors()[:-1])  # not the final layer's

    with pytest.raises(RuntimeError, match="1 adaLN modulation.s. got no gradient"):
        accumulate(model, micro_batches(config, [2, 2]), loss_fn)
