"""The planted design of the ``classifier``, as data: which heads carry which factor, and what they read.

Every factor of the toy world (:data:`vit_lens.toy.FACTORS`) reaches the classifier's CLS readout
through the heads listed here and through no other head. ``position`` is routed in two hops: head
(0, 1) reads the object patches from every patch query and writes where the objects are into all
patch tokens; head (2, 1) then moves it from the background patches into CLS. Every head not
listed for a factor is inert, and so is the MLP of layer 3: resampling their outputs from another
image changes no prediction (training enforced both with strict interchange interventions; the
tests measure them on fresh images).

:func:`edge_truth` turns the design into labels over the edges of the circuit graph
(:class:`vit_lens.circuits.graph.CircuitGraph`), for scoring circuit-discovery methods.
"""

from dataclasses import dataclass

import torch

from vit_lens.circuits.graph import QKV, CircuitGraph

OBJECT_PATCHES, BACKGROUND_PATCHES, CLS = "object patches", "background patches", "CLS"
TOKEN_GROUPS = (OBJECT_PATCHES, BACKGROUND_PATCHES, CLS)


@dataclass(frozen=True)
class PlantedHead:
    """One planted head: the factor it carries, the queries it serves and the keys it reads.

    Attributes:
        layer: Block index.
        head: Head index within the block.
        factor: The factor (a key of :data:`vit_lens.toy.FACTORS`) it carries.
        writes: ``"CLS"`` (it moves the factor into CLS, the readout) or ``"patches"`` (it writes the
            factor into every patch token, for a later head to move).
        reads: The token group its attention reads (one of :data:`TOKEN_GROUPS`).
    """

    layer: int
    head: int
    factor: str
    writes: str
    reads: str


CLASSIFIER_HEADS = (
    PlantedHead(0, 0, "colour", "CLS", OBJECT_PATCHES),
    PlantedHead(0, 1, "position", "patches", OBJECT_PATCHES),  # hop 1 of the two-hop route
    PlantedHead(1, 0, "texture", "CLS", BACKGROUND_PATCHES),
    PlantedHead(1, 1, "shape", "CLS", OBJECT_PATCHES),
    PlantedHead(2, 0, "size", "CLS", OBJECT_PATCHES),
    PlantedHead(2, 1, "position", "CLS", BACKGROUND_PATCHES),  # hop 2: reads what hop 1 wrote
    PlantedHead(3, 0, "count", "CLS", OBJECT_PATCHES),
)
"""The planted heads of the ``classifier``, in layer order."""

CLASSIFIER_N_LAYERS, CLASSIFIER_N_HEADS = 4, 4
CLASSIFIER_INERT_MLPS = (3,)
"""Layers whose MLP is inert (the other MLPs are free to compute what the heads need)."""


def heads_by_factor(planted_heads: tuple[PlantedHead, ...] = CLASSIFIER_HEADS) -> dict[str, list[tuple[int, int]]]:
    """Factor name -> its heads as ``(layer, head)``, in layer order."""
    result: dict[str, list[tuple[int, int]]] = {}
    for h in planted_heads:
        result.setdefault(h.factor, []).append((h.layer, h.head))
    return result


def inert_heads(planted_heads: tuple[PlantedHead, ...] = CLASSIFIER_HEADS, n_layers: int = CLASSIFIER_N_LAYERS,
                n_heads: int = CLASSIFIER_N_HEADS) -> list[tuple[int, int]]:
    """Every head that carries no factor, as ``(layer, head)``."""
    planted = {(h.layer, h.head) for h in planted_heads}
    return [(layer, head) for layer in range(n_layers) for head in range(n_heads) if (layer, head) not in planted]


# ============================================================================ the truth as edges of the circuit graph

POSITIVE, NEGATIVE, UNKNOWN = 1, 0, -1
"""Values of :func:`edge_truth`: the edge carries the factor, it does not, or the design does not say."""


def edge_truth(factor: str, n_layers: int = CLASSIFIER_N_LAYERS, n_heads: int = CLASSIFIER_N_HEADS, *,
               planted_heads: tuple[PlantedHead, ...] = CLASSIFIER_HEADS,
               inert_mlps: tuple[int, ...] = CLASSIFIER_INERT_MLPS) -> torch.Tensor:
    """Which edges of the circuit graph carry ``factor`` by the planted design: ``int8 [n_senders, n_receivers]``.

    Indexed as :class:`vit_lens.circuits.graph.CircuitGraph` indexes every edge tensor (senders ``input``, then
    per layer its heads and its MLP; receivers per layer all heads' ``<q>``, then ``<k>``, then ``<v>``, then its
    MLP; ``logits`` last), with one token group. Values: :data:`POSITIVE` (1), :data:`NEGATIVE` (0) and
    :data:`UNKNOWN` (-1: left out of every truth metric); pairs that are no edge (``graph.real`` False) hold -1.

    The rule, from the design alone (never from what a method or a measurement finds):

    - **Nodes.** The circuit nodes of ``factor`` are the input, the logits, every MLP that is not inert
      (layers 0-2: the design leaves them free to compute what the heads need) and the factor's planted
      heads. The inert nodes are the inert heads and MLP 3. Another factor's head is unknown for this
      factor: the design keeps each factor out of the other factors' *outputs*, not out of their
      intermediate computations.
    - **Valid paths.** A path is valid if it runs from the input to the logits through circuit nodes only
      and visits every planted head of the factor, in layer order (``position``: L0H1, then L2H1; the
      others their one head), entering a head through any of its q, k or v inputs.
    - **Labels**, checked in this order: an edge is *positive* if it lies on a valid path and touches one
      of the factor's heads; *negative* if it touches an inert node (training made its output carry
      nothing, so nothing flows through the edges into or out of it, whatever the other end is); *unknown*
      if it touches another factor's head, or if it joins two glue nodes (input, MLPs, logits) on a valid
      path, since the design does not say which MLP routes the model uses; *negative* otherwise: it is on
      no valid path. So a hop that skips a planted head is negative: for ``position``, ``a0.h1->logits``
      (hop 1 read directly) and ``input->a2.h1<v>`` (hop 2 without hop 1) are negatives, as is
      ``input->logits`` for every factor.

    The truth is the design's. The trained classifier measurably routes position's hop 1 into hop 2 through
    layer 1's heads' keys and MLP 0 as well (path patching; vit_lens/planted/MODEL_CARD.md), edges this rule
    marks unknown (other factors' heads) or positive (``a0.h1->m0``); it is kept as designed and the
    measurement is reported beside it.

    Args:
        factor: A planted factor (a key of :func:`heads_by_factor`).
        n_layers, n_heads: The model's shape (the classifier's by default); every planted head and inert
            MLP must lie inside it.
        planted_heads: The design (default: the classifier's).
        inert_mlps: Layers whose MLP is inert.

    Example:
        >>> from vit_lens.circuits.graph import CircuitGraph
        >>> truth = edge_truth("position")
        >>> graph = CircuitGraph(4, 4, 65, ("all",), None)
        >>> int(truth[graph.sender_index("a0.h1"), graph.receiver_index("a2.h1<v>")])
        1
        >>> int(truth[graph.sender_index("a0.h1"), graph.receiver_index("logits")])
        0
    """
    heads = heads_by_factor(planted_heads)
    if factor not in heads:
        raise ValueError(f"unknown factor {factor!r}; the planted factors are {list(heads)}")
    for name, value in (("n_layers", n_layers), ("n_heads", n_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    outside = [(h.layer, h.head) for h in planted_heads if not (h.layer < n_layers and h.head < n_heads)]
    outside += [(layer, None) for layer in inert_mlps if not layer < n_layers]
    if outside:
        raise ValueError(f"the design places components at {outside} (layer, head), outside a model of {n_layers} "
                         f"layers x {n_heads} heads; pass the planted model's shape")
    graph = CircuitGraph(n_layers, n_heads, 0, ("all",), None)
    mine = heads[factor]  # in layer order
    others = {head for f, factor_heads in heads.items() if f != factor for head in factor_heads}
    inert = set(inert_heads(planted_heads, n_layers, n_heads))

    # Nodes in the graph's order: ("input",), ("head", layer, head), ("mlp", layer), ("logits",).
    nodes: list[tuple] = [("input",)]
    for layer in range(n_layers):
        nodes += [("head", layer, head) for head in range(n_heads)] + [("mlp", layer)]
    nodes.append(("logits",))
    sender = {node: index for index, node in enumerate(nodes[:-1])}
    receivers = {node: _receivers_of(graph, node) for node in nodes[1:]}
    real = graph.real

    def kind(node: tuple) -> str:
        if node[0] == "head":
            head = (node[1], node[2])
            return "mine" if head in mine else "other" if head in others else "inert"
        if node[0] == "mlp" and node[1] in inert_mlps:
            return "inert"
        return "glue"

    circuit = [node for node in nodes if kind(node) in ("mine", "glue")]
    linked = {(u, v): bool(real[sender[u], receivers[v][0]]) for u in circuit[:-1] for v in circuit[1:]}

    def step(count: int, node: tuple) -> int | None:
        """The count of the factor's heads visited after entering ``node`` with ``count`` visited; None if that skips one."""
        if kind(node) != "mine":
            return count
        return count + 1 if mine.index((node[1], node[2])) == count else None

    # forward: how many of the factor's heads a path from the input can have visited on arriving at a node
    forward: dict[tuple, set[int]] = {node: set() for node in circuit}
    forward[("input",)] = {0}
    for v in circuit[1:]:
        for u in circuit:
            if linked.get((u, v)):
                forward[v] |= {c for c in (step(count, v) for count in forward[u]) if c is not None}
    # backward: from which counts at a node the logits are reached with every head visited
    backward: dict[tuple, set[int]] = {node: set() for node in circuit}
    backward[("logits",)] = {len(mine)}
    for u in reversed(circuit[:-1]):
        for v in circuit:
            if linked.get((u, v)):
                backward[u] |= {count for count in range(len(mine) + 1) if step(count, v) in backward[v]}

    truth = torch.full((graph.n_senders, graph.n_receivers), UNKNOWN, dtype=torch.int8)
    for u, s in sender.items():
        for v, rs in receivers.items():
            if not real[s, rs[0]]:
                continue
            kinds = {kind(u), kind(v)}
            on_valid_path = bool(linked.get((u, v))) and any(step(count, v) in backward[v] for count in forward[u])
            if on_valid_path and "mine" in kinds:
                label = POSITIVE
            elif "inert" in kinds:
                label = NEGATIVE  # an inert node's output carries nothing, so neither do the edges in or out of it
            elif "other" in kinds or (on_valid_path and kinds == {"glue"}):
                label = UNKNOWN
            else:
                label = NEGATIVE
            truth[s, rs] = label
    return truth


def _receivers_of(graph: CircuitGraph, node: tuple) -> list[int]:
    """The receiver indices through which ``node`` reads (a head's q, k and v; an MLP's input; the output)."""
    if node[0] == "head":
        return [graph.head_receiver(node[1], node[2], qkv) for qkv in QKV]
    if node[0] == "mlp":
        return [graph.mlp_receiver(node[1])]
    return [graph.output_receiver]
