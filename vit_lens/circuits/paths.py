"""Path patching (Wang et al., "Interpretability in the Wild", 2022; Goldowsky-Dill et al., "Localizing Model
Behavior with Path Patching", 2023): patch a sender's output along chosen paths only.

The sender's clean output reaches only the chosen receivers (some heads' query, key or value inputs, MLPs,
or the output directly); every other node reads the sender's corrupted output, and the receivers' changed
outputs flow on through the rest of the model. The roles are those of
:func:`vit_lens.intervene.patching.activation_patching`: the **corrupted** images are run and the
**clean** sender output is patched in, so the metric moves from the corrupted baseline towards the clean
one, and :meth:`~vit_lens.intervene.patching.PatchingResult.normalized` gives the fraction restored. (Swap
the two batches for Wang et al.'s direction, which patches corrupted outputs into the clean run.)
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from vit_lens.circuits.edges import (
    _check_graph,
    check_pair,
    edge_hooks_enabled,
    metric_mean,
    run_patched,
    sender_outputs,
)
from vit_lens.circuits.graph import QKV, CircuitGraph
from vit_lens.intervene.patching import PatchingResult
from vit_lens.model.hooked_vit import image_tower
from vit_lens.utils.progress import progress as progress_bar


def resolve_receivers(graph: CircuitGraph, receivers: Any) -> list[int]:
    """Receiver names to indices: ``"a2.h1<v>"`` (one input of a head), ``"a2.h1"`` (its q, k and v inputs),
    ``"m2"`` (an MLP) or ``"logits"`` (the output); one name or a list."""
    names = [receivers] if isinstance(receivers, str) else receivers
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"receivers must be a name or a list of names like 'a2.h1<v>', 'a2.h1', 'm2' or 'logits', "
                         f"got {receivers!r}")
    indices: list[int] = []
    known = graph.receiver_names()
    for name in names:
        expanded = [f"{name}<{qkv}>" for qkv in QKV] if name.startswith("a") and "<" not in name else [name]
        indices += [graph.receiver_index(n) if n in known else graph.receiver_index(name) for n in expanded]
    return list(dict.fromkeys(indices))


def _resolve_groups(graph: CircuitGraph, groups: Any) -> list[int]:
    if groups is None:
        return list(range(graph.n_groups))
    names = [groups] if isinstance(groups, str) else list(groups)
    return [graph.group_index(name) for name in names]


@torch.no_grad()
def patch_paths(
    model: Any,
    base_images: Tensor,
    source_images: Tensor,
    metric: Callable[[Tensor], Tensor],
    edges: Sequence[str] | Tensor,
    *,
    graph: CircuitGraph | None = None,
    token_groups: Any = None,
) -> float:
    """One run of ``base_images`` in which the named edges carry their senders' outputs on ``source_images``.

    Args:
        model: A HookedViT or HookedCLIP.
        base_images: The images that are run.
        source_images: Images of the same shape whose sender outputs the edges carry (pair ``i`` with ``i``).
        metric: ``metric(output) -> scalar or [batch]`` (averaged).
        edges: Edge names (``"a0.h1->a2.h1<v>"``, ``"@group"`` appended in a graph split by token group) or a
            ``[n_senders, n_receivers, n_groups]`` 0/1 tensor.
        graph: The graph the names refer to (default: ``CircuitGraph.from_model(model)``).
        token_groups: Per-image group masks for a graph whose groups differ per image.

    Returns:
        The mean metric of the patched run.

    Example:
        >>> patch_paths(model, corrupted, clean, metric, ["a0.h1->a2.h1<v>"])  # doctest: +SKIP
    """
    tower = image_tower(model)
    graph = CircuitGraph.from_model(tower) if graph is None else graph
    _check_graph(tower, graph)
    check_pair(base_images, source_images)
    if isinstance(edges, Tensor):
        weights = graph.check_edge_tensor(edges, "edges").float()
    else:
        names = [edges] if isinstance(edges, str) else list(edges)
        weights = torch.zeros(graph.shape)
        for name in names:
            weights[graph.edge_index(name)] = 1.0
    source = sender_outputs(tower, graph, source_images)
    groups = graph.token_group_masks(token_groups, len(base_images), source.shape[2])
    return float(run_patched(tower, graph, base_images, source, weights, groups, metric)[0])


THROUGH = ("mlps", "all", "none")


def _pass_one_hooks(graph: CircuitGraph, chunk: list[tuple[int, int]], clean: dict[int, Tensor],
                    corrupted: dict[int, Tensor], corrupted_mlps: dict[int, Tensor], n_images: int,
                    through: str) -> list[tuple[str, Any]]:
    """Pass 1 of path patching for ``len(chunk)`` variants: variant ``v``'s sender takes its clean output; the
    other heads are frozen at their corrupted outputs unless ``through == "all"``, and the MLPs too if
    ``through == "none"``."""
    n_variants = len(chunk)

    def heads_hook(layer: int) -> Any:
        def hook(result: Tensor, hook: Any) -> Tensor:
            base = result if through == "all" else corrupted[layer].repeat(n_variants, 1, 1, 1)
            base = base.clone()
            for v, (sender_layer, head) in enumerate(chunk):
                if sender_layer == layer:
                    base[v * n_images : (v + 1) * n_images, :, head] = clean[layer][:, :, head]
            return base

        return hook

    def mlp_hook(layer: int) -> Any:
        return lambda out, hook: corrupted_mlps[layer].repeat(n_variants, 1, 1)

    hooks = [(f"blocks.{layer}.attn.hook_result", heads_hook(layer)) for layer in range(graph.n_layers)]
    if through == "none":
        hooks += [(f"blocks.{layer}.hook_mlp_out", mlp_hook(layer)) for layer in range(graph.n_layers)]
    return hooks


def _receiver_input_hook_names(graph: CircuitGraph, receiver: int) -> tuple[str, str, int | None]:
    """(the residual hook holding the receiver's input, the hook to set it at, the head or None)."""
    if receiver == graph.output_receiver:
        name = f"blocks.{graph.n_layers - 1}.hook_resid_post"
        return name, name, None
    layer, offset = divmod(receiver, 3 * graph.n_heads + 1)
    if offset == 3 * graph.n_heads:
        return f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_in", None
    kind, head = divmod(offset, graph.n_heads)
    return f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_{QKV[kind]}_input", head


@torch.no_grad()
def path_patching(
    model: Any,
    clean_images: Tensor,
    corrupted_images: Tensor,
    metric: Callable[[Tensor], Tensor],
    receivers: Any,
    *,
    through: str = "mlps",
    groups: Any = None,
    graph: CircuitGraph | None = None,
    token_groups: Any = None,
    max_batch: int = 512,
    progress: bool = False,
) -> PatchingResult:
    """Sweep path patching over every head that comes before the receivers.

    For each sender head, in two runs of the corrupted images (the algorithm of Wang et al.): first the
    sender takes its clean output and the receivers' inputs are recorded, with every other head frozen at
    its corrupted output and the MLPs recomputed (``through="mlps"``, Wang et al.'s convention: paths from
    the sender through MLPs to the receivers count), with the MLPs frozen too (``"none"``: the direct edges
    only), or with every node recomputed (``"all"``: every path from the sender to the receivers, whatever
    it passes through); then the corrupted images run again with only the receivers' inputs set to the
    recorded ones, at the tokens of ``groups``, and everything after the receivers computed.

    Args:
        model: A HookedViT or HookedCLIP.
        clean_images, corrupted_images: ``[batch, C, H, W]`` pairs of one shape.
        metric: ``metric(output) -> scalar or [batch]`` (averaged), e.g. the clean label's logit minus the
            corrupted label's.
        receivers: ``"a2.h1<v>"``, ``"a2.h1"`` (q, k and v), ``"m2"``, ``"logits"`` (the sender's direct path
            to the output) or a list of them.
        through: Which nodes between the sender and the receivers are recomputed: ``"mlps"`` (default),
            ``"all"`` or ``"none"`` (see above).
        groups: Token group names of ``graph`` to set the receivers' inputs at (default: every token).
        graph: The graph naming the groups (default: ``CircuitGraph.from_model(model)``, one group).
        token_groups: Per-image group masks for a graph whose groups differ per image.
        max_batch: Most images in one forward (senders run as variants of one batch).
        progress: Show a progress bar.

    Returns:
        A :class:`~vit_lens.intervene.patching.PatchingResult` ``[n_layers, n_heads]`` (``by="head"``,
        ``method="path"``); NaN for heads that are not before every receiver.

    Example:
        >>> result = path_patching(model, clean, corrupted, metric, receivers="a2.h1<v>")  # doctest: +SKIP
        >>> result.normalized().values[0, 1]  # share restored through head 0.1 -> head 2.1's values  # doctest: +SKIP
    """
    tower = image_tower(model)
    graph = CircuitGraph.from_model(tower) if graph is None else graph
    _check_graph(tower, graph)
    check_pair(clean_images, corrupted_images)
    if through not in THROUGH:
        raise ValueError(f"through must be one of {THROUGH} (which nodes between sender and receivers are "
                         f"recomputed), got {through!r}")
    receiver_indices = resolve_receivers(graph, receivers)
    group_indices = _resolve_groups(graph, groups)
    upstream = min(graph.n_upstream(r) for r in receiver_indices)
    senders = [(layer, head) for layer in range(graph.n_layers) for head in range(graph.n_heads)
               if graph.head_sender(layer, head) < upstream]
    if not senders:
        raise ValueError(f"no head comes before every receiver in {receivers!r}; choose later receivers")
    n = len(clean_images)
    n_ctx = tower.cfg.n_prefix_tokens + (clean_images.shape[-2] // tower.cfg.patch_size[0]) * (
        clean_images.shape[-1] // tower.cfg.patch_size[1])
    masks = graph.token_group_masks(token_groups, n, n_ctx)[..., group_indices].sum(-1).bool()  # [images, pos]
    names = [f"blocks.{l}.attn.hook_result" for l in range(graph.n_layers)]
    names += [f"blocks.{l}.hook_mlp_out" for l in range(graph.n_layers)]
    clean_output, clean_cache = tower.run_with_cache(clean_images, names_filter=names)
    corrupted_output, corrupted_cache = tower.run_with_cache(corrupted_images, names_filter=names)
    clean = {l: clean_cache[f"blocks.{l}.attn.hook_result"] for l in range(graph.n_layers)}
    corrupted = {l: corrupted_cache[f"blocks.{l}.attn.hook_result"] for l in range(graph.n_layers)}
    corrupted_mlps = {l: corrupted_cache[f"blocks.{l}.hook_mlp_out"] for l in range(graph.n_layers)}
    sources = {r: _receiver_input_hook_names(graph, r) for r in receiver_indices}
    record_names = sorted({source for source, _, _ in sources.values()})
    per_forward = max(1, max_batch // n)
    patched: list[float] = []
    with edge_hooks_enabled(tower):
        for start in progress_bar(range(0, len(senders), per_forward), desc="path patching", enabled=progress):
            chunk = senders[start : start + per_forward]
            batch = corrupted_images.repeat(len(chunk), 1, 1, 1)
            recorded: dict[str, Tensor] = {}
            hooks = _pass_one_hooks(graph, chunk, clean, corrupted, corrupted_mlps, n, through)
            tower.run_with_hooks(batch, fwd_hooks=hooks + [(name, _recorder(recorded)) for name in record_names],
                                 return_type=None)
            where = masks.repeat(len(chunk), 1)[..., None]  # [variants * images, pos, 1]
            set_hooks = [(target, _set_input(recorded[source], head, where))
                         for source, target, head in sources.values()]
            output = tower.run_with_hooks(batch, fwd_hooks=set_hooks)
            patched += [float(metric_mean(metric, part)) for part in output.split(n)]
    grid = torch.full((graph.n_layers, graph.n_heads), math.nan, dtype=torch.float64)
    for (layer, head), value in zip(senders, patched):
        grid[layer, head] = value
    cfg = tower.cfg
    receiver_names = [graph.receiver_names()[r] for r in receiver_indices]
    return PatchingResult(
        values=grid,
        labels=[[f"L{l}" for l in range(graph.n_layers)], [f"H{h}" for h in range(graph.n_heads)]],
        axes=("layer", "head"),
        baseline_clean=float(metric_mean(metric, clean_output)),
        baseline_corrupted=float(metric_mean(metric, corrupted_output)),
        activation=f"paths to {', '.join(receiver_names)} through {through}",
        by="head",
        method="path",
        token_index=None,
        n_prefix_tokens=cfg.n_prefix_tokens,
        grid_size=(clean_images.shape[-2] // cfg.patch_size[0], clean_images.shape[-1] // cfg.patch_size[1]),
    )


def _recorder(recorded: dict[str, Tensor]) -> Any:
    """A hook that keeps a copy of its activation in ``recorded`` under the hook's name."""

    def hook(activation: Tensor, hook: Any) -> Tensor:
        recorded[hook.name] = activation.clone()
        return activation

    return hook


def _set_input(recorded: Tensor, head: int | None, where: Tensor) -> Any:
    """A hook that sets a receiver's input (one head's slice, or the whole tensor) to ``recorded`` where ``where``."""

    def hook(activation: Tensor, hook: Any) -> Tensor:
        if head is None:
            return torch.where(where, recorded, activation)
        activation = activation.clone()
        activation[:, :, head] = torch.where(where, recorded, activation[:, :, head])
        return activation

    return hook
