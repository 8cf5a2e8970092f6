"""timm ViTs -> (ViTConfig, state dict).

``VisionTransformer`` (ViT, DeiT, distilled DeiT, DINOv2 with registers, SigLIP with its MAP head)
and ``Eva`` (EVA01, EVA02 with rotary embeddings, SwiGLU and sub-LayerNorms, as open_clip's
EVA-CLIP towers use them).
"""

import os

import torch
from torch import Tensor, nn

from vit_lens.model.config import ViTConfig
from vit_lens.loading._common import (
    SourceParams,
    activation_name,
    attention_and_mlp,
    layer_norm_eps,
    map_head,
    unsupported,
)

_POOL_TYPES = ("token", "avg", "max", "avgmax", "map")


def _describe(model: nn.Module) -> str:
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    return f"timm {name}"


def convert_timm(
    model: nn.Module, *, dynamic_img_size: bool | None = None, head_as_projection: bool = False
) -> tuple[ViTConfig, dict[str, Tensor]]:
    """Convert a timm ``VisionTransformer`` / ``VisionTransformerDistilled`` / ``Eva``.

    Args:
        model: The timm model.
        dynamic_img_size: Accept other image sizes; default: the model's own ``dynamic_img_size``.
        head_as_projection: Read a linear head as a CLIP projection (``W_proj``/``b_proj``), as
            open_clip's timm towers use it, instead of a classifier.
    """
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, Eva):
        cfg, sd = convert_timm_eva(model, dynamic_img_size=dynamic_img_size)
    elif isinstance(model, VisionTransformer):
        cfg, sd = convert_timm_vit(model, dynamic_img_size=dynamic_img_size)
    else:
        raise NotImplementedError(
            f"HookedViT.from_timm converts timm VisionTransformer models (vit_*, deit_*, *_dinov2, *_siglip_*) and "
            f"Eva models (eva_*, eva02_*); got a {type(model).__name__}."
        )
    if head_as_projection and cfg.n_classes:
        fields = cfg.to_dict()
        fields.update(n_classes=0, d_proj=cfg.n_classes, proj_bias=True)
        cfg = ViTConfig(**fields)
        sd["W_proj"] = sd.pop("head.W_head")
        sd["b_proj"] = sd.pop("head.b_head")
    return cfg, sd


def _check_patch_embed(model: nn.Module, name: str) -> None:
    from timm.layers import PatchEmbed

    embed = model.patch_embed
    if type(embed) is not PatchEmbed or not isinstance(embed.norm, nn.Identity):
        raise unsupported(name, f"a {type(embed).__name__} patch embedding with a norm")
    if getattr(embed, "dynamic_img_pad", False):
        raise unsupported(name, "dynamic_img_pad")
    if model.pos_embed is None:
        raise unsupported(name, "no absolute position embedding (pos_embed='none')")


def _final_norm(model: nn.Module) -> tuple[str, str | None]:
    if not isinstance(model.norm, nn.Identity):
        if not isinstance(model.fc_norm, nn.Identity):
            raise unsupported(_describe(model), "both a final norm and an fc_norm")
        return "pre_pool", "norm"
    if not isinstance(model.fc_norm, nn.Identity):
        return "post_pool", "fc_norm"
    return "none", None


def _map_fields(model: nn.Module, name: str) -> tuple[dict, list[nn.Module], str]:
    """ViTConfig fields of a timm ``AttentionPoolLatent`` head, its LayerNorms and MLP activation.

    Variants HookedViT does not implement are refused by name.
    """
    from timm.layers import AttentionPoolLatent, Mlp

    pool = model.attn_pool
    if not isinstance(pool, AttentionPoolLatent):
        raise unsupported(name, f"attention pooling with a {type(pool).__name__} (global_pool={model.global_pool!r})")
    if pool.latent_len != 1 or pool.pool != "token":
        raise unsupported(name, f"attention pooling with {pool.latent_len} latent queries")
    if pool.pos_embed is not None:
        raise unsupported(name, "attention pooling with its own position embedding")
    if not (isinstance(pool.q_norm, nn.Identity) and isinstance(pool.k_norm, nn.Identity)):
        raise unsupported(name, "attention pooling with q/k normalisation")
    if not isinstance(pool.q, nn.Linear):
        raise unsupported(name, "attention pooling without a query projection")
    if pool.mlp is None or type(pool.mlp) is not Mlp or not isinstance(pool.mlp.norm, nn.Identity):
        raise unsupported(name, "attention pooling without its LayerNorm + MLP (out_features=0)")
    if pool.latent_dim != model.embed_dim or pool.proj.out_features != model.embed_dim:
        raise unsupported(name, "attention pooling with a width different from the tower's")
    fields = dict(map_n_heads=pool.num_heads, map_d_mlp=pool.mlp.fc1.out_features)
    return fields, [pool.norm], activation_name(pool.mlp.act, name)


def _map_state(src: SourceParams, model: nn.Module) -> dict[str, Tensor]:
    d_model = model.embed_dim
    kv_w, kv_b = src.take("attn_pool.kv.weight"), src.take_optional("attn_pool.kv.bias")
    return map_head(
        latent=src.take("attn_pool.latent").reshape(-1),
        q_weight=src.take("attn_pool.q.weight"),
        q_bias=src.take_optional("attn_pool.q.bias"),
        k_weight=kv_w[:d_model],
        k_bias=kv_b[:d_model] if kv_b is not None else None,
        v_weight=kv_w[d_model:],
        v_bias=kv_b[d_model:] if kv_b is not None else None,
        out_weight=src.take("attn_pool.proj.weight"),
        out_bias=src.take_optional("attn_pool.proj.bias"),
        ln_weight=src.take("attn_pool.norm.weight"),
        ln_bias=src.take("attn_pool.norm.bias"),
        fc1_weight=src.take("attn_pool.mlp.fc1.weight"),
        fc1_bias=src.take_optional("attn_pool.mlp.fc1.bias"),
        fc2_weight=src.take("attn_pool.mlp.fc2.weight"),
        fc2_bias=src.take_optional("attn_pool.mlp.fc2.bias"),
        n_heads=model.attn_pool.num_heads,
    )


def _embed_and_head_state(model: nn.Module, src: SourceParams, cfg: ViTConfig, final_module: str | None) -> dict:
    sd = {"embed.W_E": src.take("patch_embed.proj.weight"), "pos_embed.W_pos": src.take("pos_embed")[0]}
    if cfg.patch_bias:
        sd["embed.b_E"] = src.take("patch_embed.proj.bias")
    if cfg.class_token:
        sd["embed.cls_token"] = src.take("cls_token").reshape(-1)
    if cfg.distillation_token:
        sd["embed.dist_token"] = src.take("dist_token").reshape(-1)
    if cfg.n_registers:
        sd["embed.registers"] = src.take("reg_token")[0]
    if cfg.ln_pre:
        sd["ln_pre.w"], sd["ln_pre.b"] = src.take("norm_pre.weight"), src.take("norm_pre.bias")
    if final_module:
        sd["ln_final.w"] = src.take(f"{final_module}.weight")
        sd["ln_final.b"] = src.take(f"{final_module}.bias")
    if cfg.pool_type == "map":
        sd.update(_map_state(src, model))
    if cfg.n_classes:
        sd["head.W_head"] = src.take("head.weight").T.contiguous()
        sd["head.b_head"] = src.take("head.bias")
        if cfg.distillation_token:
            sd["head.W_head_dist"] = src.take("head_dist.weight").T.contiguous()
            sd["head.b_head_dist"] = src.take("head_dist.bias")
    return sd


def _head_classes(model: nn.Module, name: str) -> int:
    head = model.head
    if not isinstance(head, (nn.Linear, nn.Identity)):
        raise unsupported(name, f"a {type(head).__name__} head")
    return head.out_features if isinstance(head, nn.Linear) else 0


def convert_timm_vit(model: nn.Module, *, dynamic_img_size: bool | None = None) -> tuple[ViTConfig, dict[str, Tensor]]:
    """Read a timm ``VisionTransformer``'s architecture and weights from its modules and attributes.

    Args:
        model: A timm ``VisionTransformer`` or ``VisionTransformerDistilled``.
        dynamic_img_size: Accept other image sizes; default: the model's own ``dynamic_img_size``.
    """
    from timm.layers import Attention, Mlp
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(
            f"HookedViT.from_timm converts timm VisionTransformer models (vit_*, deit_*, *_dinov2); got a "
            f"{type(model).__name__}."
        )
    name = _describe(model)
    if model.global_pool not in _POOL_TYPES:
        if getattr(model, "attn_pool", None) is not None:
            raise unsupported(name, f"attention pooling (global_pool={model.global_pool!r})")
        raise unsupported(name, f"global_pool={model.global_pool!r}")
    _check_patch_embed(model, name)
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
    final_norm, final_module = _final_norm(model)
    norms = [n for b in blocks for n in (b.norm1, b.norm2)]
    norms += [model.norm_pre] if not isinstance(model.norm_pre, nn.Identity) else []
    norms += [getattr(model, final_module)] if final_module else []
    map_fields: dict = {}
    if model.global_pool == "map":
        map_fields, map_norms, map_act = _map_fields(model, name)
        norms += map_norms
        acts.add(map_act)
    if len(acts) != 1:
        raise unsupported(name, f"different activations per block {sorted(acts)}")
    cfg = ViTConfig(
        d_model=model.embed_dim,
        n_layers=len(blocks),
        n_heads=first.attn.num_heads,
        d_head=first.attn.head_dim,
        d_mlp=first.mlp.fc1.out_features,
        patch_size=tuple(model.patch_embed.patch_size),
        image_size=tuple(model.patch_embed.img_size),
        in_channels=model.patch_embed.proj.in_channels,
        act_fn=acts.pop(),
        eps=layer_norm_eps(norms, name),
        class_token=model.cls_token is not None,
        distillation_token=distilled,
        n_registers=model.num_reg_tokens,
        pos_embed_on_prefix=not model.no_embed_class,
        patch_bias=model.patch_embed.proj.bias is not None,
        ln_pre=not isinstance(model.norm_pre, nn.Identity),
        final_norm=final_norm,
        pool_type="token_dist" if distilled else model.global_pool,
        pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
        n_classes=_head_classes(model, name),
        dynamic_img_size=model.dynamic_img_size if dynamic_img_size is None else dynamic_img_size,
        model_name=name,
        **map_fields,
    )

    src = SourceParams(model, name)
    sd = _embed_and_head_state(model, src, cfg, final_module)
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
    src.check_all_taken()
    return cfg, sd


def _eva_mlp_kind(mlp: nn.Module, name: str) -> tuple[str, bool, str]:
    """(mlp_type, has inner norm, activation) of an EVA block's MLP."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    if type(mlp) is Mlp:
        kind, act = "standard", mlp.act
    elif type(mlp) is SwiGLU:
        kind, act = "gated", mlp.act
    elif type(mlp) is GluMlp:
        if getattr(mlp, "chunk_dim", -1) != -1:
            raise unsupported(name, "a convolutional GLU MLP")
        kind, act = "gated", mlp.act
    else:
        raise unsupported(name, f"a {type(mlp).__name__} MLP")
    return kind, not isinstance(mlp.norm, nn.Identity), activation_name(act, name)


def _eva_mlp_weights(src: SourceParams, mlp: nn.Module, p: str) -> dict[str, Tensor | None]:
    """fc1 (linear branch), gate and fc2 weights of an EVA MLP in nn.Linear layout."""
    from timm.layers import GluMlp, SwiGLU

    out = dict(fc2_weight=src.take(f"{p}.mlp.fc2.weight"), fc2_bias=src.take_optional(f"{p}.mlp.fc2.bias"))
    if isinstance(mlp, SwiGLU):
        out.update(
            fc1_weight=src.take(f"{p}.mlp.fc1_x.weight"), fc1_bias=src.take_optional(f"{p}.mlp.fc1_x.bias"),
            gate_weight=src.take(f"{p}.mlp.fc1_g.weight"), gate_bias=src.take_optional(f"{p}.mlp.fc1_g.bias"),
        )
    elif isinstance(mlp, GluMlp):
        # fc1 packs both halves; the activation acts on the first half unless gate_last
        weight, bias = src.take(f"{p}.mlp.fc1.weight"), src.take_optional(f"{p}.mlp.fc1.bias")
        w_first, w_second = weight.chunk(2, dim=0)
        b_first, b_second = bias.chunk(2) if bias is not None else (None, None)
        if mlp.gate_last:
            out.update(fc1_weight=w_first, fc1_bias=b_first, gate_weight=w_second, gate_bias=b_second)
        else:
            out.update(fc1_weight=w_second, fc1_bias=b_second, gate_weight=w_first, gate_bias=b_first)
    else:
        out.update(fc1_weight=src.take(f"{p}.mlp.fc1.weight"), fc1_bias=src.take_optional(f"{p}.mlp.fc1.bias"))
    return out


def convert_timm_eva(model: nn.Module, *, dynamic_img_size: bool | None = None) -> tuple[ViTConfig, dict[str, Tensor]]:
    """Read a timm ``Eva`` (EVA01, EVA02, EVA-CLIP towers) from its modules and attributes.

    Rotary embeddings are taken as the source's own ``[sin | cos]`` table for its patch grid,
    so the rotation is the source's exactly (``rope_type='cat'``, the EVA02 kind, only).
    Refused by name: post-norm blocks (EVA02-E), grouped-query or ``AttentionRope``
    attention, q/k norm, gated attention, mixed / DINOv3 rotary embeddings, and dynamic image
    sizes with rotary embeddings.
    """
    from timm.layers import RotaryEmbeddingCat
    from timm.models.eva import EvaAttention, EvaBlock

    name = _describe(model)
    if model.global_pool not in _POOL_TYPES:
        raise unsupported(name, f"global_pool={model.global_pool!r}")
    _check_patch_embed(model, name)
    blocks = list(model.blocks)
    kinds = set()
    for block in blocks:
        if type(block) is not EvaBlock:
            raise unsupported(name, f"{type(block).__name__} blocks (post-norm residual blocks)")
        attn = block.attn
        if type(attn) is not EvaAttention:
            raise unsupported(name, f"{type(attn).__name__} attention (grouped-query / RoPE-ViT attention)")
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            raise unsupported(name, "q/k normalisation")
        if attn.gate is not None:
            raise unsupported(name, "gated attention")
        if attn.num_prefix_tokens != model.num_prefix_tokens:
            raise unsupported(name, "rotary embeddings on a different number of prefix tokens than the model has")
        kinds.add((*_eva_mlp_kind(block.mlp, name), not isinstance(attn.norm, nn.Identity), attn.rotate_half))
    if len(kinds) != 1:
        raise unsupported(name, f"blocks of different kinds {sorted(kinds)}")
    mlp_type, mlp_norm, act_fn, attn_norm, rotate_half = kinds.pop()

    rotary = "none"
    if model.rope is not None:
        if getattr(model, "rope_mixed", False) or type(model.rope) is not RotaryEmbeddingCat:
            raise unsupported(name, f"{type(model.rope).__name__} rotary embeddings (only EVA02's 'cat' kind)")
        if model.dynamic_img_size or dynamic_img_size:
            raise unsupported(name, "rotary embeddings with dynamic_img_size")
        rotary = "half" if rotate_half else "interleaved"

    first = blocks[0]
    final_norm, final_module = _final_norm(model)
    norms = [n for b in blocks for n in (b.norm1, b.norm2)]
    norms += [b.attn.norm for b in blocks] if attn_norm else []
    norms += [b.mlp.norm for b in blocks] if mlp_norm else []
    norms += [model.norm_pre] if not isinstance(model.norm_pre, nn.Identity) else []
    norms += [getattr(model, final_module)] if final_module else []
    map_fields: dict = {}
    if model.global_pool == "map":
        map_fields, map_norms, map_act = _map_fields(model, name)
        norms += map_norms
        if map_act != act_fn:
            raise unsupported(name, f"an attention pool whose MLP activation ({map_act}) differs from the blocks' ({act_fn})")
    d_mlp = first.mlp.fc2.in_features
    cfg = ViTConfig(
        d_model=model.embed_dim,
        n_layers=len(blocks),
        n_heads=first.attn.num_heads,
        d_head=first.attn.head_dim,
        d_mlp=d_mlp,
        patch_size=tuple(model.patch_embed.patch_size),
        image_size=tuple(model.patch_embed.img_size),
        in_channels=model.patch_embed.proj.in_channels,
        act_fn=act_fn,
        mlp_type=mlp_type,
        mlp_norm=mlp_norm,
        attn_norm=attn_norm,
        rotary=rotary,
        eps=layer_norm_eps(norms, name),
        class_token=model.cls_token is not None,
        n_registers=model.reg_token.shape[1] if model.reg_token is not None else 0,
        pos_embed_on_prefix=not model.no_embed_class,
        patch_bias=model.patch_embed.proj.bias is not None,
        ln_pre=not isinstance(model.norm_pre, nn.Identity),
        final_norm=final_norm,
        pool_type=model.global_pool,
        # Eva pools (and attention-pools) over the patches only for avg/max, over every token for map
        pool_include_prefix=model.global_pool == "map",
        n_classes=_head_classes(model, name),
        dynamic_img_size=bool(model.dynamic_img_size if dynamic_img_size is None else dynamic_img_size),
        model_name=name,
        **map_fields,
    )

    src = SourceParams(model, name)
    sd = _embed_and_head_state(model, src, cfg, final_module)
    if rotary != "none":
        table = model.rope.get_embed().detach().clone().float()
        if tuple(table.shape) != (cfg.n_patches, 2 * cfg.d_head):
            raise unsupported(name, f"a rotary table of shape {tuple(table.shape)} (expected one row per patch)")
        sd["rotary_sin_cos"] = table.to(sd["embed.W_E"].dtype)
    for index, block in enumerate(blocks):
        p = f"blocks.{index}"
        sd[f"{p}.ln1.w"], sd[f"{p}.ln1.b"] = src.take(f"{p}.norm1.weight"), src.take(f"{p}.norm1.bias")
        sd[f"{p}.ln2.w"], sd[f"{p}.ln2.b"] = src.take(f"{p}.norm2.weight"), src.take(f"{p}.norm2.bias")
        attn = block.attn
        if attn.qkv is not None:
            qkv_weight = src.take(f"{p}.attn.qkv.weight")
            q_bias = src.take_optional(f"{p}.attn.q_bias")
            # EVA's k bias is a zero buffer, not a parameter: read it as the source uses it
            k_bias = attn.k_bias.detach().clone() if attn.k_bias is not None else None
            v_bias = src.take_optional(f"{p}.attn.v_bias")
        else:
            qkv_weight = torch.cat([src.take(f"{p}.attn.{n}_proj.weight") for n in ("q", "k", "v")])
            q_bias = src.take_optional(f"{p}.attn.q_proj.bias")
            k_bias = src.take_optional(f"{p}.attn.k_proj.bias")
            v_bias = src.take_optional(f"{p}.attn.v_proj.bias")
        biases = [q_bias, k_bias, v_bias]
        if all(b is None for b in biases):
            qkv_bias = None
        else:
            qkv_bias = torch.cat([b if b is not None else qkv_weight.new_zeros(qkv_weight.shape[0] // 3) for b in biases])
        mlp = _eva_mlp_weights(src, block.mlp, p)
        gate_weight, gate_bias = mlp.pop("gate_weight", None), mlp.pop("gate_bias", None)
        sd.update(
            attention_and_mlp(
                p,
                qkv_weight=qkv_weight,
                qkv_bias=qkv_bias,
                out_weight=src.take(f"{p}.attn.proj.weight"),
                out_bias=src.take_optional(f"{p}.attn.proj.bias"),
                n_heads=cfg.n_heads,
                d_head=cfg.d_head,
                ls_attn=src.take_optional(f"{p}.gamma_1"),
                ls_mlp=src.take_optional(f"{p}.gamma_2"),
                gate_weight=gate_weight,
                gate_bias=gate_bias,
                attn_norm=(src.take(f"{p}.attn.norm.weight"), src.take(f"{p}.attn.norm.bias")) if attn_norm else None,
                mlp_norm=(src.take(f"{p}.mlp.norm.weight"), src.take(f"{p}.mlp.norm.bias")) if mlp_norm else None,
                **mlp,
            )
        )
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


# where a timm checkpoint (or an original big_vision .npz) keeps the position embedding
TIMM_POSITION_KEYS = (
    "pos_embed", "Transformer/posembed_input/pos_embedding", "opt/target/Transformer/posembed_input/pos_embedding",
)


def timm_position_grid(model: nn.Module) -> tuple[int, tuple[int, int], int] | None:
    """(position rows, patch grid, prefix tokens) of a built timm ViT, or None without absolute positions."""
    if getattr(model, "pos_embed", None) is None or not hasattr(model, "patch_embed"):
        return None
    return model.pos_embed.shape[1], tuple(model.patch_embed.grid_size), model.num_prefix_tokens


def timm_downloads(name: str, cache_dir: str | None = None) -> list:
    """The files ``timm.create_model(name, pretrained=True)`` will fetch (``name`` may carry a tag).

    Raises:
        ValueError: timm has no pretrained weights under that name or tag.
    """
    import timm
    from timm.models import get_pretrained_cfg

    from vit_lens.loading.hub import Download

    arch, _, tag = name.partition(".")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None:
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
        known = f"its tags are: {', '.join(tags)}." if tags else "timm has no pretrained weights for it."
        raise ValueError(f"{tag!r} is not a pretrained tag of timm's {arch}; {known}" if tag else f"{arch}: {known}")
    if cfg.file or cfg.state_dict is not None:
        return []
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        filename = cfg.hf_hub_filename or "pytorch_model.bin"
        # timm tries a safetensors twin of a pickle file first
        twin = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
        names = (filename,)
        if filename.endswith(".bin"):
            names = (twin.get(filename, filename[:-4] + ".safetensors"), filename)
        return [Download(repo=repo, filenames=names, revision=revision or None)]
    if cfg.url:
        import torch.hub

        folder = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
        return [Download(url=cfg.url, cached_path=os.path.join(folder, os.path.basename(cfg.url)))]
    raise ValueError(f"timm lists no download for the pretrained weights {name!r}.")
