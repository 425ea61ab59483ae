"""Model cards for TL-Align checkpoints, and pushing a saved checkpoint folder to the Hugging Face Hub.

A checkpoint saved from a `TLAlign*ForImageClassification` is a plain transformers checkpoint (its
`config.architectures` names the parent class), so the card tells users to load it with plain transformers.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCardData

PAPER_URL = "https://arxiv.org/abs/2210.06455"
CARD_TAGS = ["image-classification", "vision", "tl-align", "token-label-alignment"]
# Never pushed by `push_checkpoint_to_hub`: intermediate Trainer checkpoints and TensorBoard logs.
PUSH_IGNORE_PATTERNS = ["checkpoint-*/", "runs/"]
DEFAULT_COMMIT_MESSAGE = "Upload image classifier fine-tuned with TL-Align"

MIXING_METHOD_DESCRIPTIONS = {
    "cutmix": "CutMix: a box of pixels from a partner image (patch shares fractional at the box edges)",
    "token_cutmix": "CutMix with the box on the patch grid (the official TL-Align default)",
    "mixup": "Mixup: a blend of two images",
    "token_mix": "random patches taken from a partner image",
    "none": "no mixing",
}
# Trainer's speed metrics are about the machine, not the model: left out of the results table.
_SPEED_METRIC_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_CITATION = """@inproceedings{xiao2023tlalign,
  title     = {Token-Label Alignment for Vision Transformers},
  author    = {Xiao, Han and Zheng, Wenzhao and Zhu, Zheng and Zhou, Jie and Lu, Jiwen},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023}
}"""


def _hub_id_or_none(name: str | None) -> str | None:
    """`name` when it looks like a Hub repo id (`org/name` or `name`), `None` for local paths and empty values."""
    if not name or os.path.exists(name) or not _HUB_ID.fullmatch(name):
        return None
    return name


def _as_number(value: Any) -> float | None:
    """`value` as a finite float (Python, NumPy or 0-d tensor numbers), `None` for anything else."""
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None


def _numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of `metrics`, without Trainer's speed metrics."""
    numbers = {name: _as_number(value) for name, value in metrics.items() if not name.endswith(_SPEED_METRIC_SUFFIXES)}
    return {name: number for name, number in numbers.items() if number is not None}


def _accuracy_metrics(metrics: dict[str, float]) -> list[tuple[str, float, int]]:
    """`(name, value, k)` for top-k accuracies: `accuracy` is top-1, `top5_accuracy` top-5 (`eval_`/`test_` prefix
    allowed), ordered by k."""
    found = []
    for name, value in metrics.items():
        match = re.fullmatch(r"(?:eval_|test_)?(?:top(\d+)_)?accuracy", name)
        if match is not None:
            found.append((name, value, int(match.group(1) or 1)))
    return sorted(found, key=lambda item: item[2])


def _eval_results(metrics: dict[str, float], dataset: str | None) -> list[EvalResult]:
    """model-index entries for the accuracies in `metrics` (none when there is no accuracy)."""
    dataset_name = dataset or "custom"
    return [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=_hub_id_or_none(dataset) or "imagefolder",
            dataset_name=dataset_name,
            metric_type="accuracy",
            metric_name=f"Top-{k} accuracy",
            metric_config=None if k == 1 else f"top{k}",
            metric_value=value,
        )
        for _, value, k in _accuracy_metrics(metrics)
    ]


def _card_data(
    base_model: str | None, dataset: str | None, metrics: dict[str, float], model_name: str
) -> ModelCardData:
    """The YAML front matter: library, tags, base model and dataset (when Hub ids), accuracy as model-index."""
    eval_results = _eval_results(metrics, dataset)
    hub_dataset = _hub_id_or_none(dataset)
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=list(CARD_TAGS),
        base_model=_hub_id_or_none(base_model),
        datasets=[hub_dataset] if hub_dataset else None,
        metrics=["accuracy"] if eval_results else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )


def _mixing_method(mixing: dict[str, Any]) -> str | None:
    """The mixing method of a collator-kwargs (`method`) or config (`mixing_method`) dict."""
    return mixing.get("method", mixing.get("mixing_method"))


def _linked(name: str | None, hub_prefix: str, missing: str) -> str:
    """`name` as a link to its Hub page when it is a Hub id, as code otherwise, `missing` when there is none."""
    if _hub_id_or_none(name):
        return f"[`{name}`](https://huggingface.co/{hub_prefix}{name})"
    return f"`{name}`" if name else missing


def _intro(base_model: str | None, dataset: str | None, model_name: str, parent_class: str, tl_align: bool) -> str:
    """The title and the first paragraph: what the model is, where it comes from, how it was trained."""
    origin = f"fine-tuned from {_linked(base_model, '', '')}" if base_model else "trained from a fresh initialisation"
    data = _linked(dataset, "datasets/", "an image classification dataset")
    if tl_align:
        training = "with **Token-Label Alignment (TL-Align)** on mixed images"
    else:
        training = "with plain data mixing and area-proportional targets (the baseline of TL-Align)"
    return (
        f"# {model_name}\n\n"
        f"A `{parent_class}` image classifier {origin} on {data}, trained {training} "
        "using `tl-align-hf` (TL-Align for Hugging Face transformers).\n"
    )


def _method_section(tl_align: bool) -> str:
    """What TL-Align does, and why the checkpoint needs nothing extra at inference."""
    if tl_align:
        this_run = "This model was trained against the aligned target."
    else:
        this_run = "This model was **not** trained with alignment: it is the plain-mixing baseline."
    return (
        "## Token-Label Alignment\n\n"
        "Mixing augmentations (CutMix, Mixup, token mixing) build each training image from two images and usually "
        "mix the two labels by area. In a vision transformer, self-attention moves information between tokens, so "
        "the share of each image that reaches the class token drifts away from that area share. "
        f"[TL-Align]({PAPER_URL}) (Xiao et al., *Token-Label Alignment for Vision Transformers*, ICCV 2023, "
        "arXiv 2210.06455) traces each token's label share through every attention layer, using the attention "
        "weights the model already computes, and trains against the share that actually reaches the class token.\n\n"
        f"{this_run} TL-Align changes only the training target and adds no parameters, so the saved checkpoint is "
        "an ordinary transformers checkpoint and inference costs exactly what the base architecture costs.\n"
    )


def _settings_section(mixing: dict[str, Any], tl_align: bool, label_smoothing: float) -> str:
    """The training settings table: TL-Align, label smoothing and every mixing parameter."""
    rows = [
        ("TL-Align", "on (aligned targets)" if tl_align else "off (area-mixed targets, baseline)"),
        ("label smoothing", f"{label_smoothing:g}"),
    ]
    method = _mixing_method(mixing)
    if method is not None:
        rows.append(("mixing method", f"`{method}`: {MIXING_METHOD_DESCRIPTIONS.get(method, 'custom')}"))
    for name, value in mixing.items():
        if name not in ("method", "mixing_method"):
            rows.append((name, f"`{value}`"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"## Training settings\n\n| Setting | Value |\n|---|---|\n{table}\n"


def _results_section(metrics: dict[str, float]) -> str:
    """The evaluation results table (all numeric metrics but speed), or a note that there are none."""
    if not metrics:
        return "## Evaluation results\n\nNo evaluation results were recorded for this checkpoint.\n"
    table = "\n".join(f"| {name} | {value:.4g} |" for name, value in metrics.items())
    return f"## Evaluation results\n\n| Metric | Value |\n|---|---|\n{table}\n"


def _usage_section(repo_id: str | None, parent_class: str, model_class_name: str) -> str:
    """How to run the model with plain transformers, and how to keep training it with TL-Align."""
    source = repo_id or "path/to/this/checkpoint"
    return f"""## How to use

The checkpoint loads with plain transformers as a `{parent_class}`; `tl_align_hf` is not needed at inference.

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{source}")
model = AutoModelForImageClassification.from_pretrained("{source}")

image = Image.open("image.jpg").convert("RGB")
inputs = processor(images=image, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
print(model.config.id2label[logits.argmax(-1).item()])
```

To fine-tune it further with TL-Align, load it with `tl_align_hf.{model_class_name}.from_pretrained("{source}")`.
"""


def model_card_text(
    *,
    base_model: str | None,
    dataset: str | None,
    mixing: dict,
    tl_align: bool,
    label_smoothing: float,
    metrics: dict,
    model_class_name: str,
    repo_id: str | None,
) -> str:
    """A Hub README.md for a checkpoint trained with tl-align-hf.

    Args:
        base_model: Hub id (or local path) the model was fine-tuned from; `None` for a fresh initialisation.
            Only Hub ids go into the front matter.
        dataset: Hub dataset id (or local name/path) trained on; only Hub ids go into the front matter.
        mixing: the mixing settings, e.g. `TLAlignConfig.collator_kwargs()` (`method` or `mixing_method`, alphas,
            probabilities, mode); every entry is listed.
        tl_align: whether training used the aligned target (`False`: the plain-mixing baseline).
        label_smoothing: smoothing of each one-hot before mixing, in [0, 1).
        metrics: final evaluation metrics, e.g. `{"eval_accuracy": 0.93, "eval_top5_accuracy": 0.99}`. Top-k
            accuracies (`[eval_|test_][topK_]accuracy`) also go into the front matter's `model-index`.
        model_class_name: the training class, e.g. `"TLAlignViTForImageClassification"`; the card names the plain
            transformers class it saves as (`"ViTForImageClassification"`).
        repo_id: the Hub repo the card is for (used in the usage snippet and as the model name).

    Returns:
        The README.md text: YAML front matter (`library_name: transformers`, tags `image-classification`,
        `vision`, `tl-align`, `token-label-alignment`, `base_model`, `datasets`, `model-index`), then the model
        description, TL-Align, training settings, evaluation results, usage and citation.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing}.")
    parent_class = model_class_name.removeprefix("TLAlign")
    model_name = repo_id.split("/")[-1] if repo_id else f"{parent_class}-tl-align"
    numeric_metrics = _numeric_metrics(metrics)
    card_data = _card_data(base_model, dataset, numeric_metrics, model_name)
    sections = [
        _intro(base_model, dataset, model_name, parent_class, tl_align),
        _method_section(tl_align),
        _settings_section(mixing, tl_align, label_smoothing),
        _results_section(numeric_metrics),
        _usage_section(repo_id, parent_class, model_class_name),
        f"## Citation\n\n```bibtex\n{_CITATION}\n```\n",
    ]
    return f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(sections)


def write_model_card(output_dir: str | Path, **card_fields: Any) -> Path:
    """Write `model_card_text(**card_fields)` to `output_dir/README.md` (replacing it) and return that path."""
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(model_card_text(**card_fields), encoding="utf-8")
    return path


def push_checkpoint_to_hub(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    revision: str | None = None,
) -> str:
    """Upload a saved checkpoint folder (weights, config, image processor, README.md) to a Hub model repo.

    Creates the repo if needed (`exist_ok`), and the branch `revision` if given, then uploads the folder in one
    commit, leaving out `checkpoint-*/` subfolders and `runs/`. Files identical to those on the Hub are not sent
    again; when nothing changed no commit is made and the current head is returned.

    Args:
        folder: the directory written by `save_pretrained` (and `write_model_card`).
        repo_id: `"namespace/name"`, or `"name"` for the token's own namespace.
        token: a Hub token with write access; `None` uses the saved login (`hf auth login`) or `HF_TOKEN`.
        private: create the repo as private (no effect when it exists).
        commit_message: the commit title.
        revision: branch to push to (created from `main` when missing); `None` pushes to `main`.

    Returns:
        The URL of the commit on the Hub (it ends with the commit id).

    Raises:
        NotADirectoryError: `folder` is not a directory.
        huggingface_hub.errors.HfHubHTTPError: the Hub refused, e.g. status 401 for a missing or invalid token.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"`folder` must be a checkpoint directory written by save_pretrained: {folder}")
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_url.repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_url.repo_id,
        folder_path=folder,
        commit_message=commit_message,
        revision=revision,
        ignore_patterns=list(PUSH_IGNORE_PATTERNS),
    )
    return str(commit.commit_url)
