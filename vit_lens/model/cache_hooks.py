"""The hooks behind ``run_with_cache``: each activation is cut to the wanted tokens and moved as it is recorded.

Two things keep a cache small, and both act inside the hook, one activation at a time, so the
memory of the model's device never holds more than the activation being recorded:

* ``pos_slice`` keeps only some tokens. It selects along the token axis of each hook's own
  layout (:func:`vit_lens.model.hook_layout.hook_axes`): ``[batch, pos, d]`` and
  ``[batch, pos, head, d_head]`` on ``pos``; attention scores and patterns
  ``[batch, head, query, key]`` on the *query* axis (every key is kept, so
  ``pattern[..., 0, :]`` of a CLS-only cache is still CLS's full attention row); hooks after
  pooling (``hook_pooled``, ``hook_image_embed``) have no token axis and are kept whole. The
  selection is always a copy, never a view that would keep the full activation alive.
* ``device`` moves each recorded tensor there at once (CPU offload of a GPU run).
"""

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vit_lens.model._transformer_lens import Slice
from vit_lens.model.hook_layout import hook_axes

POS_SLICE_FORMS = (
    "None (every token), an int (one token, e.g. 0 for CLS; the axis is kept), a slice or a "
    "(start, stop[, step]) tuple, a list / 1-D tensor / array of token indices, or a 1-D boolean "
    "mask with one entry per token"
)


class TokenSelection:
    """The tokens ``pos_slice`` keeps, as indices into a token axis of any length.

    Args:
        pos_slice: One of :data:`POS_SLICE_FORMS`, or a TransformerLens ``Slice``.

    Raises:
        TypeError: ``pos_slice`` has none of those forms.
        ValueError: an index list or mask that is empty, not 1-D, or not integer / boolean.
    """

    def __init__(self, pos_slice: Any):
        self.pos_slice = pos_slice
        spec = pos_slice.slice if isinstance(pos_slice, Slice) else pos_slice
        if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
            spec = [int(spec)]
        elif isinstance(spec, tuple) and 1 <= len(spec) <= 3 and all(
            part is None or (isinstance(part, (int, np.integer)) and not isinstance(part, bool)) for part in spec
        ):
            spec = slice(*spec)
        if isinstance(spec, slice):
            self._slice, self._indices, self._mask = spec, None, None
            return
        if not isinstance(spec, (list, Tensor, np.ndarray)):
            raise TypeError(f"pos_slice={pos_slice!r} ({type(pos_slice).__name__}) is not a token selection; pass "
                            f"{POS_SLICE_FORMS}.")
        values = torch.as_tensor(np.asarray(spec) if isinstance(spec, list) else spec).cpu()
        if values.ndim != 1 or len(values) == 0:
            raise ValueError(f"pos_slice must be a non-empty 1-D list of token indices or a boolean mask, got shape "
                             f"{tuple(values.shape)}; pass {POS_SLICE_FORMS}.")
        if values.dtype == torch.bool and not values.any():
            raise ValueError("pos_slice is a boolean mask with no True entry, so it keeps no token; mark the tokens "
                             "to keep with True")
        if values.dtype == torch.bool:
            self._slice, self._indices, self._mask = None, None, values
        elif not values.dtype.is_floating_point and not values.dtype.is_complex:
            self._slice, self._indices, self._mask = None, values.long(), None
        else:
            raise ValueError(f"pos_slice indices must be integers or booleans, got {values.dtype}; pass "
                             f"{POS_SLICE_FORMS}.")

    def indices(self, n_tokens: int, name: str) -> Tensor:
        """The kept token indices (in ``0 .. n_tokens - 1``) for the token axis of hook ``name``."""
        if self._slice is not None:
            kept = torch.arange(n_tokens)[self._slice]
            if len(kept) == 0:
                raise ValueError(f"pos_slice={self.pos_slice!r} keeps no token of the {n_tokens} at {name}")
            return kept
        if self._mask is not None:
            if len(self._mask) != n_tokens:
                raise ValueError(f"pos_slice is a boolean mask of {len(self._mask)} entries but {name} has "
                                 f"{n_tokens} tokens; pass one entry per token (model.token_labels() lists them)")
            return self._mask.nonzero().flatten()
        out_of_range = (self._indices >= n_tokens) | (self._indices < -n_tokens)
        if out_of_range.any():
            raise ValueError(f"pos_slice token indices {self._indices[out_of_range].tolist()} are out of range for "
                             f"{name}, which has {n_tokens} tokens (valid: -{n_tokens} to {n_tokens - 1})")
        return self._indices % n_tokens

    def apply(self, activation: Tensor, name: str) -> Tensor:
        """The kept tokens of ``activation`` (batch axis first), a copy; unchanged if it has no token axis."""
        axis = hook_axes(name, activation.ndim).position
        if axis is None:
            # A pooled row can be a view of the whole last layer, which must not outlive the run.
            whole = activation.untyped_storage().nbytes() > activation.numel() * activation.element_size()
            return activation.clone() if whole else activation
        kept = self.indices(activation.shape[axis], name)
        return activation.index_select(axis, kept.to(activation.device))


def cache_device(device: Any) -> torch.device | None:
    """``device`` as a ``torch.device`` the cache can be moved to, checked before the run starts."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a torch device; pass e.g. 'cpu', 'cuda', 'cuda:1' or a "
                         f"torch.device ({error})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available here; cache on 'cpu' or leave device=None to "
                         "keep each activation where the model computes it")
    return resolved


def _save(cache: dict[str, Tensor], key: str, selection: TokenSelection | None, device: torch.device | None,
          remove_batch_dim: bool, activation: Tensor, hook: Any) -> None:
    """Record one activation: tokens first (so only they are copied or moved), then the device, then the batch axis."""
    stored = activation.detach()
    if selection is not None:
        stored = selection.apply(stored, hook.name)
    if device is not None:
        stored = stored.to(device)
    if remove_batch_dim and stored.ndim and stored.shape[0] == 1:
        stored = stored[0]
    cache[key] = stored


def caching_hooks(
    hook_names: list[str],
    names_filter: Callable[[str], bool],
    incl_bwd: bool = False,
    device: Any = None,
    remove_batch_dim: bool = False,
    cache: dict | None = None,
    pos_slice: Any = None,
) -> tuple[dict[str, Tensor], list, list]:
    """The forward (and backward) hooks that record the activations ``names_filter`` selects into ``cache``.

    Args:
        hook_names: The model's hook point names.
        names_filter: Which of them to record.
        incl_bwd: Also record gradients, as ``<name>_grad``.
        device: Where recorded tensors go, each as it is recorded (None: where it was computed).
        remove_batch_dim: Drop the batch axis of a batch of one.
        cache: The dict to fill (a new one by default).
        pos_slice: The tokens to keep (see the module docstring); None keeps them all.

    Returns:
        ``(cache, fwd_hooks, bwd_hooks)`` as TransformerLens's ``get_caching_hooks``.
    """
    cache = {} if cache is None else cache
    selection = None if pos_slice is None else TokenSelection(pos_slice)
    target = cache_device(device)
    fwd_hooks, bwd_hooks = [], []
    for name in hook_names:
        if not names_filter(name):
            continue
        fwd_hooks.append((name, partial(_save, cache, name, selection, target, remove_batch_dim)))
        if incl_bwd:
            bwd_hooks.append((name, partial(_save, cache, name + "_grad", selection, target, remove_batch_dim)))
    return cache, fwd_hooks, bwd_hooks
