"""Collation time per batch: TLAlignCollator's methods against plain stacking of the same examples, on the CPU.

    python scripts/bench_collator.py                       # B=128, 3x224x224, patch 16
    python scripts/bench_collator.py --json bench.json     # also write the numbers as JSON

Cases run interleaved (one call of each per round, in rotating order) after warm-up rounds, and the table gives
the median over rounds. "overhead" is the time added to plain stacking (`torch.stack` + label tensor), which is the
cost of the mixing itself plus the collator's input checks (the `none` row shows the checks alone).
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from tl_align_hf import MixingSettings, TLAlignCollator, TLAlignMixer

CASES = [
    ("none", "batch", {"mixing_method": "none"}),
    ("cutmix", "batch", {"mixing_method": "cutmix"}),
    ("token_cutmix", "batch", {"mixing_method": "token_cutmix"}),
    ("token_mix", "batch", {"mixing_method": "token_mix"}),
    ("mixup", "batch", {"mixing_method": "mixup", "mixup_alpha": 0.8}),
    ("cutmix + mixup (switch_prob 0.5)", "batch", {"mixing_method": "cutmix", "mixup_alpha": 0.8}),
    ("cutmix", "pair", {"mixing_method": "cutmix"}),
    ("mixup", "pair", {"mixing_method": "mixup", "mixup_alpha": 0.8}),
    ("cutmix", "elem", {"mixing_method": "cutmix"}),
    ("token_mix", "elem", {"mixing_method": "token_mix"}),
    ("mixup", "elem", {"mixing_method": "mixup", "mixup_alpha": 0.8}),
]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="rounds run before timing")
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=str, default=None, help="write the results to this JSON file")
    return parser


def plain_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """The baseline: stacking and a label tensor, no checks and no mixing."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["label"] for example in examples]),
    }


def time_interleaved(functions: dict[str, Callable], examples: list[dict], warmup: int, repeats: int):
    """Seconds per call of each function: one call of each per round, the order rotating between rounds."""
    names = list(functions)
    seconds = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            batch = functions[name](examples)
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
        {"pixel_values": torch.randn(3, size, size, generator=generator), "label": i % 1000}
        for i in range(args.batch_size)
    ]
    functions = {"plain stacking": plain_collate}
    for method, mode, kwargs in CASES:
        mixer = TLAlignMixer(MixingSettings(mix_mode=mode, **kwargs), args.patch_size)
        collator = TLAlignCollator(mixer, num_labels=1000, seed=0)
        functions[f"{method} | {mode}"] = collator
    seconds = time_interleaved(functions, examples, args.warmup, args.repeats)
    baseline = statistics.median(seconds["plain stacking"])
    rows = []
    for name, times in seconds.items():
        median = statistics.median(times)
        quartiles = statistics.quantiles(times, n=4)
        method, _, mode = name.partition(" | ")
        rows.append(
            {
                "method": method,
                "mode": mode or "-",
                "median_ms": 1e3 * median,
                "quartiles_ms": [1e3 * quartiles[0], 1e3 * quartiles[2]],
                "overhead": median / baseline - 1,
            }
        )
    print(
        f"B={args.batch_size}, 3x{size}x{size}, patch {args.patch_size}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds after {args.warmup} warm-up"
    )
    print("\n| method | mode | ms / batch (median) | quartiles (ms) | overhead vs plain stacking |")
    print("|---|---|---|---|---|")
    for row in rows:
        overhead = "-" if row["method"] == "plain stacking" else f"{100 * row['overhead']:+.0f}%"
        low, high = row["quartiles_ms"]
        print(f"| {row['method']} | {row['mode']} | {row['median_ms']:.1f} | {low:.1f}-{high:.1f} | {overhead} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": vars(args), "results": rows}, handle, indent=2)
    return rows


if __name__ == "__main__":
    main(make_parser().parse_args())
