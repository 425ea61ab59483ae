"""The timm family: `TimmWrapperForImageClassification` of timm ViTs (`VisionTransformer`, `VisionTransformerDistilled`;
the other timm backbones: test_timm_backbones.py).

The guarantees of the other families: the aligned target equals an independent full label-vector reference (timm's
own attention probabilities, recorded from the vanilla model), for timm's explicit softmax and its fused SDPA, on
every attention path, with attention dropout, drop path and gradient checkpointing in training; the parent's outputs
bit for bit without mixing arguments; plain checkpoints; a clear error for other timm models; `TLAlignTrainer`.
"""

import copy
import inspect
import json

import pytest
import torch
from transformers import AutoModelForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification
from transformers.utils import find_labels

import tl_align_hf
from tl_align_hf import TLAlignCollator, TLAlignTrainer, mixed_batch_loss, mixed_soft_targets, to_tl_align
from tl_align_hf.models import aligned_classes

from .reference import _start_labels
from .test_trainer import image_dataset, make_args
from .tiny_models import IMAGE_SIZE, NUM_LABELS, PATCH_SIZE, mixed_batch

ALIGNED_CLASSES = aligned_classes()  # every supported class -> its aligned class (timm's included)

timm = pytest.importorskip("timm")
Attention, AttentionPoolLatent = timm.models.vision_transformer.Attention, timm.layers.AttentionPoolLatent

MIXING_KEYS = ("mix_index", "token_weights", "mix_lam")
PATHS = ["eager", "value_channel", "explicit"]
TINY = dict(img_size=IMAGE_SIZE, patch_size=PATCH_SIZE, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0)
# name: (timm architecture, model_args on top of TINY)
VARIANTS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers_avg": ("vit_tiny_patch16_224", dict(reg_tokens=2, global_pool="avg")),  # fc_norm after pooling
    "avg_with_prefix": ("vit_tiny_patch16_224", dict(reg_tokens=1, global_pool="avg", pool_include_prefix=True)),
    "res_post_avg": ("vit_base_patch16_rpn_224", {}),  # ResPostBlock, no class token, layer scale
    "map": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="map")),  # SigLIP-style attention pooling
    "map_class_token": ("vit_tiny_patch16_224", dict(global_pool="map")),  # the pool reads the patch tokens only
    "map_registers": ("vit_tiny_patch16_224", dict(reg_tokens=1, class_token=False, global_pool="map", pool_include_prefix=True)),
    "qk_norm_layer_scale": ("vit_tiny_patch16_224", dict(qk_norm=True, init_values=0.5, drop_path_rate=0.2)),
}
FUSED = pytest.mark.parametrize("fused", [False, True], ids=["explicit_softmax", "sdpa"])


def set_fused_attention(model: torch.nn.Module, fused: bool) -> None:
    """timm's `fused_attn` on every attention (and attention-pooling) module: SDPA or the explicit softmax."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


def sharpen_timm_attention(model: torch.nn.Module, std: float = 0.6, seed: int = 0) -> None:
    """Large query/key weights (as tiny_models.sharpen_attention), so that alignment visibly moves the shares."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Attention):
                query_key = module.qkv.weight[: 2 * module.num_heads * module.head_dim]
                for norm in (module.q_norm, module.k_norm):  # q/k norm would undo the large weights
                    if getattr(norm, "weight", None) is not None:
                        norm.weight.fill_(2.0)
            elif isinstance(module, AttentionPoolLatent):
                module.q.weight.copy_(torch.randn(module.q.weight.shape, generator=generator) * std)
                query_key = module.kv.weight[: module.num_heads * module.head_dim]
            else:
                continue
            query_key.copy_(torch.randn(query_key.shape, generator=generator) * std)


def tiny_timm_model(variant: str = "vit", fused: bool = True, seed: int = 0, **model_args):
    """A vanilla TimmWrapperForImageClassification of a tiny timm ViT with sharp attention, in eval mode."""
    architecture, variant_args = VARIANTS[variant]
    config = TimmWrapperConfig(architecture=architecture, num_labels=NUM_LABELS, model_args={**TINY, **variant_args, **model_args})
    torch.manual_seed(seed)
    model = TimmWrapperForImageClassification(config)
    sharpen_timm_attention(model, seed=seed)
    set_fused_attention(model, fused)
    return model.eval()


def aligned_timm_copy(vanilla, fused: bool | None = None):
    """`to_tl_align` of a deep copy: same weights; `fused` switches timm's attention kind of the copy."""
    aligned = to_tl_align(copy.deepcopy(vanilla))
    if fused is not None:
        set_fused_attention(aligned, fused)
    return aligned


def timm_batch(kind: str = "binary", seed: int = 0):
    grid = IMAGE_SIZE // PATCH_SIZE
    return mixed_batch(kind, num_patches=grid * grid, image_hw=(IMAGE_SIZE, IMAGE_SIZE), seed=seed)


def mixing(batch):
    return {key: batch[key] for key in MIXING_KEYS}


# ------------------------------------------------------------------------------------------- the reference
def _timm_probabilities(attention, tokens: torch.Tensor) -> torch.Tensor:
    """`(B, H, N, N)` float64: timm's own explicit softmax for these input tokens, as it enters `attn_drop`."""
    captured = []
    handle = attention.attn_drop.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    fused, training = attention.fused_attn, attention.training
    attention.fused_attn = False
    attention.eval()
    try:
        with torch.no_grad():
            attention(tokens)
    finally:
        handle.remove()
        attention.fused_attn = fused
        attention.train(training)
    return captured[0].double()


def _pool_probabilities(pool, tokens: torch.Tensor) -> torch.Tensor:
    """`(B, H, L, N)` float64 probabilities of the attention pool's latent queries, recomputed from its q and k."""
    assert pool.pos_embed is None
    batch_size, num_tokens, _ = tokens.shape
    with torch.no_grad():
        query = pool.q(pool.latent).reshape(1, -1, pool.num_heads, pool.head_dim).transpose(1, 2)
        key = pool.kv(tokens).reshape(batch_size, num_tokens, 2, pool.num_heads, pool.head_dim)[:, :, 0].transpose(1, 2)
        query, key = pool.q_norm(query).double(), pool.k_norm(key).double()
        return (query @ key.transpose(-2, -1) * pool.scale).softmax(dim=-1)


def reference_target(vanilla, batch: dict, label_smoothing: float = 0.1) -> torch.Tensor:
    """`(B, C)` float64 target of the full label-vector formulation, read out as timm's `forward_head` pools.

    Runs the vanilla model (in its current mode: dropout draws included), records the input tokens of every
    attention and of the attention pool, and propagates `(B, N, C)` labels with `L <- (L + mean_h(P_h) @ L) / 2`
    per block; the pool's latent label is `mean_h(P_h) @ L` over the tokens it pools.
    """
    timm_model = vanilla.timm_model
    records = []
    hooks = [
        module.register_forward_pre_hook(lambda module, args: records.append((module, args[0].detach())))
        for module in timm_model.modules()
        if isinstance(module, Attention | AttentionPoolLatent)
    ]
    try:
        with torch.no_grad():
            vanilla(batch["pixel_values"])
    finally:
        for hook in hooks:
            hook.remove()
    labels, _ = _start_labels(batch, NUM_LABELS, timm_model.num_prefix_tokens, label_smoothing)
    assert len(records) == len(timm_model.blocks) + (timm_model.attn_pool is not None)
    for module, tokens in records:
        if isinstance(module, AttentionPoolLatent):
            pooled = labels[:, labels.shape[1] - tokens.shape[1] :]
            labels = _pool_probabilities(module, tokens).mean(dim=1) @ pooled  # (B, latents, C)
        else:
            labels = (labels + _timm_probabilities(module, tokens).mean(dim=1) @ labels) / 2
    if timm_model.attn_pool is not None or timm_model.global_pool == "token":
        return labels[:, 0]
    first_pooled = 0 if timm_model.pool_include_prefix else timm_model.num_prefix_tokens
    return labels[:, first_pooled:].mean(dim=1)


def max_reference_difference(aligned, vanilla, batch, seed: int = 0) -> tuple[float, float]:
    """(max |aligned target - reference target|, max |aligned_lam - mix_lam|); both runs draw the same dropout."""
    torch.manual_seed(seed)
    with torch.no_grad():
        aligned_lam = aligned(batch["pixel_values"], **mixing(batch)).aligned_lam
    torch.manual_seed(seed)
    expected = reference_target(vanilla, batch)
    rebuilt = mixed_soft_targets(batch["labels"], batch["mix_index"], aligned_lam, NUM_LABELS, 0.1)
    return (rebuilt.double() - expected).abs().max().item(), (aligned_lam - batch["mix_lam"]).abs().max().item()


# ------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("path", PATHS)
@FUSED
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_aligned_target_matches_full_label_vector_reference(variant, fused, path):
    vanilla = tiny_timm_model(variant, fused=False)
    aligned = aligned_timm_copy(vanilla, fused)
    aligned.tl_align_attention_path = path
    batch = timm_batch()
    difference, moved = max_reference_difference(aligned, vanilla, batch)
    assert difference < 1e-5
    assert moved > 1e-2  # alignment really moved the target away from the area share
    with torch.no_grad():  # the aligned forward computes what timm computes
        expected_logits = vanilla(batch["pixel_values"]).logits
        torch.testing.assert_close(aligned(batch["pixel_values"], **mixing(batch)).logits, expected_logits, rtol=0, atol=1e-5)


def test_dynamic_image_size_takes_the_token_grid_of_the_image():
    vanilla = tiny_timm_model("vit", dynamic_img_size=True)
    aligned = aligned_timm_copy(vanilla)
    assert aligned.tl_align_image_size is None  # any size: the collator accepts it
    batch = mixed_batch("binary", num_patches=(24 // PATCH_SIZE) * (32 // PATCH_SIZE), image_hw=(24, 32))
    difference, moved = max_reference_difference(aligned, vanilla, batch)
    assert difference < 1e-5 and moved > 1e-2


@pytest.mark.parametrize("variant", ["vit", "map", "registers_avg"])
def test_mixup_shares_stay_at_lambda(variant):
    aligned = aligned_timm_copy(tiny_timm_model(variant))
    batch = timm_batch("constant")
    with torch.no_grad():
        aligned_lam = aligned(batch["pixel_values"], **mixing(batch)).aligned_lam
    torch.testing.assert_close(aligned_lam, batch["mix_lam"], atol=1e-6, rtol=0)


@FUSED
def test_shares_ignore_attention_dropout_and_drop_path_in_training(fused):
    """Same dropout draws in the vanilla run that the reference records: the shares follow the dropout-free
    probabilities of the tokens that actually reach each block, and the logits are timm's, bit for bit."""
    vanilla = tiny_timm_model("qk_norm_layer_scale", fused, attn_drop_rate=0.5, drop_path_rate=0.3).train()
    aligned = aligned_timm_copy(vanilla).train()
    aligned.tl_align_attention_path = "eager"  # dropout makes it explicit
    batch = timm_batch()
    difference, moved = max_reference_difference(aligned, vanilla, batch, seed=1)
    assert difference < 1e-5 and moved > 1e-2
    with torch.no_grad():
        torch.manual_seed(2)
        logits = aligned(batch["pixel_values"], **mixing(batch)).logits
        torch.manual_seed(2)
        assert torch.equal(logits, vanilla(batch["pixel_values"]).logits)
        assert not torch.equal(logits, vanilla.eval()(batch["pixel_values"]).logits)  # dropout did act


@pytest.mark.parametrize("attn_drop_rate", [0.0, 0.3])
@FUSED
def test_gradient_checkpointing_applies_each_update_once(fused, attn_drop_rate):
    """timm recomputes its blocks without the aligner; the aligned forward then takes the explicit path, whose
    output is timm's own, so shares and gradients are exactly those of an unchecked explicit-path run."""
    vanilla = tiny_timm_model("qk_norm_layer_scale", fused, attn_drop_rate=attn_drop_rate, drop_path_rate=0.3)
    batch = timm_batch("fractional")
    results = []
    for checkpointing in (False, True):
        model = aligned_timm_copy(vanilla).train()
        if checkpointing:
            model.activation_checkpointing_enable()  # auto path: on the CPU eager, but explicit when checkpointing
            assert model.timm_model.grad_checkpointing
        else:
            model.tl_align_attention_path = "explicit"
        torch.manual_seed(3)
        out = model(batch["pixel_values"], labels=batch["labels"], **mixing(batch))  # closing checks 3 updates
        out.loss.backward()
        results.append((out.aligned_lam, out.loss, model.timm_model.blocks[0].attn.qkv.weight.grad.clone()))
    assert all(torch.equal(unchecked, checkpointed) for unchecked, checkpointed in zip(*results))


# ------------------------------------------------------------------------------------------- the parent
@FUSED
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_without_mixing_arguments_logits_and_loss_equal_parent_bit_for_bit(variant, fused):
    vanilla = tiny_timm_model(variant, fused)
    aligned = aligned_timm_copy(vanilla)
    batch = timm_batch()
    with torch.no_grad():
        expected = vanilla(batch["pixel_values"], labels=batch["labels"])
        aligned(batch["pixel_values"], **mixing(batch))  # an aligned forward before leaves nothing behind
        out = aligned(batch["pixel_values"], labels=batch["labels"])
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)
    assert "aligned_lam" not in out


def test_aligned_class_adds_no_weights_and_is_exported():
    vanilla = tiny_timm_model()
    aligned_class = ALIGNED_CLASSES[TimmWrapperForImageClassification]
    assert tl_align_hf.TLAlignTimmWrapperForImageClassification is aligned_class
    assert list(aligned_class(copy.deepcopy(vanilla.config)).state_dict()) == list(vanilla.state_dict())
    parent_parameters = inspect.signature(TimmWrapperForImageClassification.forward).parameters
    added = [name for name in inspect.signature(aligned_class.forward).parameters if name not in parent_parameters]
    assert added == ["mix_index", "token_weights", "mix_lam", "target_smoothing"]
    assert find_labels(aligned_class) == find_labels(TimmWrapperForImageClassification) == ["labels"]
    aligned = aligned_timm_copy(vanilla)
    assert aligned.tl_align_patch_size == (PATCH_SIZE, PATCH_SIZE) and aligned.tl_align_image_size == (IMAGE_SIZE, IMAGE_SIZE)
    assert aligned.config.to_dict() == vanilla.config.to_dict()  # the config is left alone


@pytest.mark.parametrize("variant", ["vit", "deit_distilled", "map"])
def test_saved_checkpoint_is_a_plain_transformers_checkpoint(variant, tmp_path):
    vanilla = tiny_timm_model(variant)
    aligned = aligned_timm_copy(vanilla)
    aligned.save_pretrained(tmp_path)
    assert type(aligned) is ALIGNED_CLASSES[TimmWrapperForImageClassification]  # the class is restored after saving
    config_text = (tmp_path / "config.json").read_text()
    assert json.loads(config_text)["architectures"] == ["TimmWrapperForImageClassification"]
    assert "tl_align" not in config_text
    loaded, info = TimmWrapperForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(loaded) is TimmWrapperForImageClassification
    assert loaded.config.architectures == ["TimmWrapperForImageClassification"]
    batch = timm_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(batch["pixel_values"]).logits, vanilla(batch["pixel_values"]).logits)


def test_to_tl_align_converts_an_auto_loaded_timm_model_in_place(tmp_path):
    vanilla = tiny_timm_model("registers_avg")
    vanilla.save_pretrained(tmp_path)
    auto_model = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(auto_model) is TimmWrapperForImageClassification
    converted = to_tl_align(auto_model)
    assert converted is auto_model and type(converted) is ALIGNED_CLASSES[TimmWrapperForImageClassification]
    batch = timm_batch("fractional")
    with torch.no_grad():
        expected = aligned_timm_copy(vanilla)(batch["pixel_values"], **mixing(batch)).aligned_lam
        torch.testing.assert_close(converted(batch["pixel_values"], **mixing(batch)).aligned_lam, expected)
        assert torch.equal(converted(batch["pixel_values"]).logits, vanilla(batch["pixel_values"]).logits)


# ------------------------------------------------------------------------------------------- distillation
def test_distilled_training_trains_both_heads_on_the_cls_target():
    """timm's distilled training returns the two heads' logits as a pair: both train on the class token's target."""
    vanilla = tiny_timm_model("deit_distilled")
    aligned = aligned_timm_copy(vanilla)
    batch = timm_batch("fractional")
    with torch.no_grad():
        eval_lam = aligned(batch["pixel_values"], **mixing(batch)).aligned_lam
    aligned.timm_model.set_distilled_training(True)
    out = aligned.train()(batch["pixel_values"], labels=batch["labels"], target_smoothing=0.1, **mixing(batch))
    assert isinstance(out.logits, tuple) and out.cls_logits.shape == out.distillation_logits.shape == (4, NUM_LABELS)
    targets = mixed_soft_targets(batch["labels"], batch["mix_index"], out.aligned_lam, NUM_LABELS, 0.1)
    per_head = [-(targets * torch.log_softmax(logits, -1)).sum(-1).mean() for logits in (out.cls_logits, out.distillation_logits)]
    torch.testing.assert_close(out.loss, (per_head[0] + per_head[1]) / 2)
    torch.testing.assert_close(mixed_batch_loss(out, batch, label_smoothing=0.1)[0], out.loss)
    torch.testing.assert_close(out.aligned_lam, eval_lam, rtol=0, atol=1e-6)  # the class token's share


# ------------------------------------------------------------------------------------------- unsupported
UNSUPPORTED = {
    "resnet": ("resnet10t", {}),
    "convnext": ("convnext_atto", dict(dims=(8, 8, 8, 8), depths=(1, 1, 1, 1))),
    "cait": ("cait_xxs24_224", dict(TINY, depth=1, depth_token_only=1)),  # class attention
    "xcit": ("xcit_nano_12_p16_224", dict(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2)),
    "hybrid": ("vit_tiny_r_s16_p8_224", dict(img_size=32, embed_dim=16, depth=1, num_heads=2)),
    "parallel_blocks": ("vit_small_patch16_18x2_224", dict(TINY, depth=1)),
    "patch_dropout": ("vit_tiny_patch16_224", dict(TINY, patch_drop_rate=0.5)),
    "max_pool": ("vit_tiny_patch16_224", dict(TINY, global_pool="max")),
    "avgmax_pool": ("vit_tiny_patch16_224", dict(TINY, global_pool="avgmax")),
    "no_pool": ("vit_tiny_patch16_224", dict(TINY, global_pool="")),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_raises_error_when_timm_architecture_is_unsupported_and_lists_supported(name):
    architecture, model_args = UNSUPPORTED[name]
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture=architecture, num_labels=NUM_LABELS, model_args=model_args))
    config_before = model.config.to_dict()
    if name.endswith("pool"):
        expected = rf"global_pool '{model_args['global_pool']}'.*Supported: global_pool 'token'"
    else:
        expected = rf"does not support the timm model '{architecture}'.*Supported timm models: timm's VisionTransformer"
    with pytest.raises(ValueError, match=expected):
        to_tl_align(model)
    assert type(model) is TimmWrapperForImageClassification and model.config.to_dict() == config_before  # unchanged
    assert all(type(module).__module__.startswith(("timm.", "torch.", "transformers.")) for module in model.modules())


# ------------------------------------------------------------------------------------------- training
def test_collator_from_model_gives_batches_the_model_takes():
    model = aligned_timm_copy(tiny_timm_model("map"))
    collator = TLAlignCollator.from_model(model, mixing_method="cutmix", seed=0)
    batch = collator([image_dataset(4)[index] for index in range(4)])
    assert batch["token_weights"].shape == (4, (IMAGE_SIZE // PATCH_SIZE) ** 2)
    with torch.no_grad():
        assert model(batch["pixel_values"], **mixing(batch)).aligned_lam.shape == (4,)


def _parameters_with_gradient(model) -> set[str]:
    batch = timm_batch(seed=1)
    model.zero_grad()
    model(batch["pixel_values"], labels=batch["labels"]).loss.backward()
    used = {name for name, parameter in model.named_parameters() if parameter.grad is not None and parameter.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    return used


@pytest.mark.parametrize("variant", ["vit", "deit_distilled", "map"])
def test_train_with_timm_vit(variant, tmp_path):
    model = tiny_timm_model(variant).train()
    used = _parameters_with_gradient(model)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    args = make_args(tmp_path, max_steps=2, mixing_method="cutmix")
    trainer = TLAlignTrainer(model=model, args=args, train_dataset=image_dataset(8))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) and "aligned_lam" in entry for entry in logs)
    assert type(trainer.model) is ALIGNED_CLASSES[TimmWrapperForImageClassification]
    unchanged = [name for name, parameter in trainer.model.named_parameters() if name in used and torch.equal(parameter.detach(), before[name])]
    assert unchanged == []
