"""Tiny ViT / DeiT models and mixed batches for fast CPU tests."""

from __future__ import annotations

import copy

import torch
from transformers import DeiTConfig, ViTConfig

from tl_align_hf.models import aligned_classes
from tl_align_hf.support.transforms import default_image_processor

ALIGNED_CLASSES = aligned_classes()  # every supported class -> its aligned class (timm's included)

IMAGE_SIZE, PATCH_SIZE, NUM_LABELS = 24, 4, 10
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
TINY_IMAGE_SIZE = 16  # the digits image folders of the example-script tests

FAMILIES = {
    "vit": (ViTConfig, 1),
    "deit": (DeiTConfig, 2),
}


def tiny_config(family: str = "vit", attn_implementation: str = "eager", **overrides):
    config_class, _ = FAMILIES[family]
    values = dict(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=NUM_LABELS,
        initializer_range=0.02,
    )
    values.update(overrides)
    config = config_class(**values)
    config._attn_implementation = attn_implementation
    return config


def sharpen_attention(model: torch.nn.Module, std: float = 0.6, seed: int = 0) -> None:
    """Large query/key weights make attention far from uniform, so that alignment visibly moves the shares."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def tiny_model(parent_class, attn_implementation: str = "eager", seed: int = 0, **overrides):
    """A parent-class model with sharp attention, deterministic weights, in eval mode."""
    family = "deit" if "DeiT" in parent_class.__name__ else "vit"
    torch.manual_seed(seed)
    model = parent_class(tiny_config(family, attn_implementation, **overrides))
    sharpen_attention(model, seed=seed)
    return model.eval()


def aligned_copy(model):
    """The aligned subclass with the same config and weights."""
    aligned = ALIGNED_CLASSES[type(model)](copy.deepcopy(model.config))
    aligned.load_state_dict(model.state_dict())
    return aligned.eval()


def mixed_batch(kind: str, batch_size: int = 4, num_patches: int = NUM_PATCHES, image_hw=(IMAGE_SIZE, IMAGE_SIZE), seed: int = 0):
    """A batch contract with `fractional`, `binary` (0/1) or `constant` (Mixup) token weights."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, *image_hw, generator=generator)
    labels = torch.randint(0, NUM_LABELS, (batch_size,), generator=generator)
    mix_index = torch.randperm(batch_size, generator=generator)
    if kind == "fractional":
        token_weights = torch.rand(batch_size, num_patches, generator=generator)
    elif kind == "binary":
        token_weights = (torch.rand(batch_size, num_patches, generator=generator) > 0.4).float()
    elif kind == "constant":
        token_weights = torch.rand(batch_size, 1, generator=generator).expand(-1, num_patches).contiguous()
    else:
        raise ValueError(kind)
    mix_lam = token_weights.mean(dim=1)
    return dict(pixel_values=pixel_values, labels=labels, mix_index=mix_index, token_weights=token_weights, mix_lam=mix_lam)


def write_tiny_checkpoint(folder):
    """A tiny ViT for 16 px digits (10 labels, sharp attention) and its image processor, saved to `folder`."""
    from transformers import ViTForImageClassification

    model = tiny_model(ViTForImageClassification, "eager", image_size=TINY_IMAGE_SIZE, num_hidden_layers=2)
    model.save_pretrained(folder)
    default_image_processor(TINY_IMAGE_SIZE).save_pretrained(folder)
    return folder


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and values), to compare weights across processes."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
