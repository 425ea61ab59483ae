"""The Trainer example script, end to end on tiny local data (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    AutoImageProcessor,
    ConvNextConfig,
    ConvNextForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from tl_align_hf.support.transforms import default_image_processor

from .hub_server import FAKE_TOKEN, FAKE_USER, HubServer, client_environment
from .tiny_models import TINY_IMAGE_SIZE

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import run_image_classification as example  # noqa: E402

IMAGE_SIZE = TINY_IMAGE_SIZE  # the digits fixture of conftest.py


def quick_args(digits: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--train_dir", str(digits / "train"),
        "--validation_dir", str(digits / "validation"),
        "--image_size", str(IMAGE_SIZE),
        "--output_dir", str(output_dir),
        "--do_train", "--do_eval",
        "--max_steps", "3",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16",
        "--max_train_samples", "48",
        "--max_eval_samples", "24",
        "--learning_rate", "1e-3",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--use_cpu",
        "--cache_dir", str(output_dir / "cache"),
        *extra,
    ]  # fmt: skip


def test_main_trains_and_saves_a_plain_transformers_checkpoint(digits, tmp_path):
    output_dir = tmp_path / "run"
    metrics = example.main(quick_args(digits, output_dir, "--mixing_method", "cutmix"))
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_top5_accuracy" in metrics
    assert metrics["train_loss"] > 0
    model, info = ViTForImageClassification.from_pretrained(output_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.architectures == ["ViTForImageClassification"]
    assert model.config.id2label[3] == "3" and model.config.num_labels == 10
    processor = AutoImageProcessor.from_pretrained(output_dir)
    assert processor.size["height"] == IMAGE_SIZE
    card = (output_dir / "README.md").read_text()
    assert "tl-align" in card and "cutmix" in card
    logged = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert any("aligned_lam" in entry for entry in logged)


def test_main_fine_tunes_a_pretrained_checkpoint_with_a_new_head(digits, tmp_path):
    pretrained = tmp_path / "pretrained"
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=3)
    ViTForImageClassification(config).save_pretrained(pretrained)
    default_image_processor(IMAGE_SIZE).save_pretrained(pretrained)
    output_dir = tmp_path / "run"
    args = quick_args(digits, output_dir, "--model_name_or_path", str(pretrained), "--ignore_mismatched_sizes")
    metrics = example.main(args)
    assert "eval_accuracy" in metrics
    model = ViTForImageClassification.from_pretrained(output_dir)
    assert model.config.num_labels == 10 and model.classifier.out_features == 10


def test_no_arguments_select_the_builtin_digits_default():
    model_args, data_args, training_args = example.parse_args([])
    assert data_args.use_digits and model_args.model_name_or_path is None
    assert training_args.do_train and training_args.do_eval and training_args.tl_align
    assert training_args.mixing_method == "token_cutmix"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_sets_defaults_and_flags_override_it(tmp_path, suffix):
    settings = {"use_digits": True, "output_dir": str(tmp_path), "num_train_epochs": 7, "mixing_method": "mixup",
                "mixup_alpha": 0.8, "learning_rate": 0.003}
    path = tmp_path / f"settings{suffix}"
    path.write_text(json.dumps(settings) if suffix == ".json" else yaml.safe_dump(settings))
    _, data_args, training_args = example.parse_args(["--config", str(path), "--num_train_epochs", "2"])
    assert data_args.use_digits
    assert training_args.num_train_epochs == 2 and training_args.learning_rate == 0.003
    assert training_args.mixing_method == "mixup" and training_args.mixup_alpha == 0.8


def test_raises_error_when_config_file_has_unknown_settings(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"use_digits": True, "learning_rte": 0.1}))
    with pytest.raises(ValueError, match=r"Unknown settings .*learning_rte"):
        example.parse_args(["--config", str(path)])


def test_raises_error_when_no_or_two_data_sources_are_given(tmp_path):
    with pytest.raises(ValueError, match="Give exactly one data source"):
        example.parse_args(["--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="Give exactly one data source"):
        example.parse_args(["--use_digits", "--dataset_name", "beans", "--output_dir", str(tmp_path)])


def test_raises_error_when_image_column_is_wrong(digits, tmp_path):
    with pytest.raises(ValueError, match=r"pixels.*(image|label)"):
        example.main(quick_args(digits, tmp_path / "run", "--image_column_name", "pixels"))


def test_raises_error_when_model_family_is_unsupported(digits, tmp_path):
    pretrained = tmp_path / "convnext"
    config = ConvNextConfig(num_stages=1, hidden_sizes=[8], depths=[1], num_labels=10)
    ConvNextForImageClassification(config).save_pretrained(pretrained)
    default_image_processor(IMAGE_SIZE).save_pretrained(pretrained)
    with pytest.raises(ValueError, match=r"does not support ConvNextForImageClassification.*Supported"):
        example.main(quick_args(digits, tmp_path / "run", "--model_name_or_path", str(pretrained)))


LOAD_FROM_HUB = textwrap.dedent(
    """
    import json, sys
    sys.modules["tl_align_hf"] = None  # published checkpoints need no tl_align_hf
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained(sys.argv[1])
    processor = AutoImageProcessor.from_pretrained(sys.argv[1])
    pixels = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        logits = model.eval()(pixel_values=pixels).logits
    torch.save(logits, sys.argv[3])
    print(json.dumps({"class": type(model).__name__, "size": dict(processor.size)}))
    """
)


def run_in_subprocess(command: list[str], env: dict, cwd: Path) -> str:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"{command[:3]} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result.stdout


def test_push_to_hub_publishes_a_checkpoint_that_plain_transformers_loads(digits, tmp_path, monkeypatch):
    repo_id = f"{FAKE_USER}/digits-tl-align"
    with HubServer(max_lifetime_s=300) as server:
        env = dict(os.environ)
        for key, value in client_environment(server.url, tmp_path / "hf_home", token=FAKE_TOKEN).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        env["PYTHONPATH"] = str(EXAMPLES.parent)
        output_dir = tmp_path / "run"
        args = quick_args(digits, output_dir, "--push_to_hub", "--hub_model_id", repo_id, "--hub_token", FAKE_TOKEN)
        run_in_subprocess([sys.executable, str(EXAMPLES / "run_image_classification.py"), *args], env, tmp_path)

        files = set(server.hub.commits(repo_id)[0].files)
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= files
        card = server.hub.file(repo_id, "README.md").decode()
        assert "tl-align" in card and "token_cutmix" in card and "eval" in card.lower()

        pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
        torch.save(pixels, tmp_path / "pixels.pt")
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        loaded = run_in_subprocess(
            [sys.executable, "-c", LOAD_FROM_HUB, repo_id, str(tmp_path / "pixels.pt"), str(tmp_path / "logits.pt")],
            env,
            fresh,
        )
        assert json.loads(loaded.strip().splitlines()[-1])["class"] == "ViTForImageClassification"
        assert not server.hub.unhandled
    local = ViTForImageClassification.from_pretrained(output_dir).eval()
    with torch.no_grad():
        expected = local(pixel_values=pixels).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected)
