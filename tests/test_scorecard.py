"""The method scorecard (vit_lens.methods.scorecard): its comparison with the truth on hand-made scores, every
method on small random planted-architecture models, the wall between methods and the truth, and bad input.

(Threshold checks on the trained planted models come with their weights.)
"""

import inspect
import itertools
import json

import pytest
import torch

from vit_lens.methods import scorecard as sc
from vit_lens.methods.segmentation.maps import average_precision
from vit_lens.model.config import ViTConfig
from vit_lens.model.hooked_vit import HookedViT
from vit_lens.planted import PlantedHead, PlantedModel
from vit_lens.planted.model import build_classifier
from vit_lens.planted.truth import (
    BACKGROUND_PATCHES,
    CLASSIFIER_INERT_MLPS,
    CLS,
    OBJECT_PATCHES,
    TOKEN_GROUPS,
    heads_by_factor,
    inert_heads,
)
from vit_lens.toy import FACTORS, ToyWorld, build_toy_clip

SEED = 515_151


def planted_with(model, planted_heads=None) -> PlantedModel:
    """A PlantedModel of ``model`` with the classifier's truth, or with the ``planted_heads`` given."""
    if planted_heads is None:
        return PlantedModel(model, heads_by_factor(), inert_heads(), list(CLASSIFIER_INERT_MLPS))
    return PlantedModel(model, heads_by_factor(planted_heads), inert_heads(planted_heads), [3], planted_heads)


@pytest.fixture(scope="module")
def untrained() -> PlantedModel:
    torch.set_num_threads(1)
    return planted_with(build_classifier(seed=0).eval())


SCORED = ("colour", "position", "size")  # a one-head factor, the two-hop one, and one whose pairs change layout


@pytest.fixture(scope="module")
def data() -> sc.TaskData:
    return sc.task_data(n_images=12, n_pairs=6, seed=SEED, factors=SCORED)


@pytest.fixture(scope="module")
def scores(untrained, data) -> sc.HeadScores:
    return sc.score_heads(untrained, data=data)


def hand_made(planted: PlantedModel, make) -> sc.HeadScores:
    """HeadScores of one method whose per-factor scores are ``make(head truth, group truth)``."""
    heads, groups, reads = {}, {}, {}
    for factor in FACTORS:
        truth_heads, truth_groups, truth_reads = sc.truth_labels(planted, factor)
        heads[factor], groups[factor] = make(truth_heads.float(), truth_groups.float())
        reads[factor] = truth_reads.float()
    return sc.HeadScores({"hand": sc.MethodScores(heads, groups, reads)}, tuple(FACTORS), "classifier", 1, 1, 0)


# ---------------------------------------------------------------------------- comparison with the truth


def test_truth_labels_put_each_planted_head_at_the_group_where_its_output_matters_and_the_one_it_reads(untrained):
    heads, groups, reads = sc.truth_labels(untrained, "position")
    assert heads.nonzero().tolist() == [[0, 1], [2, 1]]
    # hop 1 writes into every patch token (which ones carry a pair's difference depends on the pair), hop 2 into CLS
    assert groups[0, 1].tolist() == [g != CLS for g in TOKEN_GROUPS]
    assert groups[2, 1].tolist() == [g == CLS for g in TOKEN_GROUPS]
    assert int(groups.sum()) == 3
    # ... while hop 1 reads the object patches and hop 2 the background patches
    assert reads[0, 1].tolist() == [g == OBJECT_PATCHES for g in TOKEN_GROUPS]
    assert reads[2, 1].tolist() == [g == BACKGROUND_PATCHES for g in TOKEN_GROUPS] and int(reads.sum()) == 2
    colour_heads, colour_groups, colour_reads = sc.truth_labels(untrained, "colour")
    assert colour_heads.nonzero().tolist() == [[0, 0]] and colour_groups.nonzero().tolist() == [[0, 0, 2]]
    assert colour_reads.nonzero().tolist() == [[0, 0, 0]]


def test_perfect_reversed_and_tied_rankings_score_what_they_should(untrained):
    perfect = sc.evaluate_against_truth(hand_made(untrained, lambda h, g: (h, g)), untrained)
    assert all(row["ap"] == row["top1"] == row["group_ap"] == row["read_ap"] == 1.0 for row in perfect)
    reversed_rows = {r["factor"]: r for r in sc.evaluate_against_truth(
        hand_made(untrained, lambda h, g: (-h, -g)), untrained)}
    # one positive ranked last of 16: AP = 1/16; position's two tie for last, one threshold: AP = 2/16
    assert reversed_rows["colour"]["ap"] == pytest.approx(1 / 16)
    assert reversed_rows["position"]["ap"] == pytest.approx(2 / 16)
    assert reversed_rows["colour"]["group_ap"] == pytest.approx(1 / 48)
    assert all(row["top1"] == 0.0 for row in reversed_rows.values())
    tied = {r["factor"]: r for r in sc.evaluate_against_truth(
        hand_made(untrained, lambda h, g: (torch.zeros_like(h), torch.zeros_like(g))), untrained)}
    # all heads tied: one threshold, precision P/16; a tie for the top hits with probability P/16
    assert tied["position"]["ap"] == pytest.approx(2 / 16) and tied["position"]["top1"] == pytest.approx(2 / 16)
    assert tied["shape"]["top1"] == pytest.approx(1 / 16)


def test_one_planted_head_second_gives_ap_one_half_and_a_miss(untrained):
    def second(h, g):
        scores = h.clone()
        scores[3, 3] = 2.0  # an inert head above the planted one
        return scores, g

    rows = {r["factor"]: r for r in sc.evaluate_against_truth(hand_made(untrained, second), untrained)}
    assert rows["colour"]["ap"] == pytest.approx(0.5) and rows["colour"]["top1"] == 0.0
    assert rows["colour"]["top_head"] == "L3H3"
    summary = {r["method"]: r for r in sc.summarise(list(rows.values()))}["hand"]
    assert summary["top1_hits"] == 0 and summary["mean_group_ap"] == 1.0


@pytest.mark.parametrize(("n_positive", "n_items"), [(1, 4), (2, 5), (3, 6)])
def test_chance_average_precision_is_the_mean_over_every_ranking(n_positive, n_items):
    aps = []
    for order in itertools.permutations(range(n_items)):
        scores = torch.tensor(order, dtype=torch.float64)[None]
        labels = torch.arange(n_items)[None] < n_positive
        aps.append(average_precision(scores, labels).item())
    assert sc.chance_average_precision(n_positive, n_items) == pytest.approx(sum(aps) / len(aps))


# ---------------------------------------------------------------------------- every method runs


def test_every_classifier_method_returns_finite_scores_of_the_right_shapes(scores, data):
    assert set(scores.methods) == set(sc.HEAD_METHODS) - {"textspan"}
    with_reads = {"direct_contributions", "random"}
    for key, result in scores.methods.items():
        assert (result.head_groups is None) == (key == "direct_contributions"), key
        assert (result.head_reads is not None) == (key in with_reads), key
        for factor in SCORED:
            assert result.heads[factor].shape == (4, 4), key
            assert torch.isfinite(result.heads[factor]).all(), key
            for by_group in (result.head_groups, result.head_reads):
                if by_group is not None:
                    assert by_group[factor].shape == (4, 4, 3) and torch.isfinite(by_group[factor]).all(), key
    # the baselines: seeded random scores differ between factors, the variance ranking does not
    random = scores.methods["random"].heads
    assert not torch.equal(random["size"], random["colour"])
    variance = scores.methods["output_variance"].heads
    assert torch.equal(variance["size"], variance["colour"]) and (variance["size"] > 0).all()


def test_scores_that_add_up_over_token_groups_do(scores):
    # attribution patching and direct contributions are linear: the three groups partition the tokens
    for key, kind in (("attribution_patching", "head_groups"), ("direct_contributions", "head_reads")):
        result = scores.methods[key]
        for factor in SCORED:
            by_group = getattr(result, kind)[factor]
            torch.testing.assert_close(by_group.sum(-1), result.heads[factor], atol=1e-4, rtol=1e-4)


def test_the_group_patch_at_every_token_is_the_libraries_head_patch(untrained, data, scores):
    model, factor, (layer, head) = untrained.model, "size", (1, 2)
    pairs = data.pairs[factor]
    readout = sc.factor_readout(model)
    metric = sc._pair_metric(readout, factor, pairs)
    with torch.no_grad():
        _, clean = model.run_with_cache(pairs.clean, names_filter=f"blocks.{layer}.attn.hook_z")
        every = torch.ones(pairs.clean.shape[0], 65, dtype=torch.bool)
        hook = sc._where_hook(head, clean[f"blocks.{layer}.attn.hook_z"][:, :, head], every)
        patched = metric(model.run_with_hooks(pairs.corrupted, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)]))
        clean_metric, corrupted_metric = metric(model(pairs.clean)), metric(model(pairs.corrupted))
    restored = (patched.mean() - corrupted_metric.mean()) / (clean_metric.mean() - corrupted_metric.mean())
    expected = scores.methods["activation_patching"].heads[factor][layer, head]
    assert restored.item() == pytest.approx(expected.item(), abs=1e-4)


def test_every_method_runs_on_a_clip_with_its_zero_shot_readout():
    clip = build_toy_clip(seed=0).eval()
    data = sc.task_data(n_images=8, n_pairs=3, seed=SEED, factors=["colour"])
    scores = sc.score_heads(clip, data=data)
    assert set(scores.methods) == set(sc.HEAD_METHODS) and scores.model_kind == "clip"
    for key, result in scores.methods.items():
        for factor in ("colour",):
            assert result.heads[factor].shape == (4, 4) and torch.isfinite(result.heads[factor]).all(), key
            if key in ("textspan", "direct_contributions"):
                assert result.head_groups is None
            else:
                assert result.head_groups[factor].shape == (4, 4, 3), key
    # TextSpan's share: the picked texts' variance that mentions the factor, at most all the variance explained
    textspan = scores.methods["textspan"].heads
    assert ((textspan["colour"] >= 0) & (textspan["colour"] <= 1 + 1e-6)).all() and textspan["colour"].sum() > 0


def test_localisation_baselines_score_what_they_should(untrained):
    batch = ToyWorld(seed=SEED).sample(6, seed=SEED)
    rows = {r["method"]: r for r in sc.localisation_scores(untrained, batch=batch)}
    assert set(rows) == {"text_maps", "raw_attention", "rollout", "gradcam", "chefer", "constant", "colour_distance"}
    for row in rows.values():
        assert 0 <= row["iou_foreground"] <= 1 and 0 <= row["miou"] <= 1 and 0 <= row["pixel_accuracy"] <= 1
    # a constant map is all background after the protocol's min-max: it is right on every background pixel
    background = 1 - batch.foreground.float().mean().item()
    assert rows["constant"]["pixel_accuracy"] == pytest.approx(background)
    assert rows["constant"]["iou_foreground"] == 0.0
    distance = sc.colour_distance_maps(batch.images, batch.factors["colour"])
    assert distance[batch.foreground].mean() > distance[~batch.foreground].mean() + 0.2


def test_the_scorecard_prints_and_serialises(untrained):
    card = sc.scorecard(untrained, n_images=6, n_pairs=3, n_localisation=4, methods=["direct_contributions", "random"])
    text = card.markdown()
    assert "| direct contributions |" in text and "| random ranking (baseline) |" in text
    assert "| constant map (baseline) |" in text and "chance" in text
    restored = json.loads(json.dumps(card.to_json()))
    assert restored["model"] == "classifier" and len(restored["rows"]) == 2 * len(FACTORS)
    assert {r["method"] for r in restored["summary"]} == {"direct_contributions", "random"}


# ---------------------------------------------------------------------------- the truth stays out


def test_methods_take_the_model_and_task_data_never_the_planted_model(untrained, data):
    readout = sc.factor_readout(untrained.model)
    for key, method in sc.HEAD_METHODS.items():
        assert list(inspect.signature(method).parameters) == ["model", "data", "readout"], key
        with pytest.raises(TypeError, match="not the PlantedModel"):
            method(untrained, data, readout)
    with pytest.raises(TypeError, match="not the PlantedModel"):
        sc.factor_readout(untrained)


def test_scores_do_not_depend_on_the_truth(untrained, data):
    # the same weights with another answer key: every method must give exactly the same scores
    other = tuple(PlantedHead(h.layer, (h.head + 2) % 4, h.factor, h.writes, h.reads) for h in untrained.planted_heads)
    methods = ["mean_ablation", "direct_contributions", "random", "output_variance"]
    first = sc.score_heads(untrained, data=data, methods=methods)
    second = sc.score_heads(planted_with(untrained.model, other), data=data, methods=methods)
    for key in methods:
        for factor in SCORED:
            assert torch.equal(first.methods[key].heads[factor], second.methods[key].heads[factor]), key
    # ... while the comparison with the truth does change
    ap = [{r["factor"]: r["ap"] for r in sc.evaluate_against_truth(s, p)}
          for s, p in ((first, untrained), (second, planted_with(untrained.model, other)))]
    assert ap[0] != ap[1]


# ---------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_what_works(untrained, data):
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['saliency'\].*mean_ablation"):
        sc.score_heads(untrained, data=data, methods=["saliency"])
    with pytest.raises(ValueError, match=r"unknown factor\(s\) \['hue'\].*'colour'"):
        sc.score_heads(untrained, factors=["hue"])
    with pytest.raises(ValueError, match=r"factors is empty; name at least one of \['shape'"):
        sc.task_data(factors=[])
    with pytest.raises(ValueError, match=r"methods is empty"):
        sc.score_heads(untrained, data=data, methods=[])
    with pytest.raises(ValueError, match=r"unknown factor 'hue'.*'colour'"):
        sc.truth_labels(untrained, "hue")
    with pytest.raises(ValueError, match=r"\['textspan'\] need a CLIP"):
        sc.score_heads(untrained, data=data, methods=["textspan"])
    with pytest.raises(ValueError, match="pass factors= or data=, not both"):
        sc.score_heads(untrained, data=data, factors=["colour"])
    with pytest.raises(ValueError, match="n_pairs must be an int of at least 2"):
        sc.task_data(n_images=8, n_pairs=1)
    other = HookedViT(ViTConfig(d_model=32, n_layers=1, n_heads=2, d_head=16, d_mlp=64, patch_size=8, image_size=64,
                                n_classes=10, model_name="ten-class ViT"))
    with pytest.raises(ValueError, match="ten-class ViT outputs 10 values.*23 factor logits"):
        sc.score_heads(other, data=data)
    with pytest.raises(TypeError, match="HookedViT classifier or a HookedCLIP, got str"):
        sc.score_heads("classifier")
    with pytest.raises(TypeError, match="needs a PlantedModel"):
        sc.scorecard(untrained.model)
