"""FluxConfig: flavors, derived Megatron fields, validation errors, diffusers config import."""

import dataclasses

import pytest
import torch

from flux_nemo.model import FluxConfig

SCHNELL_DIFFUSERS = {
    "_class_name": "FluxTransformer2DModel",
    "_diffusers_version": "0.30.0.dev0",
    "attention_head_dim": 128,
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}


def test_schnell_flavor_matches_reference():
    c = FluxConfig.from_flavor("schnell")
    assert (c.in_channels, c.vec_in_dim, c.context_in_dim) == (64, 768, 4096)
    assert (c.hidden_size, c.num_attention_heads, c.mlp_ratio) == (3072, 24, 4.0)
    assert (c.num_double_blocks, c.num_single_blocks) == (19, 38)
    assert c.axes_dim == (16, 56, 56) and c.theta == 10_000 and c.qkv_bias and not c.guidance_embed
    # Derived Megatron fields.
    assert (c.num_layers, c.ffn_hidden_size, c.kv_channels, c.head_dim) == (57, 12288, 128, 128)
    assert c.hidden_dropout == 0.0 and c.attention_dropout == 0.0 and c.layernorm_epsilon == 1e-6
    assert c.rotary_interleaved and c.normalization == "RMSNorm"


def test_tiny_flavor_keeps_input_widths_and_head_dim():
    c = FluxConfig.from_flavor("tiny")
    assert (c.in_channels, c.vec_in_dim, c.context_in_dim) == (64, 768, 4096)
    assert c.kv_channels == 128 and c.axes_dim == (16, 56, 56)
    assert c.hidden_size < 3072 and c.num_layers <= 4
    assert c.num_layers == c.num_double_blocks + c.num_single_blocks
    assert c.ffn_hidden_size == c.hidden_size * 4


def test_overrides_apply_to_flux_and_megatron_fields():
    c = FluxConfig.from_flavor(
        "tiny", num_double_blocks=3, theta=500, params_dtype=torch.float64, mlp_ratio=2
    )
    assert (c.num_double_blocks, c.theta, c.params_dtype, c.ffn_hidden_size) == (3, 500, torch.float64, 512)
    assert c.num_layers == 3 + c.num_single_blocks


def test_cpu_initialization_default_follows_cuda():
    assert FluxConfig.from_flavor("tiny").use_cpu_initialization == (not torch.cuda.is_available())
    assert FluxConfig.from_flavor("tiny", use_cpu_initialization=True).use_cpu_initialization


def test_replace_keeps_derived_fields_consistent():
    c = dataclasses.replace(FluxConfig.from_flavor("tiny"), theta=20)
    assert c.theta == 20 and c.num_layers == 4


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(guidance_embed=True), "guidance_embed"),
        (dict(axes_dim=(16, 56, 48)), "axes_dim"),
        (dict(axes_dim=(15, 57, 56)), "axes_dim"),
        (dict(hidden_size=250), "hidden_size"),
        (dict(num_attention_heads=3), "num_attention_heads"),
        (dict(num_layers=9), "num_layers"),
        (dict(ffn_hidden_size=100), "ffn_hidden_size"),
        (dict(kv_channels=64), "kv_channels"),
        (dict(num_query_groups=1), "num_query_groups"),
        (dict(mlp_ratio=4.001), "mlp_ratio"),
        (dict(num_double_blocks=0, num_single_blocks=0), "num_single_blocks"),
        (dict(normalization="LayerNorm"), "normalization"),
        (dict(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32), "pipeline_model_parallel_size"),
        (dict(sequence_parallel=True, tensor_model_parallel_size=1), "sequence_parallel"),
        (dict(gated_linear_unit=True), "gated_linear_unit"),
        (dict(in_channels=0), "in_channels"),
        (dict(not_a_field=1), "not_a_field"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        FluxConfig.from_flavor("tiny", **overrides)


def test_sequence_parallel_needs_tensor_parallel():
    with pytest.raises(ValueError, match=r"FluxConfig\.sequence_parallel needs tensor_model_parallel_size"):
        FluxConfig(sequence_parallel=True, tensor_model_parallel_size=1)
    config = FluxConfig.from_flavor("tiny", sequence_parallel=True, tensor_model_parallel_size=2)
    assert config.sequence_parallel and config.context_parallel_size == 1
    # With context parallelism too (each context-parallel slice is split again over the tensor-parallel ranks).
    assert FluxConfig.from_flavor(
        "tiny", sequence_parallel=True, tensor_model_parallel_size=2, context_parallel_size=2
    ).sequence_parallel


def test_hidden_must_divide_over_tensor_parallel_ranks():
    # 3 heads of 128 = 384 over 2 ranks: neither the heads nor the hidden size split evenly.
    with pytest.raises(ValueError, match="tensor_model_parallel_size"):
        FluxConfig.from_flavor("tiny", hidden_size=384, num_attention_heads=3, tensor_model_parallel_size=2)


def test_unknown_flavor():
    with pytest.raises(ValueError, match="dev"):
        FluxConfig.from_flavor("dev")


def test_from_diffusers_config_schnell_equals_flavor():
    c = FluxConfig.from_diffusers_config(SCHNELL_DIFFUSERS)
    ref = FluxConfig.from_flavor("schnell")
    names = ["in_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_attention_heads", "mlp_ratio"]
    names += ["num_double_blocks", "num_single_blocks", "axes_dim", "theta", "qkv_bias", "kv_channels"]
    assert {n: getattr(c, n) for n in names} == {n: getattr(ref, n) for n in names}


def test_from_diffusers_config_toy_and_overrides():
    toy = dict(
        SCHNELL_DIFFUSERS,
        num_layers=1,
        num_single_layers=2,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=24,
        in_channels=16,
        out_channels=16,
        axes_dims_rope=[16, 56, 56],
    )
    c = FluxConfig.from_diffusers_config(toy, params_dtype=torch.float64)
    assert (c.hidden_size, c.num_attention_heads, c.context_in_dim, c.vec_in_dim) == (256, 2, 32, 24)
    assert (c.in_channels, c.num_double_blocks, c.num_single_blocks) == (16, 1, 2)
    assert c.axes_dim == (16, 56, 56) and c.params_dtype == torch.float64


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(guidance_embeds=True), "guidance_embeds"),
        (dict(out_channels=32), "out_channels"),
        (dict(patch_size=2), "patch_size"),
        (dict(some_new_key=1), "some_new_key"),
        (dict(axes_dims_rope=(16, 56, 40)), "axes_dim"),
    ],
)
def test_from_diffusers_config_rejects(change, match):
    with pytest.raises(ValueError, match=match):
        FluxConfig.from_diffusers_config({**SCHNELL_DIFFUSERS, **change})


def test_config_pickles_and_copies():
    import copy
    import pickle

    c = FluxConfig.from_flavor("tiny", theta=123)
    for clone in (pickle.loads(pickle.dumps(c)), copy.deepcopy(c)):
        assert (
            clone.theta == 123
            and clone.num_layers == c.num_layers
            and clone.activation_func is c.activation_func
        )
