"""Hugging Face transformers vision models -> (ViTConfig, HookedViT state dict).

CLIP (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel``), ViT (``ViTModel``,
``ViTForImageClassification``), DINOv2 (``Dinov2Model``, ``Dinov2WithRegistersModel``) and SigLIP
(``SiglipVisionModel``, ``SiglipModel``). Architecture is read from the modules and their config;
every parameter the source has is either placed or refused (``SourceParams``).
"""

import torch
from torch import Tensor, nn

from vit_lens.model.config import ViTConfig
from vit_lens.loading._common import SourceParams, activation_name, attention_and_mlp, layer_norm_eps, map_head, unsupported

_HF_ACTIVATIONS = {
    "QuickGELUActivation": "quick_gelu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "SiLUActivation": "silu",
}
SUPPORTED = (
    "CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel, ViTModel (add_pooling_layer=False), "
    "ViTForImageClassification, Dinov2Model, Dinov2WithRegistersModel, SiglipVisionModel, SiglipModel"
)


def _activation(module: nn.Module, name: str) -> str:
    if type(module).__name__ in _HF_ACTIVATIONS:
        return _HF_ACTIVATIONS[type(module).__name__]
    return activation_name(module, name)


def _describe(model: nn.Module) -> str:
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return f"transformers {type(model).__name__}" + (f" ({path})" if path else "")


def convert_hf_vision(model: nn.Module) -> tuple[ViTConfig, dict[str, Tensor]]:
    """Read a transformers vision model's architecture and weights.

    Returns ``(cfg, state_dict)`` for :class:`~vit_lens.HookedViT`. The HookedViT's output is
    the source's: ``image_embeds`` (CLIP with projection), ``logits`` (ViT classifier), or
    ``pooler_output`` (CLIP / DINOv2: the final-normed CLS token; SigLIP: its attention pool).
    """
    kind = type(model).__name__
    name = _describe(model)
    if kind in ("CLIPModel", "CLIPVisionModelWithProjection"):
        cfg, sd = _clip_tower(model.vision_model, name)
        proj = model.visual_projection
        fields = dict(cfg.to_dict(), d_proj=proj.out_features, proj_bias=proj.bias is not None)
        sd["W_proj"] = proj.weight.detach().clone().T.contiguous()
        if proj.bias is not None:
            sd["b_proj"] = proj.bias.detach().clone()
        return ViTConfig(**fields), sd
    if kind == "CLIPVisionModel":
        return _clip_tower(model, name)
    if kind in ("SiglipModel", "Siglip2Model"):
        return _siglip_tower(model.vision_model, name)
    if kind == "SiglipVisionModel":
        return _siglip_tower(model, name)
    if kind == "ViTForImageClassification":
        cfg, sd = _vit(model.vit, name)
        head = model.classifier
        if isinstance(head, nn.Linear):
            cfg = ViTConfig(**dict(cfg.to_dict(), n_classes=head.out_features))
            sd["head.W_head"] = head.weight.detach().clone().T.contiguous()
            sd["head.b_head"] = head.bias.detach().clone()
        elif not isinstance(head, nn.Identity):
            raise unsupported(name, f"a {type(head).__name__} classifier")
        return cfg, sd
    if kind == "ViTModel":
        return _vit(model, name)
    if kind in ("Dinov2Model", "Dinov2WithRegistersModel"):
        return _dinov2(model, name)
    raise NotImplementedError(f"HookedViT.from_hf converts {SUPPORTED}; got a {kind}.")


def _layers(model: nn.Module) -> list[nn.Module]:
    """The encoder layers, wherever this transformers version keeps them."""
    if hasattr(model, "layers"):
        return list(model.layers)
    encoder = model.encoder
    return list(encoder.layers if hasattr(encoder, "layers") else encoder.layer)


def _prefix(model: nn.Module, layer: nn.Module) -> str:
    for path, module in model.named_modules():
        if module is layer:
            return path
    raise KeyError("layer not found in its model")


def _check_attention(attn: nn.Module, name: str) -> tuple[int, int]:
    for proj in ("q_proj", "k_proj", "v_proj"):
        if not isinstance(getattr(attn, proj, None), nn.Linear):
            raise unsupported(name, f"an attention module {type(attn).__name__} without q/k/v projections")
    n_heads = getattr(attn, "num_heads", None) or attn.num_attention_heads
    return n_heads, attn.head_dim


def _block_state(
    src: SourceParams, index: int, p: str, ln1: str, ln2: str, attn: str, out: str, mlp: nn.Module, n_heads: int,
    d_head: int, ls: tuple[str, str] | None = None,
) -> dict[str, Tensor]:
    """One encoder layer's weights; ``attn`` is the attention module's path, ``out`` its output projection's."""
    sd = {
        f"blocks.{index}.ln1.w": src.take(f"{p}.{ln1}.weight"), f"blocks.{index}.ln1.b": src.take(f"{p}.{ln1}.bias"),
        f"blocks.{index}.ln2.w": src.take(f"{p}.{ln2}.weight"), f"blocks.{index}.ln2.b": src.take(f"{p}.{ln2}.bias"),
    }
    weights = [src.take(f"{p}.{attn}.{n}_proj.weight") for n in "qkv"]
    biases = [src.take_optional(f"{p}.{attn}.{n}_proj.bias") for n in "qkv"]
    qkv_bias = None
    if any(b is not None for b in biases):
        qkv_bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)])
    if hasattr(mlp, "gate_proj"):  # DINOv2 SwiGLU: down(silu(gate(x)) * up(x))
        mlp_weights = dict(
            fc1_weight=src.take(f"{p}.mlp.up_proj.weight"), fc1_bias=src.take_optional(f"{p}.mlp.up_proj.bias"),
            gate_weight=src.take(f"{p}.mlp.gate_proj.weight"), gate_bias=src.take_optional(f"{p}.mlp.gate_proj.bias"),
            fc2_weight=src.take(f"{p}.mlp.down_proj.weight"), fc2_bias=src.take_optional(f"{p}.mlp.down_proj.bias"),
        )
    else:
        mlp_weights = dict(
            fc1_weight=src.take(f"{p}.mlp.fc1.weight"), fc1_bias=src.take_optional(f"{p}.mlp.fc1.bias"),
            fc2_weight=src.take(f"{p}.mlp.fc2.weight"), fc2_bias=src.take_optional(f"{p}.mlp.fc2.bias"),
        )
    sd.update(
        attention_and_mlp(
            f"blocks.{index}",
            qkv_weight=torch.cat(weights),
            qkv_bias=qkv_bias,
            out_weight=src.take(f"{p}.{attn}.{out}.weight"),
            out_bias=src.take_optional(f"{p}.{attn}.{out}.bias"),
            n_heads=n_heads,
            d_head=d_head,
            ls_attn=src.take(f"{p}.{ls[0]}") if ls else None,
            ls_mlp=src.take(f"{p}.{ls[1]}") if ls else None,
            **mlp_weights,
        )
    )
    return sd


def _mlp_fields(mlps: list[nn.Module], name: str) -> dict:
    kinds = set()
    for mlp in mlps:
        if hasattr(mlp, "gate_proj"):
            kinds.add(("gated", _activation(mlp.act_fn, name), mlp.down_proj.in_features))
        else:
            kinds.add(("standard", _activation(mlp.activation_fn, name), mlp.fc1.out_features))
    if len(kinds) != 1:
        raise unsupported(name, f"MLPs of different kinds {sorted(kinds)}")
    mlp_type, act_fn, d_mlp = kinds.pop()
    return dict(mlp_type=mlp_type, act_fn=act_fn, d_mlp=d_mlp)


def _clip_tower(tower: nn.Module, name: str) -> tuple[ViTConfig, dict[str, Tensor]]:
    emb = tower.embeddings
    layers = _layers(tower)
    n_heads, d_head = _check_attention(layers[0].self_attn, name)
    norms = [n for l in layers for n in (l.layer_norm1, l.layer_norm2)] + [tower.pre_layrnorm, tower.post_layernorm]
    cfg = ViTConfig(
        d_model=emb.embed_dim, n_layers=len(layers), n_heads=n_heads, d_head=d_head,
        patch_size=emb.patch_size, image_size=emb.image_size, in_channels=emb.patch_embedding.in_channels,
        eps=layer_norm_eps(norms, name), class_token=True, pos_embed_on_prefix=True,
        patch_bias=emb.patch_embedding.bias is not None, ln_pre=True,
        # pooler_output = post_layernorm(CLS): the same as normalising every token, then taking CLS
        final_norm="pre_pool", pool_type="token", model_name=name, **_mlp_fields([l.mlp for l in layers], name),
    )
    src = SourceParams(tower, name)
    sd = {
        "embed.W_E": src.take("embeddings.patch_embedding.weight"),
        "embed.cls_token": src.take("embeddings.class_embedding").reshape(-1),
        "pos_embed.W_pos": src.take("embeddings.position_embedding.weight"),
        "ln_pre.w": src.take("pre_layrnorm.weight"), "ln_pre.b": src.take("pre_layrnorm.bias"),
        "ln_final.w": src.take("post_layernorm.weight"), "ln_final.b": src.take("post_layernorm.bias"),
    }
    if cfg.patch_bias:
        sd["embed.b_E"] = src.take("embeddings.patch_embedding.bias")
    for index, layer in enumerate(layers):
        sd.update(_block_state(src, index, _prefix(tower, layer), "layer_norm1", "layer_norm2", "self_attn",
                               "out_proj", layer.mlp, n_heads, d_head))
    src.check_all_taken()
    return cfg, sd


def _siglip_tower(tower: nn.Module, name: str) -> tuple[ViTConfig, dict[str, Tensor]]:
    emb = tower.embeddings
    if not isinstance(getattr(emb, "patch_embedding", None), nn.Conv2d):
        raise unsupported(name, f"a {type(emb.patch_embedding).__name__} patch embedding (SigLIP2 NaFlex)")
    head = getattr(tower, "head", None)
    if head is None:
        raise unsupported(name, "no attention-pooling head (vision_use_head=False): it has no pooled output")
    mha = head.attention
    if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim or mha.bias_k is not None:
        raise unsupported(name, "a non-standard attention in its pooling head")
    if head.probe.shape[1] != 1:
        raise unsupported(name, f"attention pooling with {head.probe.shape[1]} latent queries")
    layers = _layers(tower)
    n_heads, d_head = _check_attention(layers[0].self_attn, name)
    mlp_fields = _mlp_fields([l.mlp for l in layers], name)
    if _activation(head.mlp.activation_fn, name) != mlp_fields["act_fn"]:
        raise unsupported(name, "a pooling-head MLP activation different from the blocks'")
    norms = [n for l in layers for n in (l.layer_norm1, l.layer_norm2)] + [tower.post_layernorm, head.layernorm]
    d_model = emb.embed_dim
    cfg = ViTConfig(
        d_model=d_model, n_layers=len(layers), n_heads=n_heads, d_head=d_head,
        patch_size=emb.patch_size, image_size=emb.image_size, in_channels=emb.patch_embedding.in_channels,
        eps=layer_norm_eps(norms, name), class_token=False, pos_embed_on_prefix=True,
        patch_bias=emb.patch_embedding.bias is not None, ln_pre=False, final_norm="pre_pool", pool_type="map",
        pool_include_prefix=True, map_n_heads=mha.num_heads, map_d_mlp=head.mlp.fc1.out_features,
        model_name=name, **mlp_fields,
    )
    src = SourceParams(tower, name)
    sd = {
        "embed.W_E": src.take("embeddings.patch_embedding.weight"),
        "pos_embed.W_pos": src.take("embeddings.position_embedding.weight"),
        "ln_final.w": src.take("post_layernorm.weight"), "ln_final.b": src.take("post_layernorm.bias"),
    }
    if cfg.patch_bias:
        sd["embed.b_E"] = src.take("embeddings.patch_embedding.bias")
    for index, layer in enumerate(layers):
        sd.update(_block_state(src, index, _prefix(tower, layer), "layer_norm1", "layer_norm2", "self_attn",
                               "out_proj", layer.mlp, n_heads, d_head))
    in_w, in_b = src.take("head.attention.in_proj_weight"), src.take_optional("head.attention.in_proj_bias")
    q_w, k_w, v_w = in_w.chunk(3)
    q_b, k_b, v_b = in_b.chunk(3) if in_b is not None else (None, None, None)
    sd.update(
        map_head(
            latent=src.take("head.probe").reshape(-1), q_weight=q_w, q_bias=q_b, k_weight=k_w, k_bias=k_b,
            v_weight=v_w, v_bias=v_b, out_weight=src.take("head.attention.out_proj.weight"),
            out_bias=src.take_optional("head.attention.out_proj.bias"),
            ln_weight=src.take("head.layernorm.weight"), ln_bias=src.take("head.layernorm.bias"),
            fc1_weight=src.take("head.mlp.fc1.weight"), fc1_bias=src.take_optional("head.mlp.fc1.bias"),
            fc2_weight=src.take("head.mlp.fc2.weight"), fc2_bias=src.take_optional("head.mlp.fc2.bias"),
            n_heads=mha.num_heads,
        )
    )
    src.check_all_taken()
    return cfg, sd


def _vit(model: nn.Module, name: str) -> tuple[ViTConfig, dict[str, Tensor]]:
    if getattr(model, "pooler", None) is not None:
        raise unsupported(
            name,
            "the ViT pooler (dense + tanh on CLS, trained only for next-sentence-style pre-training); load it with "
            "ViTModel.from_pretrained(..., add_pooling_layer=False) to get the final-normed CLS as the output",
        )
    emb = model.embeddings
    layers = _layers(model)
    attn_path = "attention"
    n_heads, d_head = _check_attention(layers[0].attention, name)
    norms = [n for l in layers for n in (l.layernorm_before, l.layernorm_after)] + [model.layernorm]
    proj = emb.patch_embeddings.projection
    cfg = ViTConfig(
        d_model=proj.out_channels, n_layers=len(layers), n_heads=n_heads, d_head=d_head,
        patch_size=tuple(proj.kernel_size), image_size=tuple(emb.patch_embeddings.image_size),
        in_channels=proj.in_channels, eps=layer_norm_eps(norms, name), class_token=True, pos_embed_on_prefix=True,
        patch_bias=proj.bias is not None, final_norm="pre_pool", pool_type="token", model_name=name,
        **_mlp_fields([l.mlp for l in layers], name),
    )
    src = SourceParams(model, name)
    sd = {
        "embed.W_E": src.take("embeddings.patch_embeddings.projection.weight"),
        "embed.cls_token": src.take("embeddings.cls_token").reshape(-1),
        "pos_embed.W_pos": src.take("embeddings.position_embeddings")[0],
        "ln_final.w": src.take("layernorm.weight"), "ln_final.b": src.take("layernorm.bias"),
    }
    if cfg.patch_bias:
        sd["embed.b_E"] = src.take("embeddings.patch_embeddings.projection.bias")
    # the mask token replaces patches only under bool_masked_pos (masked-image-modelling training)
    src.take_optional("embeddings.mask_token")
    for index, layer in enumerate(layers):
        sd.update(_block_state(src, index, _prefix(model, layer), "layernorm_before", "layernorm_after", attn_path,
                               "o_proj", layer.mlp, n_heads, d_head))
    src.check_all_taken()
    return cfg, sd


def _dinov2(model: nn.Module, name: str) -> tuple[ViTConfig, dict[str, Tensor]]:
    emb = model.embeddings
    layers = _layers(model)
    n_heads, d_head = _check_attention(layers[0].attention, name)
    norms = [n for l in layers for n in (l.norm1, l.norm2)] + [model.layernorm]
    proj = emb.patch_embeddings.projection
    registers = getattr(emb, "register_tokens", None)
    n_registers = registers.shape[1] if registers is not None else 0
    cfg = ViTConfig(
        d_model=proj.out_channels, n_layers=len(layers), n_heads=n_heads, d_head=d_head,
        patch_size=tuple(proj.kernel_size), image_size=tuple(emb.patch_embeddings.image_size),
        in_channels=proj.in_channels, eps=layer_norm_eps(norms, name), class_token=True, n_registers=n_registers,
        # registers have no position embedding; CLS's row is folded into the CLS token (as timm does)
        pos_embed_on_prefix=n_registers == 0,
        patch_bias=proj.bias is not None, final_norm="pre_pool", pool_type="token", model_name=name,
        **_mlp_fields([l.mlp for l in layers], name),
    )
    src = SourceParams(model, name)
    pos = src.take("embeddings.position_embeddings")[0]
    cls = src.take("embeddings.cls_token").reshape(-1)
    sd = {
        "embed.W_E": src.take("embeddings.patch_embeddings.projection.weight"),
        "ln_final.w": src.take("layernorm.weight"), "ln_final.b": src.take("layernorm.bias"),
    }
    if n_registers:
        sd["embed.cls_token"], sd["pos_embed.W_pos"] = cls + pos[0], pos[1:]
        sd["embed.registers"] = src.take("embeddings.register_tokens")[0]
    else:
        sd["embed.cls_token"], sd["pos_embed.W_pos"] = cls, pos
    if cfg.patch_bias:
        sd["embed.b_E"] = src.take("embeddings.patch_embeddings.projection.bias")
    src.take_optional("embeddings.mask_token")  # used only under bool_masked_pos (training)
    for index, layer in enumerate(layers):
        sd.update(_block_state(src, index, _prefix(model, layer), "norm1", "norm2", "attention", "o_proj", layer.mlp,
                               n_heads, d_head, ls=("layer_scale1.lambda1", "layer_scale2.lambda1")))
    src.check_all_taken()
    return cfg, sd


def hf_clip_text_parts(model: nn.Module, processor=None) -> dict:
    """What HookedCLIP takes from a transformers ``CLIPModel`` besides the image tower."""
    if type(model).__name__ not in ("CLIPModel", "SiglipModel"):
        raise TypeError(
            f"HookedCLIP.from_hf needs a transformers CLIPModel or SiglipModel (image and text towers), got "
            f"{type(model).__name__}; for an image tower alone use HookedViT.from_hf."
        )
    tokenizer = preprocess = None
    if processor is not None:
        text_tokenizer = getattr(processor, "tokenizer", processor)
        padding = "max_length" if type(model).__name__ == "SiglipModel" else True

        def tokenizer(texts: list[str]) -> Tensor:
            return text_tokenizer(texts, padding=padding, return_tensors="pt")["input_ids"]

        image_processor = getattr(processor, "image_processor", None)
        if image_processor is not None:

            def preprocess(image) -> Tensor:
                return image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    return {
        "text_model": HFTextTower(model).eval(),
        "logit_scale": model.logit_scale,
        "logit_bias": getattr(model, "logit_bias", None),
        "tokenizer": tokenizer,
        "preprocess": preprocess,
    }


class HFTextTower(nn.Module):
    """``encode_text(token_ids, normalize)``: a transformers CLIP / SigLIP text tower (weights shared, not copied).

    Computes ``get_text_features``: the text model's pooled output, then CLIP's ``text_projection``
    (SigLIP's text model ends in its own head).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_model = model.text_model
        self.text_projection = getattr(model, "text_projection", None)

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        features = self.text_model(input_ids=tokens).pooler_output
        if self.text_projection is not None:
            features = self.text_projection(features)
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features
