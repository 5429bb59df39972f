"""The elementwise ops around the Flux block GEMMs, eager or fused (``FluxConfig.modulation_fusion``), and the
fused QK RMSNorm + RoPE of the attentions (``FluxConfig.qk_norm_rope_fusion``).

Between its linears a Flux block runs only memory-bound elementwise work on ``[s, b, h]`` activations: LayerNorm
then the adaLN modulate ``(1 + scale) * x + shift``, and the gated residual ``x + gate * (y + bias)``, where ``bias``
is the bias of the row-parallel linear (attention ``linear_proj``, MLP ``linear_fc2``) that produced ``y``: those
linears return it unadded (``skip_bias_add``) so that it is added here rather than by a kernel of its own (TE adds
a row-parallel bias after the GEMM, in a separate pass, because it must follow the tensor-parallel reduction). Eager PyTorch runs
each op as its own kernel (one read and one write of the activation per op, forward and backward). With
``modulation_fusion`` the same functions go through ``torch.compile`` (Megatron-Core's ``jit_fuser`` idiom for its
bias-GELU and bias-dropout-add fusions): one kernel per function and direction, computing in fp32 and rounding
once, and saving only the LayerNorm input and statistics for backward (the normalised tensor is recomputed).

Every function computes the same math in both modes; only the kernels (and bf16 rounding of intermediates)
differ. ``FusedOps``/``EAGER`` hold the two sets; a block picks one with :func:`elementwise_ops`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flux_nemo.model.embeddings import rotate_interleaved


def norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """``(1 + scale) * LayerNorm(x) + shift``: LayerNorm over the hidden dim without affine parameters.

    ``x [s, b, h]``; ``shift``, ``scale`` ``[1, b, h]`` (broadcast over the sequence).
    """
    return (1 + scale) * F.layer_norm(x, (x.shape[-1],), eps=eps) + shift


def gated_residual(x: Tensor, gate: Tensor, y: Tensor, bias: Tensor) -> Tensor:
    """``x + gate * (y + bias)`` (``gate [1, b, h]``, ``bias [h]``): a sublayer output ``y`` whose linear left its
    bias unadded."""
    return x + gate * (y + bias)


def gated_residual_norm_modulate(
    x: Tensor, gate: Tensor, y: Tensor, bias: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """The residual ``x + gate * (y + bias)`` and its modulated LayerNorm (the next sublayer's input): one fused
    pass."""
    out = gated_residual(x, gate, y, bias)
    return out, norm_modulate(out, shift, scale, eps)


def gated_residual_sum(x: Tensor, gate: Tensor, a: Tensor, b: Tensor, bias: Tensor) -> Tensor:
    """``x + gate * (a + b + bias)``: the single block's parallel attention + MLP branches and the one bias of
    BFL's ``linear2`` (carried by the MLP's ``linear_fc2``)."""
    return x + gate * (a + b + bias)


def qk_norm_rope(
    q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """One stream's QK RMSNorm then RoPE: ``q``, ``k`` ``[s, b, np, hn]``, norm weights ``[hn]``, and the cos and
    sin of the RoPE angles (``embeddings.rope_cos_sin``, ``[s, b|1, 1, hn]``).

    The roundings of the module path: each norm computes in fp32 (with its weight) and rounds to the input dtype
    (:class:`~flux_nemo.model.attention.RMSNorm`), then the rotation
    (:func:`~flux_nemo.model.embeddings.apply_interleaved_rope`) computes in fp32 and rounds again.
    """
    return _norm_rope(q, q_weight, cos, sin, eps), _norm_rope(k, k_weight, cos, sin, eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float | None) -> Tensor:
    """RMSNorm over the last dim with ``weight``, computed in fp32 (fp64 for fp64 inputs) and rounded to ``x``'s
    dtype: the QK norm of the ``local`` spec (:class:`~flux_nemo.model.attention.RMSNorm`) and of
    :func:`qk_norm_rope`."""
    compute = torch.promote_types(x.dtype, torch.float32)
    return F.rms_norm(x.to(compute), (x.shape[-1],), weight.to(compute), eps).to(x.dtype)


def _norm_rope(t: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float) -> Tensor:
    return rotate_interleaved(rms_norm(t, weight, eps), cos, sin)


@functools.cache
def fused_qk_norm_rope() -> Callable[..., tuple[Tensor, Tensor]]:
    """:func:`qk_norm_rope` through ``torch.compile`` (``FluxConfig.qk_norm_rope_fusion``): q and k are read
    and written once per direction, where the module path runs a norm kernel and a RoPE kernel for each, and TE's
    RMSNorm spends most of its backward reducing the 128-wide weight gradient (2 + 4 blocks at micro-batch 16: the
    QK norms and RoPE took ~4.2 ms of a 70 ms step's GPU time, H100 profile). cos and sin come in precomputed:
    taking them per element inside the kernel (from fp64 angles) made it as slow as the module path. Shapes as in
    :func:`fused_ops`."""
    return torch.compile(qk_norm_rope, fullgraph=True)


@dataclass(frozen=True)
class ElementwiseOps:
    """One implementation of each elementwise op of the blocks."""

    norm_modulate: Callable[..., Tensor]
    gated_residual: Callable[..., Tensor]
    gated_residual_norm_modulate: Callable[..., tuple[Tensor, Tensor]]
    gated_residual_sum: Callable[..., Tensor]


EAGER = ElementwiseOps(norm_modulate, gated_residual, gated_residual_norm_modulate, gated_residual_sum)


@functools.cache
def fused_ops() -> ElementwiseOps:
    """The ``torch.compile`` versions (compiled lazily on first call).

    ``fullgraph=True`` makes a graph break an error rather than a silent slowdown. Shapes are left to dynamo's
    automatic dynamic shapes: the first shape is specialised, a second one recompiles with dynamic sizes that then
    serve every later shape (text, image and joint sequence, train and eval batch, context/sequence-parallel
    shards). With ``dynamic=False`` each shape would be one more recompilation, and past dynamo's recompile limit
    (8) a ``fullgraph`` function fails hard.
    """

    def compile_(fn):
        return torch.compile(fn, fullgraph=True)

    return ElementwiseOps(*(compile_(getattr(EAGER, f.name)) for f in dataclasses.fields(EAGER)))


def elementwise_ops(fused: bool) -> ElementwiseOps:
    """``fused_ops()`` if ``fused`` else the eager functions."""
    return fused_ops() if fused else EAGER
