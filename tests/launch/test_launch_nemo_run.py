"""NeMo-Run launch path (``flux_nemo.launch``): override forwarding, the Slurm sbatch script (dry run, no
cluster) and a real two-process torchrun run through NeMo-Run's LocalExecutor on CPU.

The end-to-end tests run ``tests/launch/app/app.py``, a tiny Hydra app composing this repository's
``conf/launcher`` group and calling ``maybe_launch`` exactly like the recipe does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flux_nemo.launch import maybe_launch
from flux_nemo.launch.executors import job_overrides, topology

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "tests" / "launch" / "app" / "app.py"


def _run_app(args, cwd, out=None, timeout=120):
    env = dict(os.environ, FLUX_NEMO_CONF=str(REPO / "conf"), COLUMNS="100000", CUDA_VISIBLE_DEVICES="")
    if out is not None:
        env["FLUX_NEMO_TEST_OUT"] = str(out)
    proc = subprocess.run(
        [sys.executable, str(APP), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    return text


def _lines(text):
    return [line.strip() for line in text.splitlines()]


def test_job_overrides_drop_launcher_and_forward_the_rest():
    user = [
        "launcher=slurm",
        "launcher.nodes=4",
        "+launcher.extra=1",
        "~launcher.qos",
        "model=tiny",
        "model.axes_dim=[8,28,28]",
        "+model.note='a b'",
        "launcherish=3",
        "system.devices=4",
        "hydra.run.dir=/tmp/x",
    ]
    got = job_overrides(user, {"system.num_nodes": 4, "system.devices": 8})
    assert got == [
        "model=tiny",
        "model.axes_dim=[8,28,28]",
        "+model.note='a b'",
        "launcherish=3",
        "system.devices=4",  # the user's value wins over the launcher's topology
        "hydra.run.dir=/tmp/x",
        "system.num_nodes=4",
        "launcher=none",
    ]


def test_topology_keys_come_from_the_launcher_config():
    lcfg = OmegaConf.create(
        {"nodes": 3, "gpus_per_node": 4, "nodes_key": "system.num_nodes", "gpus_key": None}
    )
    assert topology(lcfg) == {"system.num_nodes": 3}


def test_launcher_none_means_train_here():
    assert maybe_launch(OmegaConf.create({"launcher": {"name": "none"}}), overrides=[]) is False
    assert maybe_launch(OmegaConf.create({"model": {"name": "tiny"}}), overrides=[]) is False


def test_unknown_launcher_is_an_error():
    with pytest.raises(ValueError, match="launcher.name"):
        maybe_launch(OmegaConf.create({"launcher": {"name": "k8s"}}), overrides=[])


def _recipe_checkout(tmp_path) -> Path:
    """A throwaway git checkout: the default code_dir=null ships the committed HEAD with GitArchivePackager."""
    repo = tmp_path / "repo"
    (repo / "recipes").mkdir(parents=True)
    (repo / "recipes" / "flux_schnell.py").write_text("print('recipe')\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=repo, check=True)
    return repo


def test_slurm_allocation_defaults_to_the_system_preset(tmp_path):
    """system=h100_8x8 (8 nodes x 8 GPUs) with launcher=slurm must allocate 8 nodes, not a silent 1."""
    args = ["launcher=slurm", "launcher.dryrun=true", "launcher.account=a", "launcher.container_image=i:1"]
    text = _run_app(
        [*args, "system.num_nodes=8", "system.devices=8", f"launcher.job_dir={tmp_path / 'jobs'}"],
        cwd=_recipe_checkout(tmp_path),
    )
    lines = _lines(text)
    for flag in ["#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"]:
        assert flag in lines, f"{flag!r} not in the sbatch script:\n{text}"


def test_slurm_dryrun_prints_the_sbatch_script(tmp_path):
    repo = _recipe_checkout(tmp_path)
    jobs = tmp_path / "jobs"
    text = _run_app(
        [
            "launcher=slurm",
            "launcher.dryrun=true",
            "launcher.nodes=4",
            "launcher.gpus_per_node=8",
            "launcher.account=my_acct",
            "launcher.partition=batch",
            "launcher.time=01:30:00",
            "launcher.container_image=nvcr.io/acme/flux-nemo:1",
            "launcher.container_mounts=[/lustre/flux1:/dataset,/lustre/logs:/logdir]",
            f"launcher.job_dir={jobs}",
            "model.axes_dim=[8,28,28]",
            "train.max_steps=7",
        ],
        cwd=repo,
    )
    lines = _lines(text)
    for flag in [
        "#SBATCH --account=my_acct",
        "#SBATCH --partition=batch",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=01:30:00",
        "#SBATCH --exclusive",
        "export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
        "export NCCL_IB_SL=1",
        "export NCCL_BUFFSIZE=2097152",
        "export PYTHONPATH=/nemo_run/code",
        "export MASTER_PORT=29500",
    ]:
        assert flag in lines, f"{flag!r} not in the sbatch script:\n{text}"
    srun = [line for line in lines if line.startswith("srun ") and "--container-image" in line]
    assert len(srun) == 1, text
    srun = srun[0]
    assert "--container-image nvcr.io/acme/flux-nemo:1" in srun
    assert "--container-mounts /lustre/flux1:/dataset,/lustre/logs:/logdir," in srun
    assert "--container-workdir /nemo_run/code" in srun
    assert "--mpi=pmix" in srun
    # The job: the recipe with the user's overrides (quoted for bash), the topology, and launcher=none.
    assert srun.endswith(
        "python recipes/flux_schnell.py 'model.axes_dim=[8,28,28]' train.max_steps=7 "
        "system.num_nodes=4 system.devices=8 launcher=none"
    ), srun
    assert "launcher=slurm" not in srun and "launcher.nodes" not in srun
    assert "LAUNCHED" in lines


def test_slurm_executor_modes_and_errors(tmp_path):
    from nemo_run import GitArchivePackager, Packager, SSHTunnel

    from flux_nemo.launch.executors import build_slurm_executor, slurm_script, slurm_script_path

    lcfg = OmegaConf.load(REPO / "conf" / "launcher" / "slurm.yaml")
    lcfg.account, lcfg.container_image, lcfg.job_dir = "acct", "img:1", str(tmp_path)
    lcfg.nodes, lcfg.gpus_per_node = 1, 8  # ${system.*} in the recipe's composed config
    lcfg.code_dir = "/workspace/flux-nemo"
    ex = build_slurm_executor(lcfg)
    assert type(ex.packager) is Packager and "PYTHONPATH" not in ex.env_vars
    assert (ex.nodes, ex.ntasks_per_node, ex.gpus_per_node) == (1, 8, 8)
    assert slurm_script_path(lcfg) == "/workspace/flux-nemo/recipes/flux_schnell.py"
    script = slurm_script(lcfg, ["x='a b'", "launcher=none"])
    assert script.args == ["'x='\"'\"'a b'\"'\"''", "launcher=none"]

    lcfg.code_dir, lcfg.gres = None, "gpu:8"
    ex = build_slurm_executor(lcfg)  # pytest runs inside the flux-nemo checkout
    assert isinstance(ex.packager, GitArchivePackager) and ex.env_vars["PYTHONPATH"] == "/nemo_run/code"
    assert ex.gpus_per_node is None and ex.gres == "gpu:8"

    lcfg.tunnel = "ssh"
    with pytest.raises(ValueError, match="launcher.ssh"):
        build_slurm_executor(lcfg)
    lcfg.ssh.host, lcfg.ssh.user, lcfg.ssh.job_dir = "login.example.org", "me", "/lustre/me/nemo_run"
    assert isinstance(build_slurm_executor(lcfg).tunnel, SSHTunnel)

    lcfg.account = None
    with pytest.raises(ValueError, match="launcher.account"):
        build_slurm_executor(lcfg)


def test_local_launch_runs_torchrun_ranks(tmp_path):
    out = tmp_path / "ranks.jsonl"
    text = _run_app(
        [
            "launcher=local",
            "launcher.gpus_per_node=2",
            f"launcher.script={APP}",
            f"launcher.job_dir={tmp_path / 'jobs'}",
            "model.axes_dim=[8,28,28]",
            "+model.note='a b'",
            "train.max_steps=7",
        ],
        cwd=tmp_path,
        out=out,
    )
    assert "LAUNCHED" in _lines(text)
    records = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["rank"])
    assert [r["rank"] for r in records] == ["0", "1"], text
    for r in records:
        assert r["world_size"] == "2"
        assert r["launcher"] == "none"
        assert r["model"] == {"name": "tiny", "axes_dim": [8, 28, 28], "note": "a b"}
        assert r["max_steps"] == 7
        assert r["system"] == {"num_nodes": 1, "devices": 2}


def test_local_dryrun_prints_torchrun_and_the_job_script(tmp_path):
    text = _run_app(
        [
            "launcher=local",
            "launcher.dryrun=true",
            "launcher.gpus_per_node=4",
            f"launcher.job_dir={tmp_path}",
            "train.max_steps=3",
        ],
        cwd=tmp_path,
    )
    lines = _lines(text)
    # NeMo-Run prints the torchrun AppDef's argument list one item per line.
    args = [line.rstrip(",") for line in lines if line.startswith("'")]
    assert "'--nproc-per-node'" in args, text
    assert args[args.index("'--nproc-per-node'") + 1] == "'4'", text
    assert f"cd {tmp_path}" in lines
    job = [line for line in lines if line.startswith("exec ")]
    assert job == [
        f"exec {sys.executable} {tmp_path / 'recipes' / 'flux_schnell.py'} train.max_steps=3 "
        "system.num_nodes=1 system.devices=4 launcher=none"
    ], text
