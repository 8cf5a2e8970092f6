"""The on-disk contribution store: equal to in-memory decomposition, resumable, read lazily."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from vit_lens import HookedViT
from vit_lens.intervene.decompose import direct_contributions
from vit_lens.intervene.store import ContributionStore, compute_contributions_to_disk


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
    assert sorted(p.name for p in (tmp_path / "store").glob("shard_*.npy")) == [f"shard_0000{i}.npy" for i in range(3)]
    torch.testing.assert_close(store[:], reference)
    torch.testing.assert_close(store[7], reference[7])
    torch.testing.assert_close(store[5:11], reference[5:11])
    torch.testing.assert_close(store.component("L2H1"), reference[:, store.labels.index("L2H1")])
    torch.testing.assert_close(store.mean(), reference.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(store.var(), reference.double().var(0).float(), rtol=1e-5, atol=1e-7)
    reopened = ContributionStore(tmp_path / "store")
    assert len(reopened) == 15 and reopened.labels == store.labels
    assert isinstance(reopened._shards[0], np.memmap)


def test_an_interrupted_run_resumes_after_the_last_complete_shard(model, tmp_path):
    data = batches()
    directory = tmp_path / "store"

    def interrupted():
        yield from data[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compute_contributions_to_disk(model, interrupted(), directory, level="layer", shard_batches=2, progress=False)
    meta = json.loads((directory / "meta.json").read_text())
    assert [s["images"] for s in meta["shards"]] == [6]  # the half-filled second shard was never written
    computed = []

    class Counting(list):
        def __iter__(self):
            for item in super().__iter__():
                computed.append(item)
                yield item

    store = compute_contributions_to_disk(model, Counting(data), directory, level="layer", shard_batches=2, progress=False)
    torch.testing.assert_close(store[:], expected(model, data, level="layer"))
    assert len(store) == 15


def test_settings_mismatch_and_missing_store_are_errors(model, tmp_path):
    data = batches(2)
    compute_contributions_to_disk(model, data, tmp_path / "s", level="head", progress=False)
    with pytest.raises(ValueError, match="computed with"):
        compute_contributions_to_disk(model, data, tmp_path / "s", level="neuron", progress=False)
    with pytest.raises(FileNotFoundError, match="No contribution store"):
        ContributionStore(tmp_path / "nothing")
    with pytest.raises(KeyError, match="No component 'L9H9'"):
        ContributionStore(tmp_path / "s").component("L9H9")
