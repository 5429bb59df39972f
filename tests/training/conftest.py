"""Fixtures of the tiny end-to-end CPU runs: one synthetic dataset per session, fresh run directories."""

import pytest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> list[str]:
    """Overrides pointing at one session-wide synthetic dataset (written on first use by the run)."""
    root = tmp_path_factory.mktemp("synthetic")
    return [
        f"data.train_path={root}/train",
        f"data.eval_path={root}/eval",
        f"data.empty_encodings_path={root}/empty_encodings",
    ]


@pytest.fixture
def run_dirs(tmp_path) -> list[str]:
    return [f"mlperf.log_file={tmp_path}/result_0.txt", f"exp_manager.exp_dir={tmp_path}/exp"]
