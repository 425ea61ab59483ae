"""Iterable datasets: `datasets`' streaming datasets (column names unknown) and torch's, with DataLoader workers.

They cannot be scanned, so the labels are checked where the data is, batch by batch in the collator; the mixing
draws are a function of the batch's content, so runs over a stream repeat exactly.
"""

import datasets
import numpy as np
import pytest
import torch
from transformers import ViTForImageClassification

from tl_align_hf import TLAlignTrainer

from .test_trainer import assert_every_parameter_changed, image_dataset, make_args
from .tiny_models import NUM_LABELS, tiny_model


def _to_tensors(example):
    return {"pixel_values": torch.tensor(np.asarray(example["pixel_values"], dtype=np.float32)), "labels": example["label"]}


def streaming_dataset(num_examples: int = 24, seed: int = 0) -> datasets.IterableDataset:
    """`Dataset.to_iterable_dataset().map(transform, remove_columns=...)`: a stream whose column names are unknown."""
    raw = image_dataset(num_examples, seed).with_format(None)
    return raw.to_iterable_dataset().map(_to_tensors, remove_columns=["pixel_values", "label"])


class ShardedImages(torch.utils.data.IterableDataset):
    """A plain torch iterable dataset that shards its examples over DataLoader workers, as torch's docs advise."""

    def __init__(self, num_examples: int = 24, seed: int = 0, label_offset: int = 0):
        self.examples = image_dataset(num_examples, seed)
        self.label_offset = label_offset

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        start, step = (0, 1) if worker is None else (worker.id, worker.num_workers)
        for index in range(start, len(self.examples), step):
            example = self.examples[index]
            yield {"pixel_values": example["pixel_values"], "label": int(example["label"]) + self.label_offset}


def _train(tmp_path, train_dataset, eval_dataset=None, **overrides):
    model = tiny_model(ViTForImageClassification, "sdpa").train()
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    args = make_args(tmp_path, mixing_method="cutmix", **overrides)
    trainer = TLAlignTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset)
    trainer.train()
    return trainer, before


def test_train_with_datasets_streaming_dataset(tmp_path):
    train_dataset = streaming_dataset()
    assert train_dataset.column_names is None  # what made the constructor fail
    trainer, before = _train(tmp_path, train_dataset, streaming_dataset(12, seed=1), max_steps=8)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 8 and all(np.isfinite(entry["loss"]) and "aligned_lam" in entry for entry in logs)
    assert_every_parameter_changed(trainer.model, before)
    assert trainer.data_collator.epoch == 1  # 6 batches per pass: the 7th starts the second epoch, drawn anew
    assert (logs[6]["mix_lam"], logs[7]["mix_lam"]) != (logs[0]["mix_lam"], logs[1]["mix_lam"])  # same batches
    streamed = trainer.evaluate()
    mapped = trainer.evaluate(image_dataset(12, seed=1))  # the same examples, as a map-style dataset
    assert {"eval_loss", "eval_accuracy", "eval_top5_accuracy"} <= set(streamed)
    for name in ("eval_loss", "eval_accuracy", "eval_top5_accuracy"):
        assert streamed[name] == pytest.approx(mapped[name], rel=1e-6)


def test_train_with_torch_iterable_dataset_and_workers_repeats_exactly(tmp_path):
    weights = []
    for run in ("first", "second"):
        trainer, before = _train(tmp_path / run, ShardedImages(), ShardedImages(12, seed=1), max_steps=4, dataloader_num_workers=2)
        assert_every_parameter_changed(trainer.model, before)
        metrics = trainer.evaluate()
        assert {"eval_loss", "eval_accuracy", "eval_top5_accuracy"} <= set(metrics) and np.isfinite(metrics["eval_loss"])
        weights.append({name: tensor.clone() for name, tensor in trainer.model.state_dict().items()})
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_raises_error_when_a_stream_has_labels_outside_the_model_classes(tmp_path, split):
    bad = ShardedImages(8, label_offset=NUM_LABELS)  # labels 10..17 for a model of 10 classes
    model = tiny_model(ViTForImageClassification, "sdpa").train()
    datasets_ = {"train_dataset": bad} if split == "train" else {"train_dataset": ShardedImages(8), "eval_dataset": bad}
    trainer = TLAlignTrainer(model=model, args=make_args(tmp_path, max_steps=1), **datasets_)  # nothing to scan
    match = rf"labels \[{NUM_LABELS}, .*\] are outside the model's classes \[0, {NUM_LABELS}\) \(in 'label'\)"
    with pytest.raises(ValueError, match=match):
        trainer.train() if split == "train" else trainer.evaluate()


@pytest.mark.parametrize("streaming", [False, True], ids=["map_style", "streaming"])
def test_raises_error_when_the_class_label_feature_has_more_classes_than_the_model(tmp_path, streaming):
    """Read from the features alone, before training: cheap, and known for streaming datasets too."""
    dataset = image_dataset(4).with_format(None)
    dataset = dataset.cast_column("label", datasets.ClassLabel(num_classes=NUM_LABELS + 2))
    dataset = dataset.to_iterable_dataset() if streaming else dataset
    with pytest.raises(ValueError, match=rf"eval_dataset has {NUM_LABELS + 2} classes in its label column 'label'"):
        TLAlignTrainer(model=tiny_model(ViTForImageClassification), args=make_args(tmp_path), eval_dataset=dataset)
