"""MLPerf Training flux1 constants (ruleset 6.1.0, mlperf-logging 4.1.68).

Sources: the installed checker rules (``compliance_checker/training_6.1.0/closed_flux1.yaml``,
``common.yaml``) and RCP file (``rcp_checker/training_6.1.0/rcps_flux1.json``); see docs/MLPERF.md.
"""

from __future__ import annotations

import math

BENCHMARK = "flux1"
USAGE = "training"
RULESET = "6.1.0"

# Logged as train_samples / eval_samples: the dataset sizes (CC12M first 10%, COCO-2014 val subset).
TRAIN_SAMPLES = 1_099_776
EVAL_SAMPLES = 29_696

# Quality target: averaged validation loss <= TARGET (lower is better).
TARGET = 0.586
# Evaluate every EVAL_EVERY_SAMPLES training samples, rounded up to whole steps (see evaluation_frequency).
EVAL_EVERY_SAMPLES = 262_144

# Runs per result (olympic mean: drop fastest and slowest; at most one run may fail to converge).
RESULT_RUNS = 10

# Closed-division fixed hyper-parameters (checked exactly by closed_flux1.yaml).
OPT_NAME = "adamw"
ADAMW_BETA_1 = 0.9
ADAMW_BETA_2 = 0.95
ADAMW_EPSILON = 1e-8
ADAMW_WEIGHT_DECAY = 0.1
GRADIENT_CLIP_NORM = 1.0

# Reference convergence points of ruleset 6.0.0 / 6.1.0: global batch size -> (opt_base_learning_rate,
# opt_learning_rate_warmup_steps). Only these hyper-parameter sets have RCPs; 1024 is pruned by the checker.
RCP_HPARAMS: dict[int, tuple[float, int]] = {
    512: (2e-4, 1600),
    1024: (2.5e-4, 800),
    2048: (2.5e-4, 0),
    4096: (4e-4, 100),
}

# Values allowed for lowest_numerical_precision_in_{linear,attn,comm} (common.yaml, 6.1.0).
ALLOWED_PRECISIONS = (
    "fp64",
    "fp32",
    "tf32",
    "fp16",
    "fp8",
    "mxfp6",
    "nvfp4",
    "mxfp4",
    "bfloat16",
    "Graphcore FLOAT 16.16",
    "int8",
    "uint8",
    "int4",
    "uint4",
)

DIVISIONS = ("closed", "open")
# submission_status values we log, and the system-description "status" each maps to (training >= 4.1).
SUBMISSION_STATUSES = {
    "onprem": "Available on-premise",
    "cloud": "Available cloud",
    "research": "Research, Development, or Internal (RDI)",
    "preview": "Preview",
}


def _check_gbs(global_batch_size: int) -> int:
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
    return global_batch_size


def eval_every_steps(global_batch_size: int) -> int:
    """Optimizer steps between evaluations: ``ceil(262144 / GBS)``."""
    return math.ceil(EVAL_EVERY_SAMPLES / _check_gbs(global_batch_size))


def evaluation_frequency(global_batch_size: int) -> int:
    """Training samples between evaluations, as the 6.1.0 checker demands: ``ceil(262144 / GBS) * GBS``.

    Equals 262144 for every power-of-two GBS up to 262144; e.g. 262656 for GBS 2304.
    """
    return eval_every_steps(global_batch_size) * global_batch_size


def rcp_hparams(global_batch_size: int) -> tuple[float, int] | None:
    """(lr, warmup_steps) of the RCP at this GBS, or None if the RCP table has no such batch size."""
    return RCP_HPARAMS.get(_check_gbs(global_batch_size))
