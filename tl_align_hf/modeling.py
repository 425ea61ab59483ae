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

import contextlib
import dataclasses
import functools
import inspect
import math
import typing

import torch
from transformers import (
    BeitForImageClassification,
    CLIPForImageClassification,
    Data2VecVisionForImageClassification,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2ForImageClassification,
    Dinov2WithRegistersForImageClassification,
    IJepaForImageClassification,
    MetaClip2ForImageClassification,
    PreTrainedModel,
    Siglip2ForImageClassification,
    SiglipForImageClassification,
    SwinForImageClassification,
    Swinv2ForImageClassification,
    ViTForImageClassification,
    ViTMSNForImageClassification,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.data2vec.modeling_data2vec_vision import (
    Data2VecVisionSdpaSelfAttention,
    Data2VecVisionSelfAttention,
)
from transformers.models.siglip.modeling_siglip import SiglipAttention
from transformers.models.siglip2.modeling_siglip2 import Siglip2Attention
from transformers.models.swin.modeling_swin import SwinLayer, SwinStage, window_partition, window_reverse
from transformers.models.swinv2.modeling_swinv2 import Swinv2Layer, Swinv2SelfAttention, Swinv2Stage
from transformers.models.vit.modeling_vit import eager_attention_forward
from transformers.trainer_utils import unwrap_peft_model
from transformers.utils import ModelOutput

from .aligner import TokenLabelAligner
from .attention import (
    ALIGNER_ATTRIBUTE,
    ATTENTION_PATHS,
    aligner_on_modules,
    attention_with_shares,
    choose_path,
    dropout_free_probabilities,
    mean_attended_shares,
    pass_aligner_through,
    route_attention,
)
from .contract import MIXING_KEYS, check_model_inputs
from .losses import loss_of_checked_batch
from .settings import check_label_smoothing

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

    Families whose attention modules are outside the attention interface and whose forward passes no ``**kwargs``
    down (Data2Vec-Vision, Swin V2) map each such module class to an aligned subclass in
    ``tl_align_attention_classes``: converting the model gives the modules that class (same weights, the parent's
    forward when no aligner is there), and for an aligned forward pass only the aligner is put on those modules (and
    on the ``tl_align_aligner_holders``, modules whose hooks need it) and taken off afterwards.
    """

    tl_align_parent: type[PreTrainedModel]
    tl_align_num_prefix_tokens: int = 1
    tl_align_pooling: str = "cls"
    tl_align_attention_path: str = "auto"
    # attention modules that take the forward's **kwargs but do not hand them to the attention function
    tl_align_kwargs_dropped_by: tuple[type[torch.nn.Module], ...] = ()
    # attention modules outside the attention interface -> their aligned subclass (see the class docstring)
    tl_align_attention_classes: dict[type[torch.nn.Module], type[torch.nn.Module]] = {}
    tl_align_aligner_holders: tuple[type[torch.nn.Module], ...] = ()

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

    def tl_align_num_patches(self, pixel_values: torch.Tensor) -> int:
        """Patch tokens per image of ``pixel_values`` `(B, C, H, W)`: the width of ``token_weights``."""
        return _patch_grid_size(self.tl_align_patch_size, pixel_values)

    def tl_align_route_attention(self) -> None:
        """Let every attention module see its config through a `RoutedConfig` (the config itself is unchanged), or,
        for families outside the attention interface, give each attention module its aligned subclass."""
        if self.tl_align_attention_classes:
            aligned_classes = tuple(self.tl_align_attention_classes.values())
            for module in self.modules():
                module.__class__ = self.tl_align_attention_classes.get(type(module), type(module))
            if not any(isinstance(module, aligned_classes) for module in self.modules()):
                raise TypeError(f"{type(self).__name__} has none of the attention modules {aligned_classes}.")
            return
        if route_attention(self) == 0:
            raise TypeError(
                f"{type(self).__name__} has no attention module on transformers' attention interface to route."
            )

    def save_pretrained(self, *args, **kwargs):
        """Save a plain transformers checkpoint: ``config.architectures`` names the parent class."""
        with as_parent_class(self):
            return self.save_pretrained(*args, **kwargs)

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

    def _start_aligner(self, pixel_values, mix_index, token_weights, mix_lam, labels) -> TokenLabelAligner:
        """The aligner of this forward pass, after the one check of its inputs (`check_model_inputs`)."""
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
        num_patches = self.tl_align_num_patches(pixel_values)
        num_labels = getattr(self.config, "num_labels", None)
        check_model_inputs(mix_index, token_weights, mix_lam, pixel_values.shape[0], num_patches, labels, num_labels)
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
        check_label_smoothing(target_smoothing, "`target_smoothing`", " (the label smoothing of the aligned loss)")
        return_dict = arguments.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        pixel_values = arguments.get("pixel_values")
        aligner = self._start_aligner(pixel_values, mix_index, token_weights, mix_lam, labels)
        if self.tl_align_attention_classes:
            parent_forward = functools.partial(_forward_with_aligner_on_modules, parent_forward)
        outputs = parent_forward(self, **arguments, token_label_aligner=aligner, return_dict=True)
        aligner.close(expected_updates=self.tl_align_num_blocks)
        # A mean of shares: in [0, 1] but for float rounding (rows of P sum to 1 only to ~1e-7), which the clamp removes.
        fields = {**outputs, "aligned_lam": self.tl_align_readout(aligner.shares).clamp(0.0, 1.0)}
        if labels is not None:
            batch = {"labels": labels, "mix_index": mix_index, "mix_lam": mix_lam}
            fields["loss"] = loss_of_checked_batch(fields, batch, tl_align=True, label_smoothing=target_smoothing)[0]
        outputs = self.tl_align_output_class(**fields)
        return outputs if return_dict else outputs.to_tuple()


@contextlib.contextmanager
def as_parent_class(model: torch.nn.Module):
    """Within the block an aligned model is an instance of its parent class (other models are left as they are),
    so that what is saved meanwhile names the transformers class: ``config.architectures``, and the base model
    class peft records in ``adapter_config.json``."""
    aligned_class = type(model)
    if not isinstance(model, TLAlignMixin):
        yield model
        return
    model.__class__ = model.tl_align_parent
    try:
        yield model
    finally:
        model.__class__ = aligned_class


def _forward_with_aligner_on_modules(parent_forward, model: TLAlignMixin, *, token_label_aligner, **arguments):
    """``parent_forward(model, **arguments)`` with the aligner on the model's aligned attention modules and
    ``tl_align_aligner_holders`` for the call (their forward takes no aligner argument). Gradient checkpointing
    recomputes the blocks without the aligner, i.e. with the parent's attention: the aligned forward then takes the
    ``explicit`` path, whose attention output is the parent's own, so that the recomputation matches it."""
    if model.is_activation_checkpointing and torch.is_grad_enabled():
        token_label_aligner.attention_path = "explicit"  # the recomputation runs the parent's attention (see above)
    holders = (*model.tl_align_attention_classes.values(), *model.tl_align_aligner_holders)
    with aligner_on_modules([module for module in model.modules() if isinstance(module, holders)], token_label_aligner):
        return parent_forward(model, **arguments)


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


def _cyclic_shift(layer: SwinLayer | Swinv2Layer, grid: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """The layer's cyclic shift of a `(B, H, W, C)` grid (``SwinLayer.cyclic_shift``; Swin V2 rolls inline)."""
    if layer.shift_size <= 0:
        return grid
    shift = layer.shift_size if reverse else -layer.shift_size
    return torch.roll(grid, shifts=(shift, shift), dims=(1, 2))


class _SwinWindows:
    """The token layout of one Swin (V1 or V2) layer's attention: the layer's own padding, its cyclic shift and the
    window partition.

    Padded positions (when the grid is not a whole number of windows) hold ``mix_lam``: like the CLS token, they
    carry no pixels of either image. The layer's window and shift sizes are read when the attention runs, after the
    layer has adapted them to its input (windows no larger than the grid, no shift then).
    """

    def __init__(self, layer: SwinLayer | Swinv2Layer, height: int, width: int, fill: torch.Tensor):
        self.layer, self.height, self.width = layer, height, width
        self.fill = fill[:, None, None, None]  # (B, 1, 1, 1)

    def to_attention(self, shares: torch.Tensor) -> torch.Tensor:
        """`(B, H*W)` -> `(B * num_windows, window_size**2)`."""
        grid = shares.view(-1, self.height, self.width, 1) - self.fill
        grid, _ = self.layer.maybe_pad(grid, self.height, self.width)
        self.padded_size = tuple(grid.shape[1:3])
        windows = window_partition(_cyclic_shift(self.layer, grid + self.fill), self.layer.window_size)
        return windows.reshape(windows.shape[0], -1)

    def from_attention(self, attended: torch.Tensor) -> torch.Tensor:
        """`(B * num_windows, window_size**2)` -> `(B, H*W)`."""
        window_size = self.layer.window_size
        windows = attended.view(-1, window_size, window_size, 1)
        grid = _cyclic_shift(self.layer, window_reverse(windows, window_size, *self.padded_size), reverse=True)
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


def _aligner_of_call(module: torch.nn.Module, kwargs: dict) -> TokenLabelAligner | None:
    """The aligner of this call: a keyword argument (Swin), or put on the module for the pass (Swin V2)."""
    return kwargs.get("token_label_aligner") or getattr(module, ALIGNER_ATTRIBUTE, None)


def _swin_layer_pre_hook(layer: SwinLayer | Swinv2Layer, args: tuple, kwargs: dict) -> None:
    aligner = _aligner_of_call(layer, kwargs)
    if aligner is not None and not aligner.closed:
        aligner.layout = _SwinWindows(layer, *_input_dimensions(args, kwargs), aligner.mix_lam)


def _swin_stage_hook(stage: SwinStage | Swinv2Stage, args: tuple, kwargs: dict, output) -> None:
    aligner = _aligner_of_call(stage, kwargs)
    if aligner is not None:
        aligner.layout = None
        if stage.downsample is not None:
            height, width = _input_dimensions(args, kwargs)
            aligner.merge_tokens(functools.partial(_merge_2x2_shares, height=height, width=width))


class _SwinRouting:
    """What Swin V1 and V2 share: one update per block of every stage, and the hooks that give the aligner each
    layer's window layout and each stage's patch merging."""

    @property
    def tl_align_num_blocks(self) -> int:
        return sum(self.config.depths)

    def tl_align_install_hooks(self) -> None:
        super().tl_align_install_hooks()
        for module in self.modules():
            if isinstance(module, SwinLayer | Swinv2Layer):
                module.register_forward_pre_hook(_swin_layer_pre_hook, with_kwargs=True)
            elif isinstance(module, SwinStage | Swinv2Stage):
                module.register_forward_hook(_swin_stage_hook, with_kwargs=True)


class TLAlignSwinForImageClassification(_SwinRouting, TLAlignMixin, SwinForImageClassification):
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


# ---------------------------------------------------------------------- attention modules outside the interface
def _attention_with_aligner(module, aligner, parent_call, attention_inputs, output_attentions, dropout, scaling, base_function, base_is_eager):
    """One aligned attention call of a module outside the attention interface (Swin V2, Data2Vec-Vision).

    ``parent_call(output_attentions)`` runs the parent's forward; ``attention_inputs()`` gives the module's attention
    as scaled dot-product attention: query, key, value `(B, H, N, D)` and the additive mask. The paths:

    - ``eager`` with the parent's eager attention: the parent's forward, whose own probabilities (no dropout on this
      path) give the update, so the output and the attention maps are the parent's bit for bit;
    - ``explicit`` (attention dropout in training, gradient checkpointing): the parent's forward unchanged, and the
      dropout-free probabilities computed beside it without gradient, so that a recomputation for gradient
      checkpointing (which runs the parent's forward) matches it;
    - otherwise (``value_channel``, or ``eager`` on an SDPA module):
      :func:`~tl_align_hf.attention.attention_with_shares` on ``attention_inputs()``, with ``base_function``.

    Returns:
        The `(B, N, H * D)` attention output and the attention weights (``None`` unless computed).
    """
    path = choose_path(aligner.attention_path, "eager" if base_is_eager else "fused", dropout)
    if path == "explicit" or (path == "eager" and base_is_eager):
        outputs = parent_call(output_attentions or path == "eager")
        if path == "eager":
            probabilities = outputs[1]
        else:
            with torch.no_grad():
                query, key, _, mask = attention_inputs()
            probabilities = dropout_free_probabilities(query, key, mask, scaling)
        if not aligner.closed:
            aligner.update(mean_attended_shares(probabilities.detach(), aligner.attention_shares()))
        return outputs[0], outputs[1] if len(outputs) > 1 else None
    query, key, value, mask = attention_inputs()
    output, weights = attention_with_shares(
        aligner, module, query, key, value, mask, dropout, scaling,
        base_function=base_function, eager_function=eager_attention_forward, base_is_eager=base_is_eager,
    )  # fmt: skip
    return output.flatten(2), weights


# -------------------------------------------------------------------------------------------------------- Swin V2
class _TLAlignSwinv2SelfAttention(Swinv2SelfAttention):
    """Swin V2's window attention that also feeds the aligner put on it for an aligned forward pass; without one,
    the parent's forward. Converted models get this class in place of ``Swinv2SelfAttention`` (same weights).

    The ``eager`` and ``explicit`` paths run the parent's forward (see :func:`_attention_with_aligner`). For the
    ``value_channel`` path, cosine attention is written as scaled dot-product attention with scaling 1 of the
    normalised queries times the clamped logit scale and the normalised keys, with the continuous position bias
    (``16 * sigmoid``) and the shift mask (which ``Swinv2SelfAttention`` adds twice) as its additive mask.
    """

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        aligner = getattr(self, ALIGNER_ATTRIBUTE, None)
        if aligner is None:
            return super().forward(hidden_states, attention_mask, output_attentions)
        context, weights = _attention_with_aligner(
            self, aligner, functools.partial(super().forward, hidden_states, attention_mask),
            functools.partial(self._tl_align_attention_inputs, hidden_states, attention_mask), output_attentions,
            self.dropout.p if self.training else 0.0, 1.0, eager_attention_forward, True,
        )  # fmt: skip
        return (context, weights) if output_attentions else (context,)

    def _tl_align_attention_inputs(self, hidden_states, attention_mask):
        """Query, key, value `(B * windows, H, N, D)` and the `(B * windows, H, N, N)` additive mask."""
        batch_size, num_tokens, _ = hidden_states.shape  # (B * windows, window_size**2, C)
        heads = (batch_size, num_tokens, self.num_attention_heads, self.attention_head_size)
        query, key, value = (layer(hidden_states).view(heads).transpose(1, 2) for layer in (self.query, self.key, self.value))
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()  # (H, 1, 1)
        query = torch.nn.functional.normalize(query, dim=-1) * logit_scale
        key = torch.nn.functional.normalize(key, dim=-1)
        bias_table = self.continuous_position_bias_mlp(self.relative_coords_table).view(-1, self.num_attention_heads)
        bias = bias_table[self.relative_position_index.view(-1)].view(num_tokens, num_tokens, -1).permute(2, 0, 1)
        mask = 16 * torch.sigmoid(bias).unsqueeze(0)  # (1, H, N, N)
        if attention_mask is not None:  # (windows, N, N) shift mask, repeated over the images of the batch
            num_windows = attention_mask.shape[0]
            shift_mask = attention_mask[None, :, None]
            mask = (mask[None] + shift_mask + shift_mask).expand(batch_size // num_windows, -1, -1, -1, -1)
            mask = mask.reshape(batch_size, -1, num_tokens, num_tokens)
        return query, key, value, mask


class TLAlignSwinv2ForImageClassification(_SwinRouting, TLAlignMixin, Swinv2ForImageClassification):
    """:class:`~transformers.Swinv2ForImageClassification` with token-label alignment.

    The shares follow the tokens through the windows, shifts and patch merging exactly as for Swin (same hooks on
    the Swin V2 layers and stages). Swin V2's attention runs outside the attention interface (cosine similarity,
    clamped logit scale, continuous position bias); its modules become :class:`_TLAlignSwinv2SelfAttention`, which
    computes each window's ``mean_h(P_h) @ s`` from those probabilities, before attention dropout. The blocks are
    post-norm (``x + norm(attention(x))``): still one residual attention branch, so the rule is unchanged. The
    aligned share is the mean of the final shares, as the classifier mean-pools the final tokens.
    """

    tl_align_parent = Swinv2ForImageClassification
    tl_align_num_prefix_tokens = 0
    tl_align_pooling = "patch_mean"
    tl_align_attention_classes = {Swinv2SelfAttention: _TLAlignSwinv2SelfAttention}
    tl_align_aligner_holders = (Swinv2Layer, Swinv2Stage)


# ------------------------------------------------------------------------------------------------ Data2Vec-Vision
_DATA2VEC_SDPA = functools.partial(sdpa_attention_forward, is_causal=False)


class _TLAlignData2VecVisionAttention:
    """Data2Vec-Vision's self-attention (eager or SDPA class) that also feeds the aligner put on it for an aligned
    forward pass; without one, the parent's forward. The relative position biases (the layer's own and the shared
    one) are the additive mask of :func:`~tl_align_hf.attention.attention_with_shares`, on every path."""

    def forward(self, hidden_states, output_attentions=False, relative_position_bias=None, interpolate_pos_encoding=False, resolution=None):
        aligner = getattr(self, ALIGNER_ATTRIBUTE, None)
        if aligner is None:
            return super().forward(hidden_states, output_attentions, relative_position_bias, interpolate_pos_encoding, resolution)
        fused = isinstance(self, Data2VecVisionSdpaSelfAttention)
        context, weights = _attention_with_aligner(
            self, aligner,
            lambda attentions: super(_TLAlignData2VecVisionAttention, self).forward(
                hidden_states, attentions, relative_position_bias, interpolate_pos_encoding, resolution
            ),
            functools.partial(self._tl_align_attention_inputs, hidden_states, relative_position_bias, interpolate_pos_encoding, resolution),
            output_attentions, self.dropout.p if self.training else 0.0, self.attention_head_size**-0.5,
            _DATA2VEC_SDPA if fused else eager_attention_forward, not fused,
        )  # fmt: skip
        if fused:
            return context, None
        return (context, weights) if output_attentions else (context,)

    def _tl_align_attention_inputs(self, hidden_states, relative_position_bias, interpolate_pos_encoding, resolution):
        """Query, key, value `(B, H, N, D)` and the `(1, H, N, N)` relative position bias (or ``None``)."""
        heads = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query, key, value = (layer(hidden_states).view(heads).transpose(1, 2) for layer in (self.query, self.key, self.value))
        bias = relative_position_bias
        if self.has_relative_position_bias:
            grid = (resolution[0] // self.config.patch_size, resolution[1] // self.config.patch_size)
            own_bias = self.relative_position_bias(grid, interpolate_pos_encoding, dim_size=hidden_states.shape[1])
            bias = own_bias if bias is None else own_bias + bias
        return query, key, value, bias


class _TLAlignData2VecVisionSelfAttention(_TLAlignData2VecVisionAttention, Data2VecVisionSelfAttention):
    pass


class _TLAlignData2VecVisionSdpaSelfAttention(_TLAlignData2VecVisionAttention, Data2VecVisionSdpaSelfAttention):
    pass


class TLAlignData2VecVisionForImageClassification(TLAlignMixin, Data2VecVisionForImageClassification):
    """:class:`~transformers.Data2VecVisionForImageClassification` with token-label alignment.

    The BEiT computation (CLS token, relative position bias, mean pooling) with Data2Vec-Vision's own eager and SDPA
    attention classes, which run outside the attention interface: they become aligned subclasses (same weights).
    The read-out follows ``config.use_mean_pooling`` as for BEiT: the mean patch share, or the CLS share.
    """

    tl_align_parent = Data2VecVisionForImageClassification
    tl_align_num_prefix_tokens = 1
    tl_align_attention_classes = {
        Data2VecVisionSelfAttention: _TLAlignData2VecVisionSelfAttention,
        Data2VecVisionSdpaSelfAttention: _TLAlignData2VecVisionSdpaSelfAttention,
    }

    @property
    def tl_align_pooling(self) -> str:
        return "patch_mean" if self.config.use_mean_pooling else "cls"


# -------------------------------------------------------------------------------------------- SigLIP 2 (NaFlex)
def _masked_mean_shares(shares: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """`(B, N)` shares, `(B, N)` mask of the real patches -> `(B, 1)` mean share of the real patches."""
    weights = pool_mask.to(shares.dtype)
    return ((shares * weights).sum(dim=1) / weights.sum(dim=1))[:, None]


def _forward_then_pool_shares(parent_forward, model, *, token_label_aligner, **arguments):
    """The parent's forward, then the shares pooled as the classifier pools the tokens: the mean over the real
    patches of ``pixel_attention_mask`` (all tokens without one)."""
    outputs = parent_forward(model, token_label_aligner=token_label_aligner, **arguments)
    pool_mask = arguments.get("pixel_attention_mask")
    if pool_mask is not None:
        token_label_aligner.merge_tokens(functools.partial(_masked_mean_shares, pool_mask=pool_mask))
    return outputs


class TLAlignSiglip2ForImageClassification(TLAlignMixin, Siglip2ForImageClassification):
    """:class:`~transformers.Siglip2ForImageClassification` (NaFlex) with token-label alignment.

    SigLIP 2 takes each image as a padded sequence of patches: ``pixel_values`` `(B, N, C * P * P)`, with
    ``pixel_attention_mask`` `(B, N)` (1 for the image's patches, 0 for padding) and ``spatial_shapes`` `(B, 2)`
    (each image's own patch grid, row-major at the start of its sequence). ``token_weights`` `(B, N)` cover the same
    padded sequence. Padded patches are masked out of the attention as keys, so they never reach a real token, and
    out of the read-out: the aligned share is the mean share of each image's real patches, as the classifier averages
    them (no CLS token). Whatever ``token_weights`` hold at padded positions has no effect.
    """

    tl_align_parent = Siglip2ForImageClassification
    tl_align_num_prefix_tokens = 0
    tl_align_pooling = "patch_mean"
    tl_align_kwargs_dropped_by = (Siglip2Attention,)

    @property
    def tl_align_image_size(self) -> None:
        return None  # NaFlex: each image keeps its own size

    def tl_align_num_patches(self, pixel_values: torch.Tensor) -> int:
        if pixel_values.dim() != 3:
            raise ValueError(
                "Siglip2ForImageClassification takes `pixel_values` as patch sequences (batch_size, num_patches, "
                f"channels * patch_size**2) with `pixel_attention_mask` and `spatial_shapes`, got shape "
                f"{tuple(pixel_values.shape)}. Prepare the images with Siglip2ImageProcessor."
            )
        return pixel_values.shape[1]

    def tl_align_forward(self, parent_forward, arguments, labels, mix_index, token_weights, mix_lam, target_smoothing):
        forward = functools.partial(_forward_then_pool_shares, parent_forward)
        return super().tl_align_forward(forward, arguments, labels, mix_index, token_weights, mix_lam, target_smoothing)


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
    Swinv2ForImageClassification: TLAlignSwinv2ForImageClassification,
    Data2VecVisionForImageClassification: TLAlignData2VecVisionForImageClassification,
    Siglip2ForImageClassification: TLAlignSiglip2ForImageClassification,
}


_CONVOLUTIONAL = "a convolutional network: it has no attention to follow the labels through"
_TRY_VIT = "Nearest supported: a ViT of similar size (ViT, DeiT, BEiT, DINOv2) or Swin / Swin V2"
_TRY_SWIN = "Nearest supported: Swin or Swin V2 (hierarchical, windowed attention only)"
_TIMM_DINOV3 = (
    "Fine-tune DINOv3 with TL-Align through timm: TimmWrapperForImageClassification of `vit_small_patch16_dinov3` "
    "or `vit_base_patch16_dinov3` (the `timm/vit_small_patch16_dinov3.lvd1689m`, `timm/vit_base_patch16_dinov3."
    "lvd1689m` checkpoints: AutoModelForImageClassification.from_pretrained('timm/vit_base_patch16_dinov3.lvd1689m'))"
)
# model_type -> (what keeps TL-Align from following the labels, the nearest supported alternative)
UNSUPPORTED_FAMILIES: dict[str, tuple[str, str]] = {
    **{
        model_type: (_CONVOLUTIONAL, _TRY_VIT)
        for model_type in (
            "bit", "convnext", "convnextv2", "dinov3_convnext", "efficientnet", "hgnet_v2", "mobilenet_v1",
            "mobilenet_v2", "pp_lcnet", "regnet", "resnet", "textnet",
        )
    },
    "poolformer": ("its token mixer is average pooling, not attention", _TRY_VIT),
    "focalnet": ("focal modulation (depth-wise convolutions and gating) mixes the tokens instead of attention", _TRY_SWIN),
    "cvt": (
        "convolutional token embeddings and convolutional query/key/value projections mix neighbouring tokens "
        "outside the attention probabilities",
        _TRY_VIT,
    ),
    "pvt": (
        "spatial-reduction attention: keys and values come from a strided convolution over the token grid, so the "
        "attention does not run between the tokens themselves",
        _TRY_SWIN,
    ),
    "pvt_v2": (
        "spatial-reduction attention (keys and values from a strided convolution or pooling), overlapping "
        "convolutional patch embeddings and a depth-wise convolution in every MLP mix tokens outside attention",
        _TRY_SWIN,
    ),
    "segformer": (
        "its attention uses the attention interface, but keys and values come from a strided convolution (spatial "
        "reduction), the patch embeddings overlap and the Mix-FFN has a depth-wise convolution: tokens mix outside "
        "attention",
        _TRY_SWIN,
    ),
    "mobilevit": (
        "MobileNetV2 convolution blocks, and unfold/fold around the transformer, mix pixels outside attention",
        "Nearest supported: a small ViT such as DeiT-Tiny",
    ),
    "mobilevitv2": (
        "separable linear attention (one context score per token, no token-to-token probabilities) between "
        "convolution blocks",
        "Nearest supported: a small ViT such as DeiT-Tiny",
    ),
    "swiftformer": (
        "efficient additive attention (no token-to-token probabilities) between convolutional encoders",
        "Nearest supported: a small ViT such as DeiT-Tiny",
    ),
    "levit": (
        "a convolutional stem, and attention blocks that subsample the queries (tokens merge inside attention, with "
        "no residual)",
        "Nearest supported: DeiT (LeViT's distilled training is DeiT's), with or without teacher",
    ),
    "hiera": (
        "mask-unit attention with query pooling (tokens merge inside attention) in its own attention module, outside "
        "transformers' attention interface",
        _TRY_SWIN,
    ),
    "dinat": ("neighbourhood attention from the natten kernels, with convolutional downsampling between stages", _TRY_SWIN),
    "donut-swin": (
        "Donut's encoder copies Swin V1 into its own classes, with attention outside transformers' attention "
        "interface",
        "Nearest supported: SwinForImageClassification",
    ),
    "perceiver": (
        "cross-attention from a learned latent array: the classifier reads latents that are not image tokens",
        _TRY_VIT,
    ),
    "imagegpt": (
        "it reads colour-cluster ids of single pixels (`input_ids`), not patches of `pixel_values`",
        _TRY_VIT,
    ),
    "shieldgemma2": (
        "a vision-language safety classifier: its scores are Gemma 3's generated yes/no answers, not a read-out of "
        "image tokens",
        "Nearest supported: SigLIP 2 (Siglip2ForImageClassification), the family of Gemma 3's vision tower",
    ),
    "dinov3_vit": (
        "transformers has no DINOv3 image-classification class (AutoModelForImageClassification does not map "
        "dinov3_vit; DINOv3ViTModel has no head)",
        _TIMM_DINOV3,
    ),
}


def _refusal(model: torch.nn.Module) -> str:
    """Why ``model`` is not supported and what to use instead: the family's own obstacle, or, for a supported family
    loaded without its image-classification head, the class to load."""
    supported = ", ".join(cls.__name__ for cls in ALIGNED_CLASSES)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    head = f"TL-Align does not support {type(model).__name__} (model_type={model_type!r})"
    if model_type in UNSUPPORTED_FAMILIES:
        obstacle, alternative = UNSUPPORTED_FAMILIES[model_type]
        return f"{head}: {obstacle}. {alternative}. Supported classes: {supported}."
    same_family = [cls.__name__ for cls in ALIGNED_CLASSES if getattr(cls, "config_class", None) is type(model.config)]
    if same_family:
        return (
            f"{head}: TL-Align trains image classifiers. Load the checkpoint with AutoModelForImageClassification "
            f"({' or '.join(same_family)}). Supported classes: {supported}."
        )
    return (
        f"{head}: its family has not been checked. TL-Align follows the labels through attention, so it needs "
        "blocks whose tokens mix only through attention (one residual attention branch per block) and a classifier "
        f"that reads a mean of the final tokens or a class token. Supported classes: {supported}."
    )


def to_tl_align(model: PreTrainedModel) -> PreTrainedModel:
    """Turn a loaded model of a supported class into its aligned subclass, in place; return it.

    Works on models from ``AutoModelForImageClassification.from_pretrained(...)``, and on peft models of them
    (``get_peft_model(model, LoraConfig(...))``): the base model inside is converted, adapters and all, and the
    ``PeftModel`` is returned; its forward hands the mixing arguments on to the base model. No weights change.

    Raises:
        ValueError: the model's class is not supported (nothing is changed).
    """
    peft_base = unwrap_peft_model(model)  # the transformers model inside a PeftModel (as peft finds it), else model
    if peft_base is not model:
        to_tl_align(peft_base)
        return model
    if isinstance(model, TLAlignMixin):
        return model
    aligned_class = ALIGNED_CLASSES.get(type(model))
    if aligned_class is None:
        raise ValueError(_refusal(model))
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
