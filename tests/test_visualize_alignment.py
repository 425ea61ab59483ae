"""scripts/visualize_alignment.py on a tiny untrained checkpoint: the figure, the per-layer gaps and the doc section."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from tl_align_hf import TLAlignCollator
from tl_align_hf.support.transforms import default_image_processor

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import visualize_alignment as viz  # noqa: E402

pytest.importorskip("matplotlib")
LAYERS = 2


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=2,
        hidden_size=16,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=10,
    )
    path = tmp_path / "checkpoint"
    ViTForImageClassification(config).save_pretrained(path)
    default_image_processor(16).save_pretrained(path)
    return path


def test_recording_model_keeps_every_layer(checkpoint):
    model = viz.recording_model(ViTForImageClassification.from_pretrained(checkpoint))
    examples = [{"pixel_values": torch.randn(3, 16, 16), "label": i % 10} for i in range(6)]
    batch = TLAlignCollator.from_model(model, mixing_method="cutmix", seed=0)(examples)
    shares, logits = viz.layer_shares(model, batch)
    assert shares.shape == (LAYERS + 1, 6, 1 + 64)
    assert torch.equal(shares[0, :, 0], batch["mix_lam"])
    assert logits.shape == (6, 10)


def test_main_writes_figure_numbers_and_section(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TL_ALIGN_HF_CACHE", str(tmp_path / "cache"))
    output_dir = tmp_path / "docs"
    results = viz.main(["--checkpoint", str(checkpoint), "--draws", "1", "--output-dir", str(output_dir)])

    assert json.loads((output_dir / "alignment_gap.json").read_text()) == results
    for model_name in ("trained", "untrained"):
        gaps = results[model_name]["mean_abs_gap"]
        assert len(gaps) == LAYERS + 1 and gaps[0] == 0.0
        assert all(0.0 <= gap <= 1.0 for gap in gaps)
    assert (output_dir / "img" / "token_fluctuation.png").stat().st_size > 0
    doc = (output_dir / "accuracy.md").read_text()
    assert "<!-- token-fluctuation:begin -->" in doc and "| after block |" in doc
