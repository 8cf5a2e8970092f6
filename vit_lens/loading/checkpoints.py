"""Checkpoint files: what a file really is, the shape of one tensor in it, and what a directory holds.

The source libraries pick their reader by the file's suffix, so a PyTorch file named
``.safetensors`` fails with "header too large" and a text file with a pickle error. These
helpers look at the first bytes instead and say what the file is. Nothing here unpickles
arbitrary objects: safetensors headers, zip listings and ``torch.load(weights_only=True)`` only.
"""

import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")

_FORMAT_NAMES = {
    "safetensors": "a safetensors file",
    "pytorch": "a PyTorch pickle file (written by torch.save)",
    "numpy": "a NumPy .npz archive",
    "unknown": "neither a safetensors file, a torch.save file nor an .npz archive",
}
# where a whole checkpoint keeps its state dict, in the order open_clip and timm look
_NESTED_STATE_DICT_KEYS = ("state_dict", "model", "module")


def checkpoint_format(path: str | os.PathLike) -> str:
    """What a file is, read from its first bytes.

    Returns:
        ``"safetensors"``, ``"pytorch"`` (torch.save, zip or legacy), ``"numpy"`` (.npz) or ``"unknown"``.
    """
    with open(path, "rb") as file:
        head = file.read(9)
        size = os.fstat(file.fileno()).st_size
    if head[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.endswith(".npy") for name in names):
            return "numpy"
        if any(name.endswith(".pkl") for name in names):
            return "pytorch"
        return "unknown"
    # safetensors first: an 8-byte little-endian header length, then the JSON header. Its first byte is the
    # length's lowest byte, which is 0x80 for one header length in 256, so it cannot be told from a pickle by
    # that byte; a legacy torch.save file fails this test (its "length" exceeds the file, its byte 8 is no "{").
    if len(head) == 9 and 0 < int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # the pickle protocol opcode that starts a legacy torch.save file
        return "pytorch"
    return "unknown"


def describe_format(path: str | os.PathLike) -> str:
    """What the file is, in words ("a PyTorch pickle file (written by torch.save)")."""
    return _FORMAT_NAMES[checkpoint_format(path)]


def require_safetensors(path: str | os.PathLike, reader: str) -> None:
    """Refuse a file that is not safetensors before a safetensors reader fails on it with "header too large".

    Args:
        path: The file.
        reader: Who reads it and what writes such files, for the message
            (``"load_toy_clip reads the files save_toy_clip writes"``).
    """
    fmt = checkpoint_format(path)
    if fmt == "safetensors":
        return
    if fmt == "pytorch":
        converted = Path(path).with_suffix(".safetensors")
        raise ValueError(
            f"{os.fspath(path)!r} is {_FORMAT_NAMES[fmt]}, not safetensors; {reader}, and vit_lens never unpickles "
            f"files. To convert a file you trust: safetensors.torch.save_file(torch.load({os.fspath(path)!r}, "
            f"weights_only=True), {os.fspath(converted)!r})."
        )
    what = "a NumPy .npz archive" if fmt == "numpy" else "not a safetensors file (it has no safetensors header)"
    raise ValueError(f"{os.fspath(path)!r} is {what}; {reader}.")


def check_suffix_matches_format(path: str | os.PathLike, owner: str) -> None:
    """Refuse a checkpoint whose suffix would send its library to the wrong reader.

    open_clip and timm read ``.safetensors`` with safetensors, ``.npz`` with NumPy and anything
    else with ``torch.load``; ``owner`` names the model, for the message.
    """
    fmt = checkpoint_format(path)
    suffix = Path(path).suffix.lower()
    expected = {"safetensors": (".safetensors",), "numpy": (".npz",)}.get(fmt)
    if fmt == "unknown":
        raise ValueError(f"Checkpoint {os.fspath(path)!r} for {owner!r} is {_FORMAT_NAMES[fmt]}.")
    if expected is None and suffix in (".safetensors", ".npz"):
        raise ValueError(
            f"Checkpoint {os.fspath(path)!r} for {owner!r} is {_FORMAT_NAMES[fmt]}, but its {suffix} suffix sends it "
            f"to the wrong reader: rename it to end in .pt, or convert it to safetensors."
        )
    if expected is not None and suffix not in expected:
        raise ValueError(
            f"Checkpoint {os.fspath(path)!r} for {owner!r} is {_FORMAT_NAMES[fmt]}, but its {suffix or 'missing'} "
            f"suffix sends it to torch.load: rename it to end in {expected[0]}."
        )


def directory_error(path: str | os.PathLike, owner: str) -> IsADirectoryError:
    """The error for a directory given where a checkpoint file is expected, naming the files inside it."""
    inside = sorted(p for p in Path(path).iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    if inside:
        shown = ", ".join(repr(os.fspath(p)) for p in inside[:5])
        shown += f" and {len(inside) - 5} more" if len(inside) > 5 else ""
        hint = f"pass the checkpoint file inside it: {shown}"
    else:
        hint = f"it holds no checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)})"
    return IsADirectoryError(
        f"pretrained={os.fspath(path)!r} for {owner!r} is a directory, not a checkpoint file; {hint}."
    )


def checkpoint_tensor_shape(path: str | os.PathLike, names: Sequence[str]) -> tuple[int, ...] | None:
    """The shape of the first tensor of ``names`` that a checkpoint holds, or None.

    A ``module.`` prefix (DataParallel) and a nested ``state_dict`` / ``model`` dict are looked
    through, as the libraries do. Only that tensor is read: safetensors and NumPy archives give
    shapes without loading the rest, and torch.save zip files are memory-mapped. A PyTorch file
    that ``torch.load(weights_only=True)`` refuses (TorchScript, custom classes) gives None.
    """
    fmt = checkpoint_format(path)
    if fmt == "safetensors":
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as file:
            keys = {_strip_module(k): k for k in file.keys()}
            found = next((keys[n] for n in names if n in keys), None)
            return None if found is None else tuple(file.get_slice(found).get_shape())
    if fmt == "numpy":
        import numpy as np

        with np.load(path, allow_pickle=False) as archive:
            found = next((n for n in names if n in archive.files), None)
            return None if found is None else tuple(archive[found].shape)
    if fmt == "pytorch":
        import pickle

        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except (pickle.UnpicklingError, RuntimeError):
            return None
        for key in _NESTED_STATE_DICT_KEYS:
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
        if not isinstance(state, dict):
            return None
        tensors = {_strip_module(k): v for k, v in state.items() if hasattr(v, "shape")}
        found = next((n for n in names if n in tensors), None)
        return None if found is None else tuple(tensors[found].shape)
    return None


def _strip_module(key: str) -> str:
    return key.removeprefix("module.")


def check_position_grid(
    checkpoint: str | os.PathLike,
    names: Sequence[str],
    model_rows: int,
    model_grid: tuple[int, int],
    n_prefix_tokens: int,
    owner: str,
) -> None:
    """Refuse a checkpoint whose position embeddings are for another patch grid than the model's.

    open_clip and timm resample such position embeddings to the model's grid while loading,
    without a word; the result is a different model from the one the checkpoint holds. A
    checkpoint that differs only in how many prefix tokens (CLS, registers) carry a position
    row is accepted: the libraries convert that exactly.

    Args:
        checkpoint: The file.
        names: Where the position embedding may sit in it.
        model_rows: Position rows of the built model.
        model_grid: The built model's patch grid.
        n_prefix_tokens: The built model's CLS / register / distillation tokens.
        owner: The model, for the message.
    """
    shape = checkpoint_tensor_shape(checkpoint, names)
    if shape is None:
        return
    rows = math.prod(shape[:-1])
    patches = model_grid[0] * model_grid[1]
    if rows == model_rows or 0 <= rows - patches <= n_prefix_tokens:
        return
    theirs = f"{rows} position rows"
    for candidate in (rows - (model_rows - patches), rows - n_prefix_tokens, rows):
        side = math.isqrt(max(candidate, 0))
        if side > 0 and side * side == candidate:
            theirs = f"a {side}x{side} patch grid ({rows} position rows)"
            break
    raise ValueError(
        f"Checkpoint {os.fspath(checkpoint)!r} has position embeddings for {theirs}, but {owner} has a "
        f"{model_grid[0]}x{model_grid[1]} patch grid ({model_rows} rows). Loading it would resample them "
        "silently, which changes the model: use the architecture (and image size) the checkpoint was trained "
        "with, or pass resample_pos_embed=True to resample them."
    )
