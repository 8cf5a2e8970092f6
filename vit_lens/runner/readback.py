"""Reading a finished run: reductions as tensors, cached activations as a memory-mapped, shuffleable dataset."""

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vit_lens.runner import storage


class _Statistics:
    """The reduction accessors shared by a run on disk and one kept in memory (``self.reductions``)."""

    reductions: dict[str, Tensor]

    def _where(self) -> str:
        raise NotImplementedError

    def _statistic(self, hook: str, statistic: str, recorder: str | None) -> Tensor:
        matches = [key for key in self.reductions
                   if key.endswith(f"/{hook}/{statistic}") and (recorder is None or key.startswith(recorder + "/"))]
        if len(matches) == 1:
            return self.reductions[matches[0]]
        if not matches:
            raise KeyError(f"No {statistic} of {hook!r} in {self._where()}; it holds {sorted(self.reductions)}")
        raise KeyError(f"Several recorders hold a {statistic} of {hook!r} ({matches}); pass recorder=...")

    def mean(self, hook: str, recorder: str | None = None) -> Tensor:
        """The float64 dataset mean at ``hook`` (from a ``Mean`` or ``Covariance`` recorder)."""
        return self._statistic(hook, "mean", recorder)

    def covariance(self, hook: str, recorder: str | None = None) -> Tensor:
        """The float64 covariance at ``hook`` (unbiased), ``[features, features]``."""
        return self._statistic(hook, "covariance", recorder)

    def second_moment(self, hook: str, recorder: str | None = None) -> Tensor:
        """``E[x x^T]`` at ``hook``, float64."""
        return self._statistic(hook, "second_moment", recorder)

    def count(self, hook: str, recorder: str | None = None) -> int:
        """How many values the statistics at ``hook`` average (images, or images x tokens)."""
        return int(self._statistic(hook, "count", recorder).item())


class InMemoryResult(_Statistics):
    """The reductions of a :func:`vit_lens.runner.run_dataset` pass run with ``out_dir=None``.

    The same accessors as :class:`RunResult` (``mean``, ``covariance``, ``second_moment``, ``count``,
    ``reductions``), the same values as an on-disk run with the same settings; no rows, no files.

    Attributes:
        reductions: ``'<recorder>/<hook>/<statistic>'`` -> float64 tensor.
        n_images: Images in the dataset.
        shard_size: Images per shard (how the images were split between ranks and grouped in the sums).
        settings: The recorders, batch size and autocast dtype of the run.
        world_size: The number of processes that shared the pass.
    """

    def __init__(self, reductions: dict[str, Tensor], *, n_images: int, shard_size: int, settings: dict[str, Any],
                 world_size: int = 1):
        self.reductions = reductions
        self.n_images, self.shard_size, self.settings, self.world_size = n_images, shard_size, settings, world_size

    def _where(self) -> str:
        return "this in-memory run"

    def __repr__(self) -> str:
        names = [recorder["name"] for recorder in self.settings["recorders"]]
        return f"InMemoryResult({self.n_images} images, recorders={names}, {len(self.reductions)} reductions)"

    def activations(self, hook: str, *args: Any, **kwargs: Any) -> "ShardedRows":
        """Always raises: a run in memory keeps reductions only."""
        raise ValueError(f"No activations of {hook!r}: run_dataset(out_dir=None) keeps only reductions in memory; "
                         "pass an out_dir and an Activations recorder to cache rows on disk")


class RunResult(_Statistics):
    """A finished run of :func:`vit_lens.runner.run_dataset`, opened from its folder.

    Opening reads the manifest and checks that the run is complete and that every shard it lists
    is there with the recorded size (``verify()`` also checks the SHA-256 of every file). Files in
    the folder that the manifest does not list (a crashed run's leftovers) are never read.

    Attributes:
        settings: The recorders, batch size and autocast dtype of the run.
        n_images: Images in the dataset.
        shard_size: Images per shard.
        weights_sha256: The fingerprint of the model's weights.

    Example:
        >>> result = RunResult("runs/val")  # doctest: +SKIP
        >>> cls = result.activations("blocks.11.hook_resid_post")  # [n_images, 1, d_model] rows, memory-mapped
        >>> for batch in cls.loader(batch_size=256, shuffle=True, seed=0): ...  # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        path = self.directory / storage.MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"No run in {self.directory} (no {storage.MANIFEST}); write one with "
                                    "vit_lens.runner.run_dataset or `vit-lens cache`")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error})") from None
        if manifest.get("format") != storage.FORMAT:
            raise ValueError(f"{path} is not a vit_lens run manifest (format {manifest.get('format')!r})")
        if not manifest.get("complete"):
            raise ValueError(f"The run in {self.directory} is not finished ({len(manifest['shards'])} shards written); "
                             "run the same command again to resume it")
        self.manifest = manifest
        self.settings: dict[str, Any] = manifest["settings"]
        self.n_images: int = manifest["n_images"]
        self.shard_size: int = manifest["shard_size"]
        self.weights_sha256: str = manifest["weights_sha256"]
        self.shards = sorted(manifest["shards"], key=lambda record: record["index"])
        expected = -(-self.n_images // self.shard_size)
        if [record["index"] for record in self.shards] != list(range(expected)):
            raise ValueError(f"{path} lists shards {[r['index'] for r in self.shards]}, not 0..{expected - 1}")
        for record in self.shards:
            problem = storage.check_file(self.directory / record["file"], record, checksum=False)
            if problem:
                raise ValueError(f"{problem}. Run the same command again to recompute it.")
        self._files: dict[int, storage.TensorFile] = {}
        self._reductions: dict[str, Tensor] | None = None

    def __repr__(self) -> str:
        names = [recorder["name"] for recorder in self.settings["recorders"]]
        return f"RunResult({str(self.directory)!r}, {self.n_images} images, {len(self.shards)} shards, recorders={names})"

    def verify(self) -> None:
        """Check every shard's and the reductions' SHA-256 against the manifest; raise naming a mismatch."""
        records = list(self.shards)
        if "reductions" in self.manifest:
            records.append(self.manifest["reductions"])
        for record in records:
            problem = storage.check_file(self.directory / record["file"], record, checksum=True)
            if problem:
                raise ValueError(problem)

    def shard(self, index: int) -> storage.TensorFile:
        """Shard ``index`` as a memory-mapped :class:`vit_lens.runner.storage.TensorFile`."""
        if index not in self._files:
            self._files[index] = storage.TensorFile(self.directory / self.shards[index]["file"])
        return self._files[index]

    @property
    def reductions(self) -> dict[str, Tensor]:
        """Every reduction result, ``'<recorder>/<hook>/<statistic>'`` -> float64 tensor."""
        if self._reductions is None:
            if "reductions" not in self.manifest:
                self._reductions = {}
            else:
                file = storage.TensorFile(self.directory / storage.REDUCTIONS)
                self._reductions = {key: file[key].clone() for key in file.keys()}
        return self._reductions

    def _where(self) -> str:
        return str(self.directory)

    def activations(self, hook: str, recorder: str = "activations", *, rows: str = "images") -> "ShardedRows":
        """The cached activations at ``hook`` as a memory-mapped dataset.

        Args:
            hook: The hook name.
            recorder: The ``Activations`` recorder's name.
            rows: ``'images'``: one row per image (``[tokens, d]``); ``'tokens'``: one row per cached
                token (``[d]``; what an SAE or a probe trains on).
        """
        key = f"{recorder}/{hook}"
        if key not in self.shards[0]["rows"]:
            held = sorted(self.shards[0]["rows"])
            raise KeyError(f"No activations {key!r} in {self.directory}; it holds {held}")
        if rows not in ("images", "tokens"):
            raise ValueError(f"rows={rows!r}; use 'images' (one row per image) or 'tokens' (one row per token)")
        return ShardedRows(self, key, flatten_tokens=rows == "tokens")


class ShardedRows(Dataset):
    """Rows of one cached tensor over every shard, memory-mapped: ``rows[i]`` reads one row from disk.

    A torch ``Dataset``: use it with a ``DataLoader`` (``shuffle=True`` with a seeded generator), or
    with :meth:`loader`, which gathers whole shuffled batches without worker processes.
    """

    def __init__(self, result: RunResult, key: str, flatten_tokens: bool = False):
        self.result, self.key, self.flatten_tokens = result, key, flatten_tokens
        self._views: list[Tensor | None] = [None] * len(result.shards)
        first = result.shard(0)
        shape = first.shape(key)
        self.per_image = shape[1] if flatten_tokens and len(shape) > 2 else 1
        counts = [record["rows"][key] * self.per_image for record in result.shards]
        self._starts = torch.tensor([0] + counts).cumsum(0)
        self.row_shape = tuple(shape[2:]) if flatten_tokens and len(shape) > 2 else tuple(shape[1:])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _view(self, shard: int) -> Tensor:
        if self._views[shard] is None:
            tensor = self.result.shard(shard)[self.key]
            self._views[shard] = tensor.flatten(0, 1) if self.flatten_tokens and tensor.ndim > 2 else tensor
        return self._views[shard]

    def __getitem__(self, index: int) -> Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        index %= len(self)
        shard = int(torch.searchsorted(self._starts, torch.tensor(index), right=True)) - 1
        return self._view(shard)[index - int(self._starts[shard])].clone()

    def rows(self, indices: Any) -> Tensor:
        """The rows at ``indices`` (a list or 1-D tensor), in that order, stacked."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        if len(indices) and (indices.max() >= len(self) or indices.min() < -len(self)):
            raise IndexError(f"row indices out of range for {len(self)} rows")
        indices = indices % max(len(self), 1)
        shards = torch.searchsorted(self._starts, indices, right=True) - 1
        out = None
        for shard in shards.unique().tolist():
            where = (shards == shard).nonzero().flatten()
            local = indices[where] - self._starts[shard]
            values = self._view(shard)[local]
            if out is None:
                out = torch.empty((len(indices), *values.shape[1:]), dtype=values.dtype)
            out[where] = values
        return out if out is not None else torch.empty((0, *self.row_shape))

    def loader(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
               epoch: int = 0) -> Iterator[Tensor]:
        """Batches of rows; shuffled by a permutation that depends only on ``seed`` and ``epoch``."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if shuffle:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        else:
            order = torch.arange(len(self))
        stop = len(self) - len(self) % batch_size if drop_last else len(self)
        for first in range(0, stop, batch_size):
            yield self.rows(order[first:first + batch_size])
