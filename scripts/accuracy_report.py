#!/usr/bin/env python
"""Accuracy study, the report: aggregate the saved runs into the statistics, the figure and the generated sections
of docs/accuracy.md. Trains nothing (the runner, `scripts/accuracy_study.py`, trains and then calls this).

From the runs under docs/data/accuracy_study_runs (kept by the repository), per arm the mean final-epoch test
accuracy and its 95% t-interval; per pair (plain, +tl) the mean paired difference and its 95% t-interval, wins /
losses / ties, a two-sided sign test, the paired t-test and the seeds that 80% power would need at the observed
effect; the alignment gap per epoch; the run time per sitting. Writes docs/accuracy_study.json,
docs/img/accuracy_study.png and the `accuracy-study` section of docs/accuracy.md, and the `accuracy-tuning`
section from every configuration under docs/data/accuracy_tuning.

    python scripts/accuracy_report.py                      # both sections, from the committed runs
    python scripts/accuracy_report.py --section tuning     # only the tuning table
    python scripts/accuracy_report.py --quick              # the quick study's runs (outputs/accuracy-quick/)

The plan arguments (--seeds, --set, --methods, --output-dir, --runs-dir, ...) are the runner's: they say which
saved runs the report reads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import numpy as np
from accuracy_common import (
    ARMS,
    MIXING_PAIRS,
    NOISE_FLOOR_PAIR,
    PAIRS,
    PLAIN_ARMS,
    SPLIT_SEED,
    TEST_IMAGES,
    TEST_SIZE,
    TL_ARMS,
    SettingsMismatch,
    StudySettings,
    add_plan_arguments,
    commands,
    dump_json,
    load_runs,
    significant,
    study_plan,
    tuning_configurations,
)
from doc_sections import write_section
from scipy import stats


# ---------------------------------------------------------------------------------------------------------- stats
def summarize(accuracies: list[float]) -> dict:
    """Mean, sample std and the 95% t-interval of the mean of per-seed accuracies."""
    values = np.asarray(accuracies, dtype=float)
    n = len(values)
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if n > 1 else 0.0
    half_width = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "ci95_low": mean - half_width, "ci95_high": mean + half_width}


def seeds_needed(variance: float, difference: float, power: float = 0.8, alpha: float = 0.05) -> float:
    """Seeds for a two-sided test at `alpha` to detect `difference` with `power` (normal approximation), where
    `variance` is that of the difference estimate times the number of seeds: `std_a**2 + std_b**2` for two
    independent groups, `std(a - b)**2` for seed-paired runs."""
    if abs(difference) < 1e-9:  # no effect (a mean of equal accuracies can be 1e-17 from float rounding)
        return math.inf
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return math.ceil(z**2 * variance / difference**2)


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided sign test of wins against losses (ties dropped); 1 when every seed tied."""
    return float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0


def paired_t_p(differences: np.ndarray) -> float:
    """Two-sided paired t-test p-value; NaN when the differences do not vary (the test is undefined)."""
    if len(differences) < 2 or np.ptp(differences) == 0:
        return float("nan")
    return float(stats.ttest_1samp(differences, 0.0).pvalue)


def compare(runs: list[dict], baseline: str, treatment: str) -> dict | None:
    """`treatment` minus `baseline`, paired over the seeds both have (same initialisation, data order and mixing
    draws): mean difference and its 95% t-interval, wins / losses / ties, sign and paired t-test, seeds for 80%
    power. None with fewer than two paired seeds."""
    by_seed = {arm: {r["seed"]: r["accuracy"] for r in runs if r["method"] == arm} for arm in (baseline, treatment)}
    seeds = sorted(set(by_seed[baseline]) & set(by_seed[treatment]))
    if len(seeds) < 2:
        return None
    differences = np.array([by_seed[treatment][s] - by_seed[baseline][s] for s in seeds])
    tied = np.isclose(differences, 0.0, rtol=0.0, atol=1e-9)
    wins, losses = int(((differences > 0) & ~tied).sum()), int(((differences < 0) & ~tied).sum())
    interval = summarize(differences.tolist())
    return {
        "baseline": baseline,
        "treatment": treatment,
        "seeds": seeds,
        "n": len(seeds),
        "differences": differences.tolist(),
        "mean_difference": interval["mean"],
        "std_difference": interval["std"],
        "ci95_low": interval["ci95_low"],
        "ci95_high": interval["ci95_high"],
        "wins": wins,
        "losses": losses,
        "ties": len(seeds) - wins - losses,
        "sign_test_p": sign_test_p(wins, losses),
        "paired_t_p": paired_t_p(differences),
        "seeds_for_80_power": seeds_needed(interval["std"] ** 2, interval["mean"]),
    }


def summaries(runs: list[dict]) -> dict[str, dict]:
    """Per-arm summaries of the final accuracy, in ARMS order, for the arms that have runs."""
    return {
        arm: summarize([r["accuracy"] for r in runs if r["method"] == arm])
        for arm in ARMS
        if any(r["method"] == arm for r in runs)
    }


def comparisons(runs: list[dict], pairs) -> list[dict]:
    """`compare` for each pair that has at least two paired seeds."""
    return [result for result in (compare(runs, *pair) for pair in pairs) if result is not None]


def mean_curve(runs: list[dict], arm: str, name: str) -> list[float] | None:
    """The per-epoch mean over seeds of one curve of one arm (None if no run of it has that curve)."""
    curves = [r["curves"][name] for r in runs if r["method"] == arm and name in r.get("curves", {})]
    if not curves or len({len(c) for c in curves}) != 1:
        return None
    return significant(np.mean(np.array(curves, dtype=float), axis=0).tolist())


def alignment_summary(runs: list[dict]) -> dict[str, dict]:
    """Per TL arm: the per-epoch means over seeds of alignment_gap, aligned_lam and mix_lam."""
    result = {}
    for arm in TL_ARMS:
        curves = {name: mean_curve(runs, arm, name) for name in ("alignment_gap", "aligned_lam", "mix_lam")}
        if all(curve is not None for curve in curves.values()):
            result[arm] = curves
    return result


SITTING_GAP_S = 600  # runs whose starts follow the previous finish by more than this belong to a new sitting


def sittings(runs: list[dict]) -> list[dict]:
    """Merge the runs' [started, finished] intervals into sittings: stretches of training with no pause longer than
    SITTING_GAP_S. A study resumed in several sessions (or on several machines) has one sitting per session; the sum
    of their spans, not the span from the first start to the last finish, is the wall time the study took."""
    intervals = sorted(
        (datetime.fromisoformat(r["started"]), datetime.fromisoformat(r["finished"]), r.get("cpu", "not recorded"))
        for r in runs
        if "started" in r and "finished" in r
    )
    result: list[dict] = []
    for start, finish, cpu in intervals:
        if result and (start - result[-1]["_finish"]).total_seconds() <= SITTING_GAP_S:
            current = result[-1]
            current["_finish"] = max(current["_finish"], finish)
            current["runs"] += 1
            current["cpus"].add(cpu)
        else:
            result.append({"_start": start, "_finish": finish, "runs": 1, "cpus": {cpu}})
    return [
        {
            "start": item["_start"].isoformat(),
            "finish": item["_finish"].isoformat(),
            "span_s": round((item["_finish"] - item["_start"]).total_seconds(), 1),
            "runs": item["runs"],
            "cpus": sorted(item["cpus"]),
        }
        for item in result
    ]


def timing(runs: list[dict]) -> dict:
    """Sum of run wall times, run time per CPU model, and the wall time of each sitting (see `sittings`)."""
    if not runs:
        return {"runs": 0}
    result = {"runs": len(runs), "sum_wall_s": round(sum(r["wall_s"] for r in runs), 1)}
    result["processes"] = sorted({r.get("process", "?") for r in runs})
    cpus = [r.get("cpu", "not recorded") for r in runs]
    result["cpus"] = {cpu: cpus.count(cpu) for cpu in sorted(set(cpus))}  # runs per CPU model
    result["mean_wall_s_per_cpu"] = {
        cpu: round(float(np.mean([r["wall_s"] for r, c in zip(runs, cpus) if c == cpu])), 1) for cpu in result["cpus"]
    }
    result["mean_wall_s"] = round(result["sum_wall_s"] / len(runs), 1)
    result["sittings"] = sittings(runs)
    if result["sittings"]:
        result["span_s"] = round(sum(item["span_s"] for item in result["sittings"]), 1)  # wall time of all sittings
    return result


def step_speed(runs: list[dict]) -> dict:
    """Measured cost: seconds per optimisation step and per test pass (means over the runs)."""
    steps, train_s = sum(r["train_steps"] for r in runs), sum(r["train_s"] for r in runs)
    passes, eval_s = sum(len(r["curves"]["test_accuracy"]) for r in runs), sum(r["eval_s"] for r in runs)
    return {"s_per_step": train_s / max(steps, 1), "s_per_test_pass": eval_s / max(passes, 1)}


def pct(value: float, sign: bool = False) -> str:
    return f"{100 * value:+.2f}" if sign else f"{100 * value:.2f}"


def p_text(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def seeds_text(needed: float) -> str:
    return str(needed) if math.isfinite(needed) else "- (no effect observed)"


def results_table(table: dict[str, dict]) -> str:
    """A Markdown table of the per-arm summaries (final-epoch accuracy, %)."""
    lines = [
        "| arm | mixing | target | seeds | mean acc. (%) | std (%) | 95% CI (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, row in table.items():
        mixing, tl_align = ARMS[arm]
        target = "aligned (TL-Align)" if tl_align else ("area / blend" if mixing != "none" else "label")
        lines.append(
            f"| {arm} | {mixing} | {target} | {row['n']} | {pct(row['mean'])} | {pct(row['std'])} | "
            f"[{pct(row['ci95_low'])}, {pct(row['ci95_high'])}] |"
        )
    return "\n".join(lines)


def comparisons_table(rows: list[dict]) -> str:
    """A Markdown table of paired comparisons (treatment minus baseline)."""
    lines = [
        "| comparison | paired seeds | mean difference (pp) | 95% CI (pp) | won / lost / tied | sign test p | "
        "paired t p | seeds for 80% power |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['treatment']} vs {row['baseline']} | {row['n']} | {pct(row['mean_difference'], True)} | "
            f"[{pct(row['ci95_low'], True)}, {pct(row['ci95_high'], True)}] | "
            f"{row['wins']} / {row['losses']} / {row['ties']} | {p_text(row['sign_test_p'])} | "
            f"{p_text(row['paired_t_p'])} | {seeds_text(row['seeds_for_80_power'])} |"
        )
    return "\n".join(lines)


def verdict(row: dict, subject: str) -> str:
    """One comparison as measured, and what its 95% CI rules out when it includes 0."""
    low, high, n = 100 * row["ci95_low"], 100 * row["ci95_high"], row["n"]
    text = (
        f"**{row['treatment']} vs {row['baseline']}**: {pct(row['mean_difference'], True)} points "
        f"(95% CI [{low:+.2f}, {high:+.2f}]) over {n} paired seeds; {row['treatment']} won {row['wins']}, lost "
        f"{row['losses']}, tied {row['ties']} (sign test p = {p_text(row['sign_test_p'])}, paired t-test p = "
        f"{p_text(row['paired_t_p'])}). "
    )
    if math.isnan(low) or math.isnan(high):
        return text + "The interval is undefined at this number of seeds."
    if low > 0:
        text += f"{subject} gains here: at least {low:.2f} and at most {high:.2f} points (95% CI)."
    elif high < 0:
        text += f"{subject} costs here: at least {-high:.2f} and at most {-low:.2f} points (95% CI)."
    else:
        text += (
            f"The CI includes 0, so {n} seeds show no difference; what they rule out: {subject} does not cost more "
            f"than {max(-low, 0.0) + 0.0:.2f} points here, and does not gain more than {max(high, 0.0) + 0.0:.2f}."
        )
    needed = row["seeds_for_80_power"]
    if math.isfinite(needed) and needed > n:
        text += f" A paired test would need about {needed} seeds for 80% power at the observed effect."
    return text


def noise_floor_text(rows: list[dict], alignment: dict[str, dict]) -> str:
    """What the Mixup pair (equal targets up to float rounding) says about the noise of one paired comparison."""
    floor = next((r for r in rows if (r["baseline"], r["treatment"]) == NOISE_FLOOR_PAIR), None)
    if floor is None:
        return ""
    gap = alignment.get(NOISE_FLOOR_PAIR[1], {}).get("alignment_gap")
    gap_text = f" (measured mean |aligned_lam - mix_lam| over training: {max(gap):.1e})" if gap else ""
    others = ", ".join(
        f"{r['treatment']} {100 * r['std_difference']:.2f}" for r in rows if (r["baseline"], r["treatment"]) != NOISE_FLOOR_PAIR
    )
    return (
        f"The Mixup pair is the noise floor: its targets are equal up to float rounding{gap_text}, so its paired "
        f"differences (std {100 * floor['std_difference']:.2f} pp over seeds) are numerical noise amplified by "
        f"training. Std of the paired differences of the other pairs (pp): {others or '-'}."
    )


def alignment_table(alignment: dict[str, dict]) -> str:
    """Per TL arm: mean alignment_gap in the first, middle and last epoch, and aligned_lam / mix_lam at the end."""
    lines = [
        "| TL arm | alignment_gap, epoch 1 | middle epoch | last epoch | aligned_lam / mix_lam, last epoch |",
        "|---|---|---|---|---|",
    ]
    for arm, curves in alignment.items():
        gap = curves["alignment_gap"]
        lines.append(
            f"| {arm} | {gap[0]:.4f} | {gap[len(gap) // 2]:.4f} | {gap[-1]:.4f} | "
            f"{curves['aligned_lam'][-1]:.4f} / {curves['mix_lam'][-1]:.4f} |"
        )
    return "\n".join(lines)


def timing_text(time_info: dict) -> str:
    """Run time: summed over runs and, from the runs' timestamps, the wall-clock span."""
    if not time_info.get("runs"):
        return "Run time: no runs."
    text = (
        f"Run time: {time_info['sum_wall_s'] / 3600:.2f} h summed over {time_info['runs']} runs "
        f"({time_info['mean_wall_s']:.0f} s per run, one thread each) on {os.cpu_count()} CPU cores"
    )
    if "span_s" in time_info:
        parts = [
            f"{item['start'][:16].replace('T', ' ')} to {item['finish'][11:16]} UTC, {item['runs']} runs, "
            f"{item['span_s'] / 3600:.2f} h ({', '.join(item['cpus'])})"
            for item in time_info["sittings"]
        ]
        text += (
            f"; wall clock {time_info['span_s'] / 3600:.2f} h in {len(parts)} sitting(s) "
            f"(no pause over {SITTING_GAP_S // 60} min within one): {'; '.join(parts)}; trained by process(es) "
            f"{', '.join(time_info['processes'])} (K/N: worker K of N)"
        )
    if "cpus" in time_info:
        per_cpu = time_info.get("mean_wall_s_per_cpu", {})
        text += "; runs per CPU model: " + ", ".join(
            f"{cpu} {n}" + (f" ({per_cpu[cpu]:.0f} s per run)" if cpu in per_cpu else "")
            for cpu, n in time_info["cpus"].items()
        )
    return text + "."


def settings_text(settings: StudySettings) -> str:
    return ", ".join(f"{key}={value}" for key, value in asdict(settings).items())


def study_report(payload: dict, commands: dict, figure: Path, doc: Path) -> str:
    """The generated Markdown section of the study."""
    settings = StudySettings(**payload["settings"])
    parts = [
        "### Results (generated by scripts/accuracy_study.py)",
        f"Final-epoch test accuracy per arm ({len(payload['seeds'])} seeds: "
        f"{payload['seeds'][0]}-{payload['seeds'][-1]}; every arm of a seed starts from the same weights and sees "
        "the same data order, augmentation and mixing draws):",
        results_table(payload["summary"]),
        "**TL-Align against the same mixing without it** (aligned minus plain, paired by seed; only the target "
        "differs). Seeds for 80% power: what a two-sided paired test at 5% would need if the observed mean and "
        "spread of the differences were the true ones.",
        comparisons_table(payload["comparisons"]),
        "\n".join(f"- {verdict(row, 'TL-Align')}" for row in payload["comparisons"]),
        noise_floor_text(payload["comparisons"], payload["alignment"]),
        "**Does mixing pay off in this regime?** (mixing minus no mixing, paired by seed)",
        comparisons_table(payload["mixing_comparisons"]),
        "\n".join(f"- {verdict(row, row['treatment'])}" for row in payload["mixing_comparisons"]),
        "**The alignment during training** (means over seeds of each epoch's mean; at initialisation attention is "
        "almost uniform and the gap near 0):",
        alignment_table(payload["alignment"]),
        f"![accuracy per arm, test accuracy per epoch, alignment gap per epoch]({os.path.relpath(figure, doc.parent)})",
        "Commands (two processes of one thread each on a 2-core machine, then the aggregation, which also trains "
        f"any run still missing):\n\n    {commands['workers']}\n    {commands['aggregate']}",
        timing_text(payload["timing"]) + f" Aggregated {time.strftime('%Y-%m-%d')}.",
        f"Settings (all arms): {settings_text(settings)}; split: {TEST_SIZE:.0%} stratified test split, seed "
        f"{SPLIT_SEED}; images {settings.image_size} px, patch {settings.patch_size}; eager attention for every arm.",
    ]
    return "\n\n".join(part for part in parts if part)


# ---------------------------------------------------------------------------------------------------------- figure
def arm_color(arm: str) -> str:
    return "#4a90d9" if arm.endswith("+tl") else ("#ffffff" if arm == "none" else "#b0b0b0")


def plot_final_accuracy(ax, table: dict[str, dict], runs: list[dict]) -> None:
    """Bars: mean final accuracy per arm with 95% t-CI; dots: single seeds."""
    arms = list(table)
    means = np.array([100 * table[a]["mean"] for a in arms])
    errors = np.nan_to_num(np.array([100 * (table[a]["ci95_high"] - table[a]["mean"]) for a in arms]))
    ax.bar(range(len(arms)), means, yerr=errors, capsize=6, color=[arm_color(a) for a in arms], edgecolor="black")
    for position, arm in enumerate(arms):
        points = [100 * r["accuracy"] for r in runs if r["method"] == arm]
        ax.scatter([position] * len(points), points, color="black", s=12, zorder=3)
    points = [100 * r["accuracy"] for r in runs]
    ax.set_ylim(max(0.0, min(points + list(means - errors)) - 2), min(100.0, max(points + list(means + errors)) + 1))
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("final epoch: mean over seeds with 95% t-CI, dots: single seeds (blue: TL-Align)")
    ax.grid(axis="y", alpha=0.3)


def plot_pair_curves(ax, runs: list[dict], pair: tuple[str, str]) -> None:
    """Per-epoch test accuracy of a pair (mean over seeds)."""
    for arm in pair:
        curve = mean_curve(runs, arm, "test_accuracy")
        if curve is not None:
            epochs = np.arange(1, len(curve) + 1)
            aligned = arm.endswith("+tl")  # dashed: a plain curve under an identical aligned one stays visible
            ax.plot(epochs, 100 * np.array(curve), color=arm_color(arm) if aligned else "#606060",
                    linestyle="--" if aligned else "-", label=arm)  # fmt: skip
    ax.set_title(f"{pair[1]} vs {pair[0]}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_alignment_gap(ax, alignment: dict[str, dict]) -> None:
    """Mean alignment_gap per epoch of the TL arms."""
    for arm, curves in alignment.items():
        ax.plot(np.arange(1, len(curves["alignment_gap"]) + 1), curves["alignment_gap"], label=arm)
    ax.set_title("TL arms: mean |aligned_lam - mix_lam|")
    ax.set_xlabel("epoch")
    ax.set_ylabel("alignment_gap, mean over seeds")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_study(payload: dict, path: Path) -> None:
    """The study's figure: final accuracy per arm above; per pair the test accuracy per epoch, and the gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = payload["runs"]
    fig = plt.figure(figsize=(16, 8.5))
    grid = fig.add_gridspec(2, len(PAIRS) + 1, height_ratios=(1, 1))
    plot_final_accuracy(fig.add_subplot(grid[0, :]), payload["summary"], runs)
    for column, pair in enumerate(PAIRS):
        plot_pair_curves(fig.add_subplot(grid[1, column]), runs, pair)
    plot_alignment_gap(fig.add_subplot(grid[1, len(PAIRS)]), payload["alignment"])
    fig.suptitle(
        f"sklearn digits, small ViT from scratch ({len(payload['seeds'])} paired seeds, "
        f"{payload['split']['test_images']} test images)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- tuning
def tuning_table(configurations: list[dict]) -> str:
    """Markdown: per configuration its overrides, per-arm mean final accuracy over its seeds, seeds, wall time."""
    arms = [arm for arm in PLAIN_ARMS if any(r["method"] == arm for c in configurations for r in c["runs"])]
    lines = [
        "| configuration | overrides of the defaults at the time | " + " | ".join(f"{a} (%)" for a in arms)
        + " | mixing minus none (pp, paired by seed) | seeds | wall time (min) |",
        "|---|---|" + "---|" * len(arms) + "---|---|---|",
    ]
    for config in configurations:
        cells = []
        for arm in arms:
            values = [r["accuracy"] for r in config["runs"] if r["method"] == arm]
            cells.append(f"{pct(np.mean(values))} ± {pct(np.std(values, ddof=1)) if len(values) > 1 else '-'}"
                         if values else "-")  # fmt: skip
        seeds = sorted({r["seed"] for r in config["runs"]})
        overrides = ", ".join(f"{k}={v}" for k, v in config["overrides"].items()) or "(none)"
        name = config["name"] + (" (= the study's settings)" if config["is_study"] else "")
        wall_min = sum(r["wall_s"] for r in config["runs"]) / 60
        gains = [compare(config["runs"], "none", arm) for arm in arms if arm != "none"]
        gains_text = ", ".join(f"{g['treatment']} {pct(g['mean_difference'], True)}" for g in gains if g) or "-"
        lines.append(
            f"| {name} | {overrides} | " + " | ".join(cells) + f" | {gains_text} | {len(seeds)} | {wall_min:.1f} |"
        )
    return "\n".join(lines)


def tuning_report(configurations: list[dict]) -> str:
    """The generated Markdown section listing every tuning configuration."""
    total_h = sum(r["wall_s"] for c in configurations for r in c["runs"]) / 3600
    return "\n\n".join(
        [
            "### Tuning runs (generated by scripts/accuracy_study.py --tune)",
            "Plain arms only (no TL-Align arm is ever run while tuning), final-epoch test accuracy, mean ± std over "
            "the configuration's seeds. The selection uses the baselines alone, so any bias it brings favours the "
            "plain arms, not TL-Align. Chosen settings are frozen as the defaults of `StudySettings`; the row "
            "marked '= the study's settings' matches the current defaults.",
            tuning_table(configurations),
            f"Total: {sum(len(c['runs']) for c in configurations)} runs, {total_h:.2f} h summed. A configuration: "
            "`python scripts/accuracy_study.py --tune NAME --set field=value ...` (writes "
            "docs/data/accuracy_tuning/NAME/, one JSON per run; resumable).",
        ]
    )


# ---------------------------------------------------------------------------------------------------------- outputs
def aggregate(runs: list[dict], settings: StudySettings, seeds: list[int]) -> dict:
    """The study's JSON payload: settings, every run, per-arm summaries, paired comparisons, alignment, timing."""
    test_images = min(settings.test_limit or TEST_IMAGES, TEST_IMAGES)
    return {
        "settings": asdict(settings),
        "split": {
            "test_size": TEST_SIZE, "seed": SPLIT_SEED, "image_size": settings.image_size,
            "patch_size": settings.patch_size,
            "test_images": test_images,
        },  # fmt: skip
        "seeds": seeds,
        "arms": {arm: {"mixing_method": m, "tl_align": tl} for arm, (m, tl) in ARMS.items()},
        "runs": runs,
        "summary": summaries(runs),
        "comparisons": comparisons(runs, PAIRS),
        "mixing_comparisons": comparisons(runs, MIXING_PAIRS),
        "alignment": alignment_summary(runs),
        "timing": timing(runs),
        "speed": step_speed(runs) if runs else {},
    }


def write_study(runs: list[dict], settings: StudySettings, seeds: list[int], output_dir: Path, argv: list[str]) -> dict:
    """Write accuracy_study.json, img/accuracy_study.png and the `accuracy-study` section of accuracy.md under
    `output_dir`, print the tables, and return the JSON payload as saved. `argv`: the plan's command line, for
    the commands that the section lists."""
    payload = aggregate(runs, settings, seeds)
    json_path, figure, doc = output_dir / "accuracy_study.json", output_dir / "img" / "accuracy_study.png", output_dir / "accuracy.md"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(dump_json(payload))
    plot_study(payload, figure)
    write_section(doc, "accuracy-study", study_report(payload, commands(argv), figure, doc), "Accuracy")
    print(results_table(payload["summary"]))
    print(comparisons_table(payload["comparisons"]))
    print(timing_text(payload["timing"]))
    return json.loads(json_path.read_text())


def write_tuning(configurations: list[dict], output_dir: Path) -> None:
    """Write the `accuracy-tuning` section of `output_dir`/accuracy.md and print its table."""
    write_section(output_dir / "accuracy.md", "accuracy-tuning", tuning_report(configurations), "Accuracy")
    print(tuning_table(configurations))


# ---------------------------------------------------------------------------------------------------------- command line
def make_parser() -> argparse.ArgumentParser:
    parser = add_plan_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument(
        "--section", action="append", choices=("study", "tuning"),
        help="Write only this section (repeatable; default: both). study: the JSON, the figure and the results.",
    )  # fmt: skip
    parser.set_defaults(tune=None)  # the plan of the study's runs, never of one tuning configuration
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Aggregate the saved runs of the plan; return {"study": JSON payload, "tuning": configurations} (as written)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    args = parser.parse_args(argv)
    settings, _, seeds, arms, output_dir, runs_dir = study_plan(parser, args)
    sections = args.section or ["study", "tuning"]
    written = {}
    try:
        if "study" in sections:
            runs = load_runs(runs_dir, settings, arms, seeds, replace_stale=args.quick)
            print(f"{len(runs)} of {len(arms) * len(seeds)} runs of the plan are saved in {runs_dir}.")
            written["study"] = write_study(runs, settings, seeds, output_dir, argv)
    except SettingsMismatch as error:
        parser.exit(2, f"error: {error}\n")
    if "tuning" in sections:
        written["tuning"] = tuning_configurations(args.tuning_dir)
        write_tuning(written["tuning"], output_dir)
    return written


if __name__ == "__main__":
    main()
