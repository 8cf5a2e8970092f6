"""BLIP-2 / InstructBLIP (transformers) with a HookedViT as the vision tower.

"Peeling Back the Layers" decodes every layer of the vision tower into language with InstructBLIP (Q-Former and
Flan-T5 on EVA-CLIP). Here the vision tower of a transformers ``Blip2ForConditionalGeneration``
(or ``InstructBlipForConditionalGeneration``) is converted to a :class:`~vit_lens.HookedViT`, and
:class:`HookedBlip2` runs captioning through it: the image passes through our tower with its hooks,
then through the model's own Q-Former, language projection and language model (shared, not
copied). ``generate`` is transformers' own ``generate``; only the vision tower is swapped.

The BLIP-2 vision tower, as transformers computes it (``modeling_blip_2.py``): a class token, a
conv patch embedding with bias and a learned position embedding on every token (no LayerNorm
before the blocks); pre-norm blocks with a fused qkv projection (q and v biases; the k bias is a
zero slice of the same parameter), the activation named by ``hidden_act``, and ``post_layernorm``
applied to every token. The Q-Former reads all tokens after ``post_layernorm``: in HookedViT terms
``ln_final(blocks.{L-1}.hook_resid_post)`` (``ln_final.hook_normalized`` when hooked), so the
tower converts with ``final_norm="pre_pool"``, ``pool_type="token"`` and no projection.
Decoding an earlier layer ``l`` feeds ``ln_final(blocks.{l}.hook_resid_post)`` to the Q-Former.
"""

import os
from typing import Any

from torch import Tensor, nn

from vit_lens.model.config import ViTConfig
from vit_lens.loading._common import SourceParams, attention_and_mlp, layer_norm_eps, unsupported
from vit_lens.loading.hub import Download, check_downloads, hub_offline_mode


def _vision_model(model: nn.Module) -> nn.Module:
    """The ``Blip2VisionModel`` / ``InstructBlipVisionModel`` of a BLIP-2 family model (or the tower itself)."""
    from transformers.models.blip_2.modeling_blip_2 import Blip2VisionModel
    from transformers.models.instructblip.modeling_instructblip import InstructBlipVisionModel

    towers = (Blip2VisionModel, InstructBlipVisionModel)
    if isinstance(model, towers):
        return model
    vision = getattr(model, "vision_model", None)
    if isinstance(vision, towers):
        return vision
    if getattr(vision, "wraps_hooked_vit", False):
        raise TypeError("This model's vision tower is already a HookedViT (a HookedBlip2's model); use it as it is")
    raise TypeError(
        "convert_blip2_vision takes a transformers Blip2ForConditionalGeneration, Blip2Model, "
        "InstructBlipForConditionalGeneration or their vision model, got "
        f"{type(model).__name__} with vision tower {type(vision).__name__}"
    )


def _activation_name(module: nn.Module, model_name: str) -> str:
    """ViTConfig.act_fn for a transformers (or torch) activation module, by its type."""
    from transformers import activations

    if isinstance(module, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}[module.approximate]
    if isinstance(module, activations.GELUActivation):
        return "gelu"
    if isinstance(module, (activations.GELUTanh, activations.NewGELUActivation, activations.FastGELUActivation)):
        return "gelu_tanh"
    if isinstance(module, activations.QuickGELUActivation):
        return "quick_gelu"
    raise unsupported(model_name, f"the MLP activation {type(module).__name__}")


def convert_blip2_vision(model: nn.Module) -> tuple[ViTConfig, dict[str, Tensor]]:
    """Read a BLIP-2 family vision tower's architecture (from its modules) and weights.

    Args:
        model: A transformers ``Blip2ForConditionalGeneration``, ``Blip2Model``,
            ``InstructBlipForConditionalGeneration`` or their ``vision_model``.

    Returns:
        ``(cfg, state_dict)`` for ``HookedViT(cfg).load_state_dict(state_dict)``.
    """
    vision = _vision_model(model)
    embeddings = vision.embeddings
    conv = embeddings.patch_embedding
    layers = list(vision.encoder.layers)
    width = embeddings.embed_dim
    name = (
        f"{type(vision).__name__} (width {width}, {len(layers)} layers, patch {conv.kernel_size[0]}, "
        f"{embeddings.image_size}x{embeddings.image_size} images)"
    )
    if tuple(conv.stride) != tuple(conv.kernel_size) or conv.padding not in ((0, 0), 0, "valid"):
        raise unsupported(name, f"a patch convolution with stride {conv.stride} and padding {conv.padding}")
    acts = {_activation_name(layer.mlp.activation_fn, name) for layer in layers}
    if len(acts) != 1:
        raise unsupported(name, f"different activations per block {sorted(acts)}")
    first = layers[0].self_attn
    norms = [n for layer in layers for n in (layer.layer_norm1, layer.layer_norm2)] + [vision.post_layernorm]
    cfg = ViTConfig(
        d_model=width,
        n_layers=len(layers),
        n_heads=first.num_heads,
        d_head=first.head_dim,
        d_mlp=layers[0].mlp.fc1.out_features,
        patch_size=tuple(conv.kernel_size),
        image_size=embeddings.image_size,
        in_channels=conv.in_channels,
        act_fn=acts.pop(),
        eps=layer_norm_eps(norms, name),
        class_token=True,
        pos_embed_on_prefix=True,
        patch_bias=conv.bias is not None,
        ln_pre=False,
        final_norm="pre_pool",
        pool_type="token",
        d_proj=None,
        n_classes=0,
        dynamic_img_size=False,
        model_name=name,
    )
    if embeddings.position_embedding.shape[1] != cfg.n_ctx:
        raise unsupported(name, f"{embeddings.position_embedding.shape[1]} position embeddings for {cfg.n_ctx} tokens")

    src = SourceParams(vision, name)
    sd = {"embed.W_E": src.take("embeddings.patch_embedding.weight")}
    if cfg.patch_bias:
        sd["embed.b_E"] = src.take("embeddings.patch_embedding.bias")
    sd["embed.cls_token"] = src.take("embeddings.class_embedding").reshape(width)
    sd["pos_embed.W_pos"] = src.take("embeddings.position_embedding").reshape(cfg.n_ctx, width)
    for index in range(cfg.n_layers):
        p = f"encoder.layers.{index}"
        sd[f"blocks.{index}.ln1.w"], sd[f"blocks.{index}.ln1.b"] = (
            src.take(f"{p}.layer_norm1.weight"), src.take(f"{p}.layer_norm1.bias"))
        sd[f"blocks.{index}.ln2.w"], sd[f"blocks.{index}.ln2.b"] = (
            src.take(f"{p}.layer_norm2.weight"), src.take(f"{p}.layer_norm2.bias"))
        sd.update(
            attention_and_mlp(
                f"blocks.{index}",
                qkv_weight=src.take(f"{p}.self_attn.qkv.weight"),
                qkv_bias=src.take_optional(f"{p}.self_attn.qkv.bias"),
                out_weight=src.take(f"{p}.self_attn.projection.weight"),
                out_bias=src.take_optional(f"{p}.self_attn.projection.bias"),
                fc1_weight=src.take(f"{p}.mlp.fc1.weight"),
                fc1_bias=src.take_optional(f"{p}.mlp.fc1.bias"),
                fc2_weight=src.take(f"{p}.mlp.fc2.weight"),
                fc2_bias=src.take_optional(f"{p}.mlp.fc2.bias"),
                n_heads=cfg.n_heads,
                d_head=cfg.d_head,
                ls_attn=None,
                ls_mlp=None,
            )
        )
    sd["ln_final.w"], sd["ln_final.b"] = src.take("post_layernorm.weight"), src.take("post_layernorm.bias")
    src.check_all_taken()
    return cfg, sd


def load_blip2_source(name: str, *, processor: bool = True, **kwargs: Any) -> tuple[nn.Module, Any]:
    """A BLIP-2 / InstructBLIP checkpoint (hub name or local directory) and, if asked, its processor, via transformers."""
    from transformers import AutoConfig, Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

    if not os.path.isdir(name):  # a hub name: fail at once, naming the fix, when it cannot be fetched
        config_file = Download(repo=name, filenames=("config.json",))
        with hub_offline_mode(check_downloads(f"transformers:{name}", [config_file])):
            config = AutoConfig.from_pretrained(name)
    else:
        config = AutoConfig.from_pretrained(name)
    classes = {"blip-2": Blip2ForConditionalGeneration, "instructblip": InstructBlipForConditionalGeneration}
    if config.model_type not in classes:
        raise ValueError(f"{name!r} is a {config.model_type!r} model; HookedBlip2 loads {sorted(classes)} checkpoints")
    model = classes[config.model_type].from_pretrained(name, **kwargs)
    loaded_processor = None
    if processor:
        from transformers import AutoProcessor

        loaded_processor = AutoProcessor.from_pretrained(name)
    return model, loaded_processor


def vision_output(last_hidden_state: Tensor, pooler_output: Tensor) -> Any:
    """transformers' ``BaseModelOutputWithPooling``, what a BLIP-2 model reads from its vision tower."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=pooler_output)
