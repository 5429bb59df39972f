"""Flux transformer blocks: DoubleStreamBlock (MMDiT), SingleStreamBlock, and their MLP.

All tensors are ``[s, b, h]``; the RoPE angles ``pe`` are ``[s_txt + s_img, b|1, 1, head_dim]``. A block takes its
adaLN modulations as tensors (``modulations(vec)`` of the conditioning vector ``vec [b, h]``, each ``[b, n*h]``), so
that ``Flux.conditioning`` can compute them for a whole training step at once. Selective recompute
(``FluxConfig.recompute_modules``, see ``flux_nemo.model.recompute``): ``mlp`` re-runs each MLP in the backward
pass, ``layernorm`` each LayerNorm + modulate (its output is freed once the linears that read it ran).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import Tensor

from flux_nemo.model import recompute
from flux_nemo.model.adaln import Modulation, ModulationOut
from flux_nemo.model.attention import linear_out
from flux_nemo.model.config import FluxConfig, gelu_tanh
from flux_nemo.model.fusions import elementwise_ops


class FluxMLP(MegatronModule):
    """Column-parallel Linear(h, mlp) -> GELU(tanh) -> row-parallel Linear(mlp, h), both with bias; the second
    returns its bias unadded (``skip_bias_add``), for the block's fused gated residual to add. With
    ``modulation_fusion`` the first one's bias is added by the fused bias + GELU op
    (``flux_nemo.model.fusions.bias_gelu``), which also reduces its gradient."""

    def __init__(self, config: FluxConfig, submodules: MLPSubmodules):
        super().__init__(config)
        fused = config.modulation_fusion and config.activation_func is gelu_tanh  # the op's activation
        self.fused_bias_gelu = elementwise_ops(True).bias_gelu if fused else None
        self.linear_fc1 = build_module(
            submodules.linear_fc1,
            config.hidden_size,
            config.ffn_hidden_size,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=True,
            skip_bias_add=self.fused_bias_gelu is not None,
            is_expert=False,
            tp_comm_buffer_name="fc1",
        )
        self.linear_fc2 = build_module(
            submodules.linear_fc2,
            config.ffn_hidden_size,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc2",
        )
        self.recompute = recompute.selected(config, "mlp")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[s, b, h]`` -> (``[s, b, h]`` without the ``linear_fc2`` bias, that bias ``[h]``); recomputed in
        backward with the ``mlp`` selective recompute (the bias, a parameter, stays outside the checkpoint)."""
        if recompute.active(self, self.recompute):
            return recompute.checkpoint(self._forward, x), self.linear_fc2.bias
        return self._forward(x), self.linear_fc2.bias

    def _forward(self, x: Tensor) -> Tensor:
        if self.fused_bias_gelu is None:
            hidden = self.config.activation_func(linear_out(self.linear_fc1, x))
        else:
            hidden = self.fused_bias_gelu(*self.linear_fc1(x))  # [s, b, mlp / tp] and its bias
        out, _ = self.linear_fc2(hidden)
        return out


@dataclass
class BlockSubmodules:
    """Specs of a block's attention and MLP."""

    self_attention: ModuleSpec
    mlp: ModuleSpec


@dataclass
class FluxSubmodules:
    """Specs of the two block kinds of a Flux model (what a backend, ``te`` or ``local``, chooses)."""

    double_block: ModuleSpec
    single_block: ModuleSpec


class DoubleStreamBlock(MegatronModule):
    """MMDiT block: image and text keep their own weights and share one joint attention (BFL)."""

    def __init__(self, config: FluxConfig, submodules: BlockSubmodules, layer_number: int):
        super().__init__(config)
        self.layer_number = layer_number
        self.img_mod = Modulation(config, num_chunks=6)
        self.txt_mod = Modulation(config, num_chunks=6)
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_number=layer_number
        )
        self.img_mlp = build_module(submodules.mlp, config=config)
        self.txt_mlp = build_module(submodules.mlp, config=config)
        _set_norm_ops(self, config)

    def modulations(self, vec: Tensor) -> tuple[Tensor, Tensor]:
        """The image and the text stream's adaLN modulations, each ``[b, 6h]``, of ``vec [b, h]``."""
        return self.img_mod(vec), self.txt_mod(vec)

    def forward(
        self, img: Tensor, txt: Tensor, img_modulation: Tensor, txt_modulation: Tensor, pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``img [s_img, b, h]``, ``txt [s_txt, b, h]``, their ``modulations(vec)`` -> updated (img, txt)."""
        norm = _norm_checkpoint(self)  # a LayerNorm + modulate op, through a checkpoint with ``layernorm``
        img_mod1, img_mod2 = self.img_mod.split(img_modulation)  # (shift, scale, gate), each [1, b, h]
        txt_mod1, txt_mod2 = self.txt_mod.split(txt_modulation)
        img_norm, txt_norm = norm(), norm()
        img_in = img_norm(self.norm_modulate, img, img_mod1.shift, img_mod1.scale)
        txt_in = txt_norm(self.norm_modulate, txt, txt_mod1.shift, txt_mod1.scale)
        (img_attn, img_bias), (txt_attn, txt_bias) = self.self_attention(img_in, txt_in, pe)
        img_norm.discard((img_in,), img_attn)
        txt_norm.discard((txt_in,), txt_attn)
        img = self._residual_mlp(norm(), self.img_mlp, img, img_mod1.gate, (img_attn, img_bias), img_mod2)
        txt = self._residual_mlp(norm(), self.txt_mlp, txt, txt_mod1.gate, (txt_attn, txt_bias), txt_mod2)
        return img, txt

    def _residual_mlp(
        self, norm, mlp, x: Tensor, gate: Tensor, attn: tuple[Tensor, Tensor], mod: ModulationOut
    ) -> Tensor:
        """``x + gate * attn`` (``attn``: the projection and its unadded bias), then its MLP sublayer with the
        modulation ``mod``."""
        # x + gate * (attn + bias) and the MLP input (1 + scale) * LN(that) + shift, in one op.
        x, mlp_in = norm(self.gated_residual_norm_modulate, x, gate, *attn, mod.shift, mod.scale)
        mlp_out, mlp_bias = mlp(mlp_in)
        norm.discard((mlp_in,), mlp_out)
        return self.ops.gated_residual(x, mod.gate, mlp_out, mlp_bias)


class SingleStreamBlock(MegatronModule):
    """Parallel attention + MLP block over the joint sequence (BFL; arXiv:2302.05442).

    BFL fuses QKV with MLP-in (``linear1``) and the attention output with MLP-out (``linear2``); here they are
    separate Megatron linears with the same math: ``x + gate * (linear_proj(attn) + linear_fc2(gelu(fc1)))``, where
    ``linear_fc2``'s bias (BFL's ``linear2`` bias) is added in the fused residual op.
    """

    def __init__(self, config: FluxConfig, submodules: BlockSubmodules, layer_number: int):
        super().__init__(config)
        self.layer_number = layer_number
        self.modulation = Modulation(config, num_chunks=3)
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_number=layer_number
        )
        self.mlp = build_module(submodules.mlp, config=config)
        _set_norm_ops(self, config)

    def modulations(self, vec: Tensor) -> tuple[Tensor]:
        """The adaLN modulation ``[b, 3h]`` of ``vec [b, h]``."""
        return (self.modulation(vec),)

    def forward(self, x: Tensor, modulation: Tensor, pe: Tensor) -> Tensor:
        """``x [s_txt + s_img, b, h]``, its ``modulations(vec)`` -> same shape as ``x``."""
        (mod,) = self.modulation.split(modulation)  # (shift, scale, gate), each [1, b, h]
        norm = _norm_checkpoint(self)()
        x_mod = norm(self.norm_modulate, x, mod.shift, mod.scale)
        attn, (mlp, mlp_bias) = self.self_attention(x_mod, pe), self.mlp(x_mod)
        norm.discard((x_mod,), attn, mlp)
        return self.ops.gated_residual_sum(x, mod.gate, attn, mlp, mlp_bias)


def _set_norm_ops(block: MegatronModule, config: FluxConfig) -> None:
    """The block's elementwise ops (eager or fused), its LayerNorm + modulate ops with the config's epsilon, and
    whether the ``layernorm`` selective recompute applies to them."""
    block.ops = elementwise_ops(config.modulation_fusion)
    eps = config.layernorm_epsilon
    block.norm_modulate = functools.partial(block.ops.norm_modulate, eps=eps)
    block.gated_residual_norm_modulate = functools.partial(block.ops.gated_residual_norm_modulate, eps=eps)
    block.recompute_norm = recompute.selected(config, "layernorm")


def _norm_checkpoint(block: MegatronModule) -> functools.partial:
    """A factory of one :class:`~flux_nemo.model.recompute.DiscardingCheckpoint` per LayerNorm + modulate call:
    it checkpoints (and ``discard`` frees) only under the ``layernorm`` recompute while training."""
    return functools.partial(recompute.DiscardingCheckpoint, recompute.active(block, block.recompute_norm))
