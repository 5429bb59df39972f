"""Build NeMo-Run executors and the job script from the ``launcher`` config group.

Nothing here submits anything; :func:`flux_nemo.launch.maybe_launch` does. ``nemo_run`` is imported lazily,
so that ``launcher=none`` (every training process) never pays for it.

Quoting: NeMo-Run 0.11.1 pastes ``Script.args`` into the sbatch script *unquoted* when no launcher is set,
and ``shlex.quote``s them for its torchrun launcher even when the local scheduler passes them to ``Popen``
without a shell (so ``model.x=[1,2]`` would arrive with literal quotes). We therefore hand it

* on Slurm (one srun task per GPU, no torchrun): a path script whose args we quote ourselves,
* locally (torchrun launcher): an inline bash script holding the quoted command, run with ``--no-python``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

#: container path where NeMo-Run mounts the job directory (``nemo_run.config.RUNDIR_NAME``)
RUNDIR = "/nemo_run"
#: where GitArchivePackager extracts the committed tree inside the container
PACKAGED_CODE_DIR = f"{RUNDIR}/code"
LAUNCHER_GROUP = "launcher"


def job_overrides(task_overrides: list[str], topology: dict[str, int] | None = None) -> list[str]:
    """The user's Hydra overrides for the job itself: drop every ``launcher`` one, then add ``launcher=none``.

    The job must train, not launch again, and ``launcher.nodes=...`` would not exist under ``launcher=none``.
    Overrides are parsed with Hydra's own parser, so ``+launcher.x=1``, ``~launcher`` and ``launcher/foo``
    forms are recognised as well. ``topology`` (e.g. ``{"system.num_nodes": 4, "system.devices": 8}``) is
    appended as ``key=value`` for every key the user did not set explicitly, so that the trainer's world
    matches the allocation.
    """
    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    kept, user_keys = [], set()
    for override in parsed:
        key = override.key_or_group
        if key == LAUNCHER_GROUP or key.startswith((LAUNCHER_GROUP + ".", LAUNCHER_GROUP + "/")):
            continue
        kept.append(override.input_line)
        user_keys.add(key)
    extra = [f"{k}={v}" for k, v in (topology or {}).items() if k not in user_keys]
    return kept + extra + [f"{LAUNCHER_GROUP}=none"]


def topology(lcfg: DictConfig) -> dict[str, int]:
    """``{launcher.nodes_key: nodes, launcher.gpus_key: gpus_per_node}``; a null key is not forwarded."""
    out = {}
    if lcfg.get("nodes_key"):
        out[str(lcfg.nodes_key)] = int(lcfg.get("nodes", 1))
    if lcfg.get("gpus_key"):
        out[str(lcfg.gpus_key)] = int(lcfg.gpus_per_node)
    return out


def training_command(script: str, overrides: list[str], python: str = "python") -> str:
    """The shell command one training process runs, every argument quoted for bash."""
    return shlex.join([python, script, *overrides])


def _as_dict(node: Any) -> dict[str, str]:
    if node is None:
        return {}
    return {str(k): str(v) for k, v in OmegaConf.to_container(node, resolve=True).items() if v is not None}


def _as_list(node: Any) -> list[str]:
    if node is None:
        return []
    return [str(v) for v in OmegaConf.to_container(node, resolve=True)]


def job_dir(lcfg: DictConfig) -> str:
    return os.path.abspath(os.path.expanduser(str(lcfg.job_dir)))


def _tunnel(lcfg: DictConfig):
    import nemo_run as run

    if lcfg.tunnel == "local":
        return run.LocalTunnel(job_dir=job_dir(lcfg))
    if lcfg.tunnel == "ssh":
        ssh = lcfg.ssh
        if not ssh.host or not ssh.user or not ssh.job_dir:
            raise ValueError(
                "launcher.tunnel=ssh needs launcher.ssh.host, launcher.ssh.user, launcher.ssh.job_dir"
            )
        return run.SSHTunnel(host=ssh.host, user=ssh.user, job_dir=ssh.job_dir, identity=ssh.identity)
    raise ValueError(f"launcher.tunnel must be 'local' or 'ssh', got {lcfg.tunnel!r}")


def _require_git_checkout() -> None:
    """NeMo-Run's GitArchivePackager archives the git repository of the *current directory*."""
    probe = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise ValueError(
            f"launcher.code_dir is null, so NeMo-Run would `git archive` the repository of the current directory "
            f"({os.getcwd()}), but that is not a git checkout: run from the flux-nemo checkout, or set "
            "launcher.code_dir to the code's path inside the container (e.g. /workspace/flux-nemo)"
        )


def slurm_script_path(lcfg: DictConfig) -> str:
    """Recipe path as seen by the job: relative to the packaged tree, or inside ``launcher.code_dir``."""
    if lcfg.code_dir:
        return os.path.join(str(lcfg.code_dir), str(lcfg.script))
    return str(lcfg.script)


def build_slurm_executor(lcfg: DictConfig):
    """A ``nemo_run.SlurmExecutor``: one srun task per GPU (``ntasks_per_node = gpus_per_node``), pyxis container.

    Code: with ``launcher.code_dir: null`` NeMo-Run's ``GitArchivePackager`` ships the *committed* HEAD of this
    repository into the job directory (mounted at ``/nemo_run``) and the job runs from ``/nemo_run/code`` with
    it on ``PYTHONPATH``; otherwise nothing is shipped and the recipe under ``code_dir`` in the image is run.
    """
    import nemo_run as run

    if not lcfg.account:
        raise ValueError("launcher=slurm needs launcher.account (or the SLURM_ACCOUNT environment variable)")
    if not lcfg.container_image:
        raise ValueError("launcher=slurm needs launcher.container_image (or the CONT environment variable)")
    gpus = int(lcfg.gpus_per_node)
    env = _as_dict(lcfg.env_vars)
    if lcfg.code_dir:
        packager = run.Packager()
    else:
        _require_git_checkout()
        packager = run.GitArchivePackager()
        env.setdefault("PYTHONPATH", PACKAGED_CODE_DIR)
    # Exported in the batch script (which runs outside the container, where scontrol exists) and inherited
    # by every srun task: the rendezvous address for torch.distributed / Lightning's SLURMEnvironment.
    setup = [
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_ADDR",
        f"export MASTER_PORT={int(lcfg.master_port)}",
    ]
    if lcfg.setup_lines:
        setup += [str(line) for line in lcfg.setup_lines]
    return run.SlurmExecutor(
        account=str(lcfg.account),
        partition=lcfg.partition,
        qos=lcfg.qos,
        job_name_prefix=f"{lcfg.job_name_prefix}",
        nodes=int(lcfg.nodes),
        ntasks_per_node=gpus,
        gpus_per_node=None if lcfg.gres else gpus,
        gres=lcfg.gres,
        cpus_per_task=lcfg.cpus_per_task,
        mem=lcfg.mem,
        exclusive=bool(lcfg.exclusive) or None,
        network=lcfg.network,
        time=str(lcfg.time),
        container_image=str(lcfg.container_image),
        container_mounts=_as_list(lcfg.container_mounts),
        srun_args=_as_list(lcfg.srun_args),
        # NeMo-Run writes ``export KEY=value`` without quoting: quote values here.
        env_vars={k: shlex.quote(v) for k, v in env.items()},
        setup_lines="\n".join(setup),
        tunnel=_tunnel(lcfg),
        packager=packager,
    )


def slurm_script(lcfg: DictConfig, overrides: list[str]):
    """The ``nemo_run.Script`` of one Slurm task: ``python <recipe> <quoted overrides>``."""
    import nemo_run as run

    return run.Script(
        path=shlex.quote(slurm_script_path(lcfg)),
        args=[shlex.quote(o) for o in overrides],
        entrypoint=str(lcfg.python),
    )


def build_local_executor(lcfg: DictConfig):
    """A ``nemo_run.LocalExecutor`` with the torchrun launcher: ``nproc_per_node = launcher.gpus_per_node``."""
    import nemo_run as run

    env = _as_dict(lcfg.env_vars)
    # torchx's local scheduler prepends a role's PATH to ours: make the running interpreter's torchrun win,
    # so `.venv/bin/python recipes/flux_schnell.py launcher=local` works without activating the venv.
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = f"{bindir}:{env['PATH']}" if "PATH" in env else bindir
    return run.LocalExecutor(
        ntasks_per_node=int(lcfg.gpus_per_node),
        launcher=run.Torchrun(rdzv_port=int(lcfg.master_port)),
        env_vars=env,
    )


def local_script(lcfg: DictConfig, overrides: list[str]):
    """The ``nemo_run.Script`` torchrun runs on every local rank: a bash script that execs the recipe."""
    import nemo_run as run

    script = os.path.abspath(str(lcfg.script))
    python = sys.executable if lcfg.python == "python" else str(lcfg.python)
    command = training_command(script, overrides, python=python)
    return run.Script(inline=f"cd {shlex.quote(os.getcwd())}\nexec {command}\n", entrypoint="bash")
