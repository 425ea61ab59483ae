"""Where the time of a training step goes: torch profiler, per op, plain mixing against TL-Align, same weights.

The step is the one `scripts/benchmark.py` times (forward + backward + AdamW, one token-grid CutMix batch, each
variant on its own copy of the same weights). Each variant runs `--warmup` steps, then `--steps` profiled steps; the table lists, per op, the self CPU time per
step of each variant and the difference, largest differences first, so the ops that TL-Align adds or makes slower
stand at the top.

    python scripts/profile_step.py --configs tiny --variants plain-sdpa tl-align-sdpa
    python scripts/profile_step.py --configs small --variants plain-sdpa tl-align-sdpa --rows 25
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import CONFIGS, VARIANTS, make_batch, make_runs, model_spec, train_step  # noqa: E402


def self_times_per_step(run, batch: dict, steps: int, warmup: int) -> dict[str, float]:
    """Self CPU milliseconds per step of each op (forward and backward ops counted apart) over `steps` steps."""
    for _ in range(warmup):
        train_step(run, batch, contextlib.nullcontext)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            train_step(run, batch, contextlib.nullcontext)
    return {event.key: event.self_cpu_time_total / 1e3 / steps for event in profiler.key_averages()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny"], choices=list(CONFIGS))
    parser.add_argument("--variants", nargs=2, default=["plain-sdpa", "tl-align-sdpa"], choices=list(VARIANTS),
                        metavar=("BASELINE", "CANDIDATE"))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args(argv)
    baseline, candidate = args.variants
    for name in args.configs:
        spec = model_spec(name, image_size=args.image_size)
        batch = make_batch(spec, args.batch_size, torch.device("cpu"))
        runs = make_runs(spec, args.variants, None, torch.device("cpu"))
        times = {run.name: self_times_per_step(run, batch, args.steps, args.warmup) for run in runs}
        ops = set(times[baseline]) | set(times[candidate])
        rows = sorted(ops, key=lambda op: abs(times[candidate].get(op, 0.0) - times[baseline].get(op, 0.0)), reverse=True)
        totals = {variant: sum(times[variant].values()) for variant in args.variants}
        print(f"\n### {spec.title}, {args.image_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads:"
              f" self CPU ms per step, {args.steps} profiled steps")  # fmt: skip
        print(f"| op | {baseline} | {candidate} | difference |")
        print("|---|---|---|---|")
        for op in rows[: args.rows]:
            base, cand = times[baseline].get(op, 0.0), times[candidate].get(op, 0.0)
            print(f"| `{op}` | {base:.1f} | {cand:.1f} | {cand - base:+.1f} |")
        print(f"| all ops | {totals[baseline]:.1f} | {totals[candidate]:.1f} | {totals[candidate] - totals[baseline]:+.1f} "
              f"({totals[candidate] / totals[baseline]:.3f}x) |")  # fmt: skip


if __name__ == "__main__":
    main()
