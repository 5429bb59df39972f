"""Raw webdataset (COCO or cleaned CC12M) -> the official preprocessed flux1 format, with the frozen encoders.

Per sample, as the reference ``preprocess_flux_dataset.py`` (no CFG dropout): T5-XXL ``last_hidden_state``
over 256 max-length-padded tokens, CLIP-L ``pooler_output`` over 77 tokens (no attention masks), and the raw VAE
encoder moments ``mean`` / ``logvar``, all bf16 (``flux_nemo.data.encoders``). Images are decoded and resized by
DALI (``flux_nemo.data.dali``): ``--dataset coco`` plain-resizes, ``--dataset cc12m`` resizes the short side and
centre-crops (both are the identity on the 256x256 PNGs of the preprocessing scripts).

Distributed: run under torchrun (one GPU per rank; the ranks only meet at gloo barriers; plain ``python`` is
world size 1). Rank r encodes the contiguous chunk r of the samples, split into parts of ``--part-size`` samples,
each written as an Arrow ``save_to_disk`` folder ``<output>.parts/part-<start>-<stop>`` followed by a ``.done``
marker. A rerun (same world size) skips the finished parts (resumable). Any sample count works: the last batch of a part is partial. After a barrier rank 0
merges the parts in sample order into ``<output>`` (via ``flux_nemo.data.format.write_arrow_dataset``): columns
``__key__`` (CC12M: the original key; COCO: the image id), ``t5_encodings``, ``clip_encodings``, ``mean``,
``logvar`` and, for COCO only, ``timestep`` (int32). ``--wds-output`` also writes the webdataset form.

Usage:
  torchrun --nproc_per_node 8 preprocess/encode.py --dataset cc12m --input /data/cc12m_clean \
      --output /data/cc12m_preprocessed --t5 /models/t5 --clip /models/clip --vae /models/flux-schnell/vae
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("encode")
DATASETS = {"coco": ("resize", True), "cc12m": ("crop", False)}  # name -> (resize mode, has timestep)


def record_shapes(encoders, image_size: int):
    """The RecordShapes the encoders produce for ``image_size`` images."""
    from flux_nemo.data.format import RecordShapes

    factor = 2 ** (len(encoders.vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(f"image size {image_size} is not a multiple of the VAE factor {factor}")
    return RecordShapes(
        t5_len=encoders.t5_max_length,
        t5_dim=int(encoders.t5.config.d_model),
        clip_dim=int(encoders.clip.config.hidden_size),
        latent_channels=encoders.latent_channels,
        latent_size=image_size // factor,
    )


def part_ranges(start: int, stop: int, part_size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` parts of ``part_size`` covering ``[start, stop)``."""
    return [(lo, min(lo + part_size, stop)) for lo in range(start, stop, part_size)]


def encoded_rows(shards, lo: int, hi: int, encoders, decoder, batch_size: int, with_timestep: bool):
    """Rows for ``write_arrow_dataset`` of samples ``lo .. hi-1``, encoded in batches of ``batch_size``."""
    it = shards.iter_range(lo, hi)
    while True:
        samples = [s for _, s in zip(range(batch_size), it, strict=False)]
        if not samples:
            return
        images = decoder([s.image for s in samples], names=[s.where for s in samples])
        out = {k: v.cpu() for k, v in encoders.encode([s.caption for s in samples], images).items()}
        for i, s in enumerate(samples):
            row = {
                "__key__": s.record_key,
                "t5_encodings": out["t5"][i],
                "clip_encodings": out["clip"][i],
                "mean": out["mean"][i],
                "logvar": out["logvar"][i],
            }
            if with_timestep:
                row["timestep"] = s.timestep(required=True)
            yield row


def iter_part_rows(part_dir: Path):
    """Rows (npy bytes cells) of one finished part, in order."""
    import pyarrow as pa

    state = json.loads((part_dir / "state.json").read_text())
    for f in state["_data_files"]:
        with pa.OSFile(str(part_dir / f["filename"]), "rb") as src:
            for batch in pa.ipc.open_stream(src):
                yield from batch.to_pylist()


def _init_distributed() -> tuple[int, int, int]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if "MASTER_ADDR" in os.environ and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        # only barriers are needed: gloo, with a timeout long enough for the slowest rank's whole chunk
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=72))
    return rank, world, local


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def encode_dataset(a) -> int:
    """Encode this rank's parts, then (rank 0) merge; returns the merged row count (0 on other ranks)."""
    from flux_nemo.data.dali import ImageDecoder
    from flux_nemo.data.encoders import FluxEncoders
    from flux_nemo.data.format import write_arrow_dataset
    from flux_nemo.data.raw_shards import RawShards, contiguous_range

    rank, world, local = _init_distributed()
    mode, with_timestep = DATASETS[a.dataset]
    out = Path(a.output)
    if Path(str(out) + ".done").exists():
        log.info("%s is complete (%s.done exists); nothing to do", out, out)
        return 0
    parts_dir = Path(str(out) + ".parts")
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    shards = RawShards(a.input, require_json=with_timestep)
    n = len(shards)
    manifest = {"num_samples": n, "world_size": world, "part_size": a.part_size, "dataset": a.dataset,
                "image_size": a.image_size}  # fmt: skip
    if rank == 0:
        parts_dir.mkdir(parents=True, exist_ok=True)
        mf = parts_dir / "manifest.json"
        if mf.exists() and json.loads(mf.read_text()) != manifest:
            raise ValueError(
                f"{mf}: written by a different run ({mf.read_text()}), now {manifest}; remove it"
            )
        mf.write_text(json.dumps(manifest))
    _barrier()

    lo, hi = contiguous_range(n, rank, world)
    todo = [
        (p, q)
        for p, q in part_ranges(lo, hi, a.part_size)
        if not (parts_dir / f"part-{p:09d}-{q:09d}.done").exists()
    ]
    log.info("rank %d/%d: samples [%d, %d) of %d, %d parts to encode", rank, world, lo, hi, n, len(todo))
    if todo:
        encoders = FluxEncoders(a.t5, a.clip, a.vae, device=device)
        shapes = record_shapes(encoders, a.image_size)
        decoder = ImageDecoder(
            a.image_size, mode, max_batch_size=a.batch_size, device=device, num_threads=a.threads
        )
        for p, q in todo:
            t0 = time.time()
            name = f"part-{p:09d}-{q:09d}"
            tmp = parts_dir / (name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(parts_dir / name, ignore_errors=True)
            rows = encoded_rows(shards, p, q, encoders, decoder, a.batch_size, with_timestep)
            count = write_arrow_dataset(tmp, rows, shapes, with_timestep=with_timestep)
            if count != q - p:
                raise RuntimeError(f"{name}: wrote {count} rows, expected {q - p}")
            os.replace(tmp, parts_dir / name)
            (parts_dir / (name + ".done")).write_text(json.dumps({"count": count, "shapes": shapes.__dict__}))
            log.info("rank %d: %s done (%d samples, %.1f s)", rank, name, count, time.time() - t0)
    _barrier()
    if rank != 0:
        return 0
    count = merge_parts(parts_dir, out, n, with_timestep, a.wds_output, keep_parts=a.keep_parts)
    Path(str(out) + ".done").write_text(json.dumps({"count": count, **manifest}))
    return count


def merge_parts(
    parts_dir: Path, out: Path, n: int, with_timestep: bool, wds_output=None, *, keep_parts: bool = False
) -> int:
    """Merge all finished parts (sorted by start) into ``out`` (atomically); returns the row count."""
    from flux_nemo.data.format import RecordShapes, write_arrow_dataset, write_webdataset

    names = sorted(d.name for d in parts_dir.glob("part-*") if d.is_dir() and not d.name.endswith(".tmp"))
    spans = [tuple(int(x) for x in name.split("-")[1:]) for name in names]
    if (
        not spans
        or spans[0][0] != 0
        or spans[-1][1] != n
        or any(a[1] != b[0] for a, b in zip(spans, spans[1:], strict=False))
    ):
        raise RuntimeError(f"{parts_dir}: parts {names} do not cover [0, {n}) contiguously")
    for name in names:
        if not (parts_dir / (name + ".done")).exists():
            raise RuntimeError(f"{parts_dir / name}: part not finished (no .done marker)")
    shapes = RecordShapes(**json.loads((parts_dir / (names[0] + ".done")).read_text())["shapes"])

    def rows():
        for name in names:
            yield from iter_part_rows(parts_dir / name)

    tmp = Path(str(out) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    count = write_arrow_dataset(tmp, rows(), shapes, with_timestep=with_timestep)
    if count != n:
        raise RuntimeError(f"merged {count} rows, expected {n}")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    if wds_output:
        write_webdataset(wds_output, rows(), shapes)
    if not keep_parts:
        shutil.rmtree(parts_dir)
    log.info("merged %d rows into %s", count, out)
    return count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    p.add_argument("--input", required=True, help="raw webdataset shards (folder of .tar, or a glob)")
    p.add_argument("--output", required=True, help="output Arrow save_to_disk folder")
    p.add_argument("--wds-output", default=None, help="also write webdataset tars of the records here")
    p.add_argument("--t5", required=True, help="local T5 folder (HF layout, with tokenizer)")
    p.add_argument("--clip", required=True, help="local CLIP text folder (HF layout, with tokenizer)")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (FLUX VAE)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--part-size", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=4, help="DALI threads")
    p.add_argument("--keep-parts", action="store_true", help="keep <output>.parts after merging")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    encode_dataset(a)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
