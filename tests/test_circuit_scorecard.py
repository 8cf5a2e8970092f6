"""The planted classifier's edge truth and the circuit scorecard (issue 21, point 6)."""

import json

import pytest
import torch

from vit_lens.circuits.attribution import EdgeScores
from vit_lens.circuits.graph import CircuitGraph
from vit_lens.methods import circuit_scorecard as cs
from vit_lens.methods.circuit_scorecard import circuit_scorecard, edge_metrics, evaluate_edges, precision_at_k, score_edges
from vit_lens.model.hooked_vit import HookedViT
from vit_lens.planted import load_planted
from vit_lens.planted.truth import NEGATIVE, POSITIVE, UNKNOWN, edge_truth, heads_by_factor, inert_heads

GRAPH = CircuitGraph(4, 4, 65, ("all",), None)

# (positive, negative, unknown) real edges per factor, of the graph's 479, counted by hand from the rule:
# colour's positives are input -> L0H0's q, k, v and L0H0 -> m0, m1, m2, logits (7); position's are input -> L0H1
# (3), L0H1 -> m0, m1 (2), L0H1, m0, m1 -> L2H1's q, k, v (9), L2H1 -> m2, logits (2).
COUNTS = {
    "colour": (7, 352, 120),
    "position": (16, 361, 102),
    "texture": (9, 354, 116),
    "shape": (9, 354, 116),
    "size": (11, 354, 114),
    "count": (13, 352, 114),
}


def label(truth: torch.Tensor, edge: str) -> int:
    s, r, _ = GRAPH.edge_index(edge)
    return int(truth[s, r])


@pytest.fixture(scope="module")
def planted():
    torch.set_num_threads(1)
    return load_planted("classifier")


# ============================================================================ the truth


@pytest.mark.parametrize("factor", list(COUNTS))
def test_edge_truth_counts_per_factor(factor):
    truth = edge_truth(factor)
    assert truth.dtype == torch.int8 and truth.shape == (GRAPH.n_senders, GRAPH.n_receivers)
    known = truth[GRAPH.real]
    assert tuple(int((known == v).sum()) for v in (POSITIVE, NEGATIVE, UNKNOWN)) == COUNTS[factor]
    assert bool((truth[~GRAPH.real] == UNKNOWN).all()), "pairs that are no edge must be left out"


def test_position_two_hop_route_and_its_skips():
    truth = edge_truth("position")
    for edge in ("input->a0.h1<q>", "a0.h1->a2.h1<v>", "a0.h1->a2.h1<k>", "m0->a2.h1<v>", "m1->a2.h1<q>",
                 "a0.h1->m0", "a2.h1->logits", "a2.h1->m2"):
        assert label(truth, edge) == POSITIVE, edge
    # a hop skipped: hop 1 read without hop 2, hop 2 without hop 1, or the factor without either
    for edge in ("a0.h1->logits", "a0.h1->m2", "input->a2.h1<v>", "input->a2.h1<q>", "input->logits", "input->m0",
                 "m0->logits", "m1->logits", "m0->m2"):
        assert label(truth, edge) == NEGATIVE, edge
    # measured routes through other factors' heads (layer 1's keys) are unknown, not negative
    for edge in ("a0.h1->a1.h1<k>", "a1.h1->a2.h1<v>", "a1.h0->a2.h1<v>"):
        assert label(truth, edge) == UNKNOWN, edge
    # glue edges on the route: the design does not say which MLP routes are used
    unknown = [GRAPH.edge_name(s, r, 0) for s, r in ((truth == UNKNOWN) & GRAPH.real).nonzero().tolist()]
    assert [edge for edge in unknown if not any(end.startswith("a") for end in edge.split("->"))] == [
        "m0->m1", "m2->logits"]


@pytest.mark.parametrize("factor", list(COUNTS))
def test_inert_edges_are_negative_even_when_they_touch_another_factors_head(factor):
    truth = edge_truth(factor)
    others = {head for f, heads in heads_by_factor().items() if f != factor for head in heads}
    inert_senders = {GRAPH.head_sender(*h) for h in inert_heads()} | {GRAPH.mlp_sender(3)}
    inert_receivers = {GRAPH.head_receiver(*h, qkv) for h in inert_heads() for qkv in "qkv"} | {GRAPH.mlp_receiver(3)}
    other_senders = {GRAPH.head_sender(*h) for h in others}
    other_receivers = {GRAPH.head_receiver(*h, qkv) for h in others for qkv in "qkv"}
    n_inert = 0
    for s, r in GRAPH.real.nonzero().tolist():
        if s in inert_senders or r in inert_receivers:
            assert int(truth[s, r]) == NEGATIVE, GRAPH.edge_name(s, r, 0)
            n_inert += 1
        elif s in other_senders or r in other_receivers:
            assert int(truth[s, r]) == UNKNOWN, GRAPH.edge_name(s, r, 0)
    assert n_inert > 150
    # a planted head's own edges into inert nodes are negatives too (L3H0 -> MLP 3 for count)
    assert label(edge_truth("count"), "a3.h0->m3") == NEGATIVE
    assert label(edge_truth("count"), "a3.h0->logits") == POSITIVE


def test_single_head_factors_positive_edges_all_touch_their_head():
    for factor, heads in heads_by_factor().items():
        truth = edge_truth(factor)
        mine = {f"a{layer}.h{head}" for layer, head in heads}
        for s, r in (truth == POSITIVE).nonzero().tolist():
            sender, receiver = GRAPH.edge_name(s, r, 0).split("->")
            assert sender in mine or receiver.split("<")[0] in mine


def test_edge_truth_refuses_unknown_factors_and_too_small_models():
    with pytest.raises(ValueError, match=r"'hue'.*'colour'"):
        edge_truth("hue")
    with pytest.raises(ValueError, match=r"outside a model of 2 layers x 4 heads"):
        edge_truth("count", n_layers=2)
    with pytest.raises(ValueError, match=r"n_heads must be a positive int"):
        edge_truth("count", n_heads=0)


# ============================================================================ the metrics


def test_edge_metrics_against_a_hand_example():
    truth = torch.tensor([[1, 0, -1, 0], [1, 0, -1, 0]], dtype=torch.int8)
    # |scores| of the known edges: positives 0.9 (given negative: ranking is by magnitude) and 0.4; negatives
    # 0.5, 0.4, 0.1; the unknown edges score highest and must be ignored
    scores = torch.tensor([[-0.9, 0.5, 10.0, 0.1], [0.4, 0.4, -10.0, 0.0]])
    truth[1, 3] = -1
    metrics = edge_metrics(scores, truth)
    # positive-negative pairs: 0.9 beats all three (3); 0.4 beats 0.1, ties 0.4, loses to 0.5 (1.5); 4.5 / 6
    assert metrics["auroc"] == pytest.approx(0.75)
    # thresholds 0.9 (precision 1, recall 1/2), 0.5 (1/2, 1/2), 0.4 (2/4, 1): AP = 1/2 * 1 + 1/2 * 1/2
    assert metrics["ap"] == pytest.approx(0.75)
    assert metrics["precision_at_k"] == pytest.approx(0.5)  # k = 2: 0.9 (positive), 0.5 (negative)
    assert (metrics["n_positive"], metrics["n_negative"]) == (2, 3)
    assert metrics["chance_precision"] == pytest.approx(2 / 5)


def test_precision_at_k_breaks_a_tie_at_the_cut_by_its_expected_share():
    labels = torch.tensor([True, False, True, False])
    assert precision_at_k(torch.tensor([3.0, 1.0, 1.0, 1.0]), labels, 2) == pytest.approx((1 + 1 / 3) / 2)
    assert precision_at_k(torch.tensor([3.0, 2.0, 1.0, 0.0]), labels, 2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k must be from 1"):
        precision_at_k(torch.tensor([1.0]), torch.tensor([True]), 2)


def test_edge_metrics_refuse_non_finite_scores_and_shape_mismatches():
    truth = edge_truth("colour")
    scores = torch.zeros(truth.shape)
    scores[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        edge_metrics(scores, truth)
    with pytest.raises(ValueError, match="one shape"):
        edge_metrics(torch.zeros(3, 3), truth)


# ============================================================================ the scorecard


def test_random_ranking_scores_chance(planted):
    scores = score_edges(planted, n_pairs=2, methods=["random"], faithfulness=False)
    rows = evaluate_edges(scores, planted)
    mean = sum(row["auroc"] for row in rows) / len(rows)
    assert len(rows) == 6 and 0.35 < mean < 0.65  # measured 0.49
    assert all(row["ap"] < 0.25 for row in rows)


def test_scorecard_on_two_factors(planted):
    card = circuit_scorecard(planted, n_pairs=8, seed=2, factors=["colour", "position"],
                             methods=["eap", "eap_ig_inputs", "node_attribution", "random"], faithfulness=False)
    rows = {(row["method"], row["factor"]): row for row in card.rows}
    # measured (8 pairs, seeds 1-3): EAP-IG AUROC 0.92-1.00, AP on position 0.62-0.75; EAP 0.92-1.00
    for factor in ("colour", "position"):
        assert rows[("eap_ig_inputs", factor)]["auroc"] > 0.85
        assert rows[("eap", factor)]["auroc"] > 0.85
    assert rows[("eap_ig_inputs", "position")]["ap"] > 0.45
    # node attribution ranks edges by their nodes, so on the two-hop route it cannot tell hop 1 -> hop 2 from
    # hop 1 -> logits: measured AP 0.11-0.15
    assert rows[("node_attribution", "position")]["ap"] < 0.3
    assert rows[("random", "colour")]["auroc"] < 0.75
    summary = {row["method"]: row for row in card.summary}
    assert summary["eap_ig_inputs"]["mean_auroc"] > summary["random"]["mean_auroc"] + 0.25
    text = card.markdown()
    assert "| EAP-IG, inputs (5 steps) |" in text and "position (16/361)" in text
    data = json.loads(json.dumps(card.to_json()))
    assert data["settings"]["n_edges"] == 479 and len(data["rows"]) == 8
    assert all(row["cpr"] is None for row in data["rows"]) and "CPR / CMD per factor" not in text


def test_faithfulness_of_the_methods_circuits(planted):
    # CPR and CMD come from real runs of each method's circuits, with no truth: measured on position (4 pairs,
    # seeds 1-3) EAP-IG 0.88-0.95 / 0.10-0.13 and random 0.17-0.30 / 0.70-0.83
    card = circuit_scorecard(planted, n_pairs=4, seed=2, factors=["position"], methods=["eap_ig_inputs", "random"])
    rows = {row["method"]: row for row in card.rows}
    assert rows["eap_ig_inputs"]["cpr"] > rows["random"]["cpr"] + 0.4
    assert rows["eap_ig_inputs"]["cmd"] < rows["random"]["cmd"] - 0.4
    assert 0 <= rows["eap_ig_inputs"]["cmd"] < 0.3
    assert "CPR / CMD per factor" in card.markdown()


def test_methods_never_see_the_truth(planted, monkeypatch):
    seen = []

    def spy(model, graph, pairs, metric, seed):
        seen.append(model)
        return EdgeScores(graph, torch.zeros(graph.shape), "spy")

    monkeypatch.setitem(cs.EDGE_METHODS, "spy", spy)
    scores = score_edges(planted, n_pairs=2, methods=["spy"], factors=["size"], faithfulness=False)
    assert seen and all(type(model) is HookedViT for model in seen)
    assert scores.scores["spy"]["size"].method == "spy"
    with pytest.raises(TypeError, match="PlantedModel"):
        evaluate_edges(scores, planted.model)  # the truth comes from the planted model only
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['acdc_typo'\]"):
        score_edges(planted, n_pairs=2, methods=["acdc_typo"])
