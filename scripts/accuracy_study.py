#!/usr/bin/env python
"""Accuracy study, the runner: does TL-Align improve test accuracy over the same mixing without it, on real data?

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
weights (`first_step_outputs` checks it). Each pair is compared over the same seeds by `accuracy_report.py`, which
the runner calls once every run is trained (the arms, settings and run files: `accuracy_common.py`).

Data: the package's digits (`tl_align_hf.support.digits`: scikit-learn's 1,797 real 8x8 scans, 10 classes), a fixed
stratified split (`TEST_SIZE`, `SPLIT_SEED`: 1,347 train / 450 test), upsampled bicubic to
`StudySettings.image_size` px (16: the 4 px patches form a 4x4 grid). Each run evaluates on the test split after
every epoch; the test set is only watched, never used to pick an epoch: the reported accuracy is the final epoch's.

    python scripts/accuracy_study.py --tune NAME --set learning_rate=5e-4 epochs=100   # tune (plain arms only)
    for w in 0 1; do python scripts/accuracy_study.py --workers 2 --worker $w & done; wait   # the study, 2 processes
    python scripts/accuracy_study.py                   # aggregate: docs/accuracy_study.json, figure, docs/accuracy.md
    python scripts/accuracy_study.py --quick           # a smoke test (< 3 min), writes outputs/accuracy-quick/
    python scripts/accuracy_report.py                  # the report alone, from the saved runs (trains nothing)

The study's settings are the defaults of `accuracy_common.StudySettings` (the one place to change them, once tuning
has frozen them). Each finished run is saved at once (one JSON per arm and seed, under docs/data/accuracy_study_runs and
docs/data/accuracy_tuning/NAME, which the repository keeps, so the aggregation reruns from a clone) and skipped when
found again with the same settings, so an interrupted study or tuning run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import accuracy_report
import torch
import transformers
from accuracy_common import (
    ARMS,
    STUDY_SEEDS,
    STUDY_WORKERS,
    TEST_IMAGES,
    TRAIN_IMAGES,
    SettingsMismatch,
    StudySettings,
    add_plan_arguments,
    digits_splits,
    dump_json,
    load_run,
    load_runs,
    save_run,
    settings_difference,
    significant,
    study_plan,
    tuning_config_path,
    tuning_configurations,
)
from datasets import Dataset
from transformers import ViTConfig, ViTForImageClassification
from transformers.trainer_callback import PrinterCallback

from tl_align_hf import TLAlignConfig, TLAlignTrainer
from tl_align_hf.support.transforms import default_image_processor, make_transforms


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


def estimate_study_s(speed: dict, settings: StudySettings, runs: int, train_images: int, test_passes_scale=1.0):
    """Core-seconds of `runs` runs at `settings` on `train_images` images, from a measured `step_speed`.

    `test_passes_scale`: full test set size over the measured one (test passes cost in proportion)."""
    steps_per_epoch = math.ceil(train_images / settings.batch_size)
    per_epoch = steps_per_epoch * speed["s_per_step"] + speed["s_per_test_pass"] * test_passes_scale
    return runs * settings.epochs * per_epoch


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


# ---------------------------------------------------------------------------------------------------------- tuning
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


def run_tuning(args, settings, overrides, seeds, arms, output_dir, runs_dir) -> dict:
    """Tuning mode: train the plain arms of one configuration, then list every configuration in the doc."""
    register_tuning(args.tuning_dir, args.tune, overrides, settings)
    plan = [(arm, seed) for seed in seeds for arm in arms]
    train_missing(plan[args.worker :: args.workers], settings, runs_dir, f"{args.worker}/{args.workers}")
    configurations = tuning_configurations(args.tuning_dir)
    if args.workers == 1:
        accuracy_report.write_tuning(configurations, output_dir)
    return {"configurations": configurations}


# ---------------------------------------------------------------------------------------------------------- command line
def make_parser() -> argparse.ArgumentParser:
    parser = add_plan_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument(
        "--tune", metavar="NAME", help="Tuning mode: run only plain arms into TUNING_DIR/NAME (with --set overrides)."
    )
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads. 1 by default: on a shared 2-core machine, 2 threads oversubscribe and run 2-4x slower.",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="Split the runs over this many processes ...")
    parser.add_argument("--worker", type=int, default=0, help="... of which this is number 0, 1, ... (no aggregation).")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run the study, a tuning configuration or the quick smoke test (resuming saved runs); return the payload."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.worker < args.workers:
        parser.error(f"--worker must be in [0, {args.workers}), got {args.worker}.")
    settings, overrides, seeds, arms, output_dir, runs_dir = study_plan(parser, args)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("tl_align_hf").setLevel(logging.ERROR)
    try:
        return run(args, argv, settings, overrides, seeds, arms, output_dir, runs_dir)
    except SettingsMismatch as error:
        parser.exit(2, f"error: {error}\n")


def run(args, argv, settings, overrides, seeds, arms, output_dir, runs_dir) -> dict:
    """Tuning mode, or the study (or its quick version): train what is missing, then aggregate (the report)."""
    if args.tune:
        return run_tuning(args, settings, overrides, seeds, arms, output_dir, runs_dir)
    # Seed-major order: an interrupted study still has every arm at the same seeds.
    plan = [(arm, seed) for seed in seeds for arm in arms]
    process = f"{args.worker}/{args.workers}"
    train_missing(plan[args.worker :: args.workers], settings, runs_dir, process, replace_stale=args.quick)
    runs = load_runs(runs_dir, settings, arms, seeds, replace_stale=args.quick)
    if args.workers > 1:
        print(f"worker {args.worker} of {args.workers}: done; run without --workers/--worker to aggregate.")
        return {"runs": runs}
    payload = accuracy_report.write_study(runs, settings, seeds, output_dir, argv)
    if args.quick:
        print_estimate(payload)
    return payload


if __name__ == "__main__":
    main()
