"""Training-step cost of TL-Align against plain mixing and against the official full-label formulation.

One process, one set of weights (learning rate 0, so every variant sees the same weights), one mixed batch;
forward + backward + optimizer step; variants interleaved so that machine drift hits all alike; median of the
timed steps after warm-up.

    python scripts/bench_overhead.py                       # DeiT-Tiny and DeiT-Small, 224 px, CPU batch 32
    python scripts/bench_overhead.py --configs tiny --steps 10 --json docs/bench_overhead_cpu.json
    python scripts/bench_overhead.py --configs swin_tiny   # Swin-T (SwinConfig defaults: patch 4, window 7)
    python scripts/bench_overhead.py --configs eva02_tiny  # timm's EVA-02 Ti/14 through TimmWrapper (RoPE, SwiGLU)
    python scripts/bench_overhead.py --configs swinv2_tiny --variants plain-eager tl-align-eager   # eager only

Variants (`--variants`; the first is the baseline of the ratios):
    plain-sdpa              plain mixing (area target), SDPA attention, the parent model's forward
    plain-eager             plain mixing, eager attention (timm models: fused_attn off, timm's explicit softmax)
    tl-align-sdpa           TL-Align with SDPA selected, the path `auto` picks on this device
    tl-align-sdpa-eager     TL-Align with SDPA selected, forced "eager" path (the model's eager attention, whose
                            probabilities are reused; `auto` on the CPU before issue 17)
    tl-align-sdpa-explicit  TL-Align with SDPA selected, forced "explicit" path (SDPA for the output, the
                            probabilities recomputed beside it without gradient)
    tl-align-value-channel  TL-Align with SDPA selected, forced "value_channel" path (shares as extra value channels)
    tl-align-eager          TL-Align, eager attention
    official                eager attention, (B, N, C) label vectors propagated through every block, C = 1000
                            (DeiT only: the official code has no Swin path)
    --compile adds "+compile" twins of plain-sdpa and tl-align-sdpa (torch.compile of the model, inductor).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch
from transformers import DeiTConfig, SwinConfig, Swinv2Config, TimmWrapperConfig

from tl_align_hf import (
    TLAlignDeiTForImageClassification,
    TLAlignSwinForImageClassification,
    TLAlignSwinv2ForImageClassification,
    TLAlignTimmWrapperForImageClassification,
    mixed_batch_loss,
    mixing_loss,
)

# name: (title, aligned class, config class, config values); image_size and num_labels are added
CONFIGS = {
    "tiny": ("DeiT-Tiny", TLAlignDeiTForImageClassification, DeiTConfig,
             dict(patch_size=16, hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)),
    "small": ("DeiT-Small", TLAlignDeiTForImageClassification, DeiTConfig,
              dict(patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)),
    # SwinConfig's defaults are Swin-T: patch 4, embed_dim 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), window 7
    "swin_tiny": ("Swin-Tiny", TLAlignSwinForImageClassification, SwinConfig, dict()),
    # Swin V2-T (microsoft/swinv2-tiny-patch4-window8-256): eager attention only, so time the eager variants
    "swinv2_tiny": ("Swin V2-Tiny", TLAlignSwinv2ForImageClassification, Swinv2Config, dict(window_size=8)),
    # timm's eva02_tiny_patch14_224 (embed 192, 12 blocks, 3 heads, SwiGLU, RoPE), no Hub weights; image_size -> img_size
    "eva02_tiny": ("EVA-02-Tiny (timm)", TLAlignTimmWrapperForImageClassification, TimmWrapperConfig,
                   dict(architecture="eva02_tiny_patch14_224")),
}
NUM_CLASSES = 1000


def make_model(name: str, image_size: int, device: torch.device):
    _, aligned_class, config_class, values = CONFIGS[name]
    if config_class is TimmWrapperConfig:
        config = config_class(num_labels=NUM_CLASSES, model_args={"img_size": image_size}, **values)
    else:
        config = config_class(image_size=image_size, num_labels=NUM_CLASSES, **values)
    config._attn_implementation = "sdpa" if aligned_class._supports_sdpa else "eager"  # Swin V2: eager only
    return aligned_class(config).to(device).train()


def make_batch(
    batch_size: int, image_size: int, patch_size: int, device: torch.device, seed: int = 0, num_labels: int = NUM_CLASSES
) -> dict:
    """A token-grid CutMix batch (the batch contract): half of the patches of each image come from its partner."""
    generator = torch.Generator().manual_seed(seed)
    grid = image_size // patch_size
    token_weights = torch.ones(batch_size, grid, grid)
    token_weights[:, grid // 4 : grid // 4 + grid // 2, : grid // 2 + 2] = 0.0
    token_weights = token_weights.flatten(1)
    batch = dict(
        pixel_values=torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        labels=torch.randint(0, num_labels, (batch_size,), generator=generator),
        mix_index=torch.randperm(batch_size, generator=generator),
        token_weights=token_weights,
        mix_lam=token_weights.mean(1),
    )
    return {key: value.to(device) for key, value in batch.items()}


def official_cls_labels(
    attentions, batch: dict, num_prefix_tokens: int = 2, num_classes: int = NUM_CLASSES, label_smoothing: float = 0.1
) -> torch.Tensor:
    """`(B, C)` CLS label of the official formulation: `(B, N, C)` label vectors propagated
    ``L <- (L + mean_h(A_h) @ L) / 2`` through every block's head-averaged attention (also scripts/bench_gpu.py's).

    Runs under the caller's autocast, as the official code does under AMP.
    """
    smoothed = torch.nn.functional.one_hot(batch["labels"], num_classes).float() * (1 - label_smoothing)
    smoothed = smoothed + label_smoothing / num_classes
    own, partner = smoothed[:, None, :], smoothed[batch["mix_index"]][:, None, :]
    prefix_shares = batch["mix_lam"][:, None].expand(-1, num_prefix_tokens)
    shares = torch.cat([prefix_shares, batch["token_weights"]], dim=1)[..., None]
    token_labels = shares * own + (1 - shares) * partner
    for attention in attentions:
        token_labels = (token_labels + attention.detach().float().mean(dim=1) @ token_labels) / 2
    return token_labels[:, 0]


# variant -> (attention backend, TL-Align path or None for a plain / official step)
VARIANTS = {
    "plain-sdpa": ("sdpa", None),
    "plain-eager": ("eager", None),
    "tl-align-sdpa": ("sdpa", "auto"),
    "tl-align-sdpa-eager": ("sdpa", "eager"),
    "tl-align-sdpa-explicit": ("sdpa", "explicit"),
    "tl-align-value-channel": ("sdpa", "value_channel"),
    "tl-align-eager": ("eager", "auto"),
    "official": ("eager", None),
}


def set_backend(model, backend: str) -> None:
    """The attention backend: transformers' `set_attn_implementation`, or timm's `fused_attn` (timm ignores the former)."""
    if isinstance(model, TLAlignTimmWrapperForImageClassification):
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = backend == "sdpa"
        model.config._attn_implementation = backend
    else:
        model.set_attn_implementation(backend)


def step(models: dict, optimizer, batch: dict, variant: str, autocast) -> None:
    """One forward + backward + optimizer step of `variant` (`models[variant]`: the model, compiled or not)."""
    model = models[variant]
    backend, path = VARIANTS[variant.removesuffix("+compile")]
    if model.config._attn_implementation != backend:
        set_backend(getattr(model, "_orig_mod", model), backend)
    mixing = {key: batch[key] for key in ("mix_index", "token_weights", "mix_lam")}
    with autocast():
        if path is not None:
            getattr(model, "_orig_mod", model).tl_align_attention_path = path
            outputs = model(pixel_values=batch["pixel_values"], **mixing)
            loss = mixed_batch_loss(outputs, batch, label_smoothing=0.1)[0]
        elif variant == "official":
            outputs = model(batch["pixel_values"], output_attentions=True)
            targets = official_cls_labels(outputs.attentions, batch)
            log_probs = torch.log_softmax(outputs.logits.float(), dim=-1)
            loss = -(targets * log_probs).sum(-1).mean()
        else:
            logits = model(pixel_values=batch["pixel_values"]).logits
            loss = mixing_loss(logits, batch["labels"], batch["mix_index"], batch["mix_lam"], 0.1)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, variants: list[str], args, device: torch.device) -> dict:
    model = make_model(name, args.image_size, device)
    if not isinstance(model, TLAlignDeiTForImageClassification):  # the official formulation exists for DeiT only
        variants = [variant for variant in variants if variant != "official"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    patch_size = model.tl_align_patch_size
    batch = make_batch(args.batch_size, args.image_size, patch_size if isinstance(patch_size, int) else patch_size[0], device)
    # Compiled twins share the weights; each backend gets its own compiled graph (set_attn_implementation recompiles).
    models = {variant: torch.compile(model) if variant.endswith("+compile") else model for variant in variants}
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    times = {variant: [] for variant in variants}
    peak_memory = {}
    for _ in range(args.warmup):
        for variant in variants:
            step(models, optimizer, batch, variant, autocast)
    for _ in range(args.steps):
        for variant in variants:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            start = time.perf_counter()
            step(models, optimizer, batch, variant, autocast)
            synchronize(device)
            times[variant].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak_memory[variant] = max(peak_memory.get(variant, 0), torch.cuda.max_memory_allocated())
    medians = {variant: statistics.median(values) for variant, values in times.items()}
    rows = {}
    for variant in variants:
        # Paired: the ratio to the baseline's step of the same round (drift of the machine cancels), then the median.
        ratios = [value / base for value, base in zip(times[variant], times[variants[0]])]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        row = {"median_s": medians[variant], "ratio": statistics.median(ratios),
               "ratio_quartiles": [quartiles[0], quartiles[2]], "min_s": min(times[variant]),
               "min_ratio": min(times[variant]) / min(times[variants[0]]), "times_s": times[variant]}  # fmt: skip
        if peak_memory:
            row["peak_memory_gib"] = peak_memory[variant] / 2**30
            row["memory_ratio"] = peak_memory[variant] / peak_memory[variants[0]]
        rows[variant] = row
    return rows


def print_table(name: str, rows: dict, args, device: torch.device) -> None:
    print(f"\n### {CONFIGS[name][0]}, {args.image_size} px, batch {args.batch_size}, {device.type}")
    has_memory = any("peak_memory_gib" in row for row in rows.values())
    header = f"| variant | median step (s) | ratio to {next(iter(rows))} (median of per-round ratios) | quartiles | fastest step (s) | ratio of fastest steps |"
    header += " peak memory (GiB) | memory ratio |" if has_memory else ""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for variant, row in rows.items():
        line = (f"| {variant} | {row['median_s']:.4f} | {row['ratio']:.3f} | {row['ratio_quartiles'][0]:.3f}-"
                f"{row['ratio_quartiles'][1]:.3f} | {row['min_s']:.4f} | {row['min_ratio']:.3f} |")  # fmt: skip
        if has_memory:
            line += f" {row['peak_memory_gib']:.2f} | {row['memory_ratio']:.3f} |"
        print(line)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=list(CONFIGS))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=None, help="default: 32 on CPU, 128 on CUDA")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd plain-sdpa and tl-align-sdpa")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the numbers to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.batch_size is None:
        args.batch_size = 128 if device.type == "cuda" else 32
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants or list(VARIANTS)
    if args.compile:
        variants = variants + ["plain-sdpa+compile", "tl-align-sdpa+compile"]
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    results = {"device": device.type, "machine": machine, "torch": torch.__version__, "batch_size": args.batch_size,
               "image_size": args.image_size, "steps": args.steps, "configs": {}}
    for name in args.configs:
        rows = measure(name, variants, args, device)
        results["configs"][name] = rows
        print_table(name, rows, args, device)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main()
