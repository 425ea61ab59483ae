"""`evaluate` metrics shipped inside the package, so that evaluation needs no Hub access."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

ACCURACY_METRIC_PATH = str(Path(__file__).parent / "accuracy")


@functools.cache
def load_accuracy_metric():
    """The top-1/top-5 accuracy metric, loaded once from the package (no network), kept in memory.

    In memory, so that processes of a distributed run never share the metric's cache files.
    """
    import evaluate

    return evaluate.load(ACCURACY_METRIC_PATH, keep_in_memory=True)


def compute_accuracy_metrics(eval_prediction) -> dict[str, float]:
    """`compute_metrics` for Trainer: top-1 and top-5 accuracy of an `EvalPrediction` of `(N, C)` logits."""
    predictions = eval_prediction.predictions
    if isinstance(predictions, tuple):  # models with several heads: the first entry is the combined logits
        predictions = predictions[0]
    return load_accuracy_metric().compute(predictions=np.asarray(predictions), references=eval_prediction.label_ids)
