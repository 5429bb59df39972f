"""MLPerf Training flux1 (Flux.1-schnell) on NeMo / Megatron-Core: compose ``conf/``, then train.

    python recipes/flux_schnell.py                                   # 8x H100, preprocessed MLPerf data
    python recipes/flux_schnell.py model=tiny data=synthetic system=cpu precision=fp32 train.global_batch_size=256 \\
        train.lr=1e-3 train.warmup_steps=0
    python recipes/flux_schnell.py --cfg job                         # print the composed config
"""

import hydra
from omegaconf import DictConfig

import flux_nemo.training.config  # noqa: F401  (registers the structured schema before Hydra composes)


@hydra.main(version_base=None, config_path="../conf", config_name="flux_schnell")
def main(cfg: DictConfig) -> None:
    from flux_nemo.launch import maybe_launch

    if maybe_launch(cfg):
        return
    from flux_nemo.training.run import run

    run(cfg)


if __name__ == "__main__":
    main()
