"""The accuracy study's shared pieces: the arms, the frozen settings, the data split, the saved run files and the
plan of one invocation. `accuracy_study.py` (the runner) trains into the run files; `accuracy_report.py` reads
them back (see the runner's docstring for the study itself)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature

from tl_align_hf.support.digits import digits_splits as digits_images

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
def digits_splits(
    image_size: int, train_limit: int | None = None, test_limit: int | None = None
) -> tuple[Dataset, Dataset]:
    """(train, test) `datasets.Dataset`s with `image` (PIL, `image_size` px) and `label` (ClassLabel 0-9): the
    fixed split of the package's digits (`tl_align_hf.support.digits.digits_splits`)."""
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(images: list, labels: list[int], limit: int | None) -> Dataset:
        dataset = Dataset.from_dict({"image": images, "label": labels}, features=features)
        if limit is not None:
            dataset = dataset.shuffle(seed=SPLIT_SEED).select(range(min(limit, len(dataset))))
        return dataset

    splits = digits_images(image_size, test_size=TEST_SIZE, seed=SPLIT_SEED)
    (_, train_images, train_labels), (_, test_images, test_labels) = splits["train"], splits["validation"]
    return split(train_images, train_labels, train_limit), split(test_images, test_labels, test_limit)


def significant(values: list[float], digits: int = 6) -> list[float]:
    """`values` rounded to `digits` significant digits (a curve of 100 epochs stays small in the JSON)."""
    return [float(f"{value:.{digits}g}") for value in values]




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


def tuning_config_path(tuning_dir: Path, name: str) -> Path:
    return tuning_dir / name / "tuning.json"


def tuning_configurations(tuning_dir: Path) -> list[dict]:
    """Every tuning configuration under `tuning_dir`, with its saved runs, oldest first."""
    found = []
    for path in sorted(tuning_dir.glob("*/tuning.json")):
        config = json.loads(path.read_text())
        settings = StudySettings(**config["settings"])
        runs = [json.loads(run.read_text())["result"] for run in sorted(path.parent.glob("*-seed*.json"))]
        found.append({**config, "runs": runs, "is_study": settings == StudySettings()})
    return sorted(found, key=lambda config: config["created"])


# ---------------------------------------------------------------------------------------------------------- command line
def add_plan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments that say which runs an invocation means (settings, seeds, arms) and where its files go."""
    parser.add_argument("--quick", action="store_true", help="Smoke test: 2 seeds, 2 epochs, 384 training images.")
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
        "--runs-dir", type=Path,
        help="Where each finished run is saved (default: docs/data/accuracy_study_runs for docs/, else OUTPUT_DIR/runs).",
    )  # fmt: skip
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


# Options of one process (each with one value) that the documented commands leave out.
NOT_IN_COMMANDS = ("--workers", "--worker", "--section")


def commands(argv: list[str]) -> dict[str, str]:
    """The two-process command and the aggregation command of this invocation (without --workers / --worker, and
    without the report's --section)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in NOT_IN_COMMANDS:
            skip = True
        elif not token.startswith(tuple(f"{option}=" for option in NOT_IN_COMMANDS)):
            kept.append(token)
    base = " ".join(["python scripts/accuracy_study.py", *kept])
    return {
        "workers": f"for w in 0 1; do OMP_NUM_THREADS=1 {base} --workers 2 --worker $w & done; wait",
        "aggregate": base,
    }
