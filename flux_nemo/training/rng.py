"""The training step's own CUDA random stream: what the flow-matching draws (posterior sample, CFG dropout,
timesteps, noise) come from on GPU.

The draws run inside a fork of Megatron's CUDA RNG tracker (:data:`STREAM`, seeded per data-parallel rank), not on
the default CUDA generator. Libraries advance the default generator as a side effect: Transformer Engine's fused
attention takes a Philox offset from it on every call, even with dropout 0, but not while it is told that a CUDA
graph is being captured. On the default generator the training noise would therefore depend on the attention
backend and on whether the step is graphed (measured: H100, te spec, 2026-11-27: the same seed gave step-1
losses 1.49995 eager and 1.53773 graphed). On its own stream it depends on the seed and the data-parallel rank only.

The stream is a tracker state, so everything that handles the tracker handles it: checkpoints and the
evaluation / warmup RNG forks (``checkpoint.rng_state``), and CUDA graph captures, which register the tracker's
graph-safe generators (``cuda_graph.megatron_rng_generators``). On CPU the tracker is Megatron's no-op one: draws
stay on the default generator (seeded with the same per-rank seed by the trainer).
"""

from __future__ import annotations

import contextlib

import torch

STREAM = "flux-training-rng"
# away from the seeds of Megatron's own tracker states (seed, seed + 1024 + ..., seed + 2718 + tp_rank)
SEED_OFFSET = 31_337


def _tracker():
    """Megatron's CUDA RNG tracker on GPU; None on CPU (where draws stay on the default generator)."""
    if not torch.cuda.is_available():
        return None
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker()


def add_training_stream(seed: int, data_parallel_rank: int) -> None:
    """Register :data:`STREAM` with Megatron's CUDA RNG tracker (after any tracker reset; a no-op on CPU)."""
    tracker = _tracker()
    if tracker is not None and STREAM not in tracker.get_states():
        tracker.add(STREAM, seed + SEED_OFFSET + data_parallel_rank)


def training_draws():
    """Context for the step's random draws: a fork of :data:`STREAM` where it is registered, else nothing."""
    tracker = _tracker()
    if tracker is None or STREAM not in tracker.get_states():
        return contextlib.nullcontext()
    return tracker.fork(STREAM)
