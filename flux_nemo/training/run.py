"""One MLPerf flux1 training run from a composed config: MLPerf init_start, trainer + exp_manager, fit, result."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from nemo.utils.exp_manager import exp_manager
from omegaconf import DictConfig

from flux_nemo.mlperf.logger import MLPerfLogger, global_rank
from flux_nemo.training.block_runner import validate as validate_options
from flux_nemo.training.callbacks import MLPerfRunCallback
from flux_nemo.training.config import check_run_config, eval_every_steps
from flux_nemo.training.data import ensure_synthetic_data, record_shapes
from flux_nemo.training.flops import flops_per_sample
from flux_nemo.training.model_builder import flux_config
from flux_nemo.training.module import FluxTrainingModule
from flux_nemo.training.strategy import MegatronStrategy

log = logging.getLogger("flux_nemo.train")


@dataclass
class RunResult:
    """What a run reports: MLPerf status, time to train (run_start -> run_stop), evaluations, directories."""

    status: str
    time_to_train_s: float
    steps: int
    evals: list[tuple[int, float]] = field(default_factory=list)
    log_dir: str | None = None
    mlperf_log: str | None = None

    @property
    def final_eval(self) -> float | None:
        return self.evals[-1][1] if self.evals else None


def _setup_logging(log_dir: Path | None) -> None:
    """Progress on stdout (rank 0) and a per-rank log file in the run directory."""
    logger = logging.getLogger("flux_nemo")
    logger.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if global_rank() == 0 and not any(getattr(h, "_flux_stdout", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler._flux_stdout = True
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    if log_dir is not None:
        for old in [h for h in logger.handlers if getattr(h, "_flux_file", False)]:
            logger.removeHandler(old)  # one run directory per run (tests run several in a process)
            old.close()
        handler = logging.FileHandler(log_dir / f"flux_log_globalrank-{global_rank()}.txt")
        handler._flux_file = True
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.propagate = False


def launch_rank(cfg: DictConfig) -> int:
    """Global rank before torch.distributed starts: $RANK / $SLURM_PROCID, or Lightning's own process launch
    (``devices > 1`` without torchrun sets only NODE_RANK and LOCAL_RANK in the processes it starts)."""
    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ and "LOCAL_RANK" in os.environ:
        return int(os.environ.get("NODE_RANK", 0)) * cfg.trainer.devices + int(os.environ["LOCAL_RANK"])
    return global_rank()


def _prepare_data(cfg: DictConfig) -> None:
    """``data=synthetic``: rank 0 writes the data if missing; other ranks wait for it (pre-init, untimed)."""
    if cfg.data.kind != "synthetic":
        return
    marker = Path(cfg.data.empty_encodings_path) / "clip_empty.npy"
    if launch_rank(cfg) == 0:
        ensure_synthetic_data(cfg, record_shapes(cfg, flux_config(cfg)))
    deadline = time.time() + 600
    while not marker.exists():
        if time.time() > deadline:
            raise TimeoutError(f"synthetic data did not appear at {marker}")
        time.sleep(1)


_VERSION_ENV = "NEMO_EXPM_VERSION"  # exp_manager's run-directory version, shared with ranks it launches
_version_set_here: str | None = None


def _check_resume(cfg: DictConfig) -> None:
    """``resume_if_exists``: NeMo looks in ``<exp_dir>/<name>/checkpoints`` only, and trains from scratch when it
    finds nothing there; a run started without ``resume_if_exists`` wrote into ``<exp_dir>/<name>/version_N``.
    Refuse to start over silently in that case, naming the folder to resume from."""
    em = cfg.exp_manager
    if not em.resume_if_exists or em.explicit_log_dir:
        return
    root = Path(em.exp_dir or "nemo_experiments") / str(em.name)
    if any(root.glob("checkpoints/*last*")) or any(root.glob("checkpoints/*end*")):
        return
    earlier = sorted(
        {p.parent.parent for p in root.glob("*/checkpoints/*last*")}, key=lambda p: p.stat().st_mtime
    )
    if earlier:
        raise ValueError(
            f"exp_manager.resume_if_exists=true: no checkpoint in {root}/checkpoints, where NeMo resumes from, but "
            f"{', '.join(map(str, earlier))} holds the checkpoints of a run started without resume_if_exists; "
            f"resume it with exp_manager.explicit_log_dir={earlier[-1]} (or start afresh in another exp_manager.exp_dir)"
        )


def _exp_manager(trainer: pl.Trainer, cfg: DictConfig) -> Path | None:
    """NeMo's exp_manager; a version it chose for an earlier run in this process is not reused."""
    global _version_set_here
    if _version_set_here is not None and os.environ.get(_VERSION_ENV) == _version_set_here:
        os.environ.pop(_VERSION_ENV)
    log_dir = exp_manager(trainer, cfg.exp_manager)
    if launch_rank(cfg) == 0:
        _version_set_here = os.environ.get(_VERSION_ENV)
    return Path(log_dir) if log_dir else None


def build_trainer(cfg: DictConfig, callbacks: list) -> pl.Trainer:
    """Lightning trainer with our Megatron strategy; evaluation every ``ceil(eval_every_samples / GBS)`` steps."""
    accelerator = cfg.trainer.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "cpu" and cfg.trainer.devices * cfg.trainer.num_nodes > 1:
        raise ValueError(
            f"trainer.devices={cfg.trainer.devices} x trainer.num_nodes={cfg.trainer.num_nodes} on CPU: the CPU path "
            "trains in one process (it has no gradient reduction, so more processes would train separate replicas); "
            "set system.devices=1 and system.num_nodes=1, or use a GPU system"
        )
    backend = "nccl" if accelerator == "gpu" else "gloo"
    return pl.Trainer(
        accelerator=accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=MegatronStrategy(cfg, process_group_backend=backend),
        max_steps=cfg.train.max_steps,
        max_epochs=-1,
        val_check_interval=eval_every_steps(cfg),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,
        log_every_n_steps=cfg.train.log_every_n_steps,
        benchmark=cfg.trainer.benchmark,
        callbacks=callbacks,
    )


@dataclass
class Run:
    """A prepared run: trainer (with exp_manager's loggers and checkpointing), module and MLPerf callback."""

    trainer: pl.Trainer
    module: FluxTrainingModule
    callback: MLPerfRunCallback
    log_dir: Path | None

    def fit(self) -> RunResult:
        try:
            self.trainer.fit(self.module)
        except SIGTERMException:
            log.warning(
                "stopped by SIGTERM at step %d, outside the training loop (Lightning's handler; no checkpoint)",
                self.trainer.global_step,
            )
        self.callback.finish(self.trainer)
        cb = self.callback
        return RunResult(
            status=cb.status,
            time_to_train_s=getattr(cb, "run_stop", time.time()) - getattr(cb, "run_start", time.time()),
            steps=self.trainer.global_step,
            evals=cb.evals,
            log_dir=str(self.log_dir) if self.log_dir else None,
            mlperf_log=os.fspath(self.module.cfg.mlperf.log_file)
            if self.module.cfg.mlperf.log_file
            else None,
        )


def prepare(cfg: DictConfig, config_filename: str = "conf/flux_schnell.yaml") -> Run:
    """MLPerf ``init_start``, then the trainer, exp_manager and the (not yet built) module."""
    _setup_logging(None)
    validate_options(cfg)
    check_run_config(cfg)  # before the MLPerf log (truncated on open) and the run directory exist
    _check_resume(cfg)
    _prepare_data(cfg)
    mllogger = MLPerfLogger(cfg.mlperf.log_file, rank=launch_rank(cfg))
    mllogger.init_start()  # before the model is built
    model_config = flux_config(cfg)
    shapes = record_shapes(cfg, model_config)
    flops = flops_per_sample(model_config, (shapes.latent_size // 2) ** 2, shapes.t5_len)
    callback = MLPerfRunCallback(cfg, mllogger, flops, eval_every_steps(cfg), config_filename)
    trainer = build_trainer(cfg, [callback])
    log_dir = _exp_manager(trainer, cfg)
    _setup_logging(log_dir)
    log.info(
        "run: GBS %d, evaluation every %d steps, %.4g TFLOP/sample, MLPerf log %s, run dir %s",
        cfg.train.global_batch_size,
        eval_every_steps(cfg),
        flops / 1e12,
        cfg.mlperf.log_file,
        log_dir,
    )
    return Run(trainer, FluxTrainingModule(cfg), callback, log_dir)


def run(cfg: DictConfig, config_filename: str = "conf/flux_schnell.yaml") -> RunResult:
    """Train until the first evaluation at or below ``mlperf.target`` (or ``train.max_steps``)."""
    return prepare(cfg, config_filename).fit()
