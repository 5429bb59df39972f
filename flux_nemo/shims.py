"""The one place for Megatron-Core workarounds; every other module calls these instead of patching.

Megatron-Core 0.16 is written for CUDA. It runs on a CPU-only machine when:
  * the process group is gloo (NCCL needs GPUs),
  * modules allocate weights with ``use_cpu_initialization=True`` (set by ``FluxConfig`` when CUDA is absent),
  * the RNG tracker is the no-op "inference" tracker, because the default tracker forks the CUDA RNG,
  * attention uses a torch SDPA core (Megatron's local DotProductAttention allocates a CUDA scratch buffer; the
    local spec in ``flux_nemo.model.specs`` does this), and no causal mask is requested.
Megatron DDP and ``get_megatron_optimizer`` are CUDA-only; ``flux_nemo.training`` keeps them on the GPU path.

Nothing here modifies a library object: these are plain functions over public APIs.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
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
