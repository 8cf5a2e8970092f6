"""The readout in TransformerLens's words: W_U, b_U, unembed, tokens_to_residual_directions, logit_attrs, logit lens.

Every recipe is checked against the model's real output: direct logit attributions summed over a
complete stack, plus the bias, give the output entry; the logit lens ends at the output.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import FAMILIES, assert_rel_close, tiny_config
from vit_lens import HookedViT, load_toy_clip


def tiny(family: str, seed: int = 3, **overrides) -> HookedViT:
    return HookedViT(tiny_config(**{**FAMILIES[family], **overrides})).init_weights(seed=seed).eval()


@pytest.fixture(scope="module")
def toy():
    clip = load_toy_clip()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embed, cache = clip.vision.run_with_cache(images)
    return clip, images, embed, cache


@pytest.fixture(params=["toy_clip", "clip_like", "vit_like"])
def cls_pooled(request, toy, images):
    """CLS-pooled models with a pre-pool final LayerNorm: the toy CLIP, a random CLIP-like tower, a classifier."""
    if request.param == "toy_clip":
        _, toy_images, _, _ = toy
        model, images = toy[0].vision, toy_images
    else:
        model = tiny(request.param)
    with torch.no_grad():
        out, cache = model.run_with_cache(images)
    return model, out, cache


def test_unembedding_carries_the_final_layernorm(cls_pooled):
    model, out, cache = cls_pooled
    ln = model.ln_final
    readout = model.W_proj if model.cfg.d_proj is not None else model.head.W_head
    readout_bias = model.head.b_head if model.cfg.n_classes else 0
    folded = ln.w[:, None] * readout
    torch.testing.assert_close(model.W_U, folded - folded.mean(0))  # centred over d_model, as fold_ln leaves it
    torch.testing.assert_close(model.b_U, ln.b @ readout + readout_bias)
    normalised = (cache["ln_final.hook_normalized"][:, 0] - ln.b) / ln.w  # the LayerNorm without weight and bias
    assert_rel_close(model.unembed(normalised), out, what="unembed")
    # The projection alone misses the LayerNorm's weight and bias (the silent error of the issue).
    stack = cache.apply_ln_to_stack(cache.decompose_resid(layer=-1, pos_slice=0), pos_slice=0)
    assert (stack.sum(0) @ readout - out).abs().max() > 0.1


def test_dla_in_transformer_lens_words_gives_the_output(cls_pooled):
    """decompose_resid -> apply_ln_to_stack -> @ W_U, plus b_U, is the output, to 1e-5."""
    model, out, cache = cls_pooled
    with torch.no_grad():
        stack, labels = cache.decompose_resid(layer=-1, pos_slice=0, return_labels=True)
        scaled = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=0)
        assert_rel_close(scaled.sum(0) @ model.W_U + model.b_U, out, what="apply_ln_to_stack @ W_U + b_U")
        with_ln = cache.decompose_resid(layer=-1, pos_slice=0, apply_ln=True)
        assert_rel_close(with_ln.sum(0) @ model.W_U + model.b_U, out, what="decompose_resid(apply_ln=True)")
        parts = cache.get_full_resid_decomposition(apply_ln=True, pos_slice=0, project_output_onto=model.W_U)
        assert_rel_close(parts.sum(0) + model.b_U, out, what="get_full_resid_decomposition")
    assert labels[-1] == f"{model.cfg.n_layers - 1}_mlp_out"


def test_logit_attrs_of_classes_sum_to_the_logits(images):
    model = tiny("vit_like")
    with torch.no_grad():
        logits, cache = model.run_with_cache(images)
        stack = cache.decompose_resid(layer=-1, pos_slice=0)
        labels = torch.tensor([3, 1])
        attrs = cache.logit_attrs(stack, labels, pos_slice=0)
        assert attrs.shape == (len(stack), 2)
        assert_rel_close(attrs.sum(0) + model.b_U[labels], logits[torch.arange(2), labels], what="class logits")
        diff = cache.logit_attrs(stack, labels, incorrect_tokens=torch.tensor([0, 4]), pos_slice=0)
        expected = logits[torch.arange(2), labels] - logits[torch.arange(2), torch.tensor([0, 4])]
        assert_rel_close(diff.sum(0) + model.b_U[labels] - model.b_U[torch.tensor([0, 4])], expected, what="logit diff")
        one_class = cache.logit_attrs(stack, 2, pos_slice=0)
        assert_rel_close(one_class.sum(0) + model.b_U[2], logits[:, 2], what="one class for every image")
        per_position = cache.logit_attrs(cache.decompose_resid(layer=-1), labels)
    assert per_position.shape == (len(stack), 2, model.cfg.n_ctx)
    torch.testing.assert_close(per_position[:, :, 0], attrs)


def test_logit_attrs_of_text_give_the_zero_shot_logits(toy):
    """On the toy CLIP: attributions to text directions sum to image_embed @ t; scaled, to HookedCLIP's logits."""
    clip, images, embed, cache = toy
    prompts = ["red square", "blue circle", "green triangle"]
    with torch.no_grad():
        texts = clip.encode_text(prompts, normalize=True)
        stack = cache.decompose_resid(layer=-1, pos_slice=0)
        attrs = cache.logit_attrs(stack, texts, pos_slice=0)  # one text per image
        dot = attrs.sum(0) + (clip.vision.b_U * texts).sum(-1)
        assert_rel_close(dot, (embed * texts).sum(-1), what="embed @ text")
        logits = clip(images, prompts)
        zero_shot = clip.logit_scale.exp() * dot / embed.norm(dim=-1)
        assert_rel_close(zero_shot, logits.diagonal(), what="zero-shot logits")
        directions = clip.tokens_to_residual_directions(prompts)
        assert directions.shape == (3, clip.vision.cfg.d_model)
        assert clip.tokens_to_residual_directions("red square").shape == (clip.vision.cfg.d_model,)
        same = cache.logit_attrs(stack, directions=directions, pos_slice=0)
        torch.testing.assert_close(same, attrs)


def test_tokens_to_residual_directions_are_unembedding_columns(images):
    model = tiny("vit_like")
    torch.testing.assert_close(model.tokens_to_residual_directions(torch.tensor([4, 0])), model.W_U.T[[4, 0]])
    assert model.tokens_to_residual_directions(1).shape == (model.cfg.d_model,)
    assert model.tokens_to_residual_directions(torch.tensor([[1, 2]])).shape == (1, 2, model.cfg.d_model)
    vectors = torch.randn(3, model.cfg.n_classes)
    torch.testing.assert_close(model.tokens_to_residual_directions(vectors), vectors @ model.W_U.T)


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("avg_pool_pre_norm_proj", {}),  # open_clip pool_type="avg": ln_post on every token, then the mean
        ("avg_pool_fc_norm", {}),  # timm global_pool="avg": the mean, then fc_norm; a backbone
        ("avg_pool_fc_norm", dict(n_classes=5)),  # the same with a classifier head
        ("vit_like", dict(final_norm="post_pool")),  # CLS, then a LayerNorm on the pooled vector
        ("no_final_norm", {}),
        ("dinov2_reg_like", {}),
    ],
    ids=["avg-pre_pool-proj", "avg-fc_norm", "avg-fc_norm-head", "cls-post_pool-head", "no_final_norm", "dinov2_reg"],
)
def test_pool_stack_reads_out_every_pooling(family, overrides, images):
    """pool_stack applies the final LayerNorm where the model does (before or after pooling) and pools as it does."""
    model = tiny(family, **overrides)
    with torch.no_grad():
        out, cache = model.run_with_cache(images)
        stack = cache.decompose_resid(layer=-1)
        pooled = cache.pool_stack(stack)
        assert pooled.shape == (len(stack), 2, model.cfg.d_model)
        assert_rel_close(pooled.sum(0) @ model.W_U + model.b_U, out, what="pool_stack @ W_U + b_U")
        targets = torch.randn(2, model.cfg.d_output, generator=torch.Generator().manual_seed(0))
        attrs = cache.logit_attrs(stack, targets, pool=True)
        assert_rel_close(attrs.sum(0) + targets @ model.b_U, (out * targets).sum(-1), what="logit_attrs(pool=True)")
        lens = model.unembed(cache.pool_stack(cache.accumulated_resid(), recompute_ln=True))
        one_call, labels = cache.logit_lens(return_labels=True)
    assert_rel_close(lens[-1], out, what="pooled logit lens, last state")
    torch.testing.assert_close(one_call, lens)
    assert labels[-1] == "final_post" and len(labels) == model.cfg.n_layers + 1


def test_final_layernorm_after_pooling_points_to_pool_stack(images):
    model = tiny("avg_pool_fc_norm")
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
    with pytest.raises(ValueError, match="pool_stack"):
        cache.accumulated_resid(apply_ln=True)
    with pytest.raises(ValueError, match="pool=True"):
        cache.logit_attrs(cache.decompose_resid(layer=-1), torch.randn(model.cfg.d_model))
    with pytest.raises(ValueError, match="without pos_slice"):
        cache.pool_stack(cache.decompose_resid(layer=-1, pos_slice=0))


def test_logit_lens_recipes_end_at_the_output_and_mean_what_they_say(cls_pooled):
    """accumulated_resid(apply_ln=True): each state read out with its own statistics (the logit lens);
    apply_ln_to_stack(accumulated_resid()): the final scale for every state, so consecutive differences
    are the layers' direct attributions. Both end at the output."""
    model, out, cache = cls_pooled
    ln = model.ln_final
    with torch.no_grad():
        lens = model.unembed(cache.accumulated_resid(apply_ln=True, pos_slice=0))
        assert lens.shape == (model.cfg.n_layers + 1, len(out), model.cfg.d_output)
        assert_rel_close(lens[-1], out, what="logit lens, last state")
        assert_rel_close(cache.logit_lens(), lens, what="cache.logit_lens()")
        assert cache.logit_lens(incl_mid=True).shape[0] == 2 * model.cfg.n_layers + 1
        readout = model.W_proj if model.cfg.d_proj is not None else model.head.W_head
        bias = 0 if model.cfg.d_proj is not None else model.head.b_head
        for layer in range(model.cfg.n_layers):
            state = cache["resid_pre", layer][:, 0]
            own = F.layer_norm(state, (model.cfg.d_model,), ln.w, ln.b, ln.eps) @ readout + bias
            assert_rel_close(lens[layer], own, what=f"logit lens at layer {layer}")
        arena = model.unembed(cache.apply_ln_to_stack(cache.accumulated_resid(pos_slice=0), pos_slice=0))
        assert_rel_close(arena[-1], out, what="ARENA's recipe, last state")
        parts = cache.apply_ln_to_stack(cache.decompose_resid(layer=-1, mode="all", pos_slice=0), pos_slice=0)
        first = 1 if model.cfg.ln_pre else 2  # embed (and pos_embed) come first
        for layer in range(model.cfg.n_layers):
            written = (parts[first + 2 * layer] + parts[first + 2 * layer + 1]) @ model.W_U
            assert_rel_close(arena[layer + 1] - arena[layer], written, rtol=1e-4, what=f"layer {layer}'s share")


def test_recomputed_and_cached_final_normalisation_agree_at_the_last_state(toy):
    _, _, _, cache = toy
    recomputed = cache.accumulated_resid(apply_ln=True, pos_slice=0)
    cached = cache.apply_ln_to_stack(cache.accumulated_resid(pos_slice=0), pos_slice=0)
    assert_rel_close(recomputed[-1], cached[-1], what="last state")
    assert_rel_close(cache.apply_ln_to_stack(cache.accumulated_resid(), recompute_ln=True),
                     cache.accumulated_resid(apply_ln=True), what="recompute_ln")


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(pool_type="map", map_n_heads=4, map_d_mlp=64), "direct_contributions"),
        (dict(FAMILIES["deit_distilled_like"]), "W_head_dist"),
        (dict(pool_type="max", d_proj=None, n_classes=5), "max-pools"),
    ],
    ids=["attention_pool", "distilled_deit", "max_pool"],
)
def test_readouts_without_an_unembedding_say_why(overrides, words, images):
    model = HookedViT(tiny_config(**overrides)).init_weights(seed=0).eval()
    with pytest.raises(ValueError, match=words):
        _ = model.W_U
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
    with pytest.raises(ValueError, match=words):
        cache.logit_attrs(cache.decompose_resid(layer=-1, pos_slice=0), directions=torch.ones(model.cfg.d_model))
    with pytest.raises(ValueError, match=words):
        cache.pool_stack(cache.decompose_resid(layer=-1))


def test_bad_targets_are_refused_with_what_would_work(toy, images):
    clip, _, _, cache = toy
    with pytest.raises(TypeError, match="HookedCLIP.tokens_to_residual_directions"):
        clip.vision.tokens_to_residual_directions("a red square")
    with pytest.raises(ValueError, match="no classes"):
        clip.vision.tokens_to_residual_directions(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="64 entries"):
        clip.vision.tokens_to_residual_directions(torch.randn(2, 63))
    classifier = tiny("vit_like")
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        classifier.tokens_to_residual_directions(torch.tensor([5]))
    stack = cache.decompose_resid(layer=-1, pos_slice=0)
    with pytest.raises(TypeError, match="exactly one"):
        cache.logit_attrs(stack, pos_slice=0)
    with pytest.raises(TypeError, match="rank a vocabulary"):
        cache.logit_lens(top_k=5)
    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(stack, torch.randn(3, 64), incorrect_tokens=torch.randn(64), pos_slice=0)
