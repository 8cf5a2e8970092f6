"""Activation and attribution patching sweeps for images.

Activation patching runs the model on corrupted images while copying one piece of a clean run's
activation into the run (one token of a layer's residual stream, one head, one patch-grid region,
...) and records a metric of the output for every piece. Attribution patching estimates the same
numbers from one forward and one backward pass: ``metric gradient at the corrupted run x (clean -
corrupted activation)``, summed over the piece.

What is patched (``activation``, a TransformerLens short name, and its per-image layout):

=================================================  ==============================
``resid_pre``, ``resid_mid``, ``resid_post``,      ``[pos, d_model]``
``attn_out``, ``mlp_out``
``q``, ``k``, ``v``, ``z``                         ``[pos, head, d_head]``
``result`` (per-head outputs)                      ``[pos, head, d_model]``
``pattern``                                        ``[head, query, key]``
=================================================  ==============================

How the pieces are chosen (``by``): ``"position"`` (layer x token; for ``pattern`` the query
token), ``"head"`` (layer x head, every token), ``"head_position"`` (layer x head x token) and
``"region"`` (layer x a rectangle of the patch grid, every head). The number of tokens and heads
is read from the cached activation, never from the images, so CLS, registers, distillation tokens
and other image sizes need no special care (TransformerLens's own helpers take positions from the
input's last axis, which for images is the pixel width).

Batching: several patched variants run in one forward. The corrupted batch is repeated once per
variant along the batch axis and one hook per hook point copies each variant's piece into its own
block of the batch (``torch.where`` with a per-block mask); the metric is then applied to each
block's output. Results match a loop of one forward per variant up to float rounding: BLAS
kernels may round a row of a small matmul differently depending on where it sits in the matrix
(measured here: about 2e-7 on outputs of size 1 in float32, even between identical rows).
"""

import dataclasses
import difflib
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from vit_lens.model.cache import VisionActivationCache
from vit_lens.model.hooked_vit import HookedViT, frozen_parameters, image_tower
from vit_lens.utils.progress import progress as progress_bar

# short name -> (hook point under blocks.{layer}., per-image layout). Layouts: "token" [pos, d],
# "token_head" [pos, head, d], "head_query" [head, query, key].
ACTIVATIONS: dict[str, tuple[str, str]] = {
    "resid_pre": ("hook_resid_pre", "token"),
    "resid_mid": ("hook_resid_mid", "token"),
    "resid_post": ("hook_resid_post", "token"),
    "attn_out": ("hook_attn_out", "token"),
    "mlp_out": ("hook_mlp_out", "token"),
    "q": ("attn.hook_q", "token_head"),
    "k": ("attn.hook_k", "token_head"),
    "v": ("attn.hook_v", "token_head"),
    "z": ("attn.hook_z", "token_head"),
    "result": ("attn.hook_result", "token_head"),
    "pattern": ("attn.hook_pattern", "head_query"),
}
GROUPINGS = ("position", "head", "head_position", "region")
DEFAULT_MAX_IMAGES = 256
# The clean baseline is the corrupted run with the whole residual stream entering block 0 patched:
# everything the model computes afterwards depends on that tensor only.
_CLEAN_BASELINE_HOOK = "blocks.0.hook_resid_pre"


@dataclasses.dataclass
class PatchingResult:
    """The metric after patching each piece of an activation, with labels and baselines.

    Attributes:
        values: The metric of each patched run: ``[n_layers, n_positions]`` (``by="position"``),
            ``[n_layers, n_heads]`` (``"head"``), ``[n_layers, n_heads, n_positions]``
            (``"head_position"``) or ``[n_layers, n_regions]`` (``"region"``). For attribution
            patching, the estimate ``baseline_corrupted + attribution``.
        labels: One list of labels per axis of ``values``: layers ``L0, L1, ...``; tokens ``CLS``,
            ``DIST``, ``REG0``, ..., ``P(row,col)`` (or ``all``); heads ``H0, ...``; regions
            ``R(r0:r1,c0:c1)``.
        axes: The name of each axis: ``"layer"``, ``"position"``, ``"head"``, ``"region"``.
        baseline_clean: The metric of the clean run.
        baseline_corrupted: The metric of the unpatched corrupted run.
        activation, by: What was patched and how it was split.
        method: ``"activation"`` (exact) or ``"attribution"`` (gradient estimate).
        token_index: For ``by="position"``, the token index of each position column; None for
            ``positions="all"`` and the other groupings.
        n_prefix_tokens, grid_size: The token layout, for :meth:`to_grid`.
        is_normalized: Whether ``values`` went through :meth:`normalized`.
    """

    values: Float[Tensor, "layer *index"]
    labels: list[list[str]]
    axes: tuple[str, ...]
    baseline_clean: float
    baseline_corrupted: float
    activation: str
    by: str
    method: str
    token_index: list[int] | None
    n_prefix_tokens: int
    grid_size: tuple[int, int]
    is_normalized: bool = False

    def normalized(self) -> "PatchingResult":
        """Rescale so that the corrupted run scores 0 and the clean run 1: ``(v - corrupted) / (clean - corrupted)``.

        Example:
            >>> result.normalized().values[-1, 0]  # share of the effect restored by CLS  # doctest: +SKIP
        """
        span = self.baseline_clean - self.baseline_corrupted
        if span == 0:
            raise ValueError(
                f"The clean and corrupted runs have the same metric ({self.baseline_clean:.6g}), so there is nothing "
                "to normalise by; choose a metric (or clean / corrupted images) that tells the runs apart."
            )
        return dataclasses.replace(
            self,
            values=(self.values - self.baseline_corrupted) / span,
            baseline_clean=1.0,
            baseline_corrupted=0.0,
            is_normalized=True,
        )

    def to_grid(self) -> tuple[Float[Tensor, "layer prefix"], Float[Tensor, "layer rows cols"]]:
        """Per-token values laid out as the image: prefix tokens apart, patches on the grid.

        Returns:
            ``(prefix, grid)``: ``[n_layers, n_prefix_tokens]`` for CLS / distillation / register
            tokens and ``[n_layers, rows, cols]`` for the patches; NaN where a token was not patched.

        Example:
            >>> prefix, grid = result.to_grid()  # grid[l, r, c]: patching patch (r, c) at layer l  # doctest: +SKIP
        """
        if self.by != "position" or self.token_index is None:
            raise ValueError(
                f"to_grid needs one value per token (by='position' with per-token positions); this result is "
                f"by={self.by!r}" + (" with positions='all'" if self.by == "position" else "") + "."
            )
        rows, cols = self.grid_size
        n_layers = self.values.shape[0]
        prefix = self.values.new_full((n_layers, self.n_prefix_tokens), math.nan)
        grid = self.values.new_full((n_layers, rows * cols), math.nan)
        tokens = torch.tensor(self.token_index)
        is_prefix = tokens < self.n_prefix_tokens
        prefix[:, tokens[is_prefix]] = self.values[:, is_prefix]
        grid[:, tokens[~is_prefix] - self.n_prefix_tokens] = self.values[:, ~is_prefix]
        return prefix, grid.unflatten(1, (rows, cols))

    def figure(self, title: str | None = None) -> Any:
        """A plotly heatmap figure on one colour scale centred on the corrupted baseline.

        Per-token results get one patch-grid heatmap per layer (and a strip of the patched prefix
        tokens above it); ``head_position`` results one heads x tokens heatmap per layer; the
        others a single layers x heads / regions heatmap.

        Returns:
            A ``plotly.graph_objects.Figure``.

        Example:
            >>> activation_patching(model, corrupted, cache, metric).figure().show()  # doctest: +SKIP
        """
        go, make_subplots = _import_plotly()
        title = title or (
            f"{self.method} patching of {self.activation} by {self.by} "
            f"(clean {self.baseline_clean:.4g}, corrupted {self.baseline_corrupted:.4g})"
        )
        if self.by == "position" and self.token_index is not None:
            fig = self._grid_figure(go, make_subplots)
        elif self.by == "head_position":
            n_layers = len(self.labels[0])
            fig = make_subplots(
                rows=n_layers, cols=1, subplot_titles=self.labels[0], vertical_spacing=min(0.04, 0.5 / n_layers)
            )
            for layer, values in enumerate(self.values):
                fig.add_trace(
                    go.Heatmap(z=values.tolist(), x=self.labels[2], y=self.labels[1], coloraxis="coloraxis"),
                    row=layer + 1, col=1,
                )
            fig.update_layout(height=max(300, 60 + n_layers * (40 + 14 * len(self.labels[1]))))
        else:
            heatmap = go.Heatmap(z=self.values.tolist(), x=self.labels[1], y=self.labels[0], coloraxis="coloraxis")
            fig = go.Figure(heatmap)
            fig.update_yaxes(autorange="reversed")
        fig.update_layout(
            title=title,
            coloraxis=dict(
                colorscale="RdBu", cmid=self.baseline_corrupted,
                colorbar=dict(title="normalized metric" if self.is_normalized else "metric"),
            ),
        )
        return fig

    def _grid_figure(self, go: Any, make_subplots: Callable) -> Any:
        prefix_columns = [i for i, token in enumerate(self.token_index) if token < self.n_prefix_tokens]
        has_prefix = bool(prefix_columns)
        has_patches = len(prefix_columns) < len(self.token_index)
        _, grid = self.to_grid()
        n_layers = len(self.labels[0])
        facet_cols = min(n_layers, 6)
        facet_rows = math.ceil(n_layers / facet_cols)
        rows_per_layer = int(has_prefix) + int(has_patches)
        heights = ([1.0] if has_prefix else []) + ([float(self.grid_size[0])] if has_patches else [])
        titles = []
        for facet_row in range(facet_rows):
            layer_titles = [
                self.labels[0][facet_row * facet_cols + c] if facet_row * facet_cols + c < n_layers else ""
                for c in range(facet_cols)
            ]
            titles += layer_titles + [""] * facet_cols * (rows_per_layer - 1)
        fig = make_subplots(
            rows=facet_rows * rows_per_layer, cols=facet_cols, row_heights=heights * facet_rows,
            subplot_titles=titles, vertical_spacing=0.06 / facet_rows, horizontal_spacing=0.03,
        )
        for layer in range(n_layers):
            row = (layer // facet_cols) * rows_per_layer + 1
            col = layer % facet_cols + 1
            if has_prefix:
                fig.add_trace(
                    go.Heatmap(
                        z=[self.values[layer, prefix_columns].tolist()],
                        x=[self.labels[1][i] for i in prefix_columns], y=["prefix"], coloraxis="coloraxis",
                    ),
                    row=row, col=col,
                )
                row += 1
            if has_patches:
                fig.add_trace(
                    go.Heatmap(
                        z=grid[layer].tolist(), coloraxis="coloraxis",
                        hovertemplate="P(%{y},%{x}): %{z:.4g}<extra></extra>",
                    ),
                    row=row, col=col,
                )
                fig.update_yaxes(autorange="reversed", row=row, col=col)
        fig.update_layout(height=max(300, 220 * facet_rows), width=max(500, 180 * facet_cols))
        return fig


def activation_patching(
    model: Any,  # a HookedViT, or a HookedCLIP (its vision tower is used); checked below
    corrupted_images: Float[Tensor, "batch channel height width"],
    clean_cache: VisionActivationCache,
    metric: Any,  # checked below: metric(output) must return a scalar or [batch] tensor
    *,
    activation: str = "resid_pre",
    by: str = "position",
    layers: Any = None,
    positions: Any = None,
    heads: Any = None,
    regions: Any = None,
    region_size: Any = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> PatchingResult:
    """Patch each piece of a clean activation into the corrupted run and record the metric.

    Args:
        model: The model that produced ``clean_cache``.
        corrupted_images: ``[batch, channels, height, width]``, the same size as the clean images.
        clean_cache: The clean run's cache (``model.run_with_cache(clean_images)``); it must hold
            the patched activation at every swept layer and ``blocks.0.hook_resid_pre`` (for the
            clean baseline). ``attn.hook_result`` is only cached when named in ``names_filter``.
        metric: ``metric(output) -> Tensor``: a scalar, or one value per image (``[batch]``,
            averaged). ``output`` is the model's output for the corrupted batch.
        activation: What to patch: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``,
            ``mlp_out``, ``q``, ``k``, ``v``, ``z``, ``result`` or ``pattern``.
        by: ``"position"``, ``"head"``, ``"head_position"`` or ``"region"`` (see the module docs).
        layers: Layers to sweep (ints, negative from the end); default all.
        positions: Tokens to sweep for ``"position"`` / ``"head_position"``: a list of token indices
            (0 is CLS where there is one), ``"all"`` to patch every token at once as a single
            index, or None for every token in turn.
        heads: Heads to sweep for ``"head"`` / ``"head_position"``; default all.
        regions: For ``"region"``: a list of ``(rows, cols)`` pairs of slices (or ints) of the
            patch grid, e.g. ``[(slice(0, 7), slice(0, 7))]``.
        region_size: For ``"region"``, instead of ``regions``: ``(h, w)`` tiles the grid with
            ``h x w`` rectangles in raster order (smaller ones at the right and bottom edges).
        batch_size: Most images in one forward (a multiple of the corrupted batch is used);
            default: up to 256 images. ``len(corrupted_images)`` runs one variant per forward.
        progress: Show a progress bar over the forwards.

    Returns:
        A :class:`PatchingResult` with ``values`` shaped ``[n_layers, n_positions]``,
        ``[n_layers, n_heads]``, ``[n_layers, n_heads, n_positions]`` or ``[n_layers, n_regions]``.

    Example:
        >>> _, clean_cache = model.run_with_cache(clean_images)  # doctest: +SKIP
        >>> metric = lambda out: out @ (clean_embed - corrupted_embed)  # [batch]  # doctest: +SKIP
        >>> result = activation_patching(model, corrupted_images, clean_cache, metric)  # doctest: +SKIP
        >>> prefix, grid = result.normalized().to_grid()  # [layer, prefix], [layer, rows, cols]  # doctest: +SKIP
    """
    tower = image_tower(model)
    _check_metric_is_callable(metric)
    hook_suffix, layout = _resolve_activation(activation)
    _check_grouping(activation, by, positions, heads, regions, region_size)
    layer_list = _resolve_layers(layers, tower.cfg.n_layers)
    n_images = len(corrupted_images)
    grid = _image_grid(tower, corrupted_images)
    if tuple(clean_cache.grid_size) != grid:
        raise ValueError(
            f"clean_cache was recorded on images with a {clean_cache.grid_size[0]}x{clean_cache.grid_size[1]} patch "
            f"grid, but the corrupted images give {grid[0]}x{grid[1]}; use clean and corrupted images of one size."
        )
    hook_names = [f"blocks.{layer}.{hook_suffix}" for layer in layer_list]
    clean_acts = {
        name: _clean_activation(clean_cache, name, n_images, corrupted_images)
        for name in dict.fromkeys([_CLEAN_BASELINE_HOOK, *hook_names])
    }
    sweep = _build_sweep(
        tower, activation, by, layer_list, clean_acts[hook_names[0]][0], grid,
        positions=positions, heads=heads, regions=regions, region_size=region_size,
    )
    max_images = DEFAULT_MAX_IMAGES if batch_size is None else batch_size
    if max_images < n_images:
        if batch_size is not None:
            raise ValueError(
                f"batch_size={batch_size} is smaller than the {n_images} corrupted images; one forward needs the whole "
                f"corrupted batch (the metric may depend on all of it). Pass batch_size >= {n_images}, or fewer images."
            )
        max_images = n_images
    variants_per_forward = max_images // n_images

    n_tokens = clean_acts[_CLEAN_BASELINE_HOOK].shape[1]
    clean_variant = (_CLEAN_BASELINE_HOOK, "token", torch.ones(n_tokens, 1, dtype=torch.bool))
    corrupted_variant = (None, layout, None)

    def variant(index: int) -> tuple[str | None, str, Tensor | None]:
        if index == 0:
            return clean_variant
        if index == 1:
            return corrupted_variant
        layer, mask = sweep.variant(index - 2)
        return f"blocks.{layer}.{hook_suffix}", layout, mask

    n_variants = 2 + sweep.n_variants
    starts = range(0, n_variants, variants_per_forward)
    metric_values: list[float] = []
    for start in progress_bar(starts, desc=f"patching {activation} by {by}", enabled=progress):
        chunk = [variant(i) for i in range(start, min(start + variants_per_forward, n_variants))]
        metric_values += _run_variants(tower, corrupted_images, clean_acts, chunk, metric)
    baseline_clean, baseline_corrupted, *patched = metric_values
    return sweep.result(
        torch.tensor(patched, dtype=torch.float64), baseline_clean, baseline_corrupted, method="activation"
    )


def attribution_patching(
    model: Any,  # a HookedViT, or a HookedCLIP (its vision tower is used); checked below
    clean_images: Any,  # checked below: the shape of corrupted_images
    corrupted_images: Float[Tensor, "batch channel height width"],
    metric: Any,  # checked below: metric(output) must return a scalar or [batch] tensor
    *,
    activation: str = "resid_pre",
    by: str = "position",
    layers: Any = None,
    positions: Any = None,
    heads: Any = None,
    regions: Any = None,
    region_size: Any = None,
) -> PatchingResult:
    """Estimate :func:`activation_patching` to first order from one forward-backward pass.

    For every patched piece ``S`` the change of the metric is estimated as
    ``sum over S and the batch of grad(metric at corrupted) * (clean - corrupted activation)``,
    where ``S`` covers the feature axis (``d_model`` / ``d_head`` / the key axis of a pattern)
    and the tokens and heads of the index. The estimate is good when the clean and corrupted
    activations are close; it is a linearisation, so check important findings with exact
    patching. Model parameters get no gradients (they are frozen during the backward pass).

    Args:
        model: A HookedViT (or HookedCLIP).
        clean_images, corrupted_images: ``[batch, channels, height, width]``, the same shape.
        metric: ``metric(output) -> Tensor``, a scalar or ``[batch]`` (averaged); differentiable.
        activation, by, layers, positions, heads, regions, region_size: As in
            :func:`activation_patching`.

    Returns:
        A :class:`PatchingResult` whose ``values`` are ``baseline_corrupted + attribution``, so
        that they compare directly with :func:`activation_patching`'s.

    Example:
        >>> fast = attribution_patching(model, clean, corrupted, metric, activation="z", by="head")  # doctest: +SKIP
        >>> fast.values.shape  # [n_layers, n_heads]  # doctest: +SKIP
    """
    tower = image_tower(model)
    _check_metric_is_callable(metric)
    hook_suffix, layout = _resolve_activation(activation)
    _check_grouping(activation, by, positions, heads, regions, region_size)
    layer_list = _resolve_layers(layers, tower.cfg.n_layers)
    if not isinstance(clean_images, Tensor) or clean_images.shape != corrupted_images.shape:
        shape = tuple(clean_images.shape) if isinstance(clean_images, Tensor) else type(clean_images).__name__
        raise ValueError(
            f"clean_images {shape} and corrupted_images {tuple(corrupted_images.shape)} must have "
            "the same shape: each clean image is paired with the corrupted image at the same index."
        )
    n_images = len(corrupted_images)
    hook_names = [f"blocks.{layer}.{hook_suffix}" for layer in layer_list]
    with torch.no_grad():
        clean_out, clean_cache = tower.run_with_cache(clean_images, names_filter=hook_names)
    baseline_clean = _reduced_metric(metric, clean_out, n_images).item()
    with frozen_parameters(tower), torch.enable_grad():
        # With frozen parameters the graph must start at the images for the activations to get gradients.
        leaf_images = corrupted_images.detach().requires_grad_(True)
        corrupted_out, corrupted_cache = tower.run_with_cache(
            leaf_images, names_filter=hook_names, incl_bwd=True,
            metric=lambda output: _reduced_metric(metric, output, n_images),
        )
    baseline_corrupted = _reduced_metric(metric, corrupted_out.detach(), n_images).item()
    sweep = _build_sweep(
        tower, activation, by, layer_list, corrupted_cache[hook_names[0]][0], _image_grid(tower, corrupted_images),
        positions=positions, heads=heads, regions=regions, region_size=region_size,
    )
    per_layer = []
    for name in hook_names:
        per_element = (clean_cache[name] - corrupted_cache[name]) * corrupted_cache[f"{name}_grad"]
        per_layer.append(sweep.attribution(_token_head_sums(layout, per_element.double())))
    attribution = torch.stack(per_layer)
    return sweep.result(
        baseline_corrupted + attribution.flatten(), baseline_clean, baseline_corrupted, method="attribution"
    )


# ---------------------------------------------------------------------- the sweep: what each index patches


@dataclasses.dataclass
class _Sweep:
    """Every index of a sweep as a boolean mask over (token, head) of one layer's activation.

    Index ``(layer, k, g)`` patches the tokens of ``position_groups[g]`` in the heads of
    ``head_sets[k]``; a grouping that does not split by head has one all-True head set, one that
    does not split by token one all-True position group.
    """

    activation: str
    by: str
    layers: list[int]
    position_groups: Bool[Tensor, "group pos"]
    head_sets: Bool[Tensor, "head_set head"]
    labels: list[list[str]]
    axes: tuple[str, ...]
    token_index: list[int] | None
    n_prefix_tokens: int
    grid_size: tuple[int, int]

    @property
    def n_variants(self) -> int:
        return len(self.layers) * len(self.head_sets) * len(self.position_groups)

    def variant(self, index: int) -> tuple[int, Bool[Tensor, "pos head"]]:
        """The layer and the (token, head) mask of the ``index``-th variant, in row-major order of the values."""
        per_layer = len(self.head_sets) * len(self.position_groups)
        layer_index, rest = divmod(index, per_layer)
        head_set, group = divmod(rest, len(self.position_groups))
        mask = self.position_groups[group][:, None] & self.head_sets[head_set][None, :]
        return self.layers[layer_index], mask

    def attribution(self, token_head_sums: Float[Tensor, "pos head"]) -> Float[Tensor, "head_set group"]:
        """Sum per-(token, head) attributions over every index of one layer."""
        groups = self.position_groups.to(token_head_sums.dtype)
        head_sets = self.head_sets.to(token_head_sums.dtype)
        return torch.einsum("gp,ph,kh->kg", groups, token_head_sums, head_sets)

    def result(
        self, flat_values: Tensor, baseline_clean: float, baseline_corrupted: float, method: str
    ) -> PatchingResult:
        shape = [len(label_list) for label_list in self.labels]
        return PatchingResult(
            values=flat_values.reshape(shape),
            labels=self.labels,
            axes=self.axes,
            baseline_clean=float(baseline_clean),
            baseline_corrupted=float(baseline_corrupted),
            activation=self.activation,
            by=self.by,
            method=method,
            token_index=self.token_index,
            n_prefix_tokens=self.n_prefix_tokens,
            grid_size=self.grid_size,
        )


def _build_sweep(
    model: HookedViT,
    activation: str,
    by: str,
    layers: list[int],
    example: Tensor,
    grid: tuple[int, int],
    *,
    positions: Any,
    heads: Any,
    regions: Any,
    region_size: Any,
) -> _Sweep:
    """Resolve the index arguments against one image's activation ``example`` (without batch axis)."""
    layout = ACTIVATIONS[activation][1]
    by_head = by in ("head", "head_position")
    n_pos = example.shape[1] if layout == "head_query" else example.shape[0]
    n_heads = 1 if layout == "token" else example.shape[0 if layout == "head_query" else 1]
    cfg = model.cfg
    token_labels = _token_labels(cfg.class_token, cfg.distillation_token, cfg.n_registers, n_pos, grid)
    layer_labels = [f"L{layer}" for layer in layers]
    token_index: list[int] | None = None

    if by == "region":
        position_groups, group_labels = _region_groups(regions, region_size, grid, cfg.n_prefix_tokens, n_pos)
    elif by == "head":
        position_groups, group_labels = torch.ones(1, n_pos, dtype=torch.bool), []
    elif isinstance(positions, str):  # "all", checked by _check_grouping
        position_groups, group_labels = torch.ones(1, n_pos, dtype=torch.bool), ["all"]
    else:
        token_index = _resolve_indices(positions, n_pos, "position", "tokens")
        position_groups = torch.eye(n_pos, dtype=torch.bool)[token_index]
        group_labels = [token_labels[i] for i in token_index]

    if by_head:
        head_list = _resolve_indices(heads, n_heads, "head", "heads")
        head_sets = torch.eye(n_heads, dtype=torch.bool)[head_list]
        head_labels = [f"H{h}" for h in head_list]
    else:
        head_sets = torch.ones(1, n_heads, dtype=torch.bool)

    if by == "head":
        labels, axes = [layer_labels, head_labels], ("layer", "head")
    elif by == "head_position":
        labels, axes = [layer_labels, head_labels, group_labels], ("layer", "head", "position")
    else:
        labels, axes = [layer_labels, group_labels], ("layer", by)
    return _Sweep(
        activation, by, layers, position_groups, head_sets, labels, axes,
        token_index if by == "position" else None, cfg.n_prefix_tokens, grid,
    )


def _check_grouping(activation: str, by: str, positions: Any, heads: Any, regions: Any, region_size: Any) -> None:
    """Check the index arguments that do not depend on the activation's shape, before any forward pass."""
    if by not in GROUPINGS:
        raise ValueError(f"by must be one of {GROUPINGS}, got {by!r}")
    layout = ACTIVATIONS[activation][1]
    by_head = by in ("head", "head_position")
    if by_head and layout == "token":
        raise ValueError(
            f"by={by!r} needs an activation with a head axis (q, k, v, z, result, pattern); {activation!r} is "
            "[batch, pos, d_model]. Use by='position' or 'region', or activation='z' / 'result' for head outputs."
        )
    if heads is not None and not by_head:
        raise ValueError(
            f"heads= selects heads for by='head' or 'head_position'; with by={by!r} every head is patched."
        )
    if positions is not None and by not in ("position", "head_position"):
        raise ValueError(f"positions= selects tokens for by='position' or 'head_position', not by={by!r}.")
    if (regions is not None or region_size is not None) and by != "region":
        raise ValueError(f"regions= and region_size= go with by='region', not by={by!r}.")
    if by == "region" and (regions is None) == (region_size is None):
        raise ValueError(
            "by='region' takes either regions=[(row_slice, col_slice), ...] or region_size=(h, w) (a tiling of the "
            "patch grid), exactly one of them."
        )
    if isinstance(positions, str) and positions != "all":
        raise ValueError(f"positions must be a list of token indices, 'all' or None, got {positions!r}")


def _token_labels(
    class_token: bool, distillation_token: bool, n_registers: int, n_pos: int, grid: tuple[int, int]
) -> list[str]:
    prefix = ["CLS"] * class_token + ["DIST"] * distillation_token + [f"REG{i}" for i in range(n_registers)]
    rows, cols = grid
    if n_pos != len(prefix) + rows * cols:
        raise ValueError(
            f"The activation has {n_pos} tokens, but {len(prefix)} prefix tokens and a {rows}x{cols} patch grid make "
            f"{len(prefix) + rows * cols}; was the cache recorded on images of another size?"
        )
    return prefix + [f"P({r},{c})" for r in range(rows) for c in range(cols)]


def _region_groups(
    regions: Any, region_size: Any, grid: tuple[int, int], n_prefix: int, n_pos: int
) -> tuple[Bool[Tensor, "region pos"], list[str]]:
    rows, cols = grid
    if region_size is not None:
        if not (isinstance(region_size, (tuple, list)) and len(region_size) == 2
                and all(isinstance(v, int) and v >= 1 for v in region_size)):
            raise ValueError(f"region_size must be a pair of positive ints (h, w), got {region_size!r}")
        height, width = region_size
        regions = [
            (slice(r, min(r + height, rows)), slice(c, min(c + width, cols)))
            for r in range(0, rows, height) for c in range(0, cols, width)
        ]
    if not isinstance(regions, (list, tuple)) or not regions:
        raise ValueError(f"regions must be a non-empty list of (row_slice, col_slice) pairs, got {regions!r}")
    groups = torch.zeros(len(regions), n_pos, dtype=torch.bool)
    labels = []
    for index, region in enumerate(regions):
        if not (isinstance(region, (tuple, list)) and len(region) == 2):
            raise ValueError(f"Each region is a (row_slice, col_slice) pair; region {index} is {region!r}")
        row_range = _grid_range(region[0], rows, "row", index)
        col_range = _grid_range(region[1], cols, "column", index)
        for r in row_range:
            groups[index, [n_prefix + r * cols + c for c in col_range]] = True
        labels.append(f"R({_span(row_range)},{_span(col_range)})")
    return groups, labels


def _grid_range(part: Any, size: int, axis: str, index: int) -> range:
    if isinstance(part, int) and not isinstance(part, bool):
        if not -size <= part < size:
            raise ValueError(f"Region {index}: {axis} {part} is outside the grid's {size} {axis}s")
        part = slice(part % size, part % size + 1)
    if not isinstance(part, slice):
        raise TypeError(f"Region {index}: the {axis}s must be a slice or an int, got {type(part).__name__}")
    span = range(*part.indices(size))
    if not span:
        raise ValueError(f"Region {index}: {axis}s {part} select nothing of the grid's {size} {axis}s")
    return span


def _span(span: range) -> str:
    return f"{span.start}:{span.stop}" + (f":{span.step}" if span.step != 1 else "")


def _resolve_indices(indices: Any, size: int, what: str, plural: str) -> list[int]:
    if indices is None:
        return list(range(size))
    if isinstance(indices, Tensor):
        indices = indices.tolist()
    if isinstance(indices, int) and not isinstance(indices, bool):
        indices = [indices]
    if not isinstance(indices, (list, tuple, range)) or not indices:
        raise TypeError(f"{plural} must be a non-empty list of ints (or None for all), got {indices!r}")
    resolved = []
    for index in indices:
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"{plural} must be ints, got {index!r}")
        if not -size <= index < size:
            raise ValueError(f"{what} {index} is out of range: the activation has {size} {plural}, 0 to {size - 1}")
        resolved.append(index % size)
    return resolved


def _resolve_layers(layers: Any, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple, range)) or not layers:
        raise TypeError(f"layers must be an int, a non-empty list of ints or None (all), got {layers!r}")
    resolved = []
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layers must be ints, got {layer!r}")
        if not -n_layers <= layer < n_layers:
            raise ValueError(
                f"layer {layer} is out of range: the model has {n_layers} blocks, 0 to {n_layers - 1} "
                f"(or -{n_layers} to -1 from the end)"
            )
        resolved.append(layer % n_layers)
    return resolved


def _resolve_activation(activation: str) -> tuple[str, str]:
    if activation in ACTIVATIONS:
        return ACTIVATIONS[activation]
    short = activation.rsplit(".", 1)[-1].removeprefix("hook_") if isinstance(activation, str) else ""
    hint = f" Did you mean {short!r}?" if short in ACTIVATIONS else ""
    if not hint:
        close = difflib.get_close_matches(short, list(ACTIVATIONS), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"activation must be a TransformerLens short name, one of {list(ACTIVATIONS)}; got {activation!r}.{hint}"
    )


# ---------------------------------------------------------------------- running the variants


def _run_variants(
    model: HookedViT,
    corrupted_images: Tensor,
    clean_acts: dict[str, Tensor],
    variants: list[tuple[str | None, str, Tensor | None]],
    metric: Callable,
) -> list[float]:
    """One forward of ``len(variants)`` copies of the corrupted batch, each patched by its own mask."""
    n_images = len(corrupted_images)
    hooks = []
    for name in dict.fromkeys(name for name, _, _ in variants if name is not None):
        layout = next(lay for n, lay, _ in variants if n == name)
        template = next(mask for n, _, mask in variants if n == name)
        # Blocks patched at another hook point (or not at all) get an all-False mask here.
        block_masks = [
            _layout_mask(layout, mask if n == name else torch.zeros_like(template)) for n, _, mask in variants
        ]
        masks = torch.stack(block_masks)[:, None].to(corrupted_images.device)  # [block, 1 (image), *per-image]
        hooks.append((name, partial(_patch_blocks, clean=clean_acts[name], masks=masks)))
    images = corrupted_images.repeat(len(variants), 1, 1, 1)
    with torch.no_grad():
        output = model.run_with_hooks(images, fwd_hooks=hooks)
        return [_reduced_metric(metric, block, n_images).item() for block in output.split(n_images)]


def _patch_blocks(activation: Tensor, hook: Any, *, clean: Tensor, masks: Tensor) -> Tensor:
    """Copy ``clean`` into each block of the batch where that block's mask is True."""
    blocks = activation.reshape(masks.shape[0], clean.shape[0], *activation.shape[1:])
    return torch.where(masks, clean, blocks).flatten(0, 1)


def _layout_mask(layout: str, mask: Bool[Tensor, "pos head"]) -> Tensor:
    """A (token, head) mask shaped to broadcast against one image's activation in ``layout``."""
    if layout == "token":
        return mask  # [pos, 1] against [pos, d_model]
    if layout == "token_head":
        return mask[..., None]  # [pos, head, 1] against [pos, head, d]
    return mask.T[..., None]  # [head, query, 1] against [head, query, key]


def _token_head_sums(layout: str, per_element: Tensor) -> Float[Tensor, "pos head"]:
    """Sum over the batch and the feature (or key) axis, leaving [pos, head] ([pos, 1] without heads)."""
    summed = per_element.sum(dim=(0, -1))
    if layout == "token":
        return summed[:, None]
    if layout == "token_head":
        return summed
    return summed.T


def _reduced_metric(metric: Callable, output: Tensor, n_images: int) -> Tensor:
    value = metric(output)
    if not isinstance(value, Tensor):
        raise TypeError(
            f"metric must return a torch.Tensor (a scalar, or one value per image of shape [{n_images}]), got "
            f"{type(value).__name__}; return the tensor itself rather than .item()."
        )
    if value.numel() == 1:
        return value.reshape(())
    if value.shape == (n_images,):
        return value.mean()
    raise ValueError(
        f"metric returned shape {tuple(value.shape)}; return a scalar or one value per image, shape [{n_images}]."
    )


def _check_metric_is_callable(metric: Any) -> None:
    if not callable(metric):
        raise TypeError(
            f"metric must be a function of the model output returning a tensor, got {type(metric).__name__}"
        )


def _clean_activation(clean_cache: VisionActivationCache, name: str, n_images: int, like: Tensor) -> Tensor:
    if name not in clean_cache.cache_dict:
        hint = (
            " Per-head results are cached only on request: run_with_cache(..., names_filter=[..., "
            f"{name!r}])." if name.endswith("hook_result") else
            f" Run model.run_with_cache(clean_images) without names_filter, or include {name!r} in it."
        )
        raise ValueError(f"clean_cache has no {name!r}, which this sweep patches.{hint}")
    act = clean_cache[name]
    if not clean_cache.has_batch_dim or len(act) != n_images:
        raise ValueError(
            f"clean_cache[{name!r}] has shape {tuple(act.shape)}; it needs a batch axis of {n_images} images, one "
            "clean image per corrupted image (cache the clean run without remove_batch_dim)."
        )
    return act.to(like)


def _image_grid(model: HookedViT, images: Tensor) -> tuple[int, int]:
    patch = model.cfg.patch_size
    return images.shape[-2] // patch[0], images.shape[-1] // patch[1]


def _import_plotly() -> tuple[Any, Callable]:
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError as error:
        raise ImportError("PatchingResult.figure needs plotly: pip install plotly") from error
    return go, make_subplots
