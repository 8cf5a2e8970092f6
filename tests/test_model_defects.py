"""The hooked model's defects and unclear errors found by trying bad input (issue 19), one test each.

Threads and hooks, caches and in-place edits, and the errors for an empty batch, a bool layer, hooks
given as a dict, filters that match nothing, re-entrant hooks, layers out of range, misspelled
cache keys and TransformerLens hook points that vit_lens does not have.
"""

import sys
import threading

import numpy as np
import pytest
import torch

from tests.conftest import FAMILIES, tiny_config
from vit_lens import HookedViT, ViTConfig
from vit_lens.model.hook_checks import hook_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

ZERO_RESID_POST_1 = [("blocks.1.hook_resid_post", lambda activation, hook: activation * 0)]


@pytest.fixture
def model() -> HookedViT:
    """The issue's model: CLIP-like, two blocks, ln_pre and a projection."""
    cfg = ViTConfig(d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, patch_size=8, image_size=32,
                    ln_pre=True, d_proj=16)
    return HookedViT(cfg).init_weights(seed=0).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def hooks_left(model: HookedViT) -> dict[str, int]:
    """Hook point name -> number of hooks attached, for every point that has any."""
    counts = {name: len(point.fwd_hooks) + len(point.bwd_hooks) for name, point in model.hook_dict.items()}
    return {name: count for name, count in counts.items() if count}


# ---------------------------------------------------------------------- defect 1: hooks and threads


def test_a_hooked_run_in_one_thread_never_reaches_another_threads_forward_or_cache(model, x):
    other = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    names_a, names_b = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], ["blocks.1.hook_mlp_out"]
    with torch.no_grad():
        ref = model(x)
        ref_hooked = model.run_with_hooks(x, fwd_hooks=ZERO_RESID_POST_1)
        _, ref_cache_a = model.run_with_cache(x, names_filter=names_a)
        _, ref_cache_b = model.run_with_cache(other, names_filter=names_b, fwd_hooks=ZERO_RESID_POST_1)
    n_iterations = 50
    start = threading.Barrier(2, timeout=30)
    results: dict[str, list] = {"plain": [], "cache_a": [], "hooked": [], "cache_b": []}
    errors: list[Exception] = []

    def plain_thread():
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(n_iterations):
                    results["plain"].append(model(x))
                    results["cache_a"].append(model.run_with_cache(x, names_filter=names_a)[1])
        except Exception as error:  # reported by the main thread
            errors.append(error)

    def hooked_thread():
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(n_iterations):
                    results["hooked"].append(model.run_with_hooks(x, fwd_hooks=ZERO_RESID_POST_1))
                    results["cache_b"].append(
                        model.run_with_cache(other, names_filter=names_b, fwd_hooks=ZERO_RESID_POST_1)[1]
                    )
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=plain_thread), threading.Thread(target=hooked_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread is stuck (deadlock?)"
    assert not errors, errors
    assert len(results["plain"]) == len(results["hooked"]) == n_iterations
    differing = sum(not torch.equal(out, ref) for out in results["plain"])
    assert differing == 0, f"{differing} of {n_iterations} plain forwards ran under the other thread's hook"
    assert all(torch.equal(out, ref_hooked) for out in results["hooked"])
    for cache in results["cache_a"]:
        assert list(cache.keys()) == names_a
        assert all(torch.equal(cache[name], ref_cache_a[name]) for name in names_a)
    for cache in results["cache_b"]:
        assert list(cache.keys()) == names_b
        assert torch.equal(cache[names_b[0]], ref_cache_b[names_b[0]])
    assert hooks_left(model) == {}


def test_permanent_hooks_apply_in_every_thread(model, x):
    with torch.no_grad():
        expected = model.run_with_hooks(x, fwd_hooks=ZERO_RESID_POST_1)
        model.add_hook(*ZERO_RESID_POST_1[0], is_permanent=True)
        outputs = []
        thread = threading.Thread(target=lambda: outputs.append(model(x)))
        thread.start()
        thread.join(timeout=60)
    model.reset_hooks(including_permanent=True)
    assert len(outputs) == 1 and torch.equal(outputs[0], expected)


def test_a_hook_may_call_the_model_again_on_the_same_thread(model, x):
    with torch.no_grad():
        expected_inner = model(x, stop_at_layer=1)
        inner = []
        hook = ("blocks.1.hook_resid_post", lambda activation, hook: inner.append(model(x, stop_at_layer=1)))
        thread = threading.Thread(target=lambda: model.run_with_hooks(x, fwd_hooks=[hook]))
        thread.start()
        thread.join(timeout=60)
    assert not thread.is_alive(), "a hook calling the model deadlocked"
    assert len(inner) == 1 and torch.equal(inner[0], expected_inner)


def test_a_model_copy_gets_its_own_lock_and_the_same_outputs(model, x):
    import copy

    twin = copy.deepcopy(model)
    assert twin._run_lock is not model._run_lock
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))


# ---------------------------------------------------------------------- defect 2: in-place edits and the cache


# (model overrides, edited hook point, cached hook point that is the same tensor or a view of it)
ALIASED_PAIRS = [
    ({}, "blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"),
    ({}, "blocks.2.hook_resid_pre", "blocks.1.hook_resid_post"),
    ({}, "blocks.0.hook_resid_pre", "ln_pre.hook_normalized"),
    ({}, "hook_pooled", "ln_final.hook_normalized"),
    (FAMILIES["no_final_norm"], "hook_pooled", "blocks.2.hook_resid_post"),
    (FAMILIES["avg_pool_fc_norm"], "hook_pooled", "ln_final.hook_normalized"),
    (FAMILIES["deit_distilled_like"], "hook_pooled", "ln_final.hook_normalized"),
]


@pytest.mark.parametrize(("overrides", "edited", "cached"), ALIASED_PAIRS)
def test_an_in_place_edit_never_rewrites_an_activation_already_cached(overrides, edited, cached, images):
    model = HookedViT(tiny_config(**overrides)).init_weights(seed=0).eval()
    with torch.no_grad():
        _, plain = model.run_with_cache(images)
        _, edited_cache = model.run_with_cache(images, fwd_hooks=[(edited, lambda t, hook: t.zero_())])
    assert plain[cached].abs().sum() > 0
    assert torch.equal(edited_cache[cached], plain[cached]), f"the zero_() at {edited} rewrote the cached {cached}"
    assert edited_cache[edited].abs().sum() == 0  # the cache records the edit where it happened


def test_the_issues_example_keeps_the_cached_residual(model, x):
    with torch.no_grad():
        _, plain = model.run_with_cache(x)
        _, cache = model.run_with_cache(x, fwd_hooks=[("blocks.1.hook_resid_pre", lambda t, hook: t.zero_())])
    assert torch.equal(cache["blocks.0.hook_resid_post"], plain["blocks.0.hook_resid_post"])


@pytest.mark.parametrize("family", ["clip_like", "no_final_norm", "avg_pool_fc_norm", "deit_distilled_like"])
def test_in_place_and_replacing_edits_give_the_same_cache_at_every_hook_point(family, images):
    """Zeroing any hook point in place or by returning zeros must leave identical caches, entry by entry."""
    model = HookedViT(tiny_config(**FAMILIES[family])).init_weights(seed=0).eval()
    with torch.no_grad():
        for name in model.hook_dict:
            if name.endswith("attn.hook_result"):
                continue  # not cached by default; editing it switches attention to the per-head path
            _, in_place = model.run_with_cache(images, fwd_hooks=[(name, lambda t, hook: t.zero_())])
            _, replaced = model.run_with_cache(images, fwd_hooks=[(name, lambda t, hook: torch.zeros_like(t))])
            assert list(in_place.keys()) == list(replaced.keys())
            for key in replaced:
                torch.testing.assert_close(
                    in_place[key], replaced[key], rtol=0, atol=0, equal_nan=True,
                    msg=lambda m, key=key, name=name: f"zero_() at {name} changed the cached {key}: {m}",
                )


def test_the_readme_hook_example_edits_in_place_and_caches_correctly(model, x):
    def zero_head_3(z, hook):  # as in the README: edits in place and returns the tensor
        z[:, :, 3] = 0.0
        return z

    with torch.no_grad():
        ablated = model.run_with_hooks(x, fwd_hooks=[("blocks.1.attn.hook_z", zero_head_3)])
        out, cache = model.run_with_cache(x, fwd_hooks=[("blocks.1.attn.hook_z", zero_head_3)])
        _, plain = model.run_with_cache(x)
    # A full cache runs the explicit attention and LayerNorm paths: equal up to float rounding.
    torch.testing.assert_close(out, ablated, rtol=1e-5, atol=1e-6)
    assert (out - plain["hook_image_embed"]).abs().max() > 1e-2
    assert cache["blocks.1.attn.hook_z"][:, :, 3].abs().sum() == 0
    assert torch.equal(cache["blocks.1.attn.hook_z"][:, :, :3], plain["blocks.1.attn.hook_z"][:, :, :3])
    for name in ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_v"]:
        assert torch.equal(cache[name], plain[name])


def test_a_plain_run_with_cache_copies_nothing(model, x):
    """The guard against in-place edits costs nothing where no hook can edit: aliased entries stay shared."""
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    post, pre = cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"]
    assert post.untyped_storage().data_ptr() == pre.untyped_storage().data_ptr()


# ---------------------------------------------------------------------- unclear errors made clear


def test_an_empty_batch_is_refused_at_the_input(model):
    with pytest.raises(ValueError, match=r"empty batch, shape \(0, 3, 32, 32\); pass at least one image"):
        model(torch.randn(0, 3, 32, 32))


@pytest.mark.parametrize("stop", [True, False])
def test_stop_at_layer_refuses_a_bool(model, x, stop):
    with pytest.raises(ValueError, match=rf"stop_at_layer must be an int in \[-2, 2\].*got {stop}, a bool"):
        model(x, stop_at_layer=stop)


def test_stop_at_layer_takes_numpy_integers(model, x):
    with torch.no_grad():
        assert torch.equal(model(x, stop_at_layer=np.int64(1)), model(x, stop_at_layer=1))


def test_hooks_given_as_a_dict_work_like_a_list_of_pairs(model, x):
    with torch.no_grad():
        expected = model.run_with_hooks(x, fwd_hooks=ZERO_RESID_POST_1)
        assert torch.equal(model.run_with_hooks(x, fwd_hooks=dict(ZERO_RESID_POST_1)), expected)
        out, cache = model.run_with_cache(x, fwd_hooks=dict(ZERO_RESID_POST_1), names_filter="blocks.1.hook_resid_post")
        assert torch.equal(out, expected) and cache["blocks.1.hook_resid_post"].abs().sum() == 0
        with model.hooks(fwd_hooks=dict(ZERO_RESID_POST_1)):
            assert torch.equal(model(x), expected)
    assert hooks_left(model) == {}


def test_hooks_that_are_not_pairs_are_refused_with_what_to_pass():
    # hooks(), run_with_hooks and run_with_cache read their hooks through hook_pairs; called directly here
    # because under the tests' type checker a malformed argument is already refused at the signature.
    name, fn = ZERO_RESID_POST_1[0]
    with pytest.raises(TypeError, match=r"one pair \('blocks.1.hook_resid_post', <lambda>\) not in a list: wrap it"):
        hook_pairs((name, fn), "fwd_hooks")
    with pytest.raises(TypeError, match=r"list of \(hook_name, fn\) pairs.*got an item that is a str"):
        hook_pairs([name], "fwd_hooks")
    with pytest.raises(TypeError, match=r"bwd_hooks must be a list of \(hook_name, fn\) pairs.*got a function"):
        hook_pairs(fn, "bwd_hooks")
    assert hook_pairs({name: fn}, "fwd_hooks") == hook_pairs([(name, fn)], "fwd_hooks") == [(name, fn)]


def test_a_names_filter_that_matches_no_hook_point_raises(model, x):
    with pytest.raises(ValueError, match="matches none of the model's 44 hook points.*names_filter=\\[\\]"):
        model.run_with_cache(x, names_filter=lambda name: "resid_postt" in name)
    with pytest.raises(ValueError, match="Did you mean: 'blocks.0.hook_resid_post'"):
        model.run_with_cache(x, names_filter="blocks.0.hook_resid_postt")
    with pytest.raises(ValueError, match="Did you mean: 'blocks.1.attn.hook_pattern'"):
        model.run_with_cache(x, names_filter=["blocks.0.hook_resid_post", "blocks.1.attn.hook_patern"])
    _, nothing = model.run_with_cache(x, names_filter=[])  # an empty list caches nothing, on purpose
    assert len(nothing) == 0
    assert hooks_left(model) == {}


def test_a_hook_that_re_enters_the_model_without_end_leaves_no_hook_behind(model, x):
    def re_enter(activation, hook):
        model.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_post", re_enter), ZERO_RESID_POST_1[0]])

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(600)  # keep the recursion short
    try:
        with pytest.raises(RecursionError):
            model.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_post", re_enter)])
    finally:
        sys.setrecursionlimit(limit)
    assert hooks_left(model) == {} and model.context_level == 0


def test_hooks_are_removed_even_when_the_clean_up_of_a_nested_run_fails(model, x, monkeypatch):
    """Where the stack runs out, a RecursionError can strike inside a nested run's clean-up: the outer run cleans up."""
    real_reset_hooks = model.reset_hooks
    calls = []

    def reset_hooks_failing_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise RecursionError("maximum recursion depth exceeded (in the nested run's clean-up)")
        return real_reset_hooks(*args, **kwargs)

    def fail(activation, hook):
        raise RuntimeError("the nested run failed")

    def re_enter_once(activation, hook):
        model.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_post", fail)])

    monkeypatch.setattr(model, "reset_hooks", reset_hooks_failing_once)
    with pytest.raises(RecursionError):
        model.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_post", re_enter_once)])
    assert len(calls) >= 2  # the nested clean-up failed, a later one ran
    assert hooks_left(model) == {}
    assert model.context_level == 0


def test_a_failing_run_removes_its_hooks_and_keeps_permanent_ones(model, x):
    def fail(activation, hook):
        raise RuntimeError("hook failed")

    model.add_hook("hook_embed", lambda activation, hook: None, is_permanent=True)
    with pytest.raises(RuntimeError, match="hook failed"):
        model.run_with_cache(x, fwd_hooks=[("blocks.1.hook_mlp_out", fail)])
    assert hooks_left(model) == {"hook_embed": 1}
    model.reset_hooks(including_permanent=True)


CACHE_HELPERS = [
    ("stack_head_results", lambda cache, layer: cache.stack_head_results(layer=layer)),
    ("accumulated_resid", lambda cache, layer: cache.accumulated_resid(layer=layer)),
    ("decompose_resid", lambda cache, layer: cache.decompose_resid(layer=layer)),
    ("get_full_resid_decomposition", lambda cache, layer: cache.get_full_resid_decomposition(layer=layer)),
    ("stack_neuron_results", lambda cache, layer: cache.stack_neuron_results(layer)),
    ("stack_activation", lambda cache, layer: cache.stack_activation("resid_post", layer)),
    ("apply_ln_to_stack", lambda cache, layer: cache.apply_ln_to_stack(cache.decompose_resid(1), layer)),
]


@pytest.mark.parametrize(("method", "call"), CACHE_HELPERS, ids=[m for m, _ in CACHE_HELPERS])
def test_cache_helpers_name_the_valid_layer_range(model, x, method, call):
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    lowest = 1 if method == "stack_activation" else 0
    for layer in (9, -2, 3, True):
        with pytest.raises(ValueError, match=rf"{method}\(layer={layer!r}\): .* has 2 blocks; .*{lowest} to 2"):
            call(cache, layer)
    for layer in (lowest, 1, 2, -1):  # the range TransformerLens documents still works
        assert call(cache, layer) is not None


def test_mlp_input_needs_a_block_with_an_mlp(model, x):
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    with pytest.raises(ValueError, match=r"with mlp_input=True, layer is the block whose MLP input is meant: 0 to 1"):
        cache.decompose_resid(layer=2, mlp_input=True)
    assert len(cache.decompose_resid(layer=1, mlp_input=True)) == 1 + 3  # ln_pre's embed, attn 0, mlp 0, attn 1


def test_the_residual_entering_block_0_decomposes_into_the_embedding(model, x):
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    parts, labels = cache.decompose_resid(layer=0, return_labels=True)
    assert labels == ["embed"]
    assert torch.equal(parts[0], cache["blocks.0.hook_resid_pre"])


def test_a_misspelled_cache_key_suggests_the_close_names(model, x):
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=lambda name: "resid" in name or "attn.hook_z" in name)
    with pytest.raises(KeyError, match="'blocks.0.hook_resid_postt'. Did you mean: 'blocks.0.hook_resid_post'"):
        cache["blocks.0.hook_resid_postt"]
    with pytest.raises(KeyError, match=r"'blocks.9.hook_resid_post' \(what \('resid_post', 9\) stands for\). The model "
                                       r"has 2 blocks, numbered 0 to 1"):
        cache["resid_post", 9]
    with pytest.raises(KeyError, match=r"names_filter left it out; cache it with run_with_cache\(\.\.\., "
                                       r"names_filter=\[\.\.\., 'blocks.0.attn.hook_pattern'\]\)"):
        cache["pattern", 0]
    with pytest.raises(KeyError, match=r"Per-head results .* cache.stack_head_results\(\) derives them from hook_z"):
        cache["blocks.1.attn.hook_result"]
    with pytest.raises(KeyError, match="Cache keys are hook names"):
        cache[3]
    assert str(pytest.raises(KeyError, lambda: cache["hook_embedd"]).value).startswith("This cache has no activation")


@pytest.mark.parametrize(
    ("name", "advice"),
    [
        ("blocks.1.hook_attn_in", "'blocks.1.ln1.hook_normalized' [batch, pos, d_model]"),
        ("blocks.0.attn.hook_q_input", "edit 'blocks.0.attn.hook_q'"),
        ("blocks.0.hook_k_input", "edit 'blocks.0.attn.hook_k'"),
        ("blocks.1.hook_v_input", "edit 'blocks.1.attn.hook_v'"),
        ("blocks.0.hook_mlp_in", "the MLP reads 'blocks.0.ln2.hook_normalized'"),
        ("blocks.0.attn.hook_rot_q", "rotary position embeddings"),
        ("attn_pool.hook_pattern", "attention pooling"),
    ],
)
def test_transformer_lens_hooks_that_vit_lens_lacks_say_what_to_use_instead(model, x, name, advice):
    with pytest.raises(ValueError, match=f"no hook point named '{name}'") as info:
        model.run_with_hooks(x, fwd_hooks=[(name, lambda activation, hook: None)])
    assert advice in str(info.value)
    assert "Did you mean" not in str(info.value)  # no hook_attn_out for hook_attn_in
    with pytest.raises(ValueError, match=f"no hook point named '{name}'"):
        model.run_with_cache(x, names_filter=name)
    assert hooks_left(model) == {}


def test_architecture_specific_hook_points_are_explained(x):
    backbone = HookedViT(tiny_config(ln_pre=False, d_proj=None)).init_weights(seed=0)
    with pytest.raises(ValueError, match="'ln_pre' exists only in models with a LayerNorm before the first block"):
        backbone.add_hook("ln_pre.hook_normalized", lambda activation, hook: None)
    with pytest.raises(ValueError, match="'hook_image_embed' exists only in models with a CLIP projection"):
        backbone.run_with_cache(x, names_filter="hook_image_embed")
