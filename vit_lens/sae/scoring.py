"""SAE features scored against a known truth: does some feature detect each factor value, and is it named right?

On the toy world (:mod:`vit_lens.toy`), and so on the models trained on it (the toy CLIP, the
planted classifier and CLIP of :mod:`vit_lens.planted`), every image carries its factor values
(shape, colour, size, position, count, texture). :func:`score_sae_features` asks, for every factor
value, how well the single best feature of an SAE detects it:

* per image, each feature's score is its max (or CLS, or mean) activation over the image's tokens
  (:func:`vit_lens.sae.views.feature_image_scores`);
* per factor value, each feature's AUROC at telling the images with that value from the others
  (:func:`auroc`, exact, ties counted half); the best feature is the one with the highest AUROC;
* the share of factor values whose best feature reaches an AUROC of 0.95;
* whether that feature's name (the best text of :func:`vit_lens.sae.views.name_features`) mentions
  the value.

Example:
    >>> import torch
    >>> auroc(torch.tensor([0.9, 0.1, 0.8, 0.3]), torch.tensor([True, False, True, False]))
    tensor([1.])
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from vit_lens.sae.model import SAE
from vit_lens.sae.views import feature_image_scores, name_features
from vit_lens.toy.world import FACTORS, PLURALS

DETECTION_THRESHOLD = 0.95
"""The AUROC at which a feature counts as detecting a factor value."""


def auroc(
    scores: Float[Tensor, "n *features"], labels: Tensor  # a bool [n], checked below with a directed message
) -> Float[Tensor, " features"]:
    """Area under the ROC curve of each column of ``scores`` at separating ``labels`` True from False.

    The Mann-Whitney form: the probability that a random positive scores above a random negative,
    ties counting one half (many SAE features are zero on most images, so ties matter). Exact, from
    average ranks.

    Args:
        scores: ``[n]`` or ``[n, features]``.
        labels: ``[n]`` bool, with both classes present.

    Returns:
        ``[features]`` (``[1]`` for a 1-D ``scores``).
    """
    if scores.ndim == 1:
        scores = scores[:, None]
    labels = torch.as_tensor(labels)
    if labels.dtype != torch.bool or labels.ndim != 1 or len(labels) != scores.shape[0]:
        raise ValueError(
            f"labels must be a [n={scores.shape[0]}] bool tensor, got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    n_positive = int(labels.sum())
    n_negative = len(labels) - n_positive
    if n_positive == 0 or n_negative == 0:
        raise ValueError(
            f"AUROC needs positives and negatives; the labels hold {n_positive} positive(s) and {n_negative} "
            "negative(s)"
        )
    columns = scores.T.double().contiguous()  # [features, n]
    ordered = columns.sort(dim=1).values
    below = torch.searchsorted(ordered, columns, right=False)
    at_or_below = torch.searchsorted(ordered, columns, right=True)
    ranks = (below + at_or_below + 1).double() / 2  # 1-based ranks, ties averaged
    positive_rank_sum = ranks[:, labels.to(ranks.device)].sum(dim=1)
    return ((positive_rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)).float()


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def mentions(text: str, value: str) -> bool:
    """Whether ``text`` mentions a factor value as a word (a shape in the singular or the plural)."""
    words = _words(text)
    return value in words or PLURALS.get(value, value) in words


@dataclass
class FactorValueScore:
    """The best single feature for one factor value.

    Attributes:
        factor, value: The factor value (``"colour"``, ``"red"``).
        n_images: Images with that value.
        feature: The feature with the highest AUROC at detecting it.
        auroc: That AUROC.
        name: The feature's name (its best text), or None without a text pool.
        name_mentions_value: Whether the name mentions the value (None without a text pool).
    """

    factor: str
    value: str
    n_images: int
    feature: int
    auroc: float
    name: str | None
    name_mentions_value: bool | None


@dataclass
class SAEScorecard:
    """One SAE scored against the truth, one row per factor value.

    Attributes:
        rows: The rows, in :data:`vit_lens.toy.FACTORS` order.
        image_score: How images were scored (``"max"``, ``"cls"``, ``"mean"``).
        threshold: The AUROC counted as detection.
        n_images: Images scored.
        named_by_chance: The share of factor values a name drawn at random from the text pool
            would mention (the mean, over the values, of the share of texts that mention each);
            None without a text pool. :attr:`named_share` means something only well above it.
    """

    rows: list[FactorValueScore]
    image_score: str
    threshold: float
    n_images: int
    named_by_chance: float | None = None

    @property
    def detected_share(self) -> float:
        """Share of factor values whose best feature reaches ``threshold``."""
        return sum(row.auroc >= self.threshold for row in self.rows) / len(self.rows)

    @property
    def named_share(self) -> float | None:
        """Share of factor values whose best feature's name mentions the value (None without names)."""
        if self.rows[0].name_mentions_value is None:
            return None
        return sum(bool(row.name_mentions_value) for row in self.rows) / len(self.rows)

    @property
    def mean_auroc(self) -> float:
        return sum(row.auroc for row in self.rows) / len(self.rows)

    def per_factor(self) -> dict[str, dict[str, float]]:
        """Factor -> its values' mean best AUROC, share detected and share named right."""
        summary = {}
        for factor in dict.fromkeys(row.factor for row in self.rows):
            rows = [row for row in self.rows if row.factor == factor]
            summary[factor] = {
                "mean_auroc": sum(row.auroc for row in rows) / len(rows),
                "detected": sum(row.auroc >= self.threshold for row in rows) / len(rows),
            }
            if rows[0].name_mentions_value is not None:
                summary[factor]["named"] = sum(bool(row.name_mentions_value) for row in rows) / len(rows)
        return summary

    def table(self) -> str:
        """The rows as a plain-text table."""
        lines = [f"{'factor':<9} {'value':<9} {'feature':>7} {'AUROC':>6}  name"]
        for row in self.rows:
            name = "" if row.name is None else f"{row.name!r} ({'right' if row.name_mentions_value else 'wrong'})"
            lines.append(f"{row.factor:<9} {row.value:<9} {row.feature:>7} {row.auroc:>6.3f}  {name}")
        named = self.named_share
        lines.append(
            f"{len(self.rows)} factor values, {self.n_images} images, image score {self.image_score!r}: mean best AUROC "
            f"{self.mean_auroc:.3f}, {100 * self.detected_share:.0f}% detected (AUROC >= {self.threshold})"
            + ("" if named is None else f", {100 * named:.0f}% named right (a random text of the pool: "
               f"{100 * self.named_by_chance:.0f}%)")
        )
        return "\n".join(lines)


def _factors_of(images: Any, factors: Mapping[str, Tensor] | None) -> Mapping[str, Tensor]:
    if factors is None:
        factors = getattr(images, "factors", None)
        if factors is None:
            raise ValueError(
                "Pass factors={name: [n] value indices} with the images, or a vit_lens.toy.ToyBatch, which carries them"
            )
    return factors


@torch.no_grad()
def score_sae_features(
    model: Any,
    sae: SAE,
    images: Any,
    *,
    factors: Mapping[str, Tensor] | None = None,
    values: Mapping[str, Sequence[str]] | None = None,
    texts: Sequence[str] | None = None,
    text_embeddings: Tensor | None = None,
    image_score: str = "max",
    threshold: float = DETECTION_THRESHOLD,
    batch_size: int = 64,
    progress: bool = True,
) -> SAEScorecard:
    """Score an SAE's features against known factor values: best AUROC per value, share detected, names.

    Args:
        model: The model the SAE reads (a HookedViT or HookedCLIP).
        sae: The SAE.
        images: A :class:`vit_lens.toy.ToyBatch` (its images and factors), or images as
            :func:`vit_lens.sae.views.image_batches` takes them, with ``factors``.
        factors: Factor name -> ``[n_images]`` value indices (default: ``images.factors``).
        values: Factor name -> its values' names, in index order (default: :data:`vit_lens.toy.FACTORS`).
        texts: A text pool to name the best features with (e.g. ``vit_lens.toy.description_pool()[0]``);
            None: no names.
        text_embeddings: Output-space vectors for ``texts`` (default: the CLIP text tower's).
        image_score: ``"max"``, ``"cls"`` or ``"mean"`` of a feature's activations over an image's tokens.
        threshold: The AUROC counted as detection.
        batch_size: Images per forward pass when ``images`` is one tensor.
        progress: Show a progress bar.

    Returns:
        An :class:`SAEScorecard`.
    """
    factors = _factors_of(images, factors)
    values = FACTORS if values is None else values
    unknown = sorted(set(factors) - set(values))
    if unknown:
        raise ValueError(f"factors names {unknown}, which values does not list; values has {sorted(values)}")
    if not 0.5 < threshold <= 1:
        raise ValueError(f"threshold must be an AUROC in (0.5, 1], got {threshold!r}")
    scores = feature_image_scores(model, sae, images, image_score=image_score, batch_size=batch_size,
                                  progress=progress)
    best: list[tuple[str, str, int, int, float]] = []
    for factor, indices in factors.items():
        indices = torch.as_tensor(indices).cpu()
        if indices.shape != (scores.shape[0],):
            raise ValueError(
                f"factors[{factor!r}] must hold one value index per image ({scores.shape[0]}), got shape "
                f"{tuple(indices.shape)}"
            )
        for index, value in enumerate(values[factor]):
            labels = indices == index
            if labels.all() or not labels.any():
                continue  # a value every image (or none) has cannot be detected; it is not scored
            areas = auroc(scores, labels)
            feature = int(areas.argmax())
            best.append((factor, value, int(labels.sum()), feature, float(areas[feature])))
    if not best:
        raise ValueError("No factor value is present in some images and absent in others: nothing to score")
    names = chance = None
    if texts is not None:
        found = name_features(model, sae, texts, features=sorted({row[3] for row in best}),
                              text_embeddings=text_embeddings, n_texts=1)
        names = {name.feature: name.texts[0] for name in found}
        chance = sum(sum(mentions(text, row[1]) for text in texts) / len(texts) for row in best) / len(best)
    rows = [
        FactorValueScore(factor, value, n, feature, area, None if names is None else names[feature],
                         None if names is None else mentions(names[feature], value))
        for factor, value, n, feature, area in best
    ]
    return SAEScorecard(rows, image_score, threshold, scores.shape[0], chance)
