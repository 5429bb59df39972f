"""Compose the tiny CPU test configuration exactly as the recipe composes conf/."""

import json
from pathlib import Path

from hydra import compose, initialize_config_dir

import flux_nemo.training.config  # noqa: F401  (schema)

CONF = str(Path(__file__).resolve().parents[2] / "conf")

TINY = [
    "model=tiny",
    "model.in_channels=16",
    "model.context_in_dim=16",
    "model.vec_in_dim=16",
    "model.hidden_size=32",
    "model.num_attention_heads=1",
    "model.num_double_blocks=1",
    "model.num_single_blocks=1",
    "data=synthetic",
    "data.t5_len=4",
    "data.latent_size=4",
    "data.num_workers=0",
    "data.synthetic.num_train=256",
    "data.synthetic.num_eval=64",
    "system=cpu",
    "train.global_batch_size=32",
    "train.micro_batch_size=16",
    "train.eval_micro_batch_size=24",  # 64 eval samples -> 3 batches, the last with 8 padding rows
    "train.max_steps=6",
    "train.eval_every_samples=96",  # every 3 steps
    "train.lr=1e-3",
    "train.warmup_steps=2",
    "train.log_every_n_steps=1",
    "train.seed=123",
    "train.synthetic_warmup_steps=1",
    "exp_manager.create_checkpoint_callback=false",
    "exp_manager.create_tensorboard_logger=false",
]


def compose_cfg(*overrides: str):
    with initialize_config_dir(CONF, version_base=None):
        return compose("flux_schnell", overrides=[*TINY, *overrides])


def mlperf_events(log_file) -> list[dict]:
    """The ``:::MLLOG`` events of an MLPerf result log."""
    lines = Path(log_file).read_text().splitlines()
    return [json.loads(line.split(":::MLLOG ", 1)[1]) for line in lines if ":::MLLOG " in line]


def train_losses(log_file) -> dict[int, float]:
    """step -> training loss, from the log's ``tracked_stats`` events."""
    return {
        e["metadata"]["step"]: e["value"]["train_loss"]
        for e in mlperf_events(log_file)
        if e["key"] == "tracked_stats"
    }
