"""Hook points: every edit takes effect, layouts are as declared, mistakes are loud."""

import pytest
import torch

from tests.conftest import assert_rel_close, tiny_config
from vit_lens import HookedViT

# A classifier-style model: distillation token, post-pool LayerNorm, no ln_pre, a head.
DEIT_LIKE = dict(distillation_token=True, n_registers=0, ln_pre=False, d_proj=None, n_classes=5,
                 pool_type="token_dist", final_norm="post_pool")


def build(**overrides) -> HookedViT:
    return HookedViT(tiny_config(**overrides)).init_weights(seed=0).eval()


def perturb(activation, hook):
    """Multiply by a random factor per element: no part of the computation is invariant to it."""
    generator = torch.Generator().manual_seed(hash(hook.name) % 2**31)
    return activation * (1.0 + torch.rand(activation.shape, generator=generator))


@pytest.mark.parametrize("overrides", [{}, DEIT_LIKE], ids=["clip_like", "deit_like"])
def test_every_hook_edit_changes_the_output(overrides, images):
    model = build(**overrides)
    with torch.no_grad():
        base = model(images)
        names = list(model.hook_dict)
        # 18 per block; embed, pos_embed, pooled, output; ln_final's two; ln_pre's two for CLIP.
        assert len(names) == 18 * model.cfg.n_layers + 4 + 2 + (2 if model.cfg.ln_pre else 0)
        for name in names:
            edited = model.run_with_hooks(images, fwd_hooks=[(name, perturb)])
            change = (edited - base).abs().max().item()
            assert change > 1e-4, f"editing {name} did not change the output (max change {change:.2e})"


@pytest.mark.parametrize("overrides", [{}, DEIT_LIKE], ids=["clip_like", "deit_like"])
def test_identity_hooks_everywhere_leave_the_output_unchanged(overrides, images):
    """Attaching to every point (explicit attention, stepwise LayerNorm, per-head results) is exact."""
    model = build(**overrides)
    with torch.no_grad():
        base = model(images)
        observed = model.run_with_hooks(images, fwd_hooks=[(lambda name: True, lambda act, hook: act.clone())])
    assert_rel_close(observed, base, rtol=1e-6, what="all hooks attached")


def test_hook_points_have_the_declared_layouts(tiny_model, images):
    cfg = tiny_model.cfg
    batch, pos, h = len(images), cfg.n_ctx, cfg.n_heads
    _, cache = tiny_model.run_with_cache(images, names_filter=lambda name: True)
    expected = {
        "hook_embed": (batch, pos, cfg.d_model),
        "hook_pos_embed": (batch, pos, cfg.d_model),
        "ln_pre.hook_scale": (batch, pos, 1),
        "ln_pre.hook_normalized": (batch, pos, cfg.d_model),
        "blocks.1.hook_resid_pre": (batch, pos, cfg.d_model),
        "blocks.1.ln1.hook_scale": (batch, pos, 1),
        "blocks.1.attn.hook_q": (batch, pos, h, cfg.d_head),
        "blocks.1.attn.hook_k": (batch, pos, h, cfg.d_head),
        "blocks.1.attn.hook_v": (batch, pos, h, cfg.d_head),
        "blocks.1.attn.hook_attn_scores": (batch, h, pos, pos),
        "blocks.1.attn.hook_pattern": (batch, h, pos, pos),
        "blocks.1.attn.hook_z": (batch, pos, h, cfg.d_head),
        "blocks.1.attn.hook_result": (batch, pos, h, cfg.d_model),
        "blocks.1.hook_attn_out": (batch, pos, cfg.d_model),
        "blocks.1.hook_resid_mid": (batch, pos, cfg.d_model),
        "blocks.1.ln2.hook_normalized": (batch, pos, cfg.d_model),
        "blocks.1.mlp.hook_pre": (batch, pos, cfg.d_mlp),
        "blocks.1.mlp.hook_post": (batch, pos, cfg.d_mlp),
        "blocks.1.hook_mlp_out": (batch, pos, cfg.d_model),
        "blocks.1.hook_resid_post": (batch, pos, cfg.d_model),
        "ln_final.hook_scale": (batch, pos, 1),
        "ln_final.hook_normalized": (batch, pos, cfg.d_model),
        "hook_pooled": (batch, cfg.d_model),
        "hook_image_embed": (batch, cfg.d_proj),
    }
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name
    assert pos == 1 + 2 + 16  # CLS, two registers, 4x4 patches


def test_attention_internals_are_consistent(tiny_model, images):
    _, cache = tiny_model.run_with_cache(images, names_filter=lambda name: True)
    pattern = cache["pattern", 2]
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
    z = torch.einsum("bhqk,bkhd->bqhd", pattern, cache["v", 2])
    assert_rel_close(z, cache["z", 2], rtol=1e-6, what="z = pattern @ v")
    result = cache["result", 2]
    assert_rel_close(result.sum(2) + tiny_model.blocks[2].attn.b_O, cache["attn_out", 2], rtol=1e-6,
                     what="attn_out = sum of head results + b_O")
    scores = torch.einsum("bqhd,bkhd->bhqk", cache["q", 2], cache["k", 2]) / tiny_model.cfg.d_head**0.5
    assert_rel_close(scores, cache["attn_scores", 2], rtol=1e-6, what="scaled q.k")


def test_fused_and_explicit_attention_agree(tiny_model, images):
    """SDPA runs when nobody reads the pattern; observing the pattern switches path, not numbers."""
    assert not tiny_model.blocks[0].attn.needs_pattern()
    with torch.no_grad():
        fused = tiny_model(images)
        explicit = tiny_model.run_with_hooks(
            images, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda act, hook: None)]
        )
    assert_rel_close(explicit, fused, rtol=1e-6, what="explicit vs fused attention")


def test_a_replacement_is_exactly_what_flows_on(tiny_model, images):
    """Replacing the last residual stream with another image's gives that image's output."""
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(images)
        last = f"blocks.{tiny_model.cfg.n_layers - 1}.hook_resid_post"
        swapped = tiny_model.run_with_hooks(images, fwd_hooks=[(last, lambda act, hook: cache[last].flip(0))])
        torch.testing.assert_close(swapped, tiny_model(images.flip(0)), rtol=0, atol=1e-6)


def test_in_place_edit_of_the_position_embedding_stays_per_image(tiny_model, images):
    def zero_first_image(pos, hook):
        pos[0] = 0.0
        return pos

    with torch.no_grad():
        out = tiny_model.run_with_hooks(images, fwd_hooks=[("hook_pos_embed", zero_first_image)])
        base = tiny_model(images)
    assert (out[0] - base[0]).abs().max() > 1e-4
    torch.testing.assert_close(out[1], base[1])


def test_caching_while_intervening_records_the_edited_values(tiny_model, images):
    def zero_head_1(z, hook):
        z[:, :, 1] = 0.0
        return z

    with torch.no_grad():
        out, cache = tiny_model.run_with_cache(images, fwd_hooks=[("blocks.0.attn.hook_z", zero_head_1)])
        assert cache["z", 0][:, :, 1].abs().max() == 0
        assert cache["z", 0][:, :, 0].abs().max() > 0
        torch.testing.assert_close(out, tiny_model.run_with_hooks(images, fwd_hooks=[("blocks.0.attn.hook_z", zero_head_1)]))
        assert (out - tiny_model(images)).abs().max() > 1e-4
    assert not any(hp.fwd_hooks for hp in tiny_model.hook_points()), "hooks left behind"


def test_default_cache_leaves_out_per_head_results_unless_configured(images):
    model = build()
    _, cache = model.run_with_cache(images)
    assert "blocks.0.attn.hook_result" not in cache.cache_dict
    assert "blocks.0.attn.hook_pattern" in cache.cache_dict
    _, cache = model.run_with_cache(images, names_filter=["blocks.0.attn.hook_result"])
    assert list(cache.cache_dict) == ["blocks.0.attn.hook_result"]
    model_with_results = build(use_attn_result=True)
    _, cache = model_with_results.run_with_cache(images)
    assert "blocks.2.attn.hook_result" in cache.cache_dict


def test_hooks_context_is_temporary_and_nests(tiny_model, images):
    seen = []
    record = lambda act, hook: seen.append(hook.name)  # noqa: E731
    with torch.no_grad(), tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", record)]):
        with tiny_model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", record)]):
            tiny_model(images)
        tiny_model(images)
    tiny_model(images)
    assert seen == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre"]


def test_gradients_are_cached_with_a_metric(tiny_model, images):
    out, cache = tiny_model.run_with_cache(images, incl_bwd=True, metric=lambda out: out[:, 0].sum(),
                                           names_filter=["blocks.1.hook_resid_post", "hook_image_embed"])
    grad = cache["hook_image_embed_grad"]
    expected = torch.zeros_like(grad)
    expected[:, 0] = 1.0
    torch.testing.assert_close(grad, expected)
    assert cache["blocks.1.hook_resid_post_grad"].abs().sum() > 0
    with pytest.raises(ValueError, match="metric="):
        tiny_model.run_with_cache(images, incl_bwd=True)
    with pytest.raises(ValueError, match="reset_hooks_end=False"):
        tiny_model.run_with_hooks(images, bwd_hooks=[("hook_embed", lambda g, hook: None)])
    tiny_model.reset_hooks()


def test_stop_at_layer_returns_the_residual_stream_entering_that_block(tiny_model, images):
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(images)
        torch.testing.assert_close(tiny_model(images, stop_at_layer=2), cache["resid_pre", 2])
        torch.testing.assert_close(tiny_model(images, stop_at_layer=-1), cache["resid_pre", 2])
    with pytest.raises(ValueError, match="stop_at_layer"):
        tiny_model(images, stop_at_layer=7)


def test_unknown_hook_names_raise_with_suggestions(tiny_model, images):
    with pytest.raises(ValueError, match=r"Did you mean: 'blocks.1.attn.hook_z'"):
        tiny_model.run_with_hooks(images, fwd_hooks=[("blocks.1.attn.hook_zz", lambda a, hook: None)])
    with pytest.raises(ValueError, match="3 blocks, numbered 0 to 2"):
        tiny_model.add_hook("blocks.5.hook_resid_pre", lambda a, hook: None)
    with pytest.raises(ValueError, match="no hook point named 'blocks.0.hook_patern'"):
        tiny_model.run_with_cache(images, names_filter=["blocks.0.hook_patern"])
    assert not any(hp.fwd_hooks for hp in tiny_model.hook_points())


def test_hook_functions_with_wrong_signatures_or_returns_are_refused(tiny_model, images):
    with pytest.raises(TypeError, match=r"fn\(activation, hook=hook_point\)"):
        tiny_model.add_hook("hook_embed", lambda activation: None)
    with pytest.raises(TypeError, match="not a function"):
        tiny_model.add_hook("hook_embed", "zero it")
    with pytest.raises(ValueError, match=r"returned shape \(2, 4\)"):
        tiny_model.run_with_hooks(images, fwd_hooks=[("hook_embed", lambda act, hook: act[:, 0, :4])])
    with pytest.raises(TypeError, match="returned a float"):
        tiny_model.run_with_hooks(images, fwd_hooks=[("hook_embed", lambda act, hook: 0.0)])
    with pytest.raises(TypeError, match="float64"):
        tiny_model.run_with_hooks(images, fwd_hooks=[("hook_embed", lambda act, hook: act.double())])
    tiny_model.reset_hooks()
