"""Feeding a :class:`~tl_align_hf.aligner.TokenLabelAligner` from transformers' attention interface.

Every attention module of an aligned model sees its config through a :class:`RoutedConfig`: the model's own config
object, except that ``_attn_implementation`` reads ``tl_align_<backend>``, an implementation registered in
transformers' ``AttentionInterface`` that wraps the backend the model's config names (``eager``, ``sdpa``, flash,
flex...). Nothing is copied or changed: the model's config, what it saves, what ``set_attn_implementation`` and
``output_attentions`` check, stays the user's, and the routing follows any change of backend, successful or not.
Without a ``token_label_aligner`` keyword argument the wrapper calls the backend unchanged, so a model used without
mixing arguments computes exactly what the parent class computes. With one, it also computes ``mean_h(P_h) @ s`` for
the block and hands it to the aligner, on one of three paths:

- ``"eager"``: the model's own eager attention, whose attention probabilities are reused. The default with the
  eager backend.
- ``"value_channel"``: the shares ride as extra value channels through the backend's fused kernel (query and key
  get zero channels; no ``N x N`` matrix is materialised; :mod:`tl_align_hf.value_channel`, docs/algorithm.md).
  The default with a fused backend (SDPA, flash...). In Llama-shaped attention modules (ViT, DeiT, DINOv2, BEiT,
  CLIP, SigLIP, Swin...) the module's own projections produce the widened query, key and value (installed by
  :func:`route_attention`); elsewhere they are widened by copies.
- ``"explicit"``: the backend runs unchanged and the dropout-free probabilities are computed beside it. Used
  whenever attention dropout is active, because the shares must not see dropout.

Every path runs with every backend the parent accepts. Flex attention passes a ``BlockMask`` instead of a mask
tensor; the eager and explicit paths, which compute the probabilities themselves, apply the element mask it stands
for (:func:`block_mask_keep`). (On the CPU, torch runs flex attention forward only, for the parent as for us.)

The aligner travels with the forward pass's ``**kwargs`` down to the attention function. A few attention modules
drop the kwargs (SigLIP's); :func:`pass_aligner_through` hands them the aligner as a module attribute instead.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable

import torch
from torch.utils.hooks import RemovableHandle
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import is_torch_flex_attn_available

from .aligner import TokenLabelAligner
from .value_channel import (
    WidenedLayout,
    install_widened_projections,
    num_share_channels,
    restore_projections,
    value_channel_attention,
    value_channel_width,
    widened_layout,
)

if is_torch_flex_attn_available():
    from torch.nn.attention.flex_attention import BlockMask, create_mask
else:  # torch < 2.5: no flex attention, so no block masks to meet
    BlockMask = create_mask = None

ROUTE_PREFIX = "tl_align_"
ATTENTION_PATHS = ("auto", "eager", "value_channel", "explicit")
ALIGNER_ATTRIBUTE = "_tl_align_aligner"  # where pass_aligner_through keeps the aligner during an attention call


def register_routed_attention(base_implementation: str) -> str:
    """Register the aligned wrapper around ``base_implementation`` (idempotent) and return its name."""
    routed = ROUTE_PREFIX + base_implementation
    if routed not in AttentionInterface._global_mapping:
        wrapper = functools.partial(aligned_attention_forward, base_implementation=base_implementation)
        AttentionInterface.register(routed, wrapper)
    return routed


class RoutedConfig:
    """An attention module's view of its model's config: every attribute is the config's own, read and written
    through, except ``_attn_implementation``, which names the aligned wrapper of the config's current backend.

    It also holds the ``eager_attention_forward`` of the module's modeling file, which the aligned paths reuse.
    """

    __slots__ = ("tl_align_config", "tl_align_eager_attention")

    def __init__(self, config: PretrainedConfig, eager_attention: Callable):
        object.__setattr__(self, "tl_align_config", config)
        object.__setattr__(self, "tl_align_eager_attention", eager_attention)

    @property
    def _attn_implementation(self) -> str:
        return register_routed_attention(self.tl_align_config._attn_implementation or "eager")

    def __getattr__(self, name: str):
        return getattr(self.tl_align_config, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.tl_align_config, name, value)

    def __reduce__(self):  # pickling and deepcopy keep the view over the (copied) config
        return RoutedConfig, (self.tl_align_config, self.tl_align_eager_attention)

    def __repr__(self) -> str:
        return f"RoutedConfig({self.tl_align_config!r})"


def _eager_attention_of(module: torch.nn.Module) -> Callable | None:
    """The ``eager_attention_forward`` of the modeling file that defines ``module``'s class, if it has one."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def is_interface_attention(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an attention module on transformers' attention interface (``*Attention`` classes with a
    config, defined next to an ``eager_attention_forward``)."""
    return (
        type(module).__name__.endswith("Attention")
        and not isinstance(module, PreTrainedModel)
        and isinstance(getattr(module, "config", None), PretrainedConfig | RoutedConfig)
        and _eager_attention_of(module) is not None
    )


def route_attention(model: torch.nn.Module) -> int:
    """Give every interface attention module of ``model`` a :class:`RoutedConfig` view (once), and, where its
    projections qualify, widenable projections for the value channel (:mod:`tl_align_hf.value_channel`,
    undone by :func:`~tl_align_hf.value_channel.restore_projections`); return how many modules."""
    routed = 0
    for module in model.modules():
        if is_interface_attention(module):
            if not isinstance(module.config, RoutedConfig):
                module.config = RoutedConfig(module.config, _eager_attention_of(module))
            install_widened_projections(module, value_channel_layout)
            routed += 1
    return routed


def unroute_attention(model: torch.nn.Module) -> None:
    """Undo :func:`route_attention` (and :func:`pass_aligner_through`'s attribute): own configs, plain projections,
    no aligner attribute on any module."""
    restore_projections(model)
    for module in model.modules():
        if isinstance(getattr(module, "config", None), RoutedConfig):
            module.config = module.config.tl_align_config
        module.__dict__.pop(ALIGNER_ATTRIBUTE, None)


def base_attention_function(module: torch.nn.Module, base_implementation: str) -> Callable:
    """The attention function that ``module`` would call for ``base_implementation``."""
    eager = module.config.tl_align_eager_attention
    if base_implementation == "eager":
        return eager
    return ALL_ATTENTION_FUNCTIONS.get_interface(base_implementation, eager)


def _stash_aligner(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    setattr(module, ALIGNER_ATTRIBUTE, kwargs.get("token_label_aligner"))


def _drop_aligner(module: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
    setattr(module, ALIGNER_ATTRIBUTE, None)


@contextlib.contextmanager
def aligner_on_modules(modules: list[torch.nn.Module], aligner: TokenLabelAligner):
    """Within the block, ``aligner`` is on each of ``modules`` (as ``ALIGNER_ATTRIBUTE``), where the forward of
    attention modules that take no aligner argument finds it; afterwards it is taken off, so that a later forward
    without mixing arguments is the parent's."""
    for module in modules:
        setattr(module, ALIGNER_ATTRIBUTE, aligner)
    try:
        yield
    finally:
        for module in modules:
            setattr(module, ALIGNER_ATTRIBUTE, None)


def pass_aligner_through(attention_module: torch.nn.Module) -> tuple[RemovableHandle, RemovableHandle]:
    """Hook an attention module that drops its ``**kwargs`` so that its attention calls still see the aligner.

    For the duration of each call, the ``token_label_aligner`` keyword argument the module receives is kept on the
    module, where :func:`aligned_attention_forward` finds it (no argument: the hooks do nothing). Returns the handles.
    """
    setattr(attention_module, ALIGNER_ATTRIBUTE, None)
    pre_hook = attention_module.register_forward_pre_hook(_stash_aligner, with_kwargs=True)
    return pre_hook, attention_module.register_forward_hook(_drop_aligner, with_kwargs=True, always_call=True)


def choose_path(requested: str, base_implementation: str, dropout: float) -> str:
    """Resolve ``"auto"`` to a path; dropout in training always needs the explicit, dropout-free probabilities.

    ``auto``: with the eager backend, its own probabilities (``"eager"``); with a fused one (SDPA, flash, flex), the
    value channel, on the CPU as on accelerators: measured on a 2-core CPU with torch 2.14 it costs 4-5% of a DeiT
    training step over plain SDPA, where the eager path costs 4% (DeiT-Tiny) to 9-12% (DeiT-Small) and the explicit
    path 2-7% (docs/benchmarks.md).
    """
    if requested not in ATTENTION_PATHS:
        raise ValueError(f"`attention_path` must be one of {ATTENTION_PATHS}, got {requested!r}.")
    if dropout > 0:
        return "explicit"
    if requested != "auto":
        return requested
    return "eager" if base_implementation == "eager" else "value_channel"


def _listed_blocks(num_blocks: torch.Tensor, indices: torch.Tensor, num_columns: int) -> torch.Tensor:
    """A flex ``BlockMask``'s block lists as a dense grid: `(B, H, Q_blocks)` counts and `(B, H, Q_blocks, L)` key
    block indices (the first `count` of each row are listed) -> `(B, H, Q_blocks, num_columns)` bool."""
    listed = torch.arange(indices.shape[-1], device=indices.device) < num_blocks[..., None]
    columns = torch.where(listed, indices, num_columns).long()  # unlisted entries land in an extra column, cut off
    grid = torch.zeros(*indices.shape[:-1], num_columns + 1, dtype=torch.bool, device=indices.device)
    return grid.scatter_(-1, columns, True)[..., :num_columns]


def block_mask_keep(block_mask: BlockMask, query_length: int, key_length: int) -> torch.Tensor:
    """The boolean keep-mask `(B or 1, H or 1, query_length, key_length)` that flex attention applies for
    ``block_mask``: positions in its full blocks, and positions in its partial blocks where its ``mask_mod`` holds.

    The eager and explicit paths compute the attention probabilities themselves, so they need the mask element by
    element; flex attention (and the value channel through it) takes the ``BlockMask`` as it is.
    """
    batch_size, num_heads = block_mask.shape[:2]
    query_block, key_block = block_mask.BLOCK_SIZE
    num_columns = -(-block_mask.seq_lengths[1] // key_block)

    def elements(blocks: torch.Tensor) -> torch.Tensor:  # (B, H, Q_blocks, K_blocks) -> (B, H, Q, K)
        blocks = blocks.repeat_interleave(query_block, dim=-2).repeat_interleave(key_block, dim=-1)
        return blocks[..., :query_length, :key_length]

    device = block_mask.kv_indices.device
    partial = elements(_listed_blocks(block_mask.kv_num_blocks, block_mask.kv_indices, num_columns))
    keep = partial & create_mask(block_mask.mask_mod, batch_size, num_heads, query_length, key_length, device)
    if block_mask.full_kv_num_blocks is not None:
        keep |= elements(_listed_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, num_columns))
    return keep


def element_mask(attention_mask, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """``attention_mask`` as a tensor the eager softmax can add or apply: a flex ``BlockMask`` becomes its boolean
    keep-mask for `(B, H, N_query, N_key)` (:func:`block_mask_keep`); tensors and ``None`` are returned as they are."""
    if BlockMask is not None and isinstance(attention_mask, BlockMask):
        return block_mask_keep(attention_mask, query.shape[-2], key.shape[-2])
    return attention_mask


def additive_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Boolean keep-masks (SDPA style) become additive float masks (eager style)."""
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return attention_mask
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(attention_mask, zero, torch.finfo(dtype).min)


def mean_attended_shares(probabilities: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """``mean_h(P_h) @ s`` in float32: `(B, H, N, N)` probabilities, `(B, N)` shares -> `(B, N)`."""
    mean_probabilities = probabilities.mean(dim=1, dtype=torch.float32)
    return torch.bmm(mean_probabilities, shares.unsqueeze(-1)).squeeze(-1)


def dropout_free_probabilities(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Softmax of scaled ``QK^T`` (plus mask) in float32, `(B, H, N, N)`, without gradient.

    One `(B, H, N, N)` buffer: the query is scaled before the product and the softmax runs in place.
    """
    with torch.no_grad():
        scores = torch.matmul(query.float() * scaling, key.float().transpose(-1, -2))
        mask = additive_mask(attention_mask, torch.float32)
        if mask is not None:
            scores += mask.float()
        scores -= scores.amax(dim=-1, keepdim=True)
        scores.exp_()
        return scores.div_(scores.sum(dim=-1, keepdim=True))


def value_channel_layout(module: torch.nn.Module, args: tuple, kwargs: dict) -> WidenedLayout | None:
    """Before a call of an attention module with widenable projections: the layout of its query, key and value when
    the call is aligned and will take the value-channel path, else ``None`` (the module runs as it is).

    The path is resolved as :func:`attention_with_shares` resolves it, with the attention dropout the module will
    pass (``attention_dropout`` or, in CLIP and SigLIP, ``dropout``, in training); a module with neither keeps the
    copy-based value channel. The number of share channels follows the dtype the value projection will return
    (autocast's when it is on).
    """
    aligner = kwargs.get("token_label_aligner") or getattr(module, ALIGNER_ATTRIBUTE, None)
    config = getattr(module, "config", None)
    if aligner is None or not isinstance(config, RoutedConfig):
        return None
    dropout = next((getattr(module, name) for name in ("attention_dropout", "dropout") if hasattr(module, name)), None)
    if not isinstance(dropout, int | float):
        return None
    backend = "eager" if (config.tl_align_config._attn_implementation or "eager") == "eager" else "fused"
    if choose_path(aligner.attention_path, backend, dropout if module.training else 0.0) != "value_channel":
        return None
    weight = module.q_proj.weight
    device_type = weight.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
    share_channels = num_share_channels(dtype)
    head_dim = module.head_dim
    width = value_channel_width(head_dim, share_channels, device_type)
    return WidenedLayout(weight.shape[0] // head_dim, head_dim, width - head_dim, share_channels)


def attention_with_shares(
    aligner: TokenLabelAligner,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float,
    *,
    base_function: Callable,
    eager_function: Callable,
    base_is_eager: bool,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One block's attention on the aligner's path, applying the block's share update ``mean_h(P_h) @ s``.

    ``base_function`` and ``eager_function`` follow transformers' attention-function convention
    ``(module, query, key, value, mask, dropout=, scaling=, **kwargs) -> (output (B, N, H, D), weights)``; the eager
    one returns the `(B, H, N, N)` probabilities (before dropout when ``dropout`` is 0). The timm family calls this
    with its own functions.

    Returns:
        The attention output and the weights the base backend returns (``None`` for fused backends).
    """
    if widened_layout(module) is not None:  # resolved before the module's projections ran (value_channel_layout)
        path = "value_channel"
    else:
        path = choose_path(aligner.attention_path, "eager" if base_is_eager else "fused", dropout)
    if aligner.closed:
        # Recomputed for gradient checkpointing: same path, so the same output, but the shares are final already
        # (and, in models that merge tokens, no longer of this block's size); the share channel is ignored.
        shares = query.new_zeros(query.shape[0], query.shape[2], dtype=torch.float32)
    else:
        shares = aligner.attention_shares()
    call = dict(dropout=dropout, scaling=scaling, **kwargs)
    if path == "value_channel":
        output, weights, attended = value_channel_attention(
            base_function, module, query, key, value, attention_mask, shares, **call
        )
    elif path == "eager":
        eager_mask = additive_mask(element_mask(attention_mask, query, key), query.dtype)
        output, weights = eager_function(module, query, key, value, eager_mask, **call)
        attended = mean_attended_shares(weights.detach(), shares)
        if not base_is_eager:
            weights = None  # what the backend returns: no attention maps unless the user chose eager
    else:
        output, weights = base_function(module, query, key, value, attention_mask, **call)
        attended = None
        if not aligner.closed:  # the dropout-free probabilities are only worth computing when used
            probabilities = dropout_free_probabilities(query, key, element_mask(attention_mask, query, key), scaling)
            attended = mean_attended_shares(probabilities, shares)
    if attended is not None:
        aligner.update(attended)  # ignored when closed
    return output, weights


def aligned_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    base_implementation: str,
    token_label_aligner: TokenLabelAligner | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``base_implementation`` that also feeds ``token_label_aligner``, when one is passed.

    Args:
        query, key, value: `(B', H, N', head_dim)`; `(B, H, N, head_dim)` unless the aligner has a token layout
            (Swin: one row per window).
        token_label_aligner: the forward pass's aligner; ``None`` makes this the plain backend.
    Returns:
        `(B, N, H, head_dim)` attention output and the backend's attention weights (or ``None``).
    """
    base_function = base_attention_function(module, base_implementation)
    if token_label_aligner is None:
        token_label_aligner = getattr(module, ALIGNER_ATTRIBUTE, None)
    if token_label_aligner is None:
        return base_function(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:  # the module's own head dim, also when its projections widened query and key
        layout = widened_layout(module)
        scaling = (query.shape[-1] if layout is None else layout.head_dim) ** -0.5
    return attention_with_shares(
        token_label_aligner, module, query, key, value, attention_mask, dropout, scaling,
        base_function=base_function,
        eager_function=module.config.tl_align_eager_attention,
        base_is_eager=base_implementation == "eager",
        **kwargs,
    )  # fmt: skip


# The wrappers of the backends transformers knows now; others (kernels from the Hub) are registered on first use.
for _backend in ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]:
    if not _backend.startswith(ROUTE_PREFIX):
        register_routed_attention(_backend)
