"""Edge scores and circuits as JSON in the EAP-IG / MIB graph layout, and back.

The layout is the one the EAP-IG code (Hanna, Pezzelle and Belinkov, "Have Faith in Faithfulness", 2024)
and the Mechanistic Interpretability Benchmark (Mueller et al., 2025) write and read for a graph:

.. code-block:: text

    {
      "cfg":   {"n_layers": 4, "n_heads": 4, "parallel_attn_mlp": false, "d_model": 64, ...},
      "nodes": {"input": {"in_graph": true}, "a0.h0": {"in_graph": false}, ..., "m3": {...}, "logits": {...}},
      "edges": {"input->a0.h0<q>": {"score": 0.012, "in_graph": false}, ..., "m3->logits": {...}}
    }

Node and edge names are the graph's own (``input``, ``a{l}.h{h}``, ``m{l}``, ``logits``; edges
``"a0.h1->a2.h1<v>"``), which are EAP-IG's, so their ``Graph.from_json`` reads a file written here. A node
is in the graph when an edge of the circuit starts or ends at it; ``logits`` always is, as in EAP-IG. Node
attribution's node scores go to each node's ``"score"``.

**Token groups.** EAP-IG's graphs have no token positions. For a graph split by token group, ``"edges"``
holds each edge summed over its groups (its score is the edge's score over all tokens, for methods whose
group scores add up, such as EAP and EAP-IG; in the graph when any of its groups is), so EAP-IG's tooling
still reads the file, and a ``"vit_lens"`` key holds the scores per group: ``"token_groups"`` maps each
group name to its own ``{edge name: {"score", "in_graph"}}`` dict, with the edge names written without the
``"@group"`` suffix. The ``"vit_lens"`` key also records what EAP-IG's layout has no place for (the
tokens, the groups' token indices, the method and its baselines), so :func:`from_json` restores the
:class:`~vit_lens.circuits.attribution.EdgeScores` exactly.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vit_lens.circuits.attribution import EdgeScores
from vit_lens.circuits.graph import OUTPUT, CircuitGraph

FORMAT = "vit_lens circuit 1"


def to_json(scores: Any, path: str | os.PathLike | None = None, circuit: Any = None, *,
            d_model: Any = None) -> dict[str, Any]:
    """Write edge scores (and a circuit) in the EAP-IG / MIB graph layout.

    Args:
        scores: Any method's :class:`~vit_lens.circuits.attribution.EdgeScores`.
        path: Where to write the JSON file (atomically: a temporary file in the same folder, then renamed);
            None to only return the dict.
        circuit: ``[n_senders, n_receivers, n_groups]`` bool: the edges ``"in_graph"``; None for none (a
            scored graph before any selection, as EAP-IG keeps it), e.g. ``scores.top(100)``.
        d_model: The model's width, for ``cfg["d_model"]``: EAP-IG's ``Graph.from_json`` sizes its neuron
            tensors with it (pass ``model.cfg.d_model``); omitted from ``cfg`` when None.

    Returns:
        The dict written.

    Example:
        >>> to_json(scores, "circuit.json", scores.top(200), d_model=model.cfg.d_model)  # doctest: +SKIP
    """
    if not isinstance(scores, EdgeScores):
        raise TypeError(f"scores must be EdgeScores (from edge_attribution_patching, eap_ig, ...), got "
                        f"{type(scores).__name__}")
    graph = scores.graph
    if circuit is None:
        circuit = torch.zeros(graph.shape, dtype=torch.bool)
    circuit = graph.check_edge_tensor(circuit, "circuit")
    if circuit.dtype != torch.bool:
        raise ValueError(f"circuit must be a bool tensor (True: the edge is in the circuit), got {circuit.dtype}; "
                         "use scores.top(n) for the n best edges")
    circuit = circuit & graph.real[..., None]
    values = scores.scores.detach().float().cpu()
    senders, receivers = graph.sender_names(), graph.receiver_names()
    grouped = graph.n_groups > 1

    edges: dict[str, dict[str, Any]] = {}
    per_group: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in graph.group_names}
    for s, r in graph.real.nonzero().tolist():
        name = f"{senders[s]}->{receivers[r]}"
        edges[name] = {"score": float(values[s, r].sum()), "in_graph": bool(circuit[s, r].any())}
        if grouped:
            for g, group in enumerate(graph.group_names):
                per_group[group][name] = {"score": float(values[s, r, g]), "in_graph": bool(circuit[s, r, g])}

    in_graph = graph.touched_nodes(circuit)
    nodes: dict[str, dict[str, Any]] = {}
    for s, name in enumerate(senders):
        nodes[name] = {"in_graph": bool(in_graph[s])}
        if scores.node_scores is not None:
            nodes[name]["score"] = float(scores.node_scores[s].sum())
    nodes[OUTPUT] = {"in_graph": True}

    cfg: dict[str, Any] = {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": False}
    if d_model is not None:
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int (model.cfg.d_model), got {d_model!r}")
        cfg["d_model"] = d_model
    extra: dict[str, Any] = {
        "format": FORMAT,
        "model_name": graph.model_name,
        "n_ctx": graph.n_ctx,
        "group_names": list(graph.group_names),
        "group_tokens": None if graph.group_masks is None else
        [graph.group_masks[:, g].nonzero().flatten().tolist() for g in range(graph.n_groups)],
        "method": scores.method,
        "baseline_clean": scores.baseline_clean,
        "baseline_corrupted": scores.baseline_corrupted,
        "seconds": scores.seconds,
        "node_scores": None if scores.node_scores is None else scores.node_scores.tolist(),
    }
    if grouped:
        extra["token_groups"] = per_group
    document = {"cfg": cfg, "nodes": nodes, "edges": edges, "vit_lens": extra}
    if path is not None:
        _write_atomically(Path(path), json.dumps(document))
    return document


def from_json(source: Any, n_ctx: int | None = None) -> tuple[EdgeScores, Tensor]:
    """Read a graph in the EAP-IG / MIB layout: the edge scores and the circuit (``"in_graph"``).

    Reads files written by :func:`to_json` exactly (token groups, method and baselines included) and
    files written by EAP-IG or MIB (one token group, ``"all"``).

    Args:
        source: A path, or the dict :func:`to_json` returns.
        n_ctx: The model's tokens, for files that do not record them (EAP-IG's own).

    Returns:
        ``(scores, circuit)``: :class:`~vit_lens.circuits.attribution.EdgeScores` and the
        ``[n_senders, n_receivers, n_groups]`` bool circuit.

    Raises:
        ValueError: If the file lacks the layout's keys, has parallel attention and MLP (a graph vit_lens does
            not build), names an edge the graph does not have, or leaves an edge out.
    """
    document = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    missing = [key for key in ("cfg", "nodes", "edges") if key not in document]
    if missing:
        raise ValueError(f"{_describe(source)} lacks the keys {missing} of the EAP-IG / MIB graph layout "
                         "(cfg, nodes, edges)")
    cfg, extra = document["cfg"], document.get("vit_lens") or {}
    if cfg.get("parallel_attn_mlp"):
        raise ValueError(f"{_describe(source)} is a graph with parallel attention and MLP (MLP l does not read "
                         "layer l's heads); vit_lens graphs are sequential")
    n_ctx = extra.get("n_ctx", n_ctx)
    if n_ctx is None:
        raise ValueError(f"{_describe(source)} does not record the model's tokens; pass n_ctx=model.cfg.n_ctx")
    group_names = tuple(extra.get("group_names", ["all"]))
    group_tokens = extra.get("group_tokens", [list(range(n_ctx))] if group_names == ("all",) else None)
    group_masks = None
    if group_tokens is not None:
        group_masks = torch.zeros(n_ctx, len(group_names), dtype=torch.bool)
        for g, tokens in enumerate(group_tokens):
            group_masks[tokens, g] = True
    graph = CircuitGraph(int(cfg["n_layers"]), int(cfg["n_heads"]), int(n_ctx), group_names, group_masks,
                         extra.get("model_name", "custom"))

    per_group = extra.get("token_groups")
    tables = [per_group[name] for name in group_names] if graph.n_groups > 1 else [document["edges"]]
    scores = torch.zeros(graph.shape)
    circuit = torch.zeros(graph.shape, dtype=torch.bool)
    expected = int(graph.real.sum())
    for g, table in enumerate(tables):
        if len(table) != expected:
            raise ValueError(f"{_describe(source)} has {len(table)} edges for token group {group_names[g]!r}; "
                             f"a graph of {graph.n_layers} layers x {graph.n_heads} heads has {expected}")
        for name, entry in table.items():
            s, r, _ = graph.edge_index(name if graph.n_groups == 1 else f"{name}@{group_names[g]}")
            scores[s, r, g] = float(entry["score"])
            circuit[s, r, g] = bool(entry["in_graph"])
    node_scores = extra.get("node_scores")
    result = EdgeScores(
        graph, scores, extra.get("method", "imported"),
        baseline_clean=extra.get("baseline_clean"), baseline_corrupted=extra.get("baseline_corrupted"),
        seconds=float(extra.get("seconds", 0.0)),
        node_scores=None if node_scores is None else torch.tensor(node_scores, dtype=torch.float32),
    )
    return result, circuit


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _describe(source: Any) -> str:
    return "the dict" if isinstance(source, dict) else f"{str(source)!r}"

