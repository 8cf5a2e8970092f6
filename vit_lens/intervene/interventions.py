"""Hook factories that ablate, scale, mask, replace or patch any activation of a HookedViT.

Each factory returns a hook function ``fn(activation, hook)`` for
``model.run_with_hooks(images, fwd_hooks=[(name, fn)])`` or ``model.hooks(...)``; the ones that
act on several hook points return a list of ``(name, fn)`` pairs ready for ``fwd_hooks``.

What is edited is chosen with the same keywords everywhere (all default to everything):

* ``heads=``: heads, on hooks with a head axis (``attn.hook_q/k/v/z/result``: axis 2;
  ``attn.hook_attn_scores/hook_pattern``: axis 1).
* ``positions=``: tokens (0 .. n_prefix_tokens - 1 are CLS / distillation / registers, then the
  patches in raster order; :func:`patch_region` turns a rectangle of the patch grid into
  positions). For attention scores and patterns this is the query axis; ``keys=`` selects keys.
* ``neurons=``: MLP neurons, on ``mlp.hook_pre`` / ``mlp.hook_post``.

A selection is an int, a list / tuple / range of ints (negative ones count from the end), a
slice, or a 1-d tensor of indices or a bool mask over the axis. Unselected entries are left
exactly as they were, and the input tensor is never edited in place: a cache or another hook
that kept a reference to it still sees the original values, and a cache recorded while
intervening sees the edit.

Tensors that hold whole activations (``mean_ablate``'s means, ``resample_ablate``'s source,
``patch_from_cache``'s cache) are indexed with the same selection; the values given to
``scale`` and ``replace`` broadcast against the selected slice ``[batch, *selected]`` instead,
so a per-head factor for ``heads=[1, 3]`` on ``hook_z`` is a ``[2, 1]`` tensor.

The "Peeling Back the Layers" averaging experiments are one call each:
:func:`average_layer_output`, :func:`average_attention_input`, :func:`average_residual_connection`.
"""

import operator
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from vit_lens.model.hook_layout import hook_axes
from vit_lens.model.config import ViTConfig
from vit_lens.intervene.statistics import HookStatistics
from vit_lens.model.hooked_vit import image_tower

HookFn = Callable[..., Tensor | None]
# (hook name or name filter, hook function): what fwd_hooks takes
HookPairs = list[tuple[str | Callable[[str], bool], HookFn]]
# gather(source): the selected slice [batch, *selected] of a tensor broadcastable to the activation
Gather = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------------- positions


def prefix_positions(cfg_or_model: Any) -> list[int]:
    """Positions of the tokens before the patches: CLS, distillation token, registers.

    Args:
        cfg_or_model: A ``ViTConfig``, ``HookedViT`` or ``HookedCLIP``.

    Returns:
        ``[0, 1, ..., n_prefix_tokens - 1]``.

    Example:
        >>> prefix_positions(model)  # CLS and two registers  # doctest: +SKIP
        [0, 1, 2]
    """
    return list(range(_config(cfg_or_model).n_prefix_tokens))


def patch_positions(cfg_or_model: Any, grid_size: tuple[int, int] | None = None) -> list[int]:
    """Positions of every patch token, in raster order.

    Args:
        cfg_or_model: A ``ViTConfig``, ``HookedViT`` or ``HookedCLIP``.
        grid_size: (rows, cols) of the patch grid, for images of another size than the model's
            (``dynamic_img_size``); default ``cfg.grid_size``.

    Example:
        >>> patch_positions(model)[:3]  # doctest: +SKIP
        [3, 4, 5]
    """
    return patch_region(cfg_or_model, grid_size=grid_size)


def patch_region(
    cfg_or_model: Any,
    rows: int | slice = slice(None),
    cols: int | slice = slice(None),
    *,
    grid_size: tuple[int, int] | None = None,
) -> list[int]:
    """Token positions of a rectangle of the patch grid, in raster order.

    Args:
        cfg_or_model: A ``ViTConfig``, ``HookedViT`` or ``HookedCLIP``.
        rows: Grid rows (an int or a slice; default all).
        cols: Grid columns (an int or a slice; default all).
        grid_size: (rows, cols) of the patch grid, for images of another size than the model's
            (``dynamic_img_size``); default ``cfg.grid_size``.

    Returns:
        ``n_prefix_tokens + row * n_cols + col`` for every cell of the rectangle.

    Example:
        >>> top_left = patch_region(model, rows=slice(0, 2), cols=slice(0, 2))  # doctest: +SKIP
        >>> hook = zero_ablate(positions=top_left)  # doctest: +SKIP
    """
    cfg = _config(cfg_or_model)
    if grid_size is not None and not (
        isinstance(grid_size, (tuple, list)) and len(grid_size) == 2 and all(_is_index(n) and n > 0 for n in grid_size)
    ):
        raise ValueError(
            f"patch_region's grid_size= takes (rows, cols) of the patch grid, two positive ints such as "
            f"{tuple(cfg.grid_size)}, got {grid_size!r}"
        )
    n_rows, n_cols = grid_size or cfg.grid_size
    chosen = []
    for arg, value, size in (("rows", rows, n_rows), ("cols", cols, n_cols)):
        if isinstance(value, bool) or not isinstance(value, (int, slice)):
            raise TypeError(f"patch_region's {arg}= takes an int or a slice, got {value!r}")
        if isinstance(value, int) and not -size <= value < size:
            raise ValueError(f"patch_region's {arg}={value} is outside the {n_rows}x{n_cols} patch grid")
        indices = range(size)[value] if isinstance(value, slice) else [value % size]
        if not indices:
            raise ValueError(f"patch_region's {arg}={value!r} selects nothing on the {n_rows}x{n_cols} patch grid")
        chosen.append(indices)
    return [cfg.n_prefix_tokens + r * n_cols + c for r in chosen[0] for c in chosen[1]]


# ---------------------------------------------------------------------------------------------- hook factories


def zero_ablate(*, heads: Any = None, positions: Any = None, keys: Any = None, neurons: Any = None) -> HookFn:
    """Set the selected entries of an activation to zero.

    Args:
        heads, positions, keys, neurons: What to zero (module docstring); default everything.

    Returns:
        A hook function for ``fwd_hooks=[(name, fn)]``.

    Example:
        >>> hooks = [("blocks.5.attn.hook_z", zero_ablate(heads=3))]
        >>> out = model.run_with_hooks(images, fwd_hooks=hooks)  # doctest: +SKIP
    """
    selection = _Selection("zero_ablate", heads, positions, keys, neurons)

    def zero_ablate_hook(activation, hook):
        return selection.edit(activation, hook.name, lambda selected, gather: torch.zeros_like(selected))

    return zero_ablate_hook


def mean_ablate(
    means: Any, *, heads: Any = None, positions: Any = None, keys: Any = None, neurons: Any = None
) -> HookFn:
    """Replace the selected entries with their means over a dataset.

    Args:
        means: A :class:`~vit_lens.intervene.statistics.HookStatistics` (the mean of the hook the function
            is attached to is used), or a tensor broadcastable to the activation, usually
            without the batch axis: ``[pos, d_model]`` per token or ``[d_model]`` for a residual
            hook, ``[pos, head, d_head]`` for ``hook_z``.
        heads, positions, keys, neurons: What to replace (module docstring); default everything.
            The means are indexed with the same selection.

    Returns:
        A hook function for ``fwd_hooks=[(name, fn)]``.

    Example:
        >>> stats = compute_hook_statistics(model, loader, ["blocks.4.attn.hook_z"])  # doctest: +SKIP
        >>> hook = mean_ablate(stats, heads=[0, 2])  # doctest: +SKIP
        >>> out = model.run_with_hooks(images, fwd_hooks=[("blocks.4.attn.hook_z", hook)])  # doctest: +SKIP
    """
    if not isinstance(means, (HookStatistics, Tensor)):
        raise TypeError(
            f"mean_ablate takes a HookStatistics (from compute_hook_statistics) or a tensor of means, "
            f"got {type(means).__name__}"
        )
    selection = _Selection("mean_ablate", heads, positions, keys, neurons)

    def mean_ablate_hook(activation, hook):
        mean = _mean_for(means, hook.name)
        return selection.edit(activation, hook.name, lambda selected, gather: gather(mean), source="the means")

    return mean_ablate_hook


def resample_ablate(
    source_activations: Float[Tensor, "n *activation"],
    *,
    permutation: Any = None,
    seed: int | None = 0,
    heads: Any = None,
    positions: Any = None,
    keys: Any = None,
    neurons: Any = None,
) -> HookFn:
    """Replace the selected entries with the same entries of other images.

    Args:
        source_activations: ``[n, ...]`` the same hook's activation on ``n`` images (for example
            ``cache[name]`` from another batch, or this batch's own).
        permutation: ``[batch]`` ints: batch item ``i`` takes row ``permutation[i]`` of the
            source. Default: a random row per item and per forward pass, from a generator seeded
            with ``seed``; when the source has as many rows as the batch (typically the batch's
            own activations), an item never gets its own row.
        seed: Seed of the generator (None: unseeded).
        heads, positions, keys, neurons: What to replace (module docstring); default everything.

    Returns:
        A hook function for ``fwd_hooks=[(name, fn)]``.

    Example:
        >>> _, other = model.run_with_cache(other_images, names_filter="blocks.3.hook_resid_post")  # doctest: +SKIP
        >>> other_resid = other["blocks.3.hook_resid_post"]  # doctest: +SKIP
        >>> hook = resample_ablate(other_resid, positions=patch_positions(model))  # doctest: +SKIP
    """
    if source_activations.ndim < 2:
        raise ValueError(
            f"resample_ablate takes source activations [n, ...] with one row per image, got shape "
            f"{tuple(source_activations.shape)}"
        )
    n_source = len(source_activations)
    rows_given = None if permutation is None else _check_permutation(permutation, n_source)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    selection = _Selection("resample_ablate", heads, positions, keys, neurons)

    def resample_ablate_hook(activation, hook):
        batch = len(activation)
        if rows_given is not None:
            if len(rows_given) != batch:
                raise ValueError(
                    f"resample_ablate's permutation has {len(rows_given)} entries but the batch at "
                    f"{hook.name!r} has {batch} images; give one source row per image"
                )
            rows = rows_given
        else:
            rows = _random_rows(batch, n_source, generator)
        source = source_activations[rows.to(source_activations.device)]
        return selection.edit(activation, hook.name, lambda selected, gather: gather(source), source="the source")

    return resample_ablate_hook


def scale(factor: Any, *, heads: Any = None, positions: Any = None, keys: Any = None, neurons: Any = None) -> HookFn:
    """Multiply the selected entries by ``factor``.

    Args:
        factor: A number, or a tensor broadcastable to the selected slice ``[batch, *selected]``:
            per head on ``hook_z`` ``[n_selected_heads, 1]``, per token on a residual hook
            ``[n_selected_positions, 1]``, per neuron on ``mlp.hook_post`` ``[n_selected_neurons]``.
        heads, positions, keys, neurons: What to scale (module docstring); default everything.

    Returns:
        A hook function for ``fwd_hooks=[(name, fn)]``.

    Example:
        >>> halve = scale(0.5, heads=[1, 2])  # doctest: +SKIP
        >>> per_neuron = scale(torch.tensor([2.0, 0.0]), neurons=[10, 11])  # doctest: +SKIP
        >>> out = model.run_with_hooks(images, fwd_hooks=[("blocks.2.mlp.hook_post", per_neuron)])  # doctest: +SKIP
    """
    factor = _check_value(factor, "scale", "factor")
    selection = _Selection("scale", heads, positions, keys, neurons)

    def scale_hook(activation, hook):
        def scaled(selected, gather):
            return selected * _fit_to_slice(factor, selected, f"scale's factor at {hook.name!r}")

        return selection.edit(activation, hook.name, scaled)

    return scale_hook


def replace(value: Any, *, heads: Any = None, positions: Any = None, keys: Any = None, neurons: Any = None) -> HookFn:
    """Set the selected entries to ``value``.

    Args:
        value: A number, or a tensor broadcastable to the selected slice ``[batch, *selected]``
            (a ``[d_model]`` vector for every selected token of a residual hook, ...). To copy
            whole activations use :func:`patch_from_cache` or :func:`mean_ablate`.
        heads, positions, keys, neurons: What to replace (module docstring); default everything.

    Returns:
        A hook function for ``fwd_hooks=[(name, fn)]``.

    Example:
        >>> direction = torch.randn(model.cfg.d_model)  # doctest: +SKIP
        >>> hook = replace(direction, positions=0)  # the CLS token's residual  # doctest: +SKIP
    """
    value = _check_value(value, "replace", "value")
    selection = _Selection("replace", heads, positions, keys, neurons)

    def replace_hook(activation, hook):
        def replaced(selected, gather):
            return _fit_to_slice(value, selected, f"replace's value at {hook.name!r}")

        return selection.edit(activation, hook.name, replaced)

    return replace_hook


def patch_from_cache(
    cache: Any, *, heads: Any = None, positions: Any = None, keys: Any = None, neurons: Any = None
) -> HookFn:
    """Copy the selected entries from another run's cache of the same hook point.

    Args:
        cache: A :class:`~vit_lens.model.cache.VisionActivationCache` (or a dict of hook name to tensor)
            holding the hook's activation, with the same batch size or a batch of one (copied to
            every image).
        heads, positions, keys, neurons: What to copy (module docstring); default everything.

    Returns:
        A hook function for ``fwd_hooks=[(name, fn)]``.

    Example:
        >>> _, clean = model.run_with_cache(clean_images)  # doctest: +SKIP
        >>> hook = patch_from_cache(clean, positions=patch_region(model, rows=0, cols=slice(0, 3)))  # doctest: +SKIP
        >>> hooks = [("blocks.2.hook_resid_post", hook)]  # doctest: +SKIP
        >>> out = model.run_with_hooks(corrupted_images, fwd_hooks=hooks)  # doctest: +SKIP
    """
    if not hasattr(cache, "__getitem__"):
        raise TypeError(f"patch_from_cache takes a cache from run_with_cache (or a dict), got {type(cache).__name__}")
    selection = _Selection("patch_from_cache", heads, positions, keys, neurons)

    def patch_from_cache_hook(activation, hook):
        cached = _cached(cache, hook.name)
        return selection.edit(activation, hook.name, lambda selected, gather: gather(cached), source="the cache")

    return patch_from_cache_hook


def mask_heads(mask: Any, model: Any = None) -> HookPairs:
    """Multiply each head's output (``hook_z``) by a per-layer, per-head factor: the "Peeling Back the Layers" paper's masking matrices.

    Args:
        mask: ``[n_layers, n_heads]`` multipliers (ones leave the model unchanged, zeros remove a
            head, as ``zero_ablate(heads=...)`` on ``hook_z`` does); bool or int masks are fine.
        model: The ``HookedViT`` (or ``HookedCLIP``) the hooks are for. Given, the mask's shape is
            checked now; without it, when the hooks run.

    Returns:
        ``[(f"blocks.{layer}.attn.hook_z", fn), ...]`` for every row of the mask, for ``fwd_hooks``;
        without ``model``, followed by one ``(filter, check)`` pair on every layer's ``hook_z`` that
        raises if the model has more layers than the mask has rows (a mask with more rows than the
        model has layers, or with another number of heads, raises either way).

    Example:
        >>> mask = torch.ones(model.cfg.n_layers, model.cfg.n_heads)  # doctest: +SKIP
        >>> mask[5, [0, 3]] = 0.0  # doctest: +SKIP
        >>> out = model.run_with_hooks(images, fwd_hooks=mask_heads(mask, model))  # doctest: +SKIP
    """
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask_heads takes a [n_layers, n_heads] tensor of multipliers, got {shape}")
    shape = tuple(mask.shape)
    if model is not None:
        cfg = _config(model)
        if shape != (cfg.n_layers, cfg.n_heads):
            raise ValueError(
                f"mask_heads got a mask of shape {shape}, but {cfg.model_name or 'the model'} has {cfg.n_layers} layers "
                f"of {cfg.n_heads} heads; give a [n_layers, n_heads] = [{cfg.n_layers}, {cfg.n_heads}] mask"
            )
    factors = mask.to(torch.float32) if not mask.is_floating_point() else mask
    pairs: HookPairs = [(f"blocks.{layer}.attn.hook_z", _head_mask_hook(row, shape)) for layer, row in enumerate(factors)]
    if model is None:
        guard = _MaskRowsGuard(shape)
        pairs.append((guard.attaches_to, guard))
    return pairs


def _head_mask_hook(factors: Tensor, shape: tuple[int, int]) -> HookFn:
    def mask_heads_hook(activation, hook):
        n_heads = activation.shape[2]
        if n_heads != shape[1]:
            raise ValueError(
                f"mask_heads got a mask of shape {shape}, one column per head, but {hook.name!r} has {n_heads} heads; "
                f"give a [n_layers, n_heads] mask with n_heads = {n_heads}"
            )
        return activation * factors.to(activation)[:, None]

    return mask_heads_hook


class _MaskRowsGuard:
    """Raises when a layer of the model has no row in the mask (a shorter mask would leave it unmasked).

    Without the model the hooks cannot know how many layers it has; this pair's filter is shown
    every hook name when the hooks are added, so it learns them, and its hook raises on the first
    layer past the mask's rows.
    """

    _HOOK_Z = re.compile(r"blocks\.(\d+)\.attn\.hook_z")

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape
        self.layers: set[int] = set()

    def attaches_to(self, name: str) -> bool:
        match = self._HOOK_Z.fullmatch(name)
        if match is None:
            return False
        layer = int(match.group(1))
        if layer in self.layers:  # each add_hook call shows every name once: a repeat is a new call
            self.layers = set()
        self.layers.add(layer)
        return True

    def __call__(self, activation: Tensor, hook: Any) -> None:
        layer = int(self._HOOK_Z.fullmatch(hook.name).group(1))
        if layer >= self.shape[0]:
            n_layers = max(self.layers | {layer}) + 1
            n_heads = activation.shape[2]
            raise ValueError(
                f"mask_heads got a mask of shape {self.shape} (one row per layer), but the model has {n_layers} layers "
                f"of {n_heads} heads: {hook.name!r} has no row and would be left unmasked; give a [n_layers, n_heads] = "
                f"[{n_layers}, {n_heads}] mask (pass the model, mask_heads(mask, model), to check it when the hooks are made)"
            )


# ---------------------------------------------------------------------------------------------- "Peeling Back the Layers"


def average_layer_output(model: Any, layer: int, means: Any) -> HookPairs:
    """Replace block ``layer``'s output (``blocks.{layer}.hook_resid_post``) with its dataset average.

    "Peeling Back the Layers", section 4 ("averaging layers"): every image then carries the same output of that
    layer, token by token when the means are per position.

    Args:
        model: The ``HookedViT`` (or ``HookedCLIP``) the hooks are for.
        layer: Block index (negative counts from the end).
        means: :class:`~vit_lens.intervene.statistics.HookStatistics` holding
            ``blocks.{layer}.hook_resid_post``, or its mean as a ``[pos, d_model]`` / ``[d_model]`` tensor.

    Returns:
        ``[(name, fn)]`` for ``fwd_hooks``.

    Example:
        >>> stats = compute_hook_statistics(model, loader, ["blocks.3.hook_resid_post"])  # doctest: +SKIP
        >>> out = model.run_with_hooks(images, fwd_hooks=average_layer_output(model, 3, stats))  # doctest: +SKIP
    """
    layer = _check_layer(model, layer, "average_layer_output")
    name = f"blocks.{layer}.hook_resid_post"
    return [(name, mean_ablate(_means_tensor(means, (name,), "average_layer_output")))]


def average_attention_input(
    model: Any, layer: int, means: Any, *, average_of: Literal["residual", "normalized"] = "residual"
) -> HookPairs:
    """Make block ``layer``'s attention (MSA) read dataset-average inputs; its skip connection is kept.

    "Peeling Back the Layers", eq. 1, ``Z^l_hat = MSA^l(Z^{l-1}) + Z^{l-1}``: the MSA input ``Z^{l-1}`` is replaced
    by "the average feature vectors" (the dataset average of layer ``l-1``'s output tokens) while
    the residual term keeps the image's own ``Z^{l-1}``. The paper writes the blocks without their
    LayerNorms; in these pre-LayerNorm towers ``MSA^l`` includes ``ln1``, so with
    ``average_of="residual"`` (the default, the paper's reading) the attention reads
    ``ln1(mean(resid_pre))``: the average raw residual, normalised by the block's own ``ln1``.
    ``average_of="normalized"`` instead gives it the average of ``ln1``'s outputs,
    ``mean(ln1(resid_pre))``, which differs because LayerNorm is not linear. Either way the hook
    sits on ``blocks.{layer}.ln1.hook_normalized``, so a cache shows what the attention read.

    Args:
        model: The ``HookedViT`` (or ``HookedCLIP``); its ``ln1`` weights normalise the average.
        layer: Block index (negative counts from the end).
        means: :class:`~vit_lens.intervene.statistics.HookStatistics` holding ``blocks.{layer}.hook_resid_pre``
            (or the identical ``blocks.{layer-1}.hook_resid_post``) for ``"residual"``, or
            ``blocks.{layer}.ln1.hook_normalized`` for ``"normalized"``; or that mean as a tensor
            ``[pos, d_model]`` / ``[d_model]``.
        average_of: ``"residual"`` or ``"normalized"``, as above.

    Returns:
        ``[(f"blocks.{layer}.ln1.hook_normalized", fn)]`` for ``fwd_hooks``.

    Example:
        >>> stats = compute_hook_statistics(model, loader, ["blocks.6.hook_resid_pre"])  # doctest: +SKIP
        >>> out = model.run_with_hooks(images, fwd_hooks=average_attention_input(model, 6, stats))  # doctest: +SKIP
    """
    layer = _check_layer(model, layer, "average_attention_input")
    hook_name = f"blocks.{layer}.ln1.hook_normalized"
    if average_of == "normalized":
        return [(hook_name, mean_ablate(_means_tensor(means, (hook_name,), "average_attention_input")))]
    if average_of != "residual":
        raise ValueError(f"average_attention_input's average_of must be 'residual' or 'normalized', got {average_of!r}")
    mean_resid = _means_tensor(means, _resid_pre_names(layer), "average_attention_input")
    ln1 = _tower(model).blocks[layer].ln1

    def average_attention_input_hook(activation, hook):
        # F.layer_norm, not ln1 itself: calling ln1 would run this very hook again.
        normalized = F.layer_norm(mean_resid.to(activation), ln1.w.shape, ln1.w, ln1.b, ln1.eps)
        return _broadcast_to(normalized, activation, hook.name, "the mean residual").clone()

    return [(hook_name, average_attention_input_hook)]


def average_residual_connection(model: Any, layer: int, means: Any) -> HookPairs:
    """Replace the skip connection around block ``layer``'s attention with its dataset average ("confusion").

    "Peeling Back the Layers", "confusing" a layer: in eq. 1 the residual term ``Z^{l-1}`` is replaced by the
    average vectors while the attention still reads the image's own ``Z^{l-1}``, so
    ``resid_mid = mean(resid_pre) + attn_out``. There is no hook point on the skip path alone, so
    one hook records this run's ``blocks.{layer}.hook_resid_pre`` and a second one, on
    ``blocks.{layer}.hook_resid_mid``, subtracts it and adds its mean. Keep both pairs, in order;
    a hook that edits ``hook_resid_pre`` after the first one would not be subtracted.

    Args:
        model: The ``HookedViT`` (or ``HookedCLIP``) the hooks are for.
        layer: Block index (negative counts from the end).
        means: :class:`~vit_lens.intervene.statistics.HookStatistics` holding ``blocks.{layer}.hook_resid_pre``
            (or the identical ``blocks.{layer-1}.hook_resid_post``), or that mean as a tensor
            ``[pos, d_model]`` / ``[d_model]``.

    Returns:
        ``[(f"blocks.{layer}.hook_resid_pre", record), (f"blocks.{layer}.hook_resid_mid", fn)]``.

    Example:
        >>> stats = compute_hook_statistics(model, loader, ["blocks.6.hook_resid_pre"])  # doctest: +SKIP
        >>> out = model.run_with_hooks(images, fwd_hooks=average_residual_connection(model, 6, stats))  # doctest: +SKIP
    """
    layer = _check_layer(model, layer, "average_residual_connection")
    mean_resid = _means_tensor(means, _resid_pre_names(layer), "average_residual_connection")
    pre_name, mid_name = f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_mid"
    recorded: list[Tensor] = []

    def record_resid_pre(activation, hook):
        recorded[:] = [activation]

    def average_residual_connection_hook(activation, hook):
        if not recorded:
            raise RuntimeError(
                f"average_residual_connection's hook on {mid_name!r} ran without its partner on {pre_name!r}; "
                "pass both pairs it returns to fwd_hooks"
            )
        resid_pre = recorded.pop()
        mean = _broadcast_to(mean_resid.to(activation), activation, mid_name, "the mean residual")
        return activation - resid_pre + mean

    return [(pre_name, record_resid_pre), (mid_name, average_residual_connection_hook)]


# ---------------------------------------------------------------------------------------------- internals


class _Selection:
    """The entries a hook edits, resolved against each activation's layout when the hook runs."""

    # keyword -> (HookAxes field, what the axis holds, where it exists)
    _AXES = {
        "heads": ("head", "head", "attn.hook_q/k/v/z/result and attn.hook_attn_scores/hook_pattern"),
        "positions": ("position", "token", "per-token hooks (not hook_pooled, hook_image_embed, hook_logits)"),
        "keys": ("key", "key", "attn.hook_attn_scores and attn.hook_pattern"),
        "neurons": ("neuron", "neuron", "mlp.hook_pre and mlp.hook_post"),
    }

    def __init__(self, factory: str, heads: Any, positions: Any, keys: Any, neurons: Any):
        self.factory = factory
        self.specs = {"heads": heads, "positions": positions, "keys": keys, "neurons": neurons}
        for keyword, spec in self.specs.items():
            if spec is not None:
                _check_spec_type(spec, f"{factory}'s {keyword}=")

    def edit(self, activation: Tensor, hook_name: str, new_values: Callable[[Tensor, Gather], Tensor],
             source: str = "") -> Tensor:
        """A new tensor: ``activation`` with the selected slice set to ``new_values(selected, gather)``."""
        index = self._index(activation, hook_name)

        def gather(full: Tensor) -> Tensor:
            full = _broadcast_to(full.to(activation), activation, hook_name, source)
            return full if index is None else full[index]

        if index is None:
            # A copy even when nothing was computed: an expanded view of the means, the value or a cache
            # would let a later in-place hook write into them.
            return torch.broadcast_to(new_values(activation, gather), activation.shape).clone()
        out = activation.clone()
        out[index] = new_values(activation[index], gather)
        return out

    def _index(self, activation: Tensor, hook_name: str) -> tuple | None:
        """``(slice(None), idx_1, ..., idx_n)`` with open-mesh index tensors, or None for everything."""
        shape = activation.shape
        axes = hook_axes(hook_name, activation.ndim)
        chosen: dict[int, Tensor] = {}
        for keyword, spec in self.specs.items():
            if spec is None:
                continue
            field, holds, where = self._AXES[keyword]
            axis = getattr(axes, field)
            if axis is None:
                raise ValueError(
                    f"{self.factory}(..., {keyword}={spec!r}) is attached to {hook_name!r}, which has no {holds} "
                    f"axis (shape {tuple(shape)}); {keyword}= works on {where}"
                )
            what = f"{self.factory}'s {keyword}= at {hook_name!r} ({shape[axis]} {holds}s)"
            chosen[axis] = _resolve_indices(spec, shape[axis], what, activation.device)
        if not chosen:
            return None
        n_axes = activation.ndim - 1
        index: list[Any] = [slice(None)]
        for k, axis in enumerate(range(1, activation.ndim)):
            indices = chosen.get(axis, torch.arange(shape[axis], device=activation.device))
            view = [1] * n_axes
            view[k] = -1
            index.append(indices.view(view))
        return tuple(index)


def _check_spec_type(spec: Any, what: str) -> None:
    ok = (
        isinstance(spec, (slice, range))
        or (isinstance(spec, int) and not isinstance(spec, bool))
        or (isinstance(spec, (list, tuple)) and all(_is_index(i) for i in spec))
        or (isinstance(spec, Tensor) and spec.ndim <= 1 and (spec.dtype == torch.bool or not spec.is_floating_point()))
    )
    if not ok:
        raise TypeError(
            f"{what} takes an int, a list / tuple / range of ints, a slice, or a 1-d tensor of indices or a bool "
            f"mask; got {spec!r}"
        )


def _is_index(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _resolve_indices(spec: Any, size: int, what: str, device: torch.device) -> Tensor:
    """A 1-d LongTensor of the selected indices along an axis of ``size`` entries, validated."""
    if isinstance(spec, Tensor) and spec.dtype == torch.bool:
        if spec.shape != (size,):
            raise ValueError(f"{what}: a bool mask must have {size} entries, got shape {tuple(spec.shape)}")
        indices = spec.nonzero().flatten().tolist()
    elif isinstance(spec, slice):
        indices = list(range(size)[spec])
    elif isinstance(spec, Tensor):
        indices = spec.flatten().tolist()
    elif isinstance(spec, (list, tuple, range)):
        indices = [operator.index(i) for i in spec]
    else:
        indices = [spec]
    if not indices:
        raise ValueError(f"{what}: {spec!r} selects nothing")
    bad = [i for i in indices if not -size <= i < size]
    if bad:
        raise ValueError(f"{what}: {bad} out of range; valid indices are 0 to {size - 1} (or negative from the end)")
    indices = [i % size for i in indices]
    if len(set(indices)) != len(indices):
        raise ValueError(f"{what}: {spec!r} selects some entries twice")
    return torch.tensor(indices, dtype=torch.long, device=device)


def _broadcast_to(values: Tensor, activation: Tensor, hook_name: str, source: str) -> Tensor:
    try:
        return torch.broadcast_to(values, activation.shape)
    except RuntimeError:
        raise ValueError(
            f"{source.capitalize() or 'The values'} for {hook_name!r} have shape {tuple(values.shape)}, which does not "
            f"broadcast to its activation {tuple(activation.shape)}; give the activation's shape without the batch "
            f"axis ({tuple(activation.shape[1:])}) or a trailing part of it"
        ) from None


def _fit_to_slice(value: float | Tensor, selected: Tensor, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        return torch.tensor(value, dtype=selected.dtype, device=selected.device)
    try:
        return torch.broadcast_to(value.to(selected), selected.shape)
    except RuntimeError:
        raise ValueError(
            f"{what} has shape {tuple(value.shape)}, which does not broadcast to the selected slice "
            f"{tuple(selected.shape)} ([batch, *selected]); for one value per selected head or token add trailing "
            "axes of size 1, e.g. factor[:, None]"
        ) from None


def _check_value(value: Any, factory: str, arg: str) -> float | Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{factory}'s {arg} must be a number or a tensor, got {type(value).__name__}")


def _check_permutation(permutation: Any, n_source: int) -> Tensor:
    rows = torch.as_tensor(permutation)
    if rows.ndim != 1 or rows.is_floating_point() or rows.dtype == torch.bool:
        raise ValueError(f"resample_ablate's permutation must be a 1-d sequence of row indices, got {permutation!r}")
    if len(rows) and not (0 <= rows.min() and rows.max() < n_source):
        raise ValueError(f"resample_ablate's permutation {rows.tolist()} has rows outside 0..{n_source - 1}")
    return rows.long()


def _random_rows(batch: int, n_source: int, generator: torch.Generator | None) -> Tensor:
    if n_source == batch:
        if batch < 2:
            raise ValueError(
                "resample_ablate has a single source image for a single image, so there is no other image to take "
                "values from; pass more source activations or permutation=[0]"
            )
        # An offset in 1..n-1 never maps an item onto its own row.
        offsets = torch.randint(1, n_source, (batch,), generator=generator)
        return (torch.arange(batch) + offsets) % n_source
    return torch.randint(0, n_source, (batch,), generator=generator)


def _mean_for(means: HookStatistics | Tensor, hook_name: str) -> Tensor:
    if isinstance(means, Tensor):
        return means
    if hook_name not in means:
        raise KeyError(
            f"The HookStatistics given to mean_ablate have no mean for {hook_name!r} (they hold {means.names}); "
            f"compute it with compute_hook_statistics(model, data, [{hook_name!r}, ...])"
        )
    return means.mean(hook_name)


def _means_tensor(means: Any, names: tuple[str, ...], function: str) -> Tensor:
    """The mean of the first of ``names`` that ``means`` holds, or ``means`` itself if a tensor."""
    if isinstance(means, Tensor):
        return means
    if not isinstance(means, HookStatistics):
        raise TypeError(f"{function} takes a HookStatistics or a tensor of means, got {type(means).__name__}")
    for name in names:
        if name in means:
            return means.mean(name)
    raise KeyError(
        f"{function} needs the mean of {' or '.join(repr(n) for n in names)}, but the HookStatistics hold "
        f"{means.names}; compute it with compute_hook_statistics(model, data, [{names[0]!r}])"
    )


def _resid_pre_names(layer: int) -> tuple[str, ...]:
    # Block l's input is block l-1's output: the same tensor under two names.
    names = (f"blocks.{layer}.hook_resid_pre",)
    return names + ((f"blocks.{layer - 1}.hook_resid_post",) if layer > 0 else ())


def _cached(cache: Any, hook_name: str) -> Tensor:
    store = cache.cache_dict if hasattr(cache, "cache_dict") else cache
    if not isinstance(store, Mapping) or hook_name not in store:
        held = list(store) if isinstance(store, Mapping) else []
        raise KeyError(
            f"patch_from_cache's cache has no {hook_name!r} (it holds {len(held)} hook points"
            f"{': ' + ', '.join(held[:5]) + ' ...' if held else ''}); run the clean images with "
            f"run_with_cache(..., names_filter=[{hook_name!r}, ...])"
        )
    return store[hook_name]


def _tower(model: Any) -> Any:
    """The HookedViT: the model itself, or a HookedCLIP's image tower."""
    return image_tower(model)


def _config(cfg_or_model: Any) -> ViTConfig:
    if isinstance(cfg_or_model, ViTConfig):
        return cfg_or_model
    cfg = getattr(_tower(cfg_or_model), "cfg", None)
    if not isinstance(cfg, ViTConfig):
        raise TypeError(f"Expected a ViTConfig, HookedViT or HookedCLIP, got {type(cfg_or_model).__name__}")
    return cfg


def _check_layer(model: Any, layer: Any, function: str) -> int:
    n_layers = _config(model).n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
        raise ValueError(f"{function}: layer must be an int in [-{n_layers}, {n_layers - 1}], got {layer!r}")
    return layer % n_layers
