"""Webdataset tar shards of raw samples (images + captions): listing, ordered reading, indexing and writing.

A shard holds consecutive members ``<key>.<ext>``; a sample is the group of consecutive members with the same key.
The order of a set of shards is: sorted shard names, then tar order. ``index.json`` (written by ``ShardWriter``
and the preprocessing scripts) caches the sample count of each shard; without it the shards are scanned.
Corrupt tars, undecodable images and missing caption / json members raise ValueError naming shard and key.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
INDEX_NAME = "index.json"


# --------------------------------------------------------------------------------------------------------------
# shards


def list_shards(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Tar shards of ``path``: a directory (its ``*.tar``, sorted), a tar file, a glob pattern or a list of those."""
    if isinstance(path, (list, tuple)):
        return [s for p in path for s in list_shards(p)]
    p = Path(path)
    if p.is_dir():
        shards = sorted(p.glob("*.tar"))
    elif p.is_file():
        shards = [p]
    else:
        shards = [Path(s) for s in sorted(glob.glob(str(path)))]
    if not shards:
        raise FileNotFoundError(f"no webdataset .tar shards found at {path}")
    return shards


def split_key(name: str) -> tuple[str, str]:
    """webdataset ``(key, ext)`` of a member name: the key ends at the first dot of the basename."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return (f"{d}/{stem}" if d else stem), ext.lower()


def iter_tar_groups(shard: str | os.PathLike, skip: int = 0) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` of each sample of a tar shard, in order; the first ``skip`` are not read.

    Raises ValueError naming the shard (and the last good key) if the tar is corrupt or truncated.
    """
    key, files, n, last = None, {}, 0, None
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k, ext = split_key(m.name)
                if k != key:
                    if key is not None:
                        if n >= skip:
                            yield key, files
                        last, n = key, n + 1
                    key, files = k, {}
                if n >= skip:
                    files[ext] = tar.extractfile(m).read()
            if key is not None and n >= skip:
                yield key, files
    except (tarfile.TarError, EOFError, OSError) as e:
        after = f" after key {last!r}" if last is not None else ""
        raise ValueError(
            f"{shard}: corrupt or truncated tar shard{after} ({type(e).__name__}: {e})"
        ) from None


def count_samples(shard: str | os.PathLike) -> int:
    """Number of samples (key groups) in a tar shard, reading only the headers."""
    n, key = 0, None
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                if m.isfile():
                    k, _ = split_key(m.name)
                    if k != key:
                        n, key = n + 1, k
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{shard}: corrupt or truncated tar shard ({type(e).__name__}: {e})") from None
    return n


def write_index(directory: str | os.PathLike, counts: Mapping[str, int]) -> None:
    """``index.json`` next to the shards: ``{name: {"count", "size"}}`` (read by ``shard_counts``)."""
    d = Path(directory)
    index = {name: {"count": int(c), "size": (d / name).stat().st_size} for name, c in counts.items()}
    (d / INDEX_NAME).write_text(json.dumps(index, indent=1, sort_keys=True))


def shard_counts(shards: Sequence[Path]) -> list[int]:
    """Samples per shard: from a matching ``index.json`` next to a shard (same size), else by scanning."""
    cache: dict[Path, dict] = {}
    counts = []
    for s in shards:
        if s.parent not in cache:
            f = s.parent / INDEX_NAME
            cache[s.parent] = json.loads(f.read_text()) if f.is_file() else {}
        entry = cache[s.parent].get(s.name)
        if entry is not None and entry.get("size") == s.stat().st_size:
            counts.append(int(entry["count"]))
        else:
            counts.append(count_samples(s))
    return counts


class ShardWriter:
    """Writes raw samples into tar shards ``pattern % k`` of ``per_shard`` samples; ``close()`` writes the index.

    Members are ``<key>.<ext>`` in the order given, with mtime 0 (deterministic bytes).
    """

    def __init__(self, out_dir: str | os.PathLike, per_shard: int = 1000, pattern: str = "shard_%05d.tar"):
        if per_shard < 1:
            raise ValueError(f"per_shard must be >= 1, got {per_shard}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.per_shard, self.pattern = per_shard, pattern
        self.counts: dict[str, int] = {}
        self._tar = None
        self.n = 0

    def write(self, key: str, members: Sequence[tuple[str, bytes]]) -> None:
        if self.n % self.per_shard == 0:
            self._close_tar()
            name = self.pattern % (self.n // self.per_shard)
            self._tar = tarfile.open(self.out / name, "w", format=tarfile.USTAR_FORMAT)
            self.counts[name] = 0
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.counts[Path(self._tar.name).name] += 1
        self.n += 1

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> int:
        """Close the last shard, write ``index.json``; returns the sample count."""
        self._close_tar()
        write_index(self.out, self.counts)
        return self.n


def contiguous_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank's contiguous chunk of ``n`` items (``datasets`` ``shard(contiguous=True)``)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in [0, {world})")
    div, mod = divmod(n, world)
    start = div * rank + min(rank, mod)
    return start, start + div + (1 if rank < mod else 0)


# --------------------------------------------------------------------------------------------------------------
# samples


@dataclass
class RawSample:
    """One raw sample: encoded image bytes, caption, parsed json (``{}`` if none) and where it came from."""

    key: str
    shard: str
    image: bytes
    caption: str
    meta: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.shard}:{self.key}"

    @property
    def record_key(self) -> str:
        """The ``__key__`` of the preprocessed record: json ``key`` (CC12M), json ``id`` (COCO), else tar key."""
        for k in ("key", "id"):
            if self.meta.get(k) is not None:
                return str(self.meta[k])
        return self.key

    def timestep(self, required: bool) -> int:
        """The json ``timestep`` (int); -1 when absent and not ``required``."""
        ts = self.meta.get("timestep")
        if ts is None:
            if required:
                raise ValueError(f"{self.where}: json has no 'timestep' (required for evaluation data)")
            return -1
        if isinstance(ts, bool) or not isinstance(ts, int):
            raise ValueError(f"{self.where}: json 'timestep' must be an int, got {ts!r}")
        return ts


def parse_sample(shard: str, key: str, files: dict[str, bytes], *, require_json: bool = False) -> RawSample:
    """A RawSample from one tar group; ValueError naming shard and key if the image, caption or json is bad."""
    where = f"{shard}:{key}"
    img_ext = next((e for e in IMAGE_EXTS if e in files), None)
    if img_ext is None:
        raise ValueError(f"{where}: no image member ({'/'.join(IMAGE_EXTS)}); members: {sorted(files)}")
    if "txt" not in files:
        raise ValueError(f"{where}: no caption member 'txt'; members: {sorted(files)}")
    try:
        caption = files["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: caption 'txt' is not valid UTF-8 ({e})") from None
    meta = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: corrupt 'json' member ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: 'json' member is not an object")
    elif require_json:
        raise ValueError(f"{where}: no 'json' member; members: {sorted(files)}")
    return RawSample(key, str(shard), files[img_ext], caption, meta)


class RawShards:
    """An ordered webdataset of raw samples over ``list_shards(path)``; ``len`` and ``iter_range``."""

    def __init__(self, path, *, require_json: bool = False):
        self.shards = list_shards(path)
        self.counts = shard_counts(self.shards)
        self.require_json = require_json
        self.offsets = [0]
        for c in self.counts:
            self.offsets.append(self.offsets[-1] + c)

    def __len__(self) -> int:
        return self.offsets[-1]

    def iter_range(self, start: int, stop: int) -> Iterator[RawSample]:
        """Samples ``start .. stop-1`` (global indices) in order."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"range [{start}, {stop}) outside [0, {len(self)}]")
        idx = start
        for s, shard in enumerate(self.shards):
            lo, hi = self.offsets[s], self.offsets[s + 1]
            if idx >= stop:
                return
            if idx >= hi:
                continue
            for key, files in iter_tar_groups(shard, skip=idx - lo):
                yield parse_sample(str(shard), key, files, require_json=self.require_json)
                idx += 1
                if idx >= stop or idx >= hi:
                    break
            if idx < min(hi, stop):
                raise ValueError(f"{shard}: has fewer samples than indexed ({hi - lo}); index.json is stale")


def decode_image_pil(data: bytes, where: str):
    """PIL image (loaded) from encoded bytes; ValueError naming ``where`` if it cannot be decoded."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is bad data
        raise ValueError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
    return im
