"""Max abs difference between TL-Align targets and the full label-vector reference of the tests, per case.

    python scripts/check_equivalence.py            # transformers' ViT and DeiT, then the timm backbones
    python scripts/check_equivalence.py --timm     # the timm backbones only (Eva, BEiT, Swin, Swin V2)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_modeling import max_reference_difference  # noqa: E402
from tests.test_new_families import FAMILY_BACKENDS  # noqa: E402
from tests.test_new_families import max_reference_difference as new_family_difference  # noqa: E402
from tests.test_timm_backbones import (  # noqa: E402
    ATTENTION_KINDS,
    EXPLICIT_ONLY,
    VARIANTS,
    aligned_backbone,
    backbone_batch,
    tiny_backbone,
)
from tests.test_timm_backbones import max_reference_difference as timm_reference_difference  # noqa: E402


def transformers_rows() -> list[str]:
    rows = []
    for family in ("vit", "deit"):
        for backend in ("eager", "sdpa"):
            for kind in ("fractional", "binary", "constant"):
                d, moved = max_reference_difference(family, backend, kind)
                rows.append(f"| {family} | {backend} | auto | {kind} | {d:.2e} | {moved:.3f} |")
    for backend in ("eager", "sdpa"):
        for path in ("eager", "value_channel", "explicit"):
            d, moved = max_reference_difference("deit", backend, "fractional", path)
            rows.append(f"| deit | {backend} | {path} | fractional | {d:.2e} | {moved:.3f} |")
    for family in ("vit", "deit"):
        d, moved = max_reference_difference(family, "sdpa", "binary", image_hw=(16, 32), interpolate_pos_encoding=True)
        rows.append(f"| {family} (16x32, interpolated) | sdpa | auto | binary | {d:.2e} | {moved:.3f} |")
    # Swin V2, Data2Vec-Vision (mean pooling + per-layer bias; CLS + shared bias) and SigLIP 2 (padded patch sequences)
    for family, backend in FAMILY_BACKENDS:
        for path in ("eager", "value_channel", "explicit"):
            d, moved = new_family_difference(family, backend, path)
            rows.append(f"| {family} | {backend} | {path} | fractional | {d:.2e} | {moved:.3f} |")
    for path in ("eager", "value_channel", "explicit"):
        d, moved = new_family_difference("swinv2", "eager", path, image_size=28)
        rows.append(f"| swinv2 (28 px: padded windows, odd merge) | eager | {path} | fractional | {d:.2e} | {moved:.3f} |")
    return rows


def timm_rows() -> list[str]:
    """Per tiny timm backbone (tests/test_timm_backbones.py) and attention kind, over binary and fractional weights."""
    rows = []
    for variant, (architecture, _) in VARIANTS.items():
        vanilla = tiny_backbone(variant, fused=False)
        for fused, path in ATTENTION_KINDS:
            if fused and variant in EXPLICIT_ONLY:
                continue
            aligned = aligned_backbone(vanilla, fused, path)
            results = [timm_reference_difference(aligned, vanilla, backbone_batch(variant, kind)) for kind in ("binary", "fractional")]
            kind = "SDPA (fused_attn)" if fused else "explicit softmax"
            d, moved = max(result[0] for result in results), max(result[1] for result in results)
            rows.append(f"| {variant} (`{architecture}`) | {kind} | {path} | {d:.2e} | {moved:.3f} |")
    return rows


if __name__ == "__main__":
    if "--timm" not in sys.argv:
        print("| model | backend | path | token weights | max abs diff vs full-vector reference | max abs aligned_lam - mix_lam |")
        print("|---|---|---|---|---|---|")
        print("\n".join(transformers_rows()))
        print()
    print("| timm backbone (tiny, sharpened) | timm attention | path | max abs diff vs full-vector reference | max abs aligned_lam - mix_lam |")
    print("|---|---|---|---|---|")
    print("\n".join(timm_rows()))
