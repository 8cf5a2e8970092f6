""""Peeling Back the Layers", sections 4.2-4.3, as functions: layer averaging and layer readout.

**Layer averaging** (section 4.2, figure 2). The dataset average of a layer's tokens replaces part of
one block's computation (or of several blocks' at once), and the change of the model's output is
measured. Writing block ``l`` as ``Z^l_hat = MSA^l(Z^{l-1}) + Z^{l-1}``, ``Z^l = MLP^l(Z^l_hat) +
Z^l_hat`` (eqs. 1-2; in these pre-LayerNorm towers ``MSA`` includes ``ln1`` and ``MLP`` ``ln2``),
and ``mean(.)`` for the average over a dataset, token position by token position:

* ``"output"``: ``Z^l`` is replaced by ``mean(Z^l)``. Every image then leaves block ``l`` with the
  same tokens, so the output no longer depends on the image at all: this variant measures how far
  the average image's output is from each image's (:func:`vit_lens.intervene.interventions.average_layer_output`).
* ``"attention_input"``: the paper's main experiment ("we replace the input to the MSA in eq. 1 with
  these average feature vectors, so the model's attention mechanism operates solely on these
  average vectors"): block ``l``'s attention reads ``mean(Z^{l-1})``, normalised by the block's own
  ``ln1``, while the skip connection keeps the image's own ``Z^{l-1}``. We read "the average
  feature vector" of the MSA input as the average of ``Z^{l-1}``, the tokens the attention reads in
  eq. 1 (``attention_input_of="normalized"`` averages ``ln1(Z^{l-1})`` instead; LayerNorm is not
  linear, so the two differ) (:func:`vit_lens.intervene.interventions.average_attention_input`).
* ``"residual"``: the paper's "confusion": the skip term of eq. 1 is ``mean(Z^{l-1})`` while the
  attention reads the image's own ``Z^{l-1}``: ``Z^l_hat = MSA^l(Z^{l-1}) + mean(Z^{l-1})``
  (:func:`vit_lens.intervene.interventions.average_residual_connection`).

A *condition* is one layer, or a set of layers intervened on together (the paper's "all layers
11-20 simultaneously": ``ranges=[range(11, 21)]`` or ``ranges=["11-20"]``). Means come from
:func:`averaging_statistics` (by default over the same images, as the paper does with WHOOPS; pass
statistics from another dataset for its ImageNet-means curve).

**Upper-layer contribution** (section 4.3, figure 3): the model's own readout (final LayerNorm,
pooling, projection or classifier head) applied to block ``l``'s output, and the output metric of
that early readout (:func:`layer_readout`, :func:`upper_layer_contribution`).

Metrics (per image, averaged): ``"cosine"``: cosine similarity to the unmodified output (for the
readout: to the final output); ``"accuracy"``: top-1 against ``labels``, through ``classifier`` (a
``[d_embed, n_classes]`` zero-shot classifier, e.g. ``HookedCLIP.zero_shot_classifier``; the
output is L2-normalised first) or the model's own logits; or any callable ``metric(output,
reference) -> [batch]`` (or a scalar for the batch), e.g. the similarity of texts decoded from both.

Figures: :func:`plot_averaging_curves` (figure 2), :func:`plot_readout_curve` (figure 3).
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from vit_lens.intervene.interventions import average_attention_input, average_layer_output, average_residual_connection
from vit_lens.intervene.statistics import HookStatistics, compute_hook_statistics
from vit_lens.model.hooked_vit import image_tower
from vit_lens.utils.progress import progress as progress_bar

VARIANTS = ("output", "attention_input", "residual")
METRICS = ("cosine", "accuracy")
ATTENTION_INPUT_OF = ("residual", "normalized")


# ============================================================================ layer averaging


@dataclass
class AveragingCurves:
    """Result of :func:`layer_averaging`: the metric per variant and condition.

    Attributes:
        variants: The variants run (rows of ``values``).
        conditions: Per condition, the layers averaged together.
        labels: Per condition, ``"3"`` or ``"11-20"`` or ``"2,5"``.
        values: ``[variant, condition]``: the metric, mean over images.
        per_image: ``[variant, condition, image]`` (a callable metric that returns one number per
            batch gives that number to each image of the batch).
        baseline: The metric of the unmodified model (1 for ``"cosine"``; its accuracy for
            ``"accuracy"``).
        metric: The metric's name.
        n_images: Images measured.
    """

    variants: list[str]
    conditions: list[tuple[int, ...]]
    labels: list[str]
    values: Float[Tensor, "variant condition"]
    per_image: Float[Tensor, "variant condition image"]
    baseline: float
    metric: str
    n_images: int

    def curve(self, variant: str) -> tuple[list[int], Float[Tensor, " layer"]]:
        """``(layers, values)`` of the single-layer conditions of one variant (a figure 2 line)."""
        row = self._row(variant)
        picks = [i for i, c in enumerate(self.conditions) if len(c) == 1]
        return [self.conditions[i][0] for i in picks], self.values[row, picks]

    def value(self, variant: str, layers: Any) -> float:
        """The metric of one variant for one condition (an int layer, or the layers of a range)."""
        wanted = (layers,) if isinstance(layers, int) else tuple(sorted(layers))
        if wanted not in self.conditions:
            raise KeyError(f"no condition {wanted}; the conditions are {self.labels}")
        return float(self.values[self._row(variant), self.conditions.index(wanted)])

    def to_pandas(self):
        """A DataFrame: one row per condition, one column per variant (needs pandas)."""
        import pandas as pd

        frame = pd.DataFrame(self.values.T.cpu().numpy(), index=self.labels, columns=self.variants)
        frame.index.name = "layers averaged"
        return frame

    def table(self, digits: int = 4) -> str:
        """The curves as a plain-text table, one row per condition."""
        width = max(len("layers"), *(len(label) for label in self.labels))
        head = f"{'layers':<{width}}  " + "  ".join(f"{v:>16}" for v in self.variants)
        lines = [f"{self.metric} (unmodified: {self.baseline:.{digits}f}, {self.n_images} images)", head]
        for j, label in enumerate(self.labels):
            lines.append(f"{label:<{width}}  " + "  ".join(f"{float(self.values[i, j]):>16.{digits}f}"
                                                        for i in range(len(self.variants))))
        return "\n".join(lines)

    def _row(self, variant: str) -> int:
        if variant not in self.variants:
            raise KeyError(f"variant {variant!r} was not run; these were: {self.variants}")
        return self.variants.index(variant)


def averaging_statistics(
    model: Any,
    data: Any,
    *,
    layers: Any = None,
    variants: Sequence[str] = VARIANTS,
    attention_input_of: str = "residual",
    per_position: bool = True,
    batch_size: int = 64,
    progress: bool = False,
) -> HookStatistics:
    """Dataset means of everything :func:`layer_averaging` replaces, in one pass over ``data``.

    Args:
        model: A ``HookedViT`` or ``HookedCLIP``.
        data: ``[n, channels, height, width]`` images, or an iterable of image batches (or of
            ``(images, labels, ...)`` tuples).
        layers: Layers the statistics are for (default all).
        variants, attention_input_of: As in :func:`layer_averaging` (which hooks are needed).
        per_position: Average each token position separately (default: ``Z^l`` is a matrix of
            tokens) or pool over positions (one ``[d_model]`` vector per layer).
        batch_size: Images per forward pass when ``data`` is a tensor.
        progress: Show a progress bar.

    Returns:
        :class:`~vit_lens.intervene.statistics.HookStatistics` (save it with ``.save(path)``).

    Example:
        >>> means = averaging_statistics(clip, imagenet_batches)  # doctest: +SKIP
        >>> curves = layer_averaging(clip, whoops_images, means=means)  # the paper's ImageNet means  # doctest: +SKIP
    """
    tower = _tower(model)
    n_layers = tower.cfg.n_layers
    chosen = range(n_layers) if layers is None else [_check_layer(l, n_layers) for l in _listed(layers, "layers")]
    names = _statistics_names(_check_variants(variants), chosen, _check_attention_input_of(attention_input_of))
    return compute_hook_statistics(
        tower, (images for images, _ in _batches(data, None, batch_size)), names,
        per_position=per_position, progress=progress,
    )


def layer_averaging(
    model: Any,
    data: Any,
    *,
    means: Any = None,  # checked below with a directed message
    variants: Sequence[str] = VARIANTS,
    layers: Any = None,
    ranges: Sequence[Any] = (),
    metric: Any = "cosine",
    labels: Any = None,
    classifier: Float[Tensor, "d_out n_classes"] | None = None,
    readout: str = "output",
    attention_input_of: str = "residual",
    batch_size: int = 64,
    progress: bool = False,
) -> AveragingCurves:
    """Replace parts of layers by dataset averages and measure the output's change (figure 2).

    Every batch is run once unmodified and once per (variant, condition); ``data`` is read once
    (twice when ``means`` is None).

    Args:
        model: A ``HookedViT`` or ``HookedCLIP``.
        data: ``[n, channels, height, width]`` images, or a re-iterable of batches (a DataLoader, a
            list) of images or ``(images, labels, ...)`` tuples.
        means: From :func:`averaging_statistics`; default: computed over ``data``.
        variants: Any of ``"output"``, ``"attention_input"``, ``"residual"`` (module docstring).
        layers: Layers averaged one at a time (default: every layer; ``[]`` for ranges only).
        ranges: Sets of layers averaged together: ``range(11, 21)``, ``"11-20"`` (inclusive, as the
            paper writes it) or a list of layers.
        metric: ``"cosine"`` (of the flattened readouts), ``"accuracy"`` or
            ``metric(output, unmodified_output) -> [batch]``.
        labels: ``[n]`` class indices for ``"accuracy"`` (default: the second element of each batch).
        classifier: ``[d_out, n_classes]`` class embeddings for ``"accuracy"`` on a CLIP (default:
            the model's logits, for a classifier).
        readout: What the metric compares: ``"output"`` (the model's output) or a hook name (e.g.
            ``"blocks.10.hook_resid_post"``, the tokens a decoder would read); not with ``"accuracy"``.
        attention_input_of: For ``"attention_input"``: average ``"residual"`` (``Z^{l-1}``, then
            ``ln1``) or ``"normalized"`` (``ln1(Z^{l-1})``).
        batch_size: Images per forward pass when ``data`` is a tensor.
        progress: Show a progress bar.

    Returns:
        :class:`AveragingCurves` (``.table()``, ``.to_pandas()``, :func:`plot_averaging_curves`).

    Example:
        >>> import vit_lens
        >>> from vit_lens.toy import ToyWorld
        >>> clip = vit_lens.load_toy_clip()
        >>> images = ToyWorld(seed=0).sample(32).images
        >>> curves = layer_averaging(clip, images, ranges=["1-2"])
        >>> curves.labels, curves.values.shape   # 3 variants x (4 layers + 1 range)
        (['0', '1', '2', '3', '1-2'], torch.Size([3, 5]))
    """
    tower = _tower(model)
    n_layers = tower.cfg.n_layers
    variants = _check_variants(variants)
    attention_input_of = _check_attention_input_of(attention_input_of)
    conditions = _conditions(layers, ranges, n_layers)
    score = _metric_function(tower, metric, labels, classifier, readout)
    _check_readout(tower, readout)
    if means is None:
        used = sorted({l for c in conditions for l in c})
        means = averaging_statistics(tower, data, layers=used, variants=variants,
                                     attention_input_of=attention_input_of, batch_size=batch_size)
    elif not isinstance(means, HookStatistics):
        raise TypeError(f"means must be a HookStatistics from averaging_statistics, got {type(means).__name__}")
    hooks = {(v, c): _averaging_hooks(tower, v, c, means, attention_input_of) for v in variants for c in conditions}
    per_image: dict[tuple[str, tuple[int, ...]], list[Tensor]] = {key: [] for key in hooks}
    baseline: list[Tensor] = []
    with torch.no_grad():
        for images, batch_labels in progress_bar(_batches(data, labels, batch_size), desc="batches", unit="batch", enabled=progress):
            images = _to_model(tower, images)
            clean = _run(tower, images, [], readout)
            baseline.append(score(clean, clean, batch_labels, len(images)))
            for key, fwd_hooks in hooks.items():
                per_image[key].append(score(_run(tower, images, fwd_hooks, readout), clean, batch_labels, len(images)))
    if not baseline:
        raise ValueError("layer_averaging got no images from data")
    stacked = torch.stack([torch.stack([torch.cat(per_image[(v, c)]) for c in conditions]) for v in variants])
    base = torch.cat(baseline)
    return AveragingCurves(
        variants=list(variants), conditions=conditions, labels=[_label(c) for c in conditions],
        values=stacked.mean(dim=-1), per_image=stacked, baseline=float(base.mean()),
        metric=_metric_name(metric), n_images=len(base),
    )


# ============================================================================ upper-layer contribution


@dataclass
class ReadoutCurve:
    """Result of :func:`upper_layer_contribution`: the metric of the output read out at each layer.

    Attributes:
        layers: The layers read out.
        values: ``[layer]``: the metric, mean over images.
        per_image: ``[layer, image]``.
        final: The metric of the model's own output (1 for ``"cosine"``).
        metric: The metric's name.
        n_images: Images measured.
    """

    layers: list[int]
    values: Float[Tensor, " layer"]
    per_image: Float[Tensor, "layer image"]
    final: float
    metric: str
    n_images: int

    def to_pandas(self):
        """A DataFrame with one row per layer (needs pandas)."""
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, self.metric: self.values.cpu().numpy()}).set_index("layer")

    def table(self, digits: int = 4) -> str:
        """The curve as a plain-text table."""
        lines = [f"{self.metric} of the output read out at each layer (final output: {self.final:.{digits}f}, "
                 f"{self.n_images} images)", f"{'layer':>5}  {self.metric:>12}"]
        lines += [f"{layer:>5}  {float(value):>12.{digits}f}" for layer, value in zip(self.layers, self.values)]
        return "\n".join(lines)


def layer_readout(
    model: Any, images: Float[Tensor, "batch channel height width"], *, layers: Any = None
) -> Float[Tensor, "batch layer *out"]:
    """The model's output computed from block ``l``'s output instead of the last block's.

    The tower's own readout (final LayerNorm, pooling, projection or head, in the model's order)
    is applied to ``blocks.{l}.hook_resid_post``; at the last layer this is the output itself.

    Args:
        model: A ``HookedViT`` or ``HookedCLIP``.
        images: ``[batch, channels, height, width]``.
        layers: Layers to read out (default all).

    Returns:
        ``[batch, layer, *out]`` (``out`` as the model's output: ``[d_proj]`` for a CLIP).

    Example:
        >>> import vit_lens
        >>> from vit_lens.toy import ToyWorld
        >>> clip = vit_lens.load_toy_clip()
        >>> images = ToyWorld(seed=0).sample(2).images
        >>> early = layer_readout(clip, images)
        >>> early.shape, bool(torch.allclose(early[:, -1], clip.encode_image(images), atol=1e-5))
        (torch.Size([2, 4, 64]), True)
    """
    tower = _tower(model)
    n_layers = tower.cfg.n_layers
    chosen = list(range(n_layers)) if layers is None else [_check_layer(l, n_layers) for l in _listed(layers, "layers")]
    return _readouts(tower, _to_model(tower, images), chosen)[0]


def upper_layer_contribution(
    model: Any,
    data: Any,
    *,
    layers: Any = None,
    metric: Any = "cosine",
    labels: Any = None,
    classifier: Float[Tensor, "d_out n_classes"] | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> ReadoutCurve:
    """The output metric when the model is read out at layer ``l`` (section 4.3, figure 3).

    Args:
        model: A ``HookedViT`` or ``HookedCLIP``.
        data: Images ``[n, channels, height, width]`` or an iterable of batches (as :func:`layer_averaging`).
        layers: Layers to read out (default all).
        metric: ``"cosine"`` (to the final output), ``"accuracy"`` (of the early readout) or
            ``metric(readout, final_output) -> [batch]`` (close over references to compare with a
            gold caption, as the paper's CIDEr).
        labels, classifier, batch_size, progress: As in :func:`layer_averaging`.

    Returns:
        :class:`ReadoutCurve`.

    Example:
        >>> curve = upper_layer_contribution(clip, images, metric="accuracy", labels=labels,
        ...                                  classifier=clip.zero_shot_classifier(classnames))  # doctest: +SKIP
        >>> plot_readout_curve(curve).show()  # doctest: +SKIP
    """
    tower = _tower(model)
    n_layers = tower.cfg.n_layers
    chosen = list(range(n_layers)) if layers is None else [_check_layer(l, n_layers) for l in _listed(layers, "layers")]
    score = _metric_function(tower, metric, labels, classifier, "output")
    per_layer: list[list[Tensor]] = [[] for _ in chosen]
    finals: list[Tensor] = []
    with torch.no_grad():
        for images, batch_labels in progress_bar(_batches(data, labels, batch_size), desc="batches", unit="batch", enabled=progress):
            images = _to_model(tower, images)
            early, final = _readouts(tower, images, chosen)
            finals.append(score(final, final, batch_labels, len(images)))
            for i in range(len(chosen)):
                per_layer[i].append(score(early[:, i], final, batch_labels, len(images)))
    if not finals:
        raise ValueError("upper_layer_contribution got no images from data")
    stacked = torch.stack([torch.cat(parts) for parts in per_layer])
    final = torch.cat(finals)
    return ReadoutCurve(layers=chosen, values=stacked.mean(dim=-1), per_image=stacked, final=float(final.mean()),
                        metric=_metric_name(metric), n_images=len(final))


# ============================================================================ figures


def plot_averaging_curves(curves: AveragingCurves, *, title: str | None = None):
    """Figure 2: the metric after averaging each layer, one line per variant; ranges as flat segments.

    Example:
        >>> plot_averaging_curves(curves).show()  # doctest: +SKIP
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, variant in enumerate(curves.variants):
        layers, values = curves.curve(variant)
        if layers:
            fig.add_trace(go.Scatter(x=layers, y=values.cpu().numpy(), mode="lines+markers", name=variant))
        for j, condition in enumerate(curves.conditions):
            if len(condition) > 1:
                value = float(curves.values[i, j])
                fig.add_trace(go.Scatter(x=[min(condition), max(condition)], y=[value, value], mode="lines",
                                         line=dict(dash="dash"), name=f"{variant}, layers {curves.labels[j]} together"))
    fig.add_hline(y=curves.baseline, line=dict(color="grey", dash="dot"), annotation_text="unmodified")
    fig.update_layout(title=title or f"{curves.metric} after averaging layers ({curves.n_images} images)",
                      xaxis_title="layer averaged", yaxis_title=curves.metric, width=640, height=380)
    return fig


def plot_readout_curve(curve: ReadoutCurve, *, title: str | None = None):
    """Figure 3: the metric of the output read out at each layer."""
    from vit_lens.utils import plotting as plot

    fig = plot.layer_curves({curve.metric: curve.values}, x=curve.layers, yaxis_title=curve.metric,
                            title=title or f"{curve.metric} of the output read out at layer l")
    fig.add_hline(y=curve.final, line=dict(color="grey", dash="dot"), annotation_text="final output")
    return fig


# ============================================================================ internals


def _tower(model: Any) -> Any:
    return image_tower(model)


def _check_layer(value: Any, n_layers: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -n_layers <= value < n_layers:
        raise ValueError(f"layer must be an int in [-{n_layers}, {n_layers - 1}], got {value!r}")
    return value % n_layers


def _listed(value: Any, what: str) -> list:
    if isinstance(value, (list, tuple, range)):
        return list(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    raise TypeError(f"{what} must be a list of layer indices, got {value!r}")


def _check_variants(variants: Any) -> list[str]:
    variants = [variants] if isinstance(variants, str) else list(variants)
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"variants must be a non-empty list of {VARIANTS}, got {variants!r}")
    return variants


def _check_attention_input_of(value: Any) -> str:
    if value not in ATTENTION_INPUT_OF:
        raise ValueError(f"attention_input_of must be one of {ATTENTION_INPUT_OF}, got {value!r}")
    return value


def _conditions(layers: Any, ranges: Any, n_layers: int) -> list[tuple[int, ...]]:
    singles = list(range(n_layers)) if layers is None else _listed(layers, "layers")
    conditions = list(dict.fromkeys((_check_layer(l, n_layers),) for l in singles))
    if isinstance(ranges, (str, range)):
        ranges = [ranges]
    for spec in ranges:
        if isinstance(spec, str):
            first, sep, last = spec.partition("-")
            if not (sep and first.strip().isdigit() and last.strip().isdigit()):
                raise ValueError(f"a range given as text must look like '11-20' (first-last, inclusive), got {spec!r}")
            members = range(int(first), int(last) + 1)
        elif isinstance(spec, (range, list, tuple)):
            members = spec
        else:
            raise TypeError(f"ranges takes range objects, 'first-last' strings or lists of layers, got {spec!r}")
        condition = tuple(sorted({_check_layer(l, n_layers) for l in members}))
        if not condition:
            raise ValueError(f"the range {spec!r} holds no layer")
        if condition not in conditions:
            conditions.append(condition)
    if not conditions:
        raise ValueError("layer_averaging has nothing to do: give layers= and/or ranges=")
    return conditions


def _label(condition: tuple[int, ...]) -> str:
    if len(condition) == 1:
        return str(condition[0])
    if list(condition) == list(range(condition[0], condition[-1] + 1)):
        return f"{condition[0]}-{condition[-1]}"
    return ",".join(str(l) for l in condition)


def _statistics_names(variants: list[str], layers: Iterable[int], attention_input_of: str) -> list[str]:
    names: list[str] = []
    for layer in layers:
        if "output" in variants:
            names.append(f"blocks.{layer}.hook_resid_post")
        if "residual" in variants or ("attention_input" in variants and attention_input_of == "residual"):
            names.append(f"blocks.{layer}.hook_resid_pre")
        if "attention_input" in variants and attention_input_of == "normalized":
            names.append(f"blocks.{layer}.ln1.hook_normalized")
    return list(dict.fromkeys(names))


def _averaging_hooks(tower: Any, variant: str, condition: tuple[int, ...], means: HookStatistics,
                     attention_input_of: str) -> list:
    hooks: list = []
    for layer in condition:
        if variant == "output":
            hooks += average_layer_output(tower, layer, means)
        elif variant == "attention_input":
            hooks += average_attention_input(tower, layer, means, average_of=attention_input_of)
        else:
            hooks += average_residual_connection(tower, layer, means)
    return hooks


def _check_readout(tower: Any, readout: Any) -> None:
    if readout != "output" and readout not in tower.hook_dict:
        raise ValueError(
            f"readout must be 'output' or a hook name of this model (e.g. 'blocks.{tower.cfg.n_layers - 1}."
            f"hook_resid_post', 'hook_pooled'), got {readout!r}"
        )


def _run(tower: Any, images: Tensor, fwd_hooks: list, readout: str) -> Tensor:
    if readout == "output":
        return tower.run_with_hooks(images, fwd_hooks=fwd_hooks)
    kept: list[Tensor] = []

    def keep(activation: Tensor, hook: Any) -> None:
        kept[:] = [activation]

    tower.run_with_hooks(images, fwd_hooks=list(fwd_hooks) + [(readout, keep)])
    return kept[0]


def _readouts(tower: Any, images: Tensor, layers: list[int]) -> tuple[Tensor, Tensor]:
    """``([batch, layer, *out], [batch, *out])``: the readout of each layer's output and the final output."""
    names = [f"blocks.{l}.hook_resid_post" for l in layers]
    with torch.no_grad():
        final, cache = tower.run_with_cache(images, names_filter=names)
        early = torch.stack([tower._readout(cache[name]) for name in names], dim=1)
    return early, final


def _metric_name(metric: Any) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")


def _metric_function(tower: Any, metric: Any, labels: Any, classifier: Any, readout: str) -> Callable:
    """``score(output, reference, batch_labels, batch_size) -> [batch]`` for the chosen metric."""
    if callable(metric) and not isinstance(metric, str):
        def custom(output: Tensor, reference: Tensor, batch_labels: Any, batch_size: int) -> Tensor:
            value = torch.as_tensor(metric(output, reference), dtype=torch.float64).detach().cpu()
            if value.ndim == 0:
                return value.expand(batch_size).clone()
            if value.shape != (batch_size,):
                raise ValueError(f"the metric returned shape {tuple(value.shape)}; it must give one number per image "
                                 f"([{batch_size}]) or one for the batch")
            return value

        return custom
    if metric == "cosine":
        def cosine(output: Tensor, reference: Tensor, batch_labels: Any, batch_size: int) -> Tensor:
            return F.cosine_similarity(output.flatten(1).double(), reference.flatten(1).double(), dim=-1).cpu()

        return cosine
    if metric != "accuracy":
        raise ValueError(f"metric must be one of {METRICS} or a callable metric(output, reference), got {metric!r}")
    if readout != "output":
        raise ValueError(f"metric='accuracy' scores the model's output; it cannot be used with readout={readout!r}")
    if classifier is not None:
        width = tower.cfg.d_output
        if not isinstance(classifier, Tensor) or classifier.ndim != 2 or classifier.shape[0] != width:
            got = tuple(classifier.shape) if isinstance(classifier, Tensor) else type(classifier).__name__
            raise ValueError(f"classifier must be [d_out={width}, n_classes] class embeddings (columns), got {got}")
    elif not tower.cfg.n_classes:
        raise ValueError(
            f"metric='accuracy' needs classifier= ([d_out, n_classes] class embeddings, e.g. "
            f"clip.zero_shot_classifier(classnames)) for {tower.cfg.model_name}, which has no classification head"
        )

    def accuracy(output: Tensor, reference: Tensor, batch_labels: Any, batch_size: int) -> Tensor:
        if batch_labels is None:
            raise ValueError("metric='accuracy' needs labels= ([n] class indices) or batches of (images, labels)")
        scores = F.normalize(output, dim=-1) @ classifier.to(output) if classifier is not None else output
        return (scores.argmax(dim=-1).cpu() == torch.as_tensor(batch_labels).cpu()).double()

    return accuracy


def _batches(data: Any, labels: Any, batch_size: int) -> Iterable[tuple[Tensor, Any]]:
    """``(images, labels or None)`` per batch, from a tensor of images or an iterable of batches (checked now)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if labels is not None:
        labels = torch.as_tensor(labels)
    if isinstance(data, Tensor):
        if data.ndim != 4:
            raise ValueError(f"data must be images [n, channels, height, width] or an iterable of batches, got "
                             f"a tensor of shape {tuple(data.shape)}")
        if labels is not None and len(labels) != len(data):
            raise ValueError(f"labels has {len(labels)} entries for {len(data)} images")
        return ((data[i : i + batch_size], None if labels is None else labels[i : i + batch_size])
                for i in range(0, len(data), batch_size))
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a tensor of images or an iterable of batches, got {type(data).__name__}")
    return _iterate_batches(data, labels)


def _iterate_batches(data: Iterable, labels: Tensor | None) -> Iterable[tuple[Tensor, Any]]:
    offset = 0
    for batch in data:
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            images, batch_labels = batch[0], batch[1] if len(batch) > 1 else None
        elif isinstance(batch, Tensor):
            images, batch_labels = batch, None
        else:
            raise TypeError(
                f"batches must be image tensors or (images, labels, ...) tuples, got {type(batch).__name__}"
            )
        if labels is not None:
            batch_labels = labels[offset : offset + len(images)]
        offset += len(images)
        yield images, batch_labels


def _to_model(tower: Any, images: Tensor) -> Tensor:
    reference = tower.embed.W_E
    images = images.to(reference.device)
    return images.to(reference.dtype) if images.is_floating_point() else images


