"""vit_lens's interpretability methods scored against the planted models' known mechanism (issue 14, point 5).

Two steps, kept apart so that no method can see the answer:

1. :func:`score_heads` runs each method and returns, for every factor of the toy world, a score per
   head ``[n_layers, n_heads]`` (higher: the method says the head carries the factor more) and,
   where the method can localise, a score per head and token group ``[n_layers, n_heads, 3]``, the
   groups in :data:`TOKEN_GROUPS` order (object patches, background patches, CLS). A method receives
   the model (a ``HookedViT`` classifier or a ``HookedCLIP``, never the :class:`PlantedModel`), the task
   data of :class:`TaskData` (images with their factor labels and object masks, and clean / corrupted
   pairs that differ in one factor) and the model's :class:`FactorReadout` (the classifier's logit
   slices, or the CLIP's zero-shot prompts of :func:`vit_lens.toy.factor_prompts`); TextSpan also gets
   the world's description pool (:func:`vit_lens.toy.description_pool`).
2. :func:`evaluate_against_truth` compares the scores with the planted truth: average precision over
   the heads (positives: the factor's planted heads), top-1 hit (is the best-scored head planted for
   the factor) and, for head x token group scores by output position, average precision over the
   ``3 n_layers n_heads`` pairs against the **token group where each planted head's output matters**:
   CLS for a head that writes into CLS; for a head that writes into the patch tokens (hop 1 of a
   two-hop route), both patch groups: the later head reads its own image's background patches, and in
   a pair those hold the other image's objects, so which group carries the difference depends on the
   pair (patching hop 1 at the patches that are background in both images moves nothing). Scores by the token a head *reads* (the
   decomposition's per-token terms) get the same AP against the token group each planted head reads.

:func:`localisation_scores` scores object-localisation maps against the world's true masks (foreground
IoU, mIoU, pixel accuracy and mAP as :class:`~vit_lens.methods.segmentation.maps.SegmentationMetrics`
computes them), and :func:`scorecard` puts everything in one :class:`Scorecard`.

The per-factor **metric** is read from the model's output: for the classifier, the factor's slice of
its logits; for a CLIP, the cosine of the image embedding with each of ``factor_prompts(factor)``.
Single images are scored by the *margin* (the true value's logit minus the mean of the others' logits),
pairs by the *logit difference* (the clean image's value minus the corrupted image's value).

Head methods (:data:`HEAD_METHODS`; each reuses vit_lens's own implementation):

- ``mean_ablation``: the head's ``hook_z`` replaced by its mean over the images, per token
  (:func:`vit_lens.intervene.interventions.mean_ablate`); score = drop of the mean margin.
- ``resample_ablation``: the head's ``hook_z`` taken from another image (each image gets the next
  one's; :func:`~vit_lens.intervene.interventions.resample_ablate`); score = drop of the mean margin.
- ``activation_patching``: pairs differing in the factor, the clean head's ``hook_z`` patched into the
  corrupted run (:func:`vit_lens.intervene.patching.activation_patching`); score = restored fraction
  of the logit difference, ``(patched - corrupted) / (clean - corrupted)``.
- ``attribution_patching``: the same pairs and score, estimated as gradient x difference
  (:func:`~vit_lens.intervene.patching.attribution_patching`).
- ``direct_contributions``: the head's direct contribution to the factor's logits
  (:func:`vit_lens.intervene.decompose.direct_contributions` onto the factor's readout directions);
  score = mean over images of (the true value's contribution minus the mean of the other values').
  It has read-group scores and no output-group scores (a direct effect leaves through CLS only).
- ``textspan`` (CLIP only): TextSpan (:func:`vit_lens.methods.textspan.textspan.textspan_all_heads`,
  5 texts a head from ``description_pool(2)``); score = the share of the head's variance explained
  by the picked texts that mention the factor. No token-group score.
- Baselines, computed the same way: ``random`` (a seeded random score per head and per head x group)
  and ``output_variance`` (the variance over images of the head's output ``z W_O``, the same for every
  factor; per group, averaged over the group's tokens).

Head x token group scores come in two kinds. By the position of the head's output (``head_groups``):
the ablations and patching apply their intervention to the head's ``hook_z`` at the group's tokens only,
attribution patching sums its per-token estimates over the group, and the variance baseline averages
over the group's tokens. By the token the head reads (``head_reads``): direct contributions sum the
``level="head_token"`` terms, which split a head's contribution by source token, over the group. The
groups are per image: the patches holding an object pixel (for pairs, in either image of the pair),
the other patches, and CLS.

Example:
    >>> import vit_lens
    >>> from vit_lens.methods.scorecard import evaluate_against_truth, score_heads, scorecard
    >>> planted = vit_lens.load_planted("classifier")  # doctest: +SKIP
    >>> scores = score_heads(planted, n_images=128, n_pairs=32)  # doctest: +SKIP
    >>> rows = evaluate_against_truth(scores, planted)  # doctest: +SKIP
    >>> scorecard(planted).markdown()  # doctest: +SKIP
"""

import datetime
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vit_lens.intervene.decompose import direct_contributions, required_hooks
from vit_lens.intervene.interventions import mean_ablate, resample_ablate
from vit_lens.intervene.patching import activation_patching, attribution_patching
from vit_lens.methods.segmentation import maps
from vit_lens.methods.segmentation.maps import (
    SegmentationMetrics,
    attention_gradcam,
    attention_rollout,
    average_precision,
    chefer_relevance,
    raw_attention,
    text_heatmaps,
    upsample,
)
from vit_lens.methods.textspan.textspan import textspan_all_heads
from vit_lens.model.clip import HookedCLIP
from vit_lens.model.hooked_vit import HookedViT, image_tower
from vit_lens.planted.model import PlantedModel, factor_slices
from vit_lens.planted.truth import BACKGROUND_PATCHES, CLS, OBJECT_PATCHES, TOKEN_GROUPS
from vit_lens.planted.verify import differing_scene
from vit_lens.toy.world import (
    COLOURS,
    FACTORS,
    ToyWorld,
    description_pool,
    factor_prompts,
)

SCORECARD_SEED = 4_000_037
"""Default seed of the scorecard's images (far from the training and verification seeds)."""

TEXTSPAN_TEXTS = 5
"""Texts TextSpan picks per head (as the toy CLIP's scorecard)."""

METHOD_NAMES = {
    "mean_ablation": "mean ablation",
    "resample_ablation": "resample ablation",
    "activation_patching": "activation patching",
    "attribution_patching": "attribution patching",
    "direct_contributions": "direct contributions",
    "textspan": "TextSpan",
    "random": "random ranking (baseline)",
    "output_variance": "head-output variance (baseline)",
}
"""Method key -> the name printed in the tables."""

CLIP_ONLY = ("textspan",)
"""Methods that need a text tower."""


# ============================================================================ task data and readout


@dataclass
class FactorPairs:
    """Clean / corrupted image pairs that differ in one factor (the clean one is the source of patching).

    Attributes:
        clean: ``[n, 3, H, W]`` images with the factor at ``clean_values``.
        corrupted: ``[n, 3, H, W]`` the same scenes with another value of the factor (all else equal).
        clean_values, corrupted_values: ``[n]`` value indices into ``FACTORS[factor]``.
        foreground: ``[n, H, W]`` bool: pixels covered by an object in either image of the pair.
    """

    clean: Tensor
    corrupted: Tensor
    clean_values: Tensor
    corrupted_values: Tensor
    foreground: Tensor


@dataclass
class TaskData:
    """Everything a method may see besides the model: the task data, never the planted truth.

    Attributes:
        images: ``[n, 3, H, W]`` fresh images of the toy world in [0, 1].
        labels: Factor name -> ``[n]`` value indices (the task's labels).
        foreground: ``[n, H, W]`` bool object masks of the images.
        pairs: Factor name -> :class:`FactorPairs` differing in that factor.
        factors: The factors scored.
        seed: The seed everything was drawn with (also seeds the random baseline).
    """

    images: Tensor
    labels: dict[str, Tensor]
    foreground: Tensor
    pairs: dict[str, FactorPairs]
    factors: tuple[str, ...]
    seed: int


def task_data(n_images: int = 256, n_pairs: int = 64, seed: int = SCORECARD_SEED,
              factors: Sequence[str] | None = None) -> TaskData:
    """Draw the images and, per factor, the pairs the methods run on.

    Args:
        n_images: Images for the ablations, direct contributions, TextSpan and the variance baseline.
        n_pairs: Pairs per factor for activation and attribution patching.
        seed: Seed of the images (:class:`~vit_lens.toy.ToyWorld` scenes and the pairs' new values).
        factors: Factors to score (default: every factor of :data:`vit_lens.toy.FACTORS`).
    """
    factors = check_factors(factors)
    for name, value in (("n_images", n_images), ("n_pairs", n_pairs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{name} must be an int of at least 2 (the methods compare images), got {value!r}")
    world = ToyWorld(seed=seed)
    batch = world.sample(n_images, seed=seed)
    pairs = {}
    for index, factor in enumerate(factors):
        pair_seed = seed + 1 + index
        rng = np.random.default_rng(pair_seed)
        scenes = world.sample_scenes(n_pairs, seed=pair_seed)
        corrupted = world.render(scenes)
        clean = world.render([differing_scene(world, scene, factor, rng) for scene in scenes])
        pairs[factor] = FactorPairs(
            clean=clean.images, corrupted=corrupted.images, clean_values=clean.factors[factor],
            corrupted_values=corrupted.factors[factor], foreground=clean.foreground | corrupted.foreground,
        )
    return TaskData(batch.images, batch.factors, batch.foreground, pairs, factors, seed)


def check_factors(factors: Sequence[str] | None) -> tuple[str, ...]:
    """The factors to score, checked against :data:`vit_lens.toy.FACTORS` (default: all of them)."""
    return tuple(FACTORS) if factors is None else tuple(_check_names(factors, list(FACTORS), "factor"))


def _check_names(names: str | Sequence[str], known: list[str], what: str) -> list[str]:
    """``names`` (one or several, no repeats) checked against ``known``, with messages that list what exists."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"{what}s is empty; name at least one of {known} (or None for all)")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown!r}; the {what}s are {known}")
    return list(dict.fromkeys(names))


@dataclass
class FactorReadout:
    """How each factor's logits are read from the model's output (the task, not the mechanism).

    Attributes:
        kind: ``"classifier"`` (one slice of the logits per factor) or ``"clip"`` (zero-shot: cosine of
            the image embedding with the unit text embeddings of ``factor_prompts(factor)``).
        directions: Factor name -> ``[d_repr, n_values]``: the classifier head's columns for the factor,
            or the unit text embeddings; what the direct contributions are projected onto.
        slices: For the classifier, factor name -> its slice of the logits.
    """

    kind: str
    directions: dict[str, Tensor]
    slices: dict[str, slice] = field(default_factory=dict)

    def logits(self, output: Tensor, factor: str) -> Tensor:
        """``[batch, n_values]``: the factor's logits from the model's output."""
        if self.kind == "classifier":
            return output[:, self.slices[factor]]
        return F.normalize(output, dim=-1) @ self.directions[factor].to(output)

    def gradient_target(self, factor: str, values: Tensor) -> Tensor:
        """What gradient maps explain per image: a logit index (classifier) or a text direction (CLIP)."""
        if self.kind == "classifier":
            return self.slices[factor].start + values
        return self.directions[factor].T[values]


@torch.no_grad()
def factor_readout(model: Any) -> FactorReadout:
    """The readout of a planted-architecture classifier (``[batch, 23]`` logits) or of any HookedCLIP.

    Raises:
        TypeError: For a :class:`PlantedModel` (pass ``planted.model``: methods never see the truth) or
            anything but a HookedViT / HookedCLIP.
        ValueError: For a HookedViT whose outputs are not the toy world's 23 factor logits.
    """
    _check_model(model)
    if isinstance(model, HookedCLIP):
        directions = {f: model.encode_text(factor_prompts(f), normalize=True).T.detach() for f in FACTORS}
        return FactorReadout("clip", directions)
    slices = factor_slices()
    n_logits = sum(len(values) for values in FACTORS.values())
    if model.cfg.n_classes != n_logits or model.cfg.d_proj is not None:
        raise ValueError(
            f"{model.cfg.model_name} outputs {model.cfg.n_classes or model.cfg.d_proj} values; the scorecard reads a "
            f"classifier of the toy world's {n_logits} factor logits (vit_lens.planted.model.factor_slices) or a "
            "HookedCLIP (zero-shot with vit_lens.toy.factor_prompts)"
        )
    weight = model.head.W_head.detach()
    return FactorReadout("classifier", {f: weight[:, s] for f, s in slices.items()}, slices)


def _check_model(model: Any) -> None:
    if isinstance(model, PlantedModel):
        raise TypeError(
            "the scorecard's methods take the model (planted.model), not the PlantedModel: its truth must never "
            "reach a method; score_heads(planted) passes planted.model on for you"
        )
    if not isinstance(model, (HookedViT, HookedCLIP)):
        raise TypeError(f"expected a HookedViT classifier or a HookedCLIP, got {type(model).__name__}")


def margin(logits: Tensor, values: Tensor) -> Tensor:
    """``[batch]``: the true value's logit minus the mean of the other values' logits."""
    true = logits.gather(1, values[:, None])[:, 0]
    return true - (logits.sum(1) - true) / (logits.shape[1] - 1)


def logit_difference(logits: Tensor, clean_values: Tensor, corrupted_values: Tensor) -> Tensor:
    """``[batch]``: the clean value's logit minus the corrupted value's."""
    return logits.gather(1, clean_values[:, None])[:, 0] - logits.gather(1, corrupted_values[:, None])[:, 0]


def token_groups(model: Any, foreground: Tensor) -> Tensor:
    """``[n, pos, 3]`` bool: each token's group, in :data:`TOKEN_GROUPS` order (object patches, background
    patches, CLS); object patches are the patches holding at least one object pixel."""
    tower = image_tower(model)
    cfg = tower.cfg
    if not cfg.class_token or cfg.n_prefix_tokens != 1:
        raise ValueError(f"token groups need one CLS token and no other prefix token; {cfg.model_name} has "
                         f"{cfg.n_prefix_tokens} prefix tokens")
    objects = F.max_pool2d(foreground.float()[:, None], cfg.patch_size).flatten(1).bool()  # [n, patches]
    n = len(foreground)
    not_cls = torch.zeros(n, 1, dtype=torch.bool)
    groups = {
        OBJECT_PATCHES: torch.cat([not_cls, objects], 1),
        BACKGROUND_PATCHES: torch.cat([not_cls, ~objects], 1),
        CLS: torch.cat([~not_cls, torch.zeros_like(objects)], 1),
    }
    return torch.stack([groups[g] for g in TOKEN_GROUPS], dim=-1)


# ============================================================================ the methods


@dataclass
class MethodScores:
    """One method's scores per factor.

    Attributes:
        heads: Factor -> ``[n_layers, n_heads]``.
        head_groups: Factor -> ``[n_layers, n_heads, 3]`` (groups in :data:`TOKEN_GROUPS` order) by the
            position of the head's output (the query token), or None where the method gives none.
        head_reads: Factor -> ``[n_layers, n_heads, 3]`` by the token the head reads (the key token), or None.
        seconds: Wall-clock time of the method.
    """

    heads: dict[str, Tensor]
    head_groups: dict[str, Tensor] | None
    head_reads: dict[str, Tensor] | None = None
    seconds: float = 0.0


def _z(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _where_hook(head: int, values: Tensor, mask: Tensor) -> Callable:
    """Replace ``hook_z[:, :, head]`` by ``values`` (``[batch or 1, pos, d_head]``) where ``mask`` (``[batch, pos]``)
    holds."""

    def hook(z: Tensor, hook: Any) -> Tensor:
        z = z.clone()
        z[:, :, head] = torch.where(mask[..., None], values, z[:, :, head])
        return z

    return hook


def _shape(model: Any) -> tuple[int, int]:
    cfg = image_tower(model).cfg
    return cfg.n_layers, cfg.n_heads


@torch.no_grad()
def _ablation(model: Any, data: TaskData, readout: FactorReadout, replacement: str) -> MethodScores:
    n_layers, n_heads = _shape(model)
    output, cache = model.run_with_cache(data.images, names_filter=[_z(l) for l in range(n_layers)])
    clean = {f: margin(readout.logits(output, f), data.labels[f]).mean() for f in data.factors}
    groups = token_groups(model, data.foreground)
    heads = {f: torch.zeros(n_layers, n_heads) for f in data.factors}
    head_groups = {f: torch.zeros(n_layers, n_heads, len(TOKEN_GROUPS)) for f in data.factors}
    # each image takes the next image's activations: the images are independent draws
    permutation = torch.roll(torch.arange(len(data.images)), -1)
    for layer in range(n_layers):
        z = cache[_z(layer)]
        if replacement == "mean":
            values = z.mean(0, keepdim=True)
            whole = [mean_ablate(values[0], heads=h) for h in range(n_heads)]
        else:
            values = z[permutation]
            whole = [resample_ablate(z, permutation=permutation, heads=h) for h in range(n_heads)]
        for head in range(n_heads):
            runs = [(None, whole[head])] + [(g, _where_hook(head, values[:, :, head], groups[..., g]))
                                             for g in range(len(TOKEN_GROUPS))]
            for group, hook in runs:
                ablated = model.run_with_hooks(data.images, fwd_hooks=[(_z(layer), hook)])
                for f in data.factors:
                    drop = clean[f] - margin(readout.logits(ablated, f), data.labels[f]).mean()
                    if group is None:
                        heads[f][layer, head] = drop
                    else:
                        head_groups[f][layer, head, group] = drop
    return MethodScores(heads, head_groups)


def mean_ablation(model: Any, data: TaskData, readout: FactorReadout) -> MethodScores:
    """Each head's ``hook_z`` (and, per token group, its group tokens) replaced by its mean over the images;
    score = drop of the factor's mean margin."""
    _check_model(model)
    return _ablation(model, data, readout, "mean")


def resample_ablation(model: Any, data: TaskData, readout: FactorReadout) -> MethodScores:
    """Each head's ``hook_z`` (and, per token group, its group tokens) taken from another image; score = drop
    of the factor's mean margin."""
    _check_model(model)
    return _ablation(model, data, readout, "resample")


def _pair_metric(readout: FactorReadout, factor: str, pairs: FactorPairs) -> Callable[[Tensor], Tensor]:
    def metric(output: Tensor) -> Tensor:
        return logit_difference(readout.logits(output, factor), pairs.clean_values, pairs.corrupted_values)

    return metric


def activation_patching_scores(model: Any, data: TaskData, readout: FactorReadout) -> MethodScores:
    """Per head (:func:`~vit_lens.intervene.patching.activation_patching` of ``z`` by head) and per head x
    token group (the same patch at the group's tokens): the restored fraction of the logit difference."""
    _check_model(model)
    n_layers, n_heads = _shape(model)
    heads, head_groups = {}, {}
    for factor in data.factors:
        pairs = data.pairs[factor]
        metric = _pair_metric(readout, factor, pairs)
        names = ["blocks.0.hook_resid_pre"] + [_z(l) for l in range(n_layers)]
        with torch.no_grad():
            _, clean_cache = model.run_with_cache(pairs.clean, names_filter=names)
        result = activation_patching(model, pairs.corrupted, clean_cache, metric, activation="z", by="head")
        heads[factor] = result.normalized().values.float()
        span = result.baseline_clean - result.baseline_corrupted
        groups = token_groups(model, pairs.foreground)
        per_group = torch.zeros(n_layers, n_heads, len(TOKEN_GROUPS))
        with torch.no_grad():
            for layer in range(n_layers):
                for head in range(n_heads):
                    for g in range(len(TOKEN_GROUPS)):
                        hook = _where_hook(head, clean_cache[_z(layer)][:, :, head], groups[..., g])
                        patched = model.run_with_hooks(pairs.corrupted, fwd_hooks=[(_z(layer), hook)])
                        per_group[layer, head, g] = (metric(patched).mean() - result.baseline_corrupted) / span
        head_groups[factor] = per_group
    return MethodScores(heads, head_groups)


def attribution_patching_scores(model: Any, data: TaskData, readout: FactorReadout) -> MethodScores:
    """Per head (:func:`~vit_lens.intervene.patching.attribution_patching` of ``z`` by head) and per head x
    token group (its per-token estimates, one pair at a time, summed over the pair's group tokens): the
    estimated restored fraction of the logit difference."""
    _check_model(model)
    n_layers, n_heads = _shape(model)
    heads, head_groups = {}, {}
    for factor in data.factors:
        pairs = data.pairs[factor]
        result = attribution_patching(model, pairs.clean, pairs.corrupted, _pair_metric(readout, factor, pairs),
                                      activation="z", by="head")
        heads[factor] = result.normalized().values.float()
        span = result.baseline_clean - result.baseline_corrupted
        groups = token_groups(model, pairs.foreground).double()  # [n, pos, 3]
        total = torch.zeros(n_layers, n_heads, len(TOKEN_GROUPS), dtype=torch.float64)
        for i in range(len(pairs.clean)):
            one = FactorPairs(pairs.clean[i : i + 1], pairs.corrupted[i : i + 1], pairs.clean_values[i : i + 1],
                              pairs.corrupted_values[i : i + 1], pairs.foreground[i : i + 1])
            per_token = attribution_patching(model, one.clean, one.corrupted, _pair_metric(readout, factor, one),
                                             activation="z", by="head_position")
            estimate = per_token.values - per_token.baseline_corrupted  # [layer, head, pos]
            total += torch.einsum("lhp,pg->lhg", estimate, groups[i])
        # the batch metric is the mean over pairs, so the batch's attribution is the mean of the pairs'
        head_groups[factor] = (total / len(pairs.clean) / span).float()
    return MethodScores(heads, head_groups)


def _separation(contributions: Tensor, values: Tensor) -> Tensor:
    """Mean over images of (the true value's contribution minus the mean of the others'); values on the last axis."""
    true = contributions.gather(-1, values.view(-1, *[1] * (contributions.ndim - 1)).expand(
        *contributions.shape[:-1], 1))[..., 0]
    others = (contributions.sum(-1) - true) / (contributions.shape[-1] - 1)
    return (true - others).mean(0)


@torch.no_grad()
def direct_contribution_scores(model: Any, data: TaskData, readout: FactorReadout) -> MethodScores:
    """The head's direct contribution to the factor's logits; score = mean over images of (true value minus the
    mean of the others). Per token group, the ``head_token`` decomposition splits the contribution by the token
    the head reads (``head_reads``); by output position there is nothing to split: a direct effect leaves
    through the CLS readout alone (``head_groups`` is None)."""
    _check_model(model)
    directions = torch.cat([readout.directions[f] for f in data.factors], dim=1)
    widths = [readout.directions[f].shape[1] for f in data.factors]
    _, cache = model.run_with_cache(data.images, names_filter=required_hooks(model, "head_token"))
    # a CLIP's zero-shot logits are cosines: divide the terms by the embedding's norm, as they are
    normalize = readout.kind == "clip"
    terms = direct_contributions(model, cache, level="head_token", directions=directions, normalize=normalize)
    prefix, patches = terms.token_maps()  # [n, L, H, 1, k], [n, L, H, rows, cols, k]
    per_token = torch.cat([prefix, patches.flatten(3, 4)], dim=3)  # [n, L, H, pos, k]
    groups = token_groups(model, data.foreground).to(per_token)  # [n, pos, 3]
    grouped = torch.einsum("nlhpk,npg->nlhgk", per_token, groups)
    by_head = per_token.sum(3)
    heads, head_reads = {}, {}
    for factor, part_head, part_group in zip(data.factors, by_head.split(widths, -1), grouped.split(widths, -1)):
        heads[factor] = _separation(part_head, data.labels[factor])
        head_reads[factor] = _separation(part_group, data.labels[factor])
    return MethodScores(heads, None, head_reads)


@torch.no_grad()
def textspan_scores(model: Any, data: TaskData, readout: FactorReadout) -> MethodScores:
    """TextSpan on every head with the world's description pool; score = the share of the head's variance
    explained by its picked texts that mention the factor. CLIP only; no token-group score."""
    _check_model(model)
    if not isinstance(model, HookedCLIP):
        raise TypeError(
            f"TextSpan needs a text tower: it picks texts for a head's outputs in the joint embedding space, and "
            f"{type(model).__name__} has none; run it on a HookedCLIP (load_planted('clip'))"
        )
    texts, mentions = description_pool(2)
    pool = model.encode_text(texts, normalize=True)
    _, cache = model.run_with_cache(data.images, names_filter=required_hooks(model, "head"))
    outputs = direct_contributions(model, cache, level="head").heads()  # [n, L, H, d]
    table = textspan_all_heads(outputs, pool, texts, n_texts=TEXTSPAN_TEXTS, layers=list(range(outputs.shape[1])),
                               progress=False)
    n_layers, n_heads = _shape(model)
    heads = {f: torch.zeros(n_layers, n_heads) for f in data.factors}
    for (layer, head), result in table.results.items():
        for step, index in zip(result.step_variance.tolist(), result.indices.tolist()):
            for factor in mentions[index]:
                if factor in heads:
                    heads[factor][layer, head] += step
    return MethodScores(heads, None)


def random_scores(model: Any, data: TaskData, readout: FactorReadout) -> MethodScores:
    """Baseline: a random score per head, per head x output group and per head x read group for each factor,
    seeded by the data's seed."""
    _check_model(model)
    n_layers, n_heads = _shape(model)
    generator = torch.Generator().manual_seed(data.seed)
    heads, head_groups, head_reads = {}, {}, {}
    for factor in data.factors:
        heads[factor] = torch.rand(n_layers, n_heads, generator=generator)
        head_groups[factor] = torch.rand(n_layers, n_heads, len(TOKEN_GROUPS), generator=generator)
        head_reads[factor] = torch.rand(n_layers, n_heads, len(TOKEN_GROUPS), generator=generator)
    return MethodScores(heads, head_groups, head_reads)


@torch.no_grad()
def output_variance_scores(model: Any, data: TaskData, readout: FactorReadout) -> MethodScores:
    """Baseline: the variance over images of each head's output ``z W_O`` (summed over ``d_model``, averaged
    over tokens; per group, over the group's tokens of each image). The same ranking for every factor."""
    _check_model(model)
    tower = image_tower(model)
    n_layers, n_heads = _shape(model)
    _, cache = model.run_with_cache(data.images, names_filter=[_z(l) for l in range(n_layers)])
    groups = token_groups(model, data.foreground).float()  # [n, pos, 3]
    by_head = torch.zeros(n_layers, n_heads)
    by_group = torch.zeros(n_layers, n_heads, len(TOKEN_GROUPS))
    for layer in range(n_layers):
        outputs = torch.einsum("nphd,hdm->nphm", cache[_z(layer)], tower.blocks[layer].attn.W_O)
        squared = (outputs - outputs.mean(0, keepdim=True)).pow(2).sum(-1)  # [n, pos, head]
        by_head[layer] = squared.mean((0, 1))
        per_image = torch.einsum("nph,npg->nhg", squared, groups) / groups.sum(1).clamp(min=1)[:, None, :]
        by_group[layer] = per_image.mean(0)
    return MethodScores({f: by_head.clone() for f in data.factors}, {f: by_group.clone() for f in data.factors})


HEAD_METHODS: dict[str, Callable[[Any, TaskData, FactorReadout], MethodScores]] = {
    "mean_ablation": mean_ablation,
    "resample_ablation": resample_ablation,
    "activation_patching": activation_patching_scores,
    "attribution_patching": attribution_patching_scores,
    "direct_contributions": direct_contribution_scores,
    "textspan": textspan_scores,
    "random": random_scores,
    "output_variance": output_variance_scores,
}
"""Method key -> ``fn(model, data, readout) -> MethodScores``; a method sees the model and the task data only."""


@dataclass
class HeadScores:
    """Every method's scores (:func:`score_heads`).

    Attributes:
        methods: Method key -> :class:`MethodScores`.
        factors: The factors scored.
        model_kind: ``"classifier"`` or ``"clip"``.
        n_images, n_pairs, seed: The task data's size and seed.
    """

    methods: dict[str, MethodScores]
    factors: tuple[str, ...]
    model_kind: str
    n_images: int
    n_pairs: int
    seed: int


def check_methods(methods: Sequence[str] | None, model: Any) -> list[str]:
    """The method keys to run on ``model`` (default: every method that applies to it)."""
    is_clip = isinstance(model, HookedCLIP)
    if methods is None:
        return [m for m in HEAD_METHODS if is_clip or m not in CLIP_ONLY]
    methods = _check_names(methods, list(HEAD_METHODS), "method")
    if not is_clip and any(m in CLIP_ONLY for m in methods):
        raise ValueError(f"{[m for m in methods if m in CLIP_ONLY]} need a CLIP (a text tower); this model is a "
                         "classifier. Leave them out, or score load_planted('clip')")
    return methods


def score_heads(model: Any, n_images: int = 256, n_pairs: int = 64, seed: int = SCORECARD_SEED,
                methods: Sequence[str] | None = None, factors: Sequence[str] | None = None,
                data: TaskData | None = None) -> HeadScores:
    """Run the head methods and return their scores, per factor (see the module docstring).

    Args:
        model: A planted classifier / CLIP (a :class:`PlantedModel`, of which only ``.model`` is used), or
            the HookedViT / HookedCLIP itself.
        n_images: Images for the single-image methods.
        n_pairs: Pairs per factor for the patching methods.
        seed: Seed of the task data and of the random baseline.
        methods: Method keys (:data:`HEAD_METHODS`); default: every one that applies to the model.
        factors: Factors to score (default: all).
        data: Task data to use instead of drawing it (then ``n_images``, ``n_pairs``, ``seed`` and
            ``factors`` come from it).

    Returns:
        :class:`HeadScores`.
    """
    if isinstance(model, PlantedModel):
        model = model.model  # the truth stays behind
    _check_model(model)
    keys = check_methods(methods, model)
    readout = factor_readout(model)
    if data is None:
        data = task_data(n_images, n_pairs, seed, factors)
    elif factors is not None:
        raise ValueError("pass factors= or data=, not both: the task data fixes the factors")
    results = {}
    for key in keys:
        start = time.perf_counter()
        results[key] = HEAD_METHODS[key](model, data, readout)
        results[key].seconds = time.perf_counter() - start
    n_pairs = len(next(iter(data.pairs.values())).clean)
    return HeadScores(results, data.factors, readout.kind, len(data.images), n_pairs, data.seed)


# ============================================================================ comparison with the truth


def truth_labels(planted: Any, factor: str) -> tuple[Tensor, Tensor, Tensor]:
    """The factor's positives in a :class:`PlantedModel`'s truth: ``[n_layers, n_heads]`` (its planted heads),
    ``[n_layers, n_heads, 3]`` (each planted head at the token group where its output matters, see the
    module docstring) and ``[n_layers, n_heads, 3]`` (each planted head at the token group it reads)."""
    if not isinstance(planted, PlantedModel):
        raise TypeError(f"the truth comes from a PlantedModel (vit_lens.load_planted), got {type(planted).__name__}")
    if factor not in planted.heads:
        raise ValueError(f"unknown factor {factor!r}; the planted factors are {list(planted.heads)}")
    n_layers, n_heads = _shape(planted.model)
    heads = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    groups = torch.zeros(n_layers, n_heads, len(TOKEN_GROUPS), dtype=torch.bool)
    reads = torch.zeros_like(groups)
    planted_heads = [h for h in planted.planted_heads if h.factor == factor]
    for h in planted_heads:
        heads[h.layer, h.head] = True
        reads[h.layer, h.head, TOKEN_GROUPS.index(h.reads)] = True
        if h.writes == CLS:
            groups[h.layer, h.head, TOKEN_GROUPS.index(CLS)] = True
            continue
        readers = [later for later in planted_heads if later.writes == CLS and later.layer > h.layer]
        if not readers:
            raise ValueError(f"planted head L{h.layer}H{h.head} writes {factor} into the patches but no later head "
                             "of the factor moves it to CLS; the truth is inconsistent")
        # It writes into every patch token; which patches carry the difference depends on the pair (the later
        # head reads its own image's background, which holds the other image's objects), so both groups count.
        for group in (OBJECT_PATCHES, BACKGROUND_PATCHES):
            groups[h.layer, h.head, TOKEN_GROUPS.index(group)] = True
    return heads, groups, reads


def chance_average_precision(n_positive: int, n_items: int) -> float:
    """The expected average precision of a uniformly random ranking of ``n_items`` with ``n_positive`` positives.

    A positive at rank ``r`` (uniform over 1..n) has on average ``(n_positive - 1)(r - 1)/(n - 1)``
    other positives above it, so ``E[AP] = mean over r of (1 + (P - 1)(r - 1)/(n - 1)) / r``.

    Example:
        >>> round(chance_average_precision(1, 16), 4)  # the harmonic number H_16 / 16
        0.2113
        >>> chance_average_precision(16, 16)
        1.0
    """
    if not 1 <= n_positive <= n_items:
        raise ValueError(f"need 1 <= n_positive <= n_items, got {n_positive} of {n_items}")
    if n_items == 1:
        return 1.0
    return sum((1 + (n_positive - 1) * (r - 1) / (n_items - 1)) / r for r in range(1, n_items + 1)) / n_items


def top1_hit(scores: Tensor, positives: Tensor) -> float:
    """1 when the best-scored item is a positive, 0 when not; under a tie for the top, the share of positives
    among the tied items (the expected hit of breaking the tie at random)."""
    flat, labels = scores.flatten(), positives.flatten()
    top = flat == flat.max()
    return labels[top].float().mean().item()


def evaluate_against_truth(head_scores: HeadScores, planted: Any) -> list[dict[str, Any]]:
    """One row per method and factor: AP over heads, top-1 hit, the head x output group AP and the head x read
    group AP (None where the method has no such scores), with the number of positives and the chance AP of a
    random ranking.

    Args:
        head_scores: From :func:`score_heads`.
        planted: The planted model whose truth the scores are compared with.
    """
    if not isinstance(planted, PlantedModel):
        raise TypeError(f"evaluate_against_truth compares with a PlantedModel's truth, got {type(planted).__name__}")
    rows = []
    for key, result in head_scores.methods.items():
        for factor in head_scores.factors:
            heads, groups, reads = truth_labels(planted, factor)
            scores = result.heads[factor]
            if scores.shape != heads.shape or not torch.isfinite(scores).all():
                raise ValueError(f"{key} scored {factor} with a {tuple(scores.shape)} tensor (finite values "
                                 f"needed, shape {tuple(heads.shape)})")
            row = {
                "method": key, "factor": factor,
                "ap": average_precision(scores.flatten()[None].double(), heads.flatten()[None]).item(),
                "top1": top1_hit(scores, heads),
                "top_head": _head_label(scores),
                "n_positive": int(heads.sum()),
                "chance_ap": chance_average_precision(int(heads.sum()), heads.numel()),
                "chance_group_ap": chance_average_precision(int(groups.sum()), groups.numel()),
                "chance_read_ap": chance_average_precision(int(reads.sum()), reads.numel()),
            }
            for name, method_scores, truth in (("group_ap", result.head_groups, groups),
                                               ("read_ap", result.head_reads, reads)):
                row[name] = None if method_scores is None else average_precision(
                    method_scores[factor].flatten()[None].double(), truth.flatten()[None]).item()
            rows.append(row)
    return rows


def _head_label(scores: Tensor) -> str:
    layer, head = divmod(int(scores.flatten().argmax()), scores.shape[1])
    return f"L{layer}H{head}"


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: mean AP, top-1 hits, mean head x group APs and mean chance APs over the factors."""

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    summary = []
    for key in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == key]
        summary.append({
            "method": key, "top1_hits": sum(row["top1"] for row in mine), "n_factors": len(mine),
            **{f"mean_{name}": mean([row[name] for row in mine])
               for name in ("ap", "group_ap", "read_ap", "chance_ap", "chance_group_ap", "chance_read_ap")},
        })
    return summary


# ============================================================================ localisation maps


def colour_distance_maps(images: Tensor, colour_values: Tensor) -> Tensor:
    """No-model baseline: ``[n, H, W]`` minus the distance of each pixel's colour to the image's object colour,
    given as value indices into ``FACTORS["colour"]`` (:func:`vit_lens.methods.segmentation.maps.colour_distance_maps`)."""
    palette = torch.tensor(list(COLOURS.values()), dtype=images.dtype)  # [6, 3] in FACTORS["colour"] order
    return maps.colour_distance_maps(images, palette[colour_values])


@torch.no_grad()
def _text_maps(model: Any, images: Tensor, readout: FactorReadout, values: Tensor) -> Tensor:
    maps = text_heatmaps(model, images, readout.directions["colour"])  # [n, 6, rows, cols]
    return maps[torch.arange(len(images)), values]


def localisation_scores(model: Any, n_images: int = 256, seed: int = SCORECARD_SEED,
                        batch: Any = None) -> list[dict[str, Any]]:
    """Object-localisation maps against the world's true masks, with the explained target the image's true colour.

    Maps: raw attention (last layer), attention rollout (from layer 0), GradCAM (last layer) and Chefer
    relevance, both explaining the true colour (the classifier's logit, or a CLIP's zero-shot text
    embedding), and the decomposition maps of :func:`~vit_lens.methods.segmentation.maps.text_heatmaps`
    along the colours' readout directions (for a CLIP: the zero-shot text maps; for the classifier:
    its head's colour columns), taken at the true colour. Baselines: a constant map and the no-model
    colour distance (:func:`colour_distance_maps`, which knows the colour as the text maps do).

    Args:
        model: A HookedViT classifier of the toy world or a HookedCLIP (a PlantedModel: its ``.model``).
        n_images: Fresh images (when ``batch`` is None): the images :func:`task_data` draws with ``seed``.
        seed: Their seed.
        batch: A :class:`~vit_lens.toy.ToyBatch` to use instead.

    Returns:
        One row per map: ``method``, ``name``, ``iou_foreground``, ``miou``, ``pixel_accuracy``, ``map``,
        ``baseline`` (bool), ``seconds``.
    """
    if isinstance(model, PlantedModel):
        model = model.model
    _check_model(model)
    readout = factor_readout(model)
    if batch is None:
        batch = ToyWorld(seed=seed).sample(n_images, seed=seed)
    images, colours = batch.images, batch.factors["colour"]
    target = readout.gradient_target("colour", colours)
    size = tuple(images.shape[-2:])
    text_name = ("zero-shot text maps (Gandelsman et al. 2024), true colour" if readout.kind == "clip"
                 else "decomposition maps (Gandelsman et al. 2024), true colour's class vector")
    makers: dict[str, tuple[str, bool, Callable[[], Tensor]]] = {
        "text_maps": (text_name, False, lambda: _text_maps(model, images, readout, colours)),
        "raw_attention": ("raw attention (last layer)", False, lambda: raw_attention(model, images)),
        "rollout": ("attention rollout", False, lambda: attention_rollout(model, images)),
        "gradcam": ("GradCAM (last layer)", False, lambda: attention_gradcam(model, images, target)),
        "chefer": ("Chefer relevance", False, lambda: chefer_relevance(model, images, target)),
        "constant": ("constant map (baseline)", True, lambda: torch.zeros(len(images), *size)),
        "colour_distance": ("colour distance, no model (baseline)", True,
                            lambda: colour_distance_maps(images, colours)),
    }
    rows = []
    for key, (name, baseline, make) in makers.items():
        start = time.perf_counter()
        heatmap = make().detach()
        if heatmap.shape[-2:] != size:
            heatmap = upsample(heatmap, size)
        metrics = SegmentationMetrics()
        metrics.update(heatmap, batch.foreground)
        result = metrics.compute()
        rows.append({
            "method": key, "name": name, "baseline": baseline, "iou_foreground": result["iou_foreground"],
            "miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"], "map": result["map"],
            "seconds": time.perf_counter() - start,
        })
    return rows


# ============================================================================ the scorecard


@dataclass
class Scorecard:
    """Every method against one planted model's truth (:func:`scorecard`).

    Attributes:
        model: The planted model's name (``"classifier"``, ``"clip"``).
        rows: Per method and factor (:func:`evaluate_against_truth`).
        summary: Per method (:func:`summarise`), with its run time in ``seconds``.
        localisation: Per map (:func:`localisation_scores`).
        settings: Images, pairs, seed, date and time taken.
    """

    model: str
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    localisation: list[dict[str, Any]]
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """A plain dict (JSON-serialisable)."""
        return {"model": self.model, "settings": dict(self.settings), "summary": [dict(r) for r in self.summary],
                "rows": [dict(r) for r in self.rows], "localisation": [dict(r) for r in self.localisation]}

    def markdown(self) -> str:
        """The tables: per-method summary, AP per factor, and localisation."""
        s = self.settings
        factors = list(dict.fromkeys(row["factor"] for row in self.rows))
        out = [
            (f"### Planted {self.model}: head attribution ({s['n_images']} images; {s['n_pairs']} pairs per "
             f"factor for patching; seed {s['seed']})"),
            "",
            (f"AP: average precision of the method's head scores against the factor's planted heads ({s['n_heads']} "
             "heads), averaged over the factors. Top-1: factors whose best-scored head is planted for them. Output "
             "group AP: the same over (head, token group) pairs, against the group where each planted head's output "
             "matters (CLS for a head that writes into CLS; both patch groups for the two-hop route's first head, "
             "which writes into every patch token). Read group AP: against the group each planted head reads."),
            "",
            _table(["method", "mean AP", "top-1", "output group AP", "read group AP", "seconds"], [
                [METHOD_NAMES[r["method"]], format_score(r["mean_ap"]), f"{r['top1_hits']:g}/{r['n_factors']}",
                 format_score(r["mean_group_ap"]), format_score(r["mean_read_ap"]), f"{r['seconds']:.1f}"]
                for r in self.summary
            ] + [["chance (expected AP of a random ranking)", format_score(self.summary[0]["mean_chance_ap"]), "-",
                  format_score(self.summary[0]["mean_chance_group_ap"]), format_score(self.summary[0]["mean_chance_read_ap"]),
                  "-"]]),
            "",
            "AP per factor (the best-scored head in brackets):",
            "",
        ]
        by_key = {(row["method"], row["factor"]): row for row in self.rows}
        table_rows = []
        for r in self.summary:
            cells = [METHOD_NAMES[r["method"]]]
            for f in factors:
                row = by_key[(r["method"], f)]
                cells.append(f"{row['ap']:.2f} ({row['top_head']})")
            table_rows.append(cells)
        planted = {f: by_key[(self.summary[0]["method"], f)]["n_positive"] for f in factors}
        out.append(_table(["method"] + [f"{f} ({planted[f]} planted)" for f in factors], table_rows))
        if not self.localisation:
            return "\n".join(out)
        out += [
            "",
            (f"### Planted {self.model}: object localisation ({s['n_localisation']} images; true masks of all "
             "objects; Chefer et al. protocol)"),
            "",
            _table(["map", "foreground IoU", "mIoU", "pixel accuracy", "mAP"], [
                [r["name"], f"{100 * r['iou_foreground']:.1f}", f"{100 * r['miou']:.1f}",
                 f"{100 * r['pixel_accuracy']:.1f}", f"{100 * r['map']:.1f}"] for r in self.localisation
            ]),
        ]
        return "\n".join(out)


def format_score(value: float | None) -> str:
    """A score in the tables: two decimals, or "-" where the method gives none."""
    return "-" if value is None else f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def scorecard(planted: Any, name: str | None = None, n_images: int = 256, n_pairs: int = 64,
              n_localisation: int = 256, seed: int = SCORECARD_SEED,
              methods: Sequence[str] | None = None) -> Scorecard:
    """Score every method on ``planted`` and compare with its truth (:func:`score_heads`, then
    :func:`evaluate_against_truth` and :func:`localisation_scores`).

    Args:
        planted: A :class:`PlantedModel` (the methods get only its ``.model``).
        name: Its name in the tables (default: ``"clip"`` for a CLIP, else ``"classifier"``).
        n_images, n_pairs, seed, methods: As :func:`score_heads`.
        n_localisation: Images for the localisation maps (0 to skip them).
    """
    if not isinstance(planted, PlantedModel):
        raise TypeError(f"scorecard needs a PlantedModel (its truth is the answer key), got {type(planted).__name__}")
    start = time.perf_counter()
    scores = score_heads(planted, n_images=n_images, n_pairs=n_pairs, seed=seed, methods=methods)
    rows = evaluate_against_truth(scores, planted)
    summary = summarise(rows)
    for row in summary:
        row["seconds"] = scores.methods[row["method"]].seconds
    localisation = localisation_scores(planted, n_localisation, seed) if n_localisation else []
    settings = {
        "n_images": n_images, "n_pairs": n_pairs, "n_localisation": n_localisation, "seed": seed,
        "n_heads": _shape(planted.model)[0] * _shape(planted.model)[1],
        "date": datetime.date.today().isoformat(), "seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    return Scorecard(name or scores.model_kind, rows, summary, localisation, settings)
