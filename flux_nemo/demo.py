"""``make demo``: train the tiny Flux on synthetic data (official format) to the MLPerf target, check the log.

    python -m flux_nemo.demo [extra Hydra overrides ...]

Runs exactly the recipe's code path (``conf/`` composed with the overrides below, then
``flux_nemo.training.run``) on CPU, or on a GPU when present. It honours the MLPerf cadence: an evaluation over
the whole eval set every 262,144 training samples (GBS 1024 -> every 256 steps), stopping at the first validation
loss <= 0.586. The data and model are small (4 T5 tokens of width 16, CLIP width 16, 4x4x4 latents = 4 image
tokens, hidden 32, one double and one single block) so that 262,144 samples take about a minute on 2 CPU cores. Writes ``results/demo/flux1/result_0.txt`` and runs the
MLPerf 6.1.0 compliance checker on it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import flux_nemo.training.config  # noqa: F401  (registers the structured schema)

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("results/demo")
RESULT = OUT / "flux1" / "result_0.txt"
DATA = OUT / "data"

OVERRIDES = [
    "model=tiny",
    "model.in_channels=16",
    "model.context_in_dim=16",
    "model.vec_in_dim=16",
    "model.hidden_size=32",
    "model.num_attention_heads=1",
    "model.axes_dim=[4,14,14]",
    "model.num_double_blocks=1",
    "model.num_single_blocks=1",
    "data=synthetic",
    "data.t5_len=4",
    "data.latent_size=4",
    "data.num_workers=0",
    f"data.train_path={DATA}/train",
    f"data.eval_path={DATA}/eval",
    f"data.empty_encodings_path={DATA}/empty_encodings",
    "data.synthetic.num_train=65536",
    "data.synthetic.num_eval=2048",
    "train.global_batch_size=1024",
    "train.micro_batch_size=1024",
    "train.eval_micro_batch_size=1024",
    "train.max_steps=2048",
    "train.lr=2e-3",
    "train.warmup_steps=20",
    "train.log_every_n_steps=32",
    "train.eval_every_samples=262144",
    "mlperf.submission_org=flux-nemo-demo",
    f"mlperf.log_file={RESULT}",
    f"exp_manager.exp_dir={OUT}/nemo_experiments",
    "exp_manager.create_checkpoint_callback=false",
]


def _system_overrides() -> list[str]:
    if torch.cuda.is_available():
        return ["system=h100_1x8", "system.devices=1", "system.platform=1xGPU-demo", "precision=bf16"]
    return ["system=cpu", "system.platform=cpu-demo", "precision=fp32"]


def compliance_check(log_file: Path) -> bool:
    """Run the official MLPerf compliance checker (training, ruleset 6.1.0) on ``log_file``."""
    cmd = [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training"]
    cmd += ["--ruleset", "6.1.0", str(log_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout[-2000:] + proc.stderr[-2000:])
    return proc.returncode == 0 and "SUCCESS" in proc.stdout + proc.stderr


def fresh_log_file(cfg) -> Path:
    """The run's MLPerf log (``mlperf.log_file``), which must not hold an earlier run: the demo's own default is
    replaced; an existing file given as an override is refused rather than deleted or appended to."""
    log_file = Path(cfg.mlperf.log_file)
    if log_file.resolve() == RESULT.resolve():
        RESULT.unlink(missing_ok=True)
    elif log_file.exists():
        raise SystemExit(
            f"mlperf.log_file={log_file} already exists: an MLPerf result log holds one run; "
            "remove it or choose another path"
        )
    return log_file


def main(argv: list[str] | None = None) -> int:
    overrides = OVERRIDES + _system_overrides() + list(sys.argv[1:] if argv is None else argv)
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("flux_schnell", overrides=overrides)
    log_file = fresh_log_file(cfg)
    if Path(cfg.exp_manager.exp_dir).resolve() == (OUT / "nemo_experiments").resolve():
        shutil.rmtree(OUT / "nemo_experiments", ignore_errors=True)  # the demo's own, from its last run
    from flux_nemo.training.run import run

    start = time.time()
    result = run(cfg, config_filename="conf/flux_schnell.yaml + flux_nemo/demo.py overrides")
    wall = time.time() - start
    ok = compliance_check(log_file)
    print("=" * 100)
    print(
        f"flux1 demo: status {result.status}, {result.steps} steps, evaluations (samples, val loss): {result.evals}"
    )
    final = f"{result.final_eval:.4f}" if result.final_eval is not None else "n/a"
    print(
        f"time to train (run_start -> run_stop): {result.time_to_train_s:.1f} s; final validation loss {final}"
    )
    print(f"total wall time incl. data/init/warmup: {wall:.1f} s; MLPerf log {log_file}; compliance: {ok}")
    return 0 if ok and result.status == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
