"""The on-disk contribution store: equal to in-memory decomposition, resumable, read lazily."""

import json

import pytest
import torch

from tests.conftest import tiny_config
from vit_lens import HookedViT
from vit_lens.intervene.decompose import direct_contributions
from vit_lens.intervene.store import ContributionStore, ContributionTerms, compute_contributions_to_disk
from vit_lens.runner import Mean, RunResult, run_dataset


@pytest.fixture(scope="module")
def model():
    return HookedViT(tiny_config()).init_weights(seed=0).eval()


def batches(n_batches=5, batch=3):
    generator = torch.Generator().manual_seed(7)
    return [(torch.randn(batch, 3, 32, 32, generator=generator), torch.zeros(batch)) for _ in range(n_batches)]


def expected(model, data, **kwargs):
    with torch.no_grad():
        return torch.cat([direct_contributions(model, model.run_with_cache(x)[1], **kwargs).values for x, _ in data])


def test_store_holds_the_same_numbers_as_in_memory(model, tmp_path):
    data = batches()
    store = compute_contributions_to_disk(model, data, tmp_path / "store", level="head", shard_batches=2, progress=False)
    reference = expected(model, data, level="head")
    assert store.shape == tuple(reference.shape) == (15, len(store.labels), 16)
    assert sorted(p.name for p in (tmp_path / "store").glob("shard_*.safetensors")) == [
        f"shard_00000{i}.safetensors" for i in range(3)]  # 2 batches of 3 images per shard: 6, 6, 3
    torch.testing.assert_close(store[:], reference)
    torch.testing.assert_close(store[7], reference[7])
    torch.testing.assert_close(store[5:11], reference[5:11])
    torch.testing.assert_close(store.component("L2H1"), reference[:, store.labels.index("L2H1")])
    torch.testing.assert_close(store.mean(), reference.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(store.var(), reference.double().var(0).float(), rtol=1e-5, atol=1e-7)
    reopened = ContributionStore(tmp_path / "store")
    assert len(reopened) == 15 and reopened.labels == store.labels
    assert reopened.settings["level"] == "head" and reopened.settings["shard_size"] == 6
    # an ordinary runner folder: its rows read back as a shuffleable dataset of [component, d_out] rows
    rows = RunResult(tmp_path / "store").activations("values", recorder="contributions")
    order = torch.randperm(15, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rows.rows(order), reference[order])


def test_an_interrupted_run_resumes_after_the_last_complete_shard(model, tmp_path):
    data = batches()
    directory = tmp_path / "store"

    def interrupted():
        yield from data[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compute_contributions_to_disk(model, interrupted(), directory, level="layer", shard_batches=2, progress=False)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert [s["n_images"] for s in manifest["shards"]] == [6]  # the half-filled second shard was never written
    assert not manifest["complete"]
    with pytest.raises(ValueError, match="is not finished .* run the same command again to resume it"):
        ContributionStore(directory)
    computed = []

    class Counting(list):
        def __iter__(self):
            for item in super().__iter__():
                computed.append(item)
                yield item

    first_shard = (directory / "shard_000000.safetensors").stat().st_ino  # a rewrite renames a new file over it
    store = compute_contributions_to_disk(model, Counting(data), directory, level="layer", shard_batches=2, progress=False)
    torch.testing.assert_close(store[:], expected(model, data, level="layer"))
    assert len(store) == 15 and len(computed) == 5
    assert (directory / "shard_000000.safetensors").stat().st_ino == first_shard  # kept, not recomputed


def test_settings_mismatch_and_missing_store_are_errors(model, tmp_path):
    data = batches(2)
    compute_contributions_to_disk(model, data, tmp_path / "s", level="head", progress=False)
    with pytest.raises(ValueError, match="other settings"):
        compute_contributions_to_disk(model, data, tmp_path / "s", level="neuron", progress=False)
    with pytest.raises(FileNotFoundError, match="No contribution store"):
        ContributionStore(tmp_path / "nothing")
    with pytest.raises(KeyError, match="No component 'L9H9'"):
        ContributionStore(tmp_path / "s").component("L9H9")


def test_a_dataloader_store_and_the_recorder_beside_other_recorders(model, tmp_path):
    data = batches()
    images = torch.cat([x for x, _ in data])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(15)), batch_size=3)
    store = compute_contributions_to_disk(model, loader, tmp_path / "loader", level="neuron", layers=[-1],
                                          shard_batches=2, progress=False)
    reference = expected(model, data, level="neuron", layers=[2])
    assert store.settings["layers"] == [2] and store.shape == tuple(reference.shape)
    torch.testing.assert_close(store[:], reference)

    terms = ContributionTerms(model, level="head", name="heads")
    result = run_dataset(model, images, tmp_path / "both", [terms, Mean("blocks.1.hook_resid_post")], shard_size=4,
                         batch_size=4, progress=False)
    with_mean = ContributionStore(tmp_path / "both")
    torch.testing.assert_close(with_mean[:], expected(model, data, level="head"))
    with torch.no_grad():
        resid = model.run_with_cache(images)[1]["blocks.1.hook_resid_post"]
    torch.testing.assert_close(result.mean("blocks.1.hook_resid_post"), resid.double().mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"holds no contribution recorders named 'other'.*\('heads', "
                                         r"'direct_contributions'\)"):
        ContributionStore(tmp_path / "both", recorder="other")
