"""EVA (timm ``Eva``) towers against their sources: open_clip's EVA01 / EVA02 CLIP and timm itself.

EVA01-g-14 is the model of "Peeling Back the Layers" (40 layers of width 1408); EVA02 adds rotary embeddings on
q/k, SwiGLU MLPs and sub-LayerNorms inside attention and the MLP. The towers here are the same
timm architectures (the names open_clip's configs use, with every architecture flag) at width 64
and depth 2, so the test runs in seconds; a tiny text tower stands in for the real one. Every
layer's residual stream and the output must agree to 1e-5 (relative, float32); vector parameters
and the head are perturbed so that a misplaced weight cannot hide.
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
from vit_lens.intervene.decompose import direct_contributions

SMALL = dict(embed_dim=64, depth=2, num_heads=4)
TINY_TEXT = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)
_create_model = timm.create_model


def small_open_clip(name: str, img_size: int) -> nn.Module:
    """open_clip's own model for config ``name`` (its timm trunk, pooling and projection path) with the
    trunk built at width 64, depth 2 and ``img_size`` pixels, and a tiny text tower."""
    text_cfg = dict(open_clip.get_model_config(name)["text_cfg"], **TINY_TEXT)
    with mock.patch.object(timm, "create_model", partial(_create_model, **SMALL, img_size=img_size)):
        return open_clip.create_model(name, pretrained=None, text_cfg=text_cfg)


def small_timm(name: str, img_size: int, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=False, **SMALL, img_size=img_size, **kwargs)


# id: (model as the docs table shows it, source, builder, image size)
MODELS = {
    "EVA01-g-14": (
        "EVA01-g-14 (EVA-CLIP; the tower of 'Peeling Back the Layers')", "open_clip (timm `eva_giant_patch14_224` trunk)",
        lambda: small_open_clip("EVA01-g-14", 56), 56,
    ),
    "EVA02-B-16": (
        "EVA02-B-16 (rotary q/k, SwiGLU, sub-LayerNorms)", "open_clip (timm `eva02_base_patch16_clip_224` trunk)",
        lambda: small_open_clip("EVA02-B-16", 64), 64,
    ),
    "EVA02-L-14": (
        "EVA02-L-14", "open_clip (timm `eva02_large_patch14_clip_224` trunk)",
        lambda: small_open_clip("EVA02-L-14", 56), 56,
    ),
    "eva02_tiny_patch14_224": (
        "`eva02_tiny_patch14_224` (packed SwiGLU, fused qkv)", "timm",
        lambda: _create_model("eva02_tiny_patch14_224", pretrained=False, depth=2, img_size=56), 56,
    ),
    "eva_giant_patch14_224-avgpool": (
        "`eva_giant_patch14_224` classifier (avg pool, fc_norm)", "timm",
        lambda: small_timm("eva_giant_patch14_224", 56, num_classes=5, global_pool="avg"), 56,
    ),
}
SUPPORTED = [(key, label, source) for key, (label, source, _, _) in MODELS.items()]
# id: (model, source, builder, words the refusal must contain)
REFUSED_MODELS = {
    "EVA02-E-14": (
        "EVA02-E-14 (post-norm blocks)", "timm `eva02_enormous_patch14_clip_224` (open_clip's EVA02-E-14 trunk)",
        lambda: small_timm("eva02_enormous_patch14_clip_224", 56), "post-norm",
    ),
    "eva-qk_norm": ("Eva with `qk_norm=True`", "timm", lambda: small_timm("eva02_tiny_patch14_224", 56, qk_norm=True),
                    "q/k normalisation"),
    "eva02-dynamic": (
        "EVA02 with `dynamic_img_size=True`", "timm",
        lambda: small_timm("eva02_tiny_patch14_224", 56, dynamic_img_size=True), "rotary embeddings with dynamic_img_size",
    ),
}
REFUSED = [(key, label, source, words) for key, (label, source, _, words) in REFUSED_MODELS.items()]


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def case(request, one_thread) -> Case:
    _, _, build, size = MODELS[request.param]
    torch.manual_seed(0)
    source = build().eval()
    trunk = getattr(getattr(source, "visual", None), "trunk", source)
    with torch.no_grad():
        if isinstance(trunk.head, nn.Linear):  # timm initialises EVA heads at 1e-3 scale: make them matter
            nn.init.normal_(trunk.head.weight, std=0.2)
    perturb_vector_params_(source, seed=1)
    images = seeded_images(2, size, size, seed=2)
    forward = source.encode_image if hasattr(source, "encode_image") else source
    hooked = HookedViT.from_open_clip(source) if hasattr(source, "visual") else HookedViT.from_timm(source)
    return equivalence_case(source, hooked, images, forward, trunk.norm_pre, trunk.blocks)


def test_residual_stream_matches_at_every_layer(case):
    """The stream entering block 0 and every block's output equal the source's to 1e-5."""
    assert_residuals_match(case.cache, case.resid_pre_0, case.resid_posts)


def test_output_matches_source(case):
    """The image embedding (open_clip ``encode_image``, with the trunk head as a biased projection) or timm logits."""
    assert_rel_close(case.hooked_output, case.source_output, what="HookedViT output")


def test_hooked_clip_encode_image_matches(case):
    if not hasattr(case.source, "encode_image"):
        assert case.hooked.cfg.d_output == case.source_output.shape[-1]
        return
    clip = HookedCLIP.from_open_clip(case.source)
    with torch.no_grad():
        assert_rel_close(clip.encode_image(case.images), case.source_output, what="HookedCLIP.encode_image")


def test_rotary_hooks_rotate_patch_pairs_and_take_effect(case):
    """``hook_rot_q/k`` leave prefix tokens alone, keep each rotated pair's norm, and are what the
    attention scores are made of (the rotation is applied after ``hook_q``/``hook_k``)."""
    cfg = case.hooked.cfg
    if cfg.rotary == "none":
        assert "blocks.0.attn.hook_rot_q" not in case.hooked.hook_dict
        return
    for name in ("q", "k"):
        raw, rot = case.cache[f"blocks.0.attn.hook_{name}"], case.cache[f"blocks.0.attn.hook_rot_{name}"]
        prefix = cfg.n_prefix_tokens
        assert torch.equal(raw[:, :prefix], rot[:, :prefix])
        pairs = (lambda t: t.unflatten(-1, (-1, 2))) if cfg.rotary == "interleaved" else (
            lambda t: torch.stack(t.chunk(2, dim=-1), dim=-1))
        torch.testing.assert_close(pairs(rot[:, prefix:]).norm(dim=-1), pairs(raw[:, prefix:]).norm(dim=-1))
        assert (rot[:, prefix:] - raw[:, prefix:]).abs().max() > 1e-3
    # the scores are formed from the rotated q and k, not from hook_q / hook_k
    scale = cfg.d_head**-0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", case.cache["blocks.1.attn.hook_rot_q"], case.cache["blocks.1.attn.hook_rot_k"])
    torch.testing.assert_close(scores * scale, case.cache["blocks.1.attn.hook_attn_scores"], rtol=1e-4, atol=1e-5)
    unrotated = torch.einsum("bqhd,bkhd->bhqk", case.cache["blocks.1.attn.hook_q"], case.cache["blocks.1.attn.hook_k"])
    assert (unrotated - scores).abs().max() > 1e-2 * scores.abs().max()


def test_gated_mlp_hooks_are_the_gate_the_linear_branch_and_their_product(case):
    cfg = case.hooked.cfg
    if cfg.mlp_type != "gated":
        assert "blocks.0.mlp.hook_pre_linear" not in case.hooked.hook_dict
        return
    pre, linear, post = (case.cache[f"blocks.1.mlp.hook_{n}"] for n in ("pre", "pre_linear", "post"))
    torch.testing.assert_close(post, torch.nn.functional.silu(pre) * linear)


@pytest.mark.parametrize("level", ["layer", "head", "neuron"])
def test_direct_contributions_sum_to_the_output(case, level):
    """The decomposition identity holds through rotary attention, SwiGLU, the sub-LayerNorms and a biased projection."""
    hooked = case.hooked
    parts = direct_contributions(hooked, case.cache, level=level)
    target = case.cache["hook_image_embed"] if hooked.cfg.d_proj else case.cache["hook_pooled"]
    assert_rel_close(parts.sum(), target, what=f"{level} contributions")
    if level == "neuron":
        assert len(parts) == 1 + 2 * (1 + hooked.cfg.d_mlp) + 1  # embed, 2 x (attn + neurons), bias


def test_head_token_through_a_sub_layernorm_is_refused(case):
    if not case.hooked.cfg.attn_norm:
        parts = direct_contributions(case.hooked, case.cache, level="head_token")
        target = case.cache["hook_image_embed"] if case.hooked.cfg.d_proj else case.cache["hook_pooled"]
        assert_rel_close(parts.sum(), target, what="head_token contributions")
        return
    with pytest.raises(NotImplementedError, match="attn.ln_z"):
        direct_contributions(case.hooked, case.cache, level="head_token")


@pytest.mark.parametrize("key", list(REFUSED_MODELS))
def test_refused_with_the_feature_named(key):
    _, _, build, words = REFUSED_MODELS[key]
    torch.manual_seed(0)
    with pytest.raises(NotImplementedError, match=words):
        HookedViT.from_timm(build())


def test_every_hook_point_edit_takes_effect(case):
    """Replacing any hook point's activation (rotary q/k, gate, linear branch, sub-LayerNorms included) changes the output."""
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
