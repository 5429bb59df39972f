"""Build the Flux network from ``cfg.model`` / ``cfg.precision`` (and its Megatron wrapping on GPU)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from flux_nemo.model import FluxConfig, build_flux
from flux_nemo.training.block_runner import block_runner, selective_recompute_modules

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_NON_FIELDS = ("flavor", "backend")


def compute_dtype(cfg: DictConfig) -> torch.dtype:
    """Activation dtype of ``precision.compute_dtype`` (``bf16`` or ``fp32``)."""
    name = cfg.precision.compute_dtype
    if name not in _DTYPES:
        raise ValueError(f"precision.compute_dtype={name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def flux_config(cfg: DictConfig) -> FluxConfig:
    """``FluxConfig.from_flavor(model.flavor, **model fields that are set)`` plus precision/parallel fields."""
    fields = {
        k: v for k, v in OmegaConf.to_container(cfg.model).items() if k not in _NON_FIELDS and v is not None
    }
    if "axes_dim" in fields:
        fields["axes_dim"] = tuple(fields["axes_dim"])
    par = cfg.parallel
    fields.update(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        sequence_parallel=par.sequence_parallel,
    )
    recompute_modules = selective_recompute_modules(cfg)  # parallel.recompute=selective: the layers recompute
    if recompute_modules is not None:
        fields.update(recompute_granularity="selective", recompute_modules=recompute_modules)
    if torch.cuda.is_available() and compute_dtype(cfg) == torch.bfloat16:
        # Parameters are created (and initialised) directly in bf16, as Megatron does with params_dtype=bf16: the
        # optimizer keeps the fp32 master copy. Building in fp32 first would hold 4 B/param (47.6 GB for the
        # full model) until Float16Module casts it, on top of DDP's buffers.
        fields.update(bf16=True, params_dtype=torch.bfloat16)
    if torch.cuda.is_available() and backend(cfg) == "te":
        fields.update(gradient_accumulation_fusion=par.gradient_accumulation_fusion)
    return FluxConfig.from_flavor(cfg.model.flavor, **fields)


def backend(cfg: DictConfig) -> str:
    """``model.backend``, with ``auto`` = Transformer Engine on GPU, local torch modules on CPU."""
    name = cfg.model.backend
    if name == "auto":
        return "te" if torch.cuda.is_available() else "local"
    if name not in ("te", "local"):
        raise ValueError(f"model.backend={name!r}; expected 'te', 'local' or 'auto'")
    return name


def build_model(cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    """The initialised Flux network on ``device`` (fp32 parameters on CPU; bf16 on GPU with bf16 compute, where the
    optimizer holds the fp32 master weights), with the block runner (block recompute / FP8 context) that
    ``parallel.recompute`` and ``precision.fp8`` ask for; selective recompute is in the model config."""
    model = build_flux(flux_config(cfg), backend=backend(cfg), block_runner=block_runner(cfg))
    return model.to(device)
