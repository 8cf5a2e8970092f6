"""timm VisionTransformer (ViT, DeiT, distilled DeiT, DINOv2 with registers) -> (ViTConfig, state dict)."""

from torch import Tensor, nn

from vit_lens.config import ViTConfig
from vit_lens.loading._common import (
    SourceParams,
    activation_name,
    attention_and_mlp,
    layer_norm_eps,
    unsupported,
)

_POOL_TYPES = ("token", "avg", "max", "avgmax")


def _describe(model: nn.Module) -> str:
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    return f"timm {name}"


def convert_timm_vit(model: nn.Module, *, dynamic_img_size: bool | None = None) -> tuple[ViTConfig, dict[str, Tensor]]:
    """Read a timm ``VisionTransformer``'s architecture and weights from its modules and attributes.

    Args:
        model: A timm ``VisionTransformer`` or ``VisionTransformerDistilled``.
        dynamic_img_size: Accept other image sizes; default: the model's own ``dynamic_img_size``.
    """
    from timm.layers import Attention, Mlp, PatchEmbed
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(
            f"HookedViT.from_timm converts timm VisionTransformer models (vit_*, deit_*, *_dinov2); got a "
            f"{type(model).__name__}."
        )
    name = _describe(model)
    if getattr(model, "attn_pool", None) is not None:
        raise unsupported(name, f"attention pooling (global_pool={model.global_pool!r})")
    if model.global_pool not in _POOL_TYPES:
        raise unsupported(name, f"global_pool={model.global_pool!r}")
    if model.pos_embed is None:
        raise unsupported(name, "no absolute position embedding (pos_embed='none')")
    embed = model.patch_embed
    if type(embed) is not PatchEmbed or not isinstance(embed.norm, nn.Identity):
        raise unsupported(name, f"a {type(embed).__name__} patch embedding with a norm")
    if getattr(embed, "dynamic_img_pad", False):
        raise unsupported(name, "dynamic_img_pad")
    blocks = list(model.blocks)
    for block in blocks:
        if type(block) is not Block:
            raise unsupported(name, f"{type(block).__name__} blocks")
        attn = block.attn
        if type(attn) is not Attention:
            raise unsupported(name, f"{type(attn).__name__} attention")
        if not all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm)):
            raise unsupported(name, "q/k normalisation or attention output normalisation")
        if getattr(attn, "gate", None) is not None:
            raise unsupported(name, "gated attention")
        if type(block.mlp) is not Mlp or not isinstance(block.mlp.norm, nn.Identity):
            raise unsupported(name, f"a {type(block.mlp).__name__} MLP")

    distilled = isinstance(model, VisionTransformerDistilled)
    first = blocks[0]
    acts = {activation_name(b.mlp.act, name) for b in blocks}
    if len(acts) != 1:
        raise unsupported(name, f"different activations per block {sorted(acts)}")
    has_ln_pre = not isinstance(model.norm_pre, nn.Identity)
    if not isinstance(model.norm, nn.Identity):
        final_norm, final_module = "pre_pool", "norm"
    elif not isinstance(model.fc_norm, nn.Identity):
        final_norm, final_module = "post_pool", "fc_norm"
    else:
        final_norm, final_module = "none", None
    norms = [n for b in blocks for n in (b.norm1, b.norm2)]
    norms += [model.norm_pre] if has_ln_pre else []
    norms += [getattr(model, final_module)] if final_module else []
    head = model.head
    if not isinstance(head, (nn.Linear, nn.Identity)):
        raise unsupported(name, f"a {type(head).__name__} head")
    n_classes = head.out_features if isinstance(head, nn.Linear) else 0
    cfg = ViTConfig(
        d_model=model.embed_dim,
        n_layers=len(blocks),
        n_heads=first.attn.num_heads,
        d_head=first.attn.head_dim,
        d_mlp=first.mlp.fc1.out_features,
        patch_size=tuple(embed.patch_size),
        image_size=tuple(embed.img_size),
        in_channels=embed.proj.in_channels,
        act_fn=acts.pop(),
        eps=layer_norm_eps(norms, name),
        class_token=model.cls_token is not None,
        distillation_token=distilled,
        n_registers=model.num_reg_tokens,
        pos_embed_on_prefix=not model.no_embed_class,
        patch_bias=embed.proj.bias is not None,
        ln_pre=has_ln_pre,
        final_norm=final_norm,
        pool_type="token_dist" if distilled else model.global_pool,
        pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
        n_classes=n_classes,
        dynamic_img_size=model.dynamic_img_size if dynamic_img_size is None else dynamic_img_size,
        model_name=name,
    )

    src = SourceParams(model, name)
    sd = {"embed.W_E": src.take("patch_embed.proj.weight"), "pos_embed.W_pos": src.take("pos_embed")[0]}
    if cfg.patch_bias:
        sd["embed.b_E"] = src.take("patch_embed.proj.bias")
    if cfg.class_token:
        sd["embed.cls_token"] = src.take("cls_token").reshape(-1)
    if distilled:
        sd["embed.dist_token"] = src.take("dist_token").reshape(-1)
    if cfg.n_registers:
        sd["embed.registers"] = src.take("reg_token")[0]
    if has_ln_pre:
        sd["ln_pre.w"], sd["ln_pre.b"] = src.take("norm_pre.weight"), src.take("norm_pre.bias")
    for index in range(cfg.n_layers):
        p = f"blocks.{index}"
        sd[f"{p}.ln1.w"], sd[f"{p}.ln1.b"] = src.take(f"{p}.norm1.weight"), src.take(f"{p}.norm1.bias")
        sd[f"{p}.ln2.w"], sd[f"{p}.ln2.b"] = src.take(f"{p}.norm2.weight"), src.take(f"{p}.norm2.bias")
        sd.update(
            attention_and_mlp(
                p,
                qkv_weight=src.take(f"{p}.attn.qkv.weight"),
                qkv_bias=src.take_optional(f"{p}.attn.qkv.bias"),
                out_weight=src.take(f"{p}.attn.proj.weight"),
                out_bias=src.take_optional(f"{p}.attn.proj.bias"),
                fc1_weight=src.take(f"{p}.mlp.fc1.weight"),
                fc1_bias=src.take_optional(f"{p}.mlp.fc1.bias"),
                fc2_weight=src.take(f"{p}.mlp.fc2.weight"),
                fc2_bias=src.take_optional(f"{p}.mlp.fc2.bias"),
                n_heads=cfg.n_heads,
                d_head=cfg.d_head,
                ls_attn=src.take_optional(f"{p}.ls1.gamma"),
                ls_mlp=src.take_optional(f"{p}.ls2.gamma"),
            )
        )
    if final_module:
        sd["ln_final.w"] = src.take(f"{final_module}.weight")
        sd["ln_final.b"] = src.take(f"{final_module}.bias")
    if n_classes:
        sd["head.W_head"] = src.take("head.weight").T.contiguous()
        sd["head.b_head"] = src.take("head.bias")
        if distilled:
            sd["head.W_head_dist"] = src.take("head_dist.weight").T.contiguous()
            sd["head.b_head_dist"] = src.take("head_dist.bias")
    src.check_all_taken()
    return cfg, sd


def timm_class_names(model: nn.Module) -> list[str]:
    """Readable names of a timm classifier's classes (ImageNet-1k / 21k label sets timm knows)."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if subset is None:
        return [f"class {i}" for i in range(model.num_classes)]
    info = ImageNetInfo(subset)
    return [info.index_to_description(i).split(",")[0] for i in range(model.num_classes)]
