"""Called without mixing arguments, every aligned class is its parent: config, signature, attention maps, errors.

Regression tests for the differences transformers' own model tests found (see docs/transformers_model_tests.md):
the routing name leaking into the config, a rejected `set_attn_implementation` dropping the routing, a forward
signature that moved the parent's positional parameters, and DeiT-with-teacher's `labels`.
"""

import copy
import inspect

import pytest
import torch
from transformers import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTForImageClassification,
)
from transformers.utils import find_labels

from tl_align_hf.models import aligned_classes

from .test_families import FAMILIES, _grid_batch, _mixing, tiny_family_model
from .test_new_families import tiny_new_family_model
from .tiny_models import aligned_copy, tiny_model

ALIGNED_CLASSES = aligned_classes()  # every supported class -> its aligned class (timm's included)

MODELS = {
    "vit": lambda attn: tiny_model(ViTForImageClassification, attn),
    "deit": lambda attn: tiny_model(DeiTForImageClassification, attn),
    "deit_with_teacher": lambda attn: tiny_model(DeiTForImageClassificationWithTeacher, attn),
    **{name: (lambda attn, name=name: tiny_family_model(name, attn)) for name in FAMILIES if name != "beit_cls"},
    # Swin V2 has eager attention only (transformers refuses sdpa for it); Data2Vec-Vision picks its attention
    # classes from the config when built. SigLIP 2 takes patch sequences: its parity is in test_new_families.py.
    "swinv2": lambda attn: tiny_new_family_model("swinv2") if attn == "eager" else pytest.skip("Swin V2: eager only"),
    "data2vec_vision": lambda attn: tiny_new_family_model("data2vec_vision", attn),
}


def _configs(config):
    sub_configs = getattr(config, "sub_configs", None) or {}
    return [config, *(getattr(config, key) for key in sub_configs if getattr(config, key, None) is not None)]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(MODELS))
def test_config_keeps_the_users_backend_and_the_config_passed_in_is_not_changed(name, attn_implementation):
    vanilla = MODELS[name](attn_implementation)
    config = copy.deepcopy(vanilla.config)
    aligned = ALIGNED_CLASSES[type(vanilla)](config)
    assert [c._attn_implementation for c in _configs(aligned.config)] == [attn_implementation] * len(_configs(config))
    assert aligned.config is config and config.to_dict() == vanilla.config.to_dict()
    plain_again = type(vanilla)(config)  # a plain model built from the same config afterwards
    assert plain_again.config._attn_implementation == attn_implementation


@pytest.mark.parametrize("name", list(MODELS))
def test_output_attentions_works_as_for_the_parent_in_plain_and_aligned_mode(name):
    vanilla = MODELS[name]("eager")
    aligned = aligned_copy(vanilla)
    aligned.config.output_attentions = True  # raised on the TL class when the config held the routed name
    vanilla.config.output_attentions = True
    batch = _grid_batch(vanilla.config, "fractional")
    with torch.no_grad():  # composite models (CLIP, SigLIP) take it as an argument, not from the top-level config
        expected = vanilla(batch["pixel_values"], output_attentions=True).attentions
        plain = aligned(batch["pixel_values"], output_attentions=True).attentions
        mixed = aligned(batch["pixel_values"], output_attentions=True, **_mixing(batch)).attentions
    assert len(expected) > 0
    for maps in (plain, mixed):
        assert len(maps) == len(expected)
        for actual, reference in zip(maps, expected):
            torch.testing.assert_close(actual, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["vit", "swin", "clip"])
def test_aligned_mode_with_sdpa_returns_the_maps_the_parent_returns(name):
    vanilla = MODELS[name]("sdpa")
    aligned = aligned_copy(vanilla)
    batch = _grid_batch(vanilla.config, "fractional")
    with torch.no_grad():
        expected = vanilla(batch["pixel_values"], output_attentions=True).attentions
        mixed = aligned(batch["pixel_values"], output_attentions=True, **_mixing(batch)).attentions
    assert (expected is None) == (mixed is None) and len(expected or ()) == len(mixed or ())


def test_a_model_loaded_with_output_attentions_saves_as_its_parent_does(tmp_path):
    tiny_model(ViTForImageClassification, "eager").save_pretrained(tmp_path / "vanilla")
    for model_class in (ViTForImageClassification, ALIGNED_CLASSES[ViTForImageClassification]):
        model = model_class.from_pretrained(tmp_path / "vanilla", attn_implementation="eager", output_attentions=True)
        model.save_pretrained(tmp_path / model_class.__name__)
        reloaded = ViTForImageClassification.from_pretrained(tmp_path / model_class.__name__)
        assert reloaded.config.output_attentions is True


@pytest.mark.parametrize("name", list(MODELS))
def test_a_rejected_set_attn_implementation_keeps_the_routing(name):
    model = aligned_copy(MODELS[name]("eager"))
    batch = _grid_batch(model.config, "fractional")
    with torch.no_grad():
        expected = model(batch["pixel_values"], **_mixing(batch)).aligned_lam
    with pytest.raises((ValueError, KeyError, ImportError)):
        model.set_attn_implementation("foo")
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(model(batch["pixel_values"], **_mixing(batch)).aligned_lam, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_signature_is_the_parents_plus_keyword_only_mixing_arguments(name):
    vanilla = MODELS[name]("eager")
    aligned = aligned_copy(vanilla)
    parent_parameters = inspect.signature(vanilla.forward).parameters
    parameters = inspect.signature(aligned.forward).parameters
    added = [key for key in parameters if key not in parent_parameters]
    assert added == ["mix_index", "token_weights", "mix_lam", "target_smoothing"]
    assert all(parameters[key].kind == inspect.Parameter.KEYWORD_ONLY for key in added)
    assert [key for key in parameters if key in parent_parameters] == list(parent_parameters)
    assert find_labels(type(aligned)) == find_labels(type(vanilla))


@pytest.mark.parametrize("name", ["vit", "deit", "deit_with_teacher"])
def test_positional_arguments_mean_what_they_mean_for_the_parent(name):
    vanilla = MODELS[name]("eager")
    aligned = aligned_copy(vanilla)
    pixel_values = torch.randn(2, 3, 32, 32)  # not the 24 px the position embeddings were made for
    positional = (pixel_values, True) if name == "deit_with_teacher" else (pixel_values, None, True)
    with torch.no_grad():
        expected = vanilla(*positional).logits  # interpolate_pos_encoding=True, given positionally
        torch.testing.assert_close(aligned(*positional).logits, expected, rtol=0, atol=0)
        grid = (32 // 4) ** 2
        mixing = dict(mix_index=torch.tensor([1, 0]), token_weights=torch.ones(2, grid), mix_lam=torch.ones(2))
        torch.testing.assert_close(aligned(*positional, **mixing).logits, expected, rtol=0, atol=1e-6)
