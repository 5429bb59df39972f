"""Convergence sanity: BF16 and FP8 loss curves of the demo's tiny Flux on the same synthetic data.

Runs the recipe (``flux_nemo.demo``'s configuration, so the same data, model and MLPerf cadence) for a fixed
number of steps with the target disabled, once per (precision, seed), and prints the training loss every
``--every`` steps and the validation loss at each 262,144-sample evaluation, read back from the MLPerf logs.

    python bench/convergence.py --runs bf16:1 bf16:2 fp8_delayed:1 fp8_current:1 --steps 768 --gpus 4
    python bench/convergence.py --runs fp8_current:1 fp8_current+graph:1 --steps 512 --gpus 2

A run is ``precision[+option...]:seed``: ``graph`` (``parallel.cuda_graph=full_iteration``) or an option of
``bench/options.py`` (``paopt``, ``bf16adam``, ``bf16grad``, ...). Several runs may share one GPU:
``CUDA_VISIBLE_DEVICES=0,0 ... --gpus 2``.

All runs use the same layer implementation (``--backend``, Transformer Engine by default since FP8 needs it), so
the curves differ only by precision and seed. With ``--gpus N`` up to N runs go at once, one GPU each; every run
writes its own copy of the (deterministic, identical) synthetic data and its own NeMo experiment directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.options import OPTIONS as RECIPE_OPTIONS  # noqa: E402

OPTIONS = {"graph": ["parallel.cuda_graph=full_iteration"], **RECIPE_OPTIONS}


def read_log(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(step -> train loss, samples -> eval loss) from an MLPerf result log."""
    train, evals = {}, {}
    for line in path.read_text().splitlines():
        if ":::MLLOG " not in line:
            continue
        event = json.loads(line.split(":::MLLOG ", 1)[1])
        if event["key"] == "tracked_stats":
            train[event["metadata"]["step"]] = event["value"]["train_loss"]
        elif event["key"] == "eval_accuracy":
            evals[event["metadata"]["samples_count"]] = event["value"]
    return train, evals


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", default=["bf16:1", "bf16:2", "fp8_delayed:1"])
    parser.add_argument("--steps", type=int, default=768)
    parser.add_argument("--out", type=Path, default=Path("results/convergence"))
    parser.add_argument("--backend", default="te", choices=["te", "local"], help="layers of every run")
    parser.add_argument("--gpus", type=int, default=0, help="run this many at once, one GPU each")
    args = parser.parse_args()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(args.gpus)]
    runs = {}
    for i, run in enumerate(args.runs):
        variant, seed = run.split(":")
        precision, *options = variant.split("+")
        if any(o not in OPTIONS for o in options):
            parser.error(f"--runs {run}: expected precision[+option...]:seed, options from {list(OPTIONS)}")
        work = args.out / f"{variant}_{seed}"
        log = args.out / f"{variant}_{seed}.txt"
        log.unlink(missing_ok=True)
        overrides = [
            f"precision={precision}", f"train.seed={seed}", f"train.max_steps={args.steps}",
            "mlperf.target=0.0", f"mlperf.log_file={log}", f"model.backend={args.backend}",
            f"data.train_path={work}/data/train", f"data.eval_path={work}/data/eval",
            f"data.empty_encodings_path={work}/data/empty_encodings", f"exp_manager.exp_dir={work}/nemo",
        ] + [o for option in options for o in OPTIONS[option]]  # fmt: skip
        env = os.environ | {"MASTER_PORT": str(29500 + i)}  # concurrent runs: one rendezvous port each
        if args.gpus:  # the i-th run takes the (i mod N)-th of the visible GPUs
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % args.gpus]
        if args.gpus and i >= args.gpus:
            list(runs.values())[i - args.gpus][0].wait()  # one run per GPU at a time
        proc = subprocess.Popen([sys.executable, "-m", "flux_nemo.demo", *overrides], cwd=ROOT, env=env)
        runs[run] = (proc, log)
        if not args.gpus:
            proc.wait()
    curves = {}
    for run, (proc, log) in runs.items():
        proc.wait()
        if not log.exists():
            sys.exit(f"run {run} wrote no MLPerf log (exit status {proc.returncode})")
        curves[run] = read_log(log)
    steps = sorted(set().union(*(c[0] for c in curves.values())))
    print("\ntrain loss (MLPerf tracked_stats)\nstep " + "".join(f"{r:>16}" for r in curves))
    for step in steps:
        print(f"{step:>4} " + "".join(f"{c[0].get(step, float('nan')):>16.4f}" for c in curves.values()))
    samples = sorted(set().union(*(c[1] for c in curves.values())))
    print("\nvalidation loss (eval_accuracy)\nsamples " + "".join(f"{r:>16}" for r in curves))
    for n in samples:
        print(f"{n:>7} " + "".join(f"{c[1].get(n, float('nan')):>16.4f}" for c in curves.values()))


if __name__ == "__main__":
    main()
