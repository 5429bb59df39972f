"""Checkpoints of a Flux training run, written and read through the strategy (``save_checkpoint`` /
``load_checkpoint``) so that NeMo's checkpoint callback and ``exp_manager``'s ``resume_if_exists`` drive them.

A checkpoint is the directory ``ckpt_to_dir(<name>.ckpt)`` (NeMo's layout for distributed checkpoints, which
``resume_if_exists`` looks for). It holds the network weights, the optimizer state, per-rank state (torch / CUDA /
Megatron-tracker RNG states and the train-loader position) and Lightning's own state (global step, loop progress,
callbacks).

* GPU: a Megatron distributed checkpoint (``megatron.core.dist_checkpointing``): the model's
  ``sharded_state_dict`` (tensor-parallel shards, each written once), the Megatron optimizer's
  ``sharded_state_dict``, per-rank state as a ``ShardedObject``, Lightning's state as common state.
* CPU (one process): ``state.pt`` in the same directory. Megatron's ``torch_dist`` save strategy is CUDA-only in
  megatron-core 0.16.1 (``FileSystemWriterAsync.preload_tensors`` calls ``torch.cuda.synchronize()``
  unconditionally), so the CPU path stores the same content with ``torch.save``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from nemo.utils.model_utils import ckpt_to_dir

from flux_nemo.shims import loadable_optimizer_state

log = logging.getLogger(__name__)

_LIGHTNING_TENSOR_KEYS = ("state_dict", "optimizer_states")
_CPU_FILE = "state.pt"


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rng_state() -> dict:
    """Every RNG the training step draws from (per rank: data-parallel ranks use different seeds).

    Megatron tracker states are byte tensors (copies). A graph-safe tracker (``parallel.cuda_graph``) holds live
    ``torch.Generator`` objects instead, whose state is copied out with ``get_state``.
    """
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
        state["tracker"] = {
            name: s.get_state() if isinstance(s, torch.Generator) else s for name, s in tracker.items()
        }
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        tracker = tensor_parallel.get_cuda_rng_tracker()
        live = tracker.get_states()
        if any(isinstance(s, torch.Generator) for s in live.values()):
            for name, saved in state["tracker"].items():  # in place: CUDA graphs registered these generators
                live[name].set_state(saved.get_state() if isinstance(saved, torch.Generator) else saved)
        else:
            tracker.set_states({**live, **state["tracker"]})
        missing = sorted(set(live) - set(state["tracker"]))
        if missing:  # e.g. a checkpoint from before the training draws had their own stream (training/rng.py)
            log.warning(
                "RNG state without tracker states %s: they continue from their current state, not the saved run's",
                missing,
            )


def _rank_state(module) -> dict:
    gbs = int(module.cfg.train.global_batch_size)
    return {"rng": rng_state(), "train_loader": module.train_loader_state(), "global_batch_size": gbs}


def _restore_rank_state(module, state: dict) -> None:
    saved, gbs = state.get("global_batch_size"), int(module.cfg.train.global_batch_size)
    if (
        saved is not None and saved != gbs
    ):  # step x GBS is the MLPerf samples_count, the LR schedule is per step
        raise ValueError(
            f"train.global_batch_size={gbs}, but the checkpoint was trained with {saved}: resume with "
            f"train.global_batch_size={saved}"
        )
    set_rng_state(state["rng"])
    module.loader_state = state["train_loader"]


def _lightning_state(checkpoint: dict) -> dict:
    return {k: v for k, v in checkpoint.items() if k not in _LIGHTNING_TENSOR_KEYS}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Flux network inside Megatron's DDP / Float16Module wrappers (their ``.module``)."""
    while not hasattr(model, "double_blocks") and hasattr(model, "module"):
        model = model.module
    return model


def megatron_sharded_state_dict(strategy, checkpoint: dict | None, is_loading: bool) -> dict:
    """The run's sharded state for ``dist_checkpointing`` (GPU path); keys are the Flux parameter names."""
    module = strategy.lightning_module
    rank, world = _rank_world()
    model_sd = unwrap(module.flux).sharded_state_dict()
    state = {
        "model": model_sd,
        # 'dp_reshardable': one ShardedTensor per optimizer buffer (parallel save/load, reshardable over DP);
        # Megatron's default ('fully_sharded_model_space') uses flattened ranges that its own saver now refuses.
        "optimizer": strategy.optimizers[0].sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
        ),
        "rank_state": ShardedObject("rank_state", _rank_state(module), (world,), (rank,), replica_id=0),
    }
    if checkpoint is not None:
        state["lightning"] = _lightning_state(checkpoint)
    return state


def save(strategy, checkpoint: dict, filepath) -> None:
    """Write the run's state to ``ckpt_to_dir(filepath)`` (every rank takes part)."""
    path = ckpt_to_dir(filepath)
    rank, _ = _rank_world()
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    if strategy.megatron:
        dist_checkpointing.save(megatron_sharded_state_dict(strategy, checkpoint, False), str(path))
        return
    module = strategy.lightning_module
    state = {
        "model": unwrap(module.flux).state_dict(),
        "optimizer": strategy.optimizers[0].state_dict(),
        "rank_state": _rank_state(module),
        "lightning": _lightning_state(checkpoint),
    }
    torch.save(state, path / _CPU_FILE)


def load(strategy, checkpoint_path) -> dict:
    """Restore model, optimizer and per-rank state in place; return Lightning's part (step, loops, callbacks)."""
    path = Path(checkpoint_path)
    path = path if path.is_dir() else ckpt_to_dir(path)
    module = strategy.lightning_module
    if strategy.megatron:
        if not (path / "metadata.json").exists():
            raise FileNotFoundError(f"not a Megatron distributed checkpoint (no metadata.json): {path}")
        state = dist_checkpointing.load(megatron_sharded_state_dict(strategy, None, True), str(path))
        strategy.optimizers[0].load_state_dict(loadable_optimizer_state(state["optimizer"]))
    else:
        if not (path / _CPU_FILE).exists():
            raise FileNotFoundError(f"not a flux-nemo CPU checkpoint (no {_CPU_FILE}): {path}")
        state = torch.load(path / _CPU_FILE, map_location="cpu", weights_only=False)
        strategy.optimizers[0].load_state_dict(state["optimizer"])
    unwrap(module.flux).load_state_dict(state["model"], strict=True)
    _restore_rank_state(module, state["rank_state"])
    return {**state["lightning"], "optimizer_states": []}


def remove(strategy, filepath) -> None:
    """Delete a checkpoint directory (rank 0), as the checkpoint callback's top-k bookkeeping asks."""
    path = ckpt_to_dir(filepath)
    if _rank_world()[0] == 0 and path.exists():
        shutil.rmtree(path)
    if dist.is_initialized():
        dist.barrier()
