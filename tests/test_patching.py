"""Activation and attribution patching: defining properties on tiny models, batching, labels, errors.

"Exact" comparisons allow float32 rounding (about 2e-6 on metrics of size ~10): a BLAS kernel rounds
a row of the final projection differently depending on where the row sits in the batch, so a
batched run cannot match an unbatched one bit for bit.
"""

import pytest
import torch

from tests.conftest import tiny_config
from vit_lens import HookedViT
from vit_lens.intervene.patching import activation_patching, attribution_patching

EXACT = dict(rtol=1e-6, atol=1e-5)


def close(actual, expected) -> None:
    """Equal up to float32 rounding (every patching effect tested for is above 1e-3)."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected.expand_as(actual), **EXACT)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def setup():
    """Tiny CLIP-like model (CLS + 2 registers + 4x4 patches), clean and corrupted images, a per-image metric."""
    model = HookedViT(tiny_config()).init_weights(seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    clean = torch.randn(2, 3, 32, 32, generator=generator)
    corrupted = torch.randn(2, 3, 32, 32, generator=generator)
    direction = torch.randn(model.cfg.d_proj, generator=generator)
    with torch.no_grad():
        clean_out, cache = model.run_with_cache(clean)
    return model, clean, corrupted, cache, clean_out, lambda out: out @ direction


def test_patching_every_token_at_layer_0_reproduces_the_clean_run(setup):
    model, _, corrupted, cache, clean_out, metric = setup
    result = activation_patching(model, corrupted, cache, metric, layers=[0], positions="all")
    assert result.values.shape == (1, 1) and result.labels == [["L0"], ["all"]]
    close(result.values, metric(clean_out).mean())
    close(result.baseline_clean, metric(clean_out).mean())
    with torch.no_grad():
        close(result.baseline_corrupted, metric(model(corrupted)).mean())
    assert abs(result.baseline_clean - result.baseline_corrupted) > 0.1


def test_after_the_last_block_only_the_pooled_cls_token_matters(setup):
    model, _, corrupted, cache, _, metric = setup
    result = activation_patching(model, corrupted, cache, metric, activation="resid_post", layers=[-1])
    assert result.values.shape == (1, 3 + 16) and result.labels[0] == ["L2"]
    close(result.values[0, 0], result.baseline_clean)
    close(result.values[0, 1:], result.baseline_corrupted)
    normalized = result.normalized()
    close(normalized.values[0, 0], 1.0)
    close(normalized.values[0, 1:], 0.0)


def test_resid_pre_of_the_last_block_still_reaches_cls_through_attention(setup):
    model, _, corrupted, cache, _, metric = setup
    result = activation_patching(model, corrupted, cache, metric, layers=[-1])
    effects = (result.values[0, 3:] - result.baseline_corrupted).abs()
    assert effects.max() > 1e-2


@pytest.mark.parametrize(
    "activation, by, extra",
    [
        ("resid_pre", "position", {"layers": [0, 2], "positions": [0, 1, 4, 10, 18]}),
        ("z", "head_position", {"layers": [0, 2], "positions": [0, 5, -1]}),
        ("pattern", "head", {}),
        ("result", "head", {"heads": [1, 3]}),
        ("mlp_out", "region", {"region_size": (3, 3)}),
    ],
)
def test_batched_sweeps_equal_one_forward_per_variant(setup, activation, by, extra):
    model, clean, corrupted, cache, _, metric = setup
    if activation == "result":
        with torch.no_grad():
            _, cache = model.run_with_cache(
                clean, names_filter=lambda name: name.endswith(("hook_result", "blocks.0.hook_resid_pre"))
            )
    kwargs = dict(activation=activation, by=by, **extra)
    batched = activation_patching(model, corrupted, cache, metric, **kwargs)
    unbatched = activation_patching(model, corrupted, cache, metric, batch_size=len(corrupted), **kwargs)
    uneven = activation_patching(model, corrupted, cache, metric, batch_size=7, **kwargs)  # 3 variants, uneven tail
    close(batched.values, unbatched.values)
    close(uneven.values, unbatched.values)
    close(batched.baseline_clean, unbatched.baseline_clean)
    assert (unbatched.values - unbatched.baseline_corrupted).abs().max() > 1e-3, "the sweep should move the metric"


def test_head_and_query_patches_match_hand_written_hooks(setup):
    model, _, corrupted, cache, _, metric = setup
    z = activation_patching(model, corrupted, cache, metric, activation="z", by="head", layers=[1], heads=[2])
    pattern = activation_patching(model, corrupted, cache, metric, activation="pattern", layers=[1], positions=[4])

    def patch_head_2(act, hook):
        act[:, :, 2] = cache["z", 1][:, :, 2]
        return act

    def patch_query_4(act, hook):
        act[:, :, 4] = cache["pattern", 1][:, :, 4]
        return act

    with torch.no_grad():
        by_hand_z = metric(model.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.attn.hook_z", patch_head_2)]))
        by_hand_pattern = metric(
            model.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.attn.hook_pattern", patch_query_4)])
        )
    close(z.values[0, 0], by_hand_z.mean())
    close(pattern.values[0, 0], by_hand_pattern.mean())
    assert abs(z.values[0, 0] - z.baseline_corrupted) > 1e-3


def test_head_position_values_are_indexed_head_then_token(setup):
    model, _, corrupted, cache, _, metric = setup
    heads, tokens = [1, 2], [0, 7, 12]
    result = activation_patching(
        model, corrupted, cache, metric, activation="z", by="head_position", layers=[1], heads=heads, positions=tokens
    )
    assert result.values.shape == (1, 2, 3) and result.labels[2] == ["CLS", "P(1,0)", "P(2,1)"]
    by_hand = torch.zeros(2, 3)
    for i, head in enumerate(heads):
        for j, token in enumerate(tokens):
            def patch_one(act, hook, head=head, token=token):
                act[:, token, head] = cache["z", 1][:, token, head]
                return act

            with torch.no_grad():
                out = model.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.attn.hook_z", patch_one)])
            by_hand[i, j] = metric(out).mean()
    close(result.values[0], by_hand)
    assert (by_hand - result.baseline_corrupted).abs().min() > 1e-4


def test_patching_from_a_cache_of_the_same_images_changes_nothing(setup):
    model, clean, _, cache, _, metric = setup
    result = activation_patching(model, clean, cache, metric, activation="z", by="head")
    assert result.values.shape == (3, 4) and result.labels[1] == ["H0", "H1", "H2", "H3"]
    close(result.values, result.baseline_corrupted)
    close(result.baseline_clean, result.baseline_corrupted)


def test_whole_grid_region_equals_patching_every_patch(setup):
    model, _, corrupted, cache, _, metric = setup
    whole = activation_patching(
        model, corrupted, cache, metric, activation="attn_out", by="region", regions=[(slice(None), slice(None))]
    )
    assert whole.labels[1] == ["R(0:4,0:4)"]
    by_hand = []
    for layer in range(3):
        def patch_patches(act, hook, layer=layer):
            act[:, 3:] = cache["attn_out", layer][:, 3:]
            return act

        with torch.no_grad():
            out = model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.hook_attn_out", patch_patches)])
        by_hand.append(metric(out).mean())
    close(whole.values[:, 0], torch.stack(by_hand))

    cells = activation_patching(model, corrupted, cache, metric, activation="attn_out", by="region", region_size=(1, 1))
    tokens = activation_patching(model, corrupted, cache, metric, activation="attn_out", positions=list(range(3, 19)))
    close(cells.values, tokens.values)
    assert cells.labels[1][5] == "R(1:2,1:2)" and tokens.labels[1][5] == "P(1,1)"

    tiles = activation_patching(model, corrupted, cache, metric, by="region", layers=[0], region_size=(3, 3))
    assert tiles.labels[1] == ["R(0:3,0:3)", "R(0:3,3:4)", "R(3:4,0:3)", "R(3:4,3:4)"]
    corner = activation_patching(model, corrupted, cache, metric, by="region", layers=[0], regions=[(3, -1)])
    close(corner.values[0, 0], tiles.values[0, 3])


@pytest.mark.parametrize(
    "activation, by, extra",
    [("resid_pre", "position", {}), ("z", "head", {}), ("pattern", "head_position", {}),
     ("result", "region", {"region_size": (2, 2)})],
)
def test_attribution_agrees_with_exact_patching_for_small_differences(activation, by, extra):
    model = HookedViT(tiny_config()).init_weights(seed=0).double().eval()
    generator = torch.Generator().manual_seed(3)
    clean = torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64)
    corrupted = clean + 1e-3 * torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64)
    direction = torch.randn(model.cfg.d_proj, generator=generator, dtype=torch.float64)
    metric = lambda out: out @ direction  # noqa: E731
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda name: True)  # hook_result included
    exact = activation_patching(model, corrupted, cache, metric, activation=activation, by=by, **extra)
    estimate = attribution_patching(model, clean, corrupted, metric, activation=activation, by=by, **extra)

    assert estimate.labels == exact.labels
    torch.testing.assert_close(estimate.baseline_clean, exact.baseline_clean, rtol=0, atol=1e-10)
    torch.testing.assert_close(estimate.baseline_corrupted, exact.baseline_corrupted, rtol=0, atol=1e-10)
    exact_effect = (exact.values - exact.baseline_corrupted).flatten()
    estimated_effect = (estimate.values - estimate.baseline_corrupted).flatten()
    assert exact_effect.abs().max() > 1e-5, "the corruption should move the metric"  # float64: noise ~1e-13
    relative_error = (estimated_effect - exact_effect).norm() / exact_effect.norm()
    assert relative_error < 1e-2, f"relative error {relative_error:.3e}"  # measured: 1e-4 to 1e-3
    assert torch.corrcoef(torch.stack([estimated_effect, exact_effect]))[0, 1] > 0.99
    assert all(param.grad is None for param in model.parameters())


def test_labels_with_registers_and_for_a_distilled_deit():
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    for overrides, prefix in [
        ({}, ["CLS", "REG0", "REG1"]),
        (dict(distillation_token=True, n_registers=0, ln_pre=False, d_proj=None, n_classes=5,
              pool_type="token_dist", final_norm="post_pool"), ["CLS", "DIST"]),
    ]:
        model = HookedViT(tiny_config(**overrides)).init_weights(seed=0).eval()
        with torch.no_grad():
            _, cache = model.run_with_cache(images)
        result = activation_patching(model, images.flip(0), cache, lambda out: out[:, 0], activation="v",
                                     by="head_position", heads=[0, 3])
        assert result.axes == ("layer", "head", "position")
        assert result.labels[0] == ["L0", "L1", "L2"] and result.labels[1] == ["H0", "H3"]
        assert result.labels[2] == prefix + [f"P({r},{c})" for r in range(4) for c in range(4)]
        assert result.values.shape == (3, 2, len(prefix) + 16)


def test_positions_come_from_the_activation_for_other_image_sizes():
    model = HookedViT(tiny_config(dynamic_img_size=True)).init_weights(seed=0).eval()
    generator = torch.Generator().manual_seed(5)
    clean, corrupted = torch.randn(2, 2, 3, 40, 48, generator=generator)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    result = activation_patching(model, corrupted, cache, lambda out: out[:, 0], activation="resid_post", layers=[2])
    assert result.values.shape == (1, 3 + 5 * 6) and result.labels[1][-1] == "P(4,5)"
    prefix, grid = result.to_grid()
    assert prefix.shape == (1, 3) and grid.shape == (1, 5, 6)
    close(grid[0, 4, 5], result.values[0, -1])
    close(grid, result.baseline_corrupted)  # after the last block, patches do not reach the pooled CLS


def test_to_grid_places_tokens_and_leaves_unpatched_ones_nan(setup):
    model, _, corrupted, cache, _, metric = setup
    result = activation_patching(model, corrupted, cache, metric, layers=[0, 1], positions=[0, 2, 3 + 6, 3 + 15])
    prefix, grid = result.to_grid()
    assert prefix.shape == (2, 3) and grid.shape == (2, 4, 4)
    assert torch.equal(prefix[:, [0, 2]], result.values[:, :2]) and prefix[:, 1].isnan().all()
    assert torch.equal(grid[:, 1, 2], result.values[:, 2]) and torch.equal(grid[:, 3, 3], result.values[:, 3])
    assert grid.isnan().sum() == 2 * 14
    with pytest.raises(ValueError, match="to_grid needs one value per token"):
        activation_patching(model, corrupted, cache, metric, activation="z", by="head", layers=[0]).to_grid()


def test_figures_have_one_heatmap_per_panel(setup):
    import plotly.graph_objects as go

    model, _, corrupted, cache, _, metric = setup
    per_token = activation_patching(model, corrupted, cache, metric)
    figure = per_token.figure()
    assert isinstance(figure, go.Figure)
    assert len(figure.data) == 3 * 2  # per layer: prefix strip and patch grid
    assert [len(trace.z[0]) for trace in figure.data[::2]] == [3, 3, 3]
    patches_only = activation_patching(model, corrupted, cache, metric, positions=list(range(3, 19))).figure()
    assert len(patches_only.data) == 3
    heads = activation_patching(model, corrupted, cache, metric, activation="z", by="head")
    assert len(heads.normalized().figure().data) == 1
    head_tokens = activation_patching(
        model, corrupted, cache, metric, activation="k", by="head_position", layers=[1, 2]
    )
    assert len(head_tokens.figure().data) == 2


def test_errors_say_what_would_work(setup):
    model, clean, corrupted, cache, _, metric = setup
    with pytest.raises(ValueError, match="Did you mean 'z'"):
        activation_patching(model, corrupted, cache, metric, activation="blocks.0.attn.hook_z")
    with pytest.raises(ValueError, match="needs an activation with a head axis"):
        activation_patching(model, corrupted, cache, metric, by="head")
    with pytest.raises(ValueError, match="layer 3 is out of range: the model has 3 blocks"):
        activation_patching(model, corrupted, cache, metric, layers=[0, 3])
    with pytest.raises(TypeError, match=r"return the tensor itself rather than \.item\(\)"):
        activation_patching(model, corrupted, cache, lambda out: out.sum().item())
    with pytest.raises(ValueError, match=r"metric returned shape \(2, 16\)"):
        activation_patching(model, corrupted, cache, lambda out: out)
    with pytest.raises(ValueError, match="by must be one of"):
        activation_patching(model, corrupted, cache, metric, by="token")
    with pytest.raises(ValueError, match="heads= selects heads"):
        activation_patching(model, corrupted, cache, metric, heads=[0])
    with pytest.raises(ValueError, match="either regions="):
        activation_patching(model, corrupted, cache, metric, by="region")
    with pytest.raises(ValueError, match="position 19 is out of range"):
        activation_patching(model, corrupted, cache, metric, positions=[19])
    with pytest.raises(ValueError, match="batch_size=1 is smaller than the 2 corrupted images"):
        activation_patching(model, corrupted, cache, metric, batch_size=1)
    with pytest.raises(ValueError, match="names_filter"):
        activation_patching(model, corrupted, cache, metric, activation="result", by="head")
    with pytest.raises(ValueError, match="one clean image per corrupted image"):
        activation_patching(model, corrupted[:1], cache, metric)
    with pytest.raises(ValueError, match="same shape"):
        attribution_patching(model, clean, corrupted[:1], metric)
    with pytest.raises(ValueError, match="needs an activation with a head axis"):
        attribution_patching(model, clean, corrupted, metric, activation="mlp_out", by="head_position")
    with pytest.raises(ValueError, match="positions must be a list of token indices, 'all' or None"):
        activation_patching(model, corrupted, cache, metric, positions="patches")
