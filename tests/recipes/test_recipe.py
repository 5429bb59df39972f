"""The Hydra entry point: composition, strict typed overrides, the RCP table, clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import flux_nemo.training.config  # noqa: F401
from flux_nemo.mlperf import constants as C
from flux_nemo.training.config import check_batch_sizes, eval_every_steps, resolve_lr_warmup
from flux_nemo.training.model_builder import flux_config

ROOT = Path(__file__).resolve().parents[2]


def _compose(*overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return compose("flux_schnell", overrides=list(overrides))


def test_default_composition_is_the_mlperf_schnell_run():
    cfg = _compose()
    assert cfg.model.flavor == "schnell" and cfg.data.kind == "preprocessed" and cfg.precision.name == "bf16"
    assert cfg.launcher.name == "none" and cfg.mlperf.target == C.TARGET
    assert resolve_lr_warmup(cfg) == (2e-4, 1600)
    assert eval_every_steps(cfg) == C.eval_every_steps(512) == 512
    assert cfg.precision.grad_reduce_in_fp32 and cfg.parallel.use_distributed_optimizer


@pytest.mark.parametrize(
    "group",
    [
        "model=tiny",
        "data=synthetic",
        "data=raw",
        "precision=fp8_delayed",
        "precision=fp8_current",
        "precision=fp8_block",
        "precision=fp32",
        "parallel=tp2",
        "parallel=tp4",
        "parallel=cp2",
        "system=cpu",
        "system=h100_8x8",
        "launcher=local",
    ],
)
def test_every_group_option_composes(group):
    assert _compose(group) is not None


def test_rcp_table_in_conf_matches_the_mlperf_rcps():
    cfg = _compose()
    table = {gbs: (row.lr, row.warmup_steps) for gbs, row in cfg.mlperf.rcp_hparams.items()}
    assert table == C.RCP_HPARAMS
    assert resolve_lr_warmup(_compose("train.global_batch_size=4096")) == (4e-4, 100)
    assert resolve_lr_warmup(_compose("train.global_batch_size=2048", "train.lr=1e-4")) == (1e-4, 0)


def test_gbs_without_rcp_needs_explicit_lr_and_warmup():
    with pytest.raises(ValueError, match="global_batch_size=768 has no MLPerf RCP entry.*train.lr"):
        resolve_lr_warmup(_compose("train.global_batch_size=768"))
    assert resolve_lr_warmup(
        _compose("train.global_batch_size=768", "train.lr=3e-4", "train.warmup_steps=5")
    ) == (
        3e-4,
        5,
    )


def test_typos_and_wrong_types_fail_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("train.global_batch_sise=3")
    assert "global_batch_sise" in str(err.value.__cause__ or err.value)
    with pytest.raises(ConfigCompositionException) as err:
        _compose("model.context_in_dimm=3")
    assert "context_in_dimm" in str(err.value.__cause__ or err.value)
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        _compose("train.global_batch_size=abc")
    assert "train.global_batch_size" in str(err.value.__cause__ or err.value)


def test_model_fields_are_overridable_and_reach_flux_config():
    cfg = _compose("model=tiny", "model.context_in_dim=64", "model.num_single_blocks=3")
    config = flux_config(cfg)
    assert config.context_in_dim == 64 and config.num_single_blocks == 3 and config.hidden_size == 64


def test_batch_sizes_must_divide():
    cfg = _compose("train.global_batch_size=96", "train.micro_batch_size=16")
    assert check_batch_sizes(cfg, 2) == 3
    with pytest.raises(ValueError, match="train.global_batch_size=96 .* train.micro_batch_size=16"):
        check_batch_sizes(cfg, 4)


def test_data_shape_mismatch_names_the_field(tmp_path):
    from flux_nemo.data import write_synthetic
    from flux_nemo.data.format import RecordShapes
    from flux_nemo.training.data import load_empty

    write_synthetic(tmp_path, 4, 8, RecordShapes(4, 16, 16, 4, 4))
    cfg = _compose(
        "model=tiny",
        "data=synthetic",
        "data.t5_len=4",
        "data.latent_size=4",
        "model.in_channels=16",
        "model.vec_in_dim=16",
        f"data.empty_encodings_path={tmp_path}/empty_encodings",
    )
    with pytest.raises(ValueError, match="model.context_in_dim .* is 32 but the data has 16"):
        load_empty(cfg, flux_config(cfg), "cpu")


def test_cli_prints_the_composed_config_and_rejects_typos():
    script = str(ROOT / "recipes" / "flux_schnell.py")
    ok = subprocess.run(
        [sys.executable, script, "model=tiny", "train.max_steps=7", "--cfg", "job"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    printed = OmegaConf.create(ok.stdout[ok.stdout.index("model:") :])
    assert printed.train.max_steps == 7 and printed.model.flavor == "tiny"
    bad = subprocess.run(
        [sys.executable, script, "train.max_stepz=7", "--cfg", "job"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert bad.returncode != 0 and "max_stepz" in bad.stdout + bad.stderr
