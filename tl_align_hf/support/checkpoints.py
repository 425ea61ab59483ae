"""What keeps a TL-Align run from being lost or silently wrong across saves and resumes.

- :func:`atomic_checkpoint_save`: a Trainer checkpoint is written into a staging folder and renamed into place when
  complete, once every process has written its part, so `checkpoint-N` folders are always whole (transformers 5.25
  writes checkpoints in place, and its `get_last_checkpoint` takes any `checkpoint-N` folder), and a kill or a full
  disk at any moment of a save leaves the previous checkpoint as it was. :func:`check_one_run_per_launch` refuses
  launches whose processes would each train alone into the same output_dir.
- :class:`TrainingRecord`: what the weights are trained with (mixing, TL-Align, label smoothing, number of processes,
  hyperparameters, base model), saved in every checkpoint's `trainer_state.json`, so that a resume with other
  settings is refused before it trains, a resume with nothing left to do says so, and the model card describes what
  the weights were trained with, also when it is made later without training (:func:`recorded_training`). It keeps
  no reference to the trainer, so transformers' `restore_callback_states_from_checkpoint` can rebuild it.
- :func:`load_saved_weights`: a checkpoint's weights loaded into the model being trained with the key conversion of
  `from_pretrained`, which transformers' Trainer skips when it resumes or loads the best model.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import types
from typing import Any

from transformers import TrainerCallback, TrainerState
from transformers.modelcard import extract_hyperparameters_from_trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from transformers.utils import logging

from ..settings import training_settings

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


def disk_full_error(error: BaseException, folder: str, name: str, previous: str | None) -> OSError | None:
    """The OSError (ENOSPC) to raise instead of `error`, raised while saving `name` into `folder`, when the disk is
    full (torch then says only `basic_ios::clear: iostream error`); `None` when it is another error."""
    try:
        nearly_full = shutil.disk_usage(folder).free < 16 * 2**20
    except OSError:
        nearly_full = False
    full = isinstance(error, OSError) and error.errno == errno.ENOSPC
    if not (full or nearly_full or any(marker in str(error) for marker in _FULL_DISK_MARKERS)):
        return None
    return OSError(
        errno.ENOSPC,
        f"No space left on device while saving {name} to {folder} ({error}). The previous checkpoint "
        f"({previous or 'none'}) is intact: free some space (or keep fewer checkpoints, or choose another "
        "--output_dir) and run the same command again to resume from it.",
    )


def check_one_run_per_launch(num_processes: int, cpu_option: str = "--use_cpu (use_cpu=True)") -> None:
    """Raise a ValueError when a launcher (torchrun, accelerate launch) started several processes (`WORLD_SIZE` > 1)
    but each was set up as a separate single-process run (`num_processes` 1: on a machine without GPUs, unless told
    to use the CPU): each would train the same model alone and write the same output_dir, their checkpoints
    overwriting each other's. `cpu_option` names the option that fixes it."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and num_processes == 1:
        raise ValueError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}), but each was set up as a separate "
            "single-process run (no GPU was found and the CPU was not asked for): every process would train the same "
            f"model alone and write the same output_dir. Pass {cpu_option} to train on the CPU with {launched} "
            "processes, or launch a single process."
        )


@contextlib.contextmanager
def atomic_checkpoint_save(trainer, run_dir: str):
    """Around `Trainer._save_checkpoint`, on every process: while it runs, `trainer._get_output_dir` must return the
    staging folder this yields (`TLAlignTrainer` does, in `tl_align_hf.trainer_private`); when every process has
    written its part, `checkpoint-N` is renamed from there into `run_dir`, the best checkpoint's path is corrected
    on every process, and old checkpoints are rotated as transformers would have.

    Every process writes into the checkpoint (its RNG state; the weights, optimizer and trainer state come from the
    main process), so all of them wait for the others before the first write (a leftover of a killed run is removed
    first) and before the rename. A full disk while saving raises an OSError (ENOSPC) that names the folder and the
    previous, intact checkpoint.
    """
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    staging_root = os.path.join(run_dir, STAGING_DIR)
    staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
    if trainer.args.should_save:
        shutil.rmtree(staged, ignore_errors=True)  # left by a run killed while saving
    trainer.accelerator.wait_for_everyone()  # no process writes into `staged` before the leftover is gone
    try:
        yield staging_root
    except (OSError, RuntimeError) as error:
        full = disk_full_error(error, run_dir, name, get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None)
        if full is None:
            raise
        shutil.rmtree(staged, ignore_errors=True)
        raise full from error
    trainer.accelerator.wait_for_everyone()  # every process has written its part into `staged`
    best_is_this_one = trainer.state.best_model_checkpoint == staged  # transformers points it where it saved
    if best_is_this_one:
        trainer.state.best_model_checkpoint = final
    if trainer.args.should_save:
        if best_is_this_one:
            trainer.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staged, final)
        with contextlib.suppress(OSError):
            os.rmdir(staging_root)  # when no other save is under way
        rotate_checkpoints(run_dir, trainer.args.save_total_limit, trainer.state.best_model_checkpoint, use_mtime=True)
    trainer.accelerator.wait_for_everyone()  # `checkpoint-N` is in place before any process goes on


def load_saved_weights(folder: str, model) -> None:
    """Copy the weights saved in `folder` (by `save_pretrained`, e.g. a Trainer checkpoint or its `ema/`) into
    `model`, every key matching, the way `from_pretrained` reads them: with its conversion of the saved keys
    (transformers 5.25 saves e.g. ViT's `vit.layers.N.attention.q_proj` as `vit.encoder.layer.N.attention.attention.
    query`). `Trainer._load_from_checkpoint` and `_load_best_model` load the file as it is, with `strict=False`, so
    such a checkpoint would load nothing, silently (transformers issue 43701). An aligned model (with
    `tl_align_parent`) is read as its parent class; `model` must not be wrapped (`accelerator.unwrap_model`)."""
    parent_class = getattr(model, "tl_align_parent", type(model))
    loaded = parent_class.from_pretrained(folder, dtype=next(model.parameters()).dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)


def check_resumed_settings(
    saved: dict[str, Any] | None, current: dict[str, Any], step: int, max_steps: int, *, saved_processes=None,
    num_processes: int = 1, checkpoint: str = "the checkpoint",
) -> dict[str, Any]:
    """Compare the settings a checkpoint was trained with (`saved`, `None` for checkpoints without a record) with
    the `current` ones, at a resume at `step` of `max_steps`; return the settings the weights are trained with.

    A finished run (`step >= max_steps`) has nothing left to train: logged at warning level, and the saved settings
    are returned (the model card must describe them). An unfinished run with other settings raises a ValueError
    before any step: one model would be trained with two recipes. Another number of processes is a warning.
    """
    if not saved:
        return current
    changed = {key: (value, current.get(key)) for key, value in saved.items() if current.get(key) != value}
    if step >= max_steps:
        trained_with = ", ".join(f"{key}={old!r}" for key, (old, _) in changed.items())
        logger.warning(
            f"Resumed from {checkpoint}, which had finished training (step {step} of {max_steps}): nothing left to "
            "train. The model saved now, and its card, are that run's"
            + (f" (trained with {trained_with}, not the settings given now)" if changed else "")
            + ". To train again, use a new --output_dir (or remove its checkpoints)."
        )
        return saved
    if changed:
        listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in changed.items())
        raise ValueError(
            f"{checkpoint} was trained with other settings ({listed}). Resuming would train one model with two "
            "recipes. Run with the checkpoint's settings to resume, or start fresh with a new --output_dir (or "
            "start from its weights with --model_name_or_path pointing at the checkpoint)."
        )
    if saved_processes not in (None, num_processes):
        logger.warning(
            f"Resuming {checkpoint} with {num_processes} processes; it was trained with {saved_processes}. Each "
            "process now sees other batches (and mixes them with its own draws), so the run continues correctly "
            "but does not reproduce the uninterrupted one exactly."
        )
    return current


def training_hyperparameters(args) -> dict[str, Any]:
    """The hyperparameters of training with `args` as transformers' model card lists them (learning rate, batch
    sizes, seed, optimizer, scheduler, epochs or steps: `transformers.modelcard.extract_hyperparameters_from_trainer`,
    which reads only the trainer's `args`)."""
    return extract_hyperparameters_from_trainer(types.SimpleNamespace(args=args))


class TrainingRecord(TrainerCallback, ExportableState):
    """What the weights are trained with, kept in each checkpoint's `trainer_state.json` (and in the one
    `Trainer.save_state` writes next to the final model), so that a resume with other settings is refused (see
    :func:`check_resumed_settings`, which :meth:`on_train_begin` applies when a run resumes from a checkpoint) and a
    model card made later, without training, describes the training (:func:`recorded_training`).

    All `None` until training begins. `settings` holds the mixing settings, `tl_align` and `label_smoothing`;
    `num_processes` the number of processes; `hyperparameters` those of transformers' model card
    (:func:`training_hyperparameters`); `base_model` the `name_or_path` of the model training started from. It keeps
    no reference to the trainer, so transformers' `restore_callback_states_from_checkpoint` can rebuild it.
    """

    def __init__(
        self,
        settings: dict[str, Any] | None = None,
        num_processes: int | None = None,
        hyperparameters: dict[str, Any] | None = None,
        base_model: str | None = None,
    ):
        self.settings, self.num_processes = settings, num_processes
        self.hyperparameters, self.base_model = hyperparameters, base_model

    def state(self) -> dict:
        names = ("settings", "num_processes", "hyperparameters", "base_model")
        return {"args": {name: getattr(self, name) for name in names}, "attributes": {}}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        current = training_settings(args, args.tl_align, args.label_smoothing)  # args: a TLAlignConfig
        saved = (state.stateful_callbacks or {}).get(type(self).__name__, {}).get("args", {})
        self.num_processes = args.world_size
        self.hyperparameters = training_hyperparameters(args)
        self.base_model = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        if state.global_step == 0:  # a fresh run
            self.settings = current
        else:
            self.settings = check_resumed_settings(
                saved.get("settings"), current, state.global_step, state.max_steps, saved_processes=saved.get("num_processes"),
                num_processes=args.world_size, checkpoint=f"the checkpoint of step {state.global_step}",
            )  # fmt: skip
            if saved.get("settings") and state.global_step >= state.max_steps:  # finished: nothing is trained now
                self.hyperparameters, self.base_model = saved.get("hyperparameters"), saved.get("base_model")
        # Trainer took its snapshot of the callbacks' states before training began; checkpoints refresh it, and
        # `Trainer.save_state` (the trainer_state.json next to the final model) writes it as it is.
        state.stateful_callbacks[type(self).__name__] = self.state()


def recorded_training(folder: str | os.PathLike | None) -> dict[str, Any] | None:
    """The :class:`TrainingRecord` saved with the weights in `folder` (a checkpoint, or a final model saved with
    `Trainer.save_state`), as a dict with `settings`, `num_processes`, `hyperparameters` and `base_model`; `None`
    when `folder` holds no such record (not a local folder, no `trainer_state.json`, or a run without TL-Align)."""
    path = os.path.join(folder, TRAINER_STATE_NAME) if folder else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        callbacks = TrainerState.load_from_json(path).stateful_callbacks or {}
    except (OSError, ValueError, TypeError) as error:
        logger.warning(f"Could not read the training record of {folder} ({error}); the model card leaves it out.")
        return None
    record = callbacks.get(TrainingRecord.__name__)
    recorded = record.get("args", {}) if isinstance(record, dict) else {}
    return recorded if recorded.get("settings") else None


class LoopRecord:
    """The same record for an Accelerate loop: `accelerator.register_for_checkpointing(record)` saves and loads it
    with every checkpoint; after `load_state`, :meth:`check_resumed` applies :func:`check_resumed_settings`."""

    def __init__(self, settings: dict[str, Any], num_processes: int):
        self.settings, self.num_processes, self.saved = settings, num_processes, None

    def state_dict(self) -> dict:
        return {"settings": self.settings, "num_processes": self.num_processes}

    def load_state_dict(self, state: dict) -> None:
        self.saved = state

    def check_resumed(self, step: int, max_steps: int, checkpoint: str) -> dict[str, Any]:
        saved = self.saved or {}
        self.settings = check_resumed_settings(
            saved.get("settings"), self.settings, step, max_steps, saved_processes=saved.get("num_processes"),
            num_processes=self.num_processes, checkpoint=checkpoint,
        )  # fmt: skip
        return self.settings
