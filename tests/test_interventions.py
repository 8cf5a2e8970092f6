"""Interventions: each hook factory shows its defining property on a tiny model."""

import pytest
import torch

from tests.conftest import tiny_config
from vit_lens import HookedViT
from vit_lens.intervene.interventions import (
    average_attention_input,
    average_layer_output,
    average_residual_connection,
    mask_heads,
    mean_ablate,
    patch_from_cache,
    patch_positions,
    patch_region,
    prefix_positions,
    replace,
    resample_ablate,
    scale,
    zero_ablate,
)
from vit_lens.intervene.statistics import compute_hook_statistics

Z1 = "blocks.1.attn.hook_z"
RESID1 = "blocks.1.hook_resid_post"


def random_images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def dataset() -> list[torch.Tensor]:
    """Three batches of uneven size: the statistics must not depend on how the data is split."""
    return [random_images(n, seed) for n, seed in ((3, 10), (1, 11), (2, 12))]


@pytest.fixture(autouse=True)
def no_grad_one_thread():
    # On a busy 2-core machine, intra-op threads turn a 1 ms tiny forward into 250 ms.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- head masks


def test_mask_of_ones_is_exactly_a_no_op(tiny_model, images):
    cfg = tiny_model.cfg
    hooks = mask_heads(torch.ones(cfg.n_layers, cfg.n_heads), tiny_model)
    assert [name for name, _ in hooks] == [f"blocks.{l}.attn.hook_z" for l in range(cfg.n_layers)]
    assert torch.equal(tiny_model.run_with_hooks(images, fwd_hooks=hooks), tiny_model(images))


def test_mask_of_zeros_equals_zero_ablating_every_head(tiny_model, images):
    cfg = tiny_model.cfg
    masked = tiny_model.run_with_hooks(images, fwd_hooks=mask_heads(torch.zeros(cfg.n_layers, cfg.n_heads)))
    ablated = tiny_model.run_with_hooks(images, fwd_hooks=[(lambda name: name.endswith("hook_z"), zero_ablate())])
    assert torch.equal(masked, ablated)
    assert (masked - tiny_model(images)).abs().max() > 1e-3


def test_partial_mask_scales_each_head_by_its_entry(tiny_model, images):
    cfg = tiny_model.cfg
    mask = torch.ones(cfg.n_layers, cfg.n_heads, dtype=torch.bool)
    mask[1, 2] = False  # a bool mask: head 2 of layer 1 removed
    _, cache = tiny_model.run_with_cache(images, fwd_hooks=mask_heads(mask), names_filter=Z1)
    _, clean = tiny_model.run_with_cache(images, names_filter=Z1)
    assert torch.equal(cache[Z1][:, :, 2], torch.zeros_like(cache[Z1][:, :, 2]))
    assert torch.equal(cache[Z1][:, :, [0, 1, 3]], clean[Z1][:, :, [0, 1, 3]])


# ---------------------------------------------------------------------------------------------- zero / scale / replace


@pytest.mark.parametrize("batch", [1, 2])
def test_zero_ablate_one_head_zeroes_exactly_that_head(tiny_model, images, batch):
    images = images[:batch]
    out, cache = tiny_model.run_with_cache(images, fwd_hooks=[(Z1, zero_ablate(heads=[1]))], names_filter=Z1)
    clean_out, clean = tiny_model.run_with_cache(images, names_filter=Z1)
    assert cache[Z1][:, :, 1].abs().max() == 0
    assert clean[Z1][:, :, 1].abs().max() > 0.1
    others = [0, 2, 3]
    assert torch.equal(cache[Z1][:, :, others], clean[Z1][:, :, others])
    assert (out - clean_out).abs().max() > 1e-3


def test_hooks_never_edit_their_input_in_place(tiny_model, images):
    """A cache hook that ran before the intervention keeps the original activation."""
    seen = {}

    def record(activation, hook):
        seen[hook.name] = activation.detach()

    _, clean = tiny_model.run_with_cache(images, names_filter=[Z1, RESID1])
    factories = [zero_ablate(heads=0), scale(3.0, positions=[0, 4]), replace(1.5, heads=slice(1, 3)),
                 mean_ablate(torch.zeros(tiny_model.cfg.n_ctx, 4, 8), heads=-1),
                 patch_from_cache({Z1: torch.ones(1, tiny_model.cfg.n_ctx, 4, 8)}, positions=5),
                 resample_ablate(clean[Z1].flip(0), permutation=[0, 1]), zero_ablate()]
    for factory in factories:
        with tiny_model.hooks(fwd_hooks=[(Z1, record)]):
            tiny_model.run_with_hooks(images, fwd_hooks=[(Z1, factory)])
        assert torch.equal(seen[Z1], clean[Z1]), factory


def test_returned_tensors_are_safe_to_edit_in_place_downstream(tiny_model, images):
    """A later hook that edits in place (as the README's example does) must not write into a cache or the means."""

    def zero_head_3_in_place(z, hook):
        z[:, :, 3] = 0.0
        return z

    _, clean = tiny_model.run_with_cache(images, names_filter=Z1)
    kept = clean[Z1].clone()
    means = torch.ones(tiny_model.cfg.n_ctx, 4, 8)
    for factory in (patch_from_cache(clean), mean_ablate(means), replace(means)):
        tiny_model.run_with_hooks(images, fwd_hooks=[(Z1, factory), (Z1, zero_head_3_in_place)])
    assert torch.equal(clean[Z1], kept)
    assert torch.equal(means, torch.ones_like(means))


def test_scale_zero_equals_zero_ablate_and_scale_one_is_a_no_op(tiny_model, images):
    zeroed = tiny_model.run_with_hooks(images, fwd_hooks=[(RESID1, zero_ablate(positions=[0, 5]))])
    scaled = tiny_model.run_with_hooks(images, fwd_hooks=[(RESID1, scale(0.0, positions=[0, 5]))])
    assert torch.equal(zeroed, scaled)
    assert (zeroed - tiny_model(images)).abs().max() > 1e-3
    assert torch.equal(tiny_model.run_with_hooks(images, fwd_hooks=[(RESID1, scale(1.0))]), tiny_model(images))


def test_scale_per_neuron_per_head_and_per_token(tiny_model, images):
    post, pattern = "blocks.0.mlp.hook_post", "blocks.2.attn.hook_pattern"
    names = [post, Z1, RESID1, pattern]
    _, clean = tiny_model.run_with_cache(images, names_filter=names)
    hooks = [
        (post, scale(torch.tensor([2.0, -3.0]), neurons=[5, 0])),
        (Z1, scale(torch.tensor([[0.5], [4.0]]), heads=[3, 1])),  # one factor per selected head
        (RESID1, scale(torch.tensor([[2.0], [0.0]]), positions=[1, 7])),  # one factor per selected token
        (pattern, scale(0.0, heads=2, positions=0, keys=patch_region(tiny_model, rows=0))),
    ]
    _, cache = tiny_model.run_with_cache(images, fwd_hooks=hooks, names_filter=names)

    expected = clean[post].clone()
    expected[..., 5] *= 2.0
    expected[..., 0] *= -3.0
    assert torch.equal(cache[post], expected)
    # Layer 1's input changed (layer 0's MLP was scaled), so compare against its own unscaled z.
    z = cache[Z1]
    _, unscaled = tiny_model.run_with_cache(images, fwd_hooks=hooks[:1], names_filter=[Z1, RESID1, pattern])
    expected = unscaled[Z1].clone()
    expected[:, :, 3] *= 0.5
    expected[:, :, 1] *= 4.0
    assert torch.equal(z, expected)
    _, resid_input = tiny_model.run_with_cache(images, fwd_hooks=hooks[:2], names_filter=[RESID1])
    expected = resid_input[RESID1].clone()
    expected[:, 1] *= 2.0
    expected[:, 7] = 0.0
    assert torch.equal(cache[RESID1], expected)
    keys = [3, 4, 5, 6]  # first patch row of the 4x4 grid, after CLS and two registers
    assert cache[pattern][:, 2, 0, keys].abs().max() == 0
    assert cache[pattern][:, 2, 0, [0, 1, 2, 7]].abs().min() > 0
    assert cache[pattern][:, [0, 1, 3], 0][..., keys].abs().min() > 0
    assert cache[pattern][:, 2, 1:][..., keys].abs().min() > 0


def test_replace_sets_the_selected_tokens(tiny_model, images):
    value = torch.arange(tiny_model.cfg.d_model, dtype=torch.float32)
    _, cache = tiny_model.run_with_cache(images, fwd_hooks=[(RESID1, replace(value, positions=[0, -1]))],
                                         names_filter=RESID1)
    _, clean = tiny_model.run_with_cache(images, names_filter=RESID1)
    for position in (0, tiny_model.cfg.n_ctx - 1):
        assert torch.equal(cache[RESID1][:, position], value.expand(len(images), -1))
    assert torch.equal(cache[RESID1][:, 1:-1], clean[RESID1][:, 1:-1])


# ---------------------------------------------------------------------------------------------- mean ablation


def test_mean_ablating_a_middle_hook_gives_every_image_the_mean(tiny_model, dataset):
    stats = compute_hook_statistics(tiny_model, dataset, [RESID1], progress=False)
    mean = stats.mean(RESID1).float()
    region = patch_region(tiny_model, rows=slice(1, 3), cols=slice(1, 3))
    for images in dataset:
        _, cache = tiny_model.run_with_cache(images, fwd_hooks=[(RESID1, mean_ablate(stats))], names_filter=RESID1)
        assert torch.equal(cache[RESID1], mean.expand(len(images), -1, -1))
        _, partial = tiny_model.run_with_cache(images, fwd_hooks=[(RESID1, mean_ablate(stats, positions=region))],
                                               names_filter=RESID1)
        _, clean = tiny_model.run_with_cache(images, names_filter=RESID1)
        others = [p for p in range(tiny_model.cfg.n_ctx) if p not in region]
        assert torch.equal(partial[RESID1][:, region], mean[region].expand(len(images), -1, -1))
        assert torch.equal(partial[RESID1][:, others], clean[RESID1][:, others])


def test_mean_ablating_before_a_linear_readout_leaves_the_mean_output_unchanged(tiny_model, dataset):
    """hook_pooled feeds the projection only: the mean over the data of the ablated outputs is the clean mean."""
    stats = compute_hook_statistics(tiny_model, dataset, ["hook_pooled"], progress=False)
    clean = torch.cat([tiny_model(images) for images in dataset])
    ablated = torch.cat([tiny_model.run_with_hooks(images, fwd_hooks=[("hook_pooled", mean_ablate(stats))])
                         for images in dataset])
    torch.testing.assert_close(ablated.double().mean(0), clean.double().mean(0), atol=1e-6, rtol=1e-6)
    assert (ablated - clean).abs().max() > 1e-2  # each image's output did change
    assert (ablated - ablated[0]).abs().max() < 1e-6


def test_mean_ablate_takes_pooled_means_and_plain_tensors(tiny_model, dataset):
    pooled = compute_hook_statistics(tiny_model, dataset, [Z1], per_position=False, progress=False)
    mean = pooled.mean(Z1).float()  # [1, head, d_head]
    _, cache = tiny_model.run_with_cache(dataset[0], fwd_hooks=[(Z1, mean_ablate(pooled, heads=2))], names_filter=Z1)
    assert torch.equal(cache[Z1][:, :, 2], mean[:, 2].expand(len(dataset[0]), tiny_model.cfg.n_ctx, -1))
    _, again = tiny_model.run_with_cache(dataset[0], fwd_hooks=[(Z1, mean_ablate(mean, heads=2))], names_filter=Z1)
    assert torch.equal(again[Z1], cache[Z1])


# ---------------------------------------------------------------------------------------------- patching and resampling


@pytest.mark.parametrize("batch", [1, 2])
def test_patching_every_position_from_the_clean_cache_reproduces_the_clean_output(tiny_model, batch):
    clean_images, corrupted_images = random_images(batch, 20), random_images(batch, 21)
    name = "blocks.0.hook_resid_pre"
    clean_out, clean = tiny_model.run_with_cache(clean_images, names_filter=name)
    corrupted_out = tiny_model(corrupted_images)
    patched = tiny_model.run_with_hooks(corrupted_images, fwd_hooks=[(name, patch_from_cache(clean))])
    assert (patched - clean_out).abs().max() <= 1e-6
    assert (corrupted_out - clean_out).abs().max() > 1e-2
    one = tiny_model.run_with_hooks(corrupted_images, fwd_hooks=[(name, patch_from_cache(clean, positions=0))])
    assert (one - clean_out).abs().max() > 1e-3  # the patches still come from the corrupted images


def test_patch_from_a_single_image_cache_copies_it_to_every_image(tiny_model, images):
    _, clean = tiny_model.run_with_cache(images[:1], names_filter=RESID1)
    _, cache = tiny_model.run_with_cache(images, fwd_hooks=[(RESID1, patch_from_cache(clean, positions=[2, 3]))],
                                         names_filter=RESID1)
    assert torch.equal(cache[RESID1][:, [2, 3]], clean[RESID1][:, [2, 3]].expand(len(images), -1, -1))


def test_resample_ablate_with_the_identity_permutation_is_a_no_op(tiny_model, images):
    _, clean = tiny_model.run_with_cache(images, names_filter=Z1)
    hook = resample_ablate(clean[Z1], permutation=[0, 1])
    assert torch.equal(tiny_model.run_with_hooks(images, fwd_hooks=[(Z1, hook)]), tiny_model(images))


def test_resample_ablate_takes_other_images_rows(tiny_model):
    images, source_images = random_images(3, 30), random_images(5, 31)
    _, own = tiny_model.run_with_cache(images, names_filter=RESID1)
    _, source = tiny_model.run_with_cache(source_images, names_filter=RESID1)

    swapped = resample_ablate(own[RESID1], positions=0)  # within the batch: never an item's own row
    _, cache = tiny_model.run_with_cache(images, fwd_hooks=[(RESID1, swapped)], names_filter=RESID1)
    cls, own_cls = cache[RESID1][:, 0], own[RESID1][:, 0]
    rows = [int(((own_cls - row).abs().amax(-1) == 0).nonzero()) for row in cls]
    assert all(row != i for i, row in enumerate(rows)), rows
    assert torch.equal(cache[RESID1][:, 1:], own[RESID1][:, 1:])

    first = tiny_model.run_with_hooks(images, fwd_hooks=[(RESID1, resample_ablate(source[RESID1], seed=7))])
    second = tiny_model.run_with_hooks(images, fwd_hooks=[(RESID1, resample_ablate(source[RESID1], seed=7))])
    assert torch.equal(first, second)  # seeded
    _, cache = tiny_model.run_with_cache(images, fwd_hooks=[(RESID1, resample_ablate(source[RESID1], seed=7))],
                                         names_filter=RESID1)
    for resampled in cache[RESID1]:
        assert any(torch.equal(resampled, row) for row in source[RESID1])


# ---------------------------------------------------------------------------------------------- positions


def test_patch_region_follows_the_patch_grid(tiny_model, images):
    cfg = tiny_model.cfg
    assert cfg.grid_size == (4, 4) and cfg.n_prefix_tokens == 3
    assert prefix_positions(tiny_model) == [0, 1, 2]
    assert patch_positions(cfg) == list(range(3, 19))
    assert patch_region(cfg, rows=slice(1, 3), cols=slice(0, 2)) == [3 + 4, 3 + 5, 3 + 8, 3 + 9]
    assert patch_region(tiny_model, rows=-1, cols=2) == [3 + 14]
    assert patch_region(cfg, rows=0, cols=slice(None), grid_size=(2, 3)) == [3, 4, 5]

    region = patch_region(tiny_model, rows=slice(1, 3), cols=slice(2, 4))
    _, cache = tiny_model.run_with_cache(images, fwd_hooks=[(RESID1, zero_ablate(positions=region))],
                                         names_filter=RESID1)
    grid = cache.to_patch_grid(RESID1)  # [batch, rows, cols, d]
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[1:3, 2:4] = True
    assert grid[:, inside].abs().max() == 0
    assert grid[:, ~inside].abs().min() > 0
    assert cache.prefix_tokens(RESID1).abs().min() > 0


def test_bool_masks_and_tensors_select_positions(tiny_model, images):
    mask = torch.zeros(tiny_model.cfg.n_ctx, dtype=torch.bool)
    mask[[0, 4]] = True
    by_mask = tiny_model.run_with_hooks(images, fwd_hooks=[(RESID1, zero_ablate(positions=mask))])
    by_tensor = tiny_model.run_with_hooks(images, fwd_hooks=[(RESID1, zero_ablate(positions=torch.tensor([4, 0])))])
    by_list = tiny_model.run_with_hooks(images, fwd_hooks=[(RESID1, zero_ablate(positions=[0, 4]))])
    assert torch.equal(by_mask, by_list) and torch.equal(by_tensor, by_list)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "hook_name, factory, message",
    [
        (RESID1, zero_ablate(heads=1), "has no head axis"),
        (Z1, zero_ablate(heads=[4]), r"\[4\] out of range; valid indices are 0 to 3"),
        (RESID1, zero_ablate(positions=19), r"\[19\] out of range"),
        (Z1, zero_ablate(keys=[0]), "has no key axis"),
        (RESID1, zero_ablate(neurons=[0]), "has no neuron axis"),
        ("hook_image_embed", zero_ablate(positions=0), "has no token axis"),
        (RESID1, zero_ablate(positions=torch.ones(5, dtype=torch.bool)), "bool mask must have 19 entries"),
        (RESID1, zero_ablate(positions=[1, 1]), "twice"),
        (RESID1, zero_ablate(positions=slice(50, None)), "selects nothing"),
        (RESID1, scale(torch.ones(3), positions=[0, 1]), "does not broadcast to the selected slice"),
        (RESID1, mean_ablate(torch.zeros(5, 32)), r"does not broadcast to its activation \(2, 19, 32\)"),
        (Z1, patch_from_cache({}), "cache has no 'blocks.1.attn.hook_z'"),
        (Z1, resample_ablate(torch.zeros(3, 19, 4, 8), permutation=[0]), "permutation has 1 entries"),
    ],
)
def test_bad_selections_raise_directed_errors(tiny_model, hook_name, factory, message):
    with pytest.raises((ValueError, KeyError), match=message):
        tiny_model.run_with_hooks(random_images(2, 40), fwd_hooks=[(hook_name, factory)])


def test_resampling_one_image_from_itself_is_refused(tiny_model):
    with pytest.raises(ValueError, match="single source image for a single image"):
        tiny_model.run_with_hooks(random_images(1, 41), fwd_hooks=[(Z1, resample_ablate(torch.zeros(1, 19, 4, 8)))])


def test_bad_arguments_are_refused_when_the_hook_is_made(tiny_model):
    with pytest.raises(TypeError, match="positions= takes an int"):
        zero_ablate(positions="cls")
    with pytest.raises(TypeError, match="heads= takes an int"):
        zero_ablate(heads=1.0)
    with pytest.raises(ValueError, match=r"\[n_layers, n_heads\]"):
        mask_heads(torch.ones(4))
    with pytest.raises(ValueError, match="rows outside 0..1"):
        resample_ablate(torch.zeros(2, 19, 32), permutation=[0, 2])
    with pytest.raises(TypeError, match="HookStatistics .* or a tensor"):
        mean_ablate([0.0])
    with pytest.raises(ValueError, match="outside the 4x4 patch grid"):
        patch_region(tiny_model, rows=4)
    with pytest.raises(ValueError, match=r"layer must be an int in \[-3, 2\]"):
        average_layer_output(tiny_model, 3, torch.zeros(32))
    with pytest.raises(KeyError, match="needs the mean of 'blocks.1.hook_resid_pre' or 'blocks.0.hook_resid_post'"):
        average_residual_connection(tiny_model, 1, compute_hook_statistics(
            tiny_model, [random_images(1, 0)], [RESID1], progress=False))


def test_mean_ablate_with_statistics_of_another_hook_names_the_fix(tiny_model, images):
    stats = compute_hook_statistics(tiny_model, [images], [RESID1], progress=False)
    with pytest.raises(KeyError, match=r"compute_hook_statistics\(model, data, \['blocks.1.attn.hook_z'"):
        tiny_model.run_with_hooks(images, fwd_hooks=[(Z1, mean_ablate(stats))])


# ---------------------------------------------------------------------------------------------- "Peeling Back the Layers"


def test_average_layer_output_with_the_image_own_mean_reproduces_its_output(tiny_model):
    image, others = random_images(1, 50), random_images(4, 51)
    last = tiny_model.cfg.n_layers - 1
    own = compute_hook_statistics(tiny_model, [image], [f"blocks.{last}.hook_resid_post"], progress=False)
    hooks = average_layer_output(tiny_model, -1, own)
    assert [name for name, _ in hooks] == [f"blocks.{last}.hook_resid_post"]
    assert (tiny_model.run_with_hooks(image, fwd_hooks=hooks) - tiny_model(image)).abs().max() <= 1e-6

    dataset = compute_hook_statistics(tiny_model, [others], [f"blocks.{last}.hook_resid_post"], progress=False)
    changed = tiny_model.run_with_hooks(image, fwd_hooks=average_layer_output(tiny_model, last, dataset))
    assert (changed - tiny_model(image)).abs().max() > 1e-2


def test_average_attention_input_feeds_the_attention_the_normalised_mean(tiny_model):
    images, layer = random_images(3, 60), 1
    stats = compute_hook_statistics(tiny_model, [images], [f"blocks.{layer - 1}.hook_resid_post",
                                                           f"blocks.{layer}.ln1.hook_normalized"], progress=False)
    names = [f"blocks.{layer}.{n}" for n in ("ln1.hook_normalized", "hook_attn_out", "hook_resid_pre",
                                              "hook_resid_mid")]
    out, cache = tiny_model.run_with_cache(images, fwd_hooks=average_attention_input(tiny_model, layer, stats),
                                           names_filter=names)
    ln1 = tiny_model.blocks[layer].ln1
    mean_resid = stats.mean(f"blocks.{layer - 1}.hook_resid_post").float()
    expected = torch.nn.functional.layer_norm(mean_resid, (32,), ln1.w, ln1.b, ln1.eps)
    assert torch.equal(cache[names[0]], expected.expand(3, -1, -1))
    attn_out = cache[names[1]]
    # Every image's attention read the same input (BLAS may round the rows apart).
    assert (attn_out - attn_out[0]).abs().max() < 1e-6
    torch.testing.assert_close(cache[names[3]], cache[names[2]] + attn_out)  # the skip connection is the image's own
    assert (out - tiny_model(images)).abs().max() > 1e-2

    normalized = average_attention_input(tiny_model, layer, stats, average_of="normalized")
    _, cache = tiny_model.run_with_cache(images, fwd_hooks=normalized, names_filter=names[0])
    assert torch.equal(cache[names[0]], stats.mean(names[0]).float().expand(3, -1, -1))
    assert not torch.allclose(cache[names[0]][0], expected, atol=1e-3)  # LayerNorm is not linear

    own = compute_hook_statistics(tiny_model, [images[:1]], [f"blocks.{layer}.hook_resid_pre"], progress=False)
    same = tiny_model.run_with_hooks(images[:1], fwd_hooks=average_attention_input(tiny_model, layer, own))
    assert (same - tiny_model(images[:1])).abs().max() <= 1e-5


def test_average_residual_connection_replaces_only_the_skip_path(tiny_model):
    images, layer = random_images(3, 70), 2
    stats = compute_hook_statistics(tiny_model, [images], [f"blocks.{layer}.hook_resid_pre"], progress=False)
    hooks = average_residual_connection(tiny_model, layer, stats)
    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_resid_mid"]
    out, cache = tiny_model.run_with_cache(images, fwd_hooks=hooks, names_filter=names)
    _, clean = tiny_model.run_with_cache(images, names_filter=names)
    mean = stats.mean(names[0]).float()
    assert torch.equal(cache[names[1]], clean[names[1]])  # the attention still reads the image
    torch.testing.assert_close(cache[names[2]] - cache[names[1]], mean.expand(3, -1, -1), atol=1e-6, rtol=0)
    assert (out - tiny_model(images)).abs().max() > 1e-2

    own = compute_hook_statistics(tiny_model, [images[:1]], [names[0]], progress=False)
    same = tiny_model.run_with_hooks(images[:1], fwd_hooks=average_residual_connection(tiny_model, layer, own))
    assert (same - tiny_model(images[:1])).abs().max() <= 1e-5
    with pytest.raises(RuntimeError, match="without its partner"):
        tiny_model.run_with_hooks(images, fwd_hooks=hooks[1:])


def test_hooks_work_on_a_model_with_other_prefix_tokens(images):
    """A DeiT-like model: distillation token, no registers, final LayerNorm after pooling, a classifier head."""
    model = HookedViT(tiny_config(distillation_token=True, n_registers=0, ln_pre=False, d_proj=None, n_classes=5,
                                  pool_type="token_dist", final_norm="post_pool")).init_weights(seed=0).eval()
    assert prefix_positions(model) == [0, 1] and patch_region(model, rows=0, cols=0) == [2]
    stats = compute_hook_statistics(model, [images], ["ln_final.hook_normalized", "hook_pooled"], progress=False)
    assert stats.mean("ln_final.hook_normalized").shape == (2, 32)  # after pooling: the CLS and distillation rows
    out = model.run_with_hooks(images, fwd_hooks=[("ln_final.hook_normalized", mean_ablate(stats))])
    assert (out - out[0]).abs().max() < 1e-6
