"""Checkpoint conversion: bit-exact round trips, the layout of every format, errors, and the CLI on files."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

from flux_nemo.convert import (
    ConversionError,
    bfl_to_megatron,
    diffusers_to_megatron,
    load_flux_nemo,
    megatron_layout,
    megatron_to_bfl,
    megatron_to_diffusers,
    save_bfl,
)
from flux_nemo.convert.__main__ import main as cli
from flux_nemo.model import FluxConfig

REPO = Path(__file__).resolve().parents[1]
HEADS, HEAD_DIM, HIDDEN = 2, 16, 32


def tiny_diffusers(num_layers=1, num_single_layers=2, dtype=torch.float32, seed=0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=12,
        pooled_projection_dim=10,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    with torch.no_grad():
        for p in model.parameters():  # random everywhere, so that any misplaced row or column shows
            p.normal_()
    return model.to(dtype)


def config_of(model: FluxTransformer2DModel) -> FluxConfig:
    return FluxConfig.from_diffusers_config(dict(model.config))


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def tiny():
    model = tiny_diffusers()
    return model.state_dict(), config_of(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diffusers_round_trip_is_bit_exact(dtype):
    model = tiny_diffusers(dtype=dtype)
    sd, config = model.state_dict(), config_of(model)
    ours = diffusers_to_megatron(sd, config)
    assert {k: tuple(v.shape) for k, v in ours.items()} == megatron_layout(config)
    assert_same(megatron_to_diffusers(ours, config), sd)


def test_bfl_round_trip_is_bit_exact(tiny):
    sd, config = tiny
    ours = diffusers_to_megatron(sd, config)
    bfl = megatron_to_bfl(ours, config)
    assert_same(bfl_to_megatron(bfl, config), ours)
    assert_same(megatron_to_bfl(bfl_to_megatron(bfl, config), config), bfl)
    # diffusers -> ours -> BFL -> ours -> diffusers comes back to the start
    assert_same(megatron_to_diffusers(bfl_to_megatron(bfl, config), config), sd)


def test_bfl_names_are_the_original_checkpoint_names():
    model = tiny_diffusers(num_layers=1, num_single_layers=1)
    config = config_of(model)
    bfl = megatron_to_bfl(diffusers_to_megatron(model.state_dict(), config), config)
    linears = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer"]
    linears += ["vector_in.out_layer", "final_layer.adaLN_modulation.1", "final_layer.linear"]
    linears += ["single_blocks.0." + n for n in ("modulation.lin", "linear1", "linear2")]
    linears += [
        f"double_blocks.0.{s}_{n}" for s in ("img", "txt") for n in ("mod.lin", "attn.qkv", "attn.proj")
    ]
    linears += [f"double_blocks.0.{s}_mlp.{i}" for s in ("img", "txt") for i in (0, 2)]
    expected = {f"{n}.{p}" for n in linears for p in ("weight", "bias")}
    norms = ["single_blocks.0.norm"] + [f"double_blocks.0.{s}_attn.norm" for s in ("img", "txt")]
    expected |= {f"{n}.{q}_norm.scale" for n in norms for q in ("query", "key")}
    assert set(bfl) == expected


def test_layout_semantics(tiny):
    """Checks the transforms against their definitions, independently of the rules that implement them."""
    sd, config = tiny
    ours = diffusers_to_megatron(sd, config)
    bfl = megatron_to_bfl(ours, config)
    H, d = HIDDEN, HEAD_DIM
    for ours_key, prefix, names in [
        (
            "double_blocks.0.self_attention.img_linear_qkv",
            "transformer_blocks.0.attn.",
            ("to_q", "to_k", "to_v"),
        ),
        (
            "double_blocks.0.self_attention.txt_linear_qkv",
            "transformer_blocks.0.attn.",
            ("add_q_proj", "add_k_proj", "add_v_proj"),
        ),
        (
            "single_blocks.1.self_attention.linear_qkv",
            "single_transformer_blocks.1.attn.",
            ("to_q", "to_k", "to_v"),
        ),
    ]:
        for p in ("weight", "bias"):
            w = ours[f"{ours_key}.{p}"]
            for h in range(HEADS):
                for j, n in enumerate(names):  # Megatron rows: head h holds [q_h, k_h, v_h]
                    rows = slice((3 * h + j) * d, (3 * h + j + 1) * d)
                    assert torch.equal(w[rows], sd[f"{prefix}{n}.{p}"][h * d : (h + 1) * d])
    fused = torch.cat([sd[f"transformer_blocks.0.attn.to_{x}.weight"] for x in "qkv"])
    assert torch.equal(bfl["double_blocks.0.img_attn.qkv.weight"], fused)  # BFL: [q; k; v] blocks
    lin1 = bfl["single_blocks.0.linear1.weight"]
    assert torch.equal(
        lin1[: 3 * H], torch.cat([sd[f"single_transformer_blocks.0.attn.to_{x}.weight"] for x in "qkv"])
    )
    assert torch.equal(lin1[3 * H :], sd["single_transformer_blocks.0.proj_mlp.weight"])
    proj_out = sd["single_transformer_blocks.0.proj_out.weight"]
    assert torch.equal(ours["single_blocks.0.self_attention.linear_proj.weight"], proj_out[:, :H])
    assert torch.equal(ours["single_blocks.0.mlp.linear_fc2.weight"], proj_out[:, H:])
    assert torch.equal(
        ours["single_blocks.0.mlp.linear_fc2.bias"], sd["single_transformer_blocks.0.proj_out.bias"]
    )
    assert torch.equal(bfl["single_blocks.0.linear2.weight"], proj_out)
    for p in ("weight", "bias"):  # diffusers (scale, shift) -> ours and BFL (shift, scale)
        ada, norm_out = ours[f"final_layer.adaLN_modulation.linear.{p}"], sd[f"norm_out.linear.{p}"]
        assert torch.equal(ada[:H], norm_out[H:]) and torch.equal(ada[H:], norm_out[:H])
        assert torch.equal(bfl[f"final_layer.adaLN_modulation.1.{p}"], ada)


def test_outputs_do_not_share_storage(tiny):
    """safetensors refuses to save tensors that share memory, so no two outputs of a conversion may."""
    sd, config = tiny
    ours = diffusers_to_megatron(sd, config)
    for out in (ours, megatron_to_bfl(ours, config), megatron_to_diffusers(ours, config)):
        ptrs = [t.untyped_storage().data_ptr() for t in out.values()]
        assert len(set(ptrs)) == len(ptrs)


@pytest.mark.parametrize(
    "fn,src",
    [
        (diffusers_to_megatron, "diffusers"),
        (megatron_to_diffusers, "ours"),
        (bfl_to_megatron, "bfl"),
        (megatron_to_bfl, "ours"),
    ],
)
def test_errors_name_the_key(tiny, fn, src):
    sd, config = tiny
    ours = diffusers_to_megatron(sd, config)
    good = {"diffusers": sd, "ours": ours, "bfl": megatron_to_bfl(ours, config)}[src]
    key = sorted(k for k in good if k.endswith(".weight") and good[k].dim() == 2)[3]
    rows, cols = good[key].shape

    bad = dict(good)
    bad[key] = torch.zeros(rows, cols + 1)
    with pytest.raises(
        ConversionError, match=re.escape(f"{key}: expected ({rows}, {cols}), got ({rows}, {cols + 1})")
    ):
        fn(bad, config)
    bad = {k: v for k, v in good.items() if k != key}
    with pytest.raises(ConversionError, match=rf"missing key\(s\): {re.escape(key)}"):
        fn(bad, config)
    bad = {**good, "stray.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match=r"unexpected key\(s\): stray\.weight"):
        fn(bad, config)
    # TE FP8 metadata is ignored, whatever it holds
    fn({**good, "single_blocks.0.mlp.linear_fc1._extra_state": torch.zeros(3)}, config)


def test_wrong_config_is_an_error(tiny):
    sd, _ = tiny
    other = FluxConfig.from_diffusers_config({**dict(tiny_diffusers().config), "num_single_layers": 3})
    with pytest.raises(ConversionError, match=r"missing key\(s\): single_transformer_blocks\.2\."):
        diffusers_to_megatron(sd, other)


def test_cli_diffusers_to_flux_nemo_to_bfl_to_diffusers(tmp_path):
    model = tiny_diffusers(num_layers=2, num_single_layers=1)
    src = tmp_path / "diffusers_in"
    model.save_pretrained(src, max_shard_size="20KB")  # sharded, with an index json
    assert (src / "diffusion_pytorch_model.safetensors.index.json").exists()

    ours_dir, bfl_file, out = tmp_path / "ours", tmp_path / "flux1.safetensors", tmp_path / "diffusers_out"
    assert cli(["--from", "diffusers", "--to", "flux-nemo", str(src), str(ours_dir)]) == 0
    assert cli(["--from", "flux-nemo", "--to", "bfl", str(ours_dir), str(bfl_file)]) == 0
    assert cli(["--from", "bfl", "--to", "diffusers", str(bfl_file), str(out)]) == 2  # BFL needs a config
    cfg = str(ours_dir / "config.json")
    args = [
        "--from",
        "bfl",
        "--to",
        "diffusers",
        "--config",
        cfg,
        "--max-shard-size",
        "30KB",
        str(bfl_file),
        str(out),
    ]
    assert cli(args) == 0
    assert (out / "diffusion_pytorch_model.safetensors.index.json").exists()

    sd, config = load_flux_nemo(ours_dir)
    assert_same(sd, diffusers_to_megatron(model.state_dict(), config_of(model)))
    assert json.loads((ours_dir / "config.json").read_text())["format"] == "flux-nemo"
    back = FluxTransformer2DModel.from_pretrained(out)
    public = [k for k in model.config if not k.startswith("_")]
    assert json.dumps({k: back.config[k] for k in public}) == json.dumps({k: model.config[k] for k in public})
    assert_same(back.state_dict(), model.state_dict())


def test_cli_module_entry_point_and_flavor(tmp_path):
    """`python -m flux_nemo.convert` with a BFL file of the tiny flavor."""
    config = FluxConfig.from_flavor("tiny")
    gen = torch.Generator().manual_seed(0)
    ours = {k: torch.randn(s, generator=gen) for k, s in megatron_layout(config).items()}
    save_bfl(megatron_to_bfl(ours, config), tmp_path / "tiny.safetensors")
    cmd = [
        sys.executable,
        "-m",
        "flux_nemo.convert",
        "--from",
        "bfl",
        "--to",
        "flux-nemo",
        "--flavor",
        "tiny",
    ]
    proc = subprocess.run(
        [*cmd, str(tmp_path / "tiny.safetensors"), str(tmp_path / "ours")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    sd, loaded = load_flux_nemo(tmp_path / "ours")
    assert_same(sd, ours)
    assert megatron_layout(loaded) == megatron_layout(config)


def test_cli_reports_a_bad_file(tmp_path, capsys):
    model = tiny_diffusers(num_layers=1, num_single_layers=1)
    config = config_of(model)
    bfl = megatron_to_bfl(diffusers_to_megatron(model.state_dict(), config), config)
    del bfl["single_blocks.0.linear2.bias"]
    bfl["img_in.weight"] = torch.zeros(HIDDEN, 9)
    save_bfl(bfl, tmp_path / "bad.safetensors")
    src = tmp_path / "diffusers"
    model.save_pretrained(src)
    cfg = str(src / "config.json")  # a diffusers config.json also serves as the config of a BFL file
    assert (
        cli(
            [
                "--from",
                "bfl",
                "--to",
                "flux-nemo",
                "--config",
                cfg,
                str(tmp_path / "bad.safetensors"),
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "missing key(s): single_blocks.0.linear2.bias" in err
    assert "shape mismatch for key img_in.weight: expected (32, 8), got (32, 9)" in err
    assert not (tmp_path / "o").exists()


def test_layout_is_the_model_state_dict(megatron_world):
    """Our layout is exactly what build_flux creates, and schnell has the reference's 11,891,178,560 parameters."""
    from flux_nemo.convert.mapping import bfl_rules, derived_layout
    from flux_nemo.model import build_flux

    config = FluxConfig.from_flavor("tiny")
    with torch.device("meta"):
        model = build_flux(config, backend="local")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert shapes == megatron_layout(config)
    schnell = FluxConfig.from_flavor("schnell")
    for layout in (megatron_layout(schnell), derived_layout(bfl_rules(schnell), megatron_layout(schnell))):
        assert sum(torch.Size(s).numel() for s in layout.values()) == 11_891_178_560
