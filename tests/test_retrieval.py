"""Property-based retrieval: planted neighbours are found, by the chosen heads only, from every source."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_config
from vit_lens import HookedViT
from vit_lens.intervene.decompose import direct_contributions
from vit_lens.methods.textspan.retrieval import nearest_by_components, nearest_by_text, select_components
from vit_lens.intervene.store import compute_contributions_to_disk

LABELS = ["embed", "L0H0", "L0H1", "L0MLP", "L1H0", "L1H1", "L1MLP"]


@pytest.fixture
def database():
    values = torch.randn(60, len(LABELS), 32, generator=torch.Generator().manual_seed(0))
    values[41, 4] = 2.5 * values[9, 4]  # image 41's L1H0 term points exactly where image 9's does
    values[23, 2] = 0.5 * values[9, 2]  # image 23's L0H1 term likewise
    mix = torch.randn(32, generator=torch.Generator().manual_seed(1))
    values[50, 1] = 3 * (values[9, 1] + values[9, 5]) - mix  # only the sum L0H0 + L1H1 matches image 9's
    values[50, 5] = mix
    return values


def test_the_planted_neighbour_of_each_head_is_found(database):
    by_l1h0 = nearest_by_components(9, database, "L1H0", k=5, labels=LABELS)
    by_l0h1 = nearest_by_components(9, database, (0, 1), k=5, labels=LABELS)
    by_pair = nearest_by_components(9, database, ["L0H0", (-1, 1)], k=5, labels=LABELS)
    assert by_l1h0.indices.shape == by_l1h0.scores.shape == (5,)
    assert (by_l1h0.indices[0], by_l0h1.indices[0], by_pair.indices[0]) == (41, 23, 50)
    torch.testing.assert_close(by_l1h0.scores[0], torch.tensor(1.0))
    torch.testing.assert_close(by_pair.scores[0], torch.tensor(1.0))
    assert 9 not in by_l1h0.indices.tolist()
    assert by_l1h0.scores[1] < 0.9  # the rest are random directions in 32 dimensions

    # the scores are the cosine similarities of the head's terms, best first, the query left out
    cosine = F.cosine_similarity(database[9, 4][None], database[:, 4], dim=-1)
    cosine[9] = -torch.inf
    torch.testing.assert_close(by_l1h0.scores, cosine.sort(descending=True).values[:5])
    torch.testing.assert_close(by_l1h0.indices, cosine.sort(descending=True).indices[:5])


def test_dot_metric_batched_queries_and_tensor_queries(database):
    result = nearest_by_components([9, 17], database, "L1H0", k=3, labels=LABELS, metric="dot")
    assert result.indices.shape == (2, 3)
    dots = database[[9, 17], 4] @ database[:, 4].T
    dots[0, 9] = dots[1, 17] = -torch.inf
    torch.testing.assert_close(result.scores, dots.topk(3, dim=-1).values)
    # a query given as contributions [component, d] ranks like the same image given by index, itself included
    as_tensor = nearest_by_components(database[9], database, "L1H0", k=3, labels=LABELS, metric="dot")
    assert as_tensor.indices.tolist() == [41, 9, result.indices[0, 1].item()]  # 41's term is 2.5x image 9's
    mask = torch.tensor([label == "L1H0" for label in LABELS])
    assert nearest_by_components(9, database, mask, k=3).indices.tolist() == result.indices[0].tolist()


def test_text_ranking_finds_the_planted_top_and_bottom(database):
    text = torch.zeros(32)
    text[:2] = torch.tensor([3.0, 4.0])  # norm 5
    values = database.clone()
    values[8, 5] = 10 * text
    values[12, 5] = -7 * text
    ranking = nearest_by_text(values, "L1H1", text, k=2, labels=LABELS)
    assert ranking.top.indices[0] == 8 and ranking.bottom.indices[0] == 12
    torch.testing.assert_close(ranking.top.scores[0], torch.tensor(50.0))  # 10 |t|: length along the unit text
    torch.testing.assert_close(ranking.bottom.scores[0], torch.tensor(-35.0))
    torch.testing.assert_close(ranking.scores, values[:, 5] @ text / 5)
    several = nearest_by_text(values, "L1H1", torch.stack([text, -text]), k=1, labels=LABELS, metric="cosine")
    assert several.top.indices.tolist() == [[8], [12]] and several.scores.shape == (2, 60)
    torch.testing.assert_close(several.top.scores, torch.ones(2, 1))


def test_store_contributions_and_tensor_sources_agree(tmp_path):
    model = HookedViT(tiny_config()).init_weights(seed=0).eval()
    generator = torch.Generator().manual_seed(3)
    data = [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(3)]
    store = compute_contributions_to_disk(model, data, tmp_path / "s", level="head", ln_mode="paper",
                                          normalize=True, shard_batches=2, progress=False)
    values = store[:]
    with torch.no_grad():
        parts = direct_contributions(model, model.run_with_cache(data[1])[1], level="head", ln_mode="paper", normalize=True)
    for components in ["L2H1", "L1ATTN", ["L0ATTN", "L1ATTN", "L2ATTN"]]:  # 1, 4 and 12 heads: column reads and streaming
        from_store = nearest_by_components(parts, store, components, k=4)
        from_tensor = nearest_by_components(parts.values, values, components, k=4, labels=store.labels)
        torch.testing.assert_close(from_store.scores, from_tensor.scores)
        assert from_store.indices.tolist() == from_tensor.indices.tolist()
        # image i of batch 1 is image 4 + i of the store: its own nearest neighbour, at cosine 1
        assert from_store.indices[:, 0].tolist() == [4, 5, 6, 7]
        torch.testing.assert_close(from_store.scores[:, 0], torch.ones(4), atol=1e-5, rtol=0)
    text = torch.randn(16, generator=generator)
    torch.testing.assert_close(nearest_by_text(store, "L2H3", text, k=3).scores, store.component("L2H3") @ text / text.norm())


def test_selection_by_expanded_layers_and_tokens():
    labels = ["embed", "L0H0T0", "L0H0T1", "L0H1T0", "L0H1T1", "L0MLP", "L1N0", "L1N1"]
    assert select_components(labels, "L0H1").nonzero().flatten().tolist() == [3, 4]
    assert select_components(labels, "L0ATTN").nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert select_components(labels, ["L1MLP", "embed"]).nonzero().flatten().tolist() == [0, 6, 7]


def test_bad_selections_and_arguments_are_named(database):
    with pytest.raises(KeyError, match=r"'L1H2'.*Did you mean: L1H[01]"):
        nearest_by_components(9, database, "L1H2", labels=LABELS)
    with pytest.raises(KeyError, match="layers 0..1"):
        nearest_by_components(9, database, (5, 0), labels=LABELS)
    with pytest.raises(KeyError, match="level='head'"):
        select_components(["embed", "L0ATTN", "L0MLP"], "L0H1")
    with pytest.raises(ValueError, match="pass labels="):
        nearest_by_components(9, database, "L1H0")
    with pytest.raises(ValueError, match=r"\[7\] bool"):
        nearest_by_components(9, database, torch.tensor([True, False]), labels=LABELS)
    with pytest.raises(ValueError, match="k=60 but there are only 59"):
        nearest_by_components(9, database, "L1H0", k=60, labels=LABELS)
    with pytest.raises(IndexError, match=r"\[60\]"):
        nearest_by_components(60, database, "L1H0", labels=LABELS)
    with pytest.raises(ValueError, match="width 16 but the contributions have d=32"):
        nearest_by_text(database, "L1H0", torch.randn(16), labels=LABELS)
    with pytest.raises(ValueError, match="metric must be one of"):
        nearest_by_components(9, database, "L1H0", labels=LABELS, metric="euclid")
    with pytest.raises(TypeError, match="ContributionStore"):
        nearest_by_components(0, [[1.0]], "L1H0")
