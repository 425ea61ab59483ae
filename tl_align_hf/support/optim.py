"""The optimizer side of the DeiT / timm training recipe, for `TLAlignTrainer.create_optimizer`/`create_scheduler`
(:func:`recipe_optimizer`, :func:`recipe_scheduler`).

- parameter groups without weight decay on 1-d parameters (biases, norms, layer scales), position embeddings and
  prefix tokens, as timm's optimizer factory (`param_groups_weight_decay`, the model's `no_weight_decay()`);
- layer-wise learning-rate decay (BEiT, Bao et al. 2022; timm's `param_groups_layer_decay`): the embeddings are
  layer 0, block i is layer i + 1, the rest (final norm, head) layer L + 1, and layer l trains at
  `layer_decay ** (L + 1 - l)` times the learning rate;
- the learning rate scaled linearly by the global batch (DeiT: `lr * batch_size * world_size / 512`);
- timm's `CosineLRScheduler` per optimizer step: a linear warm-up from `warmup_lr`, a cosine from the learning rate
  to `min_lr` whose phase counts from step 0 (timm's `warmup_prefix=False`, as DeiT), then `min_lr` for the
  cool-down steps. A `LambdaLR` of the step alone, so a resumed run continues the same curve.
"""

from __future__ import annotations

import functools
import math
import re

import torch

# Parameters that timm's ViTs list in `no_weight_decay()`, and their names in transformers' vision models.
NO_WEIGHT_DECAY_NAMES = (
    "pos_embed", "cls_token", "dist_token", "reg_token", "position_embeddings", "distillation_token", "register_tokens",
    "mask_token", "relative_position_bias_table",
)  # fmt: skip
# Blocks numbered in the parameter names: transformers' `layers.N` (ViT, DeiT, BEiT) and `encoder.layer.N` (DINOv2,
# Data2VecVision); not Swin's stages (`encoder.layers.N.blocks.M`).
_TRANSFORMERS_BLOCK = re.compile(r"(?:^|\.)(?:encoder\.layer|layers)\.(\d+)\.")
_STAGES = re.compile(r"layers\.\d+\.blocks\.")
LAYER_DECAY_FAMILIES = (
    "transformers' ViT, DeiT, BEiT, DINOv2, Data2VecVision (blocks layers.N or encoder.layer.N) and timm models through "
    "TimmWrapperForImageClassification whose timm class has a group_matcher (ViT, DeiT, DeiT III, EVA, ...)"
)


def no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    """Names of the trainable parameters timm's optimizer factory trains without weight decay: every parameter of
    at most one dimension, those the model's modules list in `no_weight_decay()` (timm), and those named like a
    position embedding or a prefix token (`NO_WEIGHT_DECAY_NAMES`)."""
    names = set()
    for module_name, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names.update(f"{module_name}.{name}" if module_name else name for name in listed())
    for name, parameter in model.named_parameters():
        if parameter.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY_NAMES:
            names.add(name)
    return names & {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def layer_ids(model: torch.nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name: layer id}, number of layer ids) for layer-wise lr decay.

    timm models (through `TimmWrapperForImageClassification`) use timm's own `group_matcher` as
    `param_groups_layer_decay` does (stem 0, block i at i + 1, everything unmatched at the top); transformers' models
    put `embeddings` at 0, block i (`layers.i` or `encoder.layer.i`) at i + 1 and the rest at the top. Raises a ValueError for a model whose
    blocks are not numbered that way (e.g. Swin's stages).
    """
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None and hasattr(timm_model, "group_matcher"):
        from timm.models import group_parameters

        prefix = next(name for name, module in model.named_modules() if module is timm_model)
        timm_ids = group_parameters(timm_model, timm_model.group_matcher(coarse=False), reverse=True)
        num_ids = max(timm_ids.values()) + 1
        ids = {name: timm_ids.get(name.removeprefix(f"{prefix}."), num_ids - 1) for name, _ in model.named_parameters()}
        return ids, num_ids
    blocks = {name: int(match.group(1)) for name, _ in model.named_parameters() if (match := _TRANSFORMERS_BLOCK.search(name))}
    if timm_model is not None or not blocks or any(_STAGES.search(name) for name in blocks):
        raise ValueError(
            f"layer_decay (--layer_decay) needs a model whose blocks are numbered; {type(model).__name__} has none "
            f"that it recognises. Supported: {LAYER_DECAY_FAMILIES}. Leave layer_decay unset for this model."
        )
    top = max(blocks.values()) + 2
    ids = {name: blocks[name] + 1 if name in blocks else 0 if "embeddings." in name else top for name, _ in model.named_parameters()}
    return ids, top + 1


def optimizer_param_groups(
    model: torch.nn.Module,
    learning_rate: float,
    weight_decay: float,
    no_decay_names: set[str],
    layer_decay: float | None = None,
) -> list[dict]:
    """Parameter groups for a torch optimizer: one per (layer, decay or not), each with its `params`, `lr`,
    `weight_decay` and `lr_scale` (the layer's factor; 1.0 without `layer_decay`). Trainable parameters only."""
    ids, num_ids = layer_ids(model) if layer_decay is not None else ({}, 1)
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer, decays = ids.get(name, num_ids - 1), name not in no_decay_names
        scale = layer_decay ** (num_ids - 1 - layer) if layer_decay is not None else 1.0
        group = groups.setdefault((layer, decays), {
            "params": [], "param_names": [], "lr": learning_rate * scale, "lr_scale": scale,
            "weight_decay": weight_decay if decays else 0.0,
        })  # fmt: skip
        group["params"].append(parameter)
        group["param_names"].append(name)
    return list(groups.values())


def scaled_learning_rate(learning_rate: float, global_batch_size: int, lr_base_size: int | None) -> float:
    """`learning_rate * global_batch_size / lr_base_size` (the linear scaling rule), or `learning_rate` unchanged."""
    return learning_rate if lr_base_size is None else learning_rate * global_batch_size / lr_base_size


def timm_cosine_lr(
    step: int, *, base_lr: float, warmup_steps: int, warmup_lr: float, decay_steps: int, min_lr: float
) -> float:
    """The learning rate of timm's `CosineLRScheduler(t_initial=decay_steps, lr_min=min_lr, warmup_t=warmup_steps,
    warmup_lr_init=warmup_lr, t_in_epochs=False)` at optimizer step `step` (0 for the first step)."""
    if step < warmup_steps:
        return warmup_lr + step * (base_lr - warmup_lr) / warmup_steps
    if step >= decay_steps:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * step / decay_steps))


def _lr_factor(step: int, base_lr: float, **schedule) -> float:
    return timm_cosine_lr(step, base_lr=base_lr, **schedule) / base_lr


def timm_cosine_schedule(
    optimizer: torch.optim.Optimizer,
    base_lr: float,
    num_training_steps: int,
    num_warmup_steps: int = 0,
    warmup_lr: float = 0.0,
    min_lr: float = 0.0,
    num_cooldown_steps: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR` following :func:`timm_cosine_lr`, the cosine ending `num_cooldown_steps` before the last step.

    Each group's rate is its initial rate times `timm_cosine_lr(step) / base_lr`: a group at `lr_scale * base_lr`
    (layer decay) follows `lr_scale` times the curve, warm-up start and floor included, as in timm.
    """
    decay_steps = num_training_steps - num_cooldown_steps
    if base_lr <= 0 or decay_steps <= num_warmup_steps:
        raise ValueError(
            f"timm's cosine schedule needs a positive learning rate (got {base_lr}) and more steps than warm-up plus "
            f"cool-down (got {num_training_steps} steps, {num_warmup_steps} warm-up, {num_cooldown_steps} cool-down): "
            "lower warmup_epochs / cooldown_epochs or train longer."
        )
    factor = functools.partial(
        _lr_factor, base_lr=base_lr, warmup_steps=num_warmup_steps, warmup_lr=warmup_lr, decay_steps=decay_steps,
        min_lr=min_lr,
    )  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def recipe_learning_rate(args) -> float:
    """`args.learning_rate`, scaled by the global batch (per-device batch x accumulation x processes) over
    `args.lr_base_size` when that is set (a `TLAlignConfig`)."""
    global_batch = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    return scaled_learning_rate(args.learning_rate, global_batch, args.lr_base_size)


def recipe_optimizer(trainer, model: torch.nn.Module) -> torch.optim.Optimizer | None:
    """The optimizer of `TLAlignTrainer.create_optimizer` with `filter_bias_and_bn`, `layer_decay` or `lr_base_size`:
    the class and arguments of the trainer's `optim` on the groups of :func:`optimizer_param_groups` (timm's
    no-decay rule or Trainer's, layer-wise rates, the batch-scaled rate). `None` when none is set (Trainer's own)."""
    args = trainer.args
    if not (args.filter_bias_and_bn or args.layer_decay is not None or args.lr_base_size):
        return None
    if args.filter_bias_and_bn:
        no_decay = no_weight_decay_names(model)
    else:
        trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        no_decay = trainable - set(trainer.get_decay_parameter_names(model))
    learning_rate = recipe_learning_rate(args)
    groups = optimizer_param_groups(model, learning_rate, args.weight_decay, no_decay, args.layer_decay)
    optimizer_cls, optimizer_kwargs = trainer.optimizer_cls_and_kwargs or trainer.get_optimizer_cls_and_kwargs(args, model)
    if not isinstance(optimizer_cls, type) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
        raise ValueError(
            f"filter_bias_and_bn, layer_decay and lr_base_size build parameter groups for a torch optimizer class; "
            f"optim={args.optim!r} builds its own. Use e.g. optim='adamw_torch', or leave them unset."
        )
    return optimizer_cls(groups, **{**optimizer_kwargs, "lr": learning_rate})


def recipe_scheduler(
    args, optimizer: torch.optim.Optimizer, num_training_steps: int
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The scheduler of `TLAlignTrainer.create_scheduler` with `warmup_epochs`, `warmup_lr`, `min_lr` or
    `cooldown_epochs`: :func:`timm_cosine_schedule` per step, the epochs counted in steps of this run (warm-up from
    `warmup_steps` / `warmup_ratio` without `warmup_epochs`). `None` when none is set (Trainer's own)."""
    timm_schedule = any(getattr(args, name) is not None for name in ("warmup_epochs", "warmup_lr", "min_lr"))
    if not (timm_schedule or args.cooldown_epochs):
        return None
    steps_per_epoch = num_training_steps / args.num_train_epochs
    if args.warmup_epochs is not None:
        warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    else:
        warmup_steps = args.get_warmup_steps(num_training_steps)
    return timm_cosine_schedule(
        optimizer,
        base_lr=recipe_learning_rate(args),
        num_training_steps=num_training_steps,
        num_warmup_steps=warmup_steps,
        warmup_lr=args.warmup_lr or 0.0,
        min_lr=args.min_lr or 0.0,
        num_cooldown_steps=round(args.cooldown_epochs * steps_per_epoch),
    )
