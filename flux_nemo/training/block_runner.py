"""Per-block execution wrappers applied through ``Flux.block_runner``: activation recompute and the FP8 context.

The model stays free of training concerns; ``block_runner(cfg)`` composes what ``cfg.parallel.recompute`` and
``cfg.precision.fp8`` ask for:

* ``parallel.recompute=block``: every double/single block is re-run in the backward pass instead of keeping its
  activations (``torch.utils.checkpoint``, non-reentrant; the blocks have no dropout, so no RNG replay is needed).
* ``parallel.recompute=selective`` is not a block wrapper: the layers recompute what
  ``parallel.recompute_modules`` names (``core_attn``, ``mlp``, ``norm``), through Megatron's
  ``recompute_granularity="selective"`` / ``recompute_modules`` config fields (``flux_nemo.model.recompute``);
  ``model_builder.flux_config`` sets the fields from :func:`selective_recompute_modules`.
* ``precision.fp8=delayed|current|block``: the blocks run under Transformer Engine's ``fp8_autocast`` with that
  recipe (Hopper: per-tensor delayed or current scaling, or 1x128 block scaling; not MXFP8), amax reduced over the
  data- and context-parallel group. Embedders, modulation and the final layer stay bf16, as in NVIDIA's recipe.
  Current and block scaling enter it per block. Delayed scaling enters it once around all blocks
  (:meth:`BlockRunner.blocks`), as Megatron-Core's ``TransformerBlock`` does for that recipe: Transformer Engine
  keeps the amax histories of every module under one recipe in one buffer, and reduces (over the amax group) and
  rolls all of them at each ``fp8_autocast`` exit and after the backward of each autocast's first FP8 module. Per
  block that is 2N updates of all N blocks' histories per micro-batch, so the history window
  (``precision.fp8_amax_history_len``) spans 1/N as many micro-batches as it says, and the cost grows as N². With
  ``parallel.recompute=block`` the context stays per block, inside the recomputed function.
* Delayed scaling inside a full-iteration CUDA graph capture: Transformer Engine updates the backward scales after
  the backward of the first FP8 module of each ``fp8_autocast`` (the last TE backward under it), except while it is
  told a graph is being captured (``flux_nemo.training.cuda_graph.transformer_engine_capture``), where it leaves
  that to the graph's owner (its own ``make_graphed_callables`` does it after replaying a backward graph). So
  during a capture the runner routes the inputs of the first block under each ``fp8_autocast`` through
  :func:`after_backward`, which makes the same update once that block's backward is done, and the graph records
  it: the replays update the scales as the eager step does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

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


class _AfterBackward(torch.autograd.Function):
    """Identity on some tensors; ``fn()`` runs in the backward pass once all of their gradients are computed."""

    @staticmethod
    def forward(ctx, fn, *tensors):
        ctx.fn = fn
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.fn()
        return (None, *grads)


def after_backward(fn: Callable[[], None], *args):
    """``args`` unchanged, except that ``fn()`` runs once in the backward pass when every tensor among them that
    requires grad has its gradient; for the inputs of a block, that is after the whole backward of the block. A
    plain pass-through when autograd is off or no argument requires grad."""
    grads = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.requires_grad]
    if not grads or not torch.is_grad_enabled():
        return args
    out, outputs = list(args), _AfterBackward.apply(fn, *(args[i] for i in grads))
    for i, t in zip(grads, outputs, strict=True):
        out[i] = t
    return tuple(out)


def _delayed_scaling_in_capture() -> Callable:
    """``wrap(args)`` for a block's inputs: during a Transformer Engine graph capture, :func:`after_backward` with
    TE's backward amax reduction and scale update (what its first FP8 module's backward skips then); otherwise the
    arguments unchanged (TE makes the update itself)."""
    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    from transformer_engine.pytorch.graph import is_graph_capturing

    def update() -> None:
        FP8GlobalStateManager.reduce_and_update_fp8_tensors(forward=False)

    def wrap(args: tuple) -> tuple:
        return after_backward(update, *args) if is_graph_capturing() else args

    return wrap


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


class BlockRunner:
    """``runner(block, *args)`` runs one block (recompute and/or the FP8 context); ``with runner.blocks():`` is
    what ``Flux.forward`` enters once around all its blocks (the FP8 context of delayed scaling, else nothing)."""

    def __init__(self, recompute: bool, context: Callable | None, outer: bool, in_capture: Callable | None):
        self.recompute = recompute
        self.context = context  # the FP8 autocast factory, or None
        self.outer = outer  # the context wraps all blocks (blocks()) instead of each block
        self.in_capture = in_capture  # delayed scaling: wraps the inputs of an autocast's first block
        self._first_pending = False

    @contextlib.contextmanager
    def blocks(self) -> Iterator[None]:
        if not self.outer:
            yield
            return
        self._first_pending = True
        try:
            with self.context():
                yield
        finally:
            self._first_pending = False

    def __call__(self, block, *args):
        if self.in_capture is not None and (self._first_pending or not self.outer):
            self._first_pending = False
            args = self.in_capture(args)

        def call(*inputs):
            if self.context is None or self.outer:
                return block(*inputs)
            with self.context():
                return block(*inputs)

        if self.recompute and block.training:
            return checkpoint(call, *args, use_reentrant=False)
        return call(*args)


def block_runner(cfg: DictConfig) -> BlockRunner | None:
    """The :class:`BlockRunner` for ``Flux.block_runner``, or None when blocks run plainly."""
    validate(cfg)
    recompute = cfg.parallel.recompute == "block"
    context = _fp8_context(cfg.precision) if cfg.precision.fp8 is not None else None
    if not recompute and context is None:
        return None
    delayed = cfg.precision.fp8 == "delayed"
    in_capture = _delayed_scaling_in_capture() if delayed else None
    return BlockRunner(recompute, context, outer=delayed and not recompute, in_capture=in_capture)


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


def delayed_scaling_states(model: torch.nn.Module) -> Iterator[tuple[str, object]]:
    """``(name, state)`` of every FP8 delayed-scaling state (TE's ``fp8_meta["scaling_fwd"|"scaling_bwd"]``: an
    ``amax_history`` and a ``scale``) in ``model``; none for bf16, current or block scaling, or the local spec."""
    for name, module in model.named_modules():
        meta = getattr(module, "fp8_meta", None) or {}
        for direction in ("scaling_fwd", "scaling_bwd"):
            state = meta.get(direction)
            if getattr(state, "amax_history", None) is not None:
                yield f"{name}.{direction}", state


@contextlib.contextmanager
def delayed_scaling_kept(model: torch.nn.Module) -> Iterator[None]:
    """FP8 delayed scaling's amax histories and scales are the same after the block as before it.

    The synthetic warmup (``flux_nemo.training.warmup``) runs inside this: its amaxes would otherwise stay in the
    histories for ``precision.fp8_amax_history_len`` micro-batches and set the scales of the first real steps. A
    state that existed before (a resumed run's, from the checkpoint) gets its values back; one that TE created
    during the block (on a module's first FP8 forward) gets TE's initial values, zero histories and scales of 1.0,
    as a fresh run's first step sees them. Tensors change in place: TE's global amax buffers, which hold them, and
    CUDA graphs captured in the block, which read and write them, keep working.
    """
    before = {name: (s.amax_history.clone(), s.scale.clone()) for name, s in delayed_scaling_states(model)}
    yield
    with torch.no_grad():
        for name, state in delayed_scaling_states(model):
            history, scale = before.get(name, (None, None))
            if history is None:
                state.amax_history.zero_()
                state.scale.fill_(1.0)
                continue
            # TE truncates or zero-pads a history when the recipe's length changed (a resume with another length)
            rows = min(len(history), len(state.amax_history))
            state.amax_history.zero_()
            state.amax_history[:rows].copy_(history[:rows])
            state.scale.copy_(scale)
