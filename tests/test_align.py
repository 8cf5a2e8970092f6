"""Beyond CLIP (Balasubramanian et al. 2024): maps into CLIP space recover planted maps; scores rank planted components first."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_rel_close, relative_error
from vit_lens import HookedViT, load_toy_clip
from vit_lens.methods.alignment.compalign import (
    PAPER_SETTINGS,
    ComponentAligner,
    ComponentScores,
    ablation_hook_names,
    alignment_data,
    component_scores,
    interpret_components,
    mean_ablation_hooks,
    nearest_by_property,
    property_basis,
    property_embeddings,
    train_aligner,
)
from vit_lens.intervene.decompose import direct_contributions, required_hooks
from vit_lens.methods.textspan.retrieval import nearest_by_components
from vit_lens.methods.textspan.spurious import mean_ablate_components
from vit_lens.intervene.statistics import compute_hook_statistics
from vit_lens.intervene.store import compute_contributions_to_disk
from vit_lens.methods.textspan.textspan import textspan
from vit_lens.toy import ToyWorld, factor_prompts

LABELS = ["embed", "L0H0", "L0H1", "L0MLP", "L1H0", "L1H1", "L1MLP"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def planted_maps(n_components=3, d_in=10, d_clip=6, n=1200, seed=0):
    """Random terms and a target made by known maps with orthonormal columns (zero penalty) plus a bias."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.linalg.qr(torch.randn(n_components, d_in, d_clip, generator=g)).Q
    bias = 0.5 * torch.randn(d_clip, generator=g)
    x = torch.randn(n, n_components, d_in, generator=g)
    return x, torch.einsum("nci,cio->no", x, weight) + bias, weight, bias


def pearson(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# ---------------------------------------------------------------------------------------------- the maps


def test_training_recovers_planted_maps_and_the_aligned_sum_matches_the_target():
    x, y, weight, bias = planted_maps()
    fit = train_aligner(x, y, labels=LABELS[:3], batch_size=64, epochs=25, lr=2e-2, patience=4, progress=False)
    aligner = fit.aligner
    # cosine loss is blind to scale; the orthonormality penalty pins it, so the maps themselves come back
    assert relative_error(aligner.weight.detach(), weight) < 1e-3
    assert relative_error(aligner.bias.detach(), bias) < 1e-3
    assert_rel_close(aligner.aligned_sum(x).detach(), y, rtol=1e-3, what="aligned sum vs target")
    assert fit.validation_cosine > 0.99999
    assert aligner.labels == LABELS[:3] and fit.history[-1]["penalty"] < 1e-6
    # per-component terms carry the bias in equal shares and sum to the aligned representation
    terms = aligner(x[:5]).detach()
    torch.testing.assert_close(terms[:, 1], x[:5, 1] @ aligner.weight[1].detach() + aligner.bias.detach() / 3)
    torch.testing.assert_close(terms.sum(1), aligner.aligned_sum(x[:5]).detach(), atol=1e-5, rtol=1e-5)


def test_orthonormality_penalty_is_the_public_codes_formula_for_both_shapes():
    for d_in, d_clip in ((7, 4), (4, 7)):
        aligner = ComponentAligner(["a", "b", "c"], d_in, d_clip, init_scale=0.5, seed=1)
        w = aligner.weight.detach().double()
        gram = w.transpose(1, 2) @ w  # [C, d_clip, d_clip], always the d_clip x d_clip form
        expected = d_clip * (gram - torch.eye(d_clip, dtype=torch.float64)).square().mean()
        assert aligner.orthonormality_penalty().item() == pytest.approx(expected.item(), rel=1e-5)
    square = ComponentAligner.from_weights(["a", "b"], torch.linalg.qr(torch.randn(2, 5, 5)).Q, torch.zeros(5))
    assert square.orthonormality_penalty().item() == pytest.approx(0.0, abs=1e-6)
    wide = ComponentAligner.from_weights(["a"], torch.eye(6)[:4][None], torch.zeros(6))  # orthonormal rows, 4 -> 6
    assert wide.orthonormality_penalty().item() == pytest.approx((6 - 4) / 6, abs=1e-6)


def test_save_load_round_trip_is_exact(tmp_path):
    aligner = ComponentAligner(LABELS, d_in=12, d_clip=5, seed=3)
    path = tmp_path / "maps.safetensors"
    aligner.save(path, {"model": "tiny", "clip": "toy"})
    loaded = ComponentAligner.load(path)
    assert torch.equal(loaded.weight, aligner.weight) and torch.equal(loaded.bias, aligner.bias)
    assert loaded.labels == LABELS and loaded.metadata == {"model": "tiny", "clip": "toy"}
    x = torch.randn(4, len(LABELS), 12)
    assert torch.equal(loaded(x), aligner(x))
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not a file written by ComponentAligner.save"):
        ComponentAligner.load(other)


def test_early_stopping_triggers_and_restores_the_best_maps():
    x, y, _, _ = planted_maps(n=400)
    # a learning rate too small to improve by min_delta: the first check is the best, then `patience` more
    fit = train_aligner(x, y, batch_size=20, epochs=50, lr=1e-9, eval_every=3, patience=4, min_delta=1e-3,
                        progress=False)
    assert fit.stopped_early and fit.steps == 3 * 5 and len(fit.history) == 5 and fit.best_step == 3

    # with real progress and restore_best, the returned maps are those of the best validation check
    fit = train_aligner(x, y, batch_size=20, epochs=3, lr=5e-2, eval_every=5, patience=100, progress=False)
    best = min(fit.history, key=lambda record: record["val_loss"])
    assert not fit.stopped_early and fit.best_step == best["step"]
    assert fit.validation_cosine == pytest.approx(best["val_cosine"], abs=1e-6)

    # the public code's rule: training-batch loss, 50 batches without a new minimum, last weights kept
    fit = train_aligner(x, y, progress=False, **dict(PAPER_SETTINGS, lr=1e-9, epochs=20))
    losses = [record["train_loss"] for record in fit.history]
    assert len(losses) == fit.steps and "val_loss" not in fit.history[0] and fit.validation_cosine is None
    assert fit.stopped_early and fit.steps == fit.best_step + 50
    assert min(losses) == losses[fit.best_step - 1] < min(losses[: fit.best_step - 1])


def test_training_reads_a_store_in_blocks_and_every_image_once(tmp_path, tiny_model, monkeypatch):
    from vit_lens import align

    batches = [torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    store = compute_contributions_to_disk(tiny_model, batches, tmp_path / "store", level="head", shard_batches=2,
                                          progress=False)
    values = store[0 : len(store)]
    monkeypatch.setattr(align, "_BLOCK_BYTES", 5 * 4 * store.shape[1] * store.shape[2])  # blocks of 5 images
    rows = align._Rows(align.ComponentSource(store))
    is_train = torch.ones(len(store), dtype=torch.bool)
    is_train[[2, 11, 17]] = False
    seen = []
    for x, index in rows.epoch(is_train, 4, torch.Generator().manual_seed(0)):
        assert torch.equal(x, values[index]) and len(index) <= 4
        seen += index.tolist()
    assert sorted(seen) == is_train.nonzero().flatten().tolist()
    assert seen != sorted(seen)  # shuffled
    assert torch.equal(rows.read(torch.tensor([2, 3, 4, 17])), values[[2, 3, 4, 17]])

    targets = torch.randn(len(store), 7)
    fit = train_aligner(store, targets, validation=4, epochs=1, batch_size=8, progress=False)
    assert fit.aligner.labels == store.labels and fit.steps == 3  # 20 training images in batches of 8


# ---------------------------------------------------------------------------------------------- scores


def planted_property_terms(n=500, d=16, seed=0):
    """Aligned terms where component 2 moves along property P, 5 along Q, 4 along both (stronger); rest noise."""
    g = torch.Generator().manual_seed(seed)
    descriptions_p = F.normalize(torch.randn(3, d, generator=g), dim=-1)
    descriptions_q = F.normalize(torch.randn(3, d, generator=g), dim=-1)
    terms = 0.2 * torch.randn(n, len(LABELS), d, generator=g) + torch.randn(len(LABELS), d, generator=g)
    along_p = torch.randn(n, 3, generator=g) @ descriptions_p
    along_q = torch.randn(n, 3, generator=g) @ descriptions_q
    terms[:, 2] += along_p
    terms[:, 5] += along_q
    both = torch.randn(n, 3, generator=g) @ descriptions_p + torch.randn(n, 3, generator=g) @ descriptions_q
    terms[:, 4] += 2 * both
    return terms, {"P": descriptions_p, "Q": descriptions_q}


def paper_scores(terms, descriptions):
    """A literal transcription of the public code's steps (variance_attributed)."""
    bases = torch.linalg.qr(descriptions.double().T).Q.T
    decomp = terms.double().transpose(0, 1)  # [component, image, d]
    total = decomp.sum(0) @ bases.T
    total = total - total.mean(0)
    each = decomp @ bases.T
    each = each - each.mean(1, keepdim=True)
    covar = (total[None] * each).mean(1)
    covar = covar / (total[None].std(1) * each.std(1))
    return covar.mean(-1)


def test_scores_rank_the_planted_component_first_and_match_the_public_code():
    terms, properties = planted_property_terms()
    scores = component_scores(terms, properties, labels=LABELS)
    assert scores.ranking("P")[0] == "L1H0" and scores.ranking("Q")[0] == "L1H0"  # the strong mixed one
    # property-specific ranking picks the component that carries only that property
    assert scores.ranking("P", specific=True)[0] == "L0H1"
    assert scores.ranking("Q", specific=True)[0] == "L1H1"
    assert [label for label, _ in scores.top("P", 2)] == ["L1H0", "L0H1"]
    noise = [i for i, label in enumerate(LABELS) if label not in ("L0H1", "L1H0", "L1H1")]
    assert scores["P"][noise].abs().max() < 0.2 and scores["P"][2] > 0.3
    torch.testing.assert_close(scores.specific()[0], scores["P"] - scores["Q"])

    n = terms.shape[0]
    for name in ("P", "Q"):  # the code's biased covariance over unbiased stds is (N - 1) / N of Pearson
        torch.testing.assert_close(scores[name].double() * (n - 1) / n, paper_scores(terms, properties[name]),
                                   atol=1e-5, rtol=1e-5)
    # each per-direction value is a plain Pearson correlation
    basis = property_basis(properties["P"])
    direct = pearson(terms[:, 2] @ basis[1], terms.sum(1) @ basis[1])
    assert scores.per_direction["P"][1, 2].item() == pytest.approx(direct, abs=1e-5)


def test_scores_through_the_maps_equal_scores_of_the_aligned_terms_in_any_chunking():
    terms, properties = planted_property_terms(n=300)
    g = torch.Generator().manual_seed(5)
    aligner = ComponentAligner.from_weights(LABELS, torch.randn(len(LABELS), 9, 16, generator=g),
                                            torch.randn(16, generator=g))
    x = torch.randn(300, len(LABELS), 9, generator=g)
    aligned = aligner.align(x)
    reference = component_scores(aligned, properties, labels=LABELS)
    through = component_scores(x, properties, aligner=aligner, labels=LABELS, chunk_size=7)
    torch.testing.assert_close(through.scores, reference.scores, atol=2e-5, rtol=1e-4)
    # a constant component has no correlation: it scores exactly 0
    constant = aligned.clone()
    constant[:, 0] = torch.randn(16, generator=g)
    assert component_scores(constant, properties["P"], labels=LABELS)["property"][0].item() == 0.0


def test_mean_ablating_the_top_component_removes_the_spurious_correlation():
    g = torch.Generator().manual_seed(2)
    n, d = 600, 12
    background = torch.randint(0, 2, (n,), generator=g).float()  # the spurious attribute
    water = F.normalize(torch.randn(d, generator=g), dim=0)
    bird = F.normalize(torch.randn(d, generator=g), dim=0)
    terms = 0.1 * torch.randn(n, len(LABELS), d, generator=g)
    terms[:, 5] += background[:, None] * water  # L1H1 writes the background
    terms[:, 3] += torch.randn(n, 1, generator=g) * bird  # L0MLP writes the core feature
    scores = component_scores(terms, {"background": water[None], "bird": bird[None]}, labels=LABELS)
    assert scores.top("background", 1, specific=True)[0][0] == "L1H1"
    before = pearson(terms.sum(1) @ water, background)
    ablated = mean_ablate_components(terms, scores.mask("background", 1, specific=True), labels=LABELS)
    after = pearson(ablated @ water, background)
    assert before > 0.7 and abs(after) < 0.1
    # only the chosen component's term was replaced by its mean: the core feature is still read off
    torch.testing.assert_close(ablated, terms.sum(1) - terms[:, 5] + terms[:, 5].mean(0), atol=1e-5, rtol=1e-5)
    assert pearson(ablated @ bird, terms.sum(1) @ bird) > 0.95


def test_clip_tower_without_projection_scores_exactly_as_clip_through_its_projection():
    """The toy CLIP's image tower minus W_proj is a "non-CLIP" model whose exact maps are all W_proj."""
    clip = load_toy_clip()
    vision = clip.vision
    cfg = dataclasses.replace(vision.cfg, d_proj=None, model_name="toy CLIP tower without projection")
    plain = HookedViT(cfg).eval()
    plain.load_state_dict({k: v for k, v in vision.state_dict().items() if k != "W_proj"})
    images = ToyWorld(seed=3).sample(96).images
    with torch.no_grad():
        _, cache = vision.run_with_cache(images, names_filter=required_hooks(vision, "head"))
        clip_parts = direct_contributions(vision, cache, level="head", ln_mode="paper")
    parts, targets = alignment_data(plain, clip, [images[:48], images[48:]], progress=False)
    assert_rel_close(parts.sum(), plain(images).detach(), rtol=1e-4, what="decomposition of the plain tower")
    torch.testing.assert_close(targets, clip.encode_image(images).detach())
    exact = ComponentAligner.from_weights(parts.labels, vision.W_proj.detach().repeat(len(parts.labels), 1, 1),
                                          torch.zeros(vision.cfg.d_proj))
    assert_rel_close(exact.aligned_sum(parts.values).detach(), targets, rtol=1e-4, what="exact maps")
    properties = property_embeddings(clip, {f: factor_prompts(f) for f in ("colour", "texture")}, templates=["{}"])
    ours = component_scores(parts, properties, aligner=exact)
    theirs = component_scores(clip_parts, properties)
    torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------- text, retrieval, hooks


def test_textspan_through_the_maps_finds_the_planted_descriptions():
    g = torch.Generator().manual_seed(4)
    d_clip, d_in, n = 16, 20, 400
    pool = F.normalize(torch.randn(30, d_clip, generator=g), dim=-1)
    aligned_head = torch.randn(n, 2, generator=g) * torch.tensor([3.0, 1.5]) @ pool[[7, 19]]  # a head writing 2 texts
    weight = torch.randn(len(LABELS), d_in, d_clip, generator=g)
    aligner = ComponentAligner.from_weights(LABELS, weight, torch.randn(d_clip, generator=g))
    x = torch.randn(n, len(LABELS), d_in, generator=g)
    # terms of L1H0 whose image under its map is the planted head (W has full row rank, so solve for x)
    x[:, 4] = torch.linalg.lstsq(weight[4].T, (aligned_head - aligner.bias.detach() / len(LABELS)).T).solution.T
    texts = [f"text {i}" for i in range(30)]
    found = interpret_components(x, aligner, pool, components=["L1H0", "L0H1"], n_texts=2, texts=texts,
                                 labels=LABELS, progress=False)
    assert list(found) == ["L0H1", "L1H0"] and found["L1H0"].texts == ["text 7", "text 19"]
    assert found["L1H0"].variance_explained[-1].item() == pytest.approx(1.0, abs=1e-4)
    direct = textspan(aligner.align(x)[:, 2], pool, 2, texts=texts)
    assert found["L0H1"].indices.tolist() == direct.indices.tolist()


def test_nearest_by_property_compares_the_top_components_unaligned():
    terms, properties = planted_property_terms(n=120)
    scores = component_scores(terms, properties, labels=LABELS)
    terms[77, 2] = 2 * terms[5, 2]  # image 77's P-head term points where image 5's does
    found = nearest_by_property(5, terms, scores, "P", n_components=1, specific=True, k=3)
    assert found.indices[0].item() == 77
    expected = nearest_by_components(5, terms, ["L0H1"], k=3, labels=LABELS)
    assert torch.equal(found.indices, expected.indices)


def test_mean_ablation_hooks_replace_each_component_by_its_mean(tiny_model, images):
    batch = torch.cat([images, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))])
    components = ["L2H1", "L2H3", "L1MLP", "L0ATTN"]
    names = ablation_hook_names(components)
    assert names == ["blocks.2.attn.hook_z", "blocks.1.hook_mlp_out", "blocks.0.hook_attn_out"]
    stats = compute_hook_statistics(tiny_model, [batch], names, progress=False)
    hooks = mean_ablation_hooks(components, stats)
    clean = tiny_model(batch)
    _, cache = tiny_model.run_with_cache(batch, fwd_hooks=hooks, names_filter=names)
    z = cache["blocks.2.attn.hook_z"]
    mean_z = stats.mean("blocks.2.attn.hook_z").float()
    torch.testing.assert_close(z[:, :, [1, 3]], mean_z[None, :, [1, 3]].expand(len(batch), -1, -1, -1))
    assert not torch.allclose(z[:, :, 0], mean_z[None, :, 0].expand(len(batch), -1, -1))
    for name in names[1:]:
        torch.testing.assert_close(cache[name], stats.mean(name).float()[None].expand_as(cache[name]))
    assert not torch.allclose(tiny_model.run_with_hooks(batch, fwd_hooks=hooks), clean)
    # ablating the embedding fixes the whole input: every image gets the same representation
    stats = compute_hook_statistics(tiny_model, [batch], ablation_hook_names(["embed"]), progress=False)
    out = tiny_model.run_with_hooks(batch, fwd_hooks=mean_ablation_hooks(["embed"], stats))
    torch.testing.assert_close(out, out[:1].expand_as(out))
    with pytest.raises(ValueError, match="per-token terms"):
        ablation_hook_names(["L1H0T3"])
    with pytest.raises(ValueError, match="constant 'bias'"):
        ablation_hook_names(["bias"])
    with pytest.raises(KeyError, match="ablation_hook_names"):
        mean_ablation_hooks(["L0H0"], stats)


def test_errors_name_what_was_passed():
    x, y, _, _ = planted_maps(n=50)
    with pytest.raises(ValueError, match=r"targets must be an \[image=50, d_clip\]"):
        train_aligner(x, y[:10], progress=False)
    with pytest.raises(ValueError, match="leaving none to train on"):
        train_aligner(x, y, validation=50, progress=False)
    with pytest.raises(ValueError, match=r"aligner= maps 3 components 4 -> 6"):
        train_aligner(x, y, aligner=ComponentAligner(["a", "b", "c"], 4, 6), progress=False)
    with pytest.raises(ValueError, match="linear combinations"):
        property_basis(torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    with pytest.raises(ValueError, match="two or more"):
        ComponentScores(torch.zeros(1, 2), ["colour"], ["a", "b"]).specific()
    with pytest.raises(KeyError, match="these scores are for"):
        ComponentScores(torch.zeros(1, 2), ["colour"], ["a", "b"]).top("shape")
    with pytest.raises(ValueError, match="width 6"):
        component_scores(torch.randn(10, 3, 5), torch.randn(2, 5), aligner=ComponentAligner(["#0", "#1", "#2"], 5, 6))
    with pytest.raises(ValueError, match=r"contributions must be \[batch, component=3, d_in=10\]"):
        ComponentAligner(["a", "b", "c"], 10, 6)(torch.randn(2, 3, 9))
