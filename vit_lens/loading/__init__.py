"""Converters from source libraries to HookedViT; the only place vit_lens imports open_clip, timm or transformers.

One module per source: ``open_clip``, ``timm`` (ViT, DeiT, DINOv2, SigLIP, EVA / EVA02) and ``hf``
(transformers CLIP, ViT, DINOv2, SigLIP). Each returns ``(ViTConfig, state_dict)``.
"""

import difflib
import os
from typing import Any

from torch import nn

_PREFIXES = ("open_clip", "timm")


def load_source_model(name: str, pretrained: str | bool | None = None, **kwargs: Any) -> tuple[str, nn.Module]:
    """Build a source model from ``"open_clip:<arch>"`` or ``"timm:<name>"`` through its own library.

    ``pretrained`` is a pretrained tag (open_clip's ``"laion2b_s34b_b88k"``, timm's
    ``"augreg_in21k"``), a checkpoint file, or True/False for timm's default weights; None builds
    random weights. Returns ``(kind, model)`` in eval mode.
    """
    if not isinstance(name, str) or ":" not in name or name.split(":", 1)[0] not in _PREFIXES:
        raise ValueError(
            f"Model name {name!r} must start with a source prefix: 'open_clip:<arch>' (e.g. 'open_clip:ViT-B-16') "
            "or 'timm:<name>' (e.g. 'timm:deit_small_patch16_224')."
        )
    kind, arch = name.split(":", 1)
    checkpoint = _checkpoint_path(pretrained, name)
    if kind == "open_clip":
        import open_clip

        if not arch.startswith("hf-hub:") and arch not in open_clip.list_models():
            raise ValueError(_unknown(arch, open_clip.list_models(), "open_clip.list_models()"))
        model = open_clip.create_model(arch, pretrained=checkpoint or pretrained or None, **kwargs)
    else:
        import timm

        if not timm.is_model(arch):
            raise ValueError(_unknown(arch, timm.list_models(), "timm.list_models()"))
        if checkpoint:
            model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": checkpoint}, **kwargs)
        elif isinstance(pretrained, str) and pretrained:
            model = timm.create_model(f"{arch.split('.')[0]}.{pretrained}", pretrained=True, **kwargs)
        else:
            model = timm.create_model(arch, pretrained=bool(pretrained), **kwargs)
    return kind, model.eval()


_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")


def _checkpoint_path(pretrained: str | bool | None, name: str) -> str | None:
    """The checkpoint file ``pretrained`` names, or None when it is a tag or a flag.

    Anything that looks like a file (an existing file, a path separator, a checkpoint suffix)
    must exist: a missing file is an error here, never a silent fall-back to downloaded weights.
    """
    if not isinstance(pretrained, (str, os.PathLike)):
        return None
    path = os.fspath(pretrained)
    looks_like_file = os.path.isfile(path) or os.sep in path or path.endswith(_CHECKPOINT_SUFFIXES)
    if not looks_like_file:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file {path!r} for {name!r} does not exist")
    return path


def _unknown(arch: str, known: list[str], lister: str) -> str:
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"Unknown model {arch!r}.{hint} ({lister} lists them all.)"


def source_residual_stream(source: nn.Module, images) -> list:
    """The source model's residual stream at every block boundary, read with forward hooks.

    Returns ``[x_0, x_1, ..., x_L]``: the stream entering block 0 (after ``ln_pre`` / ``norm_pre``)
    and after each block; for comparing a HookedViT with its source layer by layer.
    """
    import torch

    visual = getattr(source, "visual", source)
    visual = getattr(visual, "trunk", visual)  # open_clip's timm towers (EVA-CLIP, SigLIP)
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        blocks, first = list(visual.transformer.resblocks), visual.ln_pre
        run = visual
    elif hasattr(visual, "blocks"):
        blocks, first = list(visual.blocks), visual.norm_pre
        run = getattr(source, "encode_image", visual)
    else:
        raise TypeError(f"source_residual_stream reads open_clip or timm ViTs, got {type(source).__name__}")
    stream: list = []
    handles = [first.register_forward_hook(lambda m, i, o: stream.append(o.detach().clone()))]
    handles += [b.register_forward_hook(lambda m, i, o: stream.append(o.detach().clone())) for b in blocks]
    try:
        with torch.no_grad():
            run(images)
    finally:
        for handle in handles:
            handle.remove()
    return stream
