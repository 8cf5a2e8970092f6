"""Circuit evaluation as MIB does it: faithfulness curves, CPR and CMD, from real forward passes.

Mueller et al., "MIB: A Mechanistic Interpretability Benchmark" (ICML 2025) score an edge ranking by the
circuits it selects. A **circuit** ``C`` is a set of edges; running it means the clean images go through
the model with every edge *outside* ``C`` patched from the source (the corrupted images' sender outputs,
or a mean or zero; see :mod:`vit_lens.circuits.edges`) and every edge in ``C`` left clean:
``edges.run_patched`` with ``weights = graph.real & ~C``. The metric of that run is ``m(C)``; ``m(N)`` is
the clean run (nothing patched) and ``m(∅)`` the run with every edge patched (the source run). The
circuit's **faithfulness** is

    f(C) = (m(C) - m(∅)) / (m(N) - m(∅)),

0 for the empty circuit and 1 for the full model, by construction. It is always measured with a forward
pass of the pruned model, never read off the scores.

A **faithfulness curve** takes the best-scored ``n_k = round(size_k * n_edges)`` edges at each size
``size_k`` (a fraction of the graph's edges; MIB's 0.1 %, 0.2 %, 0.5 %, 1 %, 2 %, 5 %, 10 %, 20 %, 50 % and
100 % by default), by ``"top_n"`` (the ``n_k`` highest scores) or ``"greedy"`` selection (grown from the
output backwards, see :func:`greedy_circuit`). Its two summaries:

- **CPR** (circuit performance ratio): the area under ``f`` over the size axis, from the curve ranked by
  **signed** scores (edges that help the metric first). Higher is better.
- **CMD** (circuit-model difference): the area under ``|1 - f|``, from the curve ranked by **absolute**
  scores (edges that matter either way first). Lower is better.

**Area**, precisely: with sizes ``x_0 < ... < x_K`` and values ``y_k`` (``f`` or ``|1 - f|``), the trapezoid
rule between consecutive given sizes, normalised by the size range:

    area = sum_k (x_k - x_{k-1}) (y_{k-1} + y_k) / 2  /  (x_K - x_0).

The x values are the requested fractions (not ``n_k / n_edges``, which rounding makes uneven on small
graphs), on a linear axis, so the large sizes weigh most, as in MIB. A method whose circuits equal the full
model from the first size on has CPR 1 and CMD 0.

Circuits are run as they are selected. With ``prune=True`` edges that are not on some path from the input
to the output (at the node level: a head counts as one node whichever of its q, k, v inputs an edge
enters) are dropped first, as MIB does; with counterfactual patching this leaves ``m(C)`` unchanged (a
sender none of whose inputs is in the circuit outputs its corrupted value, which is what a patched edge
carries; an edge whose receiver reaches nothing does nothing) and only lowers the edge count
``n_edges`` reports. The default is not to prune.
"""

import heapq
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vit_lens.circuits.attribution import EdgeScores, _prepare
from vit_lens.circuits.edges import run_patched
from vit_lens.circuits.graph import CircuitGraph
from vit_lens.utils.progress import progress as progress_bar

MIB_SIZES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
SELECTIONS = ("top_n", "greedy")


@dataclass
class FaithfulnessCurve:
    """The faithfulness of one ranking's circuits at each size.

    Attributes:
        method: The scores' method.
        sizes: The requested sizes, fractions of the graph's edges, ascending.
        n_edges: Edges in each circuit (after pruning, where pruned).
        metric: ``m(C)`` of each circuit (mean over images).
        clean: ``m(N)``, the clean run.
        corrupted: ``m(∅)``, every edge patched.
        selection: ``"top_n"`` or ``"greedy"``.
        absolute: Whether the circuits were ranked by absolute scores.
        seconds: Wall-clock time of the evaluation.
        circuits: ``[n_sizes, S, R, G]`` bool: the circuit run at each size.
    """

    method: str
    sizes: tuple[float, ...]
    n_edges: list[int]
    metric: list[float]
    clean: float
    corrupted: float
    selection: str
    absolute: bool
    seconds: float = 0.0
    circuits: Tensor | None = field(default=None, repr=False)

    @property
    def faithfulness(self) -> list[float]:
        """``f(C) = (m(C) - m(∅)) / (m(N) - m(∅))`` per size."""
        return [(value - self.corrupted) / (self.clean - self.corrupted) for value in self.metric]

    @property
    def cpr(self) -> float:
        """Area under ``f`` (see the module docstring). MIB's CPR is this on a curve with ``absolute=False``."""
        return area_under_curve(self.sizes, self.faithfulness)

    @property
    def cmd(self) -> float:
        """Area under ``|1 - f|``. MIB's CMD is this on a curve with ``absolute=True``."""
        return area_under_curve(self.sizes, [abs(1 - f) for f in self.faithfulness])

    def figure(self) -> Any:
        """A plotly figure of ``f`` against the circuit size (log axis)."""
        import plotly.graph_objects as go  # plotting only when asked for

        fig = go.Figure(go.Scatter(x=[100 * s for s in self.sizes], y=self.faithfulness, mode="lines+markers",
                                   name=self.method))
        fig.add_hline(y=1.0, line_dash="dot")
        fig.update_layout(xaxis_type="log", xaxis_title="edges in the circuit (%)", yaxis_title="faithfulness",
                          title=f"{self.method}: CPR {self.cpr:.3f}, CMD {self.cmd:.3f} ({self.selection}, "
                                f"{'absolute' if self.absolute else 'signed'} scores)")
        return fig


@dataclass
class CircuitEvaluation:
    """One method's MIB summary: CPR from the signed curve, CMD from the absolute one."""

    method: str
    cpr: float
    cmd: float
    signed: FaithfulnessCurve
    absolute: FaithfulnessCurve


def area_under_curve(sizes: Sequence[float], values: Sequence[float]) -> float:
    """The trapezoid-rule area of ``values`` over ``sizes``, divided by ``sizes[-1] - sizes[0]``."""
    if len(sizes) != len(values) or len(sizes) < 2:
        raise ValueError(f"need at least two sizes and one value per size, got {len(sizes)} sizes and "
                         f"{len(values)} values")
    total = sum((sizes[k] - sizes[k - 1]) * (values[k - 1] + values[k]) / 2 for k in range(1, len(sizes)))
    return total / (sizes[-1] - sizes[0])


# ============================================================================ circuit selection


def receiver_nodes(graph: CircuitGraph) -> Tensor:
    """``[n_receivers]``: the sender index of each receiver's node (a head for its q, k and v), -1 for the output."""
    nodes = torch.full((graph.n_receivers,), -1, dtype=torch.long)
    for layer in range(graph.n_layers):
        for head in range(graph.n_heads):
            for qkv in "qkv":
                nodes[graph.head_receiver(layer, head, qkv)] = graph.head_sender(layer, head)
        nodes[graph.mlp_receiver(layer)] = graph.mlp_sender(layer)
    return nodes


def connected_edges(graph: CircuitGraph, circuit: Tensor) -> Tensor:
    """The edges of ``circuit`` on some path from the input to the output (node level), as a bool circuit."""
    circuit = graph.check_edge_tensor(circuit, "circuit").bool() & graph.real[..., None]
    nodes = receiver_nodes(graph)
    used = circuit.any(-1)  # [sender, receiver]
    from_input = torch.zeros(graph.n_senders, dtype=torch.bool)
    from_input[0] = True
    for sender in range(1, graph.n_senders):  # senders are in topological order
        into = used[:, nodes == sender]
        from_input[sender] = bool((into & from_input[:, None]).any())
    to_output = torch.zeros(graph.n_senders, dtype=torch.bool)
    receiver_alive = nodes == -1
    for sender in reversed(range(graph.n_senders)):
        to_output[sender] = bool((used[sender] & receiver_alive).any())
        receiver_alive = receiver_alive | ((nodes == sender) & to_output[sender])
    keep = from_input[:, None] & receiver_alive[None, :]
    return circuit & keep[..., None]


def greedy_circuit(scores: EdgeScores, n: int, absolute: bool = False) -> Tensor:
    """The ``n`` edges chosen greedily from the output backwards, as a bool circuit.

    The circuit starts empty with only the output connected. Each step adds the best-scored edge whose
    receiver is connected: the output, or a node (a head, through any of its q, k, v inputs, or an MLP)
    that already sends an edge in the circuit. Adding an edge connects its sender. Every chosen edge thus
    lies on a path of chosen edges to the output (not necessarily from the input). Ties go to the edge
    first in tensor order.
    """
    graph = scores.graph
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= graph.n_edges:
        raise ValueError(f"n must be an int from 0 to the graph's {graph.n_edges} edges, got {n!r}")
    return select_circuits(scores, [n], "greedy", absolute)[0]


def _greedy_sequence(scores: EdgeScores, absolute: bool) -> list[tuple[int, int, int]]:
    graph = scores.graph
    values = scores.scores.abs() if absolute else scores.scores
    nodes = receiver_nodes(graph)
    receivers_of = {sender: (nodes == sender).nonzero()[:, 0].tolist() for sender in range(graph.n_senders)}
    real = graph.real
    heap: list[tuple[float, tuple[int, int, int]]] = []  # ties: the edge tuple, i.e. tensor order

    def open_receivers(receivers: list[int]) -> None:
        for r in receivers:
            for s in range(graph.n_upstream(r)):
                if real[s, r]:
                    for g in range(graph.n_groups):
                        edge = (s, r, g)
                        heapq.heappush(heap, (-float(values[edge]), edge))

    connected = torch.zeros(graph.n_senders, dtype=torch.bool)
    open_receivers([graph.output_receiver])
    order = []
    while heap:
        _, edge = heapq.heappop(heap)
        order.append(edge)
        sender = edge[0]
        if not connected[sender]:
            connected[sender] = True
            open_receivers(receivers_of[sender])
    return order


def select_circuits(scores: EdgeScores, counts: Sequence[int], selection: str = "top_n",
                    absolute: bool = False) -> Tensor:
    """``[len(counts), S, R, G]`` bool: the circuit of each edge count, nested, by ``"top_n"`` or ``"greedy"``."""
    if not isinstance(scores, EdgeScores):
        raise TypeError(f"scores must be EdgeScores (from edge_attribution_patching, eap_ig, ...), got "
                        f"{type(scores).__name__}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    graph = scores.graph
    if selection == "top_n":
        return torch.stack([scores.top(n, absolute) for n in counts])
    order = _greedy_sequence(scores, absolute)
    circuits = torch.zeros((len(counts), *graph.shape), dtype=torch.bool)
    for k, n in enumerate(counts):
        for s, r, g in order[:n]:
            circuits[k, s, r, g] = True
    return circuits


# ============================================================================ running circuits


@torch.no_grad()
def circuit_metrics(
    model: Any, graph: CircuitGraph, circuits: Tensor, clean_images: Tensor, corrupted_images: Tensor | None,
    metric: Callable, *, ablation: str = "patch", reference_images: Tensor | None = None, token_groups: Any = None,
    max_batch: int = 512, progress: bool = False,
) -> tuple[list[float], float, float]:
    """``(m(C) per circuit, m(N), m(∅))``: each circuit run with every edge outside it patched.

    Args:
        circuits: ``[n_circuits, S, R, G]`` (or one ``[S, R, G]``) bool: the edges each circuit keeps clean.
        max_batch: Images per forward; circuits run as variants of one batch, ``max_batch // n_images`` at a time.
        Others: as :func:`faithfulness_curve`.
    """
    tower, source, groups = _prepare(model, graph, clean_images, corrupted_images, metric, ablation,
                                     reference_images, token_groups)
    if circuits.ndim == 3:
        circuits = circuits[None]
    if tuple(circuits.shape[1:]) != graph.shape:
        raise ValueError(f"circuits have shape {tuple(circuits.shape)}; expected [n_circuits, *{graph.shape}]")
    real = graph.real[None, :, :, None].expand(1, *graph.shape)
    weights = torch.cat([torch.zeros_like(real), real, real & ~circuits.bool()]).float()
    per_forward = max(1, max_batch // len(clean_images))
    values: list[float] = []
    starts = range(0, len(weights), per_forward)
    for first in progress_bar(starts, desc="circuits", enabled=progress):
        values += run_patched(tower, graph, clean_images, source, weights[first : first + per_forward], groups,
                              metric).tolist()
    return values[2:], values[0], values[1]


def _edge_counts(graph: CircuitGraph, sizes: Any) -> tuple[tuple[float, ...], list[int]]:
    try:
        sizes = tuple(float(size) for size in sizes)
    except (TypeError, ValueError):
        raise TypeError(f"sizes must be a sequence of fractions of the edges, like {MIB_SIZES}, "
                        f"got {sizes!r}") from None
    if len(sizes) < 2 or any(not 0 <= s <= 1 for s in sizes) or any(b <= a for a, b in itertools.pairwise(sizes)):
        raise ValueError(f"sizes must be at least two increasing fractions in [0, 1] (MIB: {MIB_SIZES}), got {sizes}")
    return sizes, [math.floor(size * graph.n_edges + 0.5) for size in sizes]  # halves round up


def faithfulness_curve(
    model: Any, graph: CircuitGraph, scores: Any, clean_images: Tensor, corrupted_images: Tensor | None,
    metric: Callable, *, sizes: Sequence[float] = MIB_SIZES, selection: str = "top_n", absolute: bool = False,
    prune: bool = False, ablation: str = "patch", reference_images: Tensor | None = None, token_groups: Any = None,
    max_batch: int = 512, progress: bool = False,
) -> FaithfulnessCurve:
    """The faithfulness of ``scores``' circuits at each size, each from a real run of the pruned model.

    Args:
        model: A HookedViT or HookedCLIP (its image tower).
        graph: The graph ``scores`` index.
        scores: Any method's :class:`~vit_lens.circuits.attribution.EdgeScores`.
        clean_images, corrupted_images: The pairs; each circuit runs on the clean images with the edges
            outside it patched from the corrupted ones (None with ``ablation="mean"`` or ``"zero"``).
        metric: ``metric(output) -> scalar or [batch]``, high on the clean images.
        sizes: Fractions of the graph's edges, increasing; circuit ``k`` has ``round(sizes[k] * n_edges)`` edges.
        selection: ``"top_n"`` or ``"greedy"`` (see :func:`greedy_circuit`).
        absolute: Rank by ``|score|``: use for CMD; signed scores (the default) for CPR.
        prune: Drop edges off every input-to-output path before counting (see the module docstring).
        ablation, reference_images, token_groups: As for the edge-scoring methods.
        max_batch: Images per forward pass; every circuit plus the clean and the fully patched run are
            variants of one batch, ``max_batch // n_images`` at a time.
        progress: Show a progress bar.

    Returns:
        :class:`FaithfulnessCurve` with ``.faithfulness``, ``.cpr`` and ``.cmd``.

    Raises:
        ValueError: If the clean and the fully patched run give the same metric (faithfulness is then
            undefined), for a graph other than the scores', or bad sizes or selection.

    Example:
        >>> eap = edge_attribution_patching(model, graph, clean, corrupted, metric)  # doctest: +SKIP
        >>> faithfulness_curve(model, graph, eap, clean, corrupted, metric).cpr  # doctest: +SKIP
    """
    start = time.perf_counter()
    _check_scores(graph, scores)
    sizes, counts = _edge_counts(graph, sizes)
    circuits = select_circuits(scores, counts, selection, absolute)
    if prune:
        circuits = torch.stack([connected_edges(graph, circuit) for circuit in circuits])
    values, clean, corrupted = circuit_metrics(model, graph, circuits, clean_images, corrupted_images, metric,
                                               ablation=ablation, reference_images=reference_images,
                                               token_groups=token_groups, max_batch=max_batch, progress=progress)
    _check_baselines(clean, corrupted)
    return FaithfulnessCurve(scores.method, sizes, [int(c.sum()) for c in circuits], values, clean, corrupted,
                             selection, absolute, time.perf_counter() - start, circuits)


def evaluate_methods(
    model: Any, graph: CircuitGraph, methods: Sequence[EdgeScores] | dict[str, EdgeScores], clean_images: Tensor,
    corrupted_images: Tensor | None, metric: Callable, *, sizes: Sequence[float] = MIB_SIZES,
    selection: str = "top_n", prune: bool = False, ablation: str = "patch", reference_images: Tensor | None = None,
    token_groups: Any = None, max_batch: int = 512, progress: bool = False,
) -> dict[str, CircuitEvaluation]:
    """CPR (signed scores) and CMD (absolute scores) of several methods, every circuit in shared batches.

    Args:
        methods: EdgeScores, named by their ``method`` (a list) or by the dict's keys.
        Others: as :func:`faithfulness_curve`.

    Returns:
        ``{name: CircuitEvaluation}`` with ``cpr``, ``cmd`` and both curves.
    """
    start = time.perf_counter()
    named = dict(methods) if isinstance(methods, dict) else {s.method: s for s in methods}
    if not isinstance(methods, dict) and len(named) != len(methods):
        raise ValueError("two EdgeScores share a method name; pass a dict {name: scores} to tell them apart")
    sizes, counts = _edge_counts(graph, sizes)
    blocks = []
    for scores in named.values():
        _check_scores(graph, scores)
        for absolute in (False, True):
            circuits = select_circuits(scores, counts, selection, absolute)
            if prune:
                circuits = torch.stack([connected_edges(graph, circuit) for circuit in circuits])
            blocks.append(circuits)
    values, clean, corrupted = circuit_metrics(model, graph, torch.cat(blocks), clean_images, corrupted_images,
                                               metric, ablation=ablation, reference_images=reference_images,
                                               token_groups=token_groups, max_batch=max_batch, progress=progress)
    _check_baselines(clean, corrupted)
    seconds = (time.perf_counter() - start) / max(1, len(blocks))
    results = {}
    k = len(sizes)
    for index, name in enumerate(named):
        curves = []
        for half, absolute in enumerate((False, True)):
            block = 2 * index + half
            circuits = blocks[block]
            curves.append(FaithfulnessCurve(name, sizes, [int(c.sum()) for c in circuits],
                                            values[block * k : (block + 1) * k], clean, corrupted, selection,
                                            absolute, seconds, circuits))
        results[name] = CircuitEvaluation(name, curves[0].cpr, curves[1].cmd, curves[0], curves[1])
    return results


def _check_scores(graph: CircuitGraph, scores: Any) -> None:
    if not isinstance(scores, EdgeScores):
        raise TypeError(f"scores must be EdgeScores (from edge_attribution_patching, eap_ig, ...), got "
                        f"{type(scores).__name__}")
    other = scores.graph
    if (other.shape, other.group_names) != (graph.shape, graph.group_names):
        raise ValueError(f"the scores of {scores.method!r} index another graph ({other.shape}, groups "
                         f"{list(other.group_names)}) than the one passed ({graph.shape}, groups "
                         f"{list(graph.group_names)}); score and evaluate on one graph")


def _check_baselines(clean: float, corrupted: float) -> None:
    # relative: identical images give equal metrics up to the rounding of where they sit in the batch
    if not math.isfinite(clean - corrupted) or math.isclose(clean, corrupted, rel_tol=1e-5):
        raise ValueError(f"the clean run's metric ({clean}) equals the fully patched run's ({corrupted}); faithfulness "
                         "(m(C) - m(∅)) / (m(N) - m(∅)) is undefined: choose pairs whose metric differs")
