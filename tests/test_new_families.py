"""Swin V2, Data2Vec-Vision and SigLIP 2 (NaFlex patch sequences), and the refusals of the families TL-Align cannot
align.

The same guarantees as test_families.py: equivalence with the independent full label-vector reference on every
attention path, the parent's outputs bit for bit without mixing arguments, zero graph breaks under torch.compile,
plain transformers checkpoints, and training through `TLAlignTrainer`.
"""

import copy
import json

import datasets
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForImageClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    Data2VecVisionConfig,
    Data2VecVisionForImageClassification,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    PvtConfig,
    PvtForImageClassification,
    Siglip2Config,
    Siglip2ForImageClassification,
    Swinv2Config,
    Swinv2ForImageClassification,
    ViTConfig,
    ViTModel,
)

import tl_align_hf
from tl_align_hf import TLAlignTrainer, mixed_soft_targets, to_tl_align
from tl_align_hf.models import aligned_classes

from .reference import reference_swin_labels, reference_token_labels
from .test_trainer import image_dataset, make_args
from .tiny_models import IMAGE_SIZE, NUM_LABELS, aligned_copy, mixed_batch, sharpen_attention

ALIGNED_CLASSES = aligned_classes()  # every supported class -> its aligned class (timm's included)

MIXING_KEYS = ("mix_index", "token_weights", "mix_lam")
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
SIGLIP2_PATCH, SIGLIP2_MAX_PATCHES = 4, 36
SIGLIP2_SHAPES = [[6, 6], [4, 5], [3, 6], [5, 4]]  # each image's own patch grid (rows, columns)


def _swinv2_config(image_size=IMAGE_SIZE):
    # 24 px, patch 2, window 3: grids 12 -> 6 -> 3 with shifted windows; 28 px: grids 14 -> 7 -> 4, padded windows
    # and an odd grid merged.
    return Swinv2Config(
        image_size=image_size, patch_size=2, embed_dim=8, depths=[2, 2, 2], num_heads=[2, 2, 2], window_size=3,
        mlp_ratio=2.0, drop_path_rate=0.0, num_labels=NUM_LABELS, **NO_DROPOUT,
    )  # fmt: skip


def _data2vec_config(mean_pooling=True):
    # mean pooling with a relative position bias per layer, or the CLS read-out with the shared bias
    return Data2VecVisionConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=IMAGE_SIZE,
        patch_size=4, use_mean_pooling=mean_pooling, use_relative_position_bias=mean_pooling,
        use_shared_relative_position_bias=not mean_pooling, layer_scale_init_value=0.5, drop_path_rate=0.0,
        num_labels=NUM_LABELS,
        **NO_DROPOUT,
    )  # fmt: skip


def _siglip2_config():
    vision = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    vision.update(patch_size=SIGLIP2_PATCH, num_patches=SIGLIP2_MAX_PATCHES)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    return Siglip2Config(vision_config=vision, text_config=text, num_labels=NUM_LABELS)


# name: (parent class, config factory, attention implementations the parent accepts)
FAMILIES = {
    "swinv2": (Swinv2ForImageClassification, _swinv2_config, ("eager",)),
    "data2vec_vision": (Data2VecVisionForImageClassification, _data2vec_config, ("eager", "sdpa")),
    "data2vec_vision_cls": (Data2VecVisionForImageClassification, lambda: _data2vec_config(False), ("eager", "sdpa")),
    "siglip2": (Siglip2ForImageClassification, _siglip2_config, ("eager", "sdpa")),
}
FAMILY_BACKENDS = [(name, attn) for name, (_, _, backends) in FAMILIES.items() for attn in backends]
PATHS = ["eager", "value_channel", "explicit"]


def tiny_new_family_model(name, attn_implementation="eager", seed=0, config=None):
    """A vanilla model with sharp attention and random position biases, in eval mode. The backend is set in the
    config before building: Data2Vec-Vision picks its attention classes then."""
    parent, make_config, _ = FAMILIES[name]
    config = config or make_config()
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = parent(config)
    sharpen_attention(model, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith(("attention.query.weight", "attention.key.weight", "self.query.weight", "self.key.weight")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.6)
            if parameter_name.endswith("relative_position_bias_table"):  # zeros at init: make the bias matter
                parameter.normal_(0.0, 1.0, generator=generator)
    return model.eval()


def naflex_batch(kind="fractional", seed=0, shapes=SIGLIP2_SHAPES):
    """A SigLIP 2 batch of patch sequences padded to SIGLIP2_MAX_PATCHES, as Siglip2ImageProcessor returns them."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes)
    batch_size = len(shapes)
    mask = (torch.arange(SIGLIP2_MAX_PATCHES)[None] < spatial_shapes.prod(-1)[:, None]).long()
    pixel_values = torch.randn(batch_size, SIGLIP2_MAX_PATCHES, 3 * SIGLIP2_PATCH**2, generator=generator) * mask[..., None]
    if kind == "fractional":
        token_weights = torch.rand(batch_size, SIGLIP2_MAX_PATCHES, generator=generator)
    else:  # binary
        token_weights = (torch.rand(batch_size, SIGLIP2_MAX_PATCHES, generator=generator) > 0.4).float()
    return dict(
        pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=spatial_shapes,
        labels=torch.randint(0, NUM_LABELS, (batch_size,), generator=generator),
        mix_index=torch.randperm(batch_size, generator=generator), token_weights=token_weights,
        mix_lam=(token_weights * mask).sum(1) / mask.sum(1),
    )  # fmt: skip


def family_batch(name, kind="fractional", image_size=IMAGE_SIZE, seed=0):
    if name == "siglip2":
        return naflex_batch(kind, seed)
    patch_size = 2 if name == "swinv2" else 4
    grid = image_size // patch_size
    return mixed_batch(kind, num_patches=grid * grid, image_hw=(image_size, image_size), seed=seed)


def model_inputs(batch):
    """The parent's inputs of a batch: pixels, and SigLIP 2's mask and grids."""
    return {key: batch[key] for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes") if key in batch}


def _mixing(batch):
    return {key: batch[key] for key in MIXING_KEYS}


def _reference_target(name, vanilla_eager, batch):
    """`(B, C)` float64 target of the independent full label-vector reference, pooled as the classifier pools."""
    if name == "swinv2":
        return reference_swin_labels(vanilla_eager, batch, 0.1)
    if name == "siglip2":
        mask = batch["pixel_attention_mask"]
        extra = {"pixel_attention_mask": mask, "spatial_shapes": batch["spatial_shapes"]}
        token_labels = reference_token_labels(vanilla_eager, batch, 0, 0.1, **extra)
        return (token_labels * mask[..., None]).sum(1) / mask.sum(1)[:, None]
    token_labels = reference_token_labels(vanilla_eager, batch, 1, 0.1)
    return token_labels[:, 0] if name == "data2vec_vision_cls" else token_labels[:, 1:].mean(dim=1)


def max_reference_difference(name, attn_implementation, attention_path, kind="fractional", image_size=IMAGE_SIZE):
    """(max |aligned target - reference target|, max |aligned_lam - mix_lam|)."""
    config = _swinv2_config(image_size) if name == "swinv2" else None
    vanilla = tiny_new_family_model(name, attn_implementation, config=config)
    eager = tiny_new_family_model(name, "eager", config=copy.deepcopy(vanilla.config))  # the same weights
    aligned = aligned_copy(vanilla)
    aligned.tl_align_attention_path = attention_path
    batch = family_batch(name, kind, image_size)
    with torch.no_grad():
        aligned_lam = aligned(**model_inputs(batch), **_mixing(batch)).aligned_lam
    expected = _reference_target(name, eager, batch)
    rebuilt = mixed_soft_targets(batch["labels"], batch["mix_index"], aligned_lam, NUM_LABELS, 0.1)
    return (rebuilt.double() - expected).abs().max().item(), (aligned_lam - batch["mix_lam"]).abs().max().item()


@pytest.mark.parametrize("attention_path", PATHS)
@pytest.mark.parametrize(("name", "attn_implementation"), FAMILY_BACKENDS)
def test_aligned_target_matches_full_label_vector_reference(name, attn_implementation, attention_path, record_property):
    difference, moved = max_reference_difference(name, attn_implementation, attention_path)
    record_property("equivalence", (name, attn_implementation, attention_path, "fractional", difference, moved))  # the script's row
    assert difference < 1e-5
    assert moved > 1e-3  # alignment really moved the target away from the area share


@pytest.mark.parametrize("attention_path", PATHS)
def test_swinv2_padded_windows_and_odd_patch_merging_match_reference(attention_path, record_property):
    difference, moved = max_reference_difference("swinv2", "eager", attention_path, image_size=28)
    row = ("swinv2 (28 px: padded windows, odd merge)", "eager", attention_path, "fractional", difference, moved)
    record_property("equivalence", row)  # the script's row
    assert difference < 1e-5 and moved > 1e-3


def test_swinv2_attention_dropout_in_training_leaves_the_shares_alone():
    """The shares follow the probabilities before attention dropout: in a one-block model (where dropout cannot
    reach the probabilities through earlier blocks) training with dropout gives the eval shares."""
    config = _swinv2_config()
    config.depths, config.num_heads, config.attention_probs_dropout_prob = [1], [2], 0.5
    aligned = aligned_copy(tiny_new_family_model("swinv2", config=config))
    batch = family_batch("swinv2")
    with torch.no_grad():
        expected = aligned(**model_inputs(batch), **_mixing(batch)).aligned_lam
        trained = aligned.train()(**model_inputs(batch), **_mixing(batch))
    torch.testing.assert_close(trained.aligned_lam, expected, rtol=0, atol=1e-6)


def test_siglip2_padded_patches_change_nothing():
    """What token_weights hold at padded positions, and the padded pixels, leave the aligned share unchanged."""
    aligned = aligned_copy(tiny_new_family_model("siglip2", "sdpa"))
    batch = naflex_batch()
    padded = batch["pixel_attention_mask"] == 0
    changed = {**batch, "token_weights": torch.where(padded, 1.0 - batch["token_weights"], batch["token_weights"])}
    changed["pixel_values"] = batch["pixel_values"] + padded[..., None] * 5.0
    with torch.no_grad():
        expected = aligned(**model_inputs(batch), **_mixing(batch)).aligned_lam
        torch.testing.assert_close(aligned(**model_inputs(changed), **_mixing(changed)).aligned_lam, expected, rtol=0, atol=0)


def test_siglip2_raises_error_when_pixel_values_are_images_not_patch_sequences():
    aligned = aligned_copy(tiny_new_family_model("siglip2"))
    batch = mixed_batch("binary", num_patches=36)
    with pytest.raises(ValueError, match="patch sequences .* Siglip2ImageProcessor"):
        aligned(batch["pixel_values"], **_mixing(batch))


@pytest.mark.parametrize(("name", "attn_implementation"), FAMILY_BACKENDS)
def test_without_mixing_arguments_logits_and_loss_equal_parent_bit_for_bit(name, attn_implementation):
    vanilla = tiny_new_family_model(name, attn_implementation)
    aligned = aligned_copy(vanilla)
    batch = family_batch(name)
    for model in (vanilla, aligned):
        model.train()  # dropout-free configs: train mode checks the training-time code paths too
    with torch.no_grad():
        expected = vanilla(**model_inputs(batch), labels=batch["labels"])
        out = aligned(**model_inputs(batch), labels=batch["labels"])
    assert type(out) is type(expected)
    assert torch.equal(out.logits, expected.logits)
    assert torch.equal(out.loss, expected.loss)


@pytest.mark.parametrize(("name", "attn_implementation"), FAMILY_BACKENDS)
def test_aligned_mode_logits_equal_parent_logits(name, attn_implementation):
    """Mixing arguments change the target, not the prediction."""
    vanilla = tiny_new_family_model(name, attn_implementation)
    batch = family_batch(name)
    with torch.no_grad():
        out = aligned_copy(vanilla)(**model_inputs(batch), **_mixing(batch))
        torch.testing.assert_close(out.logits, vanilla(**model_inputs(batch)).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_aligned_classes_add_no_weights_and_are_exported(name):
    vanilla = tiny_new_family_model(name)
    aligned_class = ALIGNED_CLASSES[type(vanilla)]
    assert getattr(tl_align_hf, aligned_class.__name__) is aligned_class
    assert aligned_class.__name__ == f"TLAlign{type(vanilla).__name__}"
    assert list(aligned_class(copy.deepcopy(vanilla.config)).state_dict()) == list(vanilla.state_dict())


@pytest.mark.parametrize("name", ["swinv2", "data2vec_vision", "siglip2"])
def test_saved_checkpoint_is_a_plain_transformers_checkpoint(name, tmp_path):
    parent = FAMILIES[name][0]
    aligned = aligned_copy(tiny_new_family_model(name))
    aligned.save_pretrained(tmp_path)
    assert type(aligned) is ALIGNED_CLASSES[parent]
    config_text = (tmp_path / "config.json").read_text()
    assert json.loads(config_text)["architectures"] == [parent.__name__] and "tl_align" not in config_text
    loaded, info = parent.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    batch = family_batch(name)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**model_inputs(batch)).logits, aligned(**model_inputs(batch)).logits)


@pytest.mark.parametrize(("name", "attn_implementation"), [("swinv2", "eager"), ("data2vec_vision", "sdpa"), ("siglip2", "sdpa")])
def test_to_tl_align_on_auto_model_matches_aligned_class(name, attn_implementation, tmp_path):
    vanilla = tiny_new_family_model(name, attn_implementation)
    vanilla.save_pretrained(tmp_path)
    auto_model = AutoModelForImageClassification.from_pretrained(tmp_path, attn_implementation=attn_implementation).eval()
    assert type(auto_model) is FAMILIES[name][0]
    converted = to_tl_align(auto_model)
    assert converted is auto_model and type(converted) is ALIGNED_CLASSES[FAMILIES[name][0]]
    batch = family_batch(name)
    with torch.no_grad():
        expected = aligned_copy(vanilla)(**model_inputs(batch), **_mixing(batch)).aligned_lam
        torch.testing.assert_close(converted(**model_inputs(batch), **_mixing(batch)).aligned_lam, expected)
        assert torch.equal(converted(**model_inputs(batch)).logits, vanilla(**model_inputs(batch)).logits)


@pytest.mark.parametrize(("name", "attn_implementation"), FAMILY_BACKENDS)
def test_aligned_forward_compiles_without_graph_breaks(name, attn_implementation):
    """SigLIP 2's own input checks (`torch_compilable_check` in its position-embedding resize) read a tensor value,
    which breaks the parent's graph too unless dynamo captures scalar outputs; with that, neither breaks."""
    vanilla = tiny_new_family_model(name, attn_implementation).train()
    batch = family_batch(name)
    dynamo_settings = {"capture_scalar_outputs": True} if name == "siglip2" else {}
    explanations = []
    with torch._dynamo.config.patch(**dynamo_settings):
        for model, mixing in ((vanilla, {}), (aligned_copy(vanilla).train(), _mixing(batch))):
            torch._dynamo.reset()
            explanations.append(torch._dynamo.explain(model)(**model_inputs(batch), **mixing, labels=batch["labels"]))
    torch._dynamo.reset()
    parent, aligned = explanations
    assert parent.graph_break_count == 0
    assert aligned.graph_break_count == 0, [str(reason.reason) for reason in aligned.break_reasons]
    assert aligned.graph_count == 1


def _parameters_with_gradient(model, batch) -> set[str]:
    model.zero_grad()
    model(**model_inputs(batch), labels=batch["labels"]).loss.backward()
    used = {name for name, parameter in model.named_parameters() if parameter.grad is not None and parameter.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    return used


@pytest.mark.parametrize(("name", "attn_implementation"), [("swinv2", "eager"), ("data2vec_vision", "sdpa")])
def test_train_with_family(name, attn_implementation, tmp_path):
    model = tiny_new_family_model(name, attn_implementation).train()
    used = _parameters_with_gradient(model, family_batch(name, seed=1))
    before = {parameter_name: parameter.detach().clone() for parameter_name, parameter in model.named_parameters()}
    args = make_args(tmp_path, max_steps=2, mixing_method="cutmix")
    trainer = TLAlignTrainer(model=model, args=args, train_dataset=image_dataset(8))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) and "aligned_lam" in entry for entry in logs)
    assert type(trainer.model) is ALIGNED_CLASSES[FAMILIES[name][0]]
    unchanged = [key for key, parameter in trainer.model.named_parameters() if key in used and torch.equal(parameter.detach(), before[key])]
    assert unchanged == []


@pytest.mark.parametrize(("name", "attn_implementation"), [("swinv2", "eager"), ("data2vec_vision", "eager"), ("data2vec_vision", "sdpa")])
def test_gradient_checkpointing_applies_each_update_once(name, attn_implementation):
    """The recomputed blocks run the parent's attention; the aligned forward matches them (explicit path)."""
    config = _swinv2_config(28) if name == "swinv2" else None
    batch = family_batch(name, image_size=28 if name == "swinv2" else IMAGE_SIZE)
    results = []
    for checkpointing in (False, True):
        model = aligned_copy(tiny_new_family_model(name, attn_implementation, config=copy.deepcopy(config))).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        out = model(**model_inputs(batch), labels=batch["labels"], **_mixing(batch))
        out.loss.backward()
        query_weight = next(parameter for key, parameter in model.named_parameters() if key.endswith("query.weight"))
        results.append((out.aligned_lam, query_weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1])


# ------------------------------------------------------------------------------------------------------ refusals
def _tiny_vit_config(config_class, **extra):
    return config_class(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32, **extra)


@pytest.mark.parametrize(
    ("make_model", "reason"),
    [
        (lambda: ConvNextForImageClassification(ConvNextConfig(num_stages=1, hidden_sizes=[8], depths=[1])), "a convolutional network: it has no attention"),
        (lambda: PvtForImageClassification(PvtConfig(num_encoder_blocks=1, depths=[1], hidden_sizes=[8], num_attention_heads=[1], patch_sizes=[4], strides=[4], sequence_reduction_ratios=[2], mlp_ratios=[2])), "spatial-reduction attention.*Nearest supported: Swin or Swin V2"),
        (lambda: DINOv3ViTModel(_tiny_vit_config(DINOv3ViTConfig)), "transformers has no DINOv3 image-classification class.*TimmWrapperForImageClassification of `vit_small_patch16_dinov3`.*timm/vit_base_patch16_dinov3.lvd1689m"),
        (lambda: ViTModel(_tiny_vit_config(ViTConfig)), "TL-Align trains image classifiers. Load the checkpoint with AutoModelForImageClassification \\(ViTForImageClassification\\)"),
    ],
    ids=["convnext", "pvt", "dinov3_vit", "vit_without_head"],
)
def test_raises_error_naming_the_familys_own_obstacle_and_the_nearest_alternative(make_model, reason):
    model = make_model()
    model_class = type(model)
    with pytest.raises(ValueError, match=rf"does not support {model_class.__name__} \(model_type='{model.config.model_type}'\): {reason}") as error:
        to_tl_align(model)
    assert all(parent.__name__ in str(error.value) for parent in ALIGNED_CLASSES)
    assert type(model) is model_class  # unchanged


# ---------------------------------------------------------------------------------- SigLIP 2 NaFlex mixing
def naflex_examples(sizes=((24, 24), (16, 30), (40, 12), (20, 28)), seed=0):
    """Examples as a `datasets` pipeline with Siglip2ImageProcessor makes them: one padded patch sequence each."""
    from PIL import Image
    from transformers import Siglip2ImageProcessor

    processor = Siglip2ImageProcessor(patch_size=SIGLIP2_PATCH, max_num_patches=SIGLIP2_MAX_PATCHES)
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for height, width in sizes]
    processed = processor(images, return_tensors="pt")
    return [
        {**{key: processed[key][index] for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}, "label": index % NUM_LABELS}
        for index in range(len(sizes))
    ]


def _grid_of(sequence, grid):
    """`(N, D)` patch sequence -> `(rows, columns, D)` grid of the image's real patches."""
    rows, columns = grid
    return sequence[: rows * columns].view(rows, columns, -1)


@pytest.mark.parametrize("mix_mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("mixing_method", ["token_cutmix", "token_mix", "mixup"])
def test_naflex_mixing_takes_each_patch_from_the_same_grid_position_of_the_partner(mixing_method, mix_mode):
    """Independent check of the mixed patches against the token weights, on each image's own grid."""
    examples = naflex_examples()
    model = aligned_copy(tiny_new_family_model("siglip2"))
    extra = {"mixup_alpha": 1.0} if mixing_method == "mixup" else {}
    batches = [
        tl_align_hf.TLAlignCollator.from_model(model, mixing_method=mixing_method, mix_mode=mix_mode, seed=seed, **extra)(examples)
        for seed in range(4)
    ]
    mixed_somewhere = False
    for batch in batches:
        original = torch.stack([example["pixel_values"] for example in examples])
        grids = batch["spatial_shapes"].tolist()
        mask = batch["pixel_attention_mask"].bool()
        assert torch.equal(batch["pixel_values"][~mask], original[~mask])  # padding untouched
        assert torch.all(batch["token_weights"][~mask] == 1)
        torch.testing.assert_close(batch["mix_lam"], (batch["token_weights"] * mask).sum(1) / mask.sum(1))
        for index, partner in enumerate(batch["mix_index"].tolist()):
            own_grid, partner_grid = _grid_of(original[index], grids[index]), _grid_of(original[partner], grids[partner])
            weights = _grid_of(batch["token_weights"][index, :, None], grids[index])
            rows, columns = min(grids[index][0], grids[partner][0]), min(grids[index][1], grids[partner][1])
            expected = own_grid.clone()
            shared = weights[:rows, :columns]
            expected[:rows, :columns] = shared * own_grid[:rows, :columns] + (1 - shared) * partner_grid[:rows, :columns]
            assert torch.all(weights[rows:] == 1) and torch.all(weights[:, columns:] == 1)
            torch.testing.assert_close(_grid_of(batch["pixel_values"][index], grids[index]), expected, rtol=0, atol=1e-6)
            mixed_somewhere |= bool((shared < 1).any())
            if mix_mode == "pair" and partner != index:  # a pair shares its region and its cut
                partner_weights = _grid_of(batch["token_weights"][partner, :, None], grids[partner])
                assert torch.equal(partner_weights[:rows, :columns], shared)
    assert mixed_somewhere


def test_raises_error_when_naflex_batch_is_mixed_with_pixel_boxes():
    model = aligned_copy(tiny_new_family_model("siglip2"))
    collator = tl_align_hf.TLAlignCollator.from_model(model, mixing_method="cutmix", seed=0)
    with pytest.raises(ValueError, match="mixing_method='cutmix' draws pixel boxes.*'token_cutmix'"):
        collator(naflex_examples())


def test_raises_error_when_spatial_shapes_do_not_match_the_mask():
    examples = naflex_examples()
    examples[1]["spatial_shapes"] = torch.tensor([3, 3])
    collator = tl_align_hf.TLAlignCollator.from_model(aligned_copy(tiny_new_family_model("siglip2")), seed=0)
    with pytest.raises(ValueError, match=r"Image 1: spatial_shapes \(3, 3\)"):
        collator(examples)


def test_raises_error_when_patch_sequences_come_from_another_patch_size():
    collator = tl_align_hf.TLAlignCollator.from_model(aligned_copy(tiny_new_family_model("siglip2")), seed=0)
    examples = [{**example, "pixel_values": example["pixel_values"][:, :12]} for example in naflex_examples()]
    with pytest.raises(ValueError, match="Each patch holds 12 values but the model's patches hold 48"):
        collator(examples)


def test_train_with_siglip2_naflex(tmp_path):
    """TLAlignTrainer builds the collator, mixes the NaFlex examples and trains; evaluation collates them unmixed."""
    model = tiny_new_family_model("siglip2", "sdpa").train()
    examples = naflex_examples(sizes=[(24, 24), (16, 30), (40, 12), (20, 28)] * 2)
    dataset = datasets.Dataset.from_list([{key: value.numpy() for key, value in example.items() if key != "label"} | {"label": example["label"]} for example in examples]).with_format("torch")
    batch = tl_align_hf.TLAlignCollator.from_model(model, seed=1).collate_unmixed(examples[:4])
    used = _parameters_with_gradient(model, batch)
    before = {key: parameter.detach().clone() for key, parameter in model.named_parameters()}
    trainer = TLAlignTrainer(model=model, args=make_args(tmp_path, max_steps=2), train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(np.isfinite(entry["loss"]) and "aligned_lam" in entry for entry in logs)
    unchanged = [key for key, parameter in trainer.model.named_parameters() if key in used and torch.equal(parameter.detach(), before[key])]
    assert unchanged == []
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"]) and 0.0 <= metrics["eval_accuracy"] <= metrics["eval_top5_accuracy"] <= 1.0


def test_every_image_classification_model_type_is_supported_or_refused_with_its_own_reason():
    """A model type transformers adds to AutoModelForImageClassification fails here until it is classified."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    from tl_align_hf.models import UNSUPPORTED_FAMILIES

    supported = {aligned_class.config_class.model_type for aligned_class in ALIGNED_CLASSES}
    unclassified = [name for name in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES if name not in supported | set(UNSUPPORTED_FAMILIES)]
    assert unclassified == []
    assert not supported & set(UNSUPPORTED_FAMILIES)
