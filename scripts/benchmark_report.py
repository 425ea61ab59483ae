"""The goals and the markdown table of scripts/benchmark.py's results, from the results or the JSON it wrote.

    python scripts/benchmark_report.py benchmark_out/benchmark.json     # prints the table again
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loss import loss_table  # noqa: E402  (the loss rows' table)

GOALS = (("step time", "median_ms", 1.05), ("peak memory", "peak_memory_gib", 1.02))  # value channel / plain
BASELINE, CANDIDATE = "plain-sdpa", "tl-align-value-channel"


def evaluate_goals(cases: list[dict]) -> list[dict]:
    """The value channel against plain SDPA in every case whose baseline (first variant) is plain SDPA: the median
    of per-round step-time ratios within 5%, the peak memory within 2%."""
    goals = []
    for case in cases:
        baseline, candidate = case["variants"].get(BASELINE), case["variants"].get(CANDIDATE)
        if case["baseline"] != BASELINE or candidate is None:
            continue
        for goal, key, limit in GOALS:
            ratio = candidate["time_ratio"] if key == "median_ms" else candidate["memory_ratio"]
            goals.append({"case": case["case"], "goal": goal, "limit": limit, "plain": baseline[key],
                          "value_channel": candidate[key], "ratio": ratio,
                          "passed": None if ratio is None else ratio <= limit})  # fmt: skip
    return goals


def _number(value, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def header_lines(results: dict) -> list[str]:
    env, settings = results["environment"], results["settings"]
    budget = f"budget {settings['max_minutes']} min" if settings["max_minutes"] is not None else "no time budget"
    return [
        "# TL-Align training-step benchmark", "",
        f"- device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"tl_align_hf {env['tl_align_hf']}, Python {env['python']}",
        f"- date: {env['date']}",
        f"- command: `{env['command']}`",
        f"- {env['precision']}; forward + backward + AdamW (lr 0); {settings['rounds']} interleaved rounds after "
        f"{settings['warmup']} warm-up rounds; ratios: median (quartiles) of per-round ratios to the case's first "
        f"variant; label smoothing {settings['label_smoothing']}; compiled cases: torch.compile(backend="
        f"{settings['compile_backend']!r}, dynamic=False) of each variant's forward + loss",
        f"- wall time {results['wall_s']:.0f} s ({budget})",
        "- peak memory: the variant's weights + optimizer state + batch + the peak of its own step above that",
        "",
    ]


def goal_lines(goals: list[dict]) -> list[str]:
    lines = [f"## Goals: {CANDIDATE} against {BASELINE}", "",
             f"| case | goal | {BASELINE} | {CANDIDATE} | ratio | limit | result |", "|---|---|---|---|---|---|---|"]
    for goal in goals:
        unit = " ms" if goal["goal"] == "step time" else " GiB"
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[goal["passed"]]
        lines.append(f"| {goal['case']} | {goal['goal']} | {_number(goal['plain'], 2, unit)} | "
                     f"{_number(goal['value_channel'], 2, unit)} | {_number(goal['ratio'], 3)} | "
                     f"<= {goal['limit']:.2f} | {verdict} |")  # fmt: skip
    return lines + [""]


def case_lines(case: dict, device_type: str) -> list[str]:
    compiled = "torch.compile" if case["compiled"] else "not compiled"
    has_memory = any(summary["peak_memory_gib"] is not None for summary in case["variants"].values())
    base = case["baseline"]
    header = (f"| variant | median step (ms) | vs {base} | quartiles | fastest step (ms) | fastest vs {base} |"
              + (f" peak memory (GiB) | vs {base} | step peak (GiB) |" if has_memory else "") + " first step (s) |")
    lines = [f"### {case['title']}, {case['image_size']} px, batch {case['batch_size']}, {device_type}, {compiled}, "
             f"rounds: {case['rounds']}", "", header, "|" + "---|" * (header.count("|") - 1)]  # fmt: skip
    for name, summary in case["variants"].items():
        low, high = summary["time_ratio_quartiles"]
        line = (f"| {name} | {summary['median_ms']:.2f} | {summary['time_ratio']:.3f} | {low:.3f}-{high:.3f} | "
                f"{summary['fastest_ms']:.2f} | {summary['fastest_ratio']:.3f} |")
        if has_memory:
            line += (f" {_number(summary['peak_memory_gib'])} | {_number(summary['memory_ratio'], 3)} | "
                     f"{_number(summary['step_peak_memory_gib'])} |")
        lines.append(line + f" {_number(summary['first_step_s'])} |")
    if case["aligned_lam_max_abs_diff"] is not None:
        lines.append(f"\nmax |aligned_lam(value channel) - aligned_lam(eager)|: {case['aligned_lam_max_abs_diff']:.2e}")
    for name, summary in case["variants"].items():
        breaks = summary["graph_breaks"]
        if breaks and breaks["count"]:
            lines.append(f"\n{name}: {breaks['count']} graph breaks ({'; '.join(breaks['reasons'])})")
    if case.get("note"):
        lines.append(f"\nNote: {case['note']}")
    return lines + [""]


def kernel_lines(cases: list[dict]) -> list[str]:
    lines = ["## SDPA kernels", "", "| case | variant | check | result |", "|---|---|---|---|"]
    for case in cases:
        for variant, entry in case["sdpa_kernels"].items():
            lines.append(f"| {case['case']} | {variant} | default | {', '.join(entry['default_ops']) or 'none found'} |")
            if isinstance(entry["only"], str):
                lines.append(f"| {case['case']} | {variant} | only flash / only efficient | {entry['only']} |")
                continue
            for kernel, outcome in entry["only"].items():
                result = "ran" if outcome["ran"] else f"refused: {outcome['error']}"
                if outcome["reasons"]:
                    result += " (" + "; ".join(outcome["reasons"]) + ")"
                lines.append(f"| {case['case']} | {variant} | only {kernel} | {result.replace('|', '/')} |")
    return lines + [""]


def markdown(results: dict) -> str:
    """The markdown of `scripts/benchmark.py`'s results (its JSON, read back or not)."""
    lines = header_lines(results)
    if results["goals"]:
        lines += goal_lines(results["goals"])
    lines += ["## Step time and memory", ""]
    for case in results["cases"]:
        lines += case_lines(case, results["settings"]["device"])
    if any(case["sdpa_kernels"] for case in results["cases"]):
        lines += kernel_lines(results["cases"])
    if results["loss"]:
        lines += ["## Mixed loss alone (forward + backward, float32 logits)", "", *loss_table(results["loss"]), ""]
    if results["skipped"]:
        lines += ["## Skipped", ""] + [f"- {skip['case']}: {skip['note']}" for skip in results["skipped"]] + [""]
    return "\n".join(lines)


def write_results(results: dict, out_dir: Path) -> str:
    """Writes ``benchmark.json`` and ``benchmark.md`` to `out_dir`; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out_dir / "benchmark.md").write_text(table + "\n")
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="benchmark.json written by scripts/benchmark.py")
    print(markdown(json.loads(Path(parser.parse_args(argv).results).read_text())))


if __name__ == "__main__":
    main()
