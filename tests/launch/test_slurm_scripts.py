"""Plain-Slurm path (``slurm/run.sub`` + ``slurm/run_and_time.sh``): syntax, shellcheck, and the DRYRUN=1
command sequence with fake paths (no Slurm needed)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [REPO / "slurm" / "run.sub", REPO / "slurm" / "run_and_time.sh"]


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        DRYRUN="1",
        DATAROOT="/lustre/flux1/data",
        MODELROOT="/lustre/flux1/models",
        LOGDIR=str(tmp_path / "logs"),
        CONT="registry.example.org/flux-nemo:1",
    )
    env.update(extra)
    return env


def _run_sub(tmp_path, **extra):
    return subprocess.run(
        ["bash", str(SCRIPTS[0])], env=_env(tmp_path, **extra), capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    proc = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_dryrun_runs_nexp_runs_with_cache_drop_training_and_compliance(tmp_path):
    proc = _run_sub(
        tmp_path,
        NEXP="3",
        SEED="100",
        DGXNNODES="2",
        DGXNGPU="4",
        DGXSYSTEM="sys_a",
        MOUNTS="/scratch:/scratch",
        CONFIG="system=h100_8x8 train.global_batch_size=1024",
        ENABLE_CHECKPOINTING="1",
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    # Per run: drop caches, training srun, (dry-run only) the task's command, compliance checker.
    assert len(lines) == 3 * 4, proc.stdout
    mounts = (
        r"/lustre/flux1/data:/dataset\,/lustre/flux1/models:/models\,"
        + str(tmp_path / "logs")
        + r":/logdir\,/scratch:/scratch"
    )
    for i in range(3):
        drop, train, task, check = lines[4 * i : 4 * i + 4]
        assert drop.startswith("+ srun --nodes=2 --ntasks-per-node=1 --mpi=none bash -c ")
        assert "drop_caches" in drop
        assert train.startswith("+ srun --nodes=2 --ntasks-per-node=4 --mpi=pmix ")
        assert "--container-image=registry.example.org/flux-nemo:1" in train
        assert f"--container-mounts={mounts}" in train
        assert train.endswith("bash /workspace/flux-nemo/slurm/run_and_time.sh")
        result = f"/logdir/results/sys_a/flux1/result_{i}.txt"
        assert task.startswith("+ python -u /workspace/flux-nemo/recipes/flux_schnell.py launcher=none ")
        for arg in [
            "data.train_path=/dataset/cc12m_preprocessed",
            "data.eval_path=/dataset/coco_preprocessed",
            "data.empty_encodings_path=/dataset/empty_encodings",
            "system.num_nodes=2",
            "system.devices=4",
            f"train.seed={100 + i}",
            f"mlperf.log_file={result}",
        ]:
            assert f" {arg} " in task, (arg, task)
        assert task.endswith(" system=h100_8x8 train.global_batch_size=1024")
        assert "create_checkpoint_callback=false" not in task  # ENABLE_CHECKPOINTING=1
        assert check.startswith("+ srun --nodes=1 --ntasks=1 ")
        assert "python -m mlperf_logging.compliance_checker --usage training --ruleset 6.1.0" in check
        assert f"--log_output /logdir/compliance/compliance_{i}.log " in check  # not among the results
        assert check.endswith(result)
    assert (tmp_path / "logs" / "results" / "sys_a" / "flux1").is_dir()


def test_default_seeds_are_random_per_run_and_checkpointing_off(tmp_path):
    proc = _run_sub(tmp_path, NEXP="4")
    assert proc.returncode == 0, proc.stderr
    seeds = [int(s) for s in re.findall(r" train\.seed=(\d+) ", proc.stdout)]
    assert len(seeds) == 4 and len(set(seeds)) == 4, proc.stdout
    assert proc.stdout.count("exp_manager.create_checkpoint_callback=false") == 4
    assert "results/flux-nemo_1x8/flux1/result_3.txt" in proc.stdout  # default system name: nodes x GPUs


def test_missing_required_variable_fails(tmp_path):
    env = _env(tmp_path)
    del env["CONT"]
    proc = subprocess.run(["bash", str(SCRIPTS[0])], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "CONT" in proc.stderr


def test_existing_result_file_is_never_appended_to(tmp_path):
    results = tmp_path / "logs" / "results" / "sys_b" / "flux1"
    results.mkdir(parents=True)
    (results / "result_1.txt").write_text(":::MLLOG {}\n")
    proc = _run_sub(tmp_path, NEXP="2", DGXSYSTEM="sys_b")
    assert proc.returncode != 0 and "result_1.txt exists" in proc.stderr
    assert "+ srun" not in proc.stdout
