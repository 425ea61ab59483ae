"""Contracts of the private `Trainer` methods that `TLAlignTrainer` overrides (`tl_align_hf/trainer_private.py`).

transformers may change a private method in any release. Each test here states what the override relies on, against
the installed `Trainer` itself (its signature, and what it does when it runs), so that a transformers upgrade that
breaks an override fails here, naming the method, instead of training silently wrong or saving non-atomically. Where
an override works around a gap of transformers (the key conversion on load), a test also checks that the gap is
still there: when it fails, transformers covers it and the override can go.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import Trainer, TrainingArguments, ViTForImageClassification

from tl_align_hf import TLAlignTrainer
from tl_align_hf.trainer_private import PRIVATE_TRAINER_METHODS, PrivateTrainerMethods

from .test_trainer import image_dataset
from .tiny_models import tiny_model, weights_digest

# What each override's `super()` call passes: the parameters of the installed Trainer's method.
SIGNATURES = {
    "_get_output_dir": ["self", "trial"],
    "_save_checkpoint": ["self", "model", "trial"],
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
    "_load_best_model": ["self"],
    "_get_train_sampler": ["self", "train_dataset"],
}


def plain_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=1e-2, report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    return TrainingArguments(**{**values, **overrides})


def test_tl_align_trainer_overrides_only_the_listed_private_trainer_methods():
    """A new private override must be listed in `PRIVATE_TRAINER_METHODS` (and get a contract test here)."""
    own_classes = TLAlignTrainer.__mro__[: TLAlignTrainer.__mro__.index(Trainer)]
    overridden = {
        name for cls in own_classes for name in vars(cls)
        if name.startswith("_") and not name.startswith("__") and callable(getattr(Trainer, name, None))
    }  # fmt: skip
    assert overridden == set(PRIVATE_TRAINER_METHODS) == set(SIGNATURES)
    assert all(name in vars(PrivateTrainerMethods) for name in PRIVATE_TRAINER_METHODS)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_the_private_methods_keep_their_signature(name):
    assert callable(getattr(Trainer, name, None)), f"transformers' Trainer has no {name} any more"
    trainer_parameters = list(inspect.signature(getattr(Trainer, name)).parameters)
    assert trainer_parameters == SIGNATURES[name], f"Trainer.{name} changed its parameters: {trainer_parameters}"
    assert list(inspect.signature(getattr(TLAlignTrainer, name)).parameters) == trainer_parameters


def test_transformers_writes_a_whole_checkpoint_under_get_output_dir_and_points_the_best_there(tmp_path):
    """`_save_checkpoint(model, trial)` writes all of `checkpoint-N` into `_get_output_dir(trial)`, nothing into
    output_dir, and points `best_model_checkpoint` there: what the atomic save (`atomic_checkpoint_save`) relies on.
    If transformers changes this, atomic saves would silently stop being atomic: this test fails instead."""
    staging = tmp_path / "staging"

    class StagingTrainer(Trainer):
        def _get_output_dir(self, trial) -> str:
            return str(staging)

    args = plain_args(
        tmp_path, max_steps=1, save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
        metric_for_best_model="loss",
    )  # fmt: skip
    model = tiny_model(ViTForImageClassification, "sdpa").train()
    trainer = StagingTrainer(model=model, args=args, train_dataset=image_dataset(8), eval_dataset=image_dataset(4, 1))
    trainer.train()

    written = {path.name for path in (staging / "checkpoint-1").iterdir()}
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json", "training_args.bin"} <= written  # fmt: skip
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert trainer.state.best_model_checkpoint == str(staging / "checkpoint-1")


class _RecordingTrainer(Trainer):
    """Records how Trainer calls the load methods."""

    calls: list

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.calls.append(("_load_from_checkpoint", resume_from_checkpoint, model))
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        self.calls.append(("_load_best_model", self.state.best_model_checkpoint))
        return super()._load_best_model()


def test_trainer_loads_through_load_from_checkpoint_and_load_best_model(tmp_path):
    """`train(resume_from_checkpoint=path)` loads the weights through `_load_from_checkpoint(path)` before the
    first step, and `load_best_model_at_end` through `_load_best_model()` with `state.best_model_checkpoint` set:
    the two places `TLAlignTrainer` loads with the key conversion of `from_pretrained`."""
    args = plain_args(
        tmp_path, save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
        load_best_model_at_end=True, metric_for_best_model="loss",
    )  # fmt: skip
    datasets = dict(train_dataset=image_dataset(8), eval_dataset=image_dataset(4, 1))
    trainer = _RecordingTrainer(model=tiny_model(ViTForImageClassification, "sdpa").train(), args=args, **datasets)
    trainer.calls = []
    trainer.train()
    assert trainer.calls == [("_load_best_model", trainer.state.best_model_checkpoint)]
    assert trainer.state.best_model_checkpoint in (str(tmp_path / "out" / f"checkpoint-{step}") for step in (1, 2))

    checkpoint = str(tmp_path / "out" / "checkpoint-1")
    resumed = _RecordingTrainer(
        model=tiny_model(ViTForImageClassification, "sdpa").train(), args=plain_args(tmp_path / "resumed"), **datasets
    )
    resumed.calls, loaded_at_first_step = [], []
    resumed.compute_loss = lambda *arguments, **kwargs: (
        loaded_at_first_step.append(list(resumed.calls)) or Trainer.compute_loss(resumed, *arguments, **kwargs)
    )
    resumed.train(resume_from_checkpoint=checkpoint)
    assert loaded_at_first_step[0] == [("_load_from_checkpoint", checkpoint, None)]


def test_trainer_still_loads_checkpoints_without_the_key_conversion_of_from_pretrained(tmp_path):
    """Why `_load_from_checkpoint` and `_load_best_model` are overridden: transformers 5.25 saves ViT's weights
    under converted names, and Trainer loads the file as it is (`strict=False`), so nothing is restored. If this
    test fails, transformers converts the keys itself: drop the two overrides (and `load_saved_weights`)."""
    saved = tiny_model(ViTForImageClassification, "sdpa", seed=0)
    saved.save_pretrained(tmp_path / "checkpoint")
    fresh = tiny_model(ViTForImageClassification, "sdpa", seed=1)
    trainer = Trainer(model=fresh, args=plain_args(tmp_path))
    Trainer._load_from_checkpoint(trainer, str(tmp_path / "checkpoint"))
    assert weights_digest(fresh) != weights_digest(saved)

    aligned = TLAlignTrainer(model=tiny_model(ViTForImageClassification, "sdpa", seed=1), args=plain_args(tmp_path))
    aligned._load_from_checkpoint(str(tmp_path / "checkpoint"))
    assert weights_digest(aligned.model) == weights_digest(saved)


def test_get_train_dataloader_takes_its_sampler_from_get_train_sampler(tmp_path):
    """`get_train_dataloader` draws the order from `_get_train_sampler(dataset)` and batches it by
    `_train_batch_size`: how the repeated-augmentation sampler reaches Trainer's loader."""
    order = [5, 5, 2, 7, 0, 0, 3, 1]

    class FixedOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            assert len(train_dataset) == 8
            return order

    trainer = FixedOrderTrainer(
        model=tiny_model(ViTForImageClassification, "sdpa"), args=plain_args(tmp_path), train_dataset=image_dataset(8)
    )
    assert trainer._train_batch_size == 4
    batches = [batch["labels"].tolist() for batch in trainer.get_train_dataloader()]
    assert batches == [order[:4], order[4:]]  # image_dataset's label i is example i (8 < its 10 classes)


def test_trainer_makes_a_new_scheduler_in_train_when_created_lr_scheduler_is_set(tmp_path):
    """`TLAlignTrainer.create_scheduler` sets Trainer's private `_created_lr_scheduler`, as Trainer's own does, so
    that the next `train()` builds a new scheduler for its own number of steps instead of reusing the old one."""
    trainer = Trainer(
        model=tiny_model(ViTForImageClassification, "sdpa").train(), args=plain_args(tmp_path, max_steps=1),
        train_dataset=image_dataset(8),
    )  # fmt: skip
    trainer.create_optimizer()
    stale = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    trainer.lr_scheduler, trainer._created_lr_scheduler = stale, True
    trainer.train()
    assert trainer.lr_scheduler is not stale
