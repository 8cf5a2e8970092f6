"""open_clip VisionTransformer -> (ViTConfig, HookedViT state dict)."""

import os

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
    """``open_clip.get_tokenizer(arch)``, after checking the files a transformers tokenizer would download."""
    import open_clip

    from vit_lens.loading.hub import Download, check_downloads, hub_offline_mode

    if arch.startswith("hf-hub:"):
        downloads = [Download(repo=arch[len("hf-hub:") :], filenames=("open_clip_config.json",))]
    else:
        text_cfg = (open_clip.get_model_config(arch) or {}).get("text_cfg") or {}
        repo = text_cfg.get("hf_tokenizer_name")
        downloads = [Download(repo=repo, filenames=("tokenizer_config.json", "tokenizer.json"))] if repo else []
    with hub_offline_mode(check_downloads(f"the tokenizer of open_clip:{arch}", downloads)):
        return open_clip.get_tokenizer(arch)


def open_clip_imagenet_classnames() -> tuple:
    """The ImageNet-1k class names open_clip ships for zero-shot evaluation."""
    from open_clip import IMAGENET_CLASSNAMES

    return tuple(IMAGENET_CLASSNAMES)


# where a whole open_clip checkpoint keeps the image tower's position embedding
OPEN_CLIP_POSITION_KEYS = ("visual.positional_embedding", "visual.trunk.pos_embed")
_HF_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_TEXT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def open_clip_position_grid(model: nn.Module) -> tuple[int, tuple[int, int], int] | None:
    """(position rows, patch grid, prefix tokens) of a built open_clip model's image tower, or None."""
    visual = getattr(model, "visual", model)
    if hasattr(visual, "positional_embedding"):
        return visual.positional_embedding.shape[0], tuple(visual.grid_size), 1
    trunk = getattr(visual, "trunk", None)
    if getattr(trunk, "pos_embed", None) is not None and hasattr(trunk, "patch_embed"):
        return trunk.pos_embed.shape[1], tuple(trunk.patch_embed.grid_size), trunk.num_prefix_tokens
    return None


def open_clip_downloads(arch: str, pretrained: str | None, cache_dir: str | None = None, **kwargs) -> list:
    """The files ``open_clip.create_model(arch, pretrained, **kwargs)`` will fetch.

    A pretrained tag's weights (from the hub, or OpenAI's URL for tags without a hub copy), an
    ``hf-hub:`` model's config and weights, and a transformers text tower's config and (for
    random CLIP weights) its own pretrained weights.
    """
    import open_clip

    from vit_lens.loading.hub import Download

    if arch.startswith("hf-hub:"):
        repo = arch[len("hf-hub:") :]
        return [Download(repo=repo, filenames=("open_clip_config.json",)), Download(repo=repo, filenames=_HF_WEIGHTS)]
    downloads = []
    if pretrained:
        tag = open_clip.get_pretrained_cfg(arch, pretrained)
        if tag.get("hf_hub"):
            repo, filename = os.path.split(tag["hf_hub"])
            # open_clip tries a safetensors twin of a pickle file first
            if not filename or filename == _HF_WEIGHTS[1]:
                names = _HF_WEIGHTS
            elif filename.endswith((".bin", ".pth")):
                names = (filename[:-4] + ".safetensors", filename)
            else:
                names = (filename,)
            downloads.append(Download(repo=repo, filenames=names))
        elif tag.get("url"):
            folder = cache_dir or os.path.expanduser("~/.cache/clip")
            downloads.append(Download(url=tag["url"], cached_path=os.path.join(folder, os.path.basename(tag["url"]))))
    text_model = ((open_clip.get_model_config(arch) or {}).get("text_cfg") or {}).get("hf_model_name")
    if text_model:
        downloads.append(Download(repo=text_model, filenames=("config.json",)))
        if not pretrained and kwargs.get("pretrained_text", kwargs.get("pretrained_hf", True)):
            downloads.append(Download(repo=text_model, filenames=_HF_TEXT_WEIGHTS))
    return downloads
