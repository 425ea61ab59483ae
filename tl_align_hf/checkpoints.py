"""What keeps a TL-Align run from being lost or silently wrong across saves and resumes.

- :func:`atomic_checkpoint_save`: a Trainer checkpoint is written into a staging folder and renamed into place when
  complete, so `checkpoint-N` folders are always whole (transformers' `get_last_checkpoint` only sees those), and a
  kill or a full disk at any moment of a save leaves the previous checkpoint as it was.
- :class:`TrainingRecord`: the settings the weights are trained with (mixing, TL-Align, label smoothing, number of
  processes), saved in every checkpoint's `trainer_state.json`, so that a resume with other settings is refused before
  it trains, a resume with nothing left to do says so, and the model card describes what the weights were trained with.
  It keeps no reference to the trainer, so transformers' `restore_callback_states_from_checkpoint` can rebuild it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from transformers.utils import logging

logger = logging.get_logger(__name__)

STAGING_DIR = ".tl_align_staging"  # inside output_dir: checkpoints being written
_FULL_DISK_MARKERS = ("No space left on device", "iostream error", "file write failed", "PytorchStreamWriter failed")


def check_writable(folder: str) -> None:
    """Raise a PermissionError naming `folder` unless a file can be created in it (creating the folder if needed)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tl_align_write_check"):
            pass
    except OSError as error:
        raise PermissionError(
            f"output_dir {folder} is not writable ({error.strerror or error}); checkpoints and the final model could "
            "not be saved. Choose a writable --output_dir (or fix the folder's permissions) before training."
        ) from error


def _is_disk_full(error: BaseException, folder: str) -> bool:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    try:
        nearly_full = shutil.disk_usage(folder).free < 16 * 2**20
    except OSError:
        nearly_full = False
    return nearly_full or any(marker in str(error) for marker in _FULL_DISK_MARKERS)


@contextlib.contextmanager
def atomic_checkpoint_save(trainer, run_dir: str):
    """Around `Trainer._save_checkpoint`: while it runs, `trainer._get_output_dir` must return the staging folder
    this yields (`TLAlignTrainer` does); afterwards `checkpoint-N` is renamed from there into `run_dir`, the best
    checkpoint's path is corrected, and old checkpoints are rotated as transformers would have.

    A full disk while saving raises an OSError (ENOSPC) that names the folder and the previous, intact checkpoint.
    """
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    staging_root = os.path.join(run_dir, STAGING_DIR)
    staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
    if trainer.args.should_save:
        shutil.rmtree(staged, ignore_errors=True)  # left by a run killed while saving
    try:
        yield staging_root
    except (OSError, RuntimeError) as error:
        if not _is_disk_full(error, run_dir):
            raise
        previous = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
        shutil.rmtree(staged, ignore_errors=True)
        raise OSError(
            errno.ENOSPC,
            f"No space left on device while saving {name} to {run_dir} ({error}). The previous checkpoint "
            f"({previous or 'none'}) is intact: free some space (or set --save_total_limit, or choose another "
            "--output_dir) and run the same command again to resume from it.",
        ) from error
    trainer.accelerator.wait_for_everyone()  # every process has written its part (RNG states) into `staged`
    if trainer.args.should_save:
        if trainer.state.best_model_checkpoint == os.path.join(staging_root, name):
            trainer.state.best_model_checkpoint = final
            trainer.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staged, final)
        rotate_checkpoints(run_dir, trainer.args.save_total_limit, trainer.state.best_model_checkpoint, use_mtime=True)
    trainer.accelerator.wait_for_everyone()


def training_settings(args) -> dict[str, Any]:
    """What a model trained with `args` (a `TLAlignConfig`) is trained with: the mixing settings, TL-Align, smoothing."""
    return {**args.mixing_settings_dict(), "tl_align": args.tl_align, "label_smoothing": args.label_smoothing}


class TrainingRecord(TrainerCallback, ExportableState):
    """The settings the weights are trained with, kept in each checkpoint's `trainer_state.json`.

    `settings` holds the mixing settings, `tl_align` and `label_smoothing`, `num_processes` the number of processes
    (which changes the data each process sees and so the run). When a run resumes from a checkpoint (training starts
    at a step above 0), :meth:`on_train_begin` compares the current ones with the checkpoint's: other settings on an
    unfinished run raise a ValueError before any step (one model would mix two recipes); a finished run says at
    warning level that it has nothing left to train, and `settings` stays the checkpoint's, which the model card
    describes; another number of processes warns that the run will not reproduce the uninterrupted one exactly.
    """

    def __init__(self, settings: dict[str, Any] | None = None, num_processes: int | None = None):
        self.settings, self.num_processes = settings, num_processes

    def state(self) -> dict:
        return {"args": {"settings": self.settings, "num_processes": self.num_processes}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        current, saved = training_settings(args), (state.stateful_callbacks or {}).get(type(self).__name__, {})
        saved_settings, saved_processes = saved.get("args", {}).get("settings"), saved.get("args", {}).get("num_processes")
        self.settings, self.num_processes = current, args.world_size
        if state.global_step == 0 or not saved_settings:  # a fresh run (or a checkpoint from before this record)
            return
        checkpoint = f"the checkpoint of step {state.global_step}"
        changed = {key: (value, current.get(key)) for key, value in saved_settings.items() if current.get(key) != value}
        if state.global_step >= state.max_steps:
            trained_with = ", ".join(f"{key}={old!r}" for key, (old, _) in changed.items())
            logger.warning(
                f"Resumed from {checkpoint}, which had finished training (step {state.global_step} of "
                f"{state.max_steps}): nothing left to train. The model saved now, and its card, are that run's"
                + (f" (trained with {trained_with}, not the settings given now)" if changed else "")
                + ". To train again, use a new --output_dir (or remove its checkpoint-* folders)."
            )
            self.settings = saved_settings  # what the weights were trained with: the card describes that
            return
        if changed:
            listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in changed.items())
            raise ValueError(
                f"{checkpoint} was trained with other settings ({listed}). Resuming would train one model with two "
                "recipes. Run with the checkpoint's settings to resume, or start fresh with a new --output_dir (or "
                "start from its weights with --model_name_or_path pointing at the checkpoint)."
            )
        if saved_processes not in (None, args.world_size):
            logger.warning(
                f"Resuming {checkpoint} with {args.world_size} processes; it was trained with {saved_processes}. Each "
                "process now sees other batches (and mixes them with its own draws), so the run continues correctly "
                "but does not reproduce the uninterrupted one exactly."
            )
