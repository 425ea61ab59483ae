"""examples/run_image_classification_no_trainer.py in one process: training, outputs, exact resume, interrupted
checkpoints, arguments, pushing. The multi-process runs are in tests/test_distributed.py.

Training runs call `main(argv)` in this process on a tiny ViT (16 px images, 4 px patches) and a digits imagefolder
written once per module.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from huggingface_hub import HfApi
from transformers import ViTForImageClassification

from tests.hub_server import FAKE_TOKEN, FAKE_USER, HubServer, patch_client_in_process
from tl_align_hf import MixingSettings, TLAlignConfig

from .tiny_models import weights_digest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# 20 training images, batches of 4, 2 micro-batches per step: 5 micro-batches and 3 steps per epoch (the last one
# a single micro-batch), so 5 steps cross an epoch boundary; checkpoints at steps 2 and 4.
RESUME_RUN = {
    "--max_train_samples": "20",
    "--per_device_train_batch_size": "4",
    "--gradient_accumulation_steps": "2",
    "--max_train_steps": "5",
    "--checkpointing_steps": "2",
    "--mixing_method": "cutmix",
}


def load_example(name: str):
    """An example script as a module (the same module object when already imported)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


no_trainer = load_example("run_image_classification_no_trainer")


def run_arguments(digits: Path, checkpoint: Path, output_dir: Path, options: dict[str, str] | None = None) -> list:
    """Arguments of a short run of either example script on the tiny model; `options` override the defaults."""
    values = {
        "--model_name_or_path": str(checkpoint),
        "--train_dir": str(digits / "train"),
        "--validation_dir": str(digits / "validation"),
        "--output_dir": str(output_dir),
        "--max_train_samples": "32",
        "--max_eval_samples": "45",
        "--per_device_train_batch_size": "4",
        "--per_device_eval_batch_size": "4",
        "--learning_rate": "1e-3",
        "--seed": "0",
        "--logging_steps": "1",
        **(options or {}),
    }
    return [item for pair in values.items() for item in pair]


def train(digits: Path, checkpoint: Path, output_dir: Path, **options: str) -> dict:
    """`main()` of the no-Trainer script on CPU; the results it wrote to all_results.json."""
    argv = run_arguments(digits, checkpoint, output_dir, {**RESUME_RUN, **options}) + ["--cpu"]
    return no_trainer.main(argv)


@pytest.fixture(scope="module")
def uninterrupted(digits, tiny_checkpoint, tmp_path_factory) -> tuple[dict, Path]:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "out"
    return train(digits, tiny_checkpoint, output_dir), output_dir


# ----------------------------------------------------------------------------------------------- training and outputs


def saved_weights(output_dir: Path) -> str:
    return weights_digest(ViTForImageClassification.from_pretrained(output_dir))


def test_train_with_no_trainer_script_saves_model_card_and_results(uninterrupted, tiny_checkpoint):
    results, output_dir = uninterrupted
    assert results["train_steps"] == 5 and results["eval_samples"] == 45
    assert json.loads((output_dir / "all_results.json").read_text()) == results
    log_history = json.loads((output_dir / "log_history.json").read_text())["log_history"]
    train_logs = [entry for entry in log_history if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(torch.tensor([entry["loss"] for entry in train_logs])))
    assert all(0.0 < entry["aligned_lam"] < 1.0 and entry["alignment_gap"] >= 0.0 for entry in train_logs)
    assert [entry["eval_samples"] for entry in log_history if "eval_loss" in entry] == [45, 45]  # after each epoch
    assert 0.0 < results["train_aligned_lam"] < 1.0 and results["train_alignment_gap"] > 0.0

    loaded, info = ViTForImageClassification.from_pretrained(output_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.architectures == ["ViTForImageClassification"] and loaded.config.problem_type is None
    initial = ViTForImageClassification.from_pretrained(tiny_checkpoint).state_dict()
    unchanged = [name for name, value in loaded.state_dict().items() if torch.equal(value, initial[name])]
    assert unchanged == []
    assert (output_dir / "preprocessor_config.json").is_file()
    card = (output_dir / "README.md").read_text()
    assert "tl-align" in card and "cutmix" in card and "eval_accuracy" in card


def test_checkpoints_are_complete_accelerate_states(uninterrupted):
    _, output_dir = uninterrupted
    checkpoints = no_trainer.complete_checkpoints(output_dir)
    assert [path.name for path in checkpoints] == ["step_2", "step_4"]
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= {
        path.name for path in checkpoints[0].iterdir()
    }
    assert not list(output_dir.glob(f"*{no_trainer.STAGING_SUFFIX}"))


# ----------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("workers", ["0", "2"])
def test_resume_from_checkpoint_gives_the_weights_of_an_uninterrupted_run(
    uninterrupted, digits, tiny_checkpoint, tmp_path, workers
):
    """Resumed mid-epoch (step 2 of 3 per epoch): same weights, with or without DataLoader workers."""
    expected, full_dir = uninterrupted
    options = {"--resume_from_checkpoint": str(full_dir / "step_2"), "--dataloader_num_workers": workers}
    resumed = train(digits, tiny_checkpoint, tmp_path / "resumed", **options)
    assert resumed["train_steps"] == 5
    assert saved_weights(tmp_path / "resumed") == saved_weights(full_dir)
    assert resumed["eval_loss"] == expected["eval_loss"]


def test_workers_train_the_weights_of_a_run_without_workers(uninterrupted, digits, tiny_checkpoint, tmp_path):
    _, full_dir = uninterrupted
    train(digits, tiny_checkpoint, tmp_path / "workers", **{"--dataloader_num_workers": "2"})
    assert saved_weights(tmp_path / "workers") == saved_weights(full_dir)


class SimulatedKill(Exception):
    """Stands for the process being killed."""


def test_checkpoint_interrupted_mid_write_leaves_the_previous_one_and_resume_picks_it(
    uninterrupted, digits, tiny_checkpoint, tmp_path, monkeypatch
):
    _, full_dir = uninterrupted
    output_dir = tmp_path / "out"
    save_state = Accelerator.save_state

    def killed_after_writing_weights(self, output_dir=None, **kwargs):
        location = save_state(self, output_dir, **kwargs)
        if "step_4" in str(output_dir):
            raise SimulatedKill(output_dir)
        return location

    with monkeypatch.context() as patch:
        patch.setattr(Accelerator, "save_state", killed_after_writing_weights)
        with pytest.raises(SimulatedKill):
            train(digits, tiny_checkpoint, output_dir)

    staging = output_dir / f"step_4{no_trainer.STAGING_SUFFIX}"
    assert (staging / "model.safetensors").is_file() and not (output_dir / "step_4").exists()
    assert no_trainer.complete_checkpoints(output_dir) == [output_dir / "step_2"]
    with pytest.raises(ValueError, match="not a complete checkpoint folder.*--resume_from_checkpoint latest"):
        train(digits, tiny_checkpoint, output_dir, **{"--resume_from_checkpoint": str(staging)})

    train(digits, tiny_checkpoint, output_dir, **{"--resume_from_checkpoint": "latest"})
    assert saved_weights(output_dir) == saved_weights(full_dir)
    assert [path.name for path in no_trainer.complete_checkpoints(output_dir)] == ["step_2", "step_4"]
    assert not staging.exists()


def test_resume_latest_without_checkpoints_starts_from_scratch(digits, tiny_checkpoint, tmp_path, uninterrupted):
    _, full_dir = uninterrupted
    train(digits, tiny_checkpoint, tmp_path / "fresh", **{"--resume_from_checkpoint": "latest"})
    assert saved_weights(tmp_path / "fresh") == saved_weights(full_dir)


# ----------------------------------------------------------------------------------------------- arguments


def test_no_arguments_run_the_digits_default():
    args = no_trainer.parse_args([])
    assert args.use_digits and args.output_dir == no_trainer.DIGITS_DEFAULTS["output_dir"]
    assert args.learning_rate == 0.002 and args.warmup_ratio == 0.1 and args.lr_scheduler_type.value == "cosine"
    assert args.mixing.mixing_method == "token_cutmix" and args.per_device_train_batch_size == 64
    assert no_trainer.parse_args(["--learning_rate", "0.01"]).learning_rate == 0.01


def test_mixing_arguments_have_the_names_and_defaults_of_tl_align_config(tmp_path):
    args = no_trainer.parse_args([])
    config = TLAlignConfig(output_dir=str(tmp_path))
    assert args.mixing == config.mixing_settings() == MixingSettings()
    for name in ("tl_align", "label_smoothing", "tl_align_attention_path"):
        assert getattr(args, name) == getattr(config, name), name
    args = no_trainer.parse_args(
        ["--tl_align", "false", "--mixing_method", "cutmix", "--cutmix_minmax", "0.2", "0.8", "--mix_mode", "elem"]
    )
    assert args.tl_align is False and args.mixing.cutmix_minmax == [0.2, 0.8] and args.mixing.mix_mode == "elem"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpointing_steps", "often"], "positive number of steps or 'epoch'"),
        (["--train_dir", "x", "--checkpointing_steps", "10"], "need --output_dir"),
        (["--label_smoothing", "1.5"], r"`label_smoothing` \(--label_smoothing\) must be in \[0, 1\)"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1"),
        (["--mix_prob", "2"], r"`mix_prob` \(--mix_prob\) must be a number in \[0.0, 1.0\]"),
    ],
    ids=["bad_checkpointing_steps", "checkpoints_without_output_dir", "smoothing", "accumulation", "mix_prob"],
)
def test_raises_error_when_arguments_are_wrong(argv, message):
    with pytest.raises(ValueError, match=message):
        no_trainer.parse_args(argv)


def test_raises_error_when_resuming_from_a_missing_folder(digits, tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="not a complete checkpoint folder"):
        train(digits, tiny_checkpoint, tmp_path / "out", **{"--resume_from_checkpoint": str(tmp_path / "step_9")})


# ----------------------------------------------------------------------------------------------- Hub


def test_push_to_hub_sends_model_processor_and_card(digits, tiny_checkpoint, tmp_path, monkeypatch):
    repo_id = f"{FAKE_USER}/tiny-no-trainer"
    with HubServer(max_lifetime_s=300) as server:
        patch_client_in_process(monkeypatch, server.url, tmp_path / "hf_home")
        options = {
            "--max_train_steps": "1",
            "--max_eval_samples": "8",
            "--checkpointing_steps": "1",
            "--hub_model_id": repo_id,
            "--hub_token": FAKE_TOKEN,
        }
        argv = run_arguments(digits, tiny_checkpoint, tmp_path / "out", {**RESUME_RUN, **options})
        no_trainer.main(argv + ["--cpu", "--push_to_hub"])
        files = set(HfApi(endpoint=server.url, token=FAKE_TOKEN).list_repo_files(repo_id))
        assert not server.hub.unhandled
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "all_results.json"} <= files
    assert not [name for name in files if name.startswith(("step_", "epoch_"))]


# ----------------------------------------------------------------------------------------------- reliability


def test_resuming_with_other_mixing_settings_is_refused(uninterrupted, digits, tiny_checkpoint, tmp_path):
    _, full_dir = uninterrupted
    with pytest.raises(ValueError, match=r"mixing_method: 'cutmix' in the checkpoint, 'mixup' now.*new --output_dir"):
        train(digits, tiny_checkpoint, tmp_path / "out", **{"--resume_from_checkpoint": str(full_dir / "step_2"),
                                                             "--mixing_method": "mixup", "--mixup_alpha": "0.8"})  # fmt: skip


def test_a_finished_run_resumed_with_new_settings_says_so_and_its_card_keeps_the_trained_settings(
    uninterrupted, digits, tiny_checkpoint, tmp_path, caplog
):
    _, full_dir = uninterrupted
    options = {"--resume_from_checkpoint": str(full_dir / "step_4"), "--max_train_steps": "4",
               "--mixing_method": "mixup", "--mixup_alpha": "0.8"}  # fmt: skip
    with caplog.at_level("WARNING"):
        train(digits, tiny_checkpoint, tmp_path / "out", **options)
    assert "nothing left to train" in caplog.text and "mixing_method='cutmix'" in caplog.text
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`cutmix`" in card and "`mixup`" not in card


def test_a_non_finite_loss_stops_the_run(digits, tiny_checkpoint, tmp_path):
    with pytest.raises(RuntimeError, match=r"training loss was (nan|inf).*learning rate"):
        train(digits, tiny_checkpoint, tmp_path / "out", **{"--learning_rate": "1e30", "--checkpointing_steps": "100"})
