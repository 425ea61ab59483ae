"""Both example scripts with two processes (gloo on CPU), and the gradient of two processes against one.

The runs start real launchers in subprocesses: `torchrun` for the Trainer example, `accelerate launch` for the
no-Trainer example, each with a free port, on a tiny ViT and a 16 px digits imagefolder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from transformers import ViTForImageClassification

from tl_align_hf import MixingSettings, TLAlignCollator, TLAlignMixer, mixed_batch_loss, to_tl_align
from tl_align_hf.support.checkpoints import STAGING_DIR
from tl_align_hf.support.data import load_image_dataset

from .test_no_trainer import EXAMPLES, load_example, run_arguments
from .tiny_models import IMAGE_SIZE, NUM_LABELS, PATCH_SIZE, tiny_model, weights_digest

ROOT = EXAMPLES.parent
LAUNCH_TIMEOUT_S = 300
NUM_PROCESSES = 2
EVAL_SAMPLES = 45  # not a multiple of 2 processes x 4: the last eval batches are padded, and must not count twice
# Per process, per optimizer step: two micro-batches of 3 (the example averages each micro-batch, as upstream does;
# with equal sizes that is the mean over the global batch).
MICRO_BATCH_SIZES = (3, 3)

# Wraps `mixed_batch_loss` where `module` calls it, to keep this process's alignment sums of every micro-batch.
RECORD_ALIGNMENT_SUMS = """
recorded_sums = []
def _recording(original):
    def recording(*args, **kwargs):
        loss, sums = original(*args, **kwargs)
        recorded_sums.append(sums.tolist())
        return loss, sums
    return recording
"""

# Runs the Trainer example's `main` in each process, with a Trainer subclass that records what it evaluates, then
# dumps this process's final weights digest, its metrics, the evaluated labels and the logged losses.
TRAINER_RUN = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    sys.path.insert(0, {examples!r})
    import run_image_classification as script
    import tl_align_hf.trainer
    from transformers import TrainerCallback
    from tests.tiny_models import weights_digest
    from tl_align_hf import TLAlignTrainer
    from tl_align_hf.support.metrics import compute_accuracy_metrics
    {record}
    tl_align_hf.trainer.mixed_batch_loss = _recording(tl_align_hf.trainer.mixed_batch_loss)

    class LateAfterEveryLog(TrainerCallback):
        # Keeps this process behind the others from the step's log (its last collective) to the save.
        def on_log(self, args, state, control, **kwargs):
            time.sleep(0.5)

    class RecordingTrainer(TLAlignTrainer):
        instance, evaluated_labels = None, []

        def __init__(self, *args, **kwargs):
            super().__init__(*args, compute_metrics=self.record, **kwargs)
            RecordingTrainer.instance = self
            if os.environ.get("LATE_RANK") == str(self.args.process_index):
                self.add_callback(LateAfterEveryLog())

        def record(self, prediction):
            RecordingTrainer.evaluated_labels.append(np.asarray(prediction.label_ids).tolist())
            return compute_accuracy_metrics(prediction)

    script.TLAlignTrainer = RecordingTrainer
    output, argv = sys.argv[1], sys.argv[2:]
    metrics = script.main(argv)
    trainer = RecordingTrainer.instance
    with open(os.path.join(output, f"rank_{{trainer.args.process_index}}.json"), "w") as file:
        json.dump({{
            "world_size": trainer.args.world_size,
            "best_model_checkpoint": trainer.state.best_model_checkpoint,
            "weights": weights_digest(trainer.accelerator.unwrap_model(trainer.model)),
            "metrics": metrics,
            "evaluated_labels": RecordingTrainer.evaluated_labels,
            "log_history": trainer.state.log_history,
            "alignment_sums": recorded_sums,
        }}, file)
    """
)

# Runs the no-Trainer example's `main` in each process, keeping the model it trains and its alignment sums.
NO_TRAINER_RUN = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {examples!r})
    import run_image_classification_no_trainer as script
    from tests.tiny_models import weights_digest
    {record}
    script.mixed_batch_loss = _recording(script.mixed_batch_loss)
    trained = []
    script.to_tl_align = lambda model, convert=script.to_tl_align: trained.append(convert(model)) or trained[-1]
    output, argv = sys.argv[1], sys.argv[2:]
    results = script.main(argv)
    rank = int(os.environ["RANK"])
    with open(os.path.join(output, f"rank_{{rank}}.json"), "w") as file:
        json.dump({{"weights": weights_digest(trained[0]), "results": results, "alignment_sums": recorded_sums}}, file)
    """
)

# One optimizer step of the example's loss and backward on this process's micro-batches; dumps the synchronised
# gradients.
GRADIENT_STEP = textwrap.dedent(
    """
    import sys
    import torch
    from accelerate import Accelerator
    from tests.test_distributed import gradients, local_micro_batches, tiny_aligned_model
    from tl_align_hf import mixed_batch_loss

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=len(local_micro_batches(0)))
    model = accelerator.prepare(tiny_aligned_model())
    for batch in local_micro_batches(accelerator.process_index):
        with accelerator.accumulate(model):
            mixing = {key: batch[key] for key in ("mix_index", "token_weights", "mix_lam")}
            outputs = model(pixel_values=batch["pixel_values"], **mixing)
            loss, _ = mixed_batch_loss(outputs, batch, label_smoothing=0.1)
            accelerator.backward(loss)
    torch.save(gradients(accelerator.unwrap_model(model)), f"{sys.argv[1]}/grads_{accelerator.process_index}.pt")
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(command: list[str], cwd: Path, succeed: bool = True, **environment_variables: str) -> subprocess.CompletedProcess:
    """Run a launcher; fail the test with the end of its output when it fails (when it succeeds, with `succeed`
    False)."""
    environment = dict(
        os.environ,
        **environment_variables,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    result = subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    assert (result.returncode == 0) == succeed, (
        f"{' '.join(command[:6])} ... {'failed' if succeed else 'did not fail'}:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    )
    return result


def torchrun(script: Path, *args: str, cwd: Path, **launch_options) -> subprocess.CompletedProcess:
    port = str(free_port())
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={NUM_PROCESSES}"]
    return launch(command + ["--master_port", port, str(script), *args], cwd, **launch_options)


def accelerate_launch(script: Path, *args: str, cwd: Path, **launch_options) -> subprocess.CompletedProcess:
    port = str(free_port())
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"]
    command += ["--num_processes", str(NUM_PROCESSES), "--mixed_precision", "no", "--dynamo_backend", "no"]
    return launch(command + ["--main_process_port", port, str(script), *args], cwd, **launch_options)


def saved_weights_digest(output_dir: Path) -> str:
    return weights_digest(ViTForImageClassification.from_pretrained(output_dir))


def assert_logged_alignment_is_the_mean_over_processes(train_logs: list[dict], ranks: list[dict], micro_batches: int):
    """Each logged `aligned_lam` / `alignment_gap` is the mean over both processes' samples of that step, which
    differs from rank 0's own mean (the ranks see different images and mixing draws)."""
    for step, entry in enumerate(train_logs):
        per_rank = [torch.tensor(rank["alignment_sums"][step * micro_batches : (step + 1) * micro_batches]).sum(0)
                    for rank in ranks]  # fmt: skip
        total = sum(per_rank)
        for position, name in ((2, "aligned_lam"), (3, "alignment_gap")):
            assert abs(entry[name] - (total[position] / total[0]).item()) < 1e-6, (step, name)
        assert abs(entry["aligned_lam"] - (per_rank[0][2] / per_rank[0][0]).item()) > 1e-7, "ranks saw the same shares"


def validation_labels(digits: Path, seed: int = 0) -> list[int]:
    """The labels of the validation images the runs evaluate (the scripts' own selection)."""
    dataset = load_image_dataset(train_dir=digits / "train", validation_dir=digits / "validation")
    trainer_example = load_example("run_image_classification")
    return sorted(trainer_example.select_split(dataset, "validation", EVAL_SAMPLES, seed)["label"])


# ----------------------------------------------------------------------------------------------- example scripts


def trainer_example_argv(digits: Path, checkpoint: Path, output_dir: Path, options: dict[str, str]) -> list[str]:
    """Arguments of a short two-process run of the Trainer example (training and evaluation) on the tiny model."""
    options = {"--report_to": "none", "--dataloader_num_workers": "0", **options}
    return run_arguments(digits, checkpoint, output_dir, options) + ["--do_train", "--do_eval", "--use_cpu"]


def run_trainer_example(
    digits: Path, checkpoint: Path, folder: Path, options: dict[str, str], late_rank: int | None = None
) -> list[dict]:
    """The Trainer example under torchrun with 2 processes, writing to `folder / "out"`; what each process saw
    (`TRAINER_RUN`). `late_rank`: that process sleeps after every log, so it reaches each save after the other."""
    argv = trainer_example_argv(digits, checkpoint, folder / "out", options)
    script = folder / "trainer_run.py"
    script.write_text(TRAINER_RUN.format(examples=str(EXAMPLES), record=RECORD_ALIGNMENT_SUMS))
    torchrun(script, str(folder), *argv, cwd=ROOT, LATE_RANK="" if late_rank is None else str(late_rank))
    return [json.loads((folder / f"rank_{rank}.json").read_text()) for rank in range(NUM_PROCESSES)]


def test_trainer_script_with_two_processes(digits, tiny_checkpoint, tmp_path):
    output_dir = tmp_path / "out"
    ranks = run_trainer_example(digits, tiny_checkpoint, tmp_path, {"--max_steps": "4", "--save_strategy": "no"})

    assert [rank["world_size"] for rank in ranks] == [NUM_PROCESSES] * NUM_PROCESSES
    assert ranks[0]["weights"] == ranks[1]["weights"] == saved_weights_digest(output_dir)
    train_logs = [entry for entry in ranks[0]["log_history"] if "loss" in entry]
    assert len(train_logs) == 4 and all(torch.isfinite(torch.tensor([entry["loss"] for entry in train_logs])))
    assert_logged_alignment_is_the_mean_over_processes(train_logs, ranks, micro_batches=1)
    expected_labels = validation_labels(digits)
    for rank in ranks:
        (evaluated,) = rank["evaluated_labels"]  # one evaluation, on all processes' gathered predictions
        assert sorted(evaluated) == expected_labels  # every validation image exactly once
    assert 0.0 <= ranks[0]["metrics"]["eval_accuracy"] <= 1.0


# A whole Trainer checkpoint of a two-process run: each process's RNG state and the main process's files.
CHECKPOINT_FILES = {"config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                    "training_args.bin", "preprocessor_config.json", "rng_state_0.pth", "rng_state_1.pth"}  # fmt: skip
EVERY_STEP = {"--max_steps": "4", "--save_strategy": "steps", "--save_steps": "1"}


def checkpoint_steps(output_dir: Path) -> list[int]:
    return sorted(int(path.name.split("-")[1]) for path in output_dir.glob("checkpoint-*"))


@pytest.mark.parametrize("late_rank", [None, 0, 1], ids=["together", "main-process-late", "other-process-late"])
def test_two_processes_saving_every_step_finish_with_every_checkpoint_whole(digits, tiny_checkpoint, tmp_path, late_rank):
    output_dir = tmp_path / "out"
    ranks = run_trainer_example(digits, tiny_checkpoint, tmp_path, EVERY_STEP, late_rank=late_rank)

    assert checkpoint_steps(output_dir) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert {path.name for path in (output_dir / f"checkpoint-{step}").iterdir()} == CHECKPOINT_FILES, step
    assert not (output_dir / STAGING_DIR).exists()
    assert saved_weights_digest(output_dir / "checkpoint-4") == saved_weights_digest(output_dir) == ranks[1]["weights"]


def test_two_processes_load_the_best_checkpoint_at_the_end(digits, tiny_checkpoint, tmp_path):
    output_dir = tmp_path / "out"
    options = {**EVERY_STEP, "--eval_strategy": "steps", "--eval_steps": "1", "--load_best_model_at_end": "True",
               "--metric_for_best_model": "accuracy", "--save_total_limit": "2"}  # fmt: skip
    ranks = run_trainer_example(digits, tiny_checkpoint, tmp_path, options)

    accuracies = [entry["eval_accuracy"] for entry in ranks[0]["log_history"] if "eval_accuracy" in entry][:4]
    best = output_dir / f"checkpoint-{accuracies.index(max(accuracies)) + 1}"  # the first step with the best accuracy
    assert [rank["best_model_checkpoint"] for rank in ranks] == [str(best)] * NUM_PROCESSES
    assert json.loads((best / "trainer_state.json").read_text())["best_model_checkpoint"] == str(best)
    assert {path.name for path in best.iterdir()} == CHECKPOINT_FILES
    assert len(checkpoint_steps(output_dir)) == 2 and 4 in checkpoint_steps(output_dir)  # the best and the last
    assert ranks[0]["weights"] == ranks[1]["weights"] == saved_weights_digest(output_dir) == saved_weights_digest(best)


def test_a_two_process_resume_from_the_last_checkpoint_equals_the_uninterrupted_run(digits, tiny_checkpoint, tmp_path):
    options = {"--max_steps": "4", "--save_strategy": "steps", "--save_steps": "2", "--mixing_method": "cutmix"}
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    script = EXAMPLES / "run_image_classification.py"
    torchrun(script, *trainer_example_argv(digits, tiny_checkpoint, uninterrupted, options), cwd=ROOT)
    resumed.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-2", resumed / "checkpoint-2")  # a run stopped after checkpoint-2

    result = torchrun(script, *trainer_example_argv(digits, tiny_checkpoint, resumed, options), cwd=ROOT)

    assert f"resuming training at {resumed / 'checkpoint-2'}" in result.stdout + result.stderr
    assert saved_weights_digest(resumed) == saved_weights_digest(uninterrupted)  # bit-identical weights
    assert saved_weights_digest(resumed) != saved_weights_digest(resumed / "checkpoint-2")  # steps 3 and 4 trained


@pytest.mark.parametrize("example", ["run_image_classification", "run_image_classification_no_trainer"])
def test_processes_that_would_each_train_alone_are_refused_before_training(digits, tiny_checkpoint, tmp_path, example):
    """On a machine without GPUs, each process of a launch without the CPU option is a separate single-process
    run: the scripts stop before training and say which option makes it one run of two processes."""
    argv = run_arguments(digits, tiny_checkpoint, tmp_path / "out", {"--max_train_samples": "8"})
    if example == "run_image_classification":
        result = torchrun(EXAMPLES / f"{example}.py", *argv, "--do_train", "--use_cpu", "False", cwd=ROOT, succeed=False)
        option = "--use_cpu"
    else:
        result = accelerate_launch(EXAMPLES / f"{example}.py", *argv, cwd=ROOT, succeed=False)
        option = "--cpu"
    assert "The launcher started 2 processes (WORLD_SIZE=2), but each was set up as a separate" in result.stderr
    assert f"Pass {option} " in result.stderr and not (tmp_path / "out" / "checkpoint-1").exists()


def test_no_trainer_script_with_two_processes(digits, tiny_checkpoint, tmp_path):
    output_dir = tmp_path / "out"
    # One epoch of 32 images in batches of 4 on each of 2 processes: 4 steps (8 if the epoch were counted before
    # the loader is sharded)
    options = {"--num_train_epochs": "1", "--checkpointing_steps": "2"}
    argv = run_arguments(digits, tiny_checkpoint, output_dir, options) + ["--cpu"]
    script = tmp_path / "no_trainer_run.py"
    script.write_text(NO_TRAINER_RUN.format(examples=str(EXAMPLES), record=RECORD_ALIGNMENT_SUMS))

    accelerate_launch(script, str(tmp_path), *argv, cwd=ROOT)

    ranks = [json.loads((tmp_path / f"rank_{rank}.json").read_text()) for rank in range(NUM_PROCESSES)]
    assert ranks[0]["weights"] == ranks[1]["weights"] == saved_weights_digest(output_dir)
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["eval_samples"] == EVAL_SAMPLES and results["train_steps"] == 4
    log_history = json.loads((output_dir / "log_history.json").read_text())["log_history"]
    train_logs = [entry for entry in log_history if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [1, 2, 3, 4]
    assert_logged_alignment_is_the_mean_over_processes(train_logs, ranks, micro_batches=1)
    assert (output_dir / "README.md").is_file() and (output_dir / "preprocessor_config.json").is_file()
    checkpoint = output_dir / "step_2"
    assert {path.name for path in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}


# ----------------------------------------------------------------------------------------------- gradients


def tiny_aligned_model():
    """The same tiny aligned ViT in every process (fixed seed, sharp attention), in training mode."""
    return to_tl_align(tiny_model(ViTForImageClassification, "eager", seed=0)).train()


def local_micro_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """The mixed micro-batches of one process: its own examples, mixed by its own collator stream."""
    mixer = TLAlignMixer(MixingSettings(mixing_method="cutmix", cutmix_alpha=1.0), PATCH_SIZE)
    collator = TLAlignCollator(mixer, num_labels=NUM_LABELS, seed=0, rank=rank)
    generator = torch.Generator().manual_seed(100 + rank)
    batches = []
    for size in MICRO_BATCH_SIZES:
        pixel_values = torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        labels = torch.randint(0, NUM_LABELS, (size,), generator=generator)
        batches.append(
            collator([{"pixel_values": image, "label": int(label)} for image, label in zip(pixel_values, labels)])
        )
    return batches


def concatenated(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch of all `batches`, partners re-indexed: the same samples and mixing as one process would see."""
    parts, offset = defaultdict(list), 0
    for batch in batches:
        for name, value in batch.items():
            parts[name].append(value + offset if name == "mix_index" else value)
        offset += len(batch["labels"])
    return {name: torch.cat(values) for name, values in parts.items()}


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()}


def mean_loss_gradients(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of the aligned loss averaged over `batch`, in one process without Accelerate."""
    model = tiny_aligned_model()
    mixing = {name: batch[name] for name in ("mix_index", "token_weights", "mix_lam")}
    outputs = model(pixel_values=batch["pixel_values"], **mixing)
    loss, _ = mixed_batch_loss(outputs, batch, label_smoothing=0.1)
    loss.backward()
    return gradients(model)


def relative_difference(actual: dict, expected: dict) -> float:
    """||actual - expected|| / ||expected|| over all parameters' gradients as one vector.

    One vector, not per parameter: some gradients are zero in exact arithmetic (a key bias shifts every attention
    logit of a query equally), so per parameter the relative error of their rounding noise means nothing.
    """
    difference = torch.cat([(actual[name] - value).flatten() for name, value in expected.items()])
    return (difference.norm() / torch.cat([value.flatten() for value in expected.values()]).norm()).item()


def test_gradients_of_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    script = tmp_path / "gradient_step.py"
    script.write_text(GRADIENT_STEP)

    torchrun(script, str(tmp_path), cwd=ROOT)

    per_rank = [torch.load(tmp_path / f"grads_{rank}.pt") for rank in range(NUM_PROCESSES)]
    all_batches = [batch for rank in range(NUM_PROCESSES) for batch in local_micro_batches(rank)]
    expected = mean_loss_gradients(concatenated(all_batches))  # one process, batch 2 x (3 + 3)
    for rank_gradients in per_rank:
        assert relative_difference(rank_gradients, expected) < 1e-6
    # The test can tell: one process's own micro-batches give another gradient.
    own = mean_loss_gradients(concatenated(local_micro_batches(0)))
    assert relative_difference(own, expected) > 1e-3
