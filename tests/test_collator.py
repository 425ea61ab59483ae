"""Tests of TLAlignMixer and TLAlignCollator: the batch contract checked against the mixed pixels, randomness, bad input.

Images are built so that each pixel names its source: pixel (h, w) of sample i holds `i * H * W + h * W + w` in every
channel. A cut-style mix copies whole pixels, so `value // (H * W)` is the sample a pixel came from and
`value % (H * W)` the place it came from; Mixup gives `lam * x_i + (1 - lam) * x_j`.
"""

import doctest
import logging
import math
import pickle
import types

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import ViTConfig

import tl_align_hf.collator
import tl_align_hf.mixer
from tl_align_hf import MixingSettings, TLAlignCollator, TLAlignMixer, mixing_generator

HEIGHT, WIDTH, PATCH = 12, 20, 4
NUM_TOKENS = (HEIGHT // PATCH) * (WIDTH // PATCH)
CUT_METHODS = ["cutmix", "token_cutmix", "token_mix"]
MODES = ["batch", "pair", "elem"]


def _image(sample: int, height: int = HEIGHT, width: int = WIDTH, channels: int = 3) -> torch.Tensor:
    positions = torch.arange(height * width, dtype=torch.float32).view(1, height, width)
    return (positions + sample * height * width).expand(channels, height, width).clone()


def _examples(batch_size: int, height: int = HEIGHT, width: int = WIDTH) -> list[dict]:
    return [
        {"pixel_values": _image(i, height, width), "label": (7 * i) % 10, "image_id": f"img{i}"}
        for i in range(batch_size)
    ]


def _collator(method: str = "cutmix", **kwargs) -> TLAlignCollator:
    """A collator from flat keywords: mixing settings, mixer arguments and collator arguments."""
    if method == "mixup":
        kwargs.setdefault("mixup_alpha", 1.0)
    mixer_kwargs = {name: kwargs.pop(name) for name in ("image_size", "pairing") if name in kwargs}
    patch_size = kwargs.pop("patch_size", PATCH)
    collator_kwargs = {name: kwargs.pop(name) for name in ("num_labels", "seed", "rank") if name in kwargs}
    collator_kwargs.setdefault("seed", 0)
    mixer = TLAlignMixer(MixingSettings(mixing_method=method, **kwargs), patch_size, **mixer_kwargs)
    return TLAlignCollator(mixer, **collator_kwargs)


def _draws(collator: TLAlignCollator, examples: list[dict], count: int):
    """`count` batches of the same examples, each in a new epoch (the draws are a function of epoch and content)."""
    for epoch in range(count):
        collator.set_epoch(epoch)
        yield collator(examples)


def _sources(pixels: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) cut-mixed encoded pixels -> (B, H, W) index of the sample each pixel came from."""
    height, width = pixels.shape[-2:]
    assert torch.equal(pixels, pixels.round()), "a cut-style mix must copy pixels exactly"
    assert torch.equal(pixels, pixels[:, :1].expand_as(pixels)), "all channels must come from the same source"
    positions = torch.arange(height * width, dtype=pixels.dtype).view(height, width)
    assert torch.equal(pixels[:, 0] % (height * width), positions.expand_as(pixels[:, 0])), "pasted from elsewhere"
    return (pixels[:, 0] // (height * width)).long()


def _own_share_per_patch(sources: torch.Tensor, patch_size=(PATCH, PATCH), samples=None) -> torch.Tensor:
    """Share of each patch's pixels from the sample itself (`samples`, default 0..B-1), counted from pixels: (B, N)."""
    batch_size, height, width = sources.shape
    samples = torch.arange(batch_size) if samples is None else samples
    own = sources == samples.view(-1, 1, 1)
    grid = own.view(batch_size, height // patch_size[0], patch_size[0], width // patch_size[1], patch_size[1])
    return grid.float().mean((2, 4)).flatten(1)


def _check_contract(batch: dict, examples: list[dict], num_tokens: int = NUM_TOKENS) -> None:
    batch_size = len(examples)
    assert list(batch) == ["pixel_values", "labels", "mix_index", "token_weights", "mix_lam"]
    assert batch["pixel_values"].shape == (batch_size, *examples[0]["pixel_values"].shape)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.int64 and batch["mix_index"].dtype == torch.int64
    assert batch["labels"].tolist() == [example["label"] for example in examples]
    assert batch["mix_index"].shape == (batch_size,)
    assert batch["token_weights"].shape == (batch_size, num_tokens) and batch["token_weights"].dtype == torch.float32
    assert batch["mix_lam"].shape == (batch_size,) and batch["mix_lam"].dtype == torch.float32
    assert ((batch["token_weights"] >= 0) & (batch["token_weights"] <= 1)).all()
    torch.testing.assert_close(batch["mix_lam"], batch["token_weights"].mean(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", CUT_METHODS)
@pytest.mark.parametrize("batch_size", [2, 5, 8])
def test_cut_methods_token_weights_match_the_mixed_pixels(method, mode, batch_size):
    collator = _collator(method, mix_mode=mode)
    examples = _examples(batch_size)
    for batch in _draws(collator, examples, 6):
        _check_contract(batch, examples)
        sources = _sources(batch["pixel_values"])
        own = sources == torch.arange(batch_size).view(-1, 1, 1)
        assert (own | (sources == batch["mix_index"].view(-1, 1, 1))).all(), "other pixels come from mix_index"
        torch.testing.assert_close(batch["token_weights"], _own_share_per_patch(sources), rtol=0, atol=1e-6)
        if method != "cutmix":
            assert set(batch["token_weights"].unique().tolist()) <= {0.0, 1.0}


def test_cutmix_shares_are_fractional_at_box_edges():
    collator = _collator("cutmix", mix_mode="elem", patch_size=4)
    token_weights = torch.cat([batch["token_weights"] for batch in _draws(collator, _examples(8), 5)])
    assert ((token_weights > 0) & (token_weights < 1)).any()


def test_batch_mode_uses_one_box_for_the_whole_batch():
    collator = _collator("cutmix", mix_mode="batch")
    for batch in _draws(collator, _examples(6), 5):
        pasted = _sources(batch["pixel_values"]) != torch.arange(6).view(-1, 1, 1)
        assert (pasted == pasted[:1]).all()


@pytest.mark.parametrize("mode", MODES)
def test_mixup_blends_pixels_with_the_partner_by_mix_lam(mode):
    collator = _collator("mixup", mix_mode=mode)
    examples = _examples(5)
    stacked = torch.stack([example["pixel_values"] for example in examples])
    for batch in _draws(collator, examples, 4):
        _check_contract(batch, examples)
        lam = batch["mix_lam"].view(-1, 1, 1, 1)
        expected = lam * stacked + (1 - lam) * stacked[batch["mix_index"]]
        torch.testing.assert_close(batch["pixel_values"], expected, rtol=1e-5, atol=1e-3)
        assert torch.equal(batch["token_weights"], batch["mix_lam"][:, None].expand(-1, NUM_TOKENS))
        assert (batch["mix_lam"] < 1).all()


@pytest.mark.parametrize("mode", MODES)
def test_cutmix_switches_to_mixup_with_switch_prob(mode):
    collator = _collator("token_mix", mixup_alpha=1.0, switch_prob=0.3, mix_mode=mode)
    examples = _examples(4)
    stacked = torch.stack([example["pixel_values"] for example in examples])
    cut_count = total = 0
    for batch in _draws(collator, examples, 150):
        _check_contract(batch, examples)
        pixels, lam = batch["pixel_values"], batch["mix_lam"]
        is_cut = (pixels == pixels.round()).flatten(1).all(1)
        own_shares = _own_share_per_patch(_sources(pixels[is_cut]), samples=torch.arange(4)[is_cut])
        torch.testing.assert_close(batch["token_weights"][is_cut], own_shares, rtol=0, atol=1e-6)
        mixup_lam = lam[~is_cut].view(-1, 1, 1, 1)
        expected = mixup_lam * stacked[~is_cut] + (1 - mixup_lam) * stacked[batch["mix_index"][~is_cut]]
        torch.testing.assert_close(pixels[~is_cut], expected, rtol=1e-5, atol=1e-3)
        cut_count += int(is_cut.sum()) if mode == "elem" else int(is_cut[0])
        total += 4 if mode == "elem" else 1
    _assert_binomial(cut_count, total, 0.3)


def _assert_binomial(successes: int, trials: int, p: float) -> None:
    sigma = math.sqrt(trials * p * (1 - p))
    assert abs(successes - trials * p) <= 4 * sigma, f"{successes}/{trials} is not within 4 sigma of p={p}"


@pytest.mark.parametrize("prob", [0.0, 0.3, 0.8])
def test_prob_leaves_batches_unmixed_at_the_right_rate(prob):
    collator = _collator("mixup", mix_prob=prob)
    examples = _examples(4)
    stacked = torch.stack([example["pixel_values"] for example in examples])
    mixed_batches = 0
    for batch in _draws(collator, examples, 300):
        mixed = (batch["mix_lam"] < 1).all()
        if not mixed:
            assert torch.equal(batch["pixel_values"], stacked)
            assert torch.equal(batch["token_weights"], torch.ones(4, NUM_TOKENS))
            assert torch.equal(batch["mix_lam"], torch.ones(4))
            assert batch["mix_index"].tolist() == [0, 1, 2, 3]
        mixed_batches += int(mixed)
    _assert_binomial(mixed_batches, 300, prob)


@pytest.mark.parametrize("mode", ["pair", "elem"])
def test_prob_leaves_samples_unmixed_at_the_right_rate_per_element(mode):
    collator = _collator("cutmix", cutmix_minmax=(0.3, 0.6), mix_prob=0.4, mix_mode=mode)
    examples = _examples(6)
    mixed_samples = 0
    for batch in _draws(collator, examples, 150):
        _check_contract(batch, examples)
        mixed = batch["mix_lam"] < 1
        unmixed_sources = _sources(batch["pixel_values"][~mixed])
        assert torch.equal(unmixed_sources, torch.arange(6)[~mixed].view(-1, 1, 1).expand_as(unmixed_sources))
        assert (batch["mix_index"][~mixed] == torch.arange(6)[~mixed]).all()
        mixed_samples += int(mixed.sum())
    # in pair mode both members of a pair share one draw: 3 independent draws per batch of 6
    draws, scale = (450, 2) if mode == "pair" else (900, 1)
    _assert_binomial(mixed_samples // scale, draws, 0.4)


def test_pair_mode_mixes_mutual_pairs_with_one_draw():
    collator = _collator("cutmix", mix_mode="pair")
    for batch_size in (6, 7):
        batch = collator(_examples(batch_size))
        mix_index, mix_lam = batch["mix_index"], batch["mix_lam"]
        positions = torch.arange(batch_size)
        mutual = mix_index[mix_index] == positions
        assert int((~mutual).sum()) == batch_size % 2
        assert torch.equal(mix_lam[mutual], mix_lam[mix_index][mutual])
        assert (mix_index != positions).all(), "the odd one out is mixed one way"


def test_flip_pairing_leaves_the_middle_of_an_odd_batch_unmixed():
    batch = _collator("mixup", pairing="flip")(_examples(5))
    assert batch["mix_index"].tolist() == [4, 3, 2, 1, 0]
    assert batch["mix_lam"][2] == 1 and (batch["mix_lam"][[0, 1, 3, 4]] < 1).all()
    assert torch.equal(batch["pixel_values"][2], _image(2))


@pytest.mark.parametrize("method", ["cutmix", "token_cutmix", "token_mix", "mixup", "none"])
def test_batch_of_one_is_returned_unmixed(method):
    batch = _collator(method)(_examples(1))
    assert torch.equal(batch["pixel_values"], _image(0).unsqueeze(0))
    assert batch["mix_index"].tolist() == [0] and batch["mix_lam"].tolist() == [1.0]
    assert torch.equal(batch["token_weights"], torch.ones(1, NUM_TOKENS))


def test_method_none_stacks_without_mixing():
    examples = _examples(4)
    batch = _collator("none")(examples)
    _check_contract(batch, examples)
    assert torch.equal(batch["pixel_values"], torch.stack([example["pixel_values"] for example in examples]))
    assert (batch["mix_lam"] == 1).all()


def test_non_square_images_and_patches_are_supported():
    examples = _examples(4, height=8, width=18)
    collator = _collator("cutmix", patch_size=(4, 6), image_size=(8, 18), mix_mode="elem")
    for batch in _draws(collator, examples, 4):
        _check_contract(batch, examples, num_tokens=6)
        expected = _own_share_per_patch(_sources(batch["pixel_values"]), patch_size=(4, 6))
        torch.testing.assert_close(batch["token_weights"], expected, rtol=0, atol=1e-6)


def test_correct_lam_false_keeps_the_drawn_lam_for_cutmix():
    collator = _collator("cutmix", correct_lam=False, mix_mode="elem")
    batches = list(_draws(collator, _examples(8), 5))
    differences = torch.cat([batch["mix_lam"] - batch["token_weights"].mean(1) for batch in batches])
    assert differences.abs().max() > 1e-3
    for batch in batches:  # token_weights stay exact
        torch.testing.assert_close(batch["token_weights"], _own_share_per_patch(_sources(batch["pixel_values"])))


def test_cutmix_minmax_bounds_the_box_sides():
    collator = _collator("cutmix", cutmix_minmax=(0.25, 0.5), mix_mode="elem", image_size=(HEIGHT, WIDTH))
    for batch in _draws(collator, _examples(6), 5):
        pasted = _sources(batch["pixel_values"]) != torch.arange(6).view(-1, 1, 1)
        heights, widths = pasted.any(2).sum(1), pasted.any(1).sum(1)
        assert ((heights >= 3) & (heights < 6) & (widths >= 5) & (widths < 10)).all()


def test_accepts_numpy_arrays_labels_key_and_tensor_labels():
    examples = [
        {"pixel_values": _image(0).numpy(), "labels": np.int64(3)},
        {"pixel_values": _image(1).numpy(), "labels": torch.tensor(4)},
        {"pixel_values": _image(2).numpy(), "labels": np.array(5)},
        {"pixel_values": _image(3).numpy(), "labels": 6, "extra": [1, 2]},
    ]
    batch = _collator("cutmix", num_labels=7)(examples)
    assert batch["labels"].tolist() == [3, 4, 5, 6] and batch["labels"].dtype == torch.int64
    _own_share_per_patch(_sources(batch["pixel_values"]))


def test_same_seed_gives_the_same_batches_and_other_seeds_differ():
    examples = _examples(6)
    first, second, other = _collator(seed=1), _collator(seed=1), _collator(seed=2)
    batches = [list(_draws(collator, examples, 3)) for collator in (first, second, other)]
    for a, b in zip(batches[0], batches[1]):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert any(not torch.equal(a["token_weights"], c["token_weights"]) for a, c in zip(batches[0], batches[2]))


def test_draws_are_a_function_of_seed_rank_epoch_and_content():
    """No state: calling again, from a fresh or pickled copy, gives the same batch; any of the four changes it."""
    collator = _collator("cutmix", mixup_alpha=0.5, mix_mode="elem", seed=3)
    examples = _examples(6)
    first = collator(examples)
    for same in (collator(examples), _collator("cutmix", mixup_alpha=0.5, mix_mode="elem", seed=3)(examples),
                 pickle.loads(pickle.dumps(collator))(examples)):
        assert all(torch.equal(first[key], same[key]) for key in first)
    other_content = _examples(6)
    other_content[0]["label"] = 9
    changed = [_collator("cutmix", mixup_alpha=0.5, mix_mode="elem", seed=4)(examples),
               _collator("cutmix", mixup_alpha=0.5, mix_mode="elem", seed=3, rank=1)(examples),
               collator(other_content)]
    collator.set_epoch(1)
    changed.append(collator(examples))
    for batch in changed:
        assert not torch.equal(batch["token_weights"], first["token_weights"])


def test_seed_none_follows_torch_manual_seed():
    torch.manual_seed(123)
    first = _collator(seed=None)(_examples(6))
    torch.manual_seed(123)
    second = _collator(seed=None)(_examples(6))
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_ranks_draw_different_streams(monkeypatch):
    examples = _examples(8)
    rank0, rank1 = _collator(rank=0)(examples), _collator(rank=1)(examples)
    assert not torch.equal(rank0["token_weights"], rank1["token_weights"])
    monkeypatch.setenv("RANK", "1")
    from_env = _collator()(examples)
    assert torch.equal(from_env["token_weights"], rank1["token_weights"])


class _NumberedDataset(Dataset):
    """16 different 8x8 examples."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": _image(index, 8, 8), "label": index % 4}


def _epoch(loader: DataLoader, epoch: int) -> list[torch.Tensor]:
    loader.collate_fn.set_epoch(epoch)
    return [torch.cat([batch["token_weights"].flatten(), batch["mix_index"].float()]) for batch in loader]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_dataloader_workers_draw_what_the_main_process_draws(num_workers):
    collator = _collator("cutmix", patch_size=2, seed=0, mix_mode="elem")
    in_process = DataLoader(_NumberedDataset(), batch_size=4, collate_fn=collator)
    in_workers = DataLoader(_NumberedDataset(), batch_size=4, num_workers=num_workers, collate_fn=collator)
    first_epoch = _epoch(in_process, 0)
    assert all(torch.equal(a, b) for a, b in zip(first_epoch, _epoch(in_workers, 0)))
    assert len({tuple(batch.tolist()) for batch in first_epoch}) == 4, "batches repeat each other"
    second_epoch = _epoch(in_workers, 1)
    assert all(not torch.equal(a, b) for a, b in zip(first_epoch, second_epoch)), "the second epoch repeats the first"


def test_collate_unmixed_stacks_without_mixing():
    collator = _collator("cutmix", num_labels=10)
    examples = _examples(4)
    batch = collator.collate_unmixed(examples)
    assert list(batch) == ["pixel_values", "labels"]
    assert torch.equal(batch["pixel_values"], torch.stack([example["pixel_values"] for example in examples]))
    assert batch["labels"].tolist() == [example["label"] for example in examples]
    unlabelled = collator.collate_unmixed([{"pixel_values": _image(0)}, {"pixel_values": _image(1)}])
    assert list(unlabelled) == ["pixel_values"]


def test_label_column_name_picks_the_label_key():
    examples = [{"pixel_values": _image(i), "label": 0, "fine_label": i + 3} for i in range(3)]
    batch = _collator(num_labels=10)(examples)
    assert batch["labels"].tolist() == [0, 0, 0]
    collator = TLAlignCollator(_collator().mixer, num_labels=10, seed=0, label_column_name="fine_label")
    assert collator(examples)["labels"].tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match=r"example 0 has no 'coarse' key"):
        TLAlignCollator(_collator().mixer, label_column_name="coarse")(examples)


def test_mixer_mixes_a_stacked_batch_or_a_list_alike_in_any_float_dtype():
    mixer = TLAlignMixer(MixingSettings(mixing_method="cutmix"), PATCH)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        images = [_image(i).to(dtype) for i in range(5)]
        stacked = torch.stack(images)
        batch = mixer(stacked, mixing_generator(0, 1))
        from_list = mixer(images, mixing_generator(0, 1))
        assert all(torch.equal(batch[key], from_list[key]) for key in batch)
        assert torch.equal(stacked, torch.stack(images)) and batch["pixel_values"].dtype == dtype  # input untouched
        assert batch["token_weights"].dtype == torch.float32 and batch["mix_index"].dtype == torch.int64
        if dtype == torch.float32:
            expected = _own_share_per_patch(_sources(batch["pixel_values"]))
            torch.testing.assert_close(batch["token_weights"], expected, rtol=0, atol=1e-6)


def test_mixing_generator_is_a_pure_function_of_its_integers():
    draw = lambda *keys: torch.rand(4, generator=mixing_generator(*keys)).tolist()  # noqa: E731
    assert draw(0, 1, 2) == draw(0, 1, 2)
    assert len({tuple(draw(*keys)) for keys in [(0, 1, 2), (0, 2, 1), (1, 1, 2), (0, 1), (0, 1, 3)]}) == 5
    with pytest.raises(ValueError, match="non-negative integers"):
        mixing_generator(0, -1)


def test_raises_error_when_mixer_gets_wrong_input():
    mixer = TLAlignMixer(MixingSettings(), PATCH)
    with pytest.raises(TypeError, match=r"float tensor of shape \(B, C, H, W\)"):
        mixer(torch.zeros(3, 12, 20), mixing_generator(0))
    with pytest.raises(TypeError, match="must be a CPU torch.Generator"):
        mixer(torch.zeros(2, 3, 12, 20), 0)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        mixer(torch.zeros(2, 3, 12, 18), mixing_generator(0))
    with pytest.raises(TypeError, match="must be a MixingSettings"):
        TLAlignMixer({"mixing_method": "cutmix"})


def test_batch_of_one_warns_once_that_mixing_needs_two_images(caplog):
    import transformers

    logging.Logger.warning_once.cache_clear()  # transformers' warning_once remembers the messages of the process
    transformers.utils.logging.enable_propagation()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()  # other tests may have silenced transformers' loggers
    collator = _collator("cutmix")
    try:
        with caplog.at_level("WARNING", logger="tl_align_hf"):
            collator(_examples(1))
            collator(_examples(1))
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    assert sum("mixing needs at least two images" in record.message for record in caplog.records) == 1


def test_from_model_reads_patch_size_image_size_and_num_labels():
    config = ViTConfig(image_size=[16, 24], patch_size=4, num_labels=5)
    collator = TLAlignCollator.from_model(types.SimpleNamespace(config=config), mixing_method="mixup", mixup_alpha=0.8)
    assert (collator.mixer.patch_size, collator.mixer.image_size, collator.num_labels) == ((4, 4), (16, 24), 5)
    assert collator.mixer.settings.mixing_method == "mixup"
    assert TLAlignCollator.from_model(config, image_size=None).mixer.image_size is None
    batch = collator([{"pixel_values": torch.rand(3, 16, 24), "label": i} for i in range(3)])
    assert batch["token_weights"].shape == (3, 24)


@pytest.mark.parametrize("module", [tl_align_hf.collator, tl_align_hf.mixer])
def test_docstring_example_runs(module):
    results = doctest.testmod(module)
    assert results.attempted > 0 and results.failed == 0


BAD_ARGUMENTS = [
    ({"mixing_method": "cutout"}, r"`mixing_method` \(--mixing_method\) must be one of"),
    ({"mix_mode": "sample"}, r"`mix_mode` \(--mix_mode\) must be one of"),
    ({"pairing": "roll"}, "`pairing` must be one of permutation, flip"),
    ({"cutmix_alpha": -1.0}, r"`cutmix_alpha` \(--cutmix_alpha\) must be a number >= 0"),
    ({"mixup_alpha": float("nan")}, "`mixup_alpha` .* must be a number"),
    ({"mix_prob": 1.5}, r"`mix_prob` \(--mix_prob\) must be a number in \[0.0, 1.0\]"),
    ({"switch_prob": -0.1}, "`switch_prob` .* must be a number"),
    ({"cutmix_minmax": (0.8, 0.2)}, "`cutmix_minmax` .* must be"),
    ({"mixing_method": "token_mix", "cutmix_minmax": (0.2, 0.8)}, "`cutmix_minmax` is used by"),
    ({"cutmix_alpha": 0.0}, "needs `cutmix_alpha` > 0"),
    ({"mixing_method": "mixup", "mixup_alpha": 0.0}, "needs `mixup_alpha` > 0"),
    ({"patch_size": 0}, "`patch_size` must be a positive int"),
    ({"image_size": (12, 18)}, "image_size 12x18 is not divisible by patch_size"),
    ({"num_labels": 0}, "`num_labels` must be None or an int >= 1"),
    ({"seed": -1}, "`seed` must be None or an int >= 0"),
]


@pytest.mark.parametrize("kwargs, message", BAD_ARGUMENTS)
def test_raises_error_when_arguments_are_invalid(kwargs, message):
    method = kwargs.pop("mixing_method", "cutmix")
    with pytest.raises(ValueError, match=message):
        _collator(method, **kwargs)


def test_raises_error_when_pixel_values_are_missing():
    with pytest.raises(
        ValueError, match=r"example 1 has no 'pixel_values' key \(keys present: \['image', 'label'\]\)"
    ):
        _collator()([_examples(1)[0], {"image": None, "label": 1}])


def test_raises_error_when_label_is_missing():
    with pytest.raises(ValueError, match=r"no 'labels' or 'label' key \(keys present: \['pixel_values'\]\)"):
        _collator()([{"pixel_values": _image(0)}])


def test_raises_error_when_images_have_different_sizes():
    examples = _examples(3)
    examples[2]["pixel_values"] = _image(2, height=8)
    with pytest.raises(ValueError, match=r"example 2 has shape \(3, 8, 20\) but example 0 has \(3, 12, 20\)"):
        _collator()(examples)


def test_raises_error_when_image_size_is_not_divisible_by_patch_size():
    with pytest.raises(ValueError, match="image size 12x18 is not divisible by patch_size 4x4"):
        _collator()(_examples(2, width=18))


def test_raises_error_when_images_do_not_match_image_size():
    with pytest.raises(ValueError, match="pixel_values are 12x20 but image_size is 16x16"):
        _collator(image_size=16)(_examples(2))


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.zeros(3, 12, 20, dtype=torch.uint8), r"must be a float tensor .* got torch.uint8"),
        (torch.zeros(12, 20), r"shape \(C, H, W\), got torch.float32 tensor of shape \(12, 20\)"),
        ([[0.0] * 20] * 12, "got <class 'list'>"),
    ],
)
def test_raises_error_when_pixel_values_are_not_float_chw(pixel_values, message):
    with pytest.raises(TypeError, match=message):
        _collator()([{"pixel_values": pixel_values, "label": 0}])


@pytest.mark.parametrize("label", [1.0, "cat", torch.tensor(1.0), True, [1, 0]])
def test_raises_error_when_labels_are_not_integers(label):
    examples = _examples(2)
    examples[1]["label"] = label
    with pytest.raises(TypeError, match="labels must be integer class ids, but example 1 has label"):
        _collator()(examples)


@pytest.mark.parametrize("label, num_labels", [(10, 10), (-1, None)])
def test_raises_error_when_labels_are_out_of_range(label, num_labels):
    examples = _examples(2)
    examples[0]["label"] = label
    with pytest.raises(ValueError, match=rf"labels \[{label}\] are outside"):
        _collator(num_labels=num_labels)(examples)


def test_raises_error_when_batch_is_empty():
    with pytest.raises(ValueError, match="non-empty list of examples"):
        _collator()([])


def test_raises_error_when_model_config_has_no_patch_size():
    with pytest.raises(ValueError, match="has no patch_size; pass patch_size="):
        TLAlignCollator.from_model(types.SimpleNamespace(num_labels=3))
