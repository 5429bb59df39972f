"""Flux transformer blocks: DoubleStreamBlock (MMDiT), SingleStreamBlock, and their MLP.

All tensors are ``[s, b, h]``; the conditioning vector ``vec`` is ``[b, h]`` and the RoPE angles ``pe`` are
``[s_txt + s_img, b|1, 1, head_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import Tensor

from flux_nemo.model.adaln import Modulation
from flux_nemo.model.attention import linear_out
from flux_nemo.model.config import FluxConfig
from flux_nemo.model.fusions import elementwise_ops


class FluxMLP(MegatronModule):
    """Column-parallel Linear(h, mlp) -> GELU(tanh) -> row-parallel Linear(mlp, h), both with bias."""

    def __init__(self, config: FluxConfig, submodules: MLPSubmodules):
        super().__init__(config)
        self.linear_fc1 = build_module(
            submodules.linear_fc1,
            config.hidden_size,
            config.ffn_hidden_size,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=True,
            skip_bias_add=False,
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
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="fc2",
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[s, b, h]`` -> ``[s, b, h]``."""
        return linear_out(self.linear_fc2, self.config.activation_func(linear_out(self.linear_fc1, x)))


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
        self.ops = elementwise_ops(config.modulation_fusion)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        """``img [s_img, b, h]``, ``txt [s_txt, b, h]`` -> updated (img, txt)."""
        ops, eps = self.ops, self.config.layernorm_epsilon
        img_mod1, img_mod2 = self.img_mod(vec)  # (shift, scale, gate), each [1, b, h]
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_attn, txt_attn = self.self_attention(
            ops.norm_modulate(img, img_mod1.shift, img_mod1.scale, eps),
            ops.norm_modulate(txt, txt_mod1.shift, txt_mod1.scale, eps),
            pe,
        )
        # img + gate1 * attn, and the MLP input (1 + scale2) * LN(img) + shift2 from it, in one op.
        img, img_mlp_in = ops.gated_residual_norm_modulate(
            img, img_mod1.gate, img_attn, img_mod2.shift, img_mod2.scale, eps
        )
        img = ops.gated_residual(img, img_mod2.gate, self.img_mlp(img_mlp_in))
        txt, txt_mlp_in = ops.gated_residual_norm_modulate(
            txt, txt_mod1.gate, txt_attn, txt_mod2.shift, txt_mod2.scale, eps
        )
        txt = ops.gated_residual(txt, txt_mod2.gate, self.txt_mlp(txt_mlp_in))
        return img, txt


class SingleStreamBlock(MegatronModule):
    """Parallel attention + MLP block over the joint sequence (BFL; arXiv:2302.05442).

    BFL fuses QKV with MLP-in (``linear1``) and the attention output with MLP-out (``linear2``); here they are
    separate Megatron linears with the same math: ``x + gate * (linear_proj(attn) + linear_fc2(gelu(fc1)))``.
    """

    def __init__(self, config: FluxConfig, submodules: BlockSubmodules, layer_number: int):
        super().__init__(config)
        self.layer_number = layer_number
        self.modulation = Modulation(config, num_chunks=3)
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_number=layer_number
        )
        self.mlp = build_module(submodules.mlp, config=config)
        self.ops = elementwise_ops(config.modulation_fusion)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        """``x [s_txt + s_img, b, h]`` -> same shape."""
        (mod,) = self.modulation(vec)  # (shift, scale, gate), each [1, b, h]
        x_mod = self.ops.norm_modulate(x, mod.shift, mod.scale, self.config.layernorm_epsilon)
        return self.ops.gated_residual_sum(x, mod.gate, self.self_attention(x_mod, pe), self.mlp(x_mod))
