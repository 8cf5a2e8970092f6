"""TransformerLens's activation patching functions, for images (``vit_lens.tl_patching``).

The functions of ``transformer_lens.patching`` under their own names, arguments and return shapes:
``get_act_patch_resid_pre(model, corrupted_images, clean_cache, patching_metric)`` returns a
``[n_layers, pos]`` tensor on ``model.cfg.device``, and so on. They run
:func:`vit_lens.intervene.patching.activation_patching` (several patched variants per forward
pass) and return its values, in TransformerLens's axis order.

What differs from TransformerLens, and why:

* The second argument is the corrupted images ``[batch, channels, height, width]``, and the
  positions come from the model: the ``cfg.n_ctx`` positions of the residual stream (CLS at 0,
  then registers, then patches; ``model.token_labels()`` names them). TransformerLens's own
  helpers count positions along the input's last axis, which for images is the pixel width, so
  passing a HookedViT to ``transformer_lens.patching`` patches the wrong positions or fails; these
  functions raise if what they are given is not images.
* ``patching_metric(output)`` may return a scalar or one value per image (averaged). The
  output is the model's: the image tower's output (a HookedCLIP called on images alone gives its
  image embedding; there are no texts here).
* ``get_act_patch_attn_head_pattern_dest_src_pos`` (one forward pass per query-key pair) is not
  provided; patch the pattern per query with :func:`get_act_patch_attn_head_pattern_by_pos`.
* Labels, baselines, regions of the patch grid and attribution patching are in
  :mod:`vit_lens.intervene.patching`, whose :class:`~vit_lens.intervene.patching.PatchingResult`
  these functions reduce to a tensor.

Example:
    >>> from vit_lens import tl_patching  # doctest: +SKIP
    >>> _, clean_cache = model.run_with_cache(clean_images)  # doctest: +SKIP
    >>> results = tl_patching.get_act_patch_resid_pre(model, corrupted_images, clean_cache, metric)  # doctest: +SKIP
    >>> results.shape == (model.cfg.n_layers, model.cfg.n_ctx)  # doctest: +SKIP
    True
"""

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from vit_lens.intervene.patching import activation_patching
from vit_lens.model.cache import VisionActivationCache
from vit_lens.model.hooked_vit import image_tower

# What the bundled sweeps stack, in TransformerLens's order (a head's "out" is patched through its z).
_BLOCK_SWEEPS = ("resid_pre", "attn_out", "mlp_out")
_HEAD_SWEEPS = ("z", "q", "k", "v", "pattern")


def _patch(
    activation: str,
    by: str,
    model: Any,
    corrupted_images: Any,
    clean_cache: Any,
    patching_metric: Any,
    batch_size: int | None,
    progress: bool,
    function: str,
) -> Float[Tensor, "layer *index"]:
    """One sweep of :func:`activation_patching`, its values in TransformerLens's axis order, device and dtype."""
    tower = image_tower(model)
    _check_images(corrupted_images, tower, function)
    if not isinstance(clean_cache, VisionActivationCache):
        raise TypeError(
            f"{function}: clean_cache must be the cache of the clean run, model.run_with_cache(clean_images)[1] (a "
            f"VisionActivationCache), got {type(clean_cache).__name__}."
        )
    result = activation_patching(
        model, corrupted_images, clean_cache, patching_metric,
        activation=activation, by=by, batch_size=batch_size, progress=progress,
    )
    values = result.values
    if by == "head_position" and activation != "pattern":
        values = values.transpose(1, 2)  # vit_lens's [layer, head, pos] -> TransformerLens's [layer, pos, head]
    return values.to(device=tower.cfg.device, dtype=torch.float32)


def _check_images(images: Any, tower: Any, function: str) -> None:
    cfg = tower.cfg
    if isinstance(images, Tensor) and images.ndim == 4 and images.is_floating_point():
        return
    got = f"a {images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
    raise TypeError(
        f"{function}: the second argument is the corrupted images [batch, {cfg.in_channels}, height, width] as floats "
        f"(where transformer_lens.patching takes token ids), got {got}. A vision transformer has no tokens; the "
        f"{cfg.n_ctx} positions patched are read from the model (model.token_labels())."
    )


def _patching_function(activation: str, by: str, name: str, shape: str, what: str) -> Callable[..., Tensor]:
    def patching_function(
        model: Any,  # a HookedViT or HookedCLIP, checked by image_tower
        corrupted_images: Any,  # checked: float images [batch, channels, height, width]
        clean_cache: Any,  # checked: a VisionActivationCache
        patching_metric: Callable[[Tensor], Tensor],
        *,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> Float[Tensor, "layer *index"]:
        return _patch(activation, by, model, corrupted_images, clean_cache, patching_metric, batch_size, progress, name)

    patching_function.__name__ = patching_function.__qualname__ = name
    patching_function.__doc__ = f"""Activation patching of {what}; a tensor ``{shape}``, as TransformerLens's ``{name}``.

    Computed by :func:`vit_lens.intervene.patching.activation_patching` with
    ``activation={activation!r}, by={by!r}``.

    Args:
        model: A HookedViT or HookedCLIP (its image tower is patched).
        corrupted_images: ``[batch, channels, height, width]``, the size of the clean images.
        clean_cache: ``model.run_with_cache(clean_images)[1]``.
        patching_metric: ``metric(output) -> Tensor``, a scalar or one value per image (averaged).
        batch_size: Most images in one forward pass (default: up to 256).
        progress: Show a progress bar.

    Returns:
        ``{shape}`` float32 on ``model.cfg.device``; ``pos`` runs over the model's ``n_ctx``
        positions (``model.token_labels()``).
    """
    return patching_function


get_act_patch_resid_pre = _patching_function(
    "resid_pre", "position", "get_act_patch_resid_pre", "[n_layers, pos]", "the residual stream entering each block, by position"
)
get_act_patch_resid_mid = _patching_function(
    "resid_mid", "position", "get_act_patch_resid_mid", "[n_layers, pos]", "the residual stream between attention and MLP, by position"
)
get_act_patch_attn_out = _patching_function(
    "attn_out", "position", "get_act_patch_attn_out", "[n_layers, pos]", "each attention layer's output, by position"
)
get_act_patch_mlp_out = _patching_function(
    "mlp_out", "position", "get_act_patch_mlp_out", "[n_layers, pos]", "each MLP's output, by position"
)
get_act_patch_attn_head_out_by_pos = _patching_function(
    "z", "head_position", "get_act_patch_attn_head_out_by_pos", "[n_layers, pos, n_heads]",
    "each head's output (its z) at each position",
)
get_act_patch_attn_head_q_by_pos = _patching_function(
    "q", "head_position", "get_act_patch_attn_head_q_by_pos", "[n_layers, pos, n_heads]", "each head's queries at each position"
)
get_act_patch_attn_head_k_by_pos = _patching_function(
    "k", "head_position", "get_act_patch_attn_head_k_by_pos", "[n_layers, pos, n_heads]", "each head's keys at each position"
)
get_act_patch_attn_head_v_by_pos = _patching_function(
    "v", "head_position", "get_act_patch_attn_head_v_by_pos", "[n_layers, pos, n_heads]", "each head's values at each position"
)
get_act_patch_attn_head_pattern_by_pos = _patching_function(
    "pattern", "head_position", "get_act_patch_attn_head_pattern_by_pos", "[n_layers, n_heads, dest_pos]",
    "each head's attention pattern, one query (destination) position at a time",
)
get_act_patch_attn_head_out_all_pos = _patching_function(
    "z", "head", "get_act_patch_attn_head_out_all_pos", "[n_layers, n_heads]", "each head's output (its z) at every position at once"
)
get_act_patch_attn_head_q_all_pos = _patching_function(
    "q", "head", "get_act_patch_attn_head_q_all_pos", "[n_layers, n_heads]", "each head's queries at every position at once"
)
get_act_patch_attn_head_k_all_pos = _patching_function(
    "k", "head", "get_act_patch_attn_head_k_all_pos", "[n_layers, n_heads]", "each head's keys at every position at once"
)
get_act_patch_attn_head_v_all_pos = _patching_function(
    "v", "head", "get_act_patch_attn_head_v_all_pos", "[n_layers, n_heads]", "each head's values at every position at once"
)
get_act_patch_attn_head_pattern_all_pos = _patching_function(
    "pattern", "head", "get_act_patch_attn_head_pattern_all_pos", "[n_layers, n_heads]",
    "each head's whole attention pattern",
)


def get_act_patch_attn_head_all_pos_every(
    model: Any,
    corrupted_images: Any,
    clean_cache: Any,
    metric: Callable[[Tensor], Tensor],
    *,
    batch_size: int | None = None,
    progress: bool = False,
) -> Float[Tensor, "5 layer head"]:
    """Every head's output, queries, keys, values and pattern, each at all positions at once: ``[5, n_layers, n_heads]``.

    The ``*_all_pos`` sweeps stacked in TransformerLens's order (out, q, k, v, pattern).
    """
    name = "get_act_patch_attn_head_all_pos_every"
    return torch.stack([
        _patch(activation, "head", model, corrupted_images, clean_cache, metric, batch_size, progress, name)
        for activation in _HEAD_SWEEPS
    ])


def get_act_patch_attn_head_by_pos_every(
    model: Any,
    corrupted_images: Any,
    clean_cache: Any,
    metric: Callable[[Tensor], Tensor],
    *,
    batch_size: int | None = None,
    progress: bool = False,
) -> Float[Tensor, "5 layer pos head"]:
    """Every head's output, queries, keys, values and pattern, one position at a time: ``[5, n_layers, pos, n_heads]``.

    The ``*_by_pos`` sweeps stacked in TransformerLens's order (out, q, k, v, pattern); the
    pattern's query positions take the ``pos`` axis, as in TransformerLens.
    """
    name = "get_act_patch_attn_head_by_pos_every"
    sweeps = []
    for activation in _HEAD_SWEEPS:
        values = _patch(activation, "head_position", model, corrupted_images, clean_cache, metric, batch_size, progress, name)
        sweeps.append(values.transpose(1, 2) if activation == "pattern" else values)
    return torch.stack(sweeps)


def get_act_patch_block_every(
    model: Any,
    corrupted_images: Any,
    clean_cache: Any,
    metric: Callable[[Tensor], Tensor],
    *,
    batch_size: int | None = None,
    progress: bool = False,
) -> Float[Tensor, "3 layer pos"]:
    """The residual stream entering each block, each attention output and each MLP output, by position: ``[3, n_layers, pos]``."""
    name = "get_act_patch_block_every"
    return torch.stack([
        _patch(activation, "position", model, corrupted_images, clean_cache, metric, batch_size, progress, name)
        for activation in _BLOCK_SWEEPS
    ])
