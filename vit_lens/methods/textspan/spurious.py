"""Removing a spurious cue by mean-ablating the heads that carry it (Gandelsman et al. 2024, Sec. 4.3, Table 2).

On Waterbirds the background (water / land) is a spurious cue for the class (waterbird /
landbird). Gandelsman et al. (2024) reads each late head's TextSpan descriptions, picks the "geolocation" and
"image setting" heads, mean-ablates their *direct* contributions to the image embedding and
re-runs zero-shot classification: worst-group accuracy rises (ViT-L-14: 47.7 -> 72.9).

Everything here works on stored direct contributions (``[image, component, d]`` tensors,
:class:`vit_lens.intervene.decompose.Contributions` or :class:`vit_lens.intervene.store.ContributionStore`): a
mean-ablation replaces a component's term by its mean over a dataset and re-sums the terms, so no
forward pass is re-run. All ablations of one call are evaluated in a single pass over the data.

Protocol of the paper's code (``compute_use_specific_heads.py``):

* zero-shot classes ``("landbird", "waterbird")`` with the 80 OpenAI ImageNet templates
  (:func:`waterbirds_classifier`); decomposition with ``ln_mode="paper", normalize=True``;
* test split, groups ``2 * y + place`` (:class:`vit_lens.loading.datasets.Waterbirds`);
* "before" is the unmodified model; "after" mean-ablates the chosen heads **and** every attention
  term of the layers before the last four **and** every MLP term (with the embedding term), with
  means over the Waterbirds test set itself: ``extra="paper"`` here;
* baseline: 10 random heads, best of 5 trials (:func:`random_heads_baseline`).
"""

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vit_lens.methods.textspan.retrieval import ComponentSource, _is_head_tuple, _parse

WATERBIRDS_CLASSNAMES = ("landbird", "waterbird")
EXTRAS = ("mlps", "early_layers", "paper")

# The heads the paper's code ablates (compute_use_specific_heads.py), read off their TextSpan
# descriptions: "geolocation" heads and "image setting" (image-location) heads, (layer, head).
PAPER_WATERBIRDS_HEADS: dict[str, dict[str, tuple[tuple[int, int], ...]]] = {
    "ViT-B-16": {
        "geolocation": ((11, 6), (11, 0)),
        "setting": ((11, 3), (10, 11), (10, 10), (9, 8), (9, 6)),
    },
    "ViT-L-14": {
        "geolocation": ((21, 1), (22, 12), (22, 13), (21, 11), (21, 14), (23, 6)),
        "setting": ((21, 3), (21, 6), (21, 8), (21, 13), (22, 2), (22, 12), (22, 15), (23, 1), (23, 3), (23, 5)),
    },
    "ViT-H-14": {
        "geolocation": ((31, 8), (30, 15), (30, 12), (30, 6), (29, 14), (29, 8)),
        "setting": ((31, 12), (30, 11), (29, 4)),
    },
}


@dataclass
class GroupAccuracy:
    """Accuracy per group, as fractions in [0, 1].

    Attributes:
        per_group: Accuracy of each group (keyed by group name, or id when there are no names).
        counts: Number of examples per group.
        worst_group: The lowest group accuracy.
        worst_group_name: Which group that is.
        average: Accuracy over all examples (groups weighted by size; what papers call accuracy).
        group_mean: Unweighted mean of the group accuracies.
    """

    per_group: dict[Any, float]
    counts: dict[Any, int]
    worst_group: float
    worst_group_name: Any
    average: float
    group_mean: float

    def format(self) -> str:
        """A small text table, in percent."""
        rows = [f"  {str(name):<24} n={self.counts[name]:<6} {100 * acc:6.2f}" for name, acc in self.per_group.items()]
        rows.append(f"  {'worst group':<24} {'':<8} {100 * self.worst_group:6.2f}  ({self.worst_group_name})")
        rows.append(f"  {'average':<24} {'':<8} {100 * self.average:6.2f}")
        return "\n".join(rows)


@dataclass
class SpuriousCueResult:
    """Group accuracies before and after mean-ablating the heads that carry a spurious cue.

    Attributes:
        before: The unmodified model.
        after: With ``heads`` and the ``extra`` components mean-ablated.
        extra_only: With only the ``extra`` components mean-ablated (None without extras), to
            separate what the heads contribute from what the extra ablations do.
        heads: Labels of the ablated head components.
        ablated: Labels of every component mean-ablated in ``after``.
    """

    before: GroupAccuracy
    after: GroupAccuracy
    extra_only: GroupAccuracy | None
    heads: list[str]
    ablated: list[str]

    def format(self) -> str:
        """Before / after table, in percent."""
        columns = [("before", self.before)] + ([("extra only", self.extra_only)] if self.extra_only else [])
        columns.append(("after", self.after))

        def row(name: str, count: Any, numbers: list[float]) -> str:
            return f"  {name:<24} {count:>6} " + " ".join(f"{100 * number:10.2f}" for number in numbers)

        lines = [f"  {'group':<24} {'n':>6} " + " ".join(f"{name:>10}" for name, _ in columns)]
        for group, count in self.before.counts.items():
            lines.append(row(str(group), count, [acc.per_group[group] for _, acc in columns]))
        lines.append(row("worst group", "", [acc.worst_group for _, acc in columns]))
        lines.append(row("average", "", [acc.average for _, acc in columns]))
        return "\n".join(lines)


@dataclass
class RandomHeadsBaseline:
    """The random-heads control: ``trials`` draws of ``n_heads`` heads, each mean-ablated.

    Attributes:
        trials: Group accuracy of each draw.
        heads: The head labels of each draw.
        best: The draw with the highest worst-group accuracy (what the paper reports).
    """

    trials: list[GroupAccuracy]
    heads: list[list[str]]
    best: GroupAccuracy


def paper_waterbirds_heads(model: str) -> list[tuple[int, int]]:
    """The ``(layer, head)`` pairs Gandelsman et al.'s code mean-ablates on Waterbirds for ``model``.

    Args:
        model: ``"ViT-B-16"``, ``"ViT-L-14"`` or ``"ViT-H-14"`` (an ``"open_clip:"`` prefix is fine).

    Example:
        >>> paper_waterbirds_heads("open_clip:ViT-B-16")
        [(11, 6), (11, 0), (11, 3), (10, 11), (10, 10), (9, 8), (9, 6)]
    """
    name = model.split(":", 1)[-1]
    if name not in PAPER_WATERBIRDS_HEADS:
        raise KeyError(
            f"Gandelsman et al. (2024) gives Waterbirds heads for {sorted(PAPER_WATERBIRDS_HEADS)} (laion2b weights), not {model!r}; "
            "choose heads yourself, e.g. from TextSpan descriptions"
        )
    heads = PAPER_WATERBIRDS_HEADS[name]
    return list(dict.fromkeys(heads["geolocation"] + heads["setting"]))  # ViT-L-14 lists (22, 12) twice


def waterbirds_classifier(clip: Any, templates: Sequence[Any] | None = None) -> Float[Tensor, "d_embed 2"]:
    """The paper's binary zero-shot classifier: ``("landbird", "waterbird")`` x the 80 ImageNet templates.

    Args:
        clip: A :class:`vit_lens.HookedCLIP`.
        templates: Override the prompt templates (default: open_clip's 80 OpenAI ImageNet ones).

    Example:
        >>> classifier = waterbirds_classifier(clip)  # [d_embed, 2]; column 1 is "waterbird"  # doctest: +SKIP
    """
    return clip.zero_shot_classifier(list(WATERBIRDS_CLASSNAMES), templates)


def group_accuracy(predictions: Any, labels: Any, groups: Any, group_names: Any = None) -> GroupAccuracy:
    """Accuracy within each group, the worst group's, and the overall accuracy.

    Args:
        predictions: ``[N]`` predicted classes, or ``[N, n_classes]`` scores (argmax is taken).
        labels: ``[N]`` true classes.
        groups: ``[N]`` group ids (Waterbirds: ``2 * y + place``).
        group_names: Names for the group ids: a sequence indexed by id or a mapping id -> name.

    Returns:
        :class:`GroupAccuracy` (fractions in [0, 1]); groups without examples are left out.

    Example:
        >>> acc = group_accuracy(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1]))
        >>> acc.per_group, acc.worst_group, acc.average
        ({0: 1.0, 1: 0.5}, 0.5, 0.75)
    """
    predictions = _as_tensor(predictions, "predictions")
    if predictions.is_floating_point():
        if predictions.ndim != 2:
            raise ValueError(f"Float predictions must be [N, n_classes] scores, got shape {tuple(predictions.shape)}")
        predictions = predictions.argmax(dim=-1)
    labels, groups = _as_tensor(labels, "labels"), _as_tensor(groups, "groups")
    for name, value in (("predictions", predictions), ("labels", labels), ("groups", groups)):
        if value.ndim != 1 or value.is_floating_point() or len(value) != len(labels):
            raise ValueError(
                f"predictions, labels and groups must be [N] integer tensors of one length (predictions may be "
                f"[N, n_classes] scores); {name} is {value.dtype} {tuple(value.shape)}, labels has N={len(labels)}"
            )
    if len(labels) == 0:
        raise ValueError("group_accuracy needs at least one example")
    correct = (predictions.cpu() == labels.cpu()).double()
    ids, inverse = torch.unique(groups.cpu(), return_inverse=True)
    counts = torch.bincount(inverse)
    accuracy = torch.bincount(inverse, weights=correct) / counts
    names = [_group_name(int(i), group_names) for i in ids]
    worst = int(accuracy.argmin())
    return GroupAccuracy(
        per_group=dict(zip(names, accuracy.tolist())),
        counts=dict(zip(names, counts.tolist())),
        worst_group=float(accuracy[worst]),
        worst_group_name=names[worst],
        average=float(correct.mean()),
        group_mean=float(accuracy.mean()),
    )


def mean_ablate_components(
    values: Any,
    components: Any,
    means: Any = None,
    *,
    labels: Sequence[str] | None = None,
    chunk_size: int | None = None,
) -> Float[Tensor, "image d"]:
    """The representation with some components' direct contributions replaced by their means.

    The same ablation as :func:`vit_lens.intervene.decompose.direct_effect_mean_ablation`, for any source of
    contributions (a store is streamed in chunks) and any way of naming components.

    Args:
        values: ``[image, component, d]`` tensor, :class:`Contributions` or :class:`ContributionStore`.
        components: What to ablate: labels, ``(layer, head)`` tuples or a bool mask
            (see :func:`vit_lens.methods.textspan.retrieval.select_components`).
        means: ``[component, d]`` means, or contributions (tensor / Contributions / store) to take
            them from, e.g. an ImageNet-val store. Default: the means over ``values`` themselves.
        labels: Component labels of a plain tensor.
        chunk_size: Images per chunk (default: about 256 MB of contributions).

    Returns:
        ``[image, d]`` re-summed representations.

    Example:
        >>> values = torch.tensor([[[1.0], [2.0]], [[3.0], [6.0]]])  # 2 images, 2 components
        >>> mean_ablate_components(values, "L0H0", labels=["embed", "L0H0"]).flatten().tolist()
        [5.0, 7.0]
    """
    source = ComponentSource(values, labels)
    mask = source.mask(components)
    mean = _means(source, means)
    added = mean[mask].sum(dim=0)  # [d]
    keep = (~mask).to(source.device)
    return torch.cat([chunk[:, keep].sum(dim=1) + added.to(chunk) for chunk in source.chunks(chunk_size)])


def mean_ablation_predictions(
    contributions: Any,
    classifier: Any,
    ablations: Mapping[str, Any],
    *,
    means: Any = None,
    component_labels: Sequence[str] | None = None,
    chunk_size: int | None = None,
) -> dict[str, Int[Tensor, " image"]]:
    """Class predictions under several mean-ablations, in one pass over the contributions.

    Args:
        contributions: ``[image, component, d]`` tensor, :class:`Contributions` or
            :class:`ContributionStore`, decomposed without ``directions``.
        classifier: ``[d, n_classes]`` (``HookedCLIP.zero_shot_classifier``); scores are
            ``representation @ classifier``, on the classifier's device.
        ablations: Name -> components to mean-ablate (labels, ``(layer, head)`` tuples, a bool
            mask), or None / ``[]`` for the unablated model.
        means: As :func:`mean_ablate_components`.
        component_labels: Component labels of a plain tensor.
        chunk_size: Images per chunk (default: about 256 MB of contributions).

    Returns:
        Name -> ``[image]`` predicted class indices (on the classifier's device).

    Example:
        >>> values = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 0.0]]])
        >>> predictions = mean_ablation_predictions(
        ...     values, torch.eye(2), {"base": None, "no L0H0": "L0H0"}, component_labels=["embed", "L0H0"])
        >>> predictions["base"].tolist(), predictions["no L0H0"].tolist()
        ([1, 0], [0, 0])
    """
    source = ComponentSource(contributions, component_labels)
    return _run_ablations(source, classifier, ablations, means, chunk_size)


def spurious_cue_removal(
    contributions: Any,
    classifier: Any,
    labels: Any,
    groups: Any,
    heads_to_ablate: Any,
    *,
    extra: str | Sequence[str] = (),
    n_late_layers: int = 4,
    means: Any = None,
    component_labels: Sequence[str] | None = None,
    group_names: Any = None,
    chunk_size: int | None = None,
) -> SpuriousCueResult:
    """Group and worst-group accuracy before and after mean-ablating the heads that carry a cue.

    Args:
        contributions: Per-image direct contributions (``[image, component, d]`` tensor,
            :class:`Contributions` or :class:`ContributionStore`; ``level="head"``).
        classifier: ``[d, n_classes]`` zero-shot classifier (:func:`waterbirds_classifier`).
        labels: ``[image]`` true classes.
        groups: ``[image]`` group ids (Waterbirds: ``2 * y + place``).
        heads_to_ablate: The heads (labels, ``(layer, head)`` tuples or a bool mask), e.g.
            :func:`paper_waterbirds_heads`.
        extra: Further components to mean-ablate in "after": ``"mlps"`` (every MLP term and the
            embedding term), ``"early_layers"`` (every attention term of the layers before the
            last ``n_late_layers``), or ``"paper"`` for both, as the paper's code does.
        n_late_layers: How many final layers ``"early_layers"`` keeps.
        means: As :func:`mean_ablate_components` (default: means over ``contributions``).
        component_labels: Component labels of a plain tensor.
        group_names: Names for the group ids (:data:`vit_lens.loading.datasets.WATERBIRDS_GROUP_NAMES`).
        chunk_size: Images per chunk (default: about 256 MB of contributions).

    Returns:
        :class:`SpuriousCueResult` (``.format()`` prints the table).

    Example:
        >>> store = ContributionStore("runs/waterbirds_test_ViT-L-14")  # doctest: +SKIP
        >>> result = spurious_cue_removal(store, waterbirds_classifier(clip), data.labels, data.groups,
        ...                               paper_waterbirds_heads("ViT-L-14"), extra="paper")  # doctest: +SKIP
        >>> result.before.worst_group, result.after.worst_group  # paper: 0.477 -> 0.729  # doctest: +SKIP
    """
    source = ComponentSource(contributions, component_labels)
    head_mask = source.mask(heads_to_ablate)
    extra_mask = _extra_mask(source, extra, n_late_layers)
    ablations = {"before": torch.zeros_like(head_mask), "after": head_mask | extra_mask}
    if extra_mask.any():
        ablations["extra_only"] = extra_mask
    predictions = _run_ablations(source, classifier, ablations, means, chunk_size)
    accuracy = {name: group_accuracy(p, labels, groups, group_names) for name, p in predictions.items()}
    return SpuriousCueResult(
        before=accuracy["before"], after=accuracy["after"], extra_only=accuracy.get("extra_only"),
        heads=source.selected_labels(head_mask), ablated=source.selected_labels(ablations["after"]),
    )


def random_heads_baseline(
    contributions: Any,
    classifier: Any,
    labels: Any,
    groups: Any,
    *,
    n_heads: int = 10,
    trials: int = 5,
    candidates: Any = None,
    extra: str | Sequence[str] = (),
    n_late_layers: int = 4,
    seed: int = 0,
    means: Any = None,
    component_labels: Sequence[str] | None = None,
    group_names: Any = None,
    chunk_size: int | None = None,
) -> RandomHeadsBaseline:
    """The paper's control: mean-ablate ``n_heads`` random heads, ``trials`` times; keep the best.

    Args:
        contributions, classifier, labels, groups: As :func:`spurious_cue_removal`.
        n_heads: Heads per draw (paper: 10).
        trials: Draws (paper: 5; it reports the best worst-group accuracy).
        candidates: Heads to draw from (labels or ``(layer, head)`` tuples). Default: every head
            of the last ``n_late_layers`` layers (the paper does not say which heads it drew from).
        extra: Extra ablations applied in every draw, as in :func:`spurious_cue_removal`.
        seed: Seed of Python's ``random.Random`` for the draws.
        means, component_labels, group_names, chunk_size: As :func:`spurious_cue_removal`.

    Example:
        >>> control = random_heads_baseline(store, classifier, labels, groups, extra="paper")  # doctest: +SKIP
        >>> control.best.worst_group  # paper, ViT-L-14: 0.577  # doctest: +SKIP
    """
    source = ComponentSource(contributions, component_labels)
    n_layers = source.n_layers()
    if candidates is None:
        pool = sorted({
            (p[0], p[1]) for p in map(_parse, source.labels)
            if p is not None and p[1] is not None and p[0] >= n_layers - n_late_layers
        })
        if not pool:
            raise ValueError("These contributions have no per-head terms; decompose with level='head'")
        candidates = pool
    elif isinstance(candidates, str) or _is_head_tuple(candidates):
        candidates = [candidates]
    candidates = list(candidates)
    if not 1 <= n_heads <= len(candidates) or trials < 1:
        raise ValueError(
            f"Need 1 <= n_heads <= {len(candidates)} (the candidate heads) and trials >= 1; got {n_heads}, {trials}"
        )
    rng = random.Random(seed)
    draws = [rng.sample(candidates, n_heads) for _ in range(trials)]
    extra_mask = _extra_mask(source, extra, n_late_layers)
    ablations = {str(i): source.mask(draw) | extra_mask for i, draw in enumerate(draws)}
    predictions = _run_ablations(source, classifier, ablations, means, chunk_size)
    results = [group_accuracy(predictions[str(i)], labels, groups, group_names) for i in range(trials)]
    heads = [source.selected_labels(source.mask(draw)) for draw in draws]
    return RandomHeadsBaseline(results, heads, max(results, key=lambda acc: acc.worst_group))


def extra_ablation_mask(component_labels: Sequence[str], extra: str | Sequence[str], n_late_layers: int = 4) -> Tensor:
    """``[component]`` bool mask of the paper's extra ablations (see :func:`spurious_cue_removal`).

    Example:
        >>> labels = ["embed", "L0H0", "L0MLP", "L1H0", "L1MLP"]
        >>> extra_ablation_mask(labels, "paper", n_late_layers=1).tolist()
        [True, True, True, False, True]
    """
    source = ComponentSource(torch.zeros(1, len(component_labels), 1), component_labels)
    return _extra_mask(source, extra, n_late_layers)


# ---------------------------------------------------------------------------------------------- internals


def _as_tensor(value: Any, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a tensor or a sequence of numbers, got {type(value).__name__}") from error


def _group_name(group: int, names: Any) -> Any:
    if names is None:
        return group
    if isinstance(names, Mapping):
        return names.get(group, group)
    return names[group] if 0 <= group < len(names) else group


def _means(source: ComponentSource, means: Any) -> Tensor:
    if means is None:
        return source.mean()
    if isinstance(means, Tensor) and means.ndim == 2:
        if means.shape != (source.n_components, source.d):
            raise ValueError(f"means must be [{source.n_components}, {source.d}], got {tuple(means.shape)}")
        return means
    other = ComponentSource(means)
    if other.labels is not None and source.labels is not None and other.labels != source.labels:
        raise ValueError("means= comes from contributions with other components; decompose both the same way")
    if (other.n_components, other.d) != (source.n_components, source.d):
        raise ValueError(
            f"means= contributions are [{other.n_components}, {other.d}] per image, these are "
            f"[{source.n_components}, {source.d}]"
        )
    return other.mean()


def _ablation_mask(source: ComponentSource, components: Any) -> Tensor:
    listed = isinstance(components, Sequence) and not isinstance(components, str)
    if components is None or (listed and len(components) == 0):
        return torch.zeros(source.n_components, dtype=torch.bool)
    if listed and all(isinstance(c, bool) for c in components):
        components = torch.tensor(components)
    if isinstance(components, Tensor) and components.dtype == torch.bool and not components.any():
        if components.shape != (source.n_components,):
            raise ValueError(f"A component mask must be [{source.n_components}] bool, got {tuple(components.shape)}")
        return components.cpu()
    return source.mask(components)


def _extra_mask(source: ComponentSource, extra: str | Sequence[str], n_late_layers: int) -> Tensor:
    extras = [extra] if isinstance(extra, str) else list(extra)
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        raise ValueError(f"Unknown extra ablation(s) {unknown}; choose from {EXTRAS}")
    mask = torch.zeros(source.n_components, dtype=torch.bool)
    if not extras:
        return mask
    if source.labels is None:
        raise ValueError("Extra ablations find MLP and attention terms by label: pass component_labels=[...]")
    n_layers = source.n_layers()
    mlps = "mlps" in extras or "paper" in extras
    early = "early_layers" in extras or "paper" in extras
    if early and (not isinstance(n_late_layers, int) or not 0 <= n_late_layers <= n_layers):
        raise ValueError(f"n_late_layers must be an int in 0..{n_layers} (layers in the labels), got {n_late_layers!r}")
    for i, label in enumerate(source.labels):
        parsed = _parse(label)
        if parsed is None:
            mask[i] = mlps and label == "embed"  # the ln_pre term is among the paper's "mlps"
            continue
        layer, _, _, kind = parsed
        if kind in ("mlp", "neuron"):
            mask[i] = mlps
        else:
            mask[i] = early and layer < n_layers - n_late_layers
    return mask


def _check_classifier(classifier: Any, source: ComponentSource) -> Tensor:
    if not isinstance(classifier, Tensor) or classifier.ndim != 2 or not classifier.is_floating_point():
        raise TypeError(f"classifier must be a float [d, n_classes] tensor, got {type(classifier).__name__}")
    if classifier.shape[0] != source.d:
        raise ValueError(
            f"classifier is [{classifier.shape[0]}, {classifier.shape[1]}] but the contributions have d={source.d}; "
            "it must be [d_embed, n_classes] (HookedCLIP.zero_shot_classifier) and the contributions "
            "decomposed without directions="
        )
    return classifier


def _run_ablations(
    source: ComponentSource, classifier: Any, ablations: Mapping[str, Any], means: Any, chunk_size: int | None
) -> dict[str, Tensor]:
    classifier = _check_classifier(classifier, source)
    if not isinstance(ablations, Mapping) or not ablations:
        raise ValueError("ablations must be a non-empty mapping, e.g. {'base': None, 'no heads': ['L10H3']}")
    names = list(ablations)
    masks = torch.stack([_ablation_mask(source, ablations[name]) for name in names])  # [ablation, component]
    predictions = _predict(source, classifier, masks, _means(source, means), chunk_size)
    return dict(zip(names, predictions))


def _predict(source: ComponentSource, classifier: Tensor, masks: Tensor, means: Tensor, chunk_size: int | None) -> Tensor:
    """``[ablation, image]`` argmax predictions; kept terms are summed directly (no cancellation)."""
    device, dtype = classifier.device, classifier.dtype
    keep = (~masks).to(device, dtype)  # [ablation, component]
    added = masks.to(device, dtype) @ means.to(device, dtype)  # [ablation, d]
    out = []
    for chunk in source.chunks(chunk_size):
        kept = torch.einsum("ncd,ac->nad", chunk.to(device, dtype), keep)
        out.append(((kept + added) @ classifier).argmax(dim=-1))  # [chunk, ablation]
    return torch.cat(out).T
