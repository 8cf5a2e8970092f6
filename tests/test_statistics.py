"""Dataset statistics: streamed means and variances equal torch's over the concatenated data."""

import pytest
import torch

from vit_lens.intervene.statistics import HookStatistics, compute_hook_statistics

NAMES = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern", "hook_image_embed"]
# The axis each hook's statistics pool over with per_position=False (besides the batch axis).
TOKEN_AXIS = {"blocks.0.hook_resid_post": 1, "blocks.1.attn.hook_z": 1, "blocks.1.attn.hook_pattern": 2,
              "hook_image_embed": None}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture
def batches() -> list[torch.Tensor]:
    """Uneven batches: a streamed result must not depend on where the data is split."""
    return [torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n)) for n in (3, 1, 4, 2)]


def concatenated(model, batches, name) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.run_with_cache(images, names_filter=name)[1][name] for images in batches]).double()


def reference(activations: torch.Tensor, token_axis: int | None, per_position: bool, correction: int = 1):
    """torch's mean and variance over the batch axis (and the token axis, kept with size 1, when pooled)."""
    dims = (0,) if per_position or token_axis is None else (0, token_axis)
    mean = activations.mean(dims, keepdim=True)[0]
    return mean, activations.var(dims, keepdim=True, correction=correction)[0]


@pytest.mark.parametrize("per_position", [True, False])
def test_streamed_statistics_equal_torch_over_the_concatenated_data(tiny_model, batches, per_position):
    # (images, labels) tuples, as a DataLoader over a labelled dataset yields them
    data = [(images, torch.zeros(len(images))) for images in batches]
    stats = compute_hook_statistics(tiny_model, data, NAMES, variance=True, per_position=per_position, progress=False)
    assert sorted(stats.names) == sorted(NAMES) and stats.per_position is per_position
    for name in NAMES:
        activations = concatenated(tiny_model, batches, name)
        mean, var = reference(activations, TOKEN_AXIS[name], per_position)
        assert stats.mean(name).dtype == torch.float64
        assert stats.mean(name).shape == mean.shape, name
        torch.testing.assert_close(stats.mean(name), mean, atol=1e-6, rtol=1e-6, msg=name)
        torch.testing.assert_close(stats[name], mean, atol=1e-6, rtol=1e-6, msg=name)
        torch.testing.assert_close(stats.var(name), var, atol=1e-6, rtol=1e-6, msg=name)
        _, population_var = reference(activations, TOKEN_AXIS[name], per_position, correction=0)
        torch.testing.assert_close(stats.var(name, correction=0), population_var, atol=1e-6, rtol=1e-6, msg=name)
        pooled = not per_position and TOKEN_AXIS[name] is not None
        assert stats.count(name) == 10 * (activations.shape[TOKEN_AXIS[name]] if pooled else 1)


def test_pooled_means_keep_a_size_one_token_axis_that_broadcasts(tiny_model, batches):
    stats = compute_hook_statistics(tiny_model, batches, NAMES, per_position=False, progress=False)
    cfg = tiny_model.cfg
    assert stats.mean("blocks.0.hook_resid_post").shape == (1, cfg.d_model)
    assert stats.mean("blocks.1.attn.hook_z").shape == (1, cfg.n_heads, cfg.d_head)
    assert stats.mean("blocks.1.attn.hook_pattern").shape == (cfg.n_heads, 1, cfg.n_ctx)
    assert stats.mean("hook_image_embed").shape == (cfg.d_proj,)


def test_chan_merge_is_stable_for_a_large_offset():
    """At an offset of 1e9 a float64 sum of squares loses a unit variance; the pairwise merge does not."""
    data = 1e9 + torch.randn(1000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = HookStatistics(variance=True)
    for chunk in data.split([1, 7, 500, 2, 490]):
        stats.update("hook_pooled", chunk)
    torch.testing.assert_close(stats.mean("hook_pooled"), data.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.var("hook_pooled"), data.var(0), atol=1e-6, rtol=1e-6)
    naive = (data.square().sum(0) - data.sum(0).square() / len(data)) / (len(data) - 1)
    assert (naive - data.var(0)).abs().max() > 1e-2  # the test would catch the naive formula


def test_only_the_needed_blocks_run_and_max_batches_stops_early(tiny_model, batches):
    ran = []
    record = [(lambda name: name.endswith("hook_resid_post"), lambda activation, hook: ran.append((hook.name,
                                                                                                  len(activation))))]
    stream = iter(batches)
    with tiny_model.hooks(fwd_hooks=record):
        stats = compute_hook_statistics(tiny_model, stream, ["blocks.0.hook_resid_post"], max_batches=2, progress=False)
    # blocks 1 and 2 never ran; forwards: the shift (the first image), the runner's one-image probe of the hooks,
    # then the two batches (3 + 1 images, in batches of the first one's size)
    assert ran == [("blocks.0.hook_resid_post", n) for n in (1, 1, 3, 1)]
    assert stats.count("blocks.0.hook_resid_post") == 4
    assert next(stream) is batches[2]  # the third batch was never taken from the stream


def test_filter_function_and_progress_bar(tiny_model, batches, capsys):
    stats = compute_hook_statistics(tiny_model, batches, lambda name: name.endswith("ln1.hook_scale"), progress=True)
    assert stats.names == [f"blocks.{l}.ln1.hook_scale" for l in range(tiny_model.cfg.n_layers)]
    assert "hook statistics" in capsys.readouterr().err


def test_save_and_load_round_trip(tiny_model, batches, tmp_path):
    stats = compute_hook_statistics(tiny_model, batches[:2], NAMES, variance=True, per_position=False, progress=False)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = HookStatistics.load(path)
    assert loaded.names == stats.names and loaded.per_position is False and loaded.variance is True
    for name in NAMES:
        assert loaded.count(name) == stats.count(name)
        assert torch.equal(loaded.mean(name), stats.mean(name))
        assert torch.equal(loaded.var(name), stats.var(name))
    # A loaded file keeps accumulating: two halves equal the whole.
    with torch.no_grad():
        for images in batches[2:]:
            for name, activation in tiny_model.run_with_cache(images, names_filter=NAMES)[1].items():
                loaded.update(name, activation)
    # the same forwards (batches of 3 and 1 in the pass, then 4 and 2, caching all of NAMES: without hook_pattern
    # cached, attention takes the fused kernel, which rounds differently): torch over them, to float64 rounding
    with torch.no_grad():
        caches = [tiny_model.run_with_cache(images, names_filter=NAMES)[1] for images in batches]
    for name in NAMES:
        activations = torch.cat([cache[name] for cache in caches]).double()
        mean, var = reference(activations, TOKEN_AXIS[name], per_position=False)
        torch.testing.assert_close(loaded.mean(name), mean, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(loaded.var(name), var, atol=1e-9, rtol=1e-9)


def test_mistakes_raise_directed_errors(tiny_model, batches, tmp_path):
    stats = compute_hook_statistics(tiny_model, batches[:1], ["hook_image_embed"], progress=False)
    with pytest.raises(ValueError, match="without variances; pass variance=True"):
        stats.var("hook_image_embed")
    with pytest.raises(KeyError, match=r"No statistics for 'hook_pooled'.*\['hook_image_embed'\]"):
        stats.mean("hook_pooled")
    with pytest.raises(ValueError, match="no hook point named 'blocks.9.hook_resid_post'"):
        compute_hook_statistics(tiny_model, batches, ["blocks.9.hook_resid_post"], progress=False)
    with pytest.raises(ValueError, match="got no batches"):
        compute_hook_statistics(tiny_model, [], ["hook_image_embed"], progress=False)
    with pytest.raises(TypeError, match="got a dict"):
        compute_hook_statistics(tiny_model, [{"pixel_values": batches[0]}], ["hook_image_embed"], progress=False)
    stats.update("blocks.0.hook_resid_post", torch.zeros(2, 19, 32))
    with pytest.raises(ValueError, match=r"had shape \(19, 32\).*\(10, 32\) now"):
        stats.update("blocks.0.hook_resid_post", torch.zeros(2, 10, 32))
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not a file written by HookStatistics.save"):
        HookStatistics.load(other)


def test_a_name_listed_twice_is_counted_once_and_integer_images_are_refused(tiny_model, batches):
    stats = compute_hook_statistics(tiny_model, batches[:1], ["hook_pooled", "hook_pooled"], progress=False)
    assert stats.count("hook_pooled") == 3
    with pytest.raises(TypeError, match="takes float images"):
        compute_hook_statistics(tiny_model, [torch.zeros(1, 3, 32, 32, dtype=torch.uint8)], ["hook_pooled"],
                                progress=False)


@pytest.mark.parametrize("per_position", [True, False])
def test_statistics_through_the_dataset_runner_equal_the_in_memory_pass_and_resume(tiny_model, batches, tmp_path,
                                                                                   per_position):
    # batches of the first one's size (the runner cuts larger ones to it), with a large offset: the shifted sums keep
    # the variance's digits
    offset = [300.0 + torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n)) for n in (4, 4, 2)]
    in_memory = compute_hook_statistics(tiny_model, offset, NAMES, variance=True, per_position=per_position,
                                        progress=False)
    run = compute_hook_statistics(tiny_model, offset, NAMES, variance=True, per_position=per_position, progress=False,
                                  out_dir=tmp_path / "run")
    assert run.names == in_memory.names and (tmp_path / "run" / "manifest.json").is_file()
    for name in NAMES:
        assert run.count(name) == in_memory.count(name)
        assert run.mean(name).shape == in_memory.mean(name).shape and run.mean(name).dtype == torch.float64
        torch.testing.assert_close(run.mean(name), in_memory.mean(name), rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(run.var(name), in_memory.var(name), rtol=1e-9, atol=1e-12, msg=name)
    shard = tmp_path / "run" / "shard_000000.safetensors"
    written = shard.stat().st_ino
    again = compute_hook_statistics(tiny_model, offset, NAMES, variance=True, per_position=per_position,
                                    progress=False, out_dir=tmp_path / "run")
    assert shard.stat().st_ino == written  # resumed: the finished shard was kept
    torch.testing.assert_close(again.var(NAMES[0]), run.var(NAMES[0]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="other settings"):
        compute_hook_statistics(tiny_model, offset, NAMES[:1], progress=False, out_dir=tmp_path / "run")
    first_two = compute_hook_statistics(tiny_model, batches, lambda n: n.endswith("hook_resid_post"), max_batches=2,
                                        progress=False, out_dir=tmp_path / "filtered")
    expected = compute_hook_statistics(tiny_model, batches[:2], lambda n: n.endswith("hook_resid_post"),
                                       progress=False)
    assert first_two.names == expected.names and first_two.count(expected.names[-1]) == 4
    torch.testing.assert_close(first_two.mean(expected.names[-1]), expected.mean(expected.names[-1]), rtol=1e-12,
                               atol=1e-12)
