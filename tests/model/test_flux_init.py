"""Reference initialisation: xavier bounds of the fused shapes, N(0, 0.02) embedders, zeros and ones."""

import math

import pytest
import torch

from flux_nemo.model import FluxConfig, build_flux


@pytest.fixture(scope="module")
def model(megatron_world):
    torch.manual_seed(0)
    return build_flux(FluxConfig.from_flavor("tiny", hidden_size=512, num_attention_heads=4))


def bound(fan_out: int, fan_in: int) -> float:
    return math.sqrt(6 / (fan_in + fan_out))


def expected_rules(config: FluxConfig) -> dict[str, tuple[str, float]]:
    """Parameter-name suffix -> (rule, value), from reference.md section 2.3."""
    h, mlp = config.hidden_size, config.ffn_hidden_size
    rules = {
        "img_in.weight": ("uniform", bound(h, config.in_channels)),
        "txt_in.weight": ("uniform", bound(h, config.context_in_dim)),
        "_layer.weight": ("normal", 0.02),  # time_in / vector_in in_layer and out_layer
        "_mod.linear.weight": ("zero", 0),
        "modulation.linear.weight": ("zero", 0),
        "final_layer.linear.weight": ("zero", 0),
        "layernorm.weight": ("one", 1),
        "bias": ("zero", 0),
    }
    for s in ("img", "txt"):
        rules[f"{s}_linear_qkv.weight"] = ("uniform", bound(3 * h, h))  # the fused [3h, h] qkv
        rules[f"{s}_linear_proj.weight"] = ("uniform", bound(h, h))
        rules[f"{s}_mlp.linear_fc1.weight"] = ("uniform", bound(mlp, h))
        rules[f"{s}_mlp.linear_fc2.weight"] = ("uniform", bound(h, mlp))
    # Single blocks: bounds of BFL's fused linear1 [3h + mlp, h] and linear2 [h, h + mlp].
    rules["self_attention.linear_qkv.weight"] = ("uniform", bound(3 * h + mlp, h))
    rules["mlp.linear_fc1.weight"] = ("uniform", bound(3 * h + mlp, h))
    rules["self_attention.linear_proj.weight"] = ("uniform", bound(h, h + mlp))
    rules["mlp.linear_fc2.weight"] = ("uniform", bound(h, h + mlp))
    return rules


def rule_for(name: str, rules) -> tuple[str, float]:
    if name.startswith("single_blocks."):
        name = name.split(".", 2)[2]
        rules = {k: v for k, v in rules.items() if not k.startswith(("img_", "txt_"))}
    matches = [k for k in rules if name.endswith(k)]
    assert matches, f"no init rule for {name}"
    return rules[max(matches, key=len)]


def test_every_parameter_follows_its_rule(model):
    rules = expected_rules(model.config)
    for name, p in model.named_parameters():
        kind, value = rule_for(name, rules)
        if kind == "zero":
            assert torch.count_nonzero(p) == 0, name
        elif kind == "one":
            assert torch.all(p == 1), name
        elif kind == "normal":
            assert abs(p.mean().item()) < 0.002 and abs(p.std().item() - value) < 0.001, name
        else:
            # Within the bound, reaching it, and with the std of U(-b, b).
            assert p.abs().amax() <= value, name
            assert p.abs().amax() > 0.99 * value, name
            assert abs(p.std().item() / (value / math.sqrt(3)) - 1) < 0.03, name


def test_single_block_bounds_use_the_fused_shapes(model):
    # The separate qkv weight alone would have the larger bound sqrt(6 / (4h)); the fused one must be used.
    h = model.config.hidden_size
    qkv = model.single_blocks[0].self_attention.linear_qkv.weight
    assert qkv.abs().amax() < bound(3 * h, h) * 0.8


def test_init_is_reproducible_under_the_same_seed(megatron_world):
    config = FluxConfig.from_flavor("tiny", num_double_blocks=1, num_single_blocks=1)
    torch.manual_seed(3)
    a = build_flux(config).state_dict()
    torch.manual_seed(3)
    b = build_flux(config).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("_extra_state"))


def test_meta_model_materialises_and_initialises(megatron_world):
    config = FluxConfig.from_flavor("tiny", num_double_blocks=1, num_single_blocks=1)
    with torch.device("meta"):
        model = build_flux(config)
    model = model.to_empty(device="cpu")
    model.init_weights()
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    qkv = model.double_blocks[0].self_attention.img_linear_qkv.weight
    assert 0 < qkv.abs().amax() <= bound(3 * config.hidden_size, config.hidden_size)
