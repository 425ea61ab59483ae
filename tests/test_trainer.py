import copy

import datasets
import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments, ViTForImageClassification

from tl_align_hf import TLAlignConfig, TLAlignTrainer, TLAlignViTForImageClassification
from tl_align_hf.losses import mixed_soft_targets
from tl_align_hf.models import aligned_classes

from .tiny_models import NUM_LABELS, tiny_config, tiny_model

ALIGNED_CLASSES = aligned_classes()  # every supported class -> its aligned class (timm's included)

IMAGE = 24


def image_dataset(num_examples: int = 24, seed: int = 0) -> datasets.Dataset:
    """Examples prepared like `datasets.map` output: CHW float arrays and integer labels with class patterns."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num_examples) % NUM_LABELS
    images = rng.normal(0, 0.3, (num_examples, 3, IMAGE, IMAGE)).astype(np.float32)
    for image, label in zip(images, labels):
        image[label % 3, : 2 + 2 * label, :] += 1.0
    return datasets.Dataset.from_dict({"pixel_values": list(images), "label": labels.tolist()}).with_format("torch")


def make_args(tmp_path, **overrides) -> TLAlignConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
        use_cpu=True,
    )
    values.update(overrides)
    return TLAlignConfig(**values)


def trained(tmp_path, model=None, **overrides):
    model = model or tiny_model(ViTForImageClassification, "sdpa").train()
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainer = TLAlignTrainer(model=model, args=make_args(tmp_path, **overrides), train_dataset=image_dataset())
    trainer.train()
    return trainer, before


def assert_every_parameter_changed(model, before):
    unchanged = [name for name, parameter in model.named_parameters() if torch.equal(parameter.detach(), before[name])]
    assert unchanged == []


@pytest.mark.parametrize(
    "mixing",
    [
        dict(mixing_method="cutmix"),
        dict(mixing_method="token_cutmix"),
        dict(mixing_method="mixup", mixup_alpha=0.8),
        dict(mixing_method="token_mix"),
        dict(mixing_method="cutmix", mixup_alpha=0.8, switch_prob=0.5),
    ],
    ids=["cutmix", "token_cutmix", "mixup", "token_mix", "cutmix_or_mixup"],
)
def test_train_with_method(tmp_path, mixing):
    trainer, before = trained(tmp_path, **mixing)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(np.isfinite(entry["loss"]) for entry in logs)
    assert all({"mix_lam", "aligned_lam", "alignment_gap"} <= set(entry) for entry in logs)
    assert isinstance(trainer.model, TLAlignViTForImageClassification)
    assert_every_parameter_changed(trainer.model, before)


def test_train_with_tl_align_false_logs_only_area_share(tmp_path):
    trainer, before = trained(tmp_path, tl_align=False, mixing_method="cutmix")
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all("mix_lam" in entry and "aligned_lam" not in entry for entry in logs)
    assert_every_parameter_changed(trainer.model, before)


def test_alignment_gap_is_reported_and_positive_for_cutmix(tmp_path):
    trainer, _ = trained(tmp_path, mixing_method="cutmix")
    gaps = [entry["alignment_gap"] for entry in trainer.state.log_history if "alignment_gap" in entry]
    assert max(gaps) > 1e-4


def test_evaluate_is_unmixed_with_plain_cross_entropy_and_top5(tmp_path):
    model = tiny_model(ViTForImageClassification, "sdpa")
    eval_dataset = image_dataset(20, seed=1)
    trainer = TLAlignTrainer(model=model, args=make_args(tmp_path), eval_dataset=eval_dataset)
    metrics = trainer.evaluate()
    pixel_values = torch.stack([example["pixel_values"] for example in eval_dataset])
    labels = torch.tensor([int(example["label"]) for example in eval_dataset])
    with torch.no_grad():
        logits = model.eval()(pixel_values).logits
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert metrics["eval_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["eval_accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    top5 = (logits.topk(5, -1).indices == labels[:, None]).any(-1).float().mean().item()
    assert metrics["eval_top5_accuracy"] == pytest.approx(top5)
    predictions = trainer.predict(eval_dataset)
    np.testing.assert_allclose(predictions.predictions, logits.numpy(), rtol=1e-5, atol=1e-6)


def _half_batches():
    generator = torch.Generator().manual_seed(3)
    halves = []
    for _ in range(2):
        token_weights = (torch.rand(4, 36, generator=generator) > 0.5).float()
        halves.append(
            dict(
                pixel_values=torch.randn(4, 3, IMAGE, IMAGE, generator=generator),
                labels=torch.randint(0, NUM_LABELS, (4,), generator=generator),
                mix_index=torch.randperm(4, generator=generator),
                token_weights=token_weights,
                mix_lam=token_weights.mean(1),
            )
        )
    return halves


def _gradients(trainer):
    return {name: parameter.grad.clone() for name, parameter in trainer.model.named_parameters()}


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    halves = _half_batches()
    full = {key: torch.cat([halves[0][key], halves[1][key]]) for key in halves[0]}
    full["mix_index"] = torch.cat([halves[0]["mix_index"], halves[1]["mix_index"] + 4])

    model = tiny_model(ViTForImageClassification, "sdpa").train()
    trainer = TLAlignTrainer(model=copy.deepcopy(model), args=make_args(tmp_path))
    trainer.model.train()
    for half in halves:
        trainer.compute_loss(trainer.model, half, num_items_in_batch=torch.tensor(8)).backward()
    accumulated = _gradients(trainer)

    single = TLAlignTrainer(model=copy.deepcopy(model), args=make_args(tmp_path))
    single.model.train()
    single.compute_loss(single.model, full).backward()
    expected = _gradients(single)
    for name in expected:
        torch.testing.assert_close(accumulated[name], expected[name], atol=1e-6, rtol=1e-4)


def test_training_loss_uses_aligned_target_with_label_smoothing(tmp_path):
    batch = _half_batches()[0]
    model = tiny_model(ViTForImageClassification, "sdpa").train()
    trainer = TLAlignTrainer(model=model, args=make_args(tmp_path, label_smoothing=0.2))
    trainer.model.train()
    loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    targets = mixed_soft_targets(batch["labels"], batch["mix_index"], outputs.aligned_lam, NUM_LABELS, 0.2)
    expected = -(targets * torch.log_softmax(outputs.logits, -1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(outputs.aligned_lam, batch["mix_lam"])


def test_saved_model_is_plain_and_keeps_integer_label_config(tmp_path):
    trainer, _ = trained(tmp_path)
    trainer.save_model(str(tmp_path / "final"))
    loaded, info = ViTForImageClassification.from_pretrained(str(tmp_path / "final"), output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert loaded.config.architectures == ["ViTForImageClassification"]
    assert loaded.config.problem_type is None
    for name, parameter in loaded.state_dict().items():
        torch.testing.assert_close(parameter, trainer.model.state_dict()[name])


def _final_weights(trainer):
    return {name: parameter.detach().clone() for name, parameter in trainer.model.state_dict().items()}


@pytest.mark.parametrize(
    "num_workers, accumulation, mode",
    [(0, 1, "batch"), (2, 1, "pair"), (2, 2, "elem"), (0, 2, "batch")],
    ids=["workers0-batch", "workers2-pair", "workers2-accumulation2-elem", "workers0-accumulation2-batch"],
)
def test_resume_from_checkpoint_gives_the_weights_of_an_uninterrupted_run(tmp_path, num_workers, accumulation, mode):
    """The mixing draws are a function of (seed, rank, epoch, batch): nothing to restore, even with DataLoader workers."""
    # The checkpoint falls inside an epoch (6 batches per epoch), so the resumed run skips batches of that epoch.
    max_steps, save_steps = (8, 3) if accumulation == 1 else (5, 4)
    overrides = dict(
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=save_steps,
        mixing_method="cutmix",
        mixup_alpha=0.5,
        mix_mode=mode,
        gradient_accumulation_steps=accumulation,
        dataloader_num_workers=num_workers,
    )
    full, _ = trained(tmp_path / "full", **overrides)
    expected = _final_weights(full)
    checkpoint = tmp_path / "full" / "out" / f"checkpoint-{save_steps}"
    assert (checkpoint / "model.safetensors").exists()
    assert not list(checkpoint.glob("*collator*")), "no mixing state needs saving"

    fresh = tiny_model(ViTForImageClassification, "sdpa", seed=1)  # different init: everything must be restored
    resumed = TLAlignTrainer(
        model=fresh, args=make_args(tmp_path / "resumed", **overrides), train_dataset=image_dataset()
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    actual = _final_weights(resumed)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=0, rtol=0, msg=name)


def test_load_best_model_at_end_restores_every_layer(tmp_path):
    overrides = dict(
        max_steps=4,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
    )
    model = tiny_model(ViTForImageClassification, "sdpa").train()
    trainer = TLAlignTrainer(
        model=model,
        args=make_args(tmp_path, **overrides),
        train_dataset=image_dataset(),
        eval_dataset=image_dataset(8, 1),
    )
    trainer.train()
    best = ViTForImageClassification.from_pretrained(trainer.state.best_model_checkpoint)
    for name, parameter in best.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[name], parameter, atol=0, rtol=0, msg=name)


def test_swap_trainer_in_an_hf_style_script(tmp_path):
    """The transformers example's shape, with only `Trainer` swapped for `TLAlignTrainer`."""
    model = ViTForImageClassification(tiny_config("vit", "sdpa"))
    training_args = TLAlignConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
    )
    trainer = TLAlignTrainer(
        model=model, args=training_args, train_dataset=image_dataset(), eval_dataset=image_dataset(8, 1)
    )
    train_result = trainer.train()
    trainer.log_metrics("train", train_result.metrics)
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_accuracy", "eval_top5_accuracy"} <= set(metrics)
    assert any("aligned_lam" in entry for entry in trainer.state.log_history)


def _image_folder_dataset(num_examples: int = 12) -> datasets.Dataset:
    """Raw PIL images and labels with a `with_transform` transform, as the example scripts prepare them."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (IMAGE, IMAGE, 3), dtype=np.uint8)) for _ in range(num_examples)]
    raw = datasets.Dataset.from_dict({"image": images, "label": [i % NUM_LABELS for i in range(num_examples)]})
    raw = raw.cast_column("image", datasets.Image())

    def transform(batch):
        pixels = [torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1) for image in batch["image"]]
        return {"pixel_values": pixels, "label": batch["label"]}

    return raw.with_transform(transform)


def test_train_with_plain_training_arguments(tmp_path, caplog):
    """A plain TrainingArguments (remove_unused_columns=True by default) trains with the default mixing, said once."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to="none",
        use_cpu=True, logging_steps=1, seed=0, log_level="info",
    )
    model = tiny_model(ViTForImageClassification, "sdpa").train()
    with caplog.at_level("INFO", logger="tl_align_hf"):
        trainer = TLAlignTrainer(model=model, args=args, train_dataset=_image_folder_dataset())
        trainer.train()
    assert isinstance(trainer.args, TLAlignConfig) and trainer.args.learning_rate == 1e-2
    assert trainer.args.mixing_method == "token_cutmix" and trainer.args.tl_align
    assert any("plain TrainingArguments" in record.message and "token_cutmix" in record.message for record in caplog.records)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all("aligned_lam" in entry for entry in logs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mixing_method="cutout"), r"`mixing_method` \(--mixing_method\) must be one of"),
        (dict(mix_mode="batches"), r"`mix_mode` \(--mix_mode\) must be one of"),
        (dict(label_smoothing=1.5), r"`label_smoothing` \(--label_smoothing\) must be in \[0, 1\)"),
        (dict(mix_prob=1.5), r"`mix_prob` \(--mix_prob\) must be a number in \[0.0, 1.0\]"),
        (dict(cutmix_alpha=-1.0), r"`cutmix_alpha` \(--cutmix_alpha\) must be a number >= 0"),
        (dict(tl_align_attention_path="fused"), r"`tl_align_attention_path` \(--tl_align_attention_path\) must be"),
    ],
)
def test_raises_error_when_mixing_settings_are_wrong(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_raises_error_when_model_is_unsupported(tmp_path):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    model = ConvNextForImageClassification(ConvNextConfig(num_stages=1, hidden_sizes=[8], depths=[1]))
    with pytest.raises(ValueError, match="TL-Align does not support ConvNextForImageClassification"):
        TLAlignTrainer(model=model, args=make_args(tmp_path))


def test_plain_trainer_is_untouched_by_import(tmp_path):
    """Importing tl_align_hf changes nothing for a plain Trainer on a vanilla model."""
    model = tiny_model(ViTForImageClassification, "sdpa")
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    assert model.config._attn_implementation == "sdpa" and trainer.model is model


def tiny_model_of(parent_class, image_size: int = IMAGE, seed: int = 0):
    """A tiny vanilla model of any class in `ALIGNED_CLASSES` (patch 4, or 2 for Swin; 10 labels), in eval mode."""
    from transformers import DeiTForImageClassification, DeiTForImageClassificationWithTeacher

    from .test_families import FAMILIES, _swin_config, tiny_family_model

    if parent_class in (ViTForImageClassification, DeiTForImageClassification, DeiTForImageClassificationWithTeacher):
        return tiny_model(parent_class, "sdpa", seed=seed, image_size=image_size)
    if parent_class.__name__ == "TimmWrapperForImageClassification":
        from .test_timm_family import tiny_timm_model

        return tiny_timm_model("vit", seed=seed, img_size=image_size)
    from .test_new_families import FAMILIES as NEW_FAMILIES
    from .test_new_families import tiny_new_family_model

    new_name = next((name for name, (parent, _, _) in NEW_FAMILIES.items() if parent is parent_class), None)
    if new_name is not None:  # Swin V2 (eager only), Data2Vec-Vision
        config = NEW_FAMILIES[new_name][1]()
        config.image_size = image_size
        return tiny_new_family_model(new_name, "eager" if new_name == "swinv2" else "sdpa", seed=seed, config=config)
    name = next(name for name, (parent, _, _) in FAMILIES.items() if parent is parent_class)
    config = _swin_config(image_size) if name == "swin" else FAMILIES[name][1]()
    (getattr(config, "vision_config", None) or config).image_size = image_size
    return tiny_family_model(name, "sdpa", seed=seed, config=config)


# SigLIP 2 takes NaFlex patch sequences, not images: its evaluation is in test_new_families::test_train_with_siglip2_naflex
@pytest.mark.parametrize(
    "parent_class",
    [parent for parent in ALIGNED_CLASSES if parent.__name__ != "Siglip2ForImageClassification"],
    ids=lambda parent_class: parent_class.__name__,
)
def test_evaluate_reports_loss_and_accuracy_for_every_aligned_class(tmp_path, parent_class):
    """DeiT with teacher takes no `labels` (Trainer's `label_names` would be empty): it is evaluated like the others,
    on its `logits`, the mean of its two heads."""
    model = tiny_model_of(parent_class)
    eval_dataset = image_dataset(12, seed=1)
    trainer = TLAlignTrainer(model=model, args=make_args(tmp_path), eval_dataset=eval_dataset)
    metrics = trainer.evaluate()
    pixel_values = torch.stack([example["pixel_values"] for example in eval_dataset])
    labels = torch.tensor([int(example["label"]) for example in eval_dataset])
    with torch.no_grad():
        logits = model.eval()(pixel_values).logits
    assert metrics["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert metrics["eval_accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    top5 = (logits.topk(5, -1).indices == labels[:, None]).any(-1).float().mean().item()
    assert metrics["eval_top5_accuracy"] == pytest.approx(top5)


def test_train_distilled_deit_with_accuracy_as_the_metric_for_the_best_model(tmp_path):
    from transformers import DeiTForImageClassificationWithTeacher

    overrides = dict(max_steps=2, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                     load_best_model_at_end=True, metric_for_best_model="accuracy")  # fmt: skip
    model = tiny_model(DeiTForImageClassificationWithTeacher, "sdpa").train()
    trainer = TLAlignTrainer(
        model=model, args=make_args(tmp_path, **overrides), train_dataset=image_dataset(), eval_dataset=image_dataset(8, 1)
    )
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
    assert len(evaluations) == 2 and all("eval_loss" in entry for entry in evaluations)
    assert trainer.state.best_metric == max(entry["eval_accuracy"] for entry in evaluations)
    assert trainer.state.best_model_checkpoint is not None


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_raises_error_when_the_model_is_multi_label_or_regression(tmp_path, problem_type):
    """Training would be single-label softmax cross-entropy while the saved config still says `problem_type`."""
    model = tiny_model(ViTForImageClassification, problem_type=problem_type)
    with pytest.raises(ValueError, match=rf"problem_type='{problem_type}'.*problem_type='single_label_classification'"):
        TLAlignTrainer(model=model, args=make_args(tmp_path))
    assert type(model) is ViTForImageClassification  # refused before anything changed


def test_raises_error_when_the_aligned_loss_has_one_class():
    """The model's own loss with `num_labels=1` and mixing arguments would be 0 with a zero gradient."""
    from .tiny_models import aligned_copy, mixed_batch

    model = aligned_copy(tiny_model(ViTForImageClassification, num_labels=1))
    batch = mixed_batch("binary")
    mixing = {key: batch[key] for key in ("mix_index", "token_weights", "mix_lam")}
    with pytest.raises(ValueError, match=r"the model's num_labels=1\): .*TL-Align needs num_labels >= 2"):
        model(batch["pixel_values"], labels=torch.zeros_like(batch["labels"]), **mixing)
