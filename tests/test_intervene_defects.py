"""Bad input to the intervention layer: out-of-range layers, misshapen head masks, stores resumed or read wrongly.

Each test here failed before its fix with a silently wrong result (pruning wrapped layers modulo
the depth, a short head mask left layers unmasked, a resumed store skipped a batch or mixed two
models, a short shard read as complete) or an unclear error (numpy's mmap message, a raw
JSONDecodeError, ``'int' object is not iterable``, an IndexError).
"""

import json

import numpy as np
import pytest
import torch

import vit_lens
from vit_lens.intervene import interventions as iv
from vit_lens.intervene.decompose import direct_contributions, required_hooks
from vit_lens.intervene.pruning import head_scores, prune_heads
from vit_lens.intervene.store import ContributionStore, compute_contributions_to_disk, weights_fingerprint
from vit_lens import featureviz as fv
from vit_lens.intervene._validate import check_index, check_indices
from vit_lens.toy import ToyWorld


def issue_model(n_layers=2, seed=0):
    """The issue's two-layer model."""
    cfg = vit_lens.ViTConfig(d_model=32, n_layers=n_layers, n_heads=4, d_head=8, d_mlp=64, patch_size=8, image_size=32,
                             ln_pre=True, d_proj=16)
    return vit_lens.HookedViT(cfg).init_weights(seed=seed).eval()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return issue_model()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 32, 32, generator=generator) for _ in range(7)]


def ccd(model, data, directory, **kwargs):
    return compute_contributions_to_disk(model, data, directory, level="head", shard_batches=2, progress=False, **kwargs)


def in_memory(model, data, level="head"):
    with torch.no_grad():
        return torch.cat([direct_contributions(model, model.run_with_cache(images)[1], level=level).values
                          for images in data])


# ---------------------------------------------------------------------------------------------- defect 3: layers


def test_prune_heads_refuses_layers_past_the_depth_instead_of_wrapping_them():
    clip = vit_lens.load_toy_clip()  # 4 layers: layers 10 and 11 used to come back as [2, 3]
    sample = ToyWorld(seed=2).sample(16).images
    with pytest.raises(ValueError, match=r"prune_heads: layers \[10, 11\] out of range; the model has 4 layers, "
                                         r"so valid layers are 0 to 3 \(or -4 to -1"):
        prune_heads(clip, sample, layers=[10, 11], n_prune=1)


def test_head_scores_validate_layers_and_report_negative_ones_counted_from_the_start(model, x):
    with pytest.raises(ValueError, match=r"head_scores: layers \[2\] out of range; the model has 2 layers"):
        head_scores(model, x, layers=[2])
    with pytest.raises(ValueError, match=r"head_scores: layers \[-3\] out of range"):
        head_scores(model, x, layers=[-3])
    with pytest.raises(ValueError, match="head_scores: layers= selects nothing"):
        head_scores(model, x, layers=[])
    last = head_scores(model, x, layers=-1)  # an int, negative: the last layer, reported as layer 1
    assert torch.isnan(last[0]).all() and not torch.isnan(last[1]).any()
    torch.testing.assert_close(last[1], head_scores(model, x, layers=[1])[1])
    # the same layer named twice is scored once (it used to be added twice into one average)
    torch.testing.assert_close(head_scores(model, x, layers=[1, -1]), last, equal_nan=True)
    pruning = prune_heads(model, x, layers=[-1, 1], n_prune=1)
    assert pruning.layers == [1] and int(pruning.pruned[1].sum()) == 1 and not pruning.pruned[0].any()
    with pytest.raises(ValueError, match=r"n_prune must be in \[0, 3\] for 4 heads, got True"):
        prune_heads(model, x, n_prune=True)


def test_direct_contributions_takes_one_int_layer_and_validates_it(model, x):
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    one = direct_contributions(model, cache, level="head", layers=1)  # used to be "'int' object is not iterable"
    listed = direct_contributions(model, cache, level="head", layers=[1])
    assert one.labels == listed.labels == ["embed", "L0ATTN", "L0MLP", "L1H0", "L1H1", "L1H2", "L1H3", "L1MLP", "bias"]
    torch.testing.assert_close(one.values, listed.values)
    torch.testing.assert_close(direct_contributions(model, cache, level="head", layers=-1).values, listed.values)
    with pytest.raises(ValueError, match=r"direct_contributions: layers \[5\] out of range; .*valid layers are 0 to 1"):
        direct_contributions(model, cache, level="head", layers=5)
    # required_hooks reads a negative layer as direct_contributions does: the cache it names is enough
    assert "blocks.1.attn.hook_z" in required_hooks(model, "head", -1)
    _, small = model.run_with_cache(x, names_filter=required_hooks(model, "head", [-1]))
    torch.testing.assert_close(direct_contributions(model, small, level="head", layers=[-1]).values, listed.values)


def test_the_shared_validator_names_the_value_and_the_valid_range():
    assert check_indices(None, 3, "layers", "f") == [0, 1, 2]
    assert check_indices(torch.tensor([-1, 0, 2]), 3, "layers", "f") == [0, 2]
    assert check_indices(torch.tensor(1), 3, "layers", "f") == [1]
    assert check_index(-3, 3, "layer", "f") == 0
    with pytest.raises(TypeError, match=r"f: layers takes ints, got 0.5; the model has 3 layers"):
        check_indices([0.5], 3, "layers", "f")
    with pytest.raises(TypeError, match="f: heads takes ints, got True"):
        check_indices([True], 4, "heads", "f")
    with pytest.raises(ValueError, match=r"f: head 4 is out of range; the model has 4 heads, so valid heads are 0 to 3"):
        check_index(4, 4, "head", "f")
    with pytest.raises(ValueError, match=r"f: layers= takes a 1-d sequence of indices, got shape \(2, 2\)"):
        check_indices(torch.zeros(2, 2, dtype=torch.long), 3, "layers", "f")


# ---------------------------------------------------------------------------------------------- defect 4: head masks


def test_a_head_mask_with_too_few_layers_raises_when_its_hooks_run(model, x):
    with pytest.raises(ValueError, match=r"mask of shape \(1, 4\) \(one row per layer\), but the model has 2 layers of 4 "
                                         r"heads: 'blocks.1.attn.hook_z' has no row .* \[2, 4\] mask"):
        model.run_with_hooks(x, fwd_hooks=iv.mask_heads(torch.zeros(1, 4)))
    assert not any(point.fwd_hooks for point in model.hook_dict.values())  # nothing left attached


def test_a_head_mask_with_another_shape_raises_naming_both(model, x):
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3\), one column per head, but 'blocks.0.attn.hook_z' has 4"):
        model.run_with_hooks(x, fwd_hooks=iv.mask_heads(torch.zeros(2, 3)))
    with pytest.raises(ValueError, match=r"no hook point named 'blocks.2.attn.hook_z'. The model has 2 blocks"):
        model.run_with_hooks(x, fwd_hooks=iv.mask_heads(torch.zeros(3, 4)))
    with pytest.raises(ValueError, match=r"mask of shape \(1, 4\), but custom has 2 layers of 4 heads; give a "
                                         r"\[n_layers, n_heads\] = \[2, 4\] mask"):
        iv.mask_heads(torch.zeros(1, 4), model)


def test_a_well_shaped_mask_masks_every_layer_and_its_hooks_can_be_reused(model, x):
    mask = torch.ones(2, 4)
    mask[1, 2] = 0.0
    with torch.no_grad():
        expected = model.run_with_hooks(x, fwd_hooks=[("blocks.1.attn.hook_z", iv.zero_ablate(heads=2))])
        hooks = iv.mask_heads(mask)
        for _ in range(2):
            torch.testing.assert_close(model.run_with_hooks(x, fwd_hooks=hooks), expected, rtol=0, atol=0)
        with_model = iv.mask_heads(mask, model)
        assert [name for name, _ in with_model] == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
        torch.testing.assert_close(model.run_with_hooks(x, fwd_hooks=with_model), expected, rtol=0, atol=0)
        # the same hooks on a deeper model: the check counts that model's layers, not the first one's
        with pytest.raises(ValueError, match=r"the model has 3 layers of 4 heads: 'blocks.2.attn.hook_z' has no row"):
            issue_model(n_layers=3).run_with_hooks(x, fwd_hooks=hooks)


def test_patch_region_checks_grid_size(model):
    assert iv.patch_region(model, rows=1, grid_size=(2, 3)) == [4, 5, 6]
    with pytest.raises(ValueError, match=r"grid_size= takes \(rows, cols\) of the patch grid, two positive ints such "
                                         r"as \(4, 4\), got \(0, 3\)"):
        iv.patch_region(model, grid_size=(0, 3))


# ---------------------------------------------------------------------------------------------- defects 5-7: stores


def test_a_store_resumed_after_a_short_final_shard_skips_exactly_what_it_holds(model, data, tmp_path):
    ccd(model, data[:3], tmp_path / "s")  # shards of 2 and 1 batches
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [s["n_images"] for s in manifest["shards"]] == [4, 2] and manifest["shard_size"] == 4
    first = (tmp_path / "s" / "shard_000000.safetensors").stat().st_ino
    store = ccd(model, data, tmp_path / "s")
    assert len(store) == 14  # it was 12: the fourth batch was skipped
    torch.testing.assert_close(store[:], in_memory(model, data))
    assert (tmp_path / "s" / "shard_000000.safetensors").stat().st_ino == first  # the full shard was kept


def test_a_store_refuses_to_resume_with_other_weights_or_directions(model, data, tmp_path):
    ccd(model, data[:2], tmp_path / "s")
    other = issue_model(seed=1)
    assert weights_fingerprint(other) != weights_fingerprint(model) == weights_fingerprint(issue_model(seed=0))
    with pytest.raises(ValueError, match=r"holds a run of a model whose weights have fingerprint sha256:[0-9a-f]{16}"
                                         r"\.\.\., but this model's are sha256:[0-9a-f]{16}.*use another out_dir, or "
                                         r"overwrite=True"):
        ccd(other, data, tmp_path / "s")
    assert len(ContributionStore(tmp_path / "s")) == 4  # untouched
    store = ccd(other, data, tmp_path / "s", overwrite=True)
    assert len(store) == 14 and store.weights_sha256 == weights_fingerprint(other)
    torch.testing.assert_close(store[:], in_memory(other, data))

    directions = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
    compute_contributions_to_disk(model, data[:1], tmp_path / "d", directions=directions, progress=False)
    with pytest.raises(ValueError, match="'directions_sha256'"):  # same shape, other values
        compute_contributions_to_disk(model, data, tmp_path / "d", directions=directions + 1, progress=False)


def test_a_weights_fingerprint_sees_one_changed_number(model):
    before = weights_fingerprint(model)
    changed = issue_model()
    with torch.no_grad():
        changed.blocks[1].mlp.W_out[3, 5] += 1e-3
    assert weights_fingerprint(changed) != before and weights_fingerprint(model) == before


def test_a_short_shard_is_an_error_when_the_store_is_opened_and_recomputed_on_resume(model, data, tmp_path):
    directory = tmp_path / "s"
    ccd(model, data, directory)  # shards of 4, 4, 4 and 2 images
    shard = directory / "shard_000002.safetensors"
    shard.write_bytes((directory / "shard_000003.safetensors").read_bytes())  # a valid file, 2 rows where 4 belong
    with pytest.raises(ValueError, match=r"shard_000002.safetensors has \d+ bytes, its record says \d+ \(truncated or "
                                         r"replaced\).*compute_contributions_to_disk with the same arguments resumes it"):
        ContributionStore(directory)  # it used to read as a store of 12 images
    with pytest.warns(UserWarning, match="computing shard 2 again"):
        store = ccd(model, data, directory)
    assert len(store) == 14
    torch.testing.assert_close(store[:], in_memory(model, data))


def test_damaged_store_files_give_one_clear_error(model, data, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save

    directory = tmp_path / "s"
    ccd(model, data[:4], directory)
    shard = directory / "shard_000001.safetensors"
    good = shard.read_bytes()

    shard.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"shard_000001.safetensors has \d+ bytes, its record says \d+ \(truncated"):
        ContributionStore(directory)

    with safe_open(shard.with_name("shard_000000.safetensors"), "pt") as whole:  # same bytes, other shape
        values, metadata = whole.get_tensor("contributions/values"), whole.metadata()
    shard.write_bytes(save({"contributions/values": values.reshape(4, 16, 12).contiguous()}, metadata=metadata))
    assert len(shard.read_bytes()) == len(good)
    with pytest.raises(ValueError, match=r"shard_000001.safetensors holds \(4, 16, 12\) under 'contributions/values', "
                                         r"but the manifest records \(4, 12, 16\)"):
        ContributionStore(directory)

    shard.unlink()
    with pytest.raises(ValueError, match=r"shard_000001.safetensors is missing"):
        ContributionStore(directory)

    shard.write_bytes(good)
    assert len(ContributionStore(directory)) == 8
    manifest = directory / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(ValueError, match=r"manifest.json is not valid JSON \(.*overwrite=True"):
        ContributionStore(directory)
    with pytest.raises(ValueError, match="overwrite=True"):
        ccd(model, data, directory)
    (directory / "notes.txt").write_text("mine")
    assert len(ccd(model, data, directory, overwrite=True)) == 14
    assert (directory / "notes.txt").read_text() == "mine"  # overwrite deletes the store's files only


def test_a_store_in_the_format_before_the_runner_is_refused_and_overwritten(model, data, tmp_path):
    directory = tmp_path / "old"
    directory.mkdir()
    (directory / "meta.json").write_text(json.dumps({"format": "vit_lens.ContributionStore/2", "settings": {},
                                                     "shards": [{"file": "shard_00000.npy", "images": 2}],
                                                     "labels": ["embed"]}))
    np.save(directory / "shard_00000.npy", np.zeros((2, 1, 16), dtype=np.float32))
    (directory / "notes.txt").write_text("mine")
    advice = r"format before the dataset runner \(meta.json and .npy shards\).*overwrite=True"
    with pytest.raises(ValueError, match=advice):
        ContributionStore(directory)
    with pytest.raises(ValueError, match=advice):
        ccd(model, data, directory)
    store = ccd(model, data[:2], directory, overwrite=True)
    assert len(store) == 4 and sorted(p.name for p in directory.iterdir() if p.suffix in (".npy", ".json")) == [
        "manifest.json", "shard_000000.json"]
    assert (directory / "notes.txt").read_text() == "mine"


def test_store_arguments_are_checked_before_any_work(model, data, tmp_path):
    with pytest.raises(ValueError, match=r"compute_contributions_to_disk: layers \[4\] out of range"):
        ccd(model, data, tmp_path / "s", layers=[4])
    with pytest.raises(ValueError, match="level must be one of"):
        compute_contributions_to_disk(model, data, tmp_path / "s", level="heads", progress=False)
    with pytest.raises(ValueError, match="got no batches"):
        ccd(model, [], tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- featureviz.neuron


def test_neuron_index_is_checked_against_the_models_d_mlp(model, x):
    images = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"neuron\(0, 99999\): blocks.0.mlp.hook_post has d_mlp=64 neurons, so the "
                                         r"index must be in \[0, 63\]"):
        fv.evaluate(model, fv.neuron(0, 99999), images)  # used to be an IndexError
    with pytest.raises(ValueError, match=r"neuron: layer must be a block index >= 0 .* got -1"):
        fv.neuron(-1, 0)
    _, cache = model.run_with_cache(images, names_filter="blocks.0.mlp.hook_post")
    expected = cache["blocks.0.mlp.hook_post"][:, 1:, 63].mean(1)
    torch.testing.assert_close(fv.evaluate(model, fv.neuron(0, -1), images), expected)
