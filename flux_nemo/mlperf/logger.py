"""The one place where flux-nemo emits MLPerf (``:::MLLOG``) events.

``MLPerfLogger`` wraps ``mlperf_logging.mllog``. Each instance writes to its own log file (one run per file:
it is truncated at construction unless ``append=True``) and, by default, also prints the ``:::MLLOG`` lines
on stdout. Only global rank 0 emits. Every rank runs the same argument and ordering checks, so a contract
violation fails on all ranks alike.

Event contract (ruleset training 6.1.0). Keys are emitted in this order; ``samples_count`` is always the
cumulative number of training samples consumed so far (it never decreases):

====  ==========================================  ===========================  ==============================
 #    key (value)                                 method                       when (training loop)
====  ==========================================  ===========================  ==============================
 1    cache_clear (True)                          init_start()                 process start, before model
 2    init_start                                  init_start()                 build; caches flushed
 3    submission_benchmark (flux1), _org,         hyperparameters()            once, after init_start
      _division, _status, _platform
 4    global_batch_size                           hyperparameters()            must precede 5 (checker POST)
 5    train_samples, eval_samples,                hyperparameters()
      evaluation_frequency (ceil(262144/GBS)*GBS),
      gradient_accumulation_steps
 6    opt_name (adamw), opt_adamw_beta_1/_beta_2/ hyperparameters()            fixed values from constants
      _epsilon/_weight_decay, opt_base_learning_
      rate, opt_learning_rate_warmup_steps,
      opt_gradient_clip_norm
 7    lowest_numerical_precision_in_linear/       hyperparameters()            6.1 disclosure keys
      _attn/_comm, tensor/pipeline/context/
      expert_parallelism, micro_batch_size,
      config_filename
 8    seed (int), target_accuracy (0.586)         hyperparameters()            seed: metadata file/lineno
                                                                               = caller of hyperparameters()
 9    warmup_time (seconds), optional             warmup_time()                after untimed warmup steps
10    init_stop, run_start                        init_stop_run_start()        < 30 min after init_start;
                                                                               before touching data
11    block_start {samples_count}                 block_start(n)               start of each train block
12    tracked_stats {step, samples_count}         tracked_stats(...)           any time while running
      (train_loss, lr, samples_per_second,
      tflops_per_device)
13    block_stop {samples_count}                  block_stop(n)                end of the block
14    eval_start {samples_count}                  eval_start(n)                every evaluation_frequency
15    eval_accuracy {samples_count} (val loss)    eval_accuracy(v, n)          samples; no open block
16    eval_stop {samples_count}                   eval_stop(n)
      ... 11-16 repeat ...
17    run_stop {samples_count, status}            run_stop(status, n)          first eval <= target
                                                                               ("success") or give-up
                                                                               ("aborted")
====  ==========================================  ===========================  ==============================

Ordering rules enforced here (``RuntimeError`` otherwise): 2 before 3; 3 exactly once; 3 before 10;
10 exactly once; 11-16 only between 10 and 17; blocks and evals do not nest or overlap; eval_accuracy
only inside an eval; run_stop "success" only if the last eval_accuracy met the target. Argument errors
(bad precision name, non-int seed, ...) raise ``ValueError``/``TypeError``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mlperf_logging.mllog import constants as mk
from mlperf_logging.mllog import mllog

from flux_nemo.mlperf import constants as C

# _emit -> mllog.{event,start,end} -> _log_helper -> get_caller: skip our two frames (public method, _emit)
# so that the file/lineno metadata names the training code that called us (the seed checker reads it).
_STACK_OFFSET = 3
_INSTANCES = itertools.count()  # a fresh Python logger per instance (ids of dead objects get reused)


def global_rank() -> int:
    """Global rank: torch.distributed if initialised, else $RANK, else $SLURM_PROCID, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").strip():
            return int(os.environ[var])
    return 0


def seed_from_urandom() -> int:
    """A fresh seed from /dev/urandom (31 bits: valid for torch, numpy and random). Log it via hyperparameters."""
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(name: str, value, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


def _choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(
            f"{name}={value!r} is not allowed by ruleset {C.RULESET}; choose one of {list(allowed)}"
        )
    return value


def _text(name: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


class MLPerfLogger:
    """Emits the flux1 MLPerf event contract (see the module docstring) on global rank 0.

    Args:
        log_file: the result log of this run (rank 0 creates its parent folder and truncates the file,
            since a result file holds exactly one run). ``None``: stdout only.
        rank: global rank; default ``global_rank()``. Ranks other than 0 write nothing.
        stdout: also print the ``:::MLLOG`` lines on stdout (rank 0 only).
        clock: returns the current time in seconds since the epoch (default ``time.time``); used for
            every event's ``time_ms``.
        append: append to an existing ``log_file`` instead of truncating it.
    """

    def __init__(
        self,
        log_file: str | os.PathLike | None,
        *,
        rank: int | None = None,
        stdout: bool = True,
        clock: Callable[[], float] = time.time,
        append: bool = False,
    ):
        self.rank = global_rank() if rank is None else _int("rank", rank, 0)
        self.enabled = self.rank == 0
        self.log_file = None if log_file is None else Path(log_file)
        self._clock = clock
        self._phase = "new"  # new -> init -> configured -> running -> stopped
        self._in_block = False
        self._in_eval = False
        self._eval_value: float | None = None
        self._last_eval: float | None = None
        self._samples = 0
        self._handlers: list[logging.Handler] = []
        self._mllogger = None
        if not self.enabled:
            return
        pylogger = logging.getLogger(f"flux_nemo.mlperf.run{next(_INSTANCES)}")
        pylogger.propagate = False
        pylogger.setLevel(logging.INFO)
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._handlers.append(
                logging.FileHandler(self.log_file, mode="a" if append else "w", encoding="utf-8")
            )
        if stdout:
            self._handlers.append(logging.StreamHandler(sys.stdout))
        for h in self._handlers:
            h.setFormatter(logging.Formatter("%(message)s"))
            pylogger.addHandler(h)
        self._pylogger = pylogger
        self._mllogger = mllog.MLLogger(logger=pylogger, default_stack_offset=_STACK_OFFSET)

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        """Flush and detach the handlers (the log file is complete after this)."""
        for h in self._handlers:
            h.flush()
            h.close()
            self._pylogger.removeHandler(h)
        self._handlers = []

    def __enter__(self) -> MLPerfLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _emit(self, kind: str, key: str, value=None, metadata: dict | None = None) -> None:
        if self._mllogger is None:
            return
        fn = {"start": self._mllogger.start, "end": self._mllogger.end, "event": self._mllogger.event}[kind]
        fn(key=key, value=value, metadata=metadata, time_ms=int(self._clock() * 1000))
        for h in self._handlers:
            h.flush()

    def _require(self, event: str, *phases: str) -> None:
        if self._phase not in phases:
            raise RuntimeError(
                f"MLPerf event contract: {event} is not allowed in phase '{self._phase}' (allowed in "
                f"{', '.join(phases)}); see the table in flux_nemo/mlperf/logger.py"
            )

    def _count(self, event: str, samples_count) -> int:
        n = _int(f"{event} samples_count", samples_count, 0)
        if n < self._samples:
            raise RuntimeError(f"{event}: samples_count {n} is below the previous value {self._samples}")
        self._samples = n
        return n

    # ------------------------------------------------------------------ init (untimed)
    def init_start(self) -> None:
        """Events 1-2: cache_clear(True), init_start. Call once, first thing, after flushing caches."""
        self._require("init_start", "new")
        self._emit("event", mk.CACHE_CLEAR, True)
        self._emit("start", mk.INIT_START)
        self._phase = "init"

    def hyperparameters(
        self,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        learning_rate: float,
        warmup_steps: int,
        seed: int,
        train_samples: int,
        eval_samples: int,
        config_filename: str,
        tensor_parallelism: int = 1,
        pipeline_parallelism: int = 1,
        context_parallelism: int = 1,
        expert_parallelism: int = 1,
        precision_linear: str = "bfloat16",
        precision_attn: str = "bfloat16",
        precision_comm: str = "fp32",
        gradient_accumulation_steps: int = 1,
        evaluation_frequency: int | None = None,
        submission_org: str = "flux-nemo",
        submission_platform: str = "unspecified",
        submission_division: str = "closed",
        submission_status: str = "onprem",
    ) -> None:
        """Events 3-8, once, between init_start() and init_stop_run_start(). Validates every argument first.

        ``evaluation_frequency`` (training samples between evals) defaults to the rule value
        ``constants.evaluation_frequency(global_batch_size)``. Pass the cadence the run really uses if it
        differs (e.g. a demo that evaluates more often): it is logged as given, and the checker rejects it.
        """
        self._require("hyperparameters", "init")
        gbs = _int("global_batch_size", global_batch_size, 1)
        mbs = _int("micro_batch_size", micro_batch_size, 1)
        accum = _int("gradient_accumulation_steps", gradient_accumulation_steps, 1)
        if gbs % (mbs * accum):
            raise ValueError(
                f"global_batch_size {gbs} is not a multiple of micro_batch_size {mbs} x "
                f"gradient_accumulation_steps {accum}"
            )
        keys = [
            (mk.SUBMISSION_BENCHMARK, C.BENCHMARK),
            (mk.SUBMISSION_ORG, _text("submission_org", submission_org)),
            (mk.SUBMISSION_DIVISION, _choice("submission_division", submission_division, C.DIVISIONS)),
            (mk.SUBMISSION_STATUS, _choice("submission_status", submission_status, C.SUBMISSION_STATUSES)),
            (mk.SUBMISSION_PLATFORM, _text("submission_platform", submission_platform)),
            (mk.GLOBAL_BATCH_SIZE, gbs),
            (mk.TRAIN_SAMPLES, _int("train_samples", train_samples, 1)),
            (mk.EVAL_SAMPLES, _int("eval_samples", eval_samples, 1)),
            (
                "evaluation_frequency",
                _int("evaluation_frequency", evaluation_frequency, 1)
                if evaluation_frequency is not None
                else C.evaluation_frequency(gbs),
            ),
            (mk.GRADIENT_ACCUMULATION_STEPS, accum),
            (mk.OPT_NAME, C.OPT_NAME),
            (mk.OPT_ADAMW_BETA_1, C.ADAMW_BETA_1),
            (mk.OPT_ADAMW_BETA_2, C.ADAMW_BETA_2),
            (mk.OPT_ADAMW_EPSILON, C.ADAMW_EPSILON),
            (mk.OPT_ADAMW_WEIGHT_DECAY, C.ADAMW_WEIGHT_DECAY),
            (mk.OPT_BASE_LR, _float("learning_rate", learning_rate, 0.0)),
            (mk.OPT_LR_WARMUP_STEPS, _int("warmup_steps", warmup_steps, 0)),
            (mk.OPT_GRADIENT_CLIP_NORM, C.GRADIENT_CLIP_NORM),
            (
                mk.LOWEST_NUMERICAL_PRECISION_IN_LINEAR,
                _choice("precision_linear", precision_linear, C.ALLOWED_PRECISIONS),
            ),
            (
                mk.LOWEST_NUMERICAL_PRECISION_IN_ATTN,
                _choice("precision_attn", precision_attn, C.ALLOWED_PRECISIONS),
            ),
            (
                mk.LOWEST_NUMERICAL_PRECISION_IN_COMM,
                _choice("precision_comm", precision_comm, C.ALLOWED_PRECISIONS),
            ),
            (mk.TENSOR_PARALLELISM, _int("tensor_parallelism", tensor_parallelism, 1)),
            (mk.PIPELINE_PARALLELISM, _int("pipeline_parallelism", pipeline_parallelism, 1)),
            (mk.CONTEXT_PARALLELISM, _int("context_parallelism", context_parallelism, 1)),
            (mk.EXPERT_PARALLELISM, _int("expert_parallelism", expert_parallelism, 1)),
            (mk.MICRO_BATCH_SIZE, mbs),
            (mk.CONFIG_FILENAME, _text("config_filename", config_filename)),
        ]
        seed = _int("seed", seed, 0)
        for key, value in keys:
            self._emit("event", key, value)
        self._emit("event", mk.SEED, seed)
        self._emit("event", "target_accuracy", C.TARGET)
        self._phase = "configured"

    def warmup_time(self, seconds: float) -> None:
        """Event 9 (optional): duration of the untimed warmup (synthetic steps, graph capture)."""
        self._require("warmup_time", "init", "configured")
        self._emit("event", "warmup_time", _float("warmup_time seconds", seconds, 0.0))

    def init_stop_run_start(self) -> None:
        """Event 10: init_stop then run_start. The clock starts here; call before the first real batch."""
        self._require("init_stop_run_start", "configured")
        self._emit("end", mk.INIT_STOP)
        self._emit("start", mk.RUN_START)
        self._phase = "running"

    # ------------------------------------------------------------------ timed region
    def block_start(self, samples_count: int) -> None:
        """Event 11: a training block starts after ``samples_count`` samples."""
        self._require("block_start", "running")
        if self._in_block or self._in_eval:
            raise RuntimeError("block_start: a block or an eval is still open")
        n = self._count("block_start", samples_count)
        self._in_block = True
        self._emit("start", mk.BLOCK_START, metadata={mk.SAMPLES_COUNT: n})

    def block_stop(self, samples_count: int) -> None:
        """Event 13: the open training block ends at ``samples_count`` samples."""
        self._require("block_stop", "running")
        if not self._in_block:
            raise RuntimeError("block_stop without block_start")
        n = self._count("block_stop", samples_count)
        self._in_block = False
        self._emit("end", mk.BLOCK_STOP, metadata={mk.SAMPLES_COUNT: n})

    def tracked_stats(
        self,
        step: int,
        samples_count: int,
        *,
        loss: float,
        lr: float,
        samples_per_second: float,
        tflops_per_device: float,
    ) -> None:
        """Event 12: training statistics (not checked by the rules)."""
        self._require("tracked_stats", "running")
        value = {
            "train_loss": _float("loss", loss),
            "lr": _float("lr", lr, 0.0),
            "samples_per_second": _float("samples_per_second", samples_per_second, 0.0),
            "tflops_per_device": _float("tflops_per_device", tflops_per_device, 0.0),
        }
        meta = {"step": _int("step", step, 0), mk.SAMPLES_COUNT: self._count("tracked_stats", samples_count)}
        self._emit("event", "tracked_stats", value, meta)

    def eval_start(self, samples_count: int) -> None:
        """Event 14: an evaluation over all eval samples starts after ``samples_count`` training samples."""
        self._require("eval_start", "running")
        if self._in_block or self._in_eval:
            raise RuntimeError("eval_start: close the training block (block_stop) first")
        n = self._count("eval_start", samples_count)
        self._in_eval, self._eval_value = True, None
        self._emit("start", mk.EVAL_START, metadata={mk.SAMPLES_COUNT: n})

    def eval_accuracy(self, value: float, samples_count: int) -> None:
        """Event 15: the averaged validation loss (lower is better; target ``constants.TARGET``)."""
        self._require("eval_accuracy", "running")
        if not self._in_eval:
            raise RuntimeError("eval_accuracy outside eval_start/eval_stop")
        if self._eval_value is not None:
            raise RuntimeError("eval_accuracy logged twice in one eval")
        v = _float("eval_accuracy", value, 0.0)
        n = self._count("eval_accuracy", samples_count)
        self._eval_value = self._last_eval = v
        self._emit("event", mk.EVAL_ACCURACY, v, {mk.SAMPLES_COUNT: n})

    def eval_stop(self, samples_count: int) -> None:
        """Event 16: the evaluation ends (after its eval_accuracy)."""
        self._require("eval_stop", "running")
        if not self._in_eval or self._eval_value is None:
            raise RuntimeError("eval_stop needs eval_start and eval_accuracy first")
        n = self._count("eval_stop", samples_count)
        self._in_eval = False
        self._emit("end", mk.EVAL_STOP, metadata={mk.SAMPLES_COUNT: n})

    def run_stop(self, status: str, samples_count: int) -> None:
        """Event 17: the clock stops. ``status`` "success" requires the last eval_accuracy to meet the target."""
        self._require("run_stop", "running")
        _choice("status", status, (mk.SUCCESS, mk.ABORTED))
        if status == mk.SUCCESS and (self._last_eval is None or self._last_eval > C.TARGET):
            raise RuntimeError(
                f"run_stop('success') but the last eval_accuracy {self._last_eval} > {C.TARGET}"
            )
        n = self._count("run_stop", samples_count)
        self._emit("end", mk.RUN_STOP, metadata={mk.SAMPLES_COUNT: n, mk.STATUS: status})
        self._phase = "stopped"
        self.close()
