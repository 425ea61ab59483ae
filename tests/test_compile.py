"""The aligned training path under torch.compile: no graph breaks (so no host sync), and the same numbers as eager."""

import numpy as np
import pytest
import torch
from transformers import DeiTForImageClassification, DeiTForImageClassificationWithTeacher, ViTForImageClassification

from tl_align_hf import TLAlignTrainer

from .test_families import _grid_batch, _mixing, tiny_family_model
from .test_trainer import image_dataset, make_args
from .tiny_models import aligned_copy, mixed_batch, tiny_model

MODELS = {
    "vit": lambda attn: tiny_model(ViTForImageClassification, attn),
    "deit": lambda attn: tiny_model(DeiTForImageClassification, attn),
    "deit_with_teacher": lambda attn: tiny_model(DeiTForImageClassificationWithTeacher, attn),
    "swin": lambda attn: tiny_family_model("swin", attn),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(MODELS))
def test_aligned_forward_compiles_without_graph_breaks(name, attn_implementation):
    model = aligned_copy(MODELS[name](attn_implementation)).train()
    batch = _grid_batch(model.config, "fractional")
    inputs = {"pixel_values": batch["pixel_values"], **_mixing(batch)}
    if name != "deit_with_teacher":  # its parent takes no labels; the others also compute the aligned loss
        inputs["labels"] = batch["labels"]
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, [str(reason.reason) for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_train_with_torch_compile_matches_eager(tmp_path):
    """`torch_compile=True` trains through TLAlignTrainer; logits, aligned_lam and weights equal eager's within 1e-5."""
    trained = {}
    for compiled in (False, True):
        model = tiny_model(ViTForImageClassification, "sdpa").train()
        # SGD: Adam turns float noise in near-zero gradients into full-size steps
        args = make_args(tmp_path / str(compiled), torch_compile=compiled, mixing_method="cutmix", max_steps=3, optim="sgd")
        trainer = TLAlignTrainer(model=model, args=args, train_dataset=image_dataset())
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(losses) == 3 and np.isfinite(losses).all()
        trained[compiled] = trainer
    eager_model, compiled_model = trained[False].model, trained[True].model_wrapped
    assert compiled_model is not eager_model and hasattr(compiled_model, "_orig_mod"), "the model was not compiled"
    for name, parameter in trained[False].model.state_dict().items():
        torch.testing.assert_close(trained[True].model.state_dict()[name], parameter, rtol=1e-5, atol=1e-5, msg=name)
    batch = mixed_batch("fractional")
    with torch.no_grad():
        eager_out = eager_model(batch["pixel_values"], **_mixing(batch))
        compiled_out = compiled_model(batch["pixel_values"], **_mixing(batch))
    torch.testing.assert_close(compiled_out.logits, eager_out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_out.aligned_lam, eager_out.aligned_lam, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eager_out.aligned_lam, batch["mix_lam"]), "alignment must move the target"
