"""COCO-2014 val -> the flux1 evaluation subset as webdataset shards + TSV (reference.md §5.3, §9).

Selection, as the reference ``coco_to_webdataset.py``:
  1. load the ``annotations`` of ``captions_val2014.json``; captions lose their newlines and are stripped;
  2. shuffle: ``df.sample(frac=1, random_state=seed)`` (seed 2023);
  3. ``drop_duplicates("image_id", keep="first")``: one caption per image;
  4. the first ``num_samples`` rows (29,696);
  5. sort by annotation ``id``; ``timestep = row % 8``;
  6. the TSV (tab-separated, header, columns of the annotations: ``image_id``, ``id``, ``caption``, plus
     ``timestep``).
Each image ``COCO_val2014_{image_id:012d}.jpg`` is resized with PIL BICUBIC directly to ``width x height`` (no
crop, aspect ratio not kept) and saved as PNG (not JPEG: JPEG made the reference's eval loss diverge). Shards
``shard_00000.tar`` ... hold ``samples_per_shard`` samples (1000): ``{image_id:012d}.png``, ``.txt`` (caption),
``.json`` ``{"id": str(image_id), "caption", "filename": "COCO_val2014_{image_id:012d}.png", "timestep"}``;
``index.json`` lists the sample count of each shard.

Unlike the reference (which prints and skips an image it cannot read), a missing or undecodable image is an
error naming the file: skipping would silently change the evaluation set.

Usage:
  python preprocess/coco_to_webdataset.py --captions annotations/captions_val2014.json --images val2014 \
      --output-dir /data/coco --output-tsv /data/val2014_30k.tsv [--num-samples 29696] [--workers 8]
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

log = logging.getLogger("coco_to_webdataset")


def select_captions(captions_file: str | os.PathLike, num_samples: int = 29_696, seed: int = 2023):
    """The reference selection as a pandas DataFrame (image_id, id, caption, timestep), in TSV order."""
    import numpy as np
    import pandas as pd

    with open(captions_file) as f:
        data = json.load(f)
    if "annotations" not in data:
        raise ValueError(f"{captions_file}: no 'annotations' key (not a COCO captions file)")
    df = pd.DataFrame(data["annotations"])
    for col in ("image_id", "id", "caption"):
        if col not in df.columns:
            raise ValueError(f"{captions_file}: annotations have no {col!r} field")
    df["caption"] = df["caption"].map(lambda c: c.replace("\n", "").strip())
    df = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    df = df.drop_duplicates(subset=["image_id"], keep="first")
    if len(df) < num_samples:
        raise ValueError(f"{captions_file}: only {len(df)} distinct images, {num_samples} requested")
    df = df[:num_samples].sort_values(by=["id"])
    if num_samples % 8:
        log.warning("%d samples: not a multiple of 8, timesteps are not balanced", num_samples)
    df["timestep"] = np.arange(len(df)) % 8
    return df


def resize_to_png(args: tuple[str, int, int]) -> bytes:
    """PNG bytes of the image at ``path`` resized with PIL BICUBIC to ``(width, height)``."""
    from PIL import Image

    path, width, height = args
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO image not found: {path}")
    try:
        with Image.open(path) as im:
            out = im.resize((width, height), resample=Image.Resampling.BICUBIC)
    except Exception as e:  # noqa: BLE001 - any decoder failure is bad data
        raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def convert(
    captions_file, images_dir, output_dir, output_tsv, *, num_samples: int = 29_696, seed: int = 2023,
    width: int = 256, height: int = 256, samples_per_shard: int = 1000, workers: int = 1,
) -> int:  # fmt: skip
    """Write the TSV and the shards; returns the number of samples written."""
    from flux_nemo.data.raw_shards import ShardWriter

    df = select_captions(captions_file, num_samples, seed)
    Path(output_tsv).parent.mkdir(parents=True, exist_ok=True)
    df[["image_id", "id", "caption", "timestep"]].to_csv(output_tsv, sep="\t", index=False)
    log.info("selected %d captions -> %s", len(df), output_tsv)

    rows = list(zip(df["image_id"].tolist(), df["caption"].tolist(), df["timestep"].tolist(), strict=True))
    jobs = [(os.path.join(images_dir, f"COCO_val2014_{int(i):012d}.jpg"), width, height) for i, _, _ in rows]
    writer = ShardWriter(output_dir, samples_per_shard, "shard_%05d.tar")
    pool = Pool(workers) if workers > 1 else None
    try:
        pngs = pool.imap(resize_to_png, jobs, chunksize=16) if pool else map(resize_to_png, jobs)
        for (image_id, caption, timestep), png in zip(rows, pngs, strict=True):
            base = f"{int(image_id):012d}"
            meta = {
                "id": str(int(image_id)),
                "caption": caption,
                "filename": f"COCO_val2014_{base}.png",
                "timestep": int(timestep),
            }
            members = [("png", png), ("txt", caption.encode()), ("json", json.dumps(meta, indent=2).encode())]
            writer.write(base, members)
    finally:
        if pool is not None:
            pool.terminate()
    n = writer.close()
    log.info("wrote %d samples in %d shards to %s", n, len(writer.counts), output_dir)
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions", required=True, help="captions_val2014.json")
    p.add_argument("--images", required=True, help="folder of COCO_val2014_*.jpg")
    p.add_argument("--output-dir", required=True, help="folder for the tar shards")
    p.add_argument("--output-tsv", required=True, help="TSV of the selected captions")
    p.add_argument("--num-samples", type=int, default=29_696)
    p.add_argument("--seed", type=int, default=2023)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    convert(
        a.captions, a.images, a.output_dir, a.output_tsv, num_samples=a.num_samples, seed=a.seed,
        width=a.width, height=a.height, samples_per_shard=a.samples_per_shard, workers=a.workers,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
