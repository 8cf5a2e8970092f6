"""SAE files: SAELens's on-disk format (read and written) and ViT-Prisma's published vision-SAE layout (read).

SAELens format (6.x): a folder holding

* ``cfg.json``: ``d_in``, ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``,
  ``normalize_activations``, ``reshape_activations``, ``architecture`` (``"standard"``,
  ``"topk"`` with ``k`` and ``rescale_acts_by_decoder_norm``, ``"jumprelu"``, ``"transcoder"`` /
  ``"jumprelu_transcoder"`` with ``d_out``) and ``metadata`` (``hook_name``, ``hook_name_out``,
  ``model_name``, ``sae_lens_version``, ...);
* ``sae_weights.safetensors``: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` (and ``threshold``);
* ``activation_scaler.json`` (optional): ``{"scaling_factor": s}`` for an unfolded
  ``normalize_activations="expected_average_only_in"``.

What vit_lens adds lives in ``metadata["vit_lens"]`` (SAELens ignores it): the token selection,
the JumpReLU bandwidth, and for a BatchTopK SAE its ``k``. A BatchTopK SAE is written as a
``"jumprelu"`` SAE with its inference threshold, the way SAELens exports its own BatchTopK SAEs,
so SAELens computes the same features; vit_lens reads it back as BatchTopK. A TopK transcoder has
no SAELens class and is written as ``"topk_transcoder"``, which only vit_lens reads.

ViT-Prisma layout: a folder with ``config.json`` (its ``VisionModelSAERunnerConfig``:
``d_in``, ``expansion_factor`` or ``d_sae``, ``hook_point_layer`` + ``layer_subtype``,
``activation_fn_str`` / ``activation_fn_kwargs``, ``architecture``, ``normalize_activations``,
``cls_token_only``, ``use_patches_only``, transcoder fields) and a ``.pt`` checkpoint (such as
``n_images_2600058.pt``) holding the state dict, or a legacy ``{"cfg": ..., "state_dict": ...}``
checkpoint whose ``cfg`` is a plain dict.

Saving is atomic: the folder is written under a temporary name beside the target and renamed
into place, so a crash never leaves a half-written SAE under the real name. Loading checks that
every file is there, whole, and consistent with the config, and says what is wrong otherwise.

Example:
    >>> from vit_lens.sae import SAE, SAEConfig, save_sae, load_sae
    >>> sae = SAE(SAEConfig(d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post"))
    >>> folder = save_sae(sae, tmp_path / "my_sae")  # doctest: +SKIP
    >>> load_sae(folder).cfg.hook_name  # doctest: +SKIP
    'blocks.1.hook_resid_post'
"""

import json
import os
import shutil
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vit_lens.sae.model import NORMALIZATIONS, SAE, SAEConfig, dtype_name

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SCALER_FILENAME = "activation_scaler.json"
PRISMA_CONFIG_FILENAME = "config.json"
# The SAELens release whose cfg.json layout these files follow; SAELens reads older layouts differently.
SAE_LENS_FORMAT_VERSION = "6.0.0"

# SAELens architecture name -> (vit_lens architecture, is a transcoder)
_FROM_SAE_LENS = {
    "standard": ("standard", False),
    "topk": ("topk", False),
    "jumprelu": ("jumprelu", False),
    "transcoder": ("standard", True),
    "jumprelu_transcoder": ("jumprelu", True),
    "topk_transcoder": ("topk", True),  # vit_lens's own name: SAELens has no TopK transcoder
}
# Metadata keys that become SAEConfig fields rather than staying in cfg.metadata.
_MAPPED_METADATA = ("hook_name", "hook_name_out", "model_name", "vit_lens")
_SAFETENSORS_EXTRA_ONES = ("scaling_factor", "finetuning_scaling_factor")


def _vit_lens_version() -> str:
    try:
        return version("vit_lens")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------- writing


def sae_lens_config(sae: SAE) -> dict[str, Any]:
    """The ``cfg.json`` content SAELens reads for ``sae`` (as :func:`save_sae` writes it, scaling factor unfolded)."""
    cfg = sae.cfg
    saved_architecture = "jumprelu" if cfg.architecture == "batchtopk" else cfg.architecture
    if cfg.is_transcoder:
        saved_architecture = "transcoder" if saved_architecture == "standard" else f"{saved_architecture}_transcoder"
    ours: dict[str, Any] = {"version": _vit_lens_version(), "token_selection": cfg.token_selection}
    if cfg.architecture == "jumprelu":
        ours.update(jumprelu_bandwidth=cfg.jumprelu_bandwidth, jumprelu_init_threshold=cfg.jumprelu_init_threshold)
    if cfg.architecture == "batchtopk":
        ours.update(architecture="batchtopk", k=cfg.k, rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm)
    metadata = {key: value for key, value in cfg.metadata.items() if key not in _MAPPED_METADATA}
    metadata.setdefault("sae_lens_version", SAE_LENS_FORMAT_VERSION)
    metadata.update(hook_name=cfg.hook_name, model_name=cfg.model_name, vit_lens=ours)
    if cfg.is_transcoder:
        metadata["hook_name_out"] = cfg.hook_name_out
    saved = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": cfg.reshape_activations,
        "metadata": metadata,
        "architecture": saved_architecture,
    }
    if cfg.architecture == "topk":
        saved.update(k=cfg.k, rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm)
    if cfg.is_transcoder:
        saved["d_out"] = cfg.d_out
    return saved


def _exportable_copy(sae: SAE, fold_scaling_factor: bool) -> SAE:
    """A copy of ``sae`` in the form SAELens computes the same outputs from (the original is left alone)."""
    copy = SAE(SAEConfig(**{**sae.cfg.to_dict(), "metadata": dict(sae.cfg.metadata)}))
    copy.load_state_dict(sae.state_dict())
    copy.scaling_factor = sae.scaling_factor
    if fold_scaling_factor and copy.cfg.normalize_activations == "expected_average_only_in":
        copy.fold_activation_norm_scaling_factor()
    if copy.cfg.architecture == "batchtopk" and copy.cfg.rescale_acts_by_decoder_norm:
        # Written as JumpReLU, which compares plain pre-activations with the threshold: unit decoder rows make
        # pre * ||W_dec[i]|| the plain pre-activation, without changing any output.
        copy.fold_W_dec_norm()
    return copy


def install_folder(temporary: Path, path: Path) -> None:
    """Put the complete folder ``temporary`` at ``path`` by renames, so no reader ever sees it half written.

    An existing ``path`` is first renamed aside and deleted only once the new folder is in place.
    """
    if path.exists():
        retired = path.parent / f".{path.name}.replaced-{uuid.uuid4().hex[:8]}"
        path.rename(retired)
        temporary.rename(path)
        shutil.rmtree(retired)
    else:
        temporary.rename(path)


def save_sae(
    sae: Any,  # checked below, with a directed message
    path: str | Path,
    *,
    fold_scaling_factor: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``sae`` to the folder ``path`` in SAELens's format (``cfg.json`` + ``sae_weights.safetensors``).

    Args:
        sae: The SAE or transcoder.
        path: The folder to create.
        fold_scaling_factor: For ``normalize_activations="expected_average_only_in"`` with a
            scaling factor: fold it into the weights (SAELens's export; the file says ``"none"``
            and SAELens computes the same outputs), or keep it in ``activation_scaler.json`` (as
            SAELens's training checkpoints do; SAELens's inference SAE ignores it).
        overwrite: Replace an existing folder ``path`` (atomically); otherwise it is an error.

    Returns:
        ``path`` as a Path.
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"save_sae saves a vit_lens.sae.SAE, got a {type(sae).__name__}")
    path = Path(path)
    if path.exists() and not (overwrite and path.is_dir()):
        what = "a folder" if path.is_dir() else "a file"
        raise FileExistsError(f"{path} exists ({what}); pass overwrite=True to replace a saved SAE, or another path.")
    export = _exportable_copy(sae, fold_scaling_factor)
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in export.state_dict().items()}
        save_file(state, str(temporary / WEIGHTS_FILENAME))
        if export.cfg.normalize_activations == "expected_average_only_in" and export.scaling_factor is not None:
            (temporary / SCALER_FILENAME).write_text(json.dumps({"scaling_factor": float(export.scaling_factor)}))
        # cfg.json last: a folder with a config has every file the config describes.
        (temporary / CFG_FILENAME).write_text(json.dumps(sae_lens_config(export), indent=2))
        install_folder(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------- reading


def _read_json(file: Path, what: str) -> dict[str, Any]:
    try:
        content = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{file} is not valid JSON ({error}); the {what} may have been cut short while written."
        ) from None
    if not isinstance(content, dict):
        raise ValueError(f"{file} holds a {type(content).__name__}, not the {what} (a JSON object).")
    return content


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{file} is not a complete safetensors file ({error}); it may have been cut short while written or copied."
        ) from None


def _check_weights(state: dict[str, Tensor], cfg: SAEConfig, source: str) -> dict[str, Tensor]:
    """``state`` as the SAE's state dict, after checking every name and shape against ``cfg``."""
    state = dict(state)
    for name in _SAFETENSORS_EXTRA_ONES:
        if name in state:
            factor = state.pop(name)
            if not torch.all(factor == 1):
                raise ValueError(
                    f"{source} has a {name!r} that is not all ones (SAELens's fine-tuning scaling factor); "
                    "vit_lens does not support it."
                )
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_out), "b_dec": (cfg.d_out,)
    }
    if cfg.architecture in ("jumprelu", "batchtopk"):
        expected["threshold"] = (cfg.d_sae,)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: the weights do not match a {cfg.architecture} {'transcoder' if cfg.is_transcoder else 'SAE'}: "
            f"missing {missing}, unexpected {unexpected}."
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(
                f"{source}: {name} has shape {tuple(state[name].shape)}, but the config (d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae}, d_out={cfg.d_out}) needs {shape}."
            )
    return state


def _build(cfg: SAEConfig, state: dict[str, Tensor], source: str, scaling_factor: float | None = None) -> SAE:
    state = _check_weights(state, cfg, source)
    sae = SAE(cfg)
    sae.load_state_dict({name: tensor.to(sae.W_enc) for name, tensor in state.items()}, strict=True)
    sae.scaling_factor = scaling_factor
    return sae.eval()


def _required(cfg: dict[str, Any], key: str, source: str) -> Any:
    if key not in cfg:
        raise ValueError(f"{source} has no {key!r}; it is not a complete SAE config.")
    return cfg[key]


def config_from_sae_lens(
    saved: dict[str, Any],
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    source: str = "cfg.json",
) -> SAEConfig:
    """The :class:`SAEConfig` of a SAELens ``cfg.json`` dict (6.x layout, or the flat pre-6 one)."""
    saved_architecture = saved.get("architecture", "standard")
    if saved_architecture not in _FROM_SAE_LENS:
        raise ValueError(
            f"{source}: SAELens architecture {saved_architecture!r} is not supported; vit_lens reads "
            f"{tuple(_FROM_SAE_LENS)}."
        )
    architecture, transcoder = _FROM_SAE_LENS[saved_architecture]
    metadata = dict(saved.get("metadata") or {})
    for key in ("hook_name", "hook_name_out", "model_name", "hook_head_index"):  # pre-6 files keep these at the top
        if key in saved and key not in metadata:
            metadata[key] = saved[key]
    if "hook_point" in saved and "hook_name" not in metadata:
        metadata["hook_name"] = saved["hook_point"]
    if metadata.get("hook_head_index") is not None:
        raise ValueError(f"{source}: SAEs on one attention head's slice (hook_head_index) are not supported.")
    ours = dict(metadata.get("vit_lens") or {})
    architecture = ours.get("architecture", architecture)
    normalize = saved.get("normalize_activations", "none")
    if isinstance(normalize, bool):  # pre-6 SAELens wrote a flag for the average-norm scaling
        normalize = "expected_average_only_in" if normalize else "none"
    normalize = "none" if normalize is None else normalize
    if normalize not in NORMALIZATIONS:
        raise ValueError(
            f"{source}: normalize_activations={normalize!r} is not supported; vit_lens has {NORMALIZATIONS}."
        )
    hook_name_out = metadata.get("hook_name_out")
    if transcoder and hook_name_out is None:
        raise ValueError(
            f"{source} is a transcoder but names no metadata.hook_name_out (the hook point it writes); add it to "
            "cfg.json so the transcoder can be spliced."
        )
    if architecture == "topk":
        k = saved.get("k", (saved.get("activation_fn_kwargs") or {}).get("k"))
    else:
        k = ours.get("k") if architecture == "batchtopk" else None
    fields = dict(
        d_in=_required(saved, "d_in", source),
        d_sae=_required(saved, "d_sae", source),
        architecture=architecture,
        k=k,
        hook_name=metadata.get("hook_name"),
        hook_name_out=hook_name_out if transcoder else None,
        d_out=_required(saved, "d_out", source) if transcoder else None,
        apply_b_dec_to_input=saved.get("apply_b_dec_to_input", not transcoder),
        normalize_activations=normalize,
        reshape_activations=saved.get("reshape_activations", "none"),
        rescale_acts_by_decoder_norm=saved.get(
            "rescale_acts_by_decoder_norm", ours.get("rescale_acts_by_decoder_norm", False)
        ),
        token_selection=ours.get("token_selection", "all"),
        model_name=metadata.get("model_name"),
        dtype=dtype_name(dtype if dtype is not None else saved.get("dtype", "float32")),
        device=str(device) if device is not None else "cpu",
        metadata={key: value for key, value in metadata.items() if key not in _MAPPED_METADATA},
    )
    for key in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
        if key in ours:
            fields[key] = ours[key]
    try:
        return SAEConfig(**fields)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def load_sae(
    path: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> SAE:
    """Load an SAE saved in SAELens's format (by vit_lens or SAELens), or a ViT-Prisma vision SAE.

    Args:
        path: A SAELens folder (``cfg.json`` + ``sae_weights.safetensors``), or a ViT-Prisma folder
            (``config.json`` + one ``.pt`` checkpoint) or checkpoint file.
        device: Where to put the weights (default: CPU).
        dtype: The SAE's dtype (default: the file's).

    Returns:
        The SAE, in eval mode.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No SAE at {path}: it does not exist.")
    if path.is_file():
        if path.suffix == ".pt":
            return load_prisma_sae(path, device=device, dtype=dtype)
        raise ValueError(
            f"{path} is a file; load_sae takes a SAELens folder ({CFG_FILENAME} + {WEIGHTS_FILENAME}) or a ViT-Prisma "
            f"folder or .pt checkpoint."
        )
    if (path / CFG_FILENAME).is_file():
        weights = path / WEIGHTS_FILENAME
        if not weights.is_file():
            raise FileNotFoundError(
                f"{path} has {CFG_FILENAME} but no {WEIGHTS_FILENAME}: the SAE folder is incomplete."
            )
        saved = _read_json(path / CFG_FILENAME, "SAE config")
        cfg = config_from_sae_lens(saved, device=None if device is None else str(device), dtype=dtype, source=str(path))
        scaling_factor = None
        if (path / SCALER_FILENAME).is_file() and cfg.normalize_activations == "expected_average_only_in":
            scaling_factor = float(_required(_read_json(path / SCALER_FILENAME, "activation scaler"), "scaling_factor",
                                             str(path / SCALER_FILENAME)))
        return _build(cfg, _read_safetensors(weights), str(path), scaling_factor)
    if (path / PRISMA_CONFIG_FILENAME).is_file() or any(path.glob("*.pt")):
        return load_prisma_sae(path, device=device, dtype=dtype)
    raise FileNotFoundError(
        f"{path} holds no SAE: expected SAELens's {CFG_FILENAME} + {WEIGHTS_FILENAME}, or ViT-Prisma's "
        f"{PRISMA_CONFIG_FILENAME} + a .pt checkpoint."
    )


def from_sae_lens(sae: Any) -> SAE:
    """A vit_lens SAE with the weights and config of a SAELens inference SAE object (same outputs)."""
    cfg_method = getattr(getattr(sae, "cfg", None), "to_dict", None)
    if cfg_method is None or not hasattr(sae, "state_dict"):
        raise TypeError(
            f"from_sae_lens takes a SAELens SAE (an object with .cfg.to_dict()), got a {type(sae).__name__}"
        )
    source = f"SAELens {type(sae).__name__}"
    return _build(config_from_sae_lens(cfg_method(), device=str(sae.W_enc.device), source=source),
                  {name: tensor.detach() for name, tensor in sae.state_dict().items()}, source)


# ---------------------------------------------------------------------------------------------- ViT-Prisma


def _prisma_value(value: Any) -> Any:
    """ViT-Prisma's JSON encoding of torch types: ``{"__type__": "torch.dtype", "value": "torch.float32"}``."""
    if isinstance(value, dict) and "__type__" in value:
        return value.get("value")
    return value


def _prisma_files(path: Path) -> tuple[Path, Path]:
    if path.is_file():
        weights, folder = path, path.parent
    else:
        checkpoints = sorted(path.glob("*.pt"))
        if len(checkpoints) != 1:
            found = ", ".join(p.name for p in checkpoints) or "none"
            raise FileNotFoundError(
                f"{path} should hold one ViT-Prisma .pt checkpoint beside {PRISMA_CONFIG_FILENAME}, found: {found}. "
                "Pass the checkpoint file itself."
            )
        weights, folder = checkpoints[0], path
    return weights, folder / PRISMA_CONFIG_FILENAME


def _read_prisma_checkpoint(weights: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    try:
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a truncated zip or a pickled object
        raise ValueError(
            f"{weights} cannot be read as a checkpoint of tensors ({type(error).__name__}: {error}). A ViT-Prisma "
            "legacy checkpoint whose 'cfg' is a pickled config object needs vit_prisma to unpickle; save its "
            f"state_dict as a .pt beside its {PRISMA_CONFIG_FILENAME} instead."
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{weights} holds a {type(checkpoint).__name__}, not a state dict.")
    if "state_dict" in checkpoint:
        embedded = checkpoint.get("cfg")
        return checkpoint["state_dict"], embedded if isinstance(embedded, dict) else None
    return checkpoint, None


def load_prisma_sae(
    path: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> SAE:
    """Load a ViT-Prisma vision SAE or transcoder (``config.json`` + a ``.pt`` checkpoint) as a vit_lens SAE.

    ViT-Prisma's settings map as follows: the hook point is ``blocks.{hook_point_layer}.{layer_subtype}``
    (its HookedViT uses TransformerLens's names, as vit_lens does); ``activation_fn_str`` ``"relu"``
    gives a standard SAE and ``"topk"`` a TopK SAE with ``activation_fn_kwargs["k"]``; a checkpoint
    with a ``threshold`` gives a JumpReLU SAE; ``cls_token_only`` and ``use_patches_only`` give the
    token selection; ``normalize_activations`` keeps its meaning (ViT-Prisma's default, used when
    the key is missing, is ``"layer_norm"``). ViT-Prisma always subtracts ``b_dec`` from the input;
    a transcoder's input bias ``b_dec`` is folded into ``b_enc`` and its ``b_dec_out`` becomes
    ``b_dec``, which leaves every output the same. Gated SAEs, skip connections and per-head SAEs
    are refused with the reason.

    Args:
        path: The folder, or the ``.pt`` checkpoint (``config.json`` beside it, unless the
            checkpoint embeds its config as a dict).
        device: Where to put the weights (default: CPU).
        dtype: The SAE's dtype (default: the config's).
    """
    weights, config_file = _prisma_files(Path(path))
    state, embedded = _read_prisma_checkpoint(weights)
    if config_file.is_file():
        saved = {key: _prisma_value(value) for key, value in _read_json(config_file, "ViT-Prisma SAE config").items()}
    elif embedded is not None:
        saved = {key: _prisma_value(value) for key, value in embedded.items()}
    else:
        raise FileNotFoundError(f"{weights} has no {PRISMA_CONFIG_FILENAME} beside it and no config inside it.")
    source = f"ViT-Prisma SAE {weights}"
    d_in = _required(saved, "d_in", source)
    d_sae = saved.get("d_sae") or d_in * _required(saved, "expansion_factor", source)
    if saved.get("hook_point_head_index") is not None:
        raise ValueError(f"{source}: SAEs on one attention head's slice (hook_point_head_index) are not supported.")
    # ViT-Prisma derives the hook name from these two fields (its defaults: layer 9, the residual stream after it).
    layer, subtype = saved.get("hook_point_layer", 9), saved.get("layer_subtype", "hook_resid_post")
    hook_name = saved.get("hook_point") or f"blocks.{layer}.{subtype}"
    prisma_architecture = saved.get("architecture", "standard")
    activation = saved.get("activation_fn_str", "relu")
    k = None
    if prisma_architecture == "jumprelu" or "threshold" in state:
        architecture = "jumprelu"
    elif prisma_architecture == "standard" and activation == "relu":
        architecture = "standard"
    elif prisma_architecture == "standard" and activation == "topk":
        architecture, k = "topk", (saved.get("activation_fn_kwargs") or {}).get("k")
    else:
        raise ValueError(
            f"{source}: architecture={prisma_architecture!r} with activation_fn_str={activation!r} is not supported; "
            "vit_lens reads ViT-Prisma's standard SAEs with 'relu' or 'topk' and JumpReLU SAEs."
        )
    if saved.get("cls_token_only"):
        token_selection = "cls"
    elif saved.get("use_patches_only"):
        token_selection = "patches"
    else:
        token_selection = "all"
    transcoder = bool(saved.get("is_transcoder"))
    state = dict(state)
    if transcoder:
        if state.get("W_skip") is not None or saved.get("transcoder_with_skip_connection"):
            raise ValueError(f"{source}: transcoders with a skip connection (W_skip) are not supported.")
        missing = [name for name in ("W_enc", "b_enc", "b_dec", "b_dec_out") if name not in state]
        if missing:
            raise ValueError(f"{source}: the transcoder checkpoint lacks {missing}.")
        input_bias = state.pop("b_dec")
        # (x - b_in) @ W_enc + b_enc == x @ W_enc + (b_enc - b_in @ W_enc): the same pre-activations.
        state["b_enc"] = state["b_enc"] - input_bias.to(state["W_enc"]) @ state["W_enc"]
        state["b_dec"] = state.pop("b_dec_out")
    normalize = saved.get("normalize_activations", "layer_norm")
    try:
        cfg = SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            architecture=architecture,
            k=k,
            hook_name=hook_name,
            hook_name_out=(
                f"blocks.{saved.get('out_hook_point_layer', 9)}.{saved.get('layer_out_subtype', 'hook_mlp_out')}"
                if transcoder else None
            ),
            d_out=saved.get("d_out") if transcoder else None,
            apply_b_dec_to_input=not transcoder,
            normalize_activations="none" if normalize is None else normalize,
            token_selection=token_selection,
            model_name=saved.get("model_name"),
            dtype=dtype_name(dtype if dtype is not None else saved.get("dtype") or "float32"),
            device=str(device) if device is not None else "cpu",
            metadata={"source": "ViT-Prisma", "checkpoint": weights.name},
        )
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    return _build(cfg, state, source)

