"""Top-1 and top-5 accuracy as an `evaluate` metric, loadable offline by path.

    metric = evaluate.load(tl_align_hf.support.metrics.ACCURACY_METRIC_PATH)
    metric.compute(predictions=logits, references=labels)  # {"accuracy": ..., "top5_accuracy": ...}
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 and top-k accuracy of classification logits: the share of samples whose label is among the k highest logits."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): `(N, C)` logits or scores.
    references (`list` of `int`): `(N,)` true class indices.
    top_k (`int`, defaults to 5): the k of the second accuracy reported (capped at C).
Returns:
    accuracy (`float`): top-1 accuracy in [0, 1].
    top{k}_accuracy (`float`): top-k accuracy in [0, 1].
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, top_k=5):
        logits = np.asarray(predictions, dtype=np.float32)
        labels = np.asarray(references, dtype=np.int64)
        if logits.ndim != 2 or len(logits) != len(labels):
            raise ValueError(
                f"`predictions` must be (N, C) logits for the N `references`; got shapes {logits.shape} and {labels.shape}."
            )
        k = min(top_k, logits.shape[1])
        top_k_classes = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        hits = top_k_classes == labels[:, None]
        return {"accuracy": float(hits[:, 0].mean()), f"top{top_k}_accuracy": float(hits.any(axis=1).mean())}
