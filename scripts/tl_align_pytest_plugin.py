"""The pytest plugin of `scripts/run_transformers_model_tests.py`: swaps the TL-Align classes into transformers'
model tests once collection is done, and records every test's outcome.

Loaded by the driver's pytest subprocesses with ``-p tl_align_pytest_plugin`` (this folder on ``PYTHONPATH``)::

    python -m pytest -p tl_align_pytest_plugin --tl-swap=tl --tl-results=out.json tests/models/vit/test_modeling_vit.py

* ``--tl-swap=none`` (the baseline) changes nothing; ``tl`` replaces every image-classification class of
  ``tl_align_hf.models.aligned_classes()`` that a test module uses by its TL-Align subclass, in the module's globals
  (what the model tester instantiates) and in its test classes' attributes (``all_model_classes``,
  ``pipeline_model_mapping``, ...); ``named`` swaps in a subclass of the TL class that carries the parent's
  ``__name__`` (tells failures from name look-ups from behavioural ones).
* ``--tl-results`` writes per test id its outcome, failure location and message, subtests, and the TL models it
  built, plus the swaps made and the collection errors (`RESULTS_FORMAT`).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

MESSAGE_LINES = 8
PASSING = ("passed", "xpassed")  # the test body passed (xpassed: an expected failure that did not fail)
RESULTS_FORMAT = 2  # bump when the per-test records below change (invalidates the driver's --reuse-baseline caches)

_RESULTS: dict[str, dict] = {}
_COLLECT_ERRORS: list[dict] = []
_SWAPS: dict[str, list[str]] = {}
_SWAPPED: set[str] = set()
_TL_BUILDS: dict[str, int] = {}
_CURRENT_TEST: list[str | None] = [None]


def pytest_addoption(parser):
    group = parser.getgroup("tl-align model tests")
    group.addoption("--tl-results", default=None, help="write per-test outcomes (JSON) here")
    group.addoption(
        "--tl-swap",
        default="none",
        choices=("none", "tl", "named"),
        help="none: baseline; tl: swap in the TL classes; named: TL classes renamed like their parents",
    )


def pytest_configure(config):
    if config.getoption("--tl-swap") != "none":
        _count_tl_builds()


def _count_tl_builds():
    """Count, per test, the TL models built: each TL ``__init__`` (and ``to_tl_align``) installs the hooks once."""
    from tl_align_hf.models import TLAlignMixin

    name = "tl_align_install_hooks" if hasattr(TLAlignMixin, "tl_align_install_hooks") else "__init__"
    original = getattr(TLAlignMixin, name)

    @functools.wraps(original)
    def counted(self, *args, **kwargs):
        test = _CURRENT_TEST[0] or "<outside a test>"
        _TL_BUILDS[test] = _TL_BUILDS.get(test, 0) + 1
        return original(self, *args, **kwargs)

    setattr(TLAlignMixin, name, counted)


def _replacements(mode: str) -> dict:
    from tl_align_hf.models import aligned_classes

    if mode == "tl":
        return aligned_classes()
    # "named": a subclass of the TL class under the parent's name, to tell name look-ups from behaviour.
    return {
        parent: type(
            parent.__name__, (aligned,), {"__module__": aligned.__module__, "__qualname__": parent.__qualname__}
        )
        for parent, aligned in aligned_classes().items()
    }


def _swap_value(value, replacements, found):
    if isinstance(value, type) and value in replacements:
        found.add(value.__name__)
        return replacements[value]
    if isinstance(value, tuple):
        return tuple(_swap_value(v, replacements, found) for v in value)
    if isinstance(value, list):
        return [_swap_value(v, replacements, found) for v in value]
    if isinstance(value, dict):
        return {k: _swap_value(v, replacements, found) for k, v in value.items()}
    return value


def _swap_module(module, replacements) -> list[str]:
    """Replace the parent classes in a test module's globals and in its classes' attributes; return what changed."""
    changed = []
    for name, value in list(vars(module).items()):
        if isinstance(value, type) and value in replacements:
            setattr(module, name, replacements[value])
            _SWAPPED.add(value.__name__)
            changed.append(f"{module.__name__}.{name}")
        elif isinstance(value, type) and value.__module__ == module.__name__:
            for attribute, attribute_value in list(vars(value).items()):
                if attribute.startswith("__") or not isinstance(attribute_value, (tuple, list, dict)):
                    continue
                found = set()
                swapped = _swap_value(attribute_value, replacements, found)
                if found:
                    setattr(value, attribute, swapped)
                    _SWAPPED.update(found)
                    changed.append(f"{module.__name__}.{name}.{attribute}: {', '.join(sorted(found))}")
    return changed


def pytest_collection_modifyitems(session, config, items):
    mode = config.getoption("--tl-swap")
    if mode == "none":
        return
    replacements = _replacements(mode)
    modules = {id(item.module): item.module for item in items if getattr(item, "module", None) is not None}
    for module in modules.values():
        _SWAPS[module.__name__] = _swap_module(module, replacements)
    # Check: every test class that lists a parent class now lists its TL class.
    for module in modules.values():
        for value in vars(module).values():
            classes = getattr(value, "all_model_classes", None) if isinstance(value, type) else None
            if classes:
                leftover = [c.__name__ for c in classes if c in replacements]
                assert not leftover, f"{value.__name__}.all_model_classes still lists {leftover}"


def pytest_runtest_logstart(nodeid, location):
    _CURRENT_TEST[0] = nodeid


def pytest_runtest_logfinish(nodeid, location):
    _CURRENT_TEST[0] = None


def _message(report) -> tuple[str, list[str]]:
    """(location of the failing statement in the test files, [statement, error lines...])."""
    longrepr = getattr(report, "longrepr", None)
    if isinstance(longrepr, tuple):  # skips: (path, lineno, reason)
        return f"{Path(str(longrepr[0])).name}:{longrepr[1]}", [str(longrepr[2])]
    entries = getattr(getattr(longrepr, "reprtraceback", None), "reprentries", None) or []
    located = [e for e in entries if getattr(e, "reprfileloc", None) is not None]
    in_tests = [e for e in located if "/tests/" in f"/{e.reprfileloc.path}" or e.reprfileloc.path.startswith("tests")]
    entry = (in_tests or located or [None])[-1]
    location, statement = "", []
    if entry is not None:
        location = f"{Path(entry.reprfileloc.path).name}:{entry.reprfileloc.lineno}"
        code = [line.strip() for line in entry.lines if not line.startswith("E ") and line.strip().strip("^~")]
        statement = [code[-1].lstrip("> ")] if code else []
    text = getattr(report, "longreprtext", "") or ""
    errors = [
        line[4:] if line.startswith("E   ") else line[1:].strip()
        for line in text.splitlines()
        if line.startswith("E ")
    ]
    if not errors and text:
        errors = [text.strip().splitlines()[-1]]
    return location, (statement + errors)[:MESSAGE_LINES]


def pytest_runtest_logreport(report):
    record = _RESULTS.setdefault(
        report.nodeid,
        {
            "outcome": None,
            "phases": {},
            "duration": 0.0,
            "location": "",
            "message": [],
            "subtests_failed": 0,
            "subtests": [],
        },
    )
    record["duration"] += getattr(report, "duration", 0.0) or 0.0
    if type(report).__name__ == "SubtestReport":
        if report.passed or (report.skipped and not hasattr(report, "wasxfail")):
            return
        # failed or xfailed subtests are kept (xfail: the test's xfail marker turned a subtest failure into xfail)
        context = getattr(report, "context", None)
        label = " ".join(
            str(part) for part in (getattr(context, "msg", None), getattr(context, "kwargs", None)) if part
        )
        where, lines = _message(report)
        outcome = "failed" if report.failed else "xfailed"
        record["subtests"].append({"label": label, "outcome": outcome, "location": where, "message": lines[:3]})
        if report.failed:
            record["subtests_failed"] += 1
        if (report.failed and record["subtests_failed"] == 1) or not record["message"]:
            record["location"], record["message"], record["subtest"] = where, lines, label
        return
    outcome = report.outcome
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    record["phases"][report.when] = outcome
    if report.failed or (report.skipped and not record["message"]):
        if report.failed or report.when in ("setup", "call"):
            where, lines = _message(report)
            if report.failed or not record["message"]:
                record["location"], record["message"] = where, lines


def pytest_collectreport(report):
    if report.failed:
        _COLLECT_ERRORS.append(
            {"nodeid": report.nodeid, "message": _message(report)[1] or [str(report.longrepr)[:2000]]}
        )


def _final_outcome(record) -> str:
    phases = record["phases"]
    if any(phases.get(when) == "failed" for when in ("setup", "teardown")):
        return "error"
    if record["subtests_failed"] or phases.get("call") == "failed":
        return "failed"
    for when in ("setup", "call"):
        if phases.get(when) in ("skipped", "xfailed", "xpassed"):
            return phases[when]
    return "passed" if phases.get("call") == "passed" else "unknown"


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--tl-results")
    if not path:
        return
    for record in _RESULTS.values():
        record["outcome"] = _final_outcome(record)
    payload = {
        "mode": session.config.getoption("--tl-swap"),
        "exitstatus": int(exitstatus),
        "tests": _RESULTS,
        "collect_errors": _COLLECT_ERRORS,
        "swaps": _SWAPS,
        "swapped_classes": sorted(_SWAPPED),
        "tl_builds": _TL_BUILDS,
        "tl_align_hf": _package_file(),
    }
    Path(path).write_text(json.dumps(payload, indent=1))


def _package_file() -> str | None:
    module = sys.modules.get("tl_align_hf")
    return getattr(module, "__file__", None)
