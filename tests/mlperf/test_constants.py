import json
from pathlib import Path

import mlperf_logging
import pytest

from flux_nemo.mlperf import constants as C

WHEEL = Path(mlperf_logging.__file__).parent


def test_evaluation_frequency_matches_ceil_rule():
    assert C.evaluation_frequency(512) == 262_144
    assert C.evaluation_frequency(4096) == 262_144
    assert C.evaluation_frequency(2304) == 114 * 2304 == 262_656
    assert C.eval_every_steps(2304) == 114
    assert C.evaluation_frequency(3000) == 264_000
    assert C.eval_every_steps(16) == 16_384
    with pytest.raises(ValueError):
        C.evaluation_frequency(0)


def test_rcp_table_matches_installed_rcp_file():
    data = json.loads((WHEEL / "rcp_checker" / f"training_{C.RULESET}" / "rcps_flux1.json").read_text())
    table = {
        rec["BS"]: (
            rec["Hyperparams"]["opt_base_learning_rate"],
            rec["Hyperparams"]["opt_learning_rate_warmup_steps"],
        )
        for rec in data.values()
    }
    assert table == C.RCP_HPARAMS
    for rec in data.values():
        hp = rec["Hyperparams"]
        assert (hp["opt_adamw_beta_1"], hp["opt_adamw_beta_2"]) == (C.ADAMW_BETA_1, C.ADAMW_BETA_2)
        assert (hp["opt_adamw_epsilon"], hp["opt_adamw_weight_decay"]) == (
            C.ADAMW_EPSILON,
            C.ADAMW_WEIGHT_DECAY,
        )
        assert hp["opt_gradient_clip_norm"] == C.GRADIENT_CLIP_NORM


def test_fixed_values_match_checker_rules():
    rules = (WHEEL / "compliance_checker" / f"training_{C.RULESET}" / "closed_flux1.yaml").read_text()
    assert f"v['value'] <= {C.TARGET}" in rules
    assert "math.ceil(262144 / v['value'])" in rules and C.EVAL_EVERY_SAMPLES == 262144
    common = (WHEEL / "compliance_checker" / f"training_{C.RULESET}" / "common.yaml").read_text()
    for p in C.ALLOWED_PRECISIONS:
        assert f"'{p}'" in common
