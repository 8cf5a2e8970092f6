"""TextSpan: a text-labelled basis for each attention head (Gandelsman et al., ICLR 2024, Sec. 4).

For one head, take its direct contributions ``X`` (``[N, d]``, one row per image, e.g. from
:func:`vit_lens.intervene.decompose.direct_contributions` at ``level="head"``) and a pool of text
embeddings ``E`` (``[T, d]``). TextSpan greedily picks texts whose directions explain the most
variance of ``X``, removing each picked direction from both the outputs and the pool before the
next pick. The algorithm of the paper's public code (``compute_complete_text_set.py``), which
``method="faithful"`` performs step by step:

1. SVD of the **uncentred** ``X``; ``V_r``: its top ``rank`` right singular vectors. Every text is
   projected onto their span: ``t_j <- P t_j`` with ``P = V_r^T (V_r V_r^T)^{-1} V_r``. The
   projected texts are **not** re-normalised, so texts with a larger projection are favoured.
2. Centre ``X``; the reconstruction starts at the mean row.
3. Repeat ``n_texts`` times: pick ``j = argmax_j std_n(X t_j)`` (standard deviation over images of
   the dot products with the *un-normalised* projected texts); add ``(X t_j / |t_j|^2) t_j^T`` to
   the reconstruction; deflate ``X <- X - (X t_j / |t_j|^2) t_j^T`` and every text
   ``t_i <- t_i - (t_i . t_j / |t_j|^2) t_j``.

The picked (deflated) directions are mutually orthogonal, so the reconstruction is the mean plus
the orthogonal projection of the centred outputs onto the span of the picked, projected texts.

``method="fast"`` (the default) picks the same texts without touching ``X`` after one pass. The
score of text ``t`` is ``t^T C t`` with ``C`` the ``[d, d]`` covariance of ``X``, so all scores
cost ``O(T d^2)`` once. Deflating by ``t`` (``a = E t / |t|^2``, ``w = C t``, ``c = t^T C t``)
changes them in closed form, ``s_i <- s_i - 2 a_i (t_i . w) + a_i^2 c``, and the covariance to
``C - (w t^T + t w^T) / |t|^2 + c t t^T / |t|^4``: ``O(T d + d^2)`` per pick instead of the
``O(N T d)`` product per pick of the faithful path. ``C`` and the uncentred Gram matrix (whose
top eigenvectors are the top right singular vectors of ``X``) are accumulated in float64 in one
pass over ``X``, and the picks are made in float64 (float32 on MPS, which has no float64). When
``rank >= d`` (and ``N >= d``) the projection is the identity in both paths and no decomposition
is needed.

Reported numbers (both paths):

* ``scores[i]``: the variance over images (``N - 1`` denominator, as ``torch.std``) of the
  deflated outputs' dot products with the i-th picked un-normalised text: the quantity maximised.
* ``variance_explained[i]``: the fraction of the head's total variance (trace of ``C``) that the
  projection onto the first ``i + 1`` picked directions keeps (cumulative, non-decreasing).

Caveat (both paths, and the paper's code): a head's contributions span at most ``d_head`` plus a
couple of LayerNorm directions (about 66 of 768 dimensions for ViT-L-14, below the default
``rank=80``). When ``rank`` lies between that true rank and ``d``, the extra singular vectors span
numerical noise, are not unique, and differ between SVD implementations; they leave the scores
unchanged but enter the deflation, so later picks can depend on the linear-algebra library. Use
``rank`` at most the true rank, or ``rank >= d``, for picks that do not.

Evaluation (:func:`textspan_accuracy_curve`) and the baselines of the paper (random unit vectors,
:func:`random_text_baseline`; the common-words pool, :func:`vit_lens.methods.textspan.pools.paper_text_pool`) are
here too.
"""

import re
from vit_lens.utils.progress import progress as progress_bar
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

METHODS = ("fast", "faithful")
_HEAD_LABEL = re.compile(r"^L(\d+)H(\d+)$")
_LAYER_LABEL = re.compile(r"^L(\d+)(?:H\d+|ATTN|MLP|N\d+)")
_MLP_LABEL = re.compile(r"^(embed|L\d+MLP|L\d+N\d+)$")
_CHUNK_ELEMENTS = 1 << 24  # rows per streamed chunk: about this many elements (64 MB in float32)
_TINY = 1e-8  # a picked text whose squared norm fell below this fraction of the largest is numerically zero


@dataclass
class TextSpanResult:
    """The texts TextSpan picked for one head, and how much of the head's variance they explain.

    Attributes:
        indices: ``[k]`` rows of the text matrix, in pick order.
        texts: The picked descriptions, when names were given; else ``None``.
        scores: ``[k]`` float64: the variance over images of the deflated outputs' dot products
            with each picked, projected, un-normalised text (the greedy criterion).
        variance_explained: ``[k]`` float64: cumulative fraction of the head's total variance
            explained by the first ``i + 1`` picked directions.
        total_variance: Trace of the head's covariance (``N - 1`` denominator).
        mean: ``[d]`` the head's mean output (the reconstruction's starting point).
        basis: ``[k, d]`` orthonormal picked directions (the deflated, projected texts, normalised).
        reconstruction: ``[N, d]`` ``mean + ((X - mean) @ basis.T) @ basis``, or ``None`` when not
            requested; :meth:`reconstruct` computes it for any ``k``.
        method: ``"fast"`` or ``"faithful"``.
        rank: The dimension of the span the texts were projected onto: ``min(rank, N, d)``.
    """

    indices: Int[Tensor, " k"]
    texts: list[str] | None
    scores: Float[Tensor, " k"]
    variance_explained: Float[Tensor, " k"]
    total_variance: float
    mean: Float[Tensor, " d"] = field(repr=False)
    basis: Float[Tensor, "k d"] = field(repr=False)
    reconstruction: Float[Tensor, "images d"] | None = field(default=None, repr=False)
    method: str = "fast"
    rank: int = 80

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def step_variance(self) -> Float[Tensor, " k"]:
        """``[k]``: the fraction of total variance each pick adds (differences of :attr:`variance_explained`)."""
        return torch.diff(self.variance_explained, prepend=self.variance_explained.new_zeros(1))

    def names(self) -> list[str]:
        """The picked texts, or ``'#<index>'`` where no names were given."""
        return list(self.texts) if self.texts is not None else [f"#{int(i)}" for i in self.indices]

    def reconstruct(self, head_outputs: Any, k: int | None = None) -> Float[Tensor, "images d"]:
        """``mean + ((X - mean) @ B_k.T) @ B_k`` with the first ``k`` basis directions (default: all).

        Example:
            >>> result = textspan(torch.randn(100, 8), torch.randn(30, 8), n_texts=3)
            >>> result.reconstruct(torch.randn(5, 8), k=2).shape
            torch.Size([5, 8])
        """
        k = len(self) if k is None else k
        if not 0 <= k <= len(self):
            raise ValueError(f"k must be between 0 and the {len(self)} picked texts, got {k}")
        head_outputs = _as_matrix(head_outputs, "head_outputs")
        if head_outputs.shape[1] != self.basis.shape[1]:
            raise ValueError(f"head_outputs must be [N, {self.basis.shape[1]}], got {tuple(head_outputs.shape)}")
        basis = self.basis[:k].to(head_outputs)
        mean = self.mean.to(head_outputs)
        return mean + ((head_outputs - mean) @ basis.T) @ basis

    def report(self) -> str:
        """One line per pick: rank, text, this pick's share of variance, cumulative share."""
        explained = f"{100 * self.cumulative:.1f}% of variance in {len(self)} texts"
        lines = [f"TextSpan ({self.method}, rank {self.rank}): {explained}"]
        steps, totals = self.step_variance.tolist(), self.variance_explained.tolist()
        for i, (name, step, total) in enumerate(zip(self.names(), steps, totals)):
            lines.append(f"{i + 1:3d}. {name!r}  +{100 * step:.2f}%  ({100 * total:.1f}%)")
        return "\n".join(lines)

    @property
    def cumulative(self) -> float:
        """The fraction of variance all the picks explain together."""
        return float(self.variance_explained[-1]) if len(self) else 0.0


def textspan(
    head_outputs: Any,
    text_embeddings: Any,
    n_texts: int,
    rank: int = 80,
    method: str = "fast",
    *,
    texts: Sequence[str] | None = None,
    reconstruct: bool = True,
) -> TextSpanResult:
    """Pick ``n_texts`` descriptions that span one head's output variance (TextSpan, Gandelsman et al. (2024), Alg. 1).

    See the module docstring for the algorithm, both methods, and what the reported numbers mean.
    Computation happens on ``head_outputs``' device; ``text_embeddings`` are moved there.

    Args:
        head_outputs: ``[N, d]`` one head's direct contributions over N images.
        text_embeddings: ``[T, d]`` text embeddings of the candidate descriptions (the paper uses
            unit-norm CLIP text embeddings; any rows work, e.g. :func:`random_text_baseline`).
        n_texts: How many texts to pick (at most ``T`` and ``min(rank, N, d)``).
        rank: Texts are projected onto the span of the top ``rank`` right singular vectors of the
            uncentred outputs (the paper's ``w_ov_rank``, 80).
        method: ``"fast"`` (covariance updates, default) or ``"faithful"`` (the public code's
            steps on the ``[N, d]`` matrix). Both pick the same texts.
        texts: ``T`` names of the candidate descriptions, to report picks by name.
        reconstruct: Also return the ``[N, d]`` reconstruction (skip it to save memory; it can be
            computed later with :meth:`TextSpanResult.reconstruct`).

    Returns:
        A :class:`TextSpanResult`.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> writes = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
        >>> outputs = torch.randn(500, 3) @ writes                 # a head writing in 3 directions
        >>> pool = torch.cat([writes, torch.nn.functional.normalize(torch.randn(37, 16), dim=-1)])
        >>> result = textspan(outputs, pool, n_texts=3, texts=[f"text {i}" for i in range(40)])
        >>> sorted(result.texts), round(float(result.variance_explained[-1]), 4)
        (['text 0', 'text 1', 'text 2'], 1.0)
        >>> result.indices.tolist() == textspan(outputs, pool, 3, method="faithful").indices.tolist()
        True
    """
    outputs = _as_matrix(head_outputs, "head_outputs")
    pool = _as_matrix(text_embeddings, "text_embeddings")
    n_images, d = outputs.shape
    if pool.shape[1] != d:
        raise ValueError(
            f"text_embeddings must have the head outputs' width d={d} (the joint embedding space), got "
            f"{tuple(pool.shape)}"
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if n_images < 2:
        raise ValueError(f"TextSpan needs at least 2 images to measure variance, got {tuple(outputs.shape)}")
    span = min(rank, n_images, d)
    if isinstance(n_texts, bool) or not isinstance(n_texts, int) or not 1 <= n_texts <= min(pool.shape[0], span):
        raise ValueError(
            f"n_texts must be an int between 1 and min(T={pool.shape[0]}, min(rank={rank}, N={n_images}, d={d})="
            f"{span}); got {n_texts!r}"
        )
    if texts is not None:
        if isinstance(texts, str) or len(texts) != pool.shape[0]:
            raise ValueError(
                f"texts must be a sequence of T={pool.shape[0]} names, one per row of text_embeddings; got "
                f"{'a string' if isinstance(texts, str) else len(texts)}"
            )
    if not torch.isfinite(outputs).all() or not torch.isfinite(pool).all():
        raise ValueError("head_outputs and text_embeddings must be finite (found NaN or inf)")
    pool = pool.to(outputs.device)
    run = _faithful if method == "faithful" else _fast
    indices, scores, steps, total, mean, basis = run(outputs, pool, n_texts, span)
    names = [texts[i] for i in indices.tolist()] if texts is not None else None
    result = TextSpanResult(
        indices=indices, texts=names, scores=scores, variance_explained=torch.cumsum(steps / total, 0),
        total_variance=float(total), mean=mean, basis=basis, method=method, rank=span,
    )
    if reconstruct:
        result.reconstruction = result.reconstruct(outputs)
    return result


def random_text_baseline(
    d: int, n_texts: int = 3498, seed: int = 0, *, device: Any = None, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "n_texts d"]:
    """The paper's random baseline pool: ``n_texts`` Gaussian directions scaled to unit norm.

    Gandelsman et al. (2024) (App. A.3) compares its ChatGPT pool with "3498 vectors sampled from a unit Gaussian";
    they are normalised here like text embeddings, so only their directions differ from a text pool.
    The same ``seed`` gives the same vectors on every device (they are drawn on the CPU).

    Example:
        >>> pool = random_text_baseline(16, 100, seed=1)
        >>> pool.shape, bool(torch.allclose(pool.norm(dim=-1), torch.ones(100)))
        (torch.Size([100, 16]), True)
    """
    if d < 1 or n_texts < 1:
        raise ValueError(f"d and n_texts must be positive, got d={d}, n_texts={n_texts}")
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n_texts, d, generator=generator, dtype=torch.float64)
    vectors = vectors / vectors.norm(dim=-1, keepdim=True)
    return vectors.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------ all heads


@dataclass
class TextSpanTable:
    """TextSpan results for many heads, as a table of (layer, head, rank, text, variance) rows.

    Attributes:
        results: ``{(layer, head): TextSpanResult}`` in (layer, head) order.
        method, rank: The settings used.
    """

    results: dict[tuple[int, int], TextSpanResult]
    method: str = "fast"
    rank: int = 80

    @property
    def heads(self) -> list[tuple[int, int]]:
        """The ``(layer, head)`` pairs, sorted."""
        return list(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def for_head(self, layer: int, head: int) -> TextSpanResult:
        """The result of one head.

        Example:
            >>> table.for_head(11, 3).texts[:3]  # doctest: +SKIP
            ['a photo taken in a forest', ...]
        """
        if (layer, head) not in self.results:
            raise KeyError(f"No TextSpan result for layer {layer}, head {head}; this table has {self.heads}")
        return self.results[(layer, head)]

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per picked text: layer, head, rank (1 = first pick), index, text,
        variance_explained (this pick's share of the head's variance) and cumulative_variance."""
        rows = []
        for (layer, head), result in self.results.items():
            steps = result.step_variance.tolist()
            totals = result.variance_explained.tolist()
            for i, (index, name) in enumerate(zip(result.indices.tolist(), result.names())):
                rows.append({
                    "layer": layer, "head": head, "rank": i + 1, "index": index, "text": name,
                    "variance_explained": steps[i], "cumulative_variance": totals[i],
                })
        return rows

    def to_pandas(self):
        """The rows of :meth:`to_rows` as a ``pandas.DataFrame``."""
        try:
            import pandas as pd
        except ImportError as error:  # pragma: no cover - pandas is installed with the test extras
            raise ImportError("TextSpanTable.to_pandas needs pandas: pip install pandas") from error
        columns = ["layer", "head", "rank", "index", "text", "variance_explained", "cumulative_variance"]
        return pd.DataFrame(self.to_rows(), columns=columns)

    def report(self, top: int | None = 5) -> str:
        """A readable summary: one line per head with its first ``top`` texts (all if ``None``).

        Example:
            >>> print(table.report(top=2))  # doctest: +SKIP
            L11.H3 [61.2% in 10 texts]: 'a photo taken in a forest' 12.3%, 'a desert at sunset' 8.1%, ...
        """
        lines = [f"TextSpan over {len(self)} heads ({self.method}, texts projected onto rank {self.rank})"]
        for (layer, head), result in self.results.items():
            shown = len(result) if top is None else min(top, len(result))
            steps = result.step_variance.tolist()
            parts = [f"{name!r} {100 * step:.1f}%" for name, step in zip(result.names()[:shown], steps)]
            more = ", ..." if shown < len(result) else ""
            summary = f"L{layer}.H{head} [{100 * result.cumulative:.1f}% in {len(result)} texts]"
            lines.append(f"{summary}: {', '.join(parts)}{more}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


def textspan_all_heads(
    contributions: Any,
    text_embeddings: Any,
    texts: Sequence[str] | None = None,
    *,
    n_texts: int = 10,
    last_k: int | None = None,
    layers: Sequence[int] | None = None,
    rank: int = 80,
    method: str = "fast",
    component_labels: Sequence[str] | None = None,
    device: Any = None,
    progress: bool = True,
) -> TextSpanTable:
    """Run :func:`textspan` on every head of the chosen layers.

    Args:
        contributions: One of: a :class:`vit_lens.intervene.decompose.Contributions` at ``level="head"``; a
            :class:`vit_lens.intervene.store.ContributionStore` (each head is read from disk on its own); a
            ``[N, component, d]`` tensor with ``component_labels``; or a ``[N, layer, head, d]``
            tensor (the paper code's ``attn`` array; layers numbered from 0).
        text_embeddings: ``[T, d]`` the candidate pool.
        texts: ``T`` names for the pool (default: rows are named ``'#<index>'``).
        n_texts: Texts per head (the public code's default is 10, the paper shows 5 to 60).
        last_k: Use the last ``last_k`` layers of the model (default: 4, as the paper, or all
            layers of a smaller model).
        layers: Or name the layers (negative counts from the end); not together with ``last_k``.
        rank, method: As :func:`textspan`.
        component_labels: For a 3-D tensor: one label per component (``"L10H3"``, ``"L10MLP"``, ...,
            as :attr:`Contributions.labels`).
        device: Where to compute when the heads come from a store (default: ``text_embeddings``'
            device); tensors are used on their own device.
        progress: Show a progress bar over heads.

    Returns:
        A :class:`TextSpanTable` (without per-head reconstructions).

    Example:
        >>> parts = direct_contributions(model, cache, level="head")  # doctest: +SKIP
        >>> table = textspan_all_heads(parts, text_emb, pool, n_texts=10, last_k=4)  # doctest: +SKIP
        >>> print(table.report(top=3))  # doctest: +SKIP
    """
    source = _as_source(contributions, component_labels)
    chosen = _choose_layers(source, last_k, layers)
    heads = [(layer, head) for (layer, head) in source.heads if layer in chosen]
    missing = sorted(set(chosen) - {layer for layer, _ in heads})
    if missing:
        raise ValueError(
            f"layers {missing} have no per-head components (labels 'L<layer>H<head>') in these contributions; "
            f"decompose them with direct_contributions(..., level='head', layers={sorted(chosen)})"
        )
    pool = _as_matrix(text_embeddings, "text_embeddings")
    target = pool.device if device is None else torch.device(device)
    results = {}
    for layer, head in progress_bar(heads, desc="TextSpan heads", enabled=progress):
        outputs = source.head(layer, head)
        if not source.on_device:
            outputs = outputs.to(target)
        results[(layer, head)] = textspan(outputs, pool, n_texts, rank, method, texts=texts, reconstruct=False)
    span = min(r.rank for r in results.values()) if results else rank
    return TextSpanTable(results=results, method=method, rank=span)


def suggest_heads(
    table: TextSpanTable, keywords: str | Sequence[str], top: int = 5, *, regex: bool = False
) -> list[tuple[int, int, float]]:
    """Heads whose TextSpan variance falls most on descriptions matching ``keywords``.

    A head's score is the fraction of the variance its picks explain that comes from picks whose
    text matches any keyword (case-insensitive; substrings, or regular expressions with
    ``regex=True``): 1.0 means every picked direction matches. Heads scoring 0 are left out.

    Args:
        table: From :func:`textspan_all_heads` (with text names).
        keywords: One keyword or several (e.g. ``["photo taken in", "city"]``).
        top: How many heads to return.
        regex: Treat keywords as regular expressions instead of plain substrings.

    Returns:
        ``[(layer, head, score), ...]`` sorted by score, highest first (ties: lower layer, head).

    Example:
        >>> suggest_heads(table, ["color", "colour"], top=3)  # doctest: +SKIP
        [(22, 11, 0.81), (23, 8, 0.44), (21, 2, 0.12)]
    """
    if isinstance(keywords, str):
        keywords = [keywords]
    if not keywords:
        raise ValueError("suggest_heads needs at least one keyword")
    pattern = re.compile("|".join(k if regex else re.escape(k) for k in keywords), re.IGNORECASE)
    scored = []
    for (layer, head), result in table.results.items():
        if result.texts is None:
            raise ValueError("suggest_heads needs a table with text names: pass texts= to textspan_all_heads")
        steps = result.step_variance
        explained = float(steps.sum())
        matched = sum(float(s) for s, text in zip(steps, result.texts) if pattern.search(text))
        if matched > 0 and explained > 0:
            scored.append((layer, head, matched / explained))
    scored.sort(key=lambda row: (-row[2], row[0], row[1]))
    return scored[:top]


# ------------------------------------------------------------------------------------ evaluation


@dataclass
class TextSpanAccuracy:
    """Zero-shot accuracy with each head replaced by its TextSpan reconstruction from ``k`` texts.

    Attributes:
        ks: The numbers of texts per head evaluated.
        accuracy: Top-1 accuracy (a fraction) for each ``k``.
        base_accuracy: Accuracy of the unablated representation (the sum of every component).
        heads_intact_accuracy: Same ablation of the other components, the table's heads kept whole
            (the limit of the curve as ``k`` grows to ``d``).
        keep_mlps: Whether MLP (and embedding) terms were kept instead of mean-ablated.
        n_images: Images evaluated.
    """

    ks: list[int]
    accuracy: list[float]
    base_accuracy: float
    heads_intact_accuracy: float
    keep_mlps: bool
    n_images: int

    def to_rows(self) -> list[dict[str, Any]]:
        """``[{"k": k, "accuracy": acc}, ...]``."""
        return [{"k": k, "accuracy": acc} for k, acc in zip(self.ks, self.accuracy)]

    def report(self) -> str:
        """Accuracy per ``k``, with the two reference accuracies."""
        mlps = "kept" if self.keep_mlps else "mean-ablated"
        lines = [
            f"TextSpan accuracy on {self.n_images} images (MLPs {mlps}): base {100 * self.base_accuracy:.2f}%, "
            f"heads intact {100 * self.heads_intact_accuracy:.2f}%"
        ]
        lines += [f"  k={k:4d}: {100 * acc:.2f}%" for k, acc in zip(self.ks, self.accuracy)]
        return "\n".join(lines)


def textspan_accuracy_curve(
    contributions: Any,
    table: TextSpanTable,
    classifier: Any,
    labels: Any,
    ks: Sequence[int] = (1, 2, 5, 10),
    *,
    keep_mlps: bool = True,
    component_labels: Sequence[str] | None = None,
    means: Any = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> TextSpanAccuracy:
    """Zero-shot accuracy against the number of texts per head (Gandelsman et al. 2024, Sec. 4.2 and Fig. 4).

    Every head in ``table`` is replaced by its TextSpan reconstruction with its first ``k`` texts
    (the head's TextSpan mean plus the projection of its centred output onto those directions);
    every other component is mean-ablated (replaced by its mean over the same images), except the
    MLP terms when ``keep_mlps`` is True. MLP terms are ``L<l>MLP``, ``L<l>N<n>`` and the
    embedding term ``embed`` (the public code keeps its ``mlps`` array, which holds the ln_pre
    embedding term too). Everything else (other heads, unexpanded ``L<l>ATTN`` layers and the
    ``bias`` term of ``ln_mode="center_each"``) is mean-ablated.

    The paper and its code disagree on the MLPs: Sec. 4.2 says all other terms, MLPs included, are
    mean-ablated (``keep_mlps=False``); ``compute_complete_text_set.py`` adds the MLP terms back
    unablated (``keep_mlps=True``, the default here since the published numbers come from that code).

    The data are streamed in chunks of ``batch_size`` images, so a store larger than RAM works.

    Args:
        contributions: A ``Contributions``, a ``ContributionStore``, or a ``[N, component, d]``
            tensor with ``component_labels`` (the same data the table was computed on, as in the paper).
        table: From :func:`textspan_all_heads`; each head needs at least ``max(ks)`` texts.
        classifier: ``[d, n_classes]`` zero-shot class embeddings (columns).
        labels: ``[N]`` class index of each image.
        ks: Numbers of texts per head (0 = the table's heads mean-ablated too).
        keep_mlps: Keep MLP and embedding terms as they are (public code) or mean-ablate them (paper text).
        component_labels: For a tensor: one label per component.
        means: ``[component, d]`` means to ablate with (default: computed over ``contributions``).
        batch_size: Images per streamed chunk (default: about 64 MB of float32 components per chunk).
        progress: Show a progress bar over chunks.

    Returns:
        A :class:`TextSpanAccuracy`. Computed on ``classifier``'s device.

    Example:
        >>> table = textspan_all_heads(parts, text_emb, pool, n_texts=60, last_k=4)  # doctest: +SKIP
        >>> curve = textspan_accuracy_curve(parts, table, classifier, labels, ks=[10, 20, 60])  # doctest: +SKIP
        >>> print(curve.report())  # doctest: +SKIP
    """
    source = _as_source(contributions, component_labels, need_all=True)
    weights = _as_matrix(classifier, "classifier")
    device = weights.device
    n_images, n_components, d = source.shape
    if weights.shape[0] != d:
        raise ValueError(f"classifier must be [d={d}, n_classes], got {tuple(weights.shape)}")
    targets = torch.as_tensor(labels).to(device)
    if targets.shape != (n_images,) or targets.is_floating_point():
        raise ValueError(
            f"labels must be [{n_images}] integer class indices, got {tuple(targets.shape)} {targets.dtype}"
        )
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 0:
        raise ValueError(f"ks must be a non-empty list of non-negative ints, got {ks}")
    if not table.results:
        raise ValueError("table holds no head; run textspan_all_heads first")
    shortest = min(len(r) for r in table.results.values())
    if max(ks) > shortest:
        raise ValueError(f"ks go up to {max(ks)} but some heads in the table have only {shortest} texts; "
                         f"rerun textspan_all_heads with n_texts={max(ks)}")
    index = {label: i for i, label in enumerate(source.labels)}
    replaced = []
    for layer, head in table.heads:
        label = f"L{layer}H{head}"
        if label not in index:
            raise ValueError(f"table head {label} is not among the contributions' components")
        replaced.append(index[label])
    mean_values = source.means() if means is None else torch.as_tensor(means)
    if mean_values.shape != (n_components, d):
        raise ValueError(f"means must be [{n_components}, {d}], got {tuple(mean_values.shape)}")
    mean_values = mean_values.to(device=device, dtype=torch.float64)

    compute = torch.float64 if device.type != "mps" else torch.float32
    weights = weights.to(compute)
    kept = [i for i, label in enumerate(source.labels) if keep_mlps and _MLP_LABEL.match(label)]
    ablated = sorted(set(range(n_components)) - set(kept) - set(replaced))
    bases = torch.stack([r.basis[: max(ks)].to(device, compute) for r in table.results.values()])  # [H, K, d]
    head_means = torch.stack([r.mean.to(device, compute) for r in table.results.values()])  # [H, d]
    basis_logits = bases @ weights  # [H, K, C]
    constant = (mean_values[ablated].sum(0).to(compute) @ weights)  # [C]
    head_mean_logits = head_means.sum(0) @ weights
    order = sorted(set(ks))
    correct = {k: 0 for k in order}
    correct_base = correct_intact = 0
    batch_size = batch_size or max(1, _CHUNK_ELEMENTS // (n_components * d))
    for start, chunk in progress_bar(source.chunks(batch_size), desc="TextSpan accuracy", enabled=progress):
        chunk = chunk.to(device)  # only the reduced pieces below are widened to float64
        batch_targets = targets[start : start + chunk.shape[0]]
        correct_base += int(((chunk.sum(1, dtype=compute) @ weights).argmax(-1) == batch_targets).sum())
        kept_logits = chunk[:, kept].sum(1, dtype=compute) @ weights + constant  # [n, C]
        heads = chunk[:, replaced].to(compute)  # [n, H, d]
        correct_intact += int(((kept_logits + heads.sum(1) @ weights).argmax(-1) == batch_targets).sum())
        coefficients = torch.einsum("nhd,hkd->nhk", heads - head_means, bases)  # [n, H, K]
        logits = kept_logits + head_mean_logits
        previous = 0
        for k in order:
            if k > previous:
                step = torch.einsum("nhk,hkc->nc", coefficients[:, :, previous:k], basis_logits[:, previous:k])
                logits = logits + step
                previous = k
            correct[k] += int((logits.argmax(-1) == batch_targets).sum())
    return TextSpanAccuracy(
        ks=ks, accuracy=[correct[k] / n_images for k in ks], base_accuracy=correct_base / n_images,
        heads_intact_accuracy=correct_intact / n_images, keep_mlps=keep_mlps, n_images=n_images,
    )


# ------------------------------------------------------------------------------------ internals


def _as_matrix(value: Any, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {value.dtype}")
    # Fixed data: embeddings computed by a model whose weights require grad (loaded models do) would
    # otherwise drag an autograd graph through every greedy step.
    return value.detach()


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _faithful(outputs: Tensor, pool: Tensor, n_texts: int, span: int):
    """The public code's steps, on the [N, d] matrix (float32, or the outputs' wider dtype)."""
    work = torch.promote_types(outputs.dtype, torch.float32)
    data = outputs.to(work)
    _, _, vh = torch.linalg.svd(data, full_matrices=False)  # of the uncentred outputs
    vh = vh[:span]
    projector = vh.T @ torch.linalg.inv(vh @ vh.T) @ vh
    text = pool.to(work) @ projector.T
    mean = data.mean(dim=0)
    data = data - mean
    total = float(data.var(dim=0).sum())
    _check_variance(total)
    reference = float(text.pow(2).sum(-1).max())
    indices, scores, steps, picked = [], [], [], []
    for _ in range(n_texts):
        std = torch.cat([(data @ block.T).std(dim=0) for block in text.split(_text_block(data.shape[0]))])
        top = int(std.argmax())
        direction = text[top].clone()
        norm = direction @ direction
        _check_pick(float(norm), reference, len(indices))
        coefficients = data @ direction / norm
        data = data - coefficients[:, None] * direction[None]
        text = text - (text @ direction / norm)[:, None] * direction[None]
        indices.append(top)
        scores.append(float(std[top]) ** 2)
        steps.append(float(std[top]) ** 2 / float(norm))
        picked.append(direction / norm.sqrt())
    basis = torch.stack(picked)
    return (torch.tensor(indices), torch.tensor(scores, dtype=torch.float64), torch.tensor(steps, dtype=torch.float64),
            total, mean, basis)


def _fast(outputs: Tensor, pool: Tensor, n_texts: int, span: int):
    """Covariance form: one pass over the outputs, then O(T d + d^2) per pick."""
    acc = _accumulation_dtype(outputs.device)
    n_images, d = outputs.shape
    mean, covariance = _mean_and_covariance(outputs, acc)
    text = pool.to(acc)
    if span < d:
        gram = covariance * (n_images - 1) + n_images * torch.outer(mean, mean)  # uncentred X^T X
        _, vectors = _eigh(gram)  # ascending eigenvalues
        top = vectors[:, -span:]
        text = (text @ top) @ top.T
    else:
        text = text.clone()
    scores = ((text @ covariance) * text).sum(-1)
    reference = float(text.pow(2).sum(-1).max())
    total = float(covariance.diagonal().sum())
    _check_variance(total)
    indices, picked_scores, steps, picked = [], [], [], []
    for _ in range(n_texts):
        top_index = int(scores.argmax())
        direction = text[top_index].clone()
        norm = direction @ direction
        _check_pick(float(norm), reference, len(indices))
        score = scores[top_index].clone()
        along = covariance @ direction  # w = C t
        coefficients = text @ direction / norm  # a
        cross = text @ along  # t_i . w, before deflation
        scores = scores - 2 * coefficients * cross + coefficients.square() * score
        text.addr_(coefficients, direction, alpha=-1)
        covariance.addr_(along, direction, alpha=-1 / float(norm)).addr_(direction, along, alpha=-1 / float(norm))
        covariance.addr_(direction, direction, alpha=float(score) / float(norm) ** 2)
        text[top_index] = 0.0  # exactly deflated away
        scores[top_index] = 0.0
        indices.append(top_index)
        picked_scores.append(float(score))
        steps.append(float(score / norm))
        picked.append(direction / norm.sqrt())
    work = torch.promote_types(outputs.dtype, torch.float32)
    basis = torch.stack(picked)
    return (torch.tensor(indices), torch.tensor(picked_scores, dtype=torch.float64),
            torch.tensor(steps, dtype=torch.float64), total, mean.to(work), basis.to(work))


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a small ``[d, d]`` matrix, on one thread when on the CPU.

    The tridiagonalisation synchronises its threads at every column; for d of a few hundred to a
    thousand extra threads gain little, and when another process keeps the cores busy they lose a
    lot (measured here with a training job on both cores, d = 768: 0.1 s on one thread, 11.9 s on two).
    """
    if matrix.device.type != "cpu" or torch.get_num_threads() == 1:
        return torch.linalg.eigh(matrix)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(matrix)
    finally:
        torch.set_num_threads(threads)


def _mean_and_covariance(outputs: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Mean and covariance (N - 1 denominator) in ``acc``, two passes over row chunks."""
    n_images, d = outputs.shape
    rows = max(1, _CHUNK_ELEMENTS // d)
    mean = torch.zeros(d, dtype=acc, device=outputs.device)
    for chunk in outputs.split(rows):
        mean += chunk.to(acc).sum(0)
    mean /= n_images
    covariance = torch.zeros(d, d, dtype=acc, device=outputs.device)
    for chunk in outputs.split(rows):
        centred = chunk.to(acc) - mean
        covariance.addmm_(centred.T, centred)
    return mean, covariance / (n_images - 1)


def _text_block(n_images: int) -> int:
    """Texts per block in the faithful path: an [N, block] product of about 2^25 elements."""
    return max(1, (1 << 25) // max(n_images, 1))


def _check_variance(total: float) -> None:
    if not total > 0:
        raise ValueError("head_outputs do not vary over the images (zero variance): there is nothing to explain")


def _check_pick(norm: float, reference: float, n_picked: int) -> None:
    if not norm > _TINY * reference:
        raise ValueError(
            f"TextSpan could pick only {n_picked} texts: every remaining text direction is (numerically) zero "
            f"after deflation, i.e. the pool spans only {n_picked} dimensions of the projected space; ask for "
            f"n_texts <= {n_picked} or use a larger pool"
        )


class _Source:
    """A uniform view of per-image components: tensors, Contributions or a ContributionStore."""

    def __init__(self, labels: list[str], shape: tuple[int, int, int], column, rows, on_device: bool,
                 n_layers: int, means=None):
        self.labels = labels
        self.shape = shape
        self._column = column  # label index -> [N, d]
        self._rows = rows  # (start, stop) -> [n, component, d]
        self.on_device = on_device
        self.n_layers = n_layers
        self._means = means
        self._index = {label: i for i, label in enumerate(labels)}
        self.heads = sorted(
            (int(m.group(1)), int(m.group(2))) for m in map(_HEAD_LABEL.match, labels) if m is not None
        )

    def head(self, layer: int, head: int) -> Tensor:
        return self._column(self._index[f"L{layer}H{head}"])

    def chunks(self, batch_size: int) -> Iterator[tuple[int, Tensor]]:
        """``(start, [n, component, d])`` for consecutive blocks of images."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, self.shape[0], batch_size):
            yield start, self._rows(start, min(start + batch_size, self.shape[0]))

    def means(self) -> Tensor:
        if self._means is not None:
            return self._means()
        total = None
        for _, chunk in self.chunks(max(1, _CHUNK_ELEMENTS // max(1, self.shape[1] * self.shape[2]))):
            part = chunk.sum(0, dtype=_accumulation_dtype(chunk.device))
            total = part if total is None else total + part
        return total / self.shape[0]


def _as_source(contributions: Any, component_labels: Sequence[str] | None, need_all: bool = False) -> _Source:
    from vit_lens.intervene.decompose import Contributions
    from vit_lens.intervene.store import ContributionStore

    if isinstance(contributions, ContributionStore):
        labels = list(contributions.labels)
        if not labels or len(contributions) == 0:
            raise ValueError(f"The contribution store in {contributions.directory} is empty")
        return _Source(
            labels, contributions.shape, lambda i: contributions.component(labels[i]),
            lambda a, b: contributions[a:b], on_device=False, n_layers=_n_layers(labels),
            means=contributions.mean,
        )
    if isinstance(contributions, Contributions):
        values, labels = contributions.values, list(contributions.labels)
        if not any(_HEAD_LABEL.match(label) for label in labels) and contributions.level != "head":
            raise ValueError(
                f"TextSpan needs per-head contributions; these are level={contributions.level!r}. Use "
                "direct_contributions(..., level='head')"
            )
    elif isinstance(contributions, Tensor):
        if contributions.ndim == 4 and component_labels is None and not need_all:
            n_images, n_layers, n_heads, d = contributions.shape
            flat = contributions.reshape(n_images, n_layers * n_heads, d)
            labels = [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)]
            return _Source(labels, tuple(flat.shape), lambda i: flat[:, i], lambda a, b: flat[a:b], True, n_layers)
        if contributions.ndim != 3:
            raise ValueError(
                f"contributions must be [N, component, d] with component_labels"
                f"{'' if need_all else ', or [N, layer, head, d]'}; got shape {tuple(contributions.shape)}"
            )
        n_components = contributions.shape[1]
        if component_labels is None or isinstance(component_labels, str) or len(component_labels) != n_components:
            raise ValueError(
                f"a [N, component, d] tensor needs component_labels: {contributions.shape[1]} labels such as "
                "'L10H3', 'L10MLP', 'embed' (Contributions.labels)"
            )
        values, labels = contributions, list(component_labels)
    else:
        raise TypeError(
            "contributions must be a vit_lens Contributions, a ContributionStore, or a tensor "
            f"([N, component, d] with component_labels, or [N, layer, head, d]); got {type(contributions).__name__}"
        )
    if not values.is_floating_point():
        raise TypeError(f"contributions must be floating point, got {values.dtype}")
    return _Source(labels, tuple(values.shape), lambda i: values[:, i], lambda a, b: values[a:b], True,
                   _n_layers(labels))


def _n_layers(labels: list[str]) -> int:
    layers = [int(m.group(1)) for m in map(_LAYER_LABEL.match, labels) if m is not None]
    if not layers:
        raise ValueError(f"No layer components among the labels (expected 'L<layer>H<head>', ...): {labels[:5]}")
    return max(layers) + 1


def _choose_layers(source: _Source, last_k: int | None, layers: Sequence[int] | None) -> list[int]:
    n_layers = source.n_layers
    if layers is not None and last_k is not None:
        raise ValueError("pass either layers= or last_k=, not both")
    if layers is None:
        last_k = min(4, n_layers) if last_k is None else last_k
        if not 1 <= last_k <= n_layers:
            raise ValueError(f"last_k must be between 1 and the model's {n_layers} layers, got {last_k}")
        return list(range(n_layers - last_k, n_layers))
    chosen = sorted({l % n_layers if -n_layers <= l < 0 else l for l in layers})
    bad = [l for l in chosen if not 0 <= l < n_layers]
    if bad or not chosen:
        raise ValueError(f"layers must be non-empty and within the model's {n_layers} layers, got {list(layers)}")
    return chosen
