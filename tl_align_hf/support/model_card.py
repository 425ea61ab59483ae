"""Model cards for TL-Align checkpoints, and pushing a checkpoint folder to the Hub.

The card is a huggingface_hub `ModelCard` rendered from `model_card_template.md`, with a `ModelCardData` front matter
(the top-k accuracies as `model-index` `EvalResult`s). `tl_align_model_card(trainer)` starts from what transformers'
`Trainer` puts into its own card (`TrainingSummary.from_trainer`); `model_card(...)` takes explicit values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES as _LOCAL_BUILDERS  # imagefolder, csv, ...
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers.modelcard import TrainingSummary, make_markdown_table

from .._version import __version__
from ..config import as_tl_align_config
from ..settings import MixingSettings, check_label_smoothing

if TYPE_CHECKING:
    from transformers import Trainer

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")
MIXING_FIELDS = [item.name for item in dataclasses.fields(MixingSettings)]  # the card's settings table lists them
CARD_TAGS = ["image-classification", "vision", "tl-align", "token-label-alignment"]
# Never pushed by `push_checkpoint_to_hub`: intermediate Trainer / no-Trainer checkpoints and TensorBoard logs.
PUSH_IGNORE_PATTERNS = ["checkpoint-*/", "step_*/", "epoch_*/", "runs/"]
DEFAULT_COMMIT_MESSAGE = "Upload image classifier fine-tuned with TL-Align"
# Not about the model: left out of the results (Trainer's speed metrics, and where in training they were taken).
_NOT_RESULTS = re.compile(r"(.*(runtime|samples_per_second|steps_per_second|preparation_time))|epoch|step|total_flos")
_ACCURACY = re.compile(r"(?:eval_|test_)?(?:top(\d+)_)?accuracy")
_FRAMEWORKS = {"Transformers": "transformers", "PyTorch": "torch", "Datasets": "datasets",
               "huggingface_hub": "huggingface_hub"}  # fmt: skip


def _hub_id_or_none(name: Any, dataset: bool = False) -> str | None:
    """`name` when it is a Hub repo id; `None` for empty values, local paths and, for a `dataset`, the builders
    `datasets` ships for local files (`imagefolder`, `csv`, ...)."""
    if not name or not isinstance(name, str) or os.path.exists(name) or (dataset and name in _LOCAL_BUILDERS):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _as_list(value: str | list[str] | None) -> list[str]:
    """`value` as a list of its non-empty entries (one string becomes a one-item list)."""
    return [item for item in ([value] if isinstance(value, str) else value or []) if item]


def _results(metrics: dict[str, Any] | None, datasets: list[str], hub_datasets: list[str], config: str | None):
    """The finite numeric entries of `metrics` but speed metrics and the epoch/step they were taken at, and the
    model-index `EvalResult`s of the top-k accuracies among them (`accuracy`, `eval_top5_accuracy`, ...)."""
    results, accuracies = {}, {}
    for name, value in (metrics or {}).items():
        key = name.lower().replace(" ", "_")
        with contextlib.suppress(TypeError, ValueError, OverflowError, RuntimeError):
            if not isinstance(value, (bool, str, bytes)) and not _NOT_RESULTS.fullmatch(key) and math.isfinite(value):
                results[name] = float(value)
                if match := _ACCURACY.fullmatch(key):
                    accuracies[int(match.group(1) or 1)] = results[name]
    dataset = next(iter(datasets), None)
    dataset_type = next(iter(hub_datasets), None) or _hub_id_or_none(dataset) or "imagefolder"
    return results, [
        EvalResult(task_type="image-classification", task_name="Image Classification", dataset_type=dataset_type,
                   dataset_name=dataset or "custom", dataset_config=config, metric_type="accuracy",
                   metric_name=f"Top-{k} accuracy", metric_config=None if k == 1 else f"top{k}", metric_value=value)
        for k, value in sorted(accuracies.items())
    ]  # fmt: skip


def _check_settings(mixing: dict[str, Any], smoothing: float) -> None:
    """ValueError naming the setting unless `mixing` has only mixing fields and the label `smoothing` is in [0, 1)."""
    if unknown := sorted(set(mixing) - set(MIXING_FIELDS)):
        raise ValueError(f"`mixing` has unknown settings {unknown}; use the TLAlignConfig fields {MIXING_FIELDS}.")
    check_label_smoothing(smoothing)


def model_card(
    *, model_class_name: str, mixing: dict[str, Any] | None, tl_align: bool | None, label_smoothing: float | None,
    finetuned_from: str | None = None, dataset: str | list[str] | None = None, hyperparameters: dict | None = None,
    eval_results: dict | None = None, repo_id: str | None = None, model_name: str | None = None,
    dataset_tags: str | list[str] | None = None, dataset_config: str | None = None, license: str | None = None,
    tags: str | list[str] | None = None, language: str | list[str] | None = None, training_results: str | None = None,
) -> ModelCard:  # fmt: skip
    """The Hub model card of a checkpoint trained with tl-align-hf, from explicit values (a loop without `Trainer`).

    Args:
        model_class_name: the class trained (`"TLAlignViTForImageClassification"`); the card names the plain class.
        mixing: `{field of MixingSettings: value}` (`mixing_method`, `mixup_alpha`, ...), listed in this order.
        tl_align: whether training used the aligned target (`False`: the plain-mixing baseline); `None`: not known
            (no record): the card claims no training and ignores `mixing`, `label_smoothing`, `hyperparameters`.
        label_smoothing: smoothing of each one-hot before mixing, in [0, 1).
        finetuned_from, dataset: the starting checkpoint (`None`: from scratch) and dataset name(s); only Hub ids are
            linked (not local paths, nor the builders for local files: `imagefolder`, `csv`, ...).
        hyperparameters, eval_results: `{name: value}`; speed metrics are left out of the results, top-k accuracies
            (`eval_accuracy`, `eval_top5_accuracy`) also go into the `model-index`.
        repo_id: the Hub repo the card is for (the usage snippet, and the default model name).
        model_name, dataset_tags, dataset_config, tags, language, license: front matter, as `Trainer.create_model_card`
            (`dataset_tags` default to `dataset`; only Hub ids are kept); training_results: a markdown table.

    Raises:
        ValueError: `mixing` has a key that is not a mixing field, or `label_smoothing` is outside [0, 1).
    """
    recorded = tl_align is not None
    if recorded:
        _check_settings(mixing or {}, label_smoothing)
    parent_class = model_class_name.removeprefix("TLAlign")
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else f"{parent_class}-tl-align")
    datasets = _as_list(dataset)
    hub_datasets = [name for name in _as_list(dataset_tags) or datasets if _hub_id_or_none(name, dataset=True)]
    results, model_index = _results(eval_results, datasets, hub_datasets, dataset_config)
    versions = {name: metadata.version(package) for name, package in _FRAMEWORKS.items()}
    card_data = ModelCardData(
        language=language, license=license, library_name="transformers", pipeline_tag="image-classification",
        tags=list(dict.fromkeys([*_as_list(tags), *(CARD_TAGS if recorded else CARD_TAGS[:2])])),
        base_model=_hub_id_or_none(finetuned_from) if recorded else None, datasets=hub_datasets or None,
        metrics=["accuracy"] if model_index else None, model_name=model_name if model_index else None,
        eval_results=model_index or None,
    )  # fmt: skip
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATE_PATH), model_name=model_name, parent_class=parent_class,
        recorded=recorded, tl_align=tl_align, label_smoothing=label_smoothing, mixing=mixing,
        finetuned_from=finetuned_from, dataset_names=datasets, hyperparameters=hyperparameters, results=results,
        training_results=training_results, source=repo_id or "path/to/this/checkpoint",
        versions={**versions, "tl-align-hf": __version__},
    )  # fmt: skip


def tl_align_model_card(
    trainer: Trainer, *, mixing: dict[str, Any] | None = None, tl_align: bool | None = None,
    label_smoothing: float | None = None, hyperparameters: dict | None = None, training_recorded: bool = True,
    **trainer_card_kwargs: Any,
) -> ModelCard:  # fmt: skip
    """The model card (README.md) of a model trained by `trainer` (e.g. a `TLAlignTrainer`), see `model_card`.

    `trainer_card_kwargs` are those of `Trainer.create_model_card` (`model_name`, `finetuned_from`, `tasks`, `dataset`,
    `dataset_tags`, `dataset_args`, `tags`, `language`, `license`), used as `TrainingSummary.from_trainer` uses them
    (which also gives the hyperparameters, results and training log); `tasks` defaults to "image-classification".
    `mixing` (some mixing fields), `tl_align`, `label_smoothing` and `hyperparameters` override what `trainer.args`
    give (`TLAlignConfig`'s defaults for a plain `TrainingArguments`). `training_recorded=False`: the weights were not
    trained by `trainer` and nothing records how: the card claims no training. Raises ValueError as `model_card` does.
    """
    args = as_tl_align_config(trainer.args)  # a plain `TrainingArguments`: `TLAlignConfig`'s defaults
    mixing = {**{name: getattr(args, name) for name in MIXING_FIELDS}, **(mixing or {})}
    tl_align = args.tl_align if tl_align is None else tl_align
    label_smoothing = args.label_smoothing if label_smoothing is None else label_smoothing
    if training_recorded:
        _check_settings(mixing, label_smoothing)  # before `from_trainer`, which may ask the Hub for a license
    card_kwargs = {**trainer_card_kwargs, "tasks": trainer_card_kwargs.get("tasks") or "image-classification"}
    card_kwargs["tags"] = _as_list(card_kwargs.get("tags")) or None  # a copy: `from_trainer` appends to it
    summary = TrainingSummary.from_trainer(trainer, **card_kwargs)
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model_card(
        model_class_name=getattr(model, "tl_align_parent", type(model)).__name__, mixing=mixing,
        tl_align=tl_align if training_recorded else None, label_smoothing=label_smoothing,
        finetuned_from=summary.finetuned_from or None, dataset=summary.dataset,
        hyperparameters=summary.hyperparameters if hyperparameters is None else hyperparameters,
        eval_results=summary.eval_results, repo_id=getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id,
        model_name=summary.model_name, dataset_tags=summary.dataset_tags, tags=summary.tags, license=summary.license,
        dataset_config=next(iter(_as_list(summary.dataset_args)), None), language=summary.language,
        training_results=make_markdown_table(summary.eval_lines) if summary.eval_lines else None,
    )  # fmt: skip


def push_checkpoint_to_hub(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                           commit_message: str = DEFAULT_COMMIT_MESSAGE, revision: str | None = None) -> str:
    """Upload a checkpoint folder (weights, config, image processor, README.md) to a Hub model repo in one commit
    (`HfApi.upload_folder`, without `PUSH_IGNORE_PATTERNS`; unchanged files are not sent), creating the repo
    (`private`) and branch `revision` (`None`: `main`) when missing. `token`: `None` uses the login or `HF_TOKEN`.

    Returns the URL of the commit. Raises ValueError when `repo_id` is not a Hub repo id, NotADirectoryError when
    `folder` is not a directory, `huggingface_hub.errors.HfHubHTTPError` when the Hub refuses (401: no valid token).
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"`repo_id` must be a Hub repo id, 'namespace/name' or 'name' (letters, digits, '-', "
                         f"'_', '.'), got {repo_id!r}: {error}") from error  # fmt: skip
    if not Path(folder).is_dir():
        raise NotADirectoryError(f"`folder` must be a checkpoint directory written by save_pretrained: {folder}")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision,
                               ignore_patterns=list(PUSH_IGNORE_PATTERNS))  # fmt: skip
    return str(commit.commit_url)
