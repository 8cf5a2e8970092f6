"""Weight processing with TransformerLens's names: the output stays the same, decompositions still sum to it.

Two sets of models: every architecture option of ViTConfig (random weights, LayerNorm weights and
biases away from identity), and the families the reference tests build from their source libraries
(open_clip, timm, transformers; random weights with perturbed vector parameters), compared with the
source's own output after processing.
"""

import copy
from functools import partial
from unittest import mock

import open_clip
import pytest
import timm
import torch
import transformers as hf

from tests.conftest import FAMILIES, assert_rel_close, tiny_config
from tests.reference._reference import perturb_vector_params_, seeded_images
from vit_lens import HookedCLIP, HookedViT
from vit_lens.intervene.decompose import direct_contributions
from vit_lens.model.readout import normalise
from vit_lens.model.weight_processing import pop_processing_args

EVA_LIKE = dict(ln_pre=False, n_registers=0, rotary="half", mlp_type="gated", act_fn="silu", mlp_norm=True)
SIGLIP_LIKE = dict(class_token=False, n_registers=0, ln_pre=False, pool_type="map", map_n_heads=4, map_d_mlp=48)
CONFIGS = {
    **FAMILIES,
    "eva02_like": EVA_LIKE,  # rotary q/k, SwiGLU, a LayerNorm on the MLP's hidden units
    "eva_clip_like": dict(ln_pre=False, n_registers=0, attn_norm=True),  # a LayerNorm on z before W_O
    "siglip_like": dict(SIGLIP_LIKE, d_proj=None),  # attention pool, its output is the embedding
    "siglip_classifier": dict(SIGLIP_LIKE, d_proj=None, n_classes=5),
    "avg_fc_norm_head": dict(ln_pre=False, d_proj=None, n_classes=5, pool_type="avg", final_norm="post_pool"),
}


def representation(model, out, cache):
    """What direct_contributions adds up to: the embedding, or the pooled pre-head vector."""
    if model.cfg.d_proj is not None:
        return out
    pooled = cache["hook_pooled"]
    return pooled.mean(1) if model.cfg.pool_type == "token_dist" else pooled


def assert_same_output(model, processed, expected):
    """The embedding is unchanged; logits up to a per-image constant (invariant after the softmax, as TL defines it)."""
    if model.cfg.n_classes:
        assert_rel_close(processed.log_softmax(-1), expected.log_softmax(-1), what="log-probabilities")
        shift = processed - expected
        assert (shift - shift.mean(-1, keepdim=True)).abs().max() < 1e-4, "logits moved by more than a constant"
    else:
        assert_rel_close(processed, expected, what="output")


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def processed(request, one_thread):
    model = HookedViT(tiny_config(**CONFIGS[request.param])).init_weights(seed=5).eval()
    images = seeded_images(2, 32, 32, seed=6)
    cfg = model.cfg
    refactor = cfg.rotary == "none" and not cfg.attn_norm
    after = copy.deepcopy(model)
    with torch.no_grad(), mock.patch("warnings.warn"):  # the kept final LayerNorm of a backbone is tested below
        out, cache = model.run_with_cache(images)
        after.process_weights_(refactor_factored_attn_matrices=refactor)
        out_after, cache_after = after.run_with_cache(images)
    return model, out, cache, after, out_after, cache_after


def test_output_is_unchanged(processed):
    model, out, _, _, out_after, _ = processed
    assert_same_output(model, out_after, out)


def test_layernorms_keep_only_their_normalisation(processed):
    """ln1 / ln2 (and the final LayerNorm where a readout matrix takes it) have no weight and bias any more."""
    model, _, cache, after, _, cache_after = processed
    for layer in range(model.cfg.n_layers):
        for ln in ("ln1", "ln2"):
            norm = getattr(after.blocks[layer], ln)
            assert torch.equal(norm.w, torch.ones_like(norm.w)) and torch.equal(norm.b, torch.zeros_like(norm.b))
        resid = cache_after["resid_pre", layer]
        assert_rel_close(cache_after[f"blocks.{layer}.ln1.hook_normalized"], normalise(resid, model.cfg.eps),
                         what="ln1.hook_normalized after folding")
        torch.testing.assert_close(cache_after["pattern", layer], cache["pattern", layer], atol=1e-5, rtol=1e-4)
        assert_rel_close(cache_after[f"blocks.{layer}.ln1.hook_scale"], cache[f"blocks.{layer}.ln1.hook_scale"],
                         what="ln1.hook_scale")
    if model.ln_final is not None and (model.cfg.d_proj is not None or model.cfg.n_classes):
        assert torch.equal(after.ln_final.w, torch.ones_like(after.ln_final.w))


def test_writers_are_centred_where_every_reader_centres(processed):
    model, _, _, after, _, cache_after = processed
    if model.cfg.final_norm == "none":
        assert not torch.allclose(after.blocks[0].attn.W_O.mean(-1), torch.zeros(()), atol=1e-3)
        return
    for weight in (after.W_O, after.b_O, after.W_out, after.b_out, after.W_pos, after.embed.W_E.transpose(0, -1)):
        assert weight.mean(-1).abs().max() < 1e-6
    if not model.cfg.ln_pre:  # ln_pre's weight cannot be centred, so a CLIP tower's stream keeps a mean
        assert cache_after["resid_post", -1].mean(-1).abs().max() < 1e-5


def test_decompositions_still_sum_to_the_whole(processed):
    model, _, _, after, out_after, cache_after = processed
    with torch.no_grad():
        parts = direct_contributions(after, cache_after, level="head")
        assert_rel_close(parts.sum(), representation(after, out_after, cache_after), what="direct_contributions")
        full = cache_after.get_full_resid_decomposition(expand_neurons=not model.cfg.mlp_norm)
        assert_rel_close(full.sum(0), cache_after["resid_post", -1], what="get_full_resid_decomposition")
        assert_rel_close(cache_after.decompose_resid().sum(0), cache_after["resid_post", -1], what="decompose_resid")


def test_readout_is_the_same_before_and_after_folding(processed):
    """W_U and b_U carry the final LayerNorm either way (a classifier's are centred over the classes)."""
    model, _, _, after, out_after, cache_after = processed
    cfg = model.cfg
    if cfg.pool_type not in ("token", "avg"):
        return
    W_U, b_U = after.W_U, after.b_U
    if cfg.n_classes:
        W_U, b_U = W_U + model.W_U.mean(-1, keepdim=True), b_U + model.b_U.mean()
    torch.testing.assert_close(W_U, model.W_U, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b_U, model.b_U, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        stack = cache_after.pool_stack(cache_after.decompose_resid())
    assert_rel_close(stack.sum(0) @ after.W_U + after.b_U, out_after, what="DLA after processing")


# ---------------------------------------------------------------------------------------------- source families

TINY_TEXT = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)
HF_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8)
HF_DINO = dict({k: v for k, v in HF_VISION.items() if k != "intermediate_size"}, mlp_ratio=2)
SMALL_TIMM = dict(embed_dim=64, depth=2, num_heads=4)


def small_open_clip(**vision_overrides):
    vision = dict(width=64, layers=2, head_width=16, patch_size=8, image_size=32, **vision_overrides)
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=TINY_TEXT)


def open_clip_timm_tower(name: str, img_size: int, **kwargs):
    """open_clip's model ``name`` with its timm trunk at width 64 and depth 2, as the EVA and SigLIP reference tests."""
    text_cfg = dict(open_clip.get_model_config(name)["text_cfg"], **TINY_TEXT)
    with mock.patch.object(timm, "create_model", partial(timm.create_model, **SMALL_TIMM, img_size=img_size)):
        return open_clip.create_model(name, pretrained=None, text_cfg=text_cfg, **kwargs)


# id: (builder, how to convert, image size)
SOURCES = {
    "open_clip-ViT-B-32-like": (lambda: small_open_clip(), HookedViT.from_open_clip, 32),
    "open_clip-avgpool-final_ln_after_pool": (
        lambda: small_open_clip(pool_type="avg", final_ln_after_pool=True), HookedViT.from_open_clip, 32),
    "timm-vit": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32),
                 HookedViT.from_timm, 32),
    "timm-deit-distilled": (
        lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2, img_size=32),
        HookedViT.from_timm, 32),
    "timm-dinov2-reg4": (
        lambda: timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, **SMALL_TIMM, img_size=56),
        HookedViT.from_timm, 56),
    "open_clip-EVA01-g-14": (lambda: open_clip_timm_tower("EVA01-g-14", 56), HookedViT.from_open_clip, 56),
    "open_clip-EVA02-B-16": (lambda: open_clip_timm_tower("EVA02-B-16", 64), HookedViT.from_open_clip, 64),
    "open_clip-ViT-B-16-SigLIP": (
        lambda: open_clip_timm_tower("ViT-B-16-SigLIP", 64, embed_dim=SMALL_TIMM["embed_dim"]),
        HookedViT.from_open_clip, 64),
    "timm-siglip-classifier": (
        lambda: timm.create_model("vit_base_patch16_siglip_224", pretrained=False, **SMALL_TIMM, img_size=64,
                                  num_classes=5), HookedViT.from_timm, 64),
    "hf-CLIPVisionModelWithProjection": (
        lambda: hf.CLIPVisionModelWithProjection(hf.CLIPVisionConfig(**HF_VISION, projection_dim=16)),
        HookedViT.from_hf, 32),
    "hf-ViTForImageClassification": (
        lambda: hf.ViTForImageClassification(hf.ViTConfig(**HF_VISION, num_labels=5)), HookedViT.from_hf, 32),
    "hf-Dinov2WithRegisters": (
        lambda: hf.Dinov2WithRegistersModel(hf.Dinov2WithRegistersConfig(**HF_DINO, num_register_tokens=4)),
        HookedViT.from_hf, 32),
    "hf-SiglipVisionModel": (lambda: hf.SiglipVisionModel(hf.SiglipVisionConfig(**HF_VISION)), HookedViT.from_hf, 32),
}


@pytest.mark.parametrize("key", list(SOURCES))
def test_processed_source_families_keep_the_source_output(key, one_thread):
    builder, convert, size = SOURCES[key]
    torch.manual_seed(0)
    source = perturb_vector_params_(builder().eval(), seed=1)
    model = convert(source)
    images = seeded_images(2, size, size, seed=2)
    with torch.no_grad():
        expected = model(images)
    cfg = model.cfg
    refactor = cfg.rotary == "none" and not cfg.attn_norm
    with torch.no_grad(), mock.patch("warnings.warn"):
        model.process_weights_(refactor_factored_attn_matrices=refactor)
        out, cache = model.run_with_cache(images)
        parts = direct_contributions(model, cache, level="head")
    assert_same_output(model, out, expected)
    assert_rel_close(parts.sum(), representation(model, out, cache), what="direct_contributions after processing")


def test_from_pretrained_takes_transformer_lens_processing_keywords(one_thread):
    """TransformerLens's keywords are taken, not passed to timm (which raised a TypeError)."""
    images = seeded_images(2, 32, 32, seed=2)
    torch.manual_seed(0)
    plain = HookedViT.from_pretrained("timm:vit_tiny_patch16_224", depth=2, img_size=32)
    torch.manual_seed(0)
    folded = HookedViT.from_pretrained(
        "timm:vit_tiny_patch16_224", depth=2, img_size=32, fold_ln=True, center_writing_weights=True,
        center_unembed=True, fold_value_biases=True, refactor_factored_attn_matrices=True,
    )
    assert torch.equal(folded.blocks[0].ln1.w, torch.ones_like(folded.blocks[0].ln1.w))
    assert folded.head.W_head.mean(-1).abs().max() < 1e-6
    with torch.no_grad():
        assert_same_output(plain, folded(images), plain(images))


def test_loading_by_name_processes_only_what_was_asked():
    kwargs = {"fold_ln": True, "depth": 2}
    assert pop_processing_args(kwargs) == {
        "fold_ln": True, "center_writing_weights": False, "center_unembed": False, "fold_value_biases": False,
        "refactor_factored_attn_matrices": False,
    }
    assert kwargs == {"depth": 2}
    assert pop_processing_args(kwargs) == {}


def test_hooked_clip_from_pretrained_processes_the_image_tower(one_thread):
    small = dict(vision_cfg=dict(width=64, layers=2, head_width=16, patch_size=8, image_size=32), text_cfg=TINY_TEXT)
    images = seeded_images(2, 32, 32, seed=2)
    torch.manual_seed(0)
    plain = HookedCLIP.from_pretrained("ViT-B-32", **small)
    torch.manual_seed(0)
    folded = HookedCLIP.from_pretrained("ViT-B-32", fold_ln=True, center_writing_weights=True, **small)
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, TINY_TEXT["vocab_size"], (3, TINY_TEXT["context_length"]), generator=generator)
    with torch.no_grad():
        assert_rel_close(folded(images, tokens), plain(images, tokens), what="image-text logits")
    assert torch.equal(folded.vision.ln_final.b, torch.zeros_like(folded.vision.ln_final.b))
    assert folded.vision.cfg.proj_bias and not plain.vision.cfg.proj_bias
    assert folded.process_weights_() is folded


def test_folding_leaves_every_other_model_of_the_config_alone():
    cfg = tiny_config()
    first, second = HookedViT(cfg).init_weights(seed=0), HookedViT(cfg).init_weights(seed=0)
    first.process_weights_()
    with torch.no_grad():
        second(seeded_images(1, 32, 32))  # still has no b_proj, and still runs
    assert first.cfg.proj_bias and not second.cfg.proj_bias


def test_processing_twice_changes_nothing():
    model = HookedViT(tiny_config(**FAMILIES["vit_like"])).init_weights(seed=0).process_weights_()
    again = copy.deepcopy(model).process_weights_()
    for (name, before), (_, after) in zip(model.named_parameters(), again.named_parameters()):
        torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    "overrides, step, words",
    [
        ({}, "center_unembed", "cosine similarity"),
        (FAMILIES["dinov2_reg_like"], "center_unembed", "no unembedding"),
        (FAMILIES["no_final_norm"], "center_writing_weights", "no final LayerNorm"),
        (dict(ln_pre=False, pool_type="map", map_n_heads=4, map_d_mlp=48, final_norm="post_pool"),
         "center_writing_weights", "raw residual stream"),
        (dict(attn_norm=True), "fold_value_biases", "ln_z"),
        (dict(rotary="half", ln_pre=False, n_registers=0), "refactor_factored_attn_matrices", "rotary"),
        (dict(attn_norm=True), "refactor_factored_attn_matrices", "ln_z"),
    ],
    ids=["clip-center_unembed", "backbone-center_unembed", "no_final_norm-center_writing_weights",
         "map_after_raw_stream-center_writing_weights", "ln_z-fold_value_biases", "rotary-refactor", "ln_z-refactor"],
)
def test_steps_that_would_change_the_output_are_refused_with_the_reason(overrides, step, words):
    model = HookedViT(tiny_config(**overrides)).init_weights(seed=0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=words):
        model.process_weights_(**{step: True})
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed although the step was refused"


def test_backbone_keeps_its_final_layernorm_and_says_so():
    model = HookedViT(tiny_config(**FAMILIES["dinov2_reg_like"])).init_weights(seed=0)
    with pytest.warns(UserWarning, match="kept .* final LayerNorm: the model's output is the pooled"):
        model.process_weights_()
    assert not torch.equal(model.ln_final.w, torch.ones_like(model.ln_final.w))
    assert torch.equal(model.blocks[0].ln2.w, torch.ones_like(model.blocks[0].ln2.w))
