"""HookedViT: a vision transformer with a TransformerLens hook point on every activation."""

import functools
import numbers
import threading
from contextlib import ExitStack, contextmanager
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from vit_lens.model._transformer_lens import FactoredMatrix, HookPoint, HookedRootModule
from vit_lens.model.hook_checks import (
    CheckedHook,
    InPlaceEditGuard,
    check_hook_signature,
    describe,
    hook_pairs,
    unknown_hook_error,
)
from vit_lens.model.cache import VisionActivationCache
from vit_lens.model.cache_hooks import caching_hooks
from vit_lens.model.compile import guard_hook_edits
from vit_lens.model.components import AttentionPool, Embed, Head, LayerNorm, Pool, PosEmbed, TransformerBlock
from vit_lens.model.components.block import EDGE_HOOKS
from vit_lens.model.components._hooks import is_hooked
from vit_lens.model.config import ViTConfig

# fwd_hooks / bwd_hooks: TransformerLens's list of (name or name filter, fn) pairs, or a dict {name: fn}.
HookList = Sequence[tuple[str | Callable[[str], bool], Callable]] | Mapping[str | Callable[[str], bool], Callable]
# What forward, run_with_hooks and run_with_cache return (TransformerLens's ``return_type``).
RETURN_TYPES = ("logits", "embed", "pooled", None)
# Text-model return types that have no meaning for images; refused with a pointer to "logits".
_TEXT_RETURN_TYPES = ("loss", "both", "predictions", "str")


def _one_run_at_a_time(forward: Callable) -> Callable:
    """``forward`` holding the model's run lock, so that it never runs under another thread's temporary hooks."""

    @functools.wraps(forward)
    def locked(self, *args: Any, **kwargs: Any) -> Any:
        with self._run_lock:
            return forward(self, *args, **kwargs)

    return locked


class HookedViT(HookedRootModule):
    """A vision transformer re-implemented with TransformerLens hook points.

    Build one from a source model (``from_open_clip``, ``from_timm``, ``from_pretrained``) or
    from a :class:`ViTConfig`. The forward pass takes ``[batch, channels, height, width]`` float
    images (already preprocessed) and returns the CLIP image embedding, the classifier logits,
    or the pooled representation, whichever the source model returns.

    Hook points (``model.hook_dict`` lists them all):

    ========================================  ==============================================
    ``hook_embed``                            [batch, pos, d_model] patch, CLS, register rows
    ``hook_pos_embed``                        [batch, pos, d_model] (zero rows where none)
    ``ln_pre.hook_scale/hook_normalized``     CLIP only; the residual stream starts after it
    ``blocks.{l}.hook_resid_pre/mid/post``    [batch, pos, d_model]
    ``blocks.{l}.ln1/ln2.hook_scale``         [batch, pos, 1]
    ``blocks.{l}.ln1/ln2.hook_normalized``    [batch, pos, d_model]
    ``blocks.{l}.hook_q/k/v_input``           [batch, pos, head, d_model] (set_use_split_qkv_input)
    ``blocks.{l}.hook_attn_in``               [batch, pos, head, d_model] (set_use_attn_in)
    ``blocks.{l}.hook_mlp_in``                [batch, pos, d_model] (set_use_hook_mlp_in)
    ``blocks.{l}.attn.hook_q/k/v/z``          [batch, pos, head, d_head]
    ``blocks.{l}.attn.hook_rot_q/rot_k``      [batch, pos, head, d_head] (rotary models)
    ``blocks.{l}.attn.ln_z.*``                sub-LayerNorm on z (EVA-CLIP)
    ``blocks.{l}.attn.hook_attn_scores``      [batch, head, query, key] (scaled, pre-softmax)
    ``blocks.{l}.attn.hook_pattern``          [batch, head, query, key]
    ``blocks.{l}.attn.hook_result``           [batch, pos, head, d_model] (only when hooked)
    ``blocks.{l}.hook_attn_out/mlp_out``      [batch, pos, d_model] (LayerScale included)
    ``blocks.{l}.mlp.hook_pre/hook_post``     [batch, pos, d_mlp]
    ``blocks.{l}.mlp.hook_pre_linear``        [batch, pos, d_mlp] (gated MLPs: the linear branch)
    ``blocks.{l}.mlp.ln_hidden.*``            sub-LayerNorm on the hidden units (EVA02)
    ``ln_final.hook_scale/hook_normalized``   per token, or on the pooled vector (post-pool)
    ``attn_pool.hook_pattern`` and friends      SigLIP-style attention pooling (see AttentionPool)
    ``hook_pooled``                           [batch, d_model] ([batch, 2, d_model] for DeiT)
    ``hook_image_embed``                      [batch, d_proj] after a CLIP projection
    ``hook_logits``                           [batch, n_classes] after a classifier head
    ========================================  ==============================================

    Every hook may observe its tensor (return None) or replace it (return a tensor of the same
    shape); a replacement always flows into the rest of the computation.

    The edge hooks (``hook_q/k/v_input``, ``hook_attn_in``, ``hook_mlp_in``) are TransformerLens's,
    off by default: they exist only after their setter (or with the flag on in the config), are
    copies of the residual stream that only one reader sees (one head's queries, keys or values;
    the MLP), and leave the output unchanged. With them, ``ln1``'s hooks act on each per-head
    copy: ``[batch, pos, head, 1]`` / ``[batch, pos, head, d_model]``.

    Positions (``cfg.n_ctx`` of them at ``cfg.image_size``): CLS (if any) at 0, then the
    distillation token and registers, then the patches in raster order;
    :meth:`token_labels` names them for plot axes.

    Example:
        >>> import torch, vit_lens
        >>> cfg = vit_lens.ViTConfig(d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64,
        ...                          patch_size=8, image_size=32, ln_pre=True, d_proj=16)
        >>> model = vit_lens.HookedViT(cfg).init_weights(seed=0)
        >>> embed, cache = model.run_with_cache(torch.randn(2, 3, 32, 32))
        >>> tuple(cache["pattern", 1].shape)
        (2, 4, 17, 17)
    """

    def __init__(self, cfg: ViTConfig | dict):
        super().__init__()
        self._run_lock = threading.RLock()
        cfg = ViTConfig(**cfg) if isinstance(cfg, dict) else cfg
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.pos_embed = PosEmbed(cfg)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        self.ln_pre = LayerNorm(cfg.d_model, cfg.eps) if cfg.ln_pre else None
        if cfg.rotary != "none":
            # [sin | cos] per patch, [n_patches, 2 * d_head], taken from the source model
            self.register_buffer("rotary_sin_cos", torch.zeros(cfg.n_patches, 2 * cfg.d_head))
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = LayerNorm(cfg.d_model, cfg.eps) if cfg.final_norm != "none" else None
        self.pool = Pool(cfg)
        if cfg.pool_type == "map":
            self.attn_pool = AttentionPool(cfg)
        self.hook_pooled = HookPoint()  # [batch, d_model], or [batch, 2, d_model] for token_dist
        if cfg.d_proj is not None:
            self.W_proj = nn.Parameter(torch.empty(cfg.d_model, cfg.d_proj))
            if cfg.proj_bias:
                self.b_proj = nn.Parameter(torch.zeros(cfg.d_proj))
            self.hook_image_embed = HookPoint()  # [batch, d_proj]
        elif cfg.n_classes:
            self.head = Head(cfg)
            self.hook_logits = HookPoint()  # [batch, n_classes]
        self.setup()
        self.cfg.device = self.embed.W_E.device

    def __getstate__(self) -> dict[str, Any]:
        """Pickle and ``copy.deepcopy`` support: a lock cannot be copied, so a copy gets its own."""
        state = super().__getstate__()
        state.pop("_run_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._run_lock = threading.RLock()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "HookedViT":
        """``nn.Module._apply`` (behind ``to``, ``cuda``, ``half``, ...), keeping ``cfg.device`` where the weights are."""
        module = super()._apply(fn, *args, **kwargs)
        self.cfg.device = self.embed.W_E.device
        return module

    # ------------------------------------------------------------------ TransformerLens's hook flags

    def set_use_attn_result(self, use_attn_result: Any) -> None:  # a bool, checked with a directed message
        """Whether ``run_with_cache`` with no ``names_filter`` caches ``attn.hook_result`` (``cfg.use_attn_result``).

        ``attn.hook_result`` [batch, pos, head, d_model] always exists and is computed whenever a
        hook is attached to it; this only changes what a default cache holds (it is large).
        """
        self.cfg.use_attn_result = _flag_value(use_attn_result, "set_use_attn_result")

    def set_use_split_qkv_input(self, use_split_qkv_input: Any) -> None:  # a bool, checked with a directed message
        """Add (True) or remove (False) ``blocks.{l}.hook_q_input`` / ``hook_k_input`` / ``hook_v_input``.

        Each is ``[batch, pos, head, d_model]``: a per-head copy of ``hook_resid_pre`` that only
        that head's queries (keys, values) read, through ``ln1``, so that editing head ``h``'s row
        changes head ``h``'s queries (keys, values) and nothing else: the receiving end of an edge
        in path patching and edge attribution. The output is unchanged; q, k and v are computed
        per head instead of in one fused product (slower). Excludes :meth:`set_use_attn_in`.

        Example:
            >>> model.set_use_split_qkv_input(True)  # doctest: +SKIP
            >>> model.run_with_hooks(images, fwd_hooks=[("blocks.3.hook_k_input", edit_head_5)])  # doctest: +SKIP
        """
        self._set_edge_flag("use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: Any) -> None:  # a bool, checked with a directed message
        """Add (True) or remove (False) ``blocks.{l}.hook_attn_in`` [batch, pos, head, d_model].

        A per-head copy of ``hook_resid_pre`` that head's queries, keys and values all read
        (through ``ln1``). The output is unchanged. Excludes :meth:`set_use_split_qkv_input`.
        """
        self._set_edge_flag("use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: Any) -> None:  # a bool, checked with a directed message
        """Add (True) or remove (False) ``blocks.{l}.hook_mlp_in`` [batch, pos, d_model].

        A copy of ``hook_resid_mid`` that only the MLP reads (through ``ln2``): editing it changes
        the MLP's input, not the residual stream. The output is unchanged.
        """
        self._set_edge_flag("use_hook_mlp_in", use_hook_mlp_in)

    def _set_edge_flag(self, flag: str, on: Any) -> None:
        """Set ``cfg.<flag>``, add or remove its hook points in every block, and rebuild ``hook_dict``."""
        on = _flag_value(on, f"set_{flag}")
        exclusive = {"use_split_qkv_input": "use_attn_in", "use_attn_in": "use_split_qkv_input"}.get(flag)
        if on and exclusive and getattr(self.cfg, exclusive):
            raise ValueError(
                f"{flag} and {exclusive} cannot both be on (TransformerLens refuses it too): both give each head its "
                f"own copy of the attention input. Call model.set_{exclusive}(False) before model.set_{flag}(True)."
            )
        with self._run_lock:  # never while a run is in flight
            if not on:
                leaves = EDGE_HOOKS[flag]
                attached = [name for name, point in self.hook_dict.items()
                            if name.rpartition(".")[2] in leaves and is_hooked(point)]
                if attached:
                    raise RuntimeError(
                        f"Cannot turn {flag} off while hooks are attached to {attached}: removing the hook points "
                        "would drop their edits. Remove the hooks first (model.reset_hooks(including_permanent=True))."
                    )
            for block in self.blocks:
                block.set_edge_hooks(flag, on)
            setattr(self.cfg, flag, on)
            self.setup()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_open_clip(cls, model: nn.Module, *, dynamic_img_size: bool | None = None) -> "HookedViT":
        """Convert an open_clip CLIP model (or its ``.visual``) with the same weights.

        Args:
            model: An ``open_clip`` ``CLIP``/``CustomTextCLIP`` or its ``.visual``: a
                ``VisionTransformer``, or a ``TimmModel`` with a timm ViT / EVA trunk (EVA-CLIP,
                SigLIP, SigLIP2).
            dynamic_img_size: Accept other image sizes by resampling the position embeddings.
                Default: as the source (open_clip takes only its own size).
        """
        from vit_lens.loading.open_clip import convert_open_clip_visual

        cfg, state_dict = convert_open_clip_visual(model, dynamic_img_size=dynamic_img_size)
        return cls._from_converted(cfg, state_dict)

    @classmethod
    def from_timm(cls, model: nn.Module, *, dynamic_img_size: bool | None = None) -> "HookedViT":
        """Convert a timm ViT (ViT, DeiT, DeiT distilled, DINOv2, SigLIP, EVA / EVA02) with the same weights.

        Args:
            model: A timm ``VisionTransformer``, ``VisionTransformerDistilled`` or ``Eva``.
            dynamic_img_size: Accept other image sizes. Default: the model's own setting.
        """
        from vit_lens.loading.timm import convert_timm

        cfg, state_dict = convert_timm(model, dynamic_img_size=dynamic_img_size)
        return cls._from_converted(cfg, state_dict)

    @classmethod
    def from_hf(cls, model: nn.Module) -> "HookedViT":
        """Convert a Hugging Face transformers vision model with the same weights.

        Supported: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` and ``CLIPModel`` (image
        tower and projection), ``ViTModel`` (built with ``add_pooling_layer=False``),
        ``ViTForImageClassification`` (your fine-tunes), ``Dinov2Model``,
        ``Dinov2WithRegistersModel``, ``SiglipVisionModel`` and ``SiglipModel`` (image tower).
        The output is the source's: ``image_embeds`` with a projection, ``logits`` with a
        classifier, otherwise ``pooler_output``.

        Example:
            >>> import transformers, vit_lens
            >>> config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            ...                                 intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
            >>> source = transformers.ViTForImageClassification(config).eval()
            >>> model = vit_lens.HookedViT.from_hf(source)
            >>> model.cfg.n_classes, model.cfg.n_ctx
            (3, 17)
        """
        from vit_lens.loading.hf import convert_hf_vision

        cfg, state_dict = convert_hf_vision(model)
        return cls._from_converted(cfg, state_dict)

    @classmethod
    def from_pretrained(cls, name: Any, pretrained: str | bool | None = None, **kwargs: Any) -> "HookedViT":
        """Build the source model by name through its library, then convert it.

        Args:
            name: ``"open_clip:<arch>"`` (e.g. ``"open_clip:ViT-B-16"``), ``"open_clip:hf-hub:<repo>"``
                or ``"timm:<name>"`` (e.g. ``"timm:deit_small_patch16_224"``).
            pretrained: For open_clip, a pretrained tag (``"laion2b_s34b_b88k"``) or a checkpoint
                path; for timm, True/False, a pretrained tag or a checkpoint path. None gives
                random weights. A download that cannot succeed (offline, hub unreachable) raises
                ``HubUnavailableError`` at once, naming the file.
            **kwargs: ``resample_pos_embed=True`` accepts a checkpoint trained on another patch
                grid (its position embeddings are resampled; refused by default, since that
                changes the model); TransformerLens's ``fold_ln``, ``center_writing_weights``,
                ``center_unembed``, ``fold_value_biases`` and ``refactor_factored_attn_matrices``
                process the converted weights (:meth:`process_weights_`; unlike TransformerLens,
                nothing is processed unless asked); the rest go to ``open_clip.create_model`` or
                ``timm.create_model``.
        """
        from vit_lens.loading import load_source_model
        from vit_lens.model.weight_processing import pop_processing_args

        processing = pop_processing_args(kwargs)
        source_kind, source = load_source_model(name, pretrained, **kwargs)
        model = cls.from_open_clip(source) if source_kind == "open_clip" else cls.from_timm(source)
        return model.process_weights_(**processing) if processing else model

    @classmethod
    def _from_converted(cls, cfg: ViTConfig, state_dict: dict[str, Tensor]) -> "HookedViT":
        reference = next(iter(state_dict.values()))
        model = cls(cfg).to(device=reference.device, dtype=reference.dtype)
        model.load_state_dict(state_dict, strict=True)
        return model.eval()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "HookedViT":
        """Random weights at a scale where attention is far from uniform; for toy models and tests.

        Matrices get ``N(0, 1/fan_in)``, position embeddings ``N(0, 1)``, LayerNorm weights
        ``1 + N(0, 0.1)``, other vectors ``N(0, 0.1)``.
        """
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if self.cfg.rotary != "none":
            angles = 6.283185307179586 * torch.rand(self.cfg.n_patches, self.cfg.d_head // 2, generator=generator)
            pairs = angles.repeat_interleave(2, dim=-1) if self.cfg.rotary == "interleaved" else angles.repeat(1, 2)
            self.rotary_sin_cos.copy_(torch.cat([pairs.sin(), pairs.cos()], dim=-1))
        for name, param in self.named_parameters():
            noise = torch.randn(param.shape, generator=generator).to(param)
            if name.endswith(".w"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("W_pos"):
                param.copy_(noise)
            elif name.endswith("W_E"):
                param.copy_(noise * param[0].numel() ** -0.5)
            elif param.ndim >= 2:
                fan_in = param.shape[-2] * (param.shape[0] if name.endswith("W_O") else 1)
                param.copy_(noise * fan_in**-0.5)
            else:
                param.copy_(0.1 * noise)
        return self

    # ------------------------------------------------------------------ forward

    @_one_run_at_a_time
    def forward(
        self,
        images: Any = None,  # validated below with directed messages, as are the keywords
        *,
        stop_at_layer: Any = None,
        return_type: Any = "logits",
        input: Any = None,
        tokens: Any = None,
    ) -> Float[Tensor, "batch *out"] | None:
        """Run the tower.

        Args:
            images: ``[batch, channels, height, width]`` float images, preprocessed as the source
                model expects.
            stop_at_layer: If given, return the residual stream ``[batch, pos, d_model]`` entering
                block ``stop_at_layer`` (negative counts from the end) and skip the rest.
            return_type: What to return (every hook fires whatever is chosen):

                * ``"logits"`` (default): the model's output, what its readout produces: the
                  logits ``[batch, n_classes]`` of a classifier, the image embedding
                  ``[batch, d_proj]`` of a CLIP tower (zero-shot logits need texts: see
                  :class:`~vit_lens.HookedCLIP`), or the pooled representation of a backbone.
                * ``"embed"``: the image embedding ``[batch, d_proj]`` (models with a projection).
                * ``"pooled"``: the pooled representation ``[batch, d_model]`` before any projection or
                  head (``hook_pooled``; after the final LayerNorm where the model has one).
                * None: nothing (run for the hooks only).

                TransformerLens's ``"loss"``, ``"both"`` and ``"predictions"`` refer to next-token
                prediction and are refused.
            input: TransformerLens's name for the first argument; the images.
            tokens: Refused with a directed message: images are not token ids.

        Returns:
            What ``return_type`` asks for.
        """
        if torch.compiler.is_compiling():
            guard_hook_edits()  # without it, a hook edited after compilation is silently ignored
        images = _images_argument(images, input, tokens, "HookedViT")
        self._check_images(images)
        check_return_type(return_type, self.cfg)
        stop = self._check_stop_at_layer(stop_at_layer)
        grid = (images.shape[-2] // self.cfg.patch_size[0], images.shape[-1] // self.cfg.patch_size[1])
        tokens = self.hook_embed(self.embed(images))
        pos = self.pos_embed(grid).unsqueeze(0)
        # A hook may edit its tensor in place; an expanded view would alias every batch row.
        pos = pos.repeat(len(images), 1, 1) if is_hooked(self.hook_pos_embed) else pos.expand(len(images), -1, -1)
        resid = tokens + self.hook_pos_embed(pos)
        if self.ln_pre is not None:
            resid = self.ln_pre(resid)
        rotary = self.rotary_sin_cos if self.cfg.rotary != "none" else None
        for block in self.blocks[:stop]:
            resid = block(resid, rotary)
        if stop is not None:
            return resid
        return self._readout(resid, return_type)

    def _pool(self, tokens: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch *pooled d_model"]:
        if self.cfg.pool_type == "map":
            return self.attn_pool(tokens[:, 0 if self.cfg.pool_include_prefix else self.cfg.n_prefix_tokens :])
        return self.pool(tokens)

    def _readout(
        self, resid: Float[Tensor, "batch pos d_model"], return_type: str | None = "logits"
    ) -> Float[Tensor, "batch *out"] | None:
        if self.cfg.final_norm == "pre_pool":
            pooled = self._pool(self.ln_final(resid))
        elif self.cfg.final_norm == "post_pool":
            pooled = self.ln_final(self._pool(resid))
        else:
            pooled = self._pool(resid)
        pooled = self.hook_pooled(pooled)
        if self.cfg.d_proj is not None:
            embed = torch.matmul(pooled, self.W_proj)
            output = self.hook_image_embed(embed + self.b_proj if self.cfg.proj_bias else embed)
        elif self.cfg.n_classes:
            output = self.hook_logits(self.head(pooled))
        elif self.cfg.pool_type == "token_dist":
            output = pooled.mean(dim=1)
        else:
            output = pooled
        if return_type == "pooled":
            return pooled
        return None if return_type is None else output

    def _check_images(self, images: Any) -> None:
        cfg = self.cfg
        expected = f"[batch, {cfg.in_channels}, height, width]"
        if not isinstance(images, Tensor):
            raise TypeError(
                f"HookedViT takes images as a torch.Tensor {expected}, got {type(images).__name__}. "
                "Preprocess PIL images (for CLIP: HookedCLIP.preprocess) and torch.stack them."
            )
        if images.ndim == 3:
            raise ValueError(
                f"HookedViT takes a batch {expected}, got one image of shape {tuple(images.shape)}; "
                "add a batch axis with images.unsqueeze(0)."
            )
        if images.ndim != 4:
            raise ValueError(f"HookedViT takes images {expected}, got a {images.ndim}-d tensor {tuple(images.shape)}.")
        if images.shape[0] == 0:
            raise ValueError(
                f"HookedViT got an empty batch, shape {tuple(images.shape)}; pass at least one image "
                f"{expected} (skip the call for an empty batch)."
            )
        if images.shape[1] != cfg.in_channels:
            hint = " Channels-last? Use images.permute(0, 3, 1, 2)." if images.shape[-1] == cfg.in_channels else ""
            raise ValueError(
                f"HookedViT expects {cfg.in_channels} channels at axis 1, got shape {tuple(images.shape)}.{hint}"
            )
        if not images.is_floating_point():
            raise TypeError(
                f"HookedViT takes float images, got {images.dtype}. Scale to [0, 1] and normalise as the source "
                "model expects (for CLIP: HookedCLIP.preprocess) before calling the model."
            )
        weight = self.embed.W_E
        if images.dtype != weight.dtype or images.device != weight.device:
            raise TypeError(
                f"Images are {images.dtype} on {images.device} but the model is {weight.dtype} on {weight.device}; "
                "use images.to(model.embed.W_E) or move the model."
            )
        size = tuple(images.shape[-2:])
        if size != cfg.image_size:
            if not cfg.dynamic_img_size:
                raise ValueError(
                    f"{cfg.model_name} takes {cfg.image_size[0]}x{cfg.image_size[1]} images, got "
                    f"{size[0]}x{size[1]}. Resize the images, or convert with dynamic_img_size=True to "
                    "resample the position embeddings for other sizes."
                )
            if size[0] % cfg.patch_size[0] or size[1] % cfg.patch_size[1] or 0 in size:
                raise ValueError(
                    f"Image size {size[0]}x{size[1]} is not a positive multiple of the patch size "
                    f"{cfg.patch_size[0]}x{cfg.patch_size[1]}; resize or crop it to a multiple."
                )

    def _check_stop_at_layer(self, stop_at_layer: Any) -> int | None:
        if stop_at_layer is None:
            return None
        n = self.cfg.n_layers
        is_layer = isinstance(stop_at_layer, numbers.Integral) and not isinstance(stop_at_layer, bool)
        if not is_layer or not -n <= stop_at_layer <= n:
            what = f"{stop_at_layer!r}, a bool" if isinstance(stop_at_layer, bool) else repr(stop_at_layer)
            raise ValueError(
                f"stop_at_layer must be an int in [-{n}, {n}] (return the residual stream entering that block) "
                f"or None (run the whole tower), got {what}"
            )
        stop_at_layer = int(stop_at_layer)
        return stop_at_layer % n if stop_at_layer < 0 else stop_at_layer

    # ------------------------------------------------------------------ hooks and cache

    def add_hook(
        self,
        name: str | Callable[[str], bool],
        hook: Any,  # checked below, with a message that says what a hook must look like
        dir: Literal["fwd", "bwd"] = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Attach ``hook`` to the hook point ``name`` (or to every point a filter function accepts).

        Unlike the base class, an unknown name raises with the closest real names, a function
        that cannot be called as ``fn(activation, hook=hook_point)`` is refused here rather than
        mid-forward, and a returned tensor of the wrong shape raises instead of being lost.
        """
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        if isinstance(name, str):
            names = [self._resolve_hook_name(name)]
        elif callable(name):
            names = [n for n in self.hook_dict if name(n)]
        else:
            raise TypeError(f"A hook's name must be a hook point name or a filter function, got {type(name).__name__}")
        with self._run_lock:  # never while another thread's hooked run is in flight
            for hook_name in names:
                check_hook_signature(hook, hook_name)
                self.check_and_add_hook(
                    self.hook_dict[hook_name],
                    hook_name,
                    CheckedHook(hook, hook_name),
                    dir=dir,
                    is_permanent=is_permanent,
                    level=level,
                    prepend=prepend,
                )

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: Literal["fwd", "bwd", "both"] = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """TransformerLens's ``reset_hooks``, waiting for another thread's hooked run to finish first."""
        with self._run_lock:
            super().reset_hooks(clear_contexts, direction, including_permanent, level)

    def _resolve_hook_name(self, name: str) -> str:
        if name in self.hook_dict:
            return name
        raise unknown_hook_error(name, list(self.hook_dict), self.cfg.n_layers)

    @contextmanager
    def hooks(
        self,
        fwd_hooks: HookList | None = None,
        bwd_hooks: HookList | None = None,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ):
        """Context manager that adds temporary hooks and removes them on exit (nested contexts work).

        ``fwd_hooks`` / ``bwd_hooks``: a list of ``(name, fn)`` pairs (``name`` a hook point name or
        a filter function), or a dict ``{name: fn}``. The hooks added here are removed on exit
        (unless ``reset_hooks_end=False``) even when the body raises, including the hooks of
        re-entrant runs inside it whose own clean-up a RecursionError cut short.

        Threads: the context holds the model's run lock (re-entrant), and so does every forward
        pass, so a hooked run and a plain forward in another thread take turns: the other thread
        never runs under these temporary hooks, and a cache never receives another thread's
        activations. One lock per model is the simplest rule that is correct for every hook:
        thread-local hooks would still let one thread's hooks switch the other's forward onto the
        explicit attention and LayerNorm paths (which differ in the last bits). A hook may call
        the model again on the same thread. Hooks added with ``add_hook`` outside a context
        (``is_permanent=True`` or not) apply to every thread, as in TransformerLens. For parallel
        inference, give each thread its own model (``copy.deepcopy(model)``).

        Example:
            >>> with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: p * 0.5)]):
            ...     out = model(images)  # doctest: +SKIP
        """
        fwd_pairs, bwd_pairs = hook_pairs(fwd_hooks, "fwd_hooks"), hook_pairs(bwd_hooks, "bwd_hooks")
        with self._run_lock:
            level = self.context_level + 1
            self.context_level = level
            try:
                for name, hook in fwd_pairs:
                    self.add_hook(name, hook, dir="fwd", level=level)
                for name, hook in bwd_pairs:
                    self.add_hook(name, hook, dir="bwd", level=level)
                yield self
            except BaseException:
                if reset_hooks_end:
                    # Deep in re-entrant runs a RecursionError can interrupt the clean-up of the contexts
                    # opened inside this one; this frame has the stack to remove their hooks too.
                    self._remove_context_hooks(level, clear_contexts)
                raise
            else:
                if reset_hooks_end:
                    self.reset_hooks(clear_contexts, including_permanent=False, level=level)
            finally:
                self.context_level = level - 1

    def _remove_context_hooks(self, from_level: int, clear_contexts: bool) -> None:
        """Remove the temporary hooks of context ``from_level`` and of every context opened inside it."""
        levels = {
            handle.context_level
            for point in self.hook_dict.values()
            for handle in [*point.fwd_hooks, *point.bwd_hooks]
            if not handle.is_permanent and handle.context_level is not None and handle.context_level >= from_level
        }
        for level in sorted(levels, reverse=True):
            self.reset_hooks(False, including_permanent=False, level=level)
        if clear_contexts:
            self.clear_contexts()

    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: HookList | None = None,
        bwd_hooks: HookList | None = None,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ) -> Tensor | None:
        """Run the model with temporary hooks: ``fwd_hooks=[(name, fn), ...]`` with ``fn(activation, hook)``.

        ``model_args`` / ``model_kwargs`` go to :meth:`forward` (``return_type=`` included).

        Example:
            >>> def zero_head_3(z, hook):
            ...     z[:, :, 3] = 0.0
            ...     return z
            >>> out = model.run_with_hooks(images, fwd_hooks=[("blocks.5.attn.hook_z", zero_head_3)])  # doctest: +SKIP
        """
        _check_bwd_hooks_survive(bwd_hooks, reset_hooks_end)
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*model_args, **model_kwargs)

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: str | Sequence[str] | Callable[[str], bool] | None = None,
        fwd_hooks: HookList | None = None,
        bwd_hooks: HookList | None = None,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        metric: Callable[[Tensor], Tensor] | None = None,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        pos_slice: Any = None,
        **model_kwargs: Any,
    ) -> tuple[Tensor | None, VisionActivationCache]:
        """Run the model and cache activations, optionally while intervening with ``fwd_hooks``.

        ``model_args`` / ``model_kwargs`` go to :meth:`forward` (``input=``, ``return_type=``).

        Args:
            names_filter: Hook names (a string or a list) or a filter function. None caches every
                hook point except ``attn.hook_result`` (unless ``cfg.use_attn_result``): per-head
                results are derived from ``hook_z`` on demand by the cache. Models with a
                LayerNorm on z (``cfg.attn_norm``, EVA-CLIP) cache ``hook_result`` too, since
                it cannot be derived from ``hook_z`` alone. A name that is no hook point raises
                with the closest names, and so does a function that matches none; ``[]`` caches
                nothing.
            fwd_hooks, bwd_hooks: Interventions active during the run (``[(name, fn), ...]`` or
                ``{name: fn}``); the cache records the activations as edited, each where the
                edit happened: an in-place edit at a later point never rewrites an entry cached
                earlier (those that share memory with the edited tensor are copied first).
            incl_bwd: Also cache gradients (``<name>_grad``) of ``metric(output)`` (or of the
                output itself if it is a scalar). Needs autograd on and something to differentiate:
                parameters that require grad (loaded models do) or images that do.
            device: Where to keep the cache (``"cpu"`` offloads a GPU run); each activation moves
                there as it is recorded, so the model's device never holds the whole cache.
            pos_slice: The tokens to keep, cut as each activation is recorded: an int (``0``: CLS;
                the axis is kept), a slice or ``(start, stop[, step])``, a list / tensor of token
                indices, or a boolean mask with one entry per token. Attention scores and patterns
                keep the selected *query* rows with every key; hooks after pooling are kept whole.
                Bad selections raise (:mod:`vit_lens.model.cache_hooks`).
            remove_batch_dim, reset_hooks_end, clear_contexts: As in TransformerLens.

        Returns:
            ``(output, cache)`` where ``cache`` is a :class:`VisionActivationCache`.

        Example:
            >>> embed, cache = model.run_with_cache(images)  # doctest: +SKIP
            >>> cache["pattern", 3].shape  # [batch, head, query, key]  # doctest: +SKIP
        """
        return self._cache_run(
            self, model_args, model_kwargs, names_filter=names_filter, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks,
            device=device, remove_batch_dim=remove_batch_dim, incl_bwd=incl_bwd, metric=metric,
            reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts, pos_slice=pos_slice,
        )

    def run_with_saes(
        self, *model_args: Any, saes: Any, use_error_term: bool = False, **model_kwargs: Any
    ) -> Tensor | None:
        """Run the model with sparse autoencoders spliced in, as SAELens's ``HookedSAETransformer.run_with_saes``.

        Args:
            saes: A :class:`vit_lens.sae.SAE` or a list of them; each replaces the activation at its
                hook point (at the tokens it was trained on) while the model runs, and its feature
                activations are hook points such as ``blocks.3.hook_resid_post.hook_sae_acts_post``.
            use_error_term: Add each SAE's error back, so the output is the clean output unless a
                hook edits the features.

        ``model_args`` / ``model_kwargs`` go to :meth:`forward`. :mod:`vit_lens.sae.splice` describes
        splicing; ``vit_lens.sae.run_with_saes(clip, images, texts, saes=...)`` runs a HookedCLIP with texts.

        Example:
            >>> out = model.run_with_saes(images, saes=[sae], use_error_term=True)  # doctest: +SKIP
        """
        with _saes_spliced(self, saes, use_error_term, model_args):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(
        self, *model_args: Any, saes: Any, use_error_term: bool = False, **run_with_cache_kwargs: Any
    ) -> tuple[Tensor | None, VisionActivationCache]:
        """:meth:`run_with_cache` with ``saes`` spliced in (see :meth:`run_with_saes`); the cache holds their hook points."""
        with _saes_spliced(self, saes, use_error_term, model_args):
            return self.run_with_cache(*model_args, **run_with_cache_kwargs)

    def _cache_run(
        self,
        call: Callable[..., Any],
        model_args: tuple,
        model_kwargs: dict[str, Any],
        *,
        names_filter: Any,
        fwd_hooks: HookList | None,
        bwd_hooks: HookList | None,
        device: Any,
        remove_batch_dim: bool,
        incl_bwd: bool,
        metric: Callable[[Tensor], Tensor] | None,
        reset_hooks_end: bool,
        clear_contexts: bool,
        pos_slice: Any,
    ) -> tuple[Tensor | None, VisionActivationCache]:
        """``run_with_cache`` with this tower's hooks around ``call(*model_args, **model_kwargs)``.

        ``call`` is the tower itself, or a model wrapping it (HookedCLIP's forward with texts), so
        that the output and the metric are the wrapper's while the cache is the tower's.
        """
        names_filter = self._normalise_names_filter(names_filter)
        images = _images_of(model_args, model_kwargs)
        if remove_batch_dim and isinstance(images, Tensor) and len(images) != 1:
            raise ValueError(f"remove_batch_dim=True needs a batch of one image, got {len(images)}")
        if incl_bwd and not torch.is_grad_enabled():
            raise RuntimeError(
                "run_with_cache(incl_bwd=True) needs autograd, but gradients are off here (inside torch.no_grad() "
                "or torch.inference_mode()); call it outside that block, or inside torch.enable_grad()."
            )
        cache_dict, cache_fwd, cache_bwd = self.get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim=remove_batch_dim, pos_slice=pos_slice
        )
        # User hooks go first so that the cache records what actually flowed on.
        all_fwd = hook_pairs(fwd_hooks, "fwd_hooks") + cache_fwd
        all_bwd = hook_pairs(bwd_hooks, "bwd_hooks") + cache_bwd
        with self.hooks(all_fwd, all_bwd, reset_hooks_end, clear_contexts):
            self._guard_cache_against_in_place_edits(cache_dict, names_filter)
            out = call(*model_args, **model_kwargs)
            if incl_bwd:
                target = metric(out) if metric is not None else out
                if not isinstance(target, Tensor) or target.numel() != 1:
                    shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
                    raise ValueError(
                        f"incl_bwd=True differentiates a scalar, but {'metric(output)' if metric else 'the output'} is "
                        f"{shape}; pass metric= returning a scalar tensor, e.g. metric=lambda out: out[:, 0].sum()."
                    )
                if not target.requires_grad:
                    raise RuntimeError(
                        "run_with_cache(incl_bwd=True) has nothing to differentiate: no parameter of the model "
                        "requires a gradient (it was frozen with requires_grad_(False)) and the images do not either. "
                        "Unfreeze it with model.requires_grad_(True), or pass images.requires_grad_(True) to get the "
                        "activations' gradients without parameter gradients."
                    )
                target.backward()
        grid = self._grid(images)
        return out, VisionActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim, grid_size=grid)

    def get_caching_hooks(
        self,
        names_filter: Any = None,
        incl_bwd: bool = False,
        device: Any = None,
        remove_batch_dim: bool = False,
        cache: dict | None = None,
        pos_slice: Any = None,
    ) -> tuple[dict, list, list]:
        """TransformerLens's ``get_caching_hooks`` with this model's hook layouts (see :func:`caching_hooks`).

        A names filter that is not a function is checked like :meth:`run_with_cache`'s.
        """
        if not callable(names_filter):
            names_filter = self._normalise_names_filter(names_filter)
        return caching_hooks(
            list(self.hook_dict), names_filter, incl_bwd, device, remove_batch_dim=remove_batch_dim, cache=cache,
            pos_slice=pos_slice,
        )

    def _grid(self, images: Tensor) -> tuple[int, int]:
        """The patch grid (rows, columns) of ``images``."""
        return (images.shape[-2] // self.cfg.patch_size[0], images.shape[-1] // self.cfg.patch_size[1])

    def _guard_cache_against_in_place_edits(self, cache: dict[str, Tensor], names_filter: Callable[[str], bool]):
        """Attach an :class:`InPlaceEditGuard` first at every hook point where a hook other than the cache's runs.

        A cache must hold what the model computed at each point even when a later hook edits its
        tensor in place (``blocks.1.hook_resid_pre`` is the tensor cached as
        ``blocks.0.hook_resid_post``). Where only the cache's own hooks run (a plain
        ``run_with_cache``) nothing can edit, and nothing is attached or copied.
        """
        edited = [point for name, point in self.hook_dict.items() if len(point.fwd_hooks) > bool(names_filter(name))]
        if edited:
            guard = InPlaceEditGuard(cache)
            for point in edited:
                point.add_hook(guard, dir="fwd", level=self.context_level, prepend=True)

    def _normalise_names_filter(self, names_filter: Any) -> Callable[[str], bool]:
        """``names_filter`` as a function of the hook name; names are checked, and a function must match a hook point.

        An empty list caches nothing, on purpose; a function that matches no hook point raises,
        since an empty cache from a filter is almost always a mistyped name.
        """
        if names_filter is None:
            # With a LayerNorm on z, per-head results cannot be derived from hook_z alone: cache them.
            if self.cfg.use_attn_result or self.cfg.attn_norm:
                return lambda name: True
            return lambda name: not name.endswith("attn.hook_result")
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if isinstance(names_filter, (list, tuple, set)):
            wanted = {self._resolve_hook_name(name) for name in names_filter}
            return lambda name: name in wanted
        if callable(names_filter):
            if not any(names_filter(name) for name in self.hook_dict):
                raise ValueError(
                    f"names_filter {describe(names_filter)} matches none of the model's {len(self.hook_dict)} hook "
                    "points, so the cache would be empty. Hook names look like 'blocks.0.attn.hook_pattern' or "
                    "'blocks.0.hook_resid_post' (model.hook_dict lists them all); pass names_filter=[] to cache "
                    "nothing on purpose."
                )
            return names_filter
        raise TypeError(
            f"names_filter must be a hook name, a list of hook names or a function of the name, "
            f"got {type(names_filter).__name__}"
        )

    # ------------------------------------------------------------------ weights, TransformerLens style

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Tensor:
        """Sum of the output biases written to the residual stream before block ``layer``.

        Includes ``b_O`` of every attention layer (and ``b_out`` of every MLP if
        ``include_mlp_biases``) below ``layer``; with ``mlp_input``, also ``b_O`` of ``layer``.
        """
        bias = torch.zeros_like(self.blocks[0].attn.b_O)
        for index in range(layer):
            bias = bias + self.blocks[index].attn.b_O
            if include_mlp_biases:
                bias = bias + self.blocks[index].mlp.b_out
        if mlp_input:
            bias = bias + self.blocks[layer].attn.b_O
        return bias

    def _stack(self, getter: Callable[[TransformerBlock], Tensor]) -> Tensor:
        return torch.stack([getter(block) for block in self.blocks])

    @property
    def W_E(self) -> Float[Tensor, "d_model channel patch_h patch_w"]:
        """The patch embedding in convolution layout ``[d_model, channel, patch_h, patch_w]`` (a view of ``embed.W_E``).

        TransformerLens's ``W_E`` is a ``[d_vocab, d_model]`` matrix; a patch embedding is a
        kernel, so a matrix product with this view (``model.W_E @ model.OV``) raises and points to
        :attr:`W_E_matrix`. Every other tensor operation works as on the parameter.
        """
        return self.embed.W_E.as_subclass(PatchEmbeddingKernel)

    @property
    def W_E_matrix(self) -> Float[Tensor, "patch_pixels d_model"]:
        """The patch embedding as a matrix ``[channel * patch_h * patch_w, d_model]``.

        A patch's pixels flattened channel first, then rows, then columns
        (``images[:, :, :ph, :pw].flatten(1)``) times this matrix, plus ``embed.b_E`` where the model
        has one, is the patch's row of ``hook_embed``.
        """
        return self.embed.W_E.flatten(1).T

    @property
    def W_pos(self) -> Float[Tensor, "n_pos d_model"]:
        return self.pos_embed.W_pos

    @property
    def W_Q(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_Q)

    @property
    def W_K(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_K)

    @property
    def W_V(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_V)

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        return self._stack(lambda b: b.attn.W_O)

    @property
    def b_O(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.attn.b_O)

    @property
    def W_in(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack(lambda b: b.mlp.W_in)

    @property
    def W_out(self) -> Float[Tensor, "n_layers d_mlp d_model"]:
        return self._stack(lambda b: b.mlp.W_out)

    @property
    def b_out(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.mlp.b_out)

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q W_K^T`` for every layer and head: ``[n_layers, n_heads, d_model, d_model]``."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-1, -2))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V W_O`` for every layer and head: ``[n_layers, n_heads, d_model, d_model]``."""
        return FactoredMatrix(self.W_V, self.W_O)

    # ------------------------------------------------------------------ readout and weight processing, TL style

    @property
    def W_U(self) -> Float[Tensor, "d_model d_out"]:
        """The unembedding: the readout after pooling (``W_proj``, the head's ``W_head``, or the identity of a
        backbone) with the final LayerNorm's weight folded in, ``diag(ln_final.w) @ W_proj`` centred over
        ``d_model`` (as TransformerLens's ``fold_ln`` leaves it; the normalised stream is centred).

        As in TransformerLens on a model loaded with ``fold_ln=True``: the normalised pooled residual
        stream (``cache.apply_ln_to_stack(stack, pos_slice=0)``, ``cache.pool_stack(stack)``) times
        ``W_U`` plus :attr:`b_U` is the output, whether or not the weights were folded
        (:mod:`vit_lens.model.readout`). Not defined for an attention pool, a distilled DeiT's two
        heads or max pooling after the final LayerNorm (the error says what to use instead).
        """
        from vit_lens.model.readout import unembedding

        return unembedding(self)[0]

    @property
    def b_U(self) -> Float[Tensor, " d_out"]:
        """The unembedding bias: ``ln_final.b @ W_proj`` plus the readout's own bias (``b_proj``, ``b_head``)."""
        from vit_lens.model.readout import unembedding

        return unembedding(self)[1]

    def unembed(self, normalised: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_out"]:
        """``normalised @ W_U + b_U``: the output, for a pooled residual stream normalised by the final LayerNorm.

        Example:
            >>> lens = model.unembed(cache.accumulated_resid(apply_ln=True, pos_slice=0))  # doctest: +SKIP
            >>> torch.allclose(lens[-1], embed, atol=1e-5)  # the logit lens ends at the output  # doctest: +SKIP
            True
        """
        W_U, b_U = self.W_U, self.b_U
        return normalised.to(W_U) @ W_U + b_U

    def tokens_to_residual_directions(
        self, tokens: Any  # checked in vit_lens.model.readout, with directed messages
    ) -> Float[Tensor, "... d_model"]:
        """Residual-stream directions of output entries, as TransformerLens's (``W_U``'s columns).

        Args:
            tokens: Class indices of a classifier (an int or an integer tensor), or output-space
                vectors ``[..., d_out]``: text embeddings for a CLIP tower
                (``HookedCLIP.tokens_to_residual_directions`` takes the prompts themselves).

        Returns:
            ``[*tokens.shape, d_model]`` (``[..., d_model]`` for vectors): ``direction @ normalised``
            plus ``b_U[token]`` (``b_U @ vector``) is the output entry, for ``normalised`` the pooled
            residual stream after the final LayerNorm's normalisation; ``cache.logit_attrs`` dots
            the terms of a stack with these directions.
        """
        from vit_lens.model.readout import tokens_to_residual_directions

        return tokens_to_residual_directions(self, tokens)

    def process_weights_(
        self,
        fold_ln: bool = True,
        center_writing_weights: bool | None = None,
        center_unembed: bool | None = None,
        fold_value_biases: bool | None = None,
        refactor_factored_attn_matrices: bool = False,
    ) -> "HookedViT":
        """Process the weights in place with TransformerLens's steps; the output stays the same.

        ``fold_ln`` folds every LayerNorm's weight and bias into the linear maps that read it (the
        LayerNorms' ``hook_normalized`` then hold the normalised vector without weight and bias, as
        TransformerLens's ``LayerNormPre``); ``center_writing_weights`` centres every writer to the
        residual stream; ``center_unembed`` centres a classifier head over its classes (the logits
        move by a per-image constant, the probabilities not at all); ``fold_value_biases`` moves
        ``b_V`` into ``b_O``; ``refactor_factored_attn_matrices`` evens out the factors of
        ``W_Q W_K^T`` and ``W_V W_O``. None (the default of three of them) applies a step wherever
        it keeps the output; True where it cannot raises and says why (no final LayerNorm, an
        embedding output, EVA-CLIP's ``attn.ln_z``, rotary embeddings, ...).
        :mod:`vit_lens.model.weight_processing` details each step and what it does to the hooks.

        Returns:
            This model.

        Example:
            >>> model.process_weights_(fold_ln=True, center_writing_weights=True)  # doctest: +SKIP
            >>> model.blocks[0].ln1.w.unique()  # doctest: +SKIP
            tensor([1.])
        """
        from vit_lens.model.weight_processing import process_weights_

        return process_weights_(
            self, fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
            fold_value_biases=fold_value_biases, refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )

    def all_head_labels(self) -> list[str]:
        """``["L0H0", "L0H1", ...]`` in the order ``stack_head_results`` uses."""
        return [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    def token_labels(self, images: Tensor | None = None) -> list[str]:
        """A label for every position, for plot axes: ``["CLS", "REG0", ..., "P(0,0)", "P(0,1)", ...]``.

        The labels patching results carry (:meth:`ViTConfig.token_labels`). Positions depend only
        on the image size, never on the pixels.

        Args:
            images: Label the positions of images of this size (models converted with
                ``dynamic_img_size``); default: ``cfg.image_size``, ``cfg.n_ctx`` labels.

        Example:
            >>> labels = model.token_labels()  # doctest: +SKIP
            >>> px.imshow(cache["pattern", 0][0, 0], x=labels, y=labels)  # doctest: +SKIP
        """
        return self.cfg.token_labels(None if images is None else self._grid(images))

    def to_str_tokens(self, images: Tensor | None = None) -> list[str]:
        """TransformerLens's name for :meth:`token_labels` (an image's "tokens" are its positions)."""
        return self.token_labels(images)


class PatchEmbeddingKernel(Tensor):
    """A view of the patch embedding kernel that refuses matrix products with a directed message.

    What ``HookedViT.W_E`` returns. Every other operation returns plain tensors, so
    ``model.W_E.flatten(1)``, ``model.W_E.norm()`` or ``images.to(model.W_E)`` behave as usual.
    """

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _MATMULS:
            raise _matmul_error()
        if func is Tensor.__deepcopy__:
            return args[0].as_subclass(Tensor).detach().clone()
        return _plain_tensors(super().__torch_function__(func, types, args, kwargs or {}))

    # Defined here as well: with a non-tensor operand (a FactoredMatrix such as model.OV) torch's own
    # `@` returns NotImplemented before __torch_function__ sees it.
    def __matmul__(self, other: Any) -> Any:
        raise _matmul_error()

    def __rmatmul__(self, other: Any) -> Any:
        raise _matmul_error()


def _matmul_error() -> ValueError:
    # ValueError, not TypeError: Python turns a TypeError inside `@` into "unsupported operand type(s)".
    return ValueError(
        "model.W_E is the patch embedding as a convolution kernel [d_model, channel, patch_h, patch_w], not "
        "TransformerLens's [d_vocab, d_model] matrix, so it cannot be matrix-multiplied. Use model.W_E_matrix, the "
        "[channel * patch_h * patch_w, d_model] matrix that maps a flattened patch to the residual stream."
    )


_MATMULS = (torch.matmul, torch.mm, torch.bmm, Tensor.matmul, Tensor.mm, Tensor.__matmul__, Tensor.__rmatmul__)


def _flag_value(value: Any, setter: str) -> bool:
    """``value`` if it is a bool; otherwise a TypeError naming the setter and what it takes."""
    if not isinstance(value, bool):
        raise TypeError(f"model.{setter} takes True or False, got {value!r} ({type(value).__name__})")
    return value


def _plain_tensors(value: Any) -> Any:
    """``value`` with every PatchEmbeddingKernel in it turned into a plain tensor (same data and graph)."""
    if isinstance(value, PatchEmbeddingKernel):
        return value.as_subclass(Tensor)
    if isinstance(value, (tuple, list)):
        return type(value)(_plain_tensors(v) for v in value)
    return value


def check_return_type(return_type: Any, cfg: ViTConfig) -> None:
    """Raise a ValueError that says what would work if ``return_type`` is not one of :data:`RETURN_TYPES` for ``cfg``."""
    if return_type in _TEXT_RETURN_TYPES:
        raise ValueError(
            f"return_type={return_type!r} is TransformerLens's next-token {return_type}, which images do not have. "
            "Use return_type='logits' (the model's output) and compute your loss from it."
        )
    if not (return_type is None or isinstance(return_type, str)) or return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
    if return_type == "embed" and cfg.d_proj is None:
        output = f"class logits [batch, {cfg.n_classes}]" if cfg.n_classes else "the pooled representation"
        raise ValueError(
            f"return_type='embed' asks for a CLIP image embedding, but {cfg.model_name} has no image projection; its "
            f"output is {output}: use return_type='logits' for it, or 'pooled'."
        )


def _images_argument(images: Any, input: Any, tokens: Any, model_name: str) -> Any:
    """The images, whether passed positionally or as TransformerLens's ``input=``; ``tokens=`` is refused."""
    if tokens is not None:
        raise TypeError(
            f"{model_name} takes images, not tokens: pass the [batch, channels, height, width] images positionally "
            "or as input=. A vision transformer has no token ids; its positions are CLS, registers and patches "
            "(model.token_labels() names them)."
        )
    if input is not None:
        if images is not None:
            raise TypeError(f"{model_name} got images twice, positionally and as input=; pass them once.")
        return input
    if images is None:
        raise TypeError(f"{model_name} needs images: model(images) with images [batch, channels, height, width].")
    return images


def _images_of(model_args: tuple, model_kwargs: dict[str, Any]) -> Any:
    """The images among the arguments of a forward call."""
    if model_args:
        return model_args[0]
    return model_kwargs.get("images", model_kwargs.get("input"))


@contextmanager
def _saes_spliced(model: "HookedViT", saes: Any, use_error_term: bool, model_args: tuple) -> Iterator[None]:
    """``saes`` spliced into ``model`` for the block, each through its own ``spliced_into(model, use_error_term=...)``.

    The SAE objects bring the splicing (``vit_lens.sae.SAE.spliced_into``), so this floor never
    imports the SAE package above it; anything without that method is refused here.
    """
    if len(model_args) > 1:
        raise TypeError(
            "HookedViT.run_with_saes takes the images only. For a HookedCLIP's image-text logits use "
            "vit_lens.sae.run_with_saes(clip, images, texts, saes=[...])."
        )
    advice = (
        "load SAELens or ViT-Prisma files with vit_lens.sae.load_sae(folder), or convert a SAELens SAE object with "
        "vit_lens.sae.from_sae_lens(sae)."
    )
    saes = [saes] if hasattr(saes, "spliced_into") else saes
    if isinstance(saes, (str, bytes)) or not isinstance(saes, Sequence):
        raise TypeError(f"saes must be a vit_lens.sae.SAE or a list of them, got a {type(saes).__name__}; {advice}")
    for sae in saes:
        if not callable(getattr(sae, "spliced_into", None)):
            raise TypeError(f"saes must hold vit_lens.sae.SAE objects, got a {type(sae).__name__}; {advice}")
    with ExitStack() as stack:
        for sae in saes:
            stack.enter_context(sae.spliced_into(model, use_error_term=use_error_term))
        yield


def _check_bwd_hooks_survive(bwd_hooks: HookList | None, reset_hooks_end: bool) -> None:
    if bwd_hooks and reset_hooks_end:
        raise ValueError(
            "Backward hooks would be removed before any backward pass; pass reset_hooks_end=False and call "
            "model.reset_hooks() after backward(), or use run_with_cache(..., incl_bwd=True, metric=...)."
        )


def image_tower(model: Any) -> HookedViT:
    """The HookedViT of ``model``: the model itself, or the image tower of a HookedCLIP (or HookedBlip2).

    Every vit_lens function that takes a HookedViT takes a model with a HookedViT image tower
    through this, so a HookedCLIP is accepted wherever a HookedViT is.
    """
    if isinstance(model, HookedViT):
        return model
    tower = getattr(model, "vision", None)
    if isinstance(tower, HookedViT):
        return tower
    raise TypeError(
        f"Expected a vit_lens HookedViT, or a model whose image tower is one (HookedCLIP, HookedBlip2), got "
        f"{type(model).__name__}. Convert a source model with vit_lens.HookedViT.from_open_clip / from_timm / "
        "from_hf, or vit_lens.HookedCLIP.from_open_clip."
    )


@contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Inside the block no parameter of ``module`` requires a gradient; each gets its flag back after.

    Gradient-based helpers differentiate with respect to activations or the input (attribution
    patching, feature visualisation); with the weights frozen their backward passes neither
    compute nor accumulate parameter gradients, on a loaded model whose parameters require grad.
    """
    flags = [(param, param.requires_grad) for param in module.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
