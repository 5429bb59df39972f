"""The GPU path: Megatron DDP + distributed optimizer (get_megatron_optimizer), bf16, Megatron dist checkpoints."""

import functools
import math

import pytest
import torch
from tiny_run import compose_cfg, train_losses

from flux_nemo.training.run import prepare

pytestmark = pytest.mark.gpu

GPU = ["system=h100_1x8", "system.devices=1", "precision=bf16", "model.backend=local"]
# Megatron distributed checkpoints every 2 steps, and resume from the last one if the run directory has one.
CKPT = [
    "exp_manager.create_checkpoint_callback=true",
    "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
    "exp_manager.resume_if_exists=true",
]


def fit_precision_aware(tiny_data, tmp_path, name: str, exp: str, *extra: str):
    """A tiny GPU run with the precision-aware optimizer (MLPerf log ``name``, run directory ``exp``); returns the
    prepared run and its training losses by step."""
    logs = [f"mlperf.log_file={tmp_path}/{name}.txt", f"exp_manager.exp_dir={tmp_path}/{exp}"]
    prepared = prepare(
        compose_cfg(*GPU, *tiny_data, "precision.precision_aware_optimizer=true", *logs, *extra)
    )  # fmt: skip
    prepared.fit()
    return prepared, train_losses(prepared.module.cfg.mlperf.log_file)


def optimizer_states(prepared) -> list[dict]:
    """The per-parameter states of a run's (Megatron) optimizer."""
    from flux_nemo.training.optim import inner_optimizers

    return [s for o in inner_optimizers(prepared.trainer.strategy.optimizers[0]) for s in o.state.values()]


@pytest.mark.parametrize("stop", ["max_steps", "SIGTERM"])
def test_megatron_ddp_distributed_optimizer_and_dist_checkpoint_resume(tiny_data, tmp_path, stop):
    """Megatron DDP + distributed optimizer; a run stopped at max_steps or by SIGTERM (after step 3) continues,
    with the same command and ``resume_if_exists=true``, from its Megatron distributed ``*-last`` checkpoint."""
    import os
    import signal

    from lightning.pytorch.callbacks import Callback
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer

    def dirs(name, exp):
        return [f"mlperf.log_file={tmp_path}/{name}.txt", f"exp_manager.exp_dir={tmp_path}/{exp}"]

    straight = prepare(compose_cfg(*GPU, *tiny_data, *dirs("straight", "straight")))
    straight.fit()
    assert isinstance(straight.module.flux, DistributedDataParallel)
    assert isinstance(straight.trainer.strategy.optimizers[0], MegatronOptimizer)
    assert next(straight.module.flux.parameters()).dtype == torch.bfloat16
    expected = train_losses(straight.module.cfg.mlperf.log_file)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in expected.values())

    class Preempt(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    first = prepare(compose_cfg(*GPU, *tiny_data, *CKPT, *dirs("first", "resumed"), "train.max_steps=4"))
    if stop == "SIGTERM":
        first.trainer.callbacks.insert(0, Preempt())
    stopped_at = first.fit().steps
    assert stopped_at == (3 if stop == "SIGTERM" else 4)
    saved = list((tmp_path / "resumed").rglob("*last/metadata.json"))
    assert len(saved) == 1, f"not one Megatron distributed *-last checkpoint: {saved}"
    assert "step=3." in saved[0].parent.name if stop == "SIGTERM" else "step=4." in saved[0].parent.name
    second = prepare(compose_cfg(*GPU, *tiny_data, *CKPT, *dirs("second", "resumed")))
    result = second.fit()
    assert result.steps == 6
    resumed = train_losses(second.module.cfg.mlperf.log_file)
    assert sorted(resumed) == list(range(stopped_at + 1, 7))
    assert resumed == pytest.approx({k: expected[k] for k in resumed}, rel=1e-3)


def test_precision_aware_optimizer_trains_like_the_standard_one(tiny_data, tmp_path):
    """TE FusedAdam writing the bf16 params itself (fp32 master, grads and state) follows the same losses."""
    pytest.importorskip("transformer_engine")

    def losses(name, *extra):
        run = prepare(
            compose_cfg(
                *GPU,
                *tiny_data,
                *extra,
                f"mlperf.log_file={tmp_path}/{name}.txt",
                f"exp_manager.exp_dir={tmp_path}/{name}",
            )  # fmt: skip
        )
        run.fit()
        return train_losses(run.module.cfg.mlperf.log_file)

    standard = losses("standard")
    fused = losses("fused", "precision.precision_aware_optimizer=true")
    print(f"standard {standard}\nprecision-aware {fused}")
    assert sorted(fused) == sorted(standard) == [1, 2, 3, 4, 5, 6]
    assert fused == pytest.approx(standard, rel=1e-4)


def test_bf16_adam_moments_train_like_fp32_ones_and_resume(tiny_data, tmp_path):
    """``precision.adam_moments_dtype=bf16``: TE FusedAdam keeps exp_avg and exp_avg_sq in bf16 (fp32 master
    weights), the losses follow the fp32-moment run, and a run stopped at step 4 resumes from its Megatron
    distributed checkpoint with the bf16 moments restored (same losses as the straight run)."""
    pytest.importorskip("transformer_engine")

    run = functools.partial(fit_precision_aware, tiny_data, tmp_path)  # (name, exp, *overrides)

    _, fp32 = run("fp32", "fp32")
    straight, bf16 = run("bf16", "bf16", "precision.adam_moments_dtype=bf16")
    states = optimizer_states(straight)
    assert states and {s["exp_avg"].dtype for s in states} == {s["exp_avg_sq"].dtype for s in states} == {
        torch.bfloat16
    }
    assert {s["master_param"].dtype for s in states} == {torch.float32}
    print(f"fp32 moments {fp32}\nbf16 moments {bf16}")
    assert sorted(bf16) == sorted(fp32) == [1, 2, 3, 4, 5, 6]
    assert bf16[1] == fp32[1]  # same init and batch: the moments only act from the first update on
    assert bf16 == pytest.approx(fp32, rel=1e-2)

    run("first", "resumed", "precision.adam_moments_dtype=bf16", *CKPT, "train.max_steps=4")
    _, resumed = run("second", "resumed", "precision.adam_moments_dtype=bf16", *CKPT)
    assert sorted(resumed) == [5, 6]
    assert resumed == pytest.approx({k: bf16[k] for k in resumed}, rel=1e-3)


@pytest.mark.parametrize("grad_reduce_in_fp32", [True, False], ids=["fp32-grads", "bf16-grads"])
@pytest.mark.parametrize(
    "key",
    ["parallel.gradient_accumulation_fusion", "train.modulations_once_per_step"],
    ids=["fusion", "once"],
)
def test_gradient_paths_train_like_the_plain_one(tiny_data, tmp_path, key, grad_reduce_in_fp32):
    """Two ways of producing the same gradients over the 2 micro-batches of each step, each against the plain one:

    * ``parallel.gradient_accumulation_fusion``: TE's linears and our own (``flux_nemo.model.main_grad``: adaLN
      modulations, embedders, final layer) add their weight gradients straight into Megatron DDP's ``main_grad``,
      instead of autograd writing ``.grad`` and DDP's hook adding it;
    * ``train.modulations_once_per_step``: the adaLN modulations once for both micro-batches, their backward in
      hooks inside the last micro-batch's backward, under DDP's overlapped reduction
      (``flux_nemo.training.micro_batches``), instead of in each micro-batch's forward.

    Same losses, and every trained weight (the modulations included: a dropped or doubled gradient would move them
    differently) within bf16 rounding of the plain run's."""
    pytest.importorskip("transformer_engine")

    def run(name, value):
        prepared = prepare(
            compose_cfg(
                *GPU[:-1],
                "model.backend=te",
                *tiny_data,
                f"{key}={value}",
                f"precision.grad_reduce_in_fp32={grad_reduce_in_fp32}",
                f"mlperf.log_file={tmp_path}/{name}.txt",
                f"exp_manager.exp_dir={tmp_path}/{name}",
            )  # fmt: skip
        )
        prepared.fit()
        weights = {n: p.detach().float().clone() for n, p in prepared.module.flux.named_parameters()}
        return train_losses(prepared.module.cfg.mlperf.log_file), weights

    plain_losses, plain = run("plain", "false")
    other_losses, other = run("other", "true")
    print(f"{key}=false {plain_losses}\n{key}=true {other_losses}")
    assert sorted(other_losses) == sorted(plain_losses) == [1, 2, 3, 4, 5, 6]
    assert other_losses == pytest.approx(plain_losses, rel=1e-3)
    errors = {n: ((other[n] - w).norm() / w.norm().clamp_min(1e-12)).item() for n, w in plain.items()}
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    print(f"worst relative weight differences {worst}")
    assert any(".img_mod.linear.weight" in n for n in errors)
    assert max(errors.values()) < 1e-2, worst


@pytest.mark.parametrize("paopt", [False, True], ids=["standard", "precision-aware"])
def test_per_block_optimizer_groups_train_exactly_like_one_group(tiny_data, tmp_path, paopt):
    """``parallel.optimizer_groups_per_block``: the same Adam per element, only split into one launch per block, so
    the losses are the one-group run's (up to the grad norm's summation order, which the clip would carry)."""
    from flux_nemo.training.optim import inner_optimizers

    def run(name, *extra):
        prepared = prepare(
            compose_cfg(
                *GPU[:-1],
                "model.backend=te",
                *tiny_data,
                f"precision.precision_aware_optimizer={paopt}",
                *extra,
                f"mlperf.log_file={tmp_path}/{name}.txt",
                f"exp_manager.exp_dir={tmp_path}/{name}",
            )  # fmt: skip
        )
        prepared.fit()
        groups = [len(o.param_groups) for o in inner_optimizers(prepared.trainer.strategy.optimizers[0])]
        return train_losses(prepared.module.cfg.mlperf.log_file), groups

    one, one_groups = run("one")
    per_block, per_block_groups = run("per_block", "parallel.optimizer_groups_per_block=true")
    print(f"one group {one}\nper block {per_block} (groups {per_block_groups})")
    assert one_groups == [1] and per_block_groups == [3]  # the tiny model's 1 + 1 blocks, then the rest
    assert sorted(per_block) == [1, 2, 3, 4, 5, 6]
    assert per_block == pytest.approx(one, rel=1e-5)


def test_param_remainders_train_exactly_like_fp32_master_weights_and_resume(tiny_data, tmp_path):
    """``precision.store_param_remainders=true``: TE FusedAdam keeps an int16 remainder per master weight and
    rebuilds the fp32 value from it and the bf16 parameter, so the losses follow the full-master run's (the fp32
    values are the same; the bound allows for a different operation order in TE's remainder kernel); a run stopped
    at step 4 resumes from its Megatron distributed checkpoint (remainders restored) with the same losses."""
    pytest.importorskip("transformer_engine")

    run = functools.partial(fit_precision_aware, tiny_data, tmp_path)  # (name, exp, *overrides)

    _, full = run("full", "full")
    straight, remainders = run("remainders", "remainders", "precision.store_param_remainders=true")
    states = optimizer_states(straight)
    assert states and {s["master_param"].dtype for s in states} == {torch.int16}
    print(f"fp32 master {full}\nremainders {remainders}")
    assert sorted(remainders) == [1, 2, 3, 4, 5, 6]
    assert remainders == pytest.approx(full, rel=1e-5)

    run("first", "resumed", "precision.store_param_remainders=true", *CKPT, "train.max_steps=4")
    _, resumed = run("second", "resumed", "precision.store_param_remainders=true", *CKPT)
    assert sorted(resumed) == [5, 6]
    assert resumed == pytest.approx({k: remainders[k] for k in resumed}, rel=1e-3)
