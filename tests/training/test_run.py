"""End-to-end CPU runs of the tiny Flux through the recipe's code path (strategy, module, callbacks)."""

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_run import compose_cfg, mlperf_events, train_losses

from flux_nemo.training.run import prepare, run


def test_run_logs_the_mlperf_contract_and_evaluates_every_interval(tiny_data, run_dirs, tmp_path):
    cfg = compose_cfg(*tiny_data, *run_dirs)
    result = run(cfg)
    assert result.steps == 6 and result.status == "aborted"  # the tiny run is far from the target
    events = mlperf_events(cfg.mlperf.log_file)
    keys = [e["key"] for e in events]
    assert keys.index("init_start") < keys.index("seed") < keys.index("warmup_time") < keys.index("run_start")
    values = {e["key"]: e["value"] for e in events}
    assert values["evaluation_frequency"] == 96 and values["seed"] == 123
    assert values["gradient_accumulation_steps"] == 2 and values["opt_base_learning_rate"] == 1e-3
    evals = [(e["metadata"]["samples_count"], e["value"]) for e in events if e["key"] == "eval_accuracy"]
    assert [n for n, _ in evals] == [96, 192] and all(0 < v < 3 for _, v in evals)
    assert [s for s, _ in result.evals] == [96, 192]
    assert keys[-1] == "run_stop" and events[-1]["metadata"]["status"] == "aborted"
    losses = train_losses(cfg.mlperf.log_file)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in losses.values())
    assert list(Path(result.log_dir).glob("flux_log_globalrank-0.txt"))


def _preempt_at(step: int, signum):
    import os

    from lightning.pytorch.callbacks import Callback

    class Preempt(Callback):  # Slurm's pre-timeout SIGUSR1, or a preemption's SIGTERM
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == step:
                os.kill(os.getpid(), signum)

    return Preempt()


@pytest.mark.parametrize(
    "stop,at,log_every",
    [("max_steps", 4, 1), ("SIGUSR1", 3, 1), ("SIGTERM", 3, 1), ("SIGTERM", 1, 4), ("SIGUSR1", 5, 4)],
)
def test_a_resumed_run_continues_with_the_same_train_losses(tiny_data, tmp_path, stop, at, log_every):
    """The same command twice with ``exp_manager.resume_if_exists=true`` (a requeued job): the second run restores
    the newest checkpoint (the periodic one, or the one written when SIGUSR1 stopped the first run)."""
    ckpt = [
        "exp_manager.create_checkpoint_callback=true",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
        "exp_manager.resume_if_exists=true",
        f"exp_manager.exp_dir={tmp_path}/resumed",
    ]
    straight = compose_cfg(
        *tiny_data, f"mlperf.log_file={tmp_path}/straight.txt", f"exp_manager.exp_dir={tmp_path}/s"
    )
    run(straight)
    first = compose_cfg(
        *tiny_data,
        *ckpt,
        f"mlperf.log_file={tmp_path}/first.txt",
        f"train.max_steps={at if stop == 'max_steps' else 6}",
        f"train.log_every_n_steps={log_every}",  # a signal stops after the step it arrived in, logging or not
    )
    prepared = prepare(first)
    # no version folder with resume_if_exists (not even the one exp_manager chose for the straight run above)
    assert prepared.log_dir == tmp_path / "resumed" / "flux1"
    if stop != "max_steps":
        import signal

        prepared.trainer.callbacks.insert(0, _preempt_at(at, getattr(signal, stop)))
    saves = []  # (checkpoint, was the MLPerf clock still running)
    save = prepared.trainer.strategy.save_checkpoint

    def recorded(checkpoint, path, *args, **kwargs):
        saves.append((Path(path).name, prepared.callback._running))
        save(checkpoint, path, *args, **kwargs)

    prepared.trainer.strategy.save_checkpoint = recorded
    stopped_at = prepared.fit().steps
    assert stopped_at == at
    # the stop's state is saved as the one *-last; SIGUSR1's by the checkpoint callback after run_stop
    assert len(list((tmp_path / "resumed").rglob("*-last"))) == 1
    at_stop = [
        (n, r) for n, r in saves if n.endswith("-last.ckpt") and (f"step={at}." in n or f"step{at}-" in n)
    ]
    assert at_stop, saves
    if stop == "SIGUSR1":
        assert not any(running for _, running in at_stop), saves
    second = compose_cfg(*tiny_data, *ckpt, f"mlperf.log_file={tmp_path}/second.txt")
    result = run(second)
    assert result.steps == 6
    expected = train_losses(straight.mlperf.log_file)
    resumed = train_losses(second.mlperf.log_file)
    if log_every == 1:  # otherwise the first run logs interval means
        resumed = {**train_losses(first.mlperf.log_file), **resumed}
    assert sorted(train_losses(second.mlperf.log_file)) == list(range(stopped_at + 1, 7))
    assert resumed == pytest.approx({k: expected[k] for k in resumed}, rel=1e-6, abs=1e-7)


def test_resume_refuses_to_start_over_when_checkpoints_are_in_a_version_folder(tiny_data, tmp_path):
    """A first run without resume_if_exists writes into <exp_dir>/flux1/version_N, where NeMo's resume does not
    look: training silently from scratch would waste the run, so the resume names the folder to resume from."""
    common = [
        *tiny_data,
        f"exp_manager.exp_dir={tmp_path}/exp",
        "exp_manager.create_checkpoint_callback=true",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
    ]
    run(compose_cfg(*common, f"mlperf.log_file={tmp_path}/a.txt", "train.max_steps=2"))
    cfg = compose_cfg(*common, f"mlperf.log_file={tmp_path}/b.txt", "exp_manager.resume_if_exists=true")
    with pytest.raises(ValueError, match=r"exp_manager\.explicit_log_dir=.*flux1/version_0"):
        prepare(cfg)
    explicit = compose_cfg(
        *common,
        f"mlperf.log_file={tmp_path}/c.txt",
        "exp_manager.resume_if_exists=true",
        f"exp_manager.explicit_log_dir={tmp_path}/exp/flux1/version_0",
    )
    result = run(explicit)
    assert result.steps == 6 and sorted(train_losses(explicit.mlperf.log_file)) == [3, 4, 5, 6]


def test_nonfinite_loss_stops_with_a_checkpoint(tiny_data, run_dirs, tmp_path):
    cfg = compose_cfg(*tiny_data, *run_dirs, "train.lr=1e30", "train.warmup_steps=0", "train.max_steps=6")
    result = run(cfg)
    assert result.status == "aborted" and result.steps < 6
    assert list(Path(result.log_dir).glob("checkpoints/nonfinite-step*/state.pt"))


def test_warmup_and_eval_padding(tiny_data, run_dirs):
    from flux_nemo.training.warmup import run_warmup, synthetic_batch

    cfg = compose_cfg(*tiny_data, *run_dirs, "train.max_steps=2", "train.eval_every_samples=1000000")
    prepared = prepare(cfg)
    prepared.fit()
    module, trainer = prepared.module, prepared.trainer
    optimizer = trainer.strategy.optimizers[0]
    weights = {k: v.clone() for k, v in module.flux.state_dict().items() if torch.is_tensor(v)}
    opt_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    groups = [dict(g, params=None) for g in optimizer.param_groups]
    # FP8 delayed scaling's state, as TE keeps it on a module (TE itself is GPU-only): each warmup forward records
    # an amax and moves the scale; afterwards both are as before the warmup
    linear = module.flux.double_blocks[0].img_mlp.linear_fc1
    state = SimpleNamespace(amax_history=torch.zeros(4, 3), scale=torch.ones(3))
    linear.fp8_meta = {"scaling_fwd": state}

    def record_amax(*_):
        state.amax_history.add_(1.0)
        state.scale.mul_(2.0)

    linear.register_forward_hook(record_amax)
    run_warmup(module, 2)
    assert torch.equal(state.amax_history, torch.zeros(4, 3)) and torch.equal(state.scale, torch.ones(3))
    for k, v in weights.items():
        assert torch.equal(module.flux.state_dict()[k], v), k
    for p, s in optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, opt_state[id(p)][k]), k
    assert [dict(g, params=None) for g in optimizer.param_groups] == groups

    batch = synthetic_batch(module.shapes, 8, module.device)
    batch["valid"][5:] = False
    batch["mean"][5:] = float("nan")  # padding rows never count, whatever they hold
    module.on_validation_epoch_start()
    with torch.no_grad():
        module.validation_step(batch, 0)
    value, count = module.eval_result()
    assert count == 5 and math.isfinite(value)


def test_sigterm_saves_a_checkpoint_and_stops(tiny_data, run_dirs):
    import os
    import signal

    from lightning.pytorch.callbacks import Callback

    class Preempt(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    prepared = prepare(compose_cfg(*tiny_data, *run_dirs))
    prepared.trainer.callbacks.insert(0, Preempt())
    result = prepared.fit()
    assert result.steps == 2 and result.status == "aborted"
    assert (Path(result.log_dir) / "checkpoints" / "preempted-step2-last" / "state.pt").exists()


@pytest.mark.parametrize(
    "key",
    ["precision.precision_aware_optimizer", "parallel.optimizer_groups_per_block"],
    ids=["paopt", "groups"],
)
def test_gpu_optimizer_options_are_refused_on_the_cpu_path(tiny_data, run_dirs, key):
    with pytest.raises(ValueError, match=rf"{re.escape(key)}=true needs the GPU path"):
        prepare(compose_cfg(*tiny_data, *run_dirs, f"{key}=true")).fit()


@pytest.mark.parametrize("topology", [("system.devices=2",), ("system.num_nodes=2",)])
def test_more_than_one_cpu_process_is_refused(tiny_data, run_dirs, topology):
    """The CPU path has no gradient reduction: two CPU processes would silently train two replicas."""
    cfg = compose_cfg(*tiny_data, *run_dirs, "system=cpu", *topology)
    with pytest.raises(ValueError, match=r"trainer\.devices=\d x trainer\.num_nodes=\d on CPU"):
        prepare(cfg)


def test_checkpoints_are_never_written_on_the_evaluation_path(tiny_data, run_dirs):
    """A checkpoint per evaluation would cost time inside the timed window: only every N steps and at the end."""
    from lightning.pytorch.callbacks import Callback

    seen = {}

    class AfterFirstEval(Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 3:  # the evaluation at step 3 is over
                seen["checkpoints"] = sorted(p.name for p in Path(trainer.default_root_dir).rglob("*.ckpt*"))
                seen["checkpoints"] += sorted(p.name for p in Path(trainer.default_root_dir).rglob("*last*"))

    cfg = compose_cfg(
        *tiny_data,
        *run_dirs,
        "exp_manager.create_checkpoint_callback=true",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=5",
        "train.max_steps=6",
    )
    prepared = prepare(cfg)
    prepared.trainer.callbacks.insert(0, AfterFirstEval())
    result = prepared.fit()
    assert [s for s, _ in result.evals] == [96, 192]  # evaluations at steps 3 and 6
    assert seen == {"checkpoints": []}
    saved = sorted(p.name for p in Path(cfg.exp_manager.exp_dir).rglob("checkpoints/*"))
    assert any("step=5" in name for name in saved) and any("last" in name for name in saved), saved


@pytest.mark.parametrize("stop", ["sigusr1", "nonfinite"])
def test_a_stop_request_does_not_evaluate_off_cadence(tiny_data, run_dirs, stop):
    """Lightning validates when ``should_stop`` is set; a stop at step 2 must not log an evaluation (cadence 3)."""
    import os
    import signal

    from lightning.pytorch.callbacks import Callback

    class Stop(Callback):
        def on_train_batch_end(self, trainer, module, *args):
            if trainer.global_step == 2 and stop == "sigusr1":
                os.kill(os.getpid(), signal.SIGUSR1)

    overrides = ["train.lr=1e30", "train.warmup_steps=0"] if stop == "nonfinite" else []
    cfg = compose_cfg(*tiny_data, *run_dirs, *overrides)
    prepared = prepare(cfg)
    prepared.trainer.callbacks.insert(0, Stop())
    result = prepared.fit()
    assert result.status == "aborted" and result.steps < 3 and result.evals == []
    keys = [e["key"] for e in mlperf_events(cfg.mlperf.log_file)]
    assert not {"eval_start", "eval_accuracy", "eval_stop"} & set(keys), keys
    assert keys[-1] == "run_stop"
    assert list(Path(result.log_dir).glob("checkpoints/*-step*/state.pt"))


def test_a_nonfinite_validation_loss_aborts_the_run_with_a_checkpoint(tiny_data, run_dirs):
    cfg = compose_cfg(*tiny_data, *run_dirs)
    prepared = prepare(cfg)
    prepared.module.eval_result = lambda: (float("nan"), 64)
    result = prepared.fit()
    assert result.status == "aborted" and result.steps == 3 and result.evals == []
    keys = [e["key"] for e in mlperf_events(cfg.mlperf.log_file)]
    # the logger allows no eval_stop without an accuracy: the evaluation stays open and the run aborts
    assert keys.count("eval_start") == 1 and not {"eval_accuracy", "eval_stop"} & set(keys)
    assert keys[-1] == "run_stop" and keys.index("eval_start") < keys.index("run_stop")
    assert (Path(result.log_dir) / "checkpoints" / "nonfinite-eval-step3" / "state.pt").exists()


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["train.global_batch_size=40"], r"train\.global_batch_size=40 must be a positive multiple"),
        (["data.kind=raw"], r"data\.kind='raw' cannot be trained on directly"),
        (["train.eval_every_samples=0"], r"train\.eval_every_samples must be >= 1"),
        (["train.global_batch_size=96", "train.lr=null"], r"train\.global_batch_size=96 has no MLPerf RCP"),
        (["parallel=tp2"], r"world size 1 is not a multiple of parallel\.tensor_model_parallel_size"),
        (["train.max_steps=0"], r"train\.max_steps must be >= 1"),
        (["precision.grad_reduce_in_fp32=false"], r"precision\.mlperf_comm='fp32' .* uses 'bfloat16'"),
        (["precision.adam_moments_dtype=fp16"], r"precision\.adam_moments_dtype='fp16'; expected one of"),
        (
            ["precision.adam_moments_dtype=bf16"],
            r"precision\.adam_moments_dtype=bf16 needs precision\.precision_aware_optimizer=true",
        ),
        (
            ["precision.mlperf_linear=fp8"],
            r"precision\.mlperf_linear='fp8' .* uses 'bfloat16' \(precision\.fp8=None",
        ),
    ],
)
def test_an_invalid_config_fails_before_the_mlperf_log_or_run_dir_is_touched(
    tiny_data, tmp_path, overrides, match
):
    log_file, exp_dir = tmp_path / "result_0.txt", tmp_path / "exp"
    log_file.write_text("a previous run's result\n")
    cfg = compose_cfg(*tiny_data, f"mlperf.log_file={log_file}", f"exp_manager.exp_dir={exp_dir}", *overrides)
    with pytest.raises(ValueError, match=match):
        prepare(cfg)
    assert log_file.read_text() == "a previous run's result\n" and not exp_dir.exists()


def test_preprocessed_data_must_have_the_mlperf_sizes(tiny_data, run_dirs):
    """A truncated download (fewer train or eval samples than MLPerf's) fails naming the path and the key."""
    from flux_nemo.training.data import ensure_synthetic_data, record_shapes
    from flux_nemo.training.model_builder import flux_config

    cfg = compose_cfg(*tiny_data, *run_dirs)
    ensure_synthetic_data(cfg, record_shapes(cfg, flux_config(cfg)))  # 256 train, 64 eval records
    as_preprocessed = [*tiny_data, *run_dirs, "data.kind=preprocessed", "train.max_steps=3"]
    with pytest.raises(ValueError, match=r"train.*256 samples, but the MLPerf flux1 train set has 1099776"):
        run(compose_cfg(*as_preprocessed))
    with pytest.raises(ValueError, match=r"eval.*64 samples, but the MLPerf flux1 eval set has 29696"):
        run(compose_cfg(*as_preprocessed, "mlperf.train_samples=256"))
    result = run(compose_cfg(*as_preprocessed, "mlperf.train_samples=256", "mlperf.eval_samples=64"))
    assert result.steps == 3 and [s for s, _ in result.evals] == [96]


def test_resume_with_another_global_batch_size_is_refused(tiny_data, tmp_path):
    common = [
        *tiny_data,
        f"exp_manager.exp_dir={tmp_path}/exp",
        "exp_manager.create_checkpoint_callback=true",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
        "exp_manager.resume_if_exists=true",
    ]
    run(compose_cfg(*common, f"mlperf.log_file={tmp_path}/a.txt", "train.max_steps=2"))
    cfg = compose_cfg(*common, f"mlperf.log_file={tmp_path}/b.txt", "train.global_batch_size=64")
    with pytest.raises(
        ValueError, match=r"train\.global_batch_size=64, but the checkpoint was trained with 32"
    ):
        run(cfg)
