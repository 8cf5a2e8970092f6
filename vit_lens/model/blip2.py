"""BLIP-2 / InstructBLIP (transformers) with a :class:`~vit_lens.HookedViT` as the vision tower.

The conversion of the tower's weights lives in :mod:`vit_lens.loading.blip2`; this module wraps the
transformers model so that its Q-Former and language model read the hooked tower's tokens.
"""

import copy
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from vit_lens.loading.blip2 import convert_blip2_vision, load_blip2_source, vision_output
from vit_lens.model.components._hooks import is_hooked
from vit_lens.model.hooked_vit import HookedViT


def hooked_vit_from_blip2(model: nn.Module) -> HookedViT:
    """The BLIP-2 family vision tower as a :class:`HookedViT` with the same weights, dtype and device.

    Its forward returns ``ln_final`` of the CLS token (BLIP-2 applies ``post_layernorm`` to every
    token; the Q-Former reads them all, see :func:`image_tokens`).

    Example:
        >>> from transformers import Blip2Config, Blip2ForConditionalGeneration  # doctest: +SKIP
        >>> vit = hooked_vit_from_blip2(Blip2ForConditionalGeneration(Blip2Config()))  # doctest: +SKIP
    """
    cfg, state_dict = convert_blip2_vision(model)
    reference = state_dict["embed.W_E"]
    vit = HookedViT(cfg).to(device=reference.device, dtype=reference.dtype)
    vit.load_state_dict(state_dict, strict=True)
    return vit.eval()


def image_tokens(
    vision: HookedViT, images: Float[Tensor, "batch channel height width"], layer: int | None = None
) -> Float[Tensor, "batch pos d_model"]:
    """What a BLIP-2 Q-Former reads: ``ln_final`` of every token after block ``layer`` (default: the last).

    Hooks on ``vision`` (blocks, ``ln_final``) apply; ``hook_pooled`` is not on this path, so a
    hook attached to it raises rather than being silently ignored.
    """
    if is_hooked(vision.hook_pooled):
        raise ValueError(
            "A hook is attached to hook_pooled, but BLIP-2's Q-Former reads every token after ln_final, not the "
            "pooled CLS vector, so it could not take effect; hook 'ln_final.hook_normalized' or a residual stream instead"
        )
    return vision.ln_final(vision(images, stop_at_layer=_blocks_to_run(vision.cfg.n_layers, layer)))


def _blocks_to_run(n_layers: int, layer: Any) -> int:
    if layer is None:
        return n_layers
    if isinstance(layer, int) and not isinstance(layer, bool) and -n_layers <= layer < n_layers:
        return layer % n_layers + 1
    raise ValueError(f"layer must be an int in [-{n_layers}, {n_layers - 1}] (or None for the last), got {layer!r}")


class _HookedVisionTower(nn.Module):
    """Stands in for a BLIP-2 model's ``vision_model``: runs the HookedViT, returns what transformers reads."""

    wraps_hooked_vit = True  # lets the converter (one floor down) refuse to convert it again

    def __init__(self, vision: HookedViT):
        super().__init__()
        self.hooked = vision
        self.layer: int | None = None

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False, **kwargs: Any):
        if interpolate_pos_encoding:
            raise NotImplementedError(
                "interpolate_pos_encoding=True is not supported by the hooked BLIP-2 tower (transformers resamples "
                "BLIP-2's position embeddings without antialiasing); resize images to "
                f"{self.hooked.cfg.image_size[0]}x{self.hooked.cfg.image_size[1]}"
            )
        for key in ("output_attentions", "output_hidden_states"):
            if kwargs.get(key):
                raise ValueError(
                    f"{key}=True is not available through the hooked vision tower; read attention patterns and "
                    "residual streams with HookedBlip2.run_with_cache(images)"
                )
        weight = self.hooked.embed.W_E
        tokens = image_tokens(self.hooked, pixel_values.to(device=weight.device, dtype=weight.dtype), self.layer)
        ln = self.hooked.ln_final
        # transformers' pooler output: post_layernorm applied once more to the normalised CLS token
        pooled = F.layer_norm(tokens[:, 0], ln.w.shape, ln.w, ln.b, ln.eps)
        return vision_output(tokens, pooled)


class HookedBlip2(nn.Module):
    """A BLIP-2 family captioner whose vision tower is a :class:`HookedViT`.

    Attributes:
        vision: The HookedViT; hooks, caches and interventions live here.
        model: The transformers model, sharing the source's Q-Former and language model, with its
            ``vision_model`` replaced by a wrapper around ``vision``.
        tokenizer: Decodes generated ids (``batch_decode``); the processor's tokenizer by default.
        processor: The transformers processor, if any (to build ``pixel_values`` and prompts).

    Example:
        >>> blip = HookedBlip2.from_pretrained("Salesforce/blip2-opt-2.7b")  # doctest: +SKIP
        >>> inputs = blip.processor(images=image, return_tensors="pt")  # doctest: +SKIP
        >>> blip.caption(inputs.pixel_values)  # doctest: +SKIP
        ['a cat sitting on a couch']
        >>> blip.caption(inputs.pixel_values, layer=20)  # decode the residual stream after block 20  # doctest: +SKIP
        >>> from vit_lens.intervene.interventions import zero_ablate  # doctest: +SKIP
        >>> blip.caption(inputs.pixel_values, fwd_hooks=[("blocks.30.attn.hook_z", zero_ablate(heads=[0, 1]))])  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, vision: HookedViT, tokenizer: Any = None, processor: Any = None):
        super().__init__()
        self.model = model
        self.vision = vision
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)

    @classmethod
    def from_hf(cls, model: nn.Module, *, tokenizer: Any = None, processor: Any = None) -> "HookedBlip2":
        """Wrap a transformers ``Blip2ForConditionalGeneration`` / ``InstructBlipForConditionalGeneration``.

        ``model`` itself is left untouched: the wrapper is a shallow copy that shares its Q-Former
        and language model (no weights are copied) and holds a converted vision tower.
        """
        if not hasattr(model, "generate") or not hasattr(model, "qformer"):
            raise TypeError(
                f"HookedBlip2.from_hf takes a Blip2ForConditionalGeneration or InstructBlipForConditionalGeneration, "
                f"got {type(model).__name__}; for a vision tower alone use hooked_vit_from_blip2"
            )
        vision = hooked_vit_from_blip2(model)
        wrapped = copy.copy(model)
        wrapped._modules = dict(model._modules)
        wrapped._parameters = dict(model._parameters)
        wrapped._buffers = dict(model._buffers)
        wrapped.vision_model = _HookedVisionTower(vision)
        return cls(wrapped.eval(), vision, tokenizer=tokenizer, processor=processor)

    @classmethod
    def from_pretrained(cls, name: str, *, processor: bool = True, **kwargs: Any) -> "HookedBlip2":
        """Load a BLIP-2 / InstructBLIP checkpoint with transformers (hub name or local directory) and wrap it.

        Args:
            name: e.g. ``"Salesforce/blip2-opt-2.7b"``, ``"Salesforce/instructblip-flan-t5-xl"`` or a
                directory written by ``save_pretrained``.
            processor: Also load the processor (image transform and tokenizer) with ``AutoProcessor``.
            **kwargs: Passed to ``from_pretrained`` (``dtype=``, ``device_map=``, ...).
        """
        model, loaded_processor = load_blip2_source(name, processor=processor, **kwargs)
        return cls.from_hf(model, processor=loaded_processor)

    # ------------------------------------------------------------------ vision

    @property
    def _tower(self) -> _HookedVisionTower:
        return self.model.vision_model

    def image_tokens(
        self, images: Tensor, *, layer: int | None = None, fwd_hooks: Any = None
    ) -> Float[Tensor, "batch pos d_model"]:
        """The Q-Former's input: ``ln_final`` of every token after block ``layer`` (default: the last)."""
        with torch.no_grad(), self.vision.hooks(fwd_hooks):
            weight = self.vision.embed.W_E
            return image_tokens(self.vision, images.to(device=weight.device, dtype=weight.dtype), layer)

    # ------------------------------------------------------------------ generation

    def generate(
        self, images: Tensor, *, layer: int | None = None, fwd_hooks: Any = None, **generate_kwargs: Any
    ) -> Any:
        """transformers' ``generate`` with the images going through the hooked tower.

        Args:
            images: ``pixel_values`` ``[batch, 3, H, W]``, preprocessed as the processor does.
            layer: Feed the Q-Former the residual stream after this block (with ``ln_final``)
                instead of the last block's: the "Peeling Back the Layers" paper's layer decoding.
            fwd_hooks: ``[(hook_name, fn), ...]`` on the vision tower, active for this call.
            **generate_kwargs: ``input_ids``, ``attention_mask``, ``qformer_input_ids``
                (InstructBLIP), ``max_new_tokens``, ``num_beams``, ... as the model's ``generate``.

        Returns:
            What the model's own ``generate`` returns: token ids, or a ``GenerateOutput`` with
            ``return_dict_in_generate=True``.
        """
        _blocks_to_run(self.n_layers, layer)  # a bad layer fails here, not inside transformers
        tower = self._tower
        tower.layer = layer
        try:
            with self.vision.hooks(fwd_hooks):
                return self.model.generate(pixel_values=images, **generate_kwargs)
        finally:
            tower.layer = None

    def caption(
        self, images: Tensor, *, layer: int | None = None, fwd_hooks: Any = None, max_new_tokens: int = 30,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Generate and decode one description per image (prompt tokens and special tokens removed).

        Example:
            >>> blip.caption(pixel_values, layer=-4)  # doctest: +SKIP
        """
        if self.tokenizer is None:
            raise ValueError(
                "HookedBlip2.caption needs a tokenizer to decode ids: build it with processor= or tokenizer= "
                "(HookedBlip2.from_pretrained loads the processor), or call generate() for token ids"
            )
        ids = self.generate(images, layer=layer, fwd_hooks=fwd_hooks, max_new_tokens=max_new_tokens, **generate_kwargs)
        if not self.model.config.text_config.is_encoder_decoder:
            # a decoder-only model returns its prompt first: the given one, or the image tokens and BOS
            prompt = generate_kwargs.get("input_ids")
            ids = ids[:, prompt.shape[1] if prompt is not None else self.model.config.num_query_tokens + 1 :]
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # ------------------------------------------------------------------ hooks, delegated to the vision tower

    @property
    def n_layers(self) -> int:
        return self.vision.cfg.n_layers

    def run_with_cache(self, images: Tensor, **kwargs: Any):
        """``self.vision.run_with_cache``: the vision tower's output and cache."""
        return self.vision.run_with_cache(images, **kwargs)

    def hooks(self, *args: Any, **kwargs: Any):
        """``self.vision.hooks``: temporary vision-tower hooks for any call inside the ``with`` block."""
        return self.vision.hooks(*args, **kwargs)
