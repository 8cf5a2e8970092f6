"""Converters from source libraries to HookedViT; the only place vit_lens imports open_clip, timm or transformers.

One module per source: ``open_clip``, ``timm`` (ViT, DeiT, DINOv2, SigLIP, EVA / EVA02) and ``hf``
(transformers CLIP, ViT, DINOv2, SigLIP). Each returns ``(ViTConfig, state_dict)``.
"""

import difflib
import os
from collections.abc import Callable
from typing import Any

from torch import nn

_PREFIXES = ("open_clip", "timm")
# open_clip model names that read their configuration from elsewhere instead of open_clip's registry
_OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")


def check_model_name(name: Any) -> tuple[str, str]:
    """``(kind, arch)`` of ``"open_clip:<arch>"`` / ``"timm:<name>"``, refusing unknown prefixes and architectures.

    Imports the source library (a few seconds) to check the architecture exists, so a command
    line can report a misspelt name before it starts any expensive work.
    """
    if not isinstance(name, str):
        raise TypeError(
            f"The model name must be a string such as 'open_clip:ViT-B-16' or 'timm:deit_small_patch16_224', "
            f"got {name!r} ({type(name).__name__})."
        )
    if ":" not in name or name.split(":", 1)[0] not in _PREFIXES:
        raise ValueError(
            f"Model name {name!r} must start with a source prefix: 'open_clip:<arch>' (e.g. 'open_clip:ViT-B-16') "
            "or 'timm:<name>' (e.g. 'timm:deit_small_patch16_224')."
        )
    kind, arch = name.split(":", 1)
    if kind == "open_clip":
        import open_clip

        if not arch.startswith(_OPEN_CLIP_SCHEMAS) and arch not in open_clip.list_models():
            raise ValueError(_unknown(arch, open_clip.list_models(), "open_clip.list_models()"))
    else:
        import timm

        if not timm.is_model(arch):
            raise ValueError(_unknown(arch, timm.list_models(), "timm.list_models()"))
    return kind, arch


def load_source_model(
    name: Any, pretrained: str | bool | None = None, *, resample_pos_embed: bool = False, **kwargs: Any
) -> tuple[str, nn.Module]:
    """Build a source model from ``"open_clip:<arch>"`` or ``"timm:<name>"`` through its own library.

    ``pretrained`` is a pretrained tag (open_clip's ``"laion2b_s34b_b88k"``, timm's
    ``"augreg_in21k"``), a checkpoint file, or True/False for timm's default weights; None builds
    random weights. Returns ``(kind, model)`` in eval mode.

    Before the library runs, a checkpoint file is checked (it exists, is a file, and its format
    matches its suffix) and so is every download it would make (cached, or the hub reachable:
    :class:`~vit_lens.loading.hub.HubUnavailableError` otherwise, at once instead of after the
    library's retries). A checkpoint whose position embeddings are for another patch grid is
    refused unless ``resample_pos_embed=True``: the libraries would resample them silently.
    """
    from vit_lens.loading.checkpoints import check_position_grid
    from vit_lens.loading.hub import check_downloads, hub_offline_mode

    kind, arch = check_model_name(name)
    checkpoint = _checkpoint_path(pretrained, name, is_tag=lambda tag: _is_tag(kind, arch, tag))
    cache_dir = kwargs.get("cache_dir")
    described = name if pretrained in (None, False) else f"{name} (pretrained={pretrained!r})"
    if kind == "open_clip":
        import open_clip

        from vit_lens.loading.open_clip import OPEN_CLIP_POSITION_KEYS, open_clip_downloads, open_clip_position_grid

        tag = None if checkpoint else pretrained or None
        if tag is not None and not arch.startswith(_OPEN_CLIP_SCHEMAS):
            if not isinstance(tag, str):
                raise TypeError(f"pretrained for {name!r} is an open_clip tag or a checkpoint path, got {tag!r}.")
            if not open_clip.get_pretrained_cfg(arch, tag):
                tags = open_clip.list_pretrained_tags_by_model(arch)
                raise ValueError(
                    f"{tag!r} is neither a pretrained tag of {arch} nor a checkpoint file; its tags are: "
                    + (", ".join(tags) if tags else "none (pass a checkpoint file)") + "."
                )
        if arch.startswith("hf-hub:"):
            # open_clip only warns when an hf-hub model's weights fail to download, then keeps random ones
            kwargs.setdefault("require_pretrained", True)
        force_offline = check_downloads(described, open_clip_downloads(arch, tag, **kwargs), cache_dir)
        with hub_offline_mode(force_offline):
            model = open_clip.create_model(arch, pretrained=checkpoint or tag, **kwargs)
        position_keys, position = OPEN_CLIP_POSITION_KEYS, open_clip_position_grid(model)
    else:
        import timm

        from vit_lens.loading.timm import TIMM_POSITION_KEYS, timm_downloads, timm_position_grid

        if checkpoint:
            model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": checkpoint}, **kwargs)
        else:
            if isinstance(pretrained, str) and pretrained:
                arch = f"{arch.split('.')[0]}.{pretrained}"
            elif pretrained not in (None, True, False):
                raise TypeError(
                    f"pretrained for {name!r} is True/False, a timm tag or a checkpoint path, got {pretrained!r}."
                )
            force_offline = bool(pretrained) and check_downloads(described, timm_downloads(arch, cache_dir), cache_dir)
            with hub_offline_mode(force_offline):
                model = timm.create_model(arch, pretrained=bool(pretrained), **kwargs)
        position_keys, position = TIMM_POSITION_KEYS, timm_position_grid(model)
    if checkpoint and position is not None and not resample_pos_embed:
        check_position_grid(checkpoint, position_keys, *position, owner=name)
    return kind, model.eval()


def _is_tag(kind: str, arch: str, tag: str) -> bool:
    if kind == "open_clip":
        import open_clip

        return bool(open_clip.get_pretrained_cfg(arch, tag))
    import timm

    return f"{arch.split('.')[0]}.{tag}" in timm.list_pretrained(f"{arch.split('.')[0]}.*")


def _checkpoint_path(
    pretrained: str | bool | None, name: str, is_tag: Callable[[str], bool] = lambda tag: False
) -> str | None:
    """The checkpoint file ``pretrained`` names, or None when it is a tag or a flag.

    Anything that looks like a file (an existing file, a path separator, a checkpoint suffix, a
    directory whose name is not one of the library's tags)
    must be a readable checkpoint: a missing file is an error here, never a silent fall-back to
    downloaded weights; a directory, or a file whose suffix would send it to the wrong reader,
    is an error that says what it is.
    """
    from vit_lens.loading.checkpoints import CHECKPOINT_SUFFIXES, check_suffix_matches_format, directory_error

    if not isinstance(pretrained, (str, os.PathLike)):
        return None
    path = os.fspath(pretrained)
    looks_like_file = (
        os.path.isfile(path) or os.sep in path or path.endswith(CHECKPOINT_SUFFIXES)
        or (os.path.isdir(path) and not is_tag(path))
    )
    if not looks_like_file:
        return None
    if os.path.isdir(path):
        raise directory_error(path, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file {path!r} for {name!r} does not exist")
    check_suffix_matches_format(path, name)
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
