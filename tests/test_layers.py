"""layers: the "Peeling Back the Layers" paper's heatmap perspective (A^l, dA^l, per-head maps), high-norm tokens and the data-flow split.

Maps are checked against the full cached patterns; the outlier rule against hand-made norms and a
token planted by a hook; the residual update (eq. 6) against ``resid_post - resid_pre`` (1e-5 relative)
on every tiny architecture, a LayerScale timm model and the toy CLIP, for CLS and for a patch.
"""

import pytest
import torch

import vit_lens
from tests.conftest import FAMILIES, assert_rel_close, tiny_config
from vit_lens import HookedViT
from vit_lens import layers as L
from vit_lens.toy import ToyWorld

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def toy_clip():
    return vit_lens.load_toy_clip()


@pytest.fixture(scope="module")
def toy_images():
    return ToyWorld(seed=5).sample(6).images


def patch_rows(model, cache, layer, query):
    """Brute force: the query row of the full cached pattern over the patch keys, [batch, head, patch]."""
    return cache["pattern", layer][:, :, query, model.cfg.n_prefix_tokens :]


# ------------------------------------------------------------------------------ heatmaps (eqs. 7-8)


@pytest.mark.parametrize("family", ["clip_like", "vit_like", "dinov2_reg_like", "deit_distilled_like"])
def test_maps_are_the_head_mean_of_the_cls_row_over_patches(family, images):
    model = HookedViT(tiny_config(**FAMILIES[family])).init_weights(seed=2).eval()
    maps = L.layer_attention_maps(model, images)
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
    n_prefix = model.cfg.n_prefix_tokens
    for layer in range(model.cfg.n_layers):
        rows = patch_rows(model, cache, layer, 0)
        assert_rel_close(maps.head_maps[:, layer].flatten(-2), rows, 1e-6, f"{family} L{layer} heads")
        assert_rel_close(maps.maps[:, layer].flatten(-2), rows.mean(dim=1), 1e-6, f"{family} L{layer} A^l")
        assert_rel_close(maps.prefix[:, layer], cache["pattern", layer][:, :, 0, :n_prefix], 1e-6, "prefix keys")
        assert_rel_close(maps.key_norms[:, layer], cache["resid_pre", layer].norm(dim=-1), 1e-6, "key norms")
    # every attention row sums to one over the prefix keys and the patches
    total = maps.head_maps.sum(dim=(-2, -1)) + maps.prefix.sum(dim=-1)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
    assert maps.maps.shape == (2, 3, 4, 4) and not maps.outlier_mask.any()


def test_deltas_and_their_magnitude_follow_eq_8(toy_clip, toy_images):
    maps = L.layer_attention_maps(toy_clip, toy_images)
    a = maps.maps
    assert a.shape == (6, 4, 8, 8)
    deltas = maps.deltas()
    for layer in range(1, 4):
        torch.testing.assert_close(deltas[:, layer - 1], a[:, layer] - a[:, layer - 1], atol=0, rtol=0)
    l1 = sum((a[:, l] - a[:, l - 1]).abs().sum(dim=(-2, -1)) for l in range(1, 4))
    torch.testing.assert_close(maps.delta_magnitude(1).sum(dim=1), l1, atol=1e-5, rtol=1e-5)
    l2 = (a[:, 2] - a[:, 1]).pow(2).sum(dim=(-2, -1)).sqrt()
    torch.testing.assert_close(maps.delta_magnitude(2)[:, 1], l2, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="ord must be 1"):
        maps.delta_magnitude(3)


def test_other_queries_and_models_without_cls(images):
    model = HookedViT(tiny_config(class_token=False, n_registers=1, pool_type="avg")).init_weights(seed=3).eval()
    with pytest.raises(ValueError, match="no CLS token.*query='patches'"):
        L.layer_attention_maps(model, images)
    with pytest.raises(ValueError, match="query='cls' but"):
        L.layer_attention_maps(model, images, query="cls")
    with pytest.raises(ValueError, match=r"token position in \[0, 16\]"):
        L.layer_attention_maps(model, images, query=17)
    received = L.layer_attention_maps(model, images, query="patches")
    at_five = L.layer_attention_maps(model, images, query=5)
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
    for layer in range(3):
        pattern = cache["pattern", layer]
        expected = pattern[:, :, 1:, 1:].mean(dim=2).mean(dim=1)  # mean over patch queries, then heads
        assert_rel_close(received.maps[:, layer].flatten(-2), expected, 1e-6, "patches query")
        assert_rel_close(at_five.maps[:, layer].flatten(-2), pattern[:, :, 5, 1:].mean(dim=1), 1e-6, "query 5")
    assert received.query == "patches" and at_five.query == 5


# ------------------------------------------------------------------------------ high-norm tokens


def test_robust_rule_on_hand_made_norms():
    norms = torch.tensor([[1.0, 1.1, 0.9, 1.0, 1.05, 9.0],  # one clear outlier
                          [1.0, 1.0, 1.0, 1.0, 1.0, 1.5],  # MAD 0: only the ratio rule stops 1.5
                          [1.0, 2.0, 3.0, 4.0, 5.0, 6.5]])  # spread out: no outlier
    mask = L.robust_outliers(norms)
    assert mask.tolist() == [[False] * 5 + [True], [False] * 6, [False] * 6]
    assert L.robust_outliers(norms[1:2], min_ratio=1.4).tolist() == [[False] * 5 + [True]]
    with pytest.raises(ValueError, match="min_ratio must be a number >= 1"):
        L.robust_outliers(norms, min_ratio=0.5)
    with pytest.raises(ValueError, match="k must be a non-negative"):
        L.robust_outliers(norms, k=-1)


def plant(position: int, factor: float = 40.0):
    """A hook that makes one token of image 1 a high-norm token in block 0's output."""

    def hook(resid, hook):
        resid = resid.clone()
        resid[1, position] *= factor
        return resid

    return [("blocks.0.hook_resid_post", hook)]


def test_planted_high_norm_token_is_found_and_left_out_of_the_maps(toy_clip, toy_images):
    clean = L.find_outlier_tokens(toy_clip, toy_images)
    n_prefix = toy_clip.vision.cfg.n_prefix_tokens
    position = n_prefix + int(clean.norms[1, 0, n_prefix:].argmin())  # the smallest patch: surely no outlier
    row, col = divmod(position - n_prefix, 8)
    assert not clean.mask[1, 0, position]
    found = L.find_outlier_tokens(toy_clip, toy_images, fwd_hooks=plant(position))
    with torch.no_grad():
        _, cache = toy_clip.run_with_cache(toy_images, fwd_hooks=plant(position))
    expected_norm = cache["resid_post", 0][1, position].norm()
    assert (1, 0, position) in [(i, l, p) for i, l, p, _ in found.rows()]
    planted = [r for r in found.rows() if r[:3] == (1, 0, position)][0]
    assert planted[3] == pytest.approx(expected_norm.item(), rel=1e-5)
    frame = found.to_pandas()
    assert list(frame.columns) == ["image", "layer", "position", "norm", "ratio"] and len(frame) == len(found)
    assert frame["ratio"].min() > 2.0  # the default min_ratio
    # layer 1's attention reads block 0's output: the planted patch is an outlier of layer 1's map
    keep = L.layer_attention_maps(toy_clip, toy_images, fwd_hooks=plant(position))
    drop = L.layer_attention_maps(toy_clip, toy_images, fwd_hooks=plant(position), outliers="exclude")
    down = L.layer_attention_maps(toy_clip, toy_images, fwd_hooks=plant(position), outliers="downweight",
                                  outlier_weight=0.5)
    clean_maps = L.layer_attention_maps(toy_clip, toy_images, outliers="exclude")
    assert drop.outlier_mask[1, 1, row, col] and not clean_maps.outlier_mask[1, 1, row, col]
    assert not keep.outlier_mask.any()
    assert torch.equal(drop.outlier_mask[0], clean_maps.outlier_mask[0])  # the hook touches image 1 only
    assert keep.head_maps[1, 1, :, row, col].min() > 0
    assert drop.head_maps[1, 1, :, row, col].abs().max() == 0
    torch.testing.assert_close(down.head_maps[1, 1, :, row, col], 0.5 * keep.head_maps[1, 1, :, row, col])
    others = ~drop.outlier_mask[:, :, None].expand_as(drop.head_maps)
    torch.testing.assert_close(drop.head_maps[others], keep.head_maps[others], atol=0, rtol=0)
    renormalized = L.layer_attention_maps(toy_clip, toy_images, fwd_hooks=plant(position), outliers="exclude",
                                          renormalize=True)
    sums = renormalized.head_maps.sum(dim=(-2, -1))
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    assert renormalized.head_maps[1, 1, :, row, col].abs().max() == 0


def test_outlier_options_are_checked(tiny_model, images):
    with pytest.raises(ValueError, match="outliers must be one of"):
        L.layer_attention_maps(tiny_model, images, outliers="drop")
    with pytest.raises(ValueError, match=r"outlier_weight must be a number in \[0, 1\]"):
        L.layer_attention_maps(tiny_model, images, outliers="downweight", outlier_weight=2)
    with pytest.raises(ValueError, match="site must be one of"):
        L.find_outlier_tokens(tiny_model, images, site="mlp_out")
    prefixed = L.find_outlier_tokens(tiny_model, images, include_prefix=True, min_ratio=1.0, k=0.0)
    assert prefixed.mask[..., :3].any()  # with a rule this loose the prefix tokens are tested too
    assert not L.find_outlier_tokens(tiny_model, images, min_ratio=1.0, k=0.0).mask[..., :3].any()


# ------------------------------------------------------------------------------ data flow (eqs. 4-6)


def check_update(model, images, what):
    n_prefix = model.cfg.n_prefix_tokens
    positions = [0, n_prefix + 2] if model.cfg.class_token else [n_prefix, n_prefix + 2]
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
    for layer in range(model.cfg.n_layers):
        update = L.residual_update(model, images, layer=layer, positions=positions)
        delta = cache["resid_post", layer][:, positions] - cache["resid_pre", layer][:, positions]
        assert_rel_close(update.sum(), update.total, 1e-5, f"{what} L{layer} parts sum to dZ")
        assert_rel_close(update.total, delta, 1e-5, f"{what} L{layer} total")
        assert_rel_close(update.attention(), cache["attn_out", layer][:, positions], 1e-5, f"{what} attention part")
        assert_rel_close(update.mlp, cache["mlp_out", layer][:, positions], 1e-6, f"{what} MLP part")
        # per head: the heads' z W_O at those positions (an independent route through hook_z)
        per_head = torch.einsum("bphd,hdm->bphm", cache["z", layer][:, positions], model.blocks[layer].attn.W_O)
        assert_rel_close(update.heads(), per_head, 1e-5, f"{what} heads")
    return update


@pytest.mark.parametrize("family", list(FAMILIES))
def test_update_parts_sum_to_the_residual_change_on_every_family(family, images):
    model = HookedViT(tiny_config(**FAMILIES[family])).init_weights(seed=4).eval()
    check_update(model, images, family)


def test_update_parts_on_a_layerscale_model_and_the_toy_clip(toy_clip, toy_images):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    source = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3,
                               init_values=0.3, reg_tokens=1).eval()
    model = HookedViT.from_timm(source)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    check_update(model, images, "LayerScale")
    update = check_update(toy_clip.vision, toy_images, "toy CLIP")
    assert update.attn_terms.shape == (6, 2, 4, 65, 128)


def test_update_from_a_cache_and_token_maps(toy_clip, toy_images):
    with torch.no_grad():
        _, cache = toy_clip.run_with_cache(toy_images)
    update = L.residual_update(toy_clip, cache=cache, layer=-1)
    again = L.residual_update(toy_clip, toy_images, layer=3, positions=0)
    assert update.layer == 3 and update.positions == [0]
    torch.testing.assert_close(update.attn_terms, again.attn_terms)
    terms = update.attn_terms[:, 0].sum(dim=1)[:, 1:]  # [batch, patch, d_model], summed over heads
    assert_rel_close(update.token_map()[:, 0].flatten(1), terms.norm(dim=-1), 1e-6, "norm map")
    direction = torch.randn(128, generator=torch.Generator().manual_seed(0))
    assert_rel_close(update.token_map(direction)[:, 0].flatten(1), terms @ direction, 1e-5, "projected map")
    one_head = update.attn_terms[:, 0, 2, 1:].norm(dim=-1)
    assert_rel_close(update.token_map(heads=[2])[:, 0].flatten(1), one_head, 1e-6, "head map")
    with pytest.raises(KeyError, match="residual_update needs"):
        L.residual_update(toy_clip, cache=toy_clip.run_with_cache(toy_images, names_filter="hook_embed")[1], layer=0)
    with pytest.raises(ValueError, match="images= or cache=, not both"):
        L.residual_update(toy_clip, toy_images, cache=cache, layer=0)


def test_update_norms_match_the_cache(toy_clip, toy_images):
    norms = L.residual_update_norms(toy_clip, toy_images, position=10)
    with torch.no_grad():
        _, cache = toy_clip.run_with_cache(toy_images)
    for layer in range(4):
        delta = cache["resid_post", layer][:, 10] - cache["resid_pre", layer][:, 10]
        torch.testing.assert_close(norms.total[:, layer], delta.norm(dim=-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norms.attention[:, layer], cache["attn_out", layer][:, 10].norm(dim=-1))
        torch.testing.assert_close(norms.mlp[:, layer], cache["mlp_out", layer][:, 10].norm(dim=-1))
        result = torch.einsum("bhd,hdm->bhm", cache["z", layer][:, 10], toy_clip.vision.blocks[layer].attn.W_O)
        torch.testing.assert_close(norms.heads[:, layer], result.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norms.relative(), norms.total / norms.resid)


def test_sub_layernorm_on_heads_splits_per_head_only(images):
    model = HookedViT(tiny_config(attn_norm=True)).init_weights(seed=6).eval()
    with pytest.raises(NotImplementedError, match="residual_update_norms splits it exactly per head"):
        L.residual_update(model, images, layer=0)
    norms = L.residual_update_norms(model, images)
    names = [f"blocks.{l}.attn.hook_result" for l in range(3)] + [f"blocks.{l}.hook_attn_out" for l in range(3)]
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=names)
    for layer in range(3):
        result = cache["result", layer][:, 0]  # [batch, head, d_model]: ln_z(z)[h] W_O[h]
        torch.testing.assert_close(norms.heads[:, layer], result.norm(dim=-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.sum(1) + model.blocks[layer].attn.b_O, cache["attn_out", layer][:, 0],
                                   rtol=1e-5, atol=1e-5)


def test_positions_are_required_without_cls(images):
    model = HookedViT(tiny_config(class_token=False, n_registers=0, pool_type="avg")).init_weights(seed=3).eval()
    with pytest.raises(ValueError, match="no CLS token.*positions="):
        L.residual_update(model, images, layer=0)
    with pytest.raises(ValueError, match="no CLS token; pass position="):
        L.residual_update_norms(model, images)
    with pytest.raises(ValueError, match=r"positions: expected an int in \[-16, 15\]"):
        L.residual_update(model, images, layer=0, positions=16)


# ------------------------------------------------------------------------------ figures


def test_figures(toy_clip, toy_images):
    maps = L.layer_attention_maps(toy_clip, toy_images)
    image = toy_images[0]
    assert len(L.plot_attention_maps(maps, image).data) == 2 * 4  # image + map per layer
    assert len(L.plot_attention_deltas(maps, image).data) == 2 * 3
    assert len(L.plot_head_maps(maps, 2, image).data) == 2 * 4
    assert len(L.plot_attention_maps(maps).data) == 4  # without the image
    curve = L.plot_delta_magnitude(maps)
    assert list(curve.data[0].x) == [1, 2, 3]
    torch.testing.assert_close(torch.tensor(curve.data[0].y, dtype=torch.float32), maps.delta_magnitude().mean(0))
    found = L.find_outlier_tokens(toy_clip, toy_images, fwd_hooks=plant(20))
    fig = L.plot_token_norms(found, image, index=1)
    n_found = int(found.mask[1, 0].sum())
    assert found.mask[1, 0, 20] and len(fig.data) == 2 * 4
    assert fig.layout.annotations[0].text == f"L0 resid_post: {n_found} outlier{'s' if n_found > 1 else ''}"
    update = L.residual_update(toy_clip, toy_images, layer=2)
    assert len(L.plot_token_contributions(update, image).data) == 2 * 4
    norms = L.residual_update_norms(toy_clip, toy_images)
    assert [trace.name for trace in L.plot_update_norms(norms).data] == ["update", "MLP part", "attention part"]
