"""The report's per-head outputs over a dataset, computed in memory or by the dataset runner into a store."""

import torch

from tests.conftest import tiny_config
from vit_lens import HookedViT
from vit_lens.intervene.store import ContributionStore
from vit_lens.viz.report import head_outputs_over


def test_head_outputs_through_the_runner_equal_the_in_memory_pass_and_are_kept_in_a_store(tmp_path):
    torch.set_num_threads(1)
    model = HookedViT(tiny_config()).init_weights(seed=0).eval()
    images = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    in_memory = head_outputs_over(model, images, batch_size=4)
    assert in_memory.shape == (10, 3, 4, 16)
    on_disk = head_outputs_over(model, images, batch_size=4, out_dir=tmp_path / "heads")
    torch.testing.assert_close(on_disk, in_memory, rtol=0, atol=0)
    store = ContributionStore(tmp_path / "heads")  # kept for later runs (a second call resumes it)
    assert len(store) == 10 and store.settings["level"] == "head"
    torch.testing.assert_close(head_outputs_over(model, images, batch_size=4, out_dir=tmp_path / "heads"), in_memory,
                               rtol=0, atol=0)
