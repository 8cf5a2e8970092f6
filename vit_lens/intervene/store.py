"""Direct contributions of a whole dataset on disk, written by the dataset runner, read back lazily.

ImageNet-scale decompositions do not fit in RAM (Gandelsman et al.'s per-head files for ImageNet val are
15 GB for ViT-B-16 and 59 GB for ViT-L-14). :func:`compute_contributions_to_disk` is one
:func:`vit_lens.runner.run_dataset` pass with a :class:`ContributionTerms` recorder: the terms of
every image are written to safetensors shards (atomically), the run resumes after interruption,
refuses to resume with other settings or other weights, and runs under ``torchrun`` like any
other run. :class:`ContributionStore` memory-maps the shards, so reading one component across the
dataset touches only that component's bytes.

The folder is an ordinary runner folder (``manifest.json``, ``shard_000000.safetensors`` with rows
``'contributions/values'`` ``[image, component, d_out]``; see :mod:`vit_lens.runner`), so
:class:`vit_lens.runner.RunResult` reads it too, e.g. as shuffled rows for training. Stores written
before the runner (``meta.json`` and ``.npy`` shards) are refused with a message saying how to
compute them again.
"""

import hashlib
import itertools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from torch.utils.data import DataLoader

from vit_lens.intervene._validate import check_indices
from vit_lens.intervene.decompose import LEVELS, LN_MODES, direct_contributions, required_hooks
from vit_lens.model.cache import VisionActivationCache
from vit_lens.model.hooked_vit import image_tower
from vit_lens.runner import storage
from vit_lens.runner.readback import RunResult
from vit_lens.runner.run import run_dataset
from vit_lens.runner.storage import weights_fingerprint

__all__ = ["ContributionStore", "ContributionTerms", "compute_contributions_to_disk", "weights_fingerprint"]

_KIND = "direct_contributions"
_ROWS = "values"
_OLD_MANIFEST = "meta.json"  # the format before the runner: meta.json and shard_00000.npy files


class ContributionTerms:
    """A runner recorder: every image's direct contributions, rows ``[image, component, d_out]``.

    Its rows are :func:`vit_lens.intervene.decompose.direct_contributions` of each batch, computed
    from the hooks that function reads (:func:`~vit_lens.intervene.decompose.required_hooks`), in
    float32. Pass it to :func:`vit_lens.runner.run_dataset` beside other recorders to decompose a
    dataset in the same pass that caches or averages activations.

    Args:
        model: A HookedViT (or HookedCLIP: its image tower).
        level, layers, ln_mode, directions, normalize: As :func:`~vit_lens.intervene.decompose.direct_contributions`.
        name: The recorder's name in the run folder.

    Attributes:
        labels: The component labels (one forward pass of a blank image finds them).
        width: ``d_out``: the representation width, or the number of ``directions``.

    Example:
        >>> from vit_lens.runner import Mean, run_dataset
        >>> terms = ContributionTerms(model, level="head")  # doctest: +SKIP
        >>> run_dataset(model, loader, "runs/val", [terms, Mean("blocks.11.hook_resid_post")])  # doctest: +SKIP
        >>> ContributionStore("runs/val").component("L11H3").shape  # [n_images, d_out]  # doctest: +SKIP
    """

    def __init__(self, model: Any, *, level: str = "head", layers: list[int] | int | None = None,
                 ln_mode: str = "center_each", directions: Tensor | None = None, normalize: bool = False,
                 name: str = "contributions"):
        self.model = image_tower(model)
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if ln_mode not in LN_MODES:
            raise ValueError(f"ln_mode must be one of {LN_MODES}, got {ln_mode!r}")
        self.layers = None if layers is None else check_indices(layers, self.model.cfg.n_layers, "layers", "ContributionTerms")
        self.level, self.ln_mode, self.directions, self.normalize = level, ln_mode, directions, normalize
        self.name = name
        self.hooks = tuple(required_hooks(self.model, level, self.layers))
        self.tokens = "all"
        cfg = self.model.cfg
        reference = next(self.model.parameters())
        blank = torch.zeros(1, cfg.in_channels, *cfg.image_size, dtype=reference.dtype, device=reference.device)
        with torch.no_grad():
            _, cache = self.model.run_with_cache(blank, names_filter=list(self.hooks))
            probe = self._decompose(cache)
        self.labels: list[str] = probe.labels
        self.width = int(probe.values.shape[-1])

    def settings(self) -> dict[str, Any]:
        directions = self.directions
        return {
            "kind": _KIND, "level": self.level, "layers": self.layers, "ln_mode": self.ln_mode,
            "normalize": self.normalize,
            "directions": None if directions is None else list(directions.shape),
            "directions_sha256": None if directions is None else _tensor_digest(directions.float()),
            "labels": self.labels, "width": self.width,
        }

    def rows(self, activations: dict[str, Tensor], images: Tensor) -> dict[str, Tensor]:
        patch = self.model.cfg.patch_size
        grid = (images.shape[-2] // patch[0], images.shape[-1] // patch[1])
        cache = VisionActivationCache(dict(activations), self.model, grid_size=grid)
        return {_ROWS: self._decompose(cache).values.float()}

    def partials(self, activations: dict[str, Tensor], images: Tensor) -> dict[str, Tensor]:
        return {}

    def finalize(self, totals: dict[str, Tensor]) -> dict[str, Tensor]:
        return {}

    def _decompose(self, cache: VisionActivationCache):
        return direct_contributions(self.model, cache, level=self.level, layers=self.layers, ln_mode=self.ln_mode,
                                    directions=self.directions, normalize=self.normalize)


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

    One :func:`vit_lens.runner.run_dataset` pass with a :class:`ContributionTerms` recorder. The
    model runs on batches of the size of the first batch; a shard holds ``shard_batches`` of them.

    Args:
        model: A HookedViT (or HookedCLIP: its ``.vision`` is used).
        batches: A DataLoader that reads its dataset in order (on resume only the unfinished shards'
            images are loaded), or any iterable of image tensors ``[batch, 3, H, W]`` or
            ``(images, ...)`` tuples, in the same order on every call (needed to resume: the images of
            finished shards are read and skipped, not recomputed).
        directory: The run folder (created if missing).
        level, layers, ln_mode, directions, normalize: As :func:`vit_lens.intervene.decompose.direct_contributions`.
        shard_batches: Batches per shard file.
        progress: Show a progress bar (images/s, ETA).
        overwrite: Delete a store already in ``directory`` (the runner's files, or a store in the
            format before the runner; nothing else) and start again. Without it, a store computed
            with the same settings and the same weights is resumed, and any other store is an error.

    Returns:
        The :class:`ContributionStore` of the finished run.

    Raises:
        ValueError: ``directory`` holds a store computed with other settings or other weights (resuming
            would mix two decompositions in one array), a damaged manifest, or a store in the format
            before the runner; ``batches`` is empty.

    Example:
        >>> store = compute_contributions_to_disk(model, loader, "prs/imagenet_val", level="head")  # doctest: +SKIP
        >>> store.component("L11H3").shape  # [n_images, d_embed], read from the memory-mapped shards  # doctest: +SKIP
    """
    model = image_tower(model)
    if isinstance(shard_batches, bool) or not isinstance(shard_batches, int) or shard_batches < 1:
        raise ValueError(f"shard_batches must be an int >= 1, got {shard_batches!r}")
    if layers is not None:
        layers = check_indices(layers, model.cfg.n_layers, "layers", "compute_contributions_to_disk")
    recorder = ContributionTerms(model, level=level, layers=layers, ln_mode=ln_mode, directions=directions,
                                 normalize=normalize)
    directory = Path(directory)
    _refuse_or_delete_old_store(directory, overwrite)
    if isinstance(batches, DataLoader):
        data, batch_size = batches, batches.batch_size
        if batch_size is None:
            raise ValueError("compute_contributions_to_disk needs a DataLoader with a batch_size (it reads the "
                             "dataset in order, shard by shard); pass DataLoader(dataset, batch_size=...)")
    else:
        stream = iter(batches)
        first = next(stream, None)
        if first is None:
            raise ValueError(f"compute_contributions_to_disk got no batches to decompose, so {directory} holds nothing")
        images = first[0] if isinstance(first, (tuple, list)) and first else first
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise TypeError(f"compute_contributions_to_disk takes batches of images [batch, 3, H, W] or (images, ...) "
                            f"tuples, got a {type(images).__name__} "
                            f"{tuple(images.shape) if isinstance(images, Tensor) else ''}".rstrip())
        data, batch_size = itertools.chain([first], stream), len(images)
    run_dataset(model, data, directory, recorder, shard_size=shard_batches * batch_size, batch_size=batch_size,
                overwrite=overwrite, progress=progress)
    return ContributionStore(directory)


class ContributionStore:
    """Memory-mapped contributions written by :func:`compute_contributions_to_disk` (or by a
    :class:`ContributionTerms` recorder in any :func:`vit_lens.runner.run_dataset` run).

    Opening a store checks that the run is finished and every shard is there with its recorded
    size and shape, so a damaged store raises here, naming the shard, instead of reading as a
    smaller or misshapen dataset.

    Args:
        directory: The run folder.
        recorder: The :class:`ContributionTerms` recorder's name, needed only when the run holds
            several.

    Attributes:
        labels: Component labels, as in :class:`vit_lens.intervene.decompose.Contributions`.
        settings: The level, layers, ln_mode, normalize, directions (shape and SHA-256), model name,
            shard size and batch size they were computed with.
        weights_sha256: :func:`weights_fingerprint` of the model.
    """

    def __init__(self, directory: str | os.PathLike, recorder: str | None = None):
        self.directory = Path(directory)
        if not (self.directory / storage.MANIFEST).is_file():
            if (self.directory / _OLD_MANIFEST).is_file():
                raise ValueError(_old_store_message(self.directory))
            raise FileNotFoundError(f"No contribution store in {self.directory} (no {storage.MANIFEST}); write one "
                                    "with compute_contributions_to_disk")
        try:
            run = RunResult(self.directory)
        except ValueError as error:
            raise ValueError(f"{error} (a contribution store: compute_contributions_to_disk with the same arguments "
                             "resumes it; overwrite=True computes it again from the start)") from None
        terms = [r for r in run.settings["recorders"] if r.get("kind") == _KIND and recorder in (None, r["name"])]
        if len(terms) != 1:
            held = [(r["name"], r.get("kind")) for r in run.settings["recorders"]]
            wanted = "no" if not terms else "several"
            raise ValueError(f"The run in {self.directory} holds {wanted} contribution recorders "
                             f"{'named ' + repr(recorder) if recorder else ''} (it holds {held}); "
                             + ("pass recorder=<name>" if terms else "compute them with compute_contributions_to_disk"))
        terms = terms[0]
        self.labels: list[str] = list(terms["labels"])
        self.settings = {key: terms[key] for key in ("level", "layers", "ln_mode", "normalize", "directions",
                                                     "directions_sha256")}
        self.settings.update(model=run.settings["model"], shard_size=run.shard_size,
                             batch_size=run.settings["batch_size"])
        self.weights_sha256: str = run.weights_sha256
        self._width = int(terms["width"])
        key = f"{terms['name']}/{_ROWS}"
        self._shards: list[Tensor] = []
        for index, record in enumerate(run.shards):
            file = run.shard(index)
            expected = (record["n_images"], len(self.labels), self._width)
            if key not in file or file.shape(key) != expected:
                found = file.shape(key) if key in file else "nothing"
                raise ValueError(
                    f"{file.path} holds {found} under {key!r}, but the manifest records {expected} (images, components, "
                    "width): the shard was replaced, and reading it would silently change the dataset. Compute the "
                    "store again (compute_contributions_to_disk(..., overwrite=True)) or restore the shard."
                )
            self._shards.append(file[key])
        self._starts = torch.tensor([0] + [len(shard) for shard in self._shards]).cumsum(0)

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
            return self._shards[shard][row].clone()
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("ContributionStore slices must be contiguous (step 1)")
        return self._gather(start, stop, slice(None))

    def component(self, label: str) -> Float[Tensor, "images d_out"]:
        """One component for every image; only its bytes are read from the shards."""
        if label not in self.labels:
            raise KeyError(f"No component {label!r}; labels look like {self.labels[:3]} ... {self.labels[-2:]}")
        return self._gather(0, len(self), self.labels.index(label))

    def mean(self) -> Float[Tensor, "component d_out"]:
        """Mean of every component over the images, one shard at a time (float64 accumulation)."""
        total = torch.zeros(self.shape[1:], dtype=torch.float64)
        for shard in self._shards:
            total += shard.to(torch.float64).sum(0)
        return (total / max(len(self), 1)).float()

    def var(self, correction: int = 1) -> Float[Tensor, "component d_out"]:
        """Variance of every component over the images (a second pass over the shards, float64)."""
        mean = self.mean().double()
        total = torch.zeros(self.shape[1:], dtype=torch.float64)
        for shard in self._shards:
            total += (shard.to(torch.float64) - mean).square().sum(0)
        return (total / max(len(self) - correction, 1)).float()

    def _locate(self, index: int) -> tuple[int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"image {index} out of range for a store of {len(self)} images")
        index %= len(self)
        shard = int(torch.searchsorted(self._starts, torch.tensor(index), right=True)) - 1
        return shard, index - int(self._starts[shard])

    def _gather(self, start: int, stop: int, columns: Any) -> Tensor:
        pieces = []
        for shard, first in zip(self._shards, self._starts[:-1].tolist()):
            lo, hi = max(start - first, 0), min(stop - first, len(shard))
            if lo < hi:
                pieces.append(shard[lo:hi, columns].clone())
        if not pieces:
            return torch.zeros((0,) + self.shape[1:], dtype=torch.float32)[:, columns]
        return torch.cat(pieces)


def _old_store_message(directory: Path) -> str:
    return (f"{directory} holds a contribution store in the format before the dataset runner ({_OLD_MANIFEST} and "
            ".npy shards), which this version of vit_lens does not read. Compute it again: "
            f"compute_contributions_to_disk(model, batches, {str(directory)!r}, ..., overwrite=True) deletes it and "
            "writes the new format (or pass another directory).")


def _refuse_or_delete_old_store(directory: Path, overwrite: bool) -> None:
    """A store in the format before the runner is deleted with ``overwrite`` (only its files), else refused."""
    if not (directory / _OLD_MANIFEST).is_file():
        return
    if not overwrite:
        raise ValueError(_old_store_message(directory))
    for path in [*directory.glob("shard_*.npy"), *directory.glob("shard_*.npy.tmp"),
                 directory / _OLD_MANIFEST, directory / (_OLD_MANIFEST + ".tmp")]:
        path.unlink(missing_ok=True)


def _tensor_digest(tensor: Tensor) -> str:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return "sha256:" + hashlib.sha256(memoryview(flat.view(torch.uint8).numpy())).hexdigest()
