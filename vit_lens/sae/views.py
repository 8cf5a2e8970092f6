"""What an SAE feature responds to and what it writes: top images with patch heatmaps, histograms, names.

For a feature of an SAE on a hooked vision model, :func:`feature_views` streams an iterable of
images through the model once and keeps, per feature,

* the ``k`` images where it fires most, with their heatmaps (the feature's activation at each
  patch token, ``[rows, cols]``; :meth:`FeatureView.pixel_heatmaps` upsamples them onto the image);
* a histogram of its non-zero activations over all tokens it reads;
* its density: the share of tokens, and the share of images, where it fires.

Only ``k`` images per feature and fixed-size histograms are held; no activation of the dataset is
kept in memory.

A feature's **name** (:func:`name_features`) is what its decoder direction writes into the
model's output, matched to a pool of texts. The decoder row, in the space of the hook point the
SAE writes, is carried to the residual stream (through ``W_O`` for ``attn.hook_z``, ``W_out`` for
``mlp.hook_post``) and from there along the direct path to the output: through the final
LayerNorm with its scale frozen (a positive number per image, so it scales the contribution but
does not turn it) and the readout, as :func:`vit_lens.intervene.decompose.direct_contributions`
does for a model's components. That is ``direction @ model.W_U`` (the readout with the
LayerNorm's weight folded in, centred). The texts are ranked by the cosine between that output
direction and their embeddings (from the CLIP text tower, or given: a classifier's one-hot class
vectors name features by class). This is the direct path of a direction written at the pooled
token (CLS, or every token under average pooling); what a feature written at a patch does through
later attention is not part of it.

Supported hook points for names (the ``hook_name_out`` of a transcoder, else ``hook_name``):
:data:`NAMEABLE_HOOKS`. Every hook point with a token axis has top images and histograms.

Example:
    >>> import torch, vit_lens
    >>> from vit_lens.sae import SAE, SAEConfig
    >>> from vit_lens.sae.views import feature_image_scores, feature_views, name_features
    >>> from vit_lens.toy import ToyWorld, description_pool
    >>> clip = vit_lens.load_toy_clip()
    >>> sae = SAE(SAEConfig(d_in=128, d_sae=256, architecture="topk", k=8,
    ...                     hook_name="blocks.2.hook_resid_post")).init_weights(seed=0)
    >>> images = ToyWorld(seed=0).sample(64).images
    >>> scores = feature_image_scores(clip, sae, images, progress=False)   # [64 images, 256 features]
    >>> busiest = scores.mean(0).topk(2).indices.tolist()
    >>> views = feature_views(clip, sae, images, features=busiest, k=4, progress=False)
    >>> tuple(views[0].heatmaps.shape)   # 4 top images, 8x8 patches
    (4, 8, 8)
    >>> names = name_features(clip, sae, description_pool(1)[0], features=busiest, n_texts=3)
    >>> len(names[0].texts)
    3
"""

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from vit_lens.model.hooked_vit import HookedViT, image_tower
from vit_lens.sae.model import SAE
from vit_lens.sae.splice import _check_hook_name, _token_slice
from vit_lens.utils.progress import progress as progress_bar

IMAGE_SCORES = ("max", "cls", "mean")
"""How a feature's activations over an image's tokens become one score per image."""

NAMEABLE_HOOKS = (
    "blocks.{l}.hook_resid_pre",
    "blocks.{l}.hook_resid_mid",
    "blocks.{l}.hook_resid_post",
    "blocks.{l}.hook_attn_out",
    "blocks.{l}.hook_mlp_out",
    "blocks.{l}.attn.hook_z",
    "blocks.{l}.mlp.hook_post",
)
"""Hook points whose SAE features can be named: the residual stream and what is added to it
(directions already in the residual basis), the heads' ``z`` (an SAE with
``reshape_activations="hook_z"``; carried through ``W_O``) and the MLP's hidden activations
(carried through ``W_out``)."""

_RESIDUAL = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)$")
_HOOK_Z = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")
_MLP_POST = re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$")
_LAYER = re.compile(r"^blocks\.(\d+)\.")


# ============================================================================ inputs


def _check_sae(sae: Any) -> SAE:
    if not isinstance(sae, SAE):
        raise TypeError(f"sae must be a vit_lens.sae.SAE (load one with vit_lens.sae.load_sae), got {type(sae).__name__}")
    if sae.cfg.hook_name is None:
        raise ValueError("This SAE has no hook_name, so it is not known where it reads the model: set sae.cfg.hook_name")
    return sae


def check_features(features: Any, d_sae: int, what: str = "features") -> list[int]:
    """``features`` as a list of distinct ints in ``[0, d_sae)``, or a ValueError / TypeError naming the problem."""
    if isinstance(features, Tensor):
        features = features.tolist()
    if isinstance(features, int) and not isinstance(features, bool):
        features = [features]
    if isinstance(features, (str, bytes)) or not isinstance(features, Sequence):
        raise TypeError(f"{what} must be a feature index or a list of them, got {type(features).__name__}")
    features = list(features)
    if not features:
        raise ValueError(f"{what} is empty; name at least one feature")
    for feature in features:
        if not isinstance(feature, int) or isinstance(feature, bool):
            raise TypeError(f"{what} must hold ints, got {feature!r} ({type(feature).__name__})")
        if not 0 <= feature < d_sae:
            raise ValueError(f"feature {feature} is out of range: the SAE has d_sae={d_sae} features (0 to {d_sae - 1})")
    repeated = sorted({f for f in features if features.count(f) > 1})
    if repeated:
        raise ValueError(f"{what} names feature(s) {repeated} more than once")
    return features


def image_batches(images: Any, batch_size: int) -> Iterator[Tensor]:
    """``[batch, C, H, W]`` tensors from a tensor of images or an iterable of image batches.

    Args:
        images: ``[n, C, H, W]`` (split into batches of ``batch_size``), an iterable of such tensors
            (a DataLoader yielding image tensors, or ``(images, labels)`` pairs, whose first
            element is used), or an object with an ``images`` tensor (a :class:`vit_lens.toy.ToyBatch`).
        batch_size: Images per batch when ``images`` is one tensor.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(getattr(images, "images", None), Tensor):
        images = images.images
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be [n, channels, height, width], got shape {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    if not isinstance(images, Iterable) or isinstance(images, (str, bytes)):
        raise TypeError(
            f"images must be a [n, C, H, W] tensor or an iterable of image batches, got {type(images).__name__}"
        )
    for index, batch in enumerate(images):
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            batch = batch[0]  # (images, labels) from a DataLoader
        if not isinstance(batch, Tensor) or batch.ndim != 4:
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise ValueError(f"batch {index} of images must be a [batch, C, H, W] tensor, got {shape}")
        yield batch


# ============================================================================ activations


def _stop_layer(hook_name: str) -> int | None:
    """The block after the last one the hook point needs (None: the whole tower)."""
    match = _LAYER.match(hook_name)
    return int(match.group(1)) + 1 if match else None


@torch.no_grad()
def feature_activations(
    model: Any, sae: SAE, images: Float[Tensor, "batch channels height width"]
) -> Float[Tensor, "batch pos d_sae"]:
    """The SAE's feature activations on one batch of images, at the tokens it reads.

    The model runs only as far as the SAE's input hook point. ``pos`` counts the tokens of
    ``sae.cfg.token_selection``: every token (``"all"``, CLS first), the patches, CLS or the registers.
    """
    tower = image_tower(model)
    sae = _check_sae(sae)
    hook = sae.cfg.hook_name
    _check_hook_name(tower, hook, "hook_name")
    stop = _stop_layer(hook)
    _, cache = tower.run_with_cache(
        images.to(tower.embed.W_E.device), names_filter=hook,
        stop_at_layer=stop if stop is not None and stop < tower.cfg.n_layers else None,
    )
    activation = cache[hook]
    if sae.cfg.reshape_activations == "hook_z":
        activation = activation.flatten(-2)
    if activation.ndim != 3:
        raise ValueError(
            f"Feature views need a hook point with a token axis, [batch, pos, d]; {hook!r} gives "
            f"{tuple(cache[hook].shape)}"
        )
    tokens = _token_slice(sae.cfg.token_selection, tower.cfg, sae)
    if tokens is not None:
        activation = activation[:, tokens]
    return sae.encode(activation.to(sae.W_enc.device))


def _patch_positions(tower: HookedViT, sae: SAE) -> slice | None:
    """Where the patches lie among the tokens the SAE reads (None: it reads no patch)."""
    selection = sae.cfg.token_selection
    if selection == "all":
        return slice(tower.cfg.n_prefix_tokens, None)
    if selection == "patches":
        return slice(0, None)
    return None


def _image_scores(acts: Tensor, image_score: str, tower: HookedViT, sae: SAE) -> Tensor:
    """``[batch, pos, F]`` -> ``[batch, F]``."""
    if image_score == "max":
        return acts.amax(dim=1)
    if image_score == "mean":
        return acts.mean(dim=1)
    if sae.cfg.token_selection not in ("all", "cls") or not tower.cfg.class_token:
        raise ValueError(
            f"image_score='cls' needs the SAE to read the CLS token, but it reads token_selection="
            f"{sae.cfg.token_selection!r}" + ("" if tower.cfg.class_token else f" and {tower.cfg.model_name} has none")
            + "; use image_score='max' or 'mean'."
        )
    return acts[:, 0]


def _check_image_score(image_score: Any) -> str:
    if image_score not in IMAGE_SCORES:
        raise ValueError(f"image_score must be one of {IMAGE_SCORES}, got {image_score!r}")
    return image_score


@torch.no_grad()
def feature_image_scores(
    model: Any,
    sae: SAE,
    images: Any,
    *,
    features: Sequence[int] | None = None,
    image_score: str = "max",
    batch_size: int = 64,
    progress: bool = True,
) -> Float[Tensor, "n_images n_features"]:
    """One score per image and feature, streamed: the feature's max (or CLS, or mean) activation over the image's tokens.

    Args:
        model: A HookedViT or HookedCLIP.
        sae: The SAE.
        images: A ``[n, C, H, W]`` tensor or an iterable of image batches (:func:`image_batches`).
        features: Which features (default: all).
        image_score: ``"max"``, ``"cls"`` or ``"mean"`` over the tokens the SAE reads.
        batch_size: Images per forward pass when ``images`` is one tensor.
        progress: Show a progress bar.

    Returns:
        ``[n_images, n_features]`` on the CPU.
    """
    sae = _check_sae(sae)
    tower = image_tower(model)
    image_score = _check_image_score(image_score)
    chosen = None if features is None else check_features(features, sae.cfg.d_sae)
    scores = []
    for batch in progress_bar(image_batches(images, batch_size), desc="feature scores", unit="batch", enabled=progress):
        acts = feature_activations(tower, sae, batch)
        if chosen is not None:
            acts = acts[..., chosen]
        scores.append(_image_scores(acts, image_score, tower, sae).cpu())
    if not scores:
        raise ValueError("images held no image")
    return torch.cat(scores)


# ============================================================================ streaming statistics


class _Histograms:
    """Exact histograms of positive values with equal bins from 0, one per feature, built from batches.

    Each feature's bin width is set by its first positive value and doubled (merging neighbouring
    bins, which is exact) whenever a value reaches past the last bin, so the bins always span
    ``[0, width * n_bins)`` and cover every value seen, without knowing the range in advance.
    """

    def __init__(self, n_features: int, n_bins: int):
        if n_bins < 2 or n_bins % 2:
            raise ValueError(f"n_bins must be an even number of 2 or more, got {n_bins!r}")
        self.n_bins = n_bins
        self.counts = torch.zeros(n_features, n_bins, dtype=torch.long)
        self.width = torch.zeros(n_features, dtype=torch.float64)

    def add(self, values: Float[Tensor, "n n_features"]) -> None:
        values = values.detach().double().cpu()
        largest = values.amax(dim=0)
        fresh = (self.width == 0) & (largest > 0)
        self.width[fresh] = largest[fresh] / (self.n_bins - 0.5)
        while True:
            grow = (self.width > 0) & (largest >= self.width * self.n_bins)
            if not grow.any():
                break
            merged = self.counts[grow].view(-1, self.n_bins // 2, 2).sum(-1)
            self.counts[grow] = torch.cat([merged, torch.zeros_like(merged)], dim=1)
            self.width[grow] *= 2
        positive = values > 0
        rows, columns = positive.nonzero(as_tuple=True)
        bins = (values[rows, columns] / self.width[columns]).floor().long().clamp_(max=self.n_bins - 1)
        self.counts.view(-1).index_add_(0, columns * self.n_bins + bins, torch.ones_like(bins))

    def edges(self, feature: int) -> Tensor:
        return torch.arange(self.n_bins + 1, dtype=torch.float64) * self.width[feature]


class _TopImages:
    """The ``k`` highest-scoring images per feature, with their heatmaps, merged batch by batch.

    The current top ``k`` and each new batch are sorted together (stably, so that an earlier image
    wins a tie) and cut back to ``k``: the result equals a sort of all the scores, while only ``k``
    images per feature are held.
    """

    def __init__(self, n_features: int, k: int):
        self.k = k
        self.scores = torch.full((n_features, 0), float("-inf"))
        self.indices = torch.zeros(n_features, 0, dtype=torch.long)
        self.images: Tensor | None = None  # [F, kept, C, H, W]
        self.heatmaps: Tensor | None = None  # [F, kept, rows, cols]

    def add(self, scores: Tensor, first_index: int, images: Tensor, heatmaps: Tensor | None) -> None:
        """``scores`` ``[batch, F]``; ``images`` ``[batch, C, H, W]``; ``heatmaps`` ``[batch, F, rows, cols]``."""
        n_features, kept = self.scores.shape
        batch = scores.shape[0]
        candidates = torch.cat([self.scores, scores.T.float().cpu()], dim=1)
        order = candidates.sort(dim=1, descending=True, stable=True).indices[:, : self.k]  # [F, k']
        new_indices = torch.arange(first_index, first_index + batch)
        self.indices = torch.cat([self.indices, new_indices.expand(n_features, -1)], dim=1).gather(1, order)
        self.scores = candidates.gather(1, order)
        from_old = order < kept
        rows = torch.arange(n_features)[:, None]
        old_slot = order.clamp(max=max(kept - 1, 0))
        new_slot = (order - kept).clamp(min=0)
        images = images.detach().cpu()
        picked_new = images[new_slot]  # [F, k', C, H, W]
        if self.images is not None and kept:
            mask = from_old[..., None, None, None]
            picked_new = torch.where(mask, self.images[rows, old_slot], picked_new)
        self.images = picked_new
        if heatmaps is not None:
            heatmaps = heatmaps.detach().cpu().float()
            picked = heatmaps.transpose(0, 1)[rows, new_slot]  # [F, k', rows, cols]
            if self.heatmaps is not None and kept:
                picked = torch.where(from_old[..., None, None], self.heatmaps[rows, old_slot], picked)
            self.heatmaps = picked


# ============================================================================ names


@dataclass
class FeatureName:
    """A feature's best-matching texts, by the cosine between its output direction and their embeddings.

    Attributes:
        feature: The feature's index.
        texts: The ``n_texts`` best texts, best first; ``texts[0]`` is the feature's name.
        scores: ``[n_texts]`` their cosines, descending.
    """

    feature: int
    texts: list[str]
    scores: Tensor

    def __str__(self) -> str:
        return self.texts[0]


def residual_directions(model: Any, sae: SAE) -> Float[Tensor, "d_sae d_model"]:
    """The SAE's decoder rows in the residual stream (see :data:`NAMEABLE_HOOKS`).

    Rows of an SAE on the residual stream, ``hook_attn_out`` or ``hook_mlp_out`` are residual
    directions already; an ``attn.hook_z`` SAE's rows go through each head's ``W_O`` and an
    ``mlp.hook_post`` SAE's through ``W_out`` (a LayerScale is folded into both). Biases do not
    enter: a feature's direction is what one unit of its activation adds.

    Raises:
        ValueError: The SAE writes a hook point with no linear path into the residual stream
            (``hook_q``, a LayerNorm's output, ...), or one whose path goes through a LayerNorm
            (EVA's ``attn.ln_z`` / ``mlp.ln_hidden``).
    """
    tower = image_tower(model)
    sae = _check_sae(sae)
    cfg = tower.cfg
    where = sae.cfg.output_hook_name
    rows = sae.W_dec.detach()
    if sae.cfg.rescale_acts_by_decoder_norm:
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # decode divides the activation by the norm
    weight = tower.embed.W_E
    rows = rows.to(weight)
    if _RESIDUAL.match(where):
        return rows
    z = _HOOK_Z.match(where)
    if z:
        attn = tower.blocks[int(z.group(1))].attn
        if sae.cfg.reshape_activations != "hook_z":
            raise ValueError(
                f"An SAE on {where!r} must read the heads flattened (reshape_activations='hook_z', as SAELens's "
                "attention SAEs) for its decoder rows to be carried through W_O."
            )
        if cfg.attn_norm:
            raise ValueError(
                f"{cfg.model_name} normalises z (attn.ln_z) before W_O, so a direction in {where!r} has no fixed "
                "residual direction; name features of an SAE on blocks.{l}.hook_attn_out instead."
            )
        return torch.einsum("fhd,hdm->fm", rows.unflatten(-1, (cfg.n_heads, cfg.d_head)), attn.W_O.detach())
    post = _MLP_POST.match(where)
    if post:
        mlp = tower.blocks[int(post.group(1))].mlp
        if cfg.mlp_norm:
            raise ValueError(
                f"{cfg.model_name} normalises the MLP's hidden layer (mlp.ln_hidden) before W_out, so a direction in "
                f"{where!r} has no fixed residual direction; name features of an SAE on blocks.{{l}}.hook_mlp_out."
            )
        return rows @ mlp.W_out.detach()
    raise ValueError(
        f"Feature names follow the decoder direction into the model's output, which is possible from the residual "
        f"stream and the outputs added to it, not from {where!r}. Supported hook points: {', '.join(NAMEABLE_HOOKS)}."
    )


def output_directions(model: Any, sae: SAE) -> Float[Tensor, "d_sae d_out"]:
    """Each feature's decoder direction carried along the direct path to the model's output (``@ model.W_U``).

    For a CLIP tower that is the image-embedding direction a unit of the feature adds when written
    at the pooled token, up to the positive factor ``1 / scale`` of the final LayerNorm (frozen per
    image); for a classifier, its logit direction.
    """
    tower = image_tower(model)
    return residual_directions(tower, sae) @ tower.W_U.detach()


def embed_texts(model: Any, texts: Sequence[str], batch_size: int = 256) -> Float[Tensor, "n_texts d_out"]:
    """Unit text embeddings of ``texts`` from a CLIP model's text tower, in batches."""
    if not hasattr(model, "encode_text"):
        raise TypeError(
            f"A {type(model).__name__} has no text tower to embed texts with: pass text_embeddings "
            "([n_texts, d_out] output-space vectors; for a classifier, torch.eye(n_classes) with the class names as "
            "texts), or a HookedCLIP."
        )
    with torch.no_grad():
        return torch.cat([model.encode_text(list(texts[i : i + batch_size]), normalize=True)
                          for i in range(0, len(texts), batch_size)])


def _check_texts(texts: Any, text_embeddings: Tensor | None, d_out: int) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise TypeError(f"texts must be a non-empty list of strings, got {texts!r:.80}")
    texts = list(texts)
    if not all(isinstance(text, str) for text in texts):
        raise TypeError("texts must hold strings only")
    if text_embeddings is not None and tuple(text_embeddings.shape) != (len(texts), d_out):
        raise ValueError(
            f"text_embeddings must be [n_texts={len(texts)}, d_out={d_out}] (one output-space vector per text), got "
            f"{tuple(text_embeddings.shape)}"
        )
    return texts


@torch.no_grad()
def name_features(
    model: Any,
    sae: SAE,
    texts: Sequence[str],
    *,
    features: Sequence[int] | None = None,
    text_embeddings: Tensor | None = None,
    n_texts: int = 5,
) -> list[FeatureName]:
    """Name features by the texts whose embeddings best match their decoder directions' direct effect on the output.

    Args:
        model: A HookedCLIP (its text tower embeds ``texts``), or a HookedViT with ``text_embeddings``.
        sae: The SAE; its output hook point must be one of :data:`NAMEABLE_HOOKS`.
        texts: The pool: TextSpan's (``vit_lens.methods.textspan.pools.default_text_pool()``), the toy
            world's (``vit_lens.toy.description_pool()[0]``) or your own.
        features: Which features (default: all).
        text_embeddings: ``[n_texts, d_out]`` output-space vectors for ``texts`` (default: the CLIP
            text tower's unit embeddings). For a classifier, ``torch.eye(n_classes)`` names
            features by the class whose logit they raise most relative to their size.
        n_texts: Texts kept per feature.

    Returns:
        One :class:`FeatureName` per feature, in the order of ``features``.
    """
    tower = image_tower(model)
    sae = _check_sae(sae)
    chosen = list(range(sae.cfg.d_sae)) if features is None else check_features(features, sae.cfg.d_sae)
    texts = _check_texts(texts, text_embeddings, tower.cfg.d_output)
    if not isinstance(n_texts, int) or isinstance(n_texts, bool) or n_texts < 1:
        raise ValueError(f"n_texts must be a positive int, got {n_texts!r}")
    embeddings = embed_texts(model, texts) if text_embeddings is None else text_embeddings
    directions = output_directions(tower, sae)[chosen]
    cosines = F.normalize(directions, dim=-1) @ F.normalize(embeddings.to(directions), dim=-1).T  # [F, n_texts]
    best = cosines.topk(min(n_texts, len(texts)), dim=-1)
    return [
        FeatureName(feature, [texts[i] for i in indices.tolist()], values.cpu())
        for feature, values, indices in zip(chosen, best.values, best.indices)
    ]


# ============================================================================ views


@dataclass
class FeatureView:
    """What one feature responds to, over a set of images.

    Attributes:
        feature: The feature's index.
        top_indices: ``[k']`` positions in the image stream of the images that score highest
            (``k' <= k``: only images with a positive score), best first.
        top_scores: ``[k']`` their scores (max, CLS or mean activation over the image's tokens).
        top_images: ``[k', C, H, W]`` the images, as given.
        heatmaps: ``[k', rows, cols]`` the feature's activation at each patch token of those images
            (None when the SAE reads no patch: ``token_selection`` ``"cls"`` or ``"registers"``).
        histogram: ``[n_bins]`` counts of its non-zero activations over all tokens it reads.
        histogram_edges: ``[n_bins + 1]`` the bins' edges, from 0.
        token_density: Share of the tokens read where it fires.
        image_density: Share of the images where it fires on some token.
        max_activation: Its largest activation.
        n_images: Images seen.
        name: Its best texts, where a text pool was given.
    """

    feature: int
    top_indices: Tensor
    top_scores: Tensor
    top_images: Tensor
    heatmaps: Tensor | None
    histogram: Tensor
    histogram_edges: Tensor
    token_density: float
    image_density: float
    max_activation: float
    n_images: int
    name: FeatureName | None = None

    def pixel_heatmaps(self) -> Float[Tensor, "k height width"]:
        """The heatmaps upsampled (bilinearly) onto the images' pixels."""
        if self.heatmaps is None:
            raise ValueError(f"Feature {self.feature} has no patch heatmaps: the SAE reads no patch token")
        size = tuple(self.top_images.shape[-2:])
        return F.interpolate(self.heatmaps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


@torch.no_grad()
def feature_views(
    model: Any,
    sae: SAE,
    images: Any,
    *,
    features: Sequence[int],
    k: int = 9,
    image_score: str = "max",
    texts: Sequence[str] | None = None,
    text_embeddings: Tensor | None = None,
    n_texts: int = 5,
    n_bins: int = 40,
    batch_size: int = 64,
    progress: bool = True,
) -> list[FeatureView]:
    """Top images with patch heatmaps, activation histograms, densities and names of some features, in one pass.

    Args:
        model: A HookedViT or HookedCLIP.
        sae: The SAE (its ``hook_name`` is where it reads the model).
        images: A ``[n, C, H, W]`` tensor or an iterable of image batches (:func:`image_batches`);
            streamed once.
        features: The features to view (held: ``k`` images each).
        k: Top images kept per feature.
        image_score: How an image is ranked: the feature's ``"max"`` activation over the image's
            tokens, its activation on ``"cls"``, or the ``"mean"``.
        texts: A text pool to name the features with (:func:`name_features`); None: no names.
        text_embeddings: Output-space vectors for ``texts`` (default: the CLIP text tower's).
        n_texts: Texts kept per name.
        n_bins: Histogram bins (even).
        batch_size: Images per forward pass when ``images`` is one tensor.
        progress: Show a progress bar.

    Returns:
        One :class:`FeatureView` per feature, in the order of ``features``.
    """
    tower = image_tower(model)
    sae = _check_sae(sae)
    chosen = check_features(features, sae.cfg.d_sae)
    image_score = _check_image_score(image_score)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    names = None
    if texts is not None:  # checked before the images are streamed
        names = name_features(tower if text_embeddings is not None else model, sae, texts, features=chosen,
                              text_embeddings=text_embeddings, n_texts=n_texts)
    patches = _patch_positions(tower, sae)
    top = _TopImages(len(chosen), k)
    histograms = _Histograms(len(chosen), n_bins)
    active_tokens = torch.zeros(len(chosen), dtype=torch.long)
    active_images = torch.zeros(len(chosen), dtype=torch.long)
    largest = torch.zeros(len(chosen))
    n_tokens = n_images = 0
    for batch in progress_bar(image_batches(images, batch_size), desc="feature views", unit="batch", enabled=progress):
        acts = feature_activations(tower, sae, batch)[..., chosen].float()  # [b, pos, F]
        heatmaps = None
        if patches is not None:
            grid = (batch.shape[-2] // tower.cfg.patch_size[0], batch.shape[-1] // tower.cfg.patch_size[1])
            heatmaps = acts[:, patches].transpose(1, 2).unflatten(-1, grid)  # [b, F, rows, cols]
        top.add(_image_scores(acts, image_score, tower, sae), n_images, batch, heatmaps)
        flat = acts.flatten(0, 1)
        histograms.add(flat)
        largest = torch.maximum(largest, flat.amax(0).cpu())
        active_tokens += (flat > 0).sum(0).cpu()
        active_images += (acts > 0).any(1).sum(0).cpu()
        n_tokens += flat.shape[0]
        n_images += len(batch)
    if n_images == 0:
        raise ValueError("images held no image")
    views = []
    for row, feature in enumerate(chosen):
        fired = top.scores[row] > 0
        views.append(FeatureView(
            feature=feature,
            top_indices=top.indices[row][fired],
            top_scores=top.scores[row][fired],
            top_images=top.images[row][fired],
            heatmaps=None if top.heatmaps is None else top.heatmaps[row][fired],
            histogram=histograms.counts[row].clone(),
            histogram_edges=histograms.edges(row),
            token_density=active_tokens[row].item() / n_tokens,
            image_density=active_images[row].item() / n_images,
            max_activation=largest[row].item(),
            n_images=n_images,
            name=None if names is None else names[row],
        ))
    return views
