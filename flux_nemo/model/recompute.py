"""Selective activation recompute inside the Flux layers (Megatron-Core's ``recompute_granularity="selective"``).

``FluxConfig.recompute_modules`` names what is re-run in the backward pass instead of keeping its activations,
with Megatron-Core's module names (``TransformerConfig`` validates them; ``FluxConfig`` allows only these):

* ``core_attn``: the core attention (torch SDPA or TE fused attention) of every block, as Megatron's attention
  does (``flux_nemo.model.attention``). Normal checkpointing: q, k and v are kept, the rest is recomputed.
* ``mlp``: every block MLP, fc1 -> GELU -> fc2 (``flux_nemo.model.blocks.FluxMLP``); its input is kept.
* ``layernorm``: the LayerNorm + adaLN modulate in front of each attention and MLP (``flux_nemo.model.blocks``).
  Output-discarding checkpointing, like Megatron's ``layernorm`` (``CheckpointWithoutOutput``): the modulated
  tensor is released once the layers that read it (QKV / fc1 linears, which save it for their weight gradient)
  have run, and recomputed from the kept block input just before their backward needs it. (Under FP8 the TE
  linears keep their own quantized copy instead, so the release saves less.)

A layer recomputes only while training with autograd recording (``module.training`` and grad enabled), as
Megatron's layers do: evaluation and ``torch.no_grad`` run plainly. Whole-block recompute is not done here but by
the training block runner (``parallel.recompute=block``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from megatron.core import tensor_parallel
from torch import Tensor
from torch.utils.checkpoint import checkpoint as torch_checkpoint

MODULES = ("core_attn", "mlp", "layernorm")


def selected(config, name: str) -> bool:
    """Whether ``config`` asks to recompute the module ``name`` (one of :data:`MODULES`)."""
    return config.recompute_granularity == "selective" and name in (config.recompute_modules or ())


def active(module: torch.nn.Module, enabled: bool) -> bool:
    """Recompute now: ``enabled`` (from :func:`selected`), and ``module`` trains with autograd recording."""
    return enabled and module.training and torch.is_grad_enabled()


def checkpoint(function: Callable, *args: Tensor):
    """``function(*args)`` keeping only ``args`` for backward, where ``function`` is re-run.

    torch's non-reentrant checkpoint, which replays the CPU and CUDA generators; Megatron's CUDA RNG tracker
    (forked by TE attention dropout and tensor-parallel regions) is replayed too. Under Transformer Engine FP8
    autocast it is Megatron's ``te_checkpoint`` instead, as Megatron's ``TransformerLayer`` does for its MLP: the
    recompute runs in backward, outside the autocast, in TE's recompute phase, where TE modules reuse the FP8
    scaling metadata of the forward (torch's checkpoint would recompute them in bf16).
    """
    if _fp8_autocast_enabled():
        from megatron.core.extensions.transformer_engine import te_checkpoint

        return te_checkpoint(function, False, tensor_parallel.get_cuda_rng_tracker, None, *args)
    return torch_checkpoint(function, *args, use_reentrant=False, context_fn=_replay_rng_tracker)


@functools.cache
def _fp8_state_manager():
    try:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    except ImportError:  # no Transformer Engine (CPU, local spec): never FP8
        return None
    return FP8GlobalStateManager


def _fp8_autocast_enabled() -> bool:
    manager = _fp8_state_manager()
    return manager is not None and manager.is_fp8_enabled()


def _replay_rng_tracker():
    """``context_fn`` of torch's checkpoint: the recompute sees the Megatron RNG tracker states of the forward,
    and the tracker gets its backward-time states back afterwards (as Megatron's ``CheckpointFunction``)."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    forward_states = tracker.get_states()
    if not forward_states:  # CPU (no-op tracker) or no tracker seeded: nothing to replay
        return contextlib.nullcontext(), contextlib.nullcontext()

    @contextlib.contextmanager
    def replay():
        current = tracker.get_states()
        tracker.set_states(dict(forward_states))
        try:
            yield
        finally:
            tracker.set_states(current)

    return contextlib.nullcontext(), replay()


class DiscardingCheckpoint:
    """Megatron's ``CheckpointWithoutOutput`` for deterministic functions, on any device (Megatron's needs CUDA).

    ``outputs = ckpt(function, *args)`` (tensor ``args`` only) runs ``function`` without recording its graph and
    keeps ``args``. ``ckpt.discard(outputs_to_free, *hook_tensors)``, called once the consumers of the outputs
    have run, frees the memory of ``outputs_to_free`` (their tensors stay valid for autograd) and recomputes
    ``function`` when the first of ``hook_tensors`` (the consumers' outputs) receives its gradient, which is
    before the consumers' backward reads what they saved; the freed storage is refilled in place. The outputs'
    own backward then runs through the recomputed graph. Without ``discard`` (or if no hook fires first) the
    recompute happens in that backward. With ``enabled=False`` it is a plain call and ``discard`` does nothing.
    One backward only (no ``retain_graph``).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.outputs: tuple[Tensor, ...] = ()
        self.ctx = None  # the autograd node until the recompute; it never refers back to this object

    def __call__(self, function: Callable, *args: Tensor):
        if not self.enabled:
            return function(*args)
        outputs = _DiscardingCheckpointFunction.apply(function, self, *args)
        self.outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return outputs

    def discard(self, outputs: tuple[Tensor, ...], *hook_tensors: Tensor) -> None:
        """Free ``outputs`` (some of this checkpoint's outputs); recompute at the first hook tensor's gradient."""
        if not self.enabled or not any(t.requires_grad for t in hook_tensors):
            return  # no backward will come through them: keep the outputs
        for out in outputs:
            if not any(out is kept for kept in self.outputs):
                raise ValueError("DiscardingCheckpoint.discard: not an output of this checkpoint")
            out.untyped_storage().resize_(0)
        for t in hook_tensors:
            if t.requires_grad:
                t.register_hook(self._recompute)

    def _recompute(self, _grad: Tensor) -> None:
        if self.ctx is not None:
            _recompute(self.ctx, self.outputs)
        self.ctx, self.outputs = None, ()


def _recompute(ctx, kept: tuple[Tensor, ...]) -> None:
    """Re-run the checkpointed function from its saved inputs; refill the freed ones of the ``kept`` outputs."""
    if ctx.recomputed is not None:
        return
    if ctx.function is None:
        raise RuntimeError("DiscardingCheckpoint supports one backward (no retain_graph)")
    inputs = tuple(_leaf(t) for t in ctx.saved_tensors)
    with torch.enable_grad():
        outputs = ctx.function(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    with torch.no_grad():  # the consumers saved these very tensors: refill their storage in place
        for old, new in zip(kept, outputs, strict=True):
            if old.untyped_storage().nbytes() == 0 and new.untyped_storage().nbytes() > 0:
                old.untyped_storage().resize_(new.untyped_storage().nbytes())
                old.untyped_storage().copy_(new.untyped_storage())
    ctx.recomputed = (inputs, outputs)


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(t.requires_grad)


def _identity(t: Tensor) -> Tensor:
    return t


class _DiscardingCheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function: Callable, owner: DiscardingCheckpoint, *args: Tensor):
        # Run exactly as the recompute will (grad enabled, leaves that require grad as the inputs do): the same
        # kernels, so bit-identical outputs, and a torch.compile'd function reuses its training graph rather than
        # compiling a no-grad one. The graph is dropped at once; an innermost no-op pair of saved-tensor hooks
        # keeps outer hooks (offloading, memory accounting) away from its transient tensors.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
            outputs = function(*(_leaf(a) for a in args))
        outputs = tuple(o.detach() for o in outputs) if isinstance(outputs, tuple) else outputs.detach()
        ctx.save_for_backward(*args)
        ctx.function, ctx.recomputed = function, None
        owner.ctx = ctx
        return outputs

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        _recompute(ctx, ())  # no-op when a hook recomputed already
        inputs, outputs = ctx.recomputed
        ctx.function = ctx.recomputed = None
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, *(t.grad if t.requires_grad else None for t in inputs))
