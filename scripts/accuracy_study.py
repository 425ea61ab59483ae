#!/usr/bin/env python
"""Accuracy study: does TL-Align improve test accuracy over plain mixing on real data? (issue 6, part 2)

Six methods, trained with the same small ViT, schedule and seeds through the public API (`TLAlignConfig` +
`TLAlignTrainer`, the library's `make_transforms` pipeline on a `datasets.Dataset`):

    none            no mixing (label smoothing only)
    cutmix          CutMix, pixel box, area-lambda target            (tl_align=False)
    mixup           Mixup, blend-lambda target                        (tl_align=False)
    cutmix+tl       CutMix, pixel box, token-label aligned target
    token_cutmix+tl CutMix, box on the patch grid (official default), aligned target
    mixup+tl        Mixup, aligned target (the official code cannot run it)

Data: scikit-learn's digits (1,797 real 8x8 scans, 10 classes), a fixed stratified split (`TEST_SIZE`,
`SPLIT_SEED` below: 1,347 train / 450 test), upsampled bicubic to 32 px so that the 4 px patches form an 8x8 grid.
The images live in memory (PIL, encoded once into the Arrow table) instead of an image folder: the same transforms
as the example script, without writing 1,797 files.

    python scripts/accuracy_study.py                 # the full study (6 methods x 5 seeds), writes docs/
    python scripts/accuracy_study.py --quick         # a smoke test (< 3 min), writes outputs/accuracy-quick/

Each run's result is saved as soon as it finishes (outputs/accuracy-study-runs/, one JSON per method and seed) and
a run already saved with the same settings is skipped, so an interrupted study resumes where it stopped, and
`--workers N --worker K` splits the runs over N processes; any invocation then aggregates what is saved into
docs/accuracy_study.json, docs/img/accuracy_study.png and the generated section of docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import transformers
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from scipy import stats
from transformers import ViTConfig, ViTForImageClassification

from tl_align_hf import TLAlignConfig, TLAlignTrainer
from tl_align_hf.data import default_image_processor, make_transforms

REPO = Path(__file__).resolve().parents[1]
TEST_SIZE = 0.25  # fixed stratified split: 1,347 train / 450 test images
SPLIT_SEED = 0
IMAGE_SIZE = 32  # 8 px digits upsampled 4x; with PATCH_SIZE 4 the ViT sees an 8x8 grid of patches
PATCH_SIZE = 4

# name -> (mixing_method, tl_align, mixup_alpha)
METHODS: dict[str, tuple[str, bool, float]] = {
    "none": ("none", False, 0.0),
    "cutmix": ("cutmix", False, 0.0),
    "mixup": ("mixup", False, 0.8),
    "cutmix+tl": ("cutmix", True, 0.0),
    "token_cutmix+tl": ("token_cutmix", True, 0.0),
    "mixup+tl": ("mixup", True, 0.8),
}
# The pairs that isolate TL-Align: (plain mixing, same mixing + TL-Align).
TL_ALIGN_PAIRS = (("cutmix", "cutmix+tl"), ("mixup", "mixup+tl"))


@dataclass(frozen=True)
class StudySettings:
    """Model and schedule shared by all methods (frozen after tuning on the no-mixing baseline)."""

    hidden_size: int = 48
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 96
    epochs: float = 15
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.05
    batch_size: int = 64
    label_smoothing: float = 0.1
    crop_scale_min: float = 0.5
    cutmix_alpha: float = 1.0
    train_limit: int | None = None  # first n training images (smoke tests only)


FULL = StudySettings()
QUICK = replace(FULL, epochs=2, train_limit=384)
FULL_SEEDS = (0, 1, 2, 3, 4)
QUICK_SEEDS = (0, 1)


# ---------------------------------------------------------------------------------------------------------- data
def digit_image(pixels: np.ndarray) -> Image.Image:
    """(8, 8) floats in 0..16 -> a greyscale PIL image of IMAGE_SIZE px, bicubic (as tl_align_hf.digits)."""
    grey = np.rint(pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)


def digits_splits(train_limit: int | None = None) -> tuple[Dataset, Dataset]:
    """(train, test) `datasets.Dataset`s with `image` (PIL) and `label` (ClassLabel 0-9): the fixed split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(
        indices, test_size=TEST_SIZE, stratify=digits.target, random_state=SPLIT_SEED
    )
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(split_idx: np.ndarray) -> Dataset:
        rows = sorted(split_idx.tolist())
        images = [digit_image(digits.images[i]) for i in rows]
        return Dataset.from_dict({"image": images, "label": digits.target[rows].tolist()}, features=features)

    train = split(train_idx)
    if train_limit is not None:
        train = train.shuffle(seed=SPLIT_SEED).select(range(min(train_limit, len(train))))
    return train, split(test_idx)


# ---------------------------------------------------------------------------------------------------------- runs
def make_model(settings: StudySettings, seed: int) -> ViTForImageClassification:
    """A ViT from scratch for 32 px digits, initialised from `seed`."""
    transformers.set_seed(seed)
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        intermediate_size=settings.intermediate_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
    )
    return ViTForImageClassification(config)


def make_config(method: str, seed: int, settings: StudySettings, output_dir: str) -> TLAlignConfig:
    """The TLAlignConfig of one run: the shared schedule plus the method's mixing settings."""
    mixing_method, tl_align, mixup_alpha = METHODS[method]
    return TLAlignConfig(
        output_dir=output_dir,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=settings.warmup_ratio,
        weight_decay=settings.weight_decay,
        mixing_method=mixing_method,
        tl_align=tl_align,
        mixup_alpha=mixup_alpha,
        cutmix_alpha=settings.cutmix_alpha,
        label_smoothing=settings.label_smoothing,
        seed=seed,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        use_cpu=True,
    )


def train_and_test(
    method: str, seed: int, settings: StudySettings, train: Dataset, test: Dataset, work_dir: str
) -> dict:
    """Train one model with `method` and `seed`; return its test accuracy and wall time."""
    start = time.perf_counter()
    train_transform, eval_transform = make_transforms(
        default_image_processor(IMAGE_SIZE),
        horizontal_flip=False,  # a mirrored digit is not the same digit
        scale=(settings.crop_scale_min, 1.0),
        seed=seed,
    )
    trainer = TLAlignTrainer(
        model=make_model(settings, seed),
        args=make_config(method, seed, settings, work_dir),
        train_dataset=train.with_transform(train_transform),
        eval_dataset=test.with_transform(eval_transform),
    )
    trainer.train()
    metrics = trainer.evaluate()
    return {
        "method": method,
        "seed": seed,
        "accuracy": float(metrics["eval_accuracy"]),
        "top5_accuracy": float(metrics["eval_top5_accuracy"]),
        "eval_loss": float(metrics["eval_loss"]),
        "wall_s": round(time.perf_counter() - start, 1),
    }


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
    if difference == 0:
        return math.inf
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return math.ceil(z**2 * variance / difference**2)


def compare(runs: list[dict], plain: str, aligned: str) -> dict | None:
    """Aligned minus plain over the seeds both have: mean difference, Welch and paired p-values, seeds needed.

    Runs with the same seed share the initial weights, the data order, the augmentation and the mixing draws, so
    the paired test is the sharper one; Welch's test ignores the pairing.
    """
    by_seed = {name: {r["seed"]: r["accuracy"] for r in runs if r["method"] == name} for name in (plain, aligned)}
    seeds = sorted(set(by_seed[plain]) & set(by_seed[aligned]))
    if len(seeds) < 2:
        return None
    a = np.array([by_seed[plain][s] for s in seeds])
    b = np.array([by_seed[aligned][s] for s in seeds])
    difference = float(b.mean() - a.mean())
    return {
        "plain": plain,
        "aligned": aligned,
        "difference": difference,
        "seeds_better": int((b > a).sum()),
        "seeds": len(seeds),
        "welch_p": float(stats.ttest_ind(b, a, equal_var=False).pvalue),
        "paired_p": float(stats.ttest_rel(b, a).pvalue),
        "seeds_needed_unpaired": seeds_needed(a.var(ddof=1) + b.var(ddof=1), difference),
        "seeds_needed_paired": seeds_needed((b - a).var(ddof=1), difference),
    }


def summaries(runs: list[dict]) -> dict[str, dict]:
    """Per-method summaries, in METHODS order, for the methods that have runs."""
    return {
        name: summarize([r["accuracy"] for r in runs if r["method"] == name])
        for name in METHODS
        if any(r["method"] == name for r in runs)
    }


# ---------------------------------------------------------------------------------------------------------- output
def results_table(table: dict[str, dict]) -> str:
    """A Markdown table of the per-method summaries (accuracies in %)."""
    lines = ["| method | seeds | mean acc. (%) | std (%) | 95% CI (%) |", "|---|---|---|---|---|"]
    for name, row in table.items():
        lines.append(
            f"| {name} | {row['n']} | {100 * row['mean']:.2f} | {100 * row['std']:.2f} | "
            f"[{100 * row['ci95_low']:.2f}, {100 * row['ci95_high']:.2f}] |"
        )
    return "\n".join(lines)


def comparisons_table(comparisons: list[dict]) -> str:
    """A Markdown table of TL-Align against the same mixing without it."""
    lines = [
        "| comparison | difference (pp) | seeds better | Welch p | paired p | seeds for 80% power: unpaired / paired |",
        "|---|---|---|---|---|---|",
    ]
    for row in comparisons:
        lines.append(
            f"| {row['aligned']} vs {row['plain']} | {100 * row['difference']:+.2f} | "
            f"{row['seeds_better']}/{row['seeds']} | {row['welch_p']:.3f} | {row['paired_p']:.3f} | "
            f"{row['seeds_needed_unpaired']} / {row['seeds_needed_paired']} |"
        )
    return "\n".join(lines)


def plot_accuracy(table: dict[str, dict], runs: list[dict], path: Path) -> None:
    """Bar chart: mean test accuracy per method, 95% t-CI error bars, each seed's accuracy as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    means = np.array([100 * table[n]["mean"] for n in names])
    errors = np.nan_to_num(np.array([100 * (table[n]["ci95_high"] - table[n]["mean"]) for n in names]))
    colors = ["#8fbce6" if n.endswith("+tl") else "#c8c8c8" for n in names]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.bar(range(len(names)), means, yerr=errors, capsize=6, color=colors, edgecolor="black")
    for position, name in enumerate(names):
        points = [100 * r["accuracy"] for r in runs if r["method"] == name]
        ax.scatter([position] * len(points), points, color="black", s=14, zorder=3)
    points = [100 * r["accuracy"] for r in runs]
    ax.set_ylim(max(0.0, min(points + list(means - errors)) - 2), min(100.0, max(points + list(means + errors)) + 2))
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        "sklearn digits, small ViT from scratch (450 test images)\n"
        "bars: mean over seeds with 95% t-CI; dots: single seeds; blue: TL-Align"
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs: list[dict], settings: StudySettings, command: str, figure: Path, doc: Path) -> str:
    """The generated Markdown section: settings, results table, TL-Align comparisons, command and wall time."""
    table = summaries(runs)
    wall_s = sum(run["wall_s"] for run in runs)
    comparisons = [c for c in (compare(runs, *pair) for pair in TL_ALIGN_PAIRS) if c is not None]
    settings_text = ", ".join(f"{key}={value}" for key, value in asdict(settings).items())
    return "\n\n".join(
        [
            "### Results (generated by scripts/accuracy_study.py)",
            results_table(table),
            "TL-Align against the same mixing without it: difference of means (aligned minus plain), seeds where the "
            "aligned run beat its plain twin, Welch's and the seed-paired t-test, and the seeds per method that a "
            "two-sided test at 5% would need for 80% power if the observed difference and spreads were the true ones:",
            comparisons_table(comparisons),
            f"![test accuracy per method]({os.path.relpath(figure, doc.parent)})",
            f"Command: `{command}`  \nRun time: {wall_s / 60:.1f} min summed over {len(runs)} runs "
            f"({wall_s / max(len(runs), 1):.0f} s per run) on {os.cpu_count()} shared CPU cores, "
            f"{time.strftime('%Y-%m-%d')}.  \nSettings (all methods): {settings_text}; split: {TEST_SIZE:.0%} "
            f"stratified test split, seed {SPLIT_SEED}; images {IMAGE_SIZE} px, patch {PATCH_SIZE}.",
        ]
    )


def run_path(runs_dir: Path, method: str, seed: int) -> Path:
    """Where one run's result is saved as soon as it finishes."""
    return runs_dir / f"{method}-seed{seed}.json"


def load_runs(runs_dir: Path, settings: StudySettings, methods: list[str], seeds: list[int]) -> list[dict]:
    """Saved runs of this plan with the same settings (from this or an earlier, interrupted invocation)."""
    runs = []
    for seed in seeds:
        for method in methods:
            path = run_path(runs_dir, method, seed)
            if path.exists():
                saved = json.loads(path.read_text())
                if saved["settings"] == asdict(settings):
                    runs.append(saved["result"])
    return runs


def save_run(runs_dir: Path, result: dict, settings: StudySettings) -> None:
    """Save one run's result with the settings it was trained with."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    payload = {"settings": asdict(settings), "result": result}
    run_path(runs_dir, result["method"], result["seed"]).write_text(json.dumps(payload, indent=2) + "\n")


def save_study(path: Path, runs: list[dict], settings: StudySettings, seeds: list[int]) -> None:
    """Write the raw per-seed numbers, the settings and the per-method summaries."""
    payload = {
        "settings": asdict(settings),
        "split": {"test_size": TEST_SIZE, "seed": SPLIT_SEED, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
        "seeds": seeds,
        "runs": runs,
        "summary": summaries(runs),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="Smoke test: 2 seeds, 2 epochs, 384 training images (< 3 min)."
    )
    parser.add_argument("--seeds", type=int, help="Number of seeds per method (0, 1, ...).")
    parser.add_argument("--epochs", type=float, help="Override the number of epochs.")
    parser.add_argument("--train-limit", type=int, help="Train on the first n training images (smoke tests).")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="FIELD=VALUE", help="Override StudySettings fields (for tuning)."
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="Subset of methods.")
    parser.add_argument("--output-dir", type=Path, help="Where accuracy.md, accuracy_study.json, img/ go.")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads. 1 by default: on a shared 2-core machine, 2 threads oversubscribe and run 2-4x slower.",
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        help="Where each finished run is saved (default: outputs/accuracy-study-runs for docs/, else OUTPUT_DIR/runs).",
    )
    parser.add_argument("--workers", type=int, default=1, help="Split the runs over this many processes ...")
    parser.add_argument("--worker", type=int, default=0, help="... of which this is number 0, 1, ...")
    return parser


def study_plan(args: argparse.Namespace) -> tuple[StudySettings, list[int], list[str], Path]:
    """Settings, seeds, methods and output folder from the command line."""
    settings = QUICK if args.quick else FULL
    if args.epochs is not None:
        settings = replace(settings, epochs=args.epochs)
    if args.train_limit is not None:
        settings = replace(settings, train_limit=args.train_limit)
    for assignment in args.set:
        name, value = assignment.split("=", 1)
        settings = replace(settings, **{name: json.loads(value)})  # 40, 0.002, null
    seeds = list(range(args.seeds)) if args.seeds else list(QUICK_SEEDS if args.quick else FULL_SEEDS)
    output_dir = args.output_dir or (REPO / "outputs" / "accuracy-quick" if args.quick else REPO / "docs")
    return settings, seeds, args.methods or list(METHODS), output_dir


def train_missing(plan: list[tuple[str, int]], settings: StudySettings, runs_dir: Path) -> None:
    """Train and save every (method, seed) of `plan` that has no saved result yet."""
    import tempfile

    train, test = digits_splits(settings.train_limit)
    with tempfile.TemporaryDirectory() as work_dir:
        for method, seed in plan:
            if load_runs(runs_dir, settings, [method], [seed]):
                continue
            result = train_and_test(method, seed, settings, train, test, work_dir)
            save_run(runs_dir, result, settings)
            print(
                f"{method:>16} seed {seed}: accuracy {result['accuracy']:.4f} ({result['wall_s']:.0f} s)", flush=True
            )


def main(argv: list[str] | None = None) -> dict:
    """Run the study (or resume it); write the JSON, the chart and the Markdown section; return the JSON payload."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from doc_sections import write_section

    args = make_parser().parse_args(argv)
    settings, seeds, methods, output_dir = study_plan(args)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("tl_align_hf").setLevel(logging.ERROR)
    default_runs_dir = REPO / "outputs" / "accuracy-study-runs" if output_dir == REPO / "docs" else output_dir / "runs"
    runs_dir = args.runs_dir or default_runs_dir
    # Seed-major order: an interrupted study still has every method at the same seeds.
    plan = [(method, seed) for seed in seeds for method in methods]
    train_missing(plan[args.worker :: args.workers], settings, runs_dir)
    runs = load_runs(runs_dir, settings, methods, seeds)
    json_path = output_dir / "accuracy_study.json"
    save_study(json_path, runs, settings, seeds)
    figure, doc = output_dir / "img" / "accuracy_study.png", output_dir / "accuracy.md"
    plot_accuracy(summaries(runs), runs, figure)
    command = "python scripts/accuracy_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_section(doc, "accuracy-study", report(runs, settings, command.strip(), figure, doc), "Accuracy")
    print(results_table(summaries(runs)))
    return json.loads(json_path.read_text())


if __name__ == "__main__":
    main()
