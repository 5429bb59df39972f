"""The result-package command on synthetic CPU logs (driven through MLPerfLogger) and the real checkers."""

import json
from pathlib import Path

import pytest
from mlperf_runs import RunSpec, run_module, write_run

from flux_nemo.mlperf import constants as C
from flux_nemo.mlperf.package import SYSTEM_FIELDS, olympic_mean

DATA = Path(__file__).parent / "data"
TINY_RCP = DATA / "rcps_flux1_tiny_demo.json"
# Validation-loss curves of the synthetic GBS-16 runs, by the number of evals they need to reach 0.586.
CURVES = {
    3: [0.93, 0.71, 0.583],
    4: [0.95, 0.72, 0.62, 0.579],
    5: [0.91, 0.74, 0.66, 0.6, 0.585],
    6: [0.94, 0.75, 0.67, 0.63, 0.6, 0.59],  # never reaches the target: aborted
}
RESULT_PLAN = [4, 3, 4, 5, 4, 4, 3, 4, 5, 4]


def _write_set(folder: Path, plan: list[int], seed0: int) -> list[dict]:
    folder.mkdir(parents=True)
    return [
        write_run(
            folder / f"mlperf_run{i:02d}.log",
            RunSpec(
                seed=seed0 + 7919 * i,
                evals=CURVES[k],
                start=1.8e9 + i * 86_400,
                step_seconds=0.004 + 0.0003 * i,
            ),
        )
        for i, k in enumerate(plan)
    ]


def _system_json(path: Path) -> Path:
    desc = {
        f: f"test value of {f}"
        for f in SYSTEM_FIELDS
        if f not in ("submitter", "division", "status", "system_name")
    }
    desc.update(
        number_of_nodes="1", accelerators_per_node="0", status="Research, Development, or Internal (RDI)"
    )
    path.write_text(json.dumps(desc))
    return path


def _package(tmp: Path, logs: Path, *extra: str):
    res = run_module(
        "flux_nemo.mlperf.package", "--logs", str(logs), "--out", str(tmp / "sub"), "--system", "tiny_cpu",
        "--system-json", str(_system_json(tmp / "sys.json")), *extra,
    )  # fmt: skip
    summary_file = tmp / "sub" / "checker_logs" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    return res, summary


def test_olympic_mean():
    assert olympic_mean([5.0, 1.0, 3.0, 4.0, 2.0]) == pytest.approx(3.0)
    assert olympic_mean([5.0, 1.0, None, 4.0, 2.0]) == pytest.approx((2.0 + 4.0 + 5.0) / 3)
    assert olympic_mean([5.0, None, None, 4.0]) is None


def test_custom_rcp_file_is_reproducible(tmp_path):
    """The committed demo RCP is exactly what `python -m flux_nemo.mlperf.rcp` makes from 20 reference runs."""
    committed = json.loads(TINY_RCP.read_text())
    ((name, record),) = committed.items()
    plan = [s // C.EVAL_EVERY_SAMPLES for s in record["samples to converge"]]
    _write_set(tmp_path / "ref", plan, seed0=50_000)
    out = tmp_path / "rcp.json"
    res = run_module(
        "flux_nemo.mlperf.rcp", "--logs", str(tmp_path / "ref"), "--out", str(out), "--name", name,
        "--creator", record["Creator"], "--platform", record["Platform"], "--when", record["When"],
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text()) == committed
    _write_set(tmp_path / "bad", [4, 6, 4], seed0=1)
    res = run_module(
        "flux_nemo.mlperf.rcp", "--logs", str(tmp_path / "bad"), "--out", str(out), "--name", "x"
    )
    assert res.returncode == 2 and "not a converged flux1 run" in res.stderr


def test_package_passes_with_custom_rcps(tmp_path):
    runs = _write_set(tmp_path / "logs", RESULT_PLAN, seed0=12_345)
    res, s = _package(tmp_path, tmp_path / "logs", "--custom-rcps", str(TINY_RCP))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "RESULT: PASS" in res.stdout
    bench = tmp_path / "sub" / "results" / "tiny_cpu" / "flux1"
    assert sorted(p.name for p in bench.iterdir()) == sorted(f"result_{i}.txt" for i in range(10))
    assert (bench / "result_3.txt").read_text() == (tmp_path / "logs" / "mlperf_run03.log").read_text()
    desc = json.loads((tmp_path / "sub" / "systems" / "tiny_cpu.json").read_text())
    assert (
        set(SYSTEM_FIELDS) <= set(desc) and desc["submitter"] == "flux-nemo" and desc["division"] == "closed"
    )
    assert s["system_placeholders"] == []
    checks = s["checks"]
    assert all(checks[k]["passed"] for k in ("system_desc", "compliance", "rcp", "package_checker", "score"))
    assert "RCP found, RCP test PASSED" in checks["rcp"]["message"]
    assert [r["samples"] for r in s["runs"]] == [k * C.EVAL_EVERY_SAMPLES for k in RESULT_PLAN]
    # Score: olympic mean of the timed minutes the driver produced (time_ms is truncated to whole ms).
    expected = sorted(r["minutes"] for r in runs)[1:-1]
    expected = sum(expected) / len(expected)
    assert checks["score"]["score"] == pytest.approx(expected, abs=1e-4)
    assert checks["score"]["olympic_mean_minutes"] == pytest.approx(expected, abs=1e-4)


def test_two_non_converged_runs_fail_the_rcp_check(tmp_path):
    _write_set(tmp_path / "logs", [4, 3, 6, 5, 4, 4, 3, 6, 5, 4], seed0=777)
    res, s = _package(tmp_path, tmp_path / "logs", "--custom-rcps", str(TINY_RCP))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "RESULT: FAIL" in res.stdout
    assert s["checks"]["rcp"]["passed"] is False
    assert "Insufficient convergence" in s["checks"]["rcp"]["message"]
    assert s["checks"]["compliance"]["non_compliant"] == ["result_2.txt", "result_7.txt"]
    assert s["checks"]["score"]["olympic_mean_minutes"] is None


def test_official_rcps_reject_tiny_runs_unless_bypassed(tmp_path):
    _write_set(tmp_path / "logs", RESULT_PLAN, seed0=99)
    res, s = _package(tmp_path, tmp_path / "logs", "--rcp-bypass")
    assert res.returncode == 0, res.stdout + res.stderr
    rcp = s["checks"]["rcp"]
    assert rcp["passed"] is False and rcp["bypassed"] is True and "Missing RCP" in rcp["message"]
    params = tmp_path / "sub" / "results" / "tiny_cpu" / "flux1" / "package_checker_params"
    assert params.read_text() == "rcp-bypass"
    assert "(BYPASSED)" in res.stdout


def test_input_errors(tmp_path):
    _write_set(tmp_path / "logs", RESULT_PLAN[:9], seed0=5)
    res = run_module("flux_nemo.mlperf.package", "--logs", str(tmp_path / "logs"), "--out", str(tmp_path / "o"),
                     "--system", "s")  # fmt: skip
    assert (
        res.returncode == 2 and "exactly 10 run logs, got 9" in res.stderr and "--allow-fewer" in res.stderr
    )
    assert not (tmp_path / "o").exists()
    res = run_module("flux_nemo.mlperf.package", "--logs", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                     "--system", "s")  # fmt: skip
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_a_result_directory_means_its_result_files(tmp_path):
    """A failed compliance check quotes the offending ``:::MLLOG`` line: its output, next to the results, must not
    be taken for an 11th run. Without result_<i>.txt files any log holding MLLOG lines is a run (e.g. slurm-*.out)."""
    from flux_nemo.mlperf.package import collect_logs

    line = ':::MLLOG {"key": "run_start"}\n'
    for name in ["result_0.txt", "result_1.txt"]:
        (tmp_path / name).write_text(line)
    (tmp_path / "compliance_0.log").write_text(
        f"WARNING -  CHECK for 'x' failed in line 10:\n{line}ERROR - FAILED\n"
    )
    assert [f.name for f in collect_logs([str(tmp_path)])] == ["result_0.txt", "result_1.txt"]
    other = tmp_path / "slurm"
    other.mkdir()
    (other / "slurm-7.out").write_text(f"noise\n{line}")
    (other / "notes.txt").write_text("no log lines\n")
    assert [f.name for f in collect_logs([str(other)])] == ["slurm-7.out"]
