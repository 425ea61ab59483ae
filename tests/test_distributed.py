"""Both example scripts with two processes (gloo on CPU), and the gradient of two processes against one.

The runs start real launchers in subprocesses: `torchrun` for the Trainer example, `accelerate launch` for the
no-Trainer example, each with a free port, on a tiny ViT and a 16 px digits imagefolder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import torch
from transformers import ViTForImageClassification

from tl_align_hf import MixingSettings, TLAlignCollator, TLAlignMixer, mixed_batch_loss, to_tl_align
from tl_align_hf.data import load_image_dataset

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
    import json, os, sys
    import numpy as np
    sys.path.insert(0, {examples!r})
    import run_image_classification as script
    import tl_align_hf.trainer
    from tests.tiny_models import weights_digest
    from tl_align_hf import TLAlignTrainer
    from tl_align_hf.metrics import compute_accuracy_metrics
    {record}
    tl_align_hf.trainer.mixed_batch_loss = _recording(tl_align_hf.trainer.mixed_batch_loss)

    class RecordingTrainer(TLAlignTrainer):
        instance, evaluated_labels = None, []

        def __init__(self, *args, **kwargs):
            super().__init__(*args, compute_metrics=self.record, **kwargs)
            RecordingTrainer.instance = self

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


def launch(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a launcher; fail the test with the end of its output when it fails."""
    environment = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    result = subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    assert result.returncode == 0, (
        f"{' '.join(command[:6])} ... failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    )
    return result


def torchrun(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    port = str(free_port())
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={NUM_PROCESSES}"]
    return launch(command + ["--master_port", port, str(script), *args], cwd)


def accelerate_launch(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    port = str(free_port())
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"]
    command += ["--num_processes", str(NUM_PROCESSES), "--mixed_precision", "no", "--dynamo_backend", "no"]
    return launch(command + ["--main_process_port", port, str(script), *args], cwd)


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


def test_trainer_script_with_two_processes(digits, tiny_checkpoint, tmp_path):
    output_dir = tmp_path / "out"
    options = {"--max_steps": "4", "--save_strategy": "no", "--report_to": "none", "--dataloader_num_workers": "0"}
    argv = run_arguments(digits, tiny_checkpoint, output_dir, options) + ["--do_train", "--do_eval", "--use_cpu"]
    script = tmp_path / "trainer_run.py"
    script.write_text(TRAINER_RUN.format(examples=str(EXAMPLES), record=RECORD_ALIGNMENT_SUMS))

    torchrun(script, str(tmp_path), *argv, cwd=ROOT)

    ranks = [json.loads((tmp_path / f"rank_{rank}.json").read_text()) for rank in range(NUM_PROCESSES)]
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
