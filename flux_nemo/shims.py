"""The one place for Megatron-Core workarounds; every other module calls these instead of patching.

Megatron-Core 0.16 is written for CUDA. It runs on a CPU-only machine when:
  * the process group is gloo (NCCL needs GPUs),
  * modules allocate weights with ``use_cpu_initialization=True`` (set by ``FluxConfig`` when CUDA is absent),
  * the RNG tracker is the no-op "inference" tracker, because the default tracker forks the CUDA RNG,
  * attention uses a torch SDPA core (Megatron's local DotProductAttention allocates a CUDA scratch buffer; the
    local spec in ``flux_nemo.model.specs`` does this), and no causal mask is requested,
  * sequence parallelism runs its collectives through the device-agnostic functions and linear subclasses at the
    end of this module (Megatron's allocate their buffers on the current CUDA device).
Megatron DDP and ``get_megatron_optimizer`` are CUDA-only; ``flux_nemo.training`` keeps them on the GPU path.
On the GPU path, a distributed-optimizer checkpoint of the precision-aware optimizer loads only through
:func:`loadable_optimizer_state` (Megatron 0.16.1 hands a bucket's ``padding`` flag to TE's FusedAdam).

Nothing here modifies a library object: these are plain functions and subclasses over public APIs.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel


def free_port() -> int:
    """A free TCP port on the loopback interface (single-process rendezvous, test workers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(backend: str | None = None) -> None:
    """Initialise torch.distributed from torchrun/Slurm env vars, or as a world of one process."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ["RANK"], os.environ["WORLD_SIZE"] = "0", "1"
        os.environ.setdefault("LOCAL_RANK", "0")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)


def initialize_megatron(
    tensor_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    seed: int = 1234,
    backend: str | None = None,
) -> None:
    """Set up torch.distributed, Megatron parallel state and the RNG tracker (idempotent).

    On CPU the RNG tracker is the no-op one (see module docstring); on GPU it is Megatron's CUDA tracker
    seeded with ``seed`` (distinct per tensor-parallel rank, as Megatron does).
    """
    init_process_group(backend)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            context_parallel_size=context_parallel_size,
        )
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def ensure_megatron_initialized() -> None:
    """Initialise a single-process Megatron world if the caller has not set one up."""
    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        initialize_megatron()


def destroy_megatron() -> None:
    """Tear down Megatron parallel state and the process group (tests, repeated runs in one process)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Sequence parallelism off CUDA
#
# Megatron's sequence-parallel collectives (``tensor_parallel.mappings``: ``_gather_along_first_dim``,
# ``_reduce_scatter_along_first_dim``) and the sequence-parallel path of its local linears
# (``linear_with_grad_accumulation_and_async_allreduce``: ``get_global_memory_buffer()`` in forward and
# ``torch.empty(device=torch.cuda.current_device())`` in backward) allocate their outputs on the current CUDA device,
# so none of them runs without CUDA; no public setting moves those buffers. The functions and linears below are the
# same collectives over torch.distributed (gloo has ``all_gather_into_tensor`` and ``reduce_scatter_tensor``) with
# outputs on the input's device. On CUDA tensors they call Megatron's own code, so the GPU path is Megatron's.
# ---------------------------------------------------------------------------------------------------------------


def _all_gather_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] * group.size(), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // group.size(), *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _split_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(group.size(), dim=0)[group.rank()].contiguous()


class _ScatterToSequence(torch.autograd.Function):
    """Forward: keep this rank's slice along dim 0; backward: all-gather (Megatron's
    ``_ScatterToSequenceParallelRegion``)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_first_dim(grad, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    """Forward: all-gather along dim 0; backward: reduce-scatter, or only split when the computation after the
    gather is duplicated on every rank (Megatron's ``_GatherFromSequenceParallelRegion``)."""

    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group, ctx.reduce = group, tensor_parallel_output_grad
        return _all_gather_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce:
            return _reduce_scatter_first_dim(grad, ctx.group), None, None
        return _split_first_dim(grad, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Forward: reduce-scatter along dim 0; backward: all-gather (Megatron's
    ``_ReduceScatterToSequenceParallelRegion``)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_first_dim(grad, ctx.group), None


# Each function works over ``group``, the tensor-parallel group by default (as Megatron's).


def _tp_group_if_none(group):
    return parallel_state.get_tensor_model_parallel_group() if group is None else group


def scatter_to_sequence_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """``[s, ...]`` -> this rank's ``[s / n, ...]``; backward all-gathers."""
    group = _tp_group_if_none(group)
    if x.is_cuda:
        return tensor_parallel.scatter_to_sequence_parallel_region(x, group=group)
    return _ScatterToSequence.apply(x, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, tensor_parallel_output_grad: bool = True, group=None
) -> torch.Tensor:
    """``[s / n, ...]`` -> ``[s, ...]`` (rank order). Backward: reduce-scatter if the computation after the gather
    is split over the ranks (``tensor_parallel_output_grad=True``), else (it is duplicated on every rank) just this
    rank's slice of the gradient."""
    group = _tp_group_if_none(group)
    if x.is_cuda:
        return tensor_parallel.gather_from_sequence_parallel_region(
            x, tensor_parallel_output_grad=tensor_parallel_output_grad, group=group
        )
    return _GatherFromSequence.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """``[s, ...]`` partial sums -> this rank's ``[s / n, ...]`` of their sum over the group."""
    group = _tp_group_if_none(group)
    if x.is_cuda:
        return tensor_parallel.reduce_scatter_to_sequence_parallel_region(x, group=group)
    return _ReduceScatterToSequence.apply(x, group)


class SequenceParallelColumnLinear(tensor_parallel.ColumnParallelLinear):
    """Megatron's ``ColumnParallelLinear``; with sequence parallelism on a non-CUDA input it all-gathers the
    sequence with :func:`gather_from_sequence_parallel_region` before the GEMM (same math as Megatron's CUDA path).
    Everything else, CUDA inputs included, is Megatron's ``forward``."""

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output=None):
        if input_.is_cuda or not self.sequence_parallel:
            return super().forward(input_, weight, runtime_gather_output)
        if weight is not None or self.gather_output or runtime_gather_output:
            raise NotImplementedError("off CUDA: sequence parallelism without weight= or gather_output")
        total = gather_from_sequence_parallel_region(input_, group=self.tp_group)  # [s, b, h]
        out = F.linear(total, self.weight, None if self.skip_bias_add else self.bias)
        return out, (self.bias if self.skip_bias_add else None)


class SequenceParallelRowLinear(tensor_parallel.RowParallelLinear):
    """Megatron's ``RowParallelLinear``; with sequence parallelism on a non-CUDA input it reduce-scatters the
    partial GEMM output with :func:`reduce_scatter_to_sequence_parallel_region`, then adds the bias to the local
    slice (as Megatron does). Everything else, CUDA inputs included, is Megatron's ``forward``."""

    def forward(self, input_: torch.Tensor):
        if input_.is_cuda or not self.sequence_parallel:
            return super().forward(input_)
        partial = F.linear(input_, self.weight)  # [s, b, h], this rank's part of the sum
        out = reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)  # [s / tp, b, h]
        if self.skip_bias_add:
            return out, self.bias
        return (out if self.bias is None else out + self.bias), None


# What ``flux_nemo.model`` substitutes for Megatron's local linears when sequence parallelism is on.
SEQUENCE_PARALLEL_LINEARS = {
    tensor_parallel.ColumnParallelLinear: SequenceParallelColumnLinear,
    tensor_parallel.RowParallelLinear: SequenceParallelRowLinear,
}


# ---------------------------------------------------------------- distributed-optimizer checkpoint loading
class _BucketEntry(dict):
    """One entry of a loaded ``dp_reshardable`` bucket: ``entry["padding"]`` still answers Megatron's padding
    filter, while ``items()`` leaves the flag out (see :func:`loadable_optimizer_state`)."""

    def items(self):
        return [(k, v) for k, v in super().items() if k != "padding"]


def loadable_optimizer_state(state):
    """A Megatron distributed-optimizer state dict, as ``dist_checkpointing.load`` returns it, made loadable by
    the precision-aware optimizer; changed in place and returned.

    Megatron-Core 0.16.1 loads a ``dp_reshardable`` state by dropping the bucket entries flagged ``padding`` and
    handing each remaining entry to ``_set_main_param_and_optimizer_states``. With the precision-aware optimizer
    that walks ``entry.items()`` and passes every key, the boolean ``padding`` flag included, to Transformer
    Engine's ``FusedAdam.set_scaled_state``, which fails (``'bool' object has no attribute 'dtype'``). The standard
    optimizer path looks its keys up by name and is unaffected. Each entry that carries a boolean ``padding`` flag
    becomes a :class:`_BucketEntry`; the tensors are not copied.
    """
    if isinstance(state, dict):
        for key, value in state.items():
            state[key] = loadable_optimizer_state(value)
        if isinstance(state.get("padding"), bool) and not isinstance(state, _BucketEntry):
            return _BucketEntry(state)
    elif isinstance(state, list):
        state[:] = [loadable_optimizer_state(v) for v in state]
    return state
