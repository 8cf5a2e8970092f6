"""What a TransformerLens user types works on vit_lens: return types, cfg.device, positions and their labels,
get_act_name, input=, W_E as a matrix, HookedCLIP as a hooked model, patching in TransformerLens's words,
and gradients on loaded models.

The patching recipes below are written as TransformerLens's demos and ARENA write them (hooks with
``partial``, ``get_act_name``, ``model.cfg.n_layers`` / ``n_ctx`` / ``device``); only the model and the
input (images instead of tokens) differ, and the numbers are compared with vit_lens's own patching.
"""

from functools import partial

import pytest
import torch

import vit_lens
from tests.conftest import tiny_config
from vit_lens import HookedCLIP, HookedViT, VisionActivationCache, get_act_name, image_tower, tl_patching
from vit_lens.intervene.patching import activation_patching, attribution_patching
from vit_lens.toy import ToyWorld
from vit_lens.toy.model import build_toy_clip

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread

SMALL_VISION = dict(
    d_model=32, n_layers=2, n_heads=2, d_head=16, d_mlp=64, patch_size=8, image_size=32,
    ln_pre=True, d_proj=16, model_name="small toy CLIP",
)


def close(actual, expected, rtol=1e-5):
    """Equal up to float32 rounding, relative to the largest magnitude (batched and looped runs round differently)."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().clamp_min(1e-12)
    assert (actual - expected).abs().max() <= rtol * scale, (actual - expected).abs().max() / scale


@pytest.fixture(scope="module")
def small_clip():
    """A randomly initialised CLIP with the toy architecture at 32x32 (17 positions): fast enough for loops."""
    return build_toy_clip(SMALL_VISION, dict(d_proj=SMALL_VISION["d_proj"]), seed=0).eval()


@pytest.fixture(scope="module")
def pair():
    """Clean and corrupted 32x32 toy images (two each)."""
    batch = ToyWorld(image_size=32, seed=3).sample(4)
    return batch.images[:2], batch.images[2:]


@pytest.fixture(scope="module")
def toy_clip():
    return vit_lens.load_toy_clip()


@pytest.fixture(scope="module")
def toy_images():
    return ToyWorld(seed=1).sample(4).images


def models(clip):
    """The same weights as a HookedViT and as a HookedCLIP: every recipe must run on both."""
    return {"HookedViT": clip.vision, "HookedCLIP": clip}


# ---------------------------------------------------------------------------------------------- conveniences


def test_return_types_select_outputs_and_every_hook_fires(toy_clip, toy_images):
    model = toy_clip.vision
    with torch.no_grad():
        logits = model(toy_images)
        torch.testing.assert_close(model(toy_images, return_type="logits"), logits, rtol=0, atol=0)
        torch.testing.assert_close(model(toy_images, return_type="embed"), logits, rtol=0, atol=0)  # a CLIP tower
        out, cache = model.run_with_cache(toy_images)
        # Caching takes the explicit attention path, hence rounding-level differences from the fused one.
        close(out, logits)
        close(model(toy_images, return_type="pooled"), cache["hook_pooled"])
        assert model(toy_images, return_type="pooled").shape == (4, 128)
        seen = []
        assert model.run_with_hooks(
            toy_images, return_type=None, fwd_hooks=[("hook_image_embed", lambda act, hook: seen.append(act.shape))]
        ) is None
        assert seen == [torch.Size([4, 64])]
        none_out, none_cache = model.run_with_cache(toy_images, return_type=None)
    assert none_out is None
    torch.testing.assert_close(none_cache["hook_image_embed"], out, rtol=0, atol=0)


def test_return_types_that_cannot_work_say_what_does():
    classifier = HookedViT(tiny_config(d_proj=None, n_classes=5)).init_weights(seed=0).eval()
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="next-token loss.*return_type='logits'"):
        classifier(images, return_type="loss")
    with pytest.raises(ValueError, match="no image projection.*class logits.*return_type='logits'"):
        classifier(images, return_type="embed")
    with pytest.raises(ValueError, match="return_type must be one of"):
        classifier.run_with_hooks(images, return_type="probs")
    assert classifier(images, return_type="logits").shape == (1, 5)


def test_cfg_device_follows_the_weights(small_clip):
    model = HookedViT(tiny_config()).init_weights(seed=0)
    assert model.cfg.device == torch.device("cpu")
    # ARENA's habit: allocate results where the model is.
    assert torch.zeros(model.cfg.n_layers, model.cfg.n_ctx, device=model.cfg.device).device.type == "cpu"
    model.to("meta")
    assert model.cfg.device == torch.device("meta")
    assert small_clip.cfg.device == torch.device("cpu") and small_clip.cfg is small_clip.vision.cfg
    assert "device" not in model.cfg.to_dict()


def test_n_ctx_and_token_labels_name_every_position(toy_clip, toy_images):
    model = toy_clip.vision
    _, cache = model.run_with_cache(toy_images[:1], names_filter="blocks.0.hook_resid_pre")
    assert model.cfg.n_ctx == cache["resid_pre", 0].shape[1] == 65
    labels = model.token_labels()
    assert len(labels) == 65 and labels[:3] == ["CLS", "P(0,0)", "P(0,1)"] and labels[-1] == "P(7,7)"
    assert model.to_str_tokens(toy_images) == labels == toy_clip.token_labels()

    registers = HookedViT(tiny_config(n_registers=2, distillation_token=True, pool_type="token_dist", d_proj=None,
                                      n_classes=3)).init_weights(seed=0)
    assert registers.cfg.n_ctx == 4 + 16
    assert registers.token_labels()[:5] == ["CLS", "DIST", "REG0", "REG1", "P(0,0)"]


def test_token_labels_are_the_patching_labels(small_clip, pair):
    clean, corrupted = pair
    model = small_clip.vision
    _, cache = model.run_with_cache(clean)
    result = activation_patching(model, corrupted, cache, lambda out: out[:, 0], layers=[0])
    assert result.labels[1] == model.token_labels()


TL_SHORTHAND = [
    ("embed",), ("pos_embed",), ("resid_pre", 1), ("resid_mid", 0), ("resid_post", 1), ("attn_out", 0),
    ("mlp_out", 1), ("q", 0), ("k", 1), ("v", 0), ("z", 1), ("pattern", 0), ("attn", 1), ("attn_scores", 0),
    ("attn_logits", 1), ("result", 0), ("pre", 1), ("post", 0), ("mlp_post", 1), ("scale", 0, "ln1"),
    ("normalized", 1, "ln2"), ("scale",), ("normalized",), ("k1",), ("scale0ln2",), ("pre1",), ("z0a",),
    ("blocks.0.attn.hook_z",), ("hook_embed",),
]


@pytest.mark.parametrize("args", TL_SHORTHAND, ids=lambda a: "-".join(map(str, a)))
def test_get_act_name_matches_transformer_lens_and_names_real_hook_points(args, small_clip):
    from transformer_lens.utilities import get_act_name as tl_get_act_name

    assert get_act_name(*args) == tl_get_act_name(*args)
    assert get_act_name(*args) in small_clip.vision.hook_dict


def test_get_act_name_is_exported_and_resolves_ln_pre():
    assert vit_lens.utils.get_act_name is get_act_name
    assert get_act_name("scale", layer_type="ln_pre") == "ln_pre.hook_scale"
    assert get_act_name("normalized", layer_type="ln_final") == "ln_final.hook_normalized"


@pytest.mark.parametrize("name", ["mid", "attn_in", "q_input", "mlp_in"])
def test_transformer_lens_names_without_a_vision_hook_point_are_refused(name, small_clip):
    hook_name = get_act_name(name, 0)
    with pytest.raises(ValueError, match="has no hook point named"):
        small_clip.vision.add_hook(hook_name, lambda act, hook: None)


def test_images_may_be_passed_as_input_but_not_as_tokens(small_clip, pair):
    clean, _ = pair
    for model in models(small_clip).values():
        with torch.no_grad():
            torch.testing.assert_close(model(input=clean), model(clean), rtol=0, atol=0)
            out, cache = model.run_with_cache(input=clean)
        close(out, model(clean))
        assert cache.grid_size == (4, 4)
        with pytest.raises(TypeError, match="not tokens"):
            model(tokens=torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="images twice"):
        small_clip.vision(clean, input=clean)


def test_w_e_as_a_matrix_points_to_w_e_matrix(small_clip, pair):
    model = small_clip.vision
    with pytest.raises(ValueError, match="W_E_matrix"):
        model.W_E @ model.OV
    with pytest.raises(ValueError, match="W_E_matrix"):
        torch.randn(5, 32) @ model.W_E
    with pytest.raises(ValueError, match="W_E_matrix"):
        torch.matmul(model.W_E, torch.randn(8, 8))
    # Everything else is the parameter: same values and storage, gradients reach embed.W_E.
    assert torch.equal(model.W_E, model.embed.W_E) and model.W_E.data_ptr() == model.embed.W_E.data_ptr()
    assert type(model.W_E.flatten(1)) is torch.Tensor
    model.zero_grad(set_to_none=True)
    model.W_E.square().sum().backward()
    torch.testing.assert_close(model.embed.W_E.grad, 2 * model.embed.W_E.detach())
    model.zero_grad(set_to_none=True)
    # W_E_matrix maps a flattened patch (channel, row, column) to its row of hook_embed.
    clean, _ = pair
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        patch = clean[:, :, 8:16, 16:24].flatten(1)  # grid cell (1, 2)
        expected = cache["hook_embed"][:, model.cfg.n_prefix_tokens + 1 * 4 + 2]
        close(patch @ model.W_E_matrix + model.embed.b_E, expected)
    assert model.W_E_matrix.shape == (3 * 8 * 8, 32)


# ---------------------------------------------------------------------------------------------- HookedCLIP


def test_hooked_clip_has_the_image_towers_hook_api_and_weights(small_clip, pair):
    clip, vision = small_clip, small_clip.vision
    clean, _ = pair
    assert clip.cfg is vision.cfg and clip.hook_dict is vision.hook_dict and clip.mod_dict is vision.mod_dict
    assert [point.name for point in clip.hook_points()] == [point.name for point in vision.hook_points()]
    for weight in ("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "b_O", "W_in", "W_out", "b_out"):
        assert torch.equal(getattr(clip, weight), getattr(vision, weight)), weight
    torch.testing.assert_close(clip.OV.AB, vision.OV.AB)
    texts = ["red circle", "blue square"]
    with torch.no_grad():
        before = clip(clean, texts)
        clip.add_hook("blocks.1.attn.hook_z", lambda z, hook: torch.zeros_like(z))
        edited = clip(clean, texts)
        clip.reset_hooks()
        after = clip(clean, texts)
    assert not torch.allclose(before, edited) and torch.equal(before, after)
    with pytest.raises(AttributeError, match="neither has its image tower"):
        clip.no_such_attribute


def test_hooked_clip_forward_and_cache_with_and_without_texts(small_clip, pair):
    clip = small_clip
    clean, _ = pair
    texts = ["red circle", "blue square", "green triangle"]
    with torch.no_grad():
        torch.testing.assert_close(clip(clean), clip.vision(clean), rtol=0, atol=0)
        torch.testing.assert_close(clip(clean, texts, return_type="embed"), clip.vision(clean), rtol=0, atol=0)
        logits, cache = clip.run_with_cache(clean, texts)
        image = torch.nn.functional.normalize(cache["hook_image_embed"], dim=-1)
        text = clip.encode_text(texts, normalize=True)
    assert logits.shape == (2, 3)
    close(logits, clip.logit_scale.exp() * image @ text.T)
    with pytest.raises(TypeError, match="texts"):
        clip(clean, tokens=torch.zeros(3, 16, dtype=torch.long))


def test_image_tower_refuses_other_models():
    assert image_tower(HookedViT(tiny_config())).cfg.d_model == 32
    with pytest.raises(TypeError, match="HookedViT.*got Linear"):
        image_tower(torch.nn.Linear(2, 2))


def _public_calls(text_directions):
    """Public functions that take a HookedViT, each as ``fn(model, clean, corrupted) -> comparable result``."""
    from vit_lens.intervene import decompose, interventions, pruning, statistics
    from vit_lens.methods.featureviz import token_mixing, visualisation
    from vit_lens.methods.layers import attention_maps, averaging
    from vit_lens.methods.segmentation import maps

    head = lambda out: out[:, 0]  # noqa: E731
    return {
        "direct_contributions": lambda m, x, y: decompose.direct_contributions(
            m, m.run_with_cache(x)[1], level="head").values,
        "required_hooks": lambda m, x, y: decompose.required_hooks(m, "head"),
        "activation_patching": lambda m, x, y: activation_patching(
            m, y, m.run_with_cache(x)[1], head, layers=[1], positions=[0, 1]).values,
        "attribution_patching": lambda m, x, y: attribution_patching(m, x, y, head, layers=[1]).values,
        "tl_patching": lambda m, x, y: tl_patching.get_act_patch_attn_head_out_all_pos(
            m, y, m.run_with_cache(x)[1], lambda out: out[:, 0].mean()),
        "patch_region": lambda m, x, y: interventions.patch_region(m, rows=0),
        "head_scores": lambda m, x, y: pruning.head_scores(m, [x], layers=[-1])[-1],
        "compute_hook_statistics": lambda m, x, y: statistics.compute_hook_statistics(
            m, [x], ["blocks.0.hook_resid_post"], progress=False).mean("blocks.0.hook_resid_post"),
        "raw_attention": lambda m, x, y: maps.raw_attention(m, x),
        "attention_rollout": lambda m, x, y: maps.attention_rollout(m, x),
        "attention_gradcam": lambda m, x, y: maps.attention_gradcam(m, x, text_directions[:2]),
        "chefer_relevance": lambda m, x, y: maps.chefer_relevance(m, x, text_directions[:2]),
        "text_heatmaps": lambda m, x, y: maps.text_heatmaps(m, x, text_directions.T),
        "layer_attention_maps": lambda m, x, y: attention_maps.layer_attention_maps(m, x).maps,
        "layer_readout": lambda m, x, y: averaging.layer_readout(m, x),
        "per_token_scores": lambda m, x, y: token_mixing.per_token_scores(m, x, text_directions.T),
        "featureviz_evaluate": lambda m, x, y: visualisation.evaluate(
            m, visualisation.channel("blocks.1.hook_resid_post", 3), x),
        "cache_decompose_resid": lambda m, x, y: VisionActivationCache(
            m.run_with_cache(x)[1].cache_dict, m).decompose_resid(),
    }


def test_every_function_that_takes_a_hooked_vit_takes_a_hooked_clip(small_clip, pair):
    clean, corrupted = pair
    with torch.no_grad():
        text_directions = small_clip.encode_text(["red circle", "blue square", "green triangle"], normalize=True)
    for name, call in _public_calls(text_directions).items():
        on_vit = call(small_clip.vision, clean, corrupted)
        on_clip = call(small_clip, clean, corrupted)
        if isinstance(on_vit, torch.Tensor):
            torch.testing.assert_close(on_clip, on_vit, rtol=0, atol=0, msg=name)
        else:
            assert on_clip == on_vit, name


# ---------------------------------------------------------------------------------------------- patching, TL's words


def _patch_residual_component(corrupted_residual_component, hook, pos, clean_cache):
    """TransformerLens's demo hook: copy one position of the clean residual stream into the corrupted run."""
    corrupted_residual_component[:, pos, :] = clean_cache[hook.name][:, pos, :]
    return corrupted_residual_component


def _patch_head_vector(corrupted_head_vector, hook, head_index, clean_cache):
    corrupted_head_vector[:, :, head_index, :] = clean_cache[hook.name][:, :, head_index, :]
    return corrupted_head_vector


@pytest.mark.parametrize("kind", ["HookedViT", "HookedCLIP"])
def test_transformer_lens_activation_patching_recipe(kind, small_clip, pair):
    model = models(small_clip)[kind]
    clean_images, corrupted_images = pair
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_images)
        corrupted_logits = model(corrupted_images)
    answer_direction = (clean_logits - corrupted_logits).mean(0)

    def metric(logits):
        return (logits @ answer_direction).mean()

    resid_results = torch.zeros(model.cfg.n_layers, model.cfg.n_ctx, device=model.cfg.device)
    head_results = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, device=model.cfg.device)
    with torch.no_grad():
        for layer in range(model.cfg.n_layers):
            for position in range(model.cfg.n_ctx):
                hook_fn = partial(_patch_residual_component, pos=position, clean_cache=clean_cache)
                patched_logits = model.run_with_hooks(
                    corrupted_images, fwd_hooks=[(get_act_name("resid_pre", layer), hook_fn)], return_type="logits"
                )
                resid_results[layer, position] = metric(patched_logits)
            for head_index in range(model.cfg.n_heads):
                hook_fn = partial(_patch_head_vector, head_index=head_index, clean_cache=clean_cache)
                patched_logits = model.run_with_hooks(corrupted_images, fwd_hooks=[(get_act_name("z", layer), hook_fn)])
                head_results[layer, head_index] = metric(patched_logits)

    by_position = tl_patching.get_act_patch_resid_pre(model, corrupted_images, clean_cache, metric)
    by_head = tl_patching.get_act_patch_attn_head_out_all_pos(model, corrupted_images, clean_cache, metric)
    close(by_position, resid_results)
    close(by_head, head_results)
    assert by_position.shape == (2, 17) and by_position.device == model.cfg.device
    # CLS entering block 0 is the same learned vector in both runs; patches there carry the difference.
    effect = metric(clean_logits) - metric(corrupted_logits)
    assert (by_position[0, 0] - metric(corrupted_logits)).abs() < 1e-5 * effect.abs()
    assert (by_position[0, 1:] - metric(corrupted_logits)).abs().max() > 1e-2 * effect.abs()
    own = activation_patching(model, corrupted_images, clean_cache, metric)
    assert torch.equal(by_position, own.values.float())


def test_tl_patching_axes_are_transformer_lens_axes(small_clip, pair):
    model = small_clip.vision
    clean, corrupted = pair
    _, cache = model.run_with_cache(clean)
    metric = lambda out: out[:, 0].mean()  # noqa: E731
    n_layers, n_heads, n_ctx = model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_ctx
    by_pos = tl_patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric)
    own = activation_patching(model, corrupted, cache, metric, activation="z", by="head_position")
    assert by_pos.shape == (n_layers, n_ctx, n_heads)
    assert torch.equal(by_pos, own.values.float().transpose(1, 2))
    pattern = tl_patching.get_act_patch_attn_head_pattern_by_pos(model, corrupted, cache, metric)
    assert pattern.shape == (n_layers, n_heads, n_ctx)
    every_head = tl_patching.get_act_patch_attn_head_all_pos_every(model, corrupted, cache, metric)
    assert every_head.shape == (5, n_layers, n_heads)
    assert torch.equal(every_head[3], tl_patching.get_act_patch_attn_head_v_all_pos(model, corrupted, cache, metric))
    by_pos_every = tl_patching.get_act_patch_attn_head_by_pos_every(model, corrupted, cache, metric)
    assert by_pos_every.shape == (5, n_layers, n_ctx, n_heads)
    assert torch.equal(by_pos_every[0], by_pos) and torch.equal(by_pos_every[4], pattern.transpose(1, 2))
    blocks = tl_patching.get_act_patch_block_every(model, corrupted, cache, metric)
    assert blocks.shape == (3, n_layers, n_ctx)
    assert torch.equal(blocks[2], tl_patching.get_act_patch_mlp_out(model, corrupted, cache, metric))


def test_tl_patching_refuses_tokens_and_foreign_caches(small_clip, pair):
    model = small_clip.vision
    clean, corrupted = pair
    _, cache = model.run_with_cache(clean)
    metric = lambda out: out[:, 0].mean()  # noqa: E731
    with pytest.raises(TypeError, match=r"corrupted images \[batch, 3, height, width\].*token ids"):
        tl_patching.get_act_patch_resid_pre(model, torch.zeros(2, 17, dtype=torch.long), cache, metric)
    with pytest.raises(TypeError, match="17 positions patched are read from the model"):
        tl_patching.get_act_patch_resid_pre(model, torch.randn(2, 17), cache, metric)
    with pytest.raises(TypeError, match="VisionActivationCache"):
        tl_patching.get_act_patch_resid_pre(model, corrupted, dict(cache.cache_dict), metric)


def test_transformer_lens_own_helpers_count_positions_from_the_pixels(small_clip, pair):
    """Why vit_lens.tl_patching exists (the docs page says so): TransformerLens sweeps the image width, not n_ctx."""
    from transformer_lens import patching

    model = small_clip.vision
    clean, corrupted = pair
    _, cache = model.run_with_cache(clean)
    with pytest.raises(IndexError):  # 32 pixel columns swept over 17 positions
        patching.get_act_patch_resid_pre(model, corrupted, cache, lambda out: out[:, 0].mean())


# ---------------------------------------------------------------------------------------------- gradients


def test_loaded_toy_clip_is_in_eval_mode_with_gradients_available(toy_clip):
    assert not toy_clip.training and not toy_clip.vision.training
    assert all(param.requires_grad for param in toy_clip.parameters())


def test_incl_bwd_on_the_loaded_toy_clip_and_directed_errors(toy_clip, toy_images):
    model = toy_clip.vision
    images = toy_images[:2]
    out, cache = model.run_with_cache(images, incl_bwd=True, metric=lambda out: out[:, 0].sum(),
                                      names_filter=["blocks.3.hook_resid_post"])
    grad = cache["blocks.3.hook_resid_post_grad"]
    assert grad.shape == (2, 65, 128) and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"gradients are off.*torch.no_grad"):
        model.run_with_cache(images, incl_bwd=True, metric=lambda out: out[:, 0].sum())
    frozen = HookedViT(tiny_config()).init_weights(seed=0).eval().requires_grad_(False)
    small = torch.randn(1, 3, 32, 32)
    with pytest.raises(RuntimeError, match=r"nothing to differentiate.*requires_grad_\(True\)"):
        frozen.run_with_cache(small, incl_bwd=True, metric=lambda out: out.sum())
    _, frozen_cache = frozen.run_with_cache(small.requires_grad_(True), incl_bwd=True, metric=lambda out: out.sum())
    assert "hook_embed_grad" in frozen_cache.cache_dict


def test_gradient_based_helpers_on_the_loaded_toy_clip_leave_no_parameter_gradients(toy_clip, toy_images):
    from vit_lens.methods.featureviz import visualisation
    from vit_lens.methods.segmentation import maps

    clean, corrupted = toy_images[:2], toy_images[2:]
    with torch.no_grad():
        target = toy_clip.encode_text(["red object", "blue object"], normalize=True)
    toy_clip.zero_grad(set_to_none=True)
    results = {
        "attribution_patching": attribution_patching(toy_clip, clean, corrupted, lambda out: out[:, 0], layers=[3]).values,
        "attention_gradcam": maps.attention_gradcam(toy_clip, clean, target),
        "chefer_relevance": maps.chefer_relevance(toy_clip, clean, target),
        "visualize": visualisation.visualize(
            toy_clip, visualisation.text_direction(toy_clip, "red object"), steps=3, progress=False).activations,
    }
    for name, value in results.items():
        assert torch.isfinite(value).all() and value.abs().sum() > 0, name
    assert [name for name, param in toy_clip.named_parameters() if param.grad is not None] == []
    assert all(param.requires_grad for param in toy_clip.parameters())


def _cache_fwd_and_bwd(model, images, metric):
    """TransformerLens's attribution-patching demo: cache activations and their gradients with add_hook."""
    model.reset_hooks()
    cache, grad_cache = {}, {}

    def forward_cache_hook(act, hook):
        cache[hook.name] = act.detach()

    def backward_cache_hook(act, hook):
        grad_cache[hook.name] = act.detach()

    model.add_hook(lambda name: "_input" not in name, forward_cache_hook, "fwd")
    model.add_hook(lambda name: "_input" not in name, backward_cache_hook, "bwd")
    value = metric(model(images))
    value.backward()
    model.reset_hooks()
    return value.item(), VisionActivationCache(cache, model), VisionActivationCache(grad_cache, model)


@pytest.mark.parametrize("kind", ["HookedViT", "HookedCLIP"])
def test_transformer_lens_attribution_patching_recipe(kind, small_clip, pair):
    model = models(small_clip)[kind]
    clean_images, corrupted_images = pair
    with torch.no_grad():
        direction = (model(clean_images) - model(corrupted_images)).mean(0)

    def metric(logits):
        return (logits @ direction).mean()

    clean_value, clean_cache, _ = _cache_fwd_and_bwd(model, clean_images, metric)
    corrupted_value, corrupted_cache, corrupted_grad_cache = _cache_fwd_and_bwd(model, corrupted_images, metric)
    model.zero_grad(set_to_none=True)

    resid_attr = torch.stack([
        (corrupted_grad_cache["resid_pre", layer] * (clean_cache["resid_pre", layer] - corrupted_cache["resid_pre", layer]))
        .sum(dim=(0, -1))
        for layer in range(model.cfg.n_layers)
    ])  # [layer, pos]
    head_attr = torch.stack([
        (corrupted_grad_cache["z", layer] * (clean_cache["z", layer] - corrupted_cache["z", layer])).sum(dim=(0, 1, 3))
        for layer in range(model.cfg.n_layers)
    ])  # [layer, head]

    by_position = attribution_patching(model, clean_images, corrupted_images, metric)
    by_head = attribution_patching(model, clean_images, corrupted_images, metric, activation="z", by="head")
    assert abs(by_position.baseline_corrupted - corrupted_value) < 1e-4 * abs(corrupted_value)
    assert abs(by_position.baseline_clean - clean_value) < 1e-4 * abs(clean_value)
    close(by_position.values - by_position.baseline_corrupted, resid_attr)
    close(by_head.values - by_head.baseline_corrupted, head_attr)
    assert resid_attr.abs().max() > 1e-3


def test_textspan_on_text_embeddings_of_a_loaded_model_builds_no_graph(toy_clip):
    """Embeddings from a model whose weights require grad are data to TextSpan: no graph, no warning."""
    import warnings

    from vit_lens.methods.textspan.textspan import textspan

    pool = toy_clip.encode_text(["red object", "green object", "blue object", "small object", "large object"],
                                normalize=True)
    assert pool.requires_grad
    outputs = torch.randn(40, 2, generator=torch.Generator().manual_seed(0)) @ pool[:2].detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a tensor that requires grad becomes a float
        result = textspan(outputs, pool, n_texts=2)
    assert sorted(result.indices.tolist()) == [0, 1]
    assert not result.basis.requires_grad and not result.mean.requires_grad
