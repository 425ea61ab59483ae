"""Model cards for TL-Align checkpoints, on huggingface_hub's `ModelCard`, and pushing a checkpoint folder to the Hub.

`tl_align_model_card(trainer)` starts from what transformers' `Trainer` puts into its own card
(`transformers.modelcard.TrainingSummary.from_trainer`: model name, base model, tasks, datasets, tags,
hyperparameters, evaluation results and the training log table) and adds the TL-Align parts: what TL-Align does,
every mixing setting, how to load the checkpoint with plain transformers, and the citation. The front matter is a
`ModelCardData` (library, pipeline tag, tags `tl-align` and `token-label-alignment`, base model, datasets, and the
accuracies as `model-index`); the text is rendered from `MODEL_CARD_TEMPLATE` by `ModelCard.from_template`.
`model_card(...)` makes the same card from explicit values, for training loops without a `Trainer`.

A checkpoint saved from a `TLAlign*ForImageClassification` is a plain transformers checkpoint (its
`config.architectures` names the parent class), so the card tells users to load it with plain transformers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers.modelcard import TrainingSummary, make_markdown_table

from ..config import TLAlignConfig

if TYPE_CHECKING:
    from transformers import Trainer

PAPER_URL = "https://arxiv.org/abs/2210.06455"
CARD_TAGS = ["image-classification", "vision", "tl-align", "token-label-alignment"]
# The mixing fields of `TLAlignConfig`, in the order the card lists them.
MIXING_FIELDS = (
    "mixing_method", "mixup_alpha", "cutmix_alpha", "cutmix_minmax", "mix_prob", "switch_prob", "mix_mode", "correct_lam"
)  # fmt: skip
# Never pushed by `push_checkpoint_to_hub`: intermediate Trainer checkpoints and TensorBoard logs.
PUSH_IGNORE_PATTERNS = ["checkpoint-*/", "step_*/", "epoch_*/", "runs/"]  # Trainer and no-Trainer checkpoints
DEFAULT_COMMIT_MESSAGE = "Upload image classifier fine-tuned with TL-Align"
MIXING_METHOD_DESCRIPTIONS = {
    "cutmix": "CutMix: a box of pixels from a partner image (patch shares fractional at the box edges)",
    "token_cutmix": "CutMix with the box on the patch grid (the official TL-Align default)",
    "mixup": "Mixup: a blend of two images",
    "token_mix": "random patches taken from a partner image",
    "none": "no mixing",
}
# Not about the model: left out of the results (Trainer's speed metrics, and where in training they were taken).
_NOT_RESULTS = re.compile(r"(.*(runtime|samples_per_second|steps_per_second|preparation_time))|epoch|step|total_flos")
_ACCURACY = re.compile(r"(?:eval_|test_)?(?:top(\d+)_)?accuracy")
_FRAMEWORKS = {"Transformers": "transformers", "PyTorch": "torch", "Datasets": "datasets",
               "huggingface_hub": "huggingface_hub", "tl-align-hf": "tl-align-hf"}  # name -> distribution
_CITATION = """@inproceedings{xiao2023tlalign,
  title     = {Token-Label Alignment for Vision Transformers},
  author    = {Xiao, Han and Zheng, Wenzhao and Zhu, Zheng and Zhou, Jie and Lu, Jiwen},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023}
}"""

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

## Token-Label Alignment

Mixing augmentations (CutMix, Mixup, token mixing) build each training image from two images and usually mix the two \
labels by area. In a vision transformer, self-attention moves information between tokens, so the share of each image \
that reaches the class token drifts away from that area share. [TL-Align]({{ paper_url }}) (Xiao et al., *Token-Label \
Alignment for Vision Transformers*, ICCV 2023, arXiv 2210.06455) traces each token's label share through every \
attention layer, using the attention weights the model already computes, and trains against the share that actually \
reaches the class token.

{{ this_run }}TL-Align changes only the training target and adds no parameters, so the saved checkpoint is an \
ordinary transformers checkpoint and inference costs exactly what the base architecture costs.

## Training procedure

### TL-Align and mixing settings
{% if settings %}
| Setting | Value |
|---|---|
{% for name, value in settings %}| {{ name }} | {{ value }} |
{% endfor %}{% else %}
Not recorded: no record of how these weights were trained was found with them.
{% endif %}
### Training hyperparameters
{% if hyperparameters %}
The following hyperparameters were used during training:

{% for name, value in hyperparameters.items() %}- {{ name }}: {{ value }}
{% endfor %}{% else %}
No training hyperparameters were recorded.
{% endif %}{% if training_results %}
### Training results

{{ training_results }}{% endif %}
## Evaluation results
{% if results %}
| Metric | Value |
|---|---|
{% for name, value in results.items() %}| {{ name }} | {{ "%.4g" | format(value) }} |
{% endfor %}{% else %}
No evaluation results were recorded for this checkpoint.
{% endif %}
## How to use

The checkpoint loads with plain transformers as a `{{ parent_class }}`; `tl_align_hf` is not needed at inference.

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{{ source }}")
model = AutoModelForImageClassification.from_pretrained("{{ source }}")

image = Image.open("image.jpg").convert("RGB")
inputs = processor(images=image, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
print(model.config.id2label[logits.argmax(-1).item()])
```

To keep training it with TL-Align, pass the loaded model to `tl_align_hf.TLAlignTrainer`: it converts the model in \
place, adding no weights.

## Citation

```bibtex
{{ citation }}
```

## Framework versions

{% for name, version in versions %}- {{ name }} {{ version }}
{% endfor %}"""


def _hub_dataset_or_none(name: Any) -> str | None:
    """`name` when it can be a Hub dataset id: a Hub repo id that is neither a local path nor one of the builders
    `datasets` ships for local files (`imagefolder`, `csv`, `json`, ...)."""
    return None if name in _PACKAGED_DATASETS_MODULES else _hub_id_or_none(name)


def _hub_id_or_none(name: Any) -> str | None:
    """`name` when it is a Hub repo id (`namespace/name` or `name`), `None` for local paths and empty values."""
    if not name or not isinstance(name, str) or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _as_list(value: str | list[str] | None) -> list[str]:
    """`value` as a list of its non-empty entries (one string becomes a one-item list)."""
    values = [value] if isinstance(value, str) else list(value or [])
    return [item for item in values if item]


def _numeric_results(metrics: dict[str, Any] | None) -> dict[str, float]:
    """The finite numeric entries of `metrics`, without speed metrics and the epoch/step they were taken at."""
    results = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, (bool, str, bytes)) or _NOT_RESULTS.fullmatch(name.lower().replace(" ", "_")):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            continue
        if math.isfinite(number):
            results[name] = number
    return results


def _accuracy_results(
    results: dict[str, float], dataset_name: str | None, dataset_type: str | None, dataset_config: str | None
) -> list[EvalResult]:
    """model-index entries for the top-k accuracies among `results` (`accuracy`, `Top5 Accuracy`, `eval_...`)."""
    accuracies = {}
    for name, value in results.items():
        if match := _ACCURACY.fullmatch(name.lower().replace(" ", "_")):
            accuracies[int(match.group(1) or 1)] = value
    return [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset_type or _hub_id_or_none(dataset_name) or "imagefolder",
            dataset_name=dataset_name or "custom",
            dataset_config=dataset_config,
            metric_type="accuracy",
            metric_name=f"Top-{k} accuracy",
            metric_config=None if k == 1 else f"top{k}",
            metric_value=accuracies[k],
        )
        for k in sorted(accuracies)
    ]


def _linked(name: str, hub_prefix: str) -> str:
    """`name` as a link to its Hub page when it is a Hub id, as code otherwise."""
    return f"[`{name}`](https://huggingface.co/{hub_prefix}{name})" if _hub_id_or_none(name) else f"`{name}`"


def _settings_rows(mixing: dict[str, Any], tl_align: bool, label_smoothing: float) -> list[tuple[str, str]]:
    """The rows of the settings table: TL-Align, label smoothing and every mixing setting."""
    rows = [
        ("TL-Align", "on (aligned targets)" if tl_align else "off (area-mixed targets, the baseline)"),
        ("label smoothing", f"{label_smoothing:g}"),
    ]
    for name, value in mixing.items():
        description = MIXING_METHOD_DESCRIPTIONS.get(value, "custom") if name == "mixing_method" else None
        rows.append((name, f"`{value}`: {description}" if description else f"`{value}`"))
    return rows


def _framework_versions() -> list[tuple[str, str]]:
    """The installed versions of the libraries a checkpoint is trained and loaded with."""
    versions = []
    for name, distribution in _FRAMEWORKS.items():
        try:
            versions.append((name, metadata.version(distribution)))
        except metadata.PackageNotFoundError:
            pass
    return versions


def _check_settings(mixing: dict[str, Any], label_smoothing: float) -> None:
    """ValueError naming the setting unless `mixing` holds only mixing fields and `label_smoothing` is in [0, 1)."""
    unknown = sorted(set(mixing) - set(MIXING_FIELDS))
    if unknown:
        raise ValueError(f"`mixing` has unknown settings {unknown}; use the TLAlignConfig fields {list(MIXING_FIELDS)}.")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not 0 <= label_smoothing < 1:
        raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing!r}.")


def model_card(
    *,
    model_class_name: str,
    mixing: dict[str, Any] | None,
    tl_align: bool | None,
    label_smoothing: float | None,
    finetuned_from: str | None = None,
    dataset: str | list[str] | None = None,
    hyperparameters: dict[str, Any] | None = None,
    eval_results: dict[str, Any] | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset_config: str | None = None,
    tags: str | list[str] | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    training_results: str | None = None,
) -> ModelCard:
    """The Hub model card of a checkpoint trained with tl-align-hf, from explicit values: what a training loop
    without a `Trainer` (the no-Trainer example) knows; `tl_align_model_card` fills it from a `Trainer`.

    Args:
        model_class_name: the class trained, e.g. `"TLAlignViTForImageClassification"`; the card names the plain
            transformers class the checkpoint loads as (`"ViTForImageClassification"`).
        mixing: the mixing settings, keyed by the `TLAlignConfig` fields (`mixing_method`, `mixup_alpha`,
            `cutmix_alpha`, `cutmix_minmax`, `mix_prob`, `switch_prob`, `mix_mode`, `correct_lam`); all are listed.
        tl_align: whether training used the aligned target (`False`: the plain-mixing baseline). `None`: how the
            weights were trained is not known (a card made after evaluation only, with no record of the training):
            the card then claims no training (no origin, settings, hyperparameters or TL-Align tags), and
            `mixing`, `label_smoothing` and `hyperparameters` are ignored.
        label_smoothing: smoothing of each one-hot before mixing, in [0, 1).
        finetuned_from: the Hub id (or local path) of the starting checkpoint; `None`: trained from scratch.
        dataset: dataset name(s) or Hub id(s); only Hub datasets are linked (not local folders, nor the builders
            `datasets` ships for local files, such as `imagefolder`).
        hyperparameters: `{name: value}` listed under "Training hyperparameters".
        eval_results: final evaluation metrics, e.g. `{"eval_accuracy": 0.93, "eval_top5_accuracy": 0.99}`;
            speed metrics are left out, top-k accuracies also go into the `model-index`.
        repo_id: the Hub repo the card is for (the usage snippet, and the default model name).
        model_name, dataset_tags, dataset_config, tags, language, license: front matter, as in
            `Trainer.create_model_card` (`dataset_tags` default to the Hub ids among `dataset`; only Hub dataset ids
            are kept).
        training_results: a markdown table of the evaluations during training.

    Raises:
        ValueError: `mixing` has a key that is not a mixing field, or `label_smoothing` is outside [0, 1).
    """
    recorded = tl_align is not None
    if recorded:
        _check_settings(mixing, label_smoothing)
    parent_class = model_class_name.removeprefix("TLAlign")
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else f"{parent_class}-tl-align")
    datasets = _as_list(dataset)
    hub_datasets = [name for name in _as_list(dataset_tags) or datasets if _hub_dataset_or_none(name)]
    results = _numeric_results(eval_results)
    model_index = _accuracy_results(results, next(iter(datasets), None), next(iter(hub_datasets), None), dataset_config)
    card_data = ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=list(dict.fromkeys([*_as_list(tags), *(CARD_TAGS if recorded else CARD_TAGS[:2])])),
        base_model=_hub_id_or_none(finetuned_from) if recorded else None,
        datasets=hub_datasets or None,
        metrics=["accuracy"] if model_index else None,
        model_name=model_name if model_index else None,
        eval_results=model_index or None,
    )
    linked = [_linked(name, "datasets/") if name in hub_datasets else f"`{name}`" for name in datasets]
    dataset_text = " and ".join(linked) or "an image classification dataset"
    origin = f"fine-tuned from {_linked(finetuned_from, '')}" if finetuned_from else "trained from scratch"
    if not recorded:
        summary = (
            f"A `{parent_class}` image classifier, evaluated on {dataset_text} with `tl-align-hf` (TL-Align for Hugging "
            "Face transformers). How its weights were trained was not recorded with them, so this card lists no "
            "training settings."
        )
        this_run = ""
    else:
        if tl_align:
            training = "**Token-Label Alignment (TL-Align)** on mixed images"
            this_run = "It was trained against the aligned target. "
        else:
            training = "plain data mixing and area-proportional targets (the baseline of TL-Align)"
            this_run = "It was **not** trained with alignment: it is the plain-mixing baseline. "
        summary = (
            f"A `{parent_class}` image classifier {origin} on {dataset_text}, with {training} (`tl-align-hf`: TL-Align "
            "for Hugging Face transformers)."
        )
    return ModelCard.from_template(
        card_data,
        template_str=MODEL_CARD_TEMPLATE,
        model_name=model_name,
        parent_class=parent_class,
        summary=summary,
        this_run=this_run,
        paper_url=PAPER_URL,
        settings=_settings_rows(mixing, tl_align, label_smoothing) if recorded else None,
        hyperparameters=hyperparameters if recorded else None,
        training_results=training_results,
        results=results,
        source=repo_id or "path/to/this/checkpoint",
        citation=_CITATION,
        versions=_framework_versions(),
    )


def _training_settings(args: Any) -> tuple[dict[str, Any], bool, float]:
    """The mixing settings, `tl_align` and `label_smoothing` of `args`; `TLAlignConfig`'s defaults for the fields
    that `args` lacks (a plain `TrainingArguments`)."""
    defaults = {item.name: item.default for item in dataclasses.fields(TLAlignConfig)}
    values = {name: getattr(args, name, defaults[name]) for name in (*MIXING_FIELDS, "tl_align", "label_smoothing")}
    return {name: values[name] for name in MIXING_FIELDS}, values["tl_align"], values["label_smoothing"]


def tl_align_model_card(
    trainer: Trainer,
    *,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
    tags: str | list[str] | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    mixing: dict[str, Any] | None = None,
    tl_align: bool | None = None,
    label_smoothing: float | None = None,
    hyperparameters: dict[str, Any] | None = None,
    training_recorded: bool = True,
) -> ModelCard:
    """The Hub model card (README.md) of a model trained by `trainer` with tl-align-hf (see `model_card`).

    The keyword arguments up to `license` are those of `Trainer.create_model_card`, and are used as transformers
    uses them (`TrainingSummary.from_trainer`): defaults for the base model (the model's `name_or_path` when it is
    not a local folder), the model name (the name of `output_dir`) and the dataset tags (a `datasets` split's
    builder); the tag `generated_from_trainer` is added. Save the card with
    `tl_align_model_card(trainer, **kwargs).save(os.path.join(trainer.args.output_dir, "README.md"))`.

    Args:
        trainer: a `transformers.Trainer` (e.g. a `TLAlignTrainer`) after training and evaluation; its
            `state.log_history` gives the results and the training log table, its `args` the hyperparameters and
            the TL-Align settings (`mixing_method`, ..., `tl_align`, `label_smoothing`; `TLAlignConfig`'s defaults
            for the ones a plain `TrainingArguments` lacks).
        model_name, finetuned_from, tasks, dataset, dataset_tags, dataset_args, tags, language, license: as in
            `Trainer.create_model_card`. `tasks` defaults to `"image-classification"`.
        mixing: mixing settings that override `trainer.args`, keyed by the `TLAlignConfig` fields
            (`mixing_method`, `mixup_alpha`, `cutmix_alpha`, `cutmix_minmax`, `mix_prob`, `switch_prob`,
            `mix_mode`, `correct_lam`).
        tl_align: overrides `trainer.args.tl_align` (whether training used the aligned target).
        label_smoothing: overrides `trainer.args.label_smoothing`, in [0, 1).
        hyperparameters: override the hyperparameters `trainer.args` give (e.g. those recorded with weights that
            `trainer` only evaluated); `{}`: none recorded.
        training_recorded: `False` when the weights were not trained by `trainer` and nothing records how they were
            trained: the card then claims no training settings and no hyperparameters (see `model_card`).

    Returns:
        A `huggingface_hub.ModelCard`. `card.data` holds `library_name: transformers`,
        `pipeline_tag: image-classification`, the tags (the Trainer's, then `image-classification`, `vision`,
        `tl-align`, `token-label-alignment`), `base_model` (Hub ids only), `datasets` and the top-k accuracies as
        `model-index`; the text has the TL-Align section, the settings table, the hyperparameters, the training
        log, the evaluation results, how to load the checkpoint with plain transformers, and the citation.

    Raises:
        ValueError: `mixing` has a key that is not a mixing field, or `label_smoothing` is outside [0, 1).
    """
    args_mixing, args_tl_align, args_label_smoothing = _training_settings(trainer.args)
    mixing = {**args_mixing, **(mixing or {})}
    tl_align = args_tl_align if tl_align is None else tl_align
    label_smoothing = args_label_smoothing if label_smoothing is None else label_smoothing
    if training_recorded:
        _check_settings(mixing, label_smoothing)  # before `from_trainer`, which may ask the Hub for a license
    summary = TrainingSummary.from_trainer(
        trainer,
        language=language,
        license=license,
        tags=_as_list(tags) or None,  # a copy: from_trainer appends to it
        model_name=model_name,
        finetuned_from=finetuned_from,
        tasks=tasks if tasks is not None else "image-classification",
        dataset_tags=dataset_tags,
        dataset=dataset,
        dataset_args=dataset_args,
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model_card(
        model_class_name=getattr(model, "tl_align_parent", type(model)).__name__,  # what the checkpoint loads as
        mixing=mixing,
        tl_align=tl_align if training_recorded else None,
        label_smoothing=label_smoothing,
        finetuned_from=summary.finetuned_from or None,
        dataset=summary.dataset,
        hyperparameters=summary.hyperparameters if hyperparameters is None else hyperparameters,
        eval_results=summary.eval_results,
        repo_id=getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id,
        model_name=summary.model_name,
        dataset_tags=summary.dataset_tags,
        dataset_config=next(iter(_as_list(summary.dataset_args)), None),
        tags=summary.tags,
        language=summary.language,
        license=summary.license,
        training_results=make_markdown_table(summary.eval_lines) if summary.eval_lines else None,
    )


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
    commit (`HfApi.upload_folder`), leaving out `checkpoint-*/` subfolders and `runs/`. Files identical to those on
    the Hub are not sent again; when nothing changed no commit is made and the current head is returned.

    Args:
        folder: the directory written by `save_pretrained` (and the model card).
        repo_id: `"namespace/name"`, or `"name"` for the token's own namespace.
        token: a Hub token with write access; `None` uses the saved login (`hf auth login`) or `HF_TOKEN`.
        private: create the repo as private (no effect when it exists).
        commit_message: the commit title.
        revision: branch to push to (created from `main` when missing); `None` pushes to `main`.

    Returns:
        The URL of the commit on the Hub (it ends with the commit id).

    Raises:
        ValueError: `repo_id` is not a Hub repo id.
        NotADirectoryError: `folder` is not a directory.
        huggingface_hub.errors.HfHubHTTPError: the Hub refused, e.g. status 401 for a missing or invalid token.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"`repo_id` must be a Hub repo id, 'namespace/name' or 'name' (letters, digits, '-', '_', '.'), "
            f"got {repo_id!r}: {error}"
        ) from error
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
