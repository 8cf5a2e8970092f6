"""VisionActivationCache: TransformerLens's ActivationCache, aware of prefix tokens and the patch grid."""

import numbers
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from vit_lens.model._transformer_lens import ActivationCache
from vit_lens.model.hook_checks import check_ln_scale_per_token, missing_activation_error
from vit_lens.model.hook_layout import hook_axes
from vit_lens.model.readout import check_affine_readout, check_poolable, normalise, pooling_slice


class VisionActivationCache(ActivationCache):
    """The activations of one HookedViT run.

    Everything TransformerLens's ``ActivationCache`` offers works (``cache["pattern", 3]``,
    ``accumulated_resid``, ``decompose_resid``, ``stack_head_results``,
    ``get_full_resid_decomposition``, ``apply_ln_to_stack``, ...), with two vision-specific
    rules that keep the decompositions exact:

    * For models with ``ln_pre`` (CLIP) the residual stream starts *after* ``ln_pre``, so
      ``hook_embed + hook_pos_embed`` is not a term of it. The decompositions then use a single
      ``"embed"`` term, ``ln_pre(hook_embed + hook_pos_embed)`` (= ``blocks.0.hook_resid_pre``).
    * For models whose final LayerNorm acts on the pooled vector (timm's ``fc_norm``), the
      final norm cannot be applied per token: ``apply_ln`` at the final layer raises and says so,
      and :meth:`pool_stack` pools first, then normalises.

    The readout follows TransformerLens on a model loaded with ``fold_ln=True``: ``apply_ln``
    centres and scales, and the final LayerNorm's weight and bias are in ``model.W_U`` /
    ``model.b_U`` (:mod:`vit_lens.model.readout`). :meth:`logit_attrs` is direct logit
    attribution; :meth:`accumulated_resid` says what each logit-lens recipe computes.

    Helpers: ``n_prefix_tokens``, ``grid_size``, ``prefix_tokens(name)``, ``patch_tokens(name)``,
    ``to_patch_grid(name)`` and ``attention_grid(layer, query)``.
    """

    def __init__(
        self,
        cache_dict: dict[str, Tensor],
        model: Any,
        has_batch_dim: bool = True,
        grid_size: tuple[int, int] | None = None,
    ):
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        self._grid_size = tuple(grid_size) if grid_size is not None else tuple(model.cfg.grid_size)
        # With ln_pre, TransformerLens's own embed / pos_embed terms must stay out of the sums.
        self._embed_is_ln_pre = bool(model.cfg.ln_pre)
        self._has_ln_pre_embed = self._embed_is_ln_pre and "blocks.0.hook_resid_pre" in self.cache_dict
        if self._embed_is_ln_pre:
            self.has_embed = self.has_pos_embed = False

    # ------------------------------------------------------------------ vision helpers

    @property
    def n_prefix_tokens(self) -> int:
        """CLS, distillation and register tokens before the patches."""
        return self.model.cfg.n_prefix_tokens

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of the cached images (not always the model's: dynamic image sizes)."""
        return self._grid_size

    def _pos_axis(self, name: str) -> int:
        """The token axis of a cached activation, counted from the end (the batch axis may be gone)."""
        full_ndim = self[name].ndim + (0 if self.has_batch_dim else 1)
        axes = hook_axes(name, full_ndim)
        if axes.key is not None:
            raise ValueError(f"{name} has two position axes (query, key); use attention_grid or index it directly")
        if axes.position is None:
            raise ValueError(f"{name} has no token axis (it comes after pooling)")
        return axes.position - full_ndim

    def prefix_tokens(self, name: str | tuple) -> Tensor:
        """The CLS / distillation / register rows of a cached per-token activation."""
        full = self._full_name(name)
        return self[full].narrow(self._pos_axis(full), 0, self.n_prefix_tokens)

    def patch_tokens(self, name: str | tuple) -> Tensor:
        """The patch rows (raster order) of a cached per-token activation."""
        full = self._full_name(name)
        act, axis = self[full], self._pos_axis(full)
        return act.narrow(axis, self.n_prefix_tokens, act.shape[axis] - self.n_prefix_tokens)

    def to_patch_grid(self, name: str | tuple, grid: tuple[int, int] | None = None) -> Tensor:
        """Patch rows of a per-token activation reshaped to the image grid.

        ``[batch, pos, d]`` becomes ``[batch, rows, cols, d]``; ``[batch, pos, head, d_head]``
        becomes ``[batch, rows, cols, head, d_head]``.
        """
        full = self._full_name(name)
        patches = self.patch_tokens(full)
        axis = self._pos_axis(full) % patches.ndim
        rows, cols = grid or self.grid_size
        if rows * cols != patches.shape[axis]:
            raise ValueError(f"grid {rows}x{cols} does not hold the {patches.shape[axis]} patches of {full}")
        return patches.unflatten(axis, (rows, cols))

    def attention_grid(self, layer: int, query: int = 0) -> Float[Tensor, "batch head rows cols"]:
        """Attention from token ``query`` (default CLS) to every patch, on the patch grid.

        Example:
            >>> cls_maps = cache.attention_grid(5)  # [batch, head, rows, cols]  # doctest: +SKIP
        """
        pattern = self["pattern", layer]
        rows, cols = self.grid_size
        return pattern[..., query, self.n_prefix_tokens :].unflatten(-1, (rows, cols))

    def _full_name(self, key: Any) -> str:
        if isinstance(key, str) and key in self.cache_dict:
            return key
        from vit_lens.model._transformer_lens import get_act_name

        if not isinstance(key, tuple):
            return get_act_name(key)
        if len(key) > 1 and isinstance(key[1], int) and key[1] < 0:
            key = (key[0], self.model.cfg.n_layers + key[1], *key[2:])
        return get_act_name(*key)

    def __getitem__(self, key: Any) -> Tensor:
        """``cache[name]`` or TransformerLens's shorthand (``cache["pattern", 3]``).

        A name the cache does not hold raises a KeyError that says why and what would work: how
        to cache a hook point the run left out, the closest cached names for a misspelling.
        """
        try:
            return super().__getitem__(key)
        except (KeyError, TypeError):  # TypeError: a key that is neither a name nor a shorthand tuple
            try:
                name = self._full_name(key)
            except (TypeError, ValueError, AttributeError, IndexError):
                name = None
            model = self.model
            raise missing_activation_error(key, name, self.cache_dict, model.hook_dict, model.cfg.n_layers) from None

    def _check_layer(self, layer: Any, method: str, mlp_input: bool = False, lowest: int = 0) -> None:
        """Refuse a ``layer`` that TransformerLens's helpers would turn into a KeyError or a silent wrong stack.

        ``layer`` is the residual stream entering that block: ``lowest`` to ``n_layers``
        (``n_layers``, -1 and None: after the last block); with ``mlp_input`` it is the block
        whose MLP input is meant, 0 to ``n_layers - 1``.
        """
        n = self.model.cfg.n_layers
        is_int = isinstance(layer, numbers.Integral) and not isinstance(layer, bool)
        if mlp_input:
            if is_int and 0 <= layer < n:
                return
            valid = f"with mlp_input=True, layer is the block whose MLP input is meant: 0 to {n - 1}"
        else:
            if layer is None or (is_int and (layer == -1 or lowest <= layer <= n)):
                return
            valid = f"layer is the residual stream entering that block, {lowest} to {n} ({n}, -1, None: the end)"
        raise ValueError(f"{method}(layer={layer!r}): {self.model.cfg.model_name} has {n} blocks; {valid}.")

    def stack_head_results(self, layer: int | None = -1, *args: Any, **kwargs: Any):
        """TransformerLens's ``stack_head_results``: every head's output before block ``layer``."""
        self._check_layer(layer, "stack_head_results")
        return super().stack_head_results(layer, *args, **kwargs)

    def stack_activation(self, activation_name: str, layer: int | None = -1, *args: Any, **kwargs: Any):
        """TransformerLens's ``stack_activation``: ``activation_name`` of every block before ``layer``."""
        self._check_layer(layer, "stack_activation", lowest=1)  # a stack of no blocks fails in TransformerLens
        return super().stack_activation(activation_name, layer, *args, **kwargs)

    # ------------------------------------------------------------------ decompositions with ln_pre

    def _embed_term(self, pos_slice: Any) -> Float[Tensor, "1 *batch_and_pos d_model"]:
        from vit_lens.model._transformer_lens import Slice

        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        return pos_slice.apply(self["blocks.0.hook_resid_pre"], dim=-2)[None]

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: Any = None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """TransformerLens's ``decompose_resid``; with ``ln_pre`` the first term is ``ln_pre``'s output."""
        self._check_layer(layer, "decompose_resid", mlp_input)
        if layer == 0 and not mlp_input and incl_embeds and self._has_ln_pre_embed:
            # Before block 0 only the embedding term exists, and TransformerLens's stack of no terms fails.
            components, labels = self._embed_term(pos_slice)[:0], []
        else:
            components, labels = super().decompose_resid(
                layer, mlp_input=mlp_input, mode=mode, apply_ln=False, pos_slice=pos_slice,
                incl_embeds=incl_embeds, return_labels=True,
            )
        if incl_embeds and self._has_ln_pre_embed:
            components = torch.cat([self._embed_term(pos_slice), components])
            labels = ["embed"] + labels
        if apply_ln:
            components = self.apply_ln_to_stack(components, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (components, labels) if return_labels else components

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False,
                                     pos_slice: Any = None, return_labels: bool = False,
                                     project_output_onto: Tensor | None = None):
        """TransformerLens's decomposition into heads, neurons (or MLPs), embeddings and biases.

        With ``ln_pre`` the embedding terms are replaced by one ``"embed"`` term placed where
        TransformerLens puts ``embed`` (just before ``"bias"``).
        """
        self._check_layer(layer, "get_full_resid_decomposition", mlp_input)
        if apply_ln:
            self._check_final_ln_per_token(layer)
        if expand_neurons:
            self._check_neurons_are_post_times_w_out()
        if not self._embed_is_ln_pre:
            return super().get_full_resid_decomposition(
                layer, mlp_input=mlp_input, expand_neurons=expand_neurons, apply_ln=apply_ln,
                pos_slice=pos_slice, return_labels=return_labels, project_output_onto=project_output_onto,
            )
        stack, labels = super().get_full_resid_decomposition(
            layer, mlp_input=mlp_input, expand_neurons=expand_neurons, apply_ln=apply_ln, pos_slice=pos_slice,
            return_labels=True, project_output_onto=project_output_onto,
        )
        if self._has_ln_pre_embed:
            embed = self._embed_term(pos_slice)
            if apply_ln:
                embed = self.apply_ln_to_stack(embed, layer, pos_slice=pos_slice, mlp_input=mlp_input)
            if project_output_onto is not None:
                embed = embed @ project_output_onto
            stack = torch.cat([stack[:-1], embed, stack[-1:]])
            labels = labels[:-1] + ["embed", labels[-1]]
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, residual_stack: Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice: Any = None, batch_slice: Any = None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> Tensor:
        """TransformerLens's ``apply_ln_to_stack``: centre each term and divide it by the cached LayerNorm scale.

        As TransformerLens does on a model loaded with ``fold_ln=True``, the LayerNorm's weight and
        bias are not applied: the final LayerNorm's live in ``model.W_U`` and ``model.b_U``
        (:mod:`vit_lens.model.readout`), so ``apply_ln_to_stack(stack, pos_slice=0).sum(0) @
        model.W_U + model.b_U`` is a CLS-pooled model's output, folded weights or not. With
        ``recompute_ln=True`` at the final layer each term is normalised with its own statistics
        instead (the logit lens). A final LayerNorm that acts on the pooled vector (timm's
        ``fc_norm``) cannot be applied per token and is refused: :meth:`pool_stack` applies it.
        """
        self._check_layer(layer, "apply_ln_to_stack", mlp_input)
        final = layer in (None, -1, self.model.cfg.n_layers)
        scale_name = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        if not final and scale_name in self.cache_dict:
            check_ln_scale_per_token(scale_name, self.cache_dict[scale_name], self.has_batch_dim)
        if final:
            self._check_final_ln_per_token(layer)
        if recompute_ln and final:
            from vit_lens.model._transformer_lens import Slice

            if has_batch_dim:
                residual_stack = Slice(batch_slice).apply(residual_stack, dim=1)
            return normalise(residual_stack, self.model.cfg.eps)
        return super().apply_ln_to_stack(
            residual_stack, layer, mlp_input=mlp_input, pos_slice=pos_slice, batch_slice=batch_slice,
            has_batch_dim=has_batch_dim,
        )

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: Any = None, mlp_input: bool = False, return_labels: bool = False):
        """TransformerLens's ``accumulated_resid``: the residual stream at every block boundary up to ``layer``.

        ``apply_ln=True`` normalises the states without the LayerNorm's weight and bias (those
        are in ``model.W_U`` / ``model.b_U`` for the final one), as transformer-lens 4 does on a
        folded model:

        * up to the output (``layer`` None, -1 or ``n_layers``): each state with its own mean and
          scale, the logit lens: ``model.unembed(cache.accumulated_resid(apply_ln=True,
          pos_slice=0))`` reads each state out as if the blocks after it were skipped, and its
          last entry is the output of a CLS-pooled model. Average-pooled models and final
          LayerNorms after pooling: ``model.unembed(cache.pool_stack(cache.accumulated_resid(),
          recompute_ln=True))``.
        * up to block ``layer``: every state with that block's cached ``ln1`` scale (``ln2`` with
          ``mlp_input``), as TransformerLens does.

        ARENA's and ViT-Prisma's recipe, ``cache.apply_ln_to_stack(cache.accumulated_resid(
        pos_slice=0), pos_slice=0)``, divides every state by the *final* state's cached scale
        instead: its last entry is the same, and each earlier entry is the sum of the direct
        contributions written before that layer, so consecutive differences are the layers'
        direct logit attributions (:meth:`logit_attrs` of :meth:`decompose_resid`).
        """
        self._check_layer(layer, "accumulated_resid", mlp_input)
        components, labels = super().accumulated_resid(
            layer, incl_mid=incl_mid, apply_ln=False, pos_slice=pos_slice, mlp_input=mlp_input, return_labels=True,
        )
        if apply_ln:
            final = layer in (None, -1, self.model.cfg.n_layers)
            components = self.apply_ln_to_stack(
                components, None if final else layer, mlp_input=mlp_input, pos_slice=pos_slice,
                has_batch_dim=self.has_batch_dim, recompute_ln=final,
            )
        return (components, labels) if return_labels else components

    def pool_stack(self, residual_stack: Float[Tensor, "... pos d_model"], apply_ln: bool = True,
                   recompute_ln: bool = False) -> Float[Tensor, "... d_model"]:
        """Pool a stack of residual-stream terms as the readout does, through the final LayerNorm's normalisation.

        The terms of the normalised pooled vector that ``model.W_U`` reads, so
        ``pool_stack(cache.decompose_resid()).sum(0) @ model.W_U + model.b_U`` is the output, for
        every placement of the final LayerNorm. CLS pooling reads position 0, average pooling
        the mean over the pooled tokens. The final LayerNorm acts where the model applies it: on
        each token before pooling (CLIP's ``ln_post``, timm's ``norm``: each token's cached
        scale) or on the pooled vector (timm's ``fc_norm``, open_clip's ``final_ln_after_pool``:
        the pooled vector's cached scale). Each term is centred and divided, as in
        :meth:`apply_ln_to_stack`; the bias is in ``model.b_U``.

        Args:
            residual_stack: ``[component, batch, pos, d_model]`` with every position (no
                ``pos_slice``), e.g. from :meth:`decompose_resid`, :meth:`stack_head_results` or
                :meth:`accumulated_resid`.
            apply_ln: Apply the final LayerNorm's normalisation (nothing to apply where the model
                has none).
            recompute_ln: Normalise each term with its own statistics instead of the cached scale:
                the logit lens of :meth:`accumulated_resid` states.

        Returns:
            ``[component, batch, d_model]``.

        Raises:
            ValueError: For attention, max and distilled (two-token) pooling, which are not linear
                in the residual stream; :func:`vit_lens.intervene.decompose.direct_contributions`
                decomposes those readouts.
        """
        cfg = self.model.cfg
        check_poolable(self.model)
        n_pos = cfg.n_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        if residual_stack.ndim < 2 or residual_stack.shape[-2] != n_pos:
            raise ValueError(
                f"pool_stack takes terms at every position ([..., {n_pos}, {cfg.d_model}] for these images), got shape "
                f"{tuple(residual_stack.shape)}; build the stack without pos_slice."
            )
        normalised = apply_ln and cfg.final_norm != "none"
        if normalised and cfg.final_norm == "pre_pool":
            residual_stack = self._final_normalisation(residual_stack, recompute_ln)
        pooled = residual_stack[..., pooling_slice(self.model, n_pos), :].mean(dim=-2)
        if normalised and cfg.final_norm == "post_pool":
            pooled = self._final_normalisation(pooled, recompute_ln)
        return pooled

    def logit_lens(self, incl_mid: bool = False, return_labels: bool = False, **kwargs: Any):
        """The logit lens: every block boundary's residual stream read out as the model reads out its last one.

        ``model.unembed(cache.pool_stack(cache.accumulated_resid(incl_mid=incl_mid), recompute_ln=True))``:
        each state pooled as the model pools, normalised with its own statistics by the final
        LayerNorm and projected by ``W_U`` / ``b_U``, as if the blocks after it were skipped. The
        last entry is the model's output. (For a CLS-pooled model this is
        ``model.unembed(cache.accumulated_resid(apply_ln=True, pos_slice=0))``.)

        Args:
            incl_mid: Also read out ``resid_mid`` of every block.
            return_labels: Also return the states' labels (``"0_pre"``, ..., ``"final_post"``).
            **kwargs: transformer-lens 4's ``logit_lens`` options (``top_k``, ``targets``, ...) rank a
                vocabulary and are refused; rank classes or texts from the returned readouts.

        Returns:
            ``[n_states, batch, d_out]`` (and the labels).
        """
        if kwargs:
            raise TypeError(
                f"VisionActivationCache.logit_lens takes incl_mid and return_labels, not {sorted(kwargs)}: "
                "transformer-lens's options rank a vocabulary. It returns the readouts [state, batch, d_out]; rank "
                "classes from them (lens.argmax(-1)) or texts (lens @ text_embeds.T)."
            )
        states, labels = self.accumulated_resid(incl_mid=incl_mid, return_labels=True)
        readouts = self.model.unembed(self.pool_stack(states, recompute_ln=True))
        return (readouts, labels) if return_labels else readouts

    def _final_normalisation(self, stack: Tensor, recompute_ln: bool) -> Tensor:
        if recompute_ln:
            return normalise(stack, self.model.cfg.eps)
        return (stack - stack.mean(-1, keepdim=True)) / self["ln_final.hook_scale"]

    def logit_attrs(self, residual_stack: Float[Tensor, "... d_model"],
                    tokens: Any = None, incorrect_tokens: Any = None,  # checked by the model, with directed messages
                    pos_slice: Any = None, batch_slice: Any = None, has_batch_dim: bool = True, *,
                    directions: Float[Tensor, "*batch d_model"] | None = None,
                    pool: bool = False) -> Float[Tensor, "..."]:
        """Direct logit attribution, as TransformerLens's ``logit_attrs``: each term's share of an output entry.

        Each term of ``residual_stack`` goes through the final LayerNorm with its cached scale
        (:meth:`apply_ln_to_stack`, or :meth:`pool_stack` with ``pool=True``) and is dotted with
        the residual direction of its target (``model.tokens_to_residual_directions``). Summed
        over a complete stack (:meth:`decompose_resid`, :meth:`get_full_resid_decomposition`) and
        added to the bias ``model.b_U[tokens]`` (``model.b_U @ t`` for an output-space vector
        ``t``), the attributions give the output entry exactly.

        For a CLIP tower the targets are text embeddings (``model.tokens_to_residual_directions(
        text_embeds)``, or ``clip.tokens_to_residual_directions(prompts)``): the attributions then
        sum to ``image_embed @ t``; the zero-shot logit is that times ``clip.logit_scale.exp() /
        image_embed.norm()`` (plus ``clip.logit_bias`` for SigLIP).

        Args:
            residual_stack: ``[component, batch, (pos,) d_model]``.
            tokens: Targets: class indices of a classifier (an int, ``[batch]`` or ``[batch,
                pos]``) or output-space vectors ``[batch, d_out]`` / ``[d_out]``.
            incorrect_tokens: Attribute the difference ``tokens - incorrect_tokens`` (same shape).
            pos_slice, batch_slice, has_batch_dim: As TransformerLens's; ``pos_slice=0`` reads the
                CLS token of a CLS-pooled model.
            directions: Residual-space directions ``[batch, d_model]`` or ``[d_model]`` in place
                of ``tokens``.
            pool: Pool the stack as the readout does (:meth:`pool_stack`; ``residual_stack`` then
                holds every position, and ``pos_slice`` / ``batch_slice`` are not taken). Needed
                for average pooling and for a final LayerNorm after pooling.

        Returns:
            ``[component, batch]`` (``[component, batch, pos]`` for a stack with positions).

        Raises:
            ValueError: For readouts with no ``W_U`` (an attention pool, a distilled DeiT's two
                heads, max pooling): :func:`vit_lens.intervene.decompose.direct_contributions`
                attributes through those.
        """
        model = self.model
        check_affine_readout(model, "direct logit attribution")
        if (tokens is None) == (directions is None):
            raise TypeError("logit_attrs takes the targets as tokens= or as residual-space directions=, exactly one")
        if directions is None:
            directions = model.tokens_to_residual_directions(tokens)
            if incorrect_tokens is not None:
                incorrect = model.tokens_to_residual_directions(incorrect_tokens)
                if incorrect.shape != directions.shape:
                    raise ValueError(
                        f"tokens and incorrect_tokens must have the same shape, got directions of shape "
                        f"{tuple(directions.shape)} and {tuple(incorrect.shape)}"
                    )
                directions = directions - incorrect
        elif incorrect_tokens is not None:
            raise TypeError("incorrect_tokens goes with tokens=; with directions=, pass the difference of directions")
        if pool:
            if pos_slice is not None or batch_slice is not None:
                raise ValueError("logit_attrs(pool=True) pools every position itself; drop pos_slice and batch_slice")
            scaled = self.pool_stack(residual_stack)
        elif model.cfg.final_norm == "none":
            from vit_lens.model._transformer_lens import Slice

            scaled = Slice(batch_slice).apply(residual_stack, dim=1) if has_batch_dim else residual_stack
        else:
            scaled = self.apply_ln_to_stack(
                residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim,
            )
        directions = directions.to(scaled)
        if scaled.ndim == 4 and directions.ndim == 2 and directions.shape[0] == scaled.shape[1]:
            directions = directions[:, None]  # one target per image, shared by its positions
        return (scaled * directions).sum(dim=-1)

    def stack_neuron_results(self, *args: Any, **kwargs: Any):
        """TransformerLens's per-neuron stack (``hook_post * W_out``); refused where that is not the MLP's output."""
        layer = args[0] if args else kwargs.get("layer")
        self._check_layer(layer, "stack_neuron_results", kwargs.get("mlp_input", False))
        self._check_neurons_are_post_times_w_out()
        return super().stack_neuron_results(*args, **kwargs)

    def _check_neurons_are_post_times_w_out(self) -> None:
        if getattr(self.model.cfg, "mlp_norm", False):
            raise ValueError(
                f"{self.model.cfg.model_name} normalises its hidden units before W_out (an MLP LayerNorm, as EVA02), "
                "so hook_post @ W_out is not the MLP's output and TransformerLens's per-neuron stack would be wrong. "
                "Use vit_lens.intervene.decompose.direct_contributions(model, images, level='neuron'), which reads "
                "mlp.ln_hidden.hook_normalized, or expand_neurons=False."
            )

    def _check_final_ln_per_token(self, layer: int | None) -> None:
        cfg = self.model.cfg
        if layer not in (None, -1, cfg.n_layers):
            return
        if cfg.final_norm == "post_pool":
            raise ValueError(
                f"{cfg.model_name}'s final LayerNorm acts on the pooled vector ({cfg.pool_type} pooling, then "
                "ln_final), so it cannot be applied to each token's residual. Pool the terms first: "
                "cache.pool_stack(stack) (or cache.logit_attrs(stack, ..., pool=True)) pools them and applies the "
                "pooled vector's cached scale; or use apply_ln=False, or apply_ln at an earlier layer."
            )
        if cfg.final_norm == "none":
            raise ValueError(f"{cfg.model_name} has no final LayerNorm to apply; use apply_ln=False.")

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> "VisionActivationCache":
        """TransformerLens's batch slicing, keeping the vision cache type."""
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        return VisionActivationCache(
            sliced.cache_dict, self.model, has_batch_dim=sliced.has_batch_dim, grid_size=self.grid_size
        )
