"""Aligned subclasses of transformers' image classifiers, and :func:`to_tl_align` for loaded models.

The subclasses add no weights and rename no modules, and leave the config alone. Called without mixing arguments
they are their parent class: same signature (the mixing arguments are keyword-only, after the parent's parameters),
same outputs. Called with the batch contract (``mix_index``, ``token_weights``, ``mix_lam``, as
:class:`TLAlignCollator` produces it) they create a :class:`TokenLabelAligner`, pass it down to every attention call
through the model's ``**kwargs`` (or, for attention modules that drop them, through
:func:`~tl_align_hf.attention.pass_aligner_through`), and return the parent's output with ``aligned_lam`` `(B,)`
added: the share of each sample's own label in its aligned target. With ``labels`` (where the parent takes them) the
``loss`` is :func:`~tl_align_hf.mixed_batch_loss` against that target.

Every family goes through the same mechanism (:mod:`tl_align_hf.attention` feeding a :class:`TokenLabelAligner`);
what differs between families is data on each subclass: the tokens in front of the patch tokens, the read-out that
mirrors the classifier's pooling, and, for Swin, how the tokens are re-arranged into windows and merged.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing

import torch
from transformers import (
    BeitForImageClassification,
    CLIPForImageClassification,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2ForImageClassification,
    Dinov2WithRegistersForImageClassification,
    IJepaForImageClassification,
    MetaClip2ForImageClassification,
    PreTrainedModel,
    SiglipForImageClassification,
    SwinForImageClassification,
    ViTForImageClassification,
    ViTMSNForImageClassification,
)
from transformers.models.siglip.modeling_siglip import SiglipAttention
from transformers.models.swin.modeling_swin import SwinLayer, SwinStage, window_partition, window_reverse
from transformers.utils import ModelOutput

from .aligner import TokenLabelAligner, validate_mixing_inputs
from .attention import ATTENTION_PATHS, pass_aligner_through, route_attention
from .losses import mixed_batch_loss
from .mixer import MIXING_KEYS

READOUTS = ("cls", "patch_mean", "cls_and_patch_mean")
# The keyword-only arguments the aligned forward adds after the parent's parameters.
_ALIGNED_PARAMETERS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation="torch.Tensor | None")
    for name in MIXING_KEYS
] + [inspect.Parameter("target_smoothing", inspect.Parameter.KEYWORD_ONLY, default=0.0, annotation="float")]


def _vision_config(config):
    """The config holding the patch settings and blocks (composite models such as CLIP keep them in vision_config)."""
    return getattr(config, "vision_config", None) or config


def _patch_grid_size(patch_size, pixel_values: torch.Tensor) -> int:
    patch_h, patch_w = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    return (pixel_values.shape[-2] // patch_h) * (pixel_values.shape[-1] // patch_w)


def _aligned_output_class(parent: type[PreTrainedModel]) -> type[ModelOutput]:
    """The output class of `parent.forward` with an ``aligned_lam`` `(B,)` field appended, defined in this module
    (`ImageClassifierOutput` -> `TLAlignImageClassifierOutput`), so that aligned outputs are still instances of the
    parent's output class and flatten as pytrees (DDP, torch.compile)."""
    annotation = inspect.signature(parent.forward).return_annotation  # e.g. `tuple | ImageClassifierOutput`
    candidates = [annotation, *typing.get_args(annotation)]
    output_class = next((item for item in candidates if inspect.isclass(item) and issubclass(item, ModelOutput)), None)
    if output_class is None:
        raise TypeError(f"{parent.__name__}.forward must be annotated with its ModelOutput class, got {annotation!r}.")
    name = f"TLAlign{output_class.__name__}"
    if name not in globals():
        aligned_lam = ("aligned_lam", torch.FloatTensor | None, dataclasses.field(default=None))
        namespace = {"__module__": __name__}
        globals()[name] = dataclasses.make_dataclass(name, [aligned_lam], bases=(output_class,), namespace=namespace)
        globals()[name].__doc__ = f"`{output_class.__name__}` plus ``aligned_lam`` `(B,)`: the aligned share of each sample's own label."
    return globals()[name]


def _aligned_forward_of(parent_forward):
    """The aligned `forward` of a subclass: the parent's `forward`, with the mixing arguments keyword-only after it.

    Positional arguments mean what they mean for the parent; its signature (what `inspect`, transformers'
    `find_labels` and `Trainer` read) is the parent's plus the keyword-only mixing arguments.
    """
    parent_signature = inspect.signature(parent_forward)
    takes_labels = "labels" in parent_signature.parameters  # DeiT with teacher does not: `labels` are ignored there
    positional = [
        parameter.name
        for parameter in list(parent_signature.parameters.values())[1:]
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]

    def forward(self, *args, mix_index=None, token_weights=None, mix_lam=None, target_smoothing=0.0, **kwargs):
        if mix_index is None and token_weights is None and mix_lam is None:
            return parent_forward(self, *args, **kwargs)
        if len(args) > len(positional):
            raise TypeError(f"{type(self).__name__}.forward takes {len(positional)} positional arguments after self.")
        arguments = {**dict(zip(positional, args)), **kwargs}
        labels = arguments.pop("labels", None) if takes_labels else None
        return self.tl_align_forward(parent_forward, arguments, labels, mix_index, token_weights, mix_lam, target_smoothing)

    parameters = list(parent_signature.parameters.values())
    keywords_at = next((i for i, p in enumerate(parameters) if p.kind == inspect.Parameter.VAR_KEYWORD), len(parameters))
    forward.__signature__ = parent_signature.replace(
        parameters=parameters[:keywords_at] + _ALIGNED_PARAMETERS + parameters[keywords_at:]
    )
    forward.__doc__ = (parent_forward.__doc__ or "") + TLAlignMixin.tl_align_forward.__doc__
    return forward


class TLAlignMixin:
    """Token-label alignment for a transformers image classifier whose attention uses the attention interface.

    Subclasses set ``tl_align_parent`` (the transformers class they extend), ``tl_align_num_prefix_tokens`` (tokens
    before the patch tokens, all starting at ``mix_lam``: CLS, distillation, registers) and ``tl_align_pooling``,
    the read-out that mirrors the classifier's pooling (see :meth:`tl_align_readout`). Families whose attention
    modules drop the forward's ``**kwargs`` list those classes in ``tl_align_kwargs_dropped_by`` (SigLIP); families
    whose attention sees the tokens re-arranged (Swin) also override :meth:`tl_align_install_hooks`.
    ``tl_align_attention_path`` picks how shares are computed (``"auto"``; see :mod:`tl_align_hf.attention`).
    """

    tl_align_parent: type[PreTrainedModel]
    tl_align_num_prefix_tokens: int = 1
    tl_align_pooling: str = "cls"
    tl_align_attention_path: str = "auto"
    # attention modules that take the forward's **kwargs but do not hand them to the attention function
    tl_align_kwargs_dropped_by: tuple[type[torch.nn.Module], ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "tl_align_parent" in cls.__dict__:
            cls.tl_align_output_class = _aligned_output_class(cls.tl_align_parent)
            if "forward" not in cls.__dict__:
                cls.forward = _aligned_forward_of(cls.tl_align_parent.forward)

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.tl_align_route_attention()
        self.tl_align_install_hooks()

    @classmethod
    def tl_align_check_supported(cls, model: PreTrainedModel) -> None:
        """Raise a ValueError before `to_tl_align` changes anything if ``model`` cannot be aligned (nothing to check
        for most families: their class says it all)."""

    @property
    def tl_align_num_blocks(self) -> int:
        """Attention blocks in one forward pass: one share update each."""
        return _vision_config(self.config).num_hidden_layers

    @property
    def tl_align_patch_size(self) -> int | tuple[int, int]:
        """The patch size of the token grid `token_weights` cover (what `TLAlignMixer.from_model` reads)."""
        return _vision_config(self.config).patch_size

    @property
    def tl_align_image_size(self) -> int | tuple[int, int] | None:
        """The image size the model is built for (`None`: any size that is a whole number of patches)."""
        return getattr(_vision_config(self.config), "image_size", None)

    def tl_align_install_hooks(self) -> None:
        """Register the module hooks a family needs: none, unless its attention modules drop the kwargs."""
        for module in self.modules():
            if isinstance(module, self.tl_align_kwargs_dropped_by):
                pass_aligner_through(module)

    def tl_align_route_attention(self) -> None:
        """Let every attention module see its config through a `RoutedConfig` (the config itself is unchanged)."""
        if route_attention(self) == 0:
            raise TypeError(
                f"{type(self).__name__} has no attention module on transformers' attention interface to route."
            )

    def save_pretrained(self, *args, **kwargs):
        """Save a plain transformers checkpoint: ``config.architectures`` names the parent class."""
        aligned_class = type(self)
        self.__class__ = self.tl_align_parent
        try:
            return self.save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = aligned_class

    def tl_align_readout(self, shares: torch.Tensor) -> torch.Tensor:
        """`(B, N)` final token shares -> `(B,)` aligned share, pooled as the classifier pools the tokens.

        ``tl_align_pooling``: ``"cls"`` reads the CLS token; ``"patch_mean"`` averages the tokens after the
        ``tl_align_num_prefix_tokens`` prefix tokens (all tokens when there are none); ``"cls_and_patch_mean"``
        (DINOv2, whose classifier reads ``[CLS, mean of patch tokens]``) is the mean of the CLS share and the mean
        patch share. Every read-out is a mean of shares, so the aligned target stays in [0, 1].
        """
        if self.tl_align_pooling == "cls":
            return shares[:, 0]
        patch_mean = shares[:, self.tl_align_num_prefix_tokens :].mean(dim=1)
        if self.tl_align_pooling == "patch_mean":
            return patch_mean
        return 0.5 * (shares[:, 0] + patch_mean)

    def _start_aligner(self, pixel_values, mix_index, token_weights, mix_lam) -> TokenLabelAligner:
        missing = [name for name, value in zip(MIXING_KEYS, (mix_index, token_weights, mix_lam)) if value is None]
        if missing:
            raise ValueError(
                f"TL-Align needs all of {MIXING_KEYS} or none of them; missing {missing}. "
                "Pass the whole batch from TLAlignCollator, or none of the three for a plain forward pass."
            )
        if pixel_values is None:
            raise ValueError("`pixel_values` is required.")
        if self.tl_align_attention_path not in ATTENTION_PATHS:
            raise ValueError(
                f"`tl_align_attention_path` must be one of {ATTENTION_PATHS}, got {self.tl_align_attention_path!r}."
            )
        if self.tl_align_pooling not in READOUTS:
            raise ValueError(f"`tl_align_pooling` must be one of {READOUTS}, got {self.tl_align_pooling!r}.")
        num_patches = _patch_grid_size(self.tl_align_patch_size, pixel_values)
        validate_mixing_inputs(mix_index, token_weights, mix_lam, pixel_values.shape[0], num_patches)
        return TokenLabelAligner(token_weights, mix_lam, self.tl_align_num_prefix_tokens, self.tl_align_attention_path)

    def tl_align_forward(self, parent_forward, arguments, labels, mix_index, token_weights, mix_lam, target_smoothing):
        """
        TL-Align: with ``mix_index`` `(B,)` (partner of each sample), ``token_weights`` `(B, num_patches)` (share of
        each patch from the sample itself, patch-grid row-major) and ``mix_lam`` `(B,)` (share of the whole image
        from the sample itself), the output also holds ``aligned_lam`` `(B,)`, and ``loss`` (when the parent takes
        ``labels`` and they are given) is the soft-target cross-entropy against the aligned target, each one-hot
        smoothed by ``target_smoothing`` (not named ``label_smoothing``: transformers takes every forward argument
        with "label" in its name for a label).
        """
        if isinstance(target_smoothing, bool) or not 0.0 <= target_smoothing < 1.0:
            raise ValueError(f"`target_smoothing` must be in [0, 1) (the label smoothing of the aligned loss), got {target_smoothing!r}.")
        if labels is not None and (labels.dtype.is_floating_point or labels.dim() != 1):
            raise TypeError(
                f"`labels` must be a (batch_size,) integer tensor of each sample's own class, got dtype {labels.dtype} "
                f"and shape {tuple(labels.shape)}. Mixed soft targets are built from `mix_index` and the aligned shares."
            )
        return_dict = arguments.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        pixel_values = arguments.get("pixel_values")
        aligner = self._start_aligner(pixel_values, mix_index, token_weights, mix_lam)
        outputs = parent_forward(self, **arguments, token_label_aligner=aligner, return_dict=True)
        aligner.close(expected_updates=self.tl_align_num_blocks)
        # A mean of shares: in [0, 1] but for float rounding (rows of P sum to 1 only to ~1e-7), which the clamp removes.
        fields = {**outputs, "aligned_lam": self.tl_align_readout(aligner.shares).clamp(0.0, 1.0)}
        if labels is not None:
            batch = {"labels": labels, "mix_index": mix_index, "mix_lam": mix_lam}
            fields["loss"] = mixed_batch_loss(fields, batch, label_smoothing=target_smoothing)[0]
        outputs = self.tl_align_output_class(**fields)
        return outputs if return_dict else outputs.to_tuple()


class TLAlignViTForImageClassification(TLAlignMixin, ViTForImageClassification):
    """:class:`~transformers.ViTForImageClassification` with token-label alignment (CLS read-out)."""

    tl_align_parent = ViTForImageClassification
    tl_align_num_prefix_tokens = 1


class TLAlignDeiTForImageClassification(TLAlignMixin, DeiTForImageClassification):
    """:class:`~transformers.DeiTForImageClassification` with token-label alignment.

    CLS and distillation tokens both start at ``mix_lam``; the target is read from the CLS token.
    """

    tl_align_parent = DeiTForImageClassification
    tl_align_num_prefix_tokens = 2


class TLAlignDeiTForImageClassificationWithTeacher(TLAlignMixin, DeiTForImageClassificationWithTeacher):
    """:class:`~transformers.DeiTForImageClassificationWithTeacher` with token-label alignment.

    Both heads are trained against the same aligned target, read from the CLS token, as the official code does:
    :func:`~tl_align_hf.mixed_batch_loss` averages the two heads' soft-target cross-entropies. Like the parent, the
    forward takes no ``labels`` (so it returns no loss); distillation from a teacher is separate.
    """

    tl_align_parent = DeiTForImageClassificationWithTeacher
    tl_align_num_prefix_tokens = 2


class TLAlignViTMSNForImageClassification(TLAlignMixin, ViTMSNForImageClassification):
    """:class:`~transformers.ViTMSNForImageClassification` with token-label alignment (CLS read-out)."""

    tl_align_parent = ViTMSNForImageClassification
    tl_align_num_prefix_tokens = 1


class TLAlignDinov2ForImageClassification(TLAlignMixin, Dinov2ForImageClassification):
    """:class:`~transformers.Dinov2ForImageClassification` with token-label alignment.

    The classifier reads ``[CLS, mean of the patch tokens]``, so the aligned share is the mean of the CLS share and
    the mean patch share (``tl_align_pooling = "cls_and_patch_mean"``): each half of the classifier input gets
    its own share, with equal weight.
    """

    tl_align_parent = Dinov2ForImageClassification
    tl_align_num_prefix_tokens = 1
    tl_align_pooling = "cls_and_patch_mean"
    tl_align_image_size = None  # any size: the embeddings always interpolate (Hub configs say 518, processors crop 224)


class TLAlignDinov2WithRegistersForImageClassification(TLAlignMixin, Dinov2WithRegistersForImageClassification):
    """:class:`~transformers.Dinov2WithRegistersForImageClassification` with token-label alignment.

    The register tokens start at ``mix_lam`` like CLS. The classifier reads ``[CLS, mean of the patch tokens]``
    (registers excluded), so the aligned share is the mean of the CLS share and the mean patch share.
    """

    tl_align_parent = Dinov2WithRegistersForImageClassification
    tl_align_pooling = "cls_and_patch_mean"
    tl_align_image_size = None  # any size: the embeddings always interpolate

    @property
    def tl_align_num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens


class TLAlignBeitForImageClassification(TLAlignMixin, BeitForImageClassification):
    """:class:`~transformers.BeitForImageClassification` with token-label alignment.

    The read-out follows ``config.use_mean_pooling``: the mean of the patch shares (the default), or the CLS share.
    The relative position bias reaches the attention as its mask, so the shares see it on every path.
    """

    tl_align_parent = BeitForImageClassification
    tl_align_num_prefix_tokens = 1

    @property
    def tl_align_pooling(self) -> str:
        return "patch_mean" if self.config.use_mean_pooling else "cls"


class TLAlignIJepaForImageClassification(TLAlignMixin, IJepaForImageClassification):
    """:class:`~transformers.IJepaForImageClassification` with token-label alignment.

    I-JEPA has no CLS token and its classifier averages all tokens: the aligned share is the mean share.
    """

    tl_align_parent = IJepaForImageClassification
    tl_align_num_prefix_tokens = 0
    tl_align_pooling = "patch_mean"


class TLAlignCLIPForImageClassification(TLAlignMixin, CLIPForImageClassification):
    """:class:`~transformers.CLIPForImageClassification` with token-label alignment (vision tower only).

    The classifier averages the patch tokens (not the CLS token): the aligned share is the mean patch share.
    """

    tl_align_parent = CLIPForImageClassification
    tl_align_num_prefix_tokens = 1
    tl_align_pooling = "patch_mean"


class TLAlignMetaClip2ForImageClassification(TLAlignMixin, MetaClip2ForImageClassification):
    """:class:`~transformers.MetaClip2ForImageClassification` with token-label alignment (mean patch share)."""

    tl_align_parent = MetaClip2ForImageClassification
    tl_align_num_prefix_tokens = 1
    tl_align_pooling = "patch_mean"


class TLAlignSiglipForImageClassification(TLAlignMixin, SiglipForImageClassification):
    """:class:`~transformers.SiglipForImageClassification` with token-label alignment.

    SigLIP has no CLS token and its classifier averages all tokens: the aligned share is the mean share. (The
    vision tower's attention-pooling head, which the classifier does not use, does not change the shares.)
    """

    tl_align_parent = SiglipForImageClassification
    tl_align_num_prefix_tokens = 0
    tl_align_pooling = "patch_mean"
    tl_align_kwargs_dropped_by = (SiglipAttention,)


# ----------------------------------------------------------------------------------------------------------- Swin
def _input_dimensions(args: tuple, kwargs: dict) -> tuple[int, int]:
    """The `(height, width)` token grid passed to a SwinLayer or SwinStage call."""
    return tuple(args[1]) if len(args) > 1 else tuple(kwargs["input_dimensions"])


class _SwinWindows:
    """The token layout of one SwinLayer's attention: the layer's own padding, cyclic shift and window partition.

    Padded positions (when the grid is not a whole number of windows) hold ``mix_lam``: like the CLS token, they
    carry no pixels of either image. The layer's window and shift sizes are read when the attention runs, after the
    layer has adapted them to its input (windows no larger than the grid, no shift then).
    """

    def __init__(self, layer: SwinLayer, height: int, width: int, fill: torch.Tensor):
        self.layer, self.height, self.width = layer, height, width
        self.fill = fill[:, None, None, None]  # (B, 1, 1, 1)

    def to_attention(self, shares: torch.Tensor) -> torch.Tensor:
        """`(B, H*W)` -> `(B * num_windows, window_size**2)`."""
        grid = shares.view(-1, self.height, self.width, 1) - self.fill
        grid, _ = self.layer.maybe_pad(grid, self.height, self.width)
        self.padded_size = tuple(grid.shape[1:3])
        windows = window_partition(self.layer.cyclic_shift(grid + self.fill), self.layer.window_size)
        return windows.reshape(windows.shape[0], -1)

    def from_attention(self, attended: torch.Tensor) -> torch.Tensor:
        """`(B * num_windows, window_size**2)` -> `(B, H*W)`."""
        window_size = self.layer.window_size
        windows = attended.view(-1, window_size, window_size, 1)
        grid = self.layer.cyclic_shift(window_reverse(windows, window_size, *self.padded_size), reverse=True)
        return grid[:, : self.height, : self.width].reshape(grid.shape[0], -1)


def _merge_2x2_shares(shares: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Swin's patch merging for shares: `(B, H*W)` -> `(B, ceil(H/2) * ceil(W/2))`, the mean of each 2x2 group.

    At an odd border Swin merges zero padding, which carries no content: the mean is over the real tokens.
    """
    grid = shares.view(-1, 1, height, width)
    padding = (0, width % 2, 0, height % 2)
    group_sums = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(grid, padding), 2, divisor_override=1)
    real_tokens = torch.nn.functional.pad(torch.ones_like(grid[:1]), padding)
    group_sizes = torch.nn.functional.avg_pool2d(real_tokens, 2, divisor_override=1)
    return (group_sums / group_sizes).flatten(1)


def _swin_layer_pre_hook(layer: SwinLayer, args: tuple, kwargs: dict) -> None:
    aligner = kwargs.get("token_label_aligner")
    if aligner is not None and not aligner.closed:
        aligner.layout = _SwinWindows(layer, *_input_dimensions(args, kwargs), aligner.mix_lam)


def _swin_stage_hook(stage: SwinStage, args: tuple, kwargs: dict, output) -> None:
    aligner = kwargs.get("token_label_aligner")
    if aligner is not None:
        aligner.layout = None
        if stage.downsample is not None:
            height, width = _input_dimensions(args, kwargs)
            aligner.merge_tokens(functools.partial(_merge_2x2_shares, height=height, width=width))


class TLAlignSwinForImageClassification(TLAlignMixin, SwinForImageClassification):
    """:class:`~transformers.SwinForImageClassification` with token-label alignment.

    The shares follow the tokens: each block's attention sees them padded, cyclically shifted and partitioned into
    windows exactly as the hidden states (the shift mask and relative position bias are part of the probabilities),
    and the update is mapped back to the token grid. Patch merging takes the mean of each 2x2 group of shares, and
    the aligned share is the mean of the final shares, as the classifier mean-pools the final tokens. ``token_weights``
    cover the first stage's token grid, which is the patch grid. Hooks on the Swin layers and stages tell the aligner
    the geometry; without mixing arguments they do nothing.
    """

    tl_align_parent = SwinForImageClassification
    tl_align_num_prefix_tokens = 0
    tl_align_pooling = "patch_mean"

    @property
    def tl_align_num_blocks(self) -> int:
        return sum(self.config.depths)

    def tl_align_install_hooks(self) -> None:
        super().tl_align_install_hooks()
        for module in self.modules():
            if isinstance(module, SwinLayer):
                module.register_forward_pre_hook(_swin_layer_pre_hook, with_kwargs=True)
            elif isinstance(module, SwinStage):
                module.register_forward_hook(_swin_stage_hook, with_kwargs=True)


ALIGNED_CLASSES: dict[type[PreTrainedModel], type[TLAlignMixin]] = {
    ViTForImageClassification: TLAlignViTForImageClassification,
    DeiTForImageClassification: TLAlignDeiTForImageClassification,
    DeiTForImageClassificationWithTeacher: TLAlignDeiTForImageClassificationWithTeacher,
    ViTMSNForImageClassification: TLAlignViTMSNForImageClassification,
    Dinov2ForImageClassification: TLAlignDinov2ForImageClassification,
    Dinov2WithRegistersForImageClassification: TLAlignDinov2WithRegistersForImageClassification,
    BeitForImageClassification: TLAlignBeitForImageClassification,
    IJepaForImageClassification: TLAlignIJepaForImageClassification,
    CLIPForImageClassification: TLAlignCLIPForImageClassification,
    MetaClip2ForImageClassification: TLAlignMetaClip2ForImageClassification,
    SiglipForImageClassification: TLAlignSiglipForImageClassification,
    SwinForImageClassification: TLAlignSwinForImageClassification,
}


def to_tl_align(model: PreTrainedModel) -> PreTrainedModel:
    """Turn a loaded model of a supported class into its aligned subclass, in place; return it.

    Works on models from ``AutoModelForImageClassification.from_pretrained(...)``. No weights change.

    Raises:
        ValueError: the model's class is not supported (nothing is changed).
    """
    if isinstance(model, TLAlignMixin):
        return model
    aligned_class = ALIGNED_CLASSES.get(type(model))
    if aligned_class is None:
        supported = ", ".join(cls.__name__ for cls in ALIGNED_CLASSES)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"TL-Align does not support {type(model).__name__} (model_type={model_type!r}). Supported classes: "
            f"{supported}. TL-Align follows the labels through attention, so it needs pre-norm residual attention "
            "blocks that run through transformers' attention interface and a known read-out; convolutional and "
            "hybrid models and the families implemented otherwise (Swinv2, Hiera, PVT, MobileViT, ...) are not "
            "supported."
        )
    aligned_class.tl_align_check_supported(model)
    model.__class__ = aligned_class
    model.tl_align_route_attention()
    model.tl_align_install_hooks()
    return model


try:  # timm is an optional extra: the timm family (tl_align_hf/timm_models.py) registers itself where it is installed
    from .timm_models import TLAlignTimmWrapperForImageClassification
except ModuleNotFoundError as error:
    if (error.name or "").partition(".")[0] != "timm":
        raise
else:
    ALIGNED_CLASSES[TLAlignTimmWrapperForImageClassification.tl_align_parent] = TLAlignTimmWrapperForImageClassification
