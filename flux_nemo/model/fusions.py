"""The elementwise ops around the Flux block GEMMs, eager or fused (``FluxConfig.modulation_fusion``), and the
fused QKV split, QK RMSNorm + RoPE of the attentions (``FluxConfig.qk_norm_rope_fusion``).

Between its linears a Flux block runs only memory-bound elementwise work on ``[s, b, h]`` activations: LayerNorm
then the adaLN modulate ``(1 + scale) * x + shift``, the MLP's bias + GELU (with ``modulation_fusion``), and the gated
residual ``x + gate * (y + bias)``. There ``bias`` is the bias of the row-parallel linear that produced ``y``
(attention ``linear_proj``, MLP ``linear_fc2``). Those linears return it unadded (``skip_bias_add``), so that it is
added here rather than in a kernel of its own: TE adds a row-parallel bias after the GEMM, in a separate pass,
because it must follow the tensor-parallel reduction. Eager PyTorch runs each op as its own kernel (one read and
one write of the activation per op, forward and backward). With ``modulation_fusion`` the same functions go through
``torch.compile`` (Megatron-Core's ``jit_fuser`` idiom for its bias-GELU and bias-dropout-add fusions): one kernel
per function and direction, computing in fp32 and rounding once, and saving only the LayerNorm input and
statistics for backward (the normalised tensor is recomputed).

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

from flux_nemo.model.config import gelu_tanh
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


def bias_gelu(y: Tensor, bias: Tensor) -> Tensor:
    """``gelu_tanh(y + bias)``: the MLP's fc1 output ``y [s, b, mlp]`` with the bias the linear left unadded, and the
    activation. Compiled, the bias add rides on the GELU kernel and the bias gradient on its backward: with bf16
    GEMMs, cuBLAS reduces a fused-in bias's gradient in a kernel of its own (``globalKernelBgradAB``: ~4.9 ms per
    4-micro-batch step at 2 + 4 blocks for the QKV and fc1 biases, H100 profile)."""
    return gelu_tanh(y + bias)


def qkv_norm_rope(
    mixed: Tensor,
    bias: Tensor | None,
    q_weight: Tensor,
    k_weight: Tensor,
    cos: Tensor,
    sin: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One attention's QKV projection to the core attention's q, k and v, with the QK RMSNorm and RoPE.

    ``mixed [s, b, np, 3 * hn]`` is the projection in Megatron's per-head ``[q_h, k_h, v_h]`` layout; ``bias`` its
    bias (``[np * 3 * hn]``, same layout) if the linear left it unadded, added first (compiled, its gradient is
    reduced in this op's backward instead of in a cuBLAS bias-gradient kernel of its own); ``q_weight``,
    ``k_weight [hn]`` are the norm weights; ``cos``, ``sin [s, b|1, 1, hn]`` are those of the RoPE angles
    (``embeddings.rope_cos_sin``). Returns q and k normalised then rotated, and v, each ``[s, b, np, hn]`` and
    contiguous (the layout the core attention takes).

    The roundings of the module path: each norm computes in fp32 (with its weight) and rounds to the input dtype
    (:class:`~flux_nemo.model.attention.RMSNorm`), then the rotation
    (:func:`~flux_nemo.model.embeddings.apply_interleaved_rope`) computes in fp32 and rounds again.
    """
    return _qkv_norm_rope_joined(((mixed, bias, q_weight, k_weight),), cos, sin, eps)


def joint_qkv_norm_rope(
    txt_mixed: Tensor,
    txt_bias: Tensor | None,
    txt_q_weight: Tensor,
    txt_k_weight: Tensor,
    img_mixed: Tensor,
    img_bias: Tensor | None,
    img_q_weight: Tensor,
    img_k_weight: Tensor,
    cos: Tensor,
    sin: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`qkv_norm_rope` of the double block's two streams, each with its own bias and norm weights, joined
    along the sequence, text first: q, k and v ``[s_txt + s_img, b, np, hn]``; ``cos``, ``sin`` are the joint
    sequence's."""
    streams = (
        (txt_mixed, txt_bias, txt_q_weight, txt_k_weight),
        (img_mixed, img_bias, img_q_weight, img_k_weight),
    )
    return _qkv_norm_rope_joined(streams, cos, sin, eps)


def _qkv_norm_rope_joined(
    streams: tuple[tuple[Tensor, Tensor | None, Tensor, Tensor], ...], cos: Tensor, sin: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = [], [], []
    start = 0
    for mixed, bias, q_weight, k_weight in streams:
        if bias is not None:
            mixed = mixed + bias.view(mixed.shape[-2:])  # [np, 3 * hn], broadcast over [s, b]
        end = start + mixed.shape[0]
        cos_s, sin_s = cos[start:end], sin[start:end]
        q_s, k_s, v_s = mixed.chunk(3, dim=-1)
        q.append(rotate_interleaved(rms_norm(q_s, q_weight, eps), cos_s, sin_s))
        k.append(rotate_interleaved(rms_norm(k_s, k_weight, eps), cos_s, sin_s))
        v.append(v_s)
        start = end
    # Under torch.compile each stream's kernels write straight into their slice of the joined outputs, and the
    # backward writes the projection's gradient in place of autograd's concatenations of dq, dk and dv.
    return torch.cat(q), torch.cat(k), torch.cat(v)


def rms_norm(x: Tensor, weight: Tensor, eps: float | None) -> Tensor:
    """RMSNorm over the last dim with ``weight``, computed in fp32 (fp64 for fp64 inputs) and rounded to ``x``'s
    dtype: the QK norm of the ``local`` spec (:class:`~flux_nemo.model.attention.RMSNorm`) and of
    :func:`qkv_norm_rope`."""
    compute = torch.promote_types(x.dtype, torch.float32)
    return F.rms_norm(x.to(compute), (x.shape[-1],), weight.to(compute), eps).to(x.dtype)


@functools.cache
def fused_qkv_norm_rope() -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """:func:`qkv_norm_rope` through ``torch.compile`` (``FluxConfig.qk_norm_rope_fusion``; single blocks).

    The module path runs a norm kernel and a RoPE kernel for each of q and k, TE's RMSNorm spends most of its
    backward reducing the 128-wide weight gradient (2 + 4 blocks at micro-batch 16: the QK norms and RoPE took
    ~4.2 ms of a 70 ms step's GPU time, H100 profile), the core attention copies the strided v, and autograd
    concatenates dq, dk and dv into the projection's gradient (~0.1 ms per block and micro-batch). Compiled, q, k
    and v are read and written once per direction. cos and sin come in precomputed: taking them per element
    inside the kernel (from fp64 angles) made it as slow as the module path. Shapes as in :func:`fused_ops`."""
    return torch.compile(qkv_norm_rope, fullgraph=True)


@functools.cache
def fused_joint_qkv_norm_rope() -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """:func:`joint_qkv_norm_rope` through ``torch.compile`` (double blocks): as :func:`fused_qkv_norm_rope`, and
    the text + image concatenation of q, k and v (three more copies per direction) is folded in."""
    return torch.compile(joint_qkv_norm_rope, fullgraph=True)


@dataclass(frozen=True)
class ElementwiseOps:
    """One implementation of each elementwise op of the blocks."""

    norm_modulate: Callable[..., Tensor]
    gated_residual: Callable[..., Tensor]
    gated_residual_norm_modulate: Callable[..., tuple[Tensor, Tensor]]
    gated_residual_sum: Callable[..., Tensor]
    bias_gelu: Callable[..., Tensor]


EAGER = ElementwiseOps(
    norm_modulate, gated_residual, gated_residual_norm_modulate, gated_residual_sum, bias_gelu
)


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
