"""Circuit evaluation (MIB): faithfulness from real patched runs, CPR and CMD, top-n and greedy circuits.

The identities checked: f(∅) = 0 and f(N) = 1; on a model affine in every receiver input, a circuit that
keeps every edge but some into the output loses exactly those edges' exact scores, and a circuit of
output edges alone is the corrupted run (its senders read only patched inputs); areas of hand-made
curves; greedy circuits hang together from the output; pruning leaves the metric alone under
counterfactual patching.
"""

import math

import pytest
import torch
from conftest import first_minus_second as _metric, seeded_images as _images, tiny_config
from test_circuits import _affine_hooks

from vit_lens.circuits import (
    CircuitGraph,
    EdgeScores,
    edge_attribution_patching,
    evaluate_methods,
    exact_edge_patching,
    faithfulness_curve,
    random_edge_scores,
)
from vit_lens.circuits.evaluation import (
    FaithfulnessCurve,
    area_under_curve,
    circuit_metrics,
    connected_edges,
    greedy_circuit,
    receiver_nodes,
)
from vit_lens.model.hooked_vit import HookedViT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> HookedViT:
    return HookedViT(tiny_config(n_registers=1)).init_weights(seed=3).eval()


@pytest.fixture(scope="module")
def affine():
    """A 2-layer model made affine in every receiver input, its graph split by token, pairs and exact scores."""
    model = HookedViT(tiny_config(n_layers=2, n_registers=0, d_proj=None, n_classes=4)).init_weights(seed=2).eval()
    graph = CircuitGraph.from_model(model, token_groups="tokens")
    clean, corrupted = _images(3, 8), _images(3, 7)
    hooks = _affine_hooks(model)
    with model.hooks(fwd_hooks=hooks):
        exact = exact_edge_patching(model, graph, clean, corrupted, _metric)
    # signed rankings (CPR) assume a metric that is higher on the clean images
    assert exact.baseline_clean > exact.baseline_corrupted + 0.05
    return model, graph, clean, corrupted, hooks, exact


def test_empty_circuit_is_0_and_full_model_is_1(model):
    graph = CircuitGraph.from_model(model)
    clean, corrupted = _images(4, 1), _images(4, 2)
    eap = edge_attribution_patching(model, graph, clean, corrupted, _metric)
    curve = faithfulness_curve(model, graph, eap, clean, corrupted, _metric, sizes=(0.0, 0.1, 1.0))
    assert curve.n_edges == [0, math.floor(0.1 * graph.n_edges + 0.5), graph.n_edges]
    assert curve.faithfulness[0] == pytest.approx(0.0, abs=1e-5)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        assert curve.clean == pytest.approx(float(_metric(model(clean)).mean()), rel=1e-5)
        assert curve.corrupted == pytest.approx(float(_metric(model(corrupted)).mean()), rel=1e-4)
    # a real forward pass: the middle circuit is neither end
    assert abs(curve.faithfulness[1]) > 1e-3 and abs(curve.faithfulness[1] - 1) > 1e-3
    assert len(curve.figure().data[0].y) == 3


def test_removing_output_edges_loses_exactly_their_exact_scores_on_an_affine_model(affine):
    model, graph, clean, corrupted, hooks, exact = affine
    into_output = torch.zeros(graph.shape, dtype=torch.bool)
    into_output[:, graph.output_receiver] = graph.real[:, graph.output_receiver, None]
    # rank every other edge first, then the output edges by their exact score: top-n keeps everything
    # upstream and the best k output edges
    ranking = torch.where(into_output, exact.scores, torch.full(graph.shape, 1e6)) * graph.real[..., None]
    scores = EdgeScores(graph, ranking, "upstream first")
    n_upstream = graph.n_edges - int(into_output.sum())
    total = exact.baseline_clean - exact.baseline_corrupted
    with model.hooks(fwd_hooks=hooks):
        for k in (1, 4, 9):
            size = (n_upstream + k) / graph.n_edges
            curve = faithfulness_curve(model, graph, scores, clean, corrupted, _metric, sizes=(0.0, size))
            kept = scores.top(n_upstream + k) & into_output
            assert int(kept.sum()) == k
            # paths into the output pass through exactly one output edge, so removing a set of them removes
            # each one's paths once: 1 - f(C) = sum of the removed edges' exact scores / total
            expected = float(exact.scores[into_output & ~kept].sum()) / total
            assert 1 - curve.faithfulness[1] == pytest.approx(expected, abs=1e-4)
            # ... which equals the kept ones' share, since the output edges' scores sum to the total
            assert curve.faithfulness[1] == pytest.approx(float(exact.scores[kept].sum()) / total, abs=1e-4)
        # the identity needs every upstream edge: output edges alone carry senders that read only patched
        # inputs, i.e. their corrupted outputs, so that circuit is the corrupted run
        alone, clean_value, corrupted_value = circuit_metrics(model, graph, into_output, clean, corrupted, _metric)
    assert alone[0] == pytest.approx(corrupted_value, abs=1e-4)
    assert float(exact.scores[into_output].sum()) == pytest.approx(clean_value - corrupted_value, rel=1e-4)


def test_areas_of_hand_made_curves():
    curve = FaithfulnessCurve("hand", (0.0, 0.5, 1.0), [0, 5, 10], [0.0, 0.5, 1.0], clean=1.0, corrupted=0.0,
                              selection="top_n", absolute=False)
    assert curve.cpr == pytest.approx(0.5) and curve.cmd == pytest.approx(0.5)
    # uneven sizes, the baseline not at 0, faithfulness beyond 1 counts in CMD either way
    curve = FaithfulnessCurve("hand", (0.1, 0.2, 1.0), [1, 2, 10], [2.4, 4.0, 4.4], clean=4.0, corrupted=2.0,
                              selection="top_n", absolute=True)
    assert curve.faithfulness == pytest.approx([0.2, 1.0, 1.2])
    assert curve.cpr == pytest.approx((0.1 * (0.2 + 1.0) / 2 + 0.8 * (1.0 + 1.2) / 2) / 0.9)
    assert curve.cmd == pytest.approx((0.1 * (0.8 + 0.0) / 2 + 0.8 * (0.0 + 0.2) / 2) / 0.9)
    with pytest.raises(ValueError, match="at least two sizes"):
        area_under_curve([0.5], [1.0])


def test_exact_scores_beat_a_random_ranking_on_the_affine_model(affine):
    model, graph, clean, corrupted, hooks, exact = affine
    with model.hooks(fwd_hooks=hooks):
        eap = edge_attribution_patching(model, graph, clean, corrupted, _metric)
        results = evaluate_methods(model, graph, [exact, eap, random_edge_scores(graph, seed=0)], clean,
                                   corrupted, _metric)
    perfect, random = results["exact edge patching"], results["random"]
    assert perfect.cmd < 0.5 * random.cmd
    assert perfect.cpr > random.cpr + 0.1
    # EAP is exact here, so its curves are the exact scores' curves
    assert results["EAP"].cmd == pytest.approx(perfect.cmd, abs=1e-3)
    # the shared batch gives the same numbers as one curve at a time
    with model.hooks(fwd_hooks=hooks):
        alone = faithfulness_curve(model, graph, exact, clean, corrupted, _metric, absolute=True)
    assert alone.cmd == pytest.approx(perfect.cmd, abs=1e-5) and alone.n_edges == perfect.absolute.n_edges


def test_greedy_circuits_hang_together_from_the_output(model):
    graph = CircuitGraph.from_model(model, token_groups="tokens")
    clean, corrupted = _images(4, 3), _images(4, 4)
    eap = edge_attribution_patching(model, graph, clean, corrupted, _metric)
    nodes = receiver_nodes(graph)
    curve = faithfulness_curve(model, graph, eap, clean, corrupted, _metric, sizes=(0.01, 0.05, 0.2, 1.0),
                               selection="greedy")
    assert curve.n_edges == [math.floor(s * graph.n_edges + 0.5) for s in (0.01, 0.05, 0.2, 1.0)]
    for circuit in curve.circuits:
        senders_used = circuit.any(-1).any(-1)
        for s, r, g in graph.edges(circuit):
            assert nodes[r] == -1 or senders_used[nodes[r]], graph.edge_name(s, r, g)
        assert bool((circuit <= graph.real[..., None]).all())
    # the nesting of sizes: each circuit contains the smaller ones
    assert all(bool((a <= b).all()) for a, b in zip(curve.circuits, curve.circuits[1:]))
    # greedy is not top-n: the best edge into a head nobody reads yet waits
    small = greedy_circuit(eap, 20)
    assert int(small.sum()) == 20 and not torch.equal(small, eap.top(20))


def test_pruning_drops_dangling_edges_and_keeps_the_metric(model):
    graph = CircuitGraph.from_model(model)
    clean, corrupted = _images(4, 5), _images(4, 6)
    eap = edge_attribution_patching(model, graph, clean, corrupted, _metric)
    sizes = (0.02, 0.05, 0.1, 0.3)
    plain = faithfulness_curve(model, graph, eap, clean, corrupted, _metric, sizes=sizes)
    pruned = faithfulness_curve(model, graph, eap, clean, corrupted, _metric, sizes=sizes, prune=True)
    assert all(p <= q for p, q in zip(pruned.n_edges, plain.n_edges)) and pruned.n_edges != plain.n_edges
    assert pruned.metric == pytest.approx(plain.metric, abs=1e-4)
    # by hand: an edge out of a head that reads nothing is dropped, one on an input-to-output path kept
    circuit = torch.zeros(graph.shape, dtype=torch.bool)
    for name in ("input->a0.h1<v>", "a0.h1->logits", "a1.h2->logits"):
        circuit[graph.edge_index(name)] = True
    kept = connected_edges(graph, circuit)
    assert {graph.edge_name(*e) for e in graph.edges(kept)} == {"input->a0.h1<v>", "a0.h1->logits"}


def test_bad_evaluation_inputs_raise(model):
    graph = CircuitGraph.from_model(model)
    clean, corrupted = _images(2, 1), _images(2, 2)
    scores = random_edge_scores(graph)
    with pytest.raises(ValueError, match="increasing fractions"):
        faithfulness_curve(model, graph, scores, clean, corrupted, _metric, sizes=(0.5, 0.1))
    with pytest.raises(ValueError, match="selection must be one of"):
        faithfulness_curve(model, graph, scores, clean, corrupted, _metric, selection="best")
    with pytest.raises(ValueError, match="index another graph"):
        faithfulness_curve(model, CircuitGraph.from_model(model, "tokens"), scores, clean, corrupted, _metric)
    with pytest.raises(ValueError, match="faithfulness .* is undefined"):
        faithfulness_curve(model, graph, scores, clean, clean, _metric)
    with pytest.raises(TypeError, match="must be EdgeScores"):
        faithfulness_curve(model, graph, scores.scores, clean, corrupted, _metric)
