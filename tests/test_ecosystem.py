"""`TLAlignTrainer` with the Trainer features users switch on: gradient checkpointing, bf16 on the CPU, a
`pipeline` on the saved output, TensorBoard logging. (`torch_compile=True` is tested in test_compile.py, unmixed
`predict` in test_trainer.py.)
"""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTForImageClassification, pipeline

from tl_align_hf import TLAlignTrainer
from tl_align_hf.support.transforms import default_image_processor

from .test_trainer import IMAGE, assert_every_parameter_changed, image_dataset, make_args
from .tiny_models import tiny_model


def train_logs(trainer: TLAlignTrainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_gradient_checkpointing_gives_the_same_aligned_lam_and_loss(tmp_path):
    """Recomputed blocks must not update the shares twice: the logs and weights equal those of a run without."""
    model = tiny_model(ViTForImageClassification, "sdpa").train()
    trainers = {}
    for checkpointing in (False, True):
        args = make_args(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, mixing_method="cutmix", optim="sgd")
        trainers[checkpointing] = TLAlignTrainer(model=copy.deepcopy(model), args=args, train_dataset=image_dataset())
        trainers[checkpointing].train()
    assert trainers[True].model.is_gradient_checkpointing and not trainers[False].model.is_gradient_checkpointing
    plain, checkpointed = train_logs(trainers[False]), train_logs(trainers[True])
    assert len(plain) == len(checkpointed) == 3
    for expected, got in zip(plain, checkpointed):
        for name in ("loss", "aligned_lam", "alignment_gap"):
            assert got[name] == pytest.approx(expected[name], rel=1e-5), name
    assert max(entry["alignment_gap"] for entry in plain) > 1e-4
    for name, parameter in trainers[False].model.named_parameters():
        torch.testing.assert_close(dict(trainers[True].model.named_parameters())[name], parameter, msg=name)


def test_train_with_bf16_on_cpu(tmp_path):
    """bf16 autocast on the CPU: the aligned shares stay float32 and close to a float32 run's."""
    model = tiny_model(ViTForImageClassification, "sdpa").train()
    runs = {}
    for bf16 in (False, True):
        args = make_args(tmp_path / str(bf16), bf16=bf16, mixing_method="cutmix", max_steps=2, optim="sgd")
        trainer = TLAlignTrainer(model=copy.deepcopy(model), args=args, train_dataset=image_dataset())
        trainer.train()
        runs[bf16] = trainer
    assert runs[True].accelerator.mixed_precision == "bf16"
    before = dict(model.named_parameters())
    assert_every_parameter_changed(runs[True].model, before)
    for expected, got in zip(train_logs(runs[False]), train_logs(runs[True])):
        assert np.isfinite(got["loss"]) and got["loss"] == pytest.approx(expected["loss"], abs=2e-2)
        assert got["aligned_lam"] == pytest.approx(expected["aligned_lam"], abs=1e-2)


def test_pipeline_on_the_saved_output(tmp_path):
    """The saved model and image processor make a transformers `pipeline` with the parent's predictions."""
    image_processor = default_image_processor(IMAGE)
    model = tiny_model(ViTForImageClassification, "sdpa").train()
    trainer = TLAlignTrainer(
        model=model, args=make_args(tmp_path), train_dataset=image_dataset(), processing_class=image_processor
    )
    trainer.train()
    trainer.save_model()
    output_dir = str(tmp_path / "out")
    classifier = pipeline("image-classification", model=output_dir, device="cpu")
    assert type(classifier.model) is ViTForImageClassification
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)) for _ in range(3)]
    predictions = classifier(images, top_k=2)
    with torch.no_grad():
        inputs = image_processor(images, return_tensors="pt")
        probabilities = trainer.model.eval()(inputs["pixel_values"]).logits.softmax(-1)
    for prediction, expected in zip(predictions, probabilities):
        top = expected.topk(2)
        assert [entry["label"] for entry in prediction] == [model.config.id2label[int(i)] for i in top.indices]
        np.testing.assert_allclose([entry["score"] for entry in prediction], top.values.numpy(), rtol=1e-5)


def test_tensorboard_receives_the_alignment_metrics(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = make_args(tmp_path, report_to="tensorboard", mixing_method="cutmix")  # events under output_dir/runs
    trainer = TLAlignTrainer(
        model=tiny_model(ViTForImageClassification, "sdpa").train(), args=args, train_dataset=image_dataset()
    )
    trainer.train()
    (event_dir,) = {path.parent for path in (tmp_path / "out").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(event_dir))
    events.Reload()
    logs = train_logs(trainer)
    for name in ("aligned_lam", "alignment_gap", "mix_lam", "loss"):
        scalars = events.Scalars(f"train/{name}")
        assert [event.step for event in scalars] == [entry["step"] for entry in logs], name
        np.testing.assert_allclose([event.value for event in scalars], [entry[name] for entry in logs], rtol=1e-6)
