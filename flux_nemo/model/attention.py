"""Flux attention: joint text + image attention (double blocks), self-attention (single blocks), SDPA core.

Both attentions follow BFL: QKV projection, per-head QK RMSNorm, RoPE on q and k (after the norm), then
unmasked softmax attention with the default 1/sqrt(head_dim) scale. Tensors are ``[s, b, h]``; heads are split
over tensor-parallel ranks by the column-parallel QKV (Megatron per-head ``[q_h, k_h, v_h]`` row layout) and
gathered back by the row-parallel output projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import Tensor

from flux_nemo.model import recompute
from flux_nemo.model.config import FluxConfig
from flux_nemo.model.embeddings import param_device, rope_cos_sin
from flux_nemo.model.fusions import fused_joint_qkv_norm_rope, fused_qkv_norm_rope, rms_norm

QK_NORM_EPS = torch.finfo(torch.float32).eps  # torch.nn.RMSNorm's default (eps=None) as the reference runs it


def linear_out(linear: torch.nn.Module, x: Tensor) -> Tensor:
    """Run a Megatron-style linear that returns ``(out, bias)``; add the bias if it was returned unfused."""
    out, bias = linear(x)
    return out if bias is None else out + bias


class SDPAttention(MegatronModule):
    """Core attention with ``torch.nn.functional.scaled_dot_product_attention`` (CPU, fp64, any device).

    Same call signature as Megatron's ``TEDotProductAttention`` so specs can swap them. Megatron's local
    ``DotProductAttention`` is not used because it needs CUDA. Under context parallelism the local queries attend
    to the keys and values of every rank (gathered), as TE's ring attention does in the ``te`` spec.
    """

    def __init__(
        self,
        config: FluxConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.no_mask,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **kwargs,
    ):
        super().__init__(config)
        if attn_mask_type != AttnMaskType.no_mask:
            raise ValueError(f"SDPAttention supports only AttnMaskType.no_mask, got {attn_mask_type}")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale  # None: SDPA's default 1/sqrt(head_dim)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None = None, **kwargs
    ) -> Tensor:
        """``[s, b, np, hn]`` q, k, v -> ``[s, b, np * hn]``."""
        if attention_mask is not None:
            raise ValueError("Flux attention is unmasked")
        if self.config.context_parallel_size > 1:
            # This rank holds a slice of the tokens: attend to the keys and values of all of them.
            # One collective for both keeps every rank's backward collectives in the same order.
            key, value = gather_sequence(torch.stack([key, value])).unbind(0)  # [s * cp, b, np, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, np, s, hn]
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).flatten(2)  # [s, b, np * hn]


def gather_sequence(t: Tensor) -> Tensor:
    """All-gather ``[n, s, ...]`` over the context-parallel group along the sequence (dim 1); autograd sums the
    gradients of the gathered copies back onto their owners. Unmasked attention is invariant to the token
    order, so each rank may hold any slice of the joint sequence as long as its RoPE angles travel with it."""
    from flux_nemo.shims import gather_from_sequence_parallel_region

    # Megatron's sequence gather (reduce-scatter backward) over the CP group; torch.distributed.nn's all_gather
    # backward would address the group's ranks as global ranks under gloo (wrong once TP x CP > CP).
    group = parallel_state.get_context_parallel_group()
    gathered = gather_from_sequence_parallel_region(t.transpose(0, 1).contiguous(), group=group)
    return gathered.transpose(0, 1)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with Megatron's norm signature, computed in fp32 (fp64 for fp64 inputs).

    The output keeps the input dtype (the reference norms fp32 values, then casts q and k to v's dtype).
    """

    def __init__(self, config: FluxConfig, hidden_size: int, eps: float | None = None):
        super().__init__(hidden_size, eps=eps, device=param_device(config), dtype=config.params_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


@dataclass
class FluxAttentionSubmodules:
    """Specs of the attention pieces; ``apply_rope(t [s,b,np,hn], freqs [s,b|1,1,hn])`` is a function."""

    linear_qkv: ModuleSpec | type
    core_attention: ModuleSpec | type
    linear_proj: ModuleSpec | type
    q_layernorm: ModuleSpec | type
    k_layernorm: ModuleSpec | type
    apply_rope: Callable[[Tensor, Tensor], Tensor]


class _FluxAttention(MegatronModule):
    """What both attentions share: the core attention, RoPE, and builders for QKV + QK norms and projections.

    With ``recompute_granularity="selective"`` and ``"core_attn"`` in ``recompute_modules`` the core attention is
    recomputed in the backward pass while training (``flux_nemo.model.recompute``), as in Megatron's attention.
    With ``qk_norm_rope_fusion`` the QKV projections go to q, k and v in one fused op (``fused``: the QKV split, the
    QK norms, whose modules keep the weights, RoPE, and the double block's text + image concatenation); otherwise
    the norm modules run, and RoPE runs on the joint q and k.
    """

    def __init__(
        self,
        config: FluxConfig,
        submodules: FluxAttentionSubmodules,
        layer_number: int,
        fused: Callable[[], Callable[..., tuple[Tensor, Tensor, Tensor]]],
    ):
        super().__init__(config)
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.heads_per_rank = config.num_attention_heads // tp_size
        self.core_attention = build_module(
            submodules.core_attention,
            config=config,
            layer_number=layer_number,
            attn_mask_type=AttnMaskType.no_mask,
            attention_type="self",
        )
        self.apply_rope = submodules.apply_rope
        self.fused_norm_rope = fused() if config.qk_norm_rope_fusion else None
        self.recompute_core_attn = recompute.selected(config, "core_attn")

    def _build_qkv(self, submodules: FluxAttentionSubmodules):
        config, head_dim = self.config, self.config.kv_channels
        linear = build_module(
            submodules.linear_qkv,
            config.hidden_size,
            3 * config.hidden_size,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.qkv_bias,
            skip_bias_add=self.fused_norm_rope is not None,  # the fused op adds it (flux_nemo.model.fusions)
            is_expert=False,
            tp_comm_buffer_name="qkv",
        )
        q_norm = build_module(submodules.q_layernorm, config=config, hidden_size=head_dim, eps=QK_NORM_EPS)
        k_norm = build_module(submodules.k_layernorm, config=config, hidden_size=head_dim, eps=QK_NORM_EPS)
        return linear, q_norm, k_norm

    def _build_proj(self, submodules: FluxAttentionSubmodules, bias: bool):
        """The output projection. It returns ``(out, bias)`` with the bias unadded: the block adds it in its fused
        gated residual (``flux_nemo.model.fusions``)."""
        return build_module(
            submodules.linear_proj,
            self.config.hidden_size,
            self.config.hidden_size,
            config=self.config,
            init_method=self.config.output_layer_init_method,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
        )

    def _qkv(self, x: Tensor, linear) -> tuple[Tensor, Tensor | None]:
        """``[s, b, h]`` -> the QKV projection ``[s, b, np, 3 * hn]`` in Megatron's per-head ``[q_h, k_h, v_h]``
        layout (``np`` heads on this rank, ``s`` tokens after the projection: all of them under sequence
        parallelism), and its bias ``[np * 3 * hn]`` if the linear left it for the fused op (else None)."""
        mixed, bias = linear(x)  # [s, b, 3 * h / tp]; the bias only with skip_bias_add
        return mixed.view(*mixed.shape[:2], self.heads_per_rank, 3 * self.config.kv_channels), bias

    @staticmethod
    def _norm_qk(mixed: Tensor, q_norm, k_norm) -> tuple[Tensor, Tensor, Tensor]:
        """Without the fusion: q and k through the norm modules, and v, each ``[s, b, np, hn]``."""
        q, k, v = mixed.chunk(3, dim=-1)
        # The reference casts the normalised q and k to v's dtype.
        return q_norm(q).to(v.dtype), k_norm(k).to(v.dtype), v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
        """RoPE on q and k (unless fused with the norms), then unmasked attention: ``[s, b, np, hn]`` ->
        ``[s, b, np * hn]``."""
        if self.fused_norm_rope is None:
            q, k = self.apply_rope(q, pe), self.apply_rope(k, pe)
        if recompute.active(self, self.recompute_core_attn):
            return recompute.checkpoint(self._core_attention, q, k, v)
        return self._core_attention(q, k, v)

    def _core_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.core_attention(q, k, v, attention_mask=None, attn_mask_type=AttnMaskType.no_mask)


class JointSelfAttention(_FluxAttention):
    """Double-block attention: separate img/txt QKV, norms and projections; one joint softmax (text first)."""

    def __init__(self, config: FluxConfig, submodules: FluxAttentionSubmodules, layer_number: int):
        super().__init__(config, submodules, layer_number, fused_joint_qkv_norm_rope)
        self.img_linear_qkv, self.img_q_layernorm, self.img_k_layernorm = self._build_qkv(submodules)
        self.txt_linear_qkv, self.txt_q_layernorm, self.txt_k_layernorm = self._build_qkv(submodules)
        self.img_linear_proj = self._build_proj(submodules, bias=True)
        self.txt_linear_proj = self._build_proj(submodules, bias=True)

    def forward(
        self, img: Tensor, txt: Tensor, pe: Tensor
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Modulated ``img [s_img, b, h]``, ``txt [s_txt, b, h]``, RoPE angles ``pe`` -> the img and the txt output,
        each as ``(projection without its bias, bias [h])``."""
        img_mixed, img_bias = self._qkv(img, self.img_linear_qkv)
        txt_mixed, txt_bias = self._qkv(txt, self.txt_linear_qkv)
        if self.fused_norm_rope is not None:  # pe: the angles of the joint sequence, text first
            q, k, v = self.fused_norm_rope(
                txt_mixed,
                txt_bias,
                self.txt_q_layernorm.weight,
                self.txt_k_layernorm.weight,
                img_mixed,
                img_bias,
                self.img_q_layernorm.weight,
                self.img_k_layernorm.weight,
                *rope_cos_sin(pe, txt_mixed.dtype),  # small, computed unfused
                QK_NORM_EPS,
            )  # each [s, b, np, hn]
        else:
            img_qkv = self._norm_qk(img_mixed, self.img_q_layernorm, self.img_k_layernorm)
            txt_qkv = self._norm_qk(txt_mixed, self.txt_q_layernorm, self.txt_k_layernorm)
            q, k, v = (
                torch.cat([t, i], dim=0) for t, i in zip(txt_qkv, img_qkv, strict=True)
            )  # [s, b, np, hn]
        attn = self._attend(q, k, v, pe)  # [s, b, h / tp]
        # Split at the projected lengths: under sequence parallelism img/txt are shards and q/k/v the gathered whole.
        txt_attn, img_attn = attn.split([txt_mixed.shape[0], img_mixed.shape[0]], dim=0)
        return self.img_linear_proj(img_attn), self.txt_linear_proj(txt_attn)


class SelfAttention(_FluxAttention):
    """Single-block attention over the joint sequence.

    ``linear_proj`` has no bias: BFL's ``linear2`` bias is carried by the MLP's ``linear_fc2``.
    """

    def __init__(self, config: FluxConfig, submodules: FluxAttentionSubmodules, layer_number: int):
        super().__init__(config, submodules, layer_number, fused_qkv_norm_rope)
        self.linear_qkv, self.q_layernorm, self.k_layernorm = self._build_qkv(submodules)
        self.linear_proj = self._build_proj(submodules, bias=False)

    def forward(self, x: Tensor, pe: Tensor) -> Tensor:
        """Modulated ``x [s, b, h]`` -> attention output ``[s, b, h]`` (no bias)."""
        mixed, bias = self._qkv(x, self.linear_qkv)
        if self.fused_norm_rope is not None:
            weights = (self.q_layernorm.weight, self.k_layernorm.weight)
            q, k, v = self.fused_norm_rope(mixed, bias, *weights, *rope_cos_sin(pe, mixed.dtype), QK_NORM_EPS)
        else:
            q, k, v = self._norm_qk(mixed, self.q_layernorm, self.k_layernorm)
        out, _ = self.linear_proj(self._attend(q, k, v, pe))  # no bias: (out, None)
        return out
