"""Per-block execution wrappers applied through ``Flux.block_runner``: activation recompute and the FP8 context.

The model stays free of training concerns; ``block_runner(cfg)`` composes what ``cfg.parallel.recompute`` and
``cfg.precision.fp8`` ask for:

* ``parallel.recompute=block``: every double/single block is re-run in the backward pass instead of keeping its
  activations (``torch.utils.checkpoint``, non-reentrant; the blocks have no dropout, so no RNG replay is needed).
* ``parallel.recompute=selective`` is not a block wrapper: the layers recompute what
  ``parallel.recompute_modules`` names (``core_attn``, ``mlp``, ``norm``), through Megatron's
  ``recompute_granularity="selective"`` / ``recompute_modules`` config fields (``flux_nemo.model.recompute``);
  ``model_builder.flux_config`` sets the fields from :func:`selective_recompute_modules`.
* ``precision.fp8=delayed|current|block``: each block runs under Transformer Engine's ``fp8_autocast`` with that
  recipe (Hopper: per-tensor delayed or current scaling, or 1x128 block scaling; not MXFP8), amax reduced over the
  data- and context-parallel group. Embedders, modulation and the final layer stay bf16, as in NVIDIA's recipe.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch.utils.checkpoint import checkpoint

_RECOMPUTE = ("none", "block", "selective")
# parallel.recompute_modules name -> Megatron-Core's recompute_modules name (its TransformerConfig checks these)
RECOMPUTE_MODULES = {"core_attn": "core_attn", "mlp": "mlp", "norm": "layernorm"}
_FP8 = (None, "delayed", "current", "block")


def fp8_recipe(precision: DictConfig):
    """The Transformer Engine recipe of ``precision.fp8`` (GPU with Transformer Engine only)."""
    from transformer_engine.common import recipe

    fmt = getattr(recipe.Format, precision.fp8_format.upper())
    if precision.fp8 == "delayed":
        return recipe.DelayedScaling(
            fp8_format=fmt,
            amax_history_len=precision.fp8_amax_history_len,
            amax_compute_algo=precision.fp8_amax_compute_algo,
        )
    if precision.fp8 == "current":
        return recipe.Float8CurrentScaling(fp8_format=fmt)
    return recipe.Float8BlockScaling(fp8_format=fmt)


def _fp8_context(precision: DictConfig) -> Callable:
    import transformer_engine.pytorch as te
    from megatron.core import parallel_state

    fp8 = fp8_recipe(precision)

    def context():
        group = parallel_state.get_amax_reduction_group(with_context_parallel=True)
        return te.fp8_autocast(enabled=True, fp8_recipe=fp8, fp8_group=group)

    return context


def selective_recompute_modules(cfg: DictConfig) -> list[str] | None:
    """Megatron's ``recompute_modules`` for ``parallel.recompute=selective`` (None for none / block), checking
    ``parallel.recompute`` and ``parallel.recompute_modules`` (named in the errors)."""
    if cfg.parallel.recompute not in _RECOMPUTE:
        raise ValueError(f"parallel.recompute={cfg.parallel.recompute!r}; expected one of {_RECOMPUTE}")
    modules = list(cfg.parallel.recompute_modules)
    unknown = [m for m in modules if m not in RECOMPUTE_MODULES]
    if unknown:
        raise ValueError(
            f"parallel.recompute_modules={modules}: unknown {unknown}; expected names from {list(RECOMPUTE_MODULES)}"
        )
    if cfg.parallel.recompute != "selective":
        return None
    if not modules:
        raise ValueError(
            "parallel.recompute=selective needs a non-empty parallel.recompute_modules (or none)"
        )
    return [RECOMPUTE_MODULES[m] for m in modules]


def validate(cfg: DictConfig) -> None:
    """Fail early, naming the key, on options this recipe does not implement."""
    selective_recompute_modules(cfg)
    if cfg.precision.fp8 not in _FP8:
        raise ValueError(f"precision.fp8={cfg.precision.fp8!r}; expected one of {_FP8}")
    if cfg.precision.fp8 is not None and cfg.model.backend == "local":
        raise ValueError(
            "precision.fp8 needs Transformer Engine layers: set model.backend=te (or auto on GPU)"
        )


def block_runner(cfg: DictConfig) -> Callable | None:
    """``fn(block, *args)`` for ``Flux.block_runner``, or None when blocks run plainly."""
    validate(cfg)
    recompute = cfg.parallel.recompute == "block"
    context = _fp8_context(cfg.precision) if cfg.precision.fp8 is not None else None
    if not recompute and context is None:
        return None

    def run(block, *args):
        def call(*inputs):
            if context is None:
                return block(*inputs)
            with context():
                return block(*inputs)

        if recompute and block.training:
            return checkpoint(call, *args, use_reentrant=False)
        return call(*args)

    return run


def refresh_fp8_weights(model: torch.nn.Module) -> None:
    """Mark the start of an optimizer step: Transformer Engine linears quantize their weights again.

    Megatron's TE linears pass ``is_first_microbatch`` to TE, which quantizes the weights to FP8 on the first
    micro-batch of a step and reuses that copy for the later micro-batches (and for block recompute), then clears
    the flag. Megatron's schedules set it again per step through ``MegatronModule.set_is_first_microbatch``, which
    acts only when ``config.fp8`` is set; this recipe enters FP8 through the block runner instead, so the training
    step calls this. Without it every step would run the FP8 copy of the first step's weights. Costs nothing in
    bf16 (the flag only gates the FP8 weight cache).
    """
    for module in model.modules():  # ~1k modules for the full model: well under a millisecond per step
        if hasattr(module, "is_first_microbatch"):
            module.is_first_microbatch = True
