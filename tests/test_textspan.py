"""TextSpan: the fast (covariance) path picks what the public code's steps pick; tables, suggestions, evaluation."""

import numpy as np
import pytest
import torch

from tests.conftest import assert_rel_close, relative_error
from vit_lens.intervene.decompose import direct_contributions, required_hooks
from vit_lens.intervene.store import compute_contributions_to_disk
from vit_lens.methods.textspan.textspan import (
    TextSpanTable,
    random_text_baseline,
    suggest_heads,
    textspan,
    textspan_accuracy_curve,
    textspan_all_heads,
)


def head_like(n, d, signal_rank, seed, noise=0.05):
    """Low-rank outputs with distinct, decaying scales (a well-defined top-rank subspace), an offset and noise."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(d, signal_rank, generator=generator, dtype=torch.float64))[0]
    scales = torch.linspace(3.0, 1.0, signal_rank, dtype=torch.float64)
    outputs = (torch.randn(n, signal_rank, generator=generator, dtype=torch.float64) * scales) @ directions.T
    outputs += noise * torch.randn(n, d, generator=generator, dtype=torch.float64)
    outputs += torch.randn(d, generator=generator, dtype=torch.float64)
    return outputs.float()


def reference_textspan(outputs, pool, n_texts, rank):
    """Alg. 1 as the public code runs it, written independently in float64 NumPy (unit directions)."""
    data, text = outputs.double().numpy(), pool.double().numpy()
    basis = np.linalg.svd(data, full_matrices=False)[2][:rank]
    text = text @ (basis.T @ np.linalg.solve(basis @ basis.T, basis))  # onto the span of the uncentred SVD
    mean = data.mean(0)
    residual, reconstruction = data - mean, np.tile(mean, (len(data), 1))
    picks = []
    for _ in range(n_texts):
        j = int(np.argmax((residual @ text.T).var(axis=0, ddof=1)))
        unit = text[j] / np.linalg.norm(text[j])
        coefficient = residual @ unit
        reconstruction += np.outer(coefficient, unit)
        residual -= np.outer(coefficient, unit)
        text -= np.outer(text @ unit, unit)
        picks.append(j)
    return picks, torch.from_numpy(reconstruction)


def assert_same_result(fast, faithful, rtol=1e-5):
    assert fast.indices.tolist() == faithful.indices.tolist()
    assert_rel_close(fast.variance_explained, faithful.variance_explained, rtol=rtol, what="variance curve")
    assert_rel_close(fast.scores, faithful.scores, rtol=rtol, what="scores")
    assert_rel_close(fast.reconstruction, faithful.reconstruction, rtol=rtol, what="reconstruction")
    assert_rel_close(fast.basis, faithful.basis, rtol=rtol, what="basis")


# (n_images, d, n_pool, rank, n_texts): full-rank projection; T > d with rank < d; rank = d with many picks
SIZES = [(300, 24, 100, 80, 10), (400, 16, 200, 10, 8), (250, 24, 60, 24, 20)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sizes", SIZES, ids=["rank>d", "T>d,rank<d", "rank=d,20picks"])
def test_fast_and_faithful_pick_the_same_texts(seed, sizes):
    n, d, t, rank, k = sizes
    outputs = head_like(n, d, signal_rank=min(d, 14), seed=seed)
    pool = random_text_baseline(d, t, seed=100 + seed)
    fast = textspan(outputs, pool, k, rank=rank, method="fast")
    faithful = textspan(outputs, pool, k, rank=rank, method="faithful")
    assert_same_result(fast, faithful)
    # in float64 the faithful steps and the covariance updates agree to round-off
    exact = textspan(outputs.double(), pool.double(), k, rank=rank, method="faithful")
    assert fast.indices.tolist() == exact.indices.tolist()
    assert relative_error(fast.variance_explained, exact.variance_explained) < 1e-10


@pytest.mark.parametrize("rank, k", [(80, 10), (10, 8)])
def test_faithful_is_the_papers_algorithm(rank, k):
    outputs, pool = head_like(300, 24, 14, seed=5), random_text_baseline(24, 150, seed=6)
    picks, reconstruction = reference_textspan(outputs, pool, k, rank)
    for method in ("faithful", "fast"):
        result = textspan(outputs, pool, k, rank=rank, method=method)
        assert result.indices.tolist() == picks, method
        assert_rel_close(result.reconstruction, reconstruction, rtol=1e-5, what=method)


def test_first_pick_and_variance_explained_follow_their_definitions():
    outputs, pool = head_like(400, 20, 12, seed=3), random_text_baseline(20, 80, seed=4)
    result = textspan(outputs, pool, 6, rank=80, texts=[f"text {i}" for i in range(80)])
    centred = outputs.double() - outputs.double().mean(0)
    variances = (centred @ pool.double().T).var(dim=0)  # rank >= d: the projection is the identity
    assert result.indices[0] == variances.argmax()
    assert result.scores[0] == pytest.approx(float(variances.max()), rel=1e-6)
    assert result.texts == [f"text {i}" for i in result.indices.tolist()]
    # orthonormal basis; the curve is the variance the projection keeps, over the total
    assert torch.allclose(result.basis.double() @ result.basis.double().T, torch.eye(6, dtype=torch.float64), atol=1e-5)
    total = centred.var(dim=0).sum()
    for k in range(1, 7):
        kept = (result.reconstruct(outputs, k).double() - outputs.double().mean(0)).var(dim=0).sum() / total
        assert float(kept) == pytest.approx(float(result.variance_explained[k - 1]), rel=1e-5)
    assert torch.all(result.step_variance > 0) and float(result.variance_explained[-1]) < 1
    assert_rel_close(result.reconstruct(outputs), result.reconstruction, rtol=1e-6, what="reconstruct()")
    assert torch.equal(result.reconstruct(outputs, 0), result.mean.expand(400, -1))


@pytest.fixture(scope="module")
def tiny_parts():
    from tests.conftest import tiny_config
    from vit_lens import HookedViT

    model = HookedViT(tiny_config()).init_weights(seed=0).eval()
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=required_hooks(model, "head"))
        return model, direct_contributions(model, cache, level="head")


@pytest.mark.parametrize("rank", [80, 5])
def test_fast_and_faithful_agree_on_a_real_decomposition(tiny_parts, rank):
    _, parts = tiny_parts
    outputs = parts["L2H1"]  # [64, d_proj=16], rank 8 (d_head)
    pool = random_text_baseline(16, 50, seed=7)
    fast = textspan(outputs, pool, 5, rank=rank)
    faithful = textspan(outputs, pool, 5, rank=rank, method="faithful")
    assert_same_result(fast, faithful)
    assert fast.rank == min(rank, 16)
    assert 0.3 < float(fast.variance_explained[-1]) <= 1.0


def test_textspan_errors_name_the_problem():
    outputs, pool = torch.randn(50, 8), torch.randn(20, 8)
    with pytest.raises(ValueError, match="width d=8"):
        textspan(outputs, torch.randn(20, 9), 3)
    with pytest.raises(ValueError, match=r"n_texts must be .* min\(rank=4"):
        textspan(outputs, pool, 5, rank=4)
    with pytest.raises(ValueError, match="method must be one of"):
        textspan(outputs, pool, 2, method="exact")
    with pytest.raises(ValueError, match="T=20 names"):
        textspan(outputs, pool, 2, texts=["a", "b"])
    with pytest.raises(TypeError, match="head_outputs must be a torch.Tensor"):
        textspan(outputs.numpy(), pool, 2)
    with pytest.raises(ValueError, match="finite"):
        textspan(outputs.clone().index_fill_(0, torch.tensor([3]), float("nan")), pool, 2)
    with pytest.raises(ValueError, match="zero variance"):
        textspan(torch.ones(50, 8), pool, 2)
    flat_pool = torch.randn(20, 2) @ torch.randn(2, 8)  # the pool spans two dimensions only
    for method in ("fast", "faithful"):
        with pytest.raises(ValueError, match="could pick only 2 texts"):
            textspan(outputs, flat_pool, 3, method=method)


def test_random_text_baseline():
    pool = random_text_baseline(32, 500, seed=1)
    assert pool.shape == (500, 32) and pool.dtype == torch.float32
    torch.testing.assert_close(pool.norm(dim=-1), torch.ones(500))
    assert torch.equal(pool, random_text_baseline(32, 500, seed=1))
    assert not torch.allclose(pool, random_text_baseline(32, 500, seed=2))
    assert random_text_baseline(8, 3, seed=0, dtype=torch.float64).dtype == torch.float64
    # no preferred direction: the mean of many unit vectors is near zero
    assert float(random_text_baseline(16, 20000, seed=3).mean(0).norm()) < 0.03


POOL_NAMES = [f"text {i}" for i in range(50)]


def test_all_heads_on_every_kind_of_input(tiny_parts, tmp_path):
    model, parts = tiny_parts
    pool = random_text_baseline(16, 50, seed=8)
    table = textspan_all_heads(parts, pool, POOL_NAMES, n_texts=4, last_k=2, progress=False)
    assert table.heads == [(l, h) for l in (1, 2) for h in range(4)]
    direct = textspan(parts["L2H3"], pool, 4, texts=POOL_NAMES)
    assert table.for_head(2, 3).indices.tolist() == direct.indices.tolist()
    assert table.for_head(2, 3).texts == direct.texts
    # the same heads from a [N, component, d] tensor, a [N, layer, head, d] tensor and with layers=
    from_tensor = textspan_all_heads(parts.values, pool, POOL_NAMES, n_texts=4, layers=[-2, -1],
                                     component_labels=parts.labels, progress=False)
    from_heads = textspan_all_heads(parts.heads(), pool, POOL_NAMES, n_texts=4, last_k=2, progress=False)
    for other in (from_tensor, from_heads):
        assert other.to_rows() == table.to_rows()
    # and from a store on disk, written batch by batch
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    store = compute_contributions_to_disk(model, list(images.split(16)), tmp_path / "store", level="head",
                                          shard_batches=2, progress=False)
    from_store = textspan_all_heads(store, pool, POOL_NAMES, n_texts=4, last_k=2, progress=False)
    assert [r["index"] for r in from_store.to_rows()] == [r["index"] for r in table.to_rows()]
    variances = np.array([r["variance_explained"] for r in from_store.to_rows()])
    assert np.allclose(variances, [r["variance_explained"] for r in table.to_rows()], rtol=1e-4)


def test_table_rows_pandas_and_report(tiny_parts):
    _, parts = tiny_parts
    table = textspan_all_heads(parts, random_text_baseline(16, 50, seed=8), POOL_NAMES, n_texts=3, last_k=1,
                               progress=False)
    rows = table.to_rows()
    assert len(rows) == 4 * 3
    assert rows[0].keys() == {"layer", "head", "rank", "index", "text", "variance_explained", "cumulative_variance"}
    assert [r["rank"] for r in rows[:3]] == [1, 2, 3]
    head = table.for_head(2, 0)
    assert rows[2]["cumulative_variance"] == pytest.approx(float(head.variance_explained[-1]))
    assert sum(r["variance_explained"] for r in rows[:3]) == pytest.approx(rows[2]["cumulative_variance"])
    frame = table.to_pandas()
    assert frame.shape == (12, 7) and list(frame["layer"].unique()) == [2]
    report = table.report(top=2)
    first = head.texts[0]
    assert f"L2.H0 [{100 * head.cumulative:.1f}% in 3 texts]: '{first}'" in report
    assert report.count("\n") == 4 and report.count(", ...") == 4
    with pytest.raises(KeyError, match="layer 0, head 0"):
        table.for_head(0, 0)


def test_all_heads_errors(tiny_parts):
    model, parts = tiny_parts
    pool = random_text_baseline(16, 50, seed=8)
    with pytest.raises(ValueError, match="either layers= or last_k="):
        textspan_all_heads(parts, pool, n_texts=2, last_k=1, layers=[2], progress=False)
    with pytest.raises(ValueError, match="last_k must be between 1 and the model's 3 layers"):
        textspan_all_heads(parts, pool, n_texts=2, last_k=5, progress=False)
    with pytest.raises(ValueError, match="component_labels"):
        textspan_all_heads(parts.values, pool, n_texts=2, progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.randn(4, 3, 32, 32), names_filter=required_hooks(model, "head", [2]))
        only_last = direct_contributions(model, cache, level="head", layers=[2])
    with pytest.raises(ValueError, match=r"layers \[1\] have no per-head components.*level='head'"):
        textspan_all_heads(only_last, pool, n_texts=2, last_k=2, progress=False)
    with pytest.raises(TypeError, match="Contributions, a ContributionStore, or a tensor"):
        textspan_all_heads([parts.values], pool, progress=False)


def keyword_table():
    """Head (1, 0) varies along the 'red' text, head (1, 1) mostly along the 'dog' text and a bit along 'red'."""
    generator = torch.Generator().manual_seed(11)
    d, n = 12, 500
    axes = torch.eye(d)
    names = ["an image with red colors", "a dog", "a photo of a Red car"] + [f"filler {i}" for i in range(d - 3)]
    latent = torch.randn(n, 3, generator=generator)
    head0 = latent[:, :1] * 3 * axes[0] + latent[:, 1:2] * 0.5 * axes[5] + 0.01 * torch.randn(n, d, generator=generator)
    head1 = latent[:, 1:2] * 3 * axes[1] + latent[:, 2:3] * 1.0 * axes[2] + 0.01 * torch.randn(n, d, generator=generator)
    values = torch.stack([head0, head1, torch.randn(n, d, generator=generator)], dim=1)
    table = textspan_all_heads(values, axes, names, n_texts=2, layers=[1], component_labels=["L1H0", "L1H1", "L1MLP"],
                               progress=False)
    return table


def test_suggest_heads_ranks_by_the_matching_share_of_variance():
    table = keyword_table()
    assert table.for_head(1, 0).texts == ["an image with red colors", "filler 2"]
    assert table.for_head(1, 1).texts == ["a dog", "a photo of a Red car"]
    suggestions = suggest_heads(table, "RED")
    assert [(l, h) for l, h, _ in suggestions] == [(1, 0), (1, 1)]
    share0 = table.for_head(1, 0).step_variance
    share1 = table.for_head(1, 1).step_variance
    assert suggestions[0][2] == pytest.approx(float(share0[0] / share0.sum()))
    assert suggestions[1][2] == pytest.approx(float(share1[1] / share1.sum()))
    assert 0.95 < suggestions[0][2] < 1 and 0.05 < suggestions[1][2] < 0.15
    assert suggest_heads(table, ["dog", "car"], top=1) == [(1, 1, pytest.approx(1.0))]
    assert suggest_heads(table, r"^a d", regex=True)[0][:2] == (1, 1)
    assert suggest_heads(table, "^a d") == []  # plain substrings: '^' is a character
    assert suggest_heads(table, "zebra") == []


def brute_force_accuracy(parts, table, classifier, labels, k, keep_mlps):
    """The replaced-and-ablated representation built term by term, then top-1 accuracy."""
    values = parts.values.double()
    means = values.mean(0)
    total = torch.zeros(values.shape[0], values.shape[2], dtype=torch.float64)
    for i, label in enumerate(parts.labels):
        layer_head = (int(label[1]), int(label[3])) if label.startswith("L") and "H" in label else None
        if layer_head in table.results:
            total += table.for_head(*layer_head).reconstruct(values[:, i], k) if k is not None else values[:, i]
        elif keep_mlps and (label == "embed" or label.endswith("MLP")):
            total += values[:, i]
        else:
            total += means[i]
    return float(((total @ classifier.double()).argmax(-1) == labels).double().mean())


@pytest.mark.parametrize("keep_mlps", [True, False])
def test_accuracy_curve_matches_the_ablation_built_by_hand(tiny_parts, keep_mlps):
    _, parts = tiny_parts
    classifier = torch.randn(16, 6, generator=torch.Generator().manual_seed(12))
    labels = (parts.sum() @ classifier).argmax(-1)
    table = textspan_all_heads(parts, random_text_baseline(16, 80, seed=13), n_texts=16, last_k=2, progress=False)
    ks = [0, 1, 3, 8, 16]
    curve = textspan_accuracy_curve(parts, table, classifier, labels, ks=ks, keep_mlps=keep_mlps, batch_size=10)
    assert curve.base_accuracy == 1.0 and curve.n_images == 64 and curve.ks == ks
    expected = [brute_force_accuracy(parts, table, classifier, labels, k, keep_mlps) for k in ks]
    assert curve.accuracy == pytest.approx(expected, abs=1e-12)
    assert curve.heads_intact_accuracy == pytest.approx(brute_force_accuracy(parts, table, classifier, labels, None, keep_mlps))
    assert curve.accuracy[-1] == curve.heads_intact_accuracy  # 16 texts span all of d = 16
    assert curve.accuracy[0] < curve.heads_intact_accuracy  # mean-ablating the heads costs accuracy
    assert f"k=   3: {100 * curve.accuracy[2]:.2f}%" in curve.report()
    assert curve.to_rows()[1] == {"k": 1, "accuracy": curve.accuracy[1]}


def test_accuracy_curve_from_a_store_equals_the_tensor_path(tiny_parts, tmp_path):
    model, _ = tiny_parts
    images = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(14))
    store = compute_contributions_to_disk(model, list(images.split(8)), tmp_path / "s", level="head", progress=False)
    values = store[:]
    classifier = torch.randn(16, 4, generator=torch.Generator().manual_seed(15))
    labels = (values.sum(1) @ classifier).argmax(-1)
    table = textspan_all_heads(store, random_text_baseline(16, 60, seed=16), n_texts=6, last_k=1, progress=False)
    from_store = textspan_accuracy_curve(store, table, classifier, labels, ks=[0, 2, 6], batch_size=7)
    from_tensor = textspan_accuracy_curve(values, table, classifier, labels, ks=[0, 2, 6],
                                          component_labels=store.labels)
    assert from_store == from_tensor
    with pytest.raises(ValueError, match="rerun textspan_all_heads with n_texts=7"):
        textspan_accuracy_curve(store, table, classifier, labels, ks=[7])
    with pytest.raises(ValueError, match=r"classifier must be \[d=16"):
        textspan_accuracy_curve(store, table, classifier.T, labels)
    with pytest.raises(ValueError, match=r"labels must be \[40\]"):
        textspan_accuracy_curve(store, table, classifier, labels[:5])
    assert isinstance(table, TextSpanTable)
