#!/usr/bin/env python
# Copyright 2026 The tl-align-hf authors. Shaped like transformers' examples/pytorch/image-classification/
# run_image_classification_no_trainer.py (Apache-2.0, The HuggingFace Inc. team), so that the two can be diffed.
"""Fine-tune any transformers vision transformer for image classification with data mixing and Token-Label
Alignment (TL-Align, ICCV 2023), leveraging Accelerate.

    # Built-in default: a small ViT trained from scratch on scikit-learn's bundled digits (no download).
    python examples/run_image_classification_no_trainer.py

    # Any Hub ViT / DeiT / Swin / DINOv2 / BEiT ... on any image-classification dataset, on many processes.
    accelerate launch examples/run_image_classification_no_trainer.py --dataset_name beans \
        --model_name_or_path google/vit-base-patch16-224-in21k --ignore_mismatched_sizes --output_dir vit-beans \
        --mixing_method cutmix --checkpointing_steps epoch --with_tracking

What differs from upstream: batches are mixed by `TLAlignCollator` (the draws are a function of the seed, the process,
the epoch and the batch, so a resumed run mixes what the uninterrupted run mixed, DataLoader workers or not); the
loss is `tl_align_hf.mixed_batch_loss` against the token-label aligned target; the alignment metrics are logged as
means over all processes; evaluation is unmixed and preprocessed by the checkpoint's own image processor;
checkpoints are written to a temporary folder and renamed when complete, so `--resume_from_checkpoint latest`
never meets a half-written one.
"""

import json
import logging
import math
import os
import shutil
from pathlib import Path

import datasets
import evaluate
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    SchedulerType,
    ViTConfig,
    get_scheduler,
)
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names

from tl_align_hf import (
    ATTENTION_PATHS,
    MixingSettings,
    TLAlignCollator,
    alignment_metrics,
    mixed_batch_loss,
    to_tl_align,
)
from tl_align_hf.support import (
    ACCURACY_METRIC_PATH,
    AUGMENTATIONS,
    DEIT_RECIPE,
    LoopRecord,
    RepeatedAugmentationSampler,
    check_label_smoothing,
    check_one_run_per_launch,
    check_writable,
    default_digits_dir,
    default_image_processor,
    deit_augmentation,
    disk_full_error,
    interpolation_kwargs,
    label_maps,
    load_image_dataset,
    make_transforms,
    model_card,
    prepare_image_dataset,
    processor_resolution_differs,
    push_checkpoint_to_hub,
    training_settings,
    write_digits_imagefolder,
)

logger = get_logger(__name__)

# The built-in default when no data is given: a small ViT for 32 px digits, 8 x 8 patches of 4 px, trained from
# scratch with this recipe (about 97% validation accuracy in two minutes on two CPU cores).
BUILTIN_VIT = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                   intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
DIGITS_DEFAULTS = dict(output_dir="outputs/digits-tl-align-no-trainer", num_train_epochs=40, learning_rate=2e-3,
                       weight_decay=0.05, warmup_ratio=0.1, lr_scheduler_type="cosine", seed=42,
                       per_device_train_batch_size=64, per_device_eval_batch_size=128, horizontal_flip=False,
                       crop_scale_min=0.5)  # fmt: skip
CHECKPOINT_PREFIXES = ("step_", "epoch_")
STAGING_SUFFIX = ".tmp"  # a checkpoint being written; renamed when complete


def parse_args(argv=None):
    parser = HfArgumentParser(MixingSettings, description="Fine-tune a vision transformer with TL-Align, with Accelerate")
    parser.add_argument("--dataset_name", type=str, default=None, help="The name of a dataset from the Hub.")
    parser.add_argument("--train_dir", type=str, default=None, help="A folder containing the training data.")
    parser.add_argument("--validation_dir", type=str, default=None, help="A folder containing the validation data.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Truncate the training examples.")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Truncate the evaluation examples.")
    parser.add_argument("--train_val_split", type=float, default=0.15, help="Percent to split off of train for validation.")
    parser.add_argument("--model_name_or_path", type=str, default=None,
                        help="Path or Hub id of a pretrained model; none trains the built-in small ViT from scratch.")  # fmt: skip
    parser.add_argument("--per_device_train_batch_size", type=int, default=8, help="Batch size per device, training.")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=8, help="Batch size per device, evaluation.")
    parser.add_argument("--learning_rate", type=float, default=5e-5, help="Initial learning rate (after warmup).")
    parser.add_argument("--weight_decay", type=float, default=0.0, help="Weight decay to use.")
    parser.add_argument("--num_train_epochs", type=int, default=3, help="Total number of training epochs to perform.")
    parser.add_argument("--max_train_steps", type=int, default=None, help="Total number of training steps; overrides epochs.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per update step.")
    parser.add_argument("--lr_scheduler_type", type=SchedulerType, default="linear", help="The scheduler type to use.",
                        choices=[scheduler.value for scheduler in SchedulerType])  # fmt: skip
    parser.add_argument("--num_warmup_steps", type=int, default=0, help="Number of steps for the warmup.")
    parser.add_argument("--warmup_ratio", type=float, default=0.0, help="Warmup as a fraction of all steps.")
    parser.add_argument("--output_dir", type=str, default=None, help="Where to store the final model.")
    parser.add_argument("--seed", type=int, default=42, help="A seed for reproducible training (and mixing).")
    parser.add_argument("--push_to_hub", action="store_true", help="Whether or not to push the model to the Hub.")
    parser.add_argument("--hub_model_id", type=str, help="The name of the repository to push to.")
    parser.add_argument("--hub_token", type=str, help="The token to use to push to the Model Hub.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow custom code of Hub datasets/models.")
    parser.add_argument("--checkpointing_steps", type=str, default=None,
                        help="Save the training state every n steps, or 'epoch' for each epoch.")  # fmt: skip
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help="A checkpoint folder to continue from, or 'latest' for the newest in output_dir.")  # fmt: skip
    parser.add_argument("--with_tracking", action="store_true", help="Whether to enable experiment trackers.")
    parser.add_argument("--logging_steps", type=int, default=10, help="Log the training metrics every n steps.")
    parser.add_argument("--report_to", type=str, default="all", help="The trackers to report to (with --with_tracking).")
    parser.add_argument("--ignore_mismatched_sizes", action="store_true", help="Load a checkpoint with another head.")
    parser.add_argument("--image_column_name", type=str, default="image", help="The column holding the images.")
    parser.add_argument("--label_column_name", type=str, default="label", help="The column holding the labels.")
    # tl-align-hf additions: the mixing settings come from MixingSettings above; these are the rest.
    parser.add_argument("--tl_align", type=transformers.hf_argparser.string_to_bool, default=True, nargs="?", const=True,
                        help="Train against the aligned target (false: plain mixing with area targets).")  # fmt: skip
    parser.add_argument("--label_smoothing", type=float, default=0.1, help="Label smoothing of each one-hot before mixing.")
    parser.add_argument("--tl_align_attention_path", type=str, default="auto", choices=ATTENTION_PATHS,
                        help="How token shares are computed from attention.")  # fmt: skip
    parser.add_argument("--interpolate_pos_encoding", type=transformers.hf_argparser.string_to_bool, default=False,
                        nargs="?", const=True, help="Train at an image size other than the model's image_size (set "
                        "by itself when the image processor's size differs).")  # fmt: skip
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading processes per process.")
    parser.add_argument("--horizontal_flip", type=transformers.hf_argparser.string_to_bool, default=True, nargs="?",
                        const=True, help="Random horizontal flips in training.")  # fmt: skip
    parser.add_argument("--crop_scale_min", type=float, default=0.08, help="Smallest area kept by the random crop.")
    parser.add_argument("--augmentation", type=str, default="default", choices=AUGMENTATIONS,
                        help="default (torchvision crop and flip) or deit (timm's RandAugment and random erasing, and "
                        "the DeiT recipe's mixing defaults: mixup_alpha 0.8, switch_prob 0.5, label_smoothing 0.1).")  # fmt: skip
    parser.add_argument("--repeated_augmentation", type=int, default=1,
                        help="Copies of each image in its batch, each augmented anew (DeiT's RASampler: 3); 1 disables.")  # fmt: skip
    parser.add_argument("--verify_images", action="store_true",
                        help="Read every training image before training (the validation images are always read).")  # fmt: skip
    parser.add_argument("--cpu", action="store_true", help="Train on the CPU even when an accelerator is present.")
    argv = list(argv) if argv is not None else None
    probe = parser.parse_known_args(argv)[0]
    use_digits = probe.dataset_name is None and probe.train_dir is None and probe.validation_dir is None
    if use_digits:  # the built-in default: its recipe, unless flags say otherwise
        parser.set_defaults(**DIGITS_DEFAULTS)
    if probe.augmentation == "deit":
        parser.set_defaults(**DEIT_RECIPE)
    mixing, args = parser.parse_args_into_dataclasses(args=argv)
    args.mixing, args.use_digits = mixing, use_digits

    # Sanity checks
    check_label_smoothing(args.label_smoothing, "`label_smoothing` (--label_smoothing)")
    if args.gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient_accumulation_steps must be at least 1, got {args.gradient_accumulation_steps}.")
    if args.repeated_augmentation < 1:
        raise ValueError(f"--repeated_augmentation must be at least 1 (1 disables it), got {args.repeated_augmentation}.")
    if args.checkpointing_steps not in (None, "epoch") and not args.checkpointing_steps.isdigit():
        raise ValueError(f"--checkpointing_steps must be a positive number of steps or 'epoch', got {args.checkpointing_steps!r}.")
    for option in ("max_train_samples", "max_eval_samples"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise ValueError(f"--{option} must be at least 1 (got {getattr(args, option)}); leave it out to use all.")
    if (args.push_to_hub or args.with_tracking or args.checkpointing_steps) and args.output_dir is None:
        raise ValueError("--push_to_hub, --with_tracking and --checkpointing_steps need --output_dir.")
    return args


def complete_checkpoints(output_dir):
    """The complete checkpoint folders (`step_N` / `epoch_N`) in `output_dir`, oldest first."""
    if output_dir is None or not os.path.isdir(output_dir):
        return []
    folders = [path for path in Path(output_dir).iterdir() if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIXES)]
    folders = [path for path in folders if path.name.split("_", 1)[1].isdigit()]  # staging folders end in .tmp
    return sorted(folders, key=lambda path: (int(path.name.split("_", 1)[1]), path.name.startswith("epoch_")))


def save_checkpoint(accelerator, output_dir, name):
    """`accelerator.save_state` into `name.tmp`, then a rename: a kill at any moment leaves only complete folders."""
    staging, target = os.path.join(output_dir, name + STAGING_SUFFIX), os.path.join(output_dir, name)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(staging)
    except (OSError, RuntimeError) as error:  # a full disk: say so, the previous checkpoint is untouched
        previous = complete_checkpoints(output_dir)
        full = disk_full_error(error, output_dir, name, str(previous[-1]) if previous else None)
        if full is None:
            raise
        raise full from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    accelerator.wait_for_everyone()


def main(argv=None):
    args = parse_args(argv)

    # Initialize the accelerator. We will let the accelerator handle device placement for us in this example.
    # The seedable sampler makes the shuffled order a function of the seed and the epoch, so that a resumed run
    # sees the batches the uninterrupted run saw.
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=args.cpu,
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir or ".", logging_dir=args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    check_one_run_per_launch(accelerator.num_processes, cpu_option="--cpu")
    # Make one log on every process with the configuration for debugging.
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO,
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_info()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()

    # If passed along, set the training seed now.
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process and args.output_dir is not None:
        check_writable(args.output_dir)  # before training: a failed save would lose the run
    accelerator.wait_for_everyone()

    # Get the datasets: from the Hub, local imagefolders, or the built-in digits. Without a validation split, a share
    # (train_val_split) of train becomes one, stratified by label and fixed by the seed, as in the Trainer example.
    if args.use_digits:
        with accelerator.main_process_first():
            digits = write_digits_imagefolder(default_digits_dir(BUILTIN_VIT["image_size"]), BUILTIN_VIT["image_size"])
        args.train_dir, args.validation_dir = str(digits / "train"), str(digits / "validation")
    dataset = load_image_dataset(args.dataset_name, train_dir=args.train_dir, validation_dir=args.validation_dir,
                                 trust_remote_code=args.trust_remote_code, train_val_split=args.train_val_split,
                                 seed=args.seed, label_column_name=args.label_column_name)  # fmt: skip
    verify = ["validation", "train"] if args.verify_images else ["validation"]  # bad files named before training
    dataset = prepare_image_dataset(dataset, args.image_column_name, args.label_column_name, verify)

    # Prepare label mappings.
    label2id, id2label = label_maps(dataset, args.label_column_name)

    # Load the model and image processor (or build the small default ViT), then make it TL-Align's.
    if args.model_name_or_path is None:
        config = ViTConfig(**BUILTIN_VIT, label2id=label2id, id2label=id2label)
        model = AutoModelForImageClassification.from_config(config)
        image_processor = default_image_processor(BUILTIN_VIT["image_size"])
    else:
        config = AutoConfig.from_pretrained(
            args.model_name_or_path,
            num_labels=len(label2id),
            id2label=id2label,
            label2id=label2id,
            finetuning_task="image-classification",
            trust_remote_code=args.trust_remote_code,
        )
        image_processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
        model = AutoModelForImageClassification.from_pretrained(
            args.model_name_or_path,
            config=config,
            ignore_mismatched_sizes=args.ignore_mismatched_sizes,
            trust_remote_code=args.trust_remote_code,
        )
    model = to_tl_align(model)
    model.tl_align_attention_path = args.tl_align_attention_path
    # At the image processor's size: a checkpoint fine-tuned at a higher resolution interpolates its position embeddings.
    interpolate = args.interpolate_pos_encoding or processor_resolution_differs(model, image_processor)
    model_kwargs = interpolation_kwargs(model, interpolate)

    # Preprocessing the datasets: torchvision augmentation sized from the image processor for training (seeded per
    # example, so a resumed run crops as the uninterrupted run did), the image processor itself for evaluation.
    train_transforms, val_transforms = make_transforms(
        image_processor, args.image_column_name, args.label_column_name, horizontal_flip=args.horizontal_flip,
        scale=(args.crop_scale_min, 1.0), seed=args.seed,
        augmentation=deit_augmentation(image_processor) if args.augmentation == "deit" else None,
    )  # fmt: skip
    with accelerator.main_process_first():
        if args.max_train_samples is not None:
            dataset["train"] = dataset["train"].shuffle(seed=args.seed).select(range(args.max_train_samples))
        train_dataset = dataset["train"].with_transform(train_transforms)
        if args.max_eval_samples is not None:
            dataset["validation"] = dataset["validation"].shuffle(seed=args.seed).select(range(args.max_eval_samples))
        eval_dataset = dataset["validation"].with_transform(val_transforms)

    # DataLoaders creation: mixed batches for training (each process mixes its own), unmixed for evaluation.
    collator = TLAlignCollator.from_model(model, args.mixing, seed=args.seed, rank=accelerator.process_index,
                                          **({"image_size": None} if interpolate else {}))  # fmt: skip
    # Repeated augmentation: a sampler whose order is a function of the seed and the epoch (set by `set_epoch`).
    repeated = None if args.repeated_augmentation == 1 else RepeatedAugmentationSampler(
        len(train_dataset), args.repeated_augmentation, args.per_device_train_batch_size, accelerator.num_processes,
        args.seed or 0,
    )  # fmt: skip
    train_dataloader = DataLoader(
        train_dataset,
        shuffle=repeated is None,
        sampler=repeated,
        collate_fn=collator,
        batch_size=args.per_device_train_batch_size,
        num_workers=args.dataloader_num_workers,
    )
    eval_dataloader = DataLoader(
        eval_dataset,
        collate_fn=collator.collate_unmixed,
        batch_size=args.per_device_eval_batch_size,
        num_workers=args.dataloader_num_workers,
    )

    # Optimizer
    # Split weights in two groups, one with weight decay (not biases and normalisation weights) and the other not.
    decay = {name for name in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if not name.endswith("bias")}
    optimizer_grouped_parameters = [
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(optimizer_grouped_parameters, lr=args.learning_rate)

    # Scheduler and math around the number of training steps.
    overrode_max_train_steps = False
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
        overrode_max_train_steps = True
    # The prepared scheduler steps once per process at each optimizer step. Before sharding, the loader's length
    # already counts the batches of all processes, so the epoch-derived step count needs no factor.
    scheduler_steps = args.max_train_steps if overrode_max_train_steps else args.max_train_steps * accelerator.num_processes
    lr_scheduler = get_scheduler(
        name=args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes or math.ceil(args.warmup_ratio * scheduler_steps),
        num_training_steps=scheduler_steps,
    )

    # What the weights are trained with, saved with every checkpoint: a resume with other settings is refused.
    training_record = LoopRecord(training_settings(args.mixing, args.tl_align, args.label_smoothing), accelerator.num_processes)
    accelerator.register_for_checkpointing(training_record)

    # Prepare everything with our `accelerator`.
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )

    # We need to recalculate our total training steps as the size of the training dataloader may have changed.
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if overrode_max_train_steps:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    checkpointing_steps = int(args.checkpointing_steps) if (args.checkpointing_steps or "").isdigit() else None

    # We need to initialize the trackers we use, and also store our configuration.
    if args.with_tracking:
        experiment_config = {key: value for key, value in vars(args).items() if isinstance(value, int | float | str | bool)}
        experiment_config.update(args.mixing.mixing_settings_dict(), lr_scheduler_type=args.lr_scheduler_type.value)
        accelerator.init_trackers("image_classification_no_trainer", experiment_config)

    # Get the metric function: top-1 and top-5 accuracy, shipped with tl-align-hf (no Hub access).
    metric = evaluate.load(ACCURACY_METRIC_PATH, keep_in_memory=True)

    # Train!
    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.per_device_train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    logger.info(f"  Mixing = {args.mixing}, TL-Align = {args.tl_align}")
    progress_bar = tqdm(range(args.max_train_steps), disable=not accelerator.is_local_main_process)
    completed_steps, starting_epoch, resume_step = 0, 0, None

    # Potentially load in the weights and states from a previous save
    if args.resume_from_checkpoint:
        checkpoint_path = args.resume_from_checkpoint
        if checkpoint_path == "latest":
            checkpoints = complete_checkpoints(args.output_dir)
            checkpoint_path = str(checkpoints[-1]) if checkpoints else None
        elif not os.path.isdir(checkpoint_path) or Path(checkpoint_path).name.endswith(STAGING_SUFFIX):
            raise ValueError(f"--resume_from_checkpoint {checkpoint_path} is not a complete checkpoint folder; pass "
                             "one of step_N / epoch_N, or --resume_from_checkpoint latest.")  # fmt: skip
    else:
        checkpoint_path = None
    if checkpoint_path is not None:
        accelerator.print(f"Resumed from checkpoint: {checkpoint_path}")
        accelerator.load_state(checkpoint_path)
        # The folder's name says where training stopped.
        prefix, number = Path(checkpoint_path).name.split("_", 1)
        if prefix == "epoch":
            starting_epoch = int(number) + 1
            completed_steps = starting_epoch * num_update_steps_per_epoch
        else:
            completed_steps = int(number)
            starting_epoch = completed_steps // num_update_steps_per_epoch
            resume_step = (completed_steps % num_update_steps_per_epoch) * args.gradient_accumulation_steps
        training_record.check_resumed(completed_steps, args.max_train_steps, checkpoint_path)

    # update the progress_bar if load from checkpoint
    progress_bar.update(completed_steps)
    log_history, loss_since_log, micro_batches_since_log, sums_since_log, train_sums = [], 0.0, 0, None, None
    eval_metrics = {}

    for epoch in range(starting_epoch, args.num_train_epochs):
        model.train()
        collator.set_epoch(epoch)  # before the loader's workers start: they copy the collator and the transform
        train_transforms.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        if epoch == starting_epoch and resume_step:
            # We skip the first `n` batches in the dataloader when resuming from a checkpoint
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_step)
        else:
            active_dataloader = train_dataloader
        for batch in active_dataloader:
            with accelerator.accumulate(model):
                mixing = {key: batch[key] for key in ("mix_index", "token_weights", "mix_lam")} if args.tl_align else {}
                outputs = model(pixel_values=batch["pixel_values"], **mixing, **model_kwargs)
                loss, alignment_sums = mixed_batch_loss(
                    outputs, batch, tl_align=args.tl_align, label_smoothing=args.label_smoothing
                )
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            loss_since_log, micro_batches_since_log = loss_since_log + loss.detach(), micro_batches_since_log + 1
            sums_since_log = alignment_sums if sums_since_log is None else sums_since_log + alignment_sums

            # Checks if the accelerator has performed an optimization step behind the scenes
            if accelerator.sync_gradients:
                progress_bar.update(1)
                completed_steps += 1
                if completed_steps % args.logging_steps == 0 or completed_steps >= args.max_train_steps:
                    # Loss and alignment metrics: means over all processes (the one sync, on logged steps only).
                    reduced_sums = accelerator.reduce(sums_since_log, reduction="sum")
                    train_sums = reduced_sums if train_sums is None else train_sums + reduced_sums
                    mean_loss = accelerator.reduce(loss_since_log, reduction="mean").item() / micro_batches_since_log
                    if not math.isfinite(mean_loss):
                        raise RuntimeError(f"The training loss was {mean_loss} by step {completed_steps}: check the images "
                                           "(NaN pixels), the learning rate and fp16 overflow.")  # fmt: skip
                    entry = {"loss": mean_loss,
                             "learning_rate": lr_scheduler.get_last_lr()[0], **alignment_metrics(reduced_sums),
                             "epoch": epoch, "step": completed_steps}  # fmt: skip
                    log_history.append(entry)
                    if args.with_tracking:
                        accelerator.log(entry, step=completed_steps)
                    loss_since_log, micro_batches_since_log, sums_since_log = 0.0, 0, None
                if checkpointing_steps and completed_steps % checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, f"step_{completed_steps}")
            if completed_steps >= args.max_train_steps:
                break

        # Evaluation: unmixed, every validation image counted once across processes.
        model.eval()
        eval_loss, eval_count = 0.0, 0
        for batch in eval_dataloader:
            with torch.no_grad():
                logits = model(pixel_values=batch["pixel_values"], **model_kwargs).logits
            logits, references = accelerator.gather_for_metrics((logits, batch["labels"]))
            eval_loss += torch.nn.functional.cross_entropy(logits.float(), references, reduction="sum").item()
            eval_count += len(references)
            metric.add_batch(predictions=logits.float().cpu(), references=references.cpu())
        eval_metrics = {f"eval_{name}": value for name, value in metric.compute().items()}
        eval_metrics.update(eval_loss=eval_loss / eval_count, eval_samples=eval_count)
        logger.info(f"epoch {epoch}: {eval_metrics}")
        log_history.append({**eval_metrics, "epoch": epoch, "step": completed_steps})
        if args.with_tracking:
            accelerator.log({**eval_metrics, "epoch": epoch}, step=completed_steps)
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, args.output_dir, f"epoch_{epoch}")
        if completed_steps >= args.max_train_steps:
            break

    if args.with_tracking:
        accelerator.end_training()

    results = {**eval_metrics, "train_steps": completed_steps}
    if train_sums is not None:
        results.update({f"train_{name}": value for name, value in alignment_metrics(train_sums).items()})
    if args.output_dir is not None:
        accelerator.wait_for_everyone()
        unwrapped_model = accelerator.unwrap_model(model)
        state_dict = accelerator.get_state_dict(model)  # every process: gathers FSDP shards / ZeRO-3 partitions
        unwrapped_model.save_pretrained(
            args.output_dir,
            is_main_process=accelerator.is_main_process,
            save_function=accelerator.save,
            state_dict=state_dict,
        )
        if accelerator.is_main_process:
            image_processor.save_pretrained(args.output_dir)
            with open(os.path.join(args.output_dir, "all_results.json"), "w") as f:
                json.dump(results, f, indent=2)
            with open(os.path.join(args.output_dir, "log_history.json"), "w") as f:
                json.dump({"log_history": log_history}, f, indent=2)
            trained = training_record.settings  # a resumed finished run: the checkpoint's settings
            card = model_card(
                model_class_name=type(unwrapped_model).__name__,
                finetuned_from=args.model_name_or_path,
                dataset=args.dataset_name or ("scikit-learn digits" if args.use_digits else None),
                mixing=MixingSettings.from_config(trained).mixing_settings_dict(),
                tl_align=trained["tl_align"],
                label_smoothing=trained["label_smoothing"],
                hyperparameters={"learning_rate": args.learning_rate, "train_batch_size": args.per_device_train_batch_size,
                                 "total_train_batch_size": total_batch_size, "seed": args.seed,
                                 "lr_scheduler_type": args.lr_scheduler_type.value, "training_steps": completed_steps},
                eval_results=eval_metrics,
                repo_id=args.hub_model_id,
            )  # fmt: skip
            card.save(os.path.join(args.output_dir, "README.md"))
            if args.push_to_hub:
                push_checkpoint_to_hub(args.output_dir, args.hub_model_id or Path(args.output_dir).name,
                                       token=args.hub_token, commit_message="End of training")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
