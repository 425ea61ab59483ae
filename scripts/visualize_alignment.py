#!/usr/bin/env python
"""Pictures and numbers of token fluctuation: how far the label share reaching the class token drifts from the
area lambda of CutMix, layer by layer, in a trained ViT (issue 6, part 3).

    python examples/run_image_classification.py          # once: trains outputs/digits-tl-align
    python scripts/visualize_alignment.py                # writes docs/img/token_fluctuation.png, docs/ numbers

For a few CutMix pairs of the validation set, the figure shows the mixed image, the per-token share maps (share of
the sample's own label held by each patch token, on the patch grid) at the input, after the middle block and after
the last block, and the class token's share per layer next to the area lambda. The numbers: over the whole
validation set mixed with CutMix (one box per image, several draws), the mean |share of the class token - area
lambda| after each block, for the trained checkpoint and for the same architecture at random initialisation.

The per-layer shares are recorded by a subclass of `TokenLabelAligner` defined here; the library is unchanged.
Needs matplotlib (`pip install .[plots]`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from tl_align_hf import TLAlignCollator, TokenLabelAligner, to_tl_align
from tl_align_hf.support.data import load_image_dataset
from tl_align_hf.support.digits import default_digits_dir, write_digits_imagefolder
from tl_align_hf.support.transforms import make_transforms, processor_image_size

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "outputs" / "digits-tl-align"


# ---------------------------------------------------------------------------------------------------------- recording
class RecordingAligner(TokenLabelAligner):
    """A `TokenLabelAligner` that keeps the `(B, N)` shares after every block: `layer_shares[0]` is the input."""

    layer_shares: list[torch.Tensor]

    @classmethod
    def convert(cls, aligner: TokenLabelAligner) -> RecordingAligner:
        """Turn the aligner the model built into a recording one, in place (its state is kept as built)."""
        aligner.__class__ = cls
        aligner.layer_shares = [aligner.shares.clone()]
        return aligner

    def update(self, attended_shares: torch.Tensor) -> None:
        """The library's update, then a copy of the new shares."""
        updates_before = self.num_updates
        super().update(attended_shares)
        if self.num_updates > updates_before:
            self.layer_shares.append(self.shares.clone())


class _RecordingMixin:
    """Makes the aligner of each aligned forward pass a `RecordingAligner`, kept as `last_aligner`."""

    def _start_aligner(self, *args, **kwargs) -> RecordingAligner:
        self.last_aligner = RecordingAligner.convert(super()._start_aligner(*args, **kwargs))
        return self.last_aligner


def recording_model(model: torch.nn.Module) -> torch.nn.Module:
    """Convert `model` in place (as `to_tl_align` does) to a class that records per-layer shares."""
    aligned = to_tl_align(model)
    aligned.__class__ = type(f"Recording{type(aligned).__name__}", (_RecordingMixin, type(aligned)), {})
    return aligned.eval()


@torch.no_grad()
def layer_shares(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(`(L + 1, B, N)` shares of all tokens per layer, `(B, C)` logits) for a mixed batch."""
    mixing = {name: batch[name] for name in ("mix_index", "token_weights", "mix_lam")}
    outputs = model(pixel_values=batch["pixel_values"], **mixing)
    shares = torch.stack(model.last_aligner.layer_shares)
    assert torch.allclose(shares[-1, :, 0], outputs.aligned_lam)  # the read-out is the last layer's CLS share
    return shares, outputs.logits


# ---------------------------------------------------------------------------------------------------------- data
def validation_examples(image_processor, image_size: int) -> list[dict]:
    """The example script's digits validation split (360 images), preprocessed as at evaluation."""
    root = write_digits_imagefolder(default_digits_dir(image_size), image_size=image_size)
    dataset = load_image_dataset(train_dir=root / "train", validation_dir=root / "validation")
    _, eval_transform = make_transforms(image_processor, horizontal_flip=False)
    split = dataset["validation"].with_transform(eval_transform)
    return [split[i] for i in range(len(split))]


def cutmix_batch(model: torch.nn.Module, examples: list[dict], seed: int) -> dict[str, torch.Tensor]:
    """All `examples` mixed with CutMix (pixel box, alpha 1), one box and a random partner per image."""
    collator = TLAlignCollator.from_model(model, mixing_method="cutmix", cutmix_alpha=1.0, mix_mode="elem", seed=seed)
    return collator(examples)


# ---------------------------------------------------------------------------------------------------------- numbers
def gap_per_layer(model: torch.nn.Module, examples: list[dict], draws: int) -> dict[str, list[float]]:
    """Mean |CLS share - mix_lam| and mean (CLS share - mix_lam) after each block, over `draws` CutMix draws."""
    absolute, signed = [], []
    for draw in range(draws):
        batch = cutmix_batch(model, examples, seed=draw)
        shares, _ = layer_shares(model, batch)
        difference = shares[:, :, 0] - batch["mix_lam"][None, :]  # (L + 1, B)
        absolute.append(difference.abs().mean(dim=1))
        signed.append(difference.mean(dim=1))
    return {
        "mean_abs_gap": torch.stack(absolute).mean(0).tolist(),
        "mean_signed_gap": torch.stack(signed).mean(0).tolist(),
    }


def untrained_copy(checkpoint: Path) -> torch.nn.Module:
    """The checkpoint's architecture at random initialisation (seed 0), for comparison."""
    torch.manual_seed(0)
    return recording_model(AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(checkpoint)))


def gap_table(trained: dict[str, list[float]], untrained: dict[str, list[float]]) -> str:
    """Markdown table of the per-layer gaps."""
    lines = [
        "| after block | mean abs(aligned - area), trained | mean (aligned - area), trained | mean abs(aligned - area), untrained |",
        "|---|---|---|---|",
    ]
    for layer, (absolute, signed, random_init) in enumerate(
        zip(trained["mean_abs_gap"], trained["mean_signed_gap"], untrained["mean_abs_gap"])
    ):
        name = "input" if layer == 0 else str(layer)
        lines.append(f"| {name} | {absolute:.4f} | {signed:+.4f} | {random_init:.4f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- figure
def pick_pairs(batch: dict[str, torch.Tensor], final_gap: torch.Tensor, count: int) -> list[int]:
    """`count` samples with a mid-sized box (area lambda in [0.3, 0.75]) and a partner of another class: the
    `count - 1` with the largest |aligned - area| gap (one per class), then the one with the median gap."""
    labels, lam = batch["labels"], batch["mix_lam"]
    eligible = torch.nonzero((lam > 0.3) & (lam < 0.75) & (labels != labels[batch["mix_index"]])).flatten()
    by_gap = eligible[final_gap[eligible].abs().argsort(descending=True)].tolist()
    picked, classes = [], set()
    for index in by_gap:
        if len(picked) == count - 1:
            break
        if int(labels[index]) not in classes:
            picked.append(index)
            classes.add(int(labels[index]))
    median = by_gap[len(by_gap) // 2]
    return picked + ([median] if median not in picked else [])


def _image(pixel_values: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised with mean/std 0.5 -> (H, W) greyscale in [0, 1]."""
    return (pixel_values[0] * 0.5 + 0.5).clamp(0, 1).numpy()


def plot_pairs(batch, shares, logits, indices: list[int], grid: tuple[int, int], id2label: dict, path: Path) -> None:
    """One row per pair: mixed image, share maps at input / middle / last layer, CLS share per layer vs lambda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers = shares.shape[0] - 1
    shown_layers = (0, num_layers // 2, num_layers)
    fig, axes = plt.subplots(
        len(indices),
        7,
        figsize=(16, 3.2 * len(indices)),
        squeeze=False,
        gridspec_kw={"width_ratios": [1, 1, 1, 1, 0.07, 0.25, 1.5], "wspace": 0.25, "hspace": 0.5},
    )
    for row, index in enumerate(indices):
        partner = int(batch["mix_index"][index])
        own, other = int(batch["labels"][index]), int(batch["labels"][partner])
        axes[row, 0].imshow(_image(batch["pixel_values"][index]), cmap="gray")
        lam = float(batch["mix_lam"][index])
        axes[row, 0].set_title(f"mixed: {id2label[own]} (own) + {id2label[other]}\narea $\\lambda$ = {lam:.2f}")
        for column, layer in enumerate(shown_layers, start=1):
            image = _share_map(axes[row, column], shares[layer, index], grid)
            label = "input tokens" if layer == 0 else f"after block {layer}"
            axes[row, column].set_title(f"{label}\nCLS share {float(shares[layer, index, 0]):.2f}")
        fig.colorbar(image, cax=axes[row, 4], label=f"share of '{id2label[own]}'")
        axes[row, 5].axis("off")  # spacer between the colour bar and the curve
        _cls_curve(axes[row, 6], shares[:, index, 0], batch["mix_lam"][index], logits[index], own, other)
        for axis in axes[row, :4]:
            axis.set_xticks([])
            axis.set_yticks([])
    fig.suptitle(
        "Token fluctuation under CutMix: each patch token's share of the own label (maps) and the class token's share "
        "per block (right)\n(top rows: the largest gaps to the area $\\lambda$ in the batch, one per class; last row: "
        "the median gap)",
        fontsize=13,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _share_map(axis, token_shares: torch.Tensor, grid: tuple[int, int]):
    """Heat map of the patch tokens' shares (prefix tokens dropped) on the patch grid."""
    patches = token_shares[-grid[0] * grid[1] :].reshape(grid).numpy()
    return axis.imshow(patches, vmin=0, vmax=1, cmap="viridis")


def _cls_curve(
    axis, cls_shares: torch.Tensor, mix_lam: torch.Tensor, logits: torch.Tensor, own: int, other: int
) -> None:
    """CLS share per layer, the area lambda, and the model's own-class probability among the two classes."""
    layers = np.arange(len(cls_shares))
    axis.plot(layers, cls_shares.numpy(), "o-", label="CLS share (TL-Align)")
    axis.axhline(float(mix_lam), color="gray", linestyle="--", label="area $\\lambda$")
    probabilities = logits.softmax(-1)
    relative = float(probabilities[own] / (probabilities[own] + probabilities[other]))
    axis.plot([layers[-1]], [relative], "r*", markersize=12, label="model: p(own) / (p(own) + p(other))")
    axis.set_ylim(-0.05, 1.05)
    axis.set_xticks(layers, ["in"] + [str(layer) for layer in layers[1:]])
    axis.set_xlabel("block")
    axis.set_title("class token's share of the own label")
    axis.legend(fontsize=8, loc="lower left")
    axis.grid(alpha=0.3)


# ---------------------------------------------------------------------------------------------------------- main
def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="A trained ViT/DeiT checkpoint.")
    parser.add_argument("--pairs", type=int, default=3, help="CutMix pairs to draw.")
    parser.add_argument("--draws", type=int, default=10, help="CutMix draws over the validation set for the numbers.")
    parser.add_argument(
        "--output-dir", type=Path, default=REPO / "docs", help="Where accuracy.md, img/ and the JSON go."
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Draw the figure, compute the per-layer gaps, write them to the output folder; return the numbers."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from doc_sections import write_section

    args = make_parser().parse_args(argv)
    if not (args.checkpoint / "config.json").exists():
        raise SystemExit(
            f"No checkpoint at {args.checkpoint}: run `python examples/run_image_classification.py` first."
        )
    start = time.perf_counter()
    model = recording_model(AutoModelForImageClassification.from_pretrained(args.checkpoint))
    image_processor = AutoImageProcessor.from_pretrained(args.checkpoint)
    examples = validation_examples(image_processor, processor_image_size(image_processor)[0])
    patch = model.config.patch_size
    grid = (model.config.image_size // patch, model.config.image_size // patch)

    batch = cutmix_batch(model, examples, seed=0)
    shares, logits = layer_shares(model, batch)
    figure = args.output_dir / "img" / "token_fluctuation.png"
    id2label = {int(key): value for key, value in model.config.id2label.items()}
    final_gap = shares[-1, :, 0] - batch["mix_lam"]
    plot_pairs(batch, shares, logits, pick_pairs(batch, final_gap, args.pairs), grid, id2label, figure)

    results = {
        "checkpoint": str(args.checkpoint),
        "validation_images": len(examples),
        "draws": args.draws,
        "trained": gap_per_layer(model, examples, args.draws),
        "untrained": gap_per_layer(untrained_copy(args.checkpoint), examples, args.draws),
    }
    (args.output_dir / "alignment_gap.json").write_text(json.dumps(results, indent=2) + "\n")
    command = "python scripts/visualize_alignment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_section(
        args.output_dir / "accuracy.md",
        "token-fluctuation",
        _section(results, figure, args, command, start),
        "Accuracy",
    )
    print(gap_table(results["trained"], results["untrained"]))
    return results


def _section(results: dict, figure: Path, args: argparse.Namespace, command: str, start: float) -> str:
    """The generated Markdown section for docs/accuracy.md."""
    relative_figure = figure.relative_to(args.output_dir)
    return "\n\n".join(
        [
            "### Per-layer gap (generated by scripts/visualize_alignment.py)",
            f"Validation set of the example ({results['validation_images']} images), each image CutMix-ed (pixel box, "
            f"alpha 1) with a random partner, {results['draws']} draws; checkpoint `{results['checkpoint']}` and, for "
            "comparison, the same architecture at random initialisation. 'aligned' is the class token's share after "
            "that block; after the last block it is the `aligned_lam` that TL-Align trains against.",
            gap_table(results["trained"], results["untrained"]),
            f"![token fluctuation]({relative_figure})",
            f"Command: `{command.strip()}` ({time.perf_counter() - start:.0f} s).",
        ]
    )


if __name__ == "__main__":
    main()
