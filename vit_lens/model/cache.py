"""VisionActivationCache: TransformerLens's ActivationCache, aware of prefix tokens and the patch grid."""

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import ActivationCache

from vit_lens.model.hook_layout import hook_axes


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
      final norm cannot be applied per token: ``apply_ln`` at the final layer raises and says so.

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
        from transformer_lens.utilities import get_act_name

        if not isinstance(key, tuple):
            return get_act_name(key)
        if len(key) > 1 and isinstance(key[1], int) and key[1] < 0:
            key = (key[0], self.model.cfg.n_layers + key[1], *key[2:])
        return get_act_name(*key)

    # ------------------------------------------------------------------ decompositions with ln_pre

    def _embed_term(self, pos_slice: Any) -> Float[Tensor, "1 *batch_and_pos d_model"]:
        from transformer_lens.utilities import Slice

        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        return pos_slice.apply(self["blocks.0.hook_resid_pre"], dim=-2)[None]

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: Any = None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """TransformerLens's ``decompose_resid``; with ``ln_pre`` the first term is ``ln_pre``'s output."""
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
        """TransformerLens's ``apply_ln_to_stack``; refuses a final LayerNorm that acts after pooling."""
        if not recompute_ln:
            self._check_final_ln_per_token(layer)
        return super().apply_ln_to_stack(
            residual_stack, layer, mlp_input=mlp_input, pos_slice=pos_slice, batch_slice=batch_slice,
            has_batch_dim=has_batch_dim, recompute_ln=recompute_ln,
        )

    def stack_neuron_results(self, *args: Any, **kwargs: Any):
        """TransformerLens's per-neuron stack (``hook_post * W_out``); refused where that is not the MLP's output."""
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
                "ln_final), so it cannot be applied to each token's residual. Use apply_ln=False and pool the "
                "components yourself, or apply_ln at an earlier layer."
            )
        if cfg.final_norm == "none":
            raise ValueError(f"{cfg.model_name} has no final LayerNorm to apply; use apply_ln=False.")

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> "VisionActivationCache":
        """TransformerLens's batch slicing, keeping the vision cache type."""
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        return VisionActivationCache(
            sliced.cache_dict, self.model, has_batch_dim=sliced.has_batch_dim, grid_size=self.grid_size
        )
