"""ACDC and the learned edge mask: what they keep, on a random model and on one built with a single route.

The built model has every head's output projection zeroed but head 0.1's and every MLP's output zeroed,
and reads the CLS token: the only edges that change its output are head 0.1 -> output at CLS and the
input -> head 0.1's keys and values at the patches (the CLS embedding is the same in every image).
"""

import pytest
import torch
from conftest import first_minus_second as _metric, seeded_images as _images, tiny_config

from vit_lens.circuits import CircuitGraph, exact_edge_patching
from vit_lens.circuits.discovery import acdc, acdc_sweep, learned_edge_mask
from vit_lens.circuits.evaluation import faithfulness_curve
from vit_lens.model.hooked_vit import HookedViT

pytestmark = pytest.mark.usefixtures("one_thread")

ROUTE = {"a0.h1->logits@CLS", "input->a0.h1<k>@patches", "input->a0.h1<v>@patches"}


@pytest.fixture(scope="module")
def model() -> HookedViT:
    return HookedViT(tiny_config(n_layers=2, n_registers=0, d_proj=None, n_classes=4)).init_weights(seed=3).eval()


@pytest.fixture(scope="module")
def one_route():
    model = HookedViT(tiny_config(n_layers=2, n_registers=0, d_proj=None, n_classes=4)).init_weights(seed=4).eval()
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            for head in range(model.cfg.n_heads):
                if (layer, head) != (0, 1):
                    block.attn.W_O[head] = 0
            block.attn.b_O.zero_()
            block.mlp.W_out.zero_()
            block.mlp.b_out.zero_()
    graph = CircuitGraph.from_model(model, token_groups="tokens")
    clean, corrupted = _images(4, 1), _images(4, 2)
    # orient the metric so that it is higher on the clean images
    with torch.no_grad():
        sign = 1.0 if float(_metric(model(clean)).mean()) > float(_metric(model(corrupted)).mean()) else -1.0
    return model, graph, clean, corrupted, (lambda output: sign * _metric(output))


def _names(graph: CircuitGraph, circuit: torch.Tensor) -> set[str]:
    return {graph.edge_name(*edge) for edge in graph.edges(circuit)}


def test_acdc_and_the_mask_find_the_single_route(one_route):
    model, graph, clean, corrupted, metric = one_route
    exact = exact_edge_patching(model, graph, clean, corrupted, metric)
    effective = {name for name, score in exact.ranking(absolute=True) if abs(score) > 1e-6}
    assert effective == ROUTE  # the construction does what it says
    result = acdc(model, graph, clean, corrupted, metric, tau=0.0)
    assert _names(graph, result.circuit) == ROUTE
    assert result.metric == pytest.approx(result.clean, abs=1e-5)
    # the dead heads and MLPs cost no run: far fewer runs than edges
    assert result.n_runs < graph.n_edges / 2
    mask = learned_edge_mask(model, graph, clean, corrupted, metric, steps=60)
    assert {name for name, _ in mask.ranking(k=3)} == ROUTE
    assert min(mask.score(name) for name in ROUTE) > 0.5
    assert mask.ranking(absolute=True, k=3) == mask.ranking(k=3)
    others = mask.flat()[~torch.isin(torch.arange(graph.n_edges), torch.tensor(
        [graph.edges().index(graph.edge_index(name)) for name in ROUTE]))]
    assert float(others.max()) < 0.5


def test_acdc_tau_zero_keeps_every_edge_with_an_effect_and_a_huge_tau_removes_all(model):
    graph = CircuitGraph.from_model(model)
    clean, corrupted = _images(3, 5), _images(3, 6)
    exact = exact_edge_patching(model, graph, clean, corrupted, _metric)
    keeps = acdc(model, graph, clean, corrupted, _metric, tau=0.0)
    mattering = (exact.scores.abs() > 1e-5) & graph.real[..., None]
    assert int(mattering.sum()) > 0.5 * graph.n_edges
    assert bool((keeps.circuit | ~mattering).all())
    assert keeps.metric == pytest.approx(exact.baseline_clean, abs=1e-5)
    removes = acdc(model, graph, clean, corrupted, _metric, tau=1e9)
    assert removes.n_edges == 0
    assert removes.metric == pytest.approx(exact.baseline_corrupted, abs=1e-4)
    with pytest.raises(ValueError, match="tau must be a number >= 0"):
        acdc(model, graph, clean, corrupted, _metric, tau=-1.0)


def test_acdc_sweep_scores_are_the_largest_surviving_tau(model):
    graph = CircuitGraph.from_model(model)
    clean, corrupted = _images(3, 7), _images(3, 8)
    sweep = acdc_sweep(model, graph, clean, corrupted, _metric, taus=[0.3, 0.0, 0.03, 3.0])
    assert sweep.taus == [0.0, 0.03, 0.3, 3.0]
    sizes = [run.n_edges for run in sweep.runs]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    for s, r, g in graph.edges():
        surviving = [run.tau for run in sweep.runs if run.circuit[s, r, g]]
        assert float(sweep.scores.scores[s, r, g]) == pytest.approx(max(surviving, default=0.0))
    # the scores enter the MIB evaluation like any method's
    curve = faithfulness_curve(model, graph, sweep.scores, clean, corrupted, _metric, sizes=(0.0, 0.5, 1.0))
    assert curve.method == "ACDC" and curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-5)


def test_default_sweep_thresholds_scale_with_the_whole_effect():
    model = HookedViT(tiny_config(n_layers=1, n_registers=0, d_proj=None, n_classes=4)).init_weights(seed=5).eval()
    graph = CircuitGraph.from_model(model)
    clean, corrupted = _images(2, 9), _images(2, 10)
    sweep = acdc_sweep(model, graph, clean, corrupted, _metric)
    with torch.no_grad():
        total = abs(float(_metric(model(clean)).mean() - _metric(model(corrupted)).mean()))
    assert sweep.taus == pytest.approx([f * total for f in (0.001, 0.003, 0.01, 0.03, 0.1)], rel=1e-4)


def test_edge_mask_is_deterministic_by_seed_and_checks_its_arguments(model):
    graph = CircuitGraph.from_model(model)
    clean, corrupted = _images(3, 11), _images(3, 12)
    first = learned_edge_mask(model, graph, clean, corrupted, _metric, steps=5, seed=1)
    again = learned_edge_mask(model, graph, clean, corrupted, _metric, steps=5, seed=1)
    other = learned_edge_mask(model, graph, clean, corrupted, _metric, steps=5, seed=2)
    assert torch.equal(first.scores, again.scores) and not torch.equal(first.scores, other.scores)
    assert bool((first.scores[~graph.real] == 0).all())
    assert float(first.scores.max()) <= 1.0  # masks, not logits
    assert all(p.grad is None for p in model.parameters()), "training the mask must not touch the model's .grad"
    with pytest.raises(ValueError, match="steps must be a positive int"):
        learned_edge_mask(model, graph, clean, corrupted, _metric, steps=0)
    with pytest.raises(ValueError, match="sparsity must be a number >= 0"):
        learned_edge_mask(model, graph, clean, corrupted, _metric, sparsity=-0.1)
    with pytest.raises(ValueError, match="nothing for the mask to keep"):
        learned_edge_mask(model, graph, clean, clean, _metric, steps=1)
