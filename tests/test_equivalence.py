"""Our Flux (local spec) with converted weights reproduces diffusers' FluxTransformer2DModel in float64.

Both models hold float64 parameters. diffusers still rounds a few things to float32 (its RoPE cos/sin tables, q and
k inside its rotary step, and the sinusoidal timestep table), so the two outputs differ at the float32 level
(~1e-7 relative), well inside the 1e-5 bound; a mapping or model error shows as O(1).
"""

import pytest
import torch
from diffusers import FluxTransformer2DModel

from flux_nemo.convert import diffusers_to_megatron, megatron_to_diffusers
from flux_nemo.model import FluxConfig, build_flux

TOL = 1e-5
IN, CTX, VEC = 16, 32, 24


def random_diffusers(heads: int, double: int, single: int, seed: int) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=IN,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=128,
        num_attention_heads=heads,
        joint_attention_dim=CTX,
        pooled_projection_dim=VEC,
        guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
    ).to(torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_q.weight") or "norm_k" in name or "norm_added" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))  # QK-norm gains near 1, not all equal
            else:
                p.normal_(0.0, 0.02)  # non-zero everywhere: gates, final layer and biases matter
    return model.eval()


def ours_from(model: FluxTransformer2DModel):
    config = FluxConfig.from_diffusers_config(dict(model.config), params_dtype=torch.float64)
    ours = build_flux(config, backend="local")
    sd = diffusers_to_megatron(model.state_dict(), config)
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return ours.eval(), config


def image_ids(h: int, w: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3).to(torch.float64)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def run_both(model, ours, batch, img_ids, txt_ids, seed=1):
    gen = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64, "generator": gen}
    img = torch.randn(batch, img_ids.shape[0], IN, **f64)
    txt = torch.randn(batch, txt_ids.shape[0], CTX, **f64)
    y = torch.randn(batch, VEC, **f64)
    t = torch.rand(batch, **f64)
    with torch.no_grad():
        ref = model(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        out = ours(img, txt, y, t, img_ids.expand(batch, -1, -1), txt_ids.expand(batch, -1, -1))
    assert out.shape == ref.shape == img.shape
    assert out.dtype == torch.float64
    return out, ref


CASES = [  # heads, double, single, batch, (h, w) patches, text length
    (1, 1, 1, 1, (2, 3), 5),
    (2, 1, 1, 2, (4, 2), 7),
    (3, 2, 1, 1, (2, 3), 7),
    (2, 2, 1, 2, (2, 3), 5),
    (1, 1, 2, 2, (4, 2), 5),
]


@pytest.mark.parametrize("heads,double,single,batch,grid,txt_len", CASES)
def test_matches_diffusers(megatron_world, heads, double, single, batch, grid, txt_len):
    model = random_diffusers(heads, double, single, seed=heads * 10 + double + single)
    ours, config = ours_from(model)
    out, ref = run_both(model, ours, batch, image_ids(*grid), torch.zeros(txt_len, 3, dtype=torch.float64))
    err = rel_err(out, ref)
    print(
        f"heads={heads} depth={double}+{single} batch={batch} grid={grid} txt={txt_len}: max rel err {err:.2e}"
    )
    assert ref.abs().max() > 1e-3  # the reference output is not trivially small
    assert err <= TOL
    # and the weights come back unchanged
    back = megatron_to_diffusers(ours.state_dict(), config)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_matches_diffusers_with_arbitrary_positions(megatron_world):
    """Non-zero text ids and fractional positions on all three axes exercise every RoPE frequency."""
    model = random_diffusers(2, 1, 1, seed=7)
    ours, _ = ours_from(model)
    gen = torch.Generator().manual_seed(3)
    # quarter steps up to 16: exact in float32, which is what diffusers turns the ids into
    img_ids = torch.randint(0, 64, (6, 3), generator=gen).to(torch.float64) / 4
    txt_ids = torch.randint(0, 64, (5, 3), generator=gen).to(torch.float64) / 4
    out, ref = run_both(model, ours, 2, img_ids, txt_ids)
    err = rel_err(out, ref)
    print(f"arbitrary positions: max rel err {err:.2e}")
    assert err <= TOL


def test_mapping_error_is_detected(megatron_world):
    """The comparison is sensitive: swapping two heads of one QKV weight breaks the match."""
    model = random_diffusers(2, 1, 1, seed=11)
    ours, _ = ours_from(model)
    key = "double_blocks.0.self_attention.img_linear_qkv.weight"
    w = ours.state_dict()[key]
    with torch.no_grad():
        ours.get_parameter(key).copy_(torch.cat([w[384:], w[:384]]))
    out, ref = run_both(model, ours, 1, image_ids(2, 3), torch.zeros(5, 3, dtype=torch.float64))
    assert rel_err(out, ref) > 1e-3
