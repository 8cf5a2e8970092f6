"""Seeing a circuit: the graph of its edges, and where on the image one edge carries its effect.

- :func:`circuit_figure`: layers as columns (the input at the left, the output at the right), each layer's
  heads ``a{l}.h{h}`` stacked in its column with its MLP ``m{l}`` beside them, and one line per edge of the
  circuit, as wide and as opaque as its ``|score|`` and red where the score is positive, blue where negative.
  An edge into a head ends at that head's query, key or value port (three small markers left of the head,
  top to bottom) and is dotted, dashed or solid accordingly. Edges of different token groups are drawn
  apart and grouped in the legend by token group, so one group can be shown alone.
- :func:`edge_map`: for one edge, the exact effect of patching it at each token separately, laid out on the
  patch grid (:class:`EdgeMap`).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from vit_lens.circuits.attribution import EdgeScores, _prepare
from vit_lens.circuits.edges import run_patched
from vit_lens.circuits.graph import INPUT, OUTPUT, QKV, CircuitGraph
from vit_lens.intervene.patching import PatchingResult, _import_plotly, _token_labels

DEFAULT_TOP = 50
POSITIVE, NEGATIVE = "#b2182b", "#2166ac"  # red helps the metric, blue hurts it (RdBu_r)
PORT_DASH = {"q": "dot", "k": "dash", "v": "solid"}
PORT_OFFSET = {"q": 0.25, "k": 0.0, "v": -0.25}
PORT_X = 0.12
MLP_X = 0.45
# The most edge-weight entries one patched forward may build ([variants, senders, receivers, tokens]).
MAX_WEIGHT_ENTRIES = 1 << 23


# ============================================================================ the circuit as a graph


def circuit_figure(
    scores: Any,  # EdgeScores, checked below with a directed message
    circuit: Any = None,  # None, an int or a bool tensor, checked below
    *,
    absolute: bool = True,
    min_width: float = 0.5,
    max_width: float = 8.0,
    title: str | None = None,
) -> Any:
    """A plotly figure of a circuit's edges, weighted and coloured by score.

    Args:
        scores: Any method's :class:`~vit_lens.circuits.attribution.EdgeScores`.
        circuit: Which edges to draw: a ``[n_senders, n_receivers, n_groups]`` bool tensor (``scores.top(n)``,
            a learned mask thresholded, the planted truth), an int ``n`` for the ``n`` best edges, or None for
            the best ``min(50, n_edges)``.
        absolute: How an int or None ``circuit`` ranks edges: by ``|score|`` (default) or the signed score.
        min_width, max_width: Line widths of the weakest and the strongest ``|score|`` drawn.
        title: Figure title (default: the method and the number of edges).

    Returns:
        A ``plotly.graph_objects.Figure``: one trace per drawn edge (named by the edge, in descending
        ``|score|``), one trace of the q/k/v ports the edges end at, and two node traces (nodes the circuit
        touches, and the rest, faint).

    Example:
        >>> circuit_figure(scores, 30).show()  # doctest: +SKIP
    """
    if not isinstance(scores, EdgeScores):
        raise TypeError(f"scores must be EdgeScores (from edge_attribution_patching, eap_ig, ...), got "
                        f"{type(scores).__name__}")
    graph = scores.graph
    circuit = _resolve_circuit(scores, circuit, absolute)
    go, _ = _import_plotly()
    senders, receivers = graph.sender_names(), graph.receiver_names()
    edges = graph.edges(circuit)
    values = [float(scores.scores[edge]) for edge in edges]
    order = sorted(range(len(edges)), key=lambda i: -abs(values[i]))
    strongest = max((abs(v) for v in values), default=0.0)

    fig = go.Figure()
    shown_groups: set[int] = set()
    ports: dict[tuple[int, str], tuple[float, float]] = {}
    for i in order:
        s, r, g = edges[i]
        value = values[i]
        strength = abs(value) / strongest if strongest > 0 else 0.0
        x0, y0 = _sender_position(graph, s)
        x1, y1, port = _receiver_position(graph, r)
        offset = _group_offset(g, graph.n_groups)
        if port is not None:
            ports[(r, port)] = (x1, y1)
        group = graph.group_names[g]
        fig.add_trace(go.Scatter(
            x=[x0, x1], y=[y0 + offset, y1 + offset], mode="lines",
            line={"width": min_width + (max_width - min_width) * strength,
                  "color": POSITIVE if value >= 0 else NEGATIVE, "dash": PORT_DASH.get(port, "solid")},
            opacity=0.25 + 0.75 * strength,
            name=graph.edge_name(s, r, g),
            hovertemplate=f"{senders[s]} -> {receivers[r]}<br>token group {group}<br>score {value:.4g}<extra></extra>",
            legendgroup=f"group {group}", legendgrouptitle_text=f"token group: {group}" if graph.n_groups > 1 else None,
            showlegend=graph.n_groups > 1 and g not in shown_groups,
            meta={"score": value, "group": group},
        ))
        shown_groups.add(g)

    fig.add_trace(go.Scatter(
        x=[xy[0] for xy in ports.values()], y=[xy[1] for xy in ports.values()], mode="markers+text",
        marker={"size": 5, "color": "#555555", "symbol": "triangle-right"},
        text=[port for _, port in ports], textposition="middle left", textfont={"size": 8},
        hovertext=[receivers[r] for r, _ in ports], hoverinfo="text", name="q/k/v inputs", showlegend=False,
    ))
    touched = graph.touched_nodes(circuit)
    node_names = senders + [OUTPUT]
    positions = [_sender_position(graph, s) for s in range(graph.n_senders)] + [_output_position(graph)]
    for in_circuit in (True, False):
        chosen = [i for i in range(len(node_names)) if touched[i] == in_circuit]
        fig.add_trace(go.Scatter(
            x=[positions[i][0] for i in chosen], y=[positions[i][1] for i in chosen], mode="markers+text",
            text=[node_names[i] for i in chosen], textposition="top center", hovertext=[node_names[i] for i in chosen],
            hoverinfo="text", textfont={"size": 9 if in_circuit else 7},
            marker={"size": 14 if in_circuit else 7, "color": "#333333" if in_circuit else "#cccccc"},
            name="nodes in the circuit" if in_circuit else "other nodes", showlegend=False,
        ))
    tick_text = [INPUT] + [f"layer {layer}" for layer in range(graph.n_layers)] + [OUTPUT]
    fig.update_xaxes(tickvals=list(range(graph.n_layers + 2)), ticktext=tick_text, showgrid=False, zeroline=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_layout(
        title=title or f"{scores.method}: {len(edges)} edges (red helps the metric, blue hurts it; "
                       "into heads: q dotted, k dashed, v solid)",
        plot_bgcolor="white", height=max(400, 60 * graph.n_heads + 120), width=max(600, 150 * (graph.n_layers + 2)),
        legend={"groupclick": "togglegroup"},
    )
    return fig


def _resolve_circuit(scores: EdgeScores, circuit: Any, absolute: bool) -> Tensor:
    graph = scores.graph
    if circuit is None:
        return scores.top(min(DEFAULT_TOP, graph.n_edges), absolute)
    if isinstance(circuit, int) and not isinstance(circuit, bool):
        return scores.top(circuit, absolute)
    if isinstance(circuit, Tensor):
        circuit = graph.check_edge_tensor(circuit, "circuit")
        if circuit.dtype != torch.bool:
            raise ValueError(f"circuit must be a bool tensor, got {circuit.dtype}; threshold a continuous mask "
                             "first (mask > 0.5) or pass an int for the n best edges")
        return circuit & graph.real[..., None]
    raise TypeError(f"circuit must be None, an int (the n best edges) or a bool tensor of shape {graph.shape}, got "
                    f"{type(circuit).__name__}")


def _sender_position(graph: CircuitGraph, sender: int) -> tuple[float, float]:
    middle = (graph.n_heads - 1) / 2
    if sender == 0:
        return 0.0, middle
    layer, index = divmod(sender - 1, graph.n_heads + 1)
    if index == graph.n_heads:
        return layer + 1 + MLP_X, middle
    return float(layer + 1), float(index)


def _output_position(graph: CircuitGraph) -> tuple[float, float]:
    return float(graph.n_layers + 1), (graph.n_heads - 1) / 2


def _receiver_position(graph: CircuitGraph, receiver: int) -> tuple[float, float, str | None]:
    """Where an edge into ``receiver`` ends, and its port (``q``, ``k``, ``v``, or None for MLPs and the output)."""
    if receiver == graph.output_receiver:
        return (*_output_position(graph), None)
    layer, offset = divmod(receiver, 3 * graph.n_heads + 1)
    if offset == 3 * graph.n_heads:
        return (*_sender_position(graph, graph.mlp_sender(layer)), None)
    kind, head = divmod(offset, graph.n_heads)
    port = QKV[kind]
    return layer + 1 - PORT_X, head + PORT_OFFSET[port], port


def _group_offset(group: int, n_groups: int) -> float:
    """A small vertical shift per token group, so the groups of one sender-receiver pair do not overlap."""
    if n_groups == 1:
        return 0.0
    return 0.16 * (group / (n_groups - 1) - 0.5)


# ============================================================================ one edge on the image


@dataclass
class EdgeMap:
    """Where on the image one edge carries its effect: the exact effect of patching it at each token alone.

    Attributes:
        edge: The edge's name.
        effects: ``[n_ctx]``: ``m(clean) - m(clean with the edge patched at that token only)``, mean over
            images; NaN at tokens outside the edge's token group.
        total: The same with the edge patched at every token of its group: the edge's exact score.
        baseline_clean: ``m(clean)``.
        token_labels: ``CLS``, ``DIST``, ``REG0``, ..., ``P(row,col)``.
        n_prefix_tokens, grid_size: The token layout.
    """

    edge: str
    effects: Float[Tensor, " pos"]
    total: float
    baseline_clean: float
    token_labels: list[str]
    n_prefix_tokens: int
    grid_size: tuple[int, int]

    def as_patching_result(self) -> PatchingResult:
        """The map as a one-row :class:`~vit_lens.intervene.patching.PatchingResult` (``by="position"``)."""
        tokens = [t for t in range(len(self.effects)) if not math.isnan(float(self.effects[t]))]
        return PatchingResult(
            values=self.effects[tokens][None], labels=[[self.edge], [self.token_labels[t] for t in tokens]],
            axes=("edge", "position"), baseline_clean=self.total, baseline_corrupted=0.0, activation=self.edge,
            by="position", method="edge", token_index=tokens, n_prefix_tokens=self.n_prefix_tokens,
            grid_size=self.grid_size,
        )

    def to_grid(self) -> tuple[Float[Tensor, " prefix"], Float[Tensor, "rows cols"]]:
        """``(prefix, grid)``: the prefix tokens' effects ``[n_prefix_tokens]`` and the patches' ``[rows, cols]``."""
        prefix, grid = self.as_patching_result().to_grid()
        return prefix[0], grid[0]

    def figure(self, title: str | None = None) -> Any:
        """A heatmap of the effects on the patch grid (prefix tokens in a strip above), centred on 0."""
        fig = self.as_patching_result().figure(
            title or f"{self.edge}: effect of patching it at one token (all tokens: {self.total:.4g})")
        fig.update_layout(coloraxis_colorbar_title="effect", coloraxis_cmid=0.0)
        return fig


@torch.no_grad()
def edge_map(
    model: Any,
    graph: CircuitGraph,
    clean_images: Tensor,
    corrupted_images: Tensor | None,
    metric: Callable[[Tensor], Tensor],
    edge: str | tuple[int, int, int],
    *,
    ablation: str = "patch",
    reference_images: Tensor | None = None,
    token_groups: Any = None,
    max_batch: int = 512,
) -> EdgeMap:
    """The exact effect of patching one edge at each token separately, as a patch-grid map.

    Each token is its own patched run (several share a forward as variants): the edge's receiver reads
    the sender's source output at that token only. Sign and roles as in
    :mod:`vit_lens.circuits.attribution`: the effect at a token is ``m(clean) - m(clean with the edge patched
    there)``, positive where the edge helps the metric. On a model affine in the patched activations the
    effects add up to the edge's all-token effect (tested); on a real model they need not.

    Args:
        model: A HookedViT or HookedCLIP (its image tower).
        graph: ``CircuitGraph.from_model(model, ...)``.
        clean_images, corrupted_images, metric, ablation, reference_images, token_groups: As for
            :func:`~vit_lens.circuits.attribution.exact_edge_patching`.
        edge: The edge's name (``"a2.h1->logits"``, ``"...@CLS"`` in a graph split by token group) or its
            ``(sender, receiver, group)`` index.
        max_batch: At most this many images in one forward (tokens x images).

    Returns:
        :class:`EdgeMap`; ``.to_grid()`` and ``.figure()`` lay it out on the image.

    Example:
        >>> edge_map(model, graph, clean, corrupted, metric, "a2.h1->logits").figure().show()  # doctest: +SKIP
    """
    s, r, g = graph.edge_index(edge) if isinstance(edge, str) else _check_edge(graph, edge)
    tower, source, groups = _prepare(model, graph, clean_images, corrupted_images, metric, ablation,
                                     reference_images, token_groups)
    n_images, n_ctx = groups.shape[0], groups.shape[1]
    cfg = tower.cfg
    rows = clean_images.shape[-2] // cfg.patch_size[0]
    cols = clean_images.shape[-1] // cfg.patch_size[1]
    labels = _token_labels(cfg.class_token, cfg.distillation_token, cfg.n_registers, n_ctx, (rows, cols))
    in_group = groups[..., g]  # [images, pos]: where the edge exists
    tokens = in_group.any(0).nonzero().flatten().tolist()

    whole = torch.zeros((2, *graph.shape))
    whole[1, s, r, g] = 1.0
    clean_value, patched_everywhere = run_patched(tower, graph, clean_images, source, whole, groups, metric).tolist()

    # One token group per token of a chunk: variant i patches the edge at group i only, and group i is
    # token i (where the edge's own group holds it), so the other tokens read their clean values.
    per_forward = max(1, max_batch // n_images)
    fits = max(1, math.isqrt(MAX_WEIGHT_ENTRIES // (graph.n_senders * graph.n_receivers)))
    chunk_size = min(per_forward, fits)
    effects = torch.full((n_ctx,), math.nan)
    for first in range(0, len(tokens), chunk_size):
        chunk = tokens[first : first + chunk_size]
        chunk_graph = CircuitGraph(graph.n_layers, graph.n_heads, n_ctx, tuple(labels[t] for t in chunk), None,
                                   graph.model_name)
        chunk_groups = torch.zeros(n_images, n_ctx, len(chunk), device=groups.device)
        weights = torch.zeros((len(chunk), *chunk_graph.shape))
        for i, token in enumerate(chunk):
            chunk_groups[:, token, i] = in_group[:, token]
            weights[i, s, r, i] = 1.0
        values = run_patched(tower, chunk_graph, clean_images, source, weights, chunk_groups, metric)
        effects[chunk] = clean_value - values.float().cpu()
    return EdgeMap(graph.edge_name(s, r, g), effects, clean_value - patched_everywhere, clean_value, labels,
                   cfg.n_prefix_tokens, (rows, cols))


def _check_edge(graph: CircuitGraph, edge: Any) -> tuple[int, int, int]:
    if not (isinstance(edge, tuple) and len(edge) == 3 and all(isinstance(i, int) for i in edge)):
        raise TypeError(f"edge must be an edge name like 'a0.h1->a2.h1<v>' or a (sender, receiver, group) tuple, got "
                        f"{edge!r}")
    s, r, g = edge
    in_range = 0 <= s < graph.n_senders and 0 <= r < graph.n_receivers and 0 <= g < graph.n_groups
    if not in_range or not graph.real[s, r]:
        raise ValueError(f"{edge!r} is no edge of this graph (shape {graph.shape}; graph.real marks the edges)")
    return s, r, g

