"""Train and eval loaders of the preprocessed records: reference order, DP sharding, exact resumable state.

Order (reference.md §5.4): no shuffling. Data-parallel rank ``r`` of ``W`` reads the contiguous chunk
``contiguous_chunk(N, r, W)`` (HF ``shard(contiguous=True)``: the first ``N % W`` ranks get one extra sample).

* Train: the rank reads its chunk in order, forever; a micro-batch may straddle the wrap (last samples of the chunk
  followed by the first ones), as the reference's sample-level infinite iterator does. The reference yields the
  chunk's last sample a second time at every wrap (a fall-through bug); we deliberately do not reproduce it, so every
  epoch is exactly the chunk. The position (samples consumed, counted when a batch is handed out) is the checkpoint
  state: ``state_dict()`` / ``load_state_dict()`` restore it exactly; the dp world size must match.
* Eval: one pass over the rank's chunk with the stored timesteps. Every rank runs ``ceil(ceil(N / W) / B)`` batches;
  rows past the end of a rank's chunk are zero padding with ``valid=False`` (timestep 0), never counted in the metric.
  A valid row's stored timestep must be 0..7 (t = timestep / 8): a missing or out-of-range one raises, naming
  the file, row and key.

Batches are built whole by ``num_workers`` threads (0: in the caller's thread): each batch is allocated once (in
pinned memory when ``pin_memory`` and CUDA) and each sample's payload is copied straight from the memory-mapped file
into its row. Batches are submitted and consumed in order, so the order is exact for any ``num_workers``.
"""

from __future__ import annotations

import logging
import math
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from flux_nemo.flow_matching import EVAL_TIMESTEPS

from .format import OFFICIAL_SHAPES, RecordShapes
from .readers import open_source

log = logging.getLogger(__name__)

# batch key -> source column
BATCH_COLUMNS = {"t5": "t5_encodings", "clip": "clip_encodings", "mean": "mean", "logvar": "logvar"}


def contiguous_chunk(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous chunk of ``n`` samples (HF ``shard(contiguous=True)``)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid data-parallel rank {rank} of world {world}")
    div, mod = divmod(n, world)
    start = rank * div + min(rank, mod)
    return start, start + div + (1 if rank < mod else 0)


def _alloc(shape: tuple[int, ...], pin: bool) -> tuple[torch.Tensor, np.ndarray]:
    """A bf16 tensor and its uint16 numpy view. Host memory comes from numpy (large arrays get transparent huge
    pages, which makes first-touch page faults ~5x cheaper than torch.empty) or from the CUDA caching host
    allocator when pinning (reused pinned blocks, no extra pin copy)."""
    if pin:
        t = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
        return t, t.view(torch.uint16).numpy()
    a = np.empty(shape, dtype=np.uint16)
    return torch.from_numpy(a).view(torch.bfloat16), a


class BatchBuilder:
    """Builds one batch dict from a list of source indices (``-1`` = padding row, zeros, ``valid=False``)."""

    def __init__(
        self, source, shapes: RecordShapes, pin_memory: bool = False, require_timestep: bool = False
    ):
        self.source = source
        self.shapes = shapes
        self.require_timestep = require_timestep  # eval: t = timestep / 8 needs a stored 0..7
        self.fields = shapes.fields()
        self.pin = bool(pin_memory) and torch.cuda.is_available()

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        b = len(indices)
        batch, out_np = {}, {}
        for k, c in BATCH_COLUMNS.items():
            batch[k], out_np[c] = _alloc((b, *self.fields[c]), self.pin)
        ts = np.zeros(b, dtype=np.int64)
        valid = np.ones(b, dtype=np.bool_)
        for row, idx in enumerate(indices):
            if idx < 0:
                for a in out_np.values():
                    a[row] = 0
                valid[row] = False
            else:
                ts[row] = self.source.fill(idx, out_np, row)
                if self.require_timestep and not 0 <= ts[row] < EVAL_TIMESTEPS:
                    raise ValueError(_bad_timestep(self.source, idx, int(ts[row])))
        batch["timestep"] = torch.from_numpy(ts)
        batch["valid"] = torch.from_numpy(valid)
        return batch


def _bad_timestep(source, index: int, ts: int) -> str:
    # the readers return -1 for a null cell or a dataset without timesteps
    what = (
        "missing (no 'timestep' column or .json field, or a null cell)"
        if ts == -1
        else f"{ts}, expected 0..7"
    )
    return f"{source.where(index)}: timestep {what}; evaluation runs at t = timestep / {EVAL_TIMESTEPS}"


def _prefetch(builder: BatchBuilder, index_lists: Iterator[list[int]], num_workers: int, depth: int):
    """Yield ``builder(ix)`` for each index list, in order, built ahead by ``num_workers`` threads.

    Threads, not processes: the copy from the page cache releases the GIL, the memory-mapped files are shared,
    and no batch is copied again into shared memory on its way to the training loop.
    """
    if num_workers <= 0:
        for ix in index_lists:
            yield builder(ix)
        return
    init = None
    if builder.pin:  # pinned allocations in the threads use the caller's device (no stray context on GPU 0)
        device = torch.cuda.current_device()

        def init():
            torch.cuda.set_device(device)

    pool = ThreadPoolExecutor(num_workers, thread_name_prefix="flux-data", initializer=init)
    pending: deque = deque()
    try:
        for ix in index_lists:
            pending.append(pool.submit(builder, ix))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        if not sys.is_finalizing():  # at interpreter exit the pool's own atexit hook joins its threads
            for f in pending:
                f.cancel()
            pool.shutdown(wait=False, cancel_futures=True)


class TrainLoader:
    """Infinite, in-order iterable of micro-batches of one dp rank, with an exact resumable position.

    Each ``iter()`` starts at the current position; the position advances as batches are handed out, so
    ``state_dict()`` taken after consuming batch ``k`` resumes at batch ``k + 1`` (Lightning's ``_Stateful``
    protocol: it saves and restores this state with the checkpoint).
    """

    def __init__(
        self,
        source,
        *,
        dp_rank: int,
        dp_world: int,
        micro_batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        shapes: RecordShapes = OFFICIAL_SHAPES,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.source, self.shapes = source, shapes
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.micro_batch_size, self.num_workers = micro_batch_size, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.chunk = contiguous_chunk(len(source), dp_rank, dp_world)
        self.chunk_len = self.chunk[1] - self.chunk[0]
        if self.chunk_len == 0:
            raise ValueError(
                f"{source.path}: {len(source)} samples leave dp rank {dp_rank}/{dp_world} no data"
            )
        self.samples_seen = 0  # samples handed out since the start of training (monotone)

    @property
    def position(self) -> int:
        """Position of the next sample within the rank's chunk."""
        return self.samples_seen % self.chunk_len

    @property
    def epoch(self) -> int:
        return self.samples_seen // self.chunk_len

    def _index_lists(self, first: int):
        start, n, b = self.chunk[0], self.chunk_len, self.micro_batch_size
        pos = first
        while True:
            yield [start + (pos + j) % n for j in range(b)]
            pos = (pos + b) % n

    def __iter__(self):
        builder = BatchBuilder(self.source, self.shapes, self.pin_memory)
        depth = max(1, self.num_workers * self.prefetch_factor)
        for batch in _prefetch(builder, self._index_lists(self.position), self.num_workers, depth):
            self.samples_seen += self.micro_batch_size
            yield batch

    def state_dict(self) -> dict:
        return {
            "samples_seen": self.samples_seen,
            "position": self.position,
            "dp_rank": self.dp_rank,
            "dp_world": self.dp_world,
            "num_samples": len(self.source),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position (takes effect at the next ``iter()``). The dp world size and data must match."""
        if state.get("dp_world") != self.dp_world:
            raise ValueError(
                f"train loader state was saved with data-parallel world size {state.get('dp_world')}, "
                f"this run has {self.dp_world}: the per-rank chunks differ, so the position cannot be restored"
            )
        if state.get("dp_rank", self.dp_rank) != self.dp_rank:
            raise ValueError(
                f"train loader state belongs to dp rank {state['dp_rank']}, this is rank {self.dp_rank}"
            )
        if state.get("num_samples", len(self.source)) != len(self.source):
            raise ValueError(
                f"train loader state was saved for a dataset of {state['num_samples']} samples; "
                f"{self.source.path} has {len(self.source)}"
            )
        self.samples_seen = int(state["samples_seen"])
        log.info(
            "train loader restored: dp rank %d/%d at position %d (epoch %d)",
            self.dp_rank,
            self.dp_world,
            self.position,
            self.epoch,
        )


def eval_num_batches(n: int, dp_world: int, micro_batch_size: int) -> int:
    """Batches every rank runs in one eval pass: ``ceil(ceil(n / dp_world) / micro_batch_size)``."""
    return math.ceil(math.ceil(n / dp_world) / micro_batch_size)


class EvalLoader:
    """One pass over a dp rank's contiguous eval chunk, ``len()`` batches on every rank (padding ``valid=False``)."""

    def __init__(
        self,
        source,
        *,
        dp_rank: int,
        dp_world: int,
        micro_batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        shapes: RecordShapes = OFFICIAL_SHAPES,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.source, self.shapes = source, shapes
        self.dp_rank, self.dp_world, self.micro_batch_size = dp_rank, dp_world, micro_batch_size
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self.chunk = contiguous_chunk(len(source), dp_rank, dp_world)
        self.num_batches = eval_num_batches(len(source), dp_world, micro_batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def _index_lists(self):
        start, stop = self.chunk
        for b in range(self.num_batches):
            idx = range(start + b * self.micro_batch_size, start + (b + 1) * self.micro_batch_size)
            yield [i if i < stop else -1 for i in idx]

    def __iter__(self):
        builder = BatchBuilder(self.source, self.shapes, self.pin_memory, require_timestep=True)
        depth = max(1, self.num_workers * self.prefetch_factor)
        yield from _prefetch(builder, self._index_lists(), self.num_workers, depth)


def _source(path, shapes: RecordShapes, fmt: str):
    src = open_source(path, shapes, fmt)
    if len(src):
        src.check(0)  # fail fast on a shape/dtype mismatch with the model, naming the file and row
    return src


def _build(loader_cls, path, shapes: RecordShapes, fmt: str, **kwargs):
    src = _source(path, shapes, fmt)
    return src, loader_cls(src, shapes=shapes, **kwargs)


def build_train_loader(
    path,
    *,
    dp_rank: int,
    dp_world: int,
    micro_batch_size: int,
    num_workers: int = 2,
    shapes: RecordShapes = OFFICIAL_SHAPES,
    fmt: str = "auto",
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> TrainLoader:
    """Infinite in-order train loader of dp rank ``dp_rank``'s contiguous chunk of ``path`` (``data.train_path``)."""
    src, loader = _build(
        TrainLoader, path, shapes, fmt, dp_rank=dp_rank, dp_world=dp_world,
        micro_batch_size=micro_batch_size, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
    )  # fmt: skip
    log.info("train data %s: %d samples, dp rank %d/%d reads [%d, %d)", path, len(src), dp_rank, dp_world,
             *loader.chunk)  # fmt: skip
    return loader


def build_eval_loader(
    path,
    *,
    dp_rank: int,
    dp_world: int,
    micro_batch_size: int,
    num_workers: int = 2,
    shapes: RecordShapes = OFFICIAL_SHAPES,
    fmt: str = "auto",
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> EvalLoader:
    """One-pass eval loader (``data.eval_path``): the rank's contiguous chunk, padded to the common batch count."""
    src, loader = _build(
        EvalLoader, path, shapes, fmt, dp_rank=dp_rank, dp_world=dp_world,
        micro_batch_size=micro_batch_size, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
    )  # fmt: skip
    log.info("eval data %s: %d samples, dp rank %d/%d reads [%d, %d) in %d batches", path, len(src), dp_rank,
             dp_world, *loader.chunk, len(loader))  # fmt: skip
    return loader
