"""Mixing primitives for Token-Label Alignment: pairings, lambda sampling, boxes, token shares, pixel mixing.

Papers:
    mixup: Beyond Empirical Risk Minimization - https://arxiv.org/abs/1710.09412 (Zhang et al., ICLR 2018)
    CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features
        - https://arxiv.org/abs/1905.04899 (Yun et al., ICCV 2019)
    TokenMix: Rethinking Image Mixing for Data Augmentation in Vision Transformers
        - https://arxiv.org/abs/2207.08409 (Liu et al., ECCV 2022)
    Token-Label Alignment for Vision Transformers - https://arxiv.org/abs/2210.06455 (Xiao et al., ICCV 2023)

The box conventions follow timm's `timm/data/mixup.py` (Ross Wightman): a box is `(yl, yh, xl, xh)`, half-open
pixel intervals `[yl, yh) x [xl, xh)`, and is filled with the partner's pixels at the same place. Two small
differences: a box keeps its drawn side length before clipping (timm's `cy +- cut_h // 2` loses a pixel on odd
sides), and the pairings come from a random permutation, so batches of any size work.

Every function is pure: the only randomness is the `torch.Generator` passed in. Shapes: `B` samples (or `n` draws),
images `(C, H, W)`, patches `(ph, pw)`, a `G_h x G_w` patch grid with `N = G_h * G_w` tokens in row-major order.
"""

from collections.abc import Sequence

import numpy as np
import torch

Size2d = tuple[int, int]


def cyclic_pairing(batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Partner of each sample: the next one in a random cyclic order (a plain roll when `generator` is None).

    No sample is its own partner when `batch_size >= 2`, so odd batches are fully mixed.
    Returns `mix_index`, LongTensor (B,): sample `i` takes pixels from sample `mix_index[i]`.
    """
    if generator is None:
        return torch.arange(batch_size).roll(-1)
    order = torch.randperm(batch_size, generator=generator)
    mix_index = torch.empty(batch_size, dtype=torch.long)
    mix_index[order] = order.roll(-1)
    return mix_index


def mutual_pairing(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Random disjoint pairs `i <-> j` (so `mix_index[mix_index[i]] == i`), for `pair` mode.

    With an odd batch the sample left over is paired one way with a random other sample (which keeps its own
    mutual partner). Returns LongTensor (B,).
    """
    order = torch.randperm(batch_size, generator=generator)
    mix_index = torch.empty(batch_size, dtype=torch.long)
    even = batch_size - batch_size % 2
    mix_index[order[0:even:2]] = order[1:even:2]
    mix_index[order[1:even:2]] = order[0:even:2]
    if batch_size % 2:
        mix_index[order[-1]] = order[0]
    return mix_index


def flip_pairing(batch_size: int) -> torch.Tensor:
    """timm's and the official TL-Align pairing, `x.flip(0)`: `i <-> B-1-i`; the middle of an odd batch is alone."""
    return torch.arange(batch_size - 1, -1, -1)


def pair_leaders(mix_index: torch.Tensor) -> torch.Tensor:
    """For mutual pairs, the smaller index of each pair; other samples lead themselves. LongTensor (B,).

    Indexing per-sample draws with it gives both members of a pair the same lambda and box.
    """
    positions = torch.arange(mix_index.numel())
    mutual = mix_index[mix_index] == positions
    return torch.where(mutual, torch.minimum(positions, mix_index), positions)


def sample_lam(alpha: float, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` draws of lambda ~ Beta(alpha, alpha), float64 (count,) in [0, 1].

    torch's Beta sampler takes no generator, so NumPy draws them from a seed taken from `generator`, which stays
    the only source of randomness.
    """
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=count))


def _uniform_int(
    low: torch.Tensor | int, high: torch.Tensor | int, count: int, generator: torch.Generator
) -> torch.Tensor:
    """Uniform integers in `[low, high)` (just `low` where `high <= low`), LongTensor (count,)."""
    span = torch.as_tensor(high) - torch.as_tensor(low)
    draws = torch.rand(count, generator=generator, dtype=torch.float64) * span.clamp(min=0)
    return low + draws.long()


def rand_bbox(image_size: Size2d, lam: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Boxes with sides `int(side * sqrt(1 - lam))`, centres uniform over the image, clipped at the borders.

    lam: (n,) in [0, 1]. Returns LongTensor (n, 4) of `(yl, yh, xl, xh)`; clipping can make a box smaller.
    """
    height, width = image_size
    ratio = (1.0 - lam.double()).clamp(min=0.0).sqrt()
    cut_h, cut_w = (height * ratio).long(), (width * ratio).long()
    center_y = torch.randint(height, lam.shape, generator=generator)
    center_x = torch.randint(width, lam.shape, generator=generator)
    top, left = center_y - cut_h // 2, center_x - cut_w // 2
    boxes = torch.stack([top, top + cut_h, left, left + cut_w], dim=1)
    return boxes.clamp(min=0).minimum(torch.tensor([height, height, width, width]))


def rand_bbox_minmax(
    image_size: Size2d, ratio_minmax: tuple[float, float], count: int, generator: torch.Generator
) -> torch.Tensor:
    """Boxes whose sides are uniform in `[min, max)` times the image side, placed fully inside the image.

    Returns LongTensor (count, 4) of `(yl, yh, xl, xh)`.
    """
    height, width = image_size
    low, high = ratio_minmax
    cut_h = _uniform_int(int(height * low), int(height * high), count, generator)
    cut_w = _uniform_int(int(width * low), int(width * high), count, generator)
    top = _uniform_int(0, height - cut_h + 1, count, generator)
    left = _uniform_int(0, width - cut_w + 1, count, generator)
    return torch.stack([top, top + cut_h, left, left + cut_w], dim=1)


def box_lam(boxes: torch.Tensor, image_size: Size2d) -> torch.Tensor:
    """Share of each image outside its box, `1 - box area / (H * W)`, float64 (n,)."""
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    return 1.0 - area.double() / (image_size[0] * image_size[1])


def cutmix_bbox_and_lam(
    image_size: Size2d,
    lam: torch.Tensor,
    generator: torch.Generator,
    ratio_minmax: tuple[float, float] | None = None,
    correct_lam: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix boxes for `lam` (n,) and the lambda to use, as timm's `cutmix_bbox_and_lam`.

    With `ratio_minmax` the box size ignores `lam`. The returned lambda (float64 (n,)) is the true share outside
    the box when `correct_lam` or `ratio_minmax` is set, else the drawn `lam`.
    """
    if ratio_minmax is not None:
        boxes = rand_bbox_minmax(image_size, ratio_minmax, lam.numel(), generator)
    else:
        boxes = rand_bbox(image_size, lam, generator)
    if correct_lam or ratio_minmax is not None:
        lam = box_lam(boxes, image_size)
    return boxes, lam.double()


def token_grid_bbox(
    image_size: Size2d,
    patch_size: Size2d,
    lam: torch.Tensor,
    generator: torch.Generator,
    ratio_minmax: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes drawn on the patch grid (the official TL-Align default), in pixels, with lambda = kept-token fraction.

    Returns pixel boxes LongTensor (n, 4) aligned to patch borders, and lambda float64 (n,).
    """
    grid_size = (image_size[0] // patch_size[0], image_size[1] // patch_size[1])
    grid_boxes, lam = cutmix_bbox_and_lam(grid_size, lam, generator, ratio_minmax, correct_lam=True)
    scale = torch.tensor([patch_size[0], patch_size[0], patch_size[1], patch_size[1]])
    return grid_boxes * scale, lam


def _interval_overlaps(low: torch.Tensor, high: torch.Tensor, size: int, patch: int) -> torch.Tensor:
    """Fraction of each patch interval `[k*patch, (k+1)*patch)` inside `[low, high)`: float32 (n, size // patch)."""
    starts = torch.arange(0, size, patch)
    overlap = torch.minimum(high[:, None], starts + patch) - torch.maximum(low[:, None], starts)
    return overlap.clamp(min=0).float() / patch


def box_token_weights(boxes: torch.Tensor, image_size: Size2d, patch_size: Size2d) -> torch.Tensor:
    """Exact share of each patch's pixels outside its box (fractional at box edges).

    The pasted area of a patch is the product of the 1-D overlaps of the box with the patch's row and column
    intervals. boxes: (n, 4). Returns float32 (n, N) in [0, 1], patch-grid row-major.
    """
    rows = _interval_overlaps(boxes[:, 0], boxes[:, 1], image_size[0], patch_size[0])
    cols = _interval_overlaps(boxes[:, 2], boxes[:, 3], image_size[1], patch_size[1])
    return (1.0 - rows[:, :, None] * cols[:, None, :]).flatten(1)


def box_pixel_mask(boxes: torch.Tensor, image_size: Size2d) -> torch.Tensor:
    """True inside each box: bool (n, H, W)."""
    rows = torch.arange(image_size[0])
    cols = torch.arange(image_size[1])
    in_rows = (rows >= boxes[:, 0:1]) & (rows < boxes[:, 1:2])
    in_cols = (cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])
    return in_rows[:, :, None] & in_cols[:, None, :]


def random_token_mask(
    num_tokens: int, lam: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenMix-style: a uniformly random subset of `round((1 - lam) * N)` tokens taken from the partner.

    (TokenMix itself draws blocks of tokens; any subset is allowed here.) Returns the mask, bool (n, N), True where
    the token comes from the partner, and lambda = kept-token fraction, float64 (n,).
    """
    num_from_partner = ((1.0 - lam.double()) * num_tokens).round().long().clamp(0, num_tokens)
    scores = torch.rand(lam.numel(), num_tokens, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < num_from_partner[:, None], 1.0 - num_from_partner.double() / num_tokens


def token_mask_to_pixels(token_mask: torch.Tensor, image_size: Size2d, patch_size: Size2d) -> torch.Tensor:
    """Spread a per-token mask (n, N) over its patches' pixels: (n, H, W), same dtype."""
    (height, width), (patch_h, patch_w) = image_size, patch_size
    grid = token_mask.view(-1, height // patch_h, 1, width // patch_w, 1)
    return grid.expand(-1, -1, patch_h, -1, patch_w).reshape(-1, height, width)


def stack_images(images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """A new (B, C, H, W) batch of `images` (B tensors (C, H, W), or a (B, C, H, W) tensor, copied): the input is
    never modified."""
    if isinstance(images, torch.Tensor):
        return images.clone(memory_format=torch.contiguous_format)
    return torch.stack(list(images))


def paste_box(images: Sequence[torch.Tensor] | torch.Tensor, mix_index: torch.Tensor, box) -> torch.Tensor:
    """Stack `images` (B tensors (C, H, W), or (B, C, H, W)) and fill one box in every image with its partner's pixels.

    box: 4 ints `(yl, yh, xl, xh)` shared by the batch (timm's `batch` mode). The partners' pixels are read from
    `images`, which are never modified, and written straight into the stacked batch: only the box is copied twice.
    `mix_index` (B,) is a CPU tensor. Returns (B, C, H, W), on the images' device.
    """
    mixed = stack_images(images)
    top, bottom, left, right = (int(value) for value in box)
    if bottom > top and right > left:
        partner_boxes = [images[j][..., top:bottom, left:right] for j in mix_index.tolist()]
        torch.stack(partner_boxes, out=mixed[..., top:bottom, left:right])
    return mixed


def mix_images(
    images: Sequence[torch.Tensor] | torch.Tensor, mix_index: torch.Tensor, partner_share: float | torch.Tensor
) -> torch.Tensor:
    """Stack `images` and blend each with its partner: `x_i + share * (x_j - x_i)`, `j = mix_index[i]`.

    partner_share: the partner's share of each pixel, in [0, 1]: a float (the whole batch), (B,) (one per sample),
    (H, W) (one map for the batch) or (B, H, W) (one map per sample). A share of exactly 0 or 1 copies the own or
    the partner's pixel exactly (`torch.lerp` is exact at both ends). `images` (B tensors (C, H, W), or
    (B, C, H, W)) are never modified; `mix_index` (B,) and `partner_share` are CPU tensors. The blend runs in place
    on the stacked batch, one fused pass per sample reading both originals: no second batch-sized tensor.
    Returns (B, C, H, W), on the images' device.
    """
    mixed = stack_images(images)
    rows = list(mixed.unbind(0))
    partners = [images[j] for j in mix_index.tolist()]
    if not isinstance(partner_share, torch.Tensor):
        torch._foreach_lerp_(rows, partners, float(partner_share))
    elif partner_share.ndim == 1:
        torch._foreach_lerp_(rows, partners, partner_share.tolist())
    else:
        share = partner_share.to(mixed.device, mixed.dtype, non_blocking=True)
        share = share.expand(mixed.shape[0], *partner_share.shape[-2:])
        weights = list(share.unsqueeze(1).expand_as(mixed).unbind(0))
        torch._foreach_lerp_(rows, partners, weights)
    return mixed
