"""How good an SAE is: reconstruction and sparsity on real activations, and what the model keeps with it spliced in.

:func:`evaluate_sae` runs the model over images and reports, with SAEBench's names where they
exist:

* ``l0``: features active per token, on average;
* ``explained_variance``: ``1 - sum ||y - SAE(x)||^2 / sum ||y - mean(y)||^2`` over every token
  evaluated (``y = x`` for an SAE, the output hook's activation for a transcoder);
* ``mse``: the squared error per activation entry;
* ``dead_fraction``: features never active on the evaluation tokens; ``dense_fraction``: features
  active on more than ``dense_threshold`` of them; ``feature_frequency`` per feature;
* ``downstream``: a metric of the model's output (accuracy) measured three ways: ``"clean"``,
  ``"sae"`` (the SAE spliced in without its error term, so the model runs on the reconstruction)
  and ``"mean_ablated"`` (the hook point's activation replaced, at the SAE's tokens, by its mean
  over the evaluation images, per position), and :meth:`SAEEvaluation.recovered`,
  ``(sae - mean_ablated) / (clean - mean_ablated)``: the share of what the hook point carries for
  the metric that the SAE keeps (SAEBench's "loss recovered" with accuracy in place of the loss).

The downstream metric is chosen from the model unless you pass one: for a
:class:`~vit_lens.planted.model.PlantedModel`, each factor's accuracy of ``planted.predict``; for
a HookedCLIP evaluated on :class:`~vit_lens.toy.ToyBatch` items (the toy CLIP), each factor's
zero-shot accuracy with :func:`vit_lens.toy.factor_prompts`; for anything else, the function
``metric(model, item) -> {name: value}`` you give (``item`` is what the images iterable yields, so
labels travel with the images). :func:`evaluate_saes` evaluates one SAE per layer in one sweep,
the clean run shared.

Example:
    >>> import vit_lens
    >>> from vit_lens.sae import evaluate_sae, load_sae
    >>> from vit_lens.toy import ToyWorld
    >>> clip = vit_lens.load_toy_clip()
    >>> batches = [ToyWorld(seed=1).sample(128, seed=s) for s in range(2)]
    >>> result = evaluate_sae(clip, load_sae("saes/toy_clip_resid2"), batches)  # doctest: +SKIP
    >>> result.explained_variance, result.recovered()["colour"]  # doctest: +SKIP
"""

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vit_lens.model.clip import HookedCLIP
from vit_lens.model.hooked_vit import image_tower
from vit_lens.planted.model import PlantedModel
from vit_lens.sae.activations import (
    ActivationSource,
    _image_tensor,
    _stop_layer,
    image_batches,
)
from vit_lens.sae.model import SAE
from vit_lens.sae.splice import _add_permanent_hook, _remove, spliced
from vit_lens.toy.model import factor_accuracy
from vit_lens.toy.world import FACTORS, ToyBatch
from vit_lens.utils.progress import progress as progress_bar

Metric = Callable[[Any, Any], "dict[str, float] | float"]
"""``metric(model, item) -> {name: value}`` (or one number), averaged over items weighted by their images."""

CONDITIONS = ("clean", "sae", "mean_ablated")


@dataclass
class SAEEvaluation:
    """What :func:`evaluate_sae` measured for one SAE.

    Attributes:
        hook_name: The hook point the SAE reads (``hook_name_out`` is the one it replaces, for a transcoder).
        n_tokens: Activation rows evaluated.
        l0: Mean number of active features per row.
        explained_variance: ``1 - residual variance / total variance`` of what the SAE rebuilds.
        mse: Mean squared error per activation entry.
        dead_fraction: Share of features never active on the evaluation rows.
        dense_fraction: Share of features active on more than ``dense_threshold`` of the rows.
        feature_frequency: ``[d_sae]``, the share of rows on which each feature is active.
        downstream: ``{"clean" | "sae" | "mean_ablated": {metric name: value}}``, or None when there
            is no downstream metric.
    """

    hook_name: str
    n_tokens: int
    l0: float
    explained_variance: float
    mse: float
    dead_fraction: float
    dense_fraction: float
    feature_frequency: Tensor = field(repr=False)
    downstream: dict[str, dict[str, float]] | None = None

    def recovered(self) -> dict[str, float]:
        """Per metric, ``(sae - mean_ablated) / (clean - mean_ablated)`` (NaN where ablation changes nothing)."""
        if self.downstream is None:
            return {}
        clean, sae, ablated = (self.downstream[name] for name in CONDITIONS)
        return {name: (sae[name] - ablated[name]) / (clean[name] - ablated[name])
                if clean[name] != ablated[name] else math.nan for name in clean}

    def to_dict(self) -> dict[str, Any]:
        """One flat row of numbers: the sparsity and reconstruction figures, then ``<condition>/<metric>``."""
        row: dict[str, Any] = {"hook_name": self.hook_name, "n_tokens": self.n_tokens, "l0": self.l0,
                               "explained_variance": self.explained_variance, "mse": self.mse,
                               "dead_fraction": self.dead_fraction, "dense_fraction": self.dense_fraction}
        for condition, values in (self.downstream or {}).items():
            row.update({f"{condition}/{name}": value for name, value in values.items()})
        row.update({f"recovered/{name}": value for name, value in self.recovered().items()})
        return row


class _Reconstruction:
    """Running sums for one SAE's sparsity and reconstruction figures."""

    def __init__(self, sae: SAE):
        self.sae = sae
        self.rows = 0
        self.active = 0.0
        self.squared_error = 0.0
        width = sae.cfg.d_out
        self.target_sum = torch.zeros(width, dtype=torch.float64)
        self.target_square_sum = 0.0
        self.fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
        self.mean_sum: Tensor | None = None
        self.images = 0

    @torch.no_grad()
    def add(self, rows: Tensor) -> None:
        sae, cfg = self.sae, self.sae.cfg
        rows = rows.to(sae.W_enc.device, sae.W_enc.dtype)
        x = rows[:, :cfg.d_in]
        target = rows[:, cfg.d_in:] if cfg.is_transcoder else x
        acts = sae.encode(x)
        out = sae.decode(acts, x=x)
        active = acts > 0
        self.rows += len(rows)
        self.active += float(active.sum())
        self.fired += active.sum(0).double().cpu()
        self.squared_error += float((out - target).double().pow(2).sum())
        target = target.double()
        self.target_sum += target.sum(0).cpu()
        self.target_square_sum += float(target.pow(2).sum())

    def add_output_activation(self, activation: Tensor) -> None:
        """Sum of the output hook's activation over images, for the per-position mean of mean ablation."""
        total = activation.double().sum(0)
        self.mean_sum = total if self.mean_sum is None else self.mean_sum + total
        self.images += len(activation)

    def result(self, dense_threshold: float) -> SAEEvaluation:
        cfg = self.sae.cfg
        total_variance = self.target_square_sum - float(self.target_sum.pow(2).sum()) / self.rows
        frequency = (self.fired / self.rows).float()
        return SAEEvaluation(
            hook_name=cfg.hook_name,
            n_tokens=self.rows,
            l0=self.active / self.rows,
            explained_variance=1 - self.squared_error / total_variance if total_variance > 0 else math.nan,
            mse=self.squared_error / (self.rows * cfg.d_out),
            dead_fraction=float((frequency == 0).float().mean()),
            dense_fraction=float((frequency > dense_threshold).float().mean()),
            feature_frequency=frequency,
        )


def _labels(item: Any, what: str) -> dict[str, Tensor]:
    if not isinstance(item, ToyBatch):
        raise TypeError(f"{what} needs the toy world's labels: the images must be ToyBatch objects "
                        f"(ToyWorld(...).sample(n)), got a {type(item).__name__}")
    return item.factors


def _planted_accuracy(planted: PlantedModel, device: torch.device) -> Metric:
    """Each factor's accuracy of ``planted.predict`` on ToyBatch items."""
    def metric(model: Any, item: Any) -> dict[str, float]:
        labels = _labels(item, "A planted model's factor accuracy")
        predicted = planted.predict(item.images.to(device))
        return {name: float((predicted[name].cpu() == labels[name]).float().mean()) for name in FACTORS}
    return metric


def _toy_zero_shot(device: torch.device) -> Metric:
    """Each factor's zero-shot accuracy of a toy-world CLIP on ToyBatch items."""
    def metric(model: Any, item: Any) -> dict[str, float]:
        _labels(item, "The toy CLIP's zero-shot accuracy")
        return factor_accuracy(model, dataclasses.replace(item, images=item.images.to(device)))
    return metric


def _default_metric(model: Any, first_item: Any, device: torch.device) -> Metric | None:
    if isinstance(model, PlantedModel):
        return _planted_accuracy(model, device)
    if isinstance(model, HookedCLIP) and isinstance(first_item, ToyBatch):
        return _toy_zero_shot(device)
    return None


def _weighted_mean(model: Any, items: Iterable[Any], metric: Metric, show: bool, desc: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    weight = 0
    for position, item in enumerate(progress_bar(items, desc=desc, unit="batch", enabled=show)):
        n = len(_image_tensor(item, position))
        with torch.no_grad():
            values = metric(model, item)
        if not isinstance(values, Mapping):
            values = {"metric": values}
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + float(value) * n
        weight += n
    return {name: value / weight for name, value in totals.items()}


def _mean_ablation_hook(sae: SAE, mean: Tensor, tokens: slice | None) -> Callable[[Tensor, Any], Tensor]:
    def replace(activation: Tensor, hook: Any) -> Tensor:
        replaced = activation.clone()
        value = mean.to(activation.dtype).to(activation.device)
        if tokens is None:
            replaced[:] = value
        else:
            replaced[:, tokens] = value[tokens]
        return replaced
    return replace


def evaluate_saes(
    model: Any,
    saes: Sequence[SAE],
    images: Any,
    *,
    metric: Metric | None = None,
    dense_threshold: float = 0.1,
    image_batch_size: int = 64,
    progress: bool = False,
) -> dict[str, SAEEvaluation]:
    """Evaluate several SAEs (one per layer, say) on the same images; the clean downstream run is shared.

    Args:
        model: A HookedViT, a HookedCLIP, or a :class:`~vit_lens.planted.model.PlantedModel`.
        saes: The SAEs (one per output hook point), each evaluated alone.
        images: Image batches as :func:`~vit_lens.sae.train_sae` takes them. With a downstream
            metric they are read several times, so a generator is refused.
        metric: ``metric(model, item) -> {name: value}``; None picks the model's own (module docstring).
        dense_threshold: A feature active on more than this share of rows counts as dense.
        image_batch_size: Images per forward pass when ``images`` is a tensor.
        progress: Show progress bars.

    Returns:
        ``{output hook name: SAEEvaluation}`` in the order of ``saes``.
    """
    planted = model if isinstance(model, PlantedModel) else None
    tower = image_tower(planted.model if planted is not None else model)
    if isinstance(saes, SAE):
        saes = [saes]
    saes = list(saes)
    if not saes:
        raise ValueError("saes is empty: pass at least one SAE to evaluate.")
    for sae in saes:
        if not isinstance(sae, SAE):
            raise TypeError(f"saes must hold vit_lens.sae.SAE objects, got a {type(sae).__name__}")
    outputs = [sae.cfg.output_hook_name for sae in saes]
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"Two SAEs replace the same hook point ({outputs}); evaluate them in separate calls.")
    if not 0 <= dense_threshold <= 1:
        raise ValueError(f"dense_threshold is a share of rows in [0, 1], got {dense_threshold!r}")
    new_pass = image_batches(images, image_batch_size)
    sources = [ActivationSource(tower, sae, images, image_batch_size=image_batch_size) for sae in saes]
    names = sorted({name for source in sources for name in source.names})
    stop = _stop_layer(names)
    sums = [_Reconstruction(sae) for sae in saes]
    modes = [sae.training for sae in saes]
    first_item = None
    try:
        for sae in saes:
            sae.eval()
        for position, item in enumerate(progress_bar(new_pass(), desc="SAE reconstruction", unit="batch",
                                                      enabled=progress)):
            first_item = item if first_item is None else first_item
            batch = sources[0].prepare_images(_image_tensor(item, position))
            with torch.no_grad():
                _, cache = tower.run_with_cache(batch, names_filter=names, stop_at_layer=stop)
            for source, running in zip(sources, sums):
                running.add(source.rows_from_cache(cache, batch))
                running.add_output_activation(cache[source.sae.cfg.output_hook_name])
        if first_item is None:
            raise ValueError("images yielded no image batches: there is nothing to evaluate on.")
        results = {sae.cfg.output_hook_name: running.result(dense_threshold) for sae, running in zip(saes, sums)}
        metric = metric if metric is not None else _default_metric(model, first_item, tower.embed.W_E.device)
        if metric is None:
            return results
        if not callable(metric):
            raise TypeError(f"metric must be a function (model, item) -> {{name: value}}, got {type(metric).__name__}")
        if isinstance(images, Iterator):
            raise ValueError(
                "A downstream metric reads the images three times (clean, with the SAE, mean-ablated), but a "
                "generator can be read once: pass a list or a tensor, or metric=None for the reconstruction figures."
            )
        clean = _weighted_mean(model, new_pass(), metric, progress, "clean")
        for sae, source, running in zip(saes, sources, sums):
            with spliced(tower, [sae], use_error_term=False):
                with_sae = _weighted_mean(model, new_pass(), metric, progress, f"with SAE {sae.cfg.hook_name}")
            point = tower.hook_dict[sae.cfg.output_hook_name]
            mean = (running.mean_sum / running.images).to(torch.float32)
            handle = _add_permanent_hook(point, _mean_ablation_hook(sae, mean, source.tokens), prepend=True)
            try:
                ablated = _weighted_mean(model, new_pass(), metric, progress, f"mean-ablated {sae.cfg.output_hook_name}")
            finally:
                _remove(point, handle)
            results[sae.cfg.output_hook_name].downstream = {"clean": clean, "sae": with_sae, "mean_ablated": ablated}
        return results
    finally:
        for sae, mode in zip(saes, modes):
            sae.train(mode)


def evaluate_sae(
    model: Any,
    sae: SAE,
    images: Any,
    *,
    metric: Metric | None = None,
    dense_threshold: float = 0.1,
    image_batch_size: int = 64,
    progress: bool = False,
) -> SAEEvaluation:
    """Sparsity, reconstruction and downstream figures of ``sae`` on ``model`` over ``images`` (module docstring).

    Args:
        model: A HookedViT, a HookedCLIP, or a :class:`~vit_lens.planted.model.PlantedModel`.
        sae: The SAE or transcoder (its hook points and token selection say where it reads).
        images: Image batches as :func:`~vit_lens.sae.train_sae` takes them (ToyBatch items carry
            the toy world's labels for the default downstream metrics).
        metric: ``metric(model, item) -> {name: value}`` for the downstream figures; None picks the
            model's own, or none.
        dense_threshold: A feature active on more than this share of rows counts as dense.
        image_batch_size: Images per forward pass when ``images`` is a tensor.
        progress: Show progress bars.

    Returns:
        An :class:`SAEEvaluation`.

    Example:
        >>> result = evaluate_sae(clip, sae, [ToyWorld(seed=1).sample(128)])  # doctest: +SKIP
        >>> result.l0, result.explained_variance, result.downstream["sae"]["colour"]  # doctest: +SKIP
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"evaluate_sae takes one vit_lens.sae.SAE, got a {type(sae).__name__}; "
                        "evaluate_saes takes a list.")
    result = evaluate_saes(model, [sae], images, metric=metric, dense_threshold=dense_threshold,
                           image_batch_size=image_batch_size, progress=progress)
    return next(iter(result.values()))
