"""Reference weight initialisation of Flux (torchtitan ``FluxModel.init_weights``, DiT style).

| module                                   | weight                                         | bias |
|------------------------------------------|------------------------------------------------|------|
| img_in, txt_in                           | xavier_uniform                                 | 0    |
| time_in, vector_in (both linears)        | normal(std 0.02)                               | 0    |
| double block qkv (img, txt)              | xavier_uniform bound of the fused qkv [3h, h]  | 0    |
| double block proj, MLP linears           | xavier_uniform                                 | 0    |
| single block linear_qkv, mlp.linear_fc1  | bound of BFL's fused linear1 [3h + mlp, h]     | 0    |
| single block linear_proj, mlp.linear_fc2 | bound of BFL's fused linear2 [h, h + mlp]      | -    |
| all modulation linears, final layer      | 0                                              | 0    |
| QK RMSNorm                               | 1                                              | -    |

Bounds come from the global shapes in the config, so a tensor-parallel shard draws from the same
distribution as the unsharded weight.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from torch import nn

from flux_nemo.model.blocks import DoubleStreamBlock, SingleStreamBlock


def xavier_bound(fan_out: int, fan_in: int) -> float:
    """``torch.nn.init.xavier_uniform_`` bound (gain 1) of a ``[fan_out, fan_in]`` weight."""
    return math.sqrt(6.0 / (fan_in + fan_out))


def _rng_for(param: torch.Tensor):
    # Tensor-parallel shards draw from Megatron's model-parallel RNG stream (distinct per TP rank, as in
    # Megatron's own init); replicated parameters from the default stream (identical across TP ranks).
    tracker = get_cuda_rng_tracker()
    if param.is_cuda and getattr(param, "tensor_model_parallel", False) and tracker.is_initialized():
        return tracker.fork()
    return nullcontext()


def _uniform(linear: nn.Module, bound: float) -> None:
    with _rng_for(linear.weight):
        linear.weight.uniform_(-bound, bound)
    if getattr(linear, "bias", None) is not None:
        linear.bias.zero_()


def _normal(linear: nn.Module, std: float) -> None:
    linear.weight.normal_(0.0, std)
    linear.bias.zero_()


def _zero(module: nn.Module) -> None:
    for param in module.parameters():
        param.zero_()


def _ones(*norms: nn.Module) -> None:
    for norm in norms:
        norm.weight.fill_(1.0)


def _init_double_block(block: DoubleStreamBlock, h: int, mlp: int) -> None:
    attn = block.self_attention
    _zero(block.img_mod)
    _zero(block.txt_mod)
    for stream in ("img", "txt"):
        _uniform(getattr(attn, f"{stream}_linear_qkv"), xavier_bound(3 * h, h))
        _uniform(getattr(attn, f"{stream}_linear_proj"), xavier_bound(h, h))
        _ones(getattr(attn, f"{stream}_q_layernorm"), getattr(attn, f"{stream}_k_layernorm"))
    for mlp_module in (block.img_mlp, block.txt_mlp):
        _uniform(mlp_module.linear_fc1, xavier_bound(mlp, h))
        _uniform(mlp_module.linear_fc2, xavier_bound(h, mlp))


def _init_single_block(block: SingleStreamBlock, h: int, mlp: int) -> None:
    attn = block.self_attention
    _zero(block.modulation)
    linear1, linear2 = xavier_bound(3 * h + mlp, h), xavier_bound(h, h + mlp)
    _uniform(attn.linear_qkv, linear1)
    _uniform(block.mlp.linear_fc1, linear1)
    _uniform(attn.linear_proj, linear2)
    _uniform(block.mlp.linear_fc2, linear2)
    _ones(attn.q_layernorm, attn.k_layernorm)


@torch.no_grad()
def init_flux_weights(model: nn.Module) -> None:
    """Initialise a ``Flux`` model in place with the reference rules (table in the module docstring)."""
    h, mlp = model.config.hidden_size, model.config.ffn_hidden_size
    for linear in (model.img_in, model.txt_in):
        _uniform(linear, xavier_bound(*linear.weight.shape))
    for embedder in (model.time_in, model.vector_in):
        _normal(embedder.in_layer, 0.02)
        _normal(embedder.out_layer, 0.02)
    for block in model.double_blocks:
        _init_double_block(block, h, mlp)
    for block in model.single_blocks:
        _init_single_block(block, h, mlp)
    _zero(model.final_layer)
