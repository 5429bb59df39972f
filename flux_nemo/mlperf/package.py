"""Lay out an MLPerf Training flux1 submission from result logs and run the official checkers on it.

    python -m flux_nemo.mlperf.package --logs <dir or files...> --out <submission_root> --system <name>
        [--org ORG] [--system-json FILE] [--rcp-bypass | --custom-rcps FILE] [--allow-fewer] [--overwrite]

Logs may come from any source (our MLPerfLogger, other implementations, stdout captures with srun prefixes):
a folder contributes every regular file directly in it that contains ``:::MLLOG`` lines, taken in name order.
The tree written under ``--out``::

    results/<system>/flux1/result_<i>.txt     copies of the logs, i = 0..N-1 in input order
    systems/<system>.json                      system description (fields required by the 6.1.0 checker)
    checker_logs/                              checker outputs and summary.json (not part of a submission)

Checks, all from the installed mlperf-logging wheel (training 6.1.0): system_desc_checker on the JSON, the
compliance checker on every result file (one non-compliant file is tolerated, as under olympic scoring),
the RCP checker on the set (official RCPs, or ``--custom_rcps`` for demo runs), the package checker on the
tree (only with exactly 10 runs), and compute_score. Exit status 0 only if every check passed. See
docs/MLPERF.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from flux_nemo.mlperf import constants as C

TOKEN = ":::MLLOG "
# Fields system_desc_checker.check_system_desc requires for training (wheel 4.1.68).
SYSTEM_FIELDS = (
    "submitter", "division", "status", "system_name", "number_of_nodes", "host_processors_per_node",
    "host_processor_model_name", "host_processor_core_count", "host_processor_vcpu_count",
    "host_processor_frequency", "host_processor_caches", "host_processor_interconnect", "host_memory_capacity",
    "host_storage_type", "host_storage_capacity", "host_networking", "host_networking_topology",
    "host_memory_configuration", "accelerators_per_node", "accelerator_model_name",
    "accelerator_host_interconnect", "accelerator_frequency", "accelerator_on-chip_memories",
    "accelerator_memory_configuration", "accelerator_memory_capacity", "accelerator_interconnect",
    "accelerator_interconnect_topology", "cooling", "hw_notes", "framework", "other_software_stack",
    "operating_system", "sw_notes",
)  # fmt: skip
PLACEHOLDER = "TO BE FILLED (flux_nemo.mlperf.package placeholder)"
# Hyper-parameter keys an RCP record lists (rcp_checker/training_6.1.0/rcps_flux1.json).
HPARAM_KEYS = (
    "opt_adamw_beta_1", "opt_adamw_beta_2", "opt_adamw_epsilon", "opt_adamw_weight_decay",
    "opt_base_learning_rate", "opt_learning_rate_warmup_steps", "opt_gradient_clip_norm",
)  # fmt: skip
SCORE_RE = re.compile(r"Final score - Time to Train \(minutes\): (\S+)")


class PackageError(Exception):
    """Bad input: the package cannot be built (exit status 2)."""


@dataclass
class RunLog:
    source: str
    benchmark: str | None
    org: str | None
    division: str | None
    status: str | None
    platform: str | None
    gbs: int | None
    seed: int | None
    run_start_ms: int | None
    run_stop_ms: int | None
    stop_status: str | None
    samples: int | None  # samples_count of the last eval_accuracy before run_stop
    evals: int
    hparams: dict

    @property
    def minutes(self) -> float | None:
        if self.run_start_ms is None or self.run_stop_ms is None:
            return None
        return (self.run_stop_ms - self.run_start_ms) / 60_000


def parse_log(path: Path) -> RunLog:
    """Read the ``:::MLLOG`` records of one log (anything before the token on a line is ignored)."""
    first: dict[str, object] = {}
    run = dict(run_start_ms=None, run_stop_ms=None, stop_status=None, samples=None, evals=0)
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if TOKEN not in line:
            continue
        try:
            rec = json.loads(line.split(TOKEN, 1)[1])
        except json.JSONDecodeError as e:
            raise PackageError(f"{path}: unparsable MLLOG line: {line[:200]!r} ({e})") from e
        key, meta = rec.get("key"), rec.get("metadata") or {}
        first.setdefault(key, rec.get("value"))
        if key == "run_start" and run["run_start_ms"] is None:
            run["run_start_ms"] = rec["time_ms"]
        elif key == "eval_accuracy" and run["run_stop_ms"] is None:
            run["evals"] += 1
            run["samples"] = meta.get("samples_count")
        elif key == "run_stop" and run["run_stop_ms"] is None:
            run["run_stop_ms"], run["stop_status"] = rec["time_ms"], meta.get("status")
    return RunLog(
        source=str(path),
        benchmark=first.get("submission_benchmark"),
        org=first.get("submission_org"),
        division=first.get("submission_division"),
        status=first.get("submission_status"),
        platform=first.get("submission_platform"),
        gbs=first.get("global_batch_size"),
        seed=first.get("seed"),
        hparams={k: first[k] for k in HPARAM_KEYS if k in first},
        **run,
    )


def collect_logs(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if (
            p.is_dir()
        ):  # MLPerf's result_<i>.txt if there are any (not, e.g., a checker's output quoting lines)
            results = sorted(
                (f for f in p.glob("result_*.txt") if f.is_file()), key=lambda f: (len(f.name), f.name)
            )
            files += results or [
                f for f in sorted(p.iterdir()) if f.is_file() and TOKEN in f.read_text(errors="replace")
            ]
        elif p.is_file():
            files.append(p)
        else:
            raise PackageError(f"--logs: {p} does not exist")
    if not files:
        raise PackageError(f"--logs {' '.join(paths)}: no file with {TOKEN.strip()} lines found")
    if len({f.resolve() for f in files}) != len(files):
        raise PackageError("--logs: the same file was given twice")
    return files


def validate_runs(runs: list[RunLog], allow_fewer: bool) -> None:
    n = len(runs)
    if n > C.RESULT_RUNS or (n < C.RESULT_RUNS and not allow_fewer):
        raise PackageError(
            f"a flux1 result needs exactly {C.RESULT_RUNS} run logs, got {n}"
            + (
                ""
                if n > C.RESULT_RUNS
                else " (pass --allow-fewer to check an incomplete set; not a valid package)"
            )
        )
    for r in runs:
        if r.benchmark != C.BENCHMARK:
            raise PackageError(
                f"{r.source}: submission_benchmark is {r.benchmark!r}, expected {C.BENCHMARK!r}"
            )
    for field in ("gbs", "org", "division"):
        values = {getattr(r, field) for r in runs}
        if len(values) != 1:
            raise PackageError(f"the logs disagree on {field}: {sorted(map(str, values))}")


def olympic_mean(scores: list[float | None]) -> float | None:
    """MLPerf olympic mean: None entries (failed runs) count as the slowest; drop fastest and slowest.

    More than one failed run, or nothing left after dropping, gives None (no score).
    """
    good = sorted(s for s in scores if s is not None)
    dropped = len(scores) - len(good)
    if dropped > 1:
        return None
    kept = good[1 : len(good) - (1 - dropped)]
    return sum(kept) / len(kept) if kept else None


def system_description(system: str, runs: list[RunLog], org: str, overrides: dict) -> tuple[dict, list[str]]:
    """Every required field; values from --system-json win. Returns (description, fields left as placeholder)."""
    desc = {f: PLACEHOLDER for f in SYSTEM_FIELDS}
    desc.update(
        submitter=org,
        division=runs[0].division,
        status=C.SUBMISSION_STATUSES.get(runs[0].status, PLACEHOLDER),
        system_name=system,
    )
    desc.update(overrides)
    if desc["submitter"] != org or desc["division"] != runs[0].division:
        raise PackageError(
            f"--system-json says submitter/division {desc['submitter']!r}/{desc['division']!r}, "
            f"the package is {org!r}/{runs[0].division!r}"
        )
    return desc, [f for f in SYSTEM_FIELDS if desc[f] == PLACEHOLDER]


def _run(args: list[str], log: Path) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    log.write_text(f"$ python {' '.join(args)}\n[exit {res.returncode}]\n{res.stdout}\n{res.stderr}")
    return res


def _compute_score(bench: Path, system: str, scale: bool, logs: Path) -> dict:
    base = ["--benchmark_folder", str(bench), "--usage", C.USAGE, "--ruleset", C.RULESET, "--system", system]
    res = _run(["-m", "mlperf_logging.result_summarizer.compute_score", *base, *(["--scale"] if scale else [])],
               logs / "compute_score.log")  # fmt: skip
    out = {"cli_exit": res.returncode, "score": None, "via": "compute_score"}
    m = SCORE_RE.search(res.stdout)
    if res.returncode == 0 and m:
        out["score"] = None if m.group(1) == "None" else float(m.group(1))
        return out
    # mlperf-logging 4.1.68: compute_score unpacks 4 of the 5 values that
    # _compute_strong_score_standalone(return_full_scores=True) returns and crashes. Call the function it wraps.
    out["cli_error"] = (res.stderr.strip().splitlines() or ["no score line"])[-1]
    code = (
        "import json, sys; from mlperf_logging.result_summarizer import result_summarizer as r; "
        "s = r._compute_strong_score_standalone(sys.argv[1], sys.argv[2], False, sys.argv[3], sys.argv[4], "
        "sys.argv[5]); print(json.dumps({'score': s[0], 'scaling': s[2]}))"
    )
    res = _run(["-c", code, C.BENCHMARK, system, str(bench), C.USAGE, C.RULESET], logs / "score_fallback.log")
    if res.returncode == 0:
        out.update(json.loads(res.stdout.strip().splitlines()[-1]), via="result_summarizer fallback")
    return out


def build_package(
    logs: list[str],
    out: Path,
    system: str,
    *,
    org: str | None = None,
    system_json: Path | None = None,
    rcp_bypass: bool = False,
    custom_rcps: Path | None = None,
    allow_fewer: bool = False,
    overwrite: bool = False,
) -> dict:
    """Build the tree under ``out``, run every checker, return the summary (also written to summary.json)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", system):
        raise PackageError(f"--system {system!r}: use letters, digits, '.', '_' and '-' only")
    if rcp_bypass and custom_rcps is not None:
        raise PackageError("--rcp-bypass and --custom-rcps are exclusive")
    if custom_rcps is not None and not Path(custom_rcps).is_file():
        raise PackageError(f"--custom-rcps {custom_rcps}: no such file")
    files = collect_logs(logs)
    runs = [parse_log(f) for f in files]
    validate_runs(runs, allow_fewer)
    org = org or runs[0].org
    overrides = json.loads(Path(system_json).read_text()) if system_json else {}
    desc, placeholders = system_description(system, runs, org, overrides)

    out = Path(out)
    bench = out / "results" / system / C.BENCHMARK
    if bench.exists() and any(bench.iterdir()):
        if not overwrite:
            raise PackageError(f"{bench} is not empty (pass --overwrite to replace it)")
        shutil.rmtree(bench)
    bench.mkdir(parents=True)
    for i, f in enumerate(files):
        shutil.copyfile(f, bench / f"result_{i}.txt")
    if rcp_bypass:  # the package checker reads this exact line (no newline) and bypasses a failed RCP test
        (bench / "package_checker_params").write_text("rcp-bypass")
    (out / "systems").mkdir(parents=True, exist_ok=True)
    sys_json = out / "systems" / f"{system}.json"
    sys_json.write_text(json.dumps(desc, indent=2) + "\n")
    clog = out / "checker_logs"
    clog.mkdir(exist_ok=True)

    checks: dict[str, dict] = {}
    res = _run(["-m", "mlperf_logging.system_desc_checker", str(sys_json), C.USAGE, C.RULESET,
                "--log_output", str(clog / "system_desc_checker.out")], clog / "system_desc.log")  # fmt: skip
    checks["system_desc"] = {"passed": "System description checker passed" in res.stdout + res.stderr}

    per_run = []
    for i, run in enumerate(runs):
        res = _run(["-m", "mlperf_logging.compliance_checker", "--usage", C.USAGE, "--ruleset", C.RULESET,
                    "--log_output", str(clog / f"compliance_{i}.out"), str(bench / f"result_{i}.txt")],
                   clog / f"compliance_{i}.log")  # fmt: skip
        ok = res.returncode == 0 and "SUCCESS" in res.stdout + res.stderr
        per_run.append({"result": f"result_{i}.txt", **asdict(run), "minutes": run.minutes, "compliant": ok})
    failed = [p["result"] for p in per_run if not p["compliant"]]
    checks["compliance"] = {"passed": len(failed) <= 1, "non_compliant": failed}

    rcp_args = [
        "--rcp_usage",
        C.USAGE,
        "--rcp_version",
        C.RULESET,
        "--log_output",
        str(clog / "rcp_checker.out"),
    ]
    if custom_rcps is not None:
        rcp_args += ["--custom_rcps", str(custom_rcps)]
    res = _run(["-m", "mlperf_logging.rcp_checker", *rcp_args, str(bench)], clog / "rcp_checker.log")
    msg = [ln for ln in (res.stdout + res.stderr).splitlines() if "RCP test" in ln]
    checks["rcp"] = {
        "passed": res.returncode == 0,
        "rcps": str(custom_rcps) if custom_rcps else f"official training_{C.RULESET}",
        "message": msg[-1] if msg else "",
        "bypassed": rcp_bypass and res.returncode != 0,
    }

    if len(runs) == C.RESULT_RUNS:
        bypass = ["--rcp-bypass"] if (rcp_bypass or custom_rcps is not None) else []
        res = _run(["-m", "mlperf_logging.package_checker", str(out), C.USAGE, C.RULESET, *bypass,
                    "--log_output", str(clog / "package_checker.out")], clog / "package_checker.log")  # fmt: skip
        checks["package_checker"] = {
            "passed": "PACKAGE CHECKER FOUND NO ERRORS" in res.stdout + res.stderr,
            "official_rcp_bypassed": bool(bypass),
        }
    else:
        checks["package_checker"] = {
            "passed": False,
            "skipped": f"needs {C.RESULT_RUNS} runs, got {len(runs)}",
        }

    score = _compute_score(bench, system, scale=custom_rcps is None, logs=clog)
    ok_minutes = [p["minutes"] if p["compliant"] and p["stop_status"] == "success" else None for p in per_run]
    mean = olympic_mean(ok_minutes)
    checks["score"] = {"passed": score["score"] is not None, **score, "olympic_mean_minutes": mean}

    required = ["system_desc", "compliance", "score"] + (["package_checker"] if not allow_fewer else [])
    passed = all(checks[k]["passed"] for k in required) and (checks["rcp"]["passed"] or rcp_bypass)
    summary = {
        "submission_root": str(out), "system": system, "org": org, "benchmark": C.BENCHMARK,
        "ruleset": C.RULESET, "global_batch_size": runs[0].gbs, "runs": per_run, "checks": checks,
        "system_placeholders": placeholders, "passed": passed,
    }  # fmt: skip
    (clog / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(s: dict) -> str:
    lines = [f"flux1 package {s['submission_root']} (system {s['system']}, org {s['org']}, "
             f"GBS {s['global_batch_size']}, ruleset {s['ruleset']})"]  # fmt: skip
    lines.append(
        f"{'result':<14}{'minutes':>10}{'samples':>12}  {'status':<9}{'seed':>12}  compliance  source"
    )
    for r in s["runs"]:
        minutes = "-" if r["minutes"] is None else f"{r['minutes']:.2f}"
        lines.append(
            f"{r['result']:<14}{minutes:>10}{r['samples'] or '-':>12}  {r['stop_status'] or '-':<9}"
            f"{r['seed'] if r['seed'] is not None else '-':>12}  {'PASS' if r['compliant'] else 'FAIL':<10}  "
            f"{r['source']}"
        )
    c = s["checks"]
    word = {True: "PASS", False: "FAIL"}
    lines.append(f"system_desc_checker : {word[c['system_desc']['passed']]}")
    if s["system_placeholders"]:
        lines.append(f"  WARNING: {len(s['system_placeholders'])} system fields are placeholders; "
                     f"give them with --system-json: {', '.join(s['system_placeholders'])}")  # fmt: skip
    lines.append(f"compliance_checker  : {word[c['compliance']['passed']]} "
                 f"({len(s['runs']) - len(c['compliance']['non_compliant'])}/{len(s['runs'])} compliant; "
                 f"at most 1 failure tolerated)")  # fmt: skip
    rcp = c["rcp"]
    lines.append(f"rcp_checker         : {word[rcp['passed']]}{' (BYPASSED)' if rcp['bypassed'] else ''} "
                 f"[{rcp['rcps']}] {rcp['message']}")  # fmt: skip
    pc = c["package_checker"]
    lines.append(f"package_checker     : {'SKIPPED (' + pc['skipped'] + ')' if 'skipped' in pc else word[pc['passed']]}"
                 f"{' (official RCP check bypassed)' if pc.get('official_rcp_bypassed') else ''}")  # fmt: skip
    sc = c["score"]
    note = f" [compute_score CLI failed: {sc['cli_error']}]" if "cli_error" in sc else ""
    lines.append(f"score (minutes)     : {sc['score']} via {sc['via']}{note}")
    mean = sc["olympic_mean_minutes"]
    lines.append(f"olympic mean (ours) : {'-' if mean is None else f'{mean:.4f}'}")
    lines.append(
        f"RESULT: {'PASS' if s['passed'] else 'FAIL'}  (details: {s['submission_root']}/checker_logs/)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flux_nemo.mlperf.package", description=__doc__.split("\n")[0])
    p.add_argument("--logs", nargs="+", required=True, help="result log files and/or folders of them")
    p.add_argument("--out", required=True, type=Path, help="submission root to write")
    p.add_argument("--system", required=True, help="system name (systems/<name>.json, results/<name>/)")
    p.add_argument("--org", help="submitter (default: submission_org from the logs)")
    p.add_argument("--system-json", type=Path, help="JSON object with system-description fields")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rcp-bypass", action="store_true", help="accept a failed RCP test (flagged for review)")
    g.add_argument("--custom-rcps", type=Path, help="RCP JSON to check against instead of the official one")
    p.add_argument("--allow-fewer", action="store_true", help=f"accept < {C.RESULT_RUNS} logs (testing only)")
    p.add_argument("--overwrite", action="store_true", help="replace existing results/<system>/flux1")
    a = p.parse_args(argv)
    try:
        summary = build_package(
            a.logs, a.out, a.system, org=a.org, system_json=a.system_json, rcp_bypass=a.rcp_bypass,
            custom_rcps=a.custom_rcps, allow_fewer=a.allow_fewer, overwrite=a.overwrite,
        )  # fmt: skip
    except PackageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
