"""Megatron sequence parallelism (``FluxConfig.sequence_parallel``, with tensor parallelism) for Flux.

Between blocks each tensor-parallel rank holds ``1/tp`` of the image and of the text tokens (``[s / tp, b, h]``).
Megatron's column-parallel linears (QKV, MLP fc1) all-gather the sequence before their GEMM and the row-parallel
ones (attention output, MLP fc2) reduce-scatter after it, so attention sees the whole sequence with its rank's
heads and every other op runs on the local tokens. ``Flux.forward`` scatters the embedded tokens after
``img_in``/``txt_in`` and gathers the image tokens before ``final_layer``, so the output is the whole sequence on
every rank, as without sequence parallelism.

* RoPE: a double block gathers text and image q/k/v separately and concatenates them, so its table stays in the
  ``[txt; img]`` order. A single block's local sequence is ``cat(txt_r, img_r)``, so the gathered order is
  ``[txt_0, img_0, txt_1, img_1, ...]``: :func:`single_block_rope` permutes the table to match.
* Gradients: a replicated parameter inside a block (QK-norm weights, row-parallel biases) sees only its rank's
  tokens or heads, so its gradient is summed over the tensor-parallel group by Megatron's ``finalize_model_grads``
  (``sequence_parallel`` attribute, set by :func:`mark_sequence_parallel_params`). The adaLN modulation linears are
  tensor-parallel (``flux_nemo.model.adaln.ModulationLinear``): a block's modulation gradient is reduce-scattered
  over the group in backward, and the conditioning vector's gradient summed, so ``time_in``/``vector_in`` get full,
  identical gradients, as do the embedders and the final layer, which see every token.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state
from torch import Tensor, nn

from flux_nemo import shims
from flux_nemo.model.config import FluxConfig


def sequence_parallel_spec(spec):
    """The Flux block specs with Megatron's local linears replaced by their subclasses that also run sequence
    parallelism off CUDA (``flux_nemo.shims``)."""
    return _replace_classes(spec, shims.SEQUENCE_PARALLEL_LINEARS)


def _replace_classes(spec, replace: dict[type, type]):
    if isinstance(spec, type):
        return replace.get(spec, spec)
    if dataclasses.is_dataclass(spec):
        fields = {f.name: _replace_classes(getattr(spec, f.name), replace) for f in dataclasses.fields(spec)}
        return dataclasses.replace(spec, **fields)
    return spec


def mark_sequence_parallel_params(blocks: nn.Module) -> None:
    """Set ``sequence_parallel=True`` on every replicated (not tensor-parallel) parameter inside the blocks, so
    ``finalize_model_grads`` sums its gradient over the tensor-parallel group. It sums a parameter once even when
    the QK-norm rule (``qk_layernorm``) also matches it."""
    for param in blocks.parameters():
        if not getattr(param, "tensor_model_parallel", False):
            param.sequence_parallel = True


def check_divisible(**lengths: int) -> None:
    """Raise, naming the tensor, if a sequence length does not split evenly over the tensor-parallel ranks."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for name, length in lengths.items():
        if length % tp:
            raise ValueError(
                f"Flux.forward: {name} has {length} tokens, not divisible by tensor_model_parallel_size={tp} "
                "(sequence_parallel splits every sequence evenly over the tensor-parallel ranks)"
            )


def single_block_rope(pe: Tensor, txt_len: int) -> Tensor:
    """``pe [s_txt + s_img, ...]`` reordered to the single blocks' gathered sequence ``[txt_0, img_0, txt_1, ...]``
    (``txt_r``, ``img_r``: rank r's slices)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    txt, img = pe.split([txt_len, pe.shape[0] - txt_len], dim=0)
    pairs = zip(txt.chunk(tp), img.chunk(tp), strict=True)
    return torch.cat([part for pair in pairs for part in pair], dim=0)


def scatter_tokens(x: Tensor, config: FluxConfig) -> Tensor:
    """``[s, b, h]`` -> this rank's ``[s / tp, b, h]``; a copy unless ``clone_scatter_output_in_embedding`` is off
    (as in Megatron's embedding: the whole-sequence tensor can then be freed)."""
    x = shims.scatter_to_sequence_parallel_region(x)
    return x.clone() if config.clone_scatter_output_in_embedding else x


def gather_tokens(x: Tensor) -> Tensor:
    """``[s / tp, b, h]`` -> ``[s, b, h]`` for layers that every rank runs whole (backward: this rank's slice)."""
    return shims.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
