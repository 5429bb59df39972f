"""Backend specs for the Flux blocks: ``te`` (Transformer Engine, GPU) and ``local`` (Megatron + torch, any device).

Modules never branch on the backend; a spec picks each implementation. This package imports Transformer Engine
only inside :func:`get_flux_te_spec`, so ``flux_nemo.model`` imports and runs (local spec) without it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import Tensor

from flux_nemo.model.attention import (
    FluxAttentionSubmodules,
    JointSelfAttention,
    RMSNorm,
    SDPAttention,
    SelfAttention,
)
from flux_nemo.model.blocks import (
    BlockSubmodules,
    DoubleStreamBlock,
    FluxMLP,
    FluxSubmodules,
    SingleStreamBlock,
)
from flux_nemo.model.embeddings import apply_interleaved_rope


def _flux_submodules(attention: FluxAttentionSubmodules, mlp: MLPSubmodules) -> FluxSubmodules:
    def block(block_cls: type, attention_cls: type) -> ModuleSpec:
        return ModuleSpec(
            module=block_cls,
            submodules=BlockSubmodules(
                self_attention=ModuleSpec(module=attention_cls, submodules=attention),
                mlp=ModuleSpec(module=FluxMLP, submodules=mlp),
            ),
        )

    return FluxSubmodules(
        double_block=block(DoubleStreamBlock, JointSelfAttention),
        single_block=block(SingleStreamBlock, SelfAttention),
    )


def get_flux_local_spec() -> FluxSubmodules:
    """Megatron's tensor-parallel linears, torch RMSNorm, torch SDPA and plain-torch RoPE.

    Runs on CPU (including fp64) and on the meta device; the reference for numerics tests.
    """
    attention = FluxAttentionSubmodules(
        linear_qkv=ColumnParallelLinear,
        core_attention=SDPAttention,
        linear_proj=RowParallelLinear,
        q_layernorm=RMSNorm,
        k_layernorm=RMSNorm,
        apply_rope=apply_interleaved_rope,
    )
    return _flux_submodules(
        attention, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    )


def get_flux_te_spec() -> FluxSubmodules:
    """Transformer Engine linears (FP8-capable), TE fused attention, TE RMSNorm and TE fused RoPE.

    Raises:
        ImportError: if Transformer Engine is not installed.
    """
    import transformer_engine  # noqa: F401  (Megatron's TE wrappers silently mock a missing TE)
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TENorm,
        TERowParallelLinear,
    )

    try:
        from megatron.core.extensions.transformer_engine import fused_apply_rotary_pos_emb
    except ImportError:  # old TE: no fused RoPE
        fused_apply_rotary_pos_emb = None
    attention = FluxAttentionSubmodules(
        linear_qkv=TEColumnParallelLinear,
        core_attention=TEDotProductAttention,
        linear_proj=TERowParallelLinear,
        # TENorm builds TE's RMSNorm because FluxConfig.normalization is "RMSNorm".
        q_layernorm=TENorm,
        k_layernorm=TENorm,
        apply_rope=functools.partial(fused_rope_or_torch, fused_apply_rotary_pos_emb),
    )
    return _flux_submodules(
        attention, MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)
    )


def fused_rope_or_torch(fused: Callable | None, t: Tensor, freqs: Tensor) -> Tensor:
    """TE's fused interleaved RoPE where it applies, else :func:`apply_interleaved_rope`.

    TE's kernel takes one angle table for the whole batch (``freqs [s, 1, 1, d]``, fp32) on CUDA; pass ids with
    batch size 1 to use it. Per-sample ids (``freqs [s, b, 1, d]``) take the torch path.
    """
    if fused is None or freqs.shape[1] != 1 or not t.is_cuda:
        return apply_interleaved_rope(t, freqs)
    return fused(t, freqs.float().contiguous(), interleaved=True)


SPECS: dict[str, Callable[[], FluxSubmodules]] = {"local": get_flux_local_spec, "te": get_flux_te_spec}


def get_flux_spec(backend: str) -> FluxSubmodules:
    """The block specs of ``backend`` (``"te"`` or ``"local"``)."""
    if backend not in SPECS:
        raise ValueError(f"unknown Flux backend {backend!r}; choose one of {sorted(SPECS)}")
    return SPECS[backend]()
