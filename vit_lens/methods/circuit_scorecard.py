"""Circuit-discovery methods scored against the planted classifier's edge truth (issue 21, point 6).

The counterpart for edges of :mod:`vit_lens.methods.scorecard` (heads), in two steps kept apart so that
no method can see the answer:

1. :func:`score_edges` runs each method of :mod:`vit_lens.circuits` on the model alone (a ``HookedViT``
   or ``HookedCLIP``, never the :class:`~vit_lens.planted.model.PlantedModel`) with, per factor, the
   clean / corrupted pairs of :func:`~vit_lens.methods.scorecard.task_data` (they differ in that factor
   alone) and the metric read from the model's output: the clean value's logit minus the corrupted
   value's (:func:`~vit_lens.methods.scorecard.logit_difference` on the factor's readout). The graph has
   one token group (every token together), as MIB scores edges.
2. :func:`evaluate_edges` compares each method's scores with :func:`vit_lens.planted.truth.edge_truth`
   (positives: the edges on the design's route of the factor; unknown edges left out) by the scores'
   absolute values, since the truth says which edges carry the factor and not with which sign:

   - **edge AUROC**: the probability that a positive edge outscores a negative one (ties count one
     half; :func:`vit_lens.sae.scoring.auroc`), as InterpBench (Gupta et al., "InterpBench:
     Semi-Synthetic Transformers for Evaluating Mechanistic Interpretability Techniques", 2024) scores
     circuit methods; chance 0.5;
   - **AP**: average precision over the known edges (:func:`vit_lens.methods.segmentation.maps.average_precision`);
     chance as :func:`~vit_lens.methods.scorecard.chance_average_precision`;
   - **precision at the true circuit's size**: of the ``k`` best-scored known edges, ``k`` the number of
     positives, the share that are positive (under a tie at the cut, the expected share of breaking it
     at random); chance ``k / known``.

Beside the truth, each method's circuits are scored as MIB (Mueller et al., "MIB: A Mechanistic
Interpretability Benchmark", ICML 2025) scores them, with no truth at all: **CPR** (area under the
faithfulness curve of the signed ranking; higher is better) and **CMD** (area under ``|1 - f|`` of the
absolute ranking; lower is better), each circuit run as a real forward pass of the pruned model on the
factor's pairs (:func:`vit_lens.circuits.evaluation.evaluate_methods`, top-n selection at MIB's sizes).

Methods (:data:`EDGE_METHODS`): ``eap`` (edge attribution patching), ``eap_ig_inputs`` and
``eap_ig_activations`` (EAP-IG with 5 steps, interpolating the inputs or every receiver's input),
``exact`` (exact edge patching: one patched run per edge), ``acdc`` (ACDC at five thresholds, 0.1 % to 10 %
of the whole effect; an edge scores the largest threshold it survives), ``edge_mask`` (a learned continuous
edge mask, 100 Adam steps; its final logits), ``node_attribution`` (attribution patching of nodes, edges
ranked by their weaker node) and ``random`` (a seeded random ranking). Each runs with its defaults.

Example:
    >>> import vit_lens
    >>> from vit_lens.methods.circuit_scorecard import circuit_scorecard
    >>> planted = vit_lens.load_planted("classifier")  # doctest: +SKIP
    >>> print(circuit_scorecard(planted, n_pairs=32).markdown())  # doctest: +SKIP
"""

import datetime
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vit_lens.circuits.attribution import (
    EdgeScores,
    eap_ig,
    edge_attribution_patching,
    exact_edge_patching,
    node_attribution_patching,
    random_edge_scores,
)
from vit_lens.circuits.discovery import acdc_sweep, learned_edge_mask
from vit_lens.circuits.evaluation import evaluate_methods
from vit_lens.circuits.graph import CircuitGraph
from vit_lens.methods.scorecard import (
    SCORECARD_SEED,
    FactorPairs,
    FactorReadout,
    TaskData,
    _check_model,
    _check_names,
    _table,
    chance_average_precision,
    factor_readout,
    format_score,
    logit_difference,
    task_data,
)
from vit_lens.methods.segmentation.maps import average_precision
from vit_lens.model.hooked_vit import image_tower
from vit_lens.planted.model import PlantedModel
from vit_lens.planted.truth import NEGATIVE, POSITIVE, edge_truth
from vit_lens.sae.scoring import auroc

DEFAULT_PAIRS = 32
"""Pairs per factor: exact edge patching of the classifier's 479 edges takes ~30 s a factor at 32 on one thread."""

EdgeMethod = Callable[[Any, CircuitGraph, FactorPairs, Callable[[Tensor], Tensor], int], EdgeScores]


def _eap(model: Any, graph: CircuitGraph, pairs: FactorPairs, metric: Callable, seed: int) -> EdgeScores:
    return edge_attribution_patching(model, graph, pairs.clean, pairs.corrupted, metric)


def _eap_ig_inputs(model: Any, graph: CircuitGraph, pairs: FactorPairs, metric: Callable, seed: int) -> EdgeScores:
    return eap_ig(model, graph, pairs.clean, pairs.corrupted, metric, steps=5, interpolate="inputs")


def _eap_ig_activations(model: Any, graph: CircuitGraph, pairs: FactorPairs, metric: Callable,
                        seed: int) -> EdgeScores:
    return eap_ig(model, graph, pairs.clean, pairs.corrupted, metric, steps=5, interpolate="activations")


def _exact(model: Any, graph: CircuitGraph, pairs: FactorPairs, metric: Callable, seed: int) -> EdgeScores:
    return exact_edge_patching(model, graph, pairs.clean, pairs.corrupted, metric)


def _acdc(model: Any, graph: CircuitGraph, pairs: FactorPairs, metric: Callable, seed: int) -> EdgeScores:
    return acdc_sweep(model, graph, pairs.clean, pairs.corrupted, metric).scores


def _edge_mask(model: Any, graph: CircuitGraph, pairs: FactorPairs, metric: Callable, seed: int) -> EdgeScores:
    return learned_edge_mask(model, graph, pairs.clean, pairs.corrupted, metric, seed=seed)


def _node_attribution(model: Any, graph: CircuitGraph, pairs: FactorPairs, metric: Callable,
                      seed: int) -> EdgeScores:
    return node_attribution_patching(model, graph, pairs.clean, pairs.corrupted, metric)


def _random(model: Any, graph: CircuitGraph, pairs: FactorPairs, metric: Callable, seed: int) -> EdgeScores:
    return random_edge_scores(graph, seed)


EDGE_METHODS: dict[str, EdgeMethod] = {
    "eap": _eap,
    "eap_ig_inputs": _eap_ig_inputs,
    "eap_ig_activations": _eap_ig_activations,
    "exact": _exact,
    "acdc": _acdc,
    "edge_mask": _edge_mask,
    "node_attribution": _node_attribution,
    "random": _random,
}
"""Method key -> ``fn(model, graph, pairs, metric, seed) -> EdgeScores``; a method sees the model and the task only."""

METHOD_NAMES = {
    "eap": "EAP",
    "eap_ig_inputs": "EAP-IG, inputs (5 steps)",
    "eap_ig_activations": "EAP-IG, activations (5 steps)",
    "exact": "exact edge patching",
    "acdc": "ACDC (5 thresholds)",
    "edge_mask": "learned edge mask (100 steps)",
    "node_attribution": "node attribution patching (baseline)",
    "random": "random ranking (baseline)",
}
"""Method key -> the name printed in the tables."""


# ============================================================================ step 1: the methods


@dataclass
class EdgeMethodScores:
    """Every method's edge scores per factor (:func:`score_edges`).

    Attributes:
        scores: Method key -> factor -> :class:`~vit_lens.circuits.attribution.EdgeScores`.
        seconds: Method key -> wall-clock time over all factors.
        factors: The factors scored.
        n_pairs: Pairs per factor.
        seed: The task data's seed.
        faithfulness: Method key -> factor -> ``{"cpr": ..., "cmd": ...}`` (empty when not measured).
        faithfulness_seconds: Wall-clock time of the faithfulness runs, all methods and factors together.
    """

    scores: dict[str, dict[str, EdgeScores]]
    seconds: dict[str, float]
    factors: tuple[str, ...]
    n_pairs: int
    seed: int
    faithfulness: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    faithfulness_seconds: float = 0.0


def pair_metric(readout: FactorReadout, factor: str, pairs: FactorPairs) -> Callable[[Tensor], Tensor]:
    """``metric(output) -> [n_pairs]``: the clean value's logit minus the corrupted value's (high on the clean images)."""

    def metric(output: Tensor) -> Tensor:
        return logit_difference(readout.logits(output, factor), pairs.clean_values, pairs.corrupted_values)

    return metric


def check_methods(methods: Sequence[str] | None) -> list[str]:
    """The method keys to run (default: every one of :data:`EDGE_METHODS`)."""
    return list(EDGE_METHODS) if methods is None else _check_names(methods, list(EDGE_METHODS), "method")


def score_edges(model: Any, n_pairs: int = DEFAULT_PAIRS, seed: int = SCORECARD_SEED,
                methods: Sequence[str] | None = None, factors: Sequence[str] | None = None,
                data: TaskData | None = None, faithfulness: bool = True) -> EdgeMethodScores:
    """Run the edge methods on every factor's pairs and return their scores (step 1 of the module docstring).

    Args:
        model: A planted classifier / CLIP (a :class:`PlantedModel`, of which only ``.model`` is used), or
            the HookedViT / HookedCLIP itself.
        n_pairs: Clean / corrupted pairs per factor.
        seed: Seed of the task data (and, plus the factor's index, of the random ranking).
        methods: Method keys (:data:`EDGE_METHODS`); default: all.
        factors: Factors to score (default: all).
        data: Task data to use instead of drawing it (its pairs and factors are used).
        faithfulness: Also measure each method's CPR and CMD on the factor's pairs (MIB's sizes; 20
            circuits a method, run as real forward passes).
    """
    if isinstance(model, PlantedModel):
        model = model.model  # the truth stays behind
    _check_model(model)
    keys = check_methods(methods)
    readout = factor_readout(model)
    if data is None:
        # only the pairs are used; the pairs do not depend on the number of single images
        data = task_data(2, n_pairs, seed, factors)
    elif factors is not None:
        raise ValueError("pass factors= or data=, not both: the task data fixes the factors")
    graph = CircuitGraph.from_model(model)
    scores: dict[str, dict[str, EdgeScores]] = {key: {} for key in keys}
    seconds = dict.fromkeys(keys, 0.0)
    measured: dict[str, dict[str, dict[str, float]]] = {key: {} for key in keys} if faithfulness else {}
    faithfulness_seconds = 0.0
    for index, factor in enumerate(data.factors):
        pairs = data.pairs[factor]
        metric = pair_metric(readout, factor, pairs)
        for key in keys:
            start = time.perf_counter()
            result = EDGE_METHODS[key](model, graph, pairs, metric, data.seed + index)
            seconds[key] += time.perf_counter() - start
            scores[key][factor] = result
        if faithfulness:
            start = time.perf_counter()
            evaluations = evaluate_methods(model, graph, {key: scores[key][factor] for key in keys}, pairs.clean,
                                           pairs.corrupted, metric)
            faithfulness_seconds += time.perf_counter() - start
            for key, evaluation in evaluations.items():
                measured[key][factor] = {"cpr": evaluation.cpr, "cmd": evaluation.cmd}
    n_pairs = len(next(iter(data.pairs.values())).clean)
    return EdgeMethodScores(scores, seconds, data.factors, n_pairs, data.seed, measured, faithfulness_seconds)


# ============================================================================ step 2: against the truth


def precision_at_k(scores: Tensor, labels: Tensor, k: int) -> float:
    """The share of positives among the ``k`` best-scored items; a tie at the cut counts the expected share of
    breaking it at random.

    Example:
        >>> precision_at_k(torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([True, True, False, False]), 2)
        0.75
    """
    if not 1 <= k <= len(scores):
        raise ValueError(f"k must be from 1 to the {len(scores)} items, got {k}")
    labels = labels.bool()
    cut = scores.sort(descending=True).values[k - 1]
    above, tied = scores > cut, scores == cut
    from_ties = (k - int(above.sum())) * float(labels[tied].float().mean())
    return (int(labels[above].sum()) + from_ties) / k


def edge_metrics(scores: Tensor, truth: Tensor) -> dict[str, float | int]:
    """AUROC, AP and precision at the true circuit's size of ``|scores|`` over the known edges of ``truth``.

    Args:
        scores: ``[n_senders, n_receivers]`` edge scores (one token group).
        truth: ``[n_senders, n_receivers]`` int8 from :func:`~vit_lens.planted.truth.edge_truth`
            (1 positive, 0 negative, -1 unknown or no edge).

    Returns:
        ``auroc``, ``ap``, ``precision_at_k``, their chance values ``chance_ap`` and ``chance_precision``
        (chance AUROC is 0.5), and the counts ``n_positive``, ``n_negative``.
    """
    if scores.shape != truth.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and truth {tuple(truth.shape)} must have one shape "
                         "[n_senders, n_receivers]")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("the edge scores hold NaN or infinite values; a method failed upstream")
    known = (truth == POSITIVE) | (truth == NEGATIVE)
    values = scores[known].abs().double()
    labels = truth[known] == POSITIVE
    n_positive, n_known = int(labels.sum()), int(known.sum())
    return {
        "auroc": float(auroc(values, labels)[0]),
        "ap": float(average_precision(values[None], labels[None])[0]),
        "precision_at_k": precision_at_k(values, labels, n_positive),
        "chance_ap": chance_average_precision(n_positive, n_known),
        "chance_precision": n_positive / n_known,
        "n_positive": n_positive,
        "n_negative": n_known - n_positive,
    }


def evaluate_edges(edge_scores: EdgeMethodScores, planted: Any) -> list[dict[str, Any]]:
    """One row per method and factor: :func:`edge_metrics` against the planted model's edge truth.

    Args:
        edge_scores: From :func:`score_edges`.
        planted: The :class:`PlantedModel` whose truth the scores are compared with.
    """
    if not isinstance(planted, PlantedModel):
        raise TypeError(f"evaluate_edges compares with a PlantedModel's truth, got {type(planted).__name__}")
    cfg = image_tower(planted.model).cfg
    rows = []
    for key, by_factor in edge_scores.scores.items():
        for factor in edge_scores.factors:
            truth = edge_truth(factor, cfg.n_layers, cfg.n_heads, planted_heads=planted.planted_heads,
                               inert_mlps=tuple(planted.inert_mlps))
            result = by_factor[factor]
            if result.scores.shape[-1] != 1:
                raise ValueError(f"{key} scored {factor} on {result.scores.shape[-1]} token groups; the edge truth has "
                                 "one (build the graph with token_groups=None)")
            faithfulness = edge_scores.faithfulness.get(key, {}).get(factor, {"cpr": None, "cmd": None})
            rows.append({"method": key, "factor": factor, **edge_metrics(result.scores[..., 0], truth),
                         **faithfulness})
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the means over the factors of every score of the rows (None where it was not measured)."""

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    names = ("auroc", "ap", "precision_at_k", "cpr", "cmd", "chance_ap", "chance_precision")
    summary = []
    for key in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == key]
        summary.append({"method": key, "n_factors": len(mine),
                        **{f"mean_{name}": mean([row.get(name) for row in mine]) for name in names}})
    return summary


# ============================================================================ the scorecard


@dataclass
class CircuitScorecard:
    """Every edge method against one planted model's edge truth (:func:`circuit_scorecard`).

    Attributes:
        model: The planted model's name.
        rows: Per method and factor (:func:`evaluate_edges`).
        summary: Per method (:func:`summarise`), with its run time in ``seconds``.
        settings: Pairs, seed, edge counts, date and time taken.
    """

    model: str
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """A plain dict (JSON-serialisable)."""
        return {"model": self.model, "settings": dict(self.settings), "summary": [dict(r) for r in self.summary],
                "rows": [dict(r) for r in self.rows]}

    def markdown(self) -> str:
        """The tables: the per-method summary, the AUROC per factor and, where measured, CPR / CMD per factor."""
        s = self.settings
        factors = list(dict.fromkeys(row["factor"] for row in self.rows))
        by_key = {(row["method"], row["factor"]): row for row in self.rows}
        first = self.summary[0]
        out = [
            (f"### Planted {self.model}: edge attribution ({s['n_pairs']} pairs per factor; {s['n_edges']} edges, one "
             f"token group; seed {s['seed']})"),
            "",
            ("AUROC, AP and precision at k (k = the factor's positive edges) of |score| over the known edges of "
             "vit_lens.planted.truth.edge_truth (unknown edges left out); CPR (higher is better) and CMD (lower is "
             "better) from real runs of each method's circuits at MIB's sizes, no truth involved; all averaged over "
             "the factors. Seconds: the method's time for all factors."),
            "",
            _table(["method", "AUROC", "AP", "precision at k", "CPR", "CMD", "seconds"], [
                [METHOD_NAMES[r["method"]], format_score(r["mean_auroc"]), format_score(r["mean_ap"]),
                 format_score(r["mean_precision_at_k"]), format_score(r["mean_cpr"]), format_score(r["mean_cmd"]),
                 f"{r['seconds']:.1f}"] for r in self.summary
            ] + [["chance", "0.50", format_score(first["mean_chance_ap"]), format_score(first["mean_chance_precision"]),
                  "-", "-", "-"]]),
            "",
            "AUROC per factor (positive / negative edges in brackets):",
            "",
            _table(["method"] + [f"{f} ({by_key[(first['method'], f)]['n_positive']}/"
                                 f"{by_key[(first['method'], f)]['n_negative']})" for f in factors],
                   [[METHOD_NAMES[r["method"]]] + [format_score(by_key[(r["method"], f)]["auroc"]) for f in factors]
                    for r in self.summary]),
        ]
        if first["mean_cpr"] is not None:
            out += [
                "",
                "CPR / CMD per factor:",
                "",
                _table(["method"] + factors, [
                    [METHOD_NAMES[r["method"]]] + [f"{format_score(by_key[(r['method'], f)]['cpr'])} / "
                                                   f"{format_score(by_key[(r['method'], f)]['cmd'])}" for f in factors]
                    for r in self.summary]),
            ]
        return "\n".join(out)


def circuit_scorecard(planted: Any, name: str | None = None, n_pairs: int = DEFAULT_PAIRS,
                      seed: int = SCORECARD_SEED, methods: Sequence[str] | None = None,
                      factors: Sequence[str] | None = None, faithfulness: bool = True) -> CircuitScorecard:
    """Score every edge method on ``planted`` and compare with its edge truth (:func:`score_edges`, then
    :func:`evaluate_edges`).

    Args:
        planted: A :class:`PlantedModel` (the methods get only its ``.model``).
        name: Its name in the tables (default: ``"clip"`` for a CLIP, else ``"classifier"``).
        n_pairs, seed, methods, factors, faithfulness: As :func:`score_edges`.
    """
    if not isinstance(planted, PlantedModel):
        raise TypeError(f"circuit_scorecard needs a PlantedModel (its truth is the answer key), got "
                        f"{type(planted).__name__}")
    start = time.perf_counter()
    scores = score_edges(planted, n_pairs=n_pairs, seed=seed, methods=methods, factors=factors,
                         faithfulness=faithfulness)
    rows = evaluate_edges(scores, planted)
    summary = summarise(rows)
    for row in summary:
        row["seconds"] = scores.seconds[row["method"]]
    graph = CircuitGraph.from_model(planted.model)
    settings = {
        "n_pairs": scores.n_pairs, "seed": seed, "factors": list(scores.factors), "n_edges": graph.n_edges,
        "faithfulness_seconds": round(scores.faithfulness_seconds, 1),
        "date": datetime.date.today().isoformat(), "seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    kind = factor_readout(planted.model).kind
    return CircuitScorecard(name or kind, rows, summary, settings)
