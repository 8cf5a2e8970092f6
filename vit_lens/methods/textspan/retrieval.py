"""Property-based image retrieval with the direct contributions of chosen heads (Gandelsman et al. 2024, Sec. 4.3).

Some heads write one image property into the representation (colour, counting, location, ...).
Comparing images by such a head's direct contribution alone, instead of by the whole embedding,
retrieves images that share that property. Two rankings:

* :func:`nearest_by_components`: the images whose contribution from the selected components
  (summed) is closest to a query image's (cosine similarity by default; the paper's notebook uses
  the dot product of the ``normalize=True`` terms, ``metric="dot"``).
* :func:`nearest_by_text`: the images whose contribution has the largest (and smallest)
  projection onto a text direction, e.g. one of the head's TextSpan descriptions.

The database is a ``[image, component, d]`` tensor (with its labels), a
:class:`vit_lens.intervene.decompose.Contributions`, or a :class:`vit_lens.intervene.store.ContributionStore` (from
which only the selected components' bytes are read, or the store is streamed once when many
components are selected). Components are chosen by label (``"L10H3"``; ``"L10ATTN"`` also selects
every head of layer 10 at head level, ``"L10H3"`` every token of that head at head_token level), by
``(layer, head)`` tuples (negative layers count from the end), or by a ``[component]`` bool mask.
"""

import difflib
import re
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from vit_lens.intervene.decompose import Contributions
from vit_lens.intervene.store import ContributionStore

METRICS = ("cosine", "dot")
TEXT_METRICS = ("projection", "cosine", "dot")
_LABEL = re.compile(r"^L(\d+)(?:H(\d+)(?:T(\d+))?|ATTN|MLP|N(\d+))$")
# Above this many selected components, a store is streamed once instead of read column by column.
_COLUMN_READS = 8
_CHUNK_BYTES = 256 * 2**20


class Retrieval(NamedTuple):
    """Ranked images: ``indices`` into the database and their ``scores``, best first.

    ``[k]`` for a single query, ``[query, k]`` for several.
    """

    indices: Int[Tensor, "*query k"]
    scores: Float[Tensor, "*query k"]


class TextRanking(NamedTuple):
    """Images ranked by their projection onto a text direction.

    Attributes:
        top: The ``k`` images with the largest scores (``[k]``, or ``[text, k]`` for several texts).
        bottom: The ``k`` images with the smallest scores, smallest first.
        scores: Every image's score, ``[image]`` or ``[text, image]``.
    """

    top: Retrieval
    bottom: Retrieval
    scores: Float[Tensor, "*text image"]


def select_components(labels: Sequence[str], components: Any) -> Tensor:
    """A ``[component]`` bool mask from labels, ``(layer, head)`` tuples or a mask.

    Args:
        labels: The component labels (``Contributions.labels`` / ``ContributionStore.labels``).
        components: One of: a label (``"L10H3"``, ``"L4MLP"``, ``"embed"``); ``"L{l}ATTN"`` selects
            every head (and token) term of layer ``l`` when the attention layer is expanded,
            ``"L{l}H{h}"`` every token term of that head at head_token level, ``"L{l}MLP"`` every
            neuron at neuron level; a ``(layer, head)`` tuple (negative layers count from the
            end); a list mixing these; or a ``[component]`` bool mask (tensor or list of bools).

    Returns:
        ``[len(labels)]`` bool tensor.

    Raises:
        KeyError: For a label or head that is not among ``labels``, with the closest matches.

    Example:
        >>> labels = ["embed", "L0H0", "L0H1", "L0MLP", "L1H0", "L1H1", "L1MLP"]
        >>> select_components(labels, ["L1H1", (0, 0)]).nonzero().flatten().tolist()
        [1, 5]
        >>> select_components(labels, "L1ATTN").nonzero().flatten().tolist()
        [4, 5]
    """
    labels = list(labels)
    if isinstance(components, Tensor):
        if components.dtype != torch.bool:
            raise TypeError(
                f"A tensor of components must be a [{len(labels)}] bool mask, got dtype {components.dtype}; "
                "select by labels ('L10H3') or (layer, head) tuples otherwise"
            )
        return _check_mask(components.cpu(), len(labels))
    if isinstance(components, str) or _is_head_tuple(components):
        components = [components]
    if not isinstance(components, Sequence) or len(components) == 0:
        raise TypeError(
            f"components must be a label ('L10H3'), a (layer, head) tuple, a list of those, or a bool mask; "
            f"got {components!r}"
        )
    if all(isinstance(c, bool) for c in components):
        return _check_mask(torch.tensor(components), len(labels))
    groups = _label_groups(labels)
    n_layers = _n_layers(labels)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for item in components:
        key = _component_key(item, n_layers)
        if key not in groups:
            raise KeyError(_unknown_component(item, key, labels, groups))
        mask[groups[key]] = True
    return mask


def nearest_by_components(
    query: Any,
    database: Any,
    components: Any,
    k: Any = 10,
    *,
    labels: Sequence[str] | None = None,
    metric: str = "cosine",
    exclude_query: bool = True,
) -> Retrieval:
    """The images nearest to a query by the direct contribution of a few components (heads).

    Each image is represented by the sum of the selected components' contributions; images are
    ranked by cosine similarity (or dot product) with the query's.

    Args:
        query: An image index into ``database`` (or a list / 1-D tensor of indices), or the query
            images' own contributions with the database's component layout: ``[component, d]``,
            ``[query, component, d]`` or a :class:`Contributions`.
        database: ``[image, component, d]`` tensor, :class:`Contributions` or
            :class:`ContributionStore`.
        components: Which components to compare by (see :func:`select_components`).
        k: How many images to return per query.
        labels: Component labels of a plain tensor database (needed to select by label or head).
        metric: ``"cosine"`` or ``"dot"`` (the paper's notebook: dot product of ``normalize=True``
            contributions).
        exclude_query: For index queries, leave the query image itself out of its results.

    Returns:
        :class:`Retrieval` ``(indices, scores)``: ``[k]`` for one query (an int or a
        ``[component, d]`` tensor), ``[query, k]`` otherwise; best first.

    Example:
        >>> values = torch.randn(100, 3, 8)  # [image, component, d]
        >>> values[42, 1] = 3 * values[7, 1]  # image 42's "L0H1" points where image 7's does
        >>> nearest_by_components(7, values, "L0H1", k=1, labels=["embed", "L0H1", "L0MLP"]).indices
        tensor([42])
    """
    source = ComponentSource(database, labels)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    mask = source.mask(components)
    keys = source.selected_sum(mask)  # [image, d]
    queries, query_index, single = _queries(query, source, mask, keys)
    n_candidates = source.n_images - (1 if exclude_query and query_index is not None else 0)
    _check_k(k, n_candidates, "database images" + (" besides the query" if n_candidates < source.n_images else ""))
    if metric == "cosine":
        queries, keys = F.normalize(queries, dim=-1), F.normalize(keys, dim=-1)
    scores = queries.to(keys) @ keys.T  # [query, image]
    if exclude_query and query_index is not None:
        scores[torch.arange(len(query_index), device=scores.device), query_index.to(scores.device)] = -torch.inf
    best = scores.topk(k, dim=-1)
    result = Retrieval(best.indices, best.values)
    return Retrieval(result.indices[0], result.scores[0]) if single else result


def nearest_by_text(
    database: Any,
    components: Any,
    text_direction: Any,
    k: Any = 10,
    *,
    labels: Sequence[str] | None = None,
    metric: str = "projection",
) -> TextRanking:
    """Images ranked by how far the selected components' contribution points along a text direction.

    Args:
        database: ``[image, component, d]`` tensor, :class:`Contributions` or
            :class:`ContributionStore`, decomposed without ``directions`` (so ``d`` is the
            embedding width the text lives in).
        components: Which components (usually one head; see :func:`select_components`).
        text_direction: ``[d]`` or ``[text, d]``: text embeddings (``clip.encode_text(...)``) or any
            directions in the embedding space.
        k: How many images at each end of the ranking.
        labels: Component labels of a plain tensor database.
        metric: ``"projection"`` (dot product with the unit text direction: the length of the
            contribution along it), ``"cosine"`` or ``"dot"`` (with the direction as given).

    Returns:
        :class:`TextRanking` with ``top`` (largest first), ``bottom`` (smallest first) and every
        image's ``scores``.

    Example:
        >>> values = torch.randn(50, 2, 4)
        >>> text = torch.tensor([0.0, 0.0, 3.0, 4.0])
        >>> values[11, 1] = 10 * text  # image 11's head points along the text
        >>> ranking = nearest_by_text(values, "L0H0", text, k=1, labels=["embed", "L0H0"])
        >>> ranking.top.indices.tolist(), round(ranking.top.scores.item(), 3)
        ([11], 50.0)
    """
    source = ComponentSource(database, labels)
    if metric not in TEXT_METRICS:
        raise ValueError(f"metric must be one of {TEXT_METRICS}, got {metric!r}")
    if not isinstance(text_direction, Tensor) or text_direction.ndim not in (1, 2):
        raise TypeError(f"text_direction must be a [d] or [text, d] tensor, got {_describe(text_direction)}")
    if text_direction.shape[-1] != source.d:
        raise ValueError(
            f"text_direction has width {text_direction.shape[-1]} but the contributions have d={source.d}; "
            "decompose without directions= (d = the embedding width) and pass text embeddings of the same model"
        )
    _check_k(k, source.n_images, "database images")
    single = text_direction.ndim == 1
    texts = text_direction.reshape(-1, source.d)
    values = source.selected_sum(source.mask(components))  # [image, d]
    texts = texts.to(values)
    if metric in ("projection", "cosine"):
        texts = F.normalize(texts, dim=-1)
    if metric == "cosine":
        values = F.normalize(values, dim=-1)
    scores = texts @ values.T  # [text, image]
    top, bottom = scores.topk(k, dim=-1), scores.topk(k, dim=-1, largest=False)
    if single:
        return TextRanking(
            Retrieval(top.indices[0], top.values[0]), Retrieval(bottom.indices[0], bottom.values[0]), scores[0]
        )
    return TextRanking(Retrieval(top.indices, top.values), Retrieval(bottom.indices, bottom.values), scores)


class ComponentSource:
    """Uniform read access to per-image contributions held in memory or on disk.

    Wraps a ``[image, component, d]`` tensor (with optional labels), a :class:`Contributions` or a
    :class:`ContributionStore`; used by :mod:`vit_lens.methods.textspan.retrieval` and :mod:`vit_lens.methods.textspan.spurious`.

    Example:
        >>> source = ComponentSource(torch.ones(4, 3, 2), labels=["embed", "L0H0", "L0MLP"])
        >>> source.selected_sum(source.mask(["embed", "L0H0"])).tolist()[0]
        [2.0, 2.0]
    """

    def __init__(self, data: Any, labels: Sequence[str] | None = None):
        self.store: ContributionStore | None = None
        self.values: Tensor | None = None
        if isinstance(data, ContributionStore):
            if len(data) == 0:
                raise ValueError(f"The contribution store in {data.directory} holds no images yet")
            self.store, own_labels = data, list(data.labels)
            self.n_images, self.n_components, self.d = data.shape
        elif isinstance(data, Contributions):
            self.values, own_labels = data.values, list(data.labels)
        elif isinstance(data, Tensor):
            if data.ndim != 3:
                raise ValueError(
                    f"Contributions must be [image, component, d], got shape {tuple(data.shape)}; "
                    "a Contributions object's .values has that layout"
                )
            self.values, own_labels = data, None
        else:
            raise TypeError(
                f"Expected an [image, component, d] tensor, a vit_lens.intervene.decompose.Contributions or a "
                f"vit_lens.intervene.store.ContributionStore, got {type(data).__name__}"
            )
        if self.values is not None:
            self.n_images, self.n_components, self.d = self.values.shape
        if labels is not None:
            labels = list(labels)
            if own_labels is not None and labels != own_labels:
                raise ValueError("labels= differs from the labels the contributions carry; leave labels= out")
            if len(labels) != self.n_components:
                raise ValueError(f"{len(labels)} labels for {self.n_components} components")
        self.labels: list[str] | None = own_labels if own_labels is not None else labels

    @property
    def device(self) -> torch.device:
        """Where the values live (CPU for a store)."""
        return self.values.device if self.values is not None else torch.device("cpu")

    def mask(self, components: Any) -> Tensor:
        """``[component]`` bool mask for ``components`` (see :func:`select_components`)."""
        if self.labels is None:
            if isinstance(components, Tensor) and components.dtype == torch.bool:
                return _check_mask(components.cpu(), self.n_components)
            if isinstance(components, Sequence) and components and all(isinstance(c, bool) for c in components):
                return _check_mask(torch.tensor(components), self.n_components)
            raise ValueError(
                "These contributions are a plain tensor without labels: pass labels=[...] (e.g. "
                "Contributions.labels) to select components by label or (layer, head), or select with a bool mask"
            )
        return select_components(self.labels, components)

    def selected_labels(self, mask: Tensor) -> list[str]:
        """The labels where ``mask`` is True (``#i`` for an unlabelled tensor)."""
        names = self.labels or [f"#{i}" for i in range(self.n_components)]
        return [names[i] for i in mask.nonzero().flatten().tolist()]

    def selected_sum(self, mask: Tensor) -> Float[Tensor, "image d"]:
        """Sum of the selected components for every image, ``[image, d]``."""
        index = mask.nonzero().flatten()
        if self.values is not None:
            return self.values.index_select(1, index.to(self.values.device)).sum(dim=1)
        if len(index) <= _COLUMN_READS:
            total = torch.zeros(self.n_images, self.d)
            for i in index.tolist():
                total += self.store.component(self.labels[i])
            return total
        return torch.cat([chunk.index_select(1, index).sum(dim=1) for chunk in self.chunks()])

    def chunks(self, chunk_size: Any = None) -> Iterator[Float[Tensor, "chunk component d"]]:
        """Consecutive ``[chunk, component, d]`` blocks of images, in order.

        ``chunk_size`` images per block; by default as many as fit in about 256 MB of float32.
        """
        if chunk_size is None:
            chunk_size = max(1, _CHUNK_BYTES // (4 * self.n_components * self.d))
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        for start in range(0, self.n_images, chunk_size):
            stop = min(start + chunk_size, self.n_images)
            yield self.values[start:stop] if self.values is not None else self.store[start:stop]

    def mean(self) -> Float[Tensor, "component d"]:
        """Mean of every component over the images (float64 accumulation, float32 result)."""
        if self.store is not None:
            return self.store.mean()
        return (self.values.sum(dim=0, dtype=torch.float64) / self.n_images).to(self.values.dtype)

    def n_layers(self) -> int:
        """Number of layers named in the labels."""
        if self.labels is None:
            raise ValueError("Unlabelled contributions: pass labels=[...] to refer to layers")
        return _n_layers(self.labels)


# ---------------------------------------------------------------------------------------------- internals


def _check_mask(mask: Tensor, n: int) -> Tensor:
    if mask.dtype != torch.bool or mask.shape != (n,):
        raise ValueError(f"A component mask must be [{n}] bool, got {mask.dtype} {tuple(mask.shape)}")
    if not mask.any():
        raise ValueError("The component mask selects nothing")
    return mask


def _parse(label: str) -> tuple[int, int | None, int | None, str] | None:
    """``(layer, head, token, kind)`` with kind head / head_token / attn / mlp / neuron; None for others."""
    match = _LABEL.match(label)
    if match is None:
        return None
    layer, head, token, neuron = match.groups()
    if head is not None:
        return int(layer), int(head), None if token is None else int(token), "head" if token is None else "head_token"
    if neuron is not None:
        return int(layer), None, None, "neuron"
    return int(layer), None, None, "attn" if label.endswith("ATTN") else "mlp"


def _label_groups(labels: list[str]) -> dict[str, list[int]]:
    """Every name that selects something: each label, plus the layer / head each expanded term belongs to."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
        parsed = _parse(label)
        if parsed is None:
            continue
        layer, head, _, kind = parsed
        if kind in ("head", "head_token"):
            groups.setdefault(f"L{layer}ATTN", []).append(i)
        if kind == "head_token":
            groups.setdefault(f"L{layer}H{head}", []).append(i)
        if kind == "neuron":
            groups.setdefault(f"L{layer}MLP", []).append(i)
    return groups


def _n_layers(labels: Sequence[str]) -> int:
    layers = [parsed[0] for parsed in map(_parse, labels) if parsed is not None]
    return max(layers) + 1 if layers else 0


def _is_head_tuple(item: Any) -> bool:
    return (
        isinstance(item, tuple) and len(item) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) for i in item)
    )


def _component_key(item: Any, n_layers: int) -> str:
    if isinstance(item, str):
        return item
    if _is_head_tuple(item):
        layer, head = item
        return f"L{layer + n_layers if layer < 0 else layer}H{head}"
    raise TypeError(f"Cannot select a component by {item!r}: use a label ('L10H3') or a (layer, head) tuple of ints")


def _unknown_component(item: Any, key: str, labels: list[str], groups: dict[str, list[int]]) -> str:
    close = difflib.get_close_matches(key, list(groups), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    parsed = _parse(key)
    has_heads = any(p is not None and p[3] in ("head", "head_token") for p in map(_parse, labels))
    if parsed is not None and parsed[3] == "head" and not has_heads:
        hint += " These contributions have no per-head terms: decompose with level='head'."
    elif parsed is not None and parsed[0] >= _n_layers(labels):
        hint += f" The labels cover layers 0..{_n_layers(labels) - 1}."
    named = repr(item) if item == key else f"{item!r} ({key!r})"
    return f"No component {named} among these contributions.{hint} (Labels look like {labels[:3]} ... {labels[-2:]}.)"


def _describe(value: Any) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def _check_k(k: Any, available: int, what: str) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > available:
        raise ValueError(f"k={k} but there are only {available} {what}")


def _queries(query: Any, source: ComponentSource, mask: Tensor, keys: Tensor) -> tuple[Tensor, Tensor | None, bool]:
    """``(query vectors [query, d], query indices or None, single)``."""
    if isinstance(query, int) and not isinstance(query, bool):
        query = torch.tensor([query])
        single = True
    elif isinstance(query, Sequence) and query and all(isinstance(q, int) and not isinstance(q, bool) for q in query):
        query, single = torch.tensor(list(query)), False
    else:
        single = False
    if isinstance(query, Tensor) and query.ndim == 1 and not query.is_floating_point():
        bad = query[(query < -source.n_images) | (query >= source.n_images)].tolist()
        if bad:
            raise IndexError(f"Query image indices {bad} are out of range for a database of {source.n_images} images")
        index = query.long() % source.n_images
        return keys[index.to(keys.device)], index, single
    if isinstance(query, Contributions):
        if source.labels is not None and list(query.labels) != source.labels:
            raise ValueError("The query Contributions have other components than the database; decompose both alike")
        query = query.values
    if not isinstance(query, Tensor) or not query.is_floating_point() or query.ndim not in (2, 3):
        raise TypeError(
            "query must be an image index (or a list of them) or the query's contributions "
            f"([component, d], [query, component, d] or Contributions); got {_describe(query)}"
        )
    single = query.ndim == 2
    query = query.reshape(-1, *query.shape[-2:])
    if query.shape[1:] != (source.n_components, source.d):
        raise ValueError(
            f"The query's contributions are [{query.shape[1]} components, d={query.shape[2]}] but the "
            f"database's are [{source.n_components}, {source.d}]; decompose both the same way"
        )
    return query.index_select(1, mask.nonzero().flatten().to(query.device)).sum(dim=1), None, single
