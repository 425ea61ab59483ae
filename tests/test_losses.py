"""The mixed loss without a (B, C) target equals the soft-target cross-entropy against the mixed target."""

import pytest
import torch

from tl_align_hf import mixed_soft_targets, mixing_loss, soft_target_cross_entropy


def _batch(batch_size: int, num_classes: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch_size, num_classes, generator=generator)).to(dtype).requires_grad_()
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    mix_index = torch.randperm(batch_size, generator=generator)
    own_share = torch.rand(batch_size, generator=generator)
    own_share[0] = 1.0  # an unmixed sample
    return logits, labels, mix_index, own_share


@pytest.mark.parametrize("num_classes", [2, 10, 21841])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mixing_loss_equals_soft_target_cross_entropy_with_its_gradient(num_classes, label_smoothing, reduction):
    logits, labels, mix_index, own_share = _batch(16, num_classes)
    loss = mixing_loss(logits, labels, mix_index, own_share, label_smoothing, reduction)
    (gradient,) = torch.autograd.grad(loss, logits)
    targets = mixed_soft_targets(labels, mix_index, own_share, num_classes, label_smoothing)
    expected = soft_target_cross_entropy(logits, targets, reduction)
    (expected_gradient,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-6, atol=1e-7)


def test_mixing_loss_equals_two_label_smoothed_cross_entropies():
    logits, labels, mix_index, own_share = _batch(32, 1000)
    cross_entropy = torch.nn.functional.cross_entropy
    own = cross_entropy(logits, labels, reduction="none", label_smoothing=0.1)
    partner = cross_entropy(logits, labels[mix_index], reduction="none", label_smoothing=0.1)
    expected = (own_share * own + (1 - own_share) * partner).mean()
    torch.testing.assert_close(mixing_loss(logits, labels, mix_index, own_share, 0.1), expected, rtol=1e-6, atol=1e-6)


def test_mixing_loss_of_bfloat16_logits_is_computed_in_float32():
    logits, labels, mix_index, own_share = _batch(8, 100, dtype=torch.bfloat16)
    loss = mixing_loss(logits, labels, mix_index, own_share, 0.1)
    targets = mixed_soft_targets(labels, mix_index, own_share, 100, 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, soft_target_cross_entropy(logits.float(), targets), rtol=1e-6, atol=1e-6)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16


def test_raises_error_when_reduction_is_unknown():
    logits, labels, mix_index, own_share = _batch(4, 10)
    with pytest.raises(ValueError, match="`reduction` must be 'mean' or 'sum'"):
        mixing_loss(logits, labels, mix_index, own_share, 0.1, reduction="none")
