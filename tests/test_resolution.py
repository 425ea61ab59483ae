"""Training at another image size than the config's: `interpolate_pos_encoding` (a 224 checkpoint fine-tuned at
384, the standard ViT practice), and the families that take any size by themselves (DINOv2, DINOv2 with registers,
timm ViTs built with `dynamic_img_size`, DINOv2's included)."""

import datasets
import numpy as np
import pytest
import torch
from transformers import (
    BeitForImageClassification,
    CLIPForImageClassification,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    IJepaForImageClassification,
    MetaClip2ForImageClassification,
    SiglipForImageClassification,
    SwinForImageClassification,
    ViTForImageClassification,
    ViTMSNForImageClassification,
)

from tl_align_hf import TLAlignConfig, TLAlignTrainer, mixed_soft_targets
from tl_align_hf.support.transforms import default_image_processor

from .reference import reference_cls_labels, reference_token_labels
from .test_trainer import assert_every_parameter_changed, make_args, tiny_model_of
from .tiny_models import NUM_LABELS, sharpen_attention, tiny_model

CHECKPOINT_SIZE, TRAINING_SIZE = 16, 24
# every class whose forward takes `interpolate_pos_encoding` (CLIP and MetaCLIP 2 pass it to their vision tower)
INTERPOLATING_CLASSES = [
    ViTForImageClassification, DeiTForImageClassification, DeiTForImageClassificationWithTeacher,
    ViTMSNForImageClassification, BeitForImageClassification, IJepaForImageClassification, CLIPForImageClassification,
    MetaClip2ForImageClassification, SiglipForImageClassification, SwinForImageClassification,
]  # fmt: skip


def images_of_size(size: int, num_examples: int = 16, seed: int = 0, with_labels: bool = True) -> datasets.Dataset:
    """CHW float images of `size` px with class patterns, and integer labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num_examples) % NUM_LABELS
    images = rng.normal(0, 0.3, (num_examples, 3, size, size)).astype(np.float32)
    for image, label in zip(images, labels):
        image[label % 3, : 1 + label, :] += 1.0
    columns = {"pixel_values": list(images), **({"label": labels.tolist()} if with_labels else {})}
    return datasets.Dataset.from_dict(columns).with_format("torch")


def _stacked(dataset):
    pixel_values = torch.stack([example["pixel_values"] for example in dataset])
    return pixel_values, torch.tensor([int(example["label"]) for example in dataset])


@pytest.mark.parametrize("parent_class, num_prefix_tokens", [(ViTForImageClassification, 1), (DeiTForImageClassification, 2)])
def test_train_a_checkpoint_at_a_higher_resolution_with_interpolate_pos_encoding(tmp_path, parent_class, num_prefix_tokens):
    model = tiny_model(parent_class, "sdpa", image_size=CHECKPOINT_SIZE).train()
    train_dataset, eval_dataset = images_of_size(TRAINING_SIZE), images_of_size(TRAINING_SIZE, 8, seed=1)
    refused = TLAlignTrainer(model=model, args=make_args(tmp_path, max_steps=1), train_dataset=train_dataset)
    with pytest.raises(ValueError, match=r"pixel_values are 24x24 but image_size is 16x16.*set interpolate_pos_encoding=True"):
        refused.train()

    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    args = make_args(tmp_path, interpolate_pos_encoding=True, mixing_method="cutmix")
    trainer = TLAlignTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset)
    trainer.train()
    assert_every_parameter_changed(trainer.model, before)
    assert all("aligned_lam" in entry for entry in trainer.state.log_history if "loss" in entry)

    pixel_values, labels = _stacked(eval_dataset)
    with torch.no_grad():
        logits = trainer.model.eval()(pixel_values, interpolate_pos_encoding=True).logits
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    unlabelled = images_of_size(TRAINING_SIZE, 8, seed=1, with_labels=False)  # Trainer calls the model itself then
    np.testing.assert_allclose(trainer.predict(unlabelled).predictions, logits.numpy(), rtol=1e-5, atol=1e-6)

    # the aligned target at the new size equals the full label-vector reference
    batch = trainer.data_collator([train_dataset[index] for index in range(6)])
    mixing = {key: batch[key] for key in ("mix_index", "token_weights", "mix_lam")}
    assert batch["token_weights"].shape == (6, (TRAINING_SIZE // 4) ** 2)
    with torch.no_grad():
        aligned_lam = trainer.model(batch["pixel_values"], interpolate_pos_encoding=True, **mixing).aligned_lam
    vanilla = parent_class(model.config)
    vanilla.load_state_dict(trainer.model.state_dict())
    vanilla.set_attn_implementation("eager")
    expected = reference_cls_labels(vanilla.eval(), batch, num_prefix_tokens, 0.1, interpolate_pos_encoding=True)
    rebuilt = mixed_soft_targets(batch["labels"], batch["mix_index"], aligned_lam, NUM_LABELS, 0.1)
    assert (rebuilt.double() - expected).abs().max().item() < 1e-5
    assert (aligned_lam - batch["mix_lam"]).abs().max().item() > 1e-3


@pytest.mark.parametrize("parent_class", INTERPOLATING_CLASSES, ids=lambda parent_class: parent_class.__name__)
def test_every_family_with_the_option_trains_and_evaluates_at_a_higher_resolution(tmp_path, parent_class):
    model = tiny_model_of(parent_class, image_size=CHECKPOINT_SIZE).train()
    eval_dataset = images_of_size(TRAINING_SIZE, 8, seed=1)
    args = make_args(tmp_path, max_steps=1, interpolate_pos_encoding=True, mixing_method="cutmix")
    trainer = TLAlignTrainer(model=model, args=args, train_dataset=images_of_size(TRAINING_SIZE), eval_dataset=eval_dataset)
    trainer.train()
    assert any("aligned_lam" in entry for entry in trainer.state.log_history)
    pixel_values, labels = _stacked(eval_dataset)
    with torch.no_grad():
        logits = trainer.model.eval()(pixel_values, interpolate_pos_encoding=True).logits
    assert trainer.evaluate()["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def _tiny_dinov2(config_class, **overrides):
    config = config_class(image_size=40, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          mlp_ratio=2, num_labels=NUM_LABELS, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, **overrides)  # fmt: skip
    torch.manual_seed(0)
    parent = Dinov2ForImageClassification if config_class is Dinov2Config else Dinov2WithRegistersForImageClassification
    model = parent(config)
    sharpen_attention(model)
    return model


@pytest.mark.parametrize("size", [16, 24])
@pytest.mark.parametrize(
    "config_class, overrides, num_prefix_tokens",
    [(Dinov2Config, {}, 1), (Dinov2WithRegistersConfig, {"num_register_tokens": 2}, 3)],
    ids=["dinov2", "dinov2_registers"],
)
def test_dinov2_trains_at_the_size_its_processor_gives(tmp_path, config_class, overrides, num_prefix_tokens, size):
    """Hub DINOv2 configs say image_size=518 while their processors crop 224: the model interpolates by itself."""
    model = _tiny_dinov2(config_class, **overrides).train()
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    args = make_args(tmp_path, mixing_method="cutmix")  # no flag needed
    trainer = TLAlignTrainer(model=model, args=args, train_dataset=images_of_size(size), eval_dataset=images_of_size(size, 8, 1))
    trainer.train()
    changed = [name for name, parameter in trainer.model.named_parameters() if not torch.equal(parameter.detach(), before[name])]
    assert any(name.endswith("embeddings.position_embeddings") for name in changed) and "classifier.weight" in changed
    assert {"eval_loss", "eval_accuracy"} <= set(trainer.evaluate())

    batch = trainer.data_collator([images_of_size(size)[index] for index in range(6)])
    with torch.no_grad():
        aligned_lam = trainer.model.eval()(batch["pixel_values"], **{key: batch[key] for key in ("mix_index", "token_weights", "mix_lam")}).aligned_lam
    vanilla = type(model).tl_align_parent(model.config)
    vanilla.load_state_dict(trainer.model.state_dict())
    vanilla.set_attn_implementation("eager")
    token_labels = reference_token_labels(vanilla.eval(), batch, num_prefix_tokens, 0.1)
    expected = (token_labels[:, 0] + token_labels[:, num_prefix_tokens:].mean(dim=1)) / 2
    rebuilt = mixed_soft_targets(batch["labels"], batch["mix_index"], aligned_lam, NUM_LABELS, 0.1)
    assert (rebuilt.double() - expected).abs().max().item() < 1e-5


def test_timm_dinov2_with_dynamic_image_size_trains_at_its_processor_size(tmp_path):
    pytest.importorskip("timm")
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    model_args = dict(img_size=40, patch_size=4, embed_dim=32, depth=2, num_heads=4, dynamic_img_size=True)
    config = TimmWrapperConfig(architecture="vit_small_patch14_dinov2", num_labels=NUM_LABELS, model_args=model_args)
    model = TimmWrapperForImageClassification(config).train()  # timm's DINOv2 ViT (layer scale), tiny
    trainer = TLAlignTrainer(model=model, args=make_args(tmp_path, max_steps=2), train_dataset=images_of_size(24))
    assert trainer.data_collator.mixer.image_size is None
    trainer.train()
    assert any("aligned_lam" in entry for entry in trainer.state.log_history)


def test_raises_error_when_interpolate_pos_encoding_is_set_for_a_model_of_fixed_size_that_cannot_take_it(tmp_path):
    timm_tests = pytest.importorskip("tests.test_timm_family")
    model = timm_tests.tiny_timm_model("vit")
    with pytest.raises(ValueError, match=r"interpolate_pos_encoding=True .*model_args=\{'dynamic_img_size': True\}"):
        TLAlignTrainer(model=model, args=make_args(tmp_path, interpolate_pos_encoding=True))


def test_config_accepts_interpolate_pos_encoding_on_the_command_line():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(TLAlignConfig).parse_args_into_dataclasses(["--output_dir", "x", "--interpolate_pos_encoding"])
    assert args.interpolate_pos_encoding is True


def test_example_script_trains_at_the_image_processor_size(digits, tiny_checkpoint, tmp_path):
    """A 16 px checkpoint with a 24 px image processor: the script sets interpolate_pos_encoding itself."""
    from .test_examples import example, quick_args

    processor_folder = tmp_path / "processor"
    default_image_processor(TRAINING_SIZE).save_pretrained(processor_folder)
    argv = quick_args(digits, tmp_path / "run", "--model_name_or_path", str(tiny_checkpoint),
                      "--image_processor_name", str(processor_folder))  # fmt: skip
    metrics = example.main(argv)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["train_loss"] > 0


def test_no_trainer_script_trains_at_the_image_processor_size(digits, tmp_path):
    """A 16 px checkpoint saved with a 24 px image processor: the Accelerate example interpolates by itself too."""
    from .test_no_trainer import no_trainer, run_arguments

    checkpoint = tmp_path / "checkpoint"
    tiny_model(ViTForImageClassification, "sdpa", image_size=CHECKPOINT_SIZE, num_hidden_layers=2).save_pretrained(checkpoint)
    default_image_processor(TRAINING_SIZE).save_pretrained(checkpoint)
    options = {"--max_train_steps": "2", "--mixing_method": "cutmix", "--max_eval_samples": "16"}
    results = no_trainer.main(run_arguments(digits, checkpoint, tmp_path / "run", options) + ["--cpu"])
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and results["eval_samples"] == 16
