"""Test helpers (imported by the tests in this folder): drive MLPerfLogger through plausible flux1 runs (deterministic clock) and run the official checkers."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from flux_nemo.mlperf import constants as C
from flux_nemo.mlperf.logger import MLPerfLogger


@dataclass
class FakeClock:
    """Seconds since the epoch, advanced explicitly by the run driver (no sleeping)."""

    now: float = 1.80e9

    def __call__(self) -> float:
        return self.now


@dataclass
class RunSpec:
    seed: int
    evals: list[float]  # eval_accuracy values in order; the run stops at the first <= target
    gbs: int = 16
    mbs: int = 4
    start: float = 1.80e9
    init_seconds: float = 120.0
    step_seconds: float = 0.05
    eval_seconds: float = 20.0
    blocks_per_eval: int = 2
    rank: int = 0
    extra: dict = field(default_factory=dict)


def write_run(path: Path, spec: RunSpec) -> dict:
    """Write one run's log; returns what the run did (timed minutes, samples to converge, status)."""
    clock = FakeClock(spec.start)
    lg = MLPerfLogger(path, rank=spec.rank, stdout=False, clock=clock)
    lg.init_start()
    clock.now += spec.init_seconds
    lr, warmup = C.RCP_HPARAMS.get(spec.gbs, (1e-4, 10))
    lg.hyperparameters(
        global_batch_size=spec.gbs,
        micro_batch_size=spec.mbs,
        learning_rate=lr,
        warmup_steps=warmup,
        seed=spec.seed,
        train_samples=C.TRAIN_SAMPLES,
        eval_samples=C.EVAL_SAMPLES,
        config_filename="conf/flux_schnell.yaml",
        submission_platform="1xCPU-test",
        **spec.extra,
    )
    lg.warmup_time(30.0)
    clock.now += 30.0
    lg.init_stop_run_start()
    run_start = clock.now
    freq = C.evaluation_frequency(spec.gbs)
    steps = C.eval_every_steps(spec.gbs)
    samples, status = 0, "aborted"
    for value in spec.evals:
        for b in range(spec.blocks_per_eval):
            lg.block_start(samples)
            block_steps = steps // spec.blocks_per_eval + (b < steps % spec.blocks_per_eval)
            clock.now += block_steps * spec.step_seconds
            samples += block_steps * spec.gbs
            lg.tracked_stats(
                samples // spec.gbs,
                samples,
                loss=value + 0.1,
                lr=lr,
                samples_per_second=320.0,
                tflops_per_device=1.5,
            )
            lg.block_stop(samples)
        assert samples % freq == 0
        lg.eval_start(samples)
        clock.now += spec.eval_seconds
        lg.eval_accuracy(value, samples)
        lg.eval_stop(samples)
        if value <= C.TARGET:
            status = "success"
            break
    lg.run_stop(status, samples)
    return {"minutes": (clock.now - run_start) / 60, "samples": samples, "status": status}


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


def compliance(log: Path, tmp: Path) -> subprocess.CompletedProcess:
    return run_module(
        "mlperf_logging.compliance_checker",
        "--usage",
        "training",
        "--ruleset",
        C.RULESET,
        "--log_output",
        str(tmp / f"{log.stem}.cc.log"),
        str(log),
    )
