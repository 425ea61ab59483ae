"""FSDP2 with two CPU processes (gloo): both example scripts train, end with the weights of a DDP run of the same
steps, and resume from a checkpoint to the weights of the uninterrupted run.

Accelerate 1.15 builds its FSDP state only on GPU-like devices: on a CPU process group it keeps
`DistributedType.MULTI_CPU` and wraps the model in DDP, silently, whatever the config says (FSDP1 and FSDP2 alike;
the Trainer's `--fsdp` too). The `*_falls_back_to_ddp_on_cpu` tests pin that. The FSDP runs start the example
scripts through `RecordingAccelerator` below, which switches the CPU state to the one Accelerate builds on GPUs
(distributed type FSDP, the plugin from the launcher's or the Trainer's settings); from there on everything is
Accelerate's own FSDP2 code: `fully_shard` per ViTLayer, sharded checkpoints, the full state dict gathered for
saving. The references are the same commands without FSDP (DDP, as tests/test_distributed.py launches them).
docs/distributed.md ("FSDP and DeepSpeed on CPU") has the commands and numbers.

The no-Trainer runs use examples/accelerate_configs/fsdp_cpu.yaml (SHARDED_STATE_DICT checkpoints); the Trainer
runs use transformers' own `--fsdp --fsdp_config` under torchrun (FULL_STATE_DICT, so that `save_model` writes the
final weights).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import ViTForImageClassification

from .test_distributed import NUM_PROCESSES, ROOT, accelerate_launch, free_port, launch, torchrun
from .test_no_trainer import EXAMPLES, run_arguments


def fsdp2_unavailable() -> str | None:
    """Why FSDP2 cannot run with this torch / accelerate, or None."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed with the gloo backend is not available"
    if importlib.util.find_spec("torch.distributed.fsdp") is None:
        return "torch.distributed.fsdp is not available"
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        return f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard)"
    from accelerate.utils import FullyShardedDataParallelPlugin

    if "fsdp_version" not in FullyShardedDataParallelPlugin.__dataclass_fields__:
        return "this accelerate has no FSDP2 (FullyShardedDataParallelPlugin.fsdp_version)"
    return None


pytestmark = pytest.mark.skipif(fsdp2_unavailable() is not None, reason=str(fsdp2_unavailable()))

FSDP_CONFIG = EXAMPLES / "accelerate_configs" / "fsdp_cpu.yaml"
STEPS = 4
# The Trainer's FSDP settings (`--fsdp --fsdp_config FILE`).
TRAINER_FSDP_CONFIG = {
    "version": 2,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "transformer_layer_cls_to_wrap": ["ViTLayer"],
    "reshard_after_forward": True,
    "state_dict_type": "FULL_STATE_DICT",
    "cpu_ram_efficient_loading": False,
}

# Both runners: `python runner.py OUTPUT MODE ARGV...`, MODE "fsdp" (switch the CPU state to FSDP) or "observe".
# Each process dumps what Accelerate prepared into OUTPUT/rank_<rank>.json.
RECORDING_ACCELERATOR = textwrap.dedent(
    """
    import json, os, sys
    import accelerate
    import torch
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    sys.path.insert(0, {examples!r})
    output, mode, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    prepared = {{}}

    class RecordingAccelerator(accelerate.Accelerator):
        def __init__(self, *args, fsdp_plugin=None, **kwargs):
            super().__init__(*args, fsdp_plugin=fsdp_plugin, **kwargs)
            state = AcceleratorState()
            if mode == "fsdp" and state.distributed_type == DistributedType.MULTI_CPU:
                # What Accelerate sets up on GPUs; the plugin reads the FSDP_* variables `accelerate launch` sets.
                state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
                state.fsdp_plugin = fsdp_plugin or FullyShardedDataParallelPlugin()

        def prepare(self, *args, **kwargs):
            result = super().prepare(*args, **kwargs)
            for obj in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(obj, torch.nn.Module):
                    prepared.update(
                        distributed_type=str(self.distributed_type),
                        model_class=type(obj).__name__,
                        fsdp_units=[name for name, module in obj.named_modules() if isinstance(module, FSDPModule)],
                        sharded=all(isinstance(p, DTensor) for p in obj.parameters()),
                        fsdp_plugin=getattr(self.state, "fsdp_plugin", None) is not None,
                    )
                    if SAVE_GATHERED and prepared["fsdp_units"]:
                        save_gathered_state_dict(self, obj)
            return result

    def save_gathered_state_dict(accelerator, model):
        # The no-Trainer script saves `unwrap_model(model).save_pretrained(...)` without a state dict, which fails on
        # FSDP's DTensor shards; this passes `state_dict=accelerator.get_state_dict(model)` (docs/distributed.md).
        unwrapped = accelerator.unwrap_model(model)

        def save_pretrained(*args, **kwargs):
            del unwrapped.save_pretrained
            if "state_dict" not in kwargs:
                kwargs["state_dict"] = accelerator.get_state_dict(model)  # on every process: a collective
            return unwrapped.save_pretrained(*args, **kwargs)

        unwrapped.save_pretrained = save_pretrained

    def dump(rank, **extra):
        with open(os.path.join(output, f"rank_{{rank}}.json"), "w") as file:
            json.dump({{**prepared, **extra}}, file)
    """
)

NO_TRAINER_RUN = RECORDING_ACCELERATOR + textwrap.dedent(
    """
    SAVE_GATHERED = True
    import run_image_classification_no_trainer as script

    script.Accelerator = RecordingAccelerator
    results = script.main(argv)
    dump(PartialState().process_index, results=results)
    """
)

TRAINER_RUN = RECORDING_ACCELERATOR + textwrap.dedent(
    """
    SAVE_GATHERED = False
    import transformers.trainer
    import run_image_classification as script

    transformers.trainer.Accelerator = RecordingAccelerator
    trainers = []

    class RecordingTrainer(script.TLAlignTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    script.TLAlignTrainer = RecordingTrainer
    metrics = script.main(argv)
    trainer = trainers[0]
    dump(trainer.args.process_index, is_fsdp_enabled=trainer.is_fsdp_enabled, metrics=metrics,
         log_history=trainer.state.log_history)
    """
)


# What Accelerate and the Trainer set up for FSDP settings on a CPU process group (no training).
ACCELERATE_PROBE = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from accelerate import Accelerator
    from transformers import ViTForImageClassification
    from tests.tiny_models import tiny_model

    accelerator = Accelerator(cpu=True)  # as the no-Trainer script with --cpu
    model = tiny_model(ViTForImageClassification).train()
    model, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    with open(os.path.join(sys.argv[1], f"probe_{accelerator.process_index}.json"), "w") as file:
        json.dump({"requested": os.environ.get("ACCELERATE_USE_FSDP"), "fsdp_version": os.environ.get("FSDP_VERSION"),
                   "distributed_type": str(accelerator.distributed_type), "model_class": type(model).__name__,
                   "fsdp_plugin": getattr(accelerator.state, "fsdp_plugin", None) is not None}, file)
    """
)
TRAINER_PROBE = textwrap.dedent(
    """
    import json, os, sys
    from transformers import ViTForImageClassification
    from tests.tiny_models import tiny_model
    from tl_align_hf import TLAlignConfig, TLAlignTrainer, to_tl_align

    args = TLAlignConfig(output_dir=os.path.join(sys.argv[1], "out"), use_cpu=True, report_to="none",
                         fsdp=True, fsdp_config=json.loads(sys.argv[2]))
    trainer = TLAlignTrainer(model=to_tl_align(tiny_model(ViTForImageClassification)), args=args)
    with open(os.path.join(sys.argv[1], f"probe_{args.process_index}.json"), "w") as file:
        json.dump({"requested": args.fsdp_plugin_args, "distributed_type": str(trainer.accelerator.distributed_type),
                   "is_fsdp_enabled": trainer.is_fsdp_enabled, "world_size": args.world_size}, file)
    """
)


def write_runner(tmp_path: Path, template: str) -> Path:
    script = tmp_path / "runner.py"
    script.write_text(template.format(examples=str(EXAMPLES)))
    return script


def ranks(folder: Path, prefix: str = "rank") -> list[dict]:
    return [json.loads((folder / f"{prefix}_{rank}.json").read_text()) for rank in range(NUM_PROCESSES)]


def accelerate_launch_fsdp(script: Path, *args: str, cwd: Path):
    """`accelerate launch --config_file fsdp_cpu.yaml` with two processes and a free port."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
    command += ["--num_processes", str(NUM_PROCESSES), "--main_process_port", str(free_port())]
    return launch(command + [str(script), *args], cwd)


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    return ViTForImageClassification.from_pretrained(folder).state_dict()


def differences(actual: dict, expected: dict) -> dict[str, float]:
    """Max abs difference per tensor."""
    assert actual.keys() == expected.keys()
    return {name: (actual[name] - expected[name]).abs().max().item() for name in expected}


def assert_fsdp2_sharded(rank: dict) -> None:
    """Accelerate's FSDP2 prepared the model: every ViTLayer its own unit, every parameter a DTensor shard."""
    assert rank["distributed_type"] == "DistributedType.FSDP", rank
    assert {"vit.layers.0", "vit.layers.1"} <= set(rank["fsdp_units"]), rank["fsdp_units"]
    assert rank["sharded"], "parameters are not DTensor shards"


def step_checkpoint(output_dir: Path, step: int) -> Path:
    """The complete checkpoint folder of `step` written by the no-Trainer script (not a staging one)."""
    (folder,) = [path for path in output_dir.iterdir() if path.is_dir() and path.name.endswith(f"step_{step}")]
    return folder


def copy_for_resume(checkpoint: Path, tmp_path: Path) -> Path:
    """A fresh output folder holding only `checkpoint`."""
    output_dir = tmp_path / "resumed"
    output_dir.mkdir()
    shutil.copytree(checkpoint, output_dir / checkpoint.name)
    return output_dir


# ----------------------------------------------------------------------------------------------- no-Trainer script


def no_trainer_argv(digits, tiny_checkpoint, output_dir, **options) -> list[str]:
    values = {"--max_train_steps": str(STEPS), **options}
    return run_arguments(digits, tiny_checkpoint, output_dir, values) + ["--cpu"]


@pytest.fixture(scope="module")
def no_trainer_ddp(digits, tiny_checkpoint, tmp_path_factory) -> Path:
    """The same command without FSDP: DDP (`accelerate launch --multi_gpu`, the script's --cpu)."""
    folder = tmp_path_factory.mktemp("no_trainer_ddp")
    script = write_runner(folder, NO_TRAINER_RUN)
    argv = no_trainer_argv(digits, tiny_checkpoint, folder / "out")
    accelerate_launch(script, str(folder), "observe", *argv, cwd=ROOT)
    for rank in ranks(folder):
        assert rank["model_class"] == "DistributedDataParallel", rank
    return folder


@pytest.fixture(scope="module")
def no_trainer_fsdp(digits, tiny_checkpoint, tmp_path_factory) -> Path:
    """The same run with the CPU state switched to FSDP, checkpointing every 2 steps."""
    folder = tmp_path_factory.mktemp("no_trainer_fsdp")
    script = write_runner(folder, NO_TRAINER_RUN)
    argv = no_trainer_argv(digits, tiny_checkpoint, folder / "out", **{"--checkpointing_steps": "2"})
    accelerate_launch_fsdp(script, str(folder), "fsdp", *argv, cwd=ROOT)
    return folder


def test_fsdp_config_falls_back_to_ddp_on_cpu(tmp_path):
    """`accelerate launch --config_file fsdp_cpu.yaml`: FSDP2 asked for, DDP set up, no error, no warning."""
    script = tmp_path / "probe.py"
    script.write_text(ACCELERATE_PROBE)

    accelerate_launch_fsdp(script, str(tmp_path), cwd=ROOT)

    for rank in ranks(tmp_path, "probe"):
        assert rank["requested"] == "true" and rank["fsdp_version"] == "2"  # the launcher passed the FSDP2 config on
        set_up = (rank["distributed_type"], rank["model_class"], rank["fsdp_plugin"])
        assert set_up == ("DistributedType.MULTI_CPU", "DistributedDataParallel", False), (
            f"Accelerate now sets FSDP up on CPU ({set_up}): update docs/distributed.md and drop the switch here"
        )


def test_no_trainer_fsdp2_trains_like_ddp(no_trainer_fsdp, no_trainer_ddp):
    fsdp_ranks = ranks(no_trainer_fsdp)
    for rank in fsdp_ranks:
        assert_fsdp2_sharded(rank)
    fsdp_out, ddp_out = no_trainer_fsdp / "out", no_trainer_ddp / "out"
    diffs = differences(saved_weights(fsdp_out), saved_weights(ddp_out))
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda item: -item[1])[:5]
    fsdp_results = json.loads((fsdp_out / "all_results.json").read_text())
    ddp_results = json.loads((ddp_out / "all_results.json").read_text())
    assert fsdp_results["train_steps"] == STEPS and fsdp_results["eval_samples"] == ddp_results["eval_samples"]
    assert abs(fsdp_results["eval_loss"] - ddp_results["eval_loss"]) < 1e-5
    fsdp_logs = json.loads((fsdp_out / "log_history.json").read_text())["log_history"]
    ddp_logs = json.loads((ddp_out / "log_history.json").read_text())["log_history"]
    fsdp_losses = [entry["loss"] for entry in fsdp_logs if "loss" in entry]
    assert len(fsdp_losses) == STEPS
    assert torch.allclose(torch.tensor(fsdp_losses), torch.tensor([entry["loss"] for entry in ddp_logs if "loss" in entry]),
                          atol=1e-6, rtol=0)  # fmt: skip
    # Accelerate's sharded FSDP checkpoint (torch.distributed.checkpoint folders), not DDP's single files.
    checkpoint = step_checkpoint(fsdp_out, 2)
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()


def test_no_trainer_fsdp2_resumes_to_the_uninterrupted_weights(no_trainer_fsdp, digits, tiny_checkpoint, tmp_path):
    output_dir = copy_for_resume(step_checkpoint(no_trainer_fsdp / "out", 2), tmp_path)
    script = write_runner(tmp_path, NO_TRAINER_RUN)
    options = {"--checkpointing_steps": "2", "--resume_from_checkpoint": str(step_checkpoint(output_dir, 2))}
    argv = no_trainer_argv(digits, tiny_checkpoint, output_dir, **options)

    accelerate_launch_fsdp(script, str(tmp_path), "fsdp", *argv, cwd=ROOT)

    for rank in ranks(tmp_path):
        assert_fsdp2_sharded(rank)
    logs = json.loads((output_dir / "log_history.json").read_text())["log_history"]
    assert [entry["step"] for entry in logs if "loss" in entry] == [3, 4]  # it continued from step 2
    diffs = differences(saved_weights(output_dir), saved_weights(no_trainer_fsdp / "out"))
    assert max(diffs.values()) < 1e-6, sorted(diffs.items(), key=lambda item: -item[1])[:5]


# ----------------------------------------------------------------------------------------------- Trainer script


def trainer_argv(digits, tiny_checkpoint, output_dir, fsdp_config: Path | None, **options) -> list[str]:
    """The Trainer example's arguments; with `--fsdp --fsdp_config FILE` when `fsdp_config` is given."""
    values = {"--max_steps": str(STEPS), "--report_to": "none", "--dataloader_num_workers": "0", **options}
    argv = run_arguments(digits, tiny_checkpoint, output_dir, values) + ["--do_train", "--do_eval", "--use_cpu"]
    return argv + (["--fsdp", "--fsdp_config", str(fsdp_config)] if fsdp_config else [])


def trainer_fsdp_config(folder: Path) -> Path:
    path = folder / "fsdp_config.json"
    path.write_text(json.dumps(TRAINER_FSDP_CONFIG))
    return path


@pytest.fixture(scope="module")
def trainer_ddp(digits, tiny_checkpoint, tmp_path_factory) -> Path:
    """The same command without FSDP: DDP (`torchrun`, --use_cpu)."""
    folder = tmp_path_factory.mktemp("trainer_ddp")
    argv = trainer_argv(digits, tiny_checkpoint, folder / "out", None, **{"--save_strategy": "no"})
    torchrun(write_runner(folder, TRAINER_RUN), str(folder), "observe", *argv, cwd=ROOT)
    for rank in ranks(folder):
        assert rank["model_class"] == "DistributedDataParallel", rank
    return folder


@pytest.fixture(scope="module")
def trainer_fsdp(digits, tiny_checkpoint, tmp_path_factory) -> Path:
    """The same run with the CPU state switched to FSDP, saving a checkpoint every 2 steps."""
    folder = tmp_path_factory.mktemp("trainer_fsdp")
    options = {"--save_strategy": "steps", "--save_steps": "2"}
    argv = trainer_argv(digits, tiny_checkpoint, folder / "out", trainer_fsdp_config(folder), **options)
    torchrun(write_runner(folder, TRAINER_RUN), str(folder), "fsdp", *argv, cwd=ROOT)
    return folder


def test_trainer_fsdp_arguments_fall_back_to_ddp_on_cpu(tmp_path):
    """`--fsdp --fsdp_config` with --use_cpu under torchrun: FSDP2 asked for, not enabled, no error, no warning."""
    script = tmp_path / "probe.py"
    script.write_text(TRAINER_PROBE)

    torchrun(script, str(tmp_path), json.dumps(TRAINER_FSDP_CONFIG), cwd=ROOT)

    for rank in ranks(tmp_path, "probe"):
        assert rank["requested"]["fsdp_version"] == 2 and rank["world_size"] == NUM_PROCESSES
        assert rank["distributed_type"] == "DistributedType.MULTI_CPU" and not rank["is_fsdp_enabled"], (
            "Accelerate now sets FSDP up on CPU: update docs/distributed.md and drop the switch here"
        )


def test_trainer_fsdp2_trains_like_ddp(trainer_fsdp, trainer_ddp):
    fsdp_ranks = ranks(trainer_fsdp)
    for rank in fsdp_ranks:
        assert_fsdp2_sharded(rank)
        assert rank["is_fsdp_enabled"]
    ddp_rank = ranks(trainer_ddp)[0]
    fsdp_train = [entry for entry in fsdp_ranks[0]["log_history"] if "loss" in entry]
    ddp_train = [entry for entry in ddp_rank["log_history"] if "loss" in entry]
    assert len(fsdp_train) == len(ddp_train) == STEPS
    for fsdp_entry, ddp_entry in zip(fsdp_train, ddp_train):
        assert abs(fsdp_entry["loss"] - ddp_entry["loss"]) < 1e-6
        # Gradient clipping (max_grad_norm 1.0) sees the same global norm, computed from the shards under FSDP.
        assert abs(fsdp_entry["grad_norm"] - ddp_entry["grad_norm"]) < 1e-5 * ddp_entry["grad_norm"]
    diffs = differences(saved_weights(trainer_fsdp / "out"), saved_weights(trainer_ddp / "out"))
    # The key biases have an exactly zero gradient (a bias added to every key shifts each query's logits by one
    # constant); AdamW turns their rounding noise into steps of up to the learning rate, so the last-bit differences
    # of the clipping norm show there (about 2e-5 here) and nowhere else.
    key_biases = {name for name in diffs if name.endswith("k_proj.bias")}
    assert max(diffs[name] for name in key_biases) < 1e-4
    others = {name: value for name, value in diffs.items() if name not in key_biases}
    assert max(others.values()) < 1e-5, sorted(others.items(), key=lambda item: -item[1])[:5]
    assert fsdp_ranks[0]["metrics"]["eval_accuracy"] == ddp_rank["metrics"]["eval_accuracy"]
    assert abs(fsdp_ranks[0]["metrics"]["eval_loss"] - ddp_rank["metrics"]["eval_loss"]) < 1e-5
    checkpoint = trainer_fsdp / "out" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file()  # saved by Accelerate's FSDP checkpointing


def test_trainer_fsdp2_resumes_to_the_uninterrupted_weights(trainer_fsdp, digits, tiny_checkpoint, tmp_path):
    output_dir = copy_for_resume(trainer_fsdp / "out" / "checkpoint-2", tmp_path)
    options = {"--save_strategy": "no", "--resume_from_checkpoint": str(output_dir / "checkpoint-2")}
    argv = trainer_argv(digits, tiny_checkpoint, output_dir, trainer_fsdp_config(tmp_path), **options)

    torchrun(write_runner(tmp_path, TRAINER_RUN), str(tmp_path), "fsdp", *argv, cwd=ROOT)

    for rank in ranks(tmp_path):
        assert_fsdp2_sharded(rank)
    resumed, uninterrupted = saved_weights(output_dir), saved_weights(trainer_fsdp / "out")
    diffs = differences(resumed, uninterrupted)
    assert max(diffs.values()) < 1e-6, sorted(diffs.items(), key=lambda item: -item[1])[:5]
    at_step_2 = saved_weights(output_dir / "checkpoint-2")
    assert max(differences(resumed, at_step_2).values()) > 1e-4  # it trained on from step 2
