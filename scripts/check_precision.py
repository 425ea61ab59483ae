"""Precision of the aligned shares in bf16 / fp16: every attention path against the float32 model.

    python scripts/check_precision.py                  # DeiT and Swin, 12 blocks, bf16 and fp16, CPU
    python scripts/check_precision.py --json out.json

For each model the float32 model's `aligned_lam` (eager path) is the reference. The same weights and images cast to
bf16 / fp16 then run each path (`eager`: the model's own low-precision attention probabilities; `value_channel`: the
shares through the fused SDPA kernel as extra value channels; `explicit`: SDPA for the output, probabilities
recomputed in float32 from the low-precision query and key). The table gives |aligned_lam - reference| per path,
mean (and max) over the images of several models, and how far alignment moved the targets (max |aligned_lam -
mix_lam|), which the errors must be small against. Most of the error is the low-precision model itself (its hidden
states drift from the float32 model's); the paths differ in how they add to it.
Attention is sharpened (large query/key weights) so that alignment moves targets by several hundredths.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from transformers import DeiTConfig, DeiTForImageClassification, SwinConfig, SwinForImageClassification

from tl_align_hf import to_tl_align

PATHS = ("eager", "value_channel", "explicit")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_model(family: str, seed: int = 0, sharpness: float = 0.35) -> torch.nn.Module:
    """A 12-block DeiT (32 px, patch 4) or Swin (32 px, patch 2, window 2, depths 2-2-6-2) with sharp attention, aligned."""
    torch.manual_seed(seed)
    if family == "deit":
        config = DeiTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=12, num_attention_heads=4,
                            intermediate_size=128, num_labels=10)  # fmt: skip
        model = DeiTForImageClassification(config)
    else:
        config = SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 6, 2], num_heads=[2, 2, 4, 4],
                            window_size=2, num_labels=10)  # fmt: skip
        model = SwinForImageClassification(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "query.weight", "key.weight")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * sharpness)
    model.config._attn_implementation = "sdpa"
    return to_tl_align(model).eval()


def make_batch(model: torch.nn.Module, batch_size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images and a token-grid CutMix batch contract: a random box of patches from each image's partner."""
    generator = torch.Generator().manual_seed(seed)
    patch_size = model.tl_align_patch_size
    grid = 32 // (patch_size if isinstance(patch_size, int) else patch_size[0])
    token_weights = torch.ones(batch_size, grid, grid)
    for row in range(batch_size):
        top, left = torch.randint(0, grid // 2, (2,), generator=generator).tolist()
        token_weights[row, top : top + grid // 2, left : left + grid // 2] = 0.0
    token_weights = token_weights.flatten(1)
    return {
        "pixel_values": torch.randn(batch_size, 3, 32, 32, generator=generator),
        "mix_index": torch.randperm(batch_size, generator=generator),
        "token_weights": token_weights,
        "mix_lam": token_weights.mean(1),
    }


def aligned_lam(model, batch, path: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model.tl_align_attention_path = path
    inputs = {**batch, "pixel_values": batch["pixel_values"].to(dtype)}
    with torch.no_grad():
        return model(**inputs).aligned_lam.float()


def measure(family: str, dtype_name: str, seeds=(0, 1, 2), batch_size: int = 32) -> dict:
    """|aligned_lam - float32 reference| per path over `batch_size` images of each of the models `seeds`: mean and
    max, and the smallest max |aligned_lam - mix_lam| of a model (how far alignment moved the targets)."""
    errors, moved = {path: [] for path in PATHS}, []
    for seed in seeds:
        model = make_model(family, seed)
        batch = make_batch(model, batch_size, seed)
        reference = aligned_lam(model, batch, "eager")
        low_precision = copy.deepcopy(model).to(DTYPES[dtype_name])
        for path in PATHS:
            errors[path].append((aligned_lam(low_precision, batch, path, DTYPES[dtype_name]) - reference).abs())
        moved.append((reference - batch["mix_lam"]).abs().max().item())
    return {
        "family": family,
        "dtype": dtype_name,
        "seeds": list(seeds),
        "mean_error": {path: torch.cat(values).mean().item() for path, values in errors.items()},
        "max_error": {path: torch.cat(values).max().item() for path, values in errors.items()},
        "moved": min(moved),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["deit", "swin"], choices=["deit", "swin"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--seeds", type=int, default=4, help="models (weights and batches) per family")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = [measure(family, dtype, range(args.seeds), args.batch_size) for family in args.families for dtype in args.dtypes]
    print(f"torch {torch.__version__}, CPU; |aligned_lam - float32 reference| over {args.seeds} models x "
          f"{args.batch_size} images: mean (max)\n")  # fmt: skip
    print("| model | dtype | eager | value_channel | explicit | value_channel / eager (means) | targets moved by |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        cells = " | ".join(f"{row['mean_error'][path]:.2e} ({row['max_error'][path]:.1e})" for path in PATHS)
        ratio = row["mean_error"]["value_channel"] / row["mean_error"]["eager"]
        print(f"| {row['family']} (12 blocks) | {row['dtype']} | {cells} | {ratio:.2f} | >= {row['moved']:.3f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
