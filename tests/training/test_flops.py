"""Model FLOPs per sample reproduce the published Flux.1-schnell numbers."""

import pytest

from flux_nemo.model import FluxConfig
from flux_nemo.training.flops import double_block_flops, flops_per_sample, single_block_flops


def test_block_flops_at_256_plus_256_tokens():
    h, ffn = 3072, 12288
    # token-wise work + attention of one block, training (3x forward): 0.3574 TFLOP (brief), 0.35756 exact
    double = 3 * double_block_flops(h, ffn, 256, 256, modulation=False) / 1e12
    single = 3 * single_block_flops(h, ffn, 512, modulation=False) / 1e12
    assert double == pytest.approx(0.3574, rel=1e-3)
    assert single == pytest.approx(double)  # 12 h^2 per token in both block types
    assert 3 * double_block_flops(h, ffn, 256, 256) > 3 * double_block_flops(
        h, ffn, 256, 256, modulation=False
    )


def test_full_schnell_model_is_20_4_tflop_per_sample():
    config = FluxConfig.from_flavor("schnell")
    assert flops_per_sample(config, 256, 256) / 1e12 == pytest.approx(20.4, rel=2e-3)


def test_flops_scale_with_depth_and_tokens():
    small = FluxConfig.from_flavor("tiny")
    deeper = FluxConfig.from_flavor("tiny", num_single_blocks=small.num_single_blocks + 1)
    assert flops_per_sample(deeper, 16, 16) > flops_per_sample(small, 16, 16)
    assert flops_per_sample(small, 64, 16) > flops_per_sample(small, 16, 16)
