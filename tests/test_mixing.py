"""Tests of the pure mixing functions in tl_align_hf.mixing, each against a direct (slow, loop or slice) reference."""

import pytest
import torch

from tl_align_hf.mixing import (
    box_lam,
    box_pixel_mask,
    box_token_weights,
    cutmix_bbox_and_lam,
    cyclic_pairing,
    flip_pairing,
    mix_images,
    mutual_pairing,
    pair_leaders,
    paste_box,
    rand_bbox,
    rand_bbox_minmax,
    random_token_mask,
    sample_lam,
    token_grid_bbox,
    token_mask_to_pixels,
)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _slice_mask(box, image_size) -> torch.Tensor:
    mask = torch.zeros(image_size, dtype=torch.bool)
    mask[box[0] : box[1], box[2] : box[3]] = True
    return mask


def _patch_means(pixel_map: torch.Tensor, patch_size) -> torch.Tensor:
    """(n, H, W) -> (n, N): mean over each patch, by a plain loop over the grid."""
    (patch_h, patch_w), (height, width) = patch_size, pixel_map.shape[-2:]
    columns = []
    for top in range(0, height, patch_h):
        for left in range(0, width, patch_w):
            columns.append(pixel_map[:, top : top + patch_h, left : left + patch_w].float().mean((1, 2)))
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("batch_size", [2, 3, 4, 7, 16])
def test_cyclic_pairing_is_a_permutation_without_fixed_points(batch_size):
    mix_index = cyclic_pairing(batch_size, _generator())
    assert sorted(mix_index.tolist()) == list(range(batch_size))
    assert (mix_index != torch.arange(batch_size)).all()
    assert cyclic_pairing(batch_size).tolist() == [(i + 1) % batch_size for i in range(batch_size)]


@pytest.mark.parametrize("batch_size", [2, 5, 8, 9])
def test_mutual_pairing_pairs_samples_both_ways(batch_size):
    mix_index = mutual_pairing(batch_size, _generator(batch_size))
    positions = torch.arange(batch_size)
    assert (mix_index != positions).all()
    mutual = mix_index[mix_index] == positions
    assert int((~mutual).sum()) == batch_size % 2
    leaders = pair_leaders(mix_index)
    assert (leaders[mutual] == torch.minimum(positions, mix_index)[mutual]).all()
    assert (leaders[~mutual] == positions[~mutual]).all()


def test_flip_pairing_reverses_the_batch():
    assert flip_pairing(5).tolist() == [4, 3, 2, 1, 0]


def test_sample_lam_is_reproducible_and_in_range():
    lam = sample_lam(0.8, 1000, _generator(3))
    assert lam.dtype == torch.float64 and lam.shape == (1000,)
    assert ((lam >= 0) & (lam <= 1)).all()
    assert torch.equal(lam, sample_lam(0.8, 1000, _generator(3)))
    assert abs(lam.mean().item() - 0.5) < 0.05


def test_rand_bbox_has_the_drawn_side_lengths_before_clipping():
    image_size = (24, 40)
    lam = torch.rand(500, generator=_generator(1), dtype=torch.float64)
    boxes = rand_bbox(image_size, lam, _generator(2))
    assert ((boxes[:, 0] >= 0) & (boxes[:, 1] <= 24) & (boxes[:, 2] >= 0) & (boxes[:, 3] <= 40)).all()
    assert ((boxes[:, 1] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 2])).all()
    ratio = (1 - lam).sqrt()
    expected_h, expected_w = (24 * ratio).long(), (40 * ratio).long()
    inside = (boxes[:, 0] > 0) & (boxes[:, 1] < 24) & (boxes[:, 2] > 0) & (boxes[:, 3] < 40)
    assert inside.sum() > 50
    assert torch.equal((boxes[:, 1] - boxes[:, 0])[inside], expected_h[inside])
    assert torch.equal((boxes[:, 3] - boxes[:, 2])[inside], expected_w[inside])


def test_rand_bbox_minmax_keeps_boxes_inside_with_sides_in_range():
    boxes = rand_bbox_minmax((20, 30), (0.2, 0.8), 500, _generator())
    heights, widths = boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]
    assert ((heights >= 4) & (heights < 16) & (widths >= 6) & (widths < 24)).all()
    assert ((boxes[:, 0] >= 0) & (boxes[:, 1] <= 20) & (boxes[:, 2] >= 0) & (boxes[:, 3] <= 30)).all()
    assert boxes[:, 0].max() == 20 - heights[boxes[:, 0].argmax()]  # the last position is reachable


def test_cutmix_bbox_and_lam_corrects_lam_to_the_box_area():
    lam = torch.full((200,), 0.3, dtype=torch.float64)
    boxes, corrected = cutmix_bbox_and_lam((16, 16), lam, _generator(), correct_lam=True)
    areas = torch.stack([_slice_mask(box.tolist(), (16, 16)).sum() for box in boxes])
    assert torch.allclose(corrected, 1 - areas.double() / 256)
    assert torch.equal(corrected, box_lam(boxes, (16, 16)))
    _, uncorrected = cutmix_bbox_and_lam((16, 16), lam, _generator(), correct_lam=False)
    assert torch.equal(uncorrected, lam)


def test_token_grid_bbox_aligns_boxes_to_patches_and_returns_kept_token_fraction():
    lam = torch.rand(100, generator=_generator(4), dtype=torch.float64)
    boxes, kept = token_grid_bbox((24, 32), (4, 8), lam, _generator())
    assert (boxes[:, :2] % 4 == 0).all() and (boxes[:, 2:] % 8 == 0).all()
    token_weights = box_token_weights(boxes, (24, 32), (4, 8))
    assert set(token_weights.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(kept, token_weights.double().mean(1))


def test_box_token_weights_match_pixel_counts_per_patch():
    image_size, patch_size = (12, 20), (4, 5)
    lam = torch.rand(300, generator=_generator(5), dtype=torch.float64)
    boxes = rand_bbox(image_size, lam, _generator(6))
    outside = torch.stack([~_slice_mask(box.tolist(), image_size) for box in boxes])
    expected = _patch_means(outside, patch_size)
    token_weights = box_token_weights(boxes, image_size, patch_size)
    assert token_weights.shape == (300, 12)
    torch.testing.assert_close(token_weights, expected, rtol=0, atol=1e-6)
    assert ((token_weights > 0) & (token_weights < 1)).any()  # fractional at box edges


def test_box_pixel_mask_matches_slicing():
    boxes = torch.tensor([[0, 3, 1, 4], [2, 2, 0, 5], [1, 6, 0, 8]])
    expected = torch.stack([_slice_mask(box.tolist(), (6, 8)) for box in boxes])
    assert torch.equal(box_pixel_mask(boxes, (6, 8)), expected)


def test_random_token_mask_takes_the_rounded_number_of_tokens():
    lam = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    mask, kept = random_token_mask(12, lam, _generator())
    assert mask.dtype == torch.bool and mask.shape == (5, 12)
    assert mask.sum(1).tolist() == [12, 9, 6, 1, 0]
    assert torch.allclose(kept, 1 - mask.double().mean(1))
    subsets = random_token_mask(12, torch.full((50,), 0.5, dtype=torch.float64), _generator(1))[0]
    assert len({tuple(row.tolist()) for row in subsets}) > 40


def test_token_mask_to_pixels_fills_whole_patches():
    mask = torch.tensor([[True, False, False, True, True, False]])
    pixels = token_mask_to_pixels(mask, (4, 9), (2, 3))
    assert pixels.shape == (1, 4, 9)
    assert torch.equal(_patch_means(pixels, (2, 3)), mask.float())


def _images(batch_size=4, channels=2, height=6, width=8):
    return [torch.randn(channels, height, width, generator=_generator(i)) for i in range(batch_size)]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_paste_box_fills_the_box_from_the_partner_and_leaves_inputs_alone(as_tensor):
    images = _images()
    originals = [image.clone() for image in images]
    mix_index = torch.tensor([2, 0, 3, 1])
    source = torch.stack(images) if as_tensor else images
    mixed = paste_box(source, mix_index, (1, 4, 2, 7))
    expected = torch.stack(originals)
    for i, j in enumerate(mix_index.tolist()):
        expected[i, :, 1:4, 2:7] = originals[j][:, 1:4, 2:7]
    assert torch.equal(mixed, expected)
    assert all(torch.equal(a, b) for a, b in zip(images, originals))
    assert torch.equal(paste_box(images, mix_index, (2, 2, 0, 8)), torch.stack(originals))


@pytest.mark.parametrize("share_kind", ["float", "per_sample", "shared_map", "per_sample_map"])
def test_mix_images_blends_each_pixel_with_its_partner(share_kind):
    images = _images()
    mix_index = torch.tensor([1, 2, 3, 0])
    shares = {
        "float": 0.3,
        "per_sample": torch.tensor([0.0, 0.25, 1.0, 0.6]),
        "shared_map": torch.rand(6, 8, generator=_generator(9)),
        "per_sample_map": torch.rand(4, 6, 8, generator=_generator(9)),
    }
    share = shares[share_kind]
    mixed = mix_images(images, mix_index, share)
    stacked = torch.stack(images)
    weight = torch.as_tensor(share, dtype=torch.float32)
    if weight.ndim == 1:
        weight = weight.view(-1, 1, 1, 1)
    elif weight.ndim > 1:
        weight = weight.unsqueeze(-3)
    expected = (1 - weight) * stacked + weight * stacked[mix_index]
    torch.testing.assert_close(mixed, expected)
    assert torch.equal(torch.stack(images), stacked)


def test_mix_images_copies_pixels_exactly_at_shares_zero_and_one():
    images = _images()
    mix_index = torch.tensor([3, 2, 1, 0])
    share = (torch.rand(4, 6, 8, generator=_generator(2)) < 0.5).float()
    mixed = mix_images(images, mix_index, share)
    stacked = torch.stack(images)
    expected = torch.where(share.bool().unsqueeze(1), stacked[mix_index], stacked)
    assert torch.equal(mixed, expected)
