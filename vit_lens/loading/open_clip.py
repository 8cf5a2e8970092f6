"""open_clip VisionTransformer -> (ViTConfig, HookedViT state dict)."""

from torch import Tensor, nn

from vit_lens.model.config import ViTConfig
from vit_lens.loading._common import (
    SourceParams,
    activation_name,
    attention_and_mlp,
    layer_norm_eps,
    unsupported,
)

_POOL_TYPES = {"tok": "token", "avg": "avg"}


def describe_open_clip_visual(visual: nn.Module) -> str:
    """A readable name built from the tower's own attributes (open_clip models do not store their name)."""
    return (
        f"open_clip ViT (width {visual.transformer.width}, {len(visual.transformer.resblocks)} layers, "
        f"patch {visual.patch_size[0]}, {visual.image_size[0]}x{visual.image_size[1]} images)"
    )


def convert_open_clip_visual(
    model: nn.Module, *, dynamic_img_size: bool | None = None
) -> tuple[ViTConfig, dict[str, Tensor]]:
    """Read an open_clip vision tower's architecture and weights.

    Args:
        model: An open_clip ``CLIP``/``CustomTextCLIP`` or its ``.visual`` ``VisionTransformer``.
        dynamic_img_size: Accept other image sizes (position embeddings resampled); default False,
            as open_clip itself only takes its configured size.
    """
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(model, "visual", model)
    if isinstance(visual, TimmModel):
        return convert_open_clip_timm_visual(visual, dynamic_img_size=dynamic_img_size)
    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(
            f"HookedViT.from_open_clip converts open_clip VisionTransformer towers and timm ViT / EVA towers; this "
            f"model's vision tower is a {type(visual).__name__} (ResNet towers are not supported)."
        )
    name = describe_open_clip_visual(visual)
    if visual.attn_pool is not None:
        raise unsupported(name, "an attentional pooler (CoCa-style attn_pool)")
    if visual.pool_type not in _POOL_TYPES:
        raise unsupported(name, f"pool_type={visual.pool_type!r}")
    blocks = list(visual.transformer.resblocks)
    for index, block in enumerate(blocks):
        if type(block) is not ResidualAttentionBlock:
            raise unsupported(
                name, f"{type(block).__name__} blocks (qk_norm / scaled cosine attention / scale_attn / scale_fc)"
            )
        if hasattr(block, "ln_1_kv"):
            raise unsupported(name, "cross-attention blocks")
        if not block.attn._qkv_same_embed_dim or block.attn.bias_k is not None:
            raise unsupported(name, f"a non-standard nn.MultiheadAttention in block {index}")

    first = blocks[0]
    acts = {activation_name(b.mlp.gelu, name) for b in blocks}
    if len(acts) != 1:
        raise unsupported(name, f"different activations per block {sorted(acts)}")
    has_ln_pre = not isinstance(visual.ln_pre, nn.Identity)
    norms = [n for b in blocks for n in (b.ln_1, b.ln_2)] + [visual.ln_post] + ([visual.ln_pre] if has_ln_pre else [])
    cfg = ViTConfig(
        d_model=visual.transformer.width,
        n_layers=len(blocks),
        n_heads=first.attn.num_heads,
        d_head=first.attn.head_dim,
        d_mlp=first.mlp.c_fc.out_features,
        patch_size=tuple(visual.patch_size),
        image_size=tuple(visual.image_size),
        in_channels=visual.conv1.in_channels,
        act_fn=acts.pop(),
        eps=layer_norm_eps(norms, name),
        class_token=True,
        pos_embed_on_prefix=True,
        patch_bias=visual.conv1.bias is not None,
        ln_pre=has_ln_pre,
        final_norm="post_pool" if visual.final_ln_after_pool else "pre_pool",
        pool_type=_POOL_TYPES[visual.pool_type],
        pool_include_prefix=False,
        d_proj=visual.proj.shape[1] if visual.proj is not None else None,
        dynamic_img_size=bool(dynamic_img_size),
        model_name=name,
    )

    src = SourceParams(visual, name)
    sd = {"embed.W_E": src.take("conv1.weight"), "embed.cls_token": src.take("class_embedding")}
    if cfg.patch_bias:
        sd["embed.b_E"] = src.take("conv1.bias")
    sd["pos_embed.W_pos"] = src.take("positional_embedding")
    if has_ln_pre:
        sd["ln_pre.w"], sd["ln_pre.b"] = src.take("ln_pre.weight"), src.take("ln_pre.bias")
    for index, block in enumerate(blocks):
        p = f"transformer.resblocks.{index}"
        sd[f"blocks.{index}.ln1.w"], sd[f"blocks.{index}.ln1.b"] = src.take(f"{p}.ln_1.weight"), src.take(f"{p}.ln_1.bias")
        sd[f"blocks.{index}.ln2.w"], sd[f"blocks.{index}.ln2.b"] = src.take(f"{p}.ln_2.weight"), src.take(f"{p}.ln_2.bias")
        sd.update(
            attention_and_mlp(
                f"blocks.{index}",
                qkv_weight=src.take(f"{p}.attn.in_proj_weight"),
                qkv_bias=src.take_optional(f"{p}.attn.in_proj_bias"),
                out_weight=src.take(f"{p}.attn.out_proj.weight"),
                out_bias=src.take_optional(f"{p}.attn.out_proj.bias"),
                fc1_weight=src.take(f"{p}.mlp.c_fc.weight"),
                fc1_bias=src.take_optional(f"{p}.mlp.c_fc.bias"),
                fc2_weight=src.take(f"{p}.mlp.c_proj.weight"),
                fc2_bias=src.take_optional(f"{p}.mlp.c_proj.bias"),
                n_heads=cfg.n_heads,
                d_head=cfg.d_head,
                ls_attn=src.take_optional(f"{p}.ls_1.gamma"),
                ls_mlp=src.take_optional(f"{p}.ls_2.gamma"),
            )
        )
    sd["ln_final.w"], sd["ln_final.b"] = src.take("ln_post.weight"), src.take("ln_post.bias")
    if cfg.d_proj is not None:
        sd["W_proj"] = src.take("proj")
    src.check_all_taken()
    return cfg, sd


def convert_open_clip_timm_visual(
    visual: nn.Module, *, dynamic_img_size: bool | None = None
) -> tuple[ViTConfig, dict[str, Tensor]]:
    """An open_clip ``TimmModel`` tower (EVA-CLIP, SigLIP, SigLIP2): its timm trunk, then its projection.

    The trunk's own linear head (EVA-CLIP: ``timm_proj=None``) or the adapter's ``proj``
    (``timm_proj='linear'``) becomes the projection ``W_proj`` (+ ``b_proj``); SigLIP's
    ``timm_proj='none'`` has none, and the output is the attention-pooled vector.
    """
    from vit_lens.loading.timm import convert_timm

    trunk = visual.trunk
    cfg, sd = convert_timm(trunk, dynamic_img_size=dynamic_img_size, head_as_projection=True)
    layers = dict(visual.head.named_children())
    if set(layers) - {"drop", "proj"} or not isinstance(layers.get("proj", nn.Linear(1, 1)), nn.Linear):
        raise unsupported(cfg.model_name, f"an open_clip timm head {sorted(layers)} (attention pool / MLP projection)")
    if "proj" in layers:
        if cfg.d_proj is not None:
            raise unsupported(cfg.model_name, "both a trunk head and an open_clip projection")
        proj = layers["proj"]
        fields = cfg.to_dict()
        fields.update(d_proj=proj.out_features, proj_bias=proj.bias is not None)
        cfg = ViTConfig(**fields)
        sd["W_proj"] = proj.weight.detach().clone().T.contiguous()
        if proj.bias is not None:
            sd["b_proj"] = proj.bias.detach().clone()
    fields = cfg.to_dict()
    fields["model_name"] = f"open_clip {cfg.model_name} tower"
    return ViTConfig(**fields), sd


def open_clip_text_parts(model: nn.Module) -> dict:
    """What HookedCLIP takes from an open_clip model besides the image tower.

    Returns a dict with ``text_model`` (a shallow copy of the model without ``visual``: the text
    weights are shared, not copied), ``logit_scale``, ``logit_bias`` and ``preprocess`` (the
    model's evaluation image transform).
    """
    import copy

    from open_clip import get_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2

    if not hasattr(model, "encode_text") or not hasattr(model, "visual"):
        raise TypeError(
            f"HookedCLIP needs a whole open_clip CLIP model (with a text tower), got {type(model).__name__}; "
            "for an image tower alone use HookedViT.from_open_clip."
        )
    text_model = copy.copy(model)
    text_model._modules = {k: v for k, v in model._modules.items() if k != "visual"}
    text_model._parameters = dict(model._parameters)
    text_model._buffers = dict(model._buffers)
    return {
        "text_model": text_model.eval(),
        "logit_scale": model.logit_scale,
        "logit_bias": getattr(model, "logit_bias", None),
        "preprocess": image_transform_v2(PreprocessCfg(**get_model_preprocess_cfg(model)), is_train=False),
    }


def open_clip_imagenet_templates() -> tuple:
    """The 80 OpenAI ImageNet prompt templates that open_clip ships."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    return tuple(OPENAI_IMAGENET_TEMPLATES)


def open_clip_tokenizer(arch: str):
    import open_clip

    return open_clip.get_tokenizer(arch)


def open_clip_imagenet_classnames() -> tuple:
    """The ImageNet-1k class names open_clip ships for zero-shot evaluation."""
    from open_clip import IMAGENET_CLASSNAMES

    return tuple(IMAGENET_CLASSNAMES)
