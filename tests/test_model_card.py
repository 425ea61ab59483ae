"""The model card's content, read back with huggingface_hub's `ModelCard` (no Hub, no network).

A tiny ViT is trained for 2 steps (evaluated at each) by a `TLAlignTrainer` and by a plain `Trainer` with plain
`TrainingArguments`; the cards of both are parsed and their metadata and sections checked.
"""

from __future__ import annotations

import configparser
import dataclasses
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
from huggingface_hub import ModelCard, constants
from transformers import Trainer, TrainingArguments, ViTForImageClassification

from tl_align_hf import MixingSettings, TLAlignConfig, TLAlignTrainer, push_checkpoint_to_hub
from tl_align_hf.support.model_card import TEMPLATE_PATH, model_card, tl_align_model_card

from .test_no_trainer import load_example
from .tiny_models import IMAGE_SIZE, NUM_LABELS, tiny_model

BASE_MODEL = "google/vit-base-patch16-224-in21k"
REPO_ID = "user/vit-tl-align"
# What the example script passes to `Trainer.create_model_card` / `push_to_hub`.
CARD_KWARGS = {"finetuned_from": BASE_MODEL, "dataset": "beans", "tags": ["image-classification", "vision"]}
# Both trainers: 2 steps of 4 images, evaluated after each, on the CPU, nothing saved or reported.
TRAINING = dict(max_steps=2, eval_strategy="steps", eval_steps=1, per_device_train_batch_size=4,
                learning_rate=1e-2, seed=0, save_strategy="no", report_to="none", use_cpu=True)  # fmt: skip


def image_dataset(num_examples: int, seed: int) -> datasets.Dataset:
    """Random CHW float images (the tiny models' size) with integer labels."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.3, (num_examples, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    labels = (np.arange(num_examples) % NUM_LABELS).tolist()
    return datasets.Dataset.from_dict({"pixel_values": list(images), "label": labels}).with_format("torch")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Offline mode: `TrainingSummary` would otherwise ask the Hub for the base model's license."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tl_align_trainer(tmp_path_factory):
    """A TLAlignTrainer (pixel CutMix, TL-Align on, label smoothing 0.1) after 2 steps and a final evaluation."""
    output_dir = str(tmp_path_factory.mktemp("tl_align") / "out")
    args = TLAlignConfig(output_dir=output_dir, mixing_method="cutmix", hub_model_id=REPO_ID, **TRAINING)
    model = tiny_model(ViTForImageClassification, "sdpa").train()
    trainer = TLAlignTrainer(model=model, args=args, train_dataset=image_dataset(16, 0), eval_dataset=image_dataset(8, 1))
    trainer.train()
    trainer.evaluate()
    return trainer


@pytest.fixture(scope="module")
def plain_trainer(tmp_path_factory):
    """A plain `Trainer` with plain `TrainingArguments` (no accuracy metric) after 2 steps and an evaluation."""
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("plain") / "plain-vit"), **TRAINING)
    model = tiny_model(ViTForImageClassification, "sdpa").train()
    trainer = Trainer(model=model, args=args, train_dataset=image_dataset(16, 0), eval_dataset=image_dataset(8, 1))
    trainer.train()
    trainer.evaluate()
    return trainer


def saved_and_loaded(card: ModelCard, folder) -> ModelCard:
    """The card as the trainer saves it (README.md), read back from the file."""
    path = folder / "README.md"
    card.save(path)
    return ModelCard.load(path)


def section(card: ModelCard, title: str) -> str:
    """The text of the markdown section `title` (up to the next heading of the same or a higher level)."""
    level = title.split(" ")[0]
    match = re.search(rf"^{re.escape(title)}\n(.*?)(?=^#{{1,{len(level)}}} |\Z)", card.text, flags=re.M | re.S)
    assert match is not None, f"no section {title!r} in:\n{card.text}"
    return match.group(1)


def test_card_of_tl_align_trainer_has_trainer_metadata_and_tl_align_sections(tl_align_trainer, tmp_path):
    card = saved_and_loaded(tl_align_model_card(tl_align_trainer, **CARD_KWARGS, license="apache-2.0"), tmp_path)

    final_eval = tl_align_trainer.state.log_history[-1]
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert data.tags == ["image-classification", "vision", "generated_from_trainer", "tl-align", "token-label-alignment"]
    assert data.base_model == BASE_MODEL and data.datasets == ["beans"] and data.license == "apache-2.0"
    assert data.model_name == tl_align_trainer.args.output_dir.split("/")[-1]
    accuracies = {result.metric_config: result.metric_value for result in data.eval_results}
    assert accuracies == {None: final_eval["eval_accuracy"], "top5": final_eval["eval_top5_accuracy"]}
    assert {result.dataset_name for result in data.eval_results} == {"beans"}
    assert card.text.startswith(f"\n# {data.model_name}\n\nA `ViTForImageClassification` image classifier fine-tuned")
    hyperparameters = section(card, "### Training hyperparameters")
    assert "- learning_rate: 0.01\n" in hyperparameters and "- training_steps: 2\n" in hyperparameters
    assert "- train_batch_size: 4\n" in hyperparameters and "- seed: 0\n" in hyperparameters
    settings = section(card, "### TL-Align and mixing settings")
    assert "| TL-Align | on (aligned targets) |" in settings and "| label smoothing | 0.1 |" in settings
    assert "| mixing_method | `cutmix`: CutMix" in settings and "| mix_mode | `batch` |" in settings
    for name in ("mixup_alpha", "cutmix_alpha", "cutmix_minmax", "mix_prob", "switch_prob", "correct_lam"):
        assert f"| {name} | `{getattr(tl_align_trainer.args, name)}` |" in settings
    training_log = section(card, "### Training results").strip().splitlines()
    assert "Validation Loss" in training_log[0] and "Top5 Accuracy" in training_log[0] and len(training_log) == 4
    assert f"| Accuracy | {final_eval['eval_accuracy']:.4g} |" in section(card, "## Evaluation results")
    usage = section(card, "## How to use")
    assert f'AutoModelForImageClassification.from_pretrained("{REPO_ID}")' in usage
    assert "as a `ViTForImageClassification`" in usage
    assert "## Token-Label Alignment" in card.text and "@inproceedings{xiao2023tlalign" in card.text


def test_card_shows_overrides_instead_of_trainer_args(tl_align_trainer, tmp_path):
    mixing = {"mixing_method": "mixup", "mixup_alpha": 0.8}
    card = tl_align_model_card(tl_align_trainer, mixing=mixing, tl_align=False, label_smoothing=0.0)

    settings = section(card, "### TL-Align and mixing settings")
    assert "| TL-Align | off (area-mixed targets, the baseline) |" in settings
    assert "| label smoothing | 0 |" in settings
    assert "| mixing_method | `mixup`: Mixup" in settings and "| mixup_alpha | `0.8` |" in settings
    assert "cutmix`:" not in settings and "| cutmix_alpha | `1.0` |" in settings  # not overridden: from args
    assert "plain data mixing and area-proportional targets" in card.text
    assert tl_align_trainer.args.mixing_method == "cutmix" and tl_align_trainer.args.tl_align


def test_card_of_plain_trainer_uses_defaults_or_overrides(plain_trainer, tmp_path):
    default = saved_and_loaded(tl_align_model_card(plain_trainer), tmp_path)
    overridden = tl_align_model_card(plain_trainer, mixing={"mixing_method": "none"}, tl_align=False)

    assert default.data.tags == ["generated_from_trainer", "image-classification", "vision", "tl-align", "token-label-alignment"]
    assert default.data.model_name is None and default.data.eval_results is None  # no accuracy: no model-index
    assert default.data.base_model is None and "trained from scratch" in default.text
    assert "| mixing_method | `token_cutmix`" in default.text and "| TL-Align | on" in default.text
    assert "| Loss |" in section(default, "## Evaluation results")
    assert "# plain-vit\n" in default.text and "as a `ViTForImageClassification`" in default.text
    assert "| mixing_method | `none`: no mixing |" in overridden.text and "| TL-Align | off" in overridden.text


def test_card_without_trainer_keeps_hub_ids_only_in_metadata(tmp_path):
    card = model_card(
        model_class_name="TLAlignViTForImageClassification",
        mixing={"mixing_method": "token_cutmix", "cutmix_alpha": 1.0},
        tl_align=True,
        label_smoothing=0.1,
        finetuned_from=str(tmp_path),  # a local folder
        dataset="digits",
        hyperparameters={"learning_rate": 0.001, "training_steps": 7},
        eval_results={"eval_top5_accuracy": 0.9, "eval_accuracy": 0.5, "eval_runtime": 1.2, "epoch": 3.0},
        repo_id=REPO_ID,
    )

    card = ModelCard(str(card))
    assert card.data.base_model is None and card.data.datasets == ["digits"] and card.data.model_name == "vit-tl-align"
    assert [(result.metric_config, result.metric_value) for result in card.data.eval_results] == [(None, 0.5), ("top5", 0.9)]
    assert f"fine-tuned from `{tmp_path}`" in card.text and "as a `ViTForImageClassification`" in card.text
    assert "- training_steps: 7\n" in section(card, "### Training hyperparameters")
    assert "eval_runtime" not in card.text and "epoch" not in section(card, "## Evaluation results")


def test_card_lists_the_fields_of_mixing_settings_in_order(tl_align_trainer):
    card = tl_align_model_card(tl_align_trainer)

    rows = re.findall(r"^\| (\S+) \| `", section(card, "### TL-Align and mixing settings"), flags=re.M)
    assert rows == [item.name for item in dataclasses.fields(MixingSettings)]


def test_card_template_is_package_data_of_the_wheel():
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).parents[1] / "setup.cfg")

    patterns = setup["options.package_data"]["tl_align_hf"].split()  # globs relative to the package folder
    package_folder = TEMPLATE_PATH.parents[1]
    assert TEMPLATE_PATH.is_file() and any(TEMPLATE_PATH in package_folder.glob(pattern) for pattern in patterns)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"mixing": {"method": "cutmix"}}, "`mixing` has unknown settings \\['method'\\]"),
     ({"label_smoothing": 1.0}, "`label_smoothing` must be in \\[0, 1\\)")],
)  # fmt: skip
def test_raises_error_when_overrides_are_invalid(tl_align_trainer, overrides, message):
    with pytest.raises(ValueError, match=message):
        tl_align_model_card(tl_align_trainer, **overrides)


@pytest.mark.parametrize("repo_id", ["not a valid id", "a/b/c", "user/--name"])
def test_raises_error_when_repo_id_is_invalid(tmp_path, repo_id):
    with pytest.raises(ValueError, match="`repo_id` must be a Hub repo id"):
        push_checkpoint_to_hub(tmp_path, repo_id)


# ----------------------------------------------------------------------------------------------- evaluation-only runs


def example_argv(digits, output_dir, model: str, *extra: str) -> list[str]:
    """The Trainer example on the digits fixture, with `model`'s weights; evaluation only unless `extra` trains."""
    return [
        "--model_name_or_path", str(model), "--train_dir", str(digits / "train"),
        "--validation_dir", str(digits / "validation"), "--output_dir", str(output_dir), "--do_eval",
        "--max_eval_samples", "16", "--per_device_eval_batch_size", "8", "--report_to", "none", "--use_cpu", *extra,
    ]  # fmt: skip


def test_card_of_an_evaluation_only_run_describes_the_training_of_the_weights(digits, tiny_checkpoint, tmp_path):
    example = load_example("run_image_classification")
    trained = tmp_path / "trained"
    example.main(example_argv(
        digits, trained, tiny_checkpoint, "--do_train", "--max_steps", "2", "--per_device_train_batch_size", "8",
        "--max_train_samples", "16", "--learning_rate", "1e-3", "--mixing_method", "mixup", "--mixup_alpha", "0.8",
        "--label_smoothing", "0.2", "--save_strategy", "no",
    ))  # fmt: skip
    (trained / "README.md").unlink()

    metrics = example.main(example_argv(digits, trained, trained))  # lr 5e-5, 3 epochs, token_cutmix: not used

    card = ModelCard.load(trained / "README.md")
    hyperparameters = section(card, "### Training hyperparameters")
    assert "- learning_rate: 0.001\n" in hyperparameters and "- training_steps: 2\n" in hyperparameters
    assert "5e-05" not in card.text and "num_epochs" not in card.text
    settings = section(card, "### TL-Align and mixing settings")
    assert "| mixing_method | `mixup`: Mixup" in settings and "| label smoothing | 0.2 |" in settings
    assert "token_cutmix" not in settings
    assert f"fine-tuned from `{tiny_checkpoint}` on `imagefolder`" in card.text  # the base, not the trained folder
    assert [result.metric_value for result in card.data.eval_results][0] == metrics["eval_accuracy"]  # this run's
    assert "huggingface.co/datasets" not in card.text and card.data.datasets is None
    assert "tl-align" in card.data.tags


def test_card_of_an_evaluation_only_run_without_a_training_record_claims_no_training(digits, tiny_checkpoint, tmp_path):
    example = load_example("run_image_classification")
    output_dir = tmp_path / "evaluated"

    example.main(example_argv(digits, output_dir, tiny_checkpoint))

    card = ModelCard.load(output_dir / "README.md")
    assert "was not recorded with them, so this card lists no training settings" in card.text
    assert "Not recorded" in section(card, "### TL-Align and mixing settings")
    assert "No training hyperparameters were recorded." in section(card, "### Training hyperparameters")
    assert "learning_rate" not in card.text and "mixing_method" not in card.text and "fine-tuned" not in card.text
    assert "tl-align" not in card.data.tags and card.data.base_model is None
    assert "accuracy |" in section(card, "## Evaluation results")


def test_card_links_only_hub_datasets(tmp_path):
    card = model_card(
        model_class_name="TLAlignViTForImageClassification",
        mixing={"mixing_method": "cutmix"},
        tl_align=True,
        label_smoothing=0.0,
        dataset=["imagefolder", str(tmp_path), "scikit-learn digits", "beans"],
        eval_results={"eval_accuracy": 0.5},
    )

    assert card.data.datasets == ["beans"]
    assert "[`beans`](https://huggingface.co/datasets/beans)" in card.text
    assert card.text.count("https://huggingface.co/datasets/") == 1
    assert f"`imagefolder` and `{tmp_path}` and `scikit-learn digits` and [`beans`]" in card.text
    with_local_tag = model_card(model_class_name="ViTForImageClassification", mixing={}, tl_align=False,
                                label_smoothing=0.0, dataset="digits", dataset_tags="imagefolder")  # fmt: skip
    assert with_local_tag.data.datasets is None and "huggingface.co/datasets" not in with_local_tag.text
