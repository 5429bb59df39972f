"""CC12M webdataset -> the cleaned flux1 training set: 256x256 PNG webdataset shards (reference.md §5.3, §9).

Steps, as the reference ``clean_cc12m.py``:
  1. the samples of the input shards in order (sorted shard names, then tar order; global index from 0);
  2. drop the problematic indices listed in ``--filter-file`` (one integer per line; the reference's
     ``problematic_indices.txt``, 141 undecodable samples of pixparse/cc12m-wds);
  3. drop images whose width or height is below ``--min-size`` (256);
  4. keep the first ``--subset-size`` (1,099,776) of the rest;
  5. ``png`` = resize of the short side to ``--output-size`` (bicubic, torchvision semantics: the long side is
     ``int(size * long / short)``) then centre crop ``size x size`` (``round((H - size) / 2)`` offsets).
Images are decoded with PIL, EXIF orientation applied (as ``datasets`` does) and converted to RGB before the
resize (the reference converts to RGB when it loads the PNG).

Output: shards ``shard-000000.tar`` ... of ``--samples-per-shard`` samples, members ``<key>.png``, ``<key>.txt``,
``<key>.json`` (``{"key": original __key__, "index": global input index}``), and ``index.json``. The result is
deterministic and independent of ``--workers``. Skipped samples (problematic indices, small images) are counted
and logged; anything else that is wrong (corrupt tar, an undecodable image not in the filter file, a missing
caption) is an error naming the shard and the key.

Usage:
  python preprocess/clean_cc12m.py --input-dir cc12m-wds --output-dir /data/cc12m_clean \
      --filter-file problematic_indices.txt [--subset-size 1099776] [--workers 8]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from multiprocessing import Pool
from pathlib import Path

log = logging.getLogger("clean_cc12m")


def read_filter_file(path: str | os.PathLike | None) -> set[int]:
    """Problematic global indices (one int per line; blank lines ignored)."""
    if path is None:
        return set()
    out = set()
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                out.add(int(line.strip()))
            except ValueError:
                raise ValueError(f"{path}:{n}: not an integer index: {line!r}") from None
    return out


def resize_center_crop(im, size: int):
    """torchvision ``center_crop(resize(im, size, BICUBIC), size)`` on a PIL image."""
    from PIL import Image

    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def process_one(job: tuple[str, bytes, int, int]) -> tuple[str, bytes | tuple[int, int]]:
    """``("ok", png bytes)`` or ``("small", (w, h))`` for one encoded image; ValueError naming ``where``."""
    from PIL import Image, ImageOps

    where, data, min_size, out_size = job
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        if im.getexif().get(Image.ExifTags.Base.Orientation) is not None:
            im = ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 - any decoder failure is bad data
        raise ValueError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
    if min(im.size) < min_size:
        return "small", im.size
    buf = io.BytesIO()
    resize_center_crop(im.convert("RGB"), out_size).save(buf, format="PNG")
    return "ok", buf.getvalue()


def _candidates(shards, skip: set[int], stats: dict):
    """(index, shard, key, image bytes, caption bytes) of the input samples not in ``skip``, in order."""
    from flux_nemo.data.raw_shards import IMAGE_EXTS, iter_tar_groups

    idx = 0
    for shard in shards:
        for key, files in iter_tar_groups(shard):
            i, idx = idx, idx + 1
            if i in skip:
                stats["problematic"] += 1
                log.info("skip %s:%s (index %d): listed as problematic", shard, key, i)
                continue
            img = next((files[e] for e in IMAGE_EXTS if e in files), None)
            if img is None or "txt" not in files:
                what = "image" if img is None else "caption 'txt'"
                raise ValueError(f"{shard}:{key}: no {what} member; members: {sorted(files)}")
            yield i, shard, key, img, files["txt"]


def clean(
    input_dir, output_dir, *, filter_file=None, subset_size: int = 1_099_776, min_size: int = 256,
    output_size: int = 256, samples_per_shard: int = 1000, workers: int = 1, window: int = 256,
) -> dict:  # fmt: skip
    """Write the cleaned shards; returns counts ``{"written", "problematic", "small", "read"}``."""
    from flux_nemo.data.raw_shards import ShardWriter, list_shards

    shards = list_shards(input_dir)
    skip = read_filter_file(filter_file)
    stats = {"written": 0, "problematic": 0, "small": 0, "read": 0}  # read: not problematic, examined
    writer = ShardWriter(output_dir, samples_per_shard, "shard-%06d.tar")
    pool = Pool(workers) if workers > 1 else None
    source = _candidates(shards, skip, stats)
    try:
        while stats["written"] < subset_size:
            block = [c for _, c in zip(range(window), source, strict=False)]
            if not block:
                break
            jobs = [(f"{s}:{k}", img, min_size, output_size) for _, s, k, img, _ in block]
            results = pool.map(process_one, jobs) if pool else list(map(process_one, jobs))
            for (i, shard, key, _, txt), (status, value) in zip(block, results, strict=True):
                if stats["written"] >= subset_size:
                    break
                stats["read"] += 1
                if status == "small":
                    stats["small"] += 1
                    log.debug("skip %s:%s (index %d): image %dx%d below %d", shard, key, i, *value, min_size)
                    continue
                meta = json.dumps({"key": key, "index": i}).encode()
                writer.write(key, [("png", value), ("txt", txt), ("json", meta)])
                stats["written"] += 1
    finally:
        if pool is not None:
            pool.terminate()
    writer.close()
    if stats["written"] < subset_size:
        log.warning("only %d samples passed the filters (%d requested)", stats["written"], subset_size)
    log.info(
        "wrote %d samples to %s; skipped %d problematic and %d small (< %d) of %d read",
        stats["written"], output_dir, stats["problematic"], stats["small"], min_size,
        stats["read"] + stats["problematic"],
    )  # fmt: skip
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input-dir", required=True, help="CC12M webdataset shards (a folder of .tar, or a glob)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--filter-file", default=None, help="problematic indices, one per line")
    p.add_argument("--subset-size", type=int, default=1_099_776)
    p.add_argument("--min-size", type=int, default=256)
    p.add_argument("--output-size", type=int, default=256)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    clean(
        a.input_dir, a.output_dir, filter_file=a.filter_file, subset_size=a.subset_size, min_size=a.min_size,
        output_size=a.output_size, samples_per_shard=a.samples_per_shard, workers=a.workers,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
