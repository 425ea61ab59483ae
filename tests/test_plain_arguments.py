"""A plain transformers `TrainingArguments` where a `TLAlignConfig` is expected (the README allows it): converted
field by field by `as_tl_align_config`, the one conversion `TLAlignTrainer` and `TLAlignCollator.from_model` share,
with the default mixing settings; `label_smoothing_factor` gets one behaviour for both classes of arguments."""

import dataclasses
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate.parallelism_config import ParallelismConfig
from transformers import TrainingArguments, ViTForImageClassification
from transformers.utils import logging as hf_logging

from tests.hub_server import FAKE_TOKEN, FAKE_USER, HubServer, patch_client_in_process
from tl_align_hf import MixingSettings, TLAlignCollator, TLAlignConfig, TLAlignTrainer
from tl_align_hf.config import as_tl_align_config

from .tiny_models import IMAGE_SIZE, tiny_model

ROOT = Path(__file__).resolve().parents[1]
CONVERSION_NOTICE = "TLAlignTrainer got a plain TrainingArguments"


def plain_args(tmp_path: Path, **overrides) -> TrainingArguments:
    return TrainingArguments(**{"output_dir": str(tmp_path / "out"), "report_to": "none", "use_cpu": True, **overrides})


def test_conversion_keeps_every_field_as_set_on_the_object(tmp_path):
    parallelism = ParallelismConfig(dp_replicate_size=1)
    args = plain_args(
        tmp_path, hub_token="hf_user_token", hub_model_id="user/model", hub_private_repo=True, seed=7, run_name="run",
        eval_strategy="steps", eval_steps=3, logging_steps=5, lr_scheduler_type="cosine",
        lr_scheduler_kwargs={"num_cycles": 2}, accelerator_config={"split_batches": True},
        parallelism_config=parallelism, gradient_accumulation_steps=2, weight_decay=0.05, save_total_limit=2,
        log_level="info", label_names=["labels"], include_for_metrics=["loss"], remove_unused_columns=True,
    )  # fmt: skip
    config = as_tl_align_config(args)

    assert type(config) is TLAlignConfig
    differing = [item.name for item in dataclasses.fields(args) if getattr(config, item.name) != getattr(args, item.name)]
    assert differing == []
    assert args.to_dict()["hub_token"] == "<HUB_TOKEN>" and config.hub_token == "hf_user_token"  # why not to_dict()
    assert config.parallelism_config is parallelism and config.accelerator_config.split_batches
    assert config.mixing_settings() == MixingSettings() and config.tl_align and config.label_smoothing == 0.1
    assert as_tl_align_config(config) is config and as_tl_align_config(None).output_dir == "tmp_trainer"


def test_raises_error_when_args_are_not_training_arguments():
    with pytest.raises(TypeError, match="`args` must be a TLAlignConfig or a TrainingArguments, got dict"):
        as_tl_align_config({"output_dir": "out"})


def test_collator_from_model_takes_the_default_mixing_of_plain_training_arguments(tmp_path):
    """The README's collator line with a plain TrainingArguments: the mixing settings the trainer converts it to."""
    args = plain_args(tmp_path)
    model = tiny_model(ViTForImageClassification, "sdpa")
    collator = TLAlignCollator.from_model(model, args, label_column_name="digit")
    trainer = TLAlignTrainer(model=model, args=args, data_collator=collator)

    assert collator.mixer.settings == MixingSettings() == trainer.args.mixing_settings()
    assert TLAlignTrainer(model=model, args=args).data_collator.mixer.settings == collator.mixer.settings
    examples = [{"pixel_values": torch.rand(3, IMAGE_SIZE, IMAGE_SIZE), "digit": i % 10} for i in range(4)]
    batch = collator(examples)
    assert set(batch) == {"pixel_values", "labels", "mix_index", "token_weights", "mix_lam"}
    assert batch["labels"].tolist() == [0, 1, 2, 3]


def test_datasets_with_a_transform_keep_their_columns_in_training_evaluation_and_prediction(tmp_path):
    """remove_unused_columns=True (TrainingArguments' default) would remove the raw columns that a `with_transform`
    transform reads; TLAlignTrainer's dataloader hooks keep them for such a dataset, and remove them elsewhere."""
    from .test_trainer import _image_folder_dataset, image_dataset

    args = plain_args(tmp_path, max_steps=1, per_device_train_batch_size=4, per_device_eval_batch_size=4)
    arrays = image_dataset(4).add_column("note", ["unused"] * 4)
    trainer = TLAlignTrainer(
        model=tiny_model(ViTForImageClassification, "sdpa").train(), args=args,
        train_dataset=_image_folder_dataset(8), eval_dataset={"folder": _image_folder_dataset(4), "arrays": arrays},
    )  # fmt: skip
    assert "image" in trainer.get_train_dataloader().dataset.column_names
    assert "image" in trainer.get_eval_dataloader("folder").dataset.column_names
    assert "note" not in trainer.get_eval_dataloader("arrays").dataset.column_names
    assert trainer.args.remove_unused_columns is True  # as the user set it, once the loaders are built
    trainer.train()
    assert {"eval_folder_accuracy", "eval_arrays_accuracy"} <= set(trainer.evaluate())
    assert trainer.predict(_image_folder_dataset(4)).predictions.shape == (4, 10)


@pytest.mark.parametrize(
    "log_level, transformers_verbosity, shown",
    [("info", logging.WARNING, True), ("warning", logging.INFO, False), ("passive", logging.INFO, True),
     ("passive", logging.WARNING, False)],
)  # fmt: skip
def test_conversion_notice_follows_the_log_level_trainer_gives_transformers(
    tmp_path, caplog, log_level, transformers_verbosity, shown
):
    """As with transformers' example scripts: `--log_level info`, or the default `passive` after the script set
    transformers' verbosity to info, shows the notice; our logger's level decides, the root's handler prints."""
    hf_logging.set_verbosity(transformers_verbosity)
    with caplog.at_level(logging.DEBUG):
        TLAlignTrainer(model=tiny_model(ViTForImageClassification, "sdpa"), args=plain_args(tmp_path, log_level=log_level))
    notices = [record for record in caplog.records if CONVERSION_NOTICE in record.message]
    assert len(notices) == int(shown)
    assert all(record.levelno == logging.INFO and "token_cutmix" in record.message for record in notices)


# ------------------------------------------------------------------------------------------- label smoothing
def _from_plain(**values) -> TLAlignConfig:
    return as_tl_align_config(TrainingArguments(**values))


# Distinct factors per case: the warning is said once per process and message (`warning_once`).
@pytest.mark.parametrize("make, factor", [(TLAlignConfig, 0.15), (_from_plain, 0.25)], ids=["TLAlignConfig", "plain"])
def test_label_smoothing_factor_is_applied_as_label_smoothing_with_one_warning(tmp_path, caplog, make, factor):
    with caplog.at_level(logging.WARNING, logger="tl_align_hf"):
        config = make(output_dir=str(tmp_path), report_to="none", label_smoothing_factor=factor)
    assert config.label_smoothing == factor and config.label_smoothing_factor == 0.0
    warnings = [record.message for record in caplog.records if "label_smoothing_factor" in record.message]
    assert len(warnings) == 1 and f"label_smoothing_factor={factor} is applied as label_smoothing={factor}" in warnings[0]


def test_label_smoothing_factor_is_said_once_and_transformers_smoother_stays_off(tmp_path, caplog):
    """The README's collator line and TLAlignTrainer both convert the same plain args: one warning, and Trainer's
    own `LabelSmoother` (which would smooth the mixed target) is never built."""
    args = plain_args(tmp_path, label_smoothing_factor=0.35)
    model = tiny_model(ViTForImageClassification, "sdpa")
    with caplog.at_level(logging.WARNING, logger="tl_align_hf"):
        collator = TLAlignCollator.from_model(model, args)
        trainer = TLAlignTrainer(model=model, args=args, data_collator=collator)
    assert sum("label_smoothing_factor=0.35" in record.message for record in caplog.records) == 1
    assert trainer.label_smoother is None
    assert trainer.args.label_smoothing == 0.35 and trainer.args.label_smoothing_factor == 0.0


def test_equal_label_smoothing_and_label_smoothing_factor_are_accepted(tmp_path):
    config = TLAlignConfig(output_dir=str(tmp_path), report_to="none", label_smoothing=0.2, label_smoothing_factor=0.2)
    assert config.label_smoothing == 0.2 and config.label_smoothing_factor == 0.0


@pytest.mark.parametrize(
    "values, message",
    [(dict(label_smoothing=0.2, label_smoothing_factor=0.3), r"label_smoothing=0.2 and label_smoothing_factor=0.3 disagree"),
     (dict(label_smoothing_factor=1.0), r"`label_smoothing_factor` \(applied as `label_smoothing`\) must be in \[0, 1\)")],
)  # fmt: skip
def test_raises_error_when_label_smoothing_factor_conflicts_or_is_out_of_range(tmp_path, values, message):
    with pytest.raises(ValueError, match=message):
        TLAlignConfig(output_dir=str(tmp_path), report_to="none", **values)


# ------------------------------------------------------------------------------------------- Hub token
# Runs in a fresh interpreter configured by HF_ENDPOINT (transformers' Hub calls read it at import): TLAlignTrainer
# with a plain TrainingArguments and push_to_hub=True creates the repo in its constructor, then pushes.
PLAIN_ARGS_PUSH = textwrap.dedent(
    """
    import json, sys
    from transformers import TrainingArguments, ViTConfig, ViTForImageClassification
    from tl_align_hf import TLAlignTrainer

    output_dir, repo_id, token = sys.argv[1:4]
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=10)
    args = TrainingArguments(output_dir=output_dir, push_to_hub=True, hub_model_id=repo_id, hub_token=token,
                             report_to="none", hub_strategy="end", use_cpu=True, save_strategy="no")
    trainer = TLAlignTrainer(model=ViTForImageClassification(config), args=args)
    commit = trainer.push_to_hub(commit_message="End of training")
    print(json.dumps({"oid": commit.oid}))
    """
)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """The local Hub of tests/hub_server.py, no token configured: only the one in the arguments can authenticate."""
    with HubServer(max_lifetime_s=300) as server:
        patch_client_in_process(monkeypatch, server.url, tmp_path / "hf_home")
        yield server
    assert not server.hub.unhandled, f"the client needed endpoints the local Hub lacks: {server.hub.unhandled}"


def test_plain_training_arguments_push_with_the_users_hub_token(local_hub, tmp_path):
    repo_id = f"{FAKE_USER}/plain-args"
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_ARGS_PUSH, str(tmp_path / "out"), repo_id, FAKE_TOKEN],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    commits = local_hub.hub.commits(repo_id)
    assert commits[0].title == "End of training" and commits[0].oid in result.stdout
    assert {"config.json", "model.safetensors", "README.md"} <= set(commits[0].files)
