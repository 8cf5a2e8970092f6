"""HookedCLIP: a hooked CLIP vision tower beside the source model's own text tower."""

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from vit_lens.model.cache import VisionActivationCache
from vit_lens.model.hooked_vit import HookList, HookedViT, _check_bwd_hooks_survive, check_return_type

Template = str | Callable[[str], str]


class HookedCLIP(nn.Module):
    """A CLIP model whose image tower is a :class:`HookedViT`.

    The text tower is the source model's own (its parameters are shared, not copied), so text
    embeddings are open_clip's to the bit; the image tower is re-implemented with hooks and
    matches open_clip's ``encode_image`` layer by layer.

    A HookedCLIP is a hooked model with the image tower's hook points, under the same names
    (``"blocks.3.attn.hook_z"``): every attribute it does not define itself is its image tower's
    (``cfg``, ``hook_dict``, ``mod_dict``, ``hook_points()``, ``add_hook``, ``reset_hooks``,
    ``blocks``, ``W_Q`` ... ``W_E_matrix``, ``QK``, ``OV``, ``accumulated_bias``,
    ``token_labels``, ...), and called on images alone it is its image tower. ``run_with_hooks``,
    ``run_with_cache`` and ``hooks`` put the hooks on the image tower around its own forward, so
    with texts they return image-text logits. Every vit_lens function that takes a HookedViT
    takes a HookedCLIP.

    Attributes:
        vision: The :class:`HookedViT` image tower; hooks and caches live here.
        tokenizer: Turns strings into token ids for the text tower (None: pass token ids).
        preprocess: The source model's evaluation image transform (PIL image -> tensor).

    Example:
        >>> import open_clip, vit_lens
        >>> source = open_clip.create_model("ViT-B-32", pretrained=None)  # doctest: +SKIP
        >>> clip = vit_lens.HookedCLIP.from_open_clip(source, tokenizer=open_clip.get_tokenizer("ViT-B-32"))  # doctest: +SKIP
        >>> clip.encode_text(["a photo of a dog"]).shape  # doctest: +SKIP
        torch.Size([1, 512])
    """

    def __init__(
        self,
        vision: HookedViT,
        text_model: nn.Module,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        tokenizer: Callable | None = None,
        preprocess: Callable | None = None,
    ):
        super().__init__()
        self.vision = vision
        self.text_model = text_model
        self.logit_scale = logit_scale
        self.logit_bias = logit_bias
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    @classmethod
    def from_open_clip(
        cls,
        model: nn.Module,
        tokenizer: Callable | None = None,
        *,
        vision: HookedViT | None = None,
        dynamic_img_size: bool | None = None,
    ) -> "HookedCLIP":
        """Wrap an open_clip ``CLIP`` / ``CustomTextCLIP``.

        Args:
            model: The open_clip model (not only its ``.visual``: the text tower is needed).
            tokenizer: ``open_clip.get_tokenizer(<arch>)``; needed to pass strings to ``encode_text``.
            vision: A HookedViT already converted from ``model`` to use as the image tower (saves
                converting twice); by default one is converted here.
            dynamic_img_size: Passed to :meth:`HookedViT.from_open_clip`.
        """
        from vit_lens.loading.open_clip import open_clip_text_parts

        parts = open_clip_text_parts(model)
        if vision is None:
            vision = HookedViT.from_open_clip(model, dynamic_img_size=dynamic_img_size)
        else:
            # timm towers (EVA-CLIP, SigLIP) do not store output_dim
            width = getattr(model.visual, "output_dim", None)
            if not isinstance(vision, HookedViT) or (width is not None and vision.cfg.d_output != width):
                raise ValueError(
                    f"vision= must be the HookedViT converted from this model's .visual (image embedding width {width})"
                )
        return cls(vision, tokenizer=tokenizer, **parts)

    @classmethod
    def from_hf(cls, model: nn.Module, processor: Any = None) -> "HookedCLIP":
        """Wrap a transformers ``CLIPModel`` (or ``SiglipModel``).

        Args:
            model: The transformers model with both towers.
            processor: Its ``CLIPProcessor`` / ``AutoProcessor`` (optional): gives ``tokenize``
                (strings to ``input_ids``; SigLIP pads to ``max_length`` as it was trained) and
                ``preprocess`` (a PIL image to a ``[3, H, W]`` tensor).

        Example:
            >>> import torch, transformers, vit_lens
            >>> config = transformers.CLIPConfig(
            ...     text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            ...                      vocab_size=100, max_position_embeddings=16, bos_token_id=1, eos_token_id=2),
            ...     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            ...                        image_size=32, patch_size=8), projection_dim=16)
            >>> clip = vit_lens.HookedCLIP.from_hf(transformers.CLIPModel(config).eval())
            >>> clip(torch.randn(2, 3, 32, 32), torch.tensor([[1, 5, 2], [1, 7, 2]])).shape
            torch.Size([2, 2])
        """
        from vit_lens.loading.hf import hf_clip_text_parts

        parts = hf_clip_text_parts(model, processor)
        return cls(HookedViT.from_hf(model), **parts)

    @classmethod
    def from_pretrained(cls, name: Any, pretrained: str | None = None, **kwargs: Any) -> "HookedCLIP":
        """Build an open_clip model by name (``"ViT-B-16"`` or ``"open_clip:ViT-B-16"``) and wrap it.

        ``pretrained`` is an open_clip pretrained tag or a checkpoint path (None: random weights).
        ``resample_pos_embed=True`` accepts a checkpoint trained on another patch grid (its
        position embeddings are resampled); TransformerLens's ``fold_ln``, ``center_writing_weights``,
        ``fold_value_biases`` and ``refactor_factored_attn_matrices`` process the image tower
        (:meth:`process_weights_`); other keyword arguments go to ``open_clip.create_model``.
        """
        from vit_lens.loading import load_source_model
        from vit_lens.loading.open_clip import open_clip_tokenizer
        from vit_lens.model.weight_processing import pop_processing_args

        if not isinstance(name, str):
            raise TypeError(
                f"HookedCLIP.from_pretrained takes an open_clip architecture name such as 'ViT-B-16' or "
                f"'open_clip:ViT-B-16', got {name!r} ({type(name).__name__})."
            )
        if name.startswith("timm:"):
            raise ValueError(
                f"HookedCLIP needs a model with a text tower, from open_clip; {name!r} is a timm image model: "
                "load it with HookedViT.from_pretrained."
            )
        arch = name if name.startswith("open_clip:") else f"open_clip:{name}"
        processing = pop_processing_args(kwargs)
        _, model = load_source_model(arch, pretrained, **kwargs)
        clip = cls.from_open_clip(model, tokenizer=open_clip_tokenizer(arch.split(":", 1)[1]))
        return clip.process_weights_(**processing) if processing else clip

    # ------------------------------------------------------------------ encoders

    def encode_image(self, images: Tensor, normalize: bool = False) -> Float[Tensor, "batch d_embed"]:
        """Image embeddings, as open_clip's ``encode_image`` (hooks on ``self.vision`` apply)."""
        features = self.vision(images)
        return F.normalize(features, dim=-1) if normalize else features

    def tokenize(self, texts: str | Sequence[str]) -> Tensor:
        """Token ids for ``texts`` with the model's tokenizer."""
        if self.tokenizer is None:
            raise ValueError(
                "This HookedCLIP has no tokenizer; build it with tokenizer=open_clip.get_tokenizer(<arch>) "
                "or pass token ids to encode_text."
            )
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts))

    def encode_text(self, texts: str | Sequence[str] | Tensor, normalize: bool = False) -> Float[Tensor, "batch d_embed"]:
        """Text embeddings from strings or token ids, computed by the source text tower."""
        if isinstance(texts, Tensor):
            tokens = texts
        elif isinstance(texts, str) or (isinstance(texts, Sequence) and all(isinstance(t, str) for t in texts)):
            tokens = self.tokenize(texts)
        else:
            raise TypeError(f"encode_text takes a string, a list of strings or token ids, got {type(texts).__name__}")
        tokens = tokens.to(self.logit_scale.device)
        return self.text_model.encode_text(tokens, normalize=normalize)

    def forward(
        self,
        images: Any = None,  # checked by the image tower, with directed messages
        texts: str | Sequence[str] | Tensor | None = None,
        *,
        return_type: Any = "logits",
        input: Any = None,
        tokens: Any = None,
    ) -> Float[Tensor, "batch *out"] | None:
        """Image-text logits, or, without texts, the image tower's output.

        Args:
            images: ``[batch, channels, height, width]`` preprocessed images (or ``input=``).
            texts: Strings or token ids. With texts, ``return_type="logits"`` gives
                ``logit_scale.exp() * cos(image, text) (+ logit_bias)``, ``[n_images, n_texts]``.
            return_type: ``"logits"`` (default), ``"embed"`` (the image embedding), ``"pooled"`` or
                None, as :meth:`HookedViT.forward`. Without texts ``"logits"`` is the image tower's
                output, the image embedding: ``clip(images)`` is ``clip.vision(images)``.
            input: TransformerLens's name for the images.
            tokens: Refused: text token ids go in ``texts``, images in ``images``.
        """
        if tokens is not None:
            raise TypeError(
                "HookedCLIP takes images and texts, not tokens=: call clip(images, texts), with text token ids (or "
                "strings) as texts."
            )
        check_return_type(return_type, self.vision.cfg)
        if texts is None or return_type != "logits":
            return self.vision(images, input=input, return_type=return_type)
        image = F.normalize(self.vision(images, input=input), dim=-1)
        text = self.encode_text(texts, normalize=True)
        logits = self.logit_scale.exp() * image @ text.T
        return logits + self.logit_bias if self.logit_bias is not None else logits

    @torch.no_grad()
    def zero_shot_classifier(
        self,
        classnames: Sequence[str],
        templates: Sequence[Template] | None = None,
        batch_size: int = 10,
    ) -> Float[Tensor, "d_embed n_classes"]:
        """Class embeddings averaged over prompt templates, as open_clip's ``build_zero_shot_classifier``.

        Args:
            classnames: One name per class.
            templates: Format strings (``"a photo of a {}."``) or functions of the class name.
                Default: the 80 OpenAI ImageNet templates that open_clip ships.
            batch_size: Classes encoded per text batch.

        Returns:
            ``[d_embed, n_classes]``: unit-norm columns; ``encode_image(x, normalize=True) @ W``
            gives the zero-shot scores.
        """
        if isinstance(classnames, str) or not classnames:
            raise ValueError("classnames must be a non-empty list of class names")
        if templates is None:
            from vit_lens.loading.open_clip import open_clip_imagenet_templates

            templates = open_clip_imagenet_templates()
        if isinstance(templates, str) or not templates:
            raise ValueError("templates must be a non-empty list of format strings or functions")
        columns = []
        for start in range(0, len(classnames), batch_size):
            chunk = list(classnames[start : start + batch_size])
            texts = [t(c) if callable(t) else t.format(c) for c in chunk for t in templates]
            embeds = self.encode_text(texts, normalize=True).reshape(len(chunk), len(templates), -1).mean(dim=1)
            columns.append(F.normalize(embeds, dim=-1).T)
        return torch.cat(columns, dim=1)

    # ------------------------------------------------------------------ readout and weights, TransformerLens style

    def tokens_to_residual_directions(
        self, texts: str | Sequence[str] | Tensor, normalize: bool = True
    ) -> Float[Tensor, "*n_texts d_model"]:
        """Residual-stream directions of texts, ``W_U @ t`` for each text embedding ``t`` (TransformerLens's name).

        ``direction @ normalised + b_U @ t`` is ``image_embed @ t``, for ``normalised`` the image
        tower's pooled residual stream after the final LayerNorm's normalisation; the zero-shot
        logit is ``logit_scale.exp() * (image_embed @ t) / image_embed.norm()`` (plus
        ``logit_bias``). ``cache.logit_attrs(stack, directions=...)`` attributes ``image_embed @ t``
        to the terms of a stack.

        Args:
            texts: A prompt, a list of prompts, text token ids, or text embeddings ``[..., d_embed]``
                (a float tensor).
            normalize: Unit-normalise the text embeddings first, as the zero-shot logits do.

        Returns:
            ``[n_texts, d_model]``, or ``[d_model]`` for one prompt.
        """
        embeds = texts if isinstance(texts, Tensor) and texts.is_floating_point() else self.encode_text(texts)
        if normalize:
            embeds = F.normalize(embeds, dim=-1)
        directions = self.vision.tokens_to_residual_directions(embeds)
        return directions[0] if isinstance(texts, str) else directions

    def process_weights_(self, **kwargs: Any) -> "HookedCLIP":
        """:meth:`HookedViT.process_weights_` on the image tower (the text tower is the source's); returns this model.

        ``center_unembed=True`` is refused: the image embedding is compared with text embeddings by
        cosine similarity, and centring the projection would change every zero-shot logit.
        """
        self.vision.process_weights_(**kwargs)
        return self

    # ------------------------------------------------------------------ hooks: the image tower's, around this forward

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
        """:meth:`HookedViT.run_with_cache` around this model's forward: ``clip.run_with_cache(images)``
        returns the image embedding, ``clip.run_with_cache(images, texts)`` the image-text logits, and
        the cache holds the image tower's activations either way.
        """
        return self.vision._cache_run(
            self, model_args, model_kwargs, names_filter=names_filter, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks,
            device=device, remove_batch_dim=remove_batch_dim, incl_bwd=incl_bwd, metric=metric,
            reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts, pos_slice=pos_slice,
        )

    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: HookList | None = None,
        bwd_hooks: HookList | None = None,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ) -> Tensor | None:
        """:meth:`HookedViT.run_with_hooks` around this model's forward (image embedding, or logits with texts)."""
        _check_bwd_hooks_survive(bwd_hooks, reset_hooks_end)
        with self.vision.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*model_args, **model_kwargs)

    def hooks(self, *args: Any, **kwargs: Any):
        """``self.vision.hooks``: a context manager of temporary image-tower hooks."""
        return self.vision.hooks(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Parameters and submodules of this model first, then the image tower's attributes (its hook API,
        config and weights), so that a HookedCLIP stands wherever a HookedViT does."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            vision = self.__dict__.get("_modules", {}).get("vision")
            if vision is None or name.startswith("_"):
                raise
        try:
            return getattr(vision, name)
        except AttributeError:
            raise AttributeError(
                f"'HookedCLIP' object has no attribute {name!r}, and neither has its image tower (a HookedViT)"
            ) from None

