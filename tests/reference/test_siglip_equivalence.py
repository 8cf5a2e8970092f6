"""SigLIP / SigLIP2 towers (timm ViTs with an attention-pooling MAP head) against open_clip and timm.

open_clip's SigLIP configs build a timm trunk with ``global_pool='map'`` and no projection: the
image embedding is the attention pool's output. Trunks are the configs' timm architectures at
width 64 and depth 2 with a tiny text tower. Checked: every layer's residual stream, the output,
HookedCLIP's logits with SigLIP's ``logit_bias``, the MAP head's own hook points, and the
decomposition of the embedding through the MAP head.
"""

from functools import partial
from unittest import mock

import open_clip
import pytest
import timm
import torch
from torch import nn

from tests.conftest import assert_rel_close
from tests.reference._reference import (
    Case, assert_residuals_match, equivalence_case, perturb_vector_params_, seeded_images,
)
from vit_lens import HookedCLIP, HookedViT
from vit_lens.intervene.decompose import direct_contributions, required_hooks

SMALL = dict(embed_dim=64, depth=2, num_heads=4)
TINY_TEXT = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)
_create_model = timm.create_model


def small_open_clip(name: str, img_size: int) -> nn.Module:
    """open_clip's model for config ``name`` with its timm trunk at width 64, depth 2, ``img_size`` px."""
    text_cfg = dict(open_clip.get_model_config(name)["text_cfg"], **TINY_TEXT)
    with mock.patch.object(timm, "create_model", partial(_create_model, **SMALL, img_size=img_size)):
        # no projection after the pool: the shared embedding width is the trunk's
        return open_clip.create_model(name, pretrained=None, text_cfg=text_cfg, embed_dim=SMALL["embed_dim"])


# id: (model as the docs table shows it, source, builder, image size)
MODELS = {
    "ViT-B-16-SigLIP": (
        "ViT-B-16-SigLIP", "open_clip (timm `vit_base_patch16_siglip_224` trunk)",
        lambda: small_open_clip("ViT-B-16-SigLIP", 64), 64,
    ),
    "ViT-SO400M-14-SigLIP2": (
        "ViT-SO400M-14-SigLIP2", "open_clip (timm `vit_so400m_patch14_siglip_224` trunk)",
        lambda: small_open_clip("ViT-SO400M-14-SigLIP2", 56), 56,
    ),
    "ViT-B-16-SigLIP2": (
        "ViT-B-16-SigLIP2", "open_clip (timm `vit_base_patch16_siglip_224` trunk)",
        lambda: small_open_clip("ViT-B-16-SigLIP2", 64), 64,
    ),
    "vit_base_patch16_siglip_224-classifier": (
        "`vit_base_patch16_siglip_224` with a classifier head", "timm",
        lambda: _create_model("vit_base_patch16_siglip_224", pretrained=False, **SMALL, img_size=64, num_classes=5), 64,
    ),
}
SUPPORTED = [(key, label, source) for key, (label, source, _, _) in MODELS.items()]
REFUSED_MODELS = {
    "map-latent_len": (
        "attention pool with several latent queries", "timm",
        lambda: _create_model("vit_base_patch16_siglip_224", pretrained=False, **SMALL, img_size=64, num_classes=0),
        "latent queries",
    ),
}
REFUSED = [(key, label, source, words) for key, (label, source, _, words) in REFUSED_MODELS.items()]


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def case(request, one_thread) -> Case:
    _, _, build, size = MODELS[request.param]
    torch.manual_seed(0)
    source = perturb_vector_params_(build().eval(), seed=1)
    trunk = getattr(getattr(source, "visual", None), "trunk", source)
    with torch.no_grad():
        nn.init.normal_(trunk.attn_pool.latent, std=1.0)  # a latent query far from zero: a peaked pattern
    images = seeded_images(2, size, size, seed=2)
    forward = source.encode_image if hasattr(source, "encode_image") else source
    hooked = HookedViT.from_open_clip(source) if hasattr(source, "visual") else HookedViT.from_timm(source)
    return equivalence_case(source, hooked, images, forward, trunk.norm_pre, trunk.blocks)


def test_residual_stream_matches_at_every_layer(case):
    assert_residuals_match(case.cache, case.resid_pre_0, case.resid_posts)


def test_output_matches_source(case):
    """The attention-pooled embedding (open_clip ``encode_image``) or timm's logits."""
    assert case.hooked.cfg.pool_type == "map"
    assert_rel_close(case.hooked_output, case.source_output, what="HookedViT output")


def test_hooked_clip_logits_include_the_logit_bias(case):
    if not hasattr(case.source, "encode_text"):
        return
    clip = HookedCLIP.from_open_clip(case.source)
    tokens = torch.randint(1, TINY_TEXT["vocab_size"], (3, TINY_TEXT["context_length"]), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        image, text, scale, bias = case.source(case.images, tokens)
        expected = scale * image @ text.T + bias
        assert_rel_close(clip(case.images, tokens), expected, what="SigLIP logits")


def test_map_head_hooks_are_its_attention(case):
    """The pool's pattern is the softmax of its latent query against the keys; its per-head
    results plus ``b_O`` are ``hook_attn_out``; the pooled vector is ``attn_out + mlp_out``."""
    pool, cache = case.hooked.attn_pool, case.cache
    q, k = cache["attn_pool.hook_q"], cache["attn_pool.hook_k"]  # [b, 1, h, d], [b, k, h, d]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * pool.d_head**-0.5
    torch.testing.assert_close(cache["attn_pool.hook_pattern"], scores.softmax(-1), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        _, with_results = case.hooked.run_with_cache(case.images, names_filter=["attn_pool.hook_result", "attn_pool.hook_attn_out"])
    results = with_results["attn_pool.hook_result"]  # [b, 1, h, d_model]
    assert results.shape[2] == case.hooked.cfg.map_n_heads
    assert_rel_close(results.sum(2)[:, 0] + pool.b_O, with_results["attn_pool.hook_attn_out"], what="pool results")
    pooled = cache["attn_pool.hook_attn_out"] + cache["attn_pool.hook_mlp_out"]
    assert_rel_close(pooled, cache["hook_pooled"], what="pool output")


@pytest.mark.parametrize("level", ["layer", "head", "head_token", "neuron"])
def test_direct_contributions_through_the_map_head_sum_to_the_embedding(case, level):
    """Exact through the attention pool: per-pool-head readouts, one POOLMLP term, biases in 'bias'."""
    hooked = case.hooked
    with torch.no_grad():
        _, cache = hooked.run_with_cache(case.images, names_filter=required_hooks(hooked, level))
    parts = direct_contributions(hooked, cache, level=level)
    assert_rel_close(parts.sum(), case.cache["hook_pooled"], what=f"{level} contributions")
    assert "POOLMLP" in parts.labels
    # the POOLMLP term is the pool's MLP output itself: it is not split through the residual stream
    torch.testing.assert_close(parts["POOLMLP"], case.cache["attn_pool.hook_mlp_out"])
    normalized = direct_contributions(hooked, cache, level=level, normalize=True)
    torch.testing.assert_close(normalized.sum().norm(dim=-1), torch.ones(len(case.images)), rtol=1e-5, atol=1e-5)


def test_decomposition_with_directions_is_the_projection_of_the_embedding(case):
    directions = torch.randn(case.hooked.cfg.d_model, 3, generator=torch.Generator().manual_seed(5))
    parts = direct_contributions(case.hooked, case.cache, level="head", directions=directions)
    assert_rel_close(parts.sum(), case.cache["hook_pooled"] @ directions, what="projected contributions")


def test_paper_ln_mode_is_refused_for_a_map_head(case):
    with pytest.raises(NotImplementedError, match="ln_mode='center_each'"):
        direct_contributions(case.hooked, case.cache, level="head", ln_mode="paper")


@pytest.mark.parametrize("key", list(REFUSED_MODELS))
def test_refused_with_the_feature_named(key):
    _, _, build, words = REFUSED_MODELS[key]
    torch.manual_seed(0)
    source = build()
    source.attn_pool.latent_len = 2  # timm builds latent_len from a constructor argument the models fix at 1
    with pytest.raises(NotImplementedError, match=words):
        HookedViT.from_timm(source)


def test_every_hook_point_edit_takes_effect(case):
    """Replacing any hook point's activation, the MAP head's included, changes the output."""
    hooked = case.hooked
    generator = torch.Generator().manual_seed(3)

    def perturb(act, hook):
        return act + (act.abs().max() + 1.0) * torch.randn(act.shape, generator=generator)

    unchanged = []
    for name in hooked.hook_dict:
        with torch.no_grad():
            edited = hooked.run_with_hooks(case.images, fwd_hooks=[(name, perturb)])
        if (edited - case.hooked_output).norm() <= 1e-5 * case.hooked_output.norm():
            unchanged.append(name)
    assert not unchanged
