"""No run trains silently wrong, no interrupted run is lost: faults, bad data and bad settings (docs/reliability.md).

Each test reproduces one case of the table in docs/reliability.md and checks what the user sees: an error (or a
warning, where the run is still meaningful) that names the problem and the fix, before training when it is visible
then.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DefaultDataCollator, ViTForImageClassification
from transformers.utils import logging as hf_logging

from tl_align_hf import MixingSettings, TLAlignCollator, TLAlignConfig, TLAlignMixer, TLAlignTrainer, mixing_loss
from tl_align_hf.support.checkpoints import STAGING_DIR
from tl_align_hf.support.data import check_columns, load_image_dataset, prepare_image_dataset

from .test_trainer import image_dataset, make_args
from .tiny_models import NUM_LABELS, tiny_model, weights_digest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "run_image_classification.py"


@pytest.fixture(autouse=True)
def _propagate_warnings():
    """Warnings of transformers' and tl_align_hf's loggers reach caplog, whatever earlier tests set."""
    hf_logging.enable_propagation()
    verbosity, package_logger = hf_logging.get_verbosity(), logging.getLogger("tl_align_hf")
    package_level = package_logger.level
    hf_logging.set_verbosity_warning()
    package_logger.setLevel(logging.WARNING)
    yield
    hf_logging.set_verbosity(verbosity)
    package_logger.setLevel(package_level)


def _weights(folder) -> str:
    return weights_digest(ViTForImageClassification.from_pretrained(folder))


# ----------------------------------------------------------------------------------------------- checkpoints

# Runs the Trainer example; with SLOW_SAVE_AT=N, the save of checkpoint-N pauses after writing the model weights,
# so that the test can kill the process in the middle of that save.
SLOW_SAVE_RUNNER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {examples!r})
    import run_image_classification as script
    from transformers import Trainer

    slow_at = int(os.environ.get("SLOW_SAVE_AT", "0"))
    save_optimizer = Trainer._save_optimizer_and_scheduler

    def slow(self, output_dir):
        if self.state.global_step == slow_at:
            open(os.path.join(output_dir, "PAUSED"), "w").close()
            time.sleep(120)
        return save_optimizer(self, output_dir)

    Trainer._save_optimizer_and_scheduler = slow
    script.main(sys.argv[1:])
    """
)


def _example_argv(digits, checkpoint, output_dir, *extra) -> list[str]:
    return [
        "--model_name_or_path", str(checkpoint), "--train_dir", str(digits / "train"),
        "--validation_dir", str(digits / "validation"), "--output_dir", str(output_dir), "--do_train",
        "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "1", "--per_device_train_batch_size", "8",
        "--max_train_samples", "40", "--learning_rate", "1e-3", "--report_to", "none", "--use_cpu", "--seed", "0",
        "--mixing_method", "cutmix", "--dataloader_num_workers", "0", *extra,
    ]  # fmt: skip


def _run_example(runner: Path, argv: list[str], slow_save_at: int = 0) -> subprocess.Popen:
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", SLOW_SAVE_AT=str(slow_save_at))
    return subprocess.Popen([sys.executable, str(runner), *argv], env=environment, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_and_the_rerun_resumes_from_it(
    digits, tiny_checkpoint, tmp_path
):
    runner = tmp_path / "runner.py"
    runner.write_text(SLOW_SAVE_RUNNER.format(examples=str(EXAMPLE.parent)))
    uninterrupted = _run_example(runner, _example_argv(digits, tiny_checkpoint, tmp_path / "full"))
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stdout.read()[-3000:]

    output_dir = tmp_path / "killed"
    process = _run_example(runner, _example_argv(digits, tiny_checkpoint, output_dir), slow_save_at=3)
    paused = output_dir / STAGING_DIR / "checkpoint-3" / "PAUSED"
    deadline = time.time() + 240
    while not paused.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert paused.exists(), process.stdout.read()[-3000:] if process.poll() is not None else "no pause"
    process.send_signal(signal.SIGKILL)  # weights of checkpoint-3 written, optimizer and trainer state not yet
    process.wait(timeout=60)

    assert not (output_dir / "checkpoint-3").exists()
    assert (output_dir / "checkpoint-2" / "trainer_state.json").is_file()
    ViTForImageClassification.from_pretrained(output_dir / "checkpoint-2")  # the previous checkpoint loads

    rerun = _run_example(runner, _example_argv(digits, tiny_checkpoint, output_dir))  # the same command again
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, output[-3000:]
    assert "resuming training at" in output and "checkpoint-2" in output
    assert _weights(output_dir) == _weights(tmp_path / "full")
    assert not (output_dir / STAGING_DIR / "checkpoint-3").exists()


def test_an_incomplete_checkpoint_folder_is_refused_with_the_way_out(tmp_path):
    (tmp_path / "out" / "checkpoint-5").mkdir(parents=True)
    trainer = TLAlignTrainer(model=tiny_model(ViTForImageClassification), args=make_args(tmp_path), train_dataset=image_dataset())
    with pytest.raises(ValueError, match=r"checkpoint-5 is not a complete checkpoint .*trainer_state.json.*earlier"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-5"))


def _train(tmp_path, dataset=None, **overrides):
    trainer = TLAlignTrainer(
        model=tiny_model(ViTForImageClassification, "sdpa").train(),
        args=make_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else image_dataset(),
    )
    return trainer, trainer.train()


def test_a_rerun_of_a_finished_run_with_new_settings_warns_and_keeps_the_trained_settings_in_the_card(tmp_path, caplog):
    finished = dict(max_steps=2, save_strategy="steps", save_steps=2, mixing_method="cutmix")
    _train(tmp_path, **finished)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    trainer = TLAlignTrainer(
        model=tiny_model(ViTForImageClassification, "sdpa").train(),
        args=make_args(tmp_path, **{**finished, "mixing_method": "mixup", "mixup_alpha": 0.8}),
        train_dataset=image_dataset(),
    )
    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    message = " ".join(record.message for record in caplog.records)
    assert "nothing left to train" in message and "step 2" in message and "mixing_method='cutmix'" in message
    assert "new --output_dir" in message
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`cutmix`" in card and "`mixup`" not in card


def test_resuming_an_unfinished_run_with_other_mixing_settings_is_refused_before_training(tmp_path):
    _train(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, mixing_method="cutmix")
    trainer = TLAlignTrainer(
        model=tiny_model(ViTForImageClassification, "sdpa").train(),
        args=make_args(tmp_path, max_steps=4, mixing_method="token_mix"),
        train_dataset=image_dataset(),
    )
    with pytest.raises(ValueError, match=r"mixing_method: 'cutmix' in the checkpoint, 'token_mix' now.*new --output_dir"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    assert trainer.state.global_step == 1  # nothing was trained


def test_an_unwritable_output_dir_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=r"output_dir .*a_file/out is not writable.*before training"):
        TLAlignTrainer(
            model=tiny_model(ViTForImageClassification),
            args=make_args(tmp_path, output_dir=str(blocker / "out")),
            train_dataset=image_dataset(),
        )


def test_a_full_disk_while_saving_says_so_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save = torch.save

    def full_disk(obj, target, *args, **kwargs):
        if "checkpoint-2" in str(target) and str(target).endswith("optimizer.pt"):
            Path(target).write_bytes(b"truncated")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: basic_ios::clear: iostream error")
        return save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"No space left on device while saving checkpoint-2 to .*checkpoint-1.*is intact") as error:
        _train(tmp_path, max_steps=3, save_strategy="steps", save_steps=1)
    assert error.value.errno == errno.ENOSPC
    assert not (tmp_path / "out" / "checkpoint-2").exists()
    assert not (tmp_path / "out" / STAGING_DIR / "checkpoint-2").exists()
    ViTForImageClassification.from_pretrained(tmp_path / "out" / "checkpoint-1")


# ----------------------------------------------------------------------------------------------- data


def _image(value: int = 0) -> Image.Image:
    return Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8))


def _folder(root: Path, files: dict[str, Image.Image | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else content.save(path)
    return root


def test_raises_error_when_the_data_or_the_model_has_one_class(tmp_path):
    one_class = datasets.Dataset.from_dict({"image": [_image()], "label": [0]}).cast_column("label", datasets.ClassLabel(names=["cat"]))
    one_class = one_class.cast_column("image", datasets.Image())
    with pytest.raises(ValueError, match="needs at least two\\s+classes"):
        check_columns(datasets.DatasetDict(train=one_class))
    model = tiny_model(ViTForImageClassification, num_labels=1)
    with pytest.raises(ValueError, match="TL-Align needs at least two classes, but the model has num_labels=1"):
        TLAlignTrainer(model=model, args=make_args(tmp_path))


def test_warns_about_validation_classes_the_training_split_lacks(tmp_path, caplog):
    root = _folder(tmp_path, {"train/cat/1.png": _image(), "train/dog/2.png": _image(9),
                              "validation/cat/3.png": _image(), "validation/owl/4.png": _image(5)})  # fmt: skip
    dataset = load_image_dataset(train_dir=root / "train", validation_dir=root / "validation")
    with caplog.at_level("WARNING", logger="tl_align_hf"):
        check_columns(dataset)
    assert "training split has no images of: owl" in caplog.text


@pytest.mark.parametrize(
    "layout",
    [{"train/1.png": _image(), "train/2.png": _image(1)},  # a flat folder
     {"train/cat/1.png": _image(), "train/cat/2.png": _image(1)},  # a single class folder
     {"train/cat/1.png": _image(), "train/dog/2.png": _image(1), "validation/x/cat/3.png": _image(),
      "validation/x/dog/4.png": _image(2)}],  # validation one level deeper than train
    ids=["flat", "single_class", "different_depths"],
)  # fmt: skip
def test_image_folders_without_labels_explain_the_layout(tmp_path, layout):
    root = _folder(tmp_path, layout)
    validation = root / "validation" if (root / "validation").exists() else None
    dataset = load_image_dataset(train_dir=root / "train", validation_dir=validation, train_val_split=0.5)
    with pytest.raises(ValueError, match=r"<split folder>/<class name>/<image>.*same depth.*two\s+class folders"):
        check_columns(dataset)


def test_unreadable_images_are_listed_before_training_and_named_when_met(tmp_path):
    root = _folder(tmp_path, {"train/cat/1.png": _image(), "train/dog/2.png": _image(1),
                              "validation/cat/3.png": _image(), "validation/dog/empty.png": b"",
                              "validation/dog/broken.png": b"not a png"})  # fmt: skip
    dataset = load_image_dataset(train_dir=root / "train", validation_dir=root / "validation")
    with pytest.raises(ValueError, match=r"2 image\(s\) of split 'validation' cannot be read:\n.*broken.png.*\n.*empty.png"):
        prepare_image_dataset(dataset, verify_splits=["validation"])
    prepared = prepare_image_dataset(dataset)  # not verified: the transform names the file when it meets it
    from tl_align_hf.support.transforms import default_image_processor, make_transforms

    _, evaluation = make_transforms(default_image_processor(8))
    validation = prepared["validation"].with_transform(evaluation)
    with pytest.raises(ValueError, match=r"Cannot read the image .*(broken|empty).png.*--verify_images"):
        [validation[row] for row in range(len(validation))]


def test_validation_labels_out_of_range_and_empty_selections_fail_when_the_data_is_loaded(tmp_path):
    eval_dataset = image_dataset(4).with_format(None).map(lambda example: {"label": NUM_LABELS + 2}).with_format("torch")
    trainer = TLAlignTrainer(model=tiny_model(ViTForImageClassification), args=make_args(tmp_path), eval_dataset=eval_dataset)
    with pytest.raises(ValueError, match=rf"labels \[{NUM_LABELS + 2}\] are outside the model's classes \[0, {NUM_LABELS}\)"):
        trainer.evaluate()  # the collator checks the labels of every batch, streaming datasets' included
    sys.path.insert(0, str(EXAMPLE.parent))
    import run_image_classification as example

    with pytest.raises(ValueError, match="--max_train_samples must be at least 1"):
        example.select_split({"train": image_dataset(2)}, "train", 0, seed=0)


@pytest.mark.parametrize(
    "pixel_values, message",
    [(torch.rand(3, 24, 24), r"have 3 channels but the model expects 1 \(config.num_channels\).*grayscale"),
     (torch.rand(24, 24, 3), r"looks channels-last \(H, W, C\).*permute"),
     (torch.rand(3, 2, 2), r"image size 2x2 is smaller than one patch \(4x4\)")],
    ids=["rgb_for_a_one_channel_model", "channels_last", "patch_larger_than_image"],
)  # fmt: skip
def test_image_shape_problems_are_named(pixel_values, message):
    model = tiny_model(ViTForImageClassification, num_channels=1 if "channels" in message and "3 channels" in message else 3)
    collator = TLAlignCollator.from_model(model, image_size=None, seed=0)
    with pytest.raises(ValueError, match=message):
        collator([{"pixel_values": pixel_values, "label": 0}, {"pixel_values": pixel_values, "label": 1}])


def test_nan_images_are_refused_by_the_collator():
    collator = TLAlignCollator(TLAlignMixer(MixingSettings(), 4), seed=0)
    images = [torch.rand(3, 8, 8) for _ in range(3)]
    images[1][:] = float("nan")
    with pytest.raises(ValueError, match=r"examples \[1\] hold NaN or infinite values"):
        collator([{"pixel_values": image, "label": 0} for image in images])


@pytest.mark.parametrize(
    "logging", [dict(logging_steps=1), dict(logging_steps=10), dict(logging_strategy="no")],
    ids=["every_step", "after_the_last_log", "no_logging"],
)  # fmt: skip
def test_a_non_finite_training_loss_stops_the_run_at_the_next_log(tmp_path, logging):
    # without a log after the bad step, the final log (train_loss) must still catch it
    trainer = TLAlignTrainer(
        model=tiny_model(ViTForImageClassification),
        args=make_args(tmp_path, learning_rate=1e30, max_steps=5, **logging),
        train_dataset=image_dataset(),
    )  # the first step overflows the weights, so the losses that follow are not finite
    with pytest.raises(RuntimeError, match="training loss was NaN or infinite .*logging_nan_inf_filter"):
        trainer.train()
    if logging.get("logging_steps") == 1:
        assert trainer.state.global_step < 5  # stopped at the first log after the bad step


# ----------------------------------------------------------------------------------------------- settings


def test_switch_prob_without_both_methods_warns(caplog):
    with caplog.at_level("WARNING", logger="tl_align_hf"):
        MixingSettings(mixing_method="cutmix", switch_prob=0.9)
    assert "switch_prob=0.9 has no effect" in caplog.text and "mixup_alpha > 0" in caplog.text


@pytest.mark.parametrize("collator", [DefaultDataCollator(), None], ids=["default_data_collator", "custom"])
def test_a_collator_without_the_mixing_keys_is_refused(tmp_path, collator):
    if collator is not None:
        with pytest.raises(ValueError, match="does not mix .*mixing_method='token_cutmix' would be silently ignored"):
            TLAlignTrainer(model=tiny_model(ViTForImageClassification), args=make_args(tmp_path), data_collator=collator)
        return

    def stack_only(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([int(e["label"]) for e in examples])}  # fmt: skip

    trainer = TLAlignTrainer(model=tiny_model(ViTForImageClassification), args=make_args(tmp_path),
                             data_collator=stack_only, train_dataset=image_dataset())  # fmt: skip
    with pytest.raises(ValueError, match=r"no mix_index, token_weights, mix_lam .*does not mix.*mixing_method='none'"):
        trainer.train()
    unmixed = TLAlignTrainer(model=tiny_model(ViTForImageClassification), args=make_args(tmp_path, mixing_method="none"),
                             data_collator=stack_only, train_dataset=image_dataset())  # fmt: skip
    unmixed.train()  # mixing_method="none": trains with the smoothed labels of each image
    assert [entry for entry in unmixed.state.log_history if "loss" in entry]


@pytest.mark.parametrize(
    "changes, message",
    [(dict(label_smoothing=1.0), r"`label_smoothing` must be in \[0, 1\)"),
     (dict(own_share=torch.tensor([0.5, 1.5, 0.2, 0.1])), r"`own_share` must hold values in \[0, 1\] \(shares"),
     (dict(labels=torch.tensor([0, 1, 2, NUM_LABELS])), rf"`labels` must hold values in \[0, {NUM_LABELS}\)"),
     (dict(labels=torch.tensor([0, 1, 2])), r"`labels` must be a \(4,\) integer tensor")],
    ids=["smoothing", "shares", "labels_out_of_range", "labels_wrong_length"],
)  # fmt: skip
def test_mixing_loss_names_bad_arguments(changes, message):
    arguments = dict(logits=torch.randn(4, NUM_LABELS), labels=torch.tensor([0, 1, 2, 3]), mix_index=torch.tensor([1, 0, 3, 2]),
                     own_share=torch.full((4,), 0.5), label_smoothing=0.1)  # fmt: skip
    with pytest.raises(ValueError, match=message):
        mixing_loss(**{**arguments, **changes})


def test_config_checks_the_mixing_settings_when_built():
    for settings, flag in ((dict(mix_prob=1.5), "--mix_prob"), (dict(cutmix_alpha=-1.0), "--cutmix_alpha")):
        with pytest.raises(ValueError, match=flag):
            TLAlignConfig(output_dir="unused", **settings)
