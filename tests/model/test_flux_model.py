"""Flux model: parameter count, names, shapes, dtypes, batch independence and the block hook."""

import pytest
import torch
from flux_testing import image_ids, make_inputs

from flux_nemo.model import FluxConfig, build_flux


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_schnell_parameter_count_on_meta(megatron_world):
    with torch.device("meta"):
        model = build_flux(FluxConfig.from_flavor("schnell"))
    assert all(p.is_meta for p in model.parameters())
    assert count(model) == 11_891_178_560
    assert count(model.double_blocks[0]) == 339_831_296
    assert count(model.single_blocks[0]) == 141_591_808
    blocks = count(model.double_blocks) + count(model.single_blocks)
    assert count(model) - blocks == 53_895_232  # embedders + final layer


def test_parameter_names_and_shapes_follow_the_contract(megatron_world):
    c = FluxConfig.from_flavor("tiny")
    with torch.device("meta"):
        sd = {
            k: tuple(v.shape) for k, v in build_flux(c).state_dict().items() if not k.endswith("_extra_state")
        }
    h, hd, mlp = c.hidden_size, c.kv_channels, c.ffn_hidden_size
    expected = {
        "img_in.weight": (h, 64),
        "txt_in.weight": (h, 4096),
        "time_in.in_layer.weight": (h, 256),
        "time_in.out_layer.weight": (h, h),
        "vector_in.in_layer.weight": (h, 768),
        "vector_in.out_layer.weight": (h, h),
        "final_layer.adaLN_modulation.linear.weight": (2 * h, h),
        "final_layer.linear.weight": (64, h),
    }
    d, s = "double_blocks.1.", "single_blocks.1."
    for stream in ("img", "txt"):
        expected[f"{d}{stream}_mod.linear.weight"] = (6 * h, h)
        expected[f"{d}self_attention.{stream}_linear_qkv.weight"] = (3 * h, h)
        expected[f"{d}self_attention.{stream}_linear_qkv.bias"] = (3 * h,)
        expected[f"{d}self_attention.{stream}_q_layernorm.weight"] = (hd,)
        expected[f"{d}self_attention.{stream}_k_layernorm.weight"] = (hd,)
        expected[f"{d}self_attention.{stream}_linear_proj.weight"] = (h, h)
        expected[f"{d}self_attention.{stream}_linear_proj.bias"] = (h,)
        expected[f"{d}{stream}_mlp.linear_fc1.weight"] = (mlp, h)
        expected[f"{d}{stream}_mlp.linear_fc2.weight"] = (h, mlp)
    expected |= {
        f"{s}modulation.linear.weight": (3 * h, h),
        f"{s}self_attention.linear_qkv.weight": (3 * h, h),
        f"{s}self_attention.q_layernorm.weight": (hd,),
        f"{s}self_attention.k_layernorm.weight": (hd,),
        f"{s}self_attention.linear_proj.weight": (h, h),
        f"{s}mlp.linear_fc1.weight": (mlp, h),
        f"{s}mlp.linear_fc2.weight": (h, mlp),
        f"{s}mlp.linear_fc2.bias": (h,),
    }
    for name, shape in expected.items():
        assert sd[name] == shape, name
    assert f"{s}self_attention.linear_proj.bias" not in sd  # BFL linear2's bias lives in mlp.linear_fc2
    # Every parameter is covered by the contract's patterns (weights above; biases of the same modules).
    stems = {k.rsplit(".", 1)[0].replace("double_blocks.1", "double_blocks.0") for k in expected}
    stems |= {k.replace("double_blocks.0", "double_blocks.1") for k in stems}
    stems |= {k.replace("single_blocks.1", "single_blocks.0") for k in stems}
    assert {k.rsplit(".", 1)[0] for k in sd} <= stems
    assert len(sd) == 12 + 2 * 24 + 2 * 11 + 4  # embedders, 2 double, 2 single blocks, final layer


def test_fresh_model_outputs_exactly_zero(megatron_world):
    torch.manual_seed(0)
    model = build_flux(FluxConfig.from_flavor("tiny"))
    out = model(**make_inputs(model.config, batch=2, h=3, w=4, txt_len=5))
    assert out.shape == (2, 12, 64)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("batch, h, w, txt_len", [(1, 4, 4, 8), (3, 2, 5, 1), (2, 5, 3, 7)])
def test_shapes_for_any_grid_text_length_and_batch(build, batch, h, w, txt_len):
    model = build()
    with torch.no_grad():
        out = model(**make_inputs(model.config, batch, h, w, txt_len))
    assert out.shape == (batch, h * w, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().amax() > 0


def test_samples_are_independent_of_the_batch(build):
    model = build()
    inputs = make_inputs(model.config, batch=3, h=2, w=3, txt_len=4)
    with torch.no_grad():
        full = model(**inputs)
        one = model(**{k: v[1:2] for k, v in inputs.items()})
    torch.testing.assert_close(one[0], full[1], rtol=1e-5, atol=1e-5)


def test_shared_ids_of_batch_one_broadcast(build):
    model = build()
    inputs = make_inputs(model.config, batch=2, h=3, w=2, txt_len=3)
    with torch.no_grad():
        per_sample = model(**inputs)
        shared = model(**inputs | {"img_ids": inputs["img_ids"][:1], "txt_ids": inputs["txt_ids"][:1]})
    torch.testing.assert_close(shared, per_sample, rtol=0, atol=0)


def test_positions_matter(build):
    # Image tokens are distinguished only by RoPE: transposing the grid must change the output.
    model = build()
    inputs = make_inputs(model.config, batch=1, h=2, w=3, txt_len=2)
    with torch.no_grad():
        out = model(**inputs)
        moved = model(**inputs | {"img_ids": image_ids(1, 3, 2)})
    assert (out - moved).abs().amax() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_forward_in_params_dtype(build, dtype):
    base = build()
    ref, model = build(params_dtype=torch.float64), build(params_dtype=dtype)
    ref.load_state_dict(base.state_dict())  # the same weights in each dtype
    model.load_state_dict(base.state_dict())
    inputs = make_inputs(model.config, batch=2, h=2, w=2, txt_len=3)  # float32 inputs are cast
    with torch.no_grad():
        out, expected = model(**inputs), ref(**inputs)
    assert out.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 0.1
    err = (out.double() - expected).abs().amax() / expected.abs().amax()
    assert err < tol, err


def test_block_runner_wraps_every_block_and_supports_recompute(build):
    model = build()
    inputs = make_inputs(model.config, batch=1, h=2, w=2, txt_len=2)
    model(**inputs).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    calls = []

    def recompute(block, *args):
        calls.append(type(block).__name__)
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    model.block_runner = recompute
    model(**inputs).square().sum().backward()
    assert calls == ["DoubleStreamBlock"] * 2 + ["SingleStreamBlock"] * 2
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_every_parameter_gets_a_gradient(build):
    model = build()
    model(**make_inputs(model.config, batch=2, h=2, w=2, txt_len=2)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_megatron_schedule_hooks(megatron_world):
    # What megatron.core.pipeline_parallel.schedules asks of a model, through its own helpers.
    from megatron.core.enums import ModelType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.utils import get_attr_wrapped_model, get_model_type

    with torch.device("meta"):
        model = build_flux(FluxConfig.from_flavor("tiny"))
    assert isinstance(model, MegatronModule)
    assert get_model_type(model) == ModelType.encoder_or_decoder
    get_attr_wrapped_model(model, "set_input_tensor")([None])
    with pytest.raises(RuntimeError, match="pipeline"):
        model.set_input_tensor([torch.zeros(1)])


def test_sharded_state_dict_covers_every_weight(megatron_world):
    from megatron.core import parallel_state

    model = build_flux(FluxConfig.from_flavor("tiny", num_double_blocks=1, num_single_blocks=1))
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    sharded = model.sharded_state_dict(metadata=metadata)
    assert set(sharded) == set(model.state_dict())


def test_unknown_backend(megatron_world):
    with pytest.raises(ValueError, match="backend"):
        build_flux(FluxConfig.from_flavor("tiny"), backend="fast")
