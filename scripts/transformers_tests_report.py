"""The report of `scripts/run_transformers_model_tests.py`: the known causes of regressions, the Markdown report
(report.md) and the console summary, from the driver's report dict (report.json)."""

from __future__ import annotations

import re
from pathlib import Path

from tl_align_pytest_plugin import PASSING

# Hints for known defects, matched against the failure text of a regression (first match wins). Only a hint: the
# docs/transformers_model_tests.md report gives the diagnosed reason of each regression.
KNOWN_CAUSES = (
    (
        "name",
        "test looks the class up by name (passes with a TL class named like the parent)",
        None,
    ),
    (
        "output-attentions",
        "setting config.output_attentions raises on the TL class",
        r"output_attentions",
    ),
    (
        "attn-impl-name",
        "config._attn_implementation reads the routed name (tl_align_*), not the user's backend",
        r"tl_align_(sdpa|eager|flash|flex)|_attn_implementation",
    ),
    (
        "forward-signature",
        "TL forward signature differs from the parent's (positional interpolate_pos_encoding / attention_mask)",
        r"interpolate_pos_encoding|attention_mask|signature|positional argument|arg_names|expected_arg_names",
    ),
    (
        "teacher-labels",
        "DeiT-with-teacher labels handling",
        r"computes no loss from `labels` alone",
    ),
)


def _summary(counts: dict) -> str:
    """pass/fail/skip/xfail: pass = passed + xpassed; fail = failed + errors + collection errors."""
    return "/".join(
        str(n)
        for n in (
            counts["passed"] + counts["xpassed"],
            counts["failed"] + counts["error"] + counts["collect_errors"] + counts["unknown"],
            counts["skipped"],
            counts["xfailed"],
        )
    )


def hint(message_lines: list[str], named_passes: bool) -> str:
    if named_passes:
        return KNOWN_CAUSES[0][0]
    text = "\n".join(message_lines)
    for key, _, pattern in KNOWN_CAUSES[1:]:
        if re.search(pattern, text):
            return key
    return "new"


def _table(report: dict) -> list[tuple[str, ...]]:
    full_named = any("named" in fam for fam in report["families"])
    header = (
        "family",
        "baseline p/f/s/xf",
        "TL p/f/s/xf",
        "regressions",
        "TL-only passes",
        "other changes",
        *(("named-TL p/f/s/xf", "named regressions") if full_named else ()),
        "swapped classes",
        "tests building TL",
    )
    rows = [header]
    for fam in report["families"]:
        crashed = fam["baseline"]["crashed"] or fam["tl"]["crashed"]
        named = fam.get("named", {})
        rows.append(
            (
                fam["family"],
                _summary(fam["baseline"]["counts"]) + (" (reused)" if fam["baseline"]["reused"] else ""),
                _summary(fam["tl"]["counts"]),
                "RUN FAILED" if crashed else str(len(fam["regressions"])),
                str(len(fam["fixed_in_tl"])),
                str(len(fam["other_changes"])),
                *(
                    (
                        _summary(named["counts"]) if named else "-",
                        ("RUN FAILED" if named.get("crashed") else str(len(named.get("regressions", []))))
                        if named
                        else "-",
                    )
                    if full_named
                    else ()
                ),
                ", ".join(fam["swapped_classes"])
                + (f" (MISSING {', '.join(fam['missing_swaps'])})" if fam["missing_swaps"] else ""),
                str(fam["tests_building_tl_models"]),
            )
        )
    return rows


def _causes() -> dict:
    causes = {key: text for key, text, _ in KNOWN_CAUSES}
    causes["new"] = "no known cause matched: diagnose"
    return causes


def _describe(row: dict) -> str:
    message = " / ".join(m.strip() for m in row["message"][:3])[:300]
    subtest = f" [subtest {row['subtest']}]" if row.get("subtest") else ""
    if row["tl"] in PASSING and row.get("subtests"):
        subtest += (
            " (the test passed, but these subtests did not: "
            + ", ".join(f"{s['label']} {s['outcome']}" for s in row["subtests"])
            + ")"
        )
    return f"{row['location']}{subtest}: {message}"


def markdown(report: dict) -> str:
    rows = _table(report)
    versions = report["versions"]
    lines = [
        f"# TL-Align classes against transformers' model tests ({report['date']})",
        "",
        f"transformers {versions['transformers']}, torch {versions['torch']}, pytest {versions['pytest']}, "
        f"Python {versions['python']}; tl_align_hf {report['package']['hash']} (git {report['package']['git']}, "
        f"{report['package']['tested_from']}); tests from `{report['tests_dir']}`; total {report['total_wall_s']:.0f} s.",
        "",
        "    " + report["command"],
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
        *("| " + " | ".join(row) + " |" for row in rows[1:]),
        "",
        "p/f/s/xf: passed (incl. xpassed) / failed (incl. errors) / skipped / xfailed. A regression passed in the "
        "baseline and does not pass with the TL class; `named` is its outcome with the TL class renamed like its "
        "parent (a pass there means the test only looked the class up by name).",
        "",
    ]
    causes = _causes()
    for fam in report["families"]:
        named = fam.get("named", {})
        crashed = fam["baseline"]["crashed"] or fam["tl"]["crashed"]
        if not (
            crashed or fam["regressions"] or fam["fixed_in_tl"] or fam["other_changes"] or named.get("regressions")
        ):
            continue
        lines += [f"## {fam['family']}", ""]
        if crashed:
            lines.append(f"- RUN FAILED: {crashed}")
        for row in fam["regressions"]:
            lines.append(
                f"- `{row['test']}`: {row['baseline']} -> {row['tl']} (named: {row['named_tl']}); "
                f"hint `{row['hint']}` ({causes[row['hint']]}); {_describe(row)}"
            )
        for row in fam["fixed_in_tl"]:
            lines.append(f"- passes only with the TL class: `{row['test']}` ({row['baseline']} -> {row['tl']})")
        for row in fam["other_changes"]:
            what = "skip reason changed" if row["baseline"] == row["tl"] == "skipped" else "other change"
            lines.append(f"- {what}: `{row['test']}` ({row['baseline']} -> {row['tl']}); {_describe(row)}")
        for row in named.get("regressions", []):
            lines.append(
                f"- named-TL regression: `{row['test']}` ({row['baseline']} -> {row['tl']}); {_describe(row)}"
            )
        lines.append("")
    return "\n".join(lines)


def print_summary(report: dict, report_dir: Path, raw_dir: Path) -> int:
    """Print the table, each failed run and regression; return the exit status (0: only name look-ups regressed)."""
    family_reports = report["families"]
    rows = _table(report)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print()
    for fam in family_reports:
        for side in ("baseline", "tl"):
            if fam[side]["crashed"]:
                print(f"[{fam['family']}] {side} RUN FAILED: {fam[side]['crashed'][:1500]}")
        for row in fam["regressions"]:
            first = next((m.strip() for m in reversed(row["message"]) if m.strip()), "")
            print(
                f"[{fam['family']}] REGRESSION {row['test']} -> {row['tl']} (named: {row['named_tl']}, "
                f"hint: {row['hint']}): {first[:160]}"
            )
        for row in fam.get("named", {}).get("regressions", []):
            print(f"[{fam['family']}] NAMED-TL REGRESSION {row['test']} -> {row['tl']}: {_describe(row)[:200]}")
        if fam["missing_swaps"]:
            print(f"[{fam['family']}] WARNING: expected swaps not made: {fam['missing_swaps']}")
    print(
        f"\nreport: {report_dir / 'report.md'} and report.json; logs in {raw_dir}; total {report['total_wall_s']:.0f} s"
    )
    # Exit status 1 on anything but regressions that only come from tests looking the class up by name (the
    # issue's exception): behavioural regressions, named-TL regressions, failed runs, swaps not made.
    failed = any(
        any(row["hint"] != "name" for row in f["regressions"])
        or f["missing_swaps"]
        or f["baseline"]["crashed"]
        or f["tl"]["crashed"]
        or f.get("named", {}).get("regressions")
        or f.get("named", {}).get("crashed")
        for f in family_reports
    )
    return 1 if failed else 0
