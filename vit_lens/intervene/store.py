"""Direct contributions of a whole dataset on disk, in shards, read back lazily.

ImageNet-scale decompositions do not fit in RAM (Gandelsman et al.'s per-head files for ImageNet val are
15 GB for ViT-B-16 and 59 GB for ViT-L-14). :func:`compute_contributions_to_disk` streams a
DataLoader once, writes one ``.npy`` shard per ``shard_batches`` batches (atomically: a shard
exists completely or not at all), and on a second call resumes after the last complete shard.
:class:`ContributionStore` memory-maps the shards, so reading one component across the dataset
touches only that component's bytes.

``meta.json`` is the manifest: the decomposition settings, a fingerprint of the model's weights
(:func:`weights_fingerprint`), and every shard with the images and batches it holds. A run resumes
only with the same settings and weights (otherwise its rows would mix two models), skips exactly
the batches the shards hold, and every read checks each shard against the manifest, so a damaged
or short shard is an error, never a smaller dataset.
"""

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from vit_lens.intervene._validate import check_indices
from vit_lens.intervene.decompose import LEVELS, LN_MODES, direct_contributions, required_hooks
from vit_lens.model.hooked_vit import image_tower
from vit_lens.utils.progress import progress as progress_bar

_META = "meta.json"
_FORMAT = "vit_lens.ContributionStore/2"


def compute_contributions_to_disk(
    model,
    batches: Iterable[Any],
    directory: str | os.PathLike,
    *,
    level: str = "head",
    layers: list[int] | int | None = None,
    ln_mode: str = "center_each",
    directions: Tensor | None = None,
    normalize: bool = False,
    shard_batches: int = 50,
    progress: bool = True,
    overwrite: bool = False,
) -> "ContributionStore":
    """Decompose every image of ``batches`` and write the contributions to ``directory``.

    Args:
        model: A HookedViT (or HookedCLIP: its ``.vision`` is used).
        batches: An iterable of image tensors ``[batch, 3, H, W]`` or ``(images, ...)`` tuples, in the
            same order on every call (needed to resume: completed batches are skipped, not recomputed).
        directory: Where the shards and ``meta.json`` go (created if missing).
        level, layers, ln_mode, directions, normalize: As :func:`vit_lens.intervene.decompose.direct_contributions`.
        shard_batches: Batches per shard file.
        progress: Show a progress bar.
        overwrite: Delete a store already in ``directory`` (its ``meta.json`` and shards; nothing
            else) and start again. Without it, a store computed with the same settings and the same
            weights is resumed, and any other store is an error.

    Returns:
        The :class:`ContributionStore` over everything written so far.

    Raises:
        ValueError: ``directory`` holds a store computed with other settings or other weights (resuming
            would mix two decompositions in one array), or a damaged one.

    Example:
        >>> store = compute_contributions_to_disk(model, loader, "prs/imagenet_val", level="head")  # doctest: +SKIP
        >>> store.component("L11H3").shape  # [n_images, d_embed], read from the memory-mapped shards  # doctest: +SKIP
    """
    model = image_tower(model)
    if isinstance(shard_batches, bool) or not isinstance(shard_batches, int) or shard_batches < 1:
        raise ValueError(f"shard_batches must be an int >= 1, got {shard_batches!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if ln_mode not in LN_MODES:
        raise ValueError(f"ln_mode must be one of {LN_MODES}, got {ln_mode!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = {
        "level": level,
        "layers": None if layers is None else check_indices(layers, model.cfg.n_layers, "layers", "compute_contributions_to_disk"),
        "ln_mode": ln_mode, "normalize": normalize,
        "directions": None if directions is None else list(directions.shape),
        "directions_sha256": None if directions is None else _tensor_digest(directions.float()),
        "shard_batches": shard_batches, "model": model.cfg.model_name,
    }
    weights = weights_fingerprint(model)
    if overwrite:
        _delete_store(directory)
    meta = _read_meta(directory)
    if meta is not None:
        _check_resumable(directory, meta, settings, weights)
    meta = meta or {"format": _FORMAT, "settings": settings, "weights_sha256": weights, "shards": [], "labels": None}
    done_batches = sum(shard["batches"] for shard in meta["shards"])
    names = required_hooks(model, level, layers)

    iterator = iter(batches)
    total = len(batches) if hasattr(batches, "__len__") else None
    bar = progress_bar(total=total, initial=done_batches, desc="contributions", unit="batch", enabled=progress)
    for _ in range(done_batches):  # resume: skip exactly the batches the shards already hold
        next(iterator, None)
    pending: list[np.ndarray] = []
    with bar:
        for batch in iterator:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            with torch.no_grad():
                _, cache = model.run_with_cache(images, names_filter=names)
                parts = direct_contributions(
                    model, cache, level=level, layers=layers, ln_mode=ln_mode, directions=directions,
                    normalize=normalize,
                )
            meta["labels"] = meta["labels"] or parts.labels
            pending.append(parts.values.float().cpu().numpy())
            bar.update(1)
            if len(pending) == shard_batches:
                _write_shard(directory, meta, pending)
                pending = []
        if pending:
            _write_shard(directory, meta, pending)
    if _read_meta(directory) is None:
        raise ValueError(f"compute_contributions_to_disk got no batches to decompose, so {directory} holds nothing")
    return ContributionStore(directory)


def weights_fingerprint(model) -> str:
    """SHA-256 of a model's state dict: every tensor's name, dtype, shape and bytes, in name order.

    Two models of one architecture but other weights get other fingerprints, so a store can tell
    that a resumed run uses the model it started with. Every byte is hashed, not a sample: measured
    on one CPU core with random weights, 0.3 s for ViT-B/16 (86 M parameters) and 0.6 s for
    ViT-L/14 (304 M), less than one forward pass of 8 images through either.

    Example:
        >>> weights_fingerprint(model)[:12]  # doctest: +SKIP
        'sha256:3f1a0c'
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(_tensor_bytes(tensor))
    return "sha256:" + digest.hexdigest()


class ContributionStore:
    """Memory-mapped contributions written by :func:`compute_contributions_to_disk`.

    Opening a store checks every shard against ``meta.json`` (it exists, reads as an array, and
    holds the images and components the manifest records), so a damaged store raises here, naming
    the shard, instead of reading as a smaller or misshapen dataset.

    Attributes:
        labels: Component labels, as in :class:`vit_lens.intervene.decompose.Contributions`.
        settings: The level, layers, ln_mode, ... they were computed with.
        weights_sha256: :func:`weights_fingerprint` of the model (None for stores written before it
            was recorded).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta = _read_meta(self.directory)
        if meta is None:
            raise FileNotFoundError(f"No contribution store in {self.directory} (no {_META}); write one with "
                                    "compute_contributions_to_disk")
        self.settings = meta["settings"]
        self.weights_sha256: str | None = meta.get("weights_sha256")
        self.labels: list[str] = meta["labels"] or []
        self._shards = []
        for record in meta["shards"]:
            shard = _open_shard(self.directory, record)
            expected = (record["images"], len(self.labels), meta.get("width", shard.shape[-1]))
            if shard.shape != expected:
                raise ValueError(
                    f"{self.directory / record['file']} holds an array of shape {shard.shape}, but {_META} records "
                    f"{expected} (images, components, width): the shard is short or was replaced, and reading it would "
                    "silently change the dataset. Compute the store again (compute_contributions_to_disk(..., "
                    "overwrite=True)) or restore the shard."
                )
            meta.setdefault("width", shard.shape[-1])  # stores written before the width was recorded
            self._shards.append(shard)
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])
        self._width = int(meta.get("width", 0))

    def __len__(self) -> int:
        """Number of images."""
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n_images, n_components, d_out)``."""
        return (len(self), len(self.labels), self._width)

    def __getitem__(self, index: int | slice) -> Float[Tensor, "*images component d_out"]:
        """Images ``index`` (an int or a slice), all components: read from disk into a tensor."""
        if isinstance(index, int):
            shard, row = self._locate(index)
            return torch.from_numpy(np.array(self._shards[shard][row]))
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("ContributionStore slices must be contiguous (step 1)")
        return torch.from_numpy(self._gather(start, stop, slice(None)))

    def component(self, label: str) -> Float[Tensor, "images d_out"]:
        """One component for every image; only its bytes are read from the shards."""
        if label not in self.labels:
            raise KeyError(f"No component {label!r}; labels look like {self.labels[:3]} ... {self.labels[-2:]}")
        return torch.from_numpy(self._gather(0, len(self), self.labels.index(label)))

    def mean(self) -> Float[Tensor, "component d_out"]:
        """Mean of every component over the images, one shard at a time (float64 accumulation)."""
        total = np.zeros(self.shape[1:], dtype=np.float64)
        for shard in self._shards:
            total += np.asarray(shard, dtype=np.float64).sum(axis=0)
        return torch.from_numpy(total / max(len(self), 1)).float()

    def var(self, correction: int = 1) -> Float[Tensor, "component d_out"]:
        """Variance of every component over the images (a second pass over the shards, float64)."""
        mean = self.mean().double().numpy()
        total = np.zeros(self.shape[1:], dtype=np.float64)
        for shard in self._shards:
            total += ((np.asarray(shard, dtype=np.float64) - mean) ** 2).sum(axis=0)
        return torch.from_numpy(total / max(len(self) - correction, 1)).float()

    def _locate(self, index: int) -> tuple[int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"image {index} out of range for a store of {len(self)} images")
        index %= len(self)
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def _gather(self, start: int, stop: int, columns: Any) -> np.ndarray:
        pieces = []
        for shard, first in zip(self._shards, self._starts[:-1]):
            lo, hi = max(start - first, 0), min(stop - first, len(shard))
            if lo < hi:
                pieces.append(np.array(shard[lo:hi, columns]))
        if not pieces:
            return np.zeros((0,) + self.shape[1:], dtype=np.float32)[:, columns]
        return np.concatenate(pieces)


def _read_meta(directory: Path) -> dict | None:
    path = directory / _META
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); the manifest is damaged (truncated?), so the shards beside it cannot "
            "be trusted. Compute the store again: compute_contributions_to_disk(..., overwrite=True), or a new directory."
        ) from None
    if not isinstance(meta, dict) or not {"settings", "shards", "labels"} <= meta.keys():
        raise ValueError(
            f"{path} is not a contribution store's manifest (it needs 'settings', 'shards' and 'labels'); "
            "compute the store again with compute_contributions_to_disk(..., overwrite=True), or use a new directory"
        )
    return meta


def _open_shard(directory: Path, record: dict) -> np.ndarray:
    path = directory / record["file"]
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: {_META} records it with {record['images']} images. Restore it, or compute the store "
            "again with compute_contributions_to_disk(..., overwrite=True)."
        )
    try:
        shard = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(
            f"{path} cannot be read as a .npy array ({error}): it is truncated or damaged ({path.stat().st_size} bytes; "
            f"{_META} records {record['images']} images in it). Compute the store again with "
            "compute_contributions_to_disk(..., overwrite=True), or restore the shard."
        ) from None
    if shard.ndim != 3:
        raise ValueError(f"{path} holds a {shard.ndim}-d array {shard.shape}, not [images, components, width]")
    return shard


def _check_resumable(directory: Path, meta: dict, settings: dict, weights: str) -> None:
    """Raise unless resuming the store in ``directory`` with ``settings`` and ``weights`` is sound."""
    fresh = "use another directory, or pass overwrite=True to delete this store and start again"
    if meta.get("format") != _FORMAT:
        raise ValueError(
            f"{directory} holds a store written by an older vit_lens, without the weights fingerprint and per-shard "
            f"batch counts that resuming needs; it can still be read with ContributionStore. To compute, {fresh}"
        )
    if meta["settings"] != settings:
        changed = {key: (meta["settings"].get(key), settings.get(key))
                   for key in meta["settings"].keys() | settings.keys() if meta["settings"].get(key) != settings.get(key)}
        raise ValueError(
            f"{directory} holds contributions computed with {meta['settings']}, not {settings} "
            f"(stored vs now: {changed}); {fresh}"
        )
    if meta["weights_sha256"] != weights:
        raise ValueError(
            f"{directory} was started with a model whose weights have fingerprint {meta['weights_sha256'][:23]}..., "
            f"but this model's are {weights[:23]}...: same settings, other weights, so resuming would mix rows from two "
            f"models; {fresh}"
        )
    ContributionStore(directory)  # every shard the manifest lists is there and whole


def _delete_store(directory: Path) -> None:
    """Remove what compute_contributions_to_disk writes, and nothing else the directory may hold."""
    for path in [*directory.glob("shard_*.npy"), *directory.glob("shard_*.npy.tmp"),
                 directory / _META, directory / (_META + ".tmp")]:
        path.unlink(missing_ok=True)


def _write_shard(directory: Path, meta: dict, pending: list[np.ndarray]) -> None:
    """Write one shard, then record it in meta.json; each file is replaced atomically."""
    values = np.concatenate(pending)
    name = f"shard_{len(meta['shards']):05d}.npy"
    temporary = directory / (name + ".tmp")
    with open(temporary, "wb") as out:
        np.save(out, values)
    os.replace(temporary, directory / name)
    meta["shards"].append({"file": name, "images": int(len(values)), "batches": len(pending)})
    meta["width"] = int(values.shape[-1])
    temporary_meta = directory / (_META + ".tmp")
    temporary_meta.write_text(json.dumps(meta))
    os.replace(temporary_meta, directory / _META)


def _tensor_bytes(tensor: Tensor) -> memoryview:
    """The tensor's raw bytes (any dtype, bfloat16 included), copied to the CPU if needed."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _tensor_digest(tensor: Tensor) -> str:
    return "sha256:" + hashlib.sha256(_tensor_bytes(tensor)).hexdigest()
