"""The value channel through widened projections (tl_align_hf/value_channel.py): the same outputs and
gradients as the copy-based value channel, active only for aligned value-channel calls, undone by
`restore_projections`, and off for projections peft replaced."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DeiTForImageClassification, ViTForImageClassification
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit.modeling_vit import ViTAttention, eager_attention_forward

from tl_align_hf import to_tl_align
from tl_align_hf.value_channel import INPUT_PROJECTIONS, WIDENED_ATTRIBUTE, restore_projections

from .test_families import _grid_batch, _mixing, tiny_family_model
from .tiny_models import aligned_copy, tiny_model

MODELS = {
    "vit": lambda: tiny_model(ViTForImageClassification, "sdpa"),
    "deit": lambda: tiny_model(DeiTForImageClassification, "sdpa"),
    **{name: (lambda name=name: tiny_family_model(name, "sdpa")) for name in ("beit", "clip", "siglip", "swin", "dinov2")},
}


def _attention_modules(model):
    return [module for module in model.modules() if hasattr(module, "v_proj")]


def _record_value_widths(model) -> list[int]:
    """The last dim of every value projection's output from now on (hooks on the model's `v_proj`s)."""
    widths = []
    for module in _attention_modules(model):
        module.v_proj.register_forward_hook(lambda layer, args, output: widths.append(output.shape[-1]))
    return widths


def _loss_and_gradients(model, batch, **call):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same stochastic depth draws (BEiT) for both models
    outputs = model(batch["pixel_values"], labels=batch["labels"], **_mixing(batch), **call)
    outputs.loss.backward()
    gradients = {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}
    return outputs, gradients


@pytest.mark.parametrize("name", list(MODELS))
def test_widened_path_matches_copy_path_outputs_and_gradients(name):
    """Same model and batch, training mode: logits, aligned_lam, loss and every parameter's gradient of the widened
    projections equal those of the copy-based value channel (`restore_projections`) within 1e-5."""
    widened = aligned_copy(MODELS[name]()).train()
    copied = copy.deepcopy(widened)
    assert restore_projections(copied) == len(_attention_modules(widened)) > 0
    assert not any(hasattr(module, WIDENED_ATTRIBUTE) for module in copied.modules())
    batch = _grid_batch(widened.config, "fractional")
    widths = _record_value_widths(widened)
    widened_outputs, widened_gradients = _loss_and_gradients(widened, batch)
    heads = [(module.head_dim, module.v_proj.out_features // module.head_dim) for module in _attention_modules(widened)]
    assert widths == [heads_ * (head_dim + 1) for head_dim, heads_ in heads], "the projections were not widened"
    copied_outputs, copied_gradients = _loss_and_gradients(copied, batch)
    for field in ("logits", "aligned_lam", "loss"):
        torch.testing.assert_close(widened_outputs[field], copied_outputs[field], rtol=1e-5, atol=1e-5, msg=field)
    assert widened_gradients.keys() == copied_gradients.keys() and len(widened_gradients) > 0
    for parameter_name, gradient in copied_gradients.items():
        torch.testing.assert_close(widened_gradients[parameter_name], gradient, rtol=1e-5, atol=1e-5, msg=parameter_name)
    assert not torch.allclose(widened_outputs.aligned_lam, batch["mix_lam"]), "alignment must move the target"


@pytest.mark.parametrize("attention_path", ["eager", "explicit"])
def test_projections_stay_narrow_without_aligner_and_on_other_paths(attention_path):
    """Plain calls and the eager / explicit paths run the parent's projections; after an aligned call the modules
    and projections are as before it."""
    model = aligned_copy(tiny_model(ViTForImageClassification, "sdpa"))
    batch = _grid_batch(model.config, "fractional")
    widths = _record_value_widths(model)
    model(batch["pixel_values"])
    model.tl_align_attention_path = attention_path
    model(batch["pixel_values"], **_mixing(batch))
    assert set(widths) == {model.config.hidden_size}
    model.tl_align_attention_path = "value_channel"
    model(batch["pixel_values"], **_mixing(batch))
    assert set(widths[-model.config.num_hidden_layers :]) == {model.config.hidden_size + model.config.num_attention_heads}
    for module in _attention_modules(model):
        assert module.head_dim == model.config.hidden_size // model.config.num_attention_heads
        assert getattr(module, WIDENED_ATTRIBUTE) is None
        assert all(getattr(module, name).tl_align_layout is None for name in (*INPUT_PROJECTIONS, "o_proj"))


def test_restore_projections_gives_plain_linear_layers_and_keeps_alignment_exact():
    model = aligned_copy(tiny_model(ViTForImageClassification, "sdpa"))
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert restore_projections(model) == model.config.num_hidden_layers
    assert restore_projections(model) == 0
    for module in model.modules():
        assert not hasattr(module, "tl_align_layout") and not hasattr(module, WIDENED_ATTRIBUTE)
        assert not module._forward_pre_hooks and not module._forward_hooks
    for module in _attention_modules(model):
        assert all(type(getattr(module, name)) is torch.nn.Linear for name in (*INPUT_PROJECTIONS, "o_proj"))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())
    batch = _grid_batch(model.config, "fractional")
    widths = _record_value_widths(model)
    model(batch["pixel_values"], **_mixing(batch))
    assert set(widths) == {model.config.hidden_size}


def test_lora_projections_fall_back_to_copy_path_and_match_widened():
    """peft wraps q_proj and v_proj in `lora.Linear`: those modules no longer qualify at call time, so the value
    channel copies; the outputs equal those of the same adapters merged into a widened model."""
    torch.manual_seed(0)
    model = to_tl_align(tiny_model(ViTForImageClassification, "sdpa"))
    merged = copy.deepcopy(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = _grid_batch(model.config, "fractional")
    widths = _record_value_widths(merged)
    with torch.no_grad():
        lora_outputs = peft_model(pixel_values=batch["pixel_values"], **_mixing(batch))
        merged.load_state_dict(copy.deepcopy(peft_model).merge_and_unload().state_dict())
        merged_outputs = merged(batch["pixel_values"], **_mixing(batch))
    assert set(widths) == {model.config.hidden_size + model.config.num_attention_heads}  # merged: widened again
    torch.testing.assert_close(lora_outputs.logits, merged_outputs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora_outputs.aligned_lam, merged_outputs.aligned_lam, rtol=1e-5, atol=1e-5)
    assert restore_projections(peft_model) == model.config.num_hidden_layers  # also inside the lora layers
    assert {type(layer) for layer in peft_model.modules() if isinstance(layer, torch.nn.Linear)} == {torch.nn.Linear}


def test_widened_path_under_cpu_autocast_uses_two_share_channels_and_stays_close_to_reference():
    """Under bf16 autocast the value projection returns bf16, so the layout leaves two share channels (high and low
    part); the aligned target stays as close to the float32 reference as the copy path's."""
    model = aligned_copy(tiny_model(ViTForImageClassification, "sdpa"))
    batch = _grid_batch(model.config, "fractional")
    widths = _record_value_widths(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_lam = model(batch["pixel_values"], **_mixing(batch)).aligned_lam.float()
    assert set(widths) == {model.config.hidden_size + 2 * model.config.num_attention_heads}
    restore_projections(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        copied_lam = model(batch["pixel_values"], **_mixing(batch)).aligned_lam.float()
    float32_lam = model(batch["pixel_values"], **_mixing(batch)).aligned_lam
    assert (autocast_lam - float32_lam).abs().max() <= max(2 * (copied_lam - float32_lam).abs().max(), 1e-3)



@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputes_the_widened_blocks(use_reentrant):
    """The recomputed blocks are widened again (closed aligner: zero share channels), so outputs and gradients equal
    those without checkpointing, and each block updates the shares once."""
    batch = _grid_batch(tiny_model(ViTForImageClassification).config, "fractional")
    results = []
    for checkpointing in (False, True):
        model = aligned_copy(tiny_model(ViTForImageClassification, "sdpa")).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        widths = _record_value_widths(model)
        outputs, gradients = _loss_and_gradients(model, batch)
        results.append((outputs.aligned_lam, gradients))
    assert set(widths) == {model.config.hidden_size + model.config.num_attention_heads}
    assert len(widths) == 2 * model.config.num_hidden_layers  # forward, and the recomputation in backward
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    assert results[1][1].keys() == results[0][1].keys()
    for name, gradient in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], gradient, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_widened_width_is_a_multiple_of_8_off_the_cpu(dtype):
    """Off the CPU the fused kernels take head dims in multiples of 8: the projections widen head dim 8 to 16, with
    one (float32) or two (bf16) share channels. Shapes only: the model runs on the meta device."""
    model = aligned_copy(tiny_model(ViTForImageClassification, "sdpa")).to("meta", dtype)
    batch = {key: value.to("meta") for key, value in _grid_batch(model.config, "fractional").items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    layouts = []
    for module in _attention_modules(model):
        module.v_proj.register_forward_hook(lambda layer, args, output: layouts.append(layer.tl_align_layout))
    outputs = model(batch["pixel_values"], **_mixing(batch))
    assert outputs.aligned_lam.shape == (batch["pixel_values"].shape[0],)
    share_channels = 1 if dtype == torch.float32 else 2
    assert set(layouts) == {(model.config.num_attention_heads, 8, 8, share_channels)}


class _HeadSizeFromConfigAttention(ViTAttention):
    """A Llama-shaped module that splits its heads by a size read from the config, not by `head_dim`: the widened
    projections' 8 heads of 9 channels would reach its attention as 9 heads of 8."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.config.hidden_size // self.config.num_attention_heads)
        query, key, value = (
            projection(hidden_states).view(hidden_shape).transpose(1, 2)
            for projection in (self.q_proj, self.k_proj, self.v_proj)
        )
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling, **kwargs)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


def test_raises_error_when_module_splits_heads_without_head_dim():
    """Not a silent wrong result: the attention function checks the heads and width it receives."""
    model = aligned_copy(tiny_model(ViTForImageClassification, "sdpa", hidden_size=64, num_attention_heads=8))
    for module in _attention_modules(model):
        module.__class__ = _HeadSizeFromConfigAttention
    batch = _grid_batch(model.config, "fractional")
    model(batch["pixel_values"])  # plain calls are the module's own
    with pytest.raises(RuntimeError, match=r"8 heads of 9 channels.*restore_projections"):
        model(batch["pixel_values"], **_mixing(batch))
    restore_projections(model)
    assert model(batch["pixel_values"], **_mixing(batch)).aligned_lam.shape == (batch["pixel_values"].shape[0],)
