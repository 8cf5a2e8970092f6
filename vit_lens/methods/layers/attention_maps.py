""""Peeling Back the Layers": the heatmap and data-flow perspectives, and high-norm tokens.

**Heatmap perspective** (section 3.4). With ``alpha[l, h, i]`` the attention that the query (the CLS
token, by default) pays to patch ``i`` in head ``h`` of layer ``l``, eq. 7 is the head-average map

    A^l[i] = (1/H) sum_h alpha[l, h, i]            (patches only: i = 1 .. N, prefix keys left out)

and eq. 8 the difference between adjacent layers, ``dA^l = A^l - A^{l-1}`` (``l >= 1``), whose size
(``sum_i |dA^l[i]|`` by default) tells how much the focus moves between two layers.
:func:`layer_attention_maps` returns every layer's map, each head's map (the per-head panels of
figure 6) and the attention left on the prefix keys (CLS itself, registers), from one forward pass
that keeps only the query row of every pattern. For a model without a CLS token there is no default
query: pass ``query="patches"`` (the attention each patch *receives*, averaged over all patch
queries) or a token position.

**High-norm tokens** (Darcet et al. 2024, "Vision Transformers Need Registers"). Large ViTs turn a
few background patches into tokens whose norm is many times the rest; those tokens draw much of the
CLS attention and make attention maps spiky, which the paper does not discuss. A patch token of
one image at one layer is an *outlier* when its residual-stream norm ``n`` satisfies both

    n > median + k * 1.4826 * MAD      and      n > min_ratio * median

with the median and the median absolute deviation (MAD, scaled to a standard deviation for normal
data by 1.4826) taken over that image's patch tokens at that layer (defaults ``k=6``,
``min_ratio=2``: the first rule alone flags tokens in a very tight distribution, the second alone
ignores how spread the norms are). :func:`find_outlier_tokens` reports them as
``(image, layer, position, norm)`` rows; :func:`layer_attention_maps` can drop them from the maps
(``outliers="exclude"``) or scale their attention down (``outliers="downweight"``). The maps of
layer ``l`` test the tokens that layer's attention reads, ``blocks.{l}.hook_resid_pre``.

**Data-flow perspective** (section 3.3, eqs. 4-6). For a position ``j`` (CLS or a patch), block ``l``
adds to the residual stream (``Z^l = Z^{l-1} + dZ^l``)::

    dZ^l_j = mlp_out^l_j + sum_h sum_i alpha[l, h, j, i] (v^{l,h}_i W_O^{l,h}) + b_O^l

where ``v_i = ln1(z_i) W_V + b_V`` (the value bias sits inside ``v``) and LayerScale, if the source
model has one, is already folded into ``W_O``, ``b_O`` and the MLP output (the paper's eq. 3 writes
``z_i W_V`` and leaves out ``W_O``, the LayerNorm and the biases). :func:`residual_update` returns
the MLP part and every (head, source token) attention term; :func:`residual_update_norms` the sizes
of the parts for every layer, without expanding over tokens.

Figures: :func:`plot_attention_maps`, :func:`plot_attention_deltas`, :func:`plot_delta_magnitude`,
:func:`plot_head_maps`, :func:`plot_token_norms`, :func:`plot_token_contributions`, :func:`plot_update_norms`.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vit_lens.model.hooked_vit import image_tower

OUTLIER_MODES = ("keep", "exclude", "downweight")
OUTLIER_SITES = ("resid_pre", "resid_post")
MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation


# ============================================================================ heatmap perspective


@dataclass
class LayerAttentionMaps:
    """Per-layer attention maps of one query over the patch grid (eq. 7), for a batch of images.

    Attributes:
        head_maps: ``[batch, layer, head, rows, cols]``: each head's attention on each patch, after
            any outlier handling and renormalisation.
        prefix: ``[batch, layer, head, n_prefix]``: the attention each head leaves on the prefix
            keys (CLS itself, distillation token, registers), which have no place on the grid
            (raw weights, whatever ``renormalize`` says).
        key_norms: ``[batch, layer, pos]``: norms of the tokens each layer's attention reads
            (``blocks.{l}.hook_resid_pre``), prefix tokens included.
        outlier_mask: ``[batch, layer, rows, cols]``: patches treated as high-norm outliers (all
            False when ``outliers="keep"``).
        query: ``"cls"``, ``"patches"`` or the query's token position.
        outliers: How outliers were handled: ``"keep"``, ``"exclude"`` or ``"downweight"``.
        n_prefix_tokens: Tokens before the patches.
    """

    head_maps: Float[Tensor, "batch layer head rows cols"]
    prefix: Float[Tensor, "batch layer head n_prefix"]
    key_norms: Float[Tensor, "batch layer pos"]
    outlier_mask: Bool[Tensor, "batch layer rows cols"]
    query: str | int
    outliers: str
    n_prefix_tokens: int

    @property
    def maps(self) -> Float[Tensor, "batch layer rows cols"]:
        """``A^l`` (eq. 7): the head-average map of every layer."""
        return self.head_maps.mean(dim=2)

    @property
    def n_layers(self) -> int:
        return self.head_maps.shape[1]

    def deltas(self) -> Float[Tensor, "batch delta rows cols"]:
        """``dA^l = A^l - A^{l-1}`` (eq. 8) for ``l = 1 .. n_layers - 1`` (entry ``i`` is layer ``i + 1``)."""
        maps = self.maps
        return maps[:, 1:] - maps[:, :-1]

    def delta_magnitude(self, ord: int = 1) -> Float[Tensor, "batch delta"]:
        """Size of every ``dA^l``: ``sum_i |dA^l[i]|`` (``ord=1``) or its Euclidean norm (``ord=2``).

        Entry ``i`` is layer ``i + 1``; large values mark the layers whose focus moves most.
        """
        if ord not in (1, 2):
            raise ValueError(f"delta_magnitude's ord must be 1 (sum of absolute values) or 2 (Euclidean), got {ord!r}")
        return torch.linalg.vector_norm(self.deltas().flatten(2), ord=ord, dim=-1)


def layer_attention_maps(
    model: Any,
    images: Float[Tensor, "batch channel height width"],
    *,
    query: Any = None,
    outliers: str = "keep",
    outlier_weight: Any = 0.25,
    k: Any = 6.0,
    min_ratio: Any = 2.0,
    renormalize: bool = False,
    fwd_hooks: Sequence | None = None,
) -> LayerAttentionMaps:
    """Every layer's attention map of one query over the patches (eq. 7), per head and averaged.

    Args:
        model: A ``HookedViT`` or ``HookedCLIP``.
        images: ``[batch, channels, height, width]``, preprocessed for the model.
        query: ``"cls"`` (default where the model has a CLS token), ``"patches"`` (the attention
            each patch receives, averaged over all patch queries) or a token position (``1`` is a
            DeiT's distillation token). A model without CLS token needs one of the last two.
        outliers: ``"keep"``; ``"exclude"``: attention on high-norm patches (module docstring) is
            set to zero; ``"downweight"``: it is multiplied by ``outlier_weight``.
        outlier_weight: Factor for ``"downweight"``, in [0, 1].
        k, min_ratio: The outlier rule (module docstring), applied to ``blocks.{l}.hook_resid_pre``.
        renormalize: Divide every head's map by its sum over the patches, so that each sums to 1
            (after any outlier handling). Default: raw attention weights, as eq. 7.
        fwd_hooks: Interventions active during the run, as ``model.run_with_hooks`` takes them.

    Returns:
        :class:`LayerAttentionMaps`; ``.maps`` is ``A^l`` ``[batch, layer, rows, cols]``,
        ``.deltas()`` is ``dA^l`` and ``.delta_magnitude()`` its size per layer.

    Example:
        >>> import vit_lens
        >>> from vit_lens.toy import ToyWorld
        >>> clip = vit_lens.load_toy_clip()
        >>> maps = layer_attention_maps(clip, ToyWorld(seed=0).sample(2).images)
        >>> tuple(maps.maps.shape), tuple(maps.delta_magnitude().shape)   # 4 layers, 8x8 patches
        ((2, 4, 8, 8), (2, 3))
    """
    tower = _tower(model)
    cfg = tower.cfg
    grid = _grid(tower, images)
    query = _check_query(tower, query, "layer_attention_maps", grid[0] * grid[1] + cfg.n_prefix_tokens)
    if outliers not in OUTLIER_MODES:
        raise ValueError(f"outliers must be one of {OUTLIER_MODES}, got {outliers!r}")
    if isinstance(outlier_weight, bool) or not isinstance(outlier_weight, (int, float)) or not 0 <= outlier_weight <= 1:
        raise ValueError(f"outlier_weight must be a number in [0, 1], got {outlier_weight!r}")
    _check_rule(k, min_ratio)
    n_prefix = cfg.n_prefix_tokens
    rows_kept: dict[int, Tensor] = {}
    norms: dict[int, Tensor] = {}

    def keep_row(layer: int):
        def hook(pattern: Tensor, hook: Any) -> None:
            if query == "patches":
                rows_kept[layer] = pattern[:, :, n_prefix:].mean(dim=2)  # [batch, head, key]
            else:
                rows_kept[layer] = pattern[:, :, 0 if query == "cls" else query]

        return hook

    def keep_norms(layer: int):
        def hook(resid: Tensor, hook: Any) -> None:
            norms[layer] = resid.norm(dim=-1)

        return hook

    hooks = list(fwd_hooks or [])
    for layer in range(cfg.n_layers):
        hooks += [(f"blocks.{layer}.hook_resid_pre", keep_norms(layer)),
                  (f"blocks.{layer}.attn.hook_pattern", keep_row(layer))]
    with torch.no_grad():
        tower.run_with_hooks(images, fwd_hooks=hooks)
    rows = torch.stack([rows_kept[l] for l in range(cfg.n_layers)], dim=1)  # [batch, layer, head, key]
    key_norms = torch.stack([norms[l] for l in range(cfg.n_layers)], dim=1)  # [batch, layer, pos]
    patch_rows = rows[..., n_prefix:]
    mask = _outlier_mask(key_norms[..., n_prefix:], key_norms[..., n_prefix:], k, min_ratio)[0]  # [batch, layer, patch]
    if outliers != "keep":
        weight = 0.0 if outliers == "exclude" else float(outlier_weight)
        patch_rows = torch.where(mask[:, :, None], patch_rows * weight, patch_rows)
    else:
        mask = torch.zeros_like(mask)
    if renormalize:
        patch_rows = patch_rows / patch_rows.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(patch_rows.dtype).tiny)
    return LayerAttentionMaps(
        head_maps=patch_rows.unflatten(-1, grid),
        prefix=rows[..., :n_prefix],
        key_norms=key_norms,
        outlier_mask=mask.unflatten(-1, grid),
        query=query,
        outliers=outliers,
        n_prefix_tokens=n_prefix,
    )


# ============================================================================ high-norm tokens


@dataclass
class OutlierTokens:
    """High-norm tokens found by :func:`find_outlier_tokens`: one row per (image, layer, position).

    Attributes:
        image, layer, position: ``[n]`` indices of each outlier (position counts the prefix tokens).
        norm: ``[n]`` its norm; ``ratio``: ``[n]`` that norm over the median patch norm.
        mask: ``[batch, layer, pos]`` True at every outlier (prefix positions False unless tested).
        norms: ``[batch, layer, pos]`` every token's norm.
        site: ``"resid_pre"`` or ``"resid_post"``: which residual stream of block ``layer``.
        grid_size: Patch grid (rows, cols); n_prefix_tokens: tokens before the patches.
    """

    image: Int[Tensor, " n"]
    layer: Int[Tensor, " n"]
    position: Int[Tensor, " n"]
    norm: Float[Tensor, " n"]
    ratio: Float[Tensor, " n"]
    mask: Bool[Tensor, "batch layer pos"]
    norms: Float[Tensor, "batch layer pos"]
    site: str
    grid_size: tuple[int, int]
    n_prefix_tokens: int

    def __len__(self) -> int:
        return len(self.image)

    def rows(self) -> list[tuple[int, int, int, float]]:
        """``[(image, layer, position, norm), ...]``."""
        return list(zip(self.image.tolist(), self.layer.tolist(), self.position.tolist(), self.norm.tolist()))

    def to_pandas(self):
        """A DataFrame with columns image, layer, position, norm, ratio (needs pandas)."""
        import pandas as pd

        return pd.DataFrame({
            "image": self.image.cpu().numpy(), "layer": self.layer.cpu().numpy(),
            "position": self.position.cpu().numpy(), "norm": self.norm.cpu().numpy(),
            "ratio": self.ratio.cpu().numpy(),
        })


def robust_outliers(
    norms: Float[Tensor, "*batch n"], k: Any = 6.0, min_ratio: Any = 2.0
) -> Bool[Tensor, "*batch n"]:
    """The outlier rule of the module docstring along the last axis.

    True where ``norm > median + k * 1.4826 * MAD`` and ``norm > min_ratio * median``, the median
    and MAD taken over the last axis.

    Example:
        >>> robust_outliers(torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 9.0])).tolist()
        [False, False, False, False, False, True]
    """
    return _outlier_mask(norms, norms, k, min_ratio)[0]


def _outlier_mask(values: Tensor, reference: Tensor, k: Any, min_ratio: Any) -> tuple[Tensor, Tensor]:
    """The rule applied to ``values`` with the median and MAD of ``reference`` (last axis); also the median."""
    _check_rule(k, min_ratio)
    median = reference.median(dim=-1, keepdim=True).values
    mad = (reference - median).abs().median(dim=-1, keepdim=True).values
    return (values > median + k * MAD_TO_STD * mad) & (values > min_ratio * median), median


def _check_rule(k: Any, min_ratio: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k < 0:
        raise ValueError(f"k must be a non-negative number, got {k!r}")
    if isinstance(min_ratio, bool) or not isinstance(min_ratio, (int, float)) or min_ratio < 1:
        raise ValueError(f"min_ratio must be a number >= 1, got {min_ratio!r}")


def find_outlier_tokens(
    model: Any,
    images: Float[Tensor, "batch channel height width"],
    *,
    site: str = "resid_post",
    k: Any = 6.0,
    min_ratio: Any = 2.0,
    include_prefix: bool = False,
    fwd_hooks: Sequence | None = None,
) -> OutlierTokens:
    """High-norm tokens of every image at every layer (Darcet et al.'s artifacts; module docstring).

    Args:
        model: A ``HookedViT`` or ``HookedCLIP``.
        images: ``[batch, channels, height, width]``.
        site: ``"resid_post"`` (each block's output, default) or ``"resid_pre"`` (its input, what
            its attention reads).
        k, min_ratio: The rule; the median and MAD are always taken over the patch tokens.
        include_prefix: Also test CLS / registers against the patches' statistics (registers are
            meant to hold high norms, so they are left out by default).
        fwd_hooks: Interventions active during the run.

    Returns:
        :class:`OutlierTokens`: ``.rows()`` lists ``(image, layer, position, norm)``.

    Example:
        >>> found = find_outlier_tokens(model, images)  # doctest: +SKIP
        >>> found.to_pandas().groupby("layer").size()  # outliers per layer  # doctest: +SKIP
    """
    tower = _tower(model)
    cfg = tower.cfg
    if site not in OUTLIER_SITES:
        raise ValueError(f"site must be one of {OUTLIER_SITES}, got {site!r}")
    _check_rule(k, min_ratio)
    names = [f"blocks.{layer}.hook_{site}" for layer in range(cfg.n_layers)]
    norms: dict[str, Tensor] = {}

    def keep(resid: Tensor, hook: Any) -> None:
        norms[hook.name] = resid.norm(dim=-1)

    with torch.no_grad():
        tower.run_with_hooks(images, fwd_hooks=list(fwd_hooks or []) + [(name, keep) for name in names])
    all_norms = torch.stack([norms[name] for name in names], dim=1)  # [batch, layer, pos]
    n_prefix = cfg.n_prefix_tokens
    mask, median = _outlier_mask(all_norms, all_norms[..., n_prefix:], k, min_ratio)
    if not include_prefix:
        mask[..., :n_prefix] = False
    image, layer, position = mask.nonzero(as_tuple=True)
    norm = all_norms[image, layer, position]
    return OutlierTokens(
        image=image, layer=layer, position=position, norm=norm, ratio=norm / median[image, layer, 0],
        mask=mask, norms=all_norms, site=site, grid_size=_grid(tower, images), n_prefix_tokens=n_prefix,
    )


# ============================================================================ data-flow perspective


@dataclass
class ResidualUpdate:
    """Block ``layer``'s update of the residual stream at some positions, split as eq. 6.

    Attributes:
        layer: The block.
        positions: The token positions (queries) decomposed.
        mlp: ``[batch, position, d_model]``: ``mlp_out`` at each position.
        attn_terms: ``[batch, position, head, key, d_model]``: ``alpha[h, j, i] v_i^h W_O^h`` for
            every head ``h`` and source token ``i``.
        attn_bias: ``[d_model]``: ``b_O``, written once at every position.
        total: ``[batch, position, d_model]``: ``resid_post - resid_pre`` as the model computed it.
        grid_size: Patch grid (rows, cols) of the images; n_prefix_tokens: tokens before the patches.
    """

    layer: int
    positions: list[int]
    mlp: Float[Tensor, "batch position d_model"]
    attn_terms: Float[Tensor, "batch position head key d_model"]
    attn_bias: Float[Tensor, " d_model"]
    total: Float[Tensor, "batch position d_model"]
    grid_size: tuple[int, int]
    n_prefix_tokens: int

    def attention(self) -> Float[Tensor, "batch position d_model"]:
        """The attention part, ``sum_h sum_i`` of the terms plus ``b_O`` (= ``attn_out``)."""
        return self.attn_terms.sum(dim=(2, 3)) + self.attn_bias

    def heads(self) -> Float[Tensor, "batch position head d_model"]:
        """Each head's part, summed over source tokens (``b_O`` not included)."""
        return self.attn_terms.sum(dim=3)

    def sum(self) -> Float[Tensor, "batch position d_model"]:
        """MLP part + attention part: equals :attr:`total` up to float round-off."""
        return self.mlp + self.attention()

    def token_map(
        self, direction: Float[Tensor, " d_model"] | None = None, heads: Any = None
    ) -> Float[Tensor, "batch position rows cols"]:
        """How much each patch (as a source token) writes into the update, on the patch grid.

        Args:
            direction: Project the summed terms onto this ``[d_model]`` vector (signed map);
                default: the norm of the summed terms.
            heads: Heads to sum (default all).
        """
        terms = self.attn_terms if heads is None else self.attn_terms[:, :, _as_list(heads)]
        per_token = terms.sum(dim=2)[:, :, self.n_prefix_tokens :]  # [batch, position, patch, d_model]
        values = per_token.norm(dim=-1) if direction is None else per_token @ direction.to(per_token)
        return values.unflatten(-1, self.grid_size)


def residual_update(
    model: Any,
    images: Float[Tensor, "batch channel height width"] | None = None,
    *,
    layer: int,
    positions: Any = None,
    cache: Any = None,
) -> ResidualUpdate:
    """Block ``layer``'s update ``dZ^l_j`` at positions ``j``, split into MLP and (head, token) terms (eq. 6).

    ``attn_terms`` is ``[batch, position, head, key, d_model]``: decompose a few positions at a time
    on large models.

    Args:
        model: A ``HookedViT`` or ``HookedCLIP``.
        images: ``[batch, channels, height, width]``; or give ``cache`` instead.
        layer: Block index (negative counts from the end).
        positions: A token position or a list of them (``0`` is CLS; patches start at
            ``n_prefix_tokens``). Default: CLS (models without CLS token must choose).
        cache: A :class:`~vit_lens.VisionActivationCache` holding ``blocks.{layer}.hook_resid_pre,
            hook_resid_post, hook_mlp_out, attn.hook_pattern, attn.hook_v``.

    Returns:
        :class:`ResidualUpdate`; ``.sum()`` reconstructs ``.total`` and ``.attention()`` is ``attn_out``.

    Example:
        >>> import vit_lens
        >>> from vit_lens.toy import ToyWorld
        >>> clip = vit_lens.load_toy_clip()
        >>> update = residual_update(clip, ToyWorld(seed=0).sample(2).images, layer=3)
        >>> tuple(update.attn_terms.shape)  # [batch, position, head, key, d_model]
        (2, 1, 4, 65, 128)
        >>> bool(torch.allclose(update.sum(), update.total, atol=1e-4))
        True
    """
    tower = _tower(model)
    cfg = tower.cfg
    layer = _check_layer(layer, cfg.n_layers, "residual_update")
    if getattr(cfg, "attn_norm", False):
        raise NotImplementedError(
            f"{cfg.model_name} normalises the concatenated heads before W_O (attn.ln_z, EVA's sub-LayerNorm), so an "
            "attention update is not a sum of per-token terms alpha v W_O; residual_update_norms splits it exactly "
            "per head"
        )
    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.hook_mlp_out",
             f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"]
    if cache is None:
        if images is None:
            raise ValueError("residual_update needs images= or cache=")
        with torch.no_grad():
            _, cache = tower.run_with_cache(images, names_filter=names, stop_at_layer=layer + 1)
    elif images is not None:
        raise ValueError("residual_update takes images= or cache=, not both")
    missing = [name for name in names if name not in cache.cache_dict]
    if missing:
        raise KeyError(f"residual_update needs {missing} in the cache; run model.run_with_cache(images, "
                       f"names_filter={names})")
    n_pos = cache[names[0]].shape[1]
    if positions is None:
        if not cfg.class_token:
            raise ValueError(
                f"{cfg.model_name} has no CLS token, so residual_update has no default position; pass positions= "
                f"(patches are {cfg.n_prefix_tokens} .. {n_pos - 1})"
            )
        positions = [0]
    positions = [_check_layer(p, n_pos, "residual_update's positions") for p in _as_list(positions)]
    attn = tower.blocks[layer].attn
    pattern = cache[names[3]][:, :, positions]  # [batch, head, position, key]
    values_out = torch.einsum("bkhd,hdm->bhkm", cache[names[4]], attn.W_O)  # [batch, head, key, d_model]
    terms = pattern[..., None] * values_out[:, :, None]  # [batch, head, position, key, d_model]
    resid_pre, resid_post = cache[names[0]][:, positions], cache[names[1]][:, positions]
    return ResidualUpdate(
        layer=layer,
        positions=positions,
        mlp=cache[names[2]][:, positions],
        attn_terms=terms.transpose(1, 2),
        attn_bias=attn.b_O.detach(),
        total=resid_post - resid_pre,
        grid_size=tuple(cache.grid_size),
        n_prefix_tokens=cfg.n_prefix_tokens,
    )


@dataclass
class UpdateNorms:
    """Sizes of every block's update at one position (eq. 4-5), ``[batch, layer]`` unless noted.

    Attributes:
        total: ``||dZ^l||``; ``mlp``: ``||mlp_out^l||``; ``attention``: ``||attn_out^l||``.
        heads: ``[batch, layer, head]``: each head's part ``||z^h W_O^h||`` (with EVA's sub-LayerNorm,
            ``||ln_z(z)^h W_O^h||``).
        resid: ``||Z^{l-1}||``, the stream the update is added to.
        position: The position.
    """

    total: Float[Tensor, "batch layer"]
    mlp: Float[Tensor, "batch layer"]
    attention: Float[Tensor, "batch layer"]
    heads: Float[Tensor, "batch layer head"]
    resid: Float[Tensor, "batch layer"]
    position: int

    def relative(self) -> Float[Tensor, "batch layer"]:
        """``||dZ^l|| / ||Z^{l-1}||``: how much of the stream each block rewrites."""
        return self.total / self.resid


def residual_update_norms(
    model: Any, images: Float[Tensor, "batch channel height width"], *, position: int | None = None
) -> UpdateNorms:
    """Norms of the update, its MLP and attention parts and every head's part, for every layer.

    Args:
        model: A ``HookedViT`` or ``HookedCLIP``.
        images: ``[batch, channels, height, width]``.
        position: Token position (default CLS; required for models without one).

    Example:
        >>> norms = residual_update_norms(clip, images)  # doctest: +SKIP
        >>> plot_update_norms(norms).show()  # doctest: +SKIP
    """
    tower = _tower(model)
    cfg = tower.cfg
    if position is None:
        if not cfg.class_token:
            raise ValueError(
                f"{cfg.model_name} has no CLS token; pass position= (a patch is {cfg.n_prefix_tokens} or more)"
            )
        position = 0
    kept: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        kept[hook.name] = act[:, position]

    # what W_O reads per head: z, or the sub-LayerNorm's output where the attention has one (EVA)
    head_leaf = "attn.ln_z.hook_normalized" if getattr(cfg, "attn_norm", False) else "attn.hook_z"
    leaves = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out", head_leaf)
    hooks = [(f"blocks.{l}.{leaf}", keep) for l in range(cfg.n_layers) for leaf in leaves]
    with torch.no_grad():
        tower.run_with_hooks(images, fwd_hooks=hooks)
    n_pos = images.shape[-2] // cfg.patch_size[0] * (images.shape[-1] // cfg.patch_size[1]) + cfg.n_prefix_tokens
    _check_layer(position, n_pos, "residual_update_norms' position")

    def stack(leaf: str) -> Tensor:
        return torch.stack([kept[f"blocks.{l}.{leaf}"] for l in range(cfg.n_layers)], dim=1)

    head_inputs = stack(head_leaf)
    if head_leaf != "attn.hook_z":  # ln_z acts on the concatenated heads: [batch, layer, head * d_head]
        head_inputs = head_inputs.unflatten(-1, (cfg.n_heads, cfg.d_head))
    heads = torch.einsum("blhd,lhdm->blhm", head_inputs, tower.W_O)
    return UpdateNorms(
        total=(stack("hook_resid_post") - stack("hook_resid_pre")).norm(dim=-1),
        mlp=stack("hook_mlp_out").norm(dim=-1),
        attention=stack("hook_attn_out").norm(dim=-1),
        heads=heads.norm(dim=-1),
        resid=stack("hook_resid_pre").norm(dim=-1),
        position=position,
    )


# ============================================================================ figures


def plot_attention_maps(maps: LayerAttentionMaps, image: Any = None, *, index: int = 0, **kwargs: Any):
    """``A^l`` of every layer over image ``index`` (small multiples; figure 1's heatmap row).

    Example:
        >>> plot_attention_maps(maps, images[0]).show()  # doctest: +SKIP
    """
    from vit_lens.utils import plotting as plot

    titles = [f"A^{l}" for l in range(maps.n_layers)]
    title = kwargs.pop("title", f"attention of query {maps.query!r}, mean over heads")
    return plot.image_heatmap_grid(image, maps.maps[index], titles=titles, title=title, **kwargs)


def plot_attention_deltas(maps: LayerAttentionMaps, image: Any = None, *, index: int = 0, **kwargs: Any):
    """``dA^l = A^l - A^{l-1}`` for ``l >= 1`` over image ``index`` (diverging colours)."""
    from vit_lens.utils import plotting as plot

    titles = [f"dA^{l}" for l in range(1, maps.n_layers)]
    return plot.image_heatmap_grid(image, maps.deltas()[index], titles=titles,
                                   title=kwargs.pop("title", "change of the attention map between layers"), **kwargs)


def plot_delta_magnitude(maps: LayerAttentionMaps, *, ord: int = 1, index: int | None = None):
    """``||dA^l||`` per layer: the mean over images (default), or one image's curve."""
    from vit_lens.utils import plotting as plot

    magnitude = maps.delta_magnitude(ord)
    curve = magnitude.mean(dim=0) if index is None else magnitude[index]
    name = "mean over images" if index is None else f"image {index}"
    return plot.layer_curves({name: curve}, x=list(range(1, maps.n_layers)), title="size of dA^l",
                             yaxis_title="sum |dA|" if ord == 1 else "||dA||")


def plot_head_maps(maps: LayerAttentionMaps, layer: int, image: Any = None, *, index: int = 0, **kwargs: Any):
    """Every head's map at one layer over image ``index`` (figure 6)."""
    from vit_lens.utils import plotting as plot

    layer = _check_layer(layer, maps.n_layers, "plot_head_maps")
    head_maps = maps.head_maps[index, layer]
    return plot.image_heatmap_grid(image, head_maps, titles=[f"L{layer}H{h}" for h in range(len(head_maps))],
                                   title=kwargs.pop("title", f"layer {layer}: attention per head"), **kwargs)


def plot_token_norms(found: OutlierTokens, image: Any = None, *, index: int = 0, **kwargs: Any):
    """Every layer's patch-token norms over image ``index``; panel titles count its outliers.

    Example:
        >>> plot_token_norms(find_outlier_tokens(model, images), images[0]).show()  # doctest: +SKIP
    """
    from vit_lens.utils import plotting as plot

    patches = found.norms[index, :, found.n_prefix_tokens :].unflatten(-1, found.grid_size)
    counts = found.mask[index].sum(dim=-1).tolist()
    titles = [f"L{l} {found.site}: {n} outlier{'s' if n != 1 else ''}" for l, n in enumerate(counts)]
    title = kwargs.pop("title", "token norms")
    return plot.image_heatmap_grid(image, patches, titles=titles, title=title, shared_scale=False, **kwargs)


def plot_token_contributions(update: ResidualUpdate, image: Any = None, *, index: int = 0, position: int = 0,
                             **kwargs: Any):
    """Per head, how much each patch writes into block ``update.layer``'s update at one position (eq. 6)."""
    from vit_lens.utils import plotting as plot

    n_heads = update.attn_terms.shape[2]
    maps = torch.stack([update.token_map(heads=[h])[index, position] for h in range(n_heads)])
    titles = [f"L{update.layer}H{h}" for h in range(n_heads)]
    return plot.image_heatmap_grid(
        image, maps, titles=titles,
        title=kwargs.pop("title", f"||alpha v W_O|| per source patch, position {update.positions[position]}"), **kwargs,
    )


def plot_update_norms(norms: UpdateNorms, *, relative: bool = False):
    """Mean over images of ``||dZ^l||`` and of its MLP and attention parts per layer."""
    from vit_lens.utils import plotting as plot

    scale = norms.resid if relative else torch.ones_like(norms.resid)
    curves = {"update": (norms.total / scale).mean(0), "MLP part": (norms.mlp / scale).mean(0),
              "attention part": (norms.attention / scale).mean(0)}
    return plot.layer_curves(curves, title=f"residual update at position {norms.position}",
                             yaxis_title="norm / ||Z^{l-1}||" if relative else "norm")


# ============================================================================ internals


def _tower(model: Any) -> Any:
    return image_tower(model)


def _check_layer(value: Any, size: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -size <= value < size:
        raise ValueError(f"{what}: expected an int in [-{size}, {size - 1}], got {value!r}")
    return value % size


def _check_query(tower: Any, query: Any, function: str, n_pos: int) -> str | int:
    cfg = tower.cfg
    if query is None:
        if not cfg.class_token:
            raise ValueError(
                f"{function}: {cfg.model_name} has no CLS token, so there is no CLS attention map; pass "
                "query='patches' (the attention each patch receives, averaged over all patch queries) or "
                f"query=<token position> (patches start at {cfg.n_prefix_tokens})"
            )
        return "cls"
    if query == "cls":
        if not cfg.class_token:
            raise ValueError(f"{function}: query='cls' but {cfg.model_name} has no CLS token; use query='patches'")
        return "cls"
    if query == "patches":
        return query
    if isinstance(query, int) and not isinstance(query, bool) and 0 <= query < n_pos:
        if query == 0 and cfg.class_token:
            return "cls"
        return query
    raise ValueError(
        f"{function}: query must be 'cls', 'patches' or a token position in [0, {n_pos - 1}], got {query!r}"
    )


def _grid(tower: Any, images: Tensor) -> tuple[int, int]:
    patch = tower.cfg.patch_size
    return (images.shape[-2] // patch[0], images.shape[-1] // patch[1])


def _as_list(value: Any) -> list[int]:
    if isinstance(value, Tensor):
        return value.flatten().tolist()
    if isinstance(value, (list, tuple, range)):
        return list(value)
    return [value]
