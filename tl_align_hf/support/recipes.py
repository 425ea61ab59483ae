"""Model settings of the training recipes that are fixed when a model is built (see `docs/recipes.md`).

Stochastic depth ("drop path", Huang et al. 2016; DeiT trains with 0.1) is built into the blocks when the model is
created, so it is set on the config: timm models through `TimmWrapperForImageClassification` take timm's
`drop_path_rate` (`model_args`, rates rising linearly from 0 to it over the blocks, timm's rule); transformers'
families that have stochastic depth take their config's `drop_path_rate` (their own per-block rule). transformers'
ViT and DeiT have none: asking for it there is an error, not a silent no-op.
"""

from __future__ import annotations

from transformers import PretrainedConfig

DROP_PATH_FAMILIES = (
    "timm models through TimmWrapperForImageClassification (timm's ViT, DeiT, DeiT III, ...) and transformers' "
    "families whose config has drop_path_rate (BEiT, Data2VecVision, DINOv2, Swin, ...)"
)


def set_drop_path_rate(config: PretrainedConfig, drop_path_rate: float) -> PretrainedConfig:
    """Set stochastic depth on `config` before the model is built from it (e.g. `from_config`, or `from_pretrained(
    ..., config=config)`), and return it. Raises a ValueError for a family whose model has no drop path."""
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate (--drop_path_rate) must be in [0, 1), got {drop_path_rate}.")
    if config.model_type == "timm_wrapper":  # TimmWrapperConfig (not imported: importing it imports timm)
        config.model_args = {**(config.model_args or {}), "drop_path_rate": drop_path_rate}
    elif hasattr(config, "drop_path_rate"):
        config.drop_path_rate = drop_path_rate
    elif drop_path_rate > 0.0:
        raise ValueError(
            f"transformers' {config.model_type!r} models have no stochastic depth (no drop_path_rate in "
            f"{type(config).__name__}), so drop_path_rate={drop_path_rate} cannot be applied. It is available for "
            f"{DROP_PATH_FAMILIES}: e.g. train timm's DeiT with --timm_model deit_small_patch16_224, or leave "
            "drop_path_rate unset."
        )
    return config
