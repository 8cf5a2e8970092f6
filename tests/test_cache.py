"""VisionActivationCache: TransformerLens's cache methods give exact answers with CLS, registers and ln_pre."""

import pytest
import torch

from tests.conftest import FAMILIES, assert_rel_close, tiny_config
from vit_lens import HookedViT, VisionActivationCache

CACHE_FAMILIES = ["clip_like", "vit_like", "dinov2_reg_like", "deit_distilled_like"]


@pytest.fixture(params=CACHE_FAMILIES, ids=CACHE_FAMILIES)
def run(request, images):
    model = HookedViT(tiny_config(**FAMILIES[request.param])).init_weights(seed=3).eval()
    with torch.no_grad():
        out, cache = model.run_with_cache(images)
    return model, out, cache


def final_resid(model, cache):
    return cache["resid_post", model.cfg.n_layers - 1]


def test_shorthand_indexing(run):
    model, _, cache = run
    assert isinstance(cache, VisionActivationCache)
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["resid_post", -1] is cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    assert cache["pre", 0, "mlp"] is cache["blocks.0.mlp.hook_pre"]


def test_decompose_resid_sums_to_the_residual_stream(run):
    model, _, cache = run
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[:2] == (["embed", "0_attn_out"] if model.cfg.ln_pre else ["embed", "pos_embed"])
    assert_rel_close(parts.sum(0), final_resid(model, cache), rtol=1e-5, what="decompose_resid")
    middle = cache.decompose_resid(layer=2, mlp_input=True)
    assert_rel_close(middle.sum(0), cache["resid_mid", 2], rtol=1e-5, what="decompose_resid(mlp_input)")


@pytest.mark.parametrize("expand_neurons", [True, False], ids=["neurons", "mlp_layers"])
def test_full_decomposition_sums_to_the_residual_stream(run, expand_neurons):
    model, _, cache = run
    parts, labels = cache.get_full_resid_decomposition(expand_neurons=expand_neurons, return_labels=True)
    n_mlp = model.cfg.n_layers * (model.cfg.d_mlp if expand_neurons else 1)
    n_embed = 1 if model.cfg.ln_pre else 2
    assert len(labels) == model.cfg.n_layers * model.cfg.n_heads + n_mlp + n_embed + 1
    assert labels[0] == "L0H0" and labels[-1] == "bias"
    assert_rel_close(parts.sum(0), final_resid(model, cache), rtol=1e-5, what="get_full_resid_decomposition")


def test_stack_head_results_with_remainder_sums_to_the_residual_stream(run):
    model, _, cache = run
    heads, labels = cache.stack_head_results(incl_remainder=True, return_labels=True)
    assert labels[: model.cfg.n_heads] == [f"L0H{h}" for h in range(model.cfg.n_heads)]
    assert_rel_close(heads.sum(0), final_resid(model, cache), rtol=1e-5, what="stack_head_results")


def test_accumulated_resid_with_ln_ends_at_the_final_norm(run):
    """The final LayerNorm's normalisation only: its weight and bias belong to W_U / b_U (a folded model's view)."""
    model, _, cache = run
    stack = cache.accumulated_resid(apply_ln=True)
    assert stack.shape[0] == model.cfg.n_layers + 1
    if model.cfg.final_norm == "pre_pool":
        ln = model.ln_final
        assert_rel_close(stack[-1] * ln.w + ln.b, cache["ln_final.hook_normalized"], rtol=1e-5, what="logit lens final")


@pytest.mark.parametrize("family", ["clip_like", "vit_like", "dinov2_reg_like"])
def test_decomposition_through_the_final_norm_and_projection_gives_the_output(family, images):
    """Each component, LayerNorm-scaled by the cached scale and projected, sums to the model's output."""
    model = HookedViT(tiny_config(**FAMILIES[family])).init_weights(seed=3).eval()
    with torch.no_grad():
        out, cache = model.run_with_cache(images)
    ln = model.ln_final
    if model.cfg.d_proj is not None:
        readout, readout_bias = ln.w[:, None] * model.W_proj, ln.b @ model.W_proj
    elif model.cfg.n_classes:
        readout, readout_bias = ln.w[:, None] * model.head.W_head, ln.b @ model.head.W_head + model.head.b_head
    else:
        readout, readout_bias = torch.diag(ln.w), ln.b
    with torch.no_grad():
        parts = cache.get_full_resid_decomposition(apply_ln=True, pos_slice=0, project_output_onto=readout)
        assert_rel_close(parts.sum(0) + readout_bias, out, rtol=1e-5, what="direct decomposition of the output")


def test_deit_head_identity(images):
    """The distilled head reads CLS and the distillation token through two heads, then averages."""
    model = HookedViT(tiny_config(**FAMILIES["deit_distilled_like"])).init_weights(seed=3).eval()
    with torch.no_grad():
        out, cache = model.run_with_cache(images)
        ln, head = model.ln_final, model.head
        cls = cache.get_full_resid_decomposition(apply_ln=True, pos_slice=0,
                                                 project_output_onto=ln.w[:, None] * head.W_head).sum(0)
        dist = cache.get_full_resid_decomposition(apply_ln=True, pos_slice=1,
                                                  project_output_onto=ln.w[:, None] * head.W_head_dist).sum(0)
        bias = (ln.b @ head.W_head + head.b_head + ln.b @ head.W_head_dist + head.b_head_dist) / 2
        assert_rel_close((cls + dist) / 2 + bias, out, rtol=1e-5, what="distilled head decomposition")


def test_post_pool_final_norm_refuses_per_token_ln(images):
    model = HookedViT(tiny_config(ln_pre=False, d_proj=None, pool_type="avg", final_norm="post_pool")).init_weights(seed=0)
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
    with pytest.raises(ValueError, match="acts on the pooled vector"):
        cache.get_full_resid_decomposition(apply_ln=True)
    with pytest.raises(ValueError, match="acts on the pooled vector"):
        cache.decompose_resid(apply_ln=True)
    assert cache["ln_final.hook_scale"].shape == (2, 1)
    # Earlier layers still work, with their own ln1 scale.
    assert cache.decompose_resid(layer=1, apply_ln=True).shape[0] == 4  # embed, pos_embed, attn, mlp


def test_vision_helpers_split_prefix_and_patches(run):
    model, _, cache = run
    n_prefix = model.cfg.n_prefix_tokens
    resid = cache["resid_post", 0]
    assert cache.n_prefix_tokens == n_prefix and cache.grid_size == (4, 4)
    torch.testing.assert_close(cache.prefix_tokens("blocks.0.hook_resid_post"), resid[:, :n_prefix])
    grid = cache.to_patch_grid("blocks.0.hook_resid_post")
    assert grid.shape == (2, 4, 4, model.cfg.d_model)
    torch.testing.assert_close(grid[:, 1, 2], resid[:, n_prefix + 1 * 4 + 2])
    q_grid = cache.to_patch_grid(("q", 1))
    assert q_grid.shape == (2, 4, 4, model.cfg.n_heads, model.cfg.d_head)
    torch.testing.assert_close(q_grid[:, 3, 0], cache["q", 1][:, n_prefix + 12])
    with pytest.raises(ValueError, match="two position axes"):
        cache.patch_tokens("blocks.0.attn.hook_pattern")


def test_batch_slicing_keeps_the_vision_cache(run):
    model, _, cache = run
    first = cache.apply_slice_to_batch_dim(0)
    assert isinstance(first, VisionActivationCache)
    parts = first.decompose_resid()
    assert_rel_close(parts.sum(0), final_resid(model, cache)[0], rtol=1e-5, what="sliced cache")


def test_grid_follows_the_cached_image_size():
    model = HookedViT(tiny_config(dynamic_img_size=True)).init_weights(seed=0).eval()
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.randn(1, 3, 40, 24))
    assert cache.grid_size == (5, 3)
    grid = cache.to_patch_grid("blocks.0.hook_resid_post")
    assert grid.shape == (1, 5, 3, model.cfg.d_model)
    torch.testing.assert_close(grid[0, 4, 1], cache["resid_post", 0][0, model.cfg.n_prefix_tokens + 4 * 3 + 1])


def test_attention_grid_and_negative_layers_in_helpers(run):
    model, _, cache = run
    n_prefix = model.cfg.n_prefix_tokens
    grid = cache.attention_grid(1, query=0)
    assert grid.shape == (2, model.cfg.n_heads, 4, 4)
    torch.testing.assert_close(grid[:, :, 2, 3], cache["pattern", 1][:, :, 0, n_prefix + 2 * 4 + 3])
    last = model.cfg.n_layers - 1
    torch.testing.assert_close(cache.to_patch_grid(("resid_post", -1)), cache.to_patch_grid(("resid_post", last)))


def test_helpers_refuse_activations_without_a_token_axis(run):
    _, _, cache = run
    with pytest.raises(ValueError, match="hook_pooled has no token axis"):
        cache.patch_tokens("hook_pooled")


def test_per_neuron_stacks_are_refused_when_a_layernorm_sits_between_hook_post_and_w_out():
    model = HookedViT(tiny_config(mlp_norm=True)).init_weights(seed=0).eval()
    _, cache = model.run_with_cache(torch.randn(2, 3, 32, 32))
    # what the refusal protects against: hook_post @ W_out is not this MLP's output
    post, w_out = cache["blocks.0.mlp.hook_post"], model.blocks[0].mlp.W_out
    assert (post @ w_out + model.blocks[0].mlp.b_out - cache["blocks.0.hook_mlp_out"]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="ln_hidden"):
        cache.stack_neuron_results(layer=1)
    with pytest.raises(ValueError, match="expand_neurons=False"):
        cache.get_full_resid_decomposition(expand_neurons=True)
    stack = cache.get_full_resid_decomposition(expand_neurons=False)
    assert_rel_close(stack.sum(0), cache["blocks.2.hook_resid_post"], 1e-5)
