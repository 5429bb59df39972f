"""Block recompute gives the same loss and gradients; unsupported options fail naming the key."""

import pytest
import torch
from tiny_run import compose_cfg

from flux_nemo import flow_matching as fm
from flux_nemo.training.block_runner import block_runner, validate
from flux_nemo.training.model_builder import build_model


def _loss_and_grads(cfg, batch):
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    for p in model.parameters():  # move off the zero-initialised gates so every block matters
        p.data.add_(0.02 * torch.randn_like(p))
    calls = []
    model.single_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    inputs = fm.training_inputs(batch, (batch["t5"][:1] * 0, batch["clip"][:1] * 0), torch.float32)
    loss = fm.mse_loss(model(*inputs[:6]), inputs.target)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], len(calls)


def test_block_recompute_matches_plain(megatron_world):
    from flux_nemo.training.data import record_shapes
    from flux_nemo.training.model_builder import flux_config
    from flux_nemo.training.warmup import synthetic_batch

    plain = compose_cfg()
    recompute = compose_cfg("parallel.recompute=block")
    assert block_runner(plain) is None and block_runner(recompute) is not None
    batch = synthetic_batch(record_shapes(plain, flux_config(plain)), 4, torch.device("cpu"))
    loss_a, grads_a, calls_a = _loss_and_grads(plain, batch)
    loss_b, grads_b, calls_b = _loss_and_grads(recompute, batch)
    assert (calls_a, calls_b) == (1, 2)  # recompute re-runs the block in backward
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "override, key",
    [
        ("parallel.recompute=full", "parallel.recompute"),
        ("parallel.cuda_graph=full_iteration", "parallel.cuda_graph"),
        ("precision=fp8_delayed", "precision.fp8"),  # tiny uses model.backend=local
    ],
)
def test_unsupported_options_fail_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate(compose_cfg(override))
