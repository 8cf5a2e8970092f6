"""Attention-head pruning by importance scores ("Peeling Back the Layers", Algorithm 1).

For each layer, every head is scored on a small sample by how well its own output agrees with the
layer's combined output, the scores are averaged over the sample, a softmax over the heads of the
layer turns them into coefficients, each head is scaled by its coefficient, and the lowest-scoring
heads are pruned (coefficient 0).

The paper scores a head by decoding its output and the combined output into text and comparing
the descriptions with BERTScore. A text decoder is optional here, so the default scorer compares
in the model's own output space: the cosine similarity between the head's direct contribution to
the representation and the layer's whole attention contribution (``direct_contributions`` at
level ``"head"``). Any ``scorer(head_terms, layer_term) -> [batch, head]`` can replace it.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from vit_lens.intervene._validate import check_indices
from vit_lens.intervene.decompose import direct_contributions, required_hooks
from vit_lens.intervene.interventions import HookPairs, mask_heads
from vit_lens.model.hooked_vit import image_tower

Scorer = Callable[[Tensor, Tensor], Tensor]


def cosine_scorer(
    head_terms: Float[Tensor, "batch head d"], layer_term: Float[Tensor, "batch d"]
) -> Float[Tensor, "batch head"]:
    """Cosine similarity of each head's direct contribution with its layer's whole contribution."""
    return F.cosine_similarity(head_terms, layer_term[:, None], dim=-1)


@dataclass
class HeadPruning:
    """The outcome of :func:`prune_heads`.

    Attributes:
        scores: ``[n_layers, n_heads]`` average score of every head over the sample.
        coefficients: ``[n_layers, n_heads]`` multipliers: the softmax of the scores within each
            layer (times ``n_heads`` unless ``paper_scale``), 0 for pruned heads, 1 for layers
            left alone.
        pruned: ``[n_layers, n_heads]`` bool, the heads set to 0.
        layers: The layers that were scored and adjusted, as indices in ``[0, n_layers)`` (a
            negative layer given to :func:`prune_heads` is reported here counted from the start).
    """

    scores: Float[Tensor, "layer head"]
    coefficients: Float[Tensor, "layer head"]
    pruned: Tensor
    layers: list[int]

    def hooks(self) -> HookPairs:
        """``fwd_hooks`` that apply the coefficients (each head's ``hook_z`` is scaled).

        Example:
            >>> pruning = prune_heads(model, sample_images, layers=[10, 11], n_prune=2)  # doctest: +SKIP
            >>> pruned_out = model.run_with_hooks(images, fwd_hooks=pruning.hooks())  # doctest: +SKIP
        """
        return mask_heads(self.coefficients)


def head_scores(
    model,
    batches: Iterable[Any] | Tensor,
    layers: list[int] | int | None = None,
    scorer: Scorer = cosine_scorer,
    ln_mode: str = "center_each",
) -> Float[Tensor, "layer head"]:
    """Average ``scorer`` of every head over the sample: ``[n_layers, n_heads]`` (NaN for unscored layers).

    Args:
        model: A HookedViT (or HookedCLIP: its ``.vision`` is used).
        batches: An image batch ``[batch, 3, H, W]`` or an iterable of batches / ``(images, ...)`` tuples.
        layers: Layers to score: a list or one int, negative ones counting from the end (default:
            all). Out-of-range layers raise a ValueError.
        scorer: ``scorer(head_terms [batch, head, d], layer_term [batch, d]) -> [batch, head]``.
        ln_mode: Passed to :func:`vit_lens.intervene.decompose.direct_contributions`.

    Example:
        >>> scores = head_scores(model, sample_loader, layers=[-1])  # [n_layers, n_heads]  # doctest: +SKIP
        >>> scores[-1].argsort(descending=True)[:3]  # the three heads closest to their layer's output  # doctest: +SKIP
    """
    model = image_tower(model)
    cfg = model.cfg
    layers = check_indices(layers, cfg.n_layers, "layers", "head_scores", allow_empty=False)
    totals = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
    count = 0
    names = required_hooks(model, "head", layers)
    for batch in [batches] if isinstance(batches, Tensor) else batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        with torch.no_grad():
            _, cache = model.run_with_cache(images, names_filter=names)
            heads = direct_contributions(model, cache, level="head", layers=layers, ln_mode=ln_mode).heads()
        for row, layer in enumerate(layers):
            layer_term = heads[:, row].sum(dim=1)  # the layer's attention contribution (without b_O)
            score = scorer(heads[:, row], layer_term)
            if score.shape != heads.shape[:1] + heads.shape[2:3]:
                raise ValueError(f"scorer must return [batch, head] = {tuple(heads.shape[:1] + heads.shape[2:3])}, "
                                 f"got {tuple(score.shape)}")
            totals[layer] += score.double().sum(dim=0)
        count += len(images)
    if count == 0:
        raise ValueError("head_scores got no images")
    scores = torch.full_like(totals, float("nan"))
    scores[layers] = totals[layers] / count
    return scores.float()


def prune_heads(
    model,
    batches: Iterable[Any] | Tensor,
    layers: list[int] | int | None = None,
    n_prune: int = 1,
    scorer: Scorer = cosine_scorer,
    temperature: float | int = 1.0,
    paper_scale: bool = False,
) -> HeadPruning:
    """Algorithm 1: score heads on a sample, softmax the scores into coefficients, prune the lowest.

    Args:
        model: A HookedViT (or HookedCLIP).
        batches: The sample (the paper uses 100 images).
        layers: Layers to adjust: a list or one int, negative ones counting from the end (default:
            all); other layers keep coefficient 1. Out-of-range layers raise a ValueError.
        n_prune: Heads set to 0 in each adjusted layer (the lowest scores).
        scorer: See :func:`head_scores`.
        temperature: Softmax temperature over a layer's average scores.
        paper_scale: Use the softmax itself as the coefficients, as Algorithm 1 writes it (they sum
            to 1 over a layer's heads, shrinking the layer's output); by default they are multiplied
            by ``n_heads`` so that equal scores leave the layer unchanged.

    Returns:
        A :class:`HeadPruning`; ``.hooks()`` applies it with ``run_with_hooks``.

    Example:
        >>> pruning = prune_heads(model, sample_images, layers=[10, 11], n_prune=2)  # doctest: +SKIP
        >>> pruning.coefficients[11]  # [n_heads]; two zeros  # doctest: +SKIP
        >>> out = model.run_with_hooks(images, fwd_hooks=pruning.hooks())  # doctest: +SKIP
    """
    model = image_tower(model)
    cfg = model.cfg
    if isinstance(n_prune, bool) or not isinstance(n_prune, int) or not 0 <= n_prune < cfg.n_heads:
        raise ValueError(f"n_prune must be in [0, {cfg.n_heads - 1}] for {cfg.n_heads} heads, got {n_prune!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    layers = check_indices(layers, cfg.n_layers, "layers", "prune_heads", allow_empty=False)
    scores = head_scores(model, batches, layers, scorer)
    coefficients = torch.ones(cfg.n_layers, cfg.n_heads)
    pruned = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.bool)
    for layer in layers:
        weights = torch.softmax(scores[layer] / temperature, dim=0)
        coefficients[layer] = weights if paper_scale else weights * cfg.n_heads
        lowest = torch.argsort(scores[layer])[:n_prune]
        pruned[layer, lowest] = True
        coefficients[layer, lowest] = 0.0
    return HeadPruning(scores, coefficients, pruned, layers)
