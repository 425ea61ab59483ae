"""The batch contract and the run's settings, each checked once where it enters: the collator on the host, the
aligned model's one check (`tl_align_hf.contract.check_model_inputs`), the loss's own arguments, and the settings
dataclasses (`tl_align_hf.settings`)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import ViTForImageClassification

from tl_align_hf import (
    MixingSettings,
    TLAlignCollator,
    TLAlignConfig,
    TLAlignMixer,
    mixed_batch_loss,
    mixed_soft_targets,
    mixing_loss,
)
from tl_align_hf.contract import MIXING_KEYS, check_model_inputs
from tl_align_hf.settings import training_settings

from .tiny_models import IMAGE_SIZE, NUM_LABELS, NUM_PATCHES, PATCH_SIZE, aligned_copy, mixed_batch, tiny_model


def _mixing(batch: dict) -> dict:
    return {key: batch[key] for key in MIXING_KEYS}


def test_raises_error_when_a_direct_model_call_has_labels_outside_the_classes():
    model = aligned_copy(tiny_model(ViTForImageClassification))
    batch = mixed_batch("binary")
    labels = torch.tensor([0, 1, 2, NUM_LABELS])
    with pytest.raises(ValueError, match=rf"`labels` must hold values in \[0, {NUM_LABELS}\) .*got values in \[0, {NUM_LABELS}\]"):
        model(batch["pixel_values"], labels=labels, **_mixing(batch))


def test_value_checks_are_queued_as_device_asserts_while_compiling(monkeypatch):
    """Off the host (an accelerator, or `torch.compile` tracing) nothing is read back: `torch._assert_async` carries
    the message (on CPU tensors it raises at once, which is how this test sees it)."""
    batch = mixed_batch("binary")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    bad_weights = batch["token_weights"] + 1.0
    with pytest.raises(RuntimeError, match=r"`token_weights` must hold the share .* in \[0, 1\]\. Pass the batch") as caught:
        check_model_inputs(batch["mix_index"], bad_weights, batch["mix_lam"], 4, NUM_PATCHES)
    assert "got values" not in str(caught.value)  # the host path would have read the values back
    logits = torch.randn(4, NUM_LABELS)
    with pytest.raises(RuntimeError, match=rf"`labels` must hold values in \[0, {NUM_LABELS}\)"):
        mixing_loss(logits, torch.tensor([0, 1, 2, NUM_LABELS]), batch["mix_index"], batch["mix_lam"])


def test_mixed_batch_loss_checks_the_values_the_model_did_not_see():
    """With `tl_align=False` the model is not given `mix_index` and `mix_lam`: the loss checks their values."""
    batch = mixed_batch("binary")
    outputs = {"logits": torch.randn(4, NUM_LABELS)}
    with pytest.raises(ValueError, match=r"`own_share` must hold values in \[0, 1\]"):
        mixed_batch_loss(outputs, {**batch, "mix_lam": torch.tensor([0.5, 1.5, 0.2, 0.1])}, tl_align=False)
    with pytest.raises(ValueError, match=r"`mix_index` must hold values in \[0, 4\)"):
        mixed_batch_loss(outputs, {**batch, "mix_index": torch.tensor([1, 0, 3, 4])}, tl_align=False)
    with pytest.raises(ValueError, match=r"`labels` must be a \(4,\) integer tensor"):
        mixed_batch_loss(outputs, {**batch, "labels": batch["labels"][:3]}, tl_align=False)
    loss, sums = mixed_batch_loss(outputs, batch, tl_align=False)
    assert torch.isfinite(loss) and sums.shape == (2,)


def test_the_model_loss_equals_mixed_batch_loss_of_its_outputs():
    """The forward's loss skips the checks its own inputs passed; the value is the public function's."""
    model = aligned_copy(tiny_model(ViTForImageClassification))
    batch = mixed_batch("fractional")
    out = model(batch["pixel_values"], labels=batch["labels"], target_smoothing=0.1, **_mixing(batch))
    torch.testing.assert_close(out.loss, mixed_batch_loss(out, batch, label_smoothing=0.1)[0])


LABEL_SMOOTHING_ENTRIES = {
    "config": lambda: TLAlignConfig(output_dir="unused", label_smoothing=1.5),
    "mixing_loss": lambda: mixing_loss(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([1, 0]), torch.ones(2), 1.5),
    "mixed_batch_loss": lambda: mixed_batch_loss(
        {"logits": torch.randn(2, 3)}, {"labels": torch.tensor([0, 1]), "mix_index": torch.tensor([1, 0]),
                                        "mix_lam": torch.ones(2)}, tl_align=False, label_smoothing=1.5),  # fmt: skip
    "mixed_soft_targets": lambda: mixed_soft_targets(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.ones(2), 3, 1.5),
    "model": lambda: aligned_copy(tiny_model(ViTForImageClassification))(
        mixed_batch("binary")["pixel_values"], target_smoothing=1.5, **_mixing(mixed_batch("binary"))),
}


@pytest.mark.parametrize("entry", list(LABEL_SMOOTHING_ENTRIES))
def test_raises_error_when_label_smoothing_is_out_of_range_at_every_entry(entry):
    with pytest.raises(ValueError, match=r"smoothing` .*must be in \[0, 1\).*got 1.5\."):
        LABEL_SMOOTHING_ENTRIES[entry]()


def test_training_settings_are_the_mixing_fields_and_come_back_as_mixing_settings(tmp_path):
    config = TLAlignConfig(output_dir=str(tmp_path), mixing_method="cutmix", cutmix_minmax=[0.2, 0.8], mix_prob=0.7,
                           tl_align=False, label_smoothing=0.2)  # fmt: skip
    record = json.loads(json.dumps(training_settings(config, config.tl_align, config.label_smoothing)))
    mixing_fields = [item.name for item in dataclasses.fields(MixingSettings)]
    assert list(record) == [*mixing_fields, "tl_align", "label_smoothing"]
    assert (record["tl_align"], record["label_smoothing"]) == (False, 0.2)
    restored = MixingSettings.from_config(record)
    assert type(restored) is MixingSettings and restored == config.mixing_settings()
    assert restored.mixing_settings_dict() == {name: record[name] for name in mixing_fields}


def test_raises_error_when_settings_are_changed_after_they_were_checked():
    """The mixer takes its copy through the settings' own constructor, which checks it again."""
    settings = MixingSettings()
    settings.mix_prob = 5.0
    with pytest.raises(ValueError, match=r"`mix_prob` \(--mix_prob\) must be a number in \[0.0, 1.0\]"):
        TLAlignMixer(settings, PATCH_SIZE)


def test_collator_checks_the_image_size_once_per_batch(monkeypatch):
    calls = []
    check_image_size = TLAlignMixer.check_image_size
    monkeypatch.setattr(TLAlignMixer, "check_image_size", lambda self, *args: calls.append(args) or check_image_size(self, *args))
    collator = TLAlignCollator(TLAlignMixer(MixingSettings(), PATCH_SIZE, IMAGE_SIZE), num_labels=NUM_LABELS, seed=0)
    examples = [{"pixel_values": torch.rand(3, IMAGE_SIZE, IMAGE_SIZE), "label": index} for index in range(4)]
    calls.clear()
    collator(examples)
    assert len(calls) == 1
    collator.collate_unmixed(examples)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        collator([{"pixel_values": torch.rand(3, IMAGE_SIZE + 1, IMAGE_SIZE), "label": 0}] * 2)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        collator.collate_unmixed([{"pixel_values": torch.rand(3, IMAGE_SIZE + 1, IMAGE_SIZE), "label": 0}] * 2)
