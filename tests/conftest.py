"""Shared test setup: GPU tests skip without CUDA; Megatron runs as a single gloo process on CPU."""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def megatron_world():
    """A single-process Megatron world (gloo on CPU), shared by the whole session."""
    from flux_nemo.shims import ensure_megatron_initialized

    ensure_megatron_initialized()
    yield


@pytest.fixture(autouse=True)
def _restore_environ():
    """Each test starts from the same environment: in-process training runs set the rendezvous variables, and
    Lightning's teardown deletes WORLD_SIZE but not MASTER_ADDR or RANK, which would leak into later tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
