"""``bench/qk_norm_rope.py``: its formulations of the QK norm + RoPE rotation compute the model's op (CPU, eager;
the timing needs a GPU)."""

import pytest
import torch

from bench.qk_norm_rope import VARIANTS


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_equal_the_models_op(name):
    gen = torch.Generator().manual_seed(0)
    s, b, h, d = 6, 2, 3, 16
    mixed, bias = torch.randn(s, b, h, 3 * d, generator=gen), torch.randn(h * 3 * d, generator=gen)
    q_weight, k_weight = torch.rand(d, generator=gen) + 0.5, torch.rand(d, generator=gen) + 0.5
    angles = torch.rand(s, 1, 1, d // 2, generator=gen, dtype=torch.float64).repeat_interleave(2, -1)
    args = (mixed, bias, q_weight, k_weight, angles.cos().float(), angles.sin().float())
    for out, want in zip(VARIANTS[name](*args), VARIANTS["stack"](*args), strict=True):
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
