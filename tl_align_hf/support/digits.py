"""The built-in default data set: scikit-learn's bundled digits, written once as a local imagefolder.

`sklearn.datasets.load_digits` ships 1,797 real 8x8 greyscale scans of handwritten digits (10 classes, about
180 each) inside the scikit-learn wheel, so the default run needs no download. `write_digits_imagefolder` turns
them into the layout that `datasets.load_dataset("imagefolder", ...)` reads::

    root/
      .tl_align_hf_digits.json      # marker: the parameters the folder was written with
      train/0/0000.png ... train/9/...
      validation/0/....png ...

File names are the index of the image in `load_digits`, so a file can be traced back to its source row.

Choices:
- Pixel values 0..16 are scaled to 0..255 (`round(v * 255 / 16)`) and stored as single-channel 'L' PNGs, bright
  = ink as in the source data. The transforms in `tl_align_hf.support.transforms` convert them to RGB.
- Images are upsampled from 8x8 to `image_size` with PIL bicubic: strokes come out smooth, like a low-resolution
  photo, instead of nearest-neighbour blocks whose edges would line up exactly with the ViT patch grid and give
  the model an artificial cue. (PIL clips the bicubic overshoot to 0..255 for 'L' images.)
- The train/validation split is stratified by class with `sklearn.model_selection.train_test_split`, fixed by
  `seed`, so every call with the same parameters writes the same files.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

MARKER_NAME = ".tl_align_hf_digits.json"
# Bump when the written content changes for the same parameters, so old caches are rewritten.
FORMAT_VERSION = 1
_INSTALL_ATTEMPTS = 5


def default_digits_dir(image_size: int = 32) -> Path:
    """The cache folder for the digits imagefolder: `$TL_ALIGN_HF_CACHE/digits-<size>`.

    Without the environment variable `TL_ALIGN_HF_CACHE` the base is `~/.cache/tl_align_hf`.
    """
    base = os.environ.get("TL_ALIGN_HF_CACHE") or Path.home() / ".cache" / "tl_align_hf"
    return Path(base).expanduser() / f"digits-{image_size}"


def write_digits_imagefolder(root: str | Path, image_size: int = 32, test_size: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's digits to `root/{train,validation}/<digit>/<index>.png` once, and return `root`.

    Args:
        root: the folder to write. It must not exist, be empty, or be a folder written by this function.
        image_size: height and width of the stored images, in pixels (the source is 8x8).
        test_size: fraction of each class put in `validation` (0 < test_size < 1); 0.2 gives 1,437 / 360 images.
        seed: fixes the stratified split.

    Idempotent: a marker file records the parameters; a folder written with the same parameters is returned
    as is, one written with other parameters is replaced. Safe when several processes call it at once: each
    writes a private temporary folder next to `root` and renames it into place atomically; a process that
    finds another one has already installed the same parameters discards its own copy.
    """
    root = Path(root).expanduser()
    _check_digits_args(image_size, test_size)
    params = {"format_version": FORMAT_VERSION, "image_size": image_size, "test_size": test_size, "seed": seed}
    if _read_marker(root) == params:
        return root
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_split_folders(staging, image_size, test_size, seed)
        (staging / MARKER_NAME).write_text(json.dumps(params, indent=2) + "\n")
        _install(staging, root, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _check_digits_args(image_size: int, test_size: float) -> None:
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8 (the digits are 8x8), got {image_size!r}.")
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be strictly between 0 and 1, got {test_size!r}.")


def _read_marker(root: Path) -> dict | None:
    """The parameters recorded in `root`'s marker, or None when there is no readable marker."""
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _check_replaceable(root: Path) -> None:
    """Refuse to replace a folder that this module did not write (never delete a user's files)."""
    if not root.exists() or (root / MARKER_NAME).exists():
        return
    if not root.is_dir() or any(root.iterdir()):
        raise ValueError(
            f"{root} exists and was not written by write_digits_imagefolder (no {MARKER_NAME}); "
            "pass an empty or new folder, or unset TL_ALIGN_HF_CACHE to use the default cache."
        )


def _write_split_folders(folder: Path, image_size: int, test_size: float, seed: int) -> None:
    """Write `folder/train/<digit>/*.png` and `folder/validation/<digit>/*.png`."""
    for split, (indices, images, labels) in digits_splits(image_size, test_size, seed).items():
        for index, image, label in zip(indices, images, labels):
            class_dir = folder / split / str(label)
            class_dir.mkdir(parents=True, exist_ok=True)
            image.save(class_dir / f"{index:04d}.png")


def digits_splits(
    image_size: int = 32, test_size: float = 0.2, seed: int = 0
) -> dict[str, tuple[list[int], list[Image.Image], list[int]]]:
    """The digits as `{"train": (indices, images, labels), "validation": (...)}`, in memory.

    The stratified split of `write_digits_imagefolder` (same `test_size` and `seed`, same images): `indices` are
    the rows of `load_digits` in ascending order, `images` 'L' PIL images of `image_size` px, `labels` 0-9.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_digits_args(image_size, test_size)
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(indices, test_size=test_size, stratify=digits.target, random_state=seed)
    splits = {}
    for split, split_idx in (("train", train_idx), ("validation", val_idx)):
        rows = sorted(split_idx.tolist())
        images = [digit_image(digits.images[index], image_size) for index in rows]
        splits[split] = (rows, images, [int(digits.target[index]) for index in rows])
    return splits


def digit_image(pixels: np.ndarray, image_size: int) -> Image.Image:
    """(8, 8) floats in 0..16 -> an 'L' image of (image_size, image_size), bicubic upsampling."""
    grey = np.rint(pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey).resize((image_size, image_size), Image.Resampling.BICUBIC)


def _install(staging: Path, root: Path, params: dict) -> None:
    """Atomically rename `staging` to `root`; replace a stale digits folder; tolerate a concurrent winner.

    `os.rename` onto a missing or empty folder is atomic, and fails when `root` holds files. Two processes
    writing the same parameters at once therefore never disturb each other: the loser's rename fails, it finds
    the winner's marker and returns. Only a folder with other parameters (or no marker) is moved aside.
    """
    for _ in range(_INSTALL_ATTEMPTS):
        try:
            os.rename(staging, root)
            return
        except OSError:
            pass
        if _read_marker(root) == params:
            return  # another process installed the same content first
        _move_aside(root, params)
    raise RuntimeError(f"Could not install the digits folder at {root} after {_INSTALL_ATTEMPTS} attempts.")


def _move_aside(root: Path, params: dict) -> None:
    """Rename a stale digits folder out of the way and delete it; a no-op when `root` is gone."""
    trash = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(root, trash)
    except OSError:
        return  # already gone, or renamed by a concurrent caller; the install loop looks again
    if _read_marker(trash) == params:
        # A concurrent caller installed the right content just before our rename: put it back.
        try:
            os.rename(trash, root)
            return
        except OSError:
            pass
    shutil.rmtree(trash, ignore_errors=True)
