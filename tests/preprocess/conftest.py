"""Fixtures for the preprocessing-script tests: tiny local encoders in HF layout."""

import pytest

from flux_nemo.data.tiny_assets import write_tiny_encoders


@pytest.fixture(scope="session")
def tiny_encoder_paths(tmp_path_factory):
    return write_tiny_encoders(tmp_path_factory.mktemp("tiny_encoders"))
