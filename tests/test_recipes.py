"""The training recipes (examples/recipes/*.yaml) and the pieces they use: repeated augmentation, drop path, timm's
cosine schedule, the no-decay and layer-decay parameter groups, the batch-scaled learning rate and the model EMA.

The recipe settings are checked against the official values written out here, with their sources; the schedule,
the groups and drop path against timm's own functions; the DeiT-Small recipe runs on two processes and resumes
exactly.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.data_loader import BatchSamplerShard
from PIL import Image
from safetensors.torch import load_file
from timm.layers import DropPath
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from transformers import (
    Dinov2Config,
    Dinov2ForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from tl_align_hf import TLAlignConfig, TLAlignTrainer
from tl_align_hf.support.ema import ModelEma
from tl_align_hf.support.optim import (
    no_weight_decay_names,
    optimizer_param_groups,
    scaled_learning_rate,
    timm_cosine_schedule,
)
from tl_align_hf.support.recipes import set_drop_path_rate
from tl_align_hf.support.sampler import RepeatedAugmentationSampler
from tl_align_hf.support.transforms import TrainTransform

from .test_distributed import ROOT, torchrun
from .test_no_trainer import EXAMPLES, load_example
from .tiny_models import TINY_IMAGE_SIZE, tiny_config

RECIPES = EXAMPLES / "recipes"
# A DeiT of timm at the digits' 16 px: 4 px patches, 2 blocks of width 32 (the recipe's machinery, not its size).
TINY_DEIT = {"img_size": TINY_IMAGE_SIZE, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}

# --------------------------------------------------------------------------------------------- official settings
# Euphoria16/TL-Align, main_tla.py (argparse defaults) and train_deit_small_tla.sh (8 processes, --batch-size 128,
# --tl-align); the same for Tiny and Base with --model. Values after main_tla.py's own arithmetic.
OFFICIAL_DEIT_TL_ALIGN = {
    "processes x batch per process": (8, 128),  # train_deit_small_tla.sh: --nproc_per_node=8 --batch-size 128
    "learning rate": 1e-3,  # linear_scaled_lr = 5e-4 * 128 * 8 / 512
    "optimizer": ("adamw", (0.9, 0.999), 1e-8),  # --opt adamw, --opt-betas None (torch's), --opt-eps 1e-8
    "weight decay": 0.05,  # --weight-decay; timm 0.3.2 create_optimizer skips bias, 1-d and model.no_weight_decay()
    "no decay on": {"bias", "norm", "pos_embed", "cls_token"},
    "gradient clipping": None,  # --clip-grad None
    "schedule": ("cosine", 5, 1e-6, 1e-5),  # --sched cosine, --warmup-epochs 5, --warmup-lr 1e-6, --min-lr 1e-5
    "epochs trained": 300,  # for epoch in range(args.start_epoch, args.epochs): the 10 --cooldown-epochs never run
    "drop path": 0.1,  # --drop-path 0.1 (--drop 0.0)
    "label smoothing": 0.1,  # --smoothing 0.1
    "mixing": ("token_cutmix", 1.0, 0.0, 1.0, "batch"),  # TL_AlignMix(tokenmix_alpha=1.0, mixup 0.0, prob 1.0, batch)
    "repeated augmentation": 3,  # --repeated-aug (default True), RASampler(num_repeats=3)
    "augmentation": ("rand-m9-mstd0.5-inc1", 0.25, "pixel", "bicubic"),  # --aa, --reprob, --remode, --train-interp.
    "evaluation": (256, 224),  # datasets.build_transform: Resize(int(256 / 224 * 224)), CenterCrop(224)
    "seed": 0,
}
PAPER_TOP1 = {"tiny": (72.2, 73.2), "small": (79.8, 80.6), "base": (81.8, 82.3)}  # arXiv 2210.06455, DeiT rows


def parse_recipe(name: str, *flags: str):
    """The example script's (model_args, data_args, training_args) for a recipe, on the CPU."""
    script = load_example("run_image_classification")
    return script.parse_args(["--config", str(RECIPES / name), "--train_dir", "train", "--bf16", "false", *flags])


def resolved_deit_settings(model_args, data_args, args, num_processes: int) -> dict:
    """The settings a run of the recipe trains with, in the terms of OFFICIAL_DEIT_TL_ALIGN."""
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes
    model = TimmWrapperForImageClassification(
        set_drop_path_rate(TimmWrapperConfig(architecture=model_args.timm_model, num_labels=10, model_args={
            **TINY_DEIT, "img_size": 224, "patch_size": 16}), model_args.drop_path_rate)  # fmt: skip
    )
    no_decay = no_weight_decay_names(model)
    no_decay_kinds = {kind for kind in ("bias", "norm", "pos_embed", "cls_token") if any(kind in name for name in no_decay)}
    assert all(("norm" in name or name.endswith(("bias", "pos_embed", "cls_token"))) for name in no_decay), no_decay
    script = load_example("run_image_classification")
    processor = script.timm_image_processor(model.timm_model, model_args.crop_pct)
    return {
        "processes x batch per process": (num_processes, args.per_device_train_batch_size),
        "learning rate": scaled_learning_rate(args.learning_rate, global_batch, args.lr_base_size),
        "optimizer": (args.optim.value.removesuffix("_torch"), (args.adam_beta1, args.adam_beta2), args.adam_epsilon),
        "weight decay": args.weight_decay if args.filter_bias_and_bn else None,
        "no decay on": no_decay_kinds,
        "gradient clipping": args.max_grad_norm or None,
        "schedule": (args.lr_scheduler_type.value, args.warmup_epochs, args.warmup_lr, args.min_lr),
        "epochs trained": args.num_train_epochs if not args.cooldown_epochs else None,
        "drop path": round(model.timm_model.blocks[-1].drop_path1.drop_prob, 6),  # float32 linspace
        "label smoothing": args.label_smoothing,
        "mixing": (args.mixing_method, args.cutmix_alpha, args.mixup_alpha, args.mix_prob, args.mix_mode),
        "repeated augmentation": args.repeated_augmentation,
        "augmentation": deit_augmentation_settings(script.deit_augmentation(processor)) if data_args.augmentation == "deit" else None,
        "evaluation": (processor.size["shortest_edge"], processor.crop_size["height"]),
        "seed": args.seed,
    }  # fmt: skip


def deit_augmentation_settings(transform) -> tuple:
    """(RandAugment config string, random erasing probability and mode, crop interpolation) of timm's transform."""
    crop, rand_augment, erasing = transform.transforms[0], transform.transforms[2], transform.transforms[-1]
    (magnitude,), (magnitude_std,) = {op.magnitude for op in rand_augment.ops}, {op.magnitude_std for op in rand_augment.ops}
    increasing = int(any(op.name.endswith("Increasing") for op in rand_augment.ops))
    assert rand_augment.num_layers == 2  # timm's default n
    interpolation = getattr(crop.interpolation, "value", crop.interpolation)
    return f"rand-m{magnitude}-mstd{magnitude_std}-inc{increasing}", erasing.probability, erasing.mode, interpolation


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_deit_recipe_settings_equal_the_official_ones(size):
    model_args, data_args, args = parse_recipe(f"deit_{size}_tl_align.yaml")
    assert model_args.timm_model == f"deit_{size}_patch16_224"
    assert resolved_deit_settings(model_args, data_args, args, num_processes=8) == OFFICIAL_DEIT_TL_ALIGN
    text = (RECIPES / f"deit_{size}_tl_align.yaml").read_text()
    baseline, aligned = PAPER_TOP1[size]
    assert f"{baseline} -> {aligned} top-1" in text  # the expected accuracy, with its source, in the recipe


@pytest.mark.parametrize("name", ["finetune_vit_base_in21k.yaml", "finetune_dinov2_base.yaml"])
def test_finetune_recipes_parse_and_name_their_sources(name):
    model_args, _, args = parse_recipe(name)
    text = (RECIPES / name).read_text()
    if "vit_base" in name:  # vit_jax/configs/common.py and the ViT paper's fine-tuning protocol
        assert (args.optim.value, args.optim_args, args.learning_rate, args.weight_decay) == ("sgd", "momentum=0.9", 0.03, 0.0)
        assert (args.max_grad_norm, args.warmup_steps, args.max_steps, args.layer_decay, args.ema_decay) == (1.0, 500, 10000, None, None)
        assert "vit_jax/configs/common.py" in text
    else:  # facebookresearch/mae FINETUNE.md, ViT-Base
        assert (args.learning_rate, args.lr_base_size, args.layer_decay, args.weight_decay) == (5e-4, 256, 0.65, 0.05)
        assert (model_args.drop_path_rate, args.warmup_epochs, args.min_lr, args.mixup_alpha) == (0.1, 5, 1e-6, 0.8)
        assert args.ema_decay == 0.999 and "FINETUNE.md" in text
    assert yaml.safe_load(text)["bf16"] is True


# ----------------------------------------------------------------------------------------------- repeated augmentation
@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_repeated_augmentation_puts_the_copies_of_an_image_in_one_batch_of_one_process(num_processes):
    batch_size, num_repeats, length = 8, 3, 101
    sampler = RepeatedAugmentationSampler(length, num_repeats, batch_size, num_processes, seed=5)
    sampler.set_epoch(2)
    shards = [list(BatchSamplerShard(torch.utils.data.BatchSampler(sampler, batch_size, False), num_processes, rank))
              for rank in range(num_processes)]  # fmt: skip
    steps = length // (batch_size * num_processes)
    assert [len(shard) for shard in shards] == [steps] * num_processes  # the batches of a plain epoch, dropping the last
    seen = Counter()
    for shard in shards:
        for batch in shard:
            counts = Counter(batch)
            assert len(batch) == batch_size and sorted(counts.values())[1:] == [num_repeats] * (len(counts) - 1)
            seen.update(counts.keys())
    assert max(seen.values()) == 1  # an image is in one batch of one process only
    assert list(sampler) == list(sampler)  # a pure function of (seed, epoch)
    epoch_0 = RepeatedAugmentationSampler(length, num_repeats, batch_size, num_processes, seed=5)
    assert list(epoch_0) != list(sampler)


def test_no_trainer_script_with_repeated_augmentation_resumes_exactly(digits, tiny_checkpoint, tmp_path):
    """The Accelerate example with repeated augmentation: resumed in its second epoch (step 4), the weights of the
    uninterrupted run."""
    from .test_no_trainer import saved_weights, train

    train(digits, tiny_checkpoint, tmp_path / "full", **{"--repeated_augmentation": "3"})
    train(digits, tiny_checkpoint, tmp_path / "resumed", **{"--repeated_augmentation": "3",
                                                            "--resume_from_checkpoint": str(tmp_path / "full" / "step_4")})  # fmt: skip
    assert saved_weights(tmp_path / "resumed") == saved_weights(tmp_path / "full")
    plain = tmp_path / "plain"
    train(digits, tiny_checkpoint, plain)
    assert saved_weights(plain) != saved_weights(tmp_path / "full")  # the sampler changed what was trained on


def test_raises_error_when_repeated_augmentation_has_less_than_one_step():
    with pytest.raises(ValueError, match="at least one full step"):
        RepeatedAugmentationSampler(15, 3, batch_size=8, num_processes=2)


def test_train_transform_draws_each_copy_of_an_image_anew():
    image = Image.fromarray(torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8).numpy())
    other = Image.fromarray(torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8).numpy())
    transform = TrainTransform("image", "label", load_example("run_image_classification").deit_augmentation(
        load_example("run_image_classification").default_image_processor(16)), seed=1)  # fmt: skip
    batch = transform({"image": [image, other, image, image], "label": [0, 1, 0, 0]})["pixel_values"]
    alone = transform({"image": [image], "label": [0]})["pixel_values"][0]
    assert torch.equal(batch[0], alone)  # the first copy is drawn as without repeats
    assert not torch.equal(batch[0], batch[2]) and not torch.equal(batch[2], batch[3])


# ----------------------------------------------------------------------------------------------- drop path
def test_drop_path_of_timm_models_follows_timm_rule():
    config = set_drop_path_rate(TimmWrapperConfig(architecture="deit_tiny_patch16_224", num_labels=3,
                                                  model_args={**TINY_DEIT, "depth": 3}), 0.2)  # fmt: skip
    blocks = TimmWrapperForImageClassification(config).timm_model.blocks
    rates = [block.drop_path1.drop_prob if isinstance(block.drop_path1, DropPath) else 0.0 for block in blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])  # timm's calculate_drop_path_rates: linspace(0, rate, depth)
    assert set_drop_path_rate(Dinov2Config(), 0.1).drop_path_rate == 0.1


def test_raises_error_when_drop_path_is_asked_of_vit():
    with pytest.raises(ValueError, match="no stochastic depth.*DINOv2"):
        set_drop_path_rate(ViTConfig(), 0.1)
    assert set_drop_path_rate(ViTConfig(), 0.0).model_type == "vit"  # nothing asked, nothing refused


# ----------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("warmup_steps, cooldown_steps", [(5, 0), (7, 6), (0, 3)])
def test_timm_cosine_schedule_equals_timm_scheduler(warmup_steps, cooldown_steps):
    total_steps, base_lr = 40, 1e-3
    model = torch.nn.Linear(2, 2)
    groups = [{"params": [model.weight], "lr": base_lr}, {"params": [model.bias], "lr": base_lr * 0.5, "lr_scale": 0.5}]
    ours = timm_cosine_schedule(torch.optim.SGD(groups), base_lr, total_steps, warmup_steps, 1e-6, 1e-5, cooldown_steps)
    timm_optimizer = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr_scale": 0.5}], lr=base_lr)
    timm_schedule = CosineLRScheduler(timm_optimizer, t_initial=total_steps - cooldown_steps, lr_min=1e-5,
                                      warmup_t=warmup_steps, warmup_lr_init=1e-6, t_in_epochs=False)  # fmt: skip
    for step in range(total_steps):
        timm_schedule.step_update(step)
        expected = [group["lr"] for group in timm_optimizer.param_groups]
        assert ours.get_last_lr() == pytest.approx(expected, rel=1e-12, abs=1e-15), step
        ours.optimizer.step()
        ours.step()


def test_raises_error_when_timm_schedule_settings_have_another_scheduler(tmp_path):
    with pytest.raises(ValueError, match="lr_scheduler_type='cosine'"):
        TLAlignConfig(output_dir=str(tmp_path), min_lr=1e-5, lr_scheduler_type="linear")
    with pytest.raises(ValueError, match="layer_decay"):
        TLAlignConfig(output_dir=str(tmp_path), layer_decay=1.5)
    with pytest.raises(ValueError, match="repeated_augmentation"):
        TLAlignConfig(output_dir=str(tmp_path), repeated_augmentation=0)


# ----------------------------------------------------------------------------------------------- parameter groups
def tiny_timm_deit() -> TimmWrapperForImageClassification:
    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture="deit_tiny_patch16_224", num_labels=3,
                                                               model_args=TINY_DEIT))  # fmt: skip


def per_parameter(groups: list[dict], names_of) -> dict[str, tuple[float, float]]:
    """{parameter name: (lr scale, weight decay)} of a list of parameter groups."""
    return {name: (group["lr_scale"], group["weight_decay"]) for group in groups for name in names_of(group)}


def test_no_decay_groups_equal_timm_optimizer_factory():
    model = tiny_timm_deit()
    names = {id(parameter): name for name, parameter in model.timm_model.named_parameters()}
    timm_groups = param_groups_weight_decay(model.timm_model, 0.05, no_weight_decay_list=model.timm_model.no_weight_decay())
    expected = {f"timm_model.{names[id(p)]}": group["weight_decay"] for group in timm_groups for p in group["params"]}
    ours = optimizer_param_groups(model, 1e-3, 0.05, no_weight_decay_names(model))
    assert {name: wd for group in ours for name, wd in zip(group["param_names"], [group["weight_decay"]] * 99)} == expected
    assert expected["timm_model.pos_embed"] == expected["timm_model.cls_token"] == 0.0


def test_layer_decay_groups_equal_timm_param_groups_layer_decay():
    model = tiny_timm_deit()
    names = {id(parameter): name for name, parameter in model.timm_model.named_parameters()}
    timm_groups = param_groups_layer_decay(model.timm_model, 0.05, model.timm_model.no_weight_decay(), layer_decay=0.7)
    expected = per_parameter(timm_groups, lambda group: [f"timm_model.{names[id(p)]}" for p in group["params"]])
    ours = optimizer_param_groups(model, 1e-3, 0.05, no_weight_decay_names(model), layer_decay=0.7)
    assert per_parameter(ours, lambda group: group["param_names"]) == pytest.approx(expected)
    assert all(group["lr"] == pytest.approx(1e-3 * group["lr_scale"]) for group in ours)


def test_layer_decay_of_transformers_vit_gives_each_block_its_ratio():
    num_layers, decay = 3, 0.5
    model = ViTForImageClassification(tiny_config("vit", num_hidden_layers=num_layers))
    groups = optimizer_param_groups(model, 1.0, 0.05, no_weight_decay_names(model), layer_decay=decay)
    ratios = {name: group["lr"] for group in groups for name in group["param_names"]}
    for name, ratio in ratios.items():
        if name.startswith("vit.embeddings."):
            expected = decay ** (num_layers + 1)  # the embeddings: below the first block
        elif name.startswith("vit.layers."):
            expected = decay ** (num_layers - int(name.split(".")[2]))  # block i of L: decay ** (L - i)
        else:
            expected = 1.0  # the final norm and the head
        assert ratio == pytest.approx(expected), name
    assert {name for group in groups if group["weight_decay"] == 0.0 for name in group["param_names"]} >= {
        "vit.embeddings.cls_token", "vit.embeddings.position_embeddings", "classifier.bias"}  # fmt: skip


def test_raises_error_when_layer_decay_is_asked_of_a_model_without_numbered_blocks():
    swin = SwinForImageClassification(SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1]))
    with pytest.raises(ValueError, match="blocks are numbered.*DINOv2"):
        optimizer_param_groups(swin, 1e-3, 0.05, set(), layer_decay=0.75)


def test_learning_rate_is_scaled_by_the_global_batch():
    assert scaled_learning_rate(5e-4, 8 * 128, 512) == pytest.approx(1e-3)  # DeiT: 5e-4 per 512 images
    assert scaled_learning_rate(5e-4, 8 * 128, None) == 5e-4


# ----------------------------------------------------------------------------------------------- model EMA
def test_ema_update_is_the_moving_average_and_swapping_restores_the_weights():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = ModelEma(model, decay=0.75)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(4.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    trained = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with ema.swapped_into(model):
        averaged = model.state_dict()
        expected = 0.75 * before["0.weight"] + 0.25 * trained["0.weight"]
        torch.testing.assert_close(averaged["0.weight"], expected, rtol=0, atol=1e-6)
        assert torch.equal(averaged["0.bias"], before["0.bias"]) and averaged["1.num_batches_tracked"] == 7
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in trained.items())


# ----------------------------------------------------------------------------------------------- runs
RECORDING_RUN = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {examples!r})
    import run_image_classification as script
    from tl_align_hf import TLAlignTrainer

    class RecordingTrainer(TLAlignTrainer):
        instance = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            RecordingTrainer.instance = self

    script.TLAlignTrainer = RecordingTrainer
    script.main(sys.argv[2:])
    trainer = RecordingTrainer.instance
    if trainer.args.process_index == 0:
        groups = [(group["weight_decay"], group["param_names"]) for group in trainer.optimizer.param_groups]
        sampler = trainer._repeated_augmentation_sampler
        with open(sys.argv[1], "w") as file:
            json.dump({{"groups": groups, "sampler": type(sampler).__name__, "log": trainer.state.log_history}}, file)
    """
)


def test_deit_small_recipe_runs_on_two_processes_and_resumes_exactly(digits, tmp_path):
    """The recipe's machinery at a tiny size: repeated augmentation, drop path, timm's schedule with the
    batch-scaled rate, the no-decay groups; a run resumed from its step-6 checkpoint (mid-epoch 2) ends bit for bit
    where the uninterrupted run ends."""
    script = tmp_path / "run.py"
    script.write_text(RECORDING_RUN.format(examples=str(EXAMPLES)))
    flags = ["--config", str(RECIPES / "deit_small_tl_align.yaml"), "--train_dir", str(digits / "train"),
             "--validation_dir", str(digits / "validation"), "--timm_model_args", json.dumps(TINY_DEIT),
             "--per_device_train_batch_size", "8", "--max_train_samples", "64", "--num_train_epochs", "2",
             "--warmup_epochs", "0.5", "--do_eval", "false", "--eval_strategy", "no", "--save_strategy", "steps",
             "--save_steps", "6", "--logging_steps", "1", "--bf16", "false", "--dataloader_num_workers", "0",
             "--dataloader_pin_memory", "false"]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    torchrun(script, str(tmp_path / "full.json"), *flags, "--output_dir", str(full), cwd=ROOT)
    shutil.copytree(full / "checkpoint-6", resumed / "checkpoint-6")
    torchrun(script, str(tmp_path / "resumed.json"), *flags, "--output_dir", str(resumed), cwd=ROOT)

    final = [load_file(folder / "model.safetensors") for folder in (full, resumed)]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][key], final[1][key]) for key in final[0])
    initial = load_file(full / "checkpoint-6" / "model.safetensors")
    assert not torch.equal(initial["timm_model.blocks.0.attn.qkv.weight"], final[0]["timm_model.blocks.0.attn.qkv.weight"])

    record = json.loads((tmp_path / "full.json").read_text())
    assert record["sampler"] == "RepeatedAugmentationSampler"
    no_decay = {name for decay, names in record["groups"] if decay == 0.0 for name in names}
    assert {"timm_model.cls_token", "timm_model.pos_embed", "timm_model.blocks.1.norm1.weight"} <= no_decay
    assert {decay for decay, _ in record["groups"]} == {0.0, 0.05}
    config = json.loads((full / "config.json").read_text())
    assert config["model_args"]["drop_path_rate"] == 0.1
    # 64 images / (2 processes x 8) = 4 steps per epoch, 8 in all; lr 5e-4 * 16 / 512; 2 warm-up steps from 1e-6.
    logged = [(entry["step"], entry["learning_rate"]) for entry in record["log"] if "learning_rate" in entry]
    base_lr, timm_optimizer = 5e-4 * 16 / 512, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-4 * 16 / 512)
    timm_schedule = CosineLRScheduler(timm_optimizer, t_initial=8, lr_min=1e-5, warmup_t=2, warmup_lr_init=1e-6,
                                      t_in_epochs=False)  # fmt: skip
    assert len(logged) == 8 and base_lr > 1e-5
    for step, learning_rate in logged:  # the rate that optimizer step `step` (from 1) trained with
        timm_schedule.step_update(step - 1)
        assert learning_rate == pytest.approx(timm_optimizer.param_groups[0]["lr"], rel=1e-9), step


def test_train_with_ema_evaluates_and_saves_the_average_beside_the_weights(digits, tmp_path):
    """A fine-tuning run with layer decay and EMA on digits: eval_ema_* beside eval_*, and ema/ a model of its own
    whose weights differ from the trained ones; a run resumed from a checkpoint continues the same average."""
    script = load_example("run_image_classification")
    digits_dir, checkpoint = digits, tmp_path / "tiny-dinov2"
    config = Dinov2Config(image_size=TINY_IMAGE_SIZE, patch_size=4, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, mlp_ratio=2, num_labels=10)  # fmt: skip
    Dinov2ForImageClassification(config).save_pretrained(checkpoint)
    script.default_image_processor(TINY_IMAGE_SIZE).save_pretrained(checkpoint)

    def run(output_dir, *flags):
        return script.main(["--config", str(RECIPES / "finetune_dinov2_base.yaml"), "--model_name_or_path", str(checkpoint),
                            "--train_dir", str(digits_dir / "train"), "--validation_dir", str(digits_dir / "validation"),
                            "--output_dir", str(output_dir), "--per_device_train_batch_size", "16", "--max_train_samples",
                            "64", "--max_eval_samples", "32", "--num_train_epochs", "2", "--warmup_epochs", "0.5",
                            "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "6", "--bf16", "false",
                            "--dataloader_num_workers", "0", "--use_cpu", "--augmentation", "default", *flags])  # fmt: skip

    metrics = run(tmp_path / "full")
    assert {"eval_accuracy", "eval_ema_accuracy", "eval_ema_loss"} <= set(metrics)
    trained = load_file(tmp_path / "full" / "model.safetensors")
    averaged = load_file(tmp_path / "full" / "ema" / "model.safetensors")
    assert trained.keys() == averaged.keys()
    assert not torch.equal(trained["dinov2.encoder.layer.0.mlp.fc1.weight"], averaged["dinov2.encoder.layer.0.mlp.fc1.weight"])
    loading = Dinov2ForImageClassification.from_pretrained(tmp_path / "full" / "ema", output_loading_info=True)[1]
    assert not loading["missing_keys"] and not loading["unexpected_keys"]  # a model of its own, for plain transformers
    groups = torch.load(tmp_path / "full" / "checkpoint-6" / "optimizer.pt", weights_only=True)["param_groups"]
    # 2 blocks: embeddings, block 0, block 1, head at 0.65 ** 3, ** 2, ** 1, 1 of the rate 5e-4 * 16 / 256
    assert sorted({round(group["lr_scale"], 9) for group in groups}) == [round(0.65**power, 9) for power in (3, 2, 1, 0)]
    assert all(group["initial_lr"] == pytest.approx(5e-4 * 16 / 256 * group["lr_scale"]) for group in groups)
    shutil.copytree(tmp_path / "full" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    run(tmp_path / "resumed")
    resumed = load_file(tmp_path / "resumed" / "ema" / "model.safetensors")
    assert all(torch.equal(resumed[key], averaged[key]) for key in averaged)


def test_raises_error_when_resuming_with_ema_from_a_checkpoint_without_it(tmp_path):
    model = ViTForImageClassification(tiny_config("vit"))
    model.save_pretrained(tmp_path / "checkpoint-1")
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    trainer = TLAlignTrainer(model, TLAlignConfig(output_dir=str(tmp_path), ema_decay=0.9, report_to="none", use_cpu=True))
    trainer._resumed_from = str(tmp_path / "checkpoint-1")
    with pytest.raises(ValueError, match="has no ema/ folder"):
        trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)


def test_raises_error_when_repeated_augmentation_is_asked_of_an_iterable_dataset(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield {"pixel_values": torch.zeros(3, 24, 24), "label": 0}

    args = TLAlignConfig(output_dir=str(tmp_path), repeated_augmentation=3, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="repeated_augmentation=3 needs a training set with a length"):
        TLAlignTrainer(ViTForImageClassification(tiny_config("vit")), args, train_dataset=Stream())


def test_recipe_files_are_listed_in_the_docs():
    docs = (ROOT / "docs" / "recipes.md").read_text()
    for recipe in sorted(RECIPES.glob("*.yaml")):
        assert f"examples/recipes/{recipe.name}" in docs, recipe.name
    assert "accelerate launch --multi_gpu --num_processes 8 examples/run_image_classification.py" in docs
    assert Path(ROOT / "README.md").read_text().count("## Recipes") == 1
