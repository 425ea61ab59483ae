#!/usr/bin/env python
"""Accuracy study: does TL-Align improve test accuracy over the same mixing without it, on real data?

Seven arms, trained with the same small ViT, schedule and seeds through the public API (`TLAlignConfig` +
`TLAlignTrainer`, the library's `make_transforms` pipeline on a `datasets.Dataset`):

    none              no mixing (label smoothing only)
    cutmix            CutMix, pixel box, area target                    (tl_align=False)
    cutmix+tl         the same CutMix, token-label aligned target       (tl_align=True)
    token_cutmix      CutMix, box on the patch grid, area target        (tl_align=False)
    token_cutmix+tl   the same, aligned target (the official TL-Align default)
    mixup             Mixup, blend target                               (tl_align=False)
    mixup+tl          Mixup, aligned target: equal to the blend target up to float rounding (the noise floor)

Runs of one seed share the initial weights, the data order, the augmentation and the mixing draws; within a pair
(plain, +tl) only the target differs. Every model uses eager attention (`StudySettings.attn_implementation`), the
backend whose probabilities the aligned arms reuse, so both arms of a pair compute the same logits from the same
weights (`first_step_outputs` checks it). Each pair is compared over the same seeds: the mean paired difference and
its 95% t-interval, wins / losses / ties, a two-sided sign test, the paired t-test, and the seeds that 80% power
would need at the observed effect.

Data: scikit-learn's digits (1,797 real 8x8 scans, 10 classes), a fixed stratified split (`TEST_SIZE`,
`SPLIT_SEED`: 1,347 train / 450 test), upsampled bicubic to `StudySettings.image_size` px (16: the 4 px patches
form a 4x4 grid). Each run evaluates on the test split after every epoch; the test set is only watched, never used to pick an epoch: the
reported accuracy is the final epoch's.

    python scripts/accuracy_study.py --tune NAME --set learning_rate=5e-4 epochs=100   # tune (plain arms only)
    for w in 0 1; do python scripts/accuracy_study.py --workers 2 --worker $w & done; wait   # the study, 2 processes
    python scripts/accuracy_study.py                   # aggregate: docs/accuracy_study.json, figure, docs/accuracy.md
    python scripts/accuracy_study.py --quick           # a smoke test (< 3 min), writes outputs/accuracy-quick/

The study's settings are the defaults of `StudySettings` (the one place to change them, once tuning has frozen
them). Each finished run is saved at once (one JSON per arm and seed, under docs/data/accuracy_study_runs and
docs/data/accuracy_tuning/NAME, which the repository keeps, so the aggregation reruns from a clone) and skipped when
found again with the same settings, so an interrupted study or tuning run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import transformers
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from scipy import stats
from transformers import ViTConfig, ViTForImageClassification
from transformers.trainer_callback import PrinterCallback

from tl_align_hf import TLAlignConfig, TLAlignTrainer
from tl_align_hf.data import default_image_processor, make_transforms

REPO = Path(__file__).resolve().parents[1]
TEST_SIZE = 0.25  # fixed stratified split: 1,347 train / 450 test images
SPLIT_SEED = 0
TRAIN_IMAGES, TEST_IMAGES = 1347, 450  # sizes of the split

# arm -> (mixing_method, tl_align)
ARMS: dict[str, tuple[str, bool]] = {
    "none": ("none", False),
    "cutmix": ("cutmix", False),
    "cutmix+tl": ("cutmix", True),
    "token_cutmix": ("token_cutmix", False),
    "token_cutmix+tl": ("token_cutmix", True),
    "mixup": ("mixup", False),
    "mixup+tl": ("mixup", True),
}
PLAIN_ARMS = tuple(arm for arm, (_, tl_align) in ARMS.items() if not tl_align)
TL_ARMS = tuple(arm for arm, (_, tl_align) in ARMS.items() if tl_align)
# (plain, aligned): only the target differs. The official default first; Mixup last, as the noise floor.
PAIRS = (("token_cutmix", "token_cutmix+tl"), ("cutmix", "cutmix+tl"), ("mixup", "mixup+tl"))
NOISE_FLOOR_PAIR = ("mixup", "mixup+tl")
# (no mixing, mixing): does mixing pay off in this regime at all?
MIXING_PAIRS = (("none", "token_cutmix"), ("none", "cutmix"), ("none", "mixup"))
TUNING_ARMS = ("none", "cutmix", "token_cutmix")  # the default arms of --tune (any plain arm may be asked for)

STUDY_SEEDS = 10  # paired seeds per comparison (--seeds to change)
STUDY_FIRST_SEED = 10  # the study's seeds start here: disjoint from the tuning seeds (0, 1, ...), so that the
# settings were never chosen on the runs that the study reports
TUNING_SEEDS = 3
QUICK_SEEDS = 2
STUDY_WORKERS = 2  # processes of one thread each, as the documented command runs them
CURVES = ("train_loss", "mix_lam", "aligned_lam", "alignment_gap", "test_accuracy", "test_loss")


@dataclass(frozen=True)
class StudySettings:
    """Model and schedule shared by all arms. THE DEFAULTS ARE THE STUDY'S FROZEN SETTINGS: change them here.

    Tune them with `--tune NAME --set field=value ...` on the plain arms only (never on the TL-Align arms), then
    write the chosen values here. Frozen on 2026-12-02 from the tuning runs listed in docs/accuracy.md (seed 0,
    plain arms): the example's model (hidden 64, MLP 128), batch 32, on 16 px images (a 4x4 grid of 4 px
    patches, 4x fewer tokens than 32 px), which paid for a 100-epoch schedule, the first in which plain CutMix
    matched no mixing.
    """

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 128
    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.1  # of all steps, linear warm-up, then cosine decay
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0  # gradient clipping (0 disables it)
    label_smoothing: float = 0.1
    crop_scale_min: float = 0.5  # random resized crop, scale (crop_scale_min, 1)
    cutmix_alpha: float = 1.0  # cutmix and token_cutmix arms
    mixup_alpha: float = 0.8  # mixup arms
    attn_implementation: str = "eager"  # the same backend for every arm (the aligned arms reuse its probabilities)
    image_size: int = 16  # the 8 px digits upsampled bicubic to this size
    patch_size: int = 4  # the ViT sees an (image_size / patch_size)^2 grid of patches
    mix_prob: float = 1.0  # probability that a batch of a mixing arm is mixed
    train_limit: int | None = None  # the first n training images (smoke tests only)
    test_limit: int | None = None  # the first n test images (smoke tests only)

    def __post_init__(self):
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a whole number >= 1 (one test evaluation per epoch), got {self.epochs!r}.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size}): "
                "the patches tile the image."
            )


QUICK = StudySettings(epochs=2, train_limit=384)


# ---------------------------------------------------------------------------------------------------------- data
def digit_image(pixels: np.ndarray, image_size: int) -> Image.Image:
    """(8, 8) floats in 0..16 -> a greyscale PIL image of `image_size` px, bicubic (as tl_align_hf.digits)."""
    grey = np.rint(pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey).resize((image_size, image_size), Image.Resampling.BICUBIC)


def digits_splits(
    image_size: int, train_limit: int | None = None, test_limit: int | None = None
) -> tuple[Dataset, Dataset]:
    """(train, test) `datasets.Dataset`s with `image` (PIL, `image_size` px) and `label` (ClassLabel 0-9): the
    fixed split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(
        indices, test_size=TEST_SIZE, stratify=digits.target, random_state=SPLIT_SEED
    )
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(split_idx: np.ndarray, limit: int | None) -> Dataset:
        rows = sorted(split_idx.tolist())
        images = [digit_image(digits.images[i], image_size) for i in rows]
        dataset = Dataset.from_dict({"image": images, "label": digits.target[rows].tolist()}, features=features)
        if limit is not None:
            dataset = dataset.shuffle(seed=SPLIT_SEED).select(range(min(limit, len(dataset))))
        return dataset

    return split(train_idx, train_limit), split(test_idx, test_limit)


# ---------------------------------------------------------------------------------------------------------- runs
def make_model(settings: StudySettings, seed: int) -> ViTForImageClassification:
    """A ViT from scratch for the digits with `settings.attn_implementation` attention, initialised from `seed`."""
    transformers.set_seed(seed)
    config = ViTConfig(
        image_size=settings.image_size,
        patch_size=settings.patch_size,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        intermediate_size=settings.intermediate_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
        attn_implementation=settings.attn_implementation,
    )
    return ViTForImageClassification(config)


def make_config(arm: str, seed: int, settings: StudySettings, output_dir: str) -> TLAlignConfig:
    """The TLAlignConfig of one run: the shared schedule, the arm's mixing and target, one test pass per epoch."""
    mixing_method, tl_align = ARMS[arm]
    return TLAlignConfig(
        output_dir=output_dir,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=settings.warmup_ratio,  # below 1: a fraction of all steps
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        mixing_method=mixing_method,
        tl_align=tl_align,
        mixup_alpha=settings.mixup_alpha if mixing_method == "mixup" else 0.0,  # > 0 would switch CutMix with Mixup
        cutmix_alpha=settings.cutmix_alpha,
        mix_prob=settings.mix_prob,
        label_smoothing=settings.label_smoothing,
        seed=seed,
        eval_strategy="epoch",  # watched only: the reported accuracy is the final epoch's
        logging_strategy="epoch",  # train loss, mix_lam, aligned_lam, alignment_gap: means over each epoch
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        use_cpu=True,
    )


def make_trainer(arm: str, seed: int, settings: StudySettings, train: Dataset, test: Dataset, work_dir: str):
    """The TLAlignTrainer of one run, with the library's transforms (no flip: a mirrored digit is another digit)."""
    train_transform, eval_transform = make_transforms(
        default_image_processor(settings.image_size), horizontal_flip=False, scale=(settings.crop_scale_min, 1.0), seed=seed
    )
    trainer = TLAlignTrainer(
        model=make_model(settings, seed),
        args=make_config(arm, seed, settings, work_dir),
        train_dataset=train.with_transform(train_transform),
        eval_dataset=test.with_transform(eval_transform),
    )
    trainer.remove_callback(PrinterCallback)  # disable_tqdm's printer would print every epoch's logs
    return trainer


def significant(values: list[float], digits: int = 6) -> list[float]:
    """`values` rounded to `digits` significant digits (a curve of 100 epochs stays small in the JSON)."""
    return [float(f"{value:.{digits}g}") for value in values]


def epoch_curves(log_history: list[dict], epochs: int) -> dict[str, list[float]]:
    """Per-epoch training means (loss, mix_lam and, for TL arms, aligned_lam and alignment_gap) and test metrics,
    to 6 significant digits."""
    train_logs = [entry for entry in log_history if "loss" in entry]
    eval_logs = [entry for entry in log_history if "eval_accuracy" in entry]
    if len(train_logs) != epochs or len(eval_logs) != epochs:
        raise RuntimeError(f"expected {epochs} epoch logs, got {len(train_logs)} training and {len(eval_logs)} test logs")
    curves = {"epoch": [round(entry["epoch"], 4) for entry in eval_logs], "train_loss": [e["loss"] for e in train_logs]}
    for name in ("mix_lam", "aligned_lam", "alignment_gap"):
        if all(name in entry for entry in train_logs):
            curves[name] = [entry[name] for entry in train_logs]
    curves["test_accuracy"] = [entry["eval_accuracy"] for entry in eval_logs]
    curves["test_loss"] = [entry["eval_loss"] for entry in eval_logs]
    curves["test_top5_accuracy"] = [entry["eval_top5_accuracy"] for entry in eval_logs]
    return {name: significant(values) for name, values in curves.items()}


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else `platform.processor()`): a study resumed on another machine
    shows which runs ran where (float rounding, hence training noise, can differ between CPU types)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def train_and_test(arm: str, seed: int, settings: StudySettings, train: Dataset, test: Dataset, work_dir: str) -> dict:
    """Train one run; return its final-epoch test accuracy, per-epoch curves and timings."""
    started, start = utc_now(), time.perf_counter()
    trainer = make_trainer(arm, seed, settings, train, test, work_dir)
    output = trainer.train()
    final = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry][-1]  # the final epoch's
    curves = epoch_curves(trainer.state.log_history, settings.epochs)
    eval_s = sum(entry["eval_runtime"] for entry in trainer.state.log_history if "eval_runtime" in entry)
    mixing_method, tl_align = ARMS[arm]
    return {
        "method": arm,
        "seed": seed,
        "mixing_method": mixing_method,
        "tl_align": tl_align,
        "accuracy": final["eval_accuracy"],
        "top5_accuracy": final["eval_top5_accuracy"],
        "eval_loss": final["eval_loss"],
        "curves": curves,
        "train_steps": trainer.state.global_step,
        "train_s": round(output.metrics["train_runtime"] - eval_s, 2),  # optimisation steps only
        "eval_s": round(eval_s, 2),  # all test passes
        "wall_s": round(time.perf_counter() - start, 1),
        "started": started,
        "finished": utc_now(),
        "cpu": cpu_model(),
    }


def first_step_outputs(arm: str, seed: int, settings: StudySettings, train: Dataset, test: Dataset, work_dir: str):
    """(first training batch, model outputs on it) of a run, through the trainer's own loss: for checking that
    the plain and aligned arms of a seed see the same batch and compute the same logits."""
    trainer = make_trainer(arm, seed, settings, train, test, work_dir)
    transformers.set_seed(seed)  # as Trainer.train does before it draws the data order
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    return batch, outputs


# ---------------------------------------------------------------------------------------------------------- saved runs
class SettingsMismatch(RuntimeError):
    """A saved run (or tuning configuration) was trained with other settings than those asked for."""


def run_path(runs_dir: Path, arm: str, seed: int) -> Path:
    """Where one run's result is saved as soon as it finishes."""
    return runs_dir / f"{arm}-seed{seed}.json"


def load_run(runs_dir: Path, arm: str, seed: int, settings: StudySettings, replace_stale: bool = False) -> dict | None:
    """The saved result of (arm, seed) with these settings; None if there is none (or, with `replace_stale`, if
    it has other settings). A run of other settings is an error otherwise: it would be overwritten."""
    path = run_path(runs_dir, arm, seed)
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("settings") == asdict(settings):
        return saved["result"]
    if replace_stale:
        return None
    raise SettingsMismatch(
        f"{path} was trained with other settings ({settings_difference(saved.get('settings', {}), settings)}). "
        "Pass another --runs-dir (or --tune NAME), or remove the old runs."
    )


def load_runs(runs_dir: Path, settings: StudySettings, arms: list[str], seeds: list[int], replace_stale=False) -> list:
    """Saved runs of this plan, seed-major."""
    found = (load_run(runs_dir, arm, seed, settings, replace_stale) for seed in seeds for arm in arms)
    return [run for run in found if run is not None]


def save_run(runs_dir: Path, result: dict, settings: StudySettings) -> None:
    """Save one run's result with the settings it was trained with."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    payload = {"settings": asdict(settings), "result": result}
    run_path(runs_dir, result["method"], result["seed"]).write_text(dump_json(payload))


def settings_difference(saved: dict, settings: StudySettings) -> str:
    """`field: saved -> asked` for each field that differs."""
    asked = asdict(settings)
    fields = sorted(set(saved) | set(asked))
    return ", ".join(f"{f}: {saved.get(f, '-')} -> {asked.get(f, '-')}" for f in fields if saved.get(f) != asked.get(f))


def train_missing(plan: list, settings: StudySettings, runs_dir: Path, process: str = "0/1", replace_stale=False) -> None:
    """Train and save every (arm, seed) of `plan` that has no saved result yet; `process` ("K/N") is recorded."""
    todo = [(arm, seed) for arm, seed in plan if load_run(runs_dir, arm, seed, settings, replace_stale) is None]
    if not todo:
        return
    train, test = digits_splits(settings.image_size, settings.train_limit, settings.test_limit)
    with tempfile.TemporaryDirectory() as work_dir:
        for arm, seed in todo:
            result = {**train_and_test(arm, seed, settings, train, test, work_dir), "process": process}
            save_run(runs_dir, result, settings)
            print(f"{arm:>16} seed {seed}: accuracy {result['accuracy']:.4f} ({result['wall_s']:.0f} s)", flush=True)


def finite_or_none(value):
    """`value` with NaN and infinite floats (undefined p-values, infinite seed counts) as None, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    return value


def dump_json(payload) -> str:
    """Indented strict JSON (NaN and infinity as null) with lists of numbers on one line (curves stay readable)."""
    text = json.dumps(finite_or_none(payload), indent=2, allow_nan=False)
    number = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|null"
    flat_list = re.compile(rf"\[\s*((?:{number})(?:,\s*(?:{number}))*)\s*\]")
    return flat_list.sub(lambda match: "[" + ", ".join(re.split(r",\s*", match.group(1))) + "]", text) + "\n"


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


def estimate_study_s(speed: dict, settings: StudySettings, runs: int, train_images: int, test_passes_scale=1.0):
    """Core-seconds of `runs` runs at `settings` on `train_images` images, from a measured `step_speed`.

    `test_passes_scale`: full test set size over the measured one (test passes cost in proportion)."""
    steps_per_epoch = math.ceil(train_images / settings.batch_size)
    per_epoch = steps_per_epoch * speed["s_per_step"] + speed["s_per_test_pass"] * test_passes_scale
    return runs * settings.epochs * per_epoch


# ---------------------------------------------------------------------------------------------------------- text
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
def tuning_config_path(tuning_dir: Path, name: str) -> Path:
    return tuning_dir / name / "tuning.json"


def register_tuning(tuning_dir: Path, name: str, overrides: dict, settings: StudySettings) -> None:
    """Record a tuning configuration; a name already used for other settings is an error."""
    path = tuning_config_path(tuning_dir, name)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["settings"] != asdict(settings):
            raise SettingsMismatch(
                f"Tuning configuration {name!r} ({path.parent}) was run with other settings "
                f"({settings_difference(saved['settings'], settings)}); choose a new name."
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_json({"name": name, "overrides": overrides, "settings": asdict(settings), "created": utc_now()}))


def tuning_configurations(tuning_dir: Path) -> list[dict]:
    """Every tuning configuration under `tuning_dir`, with its saved runs, oldest first."""
    found = []
    for path in sorted(tuning_dir.glob("*/tuning.json")):
        config = json.loads(path.read_text())
        settings = StudySettings(**config["settings"])
        runs = [json.loads(run.read_text())["result"] for run in sorted(path.parent.glob("*-seed*.json"))]
        found.append({**config, "runs": runs, "is_study": settings == StudySettings()})
    return sorted(found, key=lambda config: config["created"])


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


# ---------------------------------------------------------------------------------------------------------- command line
def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Smoke test: 2 seeds, 2 epochs, 384 training images.")
    parser.add_argument(
        "--tune", metavar="NAME", help="Tuning mode: run only plain arms into TUNING_DIR/NAME (with --set overrides)."
    )
    parser.add_argument(
        "--seeds", type=int,
        help=f"Seeds per arm (study: {STUDY_SEEDS}, from {STUDY_FIRST_SEED}; tuning: {TUNING_SEEDS}, from 0).",
    )  # fmt: skip
    parser.add_argument("--first-seed", type=int, help=f"First seed (study: {STUDY_FIRST_SEED}; tuning, quick: 0).")
    parser.add_argument("--epochs", type=int, help="Override the number of epochs.")
    parser.add_argument("--train-limit", type=int, help="Train on the first n training images (smoke tests).")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="FIELD=VALUE", help="Override StudySettings fields (JSON values)."
    )
    parser.add_argument("--methods", nargs="+", choices=list(ARMS), help="Subset of arms.")
    parser.add_argument("--output-dir", type=Path, help="Where accuracy.md, accuracy_study.json, img/ go.")
    parser.add_argument("--tuning-dir", type=Path, default=REPO / "docs" / "data" / "accuracy_tuning")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads. 1 by default: on a shared 2-core machine, 2 threads oversubscribe and run 2-4x slower.",
    )  # fmt: skip
    parser.add_argument(
        "--runs-dir", type=Path,
        help="Where each finished run is saved (default: docs/data/accuracy_study_runs for docs/, else OUTPUT_DIR/runs).",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="Split the runs over this many processes ...")
    parser.add_argument("--worker", type=int, default=0, help="... of which this is number 0, 1, ... (no aggregation).")
    return parser


def parse_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """--epochs, --train-limit and --set as {field: value}; values are JSON (40, 5e-4, null) or plain strings."""
    overrides = {}
    fields = {f.name for f in dataclasses.fields(StudySettings)}
    for assignment in args.set:
        name, equals, value = assignment.partition("=")
        if not equals or name not in fields:
            parser.error(f"--set takes FIELD=VALUE with FIELD one of {', '.join(sorted(fields))}; got {assignment!r}.")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name] = value  # e.g. attn_implementation=sdpa
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.train_limit is not None:
        overrides["train_limit"] = args.train_limit
    return overrides


def check_tuning_arms(parser: argparse.ArgumentParser, arms: list[str]) -> None:
    """Tuning runs plain arms only: settings chosen on TL-Align would be selected on the method under test."""
    aligned = [arm for arm in arms if ARMS[arm][1]]
    if aligned:
        parser.error(
            f"--tune runs only the plain arms ({', '.join(PLAIN_ARMS)}); got TL-Align arm(s) {', '.join(aligned)}. "
            "Tune on the baselines, freeze the settings in StudySettings, then run the study."
        )


def study_plan(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """(settings, overrides, seeds, arms, output folder, runs folder) from the command line."""
    if args.tune and args.quick:
        parser.error("--tune and --quick do not go together (a tuning run is a real run of the plain arms).")
    if not 0 <= args.worker < args.workers:
        parser.error(f"--worker must be in [0, {args.workers}), got {args.worker}.")
    overrides = parse_overrides(parser, args)
    try:
        settings = replace(QUICK if args.quick else StudySettings(), **overrides)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    arms = args.methods or list(TUNING_ARMS if args.tune else ARMS)
    if args.tune:
        check_tuning_arms(parser, arms)
    default_seeds = TUNING_SEEDS if args.tune else (QUICK_SEEDS if args.quick else STUDY_SEEDS)
    first_seed = args.first_seed if args.first_seed is not None else (0 if args.tune or args.quick else STUDY_FIRST_SEED)
    seeds = list(range(first_seed, first_seed + (args.seeds or default_seeds)))
    output_dir = args.output_dir or (REPO / "outputs" / "accuracy-quick" if args.quick else REPO / "docs")
    if args.tune:
        runs_dir = args.tuning_dir / args.tune
    else:
        default_runs = REPO / "docs" / "data" / "accuracy_study_runs" if output_dir == REPO / "docs" else output_dir / "runs"
        runs_dir = args.runs_dir or default_runs
    return settings, overrides, seeds, arms, output_dir, runs_dir


def commands(argv: list[str]) -> dict[str, str]:
    """The two-process command and the aggregation command of this invocation (without --workers / --worker)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in ("--workers", "--worker"):
            skip = True
        elif not token.startswith(("--workers=", "--worker=")):
            kept.append(token)
    base = " ".join(["python scripts/accuracy_study.py", *kept])
    return {
        "workers": f"for w in 0 1; do OMP_NUM_THREADS=1 {base} --workers 2 --worker $w & done; wait",
        "aggregate": base,
    }


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


def print_estimate(payload: dict) -> None:
    """After a quick run: the measured speed and what the full study at the same model would take."""
    speed, settings = payload["speed"], StudySettings(**payload["settings"])
    full = replace(settings, epochs=StudySettings().epochs, train_limit=None, test_limit=None)
    test_scale = TEST_IMAGES / max(payload["split"]["test_images"], 1)
    runs = len(ARMS) * STUDY_SEEDS
    core_s = estimate_study_s(speed, full, runs, TRAIN_IMAGES, test_scale)
    print(
        f"Measured: {1000 * speed['s_per_step']:.0f} ms per training step (batch {settings.batch_size}), "
        f"{speed['s_per_test_pass']:.2f} s per test pass of {payload['split']['test_images']} images.\n"
        f"Estimate, full study at this model ({len(ARMS)} arms x {STUDY_SEEDS} seeds, {TRAIN_IMAGES} images, "
        f"{math.ceil(TRAIN_IMAGES / full.batch_size)} steps and one test pass per epoch): "
        f"{core_s / full.epochs / 60:.1f} core-minutes per epoch of all {runs} runs; at {full.epochs} epochs "
        f"{core_s / 3600:.1f} core-hours, {core_s / STUDY_WORKERS / 3600:.1f} h with {STUDY_WORKERS} workers."
    )


def run_tuning(args, settings, overrides, seeds, arms, output_dir, runs_dir, write_section) -> dict:
    """Tuning mode: train the plain arms of one configuration, then list every configuration in the doc."""
    register_tuning(args.tuning_dir, args.tune, overrides, settings)
    plan = [(arm, seed) for seed in seeds for arm in arms]
    train_missing(plan[args.worker :: args.workers], settings, runs_dir, f"{args.worker}/{args.workers}")
    configurations = tuning_configurations(args.tuning_dir)
    if args.workers == 1:
        write_section(output_dir / "accuracy.md", "accuracy-tuning", tuning_report(configurations), "Accuracy")
        print(tuning_table(configurations))
    return {"configurations": configurations}


def main(argv: list[str] | None = None) -> dict:
    """Run the study, a tuning configuration or the quick smoke test (resuming saved runs); return the payload."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from doc_sections import write_section

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    args = parser.parse_args(argv)
    settings, overrides, seeds, arms, output_dir, runs_dir = study_plan(parser, args)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("tl_align_hf").setLevel(logging.ERROR)
    try:
        return run(args, argv, settings, overrides, seeds, arms, output_dir, runs_dir, write_section)
    except SettingsMismatch as error:
        parser.exit(2, f"error: {error}\n")


def run(args, argv, settings, overrides, seeds, arms, output_dir, runs_dir, write_section) -> dict:
    """Tuning mode, or the study (or its quick version): train what is missing, then aggregate."""
    if args.tune:
        return run_tuning(args, settings, overrides, seeds, arms, output_dir, runs_dir, write_section)
    # Seed-major order: an interrupted study still has every arm at the same seeds.
    plan = [(arm, seed) for seed in seeds for arm in arms]
    process = f"{args.worker}/{args.workers}"
    train_missing(plan[args.worker :: args.workers], settings, runs_dir, process, replace_stale=args.quick)
    runs = load_runs(runs_dir, settings, arms, seeds, replace_stale=args.quick)
    if args.workers > 1:
        print(f"worker {args.worker} of {args.workers}: done; run without --workers/--worker to aggregate.")
        return {"runs": runs}
    payload = aggregate(runs, settings, seeds)
    json_path, figure, doc = output_dir / "accuracy_study.json", output_dir / "img" / "accuracy_study.png", output_dir / "accuracy.md"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(dump_json(payload))
    plot_study(payload, figure)
    write_section(doc, "accuracy-study", study_report(payload, commands(argv), figure, doc), "Accuracy")
    print(results_table(payload["summary"]))
    print(comparisons_table(payload["comparisons"]))
    print(timing_text(payload["timing"]))
    if args.quick:
        print_estimate(payload)
    return json.loads(json_path.read_text())


if __name__ == "__main__":
    main()
