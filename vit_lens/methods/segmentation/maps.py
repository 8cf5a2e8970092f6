"""Spatial maps, zero-shot segmentation and attention baselines (Gandelsman et al. 2024, section 5; Chefer et al. 2021).

**Text heatmaps** (:func:`text_heatmaps`). The direct contribution of attention head ``h`` of layer
``l`` through source token ``t`` (:func:`vit_lens.intervene.decompose.direct_contributions` at level
``"head_token"``) projected onto a text direction ``d`` gives, at every patch ``t``,

    H[d, t] = sum_{l in layers} sum_{h in heads} c_{l,h,t} . d

(prefix tokens, i.e. CLS and registers, are left out: they have no place on the grid). Gandelsman et al.'s
public code (``compute_segmentations.py``) sums every layer and head, in ``ln_mode="paper"`` with the
terms divided by the norm of the image embedding, and "normalises out bias terms" by subtracting the
mean heatmap over all 1000 ImageNet zero-shot class vectors::

    heatmap[c] = H[c] - mean_{c'} H[c']        (normalize="mean_over_texts", over the k directions given)

so pass the whole zero-shot classifier as ``directions`` and pick the class afterwards (the paper
explains the model's own top-1 class, ``return_scores=True`` gives the scores). In paper mode every
token term carries an equal share of the LayerNorm mean and bias and of ``b_O``: the same offset at
every patch, which the mean over texts mostly cancels (exactly where the offsets are equal for all texts).

**Per-head maps** (:func:`head_direction_maps`, paper figure 7): the same terms for one ``(layer, head)``.

**Baselines** on the same :class:`~vit_lens.HookedViT` (read from ``blocks.{l}.attn.hook_pattern``):
:func:`raw_attention`, :func:`attention_rollout` (Abnar & Zuidema 2020), :func:`attention_gradcam`
(GradCAM on the last attention map, as in Chefer et al.'s benchmark) and :func:`chefer_relevance`
(gradient-weighted attention rollout). All return ``[batch, rows, cols]`` maps of the CLS query row
over the patch tokens. Gradient targets are ``output . direction`` per image (a CLIP image embedding
and a class text embedding) or a logit index (classifiers).
A baseline that needs no model, for images whose object colour is known:
:func:`colour_distance_maps` (closeness of each pixel's colour to the object's).

**Protocol** (:class:`SegmentationMetrics`), exactly as both papers' code computes it
(``utils/metrices.py`` of Chefer et al., copied into ``utils/segmentation_utils.py`` of Gandelsman et al. 2024):

1. upsample the map to the mask size (bilinear; :func:`upsample`);
2. Gandelsman et al. (2024) only: clip at 0 (``clip_negative=True``);
3. min-max normalise to [0, 1] per image (a constant map becomes all zeros, as their NaN -> 0 does);
4. foreground = value strictly greater than the image's mean value;
5. pixel accuracy = sum of correct pixels / sum of pixels, **pooled over the dataset**;
6. mIoU = mean over the two classes (background, foreground) of sum(intersection) / sum(union),
   each **pooled over the dataset** (not a mean of per-image IoUs);
7. mAP = mean over images of the average precision (scikit-learn's step-wise definition, tied scores
   as one threshold) of the 2 x H x W scores ``(1 - R, R)`` against the one-hot ``(background,
   foreground)`` target. This is one AP over both channels together, neither the foreground AP nor
   the mean of two per-class APs. Exactly half of the items are positive, but a constant map does not
   score 0.5: step 3 makes it zeros, so every background-channel item (score 1) ranks above every
   foreground-channel item, and the AP comes close to the share of background pixels (93 on the toy
   world's masks). Compare mAP with the constant-map baseline, not with 0.5.

Oddity not reproduced: their code normalises and thresholds over the whole batch tensor at once and
counts only the first image of a batch for pixel accuracy and mIoU; every published number used batch
size 1, where that is the per-image computation done here for every batch size.

**Data** (:class:`ImageNetSegmentation`): ``gtsegs_ijcv.mat`` (Guillaumin et al. 2014; 4,276 images),
MATLAB v7.3, read with h5py (not a dependency of vit_lens: ``pip install h5py``). Chefer et al.
squash image and mask to 224 x 224 (``mode="resize"``, the default); Gandelsman et al.'s code centre-crops the
image (open_clip's preprocessing) but squashes the mask (``mode="paper_crop"``), so image and mask are
misaligned on non-square images; ``mode="crop"`` crops both.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from vit_lens.intervene.decompose import LN_MODES, direct_contributions, required_hooks
from vit_lens.model.hooked_vit import image_tower

HEATMAP_NORMALIZATIONS = ("mean_over_texts", None)
HEAD_FUSIONS = ("mean", "max", "min")
DATASET_MODES = ("resize", "crop", "paper_crop")
UPSAMPLE_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact")
# OpenAI CLIP's normalisation, which open_clip's laion2b ViTs use too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Elements of one chunk of per-token terms ([batch, head x token, directions]) in text_heatmaps.
_CHUNK_ELEMENTS = 2**25


# ============================================================================ decomposition heatmaps


def text_heatmaps(
    model: Any,
    images: Any,
    directions: Any,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | Sequence[tuple[int, int]] | None = None,
    normalize: str | None = "mean_over_texts",
    ln_mode: str = "paper",
    divide_by_norm: bool = True,
    return_scores: bool = False,
    chunk_size: int | None = None,
) -> Float[Tensor, "batch k rows cols"] | tuple[Float[Tensor, "batch k rows cols"], Float[Tensor, "batch k"]]:
    """How much each patch writes along each direction: Gandelsman et al.'s zero-shot segmentation heatmaps.

    Args:
        model: A :class:`~vit_lens.HookedViT` or a :class:`~vit_lens.HookedCLIP` (its image tower is used).
        images: ``[batch, channels, height, width]``, preprocessed for the model.
        directions: ``[d_repr, k]`` text embeddings or class vectors in the representation space
            (CLIP: ``d_proj``; a timm classifier: the pre-head ``d_model``, e.g. ``head.weight.T``).
        layers: Layers whose heads are summed (default: all).
        heads: Heads summed in each chosen layer, as head indices, or ``(layer, head)`` pairs
            (then ``layers`` must be None). Default: all.
        normalize: ``"mean_over_texts"`` subtracts, at every patch, the mean of the ``k`` heatmaps
            (the paper subtracts the mean over all 1000 ImageNet class vectors); None keeps the raw terms.
        ln_mode: ``"paper"`` (equal split of the final LayerNorm's mean and bias, as Gandelsman et al. 2024) or
            ``"center_each"``; see :mod:`vit_lens.intervene.decompose`.
        divide_by_norm: Divide by the norm of the image representation, as Gandelsman et al.'s code does
            (then the terms of all components sum to ``normalized_embedding @ directions``).
        return_scores: Also return ``[batch, k]``: the whole representation projected on the
            directions (with ``divide_by_norm``, CLIP's cosine scores; their argmax is the model's
            zero-shot prediction).
        chunk_size: Directions decomposed at once (default: as many as fit in about 128 MB of terms).

    Returns:
        ``[batch, k, rows, cols]`` heatmaps on the patch grid (and the scores with ``return_scores``).

    Example:
        >>> classifier = clip.zero_shot_classifier(imagenet_classnames)  # [d_proj, 1000]  # doctest: +SKIP
        >>> maps, scores = text_heatmaps(clip, images, classifier, return_scores=True)  # doctest: +SKIP
        >>> relative = maps[:, 3] - maps[:, 7]  # paper figure 8(b): one description against another  # doctest: +SKIP
        >>> predicted = scores.argmax(dim=1)  # doctest: +SKIP
        >>> heatmap = maps[torch.arange(len(images)), predicted]  # [batch, rows, cols]  # doctest: +SKIP
        >>> heatmap = upsample(heatmap, images.shape[-2:])  # [batch, height, width]  # doctest: +SKIP
    """
    vision = _vision_tower(model)
    directions = _check_directions(vision, directions)
    if normalize not in HEATMAP_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {HEATMAP_NORMALIZATIONS}, got {normalize!r}")
    if normalize is not None and directions.shape[1] < 2:
        raise ValueError(
            "normalize='mean_over_texts' subtracts the mean heatmap over the directions, which is the heatmap "
            "itself for a single direction; pass all class vectors (the paper uses all 1000 ImageNet classes) "
            "or normalize=None"
        )
    mask = _head_mask(vision.cfg, layers, heads)
    maps, scores = _direction_maps(vision, images, directions, mask, ln_mode, divide_by_norm, chunk_size)
    if normalize == "mean_over_texts":
        maps = maps - maps.mean(dim=1, keepdim=True)
    return (maps, scores) if return_scores else maps


def head_direction_maps(
    model: Any,
    images: Any,
    layer: int,
    head: int,
    directions: Any,
    ln_mode: str = "paper",
    divide_by_norm: bool = True,
) -> Float[Tensor, "batch k rows cols"]:
    """Per-patch contributions of one head along each direction (Gandelsman et al. 2024, figure 7).

    ``maps[b, j, r, c]`` is the direct contribution of head ``head`` of layer ``layer`` through the
    patch at ``(r, c)``, projected on ``directions[:, j]`` (e.g. the head's TextSpan basis). Summed
    over every layer and head these maps are :func:`text_heatmaps` with ``normalize=None``.

    Args:
        model: A :class:`~vit_lens.HookedViT` or :class:`~vit_lens.HookedCLIP`.
        images: ``[batch, channels, height, width]``.
        layer, head: The head (negative indices count from the end).
        directions: ``[d_repr, k]``.
        ln_mode, divide_by_norm: As in :func:`text_heatmaps`.

    Returns:
        ``[batch, k, rows, cols]``.

    Example:
        >>> basis = text_embeddings[chosen].T  # [d_proj, k], e.g. TextSpan's texts for L22H13  # doctest: +SKIP
        >>> maps = head_direction_maps(clip, images, layer=22, head=13, directions=basis)  # doctest: +SKIP
        >>> maps.shape  # [batch, k, 16, 16] for ViT-H-14 at 224 px  # doctest: +SKIP
    """
    vision = _vision_tower(model)
    directions = _check_directions(vision, directions)
    cfg = vision.cfg
    layer, head = _check_index(layer, cfg.n_layers, "layer"), _check_index(head, cfg.n_heads, "head")
    mask = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.bool)
    mask[layer, head] = True
    maps, _ = _direction_maps(vision, images, directions, mask, ln_mode, divide_by_norm, None)
    return maps


def upsample(
    heatmaps: Any, image_size: int | Sequence[int], mode: str = "bilinear"
) -> Float[Tensor, "*lead height width"]:
    """Resize maps on the patch grid to image resolution (``align_corners=False``, as the papers).

    Bilinear upsampling by an integer factor keeps every map's mean exactly; the protocol's
    ``interpolate(scale_factor=patch_size)`` is the same as ``image_size = grid * patch_size``.

    Args:
        heatmaps: ``[..., rows, cols]`` float maps (any leading axes).
        image_size: ``height`` (square) or ``(height, width)``.
        mode: ``"bilinear"`` (the papers), ``"bicubic"``, ``"nearest"`` or ``"nearest-exact"``.

    Returns:
        ``[..., height, width]``.

    Example:
        >>> upsample(torch.rand(2, 14, 14), 224).shape
        torch.Size([2, 224, 224])
    """
    if not isinstance(heatmaps, Tensor) or heatmaps.ndim < 2 or not heatmaps.is_floating_point():
        got = (f"a {heatmaps.dtype} tensor of shape {tuple(heatmaps.shape)}" if isinstance(heatmaps, Tensor)
               else type(heatmaps).__name__)
        raise ValueError(f"upsample takes float maps [..., rows, cols], got {got}")
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
    size = _pair_size(image_size, "image_size")
    lead, grid = heatmaps.shape[:-2], heatmaps.shape[-2:]
    flat = heatmaps.reshape(-1, 1, *grid)
    corners = dict(align_corners=False) if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(flat, size=size, mode=mode, **corners)
    return out.reshape(*lead, *size)


# ============================================================================ attention baselines


def raw_attention(model: Any, images: Any, layer: int = -1) -> Float[Tensor, "batch rows cols"]:
    """Attention of the CLS query to every patch in one layer, averaged over heads ("raw attention").

    Chefer et al.'s ``attn_last_layer`` baseline (``layer=-1``).

    Example:
        >>> raw_attention(model, images).shape  # [batch, rows, cols]  # doctest: +SKIP
    """
    vision = _vision_tower(model)
    _require_class_token(vision, "raw_attention")
    layer = _check_index(layer, vision.cfg.n_layers, "layer")
    fused = _fused_patterns(vision, images, [layer], "mean")[:, 0]  # [batch, pos, pos]
    return _cls_to_patches(vision, fused, images)


def attention_rollout(
    model: Any, images: Any, start_layer: int = 0, head_fusion: str = "mean"
) -> Float[Tensor, "batch rows cols"]:
    """Attention rollout (Abnar & Zuidema 2020): CLS row of the product of ``(A_l + I)``, row-normalised.

    Per layer, the heads are fused (``"mean"``, as Chefer et al.; or ``"max"``/``"min"``), the identity
    is added for the residual connection and each row is divided by its sum (for ``"mean"`` this is
    ``(A + I) / 2``); the layers from ``start_layer`` on are multiplied, later layers on the left. The
    map is the CLS row over the patch tokens (register tokens take part in the product but are not
    shown). Chefer et al.'s benchmark uses ``start_layer=1``.

    Example:
        >>> attention_rollout(model, images, start_layer=1).shape  # [batch, rows, cols]  # doctest: +SKIP
    """
    vision = _vision_tower(model)
    _require_class_token(vision, "attention_rollout")
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    start = _check_index(start_layer, vision.cfg.n_layers, "start_layer")
    fused = _fused_patterns(vision, images, list(range(start, vision.cfg.n_layers)), head_fusion)
    return _cls_to_patches(vision, rollout(fused, row_normalize=True), images)


def attention_gradcam(
    model: Any, images: Any, target: Any, layer: int = -1, normalize_output: bool = False
) -> Float[Tensor, "batch rows cols"]:
    """GradCAM on an attention map, as Chefer et al.'s ``attn_gradcam`` baseline.

    With ``A`` the layer's pattern and ``G = d score / d A`` (``[batch, head, query, key]``), each
    head gets the weight ``w_h = mean over patches p of G[h, CLS, p]``, and the map is
    ``relu(mean_h w_h A[h, CLS, p])``. (Chefer et al. also min-max normalise here; the protocol does
    that anyway, so it is left to :class:`SegmentationMetrics`.)

    Args:
        model: A :class:`~vit_lens.HookedViT` or :class:`~vit_lens.HookedCLIP`.
        images: ``[batch, channels, height, width]``.
        target: What to explain, per image: ``[batch, d_out]`` directions (score = output . direction,
            e.g. CLIP image embedding . class text embedding) or ``[batch]`` integer indices into the
            output (classifier logits).
        layer: The attention layer (default: the last).
        normalize_output: Score the unit-normalised output (CLIP's cosine logit, up to temperature).

    Example:
        >>> text = classifier[:, predicted].T  # [batch, d_proj]  # doctest: +SKIP
        >>> attention_gradcam(clip, images, text).shape  # [batch, rows, cols]  # doctest: +SKIP
    """
    vision = _vision_tower(model)
    _require_class_token(vision, "attention_gradcam")
    layer = _check_index(layer, vision.cfg.n_layers, "layer")
    (pattern,), (grad,) = _patterns_and_gradients(vision, images, target, [layer], normalize_output)
    start = vision.cfg.n_prefix_tokens
    weights = grad[:, :, 0, start:].mean(dim=-1, keepdim=True)  # [batch, head, 1]
    cam = (pattern[:, :, 0, start:] * weights).mean(dim=1).clamp(min=0)  # [batch, patches]
    return cam.unflatten(-1, _grid(vision, images))


def chefer_relevance(
    model: Any, images: Any, target: Any, start_layer: int = 0, normalize_output: bool = False
) -> Float[Tensor, "batch rows cols"]:
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf, "Generic attention-model explainability", ICCV 2021).

    ``R = I``; for each layer from ``start_layer`` on, ``R <- R + mean_h relu(G_l * A_l) @ R`` with
    ``A_l`` the pattern and ``G_l = d score / d A_l`` (the total derivative, as a tensor hook on the
    pattern sees it); the map is ``R[CLS, patches]``. No row normalisation.

    Gandelsman et al. (2024) compares with Chefer et al. (CVPR 2021), whose benchmark method weights the gradient
    by the LRP relevance of the attention map instead of the map itself (``mean_h relu(G_l * R_l^LRP)``,
    same rollout, ``start_layer=1``); that needs LRP rules for every layer, which vit_lens does not
    implement. This variant needs only hooks and is the one the same authors use for CLIP.

    Args:
        model, images, target, normalize_output: As in :func:`attention_gradcam`.
        start_layer: First layer of the rollout.

    Example:
        >>> chefer_relevance(clip, images, classifier[:, predicted].T).shape  # doctest: +SKIP
    """
    vision = _vision_tower(model)
    _require_class_token(vision, "chefer_relevance")
    start = _check_index(start_layer, vision.cfg.n_layers, "start_layer")
    layers = list(range(start, vision.cfg.n_layers))
    patterns, grads = _patterns_and_gradients(vision, images, target, layers, normalize_output)
    weighted = torch.stack([(g * a).clamp(min=0).mean(dim=1) for a, g in zip(patterns, grads)], dim=1)
    return _cls_to_patches(vision, rollout(weighted, row_normalize=False), images)


def rollout(
    matrices: Float[Tensor, "batch layer pos pos"], row_normalize: bool = True, return_all: bool = False
) -> Float[Tensor, "batch pos pos"] | Float[Tensor, "batch layer pos pos"]:
    """Joint attention ``(M_n + I) ... (M_1 + I)`` over layers (the first layer rightmost).

    Args:
        matrices: ``[batch, layer, pos, pos]`` per-layer (head-fused) attention, earliest layer first.
        row_normalize: Divide each ``M_l + I`` by its row sums (Abnar & Zuidema's rollout); without it,
            Chefer et al.'s ``R <- R + M_l R`` from ``R = I``.
        return_all: Return the joint matrix after every layer, ``[batch, layer, pos, pos]``.

    Example:
        >>> uniform = torch.full((1, 2, 3, 3), 1 / 3)
        >>> joint = rollout(uniform)  # [1, 3, 3]
        >>> torch.allclose(joint.sum(-1), torch.ones(1, 3))  # rows of a row-stochastic product sum to 1
        True
    """
    n_pos = matrices.shape[-1]
    steps = matrices + torch.eye(n_pos, dtype=matrices.dtype, device=matrices.device)
    if row_normalize:
        steps = steps / steps.sum(dim=-1, keepdim=True)
    joint = steps[:, 0]
    every = [joint]
    for index in range(1, steps.shape[1]):
        joint = torch.bmm(steps[:, index], joint)
        every.append(joint)
    return torch.stack(every, dim=1) if return_all else joint


def colour_distance_maps(images: Any, colours: Any) -> Float[Tensor, "batch height width"]:
    """A map computed with no model: how close each pixel's colour is to the object's colour.

    The trivial baseline that a zero-shot segmentation map should beat on images whose object colour
    is known (the toy world's): ``-||images[b, :, y, x] - colours[b]||_2`` at every pixel, so the pixels
    closest to the object's colour score highest, as a map's foreground should. It goes through
    :class:`SegmentationMetrics` like any other map (normalised per image, thresholded at its mean).

    Args:
        images: ``[batch, channels, height, width]`` float, in the colour space of ``colours`` (the toy
            world's images are RGB in [0, 1]; pass unnormalised images).
        colours: ``[batch, channels]``: each image's object colour, or ``[channels]``: one for all images.

    Returns:
        ``[batch, height, width]``, at most 0 (0 where a pixel has exactly the object's colour).

    Example:
        >>> image = torch.zeros(1, 3, 2, 2)
        >>> image[0, 0, 0, 0] = 1.0  # one red pixel on black
        >>> colour_distance_maps(image, torch.tensor([1.0, 0.0, 0.0]))
        tensor([[[ 0., -1.],
                 [-1., -1.]]])
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = f"a {images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [batch, channels, height, width], got {got}")
    batch, channels = images.shape[:2]
    if not isinstance(colours, Tensor) or colours.shape not in ((channels,), (batch, channels)):
        got = tuple(colours.shape) if isinstance(colours, Tensor) else type(colours).__name__
        raise ValueError(
            f"colours must be a tensor [batch={batch}, channels={channels}] (one colour per image) or "
            f"[channels={channels}], got {got}"
        )
    target = colours.to(device=images.device, dtype=images.dtype).reshape(-1, channels, 1, 1)
    return -(images - target).norm(dim=1) + 0.0  # + 0.0: exact matches read 0, not -0


# ============================================================================ protocol and metrics


def normalize_heatmaps(heatmaps: Any, clip_negative: bool = False) -> Float[Tensor, "batch height width"]:
    """The protocol's per-image min-max normalisation to [0, 1] (a constant map becomes zeros).

    Args:
        heatmaps: ``[batch, height, width]`` finite float maps.
        clip_negative: Set negative values to 0 first (Gandelsman et al.'s code does; Chefer et al.'s does not).

    Example:
        >>> normalize_heatmaps(torch.tensor([[[-1.0, 1.0], [0.0, 3.0]]]))
        tensor([[[0.0000, 0.5000],
                 [0.2500, 1.0000]]])
    """
    _check_maps(heatmaps, "heatmaps")
    if not torch.isfinite(heatmaps).all():
        raise ValueError("heatmaps contain NaN or infinite values; the protocol needs finite maps")
    x = heatmaps.clamp(min=0) if clip_negative else heatmaps
    low = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1), torch.zeros_like(x))


def binarize(heatmaps: Any, clip_negative: bool = False) -> Bool[Tensor, "batch height width"]:
    """Foreground masks of the protocol: normalised value strictly above the image's mean value.

    Example:
        >>> binarize(torch.tensor([[[0.0, 1.0], [2.0, 3.0]]]))
        tensor([[[False, False],
                 [ True,  True]]])
    """
    normalized = normalize_heatmaps(heatmaps, clip_negative)
    return normalized > normalized.mean(dim=(-2, -1), keepdim=True)


def average_precision(scores: Any, labels: Any) -> Float[Tensor, " batch"]:
    """Average precision of each row, with scikit-learn's ``average_precision_score`` definition.

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score values taken as thresholds, from the
    highest down (tied scores enter together; no interpolation). A row without positives scores 0
    (the protocol's ``nan_to_num``).

    Args:
        scores: ``[batch, n]`` float scores.
        labels: ``[batch, n]`` bool (or 0/1) targets.

    Returns:
        ``[batch]`` float64.

    Example:
        >>> average_precision(torch.tensor([[0.9, 0.8, 0.7, 0.1]]), torch.tensor([[1, 0, 1, 0]]))
        tensor([0.8333], dtype=torch.float64)
    """
    tensors = isinstance(scores, Tensor) and isinstance(labels, Tensor)
    if not tensors or scores.ndim != 2 or scores.shape != labels.shape:
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (scores, labels)]
        raise ValueError(f"scores and labels must be tensors of one shape [batch, n], got {shapes[0]} and {shapes[1]}")
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranked = scores.gather(-1, order)
    positive = labels.to(device=scores.device).gather(-1, order).to(torch.float64)
    rank = torch.arange(1, scores.shape[-1] + 1, device=scores.device, dtype=torch.float64)
    precision = positive.cumsum(-1) / rank
    # each positive counts with the precision at the last item of its group of tied scores
    group_end = torch.ones_like(ranked, dtype=torch.bool)
    group_end[:, :-1] = ranked[:, 1:] != ranked[:, :-1]
    group = group_end.long().cumsum(-1) - group_end.long()
    group_precision = torch.zeros_like(precision).scatter_add_(-1, group, precision * group_end)
    n_positive = positive.sum(-1)
    total = (positive * group_precision.gather(-1, group)).sum(-1)
    return torch.where(n_positive > 0, total / n_positive.clamp(min=1), torch.zeros_like(total))


class SegmentationMetrics:
    """Pixel accuracy, mIoU and mAP of heatmaps against binary masks, in Chefer et al.'s protocol.

    See the module docstring for the exact definitions: min-max per image (after clipping at 0 with
    ``clip_negative``), threshold at the mean, pixel accuracy and per-class IoU pooled over every
    image seen, AP per image averaged. Values are fractions (the papers print percentages).

    Args:
        clip_negative: Clip the maps at 0 before normalising (Gandelsman et al.'s code; not Chefer et al.'s).

    Example:
        >>> metrics = SegmentationMetrics(clip_negative=True)
        >>> for images, masks in loader:  # doctest: +SKIP
        ...     maps = ...  # [batch, rows, cols] on the patch grid
        ...     metrics.update(upsample(maps, masks.shape[-2:]), masks)
        >>> metrics.compute()  # doctest: +SKIP
        {'pixel_accuracy': 0.75, 'miou': 0.54, 'map': 0.81, ...}
    """

    def __init__(self, clip_negative: bool = False):
        self.clip_negative = clip_negative
        self.reset()

    def reset(self) -> None:
        """Forget every image seen."""
        self.correct = 0
        self.labeled = 0
        self.intersection = [0, 0]  # background, foreground
        self.union = [0, 0]
        self.ap_sum = 0.0
        self.n_images = 0

    def update(self, heatmaps: Any, masks: Any) -> None:
        """Add a batch: ``heatmaps`` ``[batch, H, W]`` float, ``masks`` ``[batch, H, W]`` with values 0/1."""
        _check_maps(heatmaps, "heatmaps")
        if not isinstance(masks, Tensor) or masks.shape != heatmaps.shape:
            got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
            hint = (
                " Upsample the maps first: upsample(heatmaps, masks.shape[-2:])."
                if isinstance(masks, Tensor) and masks.shape[:-2] == heatmaps.shape[:-2] else ""
            )
            raise ValueError(f"masks must have the heatmaps' shape {tuple(heatmaps.shape)}, got {got}.{hint}")
        if masks.is_floating_point() or not ((masks == 0) | (masks == 1)).all():
            raise ValueError("masks must be integer or bool tensors with values 0 (background) and 1 (foreground)")
        target = masks.to(device=heatmaps.device, dtype=torch.bool)
        normalized = normalize_heatmaps(heatmaps, self.clip_negative)
        foreground = normalized > normalized.mean(dim=(-2, -1), keepdim=True)
        counts = torch.stack([
            (foreground == target).sum(),
            (~foreground & ~target).sum(), (foreground & target).sum(),
            (~foreground | ~target).sum(), (foreground | target).sum(),
        ]).tolist()
        self.correct += counts[0]
        self.labeled += target.numel()
        self.intersection = [self.intersection[0] + counts[1], self.intersection[1] + counts[2]]
        self.union = [self.union[0] + counts[3], self.union[1] + counts[4]]
        scores = torch.cat([1 - normalized, normalized], dim=-2).flatten(1)  # [batch, 2 H W]
        labels = torch.cat([~target, target], dim=-2).flatten(1)
        self.ap_sum += average_precision(scores, labels).sum().item()
        self.n_images += heatmaps.shape[0]

    def compute(self) -> dict[str, float]:
        """``pixel_accuracy``, ``miou``, ``map`` (and ``iou_background``, ``iou_foreground``, ``n_images``)."""
        if self.n_images == 0:
            raise ValueError("SegmentationMetrics.compute() before any update(); add a batch first")
        iou = [i / u if u else 0.0 for i, u in zip(self.intersection, self.union)]
        return {
            "pixel_accuracy": self.correct / self.labeled,
            "miou": (iou[0] + iou[1]) / 2,
            "map": self.ap_sum / self.n_images,
            "iou_background": iou[0],
            "iou_foreground": iou[1],
            "n_images": self.n_images,
        }


# ============================================================================ ImageNet-segmentation data


class ImageNetSegmentation(torch.utils.data.Dataset):
    """ImageNet-segmentation (Guillaumin et al. 2014) from ``gtsegs_ijcv.mat``: ``(image, mask)`` pairs.

    The file is MATLAB v7.3 (HDF5); reading it needs h5py (``pip install h5py``). Items are
    ``image`` ``[3, S, S]`` float (normalised with ``mean``/``std``) and ``mask`` ``[S, S]`` long 0/1.

    Args:
        path: ``gtsegs_ijcv.mat``.
        image_size: ``S`` (224 in both papers).
        mode: ``"resize"`` squashes image (bilinear) and mask (nearest) to ``S x S``, as Chefer et al.;
            ``"paper_crop"`` is Gandelsman et al.'s code: the image is resized (bicubic, shorter side) and
            centre-cropped like open_clip's preprocessing while the mask is squashed, so the two are
            misaligned on non-square images; ``"crop"`` crops image and mask alike.
        mean, std: Per-channel normalisation (default: CLIP's; Chefer et al.'s ViT used 0.5, 0.5);
            None for images in [0, 1].

    Example:
        >>> data = ImageNetSegmentation("gtsegs_ijcv.mat")  # doctest: +SKIP
        >>> image, mask = data[0]  # [3, 224, 224], [224, 224]  # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(data, batch_size=8, num_workers=4)  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | Path,
        image_size: int = 224,
        mode: str = "resize",
        mean: Sequence[float] | None = CLIP_MEAN,
        std: Sequence[float] | None = CLIP_STD,
    ):
        h5py = _import_h5py()
        _check_pair_options(image_size, mode, mean, std)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"No file at {str(self.path)!r}; ImageNetSegmentation needs gtsegs_ijcv.mat (ImageNet-segmentation, "
                "Guillaumin et al. 2014, as distributed with Chefer et al.'s Transformer-Explainability)"
            )
        self.image_size, self.mode, self.mean, self.std = image_size, mode, mean, std
        with h5py.File(self.path, "r") as file:
            if "value" not in file or "img" not in file["value"] or "gt" not in file["value"]:
                raise ValueError(f"{str(self.path)!r} has no /value/img and /value/gt: it is not gtsegs_ijcv.mat")
            self._length = len(file["/value/img"])
        self._file = None  # opened on first access, once per DataLoader worker

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} images")
        if self._file is None:
            self._file = _import_h5py().File(self.path, "r")
        image, mask = decode_record(self._file, index % self._length)
        return transform_pair(image, mask, self.image_size, self.mode, self.mean, self.std)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"] = None  # an open HDF5 handle does not cross into worker processes
        return state


def decode_record(file: Any, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One image and mask from an open ``gtsegs_ijcv.mat`` (an ``h5py.File`` or a mapping like it).

    MATLAB stores arrays column-major: ``/value/img[index, 0]`` references a ``[3, W, H]`` array
    (transposed here to ``[H, W, 3]``), and ``/value/gt[index, 0]`` references a cell whose ``[0, 0]``
    entry references the ``[W, H]`` mask (transposed to ``[H, W]``).

    Example:
        >>> with h5py.File("gtsegs_ijcv.mat", "r") as file:  # doctest: +SKIP
        ...     image, mask = decode_record(file, 0)  # uint8 [H, W, 3], [H, W]
    """
    image = np.asarray(file[file["/value/img"][index, 0]]).transpose(2, 1, 0)
    cell = file[file["/value/gt"][index, 0]]
    mask = np.asarray(file[cell[0, 0]]).transpose(1, 0)
    return image, mask


def transform_pair(
    image: Any,
    mask: Any,
    image_size: int = 224,
    mode: str = "resize",
    mean: Sequence[float] | None = CLIP_MEAN,
    std: Sequence[float] | None = CLIP_STD,
) -> tuple[Float[Tensor, "3 size size"], Tensor]:
    """Resize (or crop) an image and its mask as the chosen protocol does; see :class:`ImageNetSegmentation`.

    The geometry is computed with PIL through torchvision, as both papers' code does, so
    ``mode="paper_crop"`` gives open_clip's evaluation preprocessing to the bit and ``mode="resize"``
    torchvision's ``Resize((S, S))``.

    Args:
        image: ``[H, W, 3]`` or ``[H, W]`` uint8 array (numpy or torch).
        mask: ``[H, W]`` array with values 0 / 1.
        image_size, mode, mean, std: As in :class:`ImageNetSegmentation`.

    Returns:
        ``(image [3, S, S] float, mask [S, S] long)``.

    Example:
        >>> image = np.zeros((40, 80, 3), dtype=np.uint8); mask = np.zeros((40, 80), dtype=np.uint8)
        >>> x, y = transform_pair(image, mask, image_size=16)
        >>> tuple(x.shape), tuple(y.shape), y.dtype
        ((3, 16, 16), (16, 16), torch.int64)
    """
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    _check_pair_options(image_size, mode, mean, std)
    image, mask = np.asarray(image), np.asarray(mask)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise ValueError(f"image must be a uint8 [H, W, 3] or [H, W] array, got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask must be [H, W] = {image.shape[:2]} like the image, got {mask.shape}")
    picture = Image.fromarray(image).convert("RGB")
    labels = Image.fromarray(mask.astype(np.uint8))
    square = [image_size, image_size]
    if mode == "resize":
        picture = TF.resize(picture, square, interpolation=InterpolationMode.BILINEAR)
    else:
        picture = TF.center_crop(TF.resize(picture, image_size, interpolation=InterpolationMode.BICUBIC), square)
    if mode == "crop":
        labels = TF.center_crop(TF.resize(labels, image_size, interpolation=InterpolationMode.NEAREST), square)
    else:
        labels = TF.resize(labels, square, interpolation=InterpolationMode.NEAREST)
    pixels = TF.to_tensor(picture)
    if mean is not None:
        pixels = TF.normalize(pixels, list(mean), list(std))
    return pixels, torch.from_numpy(np.array(labels, dtype=np.int64))


# ============================================================================ internals


def _vision_tower(model: Any) -> Any:
    return image_tower(model)


def _check_directions(vision: Any, directions: Any) -> Tensor:
    cfg = vision.cfg
    d_repr = cfg.d_proj if cfg.d_proj is not None else cfg.d_model
    if not isinstance(directions, Tensor) or directions.ndim != 2 or directions.shape[0] != d_repr:
        got = tuple(directions.shape) if isinstance(directions, Tensor) else type(directions).__name__
        space = "the CLIP embedding (d_proj)" if cfg.d_proj is not None else "the pre-head representation (d_model)"
        raise ValueError(
            f"directions must be a [d_repr={d_repr}, k] tensor of column vectors in {space}, got {got}; "
            "for one direction use direction[:, None]"
        )
    if not directions.is_floating_point():
        raise TypeError(f"directions must be a float tensor, got {directions.dtype}")
    return directions


def _check_index(value: Any, size: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -size <= value < size:
        raise ValueError(f"{name} must be an int in [-{size}, {size - 1}], got {value!r}")
    return value % size


def _head_mask(cfg: Any, layers: Any, heads: Any) -> Tensor:
    """``[n_layers, n_heads]`` bool: which heads are summed."""
    mask = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.bool)
    as_pairs = heads is not None and not isinstance(heads, (str, int, Tensor)) and len(heads) > 0
    if as_pairs and all(isinstance(h, (tuple, list)) for h in heads):
        if layers is not None:
            raise ValueError("heads given as (layer, head) pairs already choose the layers; pass layers=None")
        for pair in heads:
            if len(pair) != 2:
                raise ValueError(f"heads as pairs must be (layer, head) tuples, got {pair!r}")
            mask[_check_index(pair[0], cfg.n_layers, "layer"), _check_index(pair[1], cfg.n_heads, "head")] = True
        return mask
    if layers is not None and (isinstance(layers, (str, int)) or not len(layers)):
        raise ValueError(f"layers must be a non-empty list of layer indices or None, got {layers!r}")
    if heads is not None and (isinstance(heads, (str, int)) or not len(heads)):
        raise ValueError(f"heads must be a non-empty list of head indices or of (layer, head) pairs, or None; got {heads!r}")
    rows = [_check_index(l, cfg.n_layers, "layer") for l in layers] if layers is not None else list(range(cfg.n_layers))
    cols = [_check_index(h, cfg.n_heads, "head") for h in heads] if heads is not None else list(range(cfg.n_heads))
    mask[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = True
    return mask


def _direction_maps(
    vision: Any, images: Any, directions: Tensor, mask: Tensor, ln_mode: str, divide_by_norm: bool, chunk_size: Any
) -> tuple[Tensor, Tensor]:
    """Sum of the chosen heads' patch-token terms along each direction: ``[batch, k, rows, cols]``, and the scores."""
    if ln_mode not in LN_MODES:
        raise ValueError(f"ln_mode must be one of {LN_MODES}, got {ln_mode!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    cfg = vision.cfg
    layers = mask.any(dim=1).nonzero().flatten().tolist()
    names = sorted({name for layer in layers for name in required_hooks(vision, "head_token", [layer])})
    with torch.no_grad():
        _, cache = vision.run_with_cache(images, names_filter=names)
        batch, _, _, n_pos = cache["pattern", layers[0]].shape
        if chunk_size is None:
            chunk_size = max(1, _CHUNK_ELEMENTS // (batch * (cfg.n_heads * n_pos + 2 * cfg.n_layers + 2)))
        maps, scores = [], []
        for start in range(0, directions.shape[1], chunk_size):
            chunk = directions[:, start : start + chunk_size]
            total, chunk_scores = None, None
            for layer in layers:
                parts = direct_contributions(
                    vision, cache, level="head_token", layers=[layer], ln_mode=ln_mode, directions=chunk,
                    normalize=divide_by_norm,
                )
                _, patches = parts.token_maps()  # [batch, 1, head, rows, cols, k]
                weights = mask[layer].to(patches)
                term = torch.einsum("bhrck,h->bkrc", patches[:, 0], weights)
                total = term if total is None else total + term
                if chunk_scores is None:
                    chunk_scores = parts.sum()  # every call's terms add up to the whole projection
            maps.append(total)
            scores.append(chunk_scores)
    return torch.cat(maps, dim=1), torch.cat(scores, dim=1)


def _require_class_token(vision: Any, method: str) -> None:
    if not vision.cfg.class_token:
        raise ValueError(
            f"{method} reads the CLS query row of the attention maps, but {vision.cfg.model_name} has no CLS token"
        )


def _grid(vision: Any, images: Tensor) -> tuple[int, int]:
    patch = vision.cfg.patch_size
    return (images.shape[-2] // patch[0], images.shape[-1] // patch[1])


def _cls_to_patches(vision: Any, joint: Tensor, images: Tensor) -> Tensor:
    """``[batch, pos, pos]`` -> the CLS row over the patch tokens on the grid."""
    return joint[:, 0, vision.cfg.n_prefix_tokens :].unflatten(-1, _grid(vision, images))


def _fused_patterns(vision: Any, images: Any, layers: list[int], fusion: str) -> Tensor:
    """``[batch, layer, pos, pos]`` head-fused patterns, fused in the hooks (all layers' heads are never held at once)."""
    fused: dict[int, Tensor] = {}

    def keeper(layer: int):
        def keep(pattern: Tensor, hook: Any) -> None:
            if fusion == "mean":
                fused[layer] = pattern.mean(dim=1)
            else:
                fused[layer] = pattern.amax(dim=1) if fusion == "max" else pattern.amin(dim=1)

        return keep

    with torch.no_grad():
        vision.run_with_hooks(images, fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", keeper(l)) for l in layers])
    return torch.stack([fused[l] for l in layers], dim=1)


def _patterns_and_gradients(
    vision: Any, images: Any, target: Any, layers: list[int], normalize_output: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """The patterns of ``layers`` and the gradients of the summed per-image scores with respect to them."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("gradient-based maps need autograd; call them outside torch.inference_mode()")
    stored: dict[int, Tensor] = {}

    def keeper(layer: int):
        def keep(pattern: Tensor, hook: Any) -> None:
            stored[layer] = pattern

        return keep

    with torch.enable_grad():
        # a leaf input keeps the patterns in the graph even when the weights are frozen
        leaf_ok = isinstance(images, Tensor) and images.is_floating_point()
        x = images.detach().requires_grad_(True) if leaf_ok else images
        output = vision.run_with_hooks(x, fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", keeper(l)) for l in layers])
        score = _target_score(output, target, normalize_output)
        patterns = [stored[l] for l in layers]
        grads = torch.autograd.grad(score.sum(), patterns)  # images are independent: one backward for the batch
    return [p.detach() for p in patterns], list(grads)


def _target_score(output: Tensor, target: Any, normalize_output: bool) -> Tensor:
    """Per-image scalar to explain: ``output . target[b]`` or ``output[b, target[b]]``."""
    batch, d_out = output.shape
    if normalize_output:
        output = F.normalize(output, dim=-1)
    if isinstance(target, Tensor) and not target.is_floating_point() and target.shape == (batch,):
        if target.min() < 0 or target.max() >= d_out:
            raise ValueError(f"target indices must be in [0, {d_out - 1}], got {target.tolist()}")
        return output.gather(1, target.to(output.device)[:, None])[:, 0]
    if isinstance(target, Tensor) and target.is_floating_point() and target.shape == (batch, d_out):
        return (output * target.to(output)).sum(dim=-1)
    got = f"{target.dtype} {tuple(target.shape)}" if isinstance(target, Tensor) else type(target).__name__
    raise ValueError(
        f"target must be [batch={batch}, d_out={d_out}] float directions (e.g. classifier[:, classes].T) or "
        f"[batch={batch}] integer indices into the model output, got {got}"
    )


def _check_maps(maps: Any, name: str) -> None:
    if not isinstance(maps, Tensor) or maps.ndim != 3 or not maps.is_floating_point():
        got = f"{maps.dtype} {tuple(maps.shape)}" if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"{name} must be a float tensor [batch, height, width], got {got}")


def _pair_size(size: Any, name: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return (size, size)
    pair = isinstance(size, (tuple, list, torch.Size)) and len(size) == 2
    if pair and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        return (int(size[0]), int(size[1]))
    raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {size!r}")


def _check_pair_options(image_size: Any, mode: Any, mean: Any, std: Any) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (square output), got {image_size!r}")
    if mode not in DATASET_MODES:
        raise ValueError(f"mode must be one of {DATASET_MODES}, got {mode!r}")
    if (mean is None) != (std is None) or (mean is not None and (len(mean) != 3 or len(std) != 3)):
        raise ValueError(f"mean and std must both be 3 numbers (or both None), got {mean!r} and {std!r}")


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError as error:
        raise ImportError(
            "Reading gtsegs_ijcv.mat (MATLAB v7.3 / HDF5) needs h5py, which vit_lens does not install: pip install h5py"
        ) from error
    return h5py
