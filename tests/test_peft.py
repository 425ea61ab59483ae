"""peft (LoRA) models: `to_tl_align`, `TLAlignTrainer` (training, adapter saving, resume, best model) and the
Accelerate example, with real `peft` models of a tiny ViT.

`to_tl_align(peft_model)` converts the transformers model inside (`get_base_model()`) in place and returns the
`PeftModel`, whose forward hands the mixing arguments on to it.
"""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import ViTForImageClassification

from tl_align_hf import TLAlignCollator, TLAlignTrainer, TLAlignViTForImageClassification, to_tl_align
from tl_align_hf.models import aligned_classes

from .test_families import _grid_batch, tiny_family_model
from .test_no_trainer import EXAMPLES, run_arguments
from .test_trainer import image_dataset, make_args
from .tiny_models import mixed_batch, tiny_model

ALIGNED_CLASSES = aligned_classes()  # every supported class -> its aligned class (timm's included)

MIXING_KEYS = ("mix_index", "token_weights", "mix_lam")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "compatibility_peft.md"


def with_lora(model: torch.nn.Module, init_lora_weights: bool = True, seed: int = 0) -> PeftModel:
    """`model` with LoRA on its query and value projections and its classifier trained in full (`modules_to_save`).

    `init_lora_weights=False`: random LoRA B matrices, so that the adapter changes the attention from the start.
    """
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["classifier"],
        init_lora_weights=init_lora_weights,
    )
    return get_peft_model(model, config)


def lora_model(init_lora_weights: bool = True) -> PeftModel:
    """A tiny ViT (SDPA) with LoRA, in train mode."""
    return with_lora(tiny_model(ViTForImageClassification, "sdpa").train(), init_lora_weights)


BASE_MODELS = {  # a CLS read-out; Swin's windows and merging (module hooks); SigLIP's kwargs-dropping attention
    "vit": lambda: tiny_model(ViTForImageClassification, "sdpa"),
    "swin": lambda: tiny_family_model("swin", "sdpa"),
    "siglip": lambda: tiny_family_model("siglip", "sdpa"),
}


def mixing(batch: dict) -> dict:
    return {key: batch[key] for key in MIXING_KEYS}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}


# ----------------------------------------------------------------------------------------------- to_tl_align


def test_to_tl_align_converts_the_base_model_of_a_peft_model_in_place():
    peft_model = lora_model(init_lora_weights=False).eval()
    plain = copy.deepcopy(peft_model)
    batch = mixed_batch("fractional")
    assert to_tl_align(peft_model) is peft_model
    assert isinstance(peft_model.get_base_model(), TLAlignViTForImageClassification)
    assert to_tl_align(peft_model) is peft_model  # converting again changes nothing
    with torch.no_grad():
        assert torch.equal(peft_model(batch["pixel_values"]).logits, plain(batch["pixel_values"]).logits)
        out = peft_model(pixel_values=batch["pixel_values"], labels=batch["labels"], **mixing(batch))
    assert out.aligned_lam.shape == (4,) and torch.isfinite(out.loss)
    collated = TLAlignCollator.from_model(peft_model, mixing_method="cutmix", seed=0)(
        [{"pixel_values": image, "label": int(label)} for image, label in zip(batch["pixel_values"], batch["labels"])]
    )
    assert collated["token_weights"].shape == batch["token_weights"].shape


@pytest.mark.parametrize("name", list(BASE_MODELS))
def test_aligned_lam_of_peft_model_equals_that_of_its_merged_plain_model(name):
    """The adapter acts in the attention the shares follow: merged into plain weights, the targets are the same."""
    peft_model = with_lora(BASE_MODELS[name](), init_lora_weights=False).eval()
    merged = to_tl_align(copy.deepcopy(peft_model).merge_and_unload())
    to_tl_align(peft_model)
    assert type(merged) in ALIGNED_CLASSES.values()
    batch = _grid_batch(merged.config, "fractional")
    with torch.no_grad():
        peft_out = peft_model(pixel_values=batch["pixel_values"], **mixing(batch))
        merged_out = merged(pixel_values=batch["pixel_values"], **mixing(batch))
        with peft_model.disable_adapter():
            base_out = peft_model(pixel_values=batch["pixel_values"], **mixing(batch))
    torch.testing.assert_close(peft_out.aligned_lam, merged_out.aligned_lam, atol=1e-6, rtol=0)
    torch.testing.assert_close(peft_out.logits, merged_out.logits, atol=1e-5, rtol=1e-5)
    assert (peft_out.aligned_lam - base_out.aligned_lam).abs().max() > 1e-3, "the adapter must move the shares"


# ----------------------------------------------------------------------------------------------- TLAlignTrainer


def test_train_with_peft_model_changes_only_adapter_and_classifier(tmp_path):
    peft_model = lora_model()
    frozen = {name: parameter.detach().clone() for name, parameter in peft_model.named_parameters()}
    before = trainable_state(peft_model)
    assert set(before) and all("lora_" in name or "modules_to_save" in name for name in before)
    args = make_args(tmp_path, tl_align_attention_path="explicit")
    trainer = TLAlignTrainer(model=peft_model, args=args, train_dataset=image_dataset())
    assert trainer.model is peft_model and peft_model.get_base_model().tl_align_attention_path == "explicit"
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all({"aligned_lam", "alignment_gap"} <= set(entry) for entry in logs)
    assert max(entry["alignment_gap"] for entry in logs) > 1e-4
    after = trainable_state(peft_model)
    assert [name for name in before if torch.equal(before[name], after[name])] == []
    changed_frozen = [
        name for name, parameter in peft_model.named_parameters()
        if name not in before and not torch.equal(parameter, frozen[name])
    ]  # fmt: skip
    assert changed_frozen == []


def test_save_model_writes_the_adapter_as_peft_does_and_it_loads_on_a_plain_model(tmp_path):
    peft_model = lora_model()
    trainer = TLAlignTrainer(model=peft_model, args=make_args(tmp_path), train_dataset=image_dataset())
    trainer.train()
    trainer.save_model()
    output_dir = tmp_path / "out"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {path.name for path in output_dir.iterdir()}
    assert not (output_dir / "model.safetensors").exists()
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["auto_mapping"] == {
        "base_model_class": "ViTForImageClassification",
        "parent_library": ViTForImageClassification.__module__,
    }
    saved = load_file(output_dir / "adapter_model.safetensors")
    assert any("lora_A" in key for key in saved) and any("classifier" in key for key in saved)
    assert isinstance(peft_model.get_base_model(), TLAlignViTForImageClassification)  # the class swap is undone

    plain_base = tiny_model(ViTForImageClassification, "sdpa")  # the same base weights (seed 0), unaligned
    loaded = PeftModel.from_pretrained(plain_base, output_dir).eval()
    assert type(loaded.get_base_model()) is ViTForImageClassification
    pixel_values = mixed_batch("fractional")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, peft_model.eval()(pixel_values).logits)


def _run(tmp_path, name: str, resume: str | None = None, **overrides) -> TLAlignTrainer:
    args = make_args(tmp_path / name, max_steps=4, save_strategy="steps", save_steps=2, optim="sgd", **overrides)
    if resume:
        args.output_dir = str(tmp_path / resume / "out")
    trainer = TLAlignTrainer(model=lora_model(), args=args, train_dataset=image_dataset(), eval_dataset=image_dataset(8, 1))
    trainer.train(resume_from_checkpoint=str(tmp_path / resume / "out" / "checkpoint-2") if resume else None)
    return trainer


def test_resume_from_checkpoint_with_peft_model_gives_the_uninterrupted_weights(tmp_path):
    uninterrupted = _run(tmp_path, "whole")
    assert (tmp_path / "whole" / "out" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    resumed = _run(tmp_path, "resumed", resume="whole")
    assert resumed.state.global_step == 4
    expected, got = trainable_state(uninterrupted.model), trainable_state(resumed.model)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_load_best_model_at_end_with_peft_model_loads_the_best_adapter(tmp_path):
    trainer = _run(
        tmp_path, "best", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
        metric_for_best_model="top5_accuracy",  # 0.5 at step 2, 0.375 at step 4: the best is not the last
    )  # fmt: skip
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    saved = load_file(f"{best}/adapter_model.safetensors")
    weights = get_peft_model_state_dict(trainer.model)  # the adapter's weights under the names peft saves them
    assert set(weights) == set(saved)
    for name, tensor in saved.items():
        torch.testing.assert_close(weights[name], tensor, msg=name)
    last = load_file(f"{best[: -len('checkpoint-2')]}checkpoint-4/adapter_model.safetensors")
    assert any(not torch.equal(last[name], tensor) for name, tensor in saved.items())


def test_docs_recipe_trains_and_saves_an_adapter(tmp_path, monkeypatch):
    """The recipe block of docs/compatibility_peft.md, run as written on a tiny ViT and dataset."""
    block = DOCS.read_text().split("<!-- recipe:begin -->")[1].split("<!-- recipe:end -->")[0]
    code = block.strip().removeprefix("```python").removesuffix("```")
    monkeypatch.chdir(tmp_path)
    namespace = {"model": tiny_model(ViTForImageClassification, "sdpa").train(), "train_dataset": image_dataset()}
    exec(compile(code, str(DOCS), "exec"), namespace)
    assert namespace["trainer"].state.global_step > 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {path.name for path in (tmp_path / "vit-lora").iterdir()}
    loaded = PeftModel.from_pretrained(tiny_model(ViTForImageClassification, "sdpa"), tmp_path / "vit-lora").eval()
    pixel_values = mixed_batch("fractional")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, namespace["model"].eval()(pixel_values).logits)


# ----------------------------------------------------------------------------------------------- Accelerate example

def test_train_with_peft_model_in_the_accelerate_example(tmp_path, digits, tiny_checkpoint):
    """The script with the two lines docs/compatibility_peft.md tells users to add after the model is converted."""
    source = (EXAMPLES / "run_image_classification_no_trainer.py").read_text()
    anchor = "    model.tl_align_attention_path = args.tl_align_attention_path\n"
    documented = DOCS.read_text().split("## The Accelerate example")[1].split("```python\n")[1].split("```")[0]
    lora_lines = documented.split(anchor)[1]
    assert source.count(anchor) == 1 and "get_peft_model(model" in lora_lines
    (tmp_path / "lora_no_trainer.py").write_text(source.replace(anchor, anchor + lora_lines))
    spec = importlib.util.spec_from_file_location("lora_no_trainer", tmp_path / "lora_no_trainer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    options = {"--max_train_steps": "3", "--checkpointing_steps": "2", "--mixing_method": "cutmix"}
    output_dir = tmp_path / "out"
    results = script.main(run_arguments(digits, tiny_checkpoint, output_dir, options) + ["--cpu"])
    assert results["train_steps"] == 3 and results["train_alignment_gap"] > 1e-4
    assert (output_dir / "adapter_model.safetensors").is_file() and not (output_dir / "model.safetensors").exists()
    adapter = load_file(output_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in name or "classifier" in name for name in adapter)

    resumed_dir = tmp_path / "resumed"  # resumed from the accelerate state at step 2: the same adapter
    options["--resume_from_checkpoint"] = str(output_dir / "step_2")
    script.main(run_arguments(digits, tiny_checkpoint, resumed_dir, options) + ["--cpu"])
    resumed = load_file(resumed_dir / "adapter_model.safetensors")
    assert set(resumed) == set(adapter)
    for name, tensor in adapter.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-6, atol=1e-7, msg=name)

    loaded = PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(tiny_checkpoint), output_dir).eval()
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        with loaded.disable_adapter():
            without = loaded(pixel_values).logits
        assert not torch.allclose(loaded(pixel_values).logits, without)
