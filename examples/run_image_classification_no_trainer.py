#!/usr/bin/env python
"""Fine-tune a vision transformer for image classification with aligned mixing, in an Accelerate training loop.

Shaped like transformers' examples/pytorch/image-classification/run_image_classification_no_trainer.py (same
argument names), with the batches mixed by `TLAlignCollator` and the loss against the token-label aligned target.
The data, model loading, mixing, loss and metric code is shared with `run_image_classification.py` (the Trainer
example) and the `tl_align_hf` package.

    # Built-in default: a small ViT trained from scratch on scikit-learn's bundled digits.
    python examples/run_image_classification_no_trainer.py

    # Several processes (DDP), on one machine or several: see docs/distributed.md.
    accelerate launch --num_processes 2 examples/run_image_classification_no_trainer.py --use_digits \
        --output_dir outputs/digits-ddp --checkpointing_steps epoch
    torchrun --nproc_per_node 2 examples/run_image_classification_no_trainer.py --use_digits ...

    # Any Hub ViT / DeiT on any image-classification dataset.
    accelerate launch examples/run_image_classification_no_trainer.py --dataset_name beans \
        --model_name_or_path google/vit-base-patch16-224-in21k --ignore_mismatched_sizes --output_dir outputs/beans

Distributed semantics: every process mixes its own local batch with its own random stream (seeded from `--seed`
and the process index). The loss of a step is the sum over the samples of all processes and all accumulated
micro-batches divided by their number, so N processes with per-device batch b train exactly like one process with
batch N*b on the same samples. Evaluation is unmixed and counts every validation image once. Checkpoints
(`--checkpointing_steps`) are written to a temporary folder and renamed into place when complete, and
`--resume_from_checkpoint latest` continues from the newest complete one, mixing stream included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, gather_object, set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import EvalPrediction, SchedulerType, get_scheduler
from transformers.hf_argparser import string_to_bool

from tl_align_hf import TLAlignCollator, TLAlignConfig, label_maps, make_transforms, set_train_epoch
from tl_align_hf.aligner import MIXING_ARGUMENTS
from tl_align_hf.metrics import compute_accuracy_metrics
from tl_align_hf.model_card import push_checkpoint_to_hub, write_model_card
from tl_align_hf.trainer import COLLATOR_STATE_NAME

logger = get_logger(__name__)


def _import_trainer_example():
    """The Trainer example next to this file, whose data and model helpers this script shares."""
    name = "run_image_classification"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


trainer_example = _import_trainer_example()

# The mixing and TL-Align settings: same names, defaults and help as `TLAlignConfig`.
MIXING_FIELDS = (
    "mixing_method",
    "mixup_alpha",
    "cutmix_alpha",
    "cutmix_minmax",
    "mix_prob",
    "switch_prob",
    "mix_mode",
    "correct_lam",
    "tl_align",
    "label_smoothing",
    "tl_align_attention_path",
)
CHECKPOINT_PREFIX = "checkpoint-"  # `push_checkpoint_to_hub` skips `checkpoint-*/`
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written; renamed when complete
CHECKPOINT_STATE_NAME = "tl_align_loop_state.json"  # written last: a folder without it is incomplete
DIGITS_OUTPUT_DIR = "outputs/digits-tl-align-no-trainer"
TRACKING_PROJECT = "image_classification_no_trainer"


# ----------------------------------------------------------------------------------------------- arguments


def _add_bool(parser, name: str, default: bool, help: str) -> None:
    """`--name` (true), `--name false|true`, and `--no_name` when the default is true, as `HfArgumentParser` does."""
    parser.add_argument(f"--{name}", type=string_to_bool, nargs="?", const=True, default=default, help=help)
    if default:
        parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"Turn off --{name}.")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", type=str, default=None, help="A data set from the Hub (e.g. beans).")
    group.add_argument("--dataset_config_name", type=str, default=None, help="The configuration of that data set.")
    group.add_argument("--train_dir", type=str, default=None, help="A folder containing the training data.")
    group.add_argument("--validation_dir", type=str, default=None, help="A folder containing the validation data.")
    _add_bool(group, "use_digits", False, "Train on scikit-learn's bundled digits (written once to a local folder).")
    group.add_argument(
        "--max_train_samples", type=int, default=None, help="Truncate the training set to this many examples."
    )
    group.add_argument(
        "--max_eval_samples", type=int, default=None, help="Truncate the validation set to this many examples."
    )
    group.add_argument(
        "--train_val_split", type=float, default=0.15, help="Fraction of train split off for validation if needed."
    )
    group.add_argument("--image_column_name", type=str, default="image", help="The column holding the images.")
    group.add_argument("--label_column_name", type=str, default="label", help="The column holding the labels.")
    _add_bool(group, "horizontal_flip", True, "Random horizontal flips in training.")
    group.add_argument(
        "--crop_scale_min", type=float, default=0.08, help="Smallest area fraction kept by the random resized crop."
    )
    group.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Data loading processes per training process; exact resume is guaranteed with 0.",
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model_name_or_path",
        type=str,
        default=None,
        help="Path or Hub id of a pretrained ViT/DeiT; None trains the built-in small ViT from scratch.",
    )
    _add_bool(group, "ignore_mismatched_sizes", False, "Load a pretrained model whose head size differs.")
    group.add_argument("--image_size", type=int, default=32, help="Image size of the built-in ViT.")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--per_device_train_batch_size", type=int, default=8, help="Training batch size per process.")
    group.add_argument("--per_device_eval_batch_size", type=int, default=8, help="Evaluation batch size per process.")
    group.add_argument("--learning_rate", type=float, default=5e-5, help="Peak learning rate (after warmup).")
    group.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases/norms).")
    group.add_argument("--num_train_epochs", type=int, default=3, help="Number of training epochs.")
    group.add_argument(
        "--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides num_train_epochs."
    )
    group.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Micro-batches accumulated per optimizer step."
    )
    group.add_argument(
        "--lr_scheduler_type",
        type=SchedulerType,
        default="linear",
        choices=[scheduler.value for scheduler in SchedulerType],
        help="The learning rate schedule.",
    )
    group.add_argument("--num_warmup_steps", type=int, default=0, help="Warmup steps of the schedule.")
    group.add_argument(
        "--warmup_ratio", type=float, default=0.0, help="Warmup as a fraction of all steps, when num_warmup_steps=0."
    )
    group.add_argument("--output_dir", type=str, default=None, help="Where to store the final model and checkpoints.")
    group.add_argument("--seed", type=int, default=42, help="Seed of the model, the data order and the mixing.")
    group.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16", "fp8"],
        help="Mixed precision; default: the accelerate config.",
    )
    _add_bool(
        group, "cpu", False, "Train on the CPU (automatic when several processes start on a machine without GPUs)."
    )
    group.add_argument("--logging_steps", type=int, default=10, help="Log the training loss every this many steps.")
    _add_bool(group, "with_tracking", False, "Log to experiment trackers (see --report_to).")
    group.add_argument(
        "--report_to", type=str, default="all", help="Trackers for --with_tracking: tensorboard, wandb, ... or all."
    )


def _add_checkpoint_and_hub_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints and Hub")
    group.add_argument(
        "--checkpointing_steps",
        type=str,
        default=None,
        help="Save the training state every N optimizer steps (a number), or 'epoch' at the end of each epoch.",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="A checkpoint folder, or 'latest' for the newest complete checkpoint in output_dir.",
    )
    _add_bool(group, "push_to_hub", False, "Push the final model, image processor and model card to the Hub.")
    group.add_argument("--hub_model_id", type=str, default=None, help="The Hub repo; default: output_dir's name.")
    group.add_argument("--hub_token", type=str, default=None, help="The token to push with (default: your login).")


def _add_mixing_arguments(parser: argparse.ArgumentParser) -> None:
    """The mixing and TL-Align settings, read from `TLAlignConfig`'s fields (one source of names and defaults)."""
    group = parser.add_argument_group("mixing and TL-Align (as in TLAlignConfig)")
    config_fields = {config_field.name: config_field for config_field in dataclasses.fields(TLAlignConfig)}
    for name in MIXING_FIELDS:
        config_field = config_fields[name]
        help_text = config_field.metadata.get("help", "").replace("%", "%%")
        if isinstance(config_field.default, bool):
            _add_bool(group, name, config_field.default, help_text)
        elif name == "cutmix_minmax":
            group.add_argument(f"--{name}", type=float, nargs=2, metavar=("MIN", "MAX"), default=None, help=help_text)
        else:
            kind = type(config_field.default)
            choices = config_field.metadata.get("choices")
            group.add_argument(f"--{name}", type=kind, default=config_field.default, choices=choices, help=help_text)


def make_parser() -> argparse.ArgumentParser:
    """The command-line interface: transformers' no-Trainer arguments plus the mixing settings of `TLAlignConfig`."""
    parser = argparse.ArgumentParser(
        description="Fine-tune a vision transformer with aligned mixing (TL-Align) in an Accelerate loop."
    )
    _add_data_arguments(parser)
    _add_model_arguments(parser)
    _add_training_arguments(parser)
    _add_checkpoint_and_hub_arguments(parser)
    _add_mixing_arguments(parser)
    return parser


def digits_defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The built-in default run: the Trainer example's `configs/digits.json`, mapped onto this script's arguments."""
    values = trainer_example.read_config_file(trainer_example.DEFAULT_CONFIG)
    warmup = values.pop("warmup_steps", 0)
    if isinstance(warmup, float) and warmup < 1:  # transformers reads a float below 1 as a ratio
        values["warmup_ratio"] = warmup
    else:
        values["num_warmup_steps"] = int(warmup)
    known = {action.dest for action in parser._actions}
    defaults = {name: value for name, value in values.items() if name in known}
    defaults["output_dir"] = DIGITS_OUTPUT_DIR
    return defaults


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the arguments; no arguments at all runs the built-in digits default."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    if not argv:
        parser.set_defaults(**digits_defaults(parser))
    args = parser.parse_args(argv)
    check_args(args)
    return args


def checkpoint_every(value: str | None) -> int | str | None:
    """`--checkpointing_steps` as a positive int, `"epoch"` or None."""
    if value is None or value == "epoch":
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"--checkpointing_steps must be a positive number of steps or 'epoch', got {value!r}.")


def check_args(args: argparse.Namespace) -> None:
    """Raise a ValueError that names the fix for settings that cannot work."""
    data_arguments(args)  # exactly one data source
    args.checkpointing_steps = checkpoint_every(args.checkpointing_steps)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.logging_steps < 1:
        raise ValueError(f"--logging_steps must be at least 1, got {args.logging_steps}.")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ValueError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}.")
    needs_output = {
        "--checkpointing_steps": args.checkpointing_steps is not None,
        "--push_to_hub": args.push_to_hub,
        "--with_tracking": args.with_tracking,
        "--resume_from_checkpoint latest": args.resume_from_checkpoint in ("", "latest"),
    }
    for flag, used in needs_output.items():
        if used and args.output_dir is None:
            raise ValueError(f"{flag} needs --output_dir (where the files go).")


# ----------------------------------------------------------------------------------------------- set-up


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun, accelerate launch, MPI) started; 1 when run directly."""
    names = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
    return max(int(os.environ.get(name, 1)) for name in names)


def use_cpu(args: argparse.Namespace) -> bool:
    """`--cpu`, or several processes on a machine without an accelerator (Accelerate would otherwise run each
    process alone on all the data, see `make_accelerator`)."""
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return args.cpu or (launched_world_size() > 1 and not has_accelerator)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The Accelerator; gradient accumulation is done by `accumulate_gradients`, not by Accelerate."""
    tracking = {}
    if args.with_tracking:
        tracking = dict(log_with=args.report_to, project_dir=os.path.join(args.output_dir, "runs"))
    accelerator = Accelerator(cpu=use_cpu(args), mixed_precision=args.mixed_precision, **tracking)
    if accelerator.num_processes != launched_world_size():
        raise RuntimeError(
            f"The launcher started {launched_world_size()} processes but Accelerate set up "
            f"{accelerator.num_processes}: each would train alone on all the data. On CPUs pass --cpu (or set "
            "ACCELERATE_USE_CPU=1); on GPUs check that every process sees a device."
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED and args.gradient_accumulation_steps > 1:
        raise ValueError(
            "With DeepSpeed, use --gradient_accumulation_steps 1 (DeepSpeed scales accumulated losses itself, "
            "which breaks the exact global-batch loss); raise --per_device_train_batch_size or the number of "
            "processes instead."
        )
    return accelerator


def setup_logging(accelerator: Accelerator) -> None:
    """Info logs from this script on every process; warnings from datasets/transformers on the main one only."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO,
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def data_arguments(args: argparse.Namespace):
    """The Trainer example's `DataTrainingArguments` for these arguments (it checks the data source)."""
    return trainer_example.DataTrainingArguments(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_dir=args.train_dir,
        validation_dir=args.validation_dir,
        train_val_split=args.train_val_split,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        image_column_name=args.image_column_name,
        label_column_name=args.label_column_name,
        use_digits=args.use_digits,
        horizontal_flip=args.horizontal_flip,
        crop_scale_min=args.crop_scale_min,
    )


def load_datasets_and_model(args: argparse.Namespace, accelerator: Accelerator):
    """(train_dataset, eval_dataset, model, image_processor), through the Trainer example's helpers."""
    data_args = data_arguments(args)
    model_args = trainer_example.ModelArguments(
        model_name_or_path=args.model_name_or_path,
        ignore_mismatched_sizes=args.ignore_mismatched_sizes,
        image_size=args.image_size,
    )
    with accelerator.main_process_first():  # one process writes caches and downloads, the others read them
        dataset = trainer_example.load_data(data_args, model_args, args)  # reads only `args.seed`
        label2id, id2label = label_maps(dataset, args.label_column_name)
        model, image_processor = trainer_example.load_model_and_processor(model_args, label2id, id2label)
    model.tl_align_attention_path = args.tl_align_attention_path
    train_transform, eval_transform = make_transforms(
        image_processor,
        args.image_column_name,
        args.label_column_name,
        horizontal_flip=args.horizontal_flip,
        scale=(args.crop_scale_min, 1.0),
        seed=args.seed,
    )
    train_split = trainer_example.select_split(dataset, "train", args.max_train_samples, args.seed)
    eval_split = trainer_example.select_split(dataset, "validation", args.max_eval_samples, args.seed)
    return (
        train_split.with_transform(train_transform),
        eval_split.with_transform(eval_transform),
        model,
        image_processor,
    )


class EpochShuffleSampler(Sampler[int]):
    """A random order of `range(num_samples)` that depends only on `(seed, epoch)`.

    The same on every process (Accelerate then gives each process its own batches of it) and after a resume, with
    no random state to save. Call `set_epoch(epoch)` before iterating (`DataLoaderShard.set_epoch` does).
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0] >> 1)
        generator = torch.Generator().manual_seed(seed)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


def make_dataloaders(
    args: argparse.Namespace, train_dataset, eval_dataset, collator: TLAlignCollator
) -> tuple[DataLoader, DataLoader]:
    """Training batches mixed by `collator`; evaluation batches stacked unmixed."""
    train_loader = DataLoader(
        train_dataset,
        sampler=EpochShuffleSampler(len(train_dataset), args.seed),
        collate_fn=collator,
        batch_size=args.per_device_train_batch_size,
        num_workers=args.dataloader_num_workers,
    )
    eval_loader = DataLoader(
        eval_dataset,
        collate_fn=collator.collate_unmixed,
        batch_size=args.per_device_eval_batch_size,
        num_workers=args.dataloader_num_workers,
    )
    return train_loader, eval_loader


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases, norms, the class token or position embeddings)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 and parameter.shape[0] > 1 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate)


def training_steps(args: argparse.Namespace, batches_per_epoch: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, epochs) from the per-process batches of an epoch."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    return steps_per_epoch, max_train_steps, math.ceil(max_train_steps / steps_per_epoch)


def make_scheduler(
    args: argparse.Namespace, optimizer: torch.optim.Optimizer, max_train_steps: int, num_processes: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate schedule; Accelerate steps a prepared scheduler once per process at every step."""
    warmup = args.num_warmup_steps or math.ceil(args.warmup_ratio * max_train_steps)
    return get_scheduler(
        name=args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=warmup * num_processes,
        num_training_steps=max_train_steps * num_processes,
    )


def mixing_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `TLAlignCollator` keyword arguments of these settings (`TLAlignConfig.collator_kwargs`, shared)."""
    return TLAlignConfig.collator_kwargs(args)


# ----------------------------------------------------------------------------------------------- loss and steps


@dataclasses.dataclass
class StepStats:
    """Sums over this process's samples since the last log; `reduced` gives the means over all processes."""

    loss_sum: float = 0.0
    items: int = 0
    mix_lam_sum: float = 0.0
    own_share_sum: float = 0.0
    gap_sum: float = 0.0

    def add(self, loss_sum: torch.Tensor, mix_lam: torch.Tensor, own_share: torch.Tensor) -> None:
        self.loss_sum += loss_sum.item()
        self.items += mix_lam.numel()
        self.mix_lam_sum += mix_lam.float().sum().item()
        self.own_share_sum += own_share.float().sum().item()
        self.gap_sum += (own_share.float() - mix_lam.float()).abs().sum().item()

    def merge(self, other: StepStats) -> None:
        for name in ("loss_sum", "items", "mix_lam_sum", "own_share_sum", "gap_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def reduced(self, accelerator: Accelerator, tl_align: bool) -> dict[str, float]:
        """Global means: loss, mix_lam and (with TL-Align) aligned_lam and alignment_gap. A collective call."""
        local = [self.loss_sum, self.items, self.mix_lam_sum, self.own_share_sum, self.gap_sum]
        totals = accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=accelerator.device), "sum")
        loss_sum, items, mix_lam_sum, own_share_sum, gap_sum = totals.tolist()
        means = {"loss": loss_sum / max(items, 1), "mix_lam": mix_lam_sum / max(items, 1)}
        if tl_align:
            means.update(aligned_lam=own_share_sum / max(items, 1), alignment_gap=gap_sum / max(items, 1))
        return means


def mixed_batch_loss(model, batch: dict[str, torch.Tensor], tl_align: bool, label_smoothing: float, loss_owner):
    """(summed loss of the batch, mix_lam (B,), own share (B,)): the aligned target, or the area one without TL-Align.

    `loss_owner` is the unwrapped model, whose `tl_align_loss` knows its heads.
    """
    mixing = {name: batch[name] for name in MIXING_ARGUMENTS}
    if tl_align:
        outputs = model(pixel_values=batch["pixel_values"], **mixing)
        own_share = outputs.aligned_lam
    else:
        outputs = model(pixel_values=batch["pixel_values"])
        own_share = batch["mix_lam"]
    loss_sum = loss_owner.tl_align_loss(
        outputs, batch["labels"], batch["mix_index"], own_share, label_smoothing, reduction="sum"
    )
    return loss_sum, batch["mix_lam"], own_share.detach()


def accumulate_gradients(
    accelerator: Accelerator,
    model,
    micro_batches: list[dict[str, torch.Tensor]],
    tl_align: bool,
    label_smoothing: float,
) -> StepStats:
    """Backward of one optimizer step's micro-batches, scaled so the gradient is that of the global batch mean.

    Each micro-batch's loss is its sum over samples divided by the number of samples in the whole global batch (all
    processes, all micro-batches), times the number of processes because DDP averages gradients over processes.
    Gradients are synchronised only at the last micro-batch.
    """
    local_items = sum(len(batch["labels"]) for batch in micro_batches)
    global_items = accelerator.reduce(torch.tensor(local_items, device=accelerator.device), "sum").item()
    scale = accelerator.num_processes / global_items
    loss_owner = accelerator.unwrap_model(model)
    stats = StepStats()
    for index, batch in enumerate(micro_batches):
        is_last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if is_last else accelerator.no_sync(model):
            loss_sum, mix_lam, own_share = mixed_batch_loss(model, batch, tl_align, label_smoothing, loss_owner)
            accelerator.backward(loss_sum * scale)
        stats.add(loss_sum.detach(), mix_lam, own_share)
    return stats


def micro_batch_groups(loader: Iterable, group_size: int) -> Iterator[list]:
    """Consecutive groups of `group_size` batches; the last group of an epoch may be shorter."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == group_size:
            yield group
            group = []
    if group:
        yield group


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate(accelerator: Accelerator, model, eval_loader) -> dict[str, float]:
    """Unmixed evaluation: cross-entropy, top-1 and top-5 accuracy, each validation sample counted exactly once.

    `gather_for_metrics` drops the samples Accelerate repeats to give every process the same number of batches.
    """
    model.eval()
    logits_parts, label_parts, loss_parts = [], [], []
    for batch in eval_loader:
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"]).logits.float()
        losses = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        logits, labels, losses = accelerator.gather_for_metrics((logits, batch["labels"], losses))
        logits_parts.append(logits.cpu().numpy())
        label_parts.append(labels.cpu().numpy())
        loss_parts.append(losses.cpu().numpy())
    model.train()
    labels = np.concatenate(label_parts)
    accuracy = compute_accuracy_metrics(EvalPrediction(predictions=np.concatenate(logits_parts), label_ids=labels))
    metrics = {"eval_loss": float(np.concatenate(loss_parts).mean()), "eval_samples": len(labels)}
    metrics.update({f"eval_{name}": value for name, value in accuracy.items()})
    return metrics


# ----------------------------------------------------------------------------------------------- checkpoints


@dataclasses.dataclass
class LoopState:
    """Where training is: `epoch`, micro-batches consumed in it, optimizer steps done, micro-batches consumed in all.

    `micro_batches` counts the batches this process trained on, not those the loader collated: Accelerate's
    `DataLoaderShard` fetches one batch ahead, so the collator has always mixed one more.
    """

    epoch: int = 0
    step_in_epoch: int = 0
    completed_steps: int = 0
    micro_batches: int = 0
    num_processes: int = 1

    def after_step(self, num_micro_batches: int) -> None:
        self.step_in_epoch += num_micro_batches
        self.micro_batches += num_micro_batches
        self.completed_steps += 1

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0


def _write_json(path: Path, values: dict) -> None:
    """Write `values` to `path` durably (flushed to disk before returning)."""
    with open(path, "w") as file:
        json.dump(values, file, indent=2)
        file.flush()
        os.fsync(file.fileno())


def save_checkpoint(accelerator: Accelerator, output_dir: str, name: str, loop: LoopState, collator) -> Path:
    """Save the full training state to `output_dir/checkpoint-<name>`, atomically.

    Every process writes into `checkpoint-<name>.partial` (Accelerate: model as safetensors, optimizer, scheduler,
    and each process's RNG state; each process's mixing stream), then the main process writes the loop state last
    and renames the folder. A run killed before the rename leaves only a `.partial` folder, which resume ignores.
    """
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{name}"
    staging = final.with_name(final.name + PARTIAL_SUFFIX)
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)  # left by a run killed while writing it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    collator_state = {"mixed_batches_trained": loop.micro_batches}
    collator_state["collator"] = collator.state_dict(num_calls=loop.micro_batches)
    _write_json(staging / COLLATOR_STATE_NAME.format(process_index=accelerator.process_index), collator_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(staging / CHECKPOINT_STATE_NAME, dataclasses.asdict(loop))
        _replace_folder(staging, final)
    accelerator.wait_for_everyone()
    logger.info(f"Saved checkpoint {final} (step {loop.completed_steps}).")
    return final


def _replace_folder(source: Path, target: Path) -> None:
    """Rename `source` to `target`; an existing `target` (the same checkpoint saved again) is moved away first."""
    if target.exists():
        stale = target.with_name(target.name + ".stale")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(target, stale)
        os.replace(source, target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(source, target)


def _read_loop_state(folder: Path) -> LoopState | None:
    """The loop state of a complete checkpoint folder, None for an incomplete or foreign one."""
    if folder.name.endswith(PARTIAL_SUFFIX) or not (folder / CHECKPOINT_STATE_NAME).is_file():
        return None
    try:
        return LoopState(**json.loads((folder / CHECKPOINT_STATE_NAME).read_text()))
    except (ValueError, TypeError):
        return None


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints in `output_dir`, oldest first (by optimizer steps done)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(state.completed_steps, path) for path in folder.iterdir() if (state := _read_loop_state(path))]
    return [path for _, path in sorted(found)]


def resolve_checkpoint(value: str, output_dir: str | None) -> Path | None:
    """The checkpoint to resume from: a complete checkpoint folder, or the newest complete one.

    `value` is "latest" (or "") for the newest in `output_dir` (None when there is none yet: training starts
    afresh), a checkpoint folder, or a folder holding checkpoints.
    """
    if value in ("", "latest"):
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if _read_loop_state(path) is not None:
        return path
    found = complete_checkpoints(path)
    if found:
        return found[-1]
    hint = f" Complete checkpoints next to it: {[str(p) for p in complete_checkpoints(path.parent)]}."
    if not path.exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such folder.{hint}")
    raise ValueError(
        f"--resume_from_checkpoint {value} is not a complete checkpoint (no {CHECKPOINT_STATE_NAME}: it was "
        f"interrupted while being written). Pass --resume_from_checkpoint latest, or an older checkpoint.{hint}"
    )


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, collator: TLAlignCollator) -> LoopState:
    """Restore model, optimizer, scheduler, RNG states and this process's mixing stream; return the loop state."""
    loop = _read_loop_state(checkpoint)
    if loop.num_processes != accelerator.num_processes:
        logger.warning(
            f"{checkpoint} was saved by {loop.num_processes} processes and is resumed by "
            f"{accelerator.num_processes}: weights and optimizer continue, but the data order and mixing differ "
            "from an uninterrupted run."
        )
    accelerator.load_state(str(checkpoint))
    path = checkpoint / COLLATOR_STATE_NAME.format(process_index=accelerator.process_index)
    if path.is_file():
        collator.load_state_dict(json.loads(path.read_text())["collator"])
    logger.info(f"Resumed from {checkpoint} at step {loop.completed_steps} (epoch {loop.epoch}).")
    loop.num_processes = accelerator.num_processes
    return loop


# ----------------------------------------------------------------------------------------------- results


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all tensors of `model.state_dict()` (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def final_weights_digests(accelerator: Accelerator, model) -> list[str] | None:
    """Every process's `weights_digest` (all equal when data parallelism kept them in sync); None under FSDP and
    DeepSpeed, whose processes hold shards."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    return gather_object([weights_digest(accelerator.unwrap_model(model))])


def dataset_label(args: argparse.Namespace) -> str | None:
    """The data set as the model card names it (as the Trainer example does)."""
    return args.dataset_name or ("sklearn-digits" if args.use_digits else None)


def save_outputs(
    args: argparse.Namespace, accelerator: Accelerator, model, image_processor, results: dict, log_history: list
) -> None:
    """Final model (safetensors), image processor, model card, all_results.json and the log; push when asked."""
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP / DeepSpeed
    if not accelerator.is_main_process:
        return
    unwrapped.save_pretrained(args.output_dir, state_dict=state_dict)
    image_processor.save_pretrained(args.output_dir)
    write_model_card(
        args.output_dir,
        base_model=args.model_name_or_path,
        dataset=dataset_label(args),
        mixing={key: value for key, value in mixing_settings(args).items() if key != "seed"},
        tl_align=args.tl_align,
        label_smoothing=args.label_smoothing,
        metrics={key: value for key, value in results.items() if key.startswith("eval_")},
        model_class_name=type(unwrapped).__name__,
        repo_id=args.hub_model_id,
    )
    _write_json(Path(args.output_dir) / "all_results.json", results)
    _write_json(Path(args.output_dir) / "log_history.json", {"log_history": log_history})
    if args.push_to_hub:
        repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
        url = push_checkpoint_to_hub(args.output_dir, repo_id, token=args.hub_token, commit_message="End of training")
        logger.info(f"Pushed to the Hub: {url}")


def _tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as numbers and strings, for experiment trackers."""
    plain = (int, float, str, bool)
    return {key: value if isinstance(value, plain) else str(value) for key, value in vars(args).items()}


# ----------------------------------------------------------------------------------------------- training


@dataclasses.dataclass
class Run:
    """Everything the training loop works with."""

    args: argparse.Namespace
    accelerator: Accelerator
    model: Any
    optimizer: Any
    lr_scheduler: Any
    train_loader: Any
    eval_loader: Any
    train_dataset: Any
    collator: TLAlignCollator
    max_train_steps: int
    num_train_epochs: int
    loop: LoopState
    log_history: list = dataclasses.field(default_factory=list)
    totals: StepStats = dataclasses.field(default_factory=StepStats)


def log_step(run: Run, since_log: StepStats) -> None:
    """Log the global mean loss and alignment metrics of the steps since the last log (collective)."""
    entry = since_log.reduced(run.accelerator, run.args.tl_align)
    entry.update(
        step=run.loop.completed_steps,
        epoch=run.loop.epoch + run.loop.step_in_epoch / max(len(run.train_loader), 1),
        learning_rate=run.lr_scheduler.get_last_lr()[0],
    )
    run.log_history.append(entry)
    logger.info(json.dumps(entry))
    if run.args.with_tracking:
        run.accelerator.log(entry, step=run.loop.completed_steps)


def train_epoch(run: Run, progress) -> None:
    """One epoch (or what remains of it after a resume), stopping at max_train_steps."""
    args, accelerator, loop = run.args, run.accelerator, run.loop
    set_train_epoch(run.train_dataset, loop.epoch)  # fresh crops and flips each epoch, before workers start
    run.train_loader.set_epoch(loop.epoch)
    loader = run.train_loader
    if loop.step_in_epoch:
        loader = accelerator.skip_first_batches(run.train_loader, loop.step_in_epoch)
    run.model.train()
    since_log, steps_since_log = StepStats(), 0
    for micro_batches in micro_batch_groups(loader, args.gradient_accumulation_steps):
        stats = accumulate_gradients(accelerator, run.model, micro_batches, args.tl_align, args.label_smoothing)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad()
        loop.after_step(len(micro_batches))
        since_log.merge(stats)
        run.totals.merge(stats)
        steps_since_log += 1
        progress.update(1)
        if loop.completed_steps % args.logging_steps == 0:
            log_step(run, since_log)
            since_log, steps_since_log = StepStats(), 0
        if isinstance(args.checkpointing_steps, int) and loop.completed_steps % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, f"step_{loop.completed_steps}", loop, run.collator)
        if loop.completed_steps >= run.max_train_steps:
            break
    if steps_since_log:  # the same on every process, so all of them take part in the reduction
        log_step(run, since_log)


def train(run: Run) -> dict[str, float]:
    """The training loop from `run.loop` to `max_train_steps`, evaluating after each epoch; the last eval metrics."""
    args, accelerator, loop = run.args, run.accelerator, run.loop
    progress = tqdm(
        range(run.max_train_steps), initial=loop.completed_steps, disable=not accelerator.is_local_main_process
    )
    metrics: dict[str, float] = {}
    while loop.epoch < run.num_train_epochs and loop.completed_steps < run.max_train_steps:
        train_epoch(run, progress)
        finished_epoch = loop.epoch
        if loop.step_in_epoch >= len(run.train_loader):
            loop.next_epoch()
        metrics = evaluate(accelerator, run.model, run.eval_loader)
        metrics["epoch"] = loop.epoch + loop.step_in_epoch / len(run.train_loader)
        logger.info(json.dumps(metrics))
        run.log_history.append(dict(metrics, step=loop.completed_steps))
        if args.with_tracking:
            accelerator.log(metrics, step=loop.completed_steps)
        if args.checkpointing_steps == "epoch" and loop.step_in_epoch == 0:
            save_checkpoint(accelerator, args.output_dir, f"epoch_{finished_epoch}", loop, run.collator)
    progress.close()
    return metrics or evaluate(accelerator, run.model, run.eval_loader)


def prepare_run(args: argparse.Namespace, accelerator: Accelerator) -> tuple[Run, Any]:
    """Data, model, collator, optimizer and schedule, prepared by Accelerate, and the state to resume; and the
    image processor."""
    train_dataset, eval_dataset, model, image_processor = load_datasets_and_model(args, accelerator)
    collator = TLAlignCollator.from_model(model, **mixing_settings(args), rank=accelerator.process_index)
    train_loader, eval_loader = make_dataloaders(args, train_dataset, eval_dataset, collator)
    optimizer = make_optimizer(model, args)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    _, max_train_steps, num_train_epochs = training_steps(args, len(train_loader))
    lr_scheduler = accelerator.prepare(make_scheduler(args, optimizer, max_train_steps, accelerator.num_processes))
    loop = LoopState(num_processes=accelerator.num_processes)
    if args.resume_from_checkpoint is not None:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
        if checkpoint is None:
            logger.info(f"No complete checkpoint in {args.output_dir} yet: training starts afresh.")
        else:
            loop = load_checkpoint(accelerator, checkpoint, collator)
    if loop.step_in_epoch >= len(train_loader):  # saved at the last step of an epoch
        loop.next_epoch()
    run = Run(
        args=args,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        train_loader=train_loader,
        eval_loader=eval_loader,
        train_dataset=train_dataset,
        collator=collator,
        max_train_steps=max_train_steps,
        num_train_epochs=num_train_epochs,
        loop=loop,
    )
    return run, image_processor


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate, save and (optionally) push; return the results written to all_results.json."""
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    setup_logging(accelerator)
    set_seed(args.seed)
    if accelerator.is_main_process and args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()

    run, image_processor = prepare_run(args, accelerator)
    if args.with_tracking:
        accelerator.init_trackers(TRACKING_PROJECT, _tracker_config(args))
    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** Training: {len(run.train_dataset)} examples, {run.num_train_epochs} epochs, {run.max_train_steps} "
        f"steps, {accelerator.num_processes} processes x {args.per_device_train_batch_size} per device x "
        f"{args.gradient_accumulation_steps} accumulation = {total_batch} per step *****"
    )
    start = time.perf_counter()
    metrics = train(run)
    train_runtime = time.perf_counter() - start

    results = dict(metrics)
    results.update({f"train_{name}": value for name, value in run.totals.reduced(accelerator, args.tl_align).items()})
    results.update(train_runtime=train_runtime, train_steps=run.loop.completed_steps)
    results["final_weights_sha256_per_process"] = digests = final_weights_digests(accelerator, run.model)
    if digests is not None and len(set(digests)) > 1:
        logger.warning("The processes ended with different weights: gradients were not synchronised.")
    if args.with_tracking:
        accelerator.end_training()
    if args.output_dir is not None:
        save_outputs(args, accelerator, run.model, image_processor, results, run.log_history)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(
            f"\nEval accuracy: {results['eval_accuracy']:.4f} (top-5 {results['eval_top5_accuracy']:.4f}) on "
            f"{results['eval_samples']} validation images; train loss {results['train_loss']:.4f}."
        )
    return results


if __name__ == "__main__":
    main()
