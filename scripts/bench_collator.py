"""Collation and mixing time per batch: tl-align-hf against the mixing users would pick instead, on the CPU.

    python scripts/bench_collator.py                       # B=128, 3x224x224 float32, patch 16
    python scripts/bench_collator.py --json bench.json     # also write the numbers as JSON
    python scripts/bench_collator.py --before d906b37      # also the collator of that git revision, interleaved

Every case starts from the same 128 examples (float32 (3, 224, 224) tensors and integer labels, as a `datasets`
transform returns them) and ends with a mixed (B, 3, 224, 224) batch:

- `TLAlignCollator`: checks and stacks the examples, then mixes them and computes the token shares (the batch
  contract of TL-Align: `mix_index`, `token_weights`, `mix_lam`).
- timm's `Mixup`, applied to the stacked batch as timm's training loop does (`x, target = mixup_fn(x, y)`), and
  torchvision's `v2.CutMix` / `v2.MixUp` on the stacked batch: stacking plus the peer's mixing and soft targets.
- timm's `FastCollateMixup`, which collates uint8 images (timm's fast pipeline normalises on the GPU later): it
  gets the same images as uint8 arrays, so its row is the same work on a quarter of the bytes.

Cases run interleaved (one call of each per round, in rotating order) after warm-up rounds; the table gives the
median over rounds and, per mixing method, the ratio to the fastest peer for that method. "plain stacking"
(`torch.stack` and a label tensor) is the floor every case pays.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from tl_align_hf import MixingSettings, TLAlignCollator, TLAlignMixer

NUM_CLASSES = 1000
# method -> (our settings, timm Mixup / FastCollateMixup kwargs, torchvision transform name)
METHODS = {
    "cutmix": (dict(mixing_method="cutmix"), dict(mixup_alpha=0.0, cutmix_alpha=1.0), "CutMix"),
    "mixup": (dict(mixing_method="mixup", mixup_alpha=0.8), dict(mixup_alpha=0.8, cutmix_alpha=0.0), "MixUp"),
    "cutmix or mixup (switch_prob 0.5)": (
        dict(mixing_method="cutmix", mixup_alpha=0.8), dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5), None,
    ),
    "token_cutmix": (dict(mixing_method="token_cutmix"), None, None),
    "token_mix": (dict(mixing_method="token_mix"), None, None),
    "none": (dict(mixing_method="none"), None, None),
}  # fmt: skip
MODES = ("pair", "elem")  # our per-sample modes, for reference (timm's Mixup has them too: cases "timm Mixup, elem")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="rounds run before timing")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-peers", action="store_true", help="only tl-align-hf's cases (no timm / torchvision)")
    parser.add_argument("--before", type=str, default=None,
                        help="a git revision whose TLAlignCollator (first-wave API) runs beside, for before/after")  # fmt: skip
    parser.add_argument("--json", type=str, default=None, help="write the results to this file")
    return parser


def collator_of_revision(revision: str):
    """The `TLAlignCollator` class of a git revision (its collator.py and mixing.py, loaded as a package)."""
    import importlib
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp()) / "tl_align_hf_before"
    folder.mkdir()
    for name in ("collator.py", "mixing.py"):
        source = subprocess.run(["git", "show", f"{revision}:tl_align_hf/{name}"], capture_output=True, text=True, check=True)
        (folder / name).write_text(source.stdout)
    (folder / "__init__.py").write_text("")
    sys.path.insert(0, str(folder.parent))
    return importlib.import_module("tl_align_hf_before.collator").TLAlignCollator


def plain_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """The floor: stacking and a label tensor, no checks and no mixing."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["label"] for example in examples]),
    }


def ours(method: str, mode: str, patch_size: int) -> Callable:
    settings = MixingSettings(mix_mode=mode, **METHODS[method][0])
    return TLAlignCollator(TLAlignMixer(settings, patch_size), num_labels=NUM_CLASSES, seed=0)


def stacked_then(mix: Callable) -> Callable:
    """Stack the examples, then apply a peer that mixes a stacked (images, labels) batch."""

    def collate(examples):
        batch = plain_collate(examples)
        return mix(batch["pixel_values"], batch["labels"])

    return collate


def peer_cases(patch_size: int) -> dict[str, tuple[str, Callable, bool]]:
    """name -> (method, collate, takes uint8 examples) for timm's and torchvision's mixing."""
    cases = {}
    try:
        from timm.data import FastCollateMixup, Mixup
    except ImportError:
        Mixup = FastCollateMixup = None  # noqa: N806
    from torchvision.transforms import v2

    for method, (_, timm_kwargs, torchvision_name) in METHODS.items():
        if timm_kwargs is not None and Mixup is not None:
            common = dict(num_classes=NUM_CLASSES, label_smoothing=0.1, **timm_kwargs)
            cases[f"timm Mixup | {method}"] = (method, stacked_then(Mixup(**common)), False)
            cases[f"timm Mixup, elem | {method}"] = (method, stacked_then(Mixup(mode="elem", **common)), False)
            fast = FastCollateMixup(**common)
            cases[f"timm FastCollateMixup (uint8) | {method}"] = (
                method, lambda examples, fast=fast: fast([(e["uint8"], e["label"]) for e in examples]), True,
            )  # fmt: skip
        if torchvision_name is not None:
            transform = getattr(v2, torchvision_name)(alpha=1.0 if torchvision_name == "CutMix" else 0.8, num_classes=NUM_CLASSES)
            cases[f"torchvision v2.{torchvision_name} | {method}"] = (method, stacked_then(transform), False)
    return cases


def time_interleaved(functions: dict[str, Callable], inputs: dict[str, list], warmup: int, repeats: int):
    """Seconds per call of each function: one call of each per round, the order rotating between rounds."""
    names = list(functions)
    seconds = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            batch = functions[name](inputs[name])
            elapsed = time.perf_counter() - start
            del batch
            if round_index >= warmup:
                seconds[name].append(elapsed)
    return seconds


def main(args: argparse.Namespace) -> list[dict]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    size = args.image_size
    examples = [
        {"pixel_values": torch.randn(3, size, size, generator=generator), "label": i % NUM_CLASSES}
        for i in range(args.batch_size)
    ]
    uint8_examples = [{"uint8": np.random.default_rng(i).integers(0, 256, (3, size, size), dtype=np.uint8),
                       "label": example["label"]} for i, example in enumerate(examples)]  # fmt: skip
    functions, inputs, methods = {"plain stacking": plain_collate}, {"plain stacking": examples}, {"plain stacking": "-"}
    for method in METHODS:
        name = f"tl-align-hf TLAlignCollator | {method}"
        functions[name], inputs[name], methods[name] = ours(method, "batch", args.patch_size), examples, method
    for mode in MODES:
        for method in ("cutmix", "mixup"):
            name = f"tl-align-hf TLAlignCollator, {mode} | {method}"
            functions[name], inputs[name], methods[name] = ours(method, mode, args.patch_size), examples, method
    if args.before:
        before = collator_of_revision(args.before)
        for method, (settings, _, _) in METHODS.items():
            old_names = {"mixing_method": "method"}
            old = before(**{old_names.get(key, key): value for key, value in settings.items()},
                         patch_size=args.patch_size, num_labels=NUM_CLASSES, seed=0)  # fmt: skip
            name = f"before ({args.before}) TLAlignCollator | {method}"
            functions[name], inputs[name], methods[name] = old, examples, method
    if not args.no_peers:
        for name, (method, collate, takes_uint8) in peer_cases(args.patch_size).items():
            functions[name], inputs[name], methods[name] = collate, uint8_examples if takes_uint8 else examples, method
    seconds = time_interleaved(functions, inputs, args.warmup, args.repeats)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    fastest_peer = {}
    for name, median in medians.items():
        if not name.startswith(("tl-align-hf", "plain", "before")) and "uint8" not in name and ", elem" not in name:
            fastest_peer[methods[name]] = min(fastest_peer.get(methods[name], float("inf")), median)
    rows = []
    for name, times in seconds.items():
        quartiles = statistics.quantiles(times, n=4)
        source, _, _ = name.partition(" | ")
        peer = fastest_peer.get(methods[name])
        rows.append({
            "case": source, "method": methods[name], "median_ms": 1e3 * medians[name],
            "quartiles_ms": [1e3 * quartiles[0], 1e3 * quartiles[2]],
            "ratio_to_fastest_batch_peer": medians[name] / peer if peer else None,
            "over_plain_stacking": medians[name] / medians["plain stacking"] - 1,
        })  # fmt: skip
    print(
        f"B={args.batch_size}, 3x{size}x{size} float32, patch {args.patch_size}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds after {args.warmup} warm-up"
    )
    print("\n| method | case | ms / batch (median) | quartiles (ms) | vs fastest peer (batch mode, float) | over plain stacking |")
    print("|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda row: (list(METHODS).index(row["method"]) if row["method"] in METHODS else -1, row["median_ms"])):
        ratio = "-" if row["ratio_to_fastest_batch_peer"] is None else f"{row['ratio_to_fastest_batch_peer']:.2f}"
        low, high = row["quartiles_ms"]
        print(f"| {row['method']} | {row['case']} | {row['median_ms']:.1f} | {low:.1f}-{high:.1f} | {ratio} | "
              f"{100 * row['over_plain_stacking']:+.0f}% |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": vars(args), "results": rows}, handle, indent=2)
    return rows


if __name__ == "__main__":
    main(make_parser().parse_args())
