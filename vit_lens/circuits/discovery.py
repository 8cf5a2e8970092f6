"""Circuit discovery by search and by optimisation: ACDC and a learned edge mask.

Both run the clean images with chosen edges patched from the source (see :mod:`vit_lens.circuits.edges`)
and both end in :class:`~vit_lens.circuits.attribution.EdgeScores`, so they enter the same faithfulness
(:mod:`~vit_lens.circuits.evaluation`) and ROC evaluation as the attribution methods.

- :func:`acdc` (Conmy et al., "Towards Automated Circuit Discovery for Mechanistic Interpretability",
  NeurIPS 2023): starting from the full model, visit the receivers from the output backwards (reverse
  topological order: the output, then each layer's MLP, its heads' values, keys and queries, from the last
  layer down) and, for each edge into the receiver (latest sender first), patch it on top of the edges
  already removed; remove it for good if the task metric moves by at most ``tau``:
  ``|m(H without e) - m(H)| <= tau``, where ``H`` is the current circuit. The criterion is the metric
  difference, not ACDC's KL divergence, since our outputs may be embeddings rather than class
  probabilities. Every decision is the exact sequential one: each candidate is one patched run of the
  clean images (batching a receiver's candidates as variants would need a second pass whenever a removal
  changes the state the later candidates are judged from, and a variant costs as much as a run). Edges
  into a node whose every outgoing edge is already removed change nothing and are removed without a run.
- :func:`acdc_sweep`: ACDC at several thresholds; an edge's score is the largest ``tau`` at which it
  survives (0 if none).
- :func:`learned_edge_mask` (after Bhaskar et al., "Finding Transformer Circuits with Edge Pruning",
  NeurIPS 2024): a continuous mask ``sigmoid(logit)`` per edge, patched with weight ``1 - mask``, trained
  with Adam to keep each image's metric at its clean value while an L1 penalty on the masks pushes them
  to 0. The scores are the final masks.
"""

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vit_lens.circuits.attribution import EdgeScores, _prepare
from vit_lens.circuits.edges import run_patched
from vit_lens.circuits.evaluation import receiver_nodes
from vit_lens.circuits.graph import QKV, CircuitGraph
from vit_lens.utils.progress import progress as progress_bar

RELATIVE_TAUS = (0.001, 0.003, 0.01, 0.03, 0.1)


@dataclass
class ACDCResult:
    """One ACDC run.

    Attributes:
        tau: The threshold.
        circuit: ``[n_senders, n_receivers, n_groups]`` bool: the edges that survived.
        metric: ``m(circuit)``, the metric with every removed edge patched.
        clean: ``m(N)``, the clean run.
        n_runs: Patched forward passes made (candidates evaluated).
        seconds: Wall-clock time.
    """

    tau: float
    circuit: Tensor
    metric: float
    clean: float
    n_runs: int
    seconds: float

    @property
    def n_edges(self) -> int:
        return int(self.circuit.sum())


@dataclass
class ACDCSweep:
    """ACDC at several thresholds, and the edge scores it implies.

    Attributes:
        runs: One :class:`ACDCResult` per threshold, ascending.
        scores: Each edge's largest threshold at which it survived (0 if at none), as :class:`EdgeScores`.
    """

    runs: list[ACDCResult]
    scores: EdgeScores

    @property
    def taus(self) -> list[float]:
        return [run.tau for run in self.runs]


def _receiver_order(graph: CircuitGraph) -> list[int]:
    """Receivers from the output backwards: output, then per layer (last first) MLP, values, keys, queries."""
    order = [graph.output_receiver]
    for layer in reversed(range(graph.n_layers)):
        order.append(graph.mlp_receiver(layer))
        for qkv in reversed(QKV):
            order += [graph.head_receiver(layer, head, qkv) for head in reversed(range(graph.n_heads))]
    return order


@torch.no_grad()
def acdc(
    model: Any, graph: CircuitGraph, clean_images: Tensor, corrupted_images: Tensor | None, metric: Callable,
    tau: float, *, ablation: str = "patch", reference_images: Tensor | None = None, token_groups: Any = None,
    progress: bool = False,
) -> ACDCResult:
    """ACDC at one threshold: the circuit that survives removing every edge whose patch moves the metric <= tau.

    Args:
        model: A HookedViT or HookedCLIP (its image tower).
        graph: ``CircuitGraph.from_model(model, ...)``.
        clean_images, corrupted_images: The pairs (``corrupted_images`` None with ``ablation="mean"`` or ``"zero"``).
        metric: ``metric(output) -> scalar or [batch]``, the task metric.
        tau: The threshold, in the metric's units (>= 0); 0 removes only edges that change nothing.
        ablation, reference_images, token_groups: As for the edge-scoring methods.
        progress: Show a progress bar over the receivers.

    Returns:
        :class:`ACDCResult`.

    Example:
        >>> result = acdc(model, graph, clean, corrupted, metric, tau=0.05)  # doctest: +SKIP
        >>> [graph.edge_name(*edge) for edge in graph.edges(result.circuit)]  # doctest: +SKIP
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0:
        raise ValueError(f"tau must be a number >= 0 (in the metric's units), got {tau!r}")
    start = time.perf_counter()
    tower, source, groups = _prepare(model, graph, clean_images, corrupted_images, metric, ablation,
                                     reference_images, token_groups)
    removed = torch.zeros((1, *graph.shape))
    clean = float(run_patched(tower, graph, clean_images, source, removed, groups, metric)[0])
    current = clean
    nodes = receiver_nodes(graph)
    reads = graph.real[..., None].expand(graph.shape).clone()  # the edges still in the circuit
    n_runs = 1
    for receiver in progress_bar(_receiver_order(graph), desc=f"ACDC tau={tau:g}", enabled=progress):
        node = int(nodes[receiver])
        # a node none of whose outputs is read any more changes nothing through its inputs
        dead = node >= 0 and not bool(reads[node].any())
        for sender in reversed(range(graph.n_upstream(receiver))):
            for group in range(graph.n_groups):
                removed[0, sender, receiver, group] = 1.0
                if dead:
                    reads[sender, receiver, group] = False
                    continue
                value = float(run_patched(tower, graph, clean_images, source, removed, groups, metric)[0])
                n_runs += 1
                if abs(value - current) <= tau:
                    reads[sender, receiver, group] = False
                    current = value
                else:
                    removed[0, sender, receiver, group] = 0.0
    return ACDCResult(float(tau), reads, current, clean, n_runs, time.perf_counter() - start)


def acdc_sweep(
    model: Any, graph: CircuitGraph, clean_images: Tensor, corrupted_images: Tensor | None, metric: Callable,
    taus: Sequence[float] | None = None, *, ablation: str = "patch", reference_images: Tensor | None = None,
    token_groups: Any = None, progress: bool = False,
) -> ACDCSweep:
    """ACDC at each threshold; an edge's score is the largest threshold at which it survives.

    Args:
        taus: Thresholds in the metric's units; default ``(0.001, 0.003, 0.01, 0.03, 0.1)`` times
            ``|m(N) - m(∅)|``, the whole effect of patching every edge.
        Others: as :func:`acdc`.

    Returns:
        :class:`ACDCSweep`; ``.scores`` (method ``"ACDC"``) ranks edges for the faithfulness and ROC
        evaluations. Edges that survive at no threshold score 0, tied with one another.
    """
    start = time.perf_counter()
    if taus is None:
        tower, source, groups = _prepare(model, graph, clean_images, corrupted_images, metric, ablation,
                                         reference_images, token_groups)
        real = graph.real[None, :, :, None].expand(1, *graph.shape).float()
        with torch.no_grad():
            ends = run_patched(tower, graph, clean_images, source, torch.cat([torch.zeros_like(real), real]),
                               groups, metric)
        total = abs(float(ends[0] - ends[1]))
        taus = [fraction * total for fraction in RELATIVE_TAUS]
    taus = sorted(float(tau) for tau in taus)
    if not taus:
        raise ValueError("taus is empty; give at least one threshold (or None for the default sweep)")
    runs = [acdc(model, graph, clean_images, corrupted_images, metric, tau, ablation=ablation,
                 reference_images=reference_images, token_groups=token_groups, progress=progress) for tau in taus]
    scores = torch.zeros(graph.shape)
    for run in runs:  # ascending: the last threshold an edge survives wins
        scores = torch.where(run.circuit, torch.tensor(run.tau), scores)
    edge_scores = EdgeScores(graph, scores, "ACDC", baseline_clean=runs[0].clean,
                             seconds=time.perf_counter() - start)
    return ACDCSweep(runs, edge_scores)


def learned_edge_mask(
    model: Any, graph: CircuitGraph, clean_images: Tensor, corrupted_images: Tensor | None, metric: Callable,
    *, sparsity: float = 0.05, steps: int = 100, lr: float = 0.1, init_logit: float = 3.0, seed: int = 0,
    ablation: str = "patch", reference_images: Tensor | None = None, token_groups: Any = None,
    progress: bool = False,
) -> EdgeScores:
    """A continuous edge mask trained to keep the clean metric with few edges (edge pruning).

    Each edge has a logit ``l``; its mask is ``sigmoid(l)`` and it is patched with weight ``1 - sigmoid(l)``.
    Adam minimises

        mean over images of ((m_i(mask) - m_i(N)) / |m(N) - m(∅)|)^2  +  sparsity * mean over edges of mask,

    where ``m_i`` is image ``i``'s metric (the mean, if the metric returns a scalar): faithfulness to each
    clean image against the fraction of edges kept.

    Args:
        sparsity: Weight of the mask penalty; larger keeps fewer edges.
        steps: Adam steps, each one patched forward and backward pass over all images (the metric may
            hold per-image targets, so the images are not split).
        lr: Adam's learning rate.
        init_logit: Every logit's start (3: masks of 0.95, nearly the full model), plus a little seeded noise
            that breaks ties.
        seed: Seed of that noise; equal seeds give equal scores.
        Others: as :func:`acdc`.

    Returns:
        :class:`EdgeScores` (method ``"edge mask"``): the final masks ``sigmoid(logit)`` in ``[0, 1]`` (masks, not
        logits: ranked by ``|score|`` for CMD, logits would put the most strongly pruned edges first).
    """
    for name, value in (("sparsity", sparsity), ("lr", lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    start = time.perf_counter()
    tower, source, groups = _prepare(model, graph, clean_images, corrupted_images, metric, ablation,
                                     reference_images, token_groups)
    real = graph.real[..., None].expand(graph.shape)
    with torch.no_grad():
        ends = torch.cat([torch.zeros((1, *graph.shape)), real[None].float()])
        clean_mean, corrupted_mean = run_patched(tower, graph, clean_images, source, ends, groups, metric).tolist()
        clean_per_image = metric(tower(clean_images))
    scale = abs(clean_mean - corrupted_mean)
    # relative: identical images give equal metrics up to the rounding of where they sit in the batch
    if math.isclose(clean_mean, corrupted_mean, rel_tol=1e-5):
        raise ValueError(f"the clean and the fully patched run give the same metric ({clean_mean}); there is "
                         "nothing for the mask to keep: choose pairs whose metric differs")
    target = clean_per_image.detach() if clean_per_image.ndim == 1 else clean_mean

    def loss_per_image(output: Tensor) -> Tensor:
        return ((metric(output) - target) / scale) ** 2

    generator = torch.Generator().manual_seed(seed)
    logits = (init_logit + 0.01 * torch.randn(graph.shape, generator=generator)).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    n_real = int(real.sum())
    for _ in progress_bar(range(steps), desc="edge mask", enabled=progress):
        mask = torch.sigmoid(logits)
        with torch.enable_grad():
            faithfulness_loss = run_patched(tower, graph, clean_images, source, (1 - mask)[None], groups,
                                            loss_per_image)[0]
            loss = faithfulness_loss + sparsity * (mask * real).sum() / n_real
            # the gradient of the logits only: loss.backward() would also fill every model parameter's .grad
            (logits.grad,) = torch.autograd.grad(loss, [logits])
        optimizer.step()
    scores = torch.where(real, torch.sigmoid(logits.detach()), torch.zeros(()))
    return EdgeScores(graph, scores, "edge mask", baseline_clean=clean_mean, baseline_corrupted=corrupted_mean,
                      seconds=time.perf_counter() - start)
