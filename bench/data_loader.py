"""Train-loader throughput at the real record size (~2.1 MiB: T5 256x4096 bf16 + CLIP + mean/logvar).

Writes N official-format records to a temporary directory on local disk, reads them once to warm the page
cache, then times the train loader (N workers, pinned memory and non-blocking copies when CUDA is present) and
prints samples/s. Results go to docs/PERFORMANCE.md, section "## Data loader".

    .venv/bin/python bench/data_loader.py --records 512 --batch 16 --workers 2 --epochs 1 --repeats 5 [--format arrow]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

from flux_nemo.data.format import KEY_COLUMN, OFFICIAL_SHAPES, write_arrow_dataset, write_webdataset
from flux_nemo.data.loader import build_train_loader


def _rows(n: int, seed: int = 0):
    """Distinct records without generating 2 MiB of random numbers per sample: one random base, tweaked rows."""
    rng = np.random.default_rng(seed)
    base = {
        c: rng.integers(0x3C00, 0x4000, size=s, dtype=np.uint16) for c, s in OFFICIAL_SHAPES.fields().items()
    }
    for i in range(n):
        row = {KEY_COLUMN: f"{i:09d}", "timestep": i % 8}
        for c, arr in base.items():
            arr.reshape(-1)[i % arr.size] ^= 1
            buf = io.BytesIO()
            np.save(buf, arr)
            row[c] = buf.getvalue()
        yield row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--epochs", type=int, default=3, help="timed passes over the records (after one warm pass)"
    )
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions; the median is reported")
    ap.add_argument("--format", choices=["arrow", "webdataset"], default="arrow")
    ap.add_argument("--dir", default=None, help="parent of the temporary directory (default: system temp)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda") if cuda else None
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        if args.format == "arrow":
            write_arrow_dataset(tmp, _rows(args.records), OFFICIAL_SHAPES, rows_per_file=256)
        else:
            write_webdataset(tmp, _rows(args.records), OFFICIAL_SHAPES, samples_per_shard=256)
        os.sync()  # flush the dirty pages now: writeback during the timed passes costs up to 3x
        print(
            f"wrote {args.records} records ({OFFICIAL_SHAPES.record_bytes() / 2**20:.2f} MiB payload each) "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        loader = build_train_loader(
            tmp,
            dp_rank=0,
            dp_world=1,
            micro_batch_size=args.batch,
            num_workers=args.workers,
            fmt=args.format,
            pin_memory=cuda,
        )
        per_epoch = args.records // args.batch
        it = iter(loader)
        for _ in range(per_epoch):  # warm pass: page cache and worker start-up
            next(it)
        n_batches = per_epoch * args.epochs
        rates, checksum = [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(n_batches):
                batch = next(it)
                if cuda:
                    batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
                checksum += int(batch["timestep"].sum())
            if cuda:
                torch.cuda.synchronize()
            rates.append(n_batches * args.batch / (time.perf_counter() - t0))
        del it
    gib = OFFICIAL_SHAPES.record_bytes() / 2**30
    print(
        f"format={args.format} records={args.records} batch={args.batch} workers={args.workers} "
        f"cuda={cuda} host={platform.node()} cpus={os.cpu_count()} load1={os.getloadavg()[0]:.1f}"
    )
    med = statistics.median(rates)
    print(
        f"{args.repeats} x {n_batches * args.batch} samples: median {med:.0f} samples/s ({med * gib:.2f} GiB/s), "
        f"min {min(rates):.0f}, max {max(rates):.0f} [checksum {checksum}]"
    )


if __name__ == "__main__":
    main()
