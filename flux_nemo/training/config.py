"""Typed schema of the Hydra config in ``conf/`` (structured configs: a typo or a wrong type fails, naming the key).

``conf/flux_schnell.yaml`` starts its defaults list with ``flux_schnell_schema`` (stored here in Hydra's
ConfigStore), so every group file and every command-line override is merged into these dataclasses.
Import this module before Hydra composes (the recipe and the demo do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from nemo.utils.exp_manager import CallbackParams, ExpManagerConfig
from omegaconf import MISSING, DictConfig

from flux_nemo.training.optim import MOMENTS_DTYPES


@dataclass
class ModelConfig:
    """``model=tiny | schnell``: a flavor of ``FluxConfig`` plus field overrides (``None`` = flavor default)."""

    flavor: str = MISSING
    backend: str = "auto"  # "te" (Transformer Engine, GPU) | "local" (torch modules) | "auto": te if CUDA
    in_channels: int | None = None
    vec_in_dim: int | None = None
    context_in_dim: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    mlp_ratio: float | None = None
    num_double_blocks: int | None = None
    num_single_blocks: int | None = None
    axes_dim: list[int] | None = None
    theta: int | None = None
    qkv_bias: bool | None = None
    modulation_fusion: bool | None = None  # fused LayerNorm+modulate / gated residuals (torch.compile)
    qk_norm_rope_fusion: bool | None = None  # fused QK RMSNorm + RoPE (torch.compile)


@dataclass
class SyntheticConfig:
    """Shape and size of generated data (``data=synthetic``); written once to the data paths if missing."""

    num_train: int = 4096
    num_eval: int = 1024
    seed: int = 0


@dataclass
class DataConfig:
    """``data=preprocessed | synthetic | raw``: the official preprocessed record format on disk."""

    kind: str = "preprocessed"
    train_path: str = MISSING
    eval_path: str = MISSING
    empty_encodings_path: str = MISSING
    format: str = "auto"  # "arrow" | "webdataset" | "auto"
    num_workers: int = 2
    t5_len: int = 256  # T5 tokens per sample
    latent_size: int = 32  # VAE latent height = width (256 px / 8)
    synthetic: SyntheticConfig | None = None
    raw: dict[str, Any] | None = None


@dataclass
class PrecisionConfig:
    """``precision=bf16 | fp8_delayed | fp8_current | fp8_block | fp32``."""

    name: str = "bf16"
    compute_dtype: str = "bf16"  # dtype of activations and of the Megatron model params ("bf16" | "fp32")
    fp8: str | None = None  # Transformer Engine recipe: "delayed" | "current" | "block" | None
    fp8_format: str = "hybrid"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    grad_reduce_in_fp32: bool = True
    # Megatron's precision-aware optimizer: TE FusedAdam keeps the fp32 master weights and writes the bf16 params in
    # the same kernel (no separate master -> param copy). Master weights, grads and Adam state stay fp32, so the
    # numerics are the standard mixed-precision ones. GPU, distributed optimizer only.
    precision_aware_optimizer: bool = False
    # dtype of the Adam moments (exp_avg, exp_avg_sq): "fp32" (the reference) or "bf16" (half the optimizer-state
    # traffic and memory; a precision change against the reference's fp32 AdamW state, so convergence has to be
    # shown against the RCPs). bf16 needs precision_aware_optimizer=true (TE FusedAdam keeps them).
    adam_moments_dtype: str = "fp32"
    # With precision_aware_optimizer: keep only the low 16 bits of each fp32 master weight (an int16 remainder) next
    # to the bf16 parameter, which holds the high 16 (TE FusedAdam rebuilds the fp32 value exactly), so the update is
    # the same while Adam moves 26 instead of 28 bytes per parameter and the master copy takes half the memory.
    store_param_remainders: bool = False
    # MLPerf 6.1 disclosure keys (lowest precision in linear layers, attention, communication)
    mlperf_linear: str = "bfloat16"
    mlperf_attn: str = "bfloat16"
    mlperf_comm: str = "fp32"


@dataclass
class ParallelConfig:
    """``parallel=dp | tp2 | ...``: Megatron parallelism and the distributed optimizer."""

    tensor_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"  # "none" | "block" (whole blocks) | "selective" (the recompute_modules below)
    # parallel.recompute=selective: what each block recomputes, any of "core_attn" (core attention), "mlp" (the
    # MLPs), "norm" (LayerNorm + adaLN modulate; output freed after use); Megatron's recompute_modules
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    cuda_graph: str = "none"  # "none" | "full_iteration"
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    bucket_size: int | None = None
    num_distributed_optimizer_instances: int = 1
    # One optimizer param group per block, same hyper-parameters (GPU; flux_nemo.training.optim.per_block_overrides)
    optimizer_groups_per_block: bool = False
    gradient_accumulation_fusion: bool = (
        True  # TE linears write wgrad into Megatron's fp32 main_grad (GPU, te)
    )


@dataclass
class SystemConfig:
    """``system=<preset>``: the machine a run targets (consumed by ``trainer`` and the launcher)."""

    name: str = "single"
    accelerator: str = "auto"  # "cpu" | "gpu" | "auto"
    devices: int = 1  # processes (GPUs) per node
    num_nodes: int = 1
    platform: str = "unspecified"  # MLPerf submission_platform


@dataclass
class RcpPoint:
    """One reference convergence point: base learning rate and linear warmup steps."""

    lr: float = MISSING
    warmup_steps: int = MISSING


@dataclass
class MLPerfConfig:
    """``mlperf=flux1``: target, MLPerf log and the RCP table ``global batch size -> (lr, warmup)``."""

    target: float = 0.586
    log_file: str | None = None
    submission_org: str = "flux-nemo"
    submission_division: str = "closed"
    submission_status: str = "onprem"
    train_samples: int = 1_099_776
    eval_samples: int = 29_696
    rcp_hparams: dict[int, RcpPoint] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Batch sizes, schedule, evaluation cadence and seeding of the MLPerf run."""

    global_batch_size: int = 512
    micro_batch_size: int = 16
    eval_micro_batch_size: int = 16
    max_steps: int = 30_000
    eval_every_samples: int = 262_144
    lr: float | None = None  # None: from mlperf.rcp_hparams
    warmup_steps: int | None = None  # None: from mlperf.rcp_hparams
    cfg_dropout: float = 0.1
    seed: int | None = None  # None: fresh from /dev/urandom (logged once via MLPerf "seed")
    log_every_n_steps: int = 10
    synthetic_warmup_steps: int = 2  # untimed steps before run_start (weights unchanged)
    # The adaLN modulations once per optimizer step for all micro-batches (training/micro_batches.py), or (false)
    # in each micro-batch's forward; same math
    modulations_once_per_step: bool = True
    checkpoint_on_stop: bool = True  # save on SIGTERM/SIGUSR1 and on a non-finite loss


@dataclass
class TrainerConfig:
    """Lightning ``Trainer`` arguments we expose (the rest is fixed by the recipe)."""

    accelerator: str = "${system.accelerator}"
    devices: int = "${system.devices}"  # type: ignore[assignment]
    num_nodes: int = "${system.num_nodes}"  # type: ignore[assignment]
    enable_progress_bar: bool = False
    benchmark: bool = False


def _exp_manager_defaults() -> ExpManagerConfig:
    # keep the newest checkpoint every 1000 steps (the reference's interval) and at the end; never on the eval
    # path. Lightning's ModelCheckpoint saves "-last" at every validation end unless it saves at train-epoch ends
    # instead; our epoch never ends (the train loader cycles), so save_on_train_epoch_end=True leaves only the
    # every-N-steps saves and NeMo's save at train end (after run_stop).
    ckpt = CallbackParams(
        monitor="step",
        mode="max",
        save_top_k=1,
        save_last=True,
        save_on_train_epoch_end=True,
        every_n_epochs=None,
        every_n_train_steps=1000,
        save_nemo_on_train_end=False,
    )
    return ExpManagerConfig(
        exp_dir="results/nemo_experiments",
        name="flux1",
        use_datetime_version=False,
        resume_if_exists=False,
        resume_ignore_no_checkpoint=True,
        checkpoint_callback_params=ckpt,
        create_preemption_callback=False,  # SIGTERM is ours (callbacks.py): NeMo's exits without run_stop
        log_tflops_per_sec_per_gpu=False,
        log_step_timing=False,
        disable_validation_on_resume=False,
        seconds_to_sleep=0,
    )


@dataclass
class FluxRunConfig:
    """The whole run: what ``python recipes/flux_schnell.py --cfg job`` prints."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    mlperf: MLPerfConfig = field(default_factory=MLPerfConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=_exp_manager_defaults)
    launcher: dict[str, Any] = field(default_factory=dict)


def register() -> None:
    """Store the schema as ``flux_schnell_schema`` (idempotent)."""
    ConfigStore.instance().store(name="flux_schnell_schema", node=FluxRunConfig)


register()


def resolve_lr_warmup(cfg: DictConfig) -> tuple[float, int]:
    """``(lr, warmup_steps)``: ``train.lr``/``train.warmup_steps`` if both set, else the RCP row of the GBS."""
    train, gbs = cfg.train, int(cfg.train.global_batch_size)
    row = cfg.mlperf.rcp_hparams.get(gbs)
    if train.lr is not None and train.warmup_steps is not None:
        return float(train.lr), int(train.warmup_steps)
    if row is None:
        table = ", ".join(str(k) for k in cfg.mlperf.rcp_hparams)
        raise ValueError(
            f"train.global_batch_size={gbs} has no MLPerf RCP entry (mlperf.rcp_hparams has {table}); "
            "set train.lr and train.warmup_steps explicitly"
        )
    lr = float(row.lr) if train.lr is None else float(train.lr)
    warmup = int(row.warmup_steps) if train.warmup_steps is None else int(train.warmup_steps)
    return lr, warmup


def data_parallel_size(cfg: DictConfig, world_size: int) -> int:
    """Data-parallel size of a world of ``world_size`` ranks (TP and CP ranks share a data shard)."""
    model_parallel = cfg.parallel.tensor_model_parallel_size * cfg.parallel.context_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not a multiple of parallel.tensor_model_parallel_size x "
            f"parallel.context_parallel_size = {model_parallel}"
        )
    return world_size // model_parallel


def check_batch_sizes(cfg: DictConfig, dp_size: int) -> int:
    """Micro-batches per rank and step; fails naming the keys when the batch sizes do not divide."""
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if gbs < 1 or mbs < 1 or gbs % (mbs * dp_size):
        raise ValueError(
            f"train.global_batch_size={gbs} must be a positive multiple of train.micro_batch_size={mbs} x "
            f"data-parallel size {dp_size}"
        )
    return gbs // (mbs * dp_size)


def eval_every_steps(cfg: DictConfig) -> int:
    """Optimizer steps between evaluations: ``ceil(train.eval_every_samples / train.global_batch_size)``."""
    if cfg.train.eval_every_samples < 1:
        raise ValueError(f"train.eval_every_samples must be >= 1, got {cfg.train.eval_every_samples}")
    return math.ceil(cfg.train.eval_every_samples / cfg.train.global_batch_size)


def check_data_kind(cfg: DictConfig) -> None:
    if cfg.data.kind not in ("preprocessed", "synthetic"):
        raise ValueError(
            f"data.kind={cfg.data.kind!r} cannot be trained on directly: encode raw data into the preprocessed "
            "format first (preprocess/), then use data=preprocessed"
        )


def check_run_config(cfg: DictConfig) -> None:
    """What the config alone decides, checked before the run touches the MLPerf log or the run directory (a
    failed launch must not truncate a previous result): every failure names its key."""
    if cfg.train.max_steps < 1:
        raise ValueError(f"train.max_steps must be >= 1, got {cfg.train.max_steps}")
    eval_every_steps(cfg)
    resolve_lr_warmup(cfg)
    check_data_kind(cfg)
    check_precision_disclosure(cfg.precision)
    check_optimizer_precision(cfg.precision)
    devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes
    if isinstance(devices, int) and isinstance(nodes, int) and devices > 0 and nodes > 0:
        check_batch_sizes(cfg, data_parallel_size(cfg, devices * nodes))


def check_precision_disclosure(prec: DictConfig) -> None:
    """The MLPerf log's lowest-precision keys must describe the run: FP8 block linears, the compute dtype in
    attention, and the gradient reduction's dtype (fp32 unless ``grad_reduce_in_fp32`` is off)."""
    compute = {"bf16": "bfloat16", "fp32": "fp32"}.get(prec.compute_dtype, prec.compute_dtype)
    derived = {
        "mlperf_linear": ("fp8" if prec.fp8 else compute, f"precision.fp8={prec.fp8}"),
        "mlperf_attn": (compute, f"precision.compute_dtype={prec.compute_dtype}"),
        "mlperf_comm": (
            "fp32" if prec.grad_reduce_in_fp32 or compute == "fp32" else compute,
            f"precision.grad_reduce_in_fp32={prec.grad_reduce_in_fp32}",
        ),
    }
    for key, (want, because) in derived.items():
        if prec[key] != want:
            raise ValueError(
                f"precision.{key}={prec[key]!r} is logged to MLPerf but the run uses {want!r} ({because}): "
                f"set precision.{key}={want}"
            )


def check_optimizer_precision(prec: DictConfig) -> None:
    """``precision.adam_moments_dtype`` is a dtype we implement, and bf16 moments have the optimizer that keeps
    them (Megatron's precision-aware optimizer, i.e. TE FusedAdam). The dtypes are ``optim.MOMENTS_DTYPES``, which
    ``megatron_optimizer_config`` also checks for callers that bypass the run config (the benchmarks)."""
    if prec.adam_moments_dtype not in MOMENTS_DTYPES:
        raise ValueError(
            f"precision.adam_moments_dtype={prec.adam_moments_dtype!r}; expected one of {tuple(MOMENTS_DTYPES)}"
        )
    if prec.adam_moments_dtype != "fp32" and not prec.precision_aware_optimizer:
        raise ValueError(
            f"precision.adam_moments_dtype={prec.adam_moments_dtype} needs precision.precision_aware_optimizer=true "
            "(Transformer Engine's FusedAdam keeps non-fp32 moments)"
        )
