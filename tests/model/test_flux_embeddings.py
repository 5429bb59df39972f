"""RoPE and timestep embedding against direct implementations of the reference formulas."""

import math

import pytest
import torch

from flux_nemo.model.embeddings import EmbedND, apply_interleaved_rope, rope_frequencies, timestep_embedding

AXES, THETA = (16, 56, 56), 10_000


def naive_rope_matrices(ids: torch.Tensor, axes_dim, theta) -> torch.Tensor:
    """BFL ``EmbedND``: one 2x2 rotation matrix per (token, pair), ``[b, s, sum(axes)/2, 2, 2]``, float64."""
    mats = []
    for i, dim in enumerate(axes_dim):
        for k in range(dim // 2):
            omega = 1.0 / theta ** (2 * k / dim)
            angle = ids[..., i].double() * omega
            cos, sin = torch.cos(angle), torch.sin(angle)
            mats.append(torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2))
    return torch.stack(mats, dim=2)


def naive_apply_rope(x: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """BFL ``apply_rope`` on ``x [b, heads, s, d]``: rotate pairs (2k, 2k+1) by the matrices."""
    pairs = x.double().reshape(*x.shape[:-1], -1, 2)  # [b, heads, s, d/2, 2]
    out = torch.einsum("bskij,bhskj->bhski", mats, pairs)
    return out.reshape(x.shape)


def random_ids(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    ids = torch.randint(0, 64, (batch, seq, 3), generator=gen).double()
    ids[:, :3] = 0  # some text-like tokens: identity rotation
    return ids


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_rope_matches_bfl_rotation_matrices(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    b, s, heads = 2, 9, 3
    ids = random_ids(b, s, gen)
    x = torch.randn(s, b, heads, sum(AXES), generator=gen, dtype=dtype)  # Megatron [s, b, np, hn]
    out = apply_interleaved_rope(x, EmbedND(AXES, THETA)(ids))
    ref = naive_apply_rope(x.permute(1, 2, 0, 3), naive_rope_matrices(ids, AXES, THETA)).permute(2, 0, 1, 3)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_rope_bf16_is_computed_in_fp32_and_cast_back():
    gen = torch.Generator().manual_seed(1)
    ids = random_ids(1, 7, gen)
    x = torch.randn(7, 1, 2, 128, generator=gen).bfloat16()
    out = apply_interleaved_rope(x, EmbedND(AXES, THETA)(ids))
    ref = naive_apply_rope(x.permute(1, 2, 0, 3), naive_rope_matrices(ids, AXES, THETA)).permute(2, 0, 1, 3)
    assert out.dtype == torch.bfloat16
    # Only the final rounding to bf16 differs from the exact rotation of the bf16 input.
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=1e-6)


def test_rope_table_layout_and_broadcast():
    ids = torch.tensor([[[0.0, 3.0, 5.0]]])  # one token
    freqs = rope_frequencies(ids, AXES, THETA)
    assert freqs.shape == (1, 1, 1, 128) and freqs.dtype == torch.float64
    angles = freqs[0, 0, 0]
    assert torch.equal(angles[0::2], angles[1::2])  # each angle serves one interleaved pair
    assert torch.all(angles[:16] == 0)  # axis 0 (always 0) never rotates
    # Axis 2 restarts its own frequency ladder: its first pair has omega = 1, i.e. angle = col.
    assert angles[16] == 3.0 and angles[16 + 56] == 5.0
    assert math.isclose(angles[16 + 2].item(), 3.0 / THETA ** (2 / 56), rel_tol=1e-14)


def test_rope_per_sample_ids_and_shared_ids_agree():
    gen = torch.Generator().manual_seed(2)
    ids = random_ids(1, 5, gen)
    x = torch.randn(5, 3, 2, 128, generator=gen)
    shared = apply_interleaved_rope(x, EmbedND(AXES, THETA)(ids))
    per_sample = apply_interleaved_rope(x, EmbedND(AXES, THETA)(ids.expand(3, -1, -1)))
    torch.testing.assert_close(shared, per_sample, rtol=0, atol=0)


def naive_timestep_embedding(t: float, dim: int = 256) -> list[float]:
    half = dim // 2
    args = [1000.0 * t * math.exp(-math.log(10_000) * j / half) for j in range(half)]
    return [math.cos(a) for a in args] + [math.sin(a) for a in args]


def test_timestep_embedding_matches_formula_cos_first():
    t = torch.tensor([0.0, 0.25, 0.7311, 1.0], dtype=torch.float64)
    emb = timestep_embedding(t, 256)
    assert emb.shape == (4, 256) and emb.dtype == torch.float64
    ref = torch.tensor([naive_timestep_embedding(v) for v in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(emb, ref, rtol=1e-12, atol=1e-12)
    assert torch.all(emb[0, :128] == 1) and torch.all(emb[0, 128:] == 0)  # t = 0: cos first


def test_timestep_embedding_scales_in_fp32_for_bf16_inputs():
    t = torch.tensor([0.3, 0.9]).bfloat16()
    emb = timestep_embedding(t, 256)
    assert emb.dtype == torch.bfloat16
    # The bf16 value of t is used as is, but 1000 * t and the angles are not rounded to bf16.
    ref = torch.tensor([naive_timestep_embedding(v) for v in t.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(emb.double(), ref, rtol=2**-8, atol=2e-4)
