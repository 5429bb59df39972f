"""Make a custom RCP (reference convergence point) JSON from converged reference logs.

    python -m flux_nemo.mlperf.rcp --logs <dir or files...> --out rcps.json --name <record> \\
        [--creator ...] [--platform ...] [--precision BF16] [--when ...]

Real submissions are judged against the official RCPs shipped in mlperf-logging
(``rcp_checker/training_6.1.0/rcps_flux1.json``); a custom RCP is for demo / development runs (tiny models,
batch sizes without an official RCP) and for preparing an RCP request to the MLCommons training WG. The
record has the rcp_checker format; every log must be a successful flux1 run with the same global batch size
and hyper-parameters. The checker takes the olympic mean of ``samples to converge``; official RCPs use
2 x 10 = 20 runs. See docs/MLPERF.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flux_nemo.mlperf import constants as C
from flux_nemo.mlperf.package import HPARAM_KEYS, PackageError, collect_logs, parse_log

MIN_RUNS = 3  # the olympic mean drops one run at each end


def make_rcp(
    logs: list[str],
    name: str,
    *,
    creator: str,
    platform: str,
    precision: str = "BF16",
    when: str = "custom RCP (not an official MLCommons RCP)",
) -> dict:
    runs = [parse_log(f) for f in collect_logs(logs)]
    if len(runs) < MIN_RUNS:
        raise PackageError(
            f"an RCP needs at least {MIN_RUNS} converged runs (official ones use 20), got {len(runs)}"
        )
    for r in runs:
        if r.benchmark != C.BENCHMARK or r.stop_status != "success" or r.samples is None:
            raise PackageError(
                f"{r.source}: not a converged {C.BENCHMARK} run (run_stop status {r.stop_status!r})"
            )
        missing = [k for k in HPARAM_KEYS if k not in r.hparams]
        if missing:
            raise PackageError(f"{r.source}: missing {missing}")
    for what, values in (("global_batch_size", {r.gbs for r in runs}),
                         ("hyper-parameters", {json.dumps(r.hparams, sort_keys=True) for r in runs})):  # fmt: skip
        if len(values) != 1:
            raise PackageError(f"the reference logs disagree on {what}: {sorted(map(str, values))}")
    return {
        name: {
            "Benchmark": C.BENCHMARK,
            "Creator": creator,
            "When": when,
            "Platform": platform,
            "Precision": precision,
            "BS": runs[0].gbs,
            "Hyperparams": {k: runs[0].hparams[k] for k in HPARAM_KEYS},
            "samples to converge": [r.samples for r in runs],
        }
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flux_nemo.mlperf.rcp", description=__doc__.split("\n")[0])
    p.add_argument("--logs", nargs="+", required=True, help="converged reference run logs and/or folders")
    p.add_argument("--out", required=True, type=Path, help="RCP JSON to write")
    p.add_argument("--name", required=True, help="record name, e.g. flux1_tiny_16")
    p.add_argument("--creator", default="flux-nemo")
    p.add_argument("--platform", default="unspecified")
    p.add_argument("--precision", default="BF16")
    p.add_argument("--when", default="custom RCP (not an official MLCommons RCP)")
    a = p.parse_args(argv)
    try:
        rcp = make_rcp(
            a.logs, a.name, creator=a.creator, platform=a.platform, precision=a.precision, when=a.when
        )
    except PackageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a.out.write_text(json.dumps(rcp, indent=2) + "\n")
    rec = rcp[a.name]
    print(
        f"wrote {a.out}: BS {rec['BS']}, {len(rec['samples to converge'])} runs, samples {rec['samples to converge']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
