"""Direct contributions of a whole dataset on disk, in shards, read back lazily.

ImageNet-scale decompositions do not fit in RAM (Gandelsman et al.'s per-head files for ImageNet val are
15 GB for ViT-B-16 and 59 GB for ViT-L-14). :func:`compute_contributions_to_disk` streams a
DataLoader once, writes one ``.npy`` shard per ``shard_batches`` batches (atomically: a shard
exists completely or not at all), and on a second call resumes after the last complete shard.
:class:`ContributionStore` memory-maps the shards, so reading one component across the dataset
touches only that component's bytes.
"""

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from vit_lens.intervene.decompose import direct_contributions, required_hooks

_META = "meta.json"


def compute_contributions_to_disk(
    model,
    batches: Iterable[Any],
    directory: str | os.PathLike,
    *,
    level: str = "head",
    layers: list[int] | None = None,
    ln_mode: str = "center_each",
    directions: Tensor | None = None,
    normalize: bool = False,
    shard_batches: int = 50,
    progress: bool = True,
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

    Returns:
        The :class:`ContributionStore` over everything written so far.

    Example:
        >>> store = compute_contributions_to_disk(model, loader, "prs/imagenet_val", level="head")  # doctest: +SKIP
        >>> store.component("L11H3").shape  # [n_images, d_embed], read from the memory-mapped shards  # doctest: +SKIP
    """
    model = getattr(model, "vision", model)
    if shard_batches < 1:
        raise ValueError(f"shard_batches must be >= 1, got {shard_batches}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = {
        "level": level, "layers": layers, "ln_mode": ln_mode, "normalize": normalize,
        "directions": None if directions is None else list(directions.shape), "shard_batches": shard_batches,
        "model": model.cfg.model_name,
    }
    meta = _read_meta(directory)
    if meta is not None and meta["settings"] != settings:
        raise ValueError(
            f"{directory} holds contributions computed with {meta['settings']}, not {settings}; "
            "use another directory or delete it"
        )
    meta = meta or {"settings": settings, "shards": [], "labels": None}
    done_batches = len(meta["shards"]) * shard_batches
    names = required_hooks(model, level, layers)

    iterator = iter(batches)
    bar = _progress_bar(batches, progress, initial=done_batches)
    for _ in range(done_batches):  # resume: skip what the complete shards already hold
        next(iterator, None)
    pending: list[np.ndarray] = []
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
        if bar is not None:
            bar.update(1)
        if len(pending) == shard_batches:
            _write_shard(directory, meta, pending)
            pending = []
    if pending:
        _write_shard(directory, meta, pending)
    if bar is not None:
        bar.close()
    return ContributionStore(directory)


class ContributionStore:
    """Memory-mapped contributions written by :func:`compute_contributions_to_disk`.

    Attributes:
        labels: Component labels, as in :class:`vit_lens.intervene.decompose.Contributions`.
        settings: The level, layers, ln_mode, ... they were computed with.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta = _read_meta(self.directory)
        if meta is None:
            raise FileNotFoundError(f"No contribution store in {self.directory} (no {_META}); write one with "
                                    "compute_contributions_to_disk")
        self.settings = meta["settings"]
        self.labels: list[str] = meta["labels"] or []
        self._shards = [np.load(self.directory / shard["file"], mmap_mode="r") for shard in meta["shards"]]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])

    def __len__(self) -> int:
        """Number of images."""
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n_images, n_components, d_out)``."""
        width = self._shards[0].shape[-1] if self._shards else 0
        return (len(self), len(self.labels), width)

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
    return json.loads(path.read_text()) if path.exists() else None


def _write_shard(directory: Path, meta: dict, pending: list[np.ndarray]) -> None:
    """Write one shard, then record it in meta.json; each file is replaced atomically."""
    values = np.concatenate(pending)
    name = f"shard_{len(meta['shards']):05d}.npy"
    temporary = directory / (name + ".tmp")
    with open(temporary, "wb") as out:
        np.save(out, values)
    os.replace(temporary, directory / name)
    meta["shards"].append({"file": name, "images": int(len(values))})
    temporary_meta = directory / (_META + ".tmp")
    temporary_meta.write_text(json.dumps(meta))
    os.replace(temporary_meta, directory / _META)


def _progress_bar(batches: Iterable, enabled: bool, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(total=total, initial=initial, desc="contributions", unit="batch")
