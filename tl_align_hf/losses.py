"""The loss of a mixed batch (docs/algorithm.md, "Target and loss"): the mixed loss without a `(B, C)` target, the
soft targets and soft-target cross-entropy it equals, and the one function that every entry point (the model's
forward, `TLAlignTrainer`, the Accelerate example) calls."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .contract import check_loss_inputs, check_mix_index_and_share
from .settings import check_label_smoothing

ALIGNMENT_METRICS = ("mix_lam", "aligned_lam", "alignment_gap")


def mixed_soft_targets(
    labels: torch.Tensor,
    mix_index: torch.Tensor,
    own_share: torch.Tensor,
    num_classes: int,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Targets ``own_share[i] * y~_{labels[i]} + (1 - own_share[i]) * y~_{labels[mix_index[i]]}``.

    ``y~ = (1 - label_smoothing) * onehot + label_smoothing / num_classes`` is smoothed before mixing.

    Args:
        labels: `(B,)` integer class of each sample.
        mix_index: `(B,)` partner of each sample.
        own_share: `(B,)` in [0, 1]: ``aligned_lam`` for TL-Align, the area ``mix_lam`` for plain mixing.
    Returns:
        `(B, num_classes)` float32 targets; each row sums to 1.
    """
    check_label_smoothing(label_smoothing)
    smoothed = torch.nn.functional.one_hot(labels, num_classes).float() * (1.0 - label_smoothing)
    smoothed = smoothed + label_smoothing / num_classes
    own_share = own_share.detach().float()[:, None]
    return own_share * smoothed + (1.0 - own_share) * smoothed[mix_index]


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``-(targets * log_softmax(logits)).sum(-1)``, averaged (``"mean"``) or summed (``"sum"``) over the batch."""
    per_sample = -(targets * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}.")


def mixing_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mix_index: torch.Tensor,
    own_share: torch.Tensor,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Soft-target cross-entropy of `(B, C)` ``logits`` against :func:`mixed_soft_targets`, without building them.

    For tensors of a user's own: the arguments are checked here, shapes and dtypes on the host and values without a
    device sync (``tl_align_hf.contract.check_loss_inputs``). :func:`mixed_batch_loss` computes the same loss for a
    batch whose values were checked where they entered (the collator, the aligned model).

    The target is linear in the two smoothed one-hots, so per sample the loss is
    ``-(1 - eps) * (own_share * logp[y_i] + (1 - own_share) * logp[y_j]) - eps * mean_c(logp)``, with
    ``logp = log_softmax(logits)`` in float32 and ``eps = label_smoothing``: one `(B, C)` buffer (the log-probabilities)
    at any class count, where the target formulation writes, reads and multiplies two more.

    Args:
        logits: `(B, C)`; labels, mix_index: `(B,)` integer; own_share: `(B,)` in [0, 1] (no gradient flows into it).
        reduction: ``"mean"`` over the batch or ``"sum"``.
    """
    check_label_smoothing(label_smoothing)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}.")
    check_loss_inputs(logits, labels, mix_index, own_share)
    return _mixing_loss(logits, labels, mix_index, own_share, label_smoothing, reduction)


def _mixing_loss(logits, labels, mix_index, own_share, label_smoothing: float, reduction: str) -> torch.Tensor:
    """:func:`mixing_loss` of arguments checked by its callers."""
    log_probabilities = torch.log_softmax(logits.float(), dim=-1)
    own_share = own_share.detach().float()
    own = log_probabilities.gather(1, labels[:, None]).squeeze(1)
    partner = log_probabilities.gather(1, labels[mix_index][:, None]).squeeze(1)
    per_sample = -(1.0 - label_smoothing) * (own_share * own + (1.0 - own_share) * partner)
    if label_smoothing:
        per_sample = per_sample - label_smoothing * log_probabilities.mean(dim=-1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def _head_logits(outputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The classification heads trained on the target: DeiT with teacher has two, every other model one."""
    cls_logits, distillation_logits = outputs.get("cls_logits"), outputs.get("distillation_logits")
    if cls_logits is not None and distillation_logits is not None:
        return [cls_logits, distillation_logits]
    if isinstance(outputs["logits"], tuple | list):  # timm's distilled ViTs in distilled training: (cls, distillation)
        return list(outputs["logits"])
    return [outputs["logits"]]


def mixed_batch_loss(
    outputs: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    *,
    tl_align: bool = True,
    label_smoothing: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    num_processes: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of a mixed batch and its alignment sums: the one place this is computed.

    The batch is one that came through :class:`TLAlignCollator` (which checked the labels on the host) and the
    aligned model (which checked ``mix_index``, ``token_weights`` and ``mix_lam``): here the shapes and dtypes are
    checked, and the values only of what neither saw (with ``tl_align=False``, ``mix_index`` and ``mix_lam``, which
    the model was not given). For tensors of your own, :func:`mixing_loss` checks every value.

    Args:
        outputs: the model's output (a `ModelOutput`, or any mapping) for the mixed ``batch["pixel_values"]``: ``logits`` (DeiT with teacher:
            ``cls_logits`` and ``distillation_logits``, both trained on the same target, losses averaged) and, with
            ``tl_align``, ``aligned_lam`` `(B,)` (from an aligned forward).
        batch: ``labels`` `(B,)` each sample's own class, ``mix_index`` `(B,)` and ``mix_lam`` `(B,)`, as
            :class:`TLAlignCollator` gives them.
        tl_align: target share ``aligned_lam`` (TL-Align) or the area share ``mix_lam`` (plain mixing).
        label_smoothing: smoothing of each one-hot before mixing, in [0, 1).
        num_items_in_batch: ``None`` averages over this batch; otherwise the loss is the sum over this batch
            divided by it, the number of samples of all the micro-batches (and processes) of one optimizer step, so
            that gradient accumulation gives the gradient of one large batch.
        num_processes: processes whose gradients DDP averages; with ``num_items_in_batch`` counted over all of
            them, the loss is multiplied by it so that the average is the gradient of the global sum / count.
    Returns:
        ``loss`` (a scalar) and ``alignment_sums``, float32 on the batch's device, no gradient: `(2,)`
        ``[samples, sum mix_lam]`` for plain mixing, `(4,)` ``[samples, sum mix_lam, sum aligned_lam,
        sum |aligned_lam - mix_lam|]`` for TL-Align. Add them over steps and processes and read them with
        :func:`alignment_metrics`; nothing here waits for the device.
    """
    check_label_smoothing(label_smoothing)
    own_share = _own_share(outputs, batch, tl_align)
    heads = _head_logits(outputs)
    check_loss_inputs(heads[0], batch["labels"], batch["mix_index"], own_share, check_values=False)
    if not tl_align:  # the model was not given mix_index and mix_lam: their values are checked here
        check_mix_index_and_share(batch["mix_index"], own_share)
    return loss_of_checked_batch(outputs, batch, tl_align, label_smoothing, num_items_in_batch, num_processes)


def _own_share(outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], tl_align: bool) -> torch.Tensor:
    """`(B,)` share of each sample's own label in its target: ``aligned_lam`` (TL-Align) or ``mix_lam`` (area)."""
    if not tl_align:
        return batch["mix_lam"]
    if outputs.get("aligned_lam") is None:
        raise ValueError(
            "tl_align=True needs `outputs.aligned_lam`: call the aligned model with the batch's mix_index, "
            "token_weights and mix_lam (or pass tl_align=False for the area target)."
        )
    return outputs["aligned_lam"]


def loss_of_checked_batch(
    outputs: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    tl_align: bool,
    label_smoothing: float,
    num_items_in_batch: int | torch.Tensor | None = None,
    num_processes: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mixed_batch_loss` of a batch and settings checked by the caller (the aligned model's forward, which
    checked them with ``tl_align_hf.contract.check_model_inputs``)."""
    own_share, mix_lam = _own_share(outputs, batch, tl_align), batch["mix_lam"]
    reduction = "mean" if num_items_in_batch is None else "sum"
    head_losses = [
        _mixing_loss(logits, batch["labels"], batch["mix_index"], own_share, label_smoothing, reduction)
        for logits in _head_logits(outputs)
    ]
    loss = sum(head_losses) / len(head_losses)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch * num_processes
    with torch.no_grad():
        mix_lam, own_share = mix_lam.float(), own_share.float()
        sums = [torch.ones_like(mix_lam).sum(), mix_lam.sum()]
        if tl_align:
            sums += [own_share.sum(), (own_share - mix_lam).abs().sum()]
    return loss, torch.stack(sums)


def alignment_metrics(alignment_sums: torch.Tensor) -> dict[str, float]:
    """`{"mix_lam", "aligned_lam", "alignment_gap"}` means from summed :func:`mixed_batch_loss` sums (one sync)."""
    count, *sums = alignment_sums.tolist()
    if count == 0:
        return {}
    return {name: value / count for name, value in zip(ALIGNMENT_METRICS, sums)}
