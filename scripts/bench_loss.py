"""Cost of the mixed loss at any class count: `mixing_loss` against two label-smoothed `F.cross_entropy` terms.

The mixed target is linear in the two smoothed one-hots, so the loss needs no `(B, C)` target (docs/algorithm.md,
"Target and loss"). Forward + backward of the loss alone on fixed logits; variants interleaved, median of the timed
rounds after warm-up; the value of each variant is checked against the soft-target formulation.

    python scripts/bench_loss.py                                   # B = 256, C = 1000 and 21841, CPU
    python scripts/bench_loss.py --classes 21841 --rounds 30 --device cuda

Variants (the first is the baseline of the ratios):
    two-cross-entropy   own_share * CE(z, y_i) + (1 - own_share) * CE(z, y_j), two F.cross_entropy(label_smoothing)
    mixing-loss         tl_align_hf.mixing_loss (one log_softmax, two gathers)
    soft-target         soft_target_cross_entropy(z, mixed_soft_targets(...)): the (B, C) target formulation
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from tl_align_hf import mixed_soft_targets, mixing_loss, soft_target_cross_entropy

LABEL_SMOOTHING = 0.1


def two_cross_entropy(logits, labels, mix_index, own_share):
    own = torch.nn.functional.cross_entropy(logits, labels, reduction="none", label_smoothing=LABEL_SMOOTHING)
    partner = torch.nn.functional.cross_entropy(
        logits, labels[mix_index], reduction="none", label_smoothing=LABEL_SMOOTHING
    )
    return (own_share * own + (1.0 - own_share) * partner).mean()


def soft_target(logits, labels, mix_index, own_share):
    targets = mixed_soft_targets(labels, mix_index, own_share, logits.shape[-1], LABEL_SMOOTHING)
    return soft_target_cross_entropy(logits, targets)


VARIANTS = {
    "two-cross-entropy": two_cross_entropy,
    "mixing-loss": lambda *args: mixing_loss(*args, label_smoothing=LABEL_SMOOTHING),
    "soft-target": soft_target,
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(batch_size: int, num_classes: int, rounds: int, warmup: int, device: torch.device) -> dict:
    """Median milliseconds of forward + backward per variant, and each variant's value minus the soft-target one."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch_size, num_classes, generator=generator).to(device).requires_grad_()
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    mix_index = torch.randperm(batch_size, generator=generator).to(device)
    own_share = torch.rand(batch_size, generator=generator).to(device)
    reference = soft_target(logits, labels, mix_index, own_share).item()
    times = {name: [] for name in VARIANTS}
    differences = {}
    for round_index in range(warmup + rounds):
        for name, loss_function in VARIANTS.items():
            logits.grad = None
            synchronize(device)
            start = time.perf_counter()
            loss = loss_function(logits, labels, mix_index, own_share)
            loss.backward()
            synchronize(device)
            if round_index >= warmup:
                times[name].append(1e3 * (time.perf_counter() - start))
            differences[name] = abs(loss.item() - reference)
    return {name: (statistics.median(values), differences[name]) for name, values in times.items()}


def loss_rows(batch_size: int, classes: list[int], rounds: int, warmup: int, device: torch.device) -> list[dict]:
    """One row per (class count, variant): median milliseconds, ratio to two-cross-entropy, difference of the value."""
    rows = []
    for num_classes in classes:
        results = time_variants(batch_size, num_classes, rounds, warmup, device)
        baseline = results["two-cross-entropy"][0]
        for variant, (milliseconds, difference) in results.items():
            rows.append({"batch_size": batch_size, "classes": num_classes, "variant": variant,
                         "median_ms": milliseconds, "ratio": milliseconds / baseline, "difference": difference})  # fmt: skip
    return rows


def loss_table(rows: list[dict]) -> list[str]:
    lines = ["| batch | classes | variant | median (ms) | vs two-cross-entropy | abs. difference from soft-target |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(f"| {row['batch_size']} | {row['classes']} | {row['variant']} | {row['median_ms']:.3f} | "
                     f"{row['ratio']:.3f} | {row['difference']:.1e} |")  # fmt: skip
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 21841])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("\n".join(loss_table(loss_rows(args.batch_size, args.classes, args.rounds, args.warmup, device))))


if __name__ == "__main__":
    main()
