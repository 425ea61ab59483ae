"""The families beyond ViT and DeiT: Swin, DINOv2 (+ registers), BEiT, ViT-MSN, I-JEPA, CLIP, MetaCLIP 2, SigLIP.

Every family gets the guarantees of the core (test_modeling.py): equivalence with the full label-vector reference,
the parent's logits bit for bit without mixing arguments, no new weights, plain checkpoints, `to_tl_align` on Auto
models, `TLAlignTrainer` and `TLAlignCollator.from_model`.
"""

import copy
import json

import pytest
import torch
from transformers import (
    AutoModelForImageClassification,
    BeitConfig,
    BeitForImageClassification,
    CLIPConfig,
    CLIPForImageClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    IJepaConfig,
    IJepaForImageClassification,
    MetaClip2Config,
    MetaClip2ForImageClassification,
    PvtConfig,
    PvtForImageClassification,
    SiglipConfig,
    SiglipForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTMSNConfig,
    ViTMSNForImageClassification,
)

import tl_align_hf
from tl_align_hf import TLAlignCollator, TLAlignTrainer, mixed_soft_targets, to_tl_align
from tl_align_hf.models import aligned_classes

from .reference import reference_swin_labels, reference_token_labels
from .test_trainer import image_dataset, make_args
from .tiny_models import IMAGE_SIZE, NUM_LABELS, aligned_copy, mixed_batch, sharpen_attention

ALIGNED_CLASSES = aligned_classes()  # every supported class -> its aligned class (timm's included)

MIXING_KEYS = ("mix_index", "token_weights", "mix_lam")
VIT_SIZES = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=4)
TEXT_SIZES = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _swin_config(image_size=IMAGE_SIZE):
    # 24 px, patch 2, window 3: token grids 12 -> 6 -> 3, shifted windows in the first two stages, clamped in the
    # last. 28 px: grids 14 -> 7 -> 4, every stage padded to whole windows, and an odd grid merged (7 -> 4).
    return SwinConfig(
        image_size=image_size, patch_size=2, embed_dim=8, depths=[2, 2, 2], num_heads=[2, 2, 2], window_size=3,
        mlp_ratio=2.0, drop_path_rate=0.0, num_labels=NUM_LABELS, **NO_DROPOUT,
    )


def _composite(config_class, **vision):
    return config_class(
        vision_config={**VIT_SIZES, "intermediate_size": 64, **vision}, text_config=TEXT_SIZES, num_labels=NUM_LABELS
    )


# name: (parent class, config factory, independent read-out: (pooling, prefix tokens)), for the reference test
FAMILIES = {
    "vit_msn": (ViTMSNForImageClassification, lambda: ViTMSNConfig(**VIT_SIZES, intermediate_size=64, num_labels=NUM_LABELS, **NO_DROPOUT), ("cls", 1)),
    "dinov2": (Dinov2ForImageClassification, lambda: Dinov2Config(**VIT_SIZES, mlp_ratio=2, layerscale_value=0.5, num_labels=NUM_LABELS, **NO_DROPOUT), ("cls_and_patch_mean", 1)),
    "dinov2_registers": (Dinov2WithRegistersForImageClassification, lambda: Dinov2WithRegistersConfig(**VIT_SIZES, mlp_ratio=2, num_register_tokens=2, num_labels=NUM_LABELS, **NO_DROPOUT), ("cls_and_patch_mean", 3)),
    "beit": (BeitForImageClassification, lambda: BeitConfig(**VIT_SIZES, intermediate_size=64, use_relative_position_bias=True, num_labels=NUM_LABELS, **NO_DROPOUT), ("patch_mean", 1)),
    "beit_cls": (BeitForImageClassification, lambda: BeitConfig(**VIT_SIZES, intermediate_size=64, use_mean_pooling=False, use_shared_relative_position_bias=True, num_labels=NUM_LABELS, **NO_DROPOUT), ("cls", 1)),
    "ijepa": (IJepaForImageClassification, lambda: IJepaConfig(**VIT_SIZES, intermediate_size=64, num_labels=NUM_LABELS, **NO_DROPOUT), ("patch_mean", 0)),
    "clip": (CLIPForImageClassification, lambda: _composite(CLIPConfig), ("patch_mean", 1)),
    "metaclip_2": (MetaClip2ForImageClassification, lambda: _composite(MetaClip2Config), ("patch_mean", 1)),
    "siglip": (SiglipForImageClassification, lambda: _composite(SiglipConfig), ("patch_mean", 0)),
    "swin": (SwinForImageClassification, _swin_config, ("patch_mean", 0)),
}
TRAINED_FAMILIES = [name for name in FAMILIES if name != "beit_cls"]


def tiny_family_model(name: str, attn_implementation: str = "eager", seed: int = 0, config=None):
    """A vanilla model with sharp attention and random relative position biases, in eval mode."""
    parent, make_config, _ = FAMILIES[name]
    config = config or make_config()
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = parent(config)
    sharpen_attention(model, seed=seed)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("relative_position_bias_table"):  # zeros at init: make the bias matter
                parameter.normal_(0.0, 1.0)
    return model.eval()


def _grid_batch(config, kind="binary", image_size=IMAGE_SIZE, seed=0):
    patch_size = (getattr(config, "vision_config", None) or config).patch_size
    grid = image_size // patch_size
    return mixed_batch(kind, num_patches=grid * grid, image_hw=(image_size, image_size), seed=seed)


def _mixing(batch):
    return {key: batch[key] for key in MIXING_KEYS}


def _reference_target(name, vanilla, batch):
    """`(B, C)` float64 target of the independent full label-vector reference, read out as the classifier pools."""
    if name == "swin":
        return reference_swin_labels(vanilla, batch, 0.1)
    pooling, num_prefix_tokens = FAMILIES[name][2]
    token_labels = reference_token_labels(vanilla, batch, num_prefix_tokens, 0.1)
    patch_mean = token_labels[:, num_prefix_tokens:].mean(dim=1)
    return {"cls": token_labels[:, 0], "patch_mean": patch_mean, "cls_and_patch_mean": (token_labels[:, 0] + patch_mean) / 2}[pooling]


def max_reference_difference(name, attn_implementation, kind="binary", attention_path="auto", image_size=IMAGE_SIZE):
    """(max |aligned target - reference target|, max |aligned_lam - mix_lam|)."""
    config = _swin_config(image_size) if name == "swin" else None
    vanilla = tiny_family_model(name, "eager", config=config)
    aligned = aligned_copy(vanilla)
    aligned.set_attn_implementation(attn_implementation)
    aligned.tl_align_attention_path = attention_path
    batch = _grid_batch(vanilla.config, kind, image_size)
    with torch.no_grad():
        aligned_lam = aligned(batch["pixel_values"], **_mixing(batch)).aligned_lam
    expected = _reference_target(name, vanilla, batch)
    rebuilt = mixed_soft_targets(batch["labels"], batch["mix_index"], aligned_lam, NUM_LABELS, 0.1)
    return (rebuilt.double() - expected).abs().max().item(), (aligned_lam - batch["mix_lam"]).abs().max().item()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_aligned_target_matches_full_label_vector_reference(name, attn_implementation):
    difference, moved = max_reference_difference(name, attn_implementation)
    assert difference < 1e-5
    assert moved > 1e-3  # alignment really moved the target away from the area share


@pytest.mark.parametrize("attention_path", ["eager", "value_channel", "explicit"])
@pytest.mark.parametrize("name", ["swin", "beit"])
def test_every_attention_path_sees_relative_position_bias_and_shift_masks(name, attention_path):
    difference, _ = max_reference_difference(name, "sdpa", "fractional", attention_path)
    assert difference < 1e-5


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_swin_padded_windows_and_odd_patch_merging_match_reference(attn_implementation):
    difference, moved = max_reference_difference("swin", attn_implementation, "fractional", image_size=28)
    assert difference < 1e-5 and moved > 1e-3


def test_swin_mixup_shares_stay_at_lambda_through_padding_and_merging():
    """Constant token weights are a fixed point: padding holds lambda too, so the target is the area target."""
    vanilla = tiny_family_model("swin", config=_swin_config(28))
    batch = _grid_batch(vanilla.config, "constant", image_size=28)
    with torch.no_grad():
        aligned_lam = aligned_copy(vanilla)(batch["pixel_values"], **_mixing(batch)).aligned_lam
    torch.testing.assert_close(aligned_lam, batch["mix_lam"], atol=1e-6, rtol=0)


def test_swin_gradient_checkpointing_applies_each_update_once():
    batch = _grid_batch(_swin_config(28), "fractional", image_size=28)
    results = []
    for checkpointing in (False, True):
        model = aligned_copy(tiny_family_model("swin", "sdpa", config=_swin_config(28))).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        out = model(batch["pixel_values"], labels=batch["labels"], **_mixing(batch))
        out.loss.backward()
        results.append((out.aligned_lam, model.swin.encoder.layers[0].blocks[1].attention.q_proj.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", TRAINED_FAMILIES)
def test_without_mixing_arguments_logits_and_loss_equal_parent_bit_for_bit(name, attn_implementation):
    vanilla = tiny_family_model(name, attn_implementation)
    aligned = aligned_copy(vanilla)
    batch = _grid_batch(vanilla.config)
    with torch.no_grad():
        expected = vanilla(batch["pixel_values"], labels=batch["labels"])
        out = aligned(batch["pixel_values"], labels=batch["labels"])
    assert torch.equal(out.logits, expected.logits)
    assert torch.equal(out.loss, expected.loss)


@pytest.mark.parametrize("name", TRAINED_FAMILIES)
def test_aligned_classes_add_no_weights_and_are_exported(name):
    vanilla = tiny_family_model(name)
    aligned_class = ALIGNED_CLASSES[type(vanilla)]
    assert getattr(tl_align_hf, aligned_class.__name__) is aligned_class
    assert aligned_class.__name__ == f"TLAlign{type(vanilla).__name__}"
    assert list(aligned_class(copy.deepcopy(vanilla.config)).state_dict()) == list(vanilla.state_dict())


@pytest.mark.parametrize("name", TRAINED_FAMILIES)
def test_saved_checkpoint_is_a_plain_transformers_checkpoint(name, tmp_path):
    """Loads in the parent class with no missing, unexpected or mismatched keys (test_modeling.py checks in a fresh
    process that no tl_align_hf import is needed; the checkpoints here hold nothing else)."""
    parent = FAMILIES[name][0]
    aligned = aligned_copy(tiny_family_model(name))
    aligned.save_pretrained(tmp_path)
    assert type(aligned) is ALIGNED_CLASSES[parent]  # the class is restored after saving
    config_text = (tmp_path / "config.json").read_text()
    assert json.loads(config_text)["architectures"] == [parent.__name__] and "tl_align" not in config_text
    loaded, info = parent.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    batch = _grid_batch(aligned.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(batch["pixel_values"]).logits, aligned(batch["pixel_values"]).logits)


@pytest.mark.parametrize("name", ["swin", "dinov2_registers", "siglip"])
def test_to_tl_align_on_auto_model_matches_aligned_class(name, tmp_path):
    vanilla = tiny_family_model(name, "sdpa")
    vanilla.save_pretrained(tmp_path)
    auto_model = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(auto_model) is FAMILIES[name][0]
    converted = to_tl_align(auto_model)
    assert converted is auto_model and type(converted) is ALIGNED_CLASSES[FAMILIES[name][0]]
    batch = _grid_batch(vanilla.config, "fractional")
    with torch.no_grad():
        expected = aligned_copy(vanilla)(batch["pixel_values"], **_mixing(batch)).aligned_lam
        torch.testing.assert_close(converted(batch["pixel_values"], **_mixing(batch)).aligned_lam, expected)
        assert torch.equal(converted(batch["pixel_values"]).logits, vanilla(batch["pixel_values"]).logits)


@pytest.mark.parametrize("name", TRAINED_FAMILIES)
def test_collator_from_model_gives_batches_the_model_takes(name):
    model = aligned_copy(tiny_family_model(name))
    collator = TLAlignCollator.from_model(model, mixing_method="cutmix", seed=0)
    batch = collator([image_dataset(4)[index] for index in range(4)])
    with torch.no_grad():
        out = model(batch["pixel_values"], **_mixing(batch))
    assert out.aligned_lam.shape == (4,)


def _parameters_with_gradient(model) -> set[str]:
    """Parameters that a plain classification loss reaches (CLIP's unused post-layernorm, mask tokens... do not)."""
    batch = _grid_batch(model.config, seed=1)
    model.zero_grad()
    model(batch["pixel_values"], labels=batch["labels"]).loss.backward()
    used = {name for name, parameter in model.named_parameters() if parameter.grad is not None and parameter.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    return used


@pytest.mark.parametrize("name", TRAINED_FAMILIES)
def test_train_with_family(name, tmp_path):
    model = tiny_family_model(name, "sdpa").train()
    used = _parameters_with_gradient(model)
    before = {parameter_name: parameter.detach().clone() for parameter_name, parameter in model.named_parameters()}
    trainer = TLAlignTrainer(model=model, args=make_args(tmp_path, max_steps=2, mixing_method="cutmix"), train_dataset=image_dataset(8))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) and "aligned_lam" in entry for entry in logs)
    assert type(trainer.model) is ALIGNED_CLASSES[FAMILIES[name][0]]
    unchanged = [parameter_name for parameter_name, parameter in trainer.model.named_parameters() if parameter_name in used and torch.equal(parameter.detach(), before[parameter_name])]
    assert unchanged == []


@pytest.mark.parametrize(
    "model",
    [
        lambda: PvtForImageClassification(PvtConfig(num_encoder_blocks=1, depths=[1], hidden_sizes=[8], num_attention_heads=[1], patch_sizes=[4], strides=[4], sequence_reduction_ratios=[2], mlp_ratios=[2])),
        lambda: ConvNextForImageClassification(ConvNextConfig(num_stages=1, hidden_sizes=[8], depths=[1])),
    ],
    ids=["pvt", "convnext"],
)
def test_raises_error_when_family_is_unsupported_and_lists_supported_classes(model):
    model = model()
    with pytest.raises(ValueError, match=rf"does not support {type(model).__name__} \(model_type='{model.config.model_type}'\)") as error:
        to_tl_align(model)
    assert all(parent.__name__ in str(error.value) for parent in ALIGNED_CLASSES)
    assert type(model).__name__ in ("PvtForImageClassification", "ConvNextForImageClassification")  # unchanged
