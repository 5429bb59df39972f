"""DALI image decoding and resizing for the raw data path.

Encoded images (PNG / JPEG bytes) are fed through ``fn.external_source`` (the Python side keeps the sample order,
the sharding and the error reporting), decoded to RGB (``device="mixed"``, i.e. nvJPEG / GPU, when CUDA is
present, else on the CPU) and resized with bicubic interpolation to ``size x size``:

* ``mode="crop"`` (CC12M): resize the shorter side to ``size``, then centre crop ``size x size``;
* ``mode="resize"`` (COCO): plain resize to ``size x size`` (aspect ratio not kept).

An image already ``size x size`` comes out unchanged (the cubic kernel is the identity at scale 1). The output is
a uint8 ``[B, size, size, 3]`` torch tensor on the decode device; normalisation to [-1, 1] is done in torch
(``flux_nemo.data.encoders.normalize_images``) so that it is the reference's ``x / 255 * 2 - 1`` exactly.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch

MODES = ("crop", "resize")


def _build_pipeline(batch_size: int, size: int, mode: str, device_id: int | None, num_threads: int):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1)
    def pipe():
        enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=False)
        img = fn.decoders.image(enc, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        if mode == "crop":
            img = fn.resize(img, resize_shorter=size, interp_type=types.INTERP_CUBIC, antialias=True)
            img = fn.crop(
                img, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5, out_of_bounds_policy="error"
            )
        else:
            img = fn.resize(img, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC, antialias=True)
        return img

    p = pipe()
    p.build()
    return p


class ImageDecoder:
    """Decode + bicubic resize a list of encoded images with DALI; ``__call__(list[bytes]) -> uint8 tensor``.

    ``device``: ``"cuda"`` / ``"cuda:N"`` (mixed GPU decode), ``"cpu"``, or None (CUDA if available).
    Batches of any size up to ``max_batch_size`` are accepted.
    """

    def __init__(
        self,
        size: int = 256,
        mode: str = "crop",
        *,
        max_batch_size: int = 16,
        device: str | torch.device | None = None,
        num_threads: int = 4,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if size < 1 or max_batch_size < 1:
            raise ValueError(f"size and max_batch_size must be >= 1, got {size}, {max_batch_size}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", device_id)
        else:
            device_id = None
        self.size, self.mode, self.max_batch_size = size, mode, max_batch_size
        self._pipe = _build_pipeline(max_batch_size, size, mode, device_id, num_threads)

    def __call__(self, encoded: Sequence[bytes], names: Sequence[str] | None = None) -> torch.Tensor:
        """uint8 ``[len(encoded), size, size, 3]`` on ``self.device``.

        On a decode failure the offending image is located (each one is checked with PIL) and a ValueError naming
        it (``names[i]`` if given, e.g. ``"shard.tar:key"``) is raised.
        """
        n = len(encoded)
        if not 1 <= n <= self.max_batch_size:
            raise ValueError(f"batch of {n} images, expected 1..{self.max_batch_size}")
        arrays = [np.frombuffer(b, dtype=np.uint8) for b in encoded]
        try:
            self._pipe.feed_input("encoded", arrays)
            (out,) = self._pipe.run()
        except Exception as e:  # noqa: BLE001 - DALI reports decode errors as RuntimeError without the sample
            self._raise_bad_image(encoded, names, e)
        return self._to_torch(out, n)

    def _to_torch(self, out, n: int) -> torch.Tensor:
        shape = (n, self.size, self.size, 3)
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = torch.empty(shape, dtype=torch.uint8, device=self.device)
            feed_ndarray(out.as_tensor(), t, cuda_stream=torch.cuda.current_stream(self.device))
            return t
        return torch.from_numpy(np.array(out.as_tensor())).reshape(shape)

    def _raise_bad_image(self, encoded, names, err: Exception):
        """Always raises: a ValueError naming the undecodable image, else one naming the whole batch."""
        from PIL import Image

        for i, b in enumerate(encoded):
            name = names[i] if names is not None else f"batch item {i}"
            try:
                with Image.open(io.BytesIO(b)) as im:
                    im.load()
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = ", ".join(names) if names is not None else f"{len(encoded)} images"
        raise ValueError(f"DALI failed on a batch of {where}: {first}") from err
