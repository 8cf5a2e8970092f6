"""segmentation: decomposition heatmaps, attention baselines, the Chefer et al. protocol and the data loader.

Heatmaps are checked against the decomposition identity and an independent einsum over the cache;
GradCAM and Chefer's relevance against per-image autograd through a leaf that replaces one pattern;
average precision against a direct loop over thresholds; the metrics against hand-computed values.
"""

import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import FAMILIES, assert_rel_close, tiny_config
from vit_lens import HookedViT
from vit_lens import segmentation as seg
from vit_lens.intervene.decompose import direct_contributions

N_PREFIX = 3  # tiny_model: CLS + 2 registers, then a 4 x 4 grid of patches


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture
def directions() -> torch.Tensor:
    return torch.randn(16, 5, generator=torch.Generator().manual_seed(3))


def readout_matrix(model) -> torch.Tensor:
    """The final LayerNorm weight times the projection (identity without one), centred over d_model."""
    projection = model.W_proj if model.cfg.d_proj is not None else torch.eye(model.cfg.d_model)
    readout = model.ln_final.w[:, None] * projection
    return readout - readout.mean(dim=0, keepdim=True)


# ------------------------------------------------------------------------------ decomposition heatmaps


@pytest.mark.parametrize("family", ["clip_like", "vit_like", "dinov2_reg_like"])
def test_heatmap_is_the_patch_part_of_the_decomposition(family):
    """center_each, unnormalised: sum_{l,h} pattern[CLS, p] v_p W_O / scale_CLS @ centred readout @ d, by einsum."""
    model = HookedViT(tiny_config(**FAMILIES[family])).init_weights(seed=2).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    d_repr = model.cfg.d_proj or model.cfg.d_model
    dirs = torch.randn(d_repr, 3, generator=torch.Generator().manual_seed(5))
    maps = seg.text_heatmaps(model, images, dirs, normalize=None, ln_mode="center_each", divide_by_norm=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
        per_token = sum(
            torch.einsum("bhk,bkhd,hdm->bkm", cache["pattern", l][:, :, 0], cache["v", l], model.blocks[l].attn.W_O)
            for l in range(model.cfg.n_layers)
        )
        per_token = per_token / cache["ln_final.hook_scale"][:, :1] @ readout_matrix(model) @ dirs  # [b, pos, k]
    n_prefix = model.cfg.n_prefix_tokens
    expected = per_token[:, n_prefix:].permute(0, 2, 1).unflatten(-1, (4, 4))
    assert maps.shape == (2, 3, 4, 4)
    assert_rel_close(maps, expected, rtol=1e-5, what=family)


def test_paper_mode_heatmap_plus_the_other_terms_is_the_normalized_embedding(tiny_model, images, directions):
    maps, scores = seg.text_heatmaps(tiny_model, images, directions, normalize=None, return_scores=True)
    with torch.no_grad():
        embed, cache = tiny_model.run_with_cache(images)
        parts = direct_contributions(tiny_model, cache, level="head_token", ln_mode="paper", directions=directions,
                                     normalize=True)
    others = parts.values[:, parts.token < N_PREFIX].sum(dim=1)  # embed, MLPs and prefix-token terms
    target = F.normalize(embed, dim=-1) @ directions
    assert_rel_close(maps.sum(dim=(-2, -1)) + others, target, rtol=1e-5, what="patches + rest")
    assert_rel_close(scores, target, rtol=1e-5, what="scores")
    # the patches carry a real share of the total, so the identity is not won by the other terms alone
    assert maps.sum(dim=(-2, -1)).norm() > 0.05 * target.norm()


def test_layer_and_head_selection_sums_the_per_head_maps(tiny_model, images, directions):
    cfg = tiny_model.cfg
    per_head = torch.stack([
        torch.stack([seg.head_direction_maps(tiny_model, images, l, h, directions) for h in range(cfg.n_heads)])
        for l in range(cfg.n_layers)
    ])  # [layer, head, batch, k, rows, cols]
    everything = seg.text_heatmaps(tiny_model, images, directions, normalize=None)
    assert_rel_close(per_head.sum(dim=(0, 1)), everything, rtol=1e-5, what="all heads")
    one = seg.text_heatmaps(tiny_model, images, directions, layers=[1], heads=[2], normalize=None)
    assert_rel_close(one, per_head[1, 2], rtol=1e-6, what="one head")
    pairs = seg.text_heatmaps(tiny_model, images, directions, heads=[(0, 1), (-1, 3)], normalize=None)
    assert_rel_close(pairs, per_head[0, 1] + per_head[2, 3], rtol=1e-5, what="pairs")
    two_layers = seg.text_heatmaps(tiny_model, images, directions, layers=[0, 2], normalize=None)
    assert_rel_close(two_layers, per_head[[0, 2]].sum(dim=(0, 1)), rtol=1e-5, what="layers")
    assert (per_head[1, 2] - per_head[1, 3]).abs().max() > 1e-3  # heads differ: selection is not vacuous


def test_chunked_directions_and_clip_wrapper_give_the_same_maps(tiny_model, images, directions):
    whole = seg.text_heatmaps(tiny_model, images, directions)
    chunked = seg.text_heatmaps(tiny_model, images, directions, chunk_size=2)
    wrapped = seg.text_heatmaps(types.SimpleNamespace(vision=tiny_model), images, directions)
    assert_rel_close(chunked, whole, rtol=1e-6, what="chunked")
    assert_rel_close(wrapped, whole, rtol=0, what="HookedCLIP-like wrapper")


def test_mean_over_texts_normalization_is_zero_mean_at_every_pixel(tiny_model, images, directions):
    raw = seg.text_heatmaps(tiny_model, images, directions, normalize=None)
    normalized = seg.text_heatmaps(tiny_model, images, directions)
    assert normalized.mean(dim=1).abs().max() < 1e-6 * raw.abs().max()
    assert_rel_close(normalized, raw - raw.mean(dim=1, keepdim=True), rtol=1e-6, what="definition")
    assert raw.mean(dim=1).abs().max() > 1e-3  # there was a mean to remove


def test_upsample_keeps_shape_and_mean():
    maps = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(6))
    up = seg.upsample(maps, 32)
    assert up.shape == (2, 5, 32, 32)
    torch.testing.assert_close(up.mean(dim=(-2, -1)), maps.mean(dim=(-2, -1)), rtol=0, atol=1e-6)  # integer factor
    # the protocol's call: interpolate(scale_factor=patch_size, mode="bilinear")
    torch.testing.assert_close(up, F.interpolate(maps, scale_factor=8, mode="bilinear"), rtol=0, atol=1e-6)
    odd = seg.upsample(maps[0], (30, 18))
    assert odd.shape == (5, 30, 18)
    assert (odd.mean(dim=(-2, -1)) - maps[0].mean(dim=(-2, -1))).abs().max() < 0.05 * maps.abs().mean()


# ------------------------------------------------------------------------------ attention baselines


def test_raw_attention_is_the_cached_cls_row(tiny_model, images):
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(images)
    for layer in (0, -1):
        expected = cache["pattern", layer][:, :, 0, N_PREFIX:].mean(dim=1).reshape(2, 4, 4)
        torch.testing.assert_close(seg.raw_attention(tiny_model, images, layer=layer), expected, rtol=0, atol=1e-7)


def test_rollout_joint_matrices_are_row_stochastic_and_match_the_product(tiny_model, images):
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(images)
    fused = torch.stack([cache["pattern", l].mean(dim=1) for l in range(3)], dim=1)  # [b, layer, pos, pos]
    every = seg.rollout(fused, return_all=True)
    assert every.shape == (2, 3, 19, 19)
    torch.testing.assert_close(every.sum(dim=-1), torch.ones(2, 3, 19), rtol=0, atol=1e-6)
    step = [(fused[:, l] + torch.eye(19)) / 2 for l in range(3)]  # rows of A sum to 1, so (A + I) / 2
    torch.testing.assert_close(seg.attention_rollout(tiny_model, images),
                               (step[2] @ step[1] @ step[0])[:, 0, N_PREFIX:].reshape(2, 4, 4), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(seg.attention_rollout(tiny_model, images, start_layer=1),
                               (step[2] @ step[1])[:, 0, N_PREFIX:].reshape(2, 4, 4), rtol=1e-6, atol=1e-7)
    # "max" fusion: every step's rows still sum to 1 after normalisation
    maxed = seg.rollout(torch.stack([cache["pattern", l].amax(dim=1) for l in range(3)], dim=1), return_all=True)
    torch.testing.assert_close(maxed.sum(dim=-1), torch.ones(2, 3, 19), rtol=0, atol=1e-6)


def leaf_gradient(model, image, score_fn, layer):
    """Pattern of ``layer`` and d score / d pattern for one image: the pattern is replaced by a leaf."""
    leaf = {}

    def replace(pattern, hook):
        leaf["x"] = pattern.detach().clone().requires_grad_(True)
        return leaf["x"]

    out = model.run_with_hooks(image[None], fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", replace)])
    score_fn(out[0]).backward()
    return leaf["x"].detach()[0], leaf["x"].grad[0]  # [head, q, k] each


def test_gradcam_matches_per_image_autograd(tiny_model, images, directions):
    target = directions[:, :2].T  # one direction per image
    maps = seg.attention_gradcam(tiny_model, images, target)
    for i in range(2):
        pattern, grad = leaf_gradient(tiny_model, images[i], lambda out: out @ target[i], layer=2)
        weights = grad[:, 0, N_PREFIX:].mean(dim=-1)  # one weight per head
        expected = (pattern[:, 0, N_PREFIX:] * weights[:, None]).mean(dim=0).clamp(min=0).reshape(4, 4)
        assert expected.abs().max() > 0  # not an all-clamped map
        torch.testing.assert_close(maps[i], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("start_layer", [0, 1])
def test_chefer_relevance_matches_per_image_autograd(tiny_model, images, directions, start_layer):
    target = directions[:, 2:4].T
    maps = seg.chefer_relevance(tiny_model, images, target, start_layer=start_layer, normalize_output=True)
    for i in range(2):
        relevance = torch.eye(19)
        for layer in range(start_layer, 3):
            pattern, grad = leaf_gradient(tiny_model, images[i], lambda out: F.normalize(out, dim=-1) @ target[i], layer)
            relevance = relevance + (grad * pattern).clamp(min=0).mean(dim=0) @ relevance
        torch.testing.assert_close(maps[i], relevance[0, N_PREFIX:].reshape(4, 4), rtol=1e-5, atol=1e-7)
    assert (maps - seg.chefer_relevance(tiny_model, images, target, start_layer=start_layer)).abs().max() > 0


def test_gradient_targets_as_class_indices_equal_one_hot_directions():
    model = HookedViT(tiny_config(**FAMILIES["vit_like"])).init_weights(seed=3).eval()  # 5 logits
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    classes = torch.tensor([4, 1])
    one_hot = F.one_hot(classes, 5).float()
    for method in (seg.attention_gradcam, seg.chefer_relevance):
        torch.testing.assert_close(method(model, images, classes), method(model, images, one_hot), rtol=0, atol=0)


def test_gradient_maps_leave_no_parameter_gradients(tiny_model, images, directions):
    seg.chefer_relevance(tiny_model, images, directions[:, :2].T)
    assert all(p.grad is None for p in tiny_model.parameters())


# ------------------------------------------------------------------------------ protocol and metrics


def brute_force_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """sum_n (R_n - R_{n-1}) P_n over the distinct scores, highest first, as scikit-learn defines it."""
    positives = labels.sum().item()
    total, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        chosen = scores >= threshold
        true_positives = (chosen & labels).sum().item()
        recall, precision = true_positives / positives, true_positives / chosen.sum().item()
        total += (recall - previous_recall) * precision
        previous_recall = recall
    return total


def test_average_precision_matches_brute_force_with_and_without_ties():
    generator = torch.Generator().manual_seed(8)
    tied = torch.randint(0, 6, (6, 40), generator=generator).float() / 5
    continuous = torch.rand(6, 40, generator=generator)
    labels = torch.rand(6, 40, generator=generator) < 0.4
    for scores in (tied, continuous):
        fast = seg.average_precision(scores, labels)
        slow = torch.tensor([brute_force_average_precision(s, l) for s, l in zip(scores, labels)], dtype=torch.float64)
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    assert seg.average_precision(tied, labels).sub(seg.average_precision(continuous, labels)).abs().max() > 1e-3
    hand = seg.average_precision(torch.tensor([[0.9, 0.8, 0.7, 0.1]]), torch.tensor([[1, 0, 1, 0]]))
    assert hand.item() == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert seg.average_precision(torch.zeros(1, 4), torch.tensor([[0, 1, 1, 0]])).item() == 0.5  # one threshold
    assert seg.average_precision(torch.rand(1, 4), torch.zeros(1, 4, dtype=torch.bool)).item() == 0.0


def test_metrics_are_pooled_over_images_as_the_protocol_defines():
    """Image A: normalised [[0, .25], [.75, 1]], mean .5 -> bottom row foreground; image B: constant -> background."""
    heatmaps = torch.tensor([[[0.0, 1.0], [3.0, 4.0]], [[5.0, 5.0], [5.0, 5.0]]])
    masks = torch.tensor([[[0, 0], [1, 0]], [[1, 1], [0, 0]]])
    metrics = seg.SegmentationMetrics()
    metrics.update(heatmaps[:1], masks[:1])
    metrics.update(heatmaps[1:], masks[1:])
    result = metrics.compute()
    assert result["pixel_accuracy"] == pytest.approx(5 / 8)
    # pooled: background 4/7 (A: 2/3, B: 2/4), foreground 1/4 (A: 1/2, B: 0/2); per-image means would give 7/12
    assert result["iou_background"] == pytest.approx(4 / 7)
    assert result["iou_foreground"] == pytest.approx(1 / 4)
    assert result["miou"] == pytest.approx((4 / 7 + 1 / 4) / 2)
    # A: one AP over the 8 scores (1 - R, R) against (background, foreground); B: all scores 0 -> 0.5
    assert result["map"] == pytest.approx((2.5 / 4 + 0.5) / 2)
    assert result["n_images"] == 2
    batched = seg.SegmentationMetrics()
    batched.update(heatmaps, masks)
    assert batched.compute() == result


def test_clipping_negative_values_changes_the_foreground():
    heatmap = torch.tensor([[[-4.0, 1.0], [0.0, 2.0]]])
    # without clipping: [0, 5/6, 4/6, 1], mean 5/8; clipped at 0: [0, .5, 0, 1], mean 3/8
    assert seg.binarize(heatmap).tolist() == [[[False, True], [True, True]]]
    assert seg.binarize(heatmap, clip_negative=True).tolist() == [[[False, True], [False, True]]]
    assert seg.normalize_heatmaps(torch.full((1, 2, 2), 3.0)).abs().max() == 0
    # a value equal to the mean is background (strictly greater is foreground)
    assert seg.binarize(torch.tensor([[[0.0, 1.0], [1.0, 2.0]]])).tolist() == [[[False, False], [False, True]]]


# ------------------------------------------------------------------------------ data


def quarter_image(height=40, width=80):
    """Red in the left quarter, blue elsewhere; the mask marks the red part."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 4, 0] = 255
    image[:, width // 4 :, 2] = 255
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 4] = 1
    return image, mask


def agreement(image: torch.Tensor, mask: torch.Tensor) -> float:
    red = image[0] > image[2]
    return (red == mask.bool()).float().mean().item()


def test_resize_keeps_image_and_mask_aligned_and_paper_crop_does_not():
    image, mask = quarter_image()
    resized_image, resized_mask = seg.transform_pair(image, mask, image_size=16, mode="resize")
    assert resized_image.shape == (3, 16, 16) and resized_image.dtype == torch.float32
    assert resized_mask.dtype == torch.int64 and set(resized_mask.unique().tolist()) == {0, 1}
    assert resized_mask[:, :4].all() and not resized_mask[:, 4:].any()
    assert agreement(resized_image, resized_mask) == 1.0
    cropped_image, cropped_mask = seg.transform_pair(image, mask, image_size=16, mode="crop")
    assert not cropped_mask.any() and agreement(cropped_image, cropped_mask) == 1.0  # the crop keeps x in [20, 60)
    paper_image, paper_mask = seg.transform_pair(image, mask, image_size=16, mode="paper_crop")
    torch.testing.assert_close(paper_image, cropped_image, rtol=0, atol=0)
    torch.testing.assert_close(paper_mask, resized_mask, rtol=0, atol=0)
    assert agreement(paper_image, paper_mask) == 0.75  # the squashed mask's 4 red columns point at blue pixels


def test_transforms_match_the_papers_preprocessing():
    import open_clip
    from PIL import Image
    from torchvision import transforms

    rng = np.random.default_rng(9)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mask = rng.integers(0, 2, (37, 53), dtype=np.uint8)
    paper, _ = seg.transform_pair(image, mask, image_size=16, mode="paper_crop")
    torch.testing.assert_close(paper, open_clip.image_transform(16, is_train=False)(Image.fromarray(image)), rtol=0, atol=0)
    chefer = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    resized, resized_mask = seg.transform_pair(image, mask, image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.testing.assert_close(resized, chefer(Image.fromarray(image)), rtol=0, atol=0)
    nearest = np.array(transforms.Resize((16, 16), transforms.InterpolationMode.NEAREST)(Image.fromarray(mask)))
    assert resized_mask.tolist() == nearest.tolist()
    grey, _ = seg.transform_pair(image[..., 0], mask, image_size=16, mean=None, std=None)
    assert grey.shape == (3, 16, 16) and torch.equal(grey[0], grey[1]) and 0 <= grey.min() and grey.max() <= 1


def test_decode_record_follows_the_matlab_references():
    """A mapping laid out like gtsegs_ijcv.mat: column-major arrays behind object references."""
    image, mask = quarter_image(6, 8)
    file = {
        "/value/img": np.array([["ref_img0"], ["ref_img1"]], dtype=object),
        "/value/gt": np.array([["ref_cell0"], ["ref_cell1"]], dtype=object),
        "ref_img1": image.transpose(2, 1, 0),  # MATLAB [3, W, H]
        "ref_cell1": np.array([["ref_mask1"]], dtype=object),
        "ref_mask1": mask.transpose(1, 0),  # MATLAB [W, H]
    }
    decoded_image, decoded_mask = seg.decode_record(file, 1)
    assert decoded_image.shape == (6, 8, 3) and np.array_equal(decoded_image, image)
    assert np.array_equal(decoded_mask, mask)


def test_missing_h5py_is_named(monkeypatch, tmp_path):
    path = tmp_path / "gtsegs_ijcv.mat"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` raise ImportError
    with pytest.raises(ImportError, match=r"pip install h5py"):
        seg.ImageNetSegmentation(path)


# ------------------------------------------------------------------------------ errors


def test_bad_inputs_raise_directed_errors(tiny_model, images, directions):
    with pytest.raises(ValueError, match=r"d_repr=16, k\]"):
        seg.text_heatmaps(tiny_model, images, directions.T)
    with pytest.raises(ValueError, match="single direction"):
        seg.text_heatmaps(tiny_model, images, directions[:, :1])
    with pytest.raises(ValueError, match="pass layers=None"):
        seg.text_heatmaps(tiny_model, images, directions, layers=[0], heads=[(0, 1)])
    with pytest.raises(ValueError, match=r"layer must be an int in \[-3, 2\]"):
        seg.head_direction_maps(tiny_model, images, 3, 0, directions)
    with pytest.raises(ValueError, match="integer indices"):
        seg.attention_gradcam(tiny_model, images, directions[:, :1].T)
    with pytest.raises(ValueError, match="Upsample the maps first"):
        seg.SegmentationMetrics().update(torch.rand(2, 4, 4), torch.zeros(2, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="values 0"):
        seg.SegmentationMetrics().update(torch.rand(1, 4, 4), torch.full((1, 4, 4), 2))
    with pytest.raises(ValueError, match="before any update"):
        seg.SegmentationMetrics().compute()
    with pytest.raises(ValueError, match="finite"):
        seg.normalize_heatmaps(torch.tensor([[[0.0, float("nan")]]]))
    with pytest.raises(ValueError, match="mode must be one of"):
        seg.transform_pair(*quarter_image(), mode="squash")
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside torch.inference_mode"):
        seg.chefer_relevance(tiny_model, images, directions[:, :2].T)
    no_cls = HookedViT(tiny_config(class_token=False, n_registers=0, pool_type="avg")).init_weights(seed=0)
    with pytest.raises(ValueError, match="no CLS token"):
        seg.attention_rollout(no_cls, images)
