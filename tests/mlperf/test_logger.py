import json
import os
import subprocess
import sys

import pytest
from mlperf_runs import RunSpec, compliance, write_run

from flux_nemo.mlperf import constants as C
from flux_nemo.mlperf.logger import MLPerfLogger, seed_from_urandom


def _records(path):
    out = []
    for line in path.read_text().splitlines():
        assert line.startswith(":::MLLOG "), line
        out.append(json.loads(line[len(":::MLLOG ") :]))
    return out


def test_full_run_passes_compliance_checker(tmp_path):
    log = tmp_path / "result_0.txt"
    info = write_run(log, RunSpec(seed=1234, evals=[0.95, 0.74, 0.66, 0.6, 0.583]))
    assert info["status"] == "success" and info["samples"] == 5 * C.EVAL_EVERY_SAMPLES
    res = compliance(log, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr

    recs = _records(log)
    keys = [r["key"] for r in recs]
    assert keys[:3] == ["cache_clear", "init_start", "submission_benchmark"]
    assert keys.index("global_batch_size") < keys.index("evaluation_frequency")
    assert keys.index("seed") < keys.index("init_stop") < keys.index("run_start") < keys.index("block_start")
    assert keys[-4:] == ["eval_start", "eval_accuracy", "eval_stop", "run_stop"]
    by_key = {r["key"]: r for r in recs}
    assert by_key["seed"]["value"] == 1234
    assert by_key["seed"]["metadata"]["file"].endswith("mlperf_runs.py")  # call site, not logger.py
    assert by_key["evaluation_frequency"]["value"] == 262144
    assert by_key["run_stop"]["metadata"] == {
        **by_key["run_stop"]["metadata"],
        "status": "success",
        "samples_count": 5 * 262144,
    }
    evals = [r for r in recs if r["key"] == "eval_accuracy"]
    assert [e["metadata"]["samples_count"] for e in evals] == [k * 262144 for k in range(1, 6)]


def test_run_without_eval_below_target_fails_checker(tmp_path):
    log = tmp_path / "result_0.txt"
    info = write_run(log, RunSpec(seed=5, evals=[0.9, 0.7, 0.61]))
    assert info["status"] == "aborted"
    res = compliance(log, tmp_path)
    assert res.returncode != 0
    assert "FAILED" in res.stdout + res.stderr


def test_non_power_of_two_gbs_needs_ceil_frequency(tmp_path):
    good = tmp_path / "good.txt"
    write_run(good, RunSpec(seed=9, gbs=2304, mbs=32, evals=[0.7, 0.58], blocks_per_eval=3))
    freq = [r["value"] for r in _records(good) if r["key"] == "evaluation_frequency"]
    assert freq == [262656]
    res = compliance(good, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    # The 6.0-style value (262144) is wrong for GBS 2304 under 6.1.0.
    bad = tmp_path / "bad.txt"
    bad.write_text(
        good.read_text().replace(
            '"evaluation_frequency", "value": 262656', '"evaluation_frequency", "value": 262144'
        )
    )
    assert bad.read_text() != good.read_text()
    res = compliance(bad, tmp_path)
    assert res.returncode != 0 and "FAILED" in res.stdout + res.stderr


def test_only_rank_zero_writes(tmp_path, capsys):
    other = tmp_path / "rank1.txt"
    write_run(other, RunSpec(seed=77, evals=[0.5], rank=1))
    lg = MLPerfLogger(tmp_path / "rank3.txt", rank=3, stdout=True)
    lg.init_start()
    assert not other.exists() and not (tmp_path / "rank3.txt").exists()
    assert ":::MLLOG" not in capsys.readouterr().out
    lg0 = MLPerfLogger(tmp_path / "rank0.txt", rank=0, stdout=True)
    lg0.init_start()
    lg0.close()
    assert capsys.readouterr().out.count(":::MLLOG") == 2
    assert len(_records(tmp_path / "rank0.txt")) == 2


HYPERPARAMETERS = dict(
    global_batch_size=64,
    micro_batch_size=8,
    learning_rate=1e-4,
    warmup_steps=0,
    seed=3,
    train_samples=100,
    eval_samples=10,
    config_filename="c.yaml",
)


def _configured(tmp_path, **over):
    lg = MLPerfLogger(tmp_path / "log.txt", rank=0, stdout=False)
    lg.init_start()
    lg.hyperparameters(**(HYPERPARAMETERS | over))
    return lg


@pytest.mark.parametrize(
    "over, exc, msg",
    [
        ({"precision_linear": "bf16"}, ValueError, "precision_linear='bf16' is not allowed"),
        ({"precision_comm": "FP32"}, ValueError, "precision_comm"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"seed": "7"}, TypeError, "seed must be an int"),
        ({"seed": True}, TypeError, "seed must be an int"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"micro_batch_size": 3}, ValueError, "not a multiple"),
        ({"tensor_parallelism": 0}, ValueError, "tensor_parallelism"),
        ({"config_filename": ""}, ValueError, "config_filename"),
        ({"submission_division": "Closed"}, ValueError, "submission_division"),
        ({"learning_rate": float("nan")}, TypeError, "learning_rate"),
    ],
)
def test_invalid_arguments_raise_and_emit_nothing(tmp_path, over, exc, msg):
    with pytest.raises(exc, match=msg):
        _configured(tmp_path, **over)
    assert [r["key"] for r in _records(tmp_path / "log.txt")] == ["cache_clear", "init_start"]


def test_event_order_is_enforced(tmp_path):
    lg = MLPerfLogger(tmp_path / "a.txt", rank=0, stdout=False)
    with pytest.raises(RuntimeError, match="hyperparameters is not allowed in phase 'new'"):
        lg.hyperparameters(**HYPERPARAMETERS)
    lg = _configured(tmp_path)
    with pytest.raises(RuntimeError, match="block_start is not allowed"):
        lg.block_start(0)
    with pytest.raises(RuntimeError, match="hyperparameters is not allowed"):
        lg.hyperparameters(**HYPERPARAMETERS)
    lg.init_stop_run_start()
    with pytest.raises(RuntimeError, match="eval_accuracy outside"):
        lg.eval_accuracy(0.5, 0)
    lg.block_start(0)
    with pytest.raises(RuntimeError, match="close the training block"):
        lg.eval_start(64)
    lg.block_stop(64)
    with pytest.raises(RuntimeError, match="below the previous value"):
        lg.eval_start(32)
    lg.eval_start(64)
    lg.eval_accuracy(0.7, 64)
    lg.eval_stop(64)
    with pytest.raises(RuntimeError, match="last eval_accuracy 0.7"):
        lg.run_stop("success", 64)
    with pytest.raises(ValueError, match="status"):
        lg.run_stop("done", 64)
    lg.run_stop("aborted", 64)
    with pytest.raises(RuntimeError, match="phase 'stopped'"):
        lg.block_start(64)


def test_seed_from_urandom():
    seeds = {seed_from_urandom() for _ in range(8)}
    assert all(isinstance(s, int) and 0 <= s < 2**31 for s in seeds)
    assert len(seeds) > 1


def test_explicit_off_rule_evaluation_frequency_is_logged_honestly(tmp_path):
    log = tmp_path / "result_0.txt"
    write_run(log, RunSpec(seed=11, evals=[0.5], extra={"evaluation_frequency": 4096}))
    assert [r["value"] for r in _records(log) if r["key"] == "evaluation_frequency"] == [4096]
    res = compliance(log, tmp_path)
    assert res.returncode != 0 and "FAILED" in res.stdout + res.stderr


def test_default_rank_comes_from_the_launcher_environment(tmp_path):
    """rank=None: $RANK, else $SLURM_PROCID (no torch.distributed world in this fresh process)."""
    script = (
        "import os, sys; from pathlib import Path; from flux_nemo.mlperf.logger import MLPerfLogger\n"
        "out = Path(sys.argv[1])\n"
        "for name, env in [('a', {'SLURM_PROCID': '2'}), ('b', {'RANK': '0', 'SLURM_PROCID': '2'}), ('c', {'RANK': '3'})]:\n"
        "    for k in ('RANK', 'SLURM_PROCID'): os.environ.pop(k, None)\n"
        "    os.environ.update(env)\n"
        "    lg = MLPerfLogger(out / name, stdout=False); lg.init_start(); lg.close(); print(name, lg.rank)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID")}
    res = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["a", "2", "b", "0", "c", "3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_log_file_holds_one_run_unless_append(tmp_path):
    log = tmp_path / "sub" / "result_0.txt"
    for _ in range(2):
        lg = MLPerfLogger(log, rank=0, stdout=False)
        lg.init_start()
        lg.close()
    assert [r["key"] for r in _records(log)] == ["cache_clear", "init_start"]
    lg = MLPerfLogger(log, rank=0, stdout=False, append=True)
    lg.init_start()
    lg.close()
    assert [r["key"] for r in _records(log)] == ["cache_clear", "init_start"] * 2
