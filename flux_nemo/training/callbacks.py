"""Lightning callbacks of the MLPerf run: event timing, progress/throughput, stop conditions, preemption.

``MLPerfRunCallback`` owns WHEN the MLPerf events happen (``flux_nemo.mlperf.logger`` owns their format):

    init_start (recipe, before the model is built)
    on_fit_start:       hyperparameters (with the run's seed), synthetic warmup, warmup_time,
                        init_stop + run_start, block_start(samples)
    every log interval: tracked_stats; stop on a non-finite loss/grad norm (checkpoint)
    every step:         stop after SIGTERM/SIGUSR1 (any rank; resumable checkpoint)
    each evaluation:    block_stop, eval_start, eval_accuracy, eval_stop; stop at the first value <= target,
                        else block_start
    training stops:     run_stop("success" if the last eval met the target, else "aborted") when the epoch ends
                        (the loader never ends one), before the checkpoint callback's end-of-training save
    SIGTERM / SIGUSR1:  after the current step: a resumable ``*-last`` checkpoint, run_stop("aborted"), clean exit
                        (our handlers replace Lightning's, whose SIGTERMException fires after the step's evaluation:
                        a checkpoint saved there is not the state a resume continues exactly from)
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from flux_nemo.mlperf import constants as C
from flux_nemo.training.optim import warmup_constant_lr
from flux_nemo.training.warmup import run_warmup

log = logging.getLogger("flux_nemo.train")


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MLPerfRunCallback(Callback):
    """Drives the MLPerf event contract, progress reporting and the stop conditions of one run."""

    def __init__(self, cfg, mllogger, flops_per_sample: int, eval_every_steps: int, config_filename: str):
        self.cfg, self.mllogger = cfg, mllogger
        self.gbs = cfg.train.global_batch_size
        self.flops_per_sample = flops_per_sample
        self.eval_every_steps = eval_every_steps
        self.config_filename = config_filename
        self.status = "aborted"
        self.last_eval: float | None = None
        self.evals: list[tuple[int, float]] = []
        self._signal = False
        self._previous_handlers: dict = {}
        self._in_block = False
        self._running = False

    # ------------------------------------------------------------------ init -> run_start
    def on_fit_start(self, trainer, module) -> None:
        self._log_hyperparameters(trainer, module)
        start = time.time()
        run_warmup(module, self.cfg.train.synthetic_warmup_steps)
        self.mllogger.warmup_time(time.time() - start)
        if dist.is_initialized():
            dist.barrier()
        self.mllogger.init_stop_run_start()
        self._running = True
        self.run_start = self._window_start = time.time()
        self._window_step = trainer.global_step
        self._block_start(trainer)

    def on_train_start(self, trainer, module) -> None:
        # SIGTERM (preemption) and SIGUSR1 (Slurm's pre-timeout signal): stop after the current step. Installed here,
        # after Lightning's own handlers (registered after on_fit_start), which they replace: Lightning's SIGTERM
        # handler raises SIGTERMException after the step's evaluation, where no consistent checkpoint can be saved.
        self._previous_handlers = {
            s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)
        }

    def _log_hyperparameters(self, trainer, module) -> None:
        par, prec, ml = self.cfg.parallel, self.cfg.precision, self.cfg.mlperf
        self.mllogger.hyperparameters(
            global_batch_size=self.gbs,
            micro_batch_size=self.cfg.train.micro_batch_size,
            gradient_accumulation_steps=module.num_micro_batches,
            learning_rate=module.lr,
            warmup_steps=module.warmup_steps,
            seed=trainer.strategy.seed,
            train_samples=ml.train_samples,
            eval_samples=ml.eval_samples,
            evaluation_frequency=self.eval_every_steps * self.gbs,
            config_filename=self.config_filename,
            tensor_parallelism=par.tensor_model_parallel_size,
            context_parallelism=par.context_parallel_size,
            precision_linear=prec.mlperf_linear,
            precision_attn=prec.mlperf_attn,
            precision_comm=prec.mlperf_comm,
            submission_org=ml.submission_org,
            submission_platform=self.cfg.system.platform,
            submission_division=ml.submission_division,
            submission_status=ml.submission_status,
        )

    def _on_signal(self, signum, frame) -> None:
        log.warning("received signal %d: stopping after this step with a resumable checkpoint", signum)
        self._signal = True

    def _block_start(self, trainer) -> None:
        self.mllogger.block_start(trainer.global_step * self.gbs)
        self._in_block = True

    def _block_stop(self, trainer) -> None:
        if self._in_block:
            self.mllogger.block_stop(trainer.global_step * self.gbs)
            self._in_block = False

    # ------------------------------------------------------------------ training progress
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # every step (one 4-byte all-reduce; the optimizer's grad norm syncs each step anyway): a SIGTERM leaves
        # seconds, not a log interval's worth of steps
        stop_signal = self._any_rank(self._signal)
        logging_step = not step % self.cfg.train.log_every_n_steps or step == trainer.max_steps
        metrics = module.pop_train_metrics() if logging_step else None
        if metrics is not None:
            self._report(trainer, module, step, metrics)
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                log.error("non-finite loss %s or grad norm %s at step %d: stopping", *metrics.values(), step)
                self._stop_with_checkpoint(trainer, f"nonfinite-step{step}")
                return
        if stop_signal:
            self._stop_with_checkpoint(trainer, f"preempted-step{step}", resumable=True)

    def _report(self, trainer, module, step: int, metrics: dict) -> None:
        now = time.time()
        steps = step - self._window_step
        samples_per_s = steps * self.gbs / max(now - self._window_start, 1e-9)
        tflops = samples_per_s * self.flops_per_sample / trainer.world_size / 1e12
        self._window_start, self._window_step = now, step
        lr = warmup_constant_lr(max(step, 1), module.lr, module.warmup_steps)
        to_eval = self.eval_every_steps - step % self.eval_every_steps
        eta = to_eval * self.gbs / max(samples_per_s, 1e-9)
        log.info(
            "step %d/%d | loss %.4f | grad norm %.3f | lr %.3g | %.1f samples/s | %.3g TFLOP/s/device | "
            "next eval in %d steps (ETA %s) | elapsed %s",
            step,
            trainer.max_steps,
            metrics["loss"],
            metrics["grad_norm"],
            lr,
            samples_per_s,
            tflops,
            to_eval,
            _fmt_time(eta),
            _fmt_time(now - self.run_start),
        )
        self.mllogger.tracked_stats(
            step,
            step * self.gbs,
            loss=metrics["loss"] if math.isfinite(metrics["loss"]) else 0.0,
            lr=lr,
            samples_per_second=samples_per_s,
            tflops_per_device=tflops,
        )
        self._to_loggers(
            trainer, {"train_loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "lr": lr}, step
        )

    @staticmethod
    def _to_loggers(trainer, metrics: dict, step: int) -> None:
        for logger in trainer.loggers:  # exp_manager's TensorBoard logger (rank 0 only)
            logger.log_metrics(metrics, step=step)

    @staticmethod
    def _any_rank(flag: bool) -> bool:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return flag
        device = "cuda" if torch.cuda.is_available() else "cpu"
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _stop_with_checkpoint(self, trainer, name: str, resumable: bool = False) -> None:
        """Save ``<checkpoints>/<name>`` and stop. A ``resumable`` (preemption) checkpoint is named ``*-last``, the
        pattern ``exp_manager.resume_if_exists`` restores, and replaces the older ``*-last`` (NeMo refuses to
        choose between several); a non-finite state is kept for inspection, never resumed."""
        # the callback's dirpath is rank 0's (broadcast); default_root_dir is per rank
        periodic = trainer.checkpoint_callback
        if resumable and periodic is not None and periodic.save_last:
            # the checkpoint callback saves "*-last" when the (never-ending) epoch ends, i.e. when training stops
            # (``save_on_train_epoch_end``), after run_stop: a second write of the same state would double a
            # preemption's time
            log.warning("stopping: the checkpoint callback saves the resumable *-last checkpoint")
        elif self.cfg.train.checkpoint_on_stop:
            if periodic is not None and periodic.dirpath:
                directory = Path(periodic.dirpath)
            else:  # exp_manager gives ranks other than 0 no version folder: every rank writes where rank 0 does
                directory = Path(trainer.strategy.broadcast(str(trainer.default_root_dir))) / "checkpoints"
            path = directory / f"{name}{'-last' if resumable else ''}.ckpt"
            trainer.save_checkpoint(str(path))
            log.warning("checkpoint saved to %s", path.with_suffix(""))
            if resumable:
                for older in sorted(directory.glob("*-last")):
                    if older != path.with_suffix(""):
                        trainer.strategy.remove_checkpoint(str(older) + ".ckpt")
                if periodic is not None:
                    periodic.last_model_path = str(path)
        trainer.should_stop = True
        # Lightning runs a validation when ``should_stop`` is set mid-interval; an evaluation off the
        # ``eval_every_steps`` cadence must not happen (nor be logged, nor decide the status): none after a stop.
        trainer.limit_val_batches = 0

    # ------------------------------------------------------------------ evaluation
    def on_validation_start(self, trainer, module) -> None:
        if trainer.sanity_checking:
            return
        self._block_stop(trainer)
        self._eval_start = time.time()
        self.mllogger.eval_start(trainer.global_step * self.gbs)

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking:
            return
        samples = trainer.global_step * self.gbs
        value, count = module.eval_result()
        if not math.isfinite(value):
            log.error("non-finite validation loss %s at step %d: stopping", value, trainer.global_step)
            self._stop_with_checkpoint(trainer, f"nonfinite-eval-step{trainer.global_step}")
            return
        self.last_eval = value
        self.evals.append((samples, value))
        self.mllogger.eval_accuracy(value, samples)
        self.mllogger.eval_stop(samples)
        log.info(
            "eval at step %d (%d samples): validation loss %.4f over %d samples (target %.3f) in %.1f s",
            trainer.global_step,
            samples,
            value,
            count,
            self.cfg.mlperf.target,
            time.time() - self._eval_start,
        )
        self._to_loggers(trainer, {"val_loss": value}, trainer.global_step)
        if value <= self.cfg.mlperf.target:
            self.status = "success" if value <= C.TARGET else "aborted"
            trainer.should_stop = True
        elif not trainer.should_stop:
            self._block_start(trainer)
        self._window_start = time.time()

    # ------------------------------------------------------------------ end
    def on_train_epoch_end(self, trainer, module) -> None:
        # the train loader never ends an epoch: it ends when training stops, and the clock stops before the
        # checkpoint callback's end-of-training save (it runs after this callback)
        self.finish(trainer)

    def on_train_end(self, trainer, module) -> None:
        self.finish(trainer)

    def on_exception(self, trainer, module, exception) -> None:
        self.status = "aborted"
        self.finish(trainer)

    def finish(self, trainer) -> None:
        """run_stop once (the clock stops)."""
        if not self._running:
            return
        self._running = False
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._block_stop(trainer)
        self.run_stop = time.time()
        self.mllogger.run_stop(self.status, trainer.global_step * self.gbs)
        log.info(
            "run_stop: status %s after %d steps, time to train %.1f s",
            self.status,
            trainer.global_step,
            self.run_stop - self.run_start,
        )
