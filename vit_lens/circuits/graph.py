"""The computational graph of a HookedViT, as circuit-discovery methods see it.

Nodes are what writes into the residual stream and what reads from it:

- **senders** (writers): the input (the residual stream entering block 0: patch, CLS and register
  embeddings with their positions, after ``ln_pre`` where the model has one), every attention head and
  every MLP. Named as in the EAP-IG and MIB code: ``input``, ``a{layer}.h{head}``, ``m{layer}``.
- **receivers** (readers): every head's query, key and value inputs separately (``a{layer}.h{head}<q>``,
  ``<k>``, ``<v>``), every MLP's input (``m{layer}``) and the output (``logits``: whatever metric is read
  from the final residual stream, a class logit difference, a CLIP zero-shot score or a text direction).

An **edge** joins a sender to a later receiver: the sender's output is one term of the sum that the
receiver reads. Head ``(l, h)`` reads every sender of layers ``< l``; MLP ``l`` reads those and the heads
of layer ``l``; the output reads every sender. A ViT-B has 157 senders, 445 receivers and 32,491 edges,
as many as GPT-2 small (the EAP-IG count).

Edges can be split by **token group**, the vision counterpart of position-aware edge attribution
(Haklay et al., 2025): edge ``(s, r, g)`` is the part of sender ``s``'s output at the tokens of group ``g``
that receiver ``r`` reads at those same tokens (the residual stream connects a token to itself, so a
sender's output at a token reaches a receiver only at that token). Groups partition the tokens: CLS,
registers and patches (``"tokens"``), patch regions, or groups that differ per image (the object patches of
each image), passed as masks with the data.

Every score, mask and circuit is a tensor ``[n_senders, n_receivers, n_groups]`` indexed as here;
:attr:`CircuitGraph.real` marks the pairs that are edges.
"""

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from vit_lens.model.hooked_vit import image_tower

QKV = ("q", "k", "v")
INPUT, OUTPUT = "input", "logits"


@dataclass(frozen=True)
class CircuitGraph:
    """The senders, receivers and edges of one model's graph, with its token groups.

    Build it with :meth:`from_model`. Senders are ordered input, then per layer its heads and its MLP;
    receivers per layer its heads' queries, keys and values (all heads' ``q``, then ``k``, then ``v``) and
    its MLP, then the output.

    Attributes:
        n_layers, n_heads: The model's shape.
        n_ctx: Tokens of the residual stream at the model's image size.
        group_names: The token groups' names, in the order of the last axis of every edge tensor.
        group_masks: ``[n_ctx, n_groups]`` bool: each token's group, for groups fixed by position; None for
            groups that differ per image (pass their masks to each method as ``token_groups``).
        model_name: For messages and exports.
    """

    n_layers: int
    n_heads: int
    n_ctx: int
    group_names: tuple[str, ...]
    group_masks: Tensor | None
    model_name: str = "custom"

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_model(cls, model: Any, token_groups: Any = None) -> "CircuitGraph":
        """The graph of a HookedViT (or a HookedCLIP's image tower).

        Args:
            model: A ``HookedViT`` or ``HookedCLIP``.
            token_groups: How to split edges by token:

                * None: one group, ``"all"`` tokens (edges as in EAP-IG for language models);
                * ``"tokens"``: ``CLS``, ``DIST``, ``registers`` (those the model has) and ``patches``;
                * a dict ``{name: mask}`` of ``[n_ctx]`` bool masks that partition the tokens (patch
                  regions, say; :func:`region_groups` builds a grid of them);
                * a list or tuple of names: groups that differ per image; every call then takes the
                  per-image masks as ``token_groups=[batch, n_ctx, n_groups]``.

        Example:
            >>> graph = CircuitGraph.from_model(model, token_groups="tokens")  # doctest: +SKIP
            >>> graph.n_edges  # doctest: +SKIP
            64982
        """
        tower = image_tower(model)
        cfg = tower.cfg
        names, masks = _resolve_groups(token_groups, cfg)
        return cls(cfg.n_layers, cfg.n_heads, cfg.n_ctx, names, masks, cfg.model_name)

    # ------------------------------------------------------------------ sizes and indices

    @property
    def n_senders(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_receivers(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1) + 1

    @property
    def n_groups(self) -> int:
        return len(self.group_names)

    @property
    def real(self) -> Bool[Tensor, "sender receiver"]:
        """Which (sender, receiver) pairs are edges: the sender comes before the receiver."""
        upstream = torch.tensor([self.n_upstream(r) for r in range(self.n_receivers)])
        return torch.arange(self.n_senders)[:, None] < upstream[None, :]

    @property
    def n_edges(self) -> int:
        """Edges, counting each token group apart."""
        return int(self.real.sum()) * self.n_groups

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of every edge tensor: ``(n_senders, n_receivers, n_groups)``."""
        return (self.n_senders, self.n_receivers, self.n_groups)

    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def head_receiver(self, layer: int, head: int, qkv: str) -> int:
        return layer * (3 * self.n_heads + 1) + QKV.index(qkv) * self.n_heads + head

    def mlp_receiver(self, layer: int) -> int:
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    @property
    def output_receiver(self) -> int:
        return self.n_receivers - 1

    def n_upstream(self, receiver: int) -> int:
        """How many senders (the first ones, in order) receiver ``receiver`` reads."""
        if receiver == self.output_receiver:
            return self.n_senders
        layer, offset = divmod(receiver, 3 * self.n_heads + 1)
        first_of_layer = 1 + layer * (self.n_heads + 1)
        return first_of_layer + (self.n_heads if offset == 3 * self.n_heads else 0)

    def layer_receivers(self, layer: int) -> tuple[slice, int]:
        """The receivers of layer ``layer``: the slice of its heads' q, k, v inputs, and its MLP's index."""
        start = layer * (3 * self.n_heads + 1)
        return slice(start, start + 3 * self.n_heads), start + 3 * self.n_heads

    # ------------------------------------------------------------------ names

    def sender_names(self) -> list[str]:
        names = [INPUT]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{head}" for head in range(self.n_heads)] + [f"m{layer}"]
        return names

    def receiver_names(self) -> list[str]:
        names = []
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{head}<{qkv}>" for qkv in QKV for head in range(self.n_heads)] + [f"m{layer}"]
        return names + [OUTPUT]

    def sender_index(self, name: str) -> int:
        return _index_of(name, self.sender_names(), "sender", "'input', 'a0.h3' or 'm2'")

    def receiver_index(self, name: str) -> int:
        return _index_of(name, self.receiver_names(), "receiver", "'a2.h1<v>', 'm2' or 'logits'")

    def group_index(self, name: str) -> int:
        return _index_of(name, list(self.group_names), "token group", "one of the graph's group_names")

    def edge_name(self, sender: int, receiver: int, group: int) -> str:
        """``"a0.h1->a2.h1<v>"``, with ``"@group"`` appended when the graph has several token groups."""
        name = f"{self.sender_names()[sender]}->{self.receiver_names()[receiver]}"
        return name if self.n_groups == 1 else f"{name}@{self.group_names[group]}"

    def edge_index(self, name: str) -> tuple[int, int, int]:
        """``(sender, receiver, group)`` of an edge name as :meth:`edge_name` writes it."""
        edge, _, group = name.partition("@")
        sender, arrow, receiver = edge.partition("->")
        if not arrow:
            raise ValueError(f"edge name {name!r} has no '->'; edges are named like 'a0.h1->a2.h1<v>' (or "
                             "'a0.h1->a2.h1<v>@patches' in a graph split by token group)")
        if self.n_groups > 1 and not group:
            raise ValueError(f"edge name {name!r} names no token group; this graph's edges end in '@' and one of "
                             f"{list(self.group_names)}")
        s, r = self.sender_index(sender), self.receiver_index(receiver)
        if not self.real[s, r]:
            raise ValueError(f"{sender!r} does not come before {receiver!r}, so {name!r} is no edge")
        return s, r, (self.group_index(group) if group else 0)

    def edges(self, mask: Tensor | None = None) -> list[tuple[int, int, int]]:
        """Every edge as ``(sender, receiver, group)``, in tensor order; only those where ``mask`` holds if given."""
        keep = self.real[..., None].expand(self.shape)
        if mask is not None:
            keep = keep & self.check_edge_tensor(mask, "mask").bool()
        return [tuple(index) for index in keep.nonzero().tolist()]

    def touched_nodes(self, circuit: Tensor) -> list[bool]:
        """Per node (the senders in order, then the output): whether an edge of ``circuit`` starts or ends there.

        A head counts as receiving when any of its q, k or v inputs receives an edge of the circuit."""
        circuit = self.check_edge_tensor(circuit, "circuit").bool()
        sends = circuit.any(dim=(1, 2))
        receives = circuit.any(dim=(0, 2))
        touched = sends.tolist()
        for layer in range(self.n_layers):
            heads, mlp = self.layer_receivers(layer)
            for head in range(self.n_heads):
                inputs = [heads.start + kind * self.n_heads + head for kind in range(3)]
                touched[self.head_sender(layer, head)] |= bool(receives[inputs].any())
            touched[self.mlp_sender(layer)] |= bool(receives[mlp])
        return touched + [bool(receives[self.output_receiver])]

    # ------------------------------------------------------------------ checks

    def check_edge_tensor(self, tensor: Any, what: str = "scores") -> Tensor:
        """``tensor`` checked to be ``[n_senders, n_receivers, n_groups]``."""
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{what} must be a tensor of shape {self.shape} (senders, receivers, token groups), "
                            f"got {type(tensor).__name__}")
        if tuple(tensor.shape) != self.shape:
            raise ValueError(f"{what} has shape {tuple(tensor.shape)}; this graph's edge tensors are {self.shape} "
                             "(senders, receivers, token groups)")
        return tensor

    def token_group_masks(self, token_groups: Any, batch: int, n_ctx: int) -> Float[Tensor, "batch pos group"]:
        """The ``[batch, pos, n_groups]`` float masks of one batch: ``token_groups`` if given, else the graph's own.

        Raises:
            ValueError: If the graph's groups differ per image and none are given, if the masks have the wrong
                shape, or if they do not put every token in exactly one group.
        """
        if token_groups is None:
            if self.group_masks is None:
                raise ValueError(
                    f"this graph's token groups {list(self.group_names)} differ per image; pass their masks as "
                    f"token_groups=<[batch, pos, {self.n_groups}] bool tensor>"
                )
            if self.group_masks.shape[0] != n_ctx:
                raise ValueError(
                    f"the graph's token groups were built for {self.group_masks.shape[0]} tokens but the images give "
                    f"{n_ctx}; build the graph for this image size or pass token_groups"
                )
            masks = self.group_masks[None].expand(batch, -1, -1)
        else:
            masks = torch.as_tensor(token_groups)
            if masks.ndim == 2:
                masks = masks[None].expand(batch, -1, -1)
            if tuple(masks.shape) != (batch, n_ctx, self.n_groups):
                raise ValueError(
                    f"token_groups has shape {tuple(masks.shape)}; expected [batch={batch}, pos={n_ctx}, "
                    f"groups={self.n_groups}] (or [pos, groups]) for the groups {list(self.group_names)}"
                )
        counts = masks.long().sum(-1)
        if not bool((counts == 1).all()):
            raise ValueError(
                "token_groups must put every token in exactly one group; "
                f"{int((counts == 0).sum())} tokens are in none and {int((counts > 1).sum())} in several"
            )
        return masks.float()


def region_groups(model: Any, region_size: tuple[int, int]) -> dict[str, Tensor]:
    """Token groups of patch regions: prefix tokens together, then ``h x w`` tiles of the patch grid.

    For :meth:`CircuitGraph.from_model` (``token_groups=region_groups(model, (4, 4))``); regions are named
    ``R(r0:r1,c0:c1)`` as in activation patching.
    """
    cfg = image_tower(model).cfg
    h, w = region_size
    rows, cols = cfg.grid_size
    if not (isinstance(h, int) and isinstance(w, int) and 0 < h <= rows and 0 < w <= cols):
        raise ValueError(f"region_size must be (h, w) with 0 < h <= {rows} and 0 < w <= {cols}, got {region_size!r}")
    groups: dict[str, Tensor] = {}
    if cfg.n_prefix_tokens:
        prefix = torch.zeros(cfg.n_ctx, dtype=torch.bool)
        prefix[: cfg.n_prefix_tokens] = True
        groups["prefix"] = prefix
    for r0 in range(0, rows, h):
        for c0 in range(0, cols, w):
            mask = torch.zeros(rows, cols, dtype=torch.bool)
            mask[r0 : r0 + h, c0 : c0 + w] = True
            full = torch.zeros(cfg.n_ctx, dtype=torch.bool)
            full[cfg.n_prefix_tokens :] = mask.flatten()
            groups[f"R({r0}:{min(r0 + h, rows)},{c0}:{min(c0 + w, cols)})"] = full
    return groups


def _resolve_groups(token_groups: Any, cfg: Any) -> tuple[tuple[str, ...], Tensor | None]:
    n_ctx = cfg.n_ctx
    if token_groups is None:
        return ("all",), torch.ones(n_ctx, 1, dtype=torch.bool)
    if token_groups == "tokens":
        groups: dict[str, Tensor] = {}
        index = 0
        for name, present in (("CLS", cfg.class_token), ("DIST", cfg.distillation_token)):
            if present:
                groups[name] = torch.arange(n_ctx) == index
                index += 1
        if cfg.n_registers:
            groups["registers"] = (torch.arange(n_ctx) >= index) & (torch.arange(n_ctx) < index + cfg.n_registers)
        groups["patches"] = torch.arange(n_ctx) >= cfg.n_prefix_tokens
        token_groups = groups
    if isinstance(token_groups, dict):
        if not token_groups:
            raise ValueError("token_groups is an empty dict; give at least one group (or None for one group of all tokens)")
        masks = []
        for name, mask in token_groups.items():
            mask = torch.as_tensor(mask)
            if mask.dtype != torch.bool or tuple(mask.shape) != (n_ctx,):
                raise ValueError(f"token group {name!r} must be a [{n_ctx}] bool mask over the tokens, got "
                                 f"{mask.dtype} {tuple(mask.shape)}; for groups that differ per image pass their names "
                                 "and give the masks to each call")
            masks.append(mask)
        stacked = torch.stack(masks, dim=-1)
        counts = stacked.long().sum(-1)
        if not bool((counts == 1).all()):
            raise ValueError(f"token groups {list(token_groups)} must put every token in exactly one group; "
                             f"{int((counts == 0).sum())} tokens are in none and {int((counts > 1).sum())} in several")
        return tuple(str(name) for name in token_groups), stacked
    if isinstance(token_groups, (list, tuple)) and token_groups and all(isinstance(n, str) for n in token_groups):
        if len(set(token_groups)) != len(token_groups):
            raise ValueError(f"token group names repeat: {list(token_groups)}")
        return tuple(token_groups), None
    raise ValueError(
        f"token_groups must be None, 'tokens', a dict of [n_ctx] bool masks, or a list of names of per-image groups; "
        f"got {token_groups!r}"
    )


def _index_of(name: str, names: list[str], what: str, example: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        raise ValueError(f"{name!r} is not a {what} of this graph; {what}s are named like {example}") from None
