"""Raw (on-the-fly) data path: webdataset shards of images + captions -> batches in the DESIGN.md contract.

Shards are tar files in webdataset layout (consecutive members ``<key>.<ext>``): the cleaned CC12M set
(``png`` + ``txt`` + ``json`` with ``key``, from ``preprocess/clean_cc12m.py``) and the COCO set (``png`` + ``txt`` +
``json`` with ``id`` and ``timestep``, from ``preprocess/coco_to_webdataset.py``). The sample order is the shard
order (sorted names) then the tar order; each data-parallel rank reads the contiguous chunk that
``datasets.Dataset.shard(contiguous=True)`` would give it, in order, with no shuffling (reference.md §5.4).

Per batch: DALI decodes and bicubic-resizes the images (``flux_nemo.data.dali``, GPU ``mixed`` decode when CUDA
is present), then the frozen encoders (``flux_nemo.data.encoders``) produce ``t5``, ``clip``, ``mean``, ``logvar``
in bf16 on the device. Batches carry ``timestep`` (int64, the COCO json timestep; -1 when absent) and ``valid``.

Bad data raises a ValueError naming the shard and the key (corrupt tar, undecodable image, missing caption,
missing or bad json / timestep). Nothing is skipped here; skipping happens only in the preprocessing scripts
where the reference skips.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from flux_nemo.data.raw_shards import RawSample, RawShards, contiguous_range

# --------------------------------------------------------------------------------------------------------------
# loaders


class RawLoader:
    """Batches in the DESIGN.md contract from raw shards, encoded on the fly.

    ``train=True``: the rank's contiguous chunk, in order, forever (wrapping at its end); full batches;
    ``state_dict()`` / ``load_state_dict()`` restore the position exactly (same dp world required).
    ``train=False``: one pass per ``iter()``; every rank yields ``len(self)`` batches, padded with
    ``valid=False`` rows (copies of a real sample, timestep 0) so that all ranks run the same number of batches.
    """

    def __init__(
        self,
        shards: RawShards,
        encoders,
        decoder,
        batch_size: int,
        *,
        dp_rank: int = 0,
        dp_world: int = 1,
        train: bool = True,
        require_timestep: bool = False,
    ):
        if batch_size < 1 or batch_size > decoder.max_batch_size:
            raise ValueError(f"batch_size {batch_size} must be in [1, {decoder.max_batch_size}]")
        self.shards, self.encoders, self.decoder = shards, encoders, decoder
        self.batch_size, self.train, self.require_timestep = batch_size, train, require_timestep
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.start, self.stop = contiguous_range(len(shards), dp_rank, dp_world)
        if train and self.stop == self.start:
            raise ValueError(f"rank {dp_rank} of {dp_world} has no training samples ({len(shards)} in all)")
        self.samples_seen = 0  # train: samples handed out so far
        self._it: Iterator[RawSample] | None = None

    # ---- state (train) ----
    def state_dict(self) -> dict:
        """Same keys as the preprocessed ``TrainLoader``: samples handed out, position in the chunk, dp layout."""
        n = self.stop - self.start
        return {
            "samples_seen": self.samples_seen,
            "position": self.samples_seen % n if n else 0,
            "dp_rank": self.dp_rank,
            "dp_world": self.dp_world,
            "num_samples": len(self.shards),
        }

    def load_state_dict(self, state: Mapping) -> None:
        saved = (state.get("dp_rank"), state.get("dp_world"), state.get("num_samples"))
        if saved != (self.dp_rank, self.dp_world, len(self.shards)):
            raise ValueError(
                f"cannot resume: state of dp rank {saved[0]}/{saved[1]} over {saved[2]} samples, "
                f"this loader is dp rank {self.dp_rank}/{self.dp_world} over {len(self.shards)}"
            )
        self.samples_seen = int(state["samples_seen"])
        self._it = None

    # ---- iteration ----
    def __len__(self) -> int:
        if self.train:
            raise TypeError("the training loader is infinite")
        longest = contiguous_range(len(self.shards), 0, self.dp_world)
        return -(-(longest[1] - longest[0]) // self.batch_size)

    def __iter__(self):
        if self.train:
            return self
        return self._eval_batches()

    def _forever(self) -> Iterator[RawSample]:
        n = self.stop - self.start
        pos = self.samples_seen % n
        while True:
            yield from self.shards.iter_range(self.start + pos, self.stop)
            pos = 0

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.train:
            raise TypeError("iterate the evaluation loader with iter()")
        if self._it is None:
            self._it = self._forever()
        samples = [next(self._it) for _ in range(self.batch_size)]
        self.samples_seen += len(samples)
        return self.encode_batch(samples, [True] * len(samples))

    def _eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        it = self.shards.iter_range(self.start, self.stop) if self.stop > self.start else iter(())
        filler = None
        for _ in range(len(self)):
            chunk = [s for _, s in zip(range(self.batch_size), it, strict=False)]
            if chunk:
                filler = chunk[-1]
            elif filler is None:  # this rank has no samples at all: pad with the dataset's first one
                filler = next(self.shards.iter_range(0, 1))
            valid = [True] * len(chunk) + [False] * (self.batch_size - len(chunk))
            yield self.encode_batch(chunk + [filler] * (self.batch_size - len(chunk)), valid)

    def encode_batch(self, samples: Sequence[RawSample], valid: Sequence[bool]) -> dict[str, torch.Tensor]:
        """Decode, resize and encode ``samples``: the batch dict (t5, clip, mean, logvar, timestep, valid)."""
        images = self.decoder([s.image for s in samples], names=[s.where for s in samples])
        batch = self.encoders.encode([s.caption for s in samples], images)
        dev = batch["t5"].device
        # padding rows (eval only) carry timestep 0, as the preprocessed EvalLoader's
        ts = [s.timestep(self.require_timestep) if v else 0 for s, v in zip(samples, valid, strict=True)]
        batch["timestep"] = torch.tensor(ts, dtype=torch.int64, device=dev)
        batch["valid"] = torch.tensor(list(valid), dtype=torch.bool, device=dev)
        return batch


def _as_encoders(encoders, device):
    from flux_nemo.data.encoders import FluxEncoders

    if isinstance(encoders, FluxEncoders):
        return encoders
    if isinstance(encoders, Mapping):
        return FluxEncoders(encoders["t5"], encoders["clip"], encoders["vae"], device=device)
    raise TypeError(
        f"encoders must be a FluxEncoders or a mapping of t5/clip/vae paths, got {type(encoders)}"
    )


def build_raw_train_loader(
    path,
    encoders,
    batch_size: int,
    *,
    dp_rank: int = 0,
    dp_world: int = 1,
    image_size: int = 256,
    mode: str = "crop",
    device=None,
    num_threads: int = 4,
) -> RawLoader:
    """Infinite training loader over raw shards at ``path`` (CC12M: ``mode="crop"``).

    ``encoders``: a ``FluxEncoders`` (share one between train and eval) or ``{"t5", "clip", "vae"}`` folder paths.
    """
    from flux_nemo.data.dali import ImageDecoder

    enc = _as_encoders(encoders, device)
    dec = ImageDecoder(
        image_size, mode, max_batch_size=batch_size, device=enc.device, num_threads=num_threads
    )
    return RawLoader(RawShards(path), enc, dec, batch_size, dp_rank=dp_rank, dp_world=dp_world, train=True)


def build_raw_eval_loader(
    path,
    encoders,
    batch_size: int,
    *,
    dp_rank: int = 0,
    dp_world: int = 1,
    image_size: int = 256,
    mode: str = "resize",
    device=None,
    num_threads: int = 4,
    require_timestep: bool = True,
) -> RawLoader:
    """One-pass evaluation loader over raw COCO shards (``mode="resize"``; json ``timestep`` required)."""
    from flux_nemo.data.dali import ImageDecoder

    enc = _as_encoders(encoders, device)
    dec = ImageDecoder(
        image_size, mode, max_batch_size=batch_size, device=enc.device, num_threads=num_threads
    )
    shards = RawShards(path, require_json=require_timestep)
    return RawLoader(
        shards,
        enc,
        dec,
        batch_size,
        dp_rank=dp_rank,
        dp_world=dp_world,
        train=False,
        require_timestep=require_timestep,
    )
