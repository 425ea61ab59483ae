"""Mixing SigLIP 2's NaFlex inputs: padded patch sequences, each image on its own patch grid.

:class:`PatchSequenceMixing` gives :class:`~tl_align_hf.mixer.TLAlignMixer` its `mix_patch_sequences`; the draws
(pairing, lambda, cut or Mixup) are the mixer's own, so a batch of patch sequences is mixed with the settings and
the random stream of an image batch. `TLAlignCollator` calls it for examples that carry `spatial_shapes`.
"""

from __future__ import annotations

import torch

from .mixing import box_pixel_mask, cutmix_bbox_and_lam, pair_leaders, random_token_mask


class PatchSequenceMixing:
    """The patch-sequence half of :class:`~tl_align_hf.mixer.TLAlignMixer` (which provides `settings`,
    `_draw_use_cut`, `_draw_lam`, `_draw_pairing` and `_batch_contract`)."""

    def mix_patch_sequences(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor,
        spatial_shapes: torch.Tensor,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """Mix a batch of padded patch sequences (SigLIP 2's NaFlex inputs, as ``Siglip2ImageProcessor`` returns
        them) with the draws of `generator`.

        Each image keeps its own patch grid, ``spatial_shapes[i] = (rows, columns)``, row-major at the start of its
        sequence. Mixing works on whole patches, on the part of the grid that image ``i`` and its partner ``j`` share
        (rows and columns below both grids' sizes), so that every patch taken from ``j`` comes from the same grid
        position in ``j``: ``token_cutmix`` pastes a box of ``j``'s patches into that region, ``token_mix`` a random
        subset of them, ``mixup`` blends them. Patches outside the shared region and padded patches stay ``i``'s own.
        In ``batch`` mode the batch shares lambda (and the cut-or-Mixup choice); each image gets its own box. Pixel
        boxes (``cutmix``) would cut through patches, whose pixels the sequences hold flattened: they are refused.

        Args:
            pixel_values: `(B, N, C * P * P)` patch sequences padded to N.
            pixel_attention_mask: `(B, N)`, 1 for the image's patches, 0 for padding.
            spatial_shapes: `(B, 2)` integer patch grid (rows, columns) of each image.
            generator: a CPU `torch.Generator`.

        Returns:
            ``pixel_values`` (a new tensor, the input is left alone), ``mix_index`` `(B,)`, ``token_weights``
            `(B, N)` float32 (the share of each patch from the sample itself; 1 at padded positions, which the model
            masks out) and ``mix_lam`` `(B,)` float32, the mean of ``token_weights`` over each image's real patches.
        """
        grids = self._check_patch_sequences(pixel_values, pixel_attention_mask, spatial_shapes, generator)
        batch_size, num_positions = pixel_attention_mask.shape
        token_weights = torch.ones(batch_size, num_positions)
        mix_index = torch.arange(batch_size)
        mixed_pixels = pixel_values.clone()
        if self.settings.mixing_method != "none" and batch_size > 1:
            mix_index, own_shares = self._draw_patch_sequence_mixing(grids, generator)
            for index, (partner, shares) in enumerate(zip(mix_index.tolist(), own_shares)):
                if shares is not None:
                    _mix_patch_grids(mixed_pixels, pixel_values, index, partner, grids, shares)
                    token_weights[index, : grids[index][0] * grids[index][1]] = _pad_grid(shares, grids[index]).flatten()
        real = pixel_attention_mask.detach().cpu().float()
        mix_lam = (token_weights * real).sum(1) / real.sum(1)
        return self._batch_contract(mixed_pixels, mix_index, token_weights, mix_lam)

    def _check_patch_sequences(self, pixel_values, pixel_attention_mask, spatial_shapes, generator) -> list[tuple[int, int]]:
        """The `(rows, columns)` grid of each image, after checking the three inputs agree; raise otherwise."""
        if self.settings.mixing_method == "cutmix":
            raise ValueError(
                "mixing_method='cutmix' draws pixel boxes, which cut through patches; patch sequences (SigLIP 2 "
                "NaFlex) are mixed per patch: use mixing_method 'token_cutmix' (the TL-Align default), 'token_mix' "
                "or 'mixup'."
            )
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError("`generator` must be a CPU torch.Generator, e.g. mixing_generator(seed, step).")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 3 or not pixel_values.is_floating_point():
            raise TypeError(
                "`pixel_values` must be a float tensor of patch sequences (batch_size, num_patches, channels * "
                f"patch_size**2), got {getattr(pixel_values, 'shape', type(pixel_values).__name__)}."
            )
        batch_size, num_positions = pixel_values.shape[:2]
        if tuple(pixel_attention_mask.shape) != (batch_size, num_positions):
            raise ValueError(
                f"`pixel_attention_mask` must have shape {(batch_size, num_positions)}, got {tuple(pixel_attention_mask.shape)}."
            )
        if tuple(spatial_shapes.shape) != (batch_size, 2) or spatial_shapes.is_floating_point():
            raise ValueError(f"`spatial_shapes` must be a ({batch_size}, 2) integer tensor, got {tuple(spatial_shapes.shape)}.")
        grids = [tuple(grid) for grid in spatial_shapes.tolist()]
        real_patches = pixel_attention_mask.detach().cpu().bool()
        for index, (rows, columns) in enumerate(grids):
            expected = torch.arange(num_positions) < rows * columns
            if rows < 1 or columns < 1 or not torch.equal(real_patches[index], expected):
                raise ValueError(
                    f"Image {index}: spatial_shapes {(rows, columns)} must give its number of patches, which must be "
                    "the first entries of its pixel_attention_mask (as Siglip2ImageProcessor returns them)."
                )
        return grids

    def _draw_patch_sequence_mixing(self, grids: list[tuple[int, int]], generator: torch.Generator):
        """Partners `(B,)` and, per image, its `(rows, columns)` own shares on the region shared with its partner
        (float32), or `None` when it stays unmixed. Pairs in ``pair`` mode get the same draw, region and cut."""
        batch_size, mode = len(grids), self.settings.mix_mode
        draws = 1 if mode == "batch" else batch_size
        apply = torch.rand(draws, generator=generator) < self.settings.mix_prob
        use_cut = self._draw_use_cut(draws, generator)
        lam = self._draw_lam(use_cut, generator)
        mix_index = self._draw_pairing(batch_size, generator)
        draw_of = [0] * batch_size if mode == "batch" else list(range(batch_size))
        if mode == "pair":
            draw_of = pair_leaders(mix_index).tolist()
        shares_of_draw: dict[int, torch.Tensor] = {}
        own_shares = []
        for index, partner in enumerate(mix_index.tolist()):
            draw = draw_of[index]
            if partner == index or not apply[draw]:
                own_shares.append(None)
                continue
            shared = (min(grids[index][0], grids[partner][0]), min(grids[index][1], grids[partner][1]))
            key = draw if mode == "pair" else index  # the two images of a pair share their region and cut
            if key not in shares_of_draw:
                if use_cut[draw]:
                    cut = self._draw_grid_cut(lam[draw : draw + 1], shared, generator)
                    shares_of_draw[key] = (~cut).float()
                else:
                    shares_of_draw[key] = torch.full(shared, float(lam[draw]))
            own_shares.append(shares_of_draw[key])
        return mix_index, own_shares

    def _draw_grid_cut(self, lam: torch.Tensor, grid: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """Patches taken from the partner on a `(rows, columns)` grid: bool (rows, columns)."""
        if self.settings.mixing_method == "token_mix":
            token_mask, _ = random_token_mask(grid[0] * grid[1], lam, generator)
            return token_mask.view(grid)
        minmax = None if self.settings.cutmix_minmax is None else tuple(self.settings.cutmix_minmax)
        boxes, _ = cutmix_bbox_and_lam(grid, lam, generator, minmax, correct_lam=True)
        return box_pixel_mask(boxes, grid)[0]


def _pad_grid(shares: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`(r, c)` shares of the region shared with the partner -> `(rows, columns)` over the image's own grid (1 outside)."""
    full = torch.ones(grid)
    full[: shares.shape[0], : shares.shape[1]] = shares
    return full


def _mix_patch_grids(mixed: torch.Tensor, pixel_values: torch.Tensor, index: int, partner: int, grids, shares) -> None:
    """Write into ``mixed[index]`` the blend ``shares * own + (1 - shares) * partner`` of the patches of the shared
    region, each taken from the same grid position of both images (their sequences are row-major in their grids)."""
    rows, columns = shares.shape
    positions = torch.arange(rows)[:, None], torch.arange(columns)[None, :]
    own = (positions[0] * grids[index][1] + positions[1]).flatten()
    theirs = (positions[0] * grids[partner][1] + positions[1]).flatten()
    weights = shares.flatten().to(pixel_values.device, pixel_values.dtype)[:, None]
    mixed[index, own] = weights * pixel_values[index, own] + (1.0 - weights) * pixel_values[partner, theirs]
