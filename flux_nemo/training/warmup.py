"""Untimed warmup before MLPerf ``run_start``: a few train and eval steps on synthetic batches.

They compile kernels and capture graphs; the optimizer runs them with learning rate and weight decay 0 (AdamW's
update is then exactly zero), and afterwards its state, param-group entries, the gradients and every RNG are put
back, so the weights and the optimizer are exactly as before (the rules allow no training before run_start). FP8
delayed scaling's amax histories and scales are put back too, so no synthetic amax sets a real step's scale.
"""

from __future__ import annotations

import torch

from flux_nemo.training.block_runner import delayed_scaling_kept
from flux_nemo.training.checkpoint import rng_state, set_rng_state
from flux_nemo.training.optim import inner_optimizers


def synthetic_batch(shapes, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A random batch with the record shapes (no data is read)."""
    f = shapes.fields()
    bf16 = torch.bfloat16
    return {
        "t5": torch.randn(batch_size, *f["t5_encodings"], device=device, dtype=bf16),
        "clip": torch.randn(batch_size, *f["clip_encodings"], device=device, dtype=bf16),
        "mean": torch.randn(batch_size, *f["mean"], device=device, dtype=bf16),
        "logvar": torch.zeros(batch_size, *f["logvar"], device=device, dtype=bf16),
        "timestep": torch.arange(batch_size, device=device) % 8,
        "valid": torch.ones(batch_size, dtype=torch.bool, device=device),
    }


def _group_settings(optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _restore_groups(optimizer, saved: list[dict]) -> None:
    for group, before in zip(optimizer.param_groups, saved, strict=True):
        for key in [k for k in group if k != "params" and k not in before]:
            del group[key]
        group.update(before)


def _clone_state(state) -> dict:
    """A copy of an optimizer's per-param state (empty before the first step; populated after a resume)."""
    return {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in state.items()}


def run_warmup(module, steps: int) -> None:
    """``steps`` synthetic train steps and eval steps that leave weights, optimizer, RNG and FP8 scaling state
    unchanged."""
    if steps <= 0:
        return
    strategy = module.trainer.strategy
    optimizer = strategy.optimizers[0]
    groups, rng = _group_settings(optimizer), rng_state()
    states = [_clone_state(o.state) for o in inner_optimizers(optimizer)]
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = 0.0, 0.0
    train_batch = synthetic_batch(module.shapes, module.local_batch_size, module.device)
    eval_batch = synthetic_batch(module.shapes, module.cfg.train.eval_micro_batch_size, module.device)
    with delayed_scaling_kept(module.flux):
        for _ in range(steps):
            module.forward_backward(train_batch)
            strategy.optimizer_step(optimizer, closure=lambda: None)
        module._reset_eval_metrics()  # accumulators on the module's device (created before it was moved)
        module.flux.eval()
        strategy.eval_mode(True)
        with torch.no_grad():
            for _ in range(steps):
                module.validation_step(eval_batch, 0)
        strategy.eval_mode(False)
        module.flux.train()
    for inner, state in zip(inner_optimizers(optimizer), states, strict=True):
        inner.state.clear()
        inner.state.update(state)
    _restore_groups(optimizer, groups)
    strategy.zero_grad()
    set_rng_state(rng)
    module._reset_train_metrics()
    module._reset_eval_metrics()
