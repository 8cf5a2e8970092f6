"""Circuit figures, per-token edge maps and the EAP-IG / MIB JSON export.

Figures are checked by their data (one trace per edge, widths in the order of the scores, names, ports);
the edge map by identities: on a model affine in the patched activations the per-token effects add up to
the edge's all-token effect, and on the planted classifier the output edge of the position route carries
its effect at CLS only; the export by a round trip and by the layout's keys.
"""

import json
import re

import pytest
import torch
from conftest import tiny_config
from test_circuits import _affine_hooks, _images, _metric

import vit_lens
from vit_lens.circuits import (
    CircuitGraph,
    EdgeScores,
    circuit_figure,
    edge_attribution_patching,
    edge_map,
    exact_edge_patching,
    from_json,
    node_attribution_patching,
    to_json,
)
from vit_lens.methods.scorecard import factor_readout, logit_difference, task_data
from vit_lens.model.hooked_vit import HookedViT

pytestmark = pytest.mark.usefixtures("one_thread")

EDGE_NAME = re.compile(r"^(input|a\d+\.h\d+|m\d+)->(a\d+\.h\d+<[qkv]>|m\d+|logits)$")


@pytest.fixture(scope="module")
def model() -> HookedViT:
    return HookedViT(tiny_config(n_registers=1)).init_weights(seed=3).eval()


@pytest.fixture(scope="module")
def grouped_scores(model) -> EdgeScores:
    graph = CircuitGraph.from_model(model, token_groups="tokens")
    return edge_attribution_patching(model, graph, _images(3, 1), _images(3, 2), _metric)


def _edge_traces(fig) -> list:
    return [trace for trace in fig.data if trace.mode == "lines"]


# ============================================================================ circuit_figure


def test_circuit_figure_draws_one_line_per_edge_weighted_and_coloured_by_score(grouped_scores):
    circuit = grouped_scores.top(12, absolute=True)
    fig = circuit_figure(grouped_scores, circuit)
    lines = _edge_traces(fig)
    graph = grouped_scores.graph
    assert sorted(trace.name for trace in lines) == sorted(graph.edge_name(*e) for e in graph.edges(circuit))
    scores = [grouped_scores.score(trace.name) for trace in lines]
    widths = [trace.line.width for trace in lines]
    # drawn strongest first; width grows with |score|, the strongest at max_width
    assert [abs(s) for s in scores] == sorted((abs(s) for s in scores), reverse=True)
    assert widths == sorted(widths, reverse=True) and widths[0] == pytest.approx(8.0) and widths[-1] < widths[0]
    assert all(t.line.color == ("#b2182b" if s >= 0 else "#2166ac") for t, s in zip(lines, scores))
    assert any(s < 0 for s in scores) and any(s > 0 for s in scores)  # both colours exercised
    # hover text names the edge's sender, receiver, token group and score
    first = lines[0]
    sender, receiver_group = first.name.split("->")
    receiver, group = receiver_group.split("@")
    assert f"{sender} -> {receiver}" in first.hovertemplate and f"token group {group}" in first.hovertemplate
    # edges into heads end at their q/k/v port and carry its dash; the others are solid
    for trace in lines:
        port = re.search(r"<([qkv])>", trace.name)
        assert trace.line.dash == ({"q": "dot", "k": "dash", "v": "solid"}[port.group(1)] if port else "solid")
    # one legend entry per token group drawn, the groups toggle together
    legend = [t.legendgroup for t in lines if t.showlegend]
    assert sorted(legend) == sorted({t.legendgroup for t in lines})
    # nodes: those the circuit touches, then the rest; together every node once
    nodes = {t.name: list(t.text) for t in fig.data if t.name in ("nodes in the circuit", "other nodes")}
    assert sorted(nodes["nodes in the circuit"] + nodes["other nodes"]) == sorted(graph.sender_names() + ["logits"])
    touched = set()
    for trace in lines:
        sender, rest = trace.name.split("@")[0].split("->")
        touched |= {sender, re.sub(r"<[qkv]>", "", rest)}
    assert set(nodes["nodes in the circuit"]) == touched


def test_circuit_figure_selection(grouped_scores):
    graph = grouped_scores.graph
    assert len(_edge_traces(circuit_figure(grouped_scores))) == min(50, graph.n_edges)
    assert len(_edge_traces(circuit_figure(grouped_scores, 7))) == 7
    signed = circuit_figure(grouped_scores, 5, absolute=False)
    assert all(grouped_scores.score(t.name) > 0 for t in _edge_traces(signed))
    empty = circuit_figure(grouped_scores, torch.zeros(graph.shape, dtype=torch.bool))
    assert _edge_traces(empty) == []
    with pytest.raises(ValueError, match="bool tensor"):
        circuit_figure(grouped_scores, torch.ones(graph.shape))
    with pytest.raises(TypeError, match="circuit must be None, an int"):
        circuit_figure(grouped_scores, [1, 2])
    with pytest.raises(ValueError, match="n must be an int from 0"):
        circuit_figure(grouped_scores, graph.n_edges + 1)


# ============================================================================ edge_map


def test_edge_map_per_token_effects_add_up_on_an_affine_model():
    model = HookedViT(tiny_config(n_layers=2, n_registers=1, d_proj=None, n_classes=4)).init_weights(seed=2).eval()
    graph = CircuitGraph.from_model(model, token_groups="tokens")
    clean, corrupted = _images(3, 7), _images(3, 8)
    with model.hooks(fwd_hooks=_affine_hooks(model)):
        edge = "input->a1.h0<v>@patches"  # the input differs per token; heads under uniform attention do not
        result = edge_map(model, graph, clean, corrupted, _metric, edge, max_batch=12)  # several forwards
        exact = exact_edge_patching(model, graph, clean, corrupted, _metric, edges=[graph.edge_index(edge)])
    effects = result.effects
    n_prefix = model.cfg.n_prefix_tokens
    assert torch.isnan(effects[:n_prefix]).all()  # CLS and the register are not in the 'patches' group
    patches = effects[n_prefix:]
    assert patches.abs().max() > 1e-3 and (patches.std() > 0.1 * patches.abs().mean())  # varies over the image
    assert float(patches.sum()) == pytest.approx(result.total, rel=1e-4, abs=1e-6)
    assert result.total == pytest.approx(exact.score(edge), rel=1e-4, abs=1e-6)
    prefix, grid = result.to_grid()
    assert prefix.shape == (n_prefix,) and torch.isnan(prefix).all()
    assert grid.shape == model.cfg.grid_size and torch.equal(grid.flatten(), patches)


def test_edge_map_of_the_planted_position_route_is_at_cls_only():
    planted = vit_lens.load_planted("classifier")
    pairs = task_data(n_images=4, n_pairs=16, factors=["position"]).pairs["position"]
    readout = factor_readout(planted.model)

    def metric(output):
        return logit_difference(readout.logits(output, "position"), pairs.clean_values, pairs.corrupted_values)

    graph = CircuitGraph.from_model(planted.model)
    result = edge_map(planted.model, graph, pairs.clean, pairs.corrupted, metric, "a2.h1->logits")
    prefix, grid = result.to_grid()
    assert result.total > 1.0 and prefix[0] == pytest.approx(result.total, rel=1e-5)
    assert grid.abs().max() < 1e-5 * result.total
    fig = result.figure()
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 2  # the prefix strip and the patch grid
    assert heatmaps[0].z[0][0] == pytest.approx(result.total, rel=1e-5)
    assert torch.allclose(torch.tensor(heatmaps[1].z), grid, atol=1e-6)
    assert fig.layout.coloraxis.cmid == 0.0


def test_edge_map_bad_edges(model):
    graph = CircuitGraph.from_model(model)
    with pytest.raises(ValueError, match="does not come before"):
        edge_map(model, graph, _images(2, 1), _images(2, 2), _metric, "a1.h0->a0.h0<q>")
    with pytest.raises(ValueError, match="is no edge of this graph"):
        edge_map(model, graph, _images(2, 1), _images(2, 2), _metric, (graph.n_senders - 1, 0, 0))


# ============================================================================ export


def test_json_round_trip_with_token_groups_node_scores_and_a_circuit(model, tmp_path):
    graph = CircuitGraph.from_model(model, token_groups="tokens")
    scores = node_attribution_patching(model, graph, _images(3, 3), _images(3, 4), _metric)
    circuit = scores.top(25)
    path = tmp_path / "out" / "circuit.json"
    to_json(scores, path, circuit, d_model=model.cfg.d_model)
    assert [p.name for p in path.parent.iterdir()] == ["circuit.json"]  # no temporary file left behind
    loaded, loaded_circuit = from_json(path)
    assert torch.equal(loaded.scores, scores.scores) and torch.equal(loaded_circuit, circuit)
    assert torch.equal(loaded.node_scores, scores.node_scores)
    assert loaded.graph.group_names == graph.group_names and torch.equal(loaded.graph.group_masks, graph.group_masks)
    assert (loaded.graph.n_layers, loaded.graph.n_heads, loaded.graph.n_ctx) == (graph.n_layers, graph.n_heads,
                                                                                 graph.n_ctx)
    assert (loaded.method, loaded.baseline_clean) == (scores.method, scores.baseline_clean)
    assert loaded.ranking(k=5) == scores.ranking(k=5)


def test_json_follows_the_eap_ig_layout(model, grouped_scores):
    single = CircuitGraph.from_model(model)
    scores = edge_attribution_patching(model, single, _images(3, 1), _images(3, 2), _metric)
    circuit = scores.top(10)
    document = json.loads(json.dumps(to_json(scores, None, circuit, d_model=model.cfg.d_model)))
    assert {"cfg", "nodes", "edges"} <= set(document)
    assert document["cfg"] == {"n_layers": model.cfg.n_layers, "n_heads": model.cfg.n_heads,
                               "parallel_attn_mlp": False, "d_model": model.cfg.d_model}
    names = {"input", "logits"} | {f"m{l}" for l in range(model.cfg.n_layers)}
    names |= {f"a{l}.h{h}" for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)}
    assert set(document["nodes"]) == names and all(set(v) == {"in_graph"} for v in document["nodes"].values())
    edges = document["edges"]
    assert len(edges) == single.n_edges and all(EDGE_NAME.match(name) for name in edges)
    assert all(set(entry) == {"score", "in_graph"} for entry in edges.values())
    assert sum(entry["in_graph"] for entry in edges.values()) == 10
    best, value = scores.ranking(k=1)[0]
    assert edges[best] == {"score": value, "in_graph": True}
    # a node is in the graph when a circuit edge starts or ends at it
    sender, receiver = best.split("->")
    assert document["nodes"][sender]["in_graph"] and document["nodes"][re.sub(r"<[qkv]>", "", receiver)]["in_graph"]
    # split by token group: "edges" sums the groups (EAP's groups add up), and each group is kept apart
    grouped = to_json(grouped_scores, None, grouped_scores.top(10))
    name = "a0.h1->a2.h3<k>"
    per_group = [grouped["vit_lens"]["token_groups"][g][name]["score"] for g in grouped_scores.graph.group_names]
    assert grouped["edges"][name]["score"] == pytest.approx(sum(per_group), rel=1e-6)
    assert set(grouped["edges"]) == set(edges)


def test_json_from_an_eap_ig_file_without_our_key(model):
    single = CircuitGraph.from_model(model)
    scores = edge_attribution_patching(model, single, _images(2, 1), _images(2, 2), _metric)
    document = to_json(scores, None, scores.top(4))
    foreign = {key: document[key] for key in ("cfg", "nodes", "edges")}
    with pytest.raises(ValueError, match="pass n_ctx"):
        from_json(foreign)
    loaded, circuit = from_json(foreign, n_ctx=model.cfg.n_ctx)
    assert torch.equal(loaded.scores, scores.scores) and torch.equal(circuit, scores.top(4))
    assert loaded.method == "imported" and loaded.graph.group_names == ("all",)
    with pytest.raises(ValueError, match="lacks the keys"):
        from_json({"cfg": {}, "edges": {}})
    del foreign["edges"][next(iter(foreign["edges"]))]
    with pytest.raises(ValueError, match="edges for token group"):
        from_json(foreign, n_ctx=model.cfg.n_ctx)
