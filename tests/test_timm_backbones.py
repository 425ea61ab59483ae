"""Today's timm backbones through `TimmWrapperForImageClassification`: Eva (EVA-02, DINOv3, RoPE ViTs, Perception
Encoder), BEiT, relative-position ViTs, Swin and Swin V2.

The guarantees of the timm ViTs (test_timm_family.py): the aligned target equals an independent full label-vector
reference (timm's own explicit-softmax probabilities, recorded from the vanilla model; for Swin the labels follow
timm's shift, padding, windows and merging), for timm's explicit softmax and its fused SDPA on every attention path,
with dropout and drop path in training and with gradient checkpointing; the parent's outputs bit for bit without
mixing arguments; no graph break under `torch.compile`; plain checkpoints; `TLAlignTrainer`; clear refusals.
"""

import copy
import json

import pytest
import torch
from transformers import AutoModelForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification

from tl_align_hf import TLAlignTrainer, mixed_soft_targets, to_tl_align
from tl_align_hf.models import aligned_classes

from .reference import _start_labels
from .test_timm_family import mixing, set_fused_attention
from .test_trainer import image_dataset, make_args
from .tiny_models import IMAGE_SIZE, NUM_LABELS, mixed_batch

ALIGNED_CLASSES = aligned_classes()  # every supported class -> its aligned class (timm's included)

timm = pytest.importorskip("timm")
EvaAttention, AttentionRope = timm.models.eva.EvaAttention, timm.layers.AttentionRope
BeitAttention = timm.models.beit.Attention
SwinWindowAttention = timm.models.swin_transformer.WindowAttention
SwinV2WindowAttention = timm.models.swin_transformer_v2.WindowAttention
RelPosAttention = timm.models.vision_transformer_relpos.RelPosAttention
AttentionPoolLatent = timm.layers.AttentionPoolLatent
SwinBlocks = (timm.models.swin_transformer.SwinTransformerBlock, timm.models.swin_transformer_v2.SwinTransformerV2Block)
PatchMergings = (timm.models.swin_transformer.PatchMerging, timm.models.swin_transformer_v2.PatchMerging)
ATTENTIONS = (EvaAttention, AttentionRope, BeitAttention, SwinWindowAttention, SwinV2WindowAttention, RelPosAttention)

PATCH = 4
VIT = dict(img_size=IMAGE_SIZE, patch_size=PATCH, embed_dim=32, depth=3, num_heads=4)
# 24 px, patch 2, window 3: token grids 12 -> 6 -> 3 (shifted windows in the first two stages, one window in the last);
# 28 px: grids 14 -> 7 -> 4, every stage padded to whole windows, and an odd grid merged (7 -> 4).
SWIN = dict(img_size=IMAGE_SIZE, patch_size=2, embed_dim=8, depths=(2, 2, 2), num_heads=(2, 2, 2), window_size=3, mlp_ratio=2.0)
# name: (timm architecture, model_args)
VARIANTS = {
    # EVA-02 Ti (SwiGLU, RoPE on the patch tokens, q/v biases) with EVA-02 B's sub-LN in the MLP, and in attention
    "eva02": ("eva02_tiny_patch14_224", dict(VIT, scale_mlp=True, scale_attn_inner=True)),
    "eva02_separate_qkv_token": ("eva02_base_patch14_224", dict(VIT, global_pool="token")),  # q/k/v projections apart
    "eva_post_norm": ("eva02_tiny_patch14_224", dict(VIT, use_post_norm=True)),  # EvaBlockPostNorm
    "dinov3": ("vit_small_patch16_dinov3", dict(VIT)),  # 4 registers, DINOv3 RoPE, layer scale, dynamic size, 'avg'
    "dinov3_token": ("vit_small_patch16_dinov3_qkvb", dict(VIT, global_pool="token")),  # upstream's CLS read-out
    "rope_reg_gap": ("vit_medium_patch16_rope_reg1_gap_256", dict(VIT)),  # no class token, 1 register, 'avg'
    "rope_axial": ("vit_base_patch16_rope_224", dict(VIT)),  # AttentionRope, class token, 'token'
    "rope_mixed": ("vit_base_patch16_rope_mixed_224", dict(VIT)),  # a RoPE per block
    "rope_grouped_kv": ("vit_base_patch16_rope_224", dict(VIT, qkv_fused=False, num_kv_heads=2)),  # Sapiens2-style GQA
    "pe_core": ("vit_pe_core_tiny_patch16_384", dict(VIT, attn_pool_num_heads=4)),  # AttentionRope, 'map' pooling
    "beit": ("beit_base_patch16_224", dict(VIT)),  # relative position bias per block, mean of the patch tokens
    "beit_shared_token": ("beit_base_patch16_224", dict(VIT, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, global_pool="token")),
    "relpos": ("vit_relpos_base_patch16_224", dict(VIT)),  # relative position MLP per block, 'avg'
    "relpos_shared_cls": ("vit_srelpos_medium_patch16_224", dict(VIT, class_token=True, global_pool="token")),
    "relpos_res_post": ("vit_relpos_base_patch16_rpn_224", dict(VIT)),  # ResPostRelPosBlock, no class token
    "swin": ("swin_tiny_patch4_window7_224", SWIN),
    "swin_padded": ("swin_tiny_patch4_window7_224", dict(SWIN, img_size=28)),
    "swinv2": ("swinv2_tiny_window8_256", SWIN),
    "swinv2_padded": ("swinv2_tiny_window8_256", dict(SWIN, img_size=28)),
}
EXPLICIT_ONLY = {"swinv2", "swinv2_padded"}  # Swin V2's cosine attention has no SDPA path in timm
# (timm's fused_attn, attention path): the path only matters for SDPA; the explicit softmax gives its probabilities
ATTENTION_KINDS = [(False, "auto"), (True, "eager"), (True, "value_channel"), (True, "explicit")]
WEIGHT_KINDS = ("binary", "fractional")  # token weights of the reference batches: pixel-exact boxes and fractional


def _image_size(variant: str) -> int:
    return VARIANTS[variant][1]["img_size"]


def sharpen_timm_backbone(model: torch.nn.Module, std: float = 0.6, seed: int = 0) -> None:
    """Large query/key weights, random position biases and a large cosine scale, so that the shares really move."""
    generator = torch.Generator().manual_seed(seed)

    def randomize(weight, scale=std):
        weight.copy_(torch.randn(weight.shape, generator=generator) * scale)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ATTENTIONS):
                if getattr(module, "qkv", None) is not None:
                    randomize(module.qkv.weight[: 2 * module.qkv.weight.shape[0] // 3])
                else:
                    randomize(module.q_proj.weight), randomize(module.k_proj.weight)
                if getattr(module, "relative_position_bias_table", None) is not None:
                    randomize(module.relative_position_bias_table, 1.0)
                if isinstance(module, SwinV2WindowAttention):
                    module.logit_scale.fill_(3.0)  # cosine similarity * e^3
            elif isinstance(module, AttentionPoolLatent):
                randomize(module.q.weight), randomize(module.kv.weight[: module.num_heads * module.head_dim])
            elif hasattr(module, "relative_position_bias_table"):  # BEiT's shared bias
                randomize(module.relative_position_bias_table, 1.0)


def tiny_backbone(variant: str, fused: bool = True, seed: int = 0, **model_args):
    """A vanilla TimmWrapperForImageClassification of a tiny timm backbone with sharp attention, in eval mode."""
    architecture, variant_args = VARIANTS[variant]
    config = TimmWrapperConfig(architecture=architecture, num_labels=NUM_LABELS, model_args={**variant_args, **model_args})
    torch.manual_seed(seed)
    model = TimmWrapperForImageClassification(config)
    sharpen_timm_backbone(model, seed=seed)
    set_fused_attention(model, fused)
    return model.eval()


def aligned_backbone(vanilla, fused: bool | None = None, path: str = "auto"):
    aligned = to_tl_align(copy.deepcopy(vanilla))
    if fused is not None:
        set_fused_attention(aligned, fused)
    aligned.tl_align_attention_path = path
    return aligned


def backbone_batch(variant: str, kind: str = "binary", image_hw: tuple[int, int] | None = None, seed: int = 0):
    height, width = image_hw or (_image_size(variant),) * 2
    patch = VARIANTS[variant][1]["patch_size"]
    return mixed_batch(kind, num_patches=(height // patch) * (width // patch), image_hw=(height, width), seed=seed)


# ------------------------------------------------------------------------------------------- the reference
def _record_calls(vanilla, pixel_values) -> list[tuple]:
    """Runs the vanilla model (in its mode) and records, in order, every attention call (module, args, kwargs), every
    Swin block's input grid and every patch merging's input grid."""
    records, handles = [], []

    def record(module, args, kwargs):
        if isinstance(module, SwinBlocks + PatchMergings):
            records.append((module, tuple(args[0].shape[1:3]), None))
        else:
            records.append((module, tuple(arg.detach() for arg in args), {k: v for k, v in kwargs.items()}))

    for module in vanilla.timm_model.modules():
        if isinstance(module, ATTENTIONS + (AttentionPoolLatent,) + SwinBlocks + PatchMergings):
            handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            vanilla(pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    return records


def _explicit_probabilities(attention, args, kwargs) -> torch.Tensor:
    """`(B', H, N, N)` float64: timm's own explicit softmax for this call (dropout off), as it enters `attn_drop`."""
    captured = []
    handle = attention.attn_drop.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    fused, training = getattr(attention, "fused_attn", False), attention.training
    attention.fused_attn = False
    attention.eval()
    try:
        with torch.no_grad():
            attention(*args, **kwargs)
    finally:
        handle.remove()
        attention.fused_attn = fused
        attention.train(training)
    return captured[0].double()


def _pool_probabilities(pool, tokens: torch.Tensor) -> torch.Tensor:
    """`(B, H, L, N)` float64 probabilities of the attention pool's latent queries, recomputed from its q and k."""
    batch_size, num_tokens, _ = tokens.shape
    with torch.no_grad():
        query = pool.q(pool.latent).reshape(1, -1, pool.num_heads, pool.head_dim).transpose(1, 2)
        key = pool.kv(tokens).reshape(batch_size, num_tokens, 2, pool.num_heads, pool.head_dim)[:, :, 0].transpose(1, 2)
        query, key = pool.q_norm(query).double(), pool.k_norm(key).double()
        return (query @ key.transpose(-2, -1) * pool.scale).softmax(dim=-1)


def _window_mix(labels, probabilities, grid, window, shift, area_label):
    """`(B, H*W, C)` labels mixed by one Swin block's window attention, in timm's order: roll by -shift, pad to whole
    windows (padding holds the area-mixed label), cut into windows, mix, and put back."""
    (height, width), (win_h, win_w), (shift_h, shift_w) = grid, window, shift
    batch_size, _, num_classes = labels.shape
    rolled = torch.roll(labels.view(batch_size, height, width, num_classes), shifts=(-shift_h, -shift_w), dims=(1, 2))
    padded_h, padded_w = -(-height // win_h) * win_h, -(-width // win_w) * win_w
    padded = area_label[:, None, None, :].repeat(1, padded_h, padded_w, 1)
    padded[:, :height, :width] = rolled
    rows, cols = padded_h // win_h, padded_w // win_w
    windows = padded.view(batch_size, rows, win_h, cols, win_w, num_classes).permute(0, 1, 3, 2, 4, 5)
    mixed = probabilities.mean(dim=1) @ windows.reshape(batch_size * rows * cols, win_h * win_w, num_classes)
    mixed = mixed.view(batch_size, rows, cols, win_h, win_w, num_classes).permute(0, 1, 3, 2, 4, 5)
    mixed = mixed.reshape(batch_size, padded_h, padded_w, num_classes)[:, :height, :width]
    return torch.roll(mixed, shifts=(shift_h, shift_w), dims=(1, 2)).reshape(batch_size, height * width, num_classes)


def _merge_labels(labels, grid):
    """timm's PatchMerging for labels: the mean of each 2x2 group of real tokens (zero padding holds no label)."""
    (height, width), (batch_size, _, num_classes) = grid, labels.shape
    even = torch.full((batch_size, height + height % 2, width + width % 2, num_classes), float("nan"), dtype=torch.float64)
    even[:, :height, :width] = labels.view(batch_size, height, width, num_classes)
    groups = torch.stack([even[:, row::2, col::2] for row in (0, 1) for col in (0, 1)])
    return groups.nanmean(dim=0).reshape(batch_size, -1, num_classes)


def reference_target(vanilla, batch: dict, label_smoothing: float = 0.1) -> torch.Tensor:
    """`(B, C)` float64 target of the full label-vector formulation, read out as timm's head pools.

    Per attention block `L <- (L + mean_h(P_h) @ L) / 2` with timm's own probabilities (in Swin through the block's
    windows); an attention pool's latent label is `mean_h(P_h) @ L` over the tokens it pools.
    """
    timm_model = vanilla.timm_model
    num_prefix_tokens = getattr(timm_model, "num_prefix_tokens", 0)
    labels, area_label = _start_labels(batch, NUM_LABELS, num_prefix_tokens, label_smoothing)
    grid = None
    for module, args, kwargs in _record_calls(vanilla, batch["pixel_values"]):
        if isinstance(module, SwinBlocks):
            grid = args
        elif isinstance(module, PatchMergings):
            labels = _merge_labels(labels, args)
        elif isinstance(module, AttentionPoolLatent):
            tokens = args[0]
            labels = _pool_probabilities(module, tokens).mean(dim=1) @ labels[:, labels.shape[1] - tokens.shape[1] :]
        elif isinstance(module, SwinWindowAttention | SwinV2WindowAttention):
            block = next(block for block in timm_model.modules() if isinstance(block, SwinBlocks) and block.attn is module)
            probabilities = _explicit_probabilities(module, args, kwargs)
            labels = (labels + _window_mix(labels, probabilities, grid, block.window_size, block.shift_size, area_label)) / 2
        else:
            labels = (labels + _explicit_probabilities(module, args, kwargs).mean(dim=1) @ labels) / 2
    if getattr(timm_model, "attn_pool", None) is None and timm_model.global_pool == "token":
        return labels[:, 0]
    if getattr(timm_model, "attn_pool", None) is not None:
        return labels[:, 0] if timm_model.attn_pool.pool == "token" else labels.mean(dim=1)
    return labels[:, num_prefix_tokens:].mean(dim=1)


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
CASES = [
    pytest.param(variant, fused, path, id=f"{variant}-{'sdpa' if fused else 'explicit_softmax'}-{path}")
    for variant in VARIANTS
    for fused, path in ATTENTION_KINDS
    if not (fused and variant in EXPLICIT_ONLY)
]


@pytest.mark.parametrize("variant,fused,path", CASES)
def test_aligned_target_matches_full_label_vector_reference(variant, fused, path, record_property):
    vanilla = tiny_backbone(variant, fused=False)
    aligned = aligned_backbone(vanilla, fused, path)
    results = {kind: max_reference_difference(aligned, vanilla, backbone_batch(variant, kind)) for kind in WEIGHT_KINDS}
    difference, moved = max(d for d, _ in results.values()), max(m for _, m in results.values())
    kind = "SDPA (fused_attn)" if fused else "explicit softmax"
    record_property("equivalence", (f"{variant} (`{VARIANTS[variant][0]}`)", kind, path, difference, moved))
    assert difference < 1e-5, results
    assert results["binary"][1] > 5e-3  # alignment really moved the target (500 times the tolerance) away from the area share
    batch = backbone_batch(variant)
    with torch.no_grad():  # the aligned forward computes what timm computes
        expected_logits = vanilla(batch["pixel_values"]).logits
        torch.testing.assert_close(aligned(batch["pixel_values"], **mixing(batch)).logits, expected_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["explicit_softmax", "sdpa"])
def test_dinov3_takes_any_image_size_and_follows_its_token_grid(fused):
    vanilla = tiny_backbone("dinov3", fused=fused)
    aligned = aligned_backbone(vanilla)
    assert aligned.tl_align_image_size is None  # dynamic_img_size: the collator accepts any size
    batch = backbone_batch("dinov3", image_hw=(24, 32))
    difference, moved = max_reference_difference(aligned, vanilla, batch)
    assert difference < 1e-5 and moved > 1e-2


@pytest.mark.parametrize("variant", ["eva02", "pe_core", "swin", "swinv2"])
def test_mixup_shares_stay_at_lambda(variant):
    aligned = aligned_backbone(tiny_backbone(variant))
    batch = backbone_batch(variant, "constant")
    with torch.no_grad():
        aligned_lam = aligned(batch["pixel_values"], **mixing(batch)).aligned_lam
    torch.testing.assert_close(aligned_lam, batch["mix_lam"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["explicit_softmax", "sdpa"])
@pytest.mark.parametrize("variant", ["eva02", "rope_axial", "beit", "swin"])
def test_shares_ignore_attention_dropout_and_drop_path_in_training(variant, fused):
    vanilla = tiny_backbone(variant, fused, attn_drop_rate=0.5, drop_path_rate=0.3).train()
    aligned = aligned_backbone(vanilla).train()
    batch = backbone_batch(variant)
    difference, moved = max_reference_difference(aligned, vanilla, batch, seed=1)
    assert difference < 1e-5 and moved > 1e-2
    with torch.no_grad():
        torch.manual_seed(2)
        logits = aligned(batch["pixel_values"], **mixing(batch)).logits
        torch.manual_seed(2)
        assert torch.equal(logits, vanilla(batch["pixel_values"]).logits)
        assert not torch.equal(logits, vanilla.eval()(batch["pixel_values"]).logits)  # dropout did act


@pytest.mark.parametrize("fused", [False, True], ids=["explicit_softmax", "sdpa"])
@pytest.mark.parametrize("variant", ["eva02", "swin"])
def test_gradient_checkpointing_applies_each_update_once(variant, fused):
    """timm recomputes its blocks without the aligner; the aligned forward then takes the explicit path, whose
    output is timm's own, so shares and gradients are exactly those of an unchecked explicit-path run."""
    vanilla = tiny_backbone(variant, fused, drop_path_rate=0.3)
    batch = backbone_batch(variant, "fractional")
    results = []
    for checkpointing in (False, True):
        model = aligned_backbone(vanilla, path="auto" if checkpointing else "explicit").train()
        if checkpointing:
            model.activation_checkpointing_enable()
        torch.manual_seed(3)
        out = model(batch["pixel_values"], labels=batch["labels"], **mixing(batch))  # closing checks the update count
        out.loss.backward()
        weight = next(module for module in model.modules() if isinstance(module, ATTENTIONS)).qkv.weight
        results.append((out.aligned_lam, out.loss, weight.grad.clone()))
    assert all(torch.equal(unchecked, checkpointed) for unchecked, checkpointed in zip(*results))


# ------------------------------------------------------------------------------------------- the parent
@pytest.mark.parametrize("fused", [False, True], ids=["explicit_softmax", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_without_mixing_arguments_logits_and_loss_equal_parent_bit_for_bit(variant, fused):
    vanilla = tiny_backbone(variant, fused)
    aligned = aligned_backbone(vanilla)
    batch = backbone_batch(variant)
    with torch.no_grad():
        expected = vanilla(batch["pixel_values"], labels=batch["labels"])
        aligned(batch["pixel_values"], **mixing(batch))  # an aligned forward before leaves nothing behind
        out = aligned(batch["pixel_values"], labels=batch["labels"])
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)
    assert "aligned_lam" not in out


@pytest.mark.parametrize("variant", ["eva02", "dinov3", "pe_core", "beit", "swin", "swinv2"])
def test_saved_checkpoint_is_a_plain_transformers_checkpoint(variant, tmp_path):
    vanilla = tiny_backbone(variant)
    aligned = aligned_backbone(vanilla)
    aligned.save_pretrained(tmp_path)
    config_text = (tmp_path / "config.json").read_text()
    assert json.loads(config_text)["architectures"] == ["TimmWrapperForImageClassification"]
    assert "tl_align" not in config_text
    loaded, info = TimmWrapperForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(loaded) is TimmWrapperForImageClassification
    assert all(type(module).__module__.startswith(("timm.", "torch.", "transformers.")) for module in loaded.modules())
    batch = backbone_batch(variant, "fractional")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(batch["pixel_values"]).logits, vanilla(batch["pixel_values"]).logits)
        auto_model = AutoModelForImageClassification.from_pretrained(tmp_path).eval()  # what users load, converted
        expected = aligned(batch["pixel_values"], **mixing(batch)).aligned_lam
        torch.testing.assert_close(to_tl_align(auto_model)(batch["pixel_values"], **mixing(batch)).aligned_lam, expected)


@pytest.mark.parametrize("fused", [False, True], ids=["explicit_softmax", "sdpa"])
@pytest.mark.parametrize("variant", ["eva02", "swin"])
def test_aligned_forward_compiles_without_graph_breaks(variant, fused):
    torch._dynamo.reset()
    model = aligned_backbone(tiny_backbone(variant, fused)).train()
    batch = backbone_batch(variant, "fractional")
    try:
        explanation = torch._dynamo.explain(model)(batch["pixel_values"], labels=batch["labels"], **mixing(batch))
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [str(reason.reason) for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


# ------------------------------------------------------------------------------------------- unsupported
UNSUPPORTED = {
    "cait": ("cait_xxs24_224", dict(VIT, depth=1, depth_token_only=1), "talking-heads attention.*use deit3_"),
    "xcit": ("xcit_nano_12_p16_224", dict(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2), "cross-covariance attention"),
    "swinv2_cr": ("swinv2_cr_tiny_ns_224", dict(img_size=32, embed_dim=8, depths=(1,), num_heads=(1,), window_size=4), "use swinv2_"),
    "eva_patch_dropout": ("eva02_tiny_patch14_224", dict(VIT, patch_drop_rate=0.5), "patch dropout drops tokens"),
    "eva_avgmax": ("eva02_tiny_patch14_224", dict(VIT, global_pool="avgmax"), "global_pool 'avgmax'.*'avgmax' take a maximum"),
    "beit_no_pool": ("beit_base_patch16_224", dict(VIT, global_pool=""), "global_pool ''.*one output per token"),
    "swin_max": ("swin_tiny_patch4_window7_224", dict(SWIN, global_pool="max"), "global_pool 'max'"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_raises_error_when_timm_backbone_is_unsupported_with_its_reason(name):
    architecture, model_args, reason = UNSUPPORTED[name]
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture=architecture, num_labels=NUM_LABELS, model_args=model_args))
    config_before = model.config.to_dict()
    with pytest.raises(ValueError, match=reason):
        to_tl_align(model)
    assert type(model) is TimmWrapperForImageClassification and model.config.to_dict() == config_before  # unchanged
    assert all(type(module).__module__.startswith(("timm.", "torch.", "transformers.")) for module in model.modules())


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("variant", ["eva02", "dinov3_token", "beit", "swin", "swinv2"])
def test_train_with_timm_backbone(variant, tmp_path):
    model = tiny_backbone(variant).train()
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    args = make_args(tmp_path, max_steps=2, mixing_method="cutmix")
    trainer = TLAlignTrainer(model=model, args=args, train_dataset=image_dataset(8))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) and "aligned_lam" in entry for entry in logs)
    assert type(trainer.model) is ALIGNED_CLASSES[TimmWrapperForImageClassification]
    changed = [name for name, parameter in trainer.model.named_parameters() if not torch.equal(parameter.detach(), before[name])]
    assert any("attn" in name for name in changed) and any("head" in name for name in changed)
