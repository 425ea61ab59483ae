import json
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForImageClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTForImageClassification,
)
from transformers.utils import find_labels

from tl_align_hf import (
    TLAlignDeiTForImageClassification,
    TLAlignDeiTForImageClassificationWithTeacher,
    TLAlignViTForImageClassification,
    mixed_batch_loss,
    mixed_soft_targets,
    to_tl_align,
)
from tl_align_hf.models import aligned_classes

from .reference import reference_cls_labels
from .tiny_models import NUM_LABELS, NUM_PATCHES, aligned_copy, mixed_batch, tiny_model

ALIGNED_CLASSES = aligned_classes()  # every supported class -> its aligned class (timm's included)

MIXING_KEYS = ("mix_index", "token_weights", "mix_lam")
PARENTS = {"vit": ViTForImageClassification, "deit": DeiTForImageClassification}
PREFIX_TOKENS = {"vit": 1, "deit": 2}


def mixing(batch):
    return {key: batch[key] for key in MIXING_KEYS}


def max_reference_difference(family, attn_implementation, kind, attention_path="auto", image_hw=None, **forward_kwargs):
    vanilla = tiny_model(PARENTS[family], "eager")
    aligned = aligned_copy(vanilla)
    aligned.set_attn_implementation(attn_implementation)
    aligned.tl_align_attention_path = attention_path
    if image_hw is None:
        batch = mixed_batch(kind)
    else:
        num_patches = (image_hw[0] // 4) * (image_hw[1] // 4)
        batch = mixed_batch(kind, num_patches=num_patches, image_hw=image_hw)
    with torch.no_grad():
        out = aligned(batch["pixel_values"], **mixing(batch), **forward_kwargs)
    expected = reference_cls_labels(vanilla, batch, PREFIX_TOKENS[family], 0.1, **forward_kwargs)
    rebuilt = mixed_soft_targets(batch["labels"], batch["mix_index"], out.aligned_lam, NUM_LABELS, 0.1)
    moved = (out.aligned_lam - batch["mix_lam"]).abs().max().item()
    return (rebuilt.double() - expected).abs().max().item(), moved


@pytest.mark.parametrize("kind", ["fractional", "binary", "constant"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["vit", "deit"])
def test_aligned_target_matches_full_label_vector_reference(family, attn_implementation, kind, record_property):
    difference, moved = max_reference_difference(family, attn_implementation, kind)
    record_property("equivalence", (family, attn_implementation, "auto", kind, difference, moved))  # the script's row
    assert difference < 1e-5
    if kind != "constant":  # alignment really moved the target away from the area share
        assert moved > 1e-3


@pytest.mark.parametrize("attention_path", ["eager", "value_channel", "explicit"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_every_attention_path_matches_reference(attention_path, attn_implementation, record_property):
    difference, moved = max_reference_difference("deit", attn_implementation, "fractional", attention_path)
    record_property("equivalence", ("deit", attn_implementation, attention_path, "fractional", difference, moved))
    assert difference < 1e-5


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_non_square_images_with_interpolated_positions_match_reference(family, record_property):
    difference, moved = max_reference_difference(
        family, "sdpa", "binary", image_hw=(16, 32), interpolate_pos_encoding=True
    )
    record_property("equivalence", (f"{family} (16x32, interpolated)", "sdpa", "auto", "binary", difference, moved))
    assert difference < 1e-5 and moved > 1e-3


def test_mixup_shares_stay_at_lambda():
    """Constant token weights are a fixed point: every token holds lambda, so the target is the area target."""
    model = aligned_copy(tiny_model(ViTForImageClassification))
    batch = mixed_batch("constant")
    with torch.no_grad():
        out = model(batch["pixel_values"], **mixing(batch))
    torch.testing.assert_close(out.aligned_lam, batch["mix_lam"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["vit", "deit"])
def test_without_mixing_arguments_logits_and_loss_equal_parent_bit_for_bit(family, attn_implementation):
    vanilla = tiny_model(PARENTS[family], attn_implementation)
    aligned = aligned_copy(vanilla)
    batch = mixed_batch("binary")
    with torch.no_grad():
        expected = vanilla(batch["pixel_values"], labels=batch["labels"])
        out = aligned(batch["pixel_values"], labels=batch["labels"])
    assert torch.equal(out.logits, expected.logits)
    assert torch.equal(out.loss, expected.loss)
    assert not hasattr(out, "aligned_lam") or out.aligned_lam is None


def test_with_teacher_trains_both_heads_on_the_cls_target():
    vanilla = tiny_model(DeiTForImageClassificationWithTeacher)
    aligned = aligned_copy(vanilla)
    plain_head = aligned_copy(tiny_model(DeiTForImageClassification))
    plain_head.load_state_dict(vanilla.state_dict(), strict=False)
    batch = mixed_batch("fractional")
    with torch.no_grad():
        out = aligned(batch["pixel_values"], **mixing(batch))
        single = plain_head(batch["pixel_values"], **mixing(batch))
        expected_logits = vanilla(batch["pixel_values"]).logits
    loss, _ = mixed_batch_loss(out, batch, label_smoothing=0.1)
    targets = mixed_soft_targets(batch["labels"], batch["mix_index"], out.aligned_lam, NUM_LABELS, 0.1)
    per_head = [-(targets * torch.log_softmax(logits, -1)).sum(-1).mean() for logits in (out.cls_logits, out.distillation_logits)]
    torch.testing.assert_close(loss, (per_head[0] + per_head[1]) / 2)
    torch.testing.assert_close(out.aligned_lam, single.aligned_lam)
    torch.testing.assert_close(out.logits, expected_logits)


def test_with_teacher_ignores_labels_as_its_parent_does():
    """The parent's forward takes no `labels` (find_labels gives []): passing them changes nothing, aligned or not."""
    vanilla = tiny_model(DeiTForImageClassificationWithTeacher)
    aligned = aligned_copy(vanilla)
    batch = mixed_batch("fractional")
    assert find_labels(type(aligned)) == find_labels(type(vanilla)) == []
    with torch.no_grad():
        assert torch.equal(aligned(batch["pixel_values"], labels=batch["labels"]).logits, vanilla(batch["pixel_values"]).logits)
        with_labels = aligned(batch["pixel_values"], labels=batch["labels"], **mixing(batch))
        without = aligned(batch["pixel_values"], **mixing(batch))
    assert "loss" not in with_labels and torch.equal(with_labels.aligned_lam, without.aligned_lam)


def test_aligned_loss_is_soft_target_cross_entropy_and_labels_stay_integer():
    model = aligned_copy(tiny_model(ViTForImageClassification))
    batch = mixed_batch("binary")
    out = model(batch["pixel_values"], labels=batch["labels"], target_smoothing=0.1, **mixing(batch))
    targets = mixed_soft_targets(batch["labels"], batch["mix_index"], out.aligned_lam, NUM_LABELS, 0.1)
    expected = -(targets * torch.log_softmax(out.logits, -1)).sum(-1).mean()
    torch.testing.assert_close(out.loss, expected)
    assert not out.aligned_lam.requires_grad
    assert out.aligned_lam.dtype == torch.float32
    assert model.config.problem_type is None
    out.loss.backward()
    assert model.classifier.weight.grad is not None


def test_return_dict_false_gives_tuple_with_aligned_lam_last():
    model = aligned_copy(tiny_model(ViTForImageClassification))
    batch = mixed_batch("binary")
    with torch.no_grad():
        as_tuple = model(batch["pixel_values"], return_dict=False, **mixing(batch))
        as_output = model(batch["pixel_values"], **mixing(batch))
    assert torch.equal(as_tuple[0], as_output.logits)
    assert torch.equal(as_tuple[-1], as_output.aligned_lam)


def test_gradient_checkpointing_applies_each_update_once():
    batch = mixed_batch("fractional")
    results = []
    for checkpointing in (False, True):
        model = aligned_copy(tiny_model(ViTForImageClassification)).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        out = model(batch["pixel_values"], labels=batch["labels"], **mixing(batch))
        out.loss.backward()
        results.append((out.aligned_lam, model.vit.layers[0].attention.q_proj.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_shares_ignore_attention_dropout_in_training():
    """One block: the probabilities depend only on the input, so train (dropout 0.5) and eval shares agree."""
    vanilla = tiny_model(ViTForImageClassification, "sdpa", num_hidden_layers=1, attention_probs_dropout_prob=0.5)
    model = aligned_copy(vanilla)
    batch = mixed_batch("binary")
    with torch.no_grad():
        eval_lam = model(batch["pixel_values"], **mixing(batch)).aligned_lam
        model.train()
        torch.manual_seed(0)
        train_out = model(batch["pixel_values"], **mixing(batch))
        torch.manual_seed(0)
        plain_train = vanilla.train()(batch["pixel_values"]).logits
    torch.testing.assert_close(train_out.aligned_lam, eval_lam, atol=1e-6, rtol=0)
    assert not torch.equal(train_out.logits, model.eval()(batch["pixel_values"]).logits)  # dropout did act
    torch.testing.assert_close(train_out.logits, plain_train)


def test_bfloat16_model_keeps_float32_shares():
    model = aligned_copy(tiny_model(ViTForImageClassification, "sdpa"))
    batch = mixed_batch("fractional")
    with torch.no_grad():
        reference = model(batch["pixel_values"], **mixing(batch)).aligned_lam
        model.to(torch.bfloat16)
        out = model(batch["pixel_values"].bfloat16(), **mixing(batch))
    assert out.aligned_lam.dtype == torch.float32
    torch.testing.assert_close(out.aligned_lam, reference, atol=2e-2, rtol=0)


def test_set_attn_implementation_keeps_alignment_and_switches_backend():
    model = aligned_copy(tiny_model(ViTForImageClassification, "eager"))
    batch = mixed_batch("fractional")
    with torch.no_grad():
        eager_lam = model(batch["pixel_values"], **mixing(batch)).aligned_lam
        model.set_attn_implementation("sdpa")
        sdpa_lam = model(batch["pixel_values"], **mixing(batch)).aligned_lam
    assert model.config._attn_implementation == "sdpa"  # the user's backend, not the routed name
    torch.testing.assert_close(sdpa_lam, eager_lam, atol=1e-6, rtol=0)


def test_routing_follows_the_config_and_the_update_count_catches_a_module_that_escapes_it():
    model = aligned_copy(tiny_model(ViTForImageClassification, "eager"))
    batch = mixed_batch("binary")
    with torch.no_grad():
        expected = model(batch["pixel_values"], **mixing(batch)).aligned_lam
        model.config._attn_implementation_internal = "sdpa"  # by hand: the routing follows the config
        torch.testing.assert_close(model(batch["pixel_values"], **mixing(batch)).aligned_lam, expected, atol=1e-6, rtol=0)
        model.vit.layers[1].attention.config = model.config  # one module that no longer sees the routed view
        with pytest.raises(RuntimeError, match="expected 3 attention updates .* received 2.*tl_align_route_attention"):
            model(batch["pixel_values"], **mixing(batch))
        model.tl_align_route_attention()
        torch.testing.assert_close(model(batch["pixel_values"], **mixing(batch)).aligned_lam, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_saved_checkpoint_is_a_plain_transformers_checkpoint(family, tmp_path):
    aligned = aligned_copy(tiny_model(PARENTS[family]))
    aligned.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [PARENTS[family].__name__]
    assert (tmp_path / "model.safetensors").exists()
    assert type(aligned) is ALIGNED_CLASSES[PARENTS[family]]  # the class is restored after saving
    script = (
        "import json, sys, transformers\n"
        f"model, info = transformers.{PARENTS[family].__name__}.from_pretrained({str(tmp_path)!r}, output_loading_info=True)\n"
        "assert 'tl_align_hf' not in sys.modules\n"
        "print(json.dumps({k: sorted(map(str, v)) for k, v in info.items()}))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    info = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []


def test_to_tl_align_on_auto_model_round_trip(tmp_path):
    original = aligned_copy(tiny_model(ViTForImageClassification, "sdpa"))
    original.save_pretrained(tmp_path)
    auto_model = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(auto_model) is ViTForImageClassification
    converted = to_tl_align(auto_model)
    assert converted is auto_model and isinstance(converted, TLAlignViTForImageClassification)
    loaded = TLAlignViTForImageClassification.from_pretrained(tmp_path).eval()
    batch = mixed_batch("fractional")
    with torch.no_grad():
        expected = original(batch["pixel_values"], **mixing(batch)).aligned_lam
        for model in (converted, loaded):
            torch.testing.assert_close(model(batch["pixel_values"], **mixing(batch)).aligned_lam, expected)
    assert to_tl_align(converted) is converted


def test_from_pretrained_respects_requested_attention_backend(tmp_path):
    aligned_copy(tiny_model(ViTForImageClassification)).save_pretrained(tmp_path)
    for backend in ("eager", "sdpa"):
        model = TLAlignViTForImageClassification.from_pretrained(tmp_path, attn_implementation=backend)
        assert model.config._attn_implementation == backend


@pytest.mark.parametrize(
    "parent, aligned_class",
    [
        (ViTForImageClassification, TLAlignViTForImageClassification),
        (DeiTForImageClassification, TLAlignDeiTForImageClassification),
        (DeiTForImageClassificationWithTeacher, TLAlignDeiTForImageClassificationWithTeacher),
    ],
)
def test_aligned_classes_add_no_weights(parent, aligned_class):
    vanilla = tiny_model(parent)
    aligned = aligned_class(vanilla.config)
    assert list(aligned.state_dict()) == list(vanilla.state_dict())


def test_raises_error_when_architecture_is_unsupported():
    model = ConvNextForImageClassification(ConvNextConfig(num_stages=1, hidden_sizes=[8], depths=[1]))
    with pytest.raises(ValueError, match=r"ConvNextForImageClassification.*model_type='convnext'.*ViTForImageClassification"):
        to_tl_align(model)
    assert type(model) is ConvNextForImageClassification


def _bad(batch, **changes):
    batch = {**batch, **changes}
    return batch


@pytest.mark.parametrize(
    "changes, error, message",
    [
        (dict(token_weights=torch.rand(4, 35)), ValueError, r"`token_weights` must have shape .*\(4, 36\)"),
        (dict(token_weights=torch.rand(4, 36) + 1.0), ValueError, r"`token_weights` must hold the share .* in \[0, 1\], got values"),
        (dict(token_weights=torch.ones(4, 36, dtype=torch.long)), TypeError, r"`token_weights` must be a floating-point"),
        (dict(mix_lam=torch.rand(3)), ValueError, r"`mix_lam` must have shape \(4,\)"),
        (dict(mix_lam=-torch.rand(4) - 0.1), ValueError, r"`mix_lam` must hold the share .* in \[0, 1\], got values"),
        (dict(mix_index=torch.tensor([0, 1, 2, 4])), ValueError, r"`mix_index` must index into the batch.*\[0, 3\], got values in \[0, 4\]"),
        (dict(mix_index=torch.tensor([0, 1, 2])), ValueError, r"`mix_index` must have shape \(4,\)"),
        (dict(mix_index=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, r"`mix_index` must be an integer"),
        (dict(mix_lam=None), ValueError, r"missing \['mix_lam'\]"),
        (dict(labels=torch.rand(4, NUM_LABELS)), TypeError, r"`labels` must be a \(batch_size,\) integer tensor"),
    ],
)
def test_raises_error_when_mixing_arguments_are_wrong(changes, error, message):
    model = aligned_copy(tiny_model(ViTForImageClassification))
    batch = _bad(mixed_batch("binary"), **changes)
    with pytest.raises(error, match=message):
        model(batch["pixel_values"], labels=batch["labels"], **mixing(batch))


def test_raises_error_when_attention_path_is_unknown():
    model = aligned_copy(tiny_model(ViTForImageClassification))
    model.tl_align_attention_path = "fast"
    batch = mixed_batch("binary")
    with pytest.raises(ValueError, match="`tl_align_attention_path` must be one of"):
        model(batch["pixel_values"], **mixing(batch))


def test_an_unmixed_batch_has_aligned_shares_of_one_within_rounding_and_trains():
    """All shares 1 (an unmixed batch): float rounding of the attention rows must not push aligned_lam above 1."""
    model = aligned_copy(tiny_model(ViTForImageClassification)).train()
    batch = mixed_batch("binary", batch_size=8)
    batch.update(token_weights=torch.ones(8, NUM_PATCHES), mix_lam=torch.ones(8), mix_index=torch.arange(8))
    out = model(batch["pixel_values"], **mixing(batch))
    assert ((out.aligned_lam <= 1) & (out.aligned_lam > 1 - 1e-6)).all()
    loss, _ = mixed_batch_loss(out, batch, label_smoothing=0.1)
    loss.backward()
