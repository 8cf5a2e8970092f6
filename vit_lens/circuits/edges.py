"""Running a HookedViT with chosen edges patched: the one forward every circuit method is built on.

An edge ``(s, r, g)`` is *patched* when receiver ``r`` reads, at the tokens of group ``g``, sender ``s``'s
**source** output instead of its output in this run: the receiver's input becomes
``input + w * (source_s - current_s)`` at those tokens, with weight ``w`` (1: fully patched, 0: untouched,
anything between for learned masks). Sender outputs are read at ``blocks.0.hook_resid_pre`` (the input),
``attn.hook_result`` (heads) and ``hook_mlp_out`` (MLPs); receiver inputs are edited at
``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` (per head), ``hook_mlp_in`` and the final
``hook_resid_post`` (the output). The difference is taken against the sender's output *in this run*, so a
sender that upstream patches changed is replaced by its source value on the patched edges, as in MIB's and
EAP-IG's circuit evaluation. Nothing else is frozen: a receiver's changed output flows on through every
later node, which is what path patching needs.

The **source** is what patched edges carry: the senders' outputs on corrupted images (counterfactual
patching, the default), their mean over reference images (mean ablation) or zeros (zero ablation).
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from vit_lens.circuits.graph import QKV, CircuitGraph
from vit_lens.model.hooked_vit import image_tower

ABLATIONS = ("patch", "mean", "zero")


def sender_hook_names(n_layers: int) -> list[str]:
    """The hook points whose activations are the senders' outputs."""
    names = ["blocks.0.hook_resid_pre"]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.attn.hook_result", f"blocks.{layer}.hook_mlp_out"]
    return names


@torch.no_grad()
def sender_outputs(model: Any, graph: CircuitGraph, images: Tensor) -> Float[Tensor, "sender batch pos d_model"]:
    """Every sender's output on ``images``: ``[n_senders, batch, pos, d_model]``, in the graph's sender order."""
    tower = image_tower(model)
    _check_graph(tower, graph)
    _check_images(tower, images, "images")
    _, cache = tower.run_with_cache(images, names_filter=sender_hook_names(graph.n_layers), return_type=None)
    outputs = [cache["blocks.0.hook_resid_pre"]]
    for layer in range(graph.n_layers):
        result = cache[f"blocks.{layer}.attn.hook_result"]
        outputs += [result[:, :, head] for head in range(graph.n_heads)] + [cache[f"blocks.{layer}.hook_mlp_out"]]
    return torch.stack(outputs)


def source_outputs(
    model: Any,
    graph: CircuitGraph,
    clean_images: Tensor,
    corrupted_images: Tensor | None,
    ablation: str = "patch",
    reference_images: Tensor | None = None,
) -> Float[Tensor, "sender batch_or_1 pos d_model"]:
    """What patched edges carry: ``[n_senders, batch, pos, d_model]`` (``patch``) or ``[n_senders, 1, pos, d_model]``.

    Args:
        model: A HookedViT or HookedCLIP.
        graph: The model's :class:`CircuitGraph`.
        clean_images: The images of the runs.
        corrupted_images: For ``ablation="patch"``: counterfactual images, exactly the shape of ``clean_images``
            (image ``i`` is the counterfactual of clean image ``i``).
        ablation: ``"patch"`` (the corrupted images' sender outputs), ``"mean"`` (their mean over
            ``reference_images``, per token) or ``"zero"``.
        reference_images: For ``"mean"``: the images to average over (default: the clean images).

    Raises:
        ValueError: For an unknown ablation, missing or mismatched corrupted images, or images of the
            wrong size.
    """
    tower = image_tower(model)
    _check_images(tower, clean_images, "clean_images")
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    if ablation == "patch":
        if corrupted_images is None:
            raise ValueError("ablation='patch' needs corrupted_images (counterfactuals of the clean images); for "
                             "ablation without counterfactuals use ablation='mean' or 'zero'")
        check_pair(clean_images, corrupted_images)
        return sender_outputs(tower, graph, corrupted_images)
    if corrupted_images is not None:
        raise ValueError(f"ablation={ablation!r} takes no corrupted_images; pass ablation='patch' to patch from them")
    if ablation == "mean":
        reference = clean_images if reference_images is None else reference_images
        _check_images(tower, reference, "reference_images")
        return sender_outputs(tower, graph, reference).mean(dim=1, keepdim=True)
    n_ctx = _n_ctx(tower, clean_images)
    return clean_images.new_zeros(graph.n_senders, 1, n_ctx, tower.cfg.d_model)


def check_pair(clean_images: Any, corrupted_images: Any) -> None:
    """Clean and corrupted images must be tensors of one shape: image ``i`` of each is a pair."""
    for name, images in (("clean_images", clean_images), ("corrupted_images", corrupted_images)):
        if not isinstance(images, Tensor):
            raise TypeError(f"{name} must be a [batch, channels, height, width] tensor, got {type(images).__name__}")
    if clean_images.shape != corrupted_images.shape:
        raise ValueError(
            f"clean_images {tuple(clean_images.shape)} and corrupted_images {tuple(corrupted_images.shape)} differ in "
            "shape; circuit methods compare image i of each, so pass pairs of one size and count"
        )


@contextmanager
def edge_hooks_enabled(tower: Any) -> Iterator[None]:
    """Turn on the split q/k/v inputs and the MLP input hook for the duration, restoring the flags after."""
    before = (tower.cfg.use_split_qkv_input, tower.cfg.use_hook_mlp_in, tower.cfg.use_attn_in)
    if before[2]:
        raise ValueError(
            f"{tower.cfg.model_name} has use_attn_in on; circuit methods need the split q/k/v inputs, which exclude "
            "it: call model.set_use_attn_in(False) first"
        )
    tower.set_use_split_qkv_input(True)
    tower.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        tower.set_use_split_qkv_input(before[0])
        tower.set_use_hook_mlp_in(before[1])


class EdgePatcher:
    """The hooks of one run with edges patched, for ``n_variants`` edge settings at once.

    The run's batch is ``n_variants`` copies of ``n_images`` images (variant-major); variant ``v`` patches
    with ``weights[v]``. The hooks record each sender's ``source - current`` as the run reaches it and add
    the weighted sum to each receiver's input.

    Args:
        graph: The model's graph.
        source: ``[n_senders, n_images or 1, pos, d_model]``: what patched edges carry.
        weights: ``[n_variants, n_senders, n_receivers, n_groups]`` (or without the variant axis): how much of
            each edge is patched. Gradients flow to it (learned edge masks).
        groups: ``[n_images, pos, n_groups]`` float token-group masks.
    """

    def __init__(self, graph: CircuitGraph, source: Tensor, weights: Tensor, groups: Tensor):
        if weights.ndim == 3:
            weights = weights[None]
        if tuple(weights.shape[1:]) != graph.shape:
            raise ValueError(f"edge weights have shape {tuple(weights.shape)}; expected [variants, *{graph.shape}]")
        self.graph = graph
        self.source = source
        self.weights = weights * graph.real[None, :, :, None].to(weights)
        self.groups = groups
        self.n_variants = weights.shape[0]
        self.n_images = groups.shape[0]
        # Without gradients the differences go into one preallocated buffer, read as views; with them
        # (learned masks) they are kept apart, since autograd forbids writing into a tensor it has read.
        self.differences: list[Tensor] = []
        self.buffer: Tensor | None = None
        self.n_recorded = 0
        self.all_tokens = groups.shape[-1] == 1 and bool((groups == 1).all())

    def hooks(self) -> list[tuple[str, Callable]]:
        g = self.graph
        hooks = [("blocks.0.hook_resid_pre", self._record_input)]
        for layer in range(g.n_layers):
            heads, mlp = g.layer_receivers(layer)
            for kind, qkv in enumerate(QKV):
                receivers = list(range(heads.start + kind * g.n_heads, heads.start + (kind + 1) * g.n_heads))
                hooks.append((f"blocks.{layer}.hook_{qkv}_input", self._patch(receivers, per_head=True)))
            hooks.append((f"blocks.{layer}.attn.hook_result", self._record_heads))
            hooks.append((f"blocks.{layer}.hook_mlp_in", self._patch([mlp], per_head=False)))
            hooks.append((f"blocks.{layer}.hook_mlp_out", self._record_one))
        hooks.append((f"blocks.{g.n_layers - 1}.hook_resid_post", self._patch([g.output_receiver], per_head=False)))
        return hooks

    def _difference(self, index: int, current: Tensor) -> Tensor:
        """``source - current`` of sender ``index``, ``[variants * images, pos, d_model]``."""
        current = current.unflatten(0, (self.n_variants, self.n_images))
        return (self.source[index].to(current) - current).flatten(0, 1)

    def _store(self, difference: Tensor) -> None:
        if self.n_recorded == 0:
            self.differences = []
            needs_grad = torch.is_grad_enabled() and (self.weights.requires_grad or difference.requires_grad)
            self.buffer = None if needs_grad else difference.new_empty((self.graph.n_senders, *difference.shape))
        if self.buffer is None:
            self.differences.append(difference)
        else:
            self.buffer[self.n_recorded] = difference
        self.n_recorded += 1

    def _upstream_differences(self, upstream: int) -> Tensor:
        """``[upstream, variants * images, pos, d_model]``: the first ``upstream`` senders' differences."""
        return self.buffer[:upstream] if self.buffer is not None else torch.stack(self.differences[:upstream])

    def _record_input(self, resid: Tensor, hook: Any) -> Tensor:
        self.n_recorded = 0
        self._store(self._difference(0, resid))
        return resid

    def _record_heads(self, result: Tensor, hook: Any) -> Tensor:
        for h in range(result.shape[2]):
            self._store(self._difference(self.n_recorded, result[:, :, h]))
        return result

    def _record_one(self, out: Tensor, hook: Any) -> Tensor:
        self._store(self._difference(self.n_recorded, out))
        return out

    def _patch(self, receivers: list[int], per_head: bool) -> Callable:
        upstream = self.graph.n_upstream(receivers[0])

        def hook(activation: Tensor, hook: Any) -> Tensor:
            weights = self.weights[:, :upstream, receivers]  # [variant, sender, receiver, group]
            if not bool((weights != 0).any()):
                return activation
            if self.n_recorded != upstream:
                raise RuntimeError(f"{hook.name} expected the outputs of {upstream} senders, got "
                                   f"{self.n_recorded}; was the forward stopped early or a sender hook removed?")
            differences = self._upstream_differences(upstream).unflatten(1, (self.n_variants, self.n_images))
            if self._is_sparse(weights):
                delta = self._sparse_delta(differences, weights)
            else:
                delta = 0
                for group in range(self.groups.shape[-1]):
                    masked = differences
                    if not self.all_tokens:
                        masked = differences * self.groups[None, None, :, :, group, None].to(differences)
                    # einsum("svbpd,vsr->vbprd") as one batched matmul over variants: 5x faster on CPU (measured)
                    product = torch.bmm(weights[..., group].to(differences).transpose(1, 2),
                                        masked.flatten(2).transpose(0, 1))  # [variant, receiver, b*p*d]
                    delta = delta + product.unflatten(2, masked.shape[2:]).permute(0, 2, 3, 1, 4)
            delta = delta.flatten(0, 1)  # [variants * images, pos, receivers, d_model]
            return activation + (delta if per_head else delta[:, :, 0])

        return hook


    def _is_sparse(self, weights: Tensor) -> bool:
        """Few patched edges (one a variant, as exact patching and path patching run): add them one by one."""
        return not weights.requires_grad and int((weights != 0).sum()) <= 2 * self.n_variants

    def _sparse_delta(self, differences: Tensor, weights: Tensor) -> Tensor:
        """``[variants, images, pos, receivers, d_model]`` from the non-zero weights only."""
        n_receivers = weights.shape[2]
        delta = differences.new_zeros((self.n_variants, self.n_images, differences.shape[3], n_receivers,
                                       differences.shape[4]))
        for v, s, r, g in (weights != 0).nonzero().tolist():
            term = differences[s, v] * weights[v, s, r, g].to(differences)
            if not self.all_tokens:
                term = term * self.groups[:, :, g, None].to(differences)
            delta[v, :, :, r] += term
        return delta


def run_patched(
    tower: Any,
    graph: CircuitGraph,
    images: Tensor,
    source: Tensor,
    weights: Tensor,
    groups: Tensor,
    metric: Callable[[Tensor], Tensor],
) -> Float[Tensor, " variant"]:
    """The mean metric of each variant of a run with edges patched (``weights`` ``[variants, *graph.shape]``).

    The metric gets each variant's output for the ``len(images)`` images in order, so per-image targets
    (the clean and corrupted labels of pairs) line up. Gradients flow to ``weights``.
    """
    patcher = EdgePatcher(graph, source, weights, groups)
    batch = images.repeat(patcher.n_variants, *[1] * (images.ndim - 1))
    with edge_hooks_enabled(tower):
        output = tower.run_with_hooks(batch, fwd_hooks=patcher.hooks())
    return torch.stack([metric_mean(metric, chunk) for chunk in output.split(len(images))])


def metric_mean(metric: Callable[[Tensor], Tensor], output: Tensor) -> Tensor:
    """The metric of one batch's output as a scalar: a ``[batch]`` result is averaged."""
    value = metric(output)
    if not isinstance(value, Tensor):
        raise TypeError(f"metric(output) must return a tensor (a scalar or one value per image), got {type(value).__name__}")
    if value.ndim == 0:
        return value
    if value.shape != (len(output),):
        raise ValueError(f"metric(output) returned shape {tuple(value.shape)}; return a scalar or one value per image "
                         f"([{len(output)}])")
    return value.mean()


def _check_graph(tower: Any, graph: CircuitGraph) -> None:
    if not isinstance(graph, CircuitGraph):
        raise TypeError(f"graph must be a CircuitGraph (CircuitGraph.from_model(model)), got {type(graph).__name__}")
    if (graph.n_layers, graph.n_heads) != (tower.cfg.n_layers, tower.cfg.n_heads):
        raise ValueError(f"the graph has {graph.n_layers} layers x {graph.n_heads} heads but {tower.cfg.model_name} has "
                         f"{tower.cfg.n_layers} x {tower.cfg.n_heads}; build it with CircuitGraph.from_model(model)")


def _check_images(tower: Any, images: Any, name: str) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a [batch, channels, height, width] tensor, got {shape}")


def _n_ctx(tower: Any, images: Tensor) -> int:
    rows = images.shape[-2] // tower.cfg.patch_size[0]
    cols = images.shape[-1] // tower.cfg.patch_size[1]
    return tower.cfg.n_prefix_tokens + rows * cols
