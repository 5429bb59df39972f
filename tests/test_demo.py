"""``make demo``'s entry point: which MLPerf log it writes and checks."""

from pathlib import Path

import pytest

from flux_nemo import demo
from flux_nemo.training import run as run_module


class _Result:
    status, steps, evals, final_eval, time_to_train_s = "success", 1, [], 0.5, 1.0


def test_an_overridden_log_file_is_the_one_checked(tmp_path: Path, monkeypatch):
    """The compliance checker reads ``mlperf.log_file`` as given (it used to read the default path)."""
    log = tmp_path / "logs" / "result_7.txt"
    checked, trained = [], []
    monkeypatch.setattr(run_module, "run", lambda cfg, **kw: trained.append(cfg.mlperf.log_file) or _Result())
    monkeypatch.setattr(demo, "compliance_check", lambda path: checked.append(path) or True)
    assert demo.main([f"mlperf.log_file={log}", f"exp_manager.exp_dir={tmp_path}/exp"]) == 0
    assert trained == [str(log)] and checked == [log]


def test_an_existing_overridden_log_file_is_refused_and_kept(tmp_path: Path, monkeypatch):
    log = tmp_path / "result_0.txt"
    log.write_text("an earlier run\n")
    monkeypatch.setattr(run_module, "run", lambda cfg, **kw: pytest.fail("must not train"))
    with pytest.raises(SystemExit, match=r"mlperf.log_file=.*result_0.txt already exists"):
        demo.main([f"mlperf.log_file={log}", f"exp_manager.exp_dir={tmp_path}/exp"])
    assert log.read_text() == "an earlier run\n"
