"""`from_tl_align`, the way back from `to_tl_align`, for every family of the registry.

A model converted, used for an aligned forward pass and converted back must be its parent class again, exactly: no
module of ours (class, hook or attribute), the attention modules' own configs, the same state dict, outputs bitwise
equal to a fresh parent with the same weights, the same saved files, and it converts again to the same aligned model.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraConfig
from transformers import AutoModelForImageClassification, SwinForImageClassification, ViTForImageClassification

from tl_align_hf import from_tl_align, mixed_soft_targets, to_tl_align
from tl_align_hf.attention import RoutedConfig
from tl_align_hf.models import ALIGNED_CLASSES

from .reference import reference_cls_labels
from .test_new_families import family_batch, model_inputs, tiny_new_family_model
from .test_trainer import tiny_model_of
from .tiny_models import IMAGE_SIZE, NUM_LABELS, mixed_batch, tiny_model

MIXING_KEYS = ("mix_index", "token_weights", "mix_lam")
HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)  # fmt: skip
# The timm variants of the timm tests: every aligned attention class, the attention-pool hook and the Swin hooks.
TIMM_VARIANTS = {
    "timm_vit": ("test_timm_family", "vit"),
    "timm_vit_map": ("test_timm_family", "map"),  # attention-pool pre-hook
    "timm_deit_distilled": ("test_timm_family", "deit_distilled"),
    "timm_eva02": ("test_timm_backbones", "eva02"),
    "timm_pe_core": ("test_timm_backbones", "pe_core"),  # AttentionRope, attention pooling
    "timm_beit": ("test_timm_backbones", "beit"),
    "timm_relpos": ("test_timm_backbones", "relpos"),
    "timm_swin": ("test_timm_backbones", "swin"),
    "timm_swinv2": ("test_timm_backbones", "swinv2"),
}
CASES = [parent.__name__ for parent in ALIGNED_CLASSES] + list(TIMM_VARIANTS)


def parent_model(case: str) -> tuple[torch.nn.Module, dict]:
    """A tiny vanilla model of ``case`` (sharp attention, eval mode) and a mixed batch it takes."""
    if case in TIMM_VARIANTS:
        pytest.importorskip("timm")
        module_name, variant = TIMM_VARIANTS[case]
        if module_name == "test_timm_family":
            from .test_timm_family import timm_batch, tiny_timm_model

            return tiny_timm_model(variant), timm_batch()
        from .test_timm_backbones import backbone_batch, tiny_backbone

        return tiny_backbone(variant), backbone_batch(variant)
    if case == "Siglip2ForImageClassification":  # NaFlex patch sequences
        return tiny_new_family_model("siglip2", "sdpa"), family_batch("siglip2")
    model = tiny_model_of(next(parent for parent in ALIGNED_CLASSES if parent.__name__ == case))
    grid = IMAGE_SIZE // (2 if "Swin" in case else 4)
    return model, mixed_batch("fractional", num_patches=grid * grid)


def same_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A fresh model of ``model``'s parent class, built from its config, with its weights, in eval mode."""
    parent_class = getattr(model, "tl_align_parent", type(model))
    fresh = parent_class(copy.deepcopy(model.config))
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def aligned_lam(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(batch), **{key: batch[key] for key in MIXING_KEYS}).aligned_lam


def assert_is_the_parent(model: torch.nn.Module, fresh: torch.nn.Module) -> None:
    """Module by module: the parent's classes, no hook or attribute of ours, the configs themselves."""
    assert type(model) is type(fresh)
    for (name, module), (_, fresh_module) in zip(model.named_modules(), fresh.named_modules(), strict=True):
        assert type(module) is type(fresh_module), name
        assert not type(module).__module__.startswith("tl_align_hf"), name
        assert sorted(vars(module)) == sorted(vars(fresh_module)), name  # no attribute of ours left
        for hooks in HOOK_DICTS:
            assert len(getattr(module, hooks)) == len(getattr(fresh_module, hooks)), (name, hooks)
            assert not any(getattr(hook, "__module__", "").startswith("tl_align_hf") for hook in getattr(module, hooks).values())
        if hasattr(fresh_module, "config"):
            assert not isinstance(module.config, RoutedConfig), name
            assert type(module.config) is type(fresh_module.config), name


@pytest.mark.parametrize("case", CASES)
def test_from_tl_align_gives_back_the_parent_model(case, tmp_path):
    model, batch = parent_model(case)
    fresh = copy.deepcopy(model)  # the parent as built: same weights, same settings (timm's fused_attn)
    aligned = to_tl_align(model)
    aligned.tl_align_attention_path = "explicit"  # an attribute of ours set on the model
    before = aligned_lam(aligned, batch)  # an aligned pass: the aligner is put on modules and taken off again
    with torch.no_grad():
        aligned(**model_inputs(batch))

    restored = from_tl_align(aligned)

    assert restored is model
    assert_is_the_parent(restored, fresh)
    state, fresh_state = restored.state_dict(), fresh.state_dict()
    assert list(state) == list(fresh_state)
    assert all(torch.equal(state[key], fresh_state[key]) for key in state)
    with torch.no_grad():
        logits, fresh_logits = restored(**model_inputs(batch)).logits, fresh(**model_inputs(batch)).logits
    assert torch.equal(logits, fresh_logits)
    restored.save_pretrained(tmp_path / "restored")
    fresh.save_pretrained(tmp_path / "fresh")
    saved = json.loads((tmp_path / "restored" / "config.json").read_text())
    assert saved == json.loads((tmp_path / "fresh" / "config.json").read_text())
    assert sorted(path.name for path in (tmp_path / "restored").iterdir()) == sorted(
        path.name for path in (tmp_path / "fresh").iterdir()
    )
    # and the way there again: the same aligned model as a fresh conversion (whose target the family tests check)
    realigned = to_tl_align(restored)
    assert torch.equal(aligned_lam(realigned, batch), aligned_lam(to_tl_align(fresh), batch))
    assert not torch.equal(before, batch["mix_lam"])  # the shares moved: the comparison above can fail


def test_converted_back_and_again_vit_matches_the_full_label_vector_reference():
    model = tiny_model(ViTForImageClassification, "eager")
    eager = same_weights(model)
    batch = mixed_batch("fractional")
    realigned = to_tl_align(from_tl_align(to_tl_align(model)))
    rebuilt = mixed_soft_targets(batch["labels"], batch["mix_index"], aligned_lam(realigned, batch), NUM_LABELS, 0.1)
    expected = reference_cls_labels(eager, batch, num_prefix_tokens=1, label_smoothing=0.1)
    assert (rebuilt.double() - expected).abs().max().item() < 1e-5


def test_from_tl_align_goes_through_a_peft_model():
    model = tiny_model(ViTForImageClassification, "sdpa")
    fresh = same_weights(model)
    peft_model = get_peft_model(to_tl_align(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    restored = from_tl_align(peft_model)
    assert restored is peft_model and type(peft_model.get_base_model()) is ViTForImageClassification
    assert not any(isinstance(getattr(module, "config", None), RoutedConfig) for module in peft_model.modules())
    merged = peft_model.merge_and_unload()  # LoRA's B starts at zero: the parent's outputs
    pixel_values = mixed_batch("fractional")["pixel_values"]
    with torch.no_grad():
        assert torch.equal(merged(pixel_values).logits, fresh(pixel_values).logits)
    assert_is_the_parent(merged, fresh)


def test_a_deep_copy_converts_back_on_its_own():
    """The hook handles travel with copies (an EMA copy, a pickled model): converting a copy back removes the copy's
    hooks and leaves the original aligned, hooks and all."""
    aligned = to_tl_align(tiny_model_of(SwinForImageClassification))

    def hook_count(model):
        return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())

    hooks = hook_count(aligned)
    copied = from_tl_align(copy.deepcopy(aligned))
    assert type(copied) is SwinForImageClassification and hook_count(copied) == 0
    assert type(aligned) is ALIGNED_CLASSES[SwinForImageClassification] and hook_count(aligned) == hooks > 0


def test_from_tl_align_returns_a_model_that_is_not_aligned_as_it_is(tmp_path):
    model = tiny_model(ViTForImageClassification, "sdpa")
    assert from_tl_align(model) is model and type(model) is ViTForImageClassification
    model.save_pretrained(tmp_path)
    loaded = from_tl_align(AutoModelForImageClassification.from_pretrained(tmp_path))
    assert type(loaded) is ViTForImageClassification


def test_importing_the_package_does_not_import_timm():
    """timm is an optional extra: its family is loaded when a timm model is converted or its class asked for."""
    code = (
        "import sys, tl_align_hf; assert 'timm' not in sys.modules, 'timm imported';"
        "import importlib.util;"
        "assert importlib.util.find_spec('timm') is None or tl_align_hf.TLAlignTimmWrapperForImageClassification"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
