"""Tiny Hydra app for the launcher tests: composes the repository's ``conf/launcher`` group and calls
``maybe_launch`` exactly as the recipe does. When it is the job itself (``launcher=none``) it appends one JSON
line (argv, rank env, composed keys) to ``$FLUX_NEMO_TEST_OUT``."""

import json
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from flux_nemo.launch import maybe_launch


@hydra.main(config_path=".", config_name="main", version_base=None)
def main(cfg: DictConfig) -> None:
    if maybe_launch(cfg):
        print("LAUNCHED")
        return
    record = {
        "argv": sys.argv[1:],
        "rank": os.environ.get("RANK"),
        "world_size": os.environ.get("WORLD_SIZE"),
        "launcher": cfg.launcher.name,
        "model": OmegaConf.to_container(cfg.model),
        "max_steps": cfg.train.max_steps,
        "system": OmegaConf.to_container(cfg.system),
    }
    with open(os.environ["FLUX_NEMO_TEST_OUT"], "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
