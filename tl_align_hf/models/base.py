"""What every aligned model shares: :class:`TLAlignMixin`, the aligned output class and forward it builds for a
transformers image classifier, :func:`as_parent_class`, and the aligned attention call of attention modules outside
transformers' attention interface (:func:`attention_with_aligner`).

The aligned subclasses (one module per family group: :mod:`.vit`, :mod:`.beit`, :mod:`.swin`, :mod:`.timm`) add
no weights, rename no modules, and leave the config alone. Called without mixing arguments they are their parent
class: same signature (the mixing arguments are keyword-only, after the parent's parameters), same outputs. Called
with the batch contract (``mix_index``, ``token_weights``, ``mix_lam``, as :class:`TLAlignCollator` produces it)
they create a :class:`TokenLabelAligner`, pass it down to every attention call through the model's ``**kwargs``
(or, for attention modules that drop them, through :func:`~tl_align_hf.attention.pass_aligner_through`), and return
the parent's output with ``aligned_lam`` `(B,)` added: the share of each sample's own label in its aligned target.
With ``labels`` (where the parent takes them) the ``loss`` is :func:`~tl_align_hf.mixed_batch_loss` against that
target.

Every family goes through the same mechanism (:mod:`tl_align_hf.attention` feeding a :class:`TokenLabelAligner`);
what differs between families is data on each subclass: the tokens in front of the patch tokens, the read-out that
mirrors the classifier's pooling, and, for Swin, how the tokens are re-arranged into windows and merged. Converting
a model (:meth:`TLAlignMixin.tl_align_convert`) and converting it back (:meth:`TLAlignMixin.tl_align_restore`) are
mirror images: what one installs, the other removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import typing

import torch
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel
from transformers.models.vit.modeling_vit import eager_attention_forward
from transformers.utils import ModelOutput

from ..aligner import TokenLabelAligner
from ..attention import (
    ATTENTION_PATHS,
    aligner_on_modules,
    attention_with_shares,
    choose_path,
    dropout_free_probabilities,
    mean_attended_shares,
    pass_aligner_through,
    route_attention,
    unroute_attention,
)
from ..contract import MIXING_KEYS, check_model_inputs
from ..losses import loss_of_checked_batch
from ..settings import check_label_smoothing

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


def aligned_output_class(parent: type[PreTrainedModel]) -> type[ModelOutput]:
    """The output class of `parent.forward` with an ``aligned_lam`` `(B,)` field appended, defined in this module
    (`ImageClassifierOutput` -> `TLAlignImageClassifierOutput`), so that aligned outputs are still instances of the
    parent's output class and flatten as pytrees (DDP, torch.compile)."""
    annotation = inspect.signature(parent.forward).return_annotation  # e.g. `tuple | ImageClassifierOutput`
    candidates = [annotation, *typing.get_args(annotation)]
    output_class = next((item for item in candidates if inspect.isclass(item) and issubclass(item, ModelOutput)), None)
    if output_class is None:
        raise TypeError(f"{parent.__name__}.forward must be annotated with its ModelOutput class, got {annotation!r}.")
    name = f"TLAlign{output_class.__name__}"
    if name not in _ALIGNED_OUTPUT_CLASSES:
        aligned_lam = ("aligned_lam", torch.FloatTensor | None, dataclasses.field(default=None))
        namespace = {"__module__": __name__}
        aligned = dataclasses.make_dataclass(name, [aligned_lam], bases=(output_class,), namespace=namespace)
        aligned.__doc__ = f"`{output_class.__name__}` plus ``aligned_lam`` `(B,)`: the aligned share of each sample's own label."
        _ALIGNED_OUTPUT_CLASSES[name] = aligned
    return _ALIGNED_OUTPUT_CLASSES[name]


_ALIGNED_OUTPUT_CLASSES: dict[str, type[ModelOutput]] = {}  # made by `aligned_output_class`, by name


def __getattr__(name: str):
    """The aligned output classes as attributes of this module, where pickle looks them up (their `__module__`)."""
    if name in _ALIGNED_OUTPUT_CLASSES:
        return _ALIGNED_OUTPUT_CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    whose attention sees the tokens re-arranged (Swin) also override :meth:`tl_align_install_hooks`, which returns
    the handles of the hooks it registers (kept on the model, so that :meth:`tl_align_restore` removes them).
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
            cls.tl_align_output_class = aligned_output_class(cls.tl_align_parent)
            if "forward" not in cls.__dict__:
                cls.forward = _aligned_forward_of(cls.tl_align_parent.forward)

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.tl_align_convert()

    def tl_align_convert(self) -> None:
        """Route the attention and install the hooks (on a new model of this class, or one `to_tl_align` converts)."""
        self.tl_align_route_attention()
        self._tl_align_hook_handles = self.tl_align_install_hooks()

    def tl_align_restore(self) -> None:
        """Undo :meth:`tl_align_convert` and become the parent class (what `from_tl_align` does): the hooks
        removed, every attention module's own class and config back, no ``tl_align_*`` attribute left."""
        for handle in self.__dict__.pop("_tl_align_hook_handles", ()):
            handle.remove()
        self.tl_align_unroute_attention()
        for name in [name for name in vars(self) if name.startswith(("tl_align_", "_tl_align_"))]:
            delattr(self, name)  # e.g. a `tl_align_attention_path` set on the model
        self.__class__ = self.tl_align_parent

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

    def tl_align_install_hooks(self) -> list[RemovableHandle]:
        """Register the module hooks a family needs (none, unless its attention modules drop the kwargs); return
        their handles."""
        dropping = [module for module in self.modules() if isinstance(module, self.tl_align_kwargs_dropped_by)]
        return [handle for module in dropping for handle in pass_aligner_through(module)]

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

    def tl_align_unroute_attention(self) -> None:
        """Undo :meth:`tl_align_route_attention`: every attention module gets its own class and config back."""
        parent_classes = {aligned: parent for parent, aligned in self.tl_align_attention_classes.items()}
        for module in self.modules():
            module.__class__ = parent_classes.get(type(module), type(module))
        unroute_attention(self)

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


# ---------------------------------------------------------------------- attention modules outside the interface
def attention_with_aligner(module, aligner, parent_call, attention_inputs, output_attentions, dropout, scaling, base_function, base_is_eager):
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


