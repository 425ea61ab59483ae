"""Every attention path with every backend the parent model accepts: eager, SDPA and flex attention.

Flex attention hands the attention function a `BlockMask`, not a tensor: the eager and explicit paths, which compute
the probabilities themselves, turn it into the element mask flex applies (`block_mask_keep`); the value channel
passes it to the flex kernel. On the CPU, torch runs flex attention forward only (no backward), so these tests run
without gradient; families whose parent refuses flex (BEiT, Swin) refuse it aligned too.
"""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import ViTForImageClassification

from tl_align_hf import mixed_soft_targets
from tl_align_hf.attention import block_mask_keep

from .reference import reference_cls_labels
from .test_families import max_reference_difference, tiny_family_model
from .tiny_models import NUM_LABELS, aligned_copy, mixed_batch, tiny_model

BACKENDS = ["eager", "sdpa", "flex_attention"]
PATHS = ["auto", "eager", "value_channel", "explicit"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """transformers compiles flex attention; start and leave each test with an empty compile cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def vit_reference_difference(attn_implementation: str, attention_path: str) -> tuple[float, float]:
    """(max |aligned target - full label-vector reference|, max |aligned_lam - mix_lam|) for a tiny ViT."""
    vanilla = tiny_model(ViTForImageClassification, "eager")
    aligned = aligned_copy(vanilla)
    aligned.set_attn_implementation(attn_implementation)
    aligned.tl_align_attention_path = attention_path
    batch = mixed_batch("fractional")
    mixing = {key: batch[key] for key in ("mix_index", "token_weights", "mix_lam")}
    with torch.no_grad():
        aligned_lam = aligned(batch["pixel_values"], **mixing).aligned_lam
        logits = aligned(batch["pixel_values"]).logits
        torch.testing.assert_close(logits, vanilla(batch["pixel_values"]).logits, rtol=1e-5, atol=1e-5)
    expected = reference_cls_labels(vanilla, batch, num_prefix_tokens=1, label_smoothing=0.1)
    rebuilt = mixed_soft_targets(batch["labels"], batch["mix_index"], aligned_lam, NUM_LABELS, 0.1)
    return (rebuilt.double() - expected).abs().max().item(), (aligned_lam - batch["mix_lam"]).abs().max().item()


@pytest.mark.parametrize("attention_path", PATHS)
@pytest.mark.parametrize("attn_implementation", BACKENDS)
def test_vit_every_path_with_every_backend_matches_reference(attn_implementation, attention_path):
    difference, moved = vit_reference_difference(attn_implementation, attention_path)
    assert difference < 1e-5
    assert moved > 1e-3  # alignment moved the target away from the area share


@pytest.mark.parametrize("attention_path", PATHS)
@pytest.mark.parametrize("attn_implementation", BACKENDS)
def test_siglip_every_path_with_every_backend_matches_reference(attn_implementation, attention_path):
    """SigLIP: no CLS token, mean read-out, and attention modules that drop the kwargs (hooked)."""
    difference, moved = max_reference_difference("siglip", attn_implementation, "fractional", attention_path)
    assert difference < 1e-5
    assert moved > 1e-3


@pytest.mark.parametrize("name", ["beit", "swin"])
def test_raises_error_when_family_parent_refuses_flex_attention(name):
    """The aligned model accepts exactly the backends its parent accepts: BEiT and Swin have no flex attention."""
    vanilla = tiny_family_model(name)
    aligned = aligned_copy(vanilla)
    for model in (vanilla, aligned):
        with pytest.raises(ValueError, match="[Ff]lex"):
            model.set_attn_implementation("flex_attention")


def _probabilities_through_flex(query, key, block_mask):
    """Flex attention's own probabilities: its output for identity values is the probability matrix."""
    identity = torch.eye(key.shape[-2]).expand(*key.shape[:2], -1, -1).contiguous()
    return flex_attention(query, key, identity, block_mask=block_mask)


@pytest.mark.parametrize(
    "mask_mod",
    [
        lambda b, h, q, kv: q >= kv,  # causal: full blocks below the diagonal, partial blocks on it
        lambda b, h, q, kv: (kv < 29 + 8 * b) & ((q - kv).abs() < 20),  # per-sample padding and a window
    ],
    ids=["causal", "padding_window"],
)
def test_block_mask_keep_is_the_mask_flex_attention_applies(mask_mod):
    """With blocks of 8 over 37 tokens the mask has full, partial and absent blocks, and a ragged last block."""
    generator = torch.Generator().manual_seed(0)
    query, key = (torch.randn(2, 2, 37, 8, generator=generator) for _ in range(2))
    block_mask = create_block_mask(mask_mod, B=2, H=None, Q_LEN=37, KV_LEN=37, device="cpu", BLOCK_SIZE=8)
    assert block_mask.full_kv_num_blocks is not None and int(block_mask.full_kv_num_blocks.sum()) > 0
    keep = block_mask_keep(block_mask, 37, 37)
    assert keep.shape == (2, 1, 37, 37) and not keep.all()
    scores = (query @ key.transpose(-1, -2) / 8**0.5).masked_fill(~keep, float("-inf"))
    with torch.no_grad():
        torch.testing.assert_close(scores.softmax(-1), _probabilities_through_flex(query, key, block_mask))
