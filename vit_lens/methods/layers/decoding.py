"""Decode every layer into language ("Peeling Back the Layers", Sec. 3.5 and Table 1).

A decoder ``D`` turns the representation after block ``l`` into one description per image. The
linguistic difference between adjacent layers is ``ΔS^l = Metric(D(Z^l), D(Z^{l-1}))`` (a
similarity: higher means the descriptions changed less), and the *convergence layer* of an image
is the first layer from which its description stays the final layer's (Table 1: lower is better).

Decoders (anything with ``n_layers`` and ``decode_layers(images, layers, fwd_hooks)``, see
:class:`LayerDecoder`):

* :class:`CLIPLens`: no extra model. For a :class:`~vit_lens.HookedCLIP`, map the residual stream
  after block ``l`` into the joint image-text space and return the nearest descriptions of a text
  pool. ``mode="intermediate"`` applies the model's final LayerNorm, pooling and projection to the
  intermediate residual stream (a logit-lens for CLIP); ``mode="accumulated"`` sums the direct
  contributions (:func:`vit_lens.intervene.decompose.direct_contributions`, ``level="layer"``) of the
  embedding and of blocks ``0..l`` (plus the readout's constant bias term), with the final
  LayerNorm's scale fixed at its value for the whole image. At the last layer both give the
  model's image embedding.
* :class:`CaptionerDecoder`: a captioning model whose vision tower is a HookedViT, such as
  :class:`vit_lens.HookedBlip2` (the paper uses InstructBLIP), so interventions run
  inside the captioner.

Layers are block indices ``0 .. n_layers - 1`` (the residual stream after that block,
``blocks.{l}.hook_resid_post``). Metrics are those of :mod:`vit_lens.methods.layers.text_metrics` (``"bleu"``,
``"rouge_l"``, ``"cider"``, ``"bertscore"``, ``"exact"``) or any ``metric(candidates, references)``.

Example:
    >>> import vit_lens
    >>> from vit_lens.methods.layers.decoding import CLIPLens, decode_layers
    >>> from vit_lens.toy import ToyWorld, description_pool
    >>> clip = vit_lens.load_toy_clip()
    >>> lens = CLIPLens(clip, description_pool(1)[0])
    >>> batch = ToyWorld(seed=1).sample(4)
    >>> descriptions = decode_layers(lens, batch.images)
    >>> descriptions.for_image(0)  # one description per layer  # doctest: +SKIP
    ['dotted background', 'dotted background', 'red object', 'red object']
    >>> descriptions.convergence_layers().tolist()  # doctest: +SKIP
    [2, 3, 1, 3]
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from vit_lens.methods.layers.text_metrics import get_metric

HookList = Sequence[tuple[Any, Callable]]
MODES = ("intermediate", "accumulated")


@dataclass
class LayerDescriptions:
    """One description per (layer, image).

    Attributes:
        texts: ``texts[i][n]``: the description of image ``n`` at ``layers[i]``.
        layers: The decoded block indices, increasing.
        indices: ``[layer, image, k]`` pool indices of the ``k`` nearest descriptions (CLIP lens), or None.
        scores: ``[layer, image, k]`` their cosine similarities, or None.
        candidates: ``candidates[i][n]``: the ``k`` nearest descriptions, best first, or None.
    """

    texts: list[list[str]]
    layers: list[int]
    indices: Int[Tensor, "layer image k"] | None = None
    scores: Float[Tensor, "layer image k"] | None = None
    candidates: list[list[list[str]]] | None = None

    @property
    def n_images(self) -> int:
        return len(self.texts[0]) if self.texts else 0

    def for_image(self, image: int) -> list[str]:
        """The descriptions of one image, one per layer."""
        return [row[image] for row in self.texts]

    def final(self) -> list[str]:
        """The last decoded layer's description of every image."""
        return list(self.texts[-1])

    def delta(self, metric: Any = "rouge_l") -> Float[Tensor, "transition image"]:
        """:func:`delta_s` of these descriptions."""
        return delta_s(self, metric)

    def convergence_layers(self, metric: Any = None, threshold: float = 1.0) -> Int[Tensor, " image"]:
        """:func:`convergence_layers` of these descriptions."""
        return convergence_layers(self, metric=metric, threshold=threshold)

    def to_rows(self) -> list[dict[str, Any]]:
        """``[{"image", "layer", "text", "score"}, ...]`` (score: cosine similarity of the CLIP lens, else None)."""
        rows = []
        for i, layer in enumerate(self.layers):
            for n, text in enumerate(self.texts[i]):
                score = float(self.scores[i, n, 0]) if self.scores is not None else None
                rows.append({"image": n, "layer": layer, "text": text, "score": score})
        return rows

    def figure(self, metric: Any = "rouge_l", image: int | None = None, title: str | None = None):
        """:func:`plot_layer_descriptions` of these descriptions."""
        return plot_layer_descriptions(self, metric=metric, image=image, title=title)


@runtime_checkable
class LayerDecoder(Protocol):
    """What :func:`decode_layers` needs of a decoder.

    ``decode_layers(images, layers, fwd_hooks)`` returns a :class:`LayerDescriptions` (or the
    ``[layer][image]`` list of strings) for the residual stream after each block in ``layers``,
    with ``fwd_hooks`` (``[(hook_name, fn), ...]`` on the HookedViT) active while it runs.
    """

    n_layers: int

    def decode_layers(self, images: Tensor, layers: list[int], fwd_hooks: HookList | None = None) -> Any: ...


# ---------------------------------------------------------------------------------------------- CLIP lens


class CLIPLens:
    """Decode layers of a HookedCLIP by retrieving the nearest descriptions of a text pool.

    Args:
        clip: A :class:`~vit_lens.HookedCLIP` (anything with ``.vision``, a HookedViT with a
            projection, and ``encode_text``).
        texts: The pool of descriptions (e.g. :func:`vit_lens.methods.textspan.pools.default_text_pool`, or for the
            toy CLIP :func:`vit_lens.toy.description_pool`).
        text_embeddings: ``[T, d_proj]`` embeddings of ``texts`` if already computed (they are
            L2-normalised here); by default ``clip.encode_text`` computes them.
        mode: ``"intermediate"`` or ``"accumulated"`` (see the module docstring).
        k: Nearest descriptions kept per (layer, image).
        ln_mode: LayerNorm convention of the accumulated mode (``"center_each"`` or ``"paper"``).
        batch_size: Texts encoded per batch.

    Example:
        >>> lens = CLIPLens(clip, pool, mode="accumulated", k=3)  # doctest: +SKIP
        >>> lens.embed_layers(images).shape  # [layer, image, d_proj]  # doctest: +SKIP
    """

    def __init__(
        self,
        clip: Any,
        texts: Sequence[str],
        *,
        text_embeddings: Any = None,
        mode: str = "intermediate",
        k: int = 1,
        ln_mode: str = "center_each",
        batch_size: int = 256,
    ):
        vision = getattr(clip, "vision", None)
        if vision is None or getattr(vision.cfg, "d_proj", None) is None:
            raise TypeError(
                f"CLIPLens needs a HookedCLIP (a vision tower with a projection into a text space), got "
                f"{type(clip).__name__}; for a captioning model use CaptionerDecoder"
            )
        if vision.cfg.pool_type == "token_dist":
            raise NotImplementedError("CLIPLens does not decode DeiT-style two-token pooling")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of descriptions (strings)")
        if not isinstance(k, int) or not 1 <= k <= len(texts):
            raise ValueError(f"k must be an int in [1, {len(texts)}] (the pool size), got {k!r}")
        self.clip = clip
        self.vision = vision
        self.texts = list(texts)
        self.mode = mode
        self.k = k
        self.ln_mode = ln_mode
        if text_embeddings is None:
            with torch.no_grad():
                text_embeddings = torch.cat(
                    [clip.encode_text(self.texts[i : i + batch_size], normalize=True) for i in range(0, len(texts), batch_size)]
                )
        if not isinstance(text_embeddings, Tensor) or text_embeddings.shape != (len(texts), vision.cfg.d_proj):
            shape = tuple(text_embeddings.shape) if isinstance(text_embeddings, Tensor) else type(text_embeddings).__name__
            raise ValueError(f"text_embeddings must be [{len(texts)}, {vision.cfg.d_proj}] (one row per text), got {shape}")
        self.text_embeddings = F.normalize(text_embeddings.detach().to(vision.W_E), dim=-1)

    @property
    def n_layers(self) -> int:
        return self.vision.cfg.n_layers

    def embed_layers(
        self, images: Tensor, layers: Any = None, fwd_hooks: HookList | None = None
    ) -> Float[Tensor, "layer batch d_proj"]:
        """The lens embedding (un-normalised, in the image-embedding space) after each block in ``layers``."""
        vision = self.vision
        layers = _check_layers(layers, vision.cfg.n_layers)
        with torch.no_grad():
            if self.mode == "intermediate":
                names = [f"blocks.{l}.hook_resid_post" for l in layers]
                _, cache = vision.run_with_cache(images, names_filter=names, fwd_hooks=fwd_hooks)
                return torch.stack([_readout(vision, cache[name]) for name in names])
            from vit_lens.intervene.decompose import direct_contributions, required_hooks

            _, cache = vision.run_with_cache(images, names_filter=required_hooks(vision, "layer"), fwd_hooks=fwd_hooks)
            terms = direct_contributions(vision, cache, level="layer", ln_mode=self.ln_mode)
            cumulative = []
            for l in layers:
                keep = terms.layer <= l  # the embedding and the constant bias term have layer -1
                cumulative.append(terms.values[:, keep].sum(dim=1))
            return torch.stack(cumulative)

    def nearest(self, vectors: Float[Tensor, "n d_proj"]) -> tuple[Int[Tensor, "n k"], Float[Tensor, "n k"]]:
        """Pool indices and cosine similarities of the ``k`` descriptions nearest to any vectors of the joint space."""
        similarity = F.normalize(vectors.to(self.text_embeddings), dim=-1) @ self.text_embeddings.T
        scores, indices = similarity.topk(self.k, dim=-1)
        return indices, scores

    def describe(self, vectors: Float[Tensor, "n d_proj"]) -> list[str]:
        """The nearest description of each vector."""
        indices, _ = self.nearest(vectors)
        return [self.texts[i] for i in indices[:, 0].tolist()]

    def decode_layers(self, images: Tensor, layers: Any = None, fwd_hooks: HookList | None = None) -> LayerDescriptions:
        """Nearest descriptions after every block in ``layers`` (default: all)."""
        layers = _check_layers(layers, self.n_layers)
        embeddings = self.embed_layers(images, layers, fwd_hooks)
        n_layers, batch, d = embeddings.shape
        indices, scores = self.nearest(embeddings.reshape(n_layers * batch, d))
        indices, scores = indices.reshape(n_layers, batch, -1), scores.reshape(n_layers, batch, -1)
        candidates = [[[self.texts[j] for j in row] for row in layer_rows] for layer_rows in indices.tolist()]
        texts = [[c[0] for c in layer_rows] for layer_rows in candidates]
        return LayerDescriptions(texts, layers, indices.cpu(), scores.cpu(), candidates)


def _readout(vision: Any, resid: Tensor) -> Tensor:
    """The model's own readout (final LayerNorm, pooling, projection) applied to any residual stream, without hooks."""
    cfg, ln = vision.cfg, vision.ln_final

    def norm(x: Tensor) -> Tensor:
        return F.layer_norm(x, ln.w.shape, ln.w, ln.b, ln.eps)

    if cfg.final_norm == "pre_pool":
        pooled = vision.pool(norm(resid))
    elif cfg.final_norm == "post_pool":
        pooled = norm(vision.pool(resid))
    else:
        pooled = vision.pool(resid)
    return torch.matmul(pooled, vision.W_proj)


# ---------------------------------------------------------------------------------------------- captioners


class CaptionerDecoder:
    """Decode layers with a captioning model whose vision tower is a HookedViT.

    Args:
        captioner: Anything with ``n_layers`` and ``caption(images, layer=l, fwd_hooks=hooks, **kwargs)
            -> list[str]``, e.g. :class:`vit_lens.HookedBlip2` (which feeds
            ``ln_final`` of the residual stream after block ``l`` to its Q-Former).
        **caption_kwargs: Passed to every ``caption`` call (``max_new_tokens``, ``num_beams``,
            ``input_ids`` for a prompt, ...).

    Example:
        >>> blip = HookedBlip2.from_pretrained("Salesforce/blip2-flan-t5-xl")  # doctest: +SKIP
        >>> descriptions = decode_layers(CaptionerDecoder(blip, max_new_tokens=20), pixel_values)  # doctest: +SKIP
    """

    def __init__(self, captioner: Any, **caption_kwargs: Any):
        if not callable(getattr(captioner, "caption", None)) or not hasattr(captioner, "n_layers"):
            raise TypeError(
                f"CaptionerDecoder needs a captioner with n_layers and caption(images, layer=, fwd_hooks=), "
                f"got {type(captioner).__name__}"
            )
        self.captioner = captioner
        self.caption_kwargs = caption_kwargs

    @property
    def n_layers(self) -> int:
        return self.captioner.n_layers

    def decode_layers(self, images: Tensor, layers: Any = None, fwd_hooks: HookList | None = None) -> LayerDescriptions:
        layers = _check_layers(layers, self.n_layers)
        texts = [list(self.captioner.caption(images, layer=l, fwd_hooks=fwd_hooks, **self.caption_kwargs)) for l in layers]
        return LayerDescriptions(texts, layers)


# ---------------------------------------------------------------------------------------------- analyses


def decode_layers(
    decoder: Any,
    images: Any,
    layers: Any = None,
    *,
    fwd_hooks: HookList | None = None,
    batch_size: int | None = None,
) -> LayerDescriptions:
    """``D(Z^l)`` for every block ``l`` in ``layers`` and every image, in batches.

    Args:
        decoder: A :class:`LayerDecoder` (:class:`CLIPLens`, :class:`CaptionerDecoder`, your own).
        images: ``[batch, channels, height, width]``, preprocessed for the model.
        layers: Block indices (negative count from the end); default all.
        fwd_hooks: Interventions on the vision tower, active while decoding.
        batch_size: Images per decoder call (default: all at once).

    Returns:
        :class:`LayerDescriptions`.

    Example:
        >>> descriptions = decode_layers(CLIPLens(clip, pool), images, layers=[-3, -2, -1])  # doctest: +SKIP
    """
    if not isinstance(decoder, LayerDecoder):
        raise TypeError(
            f"decoder must have n_layers and decode_layers(images, layers, fwd_hooks) (see LayerDecoder), got "
            f"{type(decoder).__name__}"
        )
    if not isinstance(images, Tensor) or images.ndim != 4 or len(images) == 0:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty [batch, channels, height, width] tensor, got {shape}")
    layers = _check_layers(layers, decoder.n_layers)
    step = len(images) if batch_size is None else batch_size
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    parts = []
    for start in range(0, len(images), step):
        part = decoder.decode_layers(images[start : start + step], layers, fwd_hooks)
        if not isinstance(part, LayerDescriptions):
            part = LayerDescriptions([list(row) for row in part], layers)
        if part.layers != layers or any(len(row) != len(images[start : start + step]) for row in part.texts):
            raise ValueError(
                f"{type(decoder).__name__}.decode_layers must return one description per image for each of the layers "
                f"{layers}; got layers {part.layers} with {[len(row) for row in part.texts]} descriptions"
            )
        parts.append(part)
    return _concatenate(parts)


def _concatenate(parts: list[LayerDescriptions]) -> LayerDescriptions:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    texts = [sum((p.texts[i] for p in parts), []) for i in range(len(first.layers))]
    has_scores = all(p.scores is not None for p in parts)
    return LayerDescriptions(
        texts,
        first.layers,
        torch.cat([p.indices for p in parts], dim=1) if has_scores else None,
        torch.cat([p.scores for p in parts], dim=1) if has_scores else None,
        [sum((p.candidates[i] for p in parts), []) for i in range(len(first.layers))] if has_scores else None,
    )


def delta_s(descriptions: Any, metric: Any = "rouge_l") -> Float[Tensor, "transition image"]:
    """the "Peeling Back the Layers" paper's linguistic difference ``ΔS^l = Metric(D(Z^l), D(Z^{l-1}))`` between adjacent decoded layers.

    Args:
        descriptions: :class:`LayerDescriptions`, or ``[layer][image]`` lists of strings.
        metric: A name from :mod:`vit_lens.methods.layers.text_metrics` or ``metric(candidates, references) -> [n]``.
            It is called once per transition with every image's pair, so CIDEr's document
            frequencies come from the previous layer's descriptions of all images.

    Returns:
        ``[n_layers - 1, n_images]``: row ``i`` compares ``layers[i + 1]`` (candidate) with
        ``layers[i]`` (reference). A similarity: high where the description barely changed.

    Example:
        >>> delta_s([["red object", "red object"], ["red object", "blue object"]], "exact").tolist()
        [[1.0, 0.0]]
    """
    texts = _texts(descriptions)
    score = get_metric(metric)
    rows = [score(texts[i + 1], texts[i]) for i in range(len(texts) - 1)]
    if not rows:
        return torch.zeros(0, len(texts[0]), dtype=torch.float64)
    return torch.stack([torch.as_tensor(r, dtype=torch.float64).reshape(len(texts[0])) for r in rows])


def convergence_layer(
    texts: Sequence[str], layers: Sequence[int] | None = None, *, metric: Any = None, threshold: float = 1.0
) -> int:
    """The first layer from which one image's description stays the final one (Table 1's "convergence layer").

    Args:
        texts: The image's descriptions, one per layer, in layer order.
        layers: The layer number of each entry (default ``0, 1, ...``).
        metric: None: descriptions must be equal (after stripping whitespace). Otherwise a
            metric (name or function); a description counts as the final one where
            ``metric(description, final) >= threshold``.
        threshold: See ``metric``.

    Returns:
        ``layers[i]`` for the smallest ``i`` such that every description from ``i`` on matches the
        last one (the last layer itself when only it does).

    Example:
        >>> convergence_layer(["sky", "red object", "blue object", "red object", "red object"])
        3
    """
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of descriptions, one per layer")
    layers = list(range(len(texts))) if layers is None else list(layers)
    if len(layers) != len(texts):
        raise ValueError(f"{len(texts)} descriptions but {len(layers)} layer numbers")
    same = _matches_final([list(texts)], metric, threshold)[0]
    return layers[_first_of_final_run(same)]


def convergence_layers(descriptions: Any, *, metric: Any = None, threshold: float = 1.0) -> Int[Tensor, " image"]:
    """:func:`convergence_layer` of every image: ``[n_images]`` layer numbers (average them for Table 1).

    With a ``metric``, it is called once with every (image, layer) description against that
    image's final one (so CIDEr's document frequencies come from the final descriptions).

    Example:
        >>> convergence_layers([["sky", "sky"], ["red object", "sky"], ["red object", "sky"]]).tolist()
        [1, 0]
    """
    texts = _texts(descriptions)
    layers = descriptions.layers if isinstance(descriptions, LayerDescriptions) else list(range(len(texts)))
    per_image = [[row[n] for row in texts] for n in range(len(texts[0]))]
    same = _matches_final(per_image, metric, threshold)
    return torch.tensor([layers[_first_of_final_run(s)] for s in same], dtype=torch.long)


def _matches_final(per_image: list[list[str]], metric: Any, threshold: float) -> list[list[bool]]:
    if metric is None:
        return [[t.strip() == seq[-1].strip() for t in seq] for seq in per_image]
    score = get_metric(metric)
    candidates = [t for seq in per_image for t in seq]
    references = [seq[-1] for seq in per_image for _ in seq]
    values = torch.as_tensor(score(candidates, references)).reshape(-1).tolist()
    out, start = [], 0
    for seq in per_image:
        out.append([v >= threshold for v in values[start : start + len(seq)]])
        out[-1][-1] = True  # the final description is the final one, whatever a corpus metric says
        start += len(seq)
    return out


def _first_of_final_run(same: list[bool]) -> int:
    index = len(same) - 1
    while index > 0 and same[index - 1]:
        index -= 1
    return index


def _texts(descriptions: Any) -> list[list[str]]:
    texts = descriptions.texts if isinstance(descriptions, LayerDescriptions) else descriptions
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise TypeError("descriptions must be LayerDescriptions or a non-empty [layer][image] list of strings")
    rows = [list(row) for row in texts]
    if any(isinstance(row, str) for row in texts) or len({len(row) for row in rows}) != 1 or not rows[0]:
        raise ValueError("descriptions must be a [layer][image] list: one list per layer, each with every image's description")
    return rows


def _check_layers(layers: Any, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):
        layers = [layers]
    if not isinstance(layers, Sequence) or not layers or not all(isinstance(l, int) for l in layers):
        raise ValueError(f"layers must be a non-empty list of block indices in [-{n_layers}, {n_layers - 1}], got {layers!r}")
    bad = [l for l in layers if not -n_layers <= l < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {n_layers} blocks (valid: -{n_layers} .. {n_layers - 1})")
    out = sorted({l % n_layers for l in layers})
    return out


# ---------------------------------------------------------------------------------------------- pruning


@dataclass
class PruningEvaluation:
    """Table 1 of "Peeling Back the Layers": convergence layers and an output metric, without and with a head mask.

    Attributes:
        before, after: The decoded descriptions of the unmodified and the pruned model.
        convergence_before, convergence_after: ``[image]`` convergence layers.
        output_before, output_after: ``[image]`` output metric of the final layer's description
            against the references (None without references).
        output_metric: Its name.
    """

    before: LayerDescriptions
    after: LayerDescriptions
    convergence_before: Int[Tensor, " image"]
    convergence_after: Int[Tensor, " image"]
    output_before: Float[Tensor, " image"] | None
    output_after: Float[Tensor, " image"] | None
    output_metric: str

    def summary(self) -> dict[str, float]:
        """Means over images: ``{"convergence_before", "convergence_after", "output_before", "output_after"}``."""
        out = {
            "convergence_before": self.convergence_before.double().mean().item(),
            "convergence_after": self.convergence_after.double().mean().item(),
        }
        if self.output_before is not None:
            out["output_before"] = self.output_before.mean().item()
            out["output_after"] = self.output_after.mean().item()
        return out

    def report(self) -> str:
        """A two-row table like the paper's Table 1."""
        s = self.summary()
        has_output = "output_before" in s
        head = f"{'':<20}" + (f"{self.output_metric + ' ↑':>12}" if has_output else "") + f"{'convergence ↓':>16}"
        rows = [head]
        for label, key in (("model", "before"), ("+ head pruning", "after")):
            output = f"{s['output_' + key]:>12.4f}" if has_output else ""
            rows.append(f"{label:<20}{output}{s['convergence_' + key]:>16.2f}")
        return "\n".join(rows)

    def figure(self, title: str | None = None):
        """Histogram of the convergence layers before and after pruning (plotly)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for name, values in (("model", self.convergence_before), ("pruned", self.convergence_after)):
            fig.add_trace(go.Histogram(x=values.tolist(), name=name, xbins=dict(size=1)))
        fig.update_layout(
            barmode="group", title=title or "convergence layer per image", xaxis_title="convergence layer",
            yaxis_title="images", width=560, height=360,
        )
        return fig


def evaluate_pruning(
    decoder: Any,
    images: Any,
    pruning: Any,
    references: Sequence[Any] | None = None,
    *,
    output_metric: Any = "cider",
    layers: Any = None,
    convergence_metric: Any = None,
    threshold: float = 1.0,
    batch_size: int | None = None,
) -> PruningEvaluation:
    """Evaluate a head pruning as the "Peeling Back the Layers" paper's Table 1: mean convergence layer and the output metric.

    Args:
        decoder: A :class:`LayerDecoder` over the model that was pruned.
        images: The evaluation images (the paper: the samples not used to choose the pruning).
        pruning: A :class:`vit_lens.intervene.pruning.HeadPruning`, a ``[n_layers, n_heads]`` mask of
            multipliers (:func:`vit_lens.intervene.interventions.mask_heads`), or a list of ``fwd_hooks``.
        references: Golden descriptions, one string (or list of strings) per image; the output
            metric compares the final layer's description with them. None: no output metric.
        output_metric: Metric name or function for the output (the paper: CIDEr, over the corpus).
        layers: Layers decoded for the convergence layer (default: all).
        convergence_metric, threshold: How a description "is the final one" (see
            :func:`convergence_layer`; default exact equality).
        batch_size: Images per decoder call.

    Returns:
        :class:`PruningEvaluation`; ``.report()`` prints the table.

    Example:
        >>> pruning = prune_heads(clip, sample_images, layers=[-1], n_prune=1)  # doctest: +SKIP
        >>> result = evaluate_pruning(CLIPLens(clip, pool), test_images, pruning, references=captions)  # doctest: +SKIP
        >>> print(result.report())  # doctest: +SKIP
    """
    hooks = _pruning_hooks(pruning)
    if references is not None and len(references) != len(images):
        raise ValueError(f"references must give one description (or list) per image: {len(references)} for {len(images)} images")
    before = decode_layers(decoder, images, layers, batch_size=batch_size)
    after = decode_layers(decoder, images, layers, fwd_hooks=hooks, batch_size=batch_size)
    output_before = output_after = None
    name = output_metric if isinstance(output_metric, str) else getattr(output_metric, "__name__", "metric")
    if references is not None:
        score = get_metric(output_metric)
        output_before = torch.as_tensor(score(before.final(), list(references)), dtype=torch.float64)
        output_after = torch.as_tensor(score(after.final(), list(references)), dtype=torch.float64)
    return PruningEvaluation(
        before,
        after,
        convergence_layers(before, metric=convergence_metric, threshold=threshold),
        convergence_layers(after, metric=convergence_metric, threshold=threshold),
        output_before,
        output_after,
        name,
    )


def _pruning_hooks(pruning: Any) -> list:
    from vit_lens.intervene.interventions import mask_heads
    from vit_lens.intervene.pruning import HeadPruning

    if isinstance(pruning, HeadPruning):
        return pruning.hooks()
    if isinstance(pruning, Tensor):
        return mask_heads(pruning)
    if isinstance(pruning, Sequence) and all(isinstance(p, tuple) and len(p) == 2 for p in pruning):
        return list(pruning)
    raise TypeError(
        f"pruning must be a HeadPruning (vit_lens.intervene.pruning.prune_heads), a [n_layers, n_heads] mask tensor or a "
        f"list of (hook_name, fn) fwd_hooks, got {type(pruning).__name__}"
    )


def description_scorer(lens: CLIPLens, metric: Any = "rouge_l") -> Callable[[Tensor, Tensor], Tensor]:
    """A :func:`vit_lens.intervene.pruning.prune_heads` scorer that compares decoded descriptions, as Algorithm 1 does.

    Each head's direct contribution and its layer's whole contribution are decoded with the lens
    (nearest pool description in the joint space) and the head scores ``metric(D(head), D(layer))``
    (the paper: BERTScore).

    Example:
        >>> pruning = prune_heads(clip, sample_images, layers=[-1], scorer=description_scorer(lens, "rouge_l"))  # doctest: +SKIP
    """
    score = get_metric(metric)

    def scorer(head_terms: Tensor, layer_term: Tensor) -> Tensor:
        batch, n_heads, d = head_terms.shape
        heads = lens.describe(head_terms.reshape(batch * n_heads, d))
        combined = lens.describe(layer_term)
        references = [combined[b] for b in range(batch) for _ in range(n_heads)]
        return torch.as_tensor(score(heads, references), dtype=torch.float32).reshape(batch, n_heads)

    return scorer


# ---------------------------------------------------------------------------------------------- figure


def plot_layer_descriptions(
    descriptions: LayerDescriptions, *, metric: Any = "rouge_l", image: int | None = None, title: str | None = None
):
    """ΔS^l over layers with the descriptions as labels, and the convergence layer marked (plotly).

    Args:
        descriptions: From :func:`decode_layers`.
        metric: For ΔS^l (see :func:`delta_s`).
        image: One image: its ΔS^l curve, each point labelled with that layer's description, and
            a dashed line at its convergence layer. None: the mean ΔS^l over images and the mean
            convergence layer.
        title: Figure title.

    Example:
        >>> fig = plot_layer_descriptions(descriptions, metric="rouge_l", image=0)  # doctest: +SKIP
    """
    import plotly.graph_objects as go

    if not isinstance(descriptions, LayerDescriptions):
        raise TypeError(f"plot_layer_descriptions takes LayerDescriptions (from decode_layers), got {type(descriptions).__name__}")
    if image is not None and not 0 <= image < descriptions.n_images:
        raise ValueError(f"image must be in [0, {descriptions.n_images - 1}], got {image}")
    delta = delta_s(descriptions, metric)
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    layers = descriptions.layers
    convergence = convergence_layers(descriptions).double()
    fig = go.Figure()
    if image is None:
        values = delta.mean(dim=1).tolist()
        fig.add_trace(go.Scatter(x=layers[1:], y=values, mode="lines+markers", name=f"mean ΔS ({name})"))
        marker, label = convergence.mean().item(), "mean convergence layer"
    else:
        texts = descriptions.for_image(image)
        fig.add_trace(
            go.Scatter(
                x=layers, y=[None] + delta[:, image].tolist(), mode="lines+markers+text", text=texts,
                textposition="top center", name=f"ΔS ({name})", hovertext=texts,
            )
        )
        marker, label = convergence[image].item(), "convergence layer"
    fig.add_vline(x=marker, line_dash="dash", annotation_text=label)
    fig.update_layout(
        title=title or "linguistic difference between adjacent layers",
        xaxis_title="layer", yaxis_title=f"ΔS = {name}(D(Z^l), D(Z^(l-1)))", width=720, height=420,
    )
    return fig
