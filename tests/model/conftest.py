"""Fixtures for the model tests."""

import pytest
import torch
from flux_testing import randomize_

from flux_nemo.model import FluxConfig, build_flux


@pytest.fixture
def build(megatron_world):
    """``build(**overrides)``: a tiny local-spec Flux with random weights, in eval mode."""

    def _build(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        model = build_flux(FluxConfig.from_flavor("tiny", **overrides), backend="local")
        return randomize_(model, seed).eval()

    return _build
