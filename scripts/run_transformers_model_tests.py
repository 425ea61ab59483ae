#!/usr/bin/env python
"""Run transformers' own model tests against the TL-Align classes and report every difference from the parent.

For each family (vit, deit, swin, dinov2, beit by default) the family's test module
(``tests/models/<family>/test_modeling_<family>.py`` of a transformers checkout) runs twice under pytest, each run
in its own subprocess:

* ``baseline``: unchanged;
* ``tl``: every image-classification class of ``tl_align_hf.models.aligned_classes()`` that the test module uses
  (``ViTForImageClassification``, ``DeiTForImageClassificationWithTeacher``, ...) is replaced by its TL-Align
  subclass, in the test module's globals (what the model tester instantiates) and in its test classes' attributes
  (``all_model_classes``, ``pipeline_model_mapping``, ...). No test file is edited: the pytest plugin
  ``scripts/tl_align_pytest_plugin.py`` (``-p tl_align_pytest_plugin``) makes the swap once collection is done.

Per test id, outcomes are compared: a *regression* passed in the baseline and does not pass with the TL class. Each
regression is rerun once more with ``named`` TL classes (a subclass of the TL class that carries the parent's
``__name__``) to tell failures that only come from the tests looking the class up by name (mapping names,
``model_class.__name__ == ...``) from behavioural ones. The TL run checks that the swap happened and counts, per
test, the TL models built, so the report shows that the TL class is what the tests ran.

Usage (no network needed once the tests folder is in place; see docs/transformers_model_tests.md)::

    python scripts/run_transformers_model_tests.py --tests-dir /path/to/transformers --out /tmp/tl_model_tests

``--reuse-baseline`` reuses the baseline results of an earlier run in ``--out`` when the transformers and torch
versions and the test files are unchanged (the baseline does not depend on tl_align_hf): a rerun after a fix to
the package then costs only the TL runs. Slow tests stay off (``RUN_SLOW`` is removed) unless ``--run-slow``.
``--full-named`` also runs every test with the renamed TL classes, which finds what the name look-ups hide.

The exit status is 0 when the only regressions are name look-ups (the named rerun passes them), else 1.

Requirements beyond the package's: pytest, ``parameterized`` and ``httpx`` (both imported by transformers' shared
test files: ``pip install parameterized httpx``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tl_align_pytest_plugin
from tl_align_pytest_plugin import PASSING
from transformers_tests_report import hint, markdown, print_summary

PLUGIN_NAME = tl_align_pytest_plugin.__name__  # loaded by pytest with -p, from this folder
RESULTS_FORMAT = tl_align_pytest_plugin.RESULTS_FORMAT
DEFAULT_FAMILIES = ("vit", "deit", "swin", "dinov2", "beit")
# The classes each family's tests are expected to swap (checked after the TL run; any other aligned class a test
# module uses is swapped too and reported).
EXPECTED_SWAPS = {
    "vit": ("ViTForImageClassification",),
    "deit": ("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"),
    "swin": ("SwinForImageClassification",),
    "dinov2": ("Dinov2ForImageClassification",),
    "beit": ("BeitForImageClassification",),
}


# ======================================================================================================= driver


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "missing"


def _env(run_slow: bool = False, snapshot: Path | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop("RUN_SLOW", None)
    if run_slow:
        env["RUN_SLOW"] = "1"
    paths = [str(snapshot)] if snapshot is not None else []
    paths.append(str(Path(__file__).resolve().parent))  # the plugin, for -p tl_align_pytest_plugin
    env["PYTHONPATH"] = os.pathsep.join(p for p in (*paths, env.get("PYTHONPATH", "")) if p)
    return env


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def _versions(env: dict) -> dict:
    probe = _python(
        "import json, torch, transformers, pytest, tl_align_hf; print(json.dumps({'transformers': "
        "transformers.__version__, 'torch': torch.__version__, 'pytest': pytest.__version__, "
        "'tl_align_hf_file': tl_align_hf.__file__}))",
        env,
    )
    if probe.returncode:
        sys.exit(f"Cannot import the packages under test:\n{probe.stderr[-3000:]}")
    versions = json.loads(probe.stdout.strip().splitlines()[-1])
    versions["python"] = platform.python_version()
    return versions


def _snapshot_package(raw_dir: Path, copy: bool = True) -> tuple[Path, Path | None]:
    """(the tl_align_hf source folder, the folder holding a copy of it taken now, or None without ``copy``).

    With the copy on PYTHONPATH, every run of this session tests the same code, even if the source changes meanwhile.
    """
    probe = _python("import os, tl_align_hf; print(os.path.dirname(tl_align_hf.__file__))", _env())
    if probe.returncode:
        sys.exit(f"tl_align_hf does not import:\n{probe.stderr[-3000:]}")
    source = Path(probe.stdout.strip().splitlines()[-1])
    if not copy:
        return source, None
    snapshot = raw_dir / "package_snapshot"
    shutil.rmtree(snapshot, ignore_errors=True)
    shutil.copytree(source, snapshot / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return source, snapshot


def _package_hash(package_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        digest.update(str(path.relative_to(package_dir)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _git_state(path: Path) -> str | None:
    """``<short HEAD>`` plus ``+local changes`` when the package has uncommitted changes (read-only git calls)."""
    head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        return None
    status = subprocess.run(
        ["git", "--no-optional-locks", "-C", str(path), "status", "--porcelain", "--", "."],
        capture_output=True,
        text=True,
    )
    return head.stdout.strip() + (" +local changes" if status.stdout.strip() else "")


def _check_requirements(tests_dir: Path, families) -> None:
    problems = []
    for module in ("pytest", "parameterized", "httpx", "tl_align_hf", "transformers"):
        probe = _python(f"import {module}", _env())
        if probe.returncode:
            error = (probe.stderr.strip().splitlines() or ["?"])[-1]
            problems.append(f"python module {module!r} does not import: {error}")
    for relative in ("tests/__init__.py", "tests/test_modeling_common.py", "src/transformers/__init__.py"):
        if not (tests_dir / relative).exists():
            problems.append(f"{tests_dir / relative} is missing")
    for family in families:
        if not (tests_dir / _test_file(family)).exists():
            problems.append(f"{tests_dir / _test_file(family)} is missing")
    if problems:
        sys.exit("Cannot run:\n  " + "\n  ".join(problems) + "\nSee docs/transformers_model_tests.md.")


def _test_file(family: str) -> str:
    return f"tests/models/{family}/test_modeling_{family}.py"


def _run_pytest(tests_dir: Path, targets: list[str], mode: str, name: str, raw_dir: Path, args, env: dict) -> dict:
    """Run pytest once in a subprocess; return the plugin's results plus ``wall_s`` and ``crashed`` (or None)."""
    results, log = raw_dir / f"{name}.results.json", raw_dir / f"{name}.log"
    ini = raw_dir / "pytest.ini"  # an empty ini: the checkout's pytest options (doctest globs, log_cli...) stay off
    ini.write_text("[pytest]\n")
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-p",
        PLUGIN_NAME,
        "-c",
        str(ini),
        "--rootdir",
        str(tests_dir),
        "--noconftest",  # the checkout's conftest.py (CI-only Hub cache fallbacks, doctest setup) stays off
        "-q",
        "-rN",
        "--tb=short",
        "-W",
        "ignore::pytest.PytestUnknownMarkWarning",
        f"--tl-swap={mode}",
        f"--tl-results={results}",
        *(["-k", args.keyword] if args.keyword else []),
        *args.pytest_arg,
        *targets,
    ]
    results.unlink(missing_ok=True)
    start = time.monotonic()
    with open(log, "w") as log_file:
        log_file.write(" ".join(command) + "\n\n")
        log_file.flush()
        try:
            returncode = subprocess.run(
                command, cwd=tests_dir, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=args.timeout
            ).returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
    payload = (
        json.loads(results.read_text()) if results.exists() else {"mode": mode, "tests": {}, "collect_errors": []}
    )
    payload.update(returncode=returncode, wall_s=round(time.monotonic() - start, 1), log=str(log), crashed=None)
    if returncode not in (0, 1) or payload["collect_errors"] or not payload["tests"]:
        tail = log.read_text(errors="replace").strip().splitlines()[-12:]
        errors = [f"{e['nodeid']}: {' / '.join(e['message'][:4])}" for e in payload["collect_errors"]]
        payload["crashed"] = f"pytest exit {returncode}; " + (" | ".join(errors) if errors else " | ".join(tail))
    return payload


def _counts(payload: dict) -> dict:
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfailed": 0, "xpassed": 0, "unknown": 0}
    for record in payload["tests"].values():
        counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
    counts["collect_errors"] = len(payload.get("collect_errors", []))
    return counts




def _short(test_id: str) -> str:
    return test_id.split("::", 1)[1] if "::" in test_id else test_id


def _subtest_signature(record: dict) -> set:
    """The subtests that did not pass (failed, or xfailed under the test's xfail marker), TL names mapped back."""
    return {(re.sub(r"\bTLAlign(?=\w)", "", s["label"]), s["outcome"]) for s in record.get("subtests", [])}


def _regressed(base: dict, other: dict | None) -> bool:
    """Passed in the baseline, and with the TL class either does not pass or has non-passing subtests it lacked."""
    if base["outcome"] not in PASSING:
        return False
    if other is None or other["outcome"] not in PASSING:
        return True
    return bool(_subtest_signature(other) - _subtest_signature(base))


def _differences(base_tests: dict, other_tests: dict) -> tuple[list, list, list]:
    """(regressions, passes only in other, other outcome changes) as sorted test ids."""
    regressions = sorted(t for t, r in base_tests.items() if _regressed(r, other_tests.get(t)))
    fixed = sorted(
        t
        for t, r in other_tests.items()
        if r["outcome"] in PASSING and base_tests.get(t, {}).get("outcome") not in PASSING
    )
    changed = sorted(
        t
        for t in set(base_tests) | set(other_tests)
        if t not in regressions
        and t not in fixed
        and (
            base_tests.get(t, {}).get("outcome") != other_tests.get(t, {}).get("outcome")
            or _skip_reason(base_tests.get(t)) != _skip_reason(other_tests.get(t))
        )
    )
    return regressions, fixed, changed


def _skip_reason(record: dict | None) -> str | None:
    """A skipped test's reason, TL names mapped back (a changed reason is listed among the other changes)."""
    if not record or record["outcome"] != "skipped":
        return None
    reason = re.sub(r"<class '[^']*'>", "<class>", " ".join(record.get("message", [])))
    return re.sub(r"\bTLAlign(?=\w)", "", reason)


def _family_meta(tests_dir: Path, family: str, versions: dict, args) -> dict:
    shared = ("tests/test_modeling_common.py", "tests/test_configuration_common.py", "tests/test_pipeline_mixin.py")
    return {
        "versions": {k: versions[k] for k in ("transformers", "torch", "pytest", "python")},
        "tests_dir": str(tests_dir),
        "files": {f: _sha256(tests_dir / f) for f in (*shared, _test_file(family))},
        "keyword": args.keyword,
        "pytest_arg": args.pytest_arg,
        "run_slow": args.run_slow,
        "results_format": RESULTS_FORMAT,
    }


def _row(test_id: str, base_tests: dict, other_tests: dict, named: dict | None = None) -> dict:
    record = other_tests.get(test_id, {"outcome": "missing", "message": [], "location": ""})
    row = {
        "test": _short(test_id),
        "nodeid": test_id,
        "baseline": base_tests.get(test_id, {}).get("outcome", "missing"),
        "tl": record["outcome"],
        "subtest": record.get("subtest"),
        "location": record.get("location", ""),
        "message": record.get("message", []),
        "subtests": record.get("subtests", []),
    }
    if named is not None:
        named_record = named.get(test_id)
        named_passes = named_record is not None and not _regressed(base_tests[test_id], named_record)
        row["named_tl"] = (
            None if named_record is None else named_record["outcome"] + ("" if named_passes else " (regressed)")
        )
        row["hint"] = hint(record.get("message", []), named_passes)
    return row


def run_family(family: str, tests_dir: Path, raw_dir: Path, versions: dict, args, env: dict) -> dict:
    target = _test_file(family)
    meta = _family_meta(tests_dir, family, versions, args)
    baseline_file = raw_dir / f"{family}-baseline.json"
    baseline = None
    if args.reuse_baseline and baseline_file.exists():
        cached = json.loads(baseline_file.read_text())
        if cached.get("meta") == meta and not cached.get("crashed"):
            baseline, baseline["reused"] = cached, True
    if baseline is None:
        baseline = _run_pytest(tests_dir, [target], "none", f"{family}-baseline", raw_dir, args, env)
        baseline.update(meta=meta, reused=False)
        baseline_file.write_text(json.dumps(baseline, indent=1))
    tl = _run_pytest(tests_dir, [target], "tl", f"{family}-tl", raw_dir, args, env)
    (raw_dir / f"{family}-tl.json").write_text(json.dumps(tl, indent=1))
    result = {
        "family": family,
        "test_file": target,
        "baseline": {
            "counts": _counts(baseline),
            "wall_s": baseline["wall_s"],
            "reused": baseline["reused"],
            "crashed": baseline["crashed"],
        },
        "tl": {"counts": _counts(tl), "wall_s": tl["wall_s"], "crashed": tl["crashed"]},
        "swapped_classes": tl.get("swapped_classes", []),
        "missing_swaps": [c for c in EXPECTED_SWAPS.get(family, ()) if c not in tl.get("swapped_classes", [])],
        "swaps": tl.get("swaps", {}),
        "tl_align_hf_file": tl.get("tl_align_hf"),
        "tests_building_tl_models": sum(1 for t in tl.get("tl_builds", {}) if t != "<outside a test>"),
        "regressions": [],
        "fixed_in_tl": [],
        "other_changes": [],
    }
    if baseline["crashed"] or tl["crashed"]:
        return result  # no comparison: the run itself failed (see "crashed")
    base_tests, tl_tests = baseline["tests"], tl["tests"]
    regressions, fixed, changed = _differences(base_tests, tl_tests)
    named = {}
    if regressions and not args.no_named_rerun:
        named_run = _run_pytest(tests_dir, regressions, "named", f"{family}-named-rerun", raw_dir, args, env)
        (raw_dir / f"{family}-named-rerun.json").write_text(json.dumps(named_run, indent=1))
        named = named_run["tests"]
    result["regressions"] = [_row(t, base_tests, tl_tests, named) for t in regressions]
    result["fixed_in_tl"] = [_row(t, base_tests, tl_tests) for t in fixed]
    result["other_changes"] = [_row(t, base_tests, tl_tests) for t in changed]
    if args.full_named:
        full = _run_pytest(tests_dir, [target], "named", f"{family}-named", raw_dir, args, env)
        (raw_dir / f"{family}-named.json").write_text(json.dumps(full, indent=1))
        result["named"] = {"counts": _counts(full), "wall_s": full["wall_s"], "crashed": full["crashed"]}
        if not full["crashed"]:
            n_regressions, n_fixed, n_changed = _differences(base_tests, full["tests"])
            result["named"].update(
                regressions=[_row(t, base_tests, full["tests"]) for t in n_regressions],
                fixed=[_row(t, base_tests, full["tests"]) for t in n_fixed],
                other_changes=[_row(t, base_tests, full["tests"]) for t in n_changed],
            )
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tests-dir",
        required=True,
        type=Path,
        help="a folder laid out like the transformers repository: tests/test_modeling_common.py, "
        "tests/models/<family>/test_modeling_<family>.py, src/transformers/",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "tl_model_tests",
        help="report folder (default: %(default)s)",
    )
    parser.add_argument(
        "--families", default=",".join(DEFAULT_FAMILIES), help="comma-separated (default: %(default)s)"
    )
    parser.add_argument(
        "-j", "--jobs", type=int, default=1, help="families run at a time (each pytest single-threaded)"
    )
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression, for every run")
    parser.add_argument("--pytest-arg", action="append", default=[], help="extra pytest argument (repeatable)")
    parser.add_argument(
        "--reuse-baseline",
        action="store_true",
        help="reuse the baseline results in --out when the versions and test files are unchanged",
    )
    parser.add_argument(
        "--no-named-rerun", action="store_true", help="do not rerun regressions with renamed TL classes"
    )
    parser.add_argument(
        "--full-named",
        action="store_true",
        help="also run every test with the renamed TL classes (finds what name look-ups hide)",
    )
    parser.add_argument(
        "--no-snapshot",
        action="store_true",
        help="test tl_align_hf in place instead of a copy taken at the start of the run",
    )
    parser.add_argument("--run-slow", action="store_true", help="set RUN_SLOW=1 (slow tests need the Hub)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per pytest run (default: %(default)s)")
    args = parser.parse_args(argv)

    start = time.monotonic()
    tests_dir = args.tests_dir.resolve()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in EXPECTED_SWAPS]
    if unknown:
        print(f"note: no expected swaps recorded for {unknown}; every aligned class they use is swapped")
    _check_requirements(tests_dir, families)
    raw_dir = args.out / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    source_dir, snapshot = _snapshot_package(raw_dir, copy=not args.no_snapshot)
    package_hash = _package_hash(source_dir if snapshot is None else snapshot / source_dir.name)
    git_state = _git_state(source_dir)
    env = _env(args.run_slow, snapshot)
    versions = _versions(env)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_family, family, tests_dir, raw_dir, versions, args, env) for family in families]
        family_reports = [future.result() for future in futures]

    command = argv if argv is not None else sys.argv
    report = {
        "date": datetime.date.today().isoformat(),
        "versions": versions,
        "package": {
            "hash": package_hash,
            "git": git_state,
            "source": str(source_dir),
            "tested_from": "a snapshot taken at the start" if snapshot is not None else "the source tree in place",
        },
        "tests_dir": str(tests_dir),
        "command": shlex.join(["python", *command]),
        "total_wall_s": round(time.monotonic() - start, 1),
        "families": family_reports,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    (args.out / "report.md").write_text(markdown(report))

    return print_summary(report, args.out, raw_dir)


if __name__ == "__main__":
    sys.exit(main())
