"""Launch the recipe anywhere through NeMo-Run: ``launcher=none | local | slurm``.

The recipe calls :func:`maybe_launch` right after Hydra composed its config::

    @hydra.main(config_path="../conf", config_name="flux_schnell", version_base=None)
    def main(cfg):
        if maybe_launch(cfg):
            return          # a job was submitted (or printed): this process does not train
        ...train...

``launcher=none`` (the default) means "this process is the job": ``maybe_launch`` returns False at once and
imports nothing. Otherwise it builds a NeMo-Run executor from ``cfg.launcher`` and runs (or, with
``launcher.dryrun=true``, prints) the job ``python recipes/flux_schnell.py <the user's overrides> launcher=none``.
"""

from __future__ import annotations

from omegaconf import DictConfig

__all__ = ["maybe_launch", "user_overrides"]


def user_overrides() -> list[str]:
    """The running Hydra app's command-line overrides, as typed: ``HydraConfig.get().overrides.task``, then the
    user's ``hydra.*`` ones (e.g. ``hydra.run.dir=...``; Hydra's own ``hydra.mode`` is left out)."""
    from hydra.core.hydra_config import HydraConfig

    overrides = HydraConfig.get().overrides
    return list(overrides.task) + [o for o in overrides.hydra if not o.startswith("hydra.mode=")]


def maybe_launch(cfg: DictConfig, overrides: list[str] | None = None) -> bool:
    """Submit the training job described by ``cfg.launcher``; False when we are the job (``launcher=none``).

    ``overrides`` defaults to the running Hydra app's task overrides; pass them explicitly outside Hydra.
    Returns True after submitting (Slurm, detached by default), after a local run finished (local waits and
    streams the logs unless ``launcher.detach=true``), or after printing the job in dry-run mode.
    """
    lcfg = cfg.get("launcher")
    name = str(lcfg.get("name") or "none") if lcfg else "none"
    if name == "none":
        return False
    if name not in ("local", "slurm"):
        raise ValueError(f"launcher.name must be none, local or slurm, got {name!r}")

    import nemo_run as run

    from flux_nemo.launch import executors

    user = user_overrides() if overrides is None else overrides
    job_args = executors.job_overrides(user, executors.topology(lcfg))
    if name == "slurm":
        executor = executors.build_slurm_executor(lcfg)
        script = executors.slurm_script(lcfg, job_args)
    else:
        executor = executors.build_local_executor(lcfg)
        script = executors.local_script(lcfg, job_args)

    with run.Experiment(str(lcfg.experiment), executor=executor, base_dir=executors.job_dir(lcfg)) as exp:
        exp.add(script, name=str(lcfg.job_name), tail_logs=not lcfg.detach)
        if lcfg.dryrun:
            exp.dryrun()
            # With the Slurm executor the sbatch script above already holds the training command; the local
            # torchrun job runs an inline script, so show what it executes.
            if name == "local":
                print("=== job script (run by torchrun on every rank) ===")
                print(script.inline)
            return True
        exp.run(detach=bool(lcfg.detach), tail_logs=not lcfg.detach)
    return True
