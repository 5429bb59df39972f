"""Context parallelism over the joint text + image sequence (``parallel.context_parallel_size``).

Each context-parallel rank keeps ``1/cp`` of the text tokens and ``1/cp`` of the image tokens, with their RoPE
ids; the model is unchanged: its attention gathers keys and values of the whole sequence (torch SDPA in the
``local`` spec, Transformer Engine's ring attention in the ``te`` spec), and every other op is per token.
Unmasked attention does not depend on the order of the tokens, so the joint sequence a rank sees,
``cat(txt slice, img slice)``, needs no reordering. Each rank's loss is the mean over its own tokens; Megatron
DDP averages gradients over data x context parallel ranks, which makes the gradient that of the global mean.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from flux_nemo.flow_matching import ModelInputs

_SEQUENCE_FIELDS = ("img", "txt", "img_ids", "txt_ids", "target")


def context_parallel_size() -> int:
    return parallel_state.get_context_parallel_world_size()


def split_sequence(t: Tensor, rank: int, size: int, name: str) -> Tensor:
    """This rank's contiguous slice of ``t [B, L, ...]`` along the sequence (dim 1)."""
    if t.shape[1] % size:
        raise ValueError(
            f"{name}: sequence length {t.shape[1]} is not divisible by context_parallel_size={size}"
        )
    return t.chunk(size, dim=1)[rank]


def shard_inputs(inputs: ModelInputs) -> ModelInputs:
    """The slice of the text and image tokens (and ids, target) that this context-parallel rank computes."""
    size = context_parallel_size()
    if size == 1:
        return inputs
    rank = parallel_state.get_context_parallel_rank()
    sliced = {name: split_sequence(getattr(inputs, name), rank, size, name) for name in _SEQUENCE_FIELDS}
    return inputs._replace(**sliced)


def average_over_context_parallel(local_mean: Tensor) -> Tensor:
    """Mean of equal-sized per-rank means over the context-parallel group (metrics only: no autograd)."""
    size = context_parallel_size()
    if size == 1:
        return local_mean
    total = local_mean.detach().clone()
    dist.all_reduce(total, group=parallel_state.get_context_parallel_group())
    return total / size
