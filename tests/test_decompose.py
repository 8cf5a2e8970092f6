"""direct_contributions: every level and LayerNorm mode reconstructs the representation, on every family."""

import open_clip
import pytest
import timm
import torch

from tests.conftest import FAMILIES, assert_rel_close, tiny_config
from vit_lens import HookedViT
from vit_lens.intervene.decompose import LEVELS, LN_MODES, direct_contributions, direct_effect_mean_ablation, required_hooks



def representation(model, out, cache):
    """What the decomposition must add up to, computed independently of vit_lens.intervene.decompose."""
    if model.cfg.d_proj is not None:
        return out
    pooled = cache["hook_pooled"]
    return pooled.mean(1) if model.cfg.pool_type == "token_dist" else pooled


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request):
    model = HookedViT(tiny_config(**FAMILIES[request.param])).init_weights(seed=1).eval()
    with torch.no_grad():
        out, cache = model.run_with_cache(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    return model, cache, representation(model, out, cache)


@pytest.mark.parametrize("ln_mode", LN_MODES)
@pytest.mark.parametrize("level", LEVELS)
def test_every_level_and_mode_reconstructs_the_representation(family, level, ln_mode):
    model, cache, target = family
    with torch.no_grad():
        parts = direct_contributions(model, cache, level=level, ln_mode=ln_mode)
    cfg = model.cfg
    n_expanded = {"layer": 1, "head": cfg.n_heads, "head_token": cfg.n_heads * cfg.n_ctx, "neuron": cfg.d_mlp}[level]
    n_bias = 1 if ln_mode == "center_each" else 0
    # embed; per layer the expanded sublayer's terms and the other sublayer whole; bias (center_each)
    assert len(parts) == parts.values.shape[1] == 1 + cfg.n_layers * (n_expanded + 1) + n_bias
    assert_rel_close(parts.sum(), target, rtol=1e-5, what=f"{level}/{ln_mode}")


@pytest.mark.parametrize("ln_mode", LN_MODES)
def test_tokens_sum_to_heads_and_heads_to_layers(family, ln_mode):
    model, cache, _ = family
    with torch.no_grad():
        layer = direct_contributions(model, cache, level="layer", ln_mode=ln_mode)
        head = direct_contributions(model, cache, level="head", ln_mode=ln_mode)
        token = direct_contributions(model, cache, level="head_token", ln_mode=ln_mode)
    assert_rel_close(token.heads(), head.heads(), rtol=1e-5, what="sum over tokens")
    if ln_mode == "paper":  # paper mode spreads b_O over the heads, so heads add up to the layer term
        assert_rel_close(head.heads().sum(2)[:, 1], layer["L1ATTN"], rtol=1e-5, what="sum over heads")


@pytest.mark.parametrize("name", ["clip_like", "vit_like", "dinov2_reg_like"])
def test_center_each_heads_match_transformer_lens(name):
    """At level 'head', each term is TransformerLens's head result at CLS, LN-applied and read out.

    (Only CLS-pooled, pre-pool-norm families: apply_ln_to_stack reads one position's scale.)
    """
    model = HookedViT(tiny_config(**FAMILIES[name])).init_weights(seed=1).eval()
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.randn(2, 3, 32, 32))
        heads = direct_contributions(model, cache, level="head").heads()  # [batch, layer, head, d]
        stack = cache.stack_head_results(pos_slice=0, apply_ln=True)  # [layer*head, batch, d_model]
        readout = model.ln_final.w[:, None] * (model.W_proj if model.cfg.d_proj is not None else torch.eye(model.cfg.d_model))
    expected = (stack @ readout).reshape(model.cfg.n_layers, model.cfg.n_heads, 2, -1).permute(2, 0, 1, 3)
    assert_rel_close(heads, expected, rtol=1e-5, what="heads vs TransformerLens")


def test_paper_mode_matches_the_papers_formula():
    """Appendix A.1 / clip_text_span's prs_hook, written out independently for one attention cell and one MLP.

    c_{l,n,h} = [w * (a_{l,n,h} + b_O/(N H) - mu/((2L+1) N H)) / sigma + b/((2L+1) N H)] @ W_proj
    m_l       = [w * (mlp_l - mu/(2L+1)) / sigma + b/(2L+1)] @ W_proj
    """
    model = HookedViT(tiny_config()).init_weights(seed=4).eval()
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.randn(1, 3, 32, 32))
        parts = direct_contributions(model, cache, level="head_token", ln_mode="paper")
        cfg, ln = model.cfg, model.ln_final
        L, N, H = cfg.n_layers, cfg.n_ctx, cfg.n_heads
        cls = cache["resid_post", -1][0, 0]
        mu, sigma = cls.mean(), cache["ln_final.hook_scale"][0, 0, 0]
        layer, head, token = 1, 2, 5
        cell = cache["pattern", layer][0, head, 0, token] * cache["v", layer][0, token, head] @ model.blocks[layer].attn.W_O[head]
        share = 1.0 / ((2 * L + 1) * N * H)
        expected_cell = (ln.w * (cell + model.blocks[layer].attn.b_O / (N * H) - mu * share) / sigma + ln.b * share) @ model.W_proj
        mlp = cache["mlp_out", layer][0, 0]
        expected_mlp = (ln.w * (mlp - mu / (2 * L + 1)) / sigma + ln.b / (2 * L + 1)) @ model.W_proj
    assert_rel_close(parts[f"L{layer}H{head}T{token}"][0], expected_cell, rtol=1e-5, what="attention cell")
    assert_rel_close(parts[f"L{layer}MLP"][0], expected_mlp, rtol=1e-5, what="MLP term")


def small_sources():
    """Real source models (random weights, reduced depth where the test is about the readout, not depth)."""
    torch.manual_seed(0)
    yield "open_clip ViT-B-32", open_clip.create_model("ViT-B-32", pretrained=None).eval()
    for name, kwargs in [
        ("vit_tiny_patch16_224", dict(depth=3)),
        ("deit_tiny_distilled_patch16_224", dict(depth=3)),
        ("vit_small_patch14_reg4_dinov2", dict(depth=3, img_size=56)),
        ("vit_tiny_patch16_224", dict(depth=3, global_pool="avg")),
    ]:
        yield f"timm {name} {kwargs}", timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.mark.parametrize("name, source", list(small_sources()), ids=lambda v: v if isinstance(v, str) else "")
def test_real_families_reconstruct_their_own_representation(name, source):
    """CLIP: open_clip's encode_image; timm: forward_head(pre_logits=True), the pooled pre-head vector."""
    is_clip = hasattr(source, "encode_image")
    model = HookedViT.from_open_clip(source) if is_clip else HookedViT.from_timm(source)
    images = torch.randn(2, 3, *model.cfg.image_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = source.encode_image(images) if is_clip else source.forward_head(source.forward_features(images), pre_logits=True)
        _, cache = model.run_with_cache(images)
        for level in ("layer", "head", "head_token", "neuron"):
            for ln_mode in LN_MODES:
                parts = direct_contributions(model, cache, level=level, ln_mode=ln_mode, layers=[-1, -2])
                assert_rel_close(parts.sum(), target, rtol=1e-5, what=f"{name} {level} {ln_mode}")


def test_directions_normalize_and_layer_selection(family):
    model, cache, target = family
    d_repr = target.shape[-1]
    directions = torch.randn(d_repr, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = direct_contributions(model, cache, level="head_token")
        projected = direct_contributions(model, cache, level="head_token", directions=directions)
        normalized = direct_contributions(model, cache, level="head", ln_mode="paper", normalize=True)
        last_only = direct_contributions(model, cache, level="neuron", layers=[-1])
    assert projected.values.shape == (2, len(full), 3)
    assert_rel_close(projected.values, full.values @ directions, rtol=1e-5, what="projection before expansion")
    assert_rel_close(normalized.sum(), target / target.norm(dim=-1, keepdim=True), rtol=1e-5, what="normalize")
    last = model.cfg.n_layers - 1
    assert "L0MLP" in last_only.labels and f"L{last}N0" in last_only.labels and f"L{last}MLP" not in last_only.labels
    assert_rel_close(last_only.sum(), target, rtol=1e-5, what="one layer expanded")


def test_token_maps_keep_prefix_tokens_apart(family):
    model, cache, _ = family
    with torch.no_grad():
        parts = direct_contributions(model, cache, level="head_token")
    prefix, patches = parts.token_maps()
    cfg = model.cfg
    assert prefix.shape == (2, cfg.n_layers, cfg.n_heads, cfg.n_prefix_tokens, parts.values.shape[-1])
    assert patches.shape == (2, cfg.n_layers, cfg.n_heads, 4, 4, parts.values.shape[-1])
    torch.testing.assert_close(patches[:, 2, 1, 3, 0], parts["L2H1T" + str(cfg.n_prefix_tokens + 12)])
    if cfg.n_prefix_tokens:
        torch.testing.assert_close(prefix[:, 0, 3, 0], parts["L0H3T0"])


def test_direct_effect_mean_ablation():
    model = HookedViT(tiny_config()).init_weights(seed=1).eval()
    with torch.no_grad():
        embed, cache = model.run_with_cache(torch.randn(4, 3, 32, 32))
        parts = direct_contributions(model, cache, level="head")
    means = parts.values.mean(0)
    nothing = torch.zeros(len(parts), dtype=torch.bool)
    torch.testing.assert_close(direct_effect_mean_ablation(parts, nothing, means), embed, rtol=1e-5, atol=1e-5)
    everything = torch.ones(len(parts), dtype=torch.bool)
    ablated = direct_effect_mean_ablation(parts, everything, means)
    torch.testing.assert_close(ablated, embed.mean(0, keepdim=True).expand_as(ablated), rtol=1e-5, atol=1e-5)
    one_head = torch.tensor([label == "L2H1" for label in parts.labels])
    expected = embed - parts["L2H1"] + means[parts.labels.index("L2H1")]
    torch.testing.assert_close(direct_effect_mean_ablation(parts, one_head, means), expected)
    with pytest.raises(ValueError, match="bool mask"):
        direct_effect_mean_ablation(parts, one_head[:3], means)


def test_errors_name_the_problem():
    model = HookedViT(tiny_config(ln_pre=False, d_proj=None, pool_type="max", final_norm="post_pool")).init_weights(seed=0)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.randn(1, 3, 32, 32))
    with pytest.raises(NotImplementedError, match="pools with 'max'.*not linear"):
        direct_contributions(model, cache)
    model = HookedViT(tiny_config()).init_weights(seed=0)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.randn(1, 3, 32, 32), names_filter=required_hooks(model, "head"))
        direct_contributions(model, cache, level="head")
        with pytest.raises(KeyError, match=r"needs these cached activations: \['blocks.0.attn.hook_pattern'"):
            direct_contributions(model, cache, level="head_token")
    with pytest.raises(ValueError, match="level must be one of"):
        direct_contributions(model, cache, level="token")
    with pytest.raises(ValueError, match=r"directions must be \[d_repr=16, k\]"):
        direct_contributions(model, cache, level="head", directions=torch.randn(32, 2))
    with pytest.raises(ValueError, match=r"layers \[7\] out of range"):
        direct_contributions(model, cache, level="head", layers=[7])
