"""The batch contract of TL-Align, and its checks at the boundaries where a batch enters the package.

A mixed batch holds `pixel_values`, `labels` `(B,)` (each sample's own class, never mixed) and :data:`MIXING_KEYS`:
`mix_index` `(B,)` int64 (each sample's partner), `token_weights` `(B, N)` float in [0, 1] (the share of each
patch's pixels from the sample itself) and `mix_lam` `(B,)` float in [0, 1] (that share for the whole image).

Each part is checked once, where it enters:

- Examples, on the host: `TLAlignCollator` (keys, image shapes and channels, integer labels in
  `[0, num_labels)`) and the mixer it calls (`TLAlignMixer`: the image size); the mixer's outputs are valid by
  construction.
- A call of an aligned model: :func:`check_model_inputs`, once per forward, checks the mixing tensors (and `labels`,
  when given) there: shapes and dtypes on the host, value ranges with :func:`check_in_range` (no device sync).
- A call of the loss: `mixing_loss` and `mixed_batch_loss` check the shapes and dtypes of their arguments
  (:func:`check_loss_inputs`); `mixing_loss`, which takes raw tensors, also their values. `mixed_batch_loss` takes
  a batch that came through the collator and the model, and checks the values only of what neither saw: with
  `tl_align=False` the model was not given `mix_index` and `mix_lam`.
"""

from __future__ import annotations

import torch

MIXING_KEYS = ("mix_index", "token_weights", "mix_lam")  # what the mixer adds to `pixel_values`


def check_in_range(in_range: torch.Tensor, values: torch.Tensor, message: str, fix: str = "") -> None:
    """Raise `ValueError(f"{message}, got values in [min, max].{fix}")` unless `in_range` (a bool scalar tensor).

    The one value check of the package: on the CPU (the data is on the host) a ValueError with the values found; on
    an accelerator, or while `torch.compile` traces, reading a value back would stall the device's queue (and break
    the graph), so the check is queued with the computation instead (`torch._assert_async`, same message).
    """
    if values.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(in_range, f"{message}.{fix}")
    elif not bool(in_range):
        found = values.detach().float()
        raise ValueError(f"{message}, got values in [{found.min().item():.4g}, {found.max().item():.4g}].{fix}")


def check_num_classes(num_classes: int) -> None:
    """A mixed target is a share between two labels: raise a ValueError for fewer than two classes."""
    if num_classes < 2:  # one class: every target is that class, the loss 0 and the gradient 0
        raise ValueError(
            f"The logits have {num_classes} class (the model's num_labels={num_classes}): a mixed target is a share "
            "between two labels, so TL-Align needs num_labels >= 2 (the number of classes of the data)."
        )


def _is_integer(tensor: torch.Tensor) -> bool:
    return not (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool)


def check_model_inputs(
    mix_index: torch.Tensor,
    token_weights: torch.Tensor,
    mix_lam: torch.Tensor,
    batch_size: int,
    num_patches: int,
    labels: torch.Tensor | None = None,
    num_labels: int | None = None,
) -> None:
    """The checks of a call of an aligned model with the mixing tensors: a clear error when they do not fit the batch.

    Dtypes and shapes are checked on the host; value ranges never cost a device sync (:func:`check_in_range`).

    Args:
        mix_index: `(B,)` integer tensor, partner of each sample, values in `[0, B)`.
        token_weights: `(B, num_patches)` float tensor in [0, 1], row-major over the patch grid.
        mix_lam: `(B,)` float tensor in [0, 1].
        batch_size: `B`, the number of images in `pixel_values`.
        num_patches: patch tokens per image for the current image size.
        labels: `(B,)` integer class of each sample, or `None` (no loss is computed).
        num_labels: the model's classes; `labels` must be in `[0, num_labels)`.
    """
    _check_mixing_dtypes_and_shapes(mix_index, token_weights, mix_lam, batch_size, num_patches)
    if labels is not None:
        _check_labels_dtype_and_shape(labels, batch_size)
        if num_labels is not None:
            check_num_classes(num_labels)
    if not batch_size:
        return
    fix = " Pass the batch that TLAlignCollator produces."
    for name, values, high, meaning in (
        ("mix_index", mix_index, batch_size - 1, "index into the batch"),
        ("token_weights", token_weights, 1, "hold the share of each patch's pixels from the sample itself"),
        ("mix_lam", mix_lam, 1, "hold the share of each image from the sample itself"),
    ):
        in_range = ((values >= 0) & (values <= high)).all()
        check_in_range(in_range, values, f"`{name}` must {meaning}, i.e. hold values in [0, {high}]", fix)
    if labels is not None and num_labels is not None:
        _check_labels_in_range(labels, num_labels)


def _check_mixing_dtypes_and_shapes(mix_index, token_weights, mix_lam, batch_size: int, num_patches: int) -> None:
    for name, value in zip(MIXING_KEYS, (mix_index, token_weights, mix_lam)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
    if not _is_integer(mix_index):
        raise TypeError(f"`mix_index` must be an integer (long) tensor, got dtype {mix_index.dtype}.")
    for name, value in (("token_weights", token_weights), ("mix_lam", mix_lam)):
        if not torch.is_floating_point(value):
            raise TypeError(f"`{name}` must be a floating-point tensor with values in [0, 1], got dtype {value.dtype}.")
    if tuple(mix_index.shape) != (batch_size,):
        raise ValueError(f"`mix_index` must have shape ({batch_size},) (one partner per image), got {tuple(mix_index.shape)}.")
    if tuple(token_weights.shape) != (batch_size, num_patches):
        raise ValueError(
            f"`token_weights` must have shape (batch_size, num_patches) = ({batch_size}, {num_patches}) for these "
            f"images, got {tuple(token_weights.shape)}. Build it with the model's patch size and the image size "
            "actually fed to the model."
        )
    if tuple(mix_lam.shape) != (batch_size,):
        raise ValueError(f"`mix_lam` must have shape ({batch_size},) (one share per image), got {tuple(mix_lam.shape)}.")


def _check_labels_dtype_and_shape(labels: torch.Tensor, batch_size: int) -> None:
    """A TypeError for labels that are not an integer tensor (soft or one-hot labels), a ValueError for another size."""
    is_integer_tensor = isinstance(labels, torch.Tensor) and _is_integer(labels)
    if not is_integer_tensor or tuple(labels.shape) != (batch_size,):
        dtype, shape = getattr(labels, "dtype", type(labels).__name__), tuple(getattr(labels, "shape", ()))
        raise (ValueError if is_integer_tensor else TypeError)(
            f"`labels` must be a (batch_size,) integer tensor of each sample's own class, got dtype {dtype} and "
            f"shape {shape}. Mixed soft targets are built from `mix_index` and the aligned shares."
        )


def _check_labels_in_range(labels: torch.Tensor, num_classes: int) -> None:
    in_range = ((labels >= 0) & (labels < num_classes)).all()
    check_in_range(in_range, labels, f"`labels` must hold values in [0, {num_classes}) (class ids of these logits; check the label column)")


def check_loss_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mix_index: torch.Tensor,
    own_share: torch.Tensor,
    check_values: bool = True,
) -> None:
    """The checks of a call of the loss: shapes and dtypes of its arguments against the `(B, C)` `logits` (on the
    host, from the tensors' metadata) and, with `check_values`, their value ranges (:func:`check_in_range`).

    Args:
        logits: `(B, C)` with `C >= 2`; labels, mix_index: `(B,)` integer; own_share: `(B,)` in [0, 1].
        check_values: `False` where the values were checked where they entered (the collator, the model).
    """
    batch_size, num_classes = logits.shape[0], logits.shape[-1]
    check_num_classes(num_classes)
    for name, value in (("labels", labels), ("mix_index", mix_index)):
        if not _is_integer(value) or tuple(value.shape) != (batch_size,):
            raise ValueError(
                f"`{name}` must be a ({batch_size},) integer tensor (one entry per image of the logits), got dtype "
                f"{value.dtype} and shape {tuple(value.shape)}."
            )
    if tuple(own_share.shape) != (batch_size,):
        raise ValueError(f"`own_share` must have shape ({batch_size},) (one share per image), got {tuple(own_share.shape)}.")
    if check_values and batch_size:
        _check_labels_in_range(labels, num_classes)
        check_mix_index_and_share(mix_index, own_share)


def check_mix_index_and_share(mix_index: torch.Tensor, own_share: torch.Tensor) -> None:
    """Value ranges of the loss's `mix_index` (`[0, B)`) and `own_share` (`[0, 1]`, to float rounding)."""
    batch_size = mix_index.shape[0]
    in_range = ((mix_index >= 0) & (mix_index < batch_size)).all()
    check_in_range(in_range, mix_index, f"`mix_index` must hold values in [0, {batch_size}) (positions in the batch)")
    # NaN passes (it comes from the model, and is reported as a non-finite loss); 1e-5: float rounding
    in_range = ~((own_share < -1e-5) | (own_share > 1 + 1e-5)).any()
    check_in_range(in_range, own_share, "`own_share` must hold values in [0, 1] (shares: aligned_lam or mix_lam)")
