"""Direct contributions of layers, heads, tokens and neurons to the image representation.

The representation is what the model outputs before any classifier: the CLIP image embedding
(``hook_image_embed``), or for timm models the pooled, normalised pre-head vector (timm's
``forward_head(..., pre_logits=True)``; for distilled DeiT the mean of the CLS and distillation
tokens). Every readout the supported models use is linear once the final LayerNorm's scale is
fixed at its cached value, so the representation splits exactly into per-component terms::

    r = sum_i  T_i           (T_i: [batch, d_out]; labels "embed", "L3ATTN", "L3MLP", "L21H11",
                              "L21H11T5", "L3N1024", and "bias" in center_each mode)

Writing ``w``/``b`` for the final LayerNorm's weight/bias, ``P`` for the projection (identity for
timm) and ``alpha[p]`` for the pooling weight of position ``p`` divided by the LayerNorm scale
(per token before pooling, of the pooled vector after it), each component's pooled residual part
is ``S_i = sum_p alpha[p] c_i[p]`` and

* ``ln_mode="center_each"`` (TransformerLens's convention): ``T_i = centre(S_i) (w * P)``, and one
  ``"bias"`` term collects ``b P`` and every attention (and, at neuron level, MLP) output bias.
* ``ln_mode="paper"`` (Gandelsman et al., appendix A.1, and their public code): ``T_i = (S_i - s_i
  m) (w * P) + s_i b P`` where ``m`` is the pooled LayerNorm mean and the shares ``s_i`` split it
  equally: ``1/(2L+1)`` per embedding / attention layer / MLP term, that share split again equally
  over an attention layer's heads (and tokens) or an MLP's neurons; an attention layer's output bias
  is split equally over its heads (and tokens), an MLP's over its neurons. ``normalize=True``
  divides every term by ``||r||`` so that they sum to the unit-norm embedding, as that code does.

Attention pooling (SigLIP's MAP head, ``pool_type="map"``) is linear in the residual stream too
once its pattern and the final LayerNorm's scales are fixed: each pool head ``r`` reads position
``p`` with weight ``pattern[r, p] / scale[p]`` through ``W_V[r] W_O[r]``, so every component's term
is a sum over the pool's heads, its biases join ``"bias"``, and the pool's own MLP is one more
term, ``"POOLMLP"`` (``center_each`` only). A projection bias (EVA-CLIP) joins ``"bias"``. Models
with a LayerNorm inside attention or the MLP (EVA02's ``attn.ln_z`` / ``mlp.ln_hidden``) split at
head / neuron level through that norm's output: head ``h``'s term reads ``ln_z``'s normalised
slice for ``h``, neuron ``n``'s term ``ln_hidden``'s normalised unit ``n``.

``"head_token"`` never builds the ``[batch, query, key, head, d]`` tensor: it forms the pooled
query row of each pattern (``sum_p alpha[p] pattern[p, k]``) first, and with ``directions`` it
projects each head's value vectors onto them before expanding over tokens.
"""

from dataclasses import dataclass, field

import torch
from fancy_einsum import einsum
from jaxtyping import Float
from torch import Tensor

from vit_lens.intervene._validate import check_indices
from vit_lens.model.cache import VisionActivationCache
from vit_lens.model.hooked_vit import image_tower

LEVELS = ("layer", "head", "head_token", "neuron")
LN_MODES = ("center_each", "paper")
_LINEAR_POOLS = ("token", "token_dist", "avg", "map")


@dataclass
class Contributions:
    """Direct contributions to the representation, one row per component.

    Attributes:
        values: ``[batch, component, d_out]`` (``d_out``: the representation width, or the number
            of ``directions`` the terms were projected onto).
        labels: One label per component: ``embed``, ``L{l}ATTN``, ``L{l}MLP``, ``L{l}H{h}``,
            ``L{l}H{h}T{t}``, ``L{l}N{n}``, ``bias``.
        layer, head, token, neuron: Per component, its index or -1 where it does not apply.
        level, ln_mode, normalized: How the terms were computed.
        grid_size, n_prefix_tokens: Token layout, for :meth:`token_maps`.
    """

    values: Float[Tensor, "batch component d_out"]
    labels: list[str]
    layer: Tensor
    head: Tensor
    token: Tensor
    neuron: Tensor
    level: str
    ln_mode: str
    normalized: bool
    grid_size: tuple[int, int]
    n_prefix_tokens: int
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def sum(self) -> Float[Tensor, "batch d_out"]:
        """The representation (or its projection onto the directions) the terms add up to."""
        return self.values.sum(dim=1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, label: str) -> Float[Tensor, "batch d_out"]:
        if not self._index:
            self._index.update({name: i for i, name in enumerate(self.labels)})
        if label not in self._index:
            raise KeyError(f"No component {label!r}; labels look like {self.labels[:3]} ... {self.labels[-2:]}")
        return self.values[:, self._index[label]]

    def select(self, mask: Tensor) -> "Contributions":
        """The components where ``mask`` (``[component]`` bool) is True; the sum no longer reconstructs."""
        keep = mask.nonzero().flatten().tolist()
        return Contributions(
            self.values[:, keep], [self.labels[i] for i in keep], self.layer[keep], self.head[keep],
            self.token[keep], self.neuron[keep], self.level, self.ln_mode, self.normalized,
            self.grid_size, self.n_prefix_tokens,
        )

    def heads(self) -> Float[Tensor, "batch layer head d_out"]:
        """Per-head terms as ``[batch, layer, head, d_out]`` (tokens summed at ``head_token`` level)."""
        mask = self.head >= 0
        if not mask.any():
            raise ValueError(f"{self.level}-level contributions have no per-head terms; use level='head'")
        layers = sorted(set(self.layer[mask].tolist()))
        n_heads = int(self.head[mask].max()) + 1
        batch, d_out = self.values.shape[0], self.values.shape[-1]
        rows = torch.tensor([layers.index(l) for l in self.layer[mask].tolist()])
        flat = self.values.new_zeros(batch, len(layers) * n_heads, d_out)
        flat.index_add_(1, rows * n_heads + self.head[mask], self.values[:, mask])
        return flat.reshape(batch, len(layers), n_heads, d_out)

    def token_maps(self) -> tuple[Float[Tensor, "batch layer head prefix d_out"], Float[Tensor, "batch layer head rows cols d_out"]]:
        """``head_token`` terms split into prefix tokens and the patch grid.

        Returns:
            ``(prefix, patches)``: ``[batch, layer, head, n_prefix, d_out]`` for CLS / distillation /
            register tokens and ``[batch, layer, head, rows, cols, d_out]`` for the patches.
        """
        if self.level != "head_token":
            raise ValueError(f"token_maps needs level='head_token' contributions, these are {self.level!r}")
        mask = self.token >= 0
        layers = sorted(set(self.layer[mask].tolist()))
        n_heads = int(self.head[mask].max()) + 1
        n_tokens = int(self.token[mask].max()) + 1
        picked = mask.nonzero().flatten()
        first, last = int(picked[0]), int(picked[-1])
        # with every layer expanded the token terms are one contiguous block: a view, not a copy
        selected = self.values[:, first : last + 1] if mask[first : last + 1].all() else self.values[:, mask]
        values = selected.reshape(self.values.shape[0], len(layers), n_heads, n_tokens, -1)
        rows, cols = self.grid_size
        prefix = values[:, :, :, : self.n_prefix_tokens]
        return prefix, values[:, :, :, self.n_prefix_tokens :].unflatten(3, (rows, cols))


def direct_contributions(
    model,
    cache: VisionActivationCache,
    level: str = "layer",
    layers: list[int] | int | None = None,
    ln_mode: str = "center_each",
    directions: Float[Tensor, "d_repr n_directions"] | None = None,
    normalize: bool = False,
) -> Contributions:
    """Split the representation into the direct contributions of the model's components.

    Args:
        model: The HookedViT (or HookedCLIP) that produced ``cache``.
        cache: From ``model.run_with_cache(images)`` (the default names are enough).
        level: ``"layer"`` (embedding, each attention layer, each MLP), ``"head"``, ``"head_token"``
            (per head and source token, at the pooled query) or ``"neuron"``.
        layers: Layers expanded at ``level`` (a list, or one int; negative ones count from the
            end); the others stay whole (``L{l}ATTN``, ``L{l}MLP``), so the terms still sum to the
            representation. Default: all.
        ln_mode: ``"center_each"`` or ``"paper"`` (see the module docstring).
        directions: ``[d_repr, k]``; project every term onto these columns (text embeddings, class
            vectors) before expanding heads over tokens or MLPs over neurons.
        normalize: Divide every term by the representation's norm (``ln_mode="paper"`` does this
            in the paper's code, so the terms sum to the unit-norm embedding).

    Returns:
        :class:`Contributions` with ``values`` ``[batch, component, d_out]``; ``.sum()`` is the
        representation (``[batch, d_repr]``), or its projection onto ``directions``.

    Example:
        >>> embed, cache = model.run_with_cache(images)  # doctest: +SKIP
        >>> heads = direct_contributions(model, cache, level="head")  # doctest: +SKIP
        >>> torch.allclose(heads.sum(), embed, atol=1e-5)  # doctest: +SKIP
        True
    """
    model = image_tower(model)
    cfg = model.cfg
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if ln_mode not in LN_MODES:
        raise ValueError(f"ln_mode must be one of {LN_MODES}, got {ln_mode!r}")
    if cfg.pool_type not in _LINEAR_POOLS:
        raise NotImplementedError(
            f"{cfg.model_name} pools with {cfg.pool_type!r}, which is not linear in the residual stream, so the "
            f"representation has no exact additive decomposition; supported pooling: {_LINEAR_POOLS}"
        )
    if cfg.pool_type == "map" and (ln_mode != "center_each" or cfg.final_norm == "post_pool"):
        raise NotImplementedError(
            f"{cfg.model_name} pools with an attention pool (MAP head); its decomposition is implemented for "
            "ln_mode='center_each' with the final LayerNorm before the pool. Use ln_mode='center_each'."
        )
    expanded = check_indices(layers, cfg.n_layers, "layers", "direct_contributions")
    if level == "head_token" and cfg.attn_norm:
        raise NotImplementedError(
            f"{cfg.model_name} normalises the concatenated heads before W_O (attn.ln_z, EVA-CLIP's scale_attn_inner), "
            "so a head's output is not a sum over source tokens; use level='head' (exact) instead of 'head_token'."
        )
    missing = [name for name in required_hooks(model, level, expanded) if name not in cache.cache_dict]
    if missing:
        raise KeyError(
            f"direct_contributions(level={level!r}) needs these cached activations: {missing}; run "
            f"model.run_with_cache(images, names_filter=vit_lens.intervene.decompose.required_hooks(model, {level!r}))"
        )

    alpha = _readout_over_scale(model, cache)  # [batch, readout, pos]
    no_ln = _projection(model)  # [d_model, d_repr]: P
    readout_bias = _readout_bias(model)  # [d_repr]
    if directions is not None:
        if directions.ndim != 2 or directions.shape[0] != no_ln.shape[1]:
            raise ValueError(f"directions must be [d_repr={no_ln.shape[1]}, k], got {tuple(directions.shape)}")
        no_ln = no_ln @ directions.to(no_ln)
        readout_bias = readout_bias @ directions.to(no_ln)
    builder = _TermBuilder(model, cache, alpha, no_ln, ln_mode, readout_bias)
    builder.add("embed", builder.pool_positions(cache["blocks.0.hook_resid_pre"]))
    for layer in range(cfg.n_layers):
        attn = model.blocks[layer].attn
        expand = layer in expanded
        if expand and level == "head":
            z = builder.pool_positions(_head_outputs(model, cache, layer))  # [batch, readout, head, d_head]
            per_head = einsum(
                "batch readout head d_head, head d_head d_model -> batch readout head d_model", z, attn.W_O
            )
            builder.add_many([f"L{layer}H{h}" for h in range(cfg.n_heads)], per_head, layer, range(cfg.n_heads))
            builder.add_output_bias(attn.b_O, split=cfg.n_heads)
        elif expand and level == "head_token":
            builder.add_head_tokens(layer, attn)
        else:
            builder.add(f"L{layer}ATTN", builder.pool_positions(cache["attn_out", layer]), layer=layer)
        if expand and level == "neuron":
            post = builder.pool_positions(cache[_neuron_hook(model, layer)])  # [batch, readout, d_mlp]
            builder.add_neurons(layer, post, model.blocks[layer].mlp)
        else:
            builder.add(f"L{layer}MLP", builder.pool_positions(cache["mlp_out", layer]), layer=layer)
    if cfg.pool_type == "map":
        builder.add_direct("POOLMLP", cache["attn_pool.hook_mlp_out"] @ builder.no_ln)
    contributions = builder.finish(level)
    if normalize:
        representation_norm = _representation(model, cache).norm(dim=-1)  # [batch]
        contributions.values = contributions.values / representation_norm[:, None, None]
        contributions.normalized = True
    return contributions


def required_hooks(model, level: str = "layer", layers: list[int] | int | None = None) -> list[str]:
    """The cache entries :func:`direct_contributions` reads, for a minimal ``names_filter``.

    Example:
        >>> _, cache = model.run_with_cache(images, names_filter=required_hooks(model, "head"))  # doctest: +SKIP
        >>> direct_contributions(model, cache, level="head").sum().shape  # [batch, d_embed]  # doctest: +SKIP
    """
    model = image_tower(model)
    cfg = model.cfg
    layers = check_indices(layers, cfg.n_layers, "layers", "required_hooks")
    names = ["blocks.0.hook_resid_pre", f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
    if cfg.final_norm != "none":
        names.append("ln_final.hook_scale")
    if cfg.pool_type == "map":
        names += ["attn_pool.hook_pattern", "attn_pool.hook_mlp_out", "hook_pooled"]
    for layer in range(cfg.n_layers):
        expand = layer in layers
        if expand and level == "head":
            names.append(f"blocks.{layer}.attn.ln_z.hook_normalized" if cfg.attn_norm else f"blocks.{layer}.attn.hook_z")
        elif expand and level == "head_token":
            names += [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"]
        else:
            names.append(f"blocks.{layer}.hook_attn_out")
        names.append(_neuron_hook(model, layer) if expand and level == "neuron" else f"blocks.{layer}.hook_mlp_out")
    return names


def _neuron_hook(model, layer: int) -> str:
    """What ``W_out`` reads: ``hook_post``, or the inner LayerNorm's output where the MLP has one."""
    if model.cfg.mlp_norm:
        return f"blocks.{layer}.mlp.ln_hidden.hook_normalized"
    return f"blocks.{layer}.mlp.hook_post"


def _head_outputs(model, cache: VisionActivationCache, layer: int) -> Float[Tensor, "batch pos head d_head"]:
    """What ``W_O`` reads per head: ``hook_z``, or ``attn.ln_z``'s output split into heads."""
    if not model.cfg.attn_norm:
        return cache["z", layer]
    normalized = cache[f"blocks.{layer}.attn.ln_z.hook_normalized"]
    return normalized.unflatten(-1, (model.cfg.n_heads, model.cfg.d_head))


def direct_effect_mean_ablation(
    contributions: Contributions, components: Tensor, means: Float[Tensor, "component d_out"]
) -> Float[Tensor, "batch d_out"]:
    """The representation with some components' *direct* contributions replaced by their means.

    This is the ablation Gandelsman et al. (2024) measures: only the component's direct path to the output is
    averaged; what it writes into the residual stream still reaches later layers unchanged. For the
    total effect (ablating the component in the forward pass, so later layers see the change), use
    the hooks in :mod:`vit_lens.intervene.interventions` with ``model.run_with_hooks``.

    Args:
        contributions: From :func:`direct_contributions`.
        components: ``[component]`` bool mask of the terms to ablate.
        means: ``[component, d_out]`` dataset means of the terms (e.g. ``contributions.values.mean(0)``
            over a dataset, computed with the same level, layers and ln_mode).

    Returns:
        ``[batch, d_out]``: the representation after the ablation.

    Example:
        >>> parts = direct_contributions(model, cache, level="head")  # doctest: +SKIP
        >>> means = store.mean()  # the same decomposition over a dataset (vit_lens.intervene.store)  # doctest: +SKIP
        >>> late_heads = (parts.layer >= 8) & (parts.head >= 0)  # doctest: +SKIP
        >>> ablated = direct_effect_mean_ablation(parts, late_heads, means)  # [batch, d_embed]  # doctest: +SKIP
    """
    if components.shape != (len(contributions),) or means.shape != contributions.values.shape[1:]:
        raise ValueError(
            f"components must be a [{len(contributions)}] bool mask and means [{len(contributions)}, "
            f"{contributions.values.shape[-1]}]; got {tuple(components.shape)} and {tuple(means.shape)}"
        )
    values = torch.where(components[None, :, None], means[None], contributions.values)
    return values.sum(dim=1)


# ---------------------------------------------------------------------------------------------- internals


def _pooling_weights(model, n_pos: int, device, dtype) -> Tensor:
    """``[pos]`` weights of the linear pooling: one-hot CLS, CLS and distillation, or a mean."""
    cfg = model.cfg
    weights = torch.zeros(n_pos, device=device, dtype=dtype)
    if cfg.pool_type == "token":
        weights[0] = 1.0
    elif cfg.pool_type == "token_dist":
        weights[:2] = 0.5
    else:
        start = 0 if cfg.pool_include_prefix else cfg.n_prefix_tokens
        weights[start:] = 1.0 / (n_pos - start)
    return weights


def _readout_over_scale(model, cache: VisionActivationCache) -> Float[Tensor, "batch readout pos"]:
    """Weight of each position in each readout (one readout, or one per attention-pool head),
    divided by the final LayerNorm scale that applies to it."""
    cfg = model.cfg
    resid = cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
    batch, n_pos, _ = resid.shape
    if cfg.pool_type == "map":
        pattern = cache["attn_pool.hook_pattern"][:, :, 0]  # [batch, pool head, pooled tokens]
        weights = pattern.new_zeros(batch, pattern.shape[1], n_pos)
        weights[:, :, n_pos - pattern.shape[-1] :] = pattern
    else:
        weights = _pooling_weights(model, n_pos, resid.device, resid.dtype)[None, None].expand(batch, 1, -1)
    if cfg.final_norm == "none":
        return weights
    scale = cache["ln_final.hook_scale"]
    if cfg.final_norm == "pre_pool":
        return weights / scale[:, None, :, 0]  # [batch, readout, pos]
    return weights / scale[:, :, None]  # post-pool: one scale per image


def _readout_mixers(model) -> Float[Tensor, "readout d_model d_model"] | None:
    """Per attention-pool head, ``W_V[r] W_O[r]``: what the pool does to a (normalised) token; None otherwise."""
    if model.cfg.pool_type != "map":
        return None
    pool = model.attn_pool
    return einsum("head d_model d_head, head d_head d_out -> head d_model d_out", pool.W_V, pool.W_O)


def _readout_bias(model) -> Float[Tensor, "d_repr"]:
    """The constant part of the representation: LayerNorm bias through the readout, pool biases, projection bias."""
    projection = _projection(model)
    mixers = _readout_mixers(model)
    bias = model.ln_final.b if model.ln_final is not None else torch.zeros_like(projection[:, 0])
    if mixers is not None:
        pool = model.attn_pool
        bias = bias @ mixers.sum(0) + einsum("head d_head, head d_head d_model -> d_model", pool.b_V, pool.W_O) + pool.b_O
    bias = bias @ projection
    if model.cfg.proj_bias:
        bias = bias + model.b_proj
    return bias


def _projection(model) -> Float[Tensor, "d_model d_repr"]:
    """``P``: the CLIP projection, or the identity for a pre-head (timm) representation."""
    cfg = model.cfg
    if cfg.d_proj is not None:
        return model.W_proj
    return torch.eye(cfg.d_model, device=model.W_E.device, dtype=model.W_E.dtype)


def _representation(model, cache: VisionActivationCache) -> Float[Tensor, "batch d_repr"]:
    """The representation itself: the CLIP embedding, or the normalised pooled pre-head vector."""
    if "hook_image_embed" in cache.cache_dict:
        return cache["hook_image_embed"]
    if model.cfg.pool_type == "map":
        return cache["hook_pooled"]
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    alpha = _readout_over_scale(model, cache)[:, 0]
    pooled = einsum("batch pos, batch pos d_model -> batch d_model", alpha, resid)
    if model.ln_final is None:
        return pooled @ _projection(model)
    mean = einsum("batch pos, batch pos -> batch", alpha, resid.mean(-1))
    return ((pooled - mean[:, None]) * model.ln_final.w + model.ln_final.b) @ _projection(model)


class _TermBuilder:
    """Collects each component's pooled residual part and maps it through the readout.

    There is one readout (``R = 1``) for token / average pooling and one per head of an attention
    pool (``R = map_n_heads``); ``alpha`` is ``[batch, R, pos]``. ``no_ln`` is ``P`` (then the
    directions); ``project[r]`` is ``diag(w_ln) M_r P`` (``M_r``: the pool head's ``W_V W_O``, or
    the identity); ``centred`` removes its mean over the d_model axis, so
    ``v @ centred[r] == centre(v) @ project[r]``.
    """

    def __init__(self, model, cache, alpha, no_ln, ln_mode, readout_bias):
        self.model = model
        self.cache = cache
        self.alpha = alpha  # [batch, R, pos]
        self.no_ln = no_ln
        mixers = _readout_mixers(model)
        readouts = no_ln[None] if mixers is None else einsum("readout d_model d_mid, d_mid d_out -> readout d_model d_out", mixers, no_ln)
        ln = model.ln_final
        self.project = ln.w[None, :, None] * readouts if ln is not None else readouts  # [R, d_model, d_out]
        self.centred = self.project - self.project.mean(dim=1, keepdim=True) if ln is not None else readouts
        self.ln_mode = ln_mode
        self.matrix = self.centred if ln_mode == "center_each" else self.project
        self.readout_bias = readout_bias  # [d_out]
        self.terms: list[Tensor] = []  # each [batch, n, d_out]
        self.shares: list[Tensor] = []  # per group, [n]: each term's share of its group
        self.labels: list[str] = []
        self.meta: list[tuple[int, int, int, int]] = []  # (layer, head, token, neuron)
        self.output_biases = alpha.new_zeros(alpha.shape[0], self.matrix.shape[-1])  # [batch, d_out]

    def pool_positions(self, act: Tensor) -> Tensor:
        """``sum_p alpha[r, p] act[:, p]`` for an activation with positions at axis 1: ``[batch, R, ...]``."""
        return torch.einsum("brp,bp...->br...", self.alpha, act)

    def _group(self, labels, terms, meta) -> None:
        self.terms.append(terms)
        self.shares.append(torch.full((len(labels),), 1.0 / len(labels)))
        self.labels += labels
        self.meta += meta

    def add(self, label: str, vector: Tensor, layer: int = -1) -> None:
        self._group([label], einsum("batch readout d_model, readout d_model d_out -> batch d_out", vector, self.matrix)[:, None], [(layer, -1, -1, -1)])

    def add_direct(self, label: str, term: Float[Tensor, "batch d_out"]) -> None:
        """A term already in output space (the attention pool's own MLP)."""
        self._group([label], term[:, None], [(-1, -1, -1, -1)])

    def add_many(self, labels: list[str], vectors: Tensor, layer: int, heads) -> None:
        terms = einsum("batch readout part d_model, readout d_model d_out -> batch part d_out", vectors, self.matrix)
        self._group(labels, terms, [(layer, h, -1, -1) for h in heads])

    def add_output_bias(self, bias: Float[Tensor, "d_model"], split: int) -> None:
        """A bias written at every position: to the 'bias' term, or split over the last group (paper)."""
        pooled = einsum("batch readout, d_model, readout d_model d_out -> batch d_out", self.alpha.sum(-1), bias, self.matrix)  # [batch, d_out]
        if self.ln_mode == "center_each":
            self.output_biases = self.output_biases + pooled
        else:
            self.terms[-1] = self.terms[-1] + pooled[:, None] / split

    def add_head_tokens(self, layer: int, attn) -> None:
        pattern, v = self.cache["pattern", layer], self.cache["v", layer]  # [b, h, q, k], [b, k, h, d_head]
        terms = None
        for readout in range(self.matrix.shape[0]):
            # only the pooled query row of the pattern
            pooled_row = einsum("batch query, batch head query key -> batch head key", self.alpha[:, readout], pattern)
            # each head's value vectors go through W_O and the readout before expanding over tokens
            head_out = einsum("head d_head d_model, d_model d_out -> head d_head d_out", attn.W_O, self.matrix[readout])
            values = einsum("batch key head d_head, head d_head d_out -> batch head key d_out", v, head_out)
            part = pooled_row[..., None] * values
            terms = part if terms is None else terms + part
        batch, n_heads, n_tokens, d_out = terms.shape
        self._group(
            [f"L{layer}H{h}T{t}" for h in range(n_heads) for t in range(n_tokens)],
            terms.reshape(batch, n_heads * n_tokens, d_out),
            [(layer, h, t, -1) for h in range(n_heads) for t in range(n_tokens)],
        )
        self.add_output_bias(attn.b_O, split=n_heads * n_tokens)

    def add_neurons(self, layer: int, post: Float[Tensor, "batch readout d_mlp"], mlp) -> None:
        terms = None
        for readout in range(self.matrix.shape[0]):
            part = post[:, readout, :, None] * (mlp.W_out @ self.matrix[readout])[None]  # [b, d_mlp, d_out]
            terms = part if terms is None else terms + part
        n = terms.shape[1]
        self._group([f"L{layer}N{i}" for i in range(n)], terms, [(layer, -1, -1, i) for i in range(n)])
        self.add_output_bias(mlp.b_out, split=n)

    def finish(self, level: str) -> Contributions:
        labels, meta = list(self.labels), list(self.meta)
        ln = self.model.ln_final
        if self.ln_mode == "center_each":
            self.terms.append((self.output_biases + self.readout_bias)[:, None])
            labels.append("bias")
            meta.append((-1, -1, -1, -1))
        values = torch.cat(self.terms, dim=1)  # [batch, component, d_out]; the only full-size copy
        self.terms.clear()
        if self.ln_mode == "paper":
            # each term takes an equal share of the LayerNorm mean and bias; 1/(2L+1) per group
            shares = torch.cat(self.shares).to(values) / len(self.shares)
            resid = self.cache[f"blocks.{self.model.cfg.n_layers - 1}.hook_resid_post"]
            alpha = self.alpha[:, 0]
            mean = einsum("batch pos, batch pos -> batch", alpha, resid.mean(-1)) if ln is not None else 0 * alpha[:, 0]
            mean_direction = self.project[0].sum(dim=0)  # 1 @ diag(w) P
            correction = self.readout_bias[None] - mean[:, None] * mean_direction[None]  # [batch, d_out]
            values.add_(shares[None, :, None] * correction[:, None, :])
        index = torch.tensor(meta, dtype=torch.long).reshape(-1, 4)
        return Contributions(
            values, labels, index[:, 0], index[:, 1], index[:, 2], index[:, 3], level=level,
            ln_mode=self.ln_mode, normalized=False, grid_size=self.cache.grid_size,
            n_prefix_tokens=self.cache.n_prefix_tokens,
        )
