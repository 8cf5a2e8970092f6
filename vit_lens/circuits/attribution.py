"""Edge scores: edge attribution patching (EAP), EAP-IG, exact edge patching, and baselines.

**Roles and sign.** Every method runs the **clean** images and asks what each edge contributes to the
metric there. An edge's score estimates ``m(clean) - m(clean with that edge patched)``: how much the metric
drops when the receiver reads the sender's **source** output (its output on the **corrupted** image of the
pair, its mean over reference images, or zero; see :mod:`vit_lens.circuits.edges`) instead of its clean
one. A positive score means the edge helps the metric; choose a metric that is high on the clean images
(the clean label's logit minus the corrupted label's). Clean and corrupted batches must have one shape.

- :func:`edge_attribution_patching` (EAP; Syed, Rager and Conmy, "Attribution Patching Outperforms
  Automated Circuit Discovery", 2023): ``(clean_s - source_s) . dm/d(input_r)`` at the clean run, summed over
  the group's tokens and averaged over images. One forward and one backward pass.
- :func:`eap_ig` (Hanna, Pezzelle and Belinkov, "Have Faith in Faithfulness", 2024): the gradient averaged
  over ``steps`` points between the source and the clean run. ``interpolate="inputs"`` (default) moves the
  input embeddings (the residual stream entering block 0) from the source's to the clean ones;
  ``"activations"`` sets every receiver's input to ``source + a (clean - source)``, with gradients passed
  straight through, so every node is on the straight line at once (MIB's EAP-IG-activations).
- :func:`exact_edge_patching`: the true ``m(clean) - m(clean with the edge patched)``, one patched run an edge
  (several edges share a forward as variants of one batch); only for small graphs.
- :func:`node_attribution_patching`: attribution patching of the nodes (each sender's whole output), and
  edges ranked by the weaker of their two nodes, so that the top edges are the edges among the top
  nodes: the node-level baseline.
- :func:`random_edge_scores`: a seeded random ranking.

For a model whose metric is linear in the patched activations, EAP equals exact edge patching (tested).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from vit_lens.circuits.edges import (
    _check_graph,
    edge_hooks_enabled,
    metric_mean,
    run_patched,
    source_outputs,
)
from vit_lens.circuits.graph import QKV, CircuitGraph
from vit_lens.model.hooked_vit import image_tower
from vit_lens.utils.progress import progress as progress_bar

INTERPOLATIONS = ("inputs", "activations")


@dataclass
class EdgeScores:
    """One method's score for every edge of a graph.

    Attributes:
        graph: The graph the scores index.
        scores: ``[n_senders, n_receivers, n_groups]``; 0 where there is no edge (see ``graph.real``).
        method: Which method produced them.
        baseline_clean: The metric of the clean run (mean over images).
        baseline_corrupted: The metric with every edge patched (the source run), where the method ran it.
        seconds: Wall-clock time of the method.
        node_scores: For node attribution, ``[n_senders, n_groups]``.
    """

    graph: CircuitGraph
    scores: Float[Tensor, "sender receiver group"]
    method: str
    baseline_clean: float | None = None
    baseline_corrupted: float | None = None
    seconds: float = 0.0
    node_scores: Tensor | None = field(default=None, repr=False)

    def edge_list(self) -> list[tuple[int, int, int]]:
        """Every edge of the graph as ``(sender, receiver, group)``, in tensor order."""
        return self.graph.edges()

    def flat(self, absolute: bool = False) -> Float[Tensor, " edge"]:
        """The scores of the real edges, in :meth:`edge_list` order (absolute values if ``absolute``)."""
        real = self.graph.real[..., None].expand(self.graph.shape)
        values = self.scores[real]
        return values.abs() if absolute else values

    def top(self, n: int, absolute: bool = False) -> torch.Tensor:
        """The ``n`` best-scored edges as a bool circuit ``[n_senders, n_receivers, n_groups]``.

        Args:
            n: How many edges (0 to ``graph.n_edges``).
            absolute: Rank by ``|score|`` (edges that matter either way) instead of the signed score.
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.graph.n_edges:
            raise ValueError(f"n must be an int from 0 to the graph's {self.graph.n_edges} edges, got {n!r}")
        values = self.flat(absolute)
        chosen = torch.zeros_like(values, dtype=torch.bool)
        chosen[torch.argsort(values, descending=True, stable=True)[:n]] = True
        circuit = torch.zeros(self.graph.shape, dtype=torch.bool)
        circuit[self.graph.real[..., None].expand(self.graph.shape)] = chosen
        return circuit

    def ranking(self, absolute: bool = False, k: int | None = None) -> list[tuple[str, float]]:
        """``(edge name, score)`` from the best down (the first ``k``)."""
        values = self.flat(absolute)
        edges = self.edge_list()
        order = torch.argsort(values, descending=True, stable=True)[: k if k is not None else len(values)]
        signed = self.flat()
        return [(self.graph.edge_name(*edges[i]), float(signed[i])) for i in order.tolist()]

    def score(self, name: str) -> float:
        """The score of one edge by name (``"a0.h1->a2.h1<v>"``, with ``"@group"`` when split by token group)."""
        return float(self.scores[self.graph.edge_index(name)])


# ============================================================================ inputs


def _prepare(model: Any, graph: Any, clean_images: Tensor, corrupted_images: Tensor | None, metric: Any,
             ablation: str, reference_images: Tensor | None, token_groups: Any):
    tower = image_tower(model)
    _check_graph(tower, graph)
    if not callable(metric):
        raise TypeError(f"metric must be callable as metric(output) -> scalar or [batch] tensor, got "
                        f"{type(metric).__name__}")
    source = source_outputs(tower, graph, clean_images, corrupted_images, ablation, reference_images)
    n_ctx = source.shape[2]
    groups = graph.token_group_masks(token_groups, len(clean_images), n_ctx).to(clean_images.device)
    return tower, source, groups


def _batches(n: int, batch_size: int | None) -> list[slice]:
    if batch_size is None:
        return [slice(0, n)]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None (all images at once), got {batch_size!r}")
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


# ============================================================================ gradient methods


class _GradientScorer:
    """Hooks of one backward pass that turn receiver-input gradients into edge scores.

    ``differences`` are the fixed ``clean - source`` sender outputs ``[sender, batch, pos, d_model]``; each
    receiver's gradient is multiplied with them, per token group, as it arrives, so no gradient is stored. On
    the clean run they are not known before the forward pass: the hooks then record the senders' outputs and
    the receivers' clean inputs on the way (:meth:`finish_clean_forward` turns them into ``differences``), so
    the clean run is both the first gradient step and the source of the differences.
    """

    def __init__(self, graph: CircuitGraph, groups: Tensor, scores: Tensor, weight: float):
        self.graph = graph
        self.groups = groups
        self.one_group = groups.shape[-1] == 1 and bool((groups == 1).all())
        self.scores = scores
        self.weight = weight
        self.differences: Tensor | None = None
        self.recorded: list[Tensor] = []
        self.clean_inputs: dict[int, Tensor] = {}
        self.upstream_sums: dict[int, Tensor] = {}
        self.alpha = 1.0
        self.interpolate: str | None = None
        self.accumulate = False
        self.gradient_sums: dict[tuple[int, int, int], Tensor] = {}

    def hooks(self) -> list[tuple[str, Callable]]:
        g = self.graph
        hooks = [("blocks.0.hook_resid_pre", self._root)]
        for layer in range(g.n_layers):
            heads, mlp = g.layer_receivers(layer)
            for kind, qkv in enumerate(QKV):
                receivers = list(range(heads.start + kind * g.n_heads, heads.start + (kind + 1) * g.n_heads))
                hooks.append((f"blocks.{layer}.hook_{qkv}_input", self._receiver(receivers, True)))
            if self.recording:  # a hook on hook_result makes the per-head results computed: only when needed
                hooks.append((f"blocks.{layer}.attn.hook_result", self._record_heads))
            hooks.append((f"blocks.{layer}.hook_mlp_in", self._receiver([mlp], False)))
            if self.recording:
                hooks.append((f"blocks.{layer}.hook_mlp_out", self._record_one))
        hooks.append((f"blocks.{g.n_layers - 1}.hook_resid_post", self._receiver([g.output_receiver], False)))
        return hooks

    @property
    def recording(self) -> bool:
        return self.differences is None

    def finish_clean_forward(self, source: Tensor) -> None:
        """After the clean forward: ``differences = clean - source``; the upstream sums the activation path needs."""
        self.differences = torch.stack(self.recorded)
        self.recorded = []
        self.differences.sub_(source.to(self.differences))  # in place: one copy of the senders' outputs, not two
        if self.interpolate == "activations":
            total, done = torch.zeros_like(self.differences[0]), 0
            for upstream in sorted(self.clean_inputs):
                total = total + self.differences[done:upstream].sum(0)
                self.upstream_sums[upstream], done = total, upstream

    def _root(self, resid: Tensor, hook: Any) -> Tensor:
        if self.recording:
            self.recorded.append(resid.detach())
        if not resid.requires_grad:
            resid = resid.detach().requires_grad_(True)
        if self.interpolate == "inputs" and not self.recording:
            resid = resid - (1 - self.alpha) * self.differences[0]  # the input embeddings on the line to the source
        self.root = resid
        return resid

    def _record_heads(self, result: Tensor, hook: Any) -> Tensor:
        if self.recording:
            self.recorded += [result[:, :, h].detach() for h in range(result.shape[2])]
        return result

    def _record_one(self, out: Tensor, hook: Any) -> Tensor:
        if self.recording:
            self.recorded.append(out.detach())
        return out

    def _receiver(self, receivers: list[int], per_head: bool) -> Callable:
        upstream = self.graph.n_upstream(receivers[0])

        def hook(activation: Tensor, hook: Any) -> Tensor:
            if self.interpolate == "activations":
                if self.recording:
                    self.clean_inputs[upstream] = (activation[:, :, 0] if per_head else activation).detach()
                elif self.alpha != 1.0:
                    activation = self._interpolated(activation, upstream, per_head)
            activation.register_hook(lambda grad: self._score(grad, receivers, upstream, per_head))
            return activation

        return hook

    def _interpolated(self, activation: Tensor, upstream: int, per_head: bool) -> Tensor:
        """The receiver input set to ``clean - (1 - alpha) * sum(clean - source)`` with a straight-through gradient."""
        target = self.clean_inputs[upstream] - (1 - self.alpha) * self.upstream_sums[upstream]
        if per_head:
            target = target[:, :, None]
        return activation + (target - activation).detach()

    def _score(self, grad: Tensor, receivers: list[int], upstream: int, per_head: bool) -> None:
        grad = grad if per_head else grad[:, :, None]  # [batch, pos, receivers, d_model]
        grad = grad.permute(2, 0, 1, 3)  # [receivers, batch, pos, d_model]: rows of d_model stay contiguous
        if self.accumulate:
            # several steps: the score is linear in the gradient, so sum the gradients and score once (the
            # product with every upstream difference costs about as much as a backward pass on a ViT-B)
            key = (receivers[0], len(receivers), upstream)
            total = self.gradient_sums.get(key)
            if total is None:  # a copy: the gradient autograd hands over must not be written into
                self.gradient_sums[key] = grad.detach().clone(memory_format=torch.contiguous_format)
            else:
                total.add_(grad)
            return
        self._add_scores(grad, receivers, upstream)

    def _add_scores(self, grad: Tensor, receivers: list[int], upstream: int) -> None:
        """``scores[:upstream, receivers] += weight * differences . grad``, per token group."""
        # One matrix product over (batch, pos, d_model) with the differences read in place: an einsum
        # here copied all upstream differences into another layout on every call.
        differences = self.differences[:upstream].to(grad).flatten(1)  # [sender, batch * pos * d_model]
        for group in range(self.groups.shape[-1]):
            masked = grad if self.one_group else grad * self.groups[None, :, :, group, None].to(grad)
            contribution = differences @ masked.reshape(len(receivers), -1).T
            self.scores[:upstream, receivers, group] += self.weight * contribution.to(self.scores)

    def flush(self) -> None:
        """Score the gradients summed over the steps."""
        for (first, count, upstream), total in self.gradient_sums.items():
            self._add_scores(total, list(range(first, first + count)), upstream)
        self.gradient_sums = {}


def _gradient_method(
    name: str, model: Any, graph: CircuitGraph, clean_images: Tensor, corrupted_images: Tensor | None,
    metric: Callable, steps: int, interpolate: str | None, ablation: str, reference_images: Tensor | None,
    token_groups: Any, batch_size: int | None, progress: bool,
) -> EdgeScores:
    start = time.perf_counter()
    tower, source, groups = _prepare(model, graph, clean_images, corrupted_images, metric, ablation,
                                     reference_images, token_groups)
    scores = torch.zeros(graph.shape, dtype=torch.float64)
    n = len(clean_images)
    # the clean point (alpha = 1) first: its forward records the senders' clean outputs for the differences
    alphas = [1.0] if interpolate is None else [1.0] + [(k + 1) / steps for k in range(steps - 1)]
    baseline = 0.0
    chunks = _batches(n, batch_size)
    bar = progress_bar(total=len(chunks) * len(alphas), desc=name, enabled=progress)
    with edge_hooks_enabled(tower):
        for chunk in chunks:
            images = clean_images[chunk]
            chunk_source = source[:, chunk] if source.shape[1] > 1 else source
            # per-image metric values are summed, so each image's gradient carries weight 1; the weight turns
            # the sum over images and steps into the mean
            scorer = _GradientScorer(graph, groups[chunk], scores, 1 / n / len(alphas))
            scorer.interpolate = interpolate
            scorer.accumulate = len(alphas) > 1
            for alpha in alphas:
                scorer.alpha = alpha
                with torch.enable_grad():
                    output = tower.run_with_hooks(images, fwd_hooks=scorer.hooks())
                    value = _metric_sum(metric, output)
                    if not value.requires_grad:
                        raise ValueError("metric(output) does not depend on the output (no gradient reaches the edges); "
                                         "compute it from the output with torch operations")
                    if scorer.recording:
                        scorer.finish_clean_forward(chunk_source)
                        baseline += float(value.detach()) / n
                    # gradients for the root only: the receivers' tensor hooks score on the way, and no
                    # parameter's .grad is touched
                    torch.autograd.grad(value, [scorer.root])
                bar.update(1)
            scorer.flush()
            del scorer
    bar.close()
    return EdgeScores(graph, scores.float(), name, baseline_clean=baseline, seconds=time.perf_counter() - start)


def _metric_sum(metric: Callable, output: Tensor) -> Tensor:
    return metric_mean(metric, output) * len(output)


def edge_attribution_patching(
    model: Any, graph: CircuitGraph, clean_images: Tensor, corrupted_images: Tensor | None, metric: Callable,
    *, ablation: str = "patch", reference_images: Tensor | None = None, token_groups: Any = None,
    batch_size: int | None = None, progress: bool = False,
) -> EdgeScores:
    """Edge attribution patching: ``(clean_s - source_s) . dm/d(input_r)``, one forward and backward pass.

    Args:
        model: A HookedViT or HookedCLIP (its image tower).
        graph: ``CircuitGraph.from_model(model, ...)``.
        clean_images: ``[batch, C, H, W]``, the run whose edges are scored.
        corrupted_images: ``[batch, C, H, W]`` counterfactuals (pair ``i`` is image ``i`` of each); None with
            ``ablation="mean"`` or ``"zero"``.
        metric: ``metric(output) -> scalar or [batch]``, high on the clean images.
        ablation: ``"patch"`` (default), ``"mean"`` or ``"zero"``: what a patched edge carries.
        reference_images: Images the mean ablation averages over (default: the clean images).
        token_groups: ``[batch, pos, n_groups]`` bool masks for a graph whose groups differ per image.
        batch_size: Images per forward and backward pass (default: all).
        progress: Show a progress bar.

    Returns:
        :class:`EdgeScores`; ``scores[s, r, g]`` estimates ``m(clean) - m(clean with edge (s, r, g) patched)``.

    Example:
        >>> graph = CircuitGraph.from_model(model)  # doctest: +SKIP
        >>> scores = edge_attribution_patching(model, graph, clean, corrupted, metric)  # doctest: +SKIP
        >>> scores.ranking(k=5)  # doctest: +SKIP
    """
    return _gradient_method("EAP", model, graph, clean_images, corrupted_images, metric, 1, None, ablation,
                            reference_images, token_groups, batch_size, progress)


def eap_ig(
    model: Any, graph: CircuitGraph, clean_images: Tensor, corrupted_images: Tensor | None, metric: Callable,
    *, steps: int = 5, interpolate: str = "inputs", ablation: str = "patch", reference_images: Tensor | None = None,
    token_groups: Any = None, batch_size: int | None = None, progress: bool = False,
) -> EdgeScores:
    """EAP with integrated gradients: the receiver gradients averaged over ``steps`` points from source to clean.

    The points are ``alpha = 1/steps, 2/steps, ..., 1`` (``alpha = 1`` is the clean run). Arguments as
    :func:`edge_attribution_patching`, plus:

    Args:
        steps: Interpolation steps (default 5, as MIB runs it); the cost is ``steps`` forward and backward passes.
        interpolate: ``"inputs"``: the input embeddings move from the source's to the clean ones, and
            everything after them is computed; ``"activations"``: every receiver's input is set on the line
            from its source to its clean value (gradients pass straight through the setting).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if interpolate not in INTERPOLATIONS:
        raise ValueError(f"interpolate must be one of {INTERPOLATIONS}, got {interpolate!r}")
    return _gradient_method(f"EAP-IG-{interpolate}", model, graph, clean_images, corrupted_images, metric, steps,
                            interpolate, ablation, reference_images, token_groups, batch_size, progress)


def node_attribution_patching(
    model: Any, graph: CircuitGraph, clean_images: Tensor, corrupted_images: Tensor | None, metric: Callable,
    **kwargs: Any,
) -> EdgeScores:
    """Attribution patching of the nodes, as a baseline for edge methods.

    A sender's node score is ``(clean_s - source_s) . dm/d(output_s)``; every path from a sender's output to
    the metric passes through exactly one receiver input, so it is the sum of its EAP edge scores. An edge is
    then scored by the weaker of its sender's and its receiver's node scores (the output counts as
    infinitely strong), so the top edges are those among the top nodes. Keyword arguments as
    :func:`edge_attribution_patching`.
    """
    start = time.perf_counter()
    edge = edge_attribution_patching(model, graph, clean_images, corrupted_images, metric, **kwargs)
    nodes = edge.scores.sum(dim=1)  # [sender, group]
    receiver_node = torch.full((graph.n_receivers,), float("inf"))
    for layer in range(graph.n_layers):
        heads, mlp = graph.layer_receivers(layer)
        for kind in range(3):
            for head in range(graph.n_heads):
                receiver_node[heads.start + kind * graph.n_heads + head] = nodes[graph.head_sender(layer, head)].sum()
        receiver_node[mlp] = nodes[graph.mlp_sender(layer)].sum()
    scores = torch.minimum(nodes[:, None, :], receiver_node[None, :, None])
    scores = torch.where(graph.real[..., None], scores, torch.zeros(()))
    return EdgeScores(graph, scores, "node attribution", baseline_clean=edge.baseline_clean,
                      seconds=time.perf_counter() - start, node_scores=nodes)


def random_edge_scores(graph: CircuitGraph, seed: int = 0) -> EdgeScores:
    """A seeded random score per edge: the baseline every method must beat."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(graph.shape, generator=generator) * graph.real[..., None]
    return EdgeScores(graph, scores, "random")


@torch.no_grad()
def exact_edge_patching(
    model: Any, graph: CircuitGraph, clean_images: Tensor, corrupted_images: Tensor | None, metric: Callable,
    *, ablation: str = "patch", reference_images: Tensor | None = None, token_groups: Any = None,
    edges: list[tuple[int, int, int]] | None = None, max_batch: int = 512, progress: bool = False,
) -> EdgeScores:
    """The exact effect of patching each edge alone: ``m(clean) - m(clean with the edge patched)``.

    One patched run per edge: several edges run as variants of one batch of up to ``max_batch`` images.
    Arguments as :func:`edge_attribution_patching`, plus ``edges`` (``(sender, receiver, group)`` triples to
    score; default every edge, unscored ones stay 0) and ``max_batch``.
    """
    start = time.perf_counter()
    tower, source, groups = _prepare(model, graph, clean_images, corrupted_images, metric, ablation,
                                     reference_images, token_groups)
    edge_list = graph.edges() if edges is None else [tuple(e) for e in edges]
    n = len(clean_images)
    per_forward = max(1, max_batch // n)
    none = torch.zeros((1, *graph.shape))
    everything = graph.real[None, :, :, None].expand(1, *graph.shape).float()
    clean_value, corrupted_value = run_patched(tower, graph, clean_images, source, torch.cat([none, everything]),
                                               groups, metric).tolist()
    scores = torch.zeros(graph.shape)
    starts = range(0, len(edge_list), per_forward)
    for first in progress_bar(starts, desc="exact edge patching", enabled=progress):
        chunk = edge_list[first : first + per_forward]
        weights = torch.zeros((len(chunk), *graph.shape))
        for variant, (s, r, g) in enumerate(chunk):
            weights[variant, s, r, g] = 1.0
        values = run_patched(tower, graph, clean_images, source, weights, groups, metric)
        for (s, r, g), value in zip(chunk, values.tolist()):
            scores[s, r, g] = clean_value - value
    return EdgeScores(graph, scores, "exact edge patching", baseline_clean=clean_value,
                      baseline_corrupted=corrupted_value, seconds=time.perf_counter() - start)
