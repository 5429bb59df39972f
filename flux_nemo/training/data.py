"""Training-side glue to ``flux_nemo.data``: record shapes from the model, loaders per dp rank, synthetic data."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from megatron.core import parallel_state
from omegaconf import DictConfig

from flux_nemo.data import RecordShapes, build_eval_loader, build_train_loader, load_empty_encodings
from flux_nemo.training.config import check_data_kind

log = logging.getLogger(__name__)


def record_shapes(cfg: DictConfig, model_config) -> RecordShapes:
    """Per-sample shapes the model needs: T5 dim = ``model.context_in_dim``, CLIP dim = ``model.vec_in_dim``,
    latent channels = ``model.in_channels / 4``; token count and latent size from ``data.t5_len`` / ``latent_size``."""
    return RecordShapes.for_model(
        context_in_dim=model_config.context_in_dim,
        vec_in_dim=model_config.vec_in_dim,
        in_channels=model_config.in_channels,
        t5_len=cfg.data.t5_len,
        latent_size=cfg.data.latent_size,
    )


def ensure_synthetic_data(cfg: DictConfig, shapes: RecordShapes) -> None:
    """``data=synthetic``: write the data once (rank 0) where ``data.*_path`` point, if it is not there yet."""
    from flux_nemo.data.synthetic import write_synthetic

    paths = [Path(cfg.data.train_path), Path(cfg.data.eval_path), Path(cfg.data.empty_encodings_path)]
    if all(p.exists() for p in paths):
        return
    root = paths[0].parent
    expected = [root / "train", root / "eval", root / "empty_encodings"]
    if paths != expected:
        raise ValueError(
            f"data=synthetic writes <dir>/train, <dir>/eval and <dir>/empty_encodings; data.train_path, "
            f"data.eval_path, data.empty_encodings_path must follow that layout (got {[str(p) for p in paths]})"
        )
    syn = cfg.data.synthetic
    log.info(
        "writing synthetic data (%d train, %d eval, %s) to %s", syn.num_train, syn.num_eval, shapes, root
    )
    write_synthetic(root, syn.num_train, syn.num_eval, shapes, seed=syn.seed)


def load_empty(cfg: DictConfig, model_config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty-prompt encodings (CFG dropout) on ``device``; their shapes must match the model and data config."""
    t5, clip = load_empty_encodings(cfg.data.empty_encodings_path)
    expected = {
        "data.t5_len": (t5.shape[1], cfg.data.t5_len),
        "model.context_in_dim (T5 width)": (t5.shape[2], model_config.context_in_dim),
        "model.vec_in_dim (CLIP width)": (clip.shape[1], model_config.vec_in_dim),
    }
    for name, (found, want) in expected.items():
        if found != want:
            raise ValueError(
                f"data in {cfg.data.empty_encodings_path} does not match the config: {name} is {want} but the "
                f"data has {found} (t5_empty {tuple(t5.shape)}, clip_empty {tuple(clip.shape)})"
            )
    return t5.to(device), clip.to(device)


def build_loaders(cfg: DictConfig, model_config, local_batch_size: int, train: bool):
    """(train loader, None) or (None, eval loader) of this rank's data-parallel shard."""
    check_data_kind(cfg)
    shapes = record_shapes(cfg, model_config)
    kw = dict(
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_world=parallel_state.get_data_parallel_world_size(),
        num_workers=cfg.data.num_workers,
        shapes=shapes,
        fmt=cfg.data.format,
        pin_memory=torch.cuda.is_available(),
    )
    try:
        if train:
            loader = build_train_loader(cfg.data.train_path, micro_batch_size=local_batch_size, **kw)
        else:
            loader = build_eval_loader(
                cfg.data.eval_path, micro_batch_size=cfg.train.eval_micro_batch_size, **kw
            )
    except ValueError as err:
        raise ValueError(
            f"{err}\n(the model expects records of shape {shapes.fields()}: from model.context_in_dim, "
            "model.vec_in_dim, model.in_channels / 4 and data.t5_len, data.latent_size)"
        ) from err
    if cfg.data.kind == "preprocessed":
        _check_size(cfg, "train" if train else "eval", len(loader.source))
    return (loader, None) if train else (None, loader)


def _check_size(cfg: DictConfig, split: str, found: int) -> None:
    """The MLPerf sets have fixed sizes (``mlperf.train_samples`` / ``eval_samples``, also logged): a partial
    download or a shard lost in a copy must not train or evaluate on less, silently."""
    expected = int(cfg.mlperf[f"{split}_samples"])
    if found != expected:
        raise ValueError(
            f"{split} data {cfg.data[f'{split}_path']}: {found} samples, but the MLPerf flux1 {split} set has "
            f"{expected} (mlperf.{split}_samples); a truncated or partial copy? To train on other data set "
            f"mlperf.{split}_samples={found} (the run is then not an MLPerf result)"
        )
