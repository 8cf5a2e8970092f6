""":func:`run_dataset`: one pass of a model over a dataset, recorded to shards on disk, resumable and distributed."""

import hashlib
import json
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vit_lens.model.cache_hooks import caching_hooks
from vit_lens.model.hooked_vit import image_tower
from vit_lens.runner import storage
from vit_lens.runner.data import ShardedData
from vit_lens.runner.distributed import Ranks, join
from vit_lens.runner.readback import InMemoryResult, RunResult
from vit_lens.runner.recorders import Recorder, check_hooks, resolve_tokens
from vit_lens.utils.progress import progress as progress_bar

AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHARD_BYTES = 256 * 2**20  # default shard size target: large enough for fast I/O, small enough to hold twice in RAM
_OUR_FILES = re.compile(r"^(shard_\d{6}\.(safetensors|json)|manifest\.json|reductions\.safetensors)$")
_OUR_TEMPORARIES = re.compile(r"^\.(shard_\d{6}\.(safetensors|json)|manifest\.json|reductions\.safetensors)\.\d+\.tmp$")


def run_dataset(
    model: Any,
    data: Any,
    out_dir: str | os.PathLike | None = None,
    record: Any = None,
    *,
    shard_size: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    num_workers: int = 0,
    overwrite: bool = False,
    verify_checksums: bool = True,
    progress: bool | str = True,
) -> RunResult | InMemoryResult:
    """Run ``model`` over ``data`` once and write what ``record`` asks for to shards in ``out_dir``.

    The same call works in one process and under ``torchrun --nproc_per_node=N``: rank ``r`` computes
    the shards ``k`` with ``k % N == r`` (each rank writes its own), reductions are all-reduced in
    float64, and rank 0 writes the manifest and the reductions after a barrier. Shard ``k`` always
    holds images ``[k * shard_size, (k + 1) * shard_size)``, batched from its first image, so its
    bytes do not depend on the number of processes.

    Args:
        model: A HookedViT (or HookedCLIP / HookedBlip2: the image tower runs).
        data: A torch Dataset (items: images or ``(image, label, ...)``), a DataLoader that reads one
            in order, a tensor of images ``[n, C, H, W]``, or any iterable of image batches (tensors or
            ``(images, ...)`` tuples). A Dataset is indexed, so each rank loads only its images; a plain
            iterable is read through by every rank.
        out_dir: The run's folder (created). A folder holding a run with the same settings and the
            same model weights is resumed: finished shards are kept, the rest computed. None: keep
            the reductions in memory (every recorder must be a pure reduction, such as ``Mean`` or
            ``Covariance``; nothing is written, nothing resumes) and return an :class:`InMemoryResult`.
        record: A recorder or a list of them (:mod:`vit_lens.runner.recorders`: ``Activations``,
            ``Mean``, ``Covariance``, or any object with the ``Recorder`` interface).
        shard_size: Images per shard (None: as the existing run, else about 256 MB of rows per shard,
            a power of two from 16 to 4096 images). In memory, it sets how the images are split
            between ranks and grouped in the sums, as on disk.
        batch_size: Images per forward pass (None: the DataLoader's, else 32).
        device: Where the model runs (None: where it is; ``'cuda'`` under torchrun means
            ``cuda:LOCAL_RANK``). The model is moved there.
        dtype: ``'float32'`` (no autocast), ``'bfloat16'`` or ``'float16'``: torch.autocast of the forward pass.
        num_workers: DataLoader workers that load a Dataset's images.
        overwrite: Delete a run in ``out_dir`` (only the runner's own files) and start again.
        verify_checksums: On resume, check every finished shard's SHA-256 (else only its size).
        progress: Show a progress bar (images/s, ETA); a string shows it with that label.

    Returns:
        The :class:`vit_lens.runner.readback.RunResult` of the finished run (on every rank), or with
        ``out_dir=None`` an :class:`vit_lens.runner.readback.InMemoryResult` (``mean``, ``covariance``,
        ``second_moment``, ``count``, ``reductions``; equal to the on-disk run's, on every rank).

    Raises:
        ValueError: an unknown hook or token selection, duplicate recorder names, ``out_dir``
            holding a run with other settings, other weights or another dataset length, or
            ``out_dir=None`` with a recorder that writes rows.

    Example:
        >>> from vit_lens.runner import Activations, Mean, run_dataset
        >>> result = run_dataset(model, dataset, "runs/val", [Activations("blocks.11.hook_resid_post", "cls"),
        ...                      Mean("blocks.11.hook_resid_post")])  # doctest: +SKIP
        >>> result.mean("blocks.11.hook_resid_post").shape  # [pos, d_model]  # doctest: +SKIP
        >>> in_memory = run_dataset(model, dataset, record=[Mean("blocks.11.hook_resid_post")])  # doctest: +SKIP
    """
    tower = image_tower(model)
    if record is None:
        raise ValueError("run_dataset needs something to record, e.g. record=[Activations('blocks.0.hook_resid_post')]")
    if out_dir is None and overwrite:
        raise ValueError("overwrite=True deletes a run in out_dir, but out_dir=None keeps everything in memory; pass "
                         "an out_dir, or drop overwrite")
    recorders = _check_recorders(record, tower)
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"dtype={dtype!r}; use one of {list(AUTOCAST_DTYPES)} (bfloat16 / float16 run under "
                         "torch.autocast)")
    if shard_size is not None and (isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1):
        raise ValueError(f"shard_size must be a positive int or None, got {shard_size!r}")
    target = _resolve_device(device, tower)
    tower.to(target)
    ranks = join(target.type)
    try:
        return _run(tower, data, None if out_dir is None else Path(out_dir), recorders, ranks, target, shard_size=shard_size,
                    batch_size=batch_size, dtype=dtype, num_workers=num_workers, overwrite=overwrite,
                    verify_checksums=verify_checksums, progress=progress)
    finally:
        ranks.finish()


def _check_recorders(record: Any, tower: Any) -> list[Any]:
    recorders = [record] if isinstance(record, Recorder) else list(record)
    if not recorders:
        raise ValueError("run_dataset needs something to record, e.g. record=[Activations('blocks.0.hook_resid_post')]")
    for recorder in recorders:
        if not isinstance(recorder, Recorder):
            raise TypeError(f"record holds a {type(recorder).__name__}, which is no recorder (it needs name, hooks, "
                            "tokens, settings, rows, partials and finalize; see vit_lens.runner.recorders)")
        if not isinstance(recorder.name, str) or not recorder.name or "/" in recorder.name:
            raise ValueError(f"A recorder's name must be a non-empty string without '/', got {recorder.name!r}")
        recorder.hooks = check_hooks(recorder.hooks, tower, f"recorder {recorder.name!r}")
        resolve_tokens(recorder.tokens, tower.cfg)
    names = [recorder.name for recorder in recorders]
    if len(set(names)) != len(names):
        raise ValueError(f"Recorder names {names} repeat; give each its own name=... (they key the stored tensors)")
    return recorders


def _resolve_device(device: Any, tower: Any) -> torch.device:
    current = next(tower.parameters()).device
    if device is None:
        resolved = current
    else:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device={device!r} is not a torch device; pass 'cpu', 'cuda', 'cuda:1', ...") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available here; pass device='cpu'")
        if resolved.index is None:
            local = os.environ.get("LOCAL_RANK")
            resolved = torch.device("cuda", int(local) if local else torch.cuda.current_device())
    return resolved


class _Groups:
    """The recorders' hooks, grouped by token selection; each group records through the model's caching hooks."""

    def __init__(self, tower: Any, recorders: list[Any]):
        self.groups: list[tuple[dict[str, Tensor], list[Any]]] = []  # (cache, recorders)
        self.fwd_hooks: list = []
        keyed: dict[str, tuple[Any, set[str], list[Any]]] = {}
        for recorder in recorders:
            pos_slice = resolve_tokens(recorder.tokens, tower.cfg)
            key = repr(pos_slice)
            keyed.setdefault(key, (pos_slice, set(), []))
            keyed[key][1].update(recorder.hooks)
            keyed[key][2].append(recorder)
        names: set[str] = set()
        for pos_slice, hooks, members in keyed.values():
            cache, fwd, _ = caching_hooks(list(tower.hook_dict), hooks.__contains__, pos_slice=pos_slice)
            self.groups.append((cache, members))
            self.fwd_hooks += fwd
            names |= hooks
        self.stop_at_layer = last_block_needed(tower, names)

    def run(self, tower: Any, images: Tensor, autocast: Any) -> list[tuple[Any, dict[str, Tensor]]]:
        """``(recorder, its activations)`` for one batch."""
        for cache, _ in self.groups:
            cache.clear()
        with torch.no_grad(), autocast, tower.hooks(fwd_hooks=self.fwd_hooks):
            tower(images, stop_at_layer=self.stop_at_layer)
        return [(recorder, {hook: cache[hook] for hook in recorder.hooks})
                for cache, members in self.groups for recorder in members]


def _label(progress: bool | str) -> str:
    return progress if isinstance(progress, str) else "run_dataset"


def last_block_needed(tower: Any, names: Iterable[str]) -> int | None:
    """``stop_at_layer`` that still runs every hook in ``names``, or None for the whole tower."""
    layers = []
    for name in names:
        parts = name.split(".")
        if parts[0] != "blocks" or len(parts) < 2 or not parts[1].isdigit():
            return None
        layers.append(int(parts[1]))
    stop = max(layers) + 1
    return stop if stop < tower.cfg.n_layers else None


def _run(tower: Any, data: Any, out: Path | None, recorders: list[Any], ranks: Ranks, device: torch.device, *,
         shard_size: int | None, batch_size: int | None, dtype: str, num_workers: int, overwrite: bool,
         verify_checksums: bool, progress: bool | str) -> RunResult | InMemoryResult:
    groups = _Groups(tower, recorders)
    autocast_dtype = AUTOCAST_DTYPES[dtype]
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext())
    reference = next(tower.parameters())
    probe = torch.zeros(1, tower.cfg.in_channels, *tower.cfg.image_size, dtype=reference.dtype, device=device)
    probed = groups.run(tower, probe, autocast)  # checks every hook fires, and gives the shapes
    partial_shapes = {f"{recorder.name}/{key}": (tuple(value.shape), value.dtype)
                      for recorder, acts in probed for key, value in recorder.partials(acts, probe).items()}
    probed_rows = {recorder.name: sorted(recorder.rows(acts, probe)) for recorder, acts in probed}
    if out is None and any(probed_rows.values()):
        writers = {name: keys for name, keys in probed_rows.items() if keys}
        raise ValueError(f"run_dataset(out_dir=None) keeps only reductions in memory, but recorders {writers} write "
                         "rows (per-image tensors); pass an out_dir to write them to shards, or record only reductions "
                         "(Mean, Covariance, Moments)")
    row_bytes = sum(value[0].numel() * value.element_size()
                    for recorder, acts in probed for value in recorder.rows(acts, probe).values())
    loader = ShardedData(data, batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    settings = {
        "model": tower.cfg.model_name,
        "recorders": [{"name": recorder.name, **recorder.settings()} for recorder in recorders],
        "batch_size": loader.batch_size,
        "dtype": dtype,
    }
    if out is None:
        return _run_in_memory(tower, loader, recorders, groups, autocast, partial_shapes, settings, ranks, device,
                              shard_size=shard_size or _default_shard_size(row_bytes), progress=progress)
    weights = storage.weights_fingerprint(tower)
    setup = None
    if ranks.rank == 0:
        try:
            setup = _prepare_folder(out, settings, weights, shard_size, row_bytes, loader.n_images, overwrite,
                                    ranks.world_size)
        except (ValueError, OSError) as error:
            setup = error
    setup = ranks.broadcast(setup)
    if isinstance(setup, BaseException):
        raise setup
    shard_size, run_key = setup["shard_size"], setup["run_key"]
    mine = {k for k in _shards_present(out) if k % ranks.world_size == ranks.rank}
    records = {k: _finished(out, k, run_key, verify_checksums) for k in mine}
    done = {k for k, record in records.items() if record is not None}
    # A stream's short shard was where it ended last time; it is kept only if the stream ends there again.
    ended_short = {k: records[k]["n_images"] for k in done if records[k]["n_images"] < shard_size}
    n_images = loader.n_images
    total = None
    initial = 0
    if n_images is not None:
        sizes = {k: min(shard_size, n_images - k * shard_size) for k in range(-(-n_images // shard_size))}
        total = sum(size for k, size in sizes.items() if k % ranks.world_size == ranks.rank)
        initial = sum(sizes[k] for k in done if k in sizes)
    bar = progress_bar(total=total, initial=initial, desc=_label(progress), unit="img", enabled=bool(progress))
    writer = _ShardWriter()
    try:
        with bar:
            for k, first, batches in loader.shards(
                    shard_size, lambda k: k % ranks.world_size == ranks.rank and k not in done, ended_short):
                count, rows, sums = _record_shard(tower, batches, groups, autocast, device, bar)
                if count:
                    sums = {f"partial/{key}": value for key, value in sums.items()}
                    writer.submit(_write_shard, out, k, first, count, rows, sums, run_key, ranks.rank == 0)
    finally:
        writer.join()  # a shard in flight is finished (file, then record) even when the pass stops with an error
    writer.raise_error()
    n_images = loader.n_images
    ranks.barrier()
    totals = _reduce(out, recorders, partial_shapes, n_images, shard_size, ranks, device)
    if ranks.rank == 0:
        _check_shards_cover(out, run_key, n_images, shard_size)
        results = _finalize(recorders, totals)
        reductions = storage.write_tensors(out / storage.REDUCTIONS, results) if results else None
        _write_manifest(out, run_key, complete=True, n_images=n_images, reductions=reductions)
    ranks.barrier()
    return RunResult(out)


def _record_shard(tower: Any, batches: Any, groups: _Groups, autocast: Any, device: torch.device, bar: Any,
                  ) -> tuple[int, dict[str, list[Tensor]], dict[str, Tensor]]:
    """One shard's forward passes: its image count, its rows (``'<recorder>/<key>'`` -> CPU tensors, batch by
    batch) and its partial sums (``'<recorder>/<key>'``, summed over the batches, on the CPU)."""
    reference = next(tower.parameters())
    non_blocking = device.type == "cuda"
    rows: dict[str, list[Tensor]] = {}
    sums: dict[str, Tensor] = {}
    count = 0
    for images in batches:
        images = images.to(device, non_blocking=non_blocking)
        if images.is_floating_point():
            images = images.to(reference.dtype)
        for recorder, acts in groups.run(tower, images, autocast):
            for key, value in recorder.rows(acts, images).items():
                rows.setdefault(f"{recorder.name}/{key}", []).append(value.detach().to("cpu"))
            for key, value in recorder.partials(acts, images).items():
                full = f"{recorder.name}/{key}"
                sums[full] = sums[full] + value if full in sums else value.detach().clone()
        count += len(images)
        bar.update(len(images))
    return count, rows, {key: value.to("cpu") for key, value in sums.items()}


def _run_in_memory(tower: Any, loader: ShardedData, recorders: list[Any], groups: _Groups, autocast: Any,
                   shapes: dict[str, tuple], settings: dict, ranks: Ranks, device: torch.device, *, shard_size: int,
                   progress: bool | str) -> InMemoryResult:
    """The pass without a folder: each rank sums its shards' partial sums in shard order (as the on-disk
    run reduces its shard files, so the results are the same bits), then the totals are all-reduced."""
    totals = {key: torch.zeros(shape, dtype=torch.float64) for key, (shape, _) in shapes.items()}
    total = None
    if loader.n_images is not None:
        total = sum(min(shard_size, loader.n_images - k * shard_size)
                    for k in range(ranks.rank, -(-loader.n_images // shard_size), ranks.world_size))
    with progress_bar(total=total, desc=_label(progress), unit="img", enabled=bool(progress)) as bar:
        for _, _, batches in loader.shards(shard_size, lambda k: k % ranks.world_size == ranks.rank):
            count, _, sums = _record_shard(tower, batches, groups, autocast, device, bar)
            if count:
                for key in totals:
                    totals[key] += sums[key]
    totals = {key: ranks.all_reduce_sum(value, device) for key, value in totals.items()}
    return InMemoryResult(_finalize(recorders, totals), n_images=loader.n_images, shard_size=shard_size,
                          settings=settings, world_size=ranks.world_size)


def _finalize(recorders: list[Any], totals: dict[str, Tensor]) -> dict[str, Tensor]:
    """``'<recorder>/<result>'`` -> each recorder's results from its dataset totals."""
    return {f"{recorder.name}/{key}": value for recorder in recorders
            for key, value in recorder.finalize({key.split("/", 1)[1]: total for key, total in totals.items()
                                                 if key.split("/", 1)[0] == recorder.name}).items()}


def _reduce(out: Path, recorders: list[Any], shapes: dict[str, tuple], n_images: int, shard_size: int,
            ranks: Ranks, device: torch.device) -> dict[str, Tensor]:
    """Dataset totals of every partial sum: this rank's shards summed in shard order, read back from
    their files (so a resumed run reduces exactly as an uninterrupted one), then all-reduced over ranks."""
    totals = {key: torch.zeros(shape, dtype=torch.float64) for key, (shape, _) in shapes.items()}
    if not totals:
        return totals
    for k in range(ranks.rank, -(-n_images // shard_size), ranks.world_size):
        shard = storage.TensorFile(out / storage.shard_name(k))
        for key in totals:
            totals[key] += shard[f"partial/{key}"]
    return {key: ranks.all_reduce_sum(value, device) for key, value in totals.items()}


def _run_key(settings: dict, weights: str, shard_size: int) -> str:
    text = json.dumps({"settings": settings, "weights": weights, "shard_size": shard_size}, sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _prepare_folder(out: Path, settings: dict, weights: str, shard_size: int | None, row_bytes: int,
                    n_images: int | None, overwrite: bool, world_size: int) -> dict[str, Any]:
    """Rank 0: check or start the manifest; returns the shard size and the run key every rank uses."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in out.iterdir():
            if _OUR_FILES.match(path.name) or _OUR_TEMPORARIES.match(path.name):
                path.unlink()
    for path in out.iterdir():  # a crashed run's temporary files are never read; remove them
        if _OUR_TEMPORARIES.match(path.name):
            path.unlink(missing_ok=True)
    manifest = _read_manifest(out)
    fresh = "use another out_dir, or overwrite=True (CLI: --overwrite) to delete this run and start again"
    if manifest is None:
        stray = sorted(p.name for p in out.iterdir() if _OUR_FILES.match(p.name))
        if stray:
            raise ValueError(f"{out} holds runner files {stray[:3]} but no {storage.MANIFEST}, so nothing says which "
                             f"model or settings wrote them; {fresh}")
        if shard_size is None:
            shard_size = _default_shard_size(row_bytes)
        manifest = {"format": storage.FORMAT, "settings": settings, "shard_size": shard_size,
                    "weights_sha256": weights, "n_images": n_images, "complete": False, "shards": [],
                    "world_size": world_size}
        storage.write_json_atomic(out / storage.MANIFEST, manifest)
    else:
        if manifest["settings"] != settings:
            changed = {key: (manifest["settings"].get(key), settings.get(key))
                       for key in manifest["settings"].keys() | settings.keys()
                       if manifest["settings"].get(key) != settings.get(key)}
            raise ValueError(f"{out} holds a run with other settings (stored vs now: {changed}); {fresh}")
        if manifest["weights_sha256"] != weights:
            raise ValueError(f"{out} holds a run of a model whose weights have fingerprint "
                             f"{manifest['weights_sha256'][:23]}..., but this model's are {weights[:23]}...: resuming "
                             f"would mix two models' activations; {fresh}")
        if shard_size is not None and shard_size != manifest["shard_size"]:
            raise ValueError(f"{out} holds a run with shard_size={manifest['shard_size']}, not {shard_size}; pass "
                             f"shard_size={manifest['shard_size']} (or None) to resume, or {fresh}")
        if n_images is not None and manifest["n_images"] is not None and n_images != manifest["n_images"]:
            raise ValueError(f"{out} holds a run over {manifest['n_images']} images, but this dataset has {n_images}; "
                             f"{fresh}")
        shard_size = manifest["shard_size"]
    return {"shard_size": shard_size, "run_key": _run_key(settings, weights, shard_size)}


def _default_shard_size(row_bytes: int) -> int:
    size = 4096
    while size > 16 and size * row_bytes > _SHARD_BYTES:
        size //= 2
    return size


def _read_manifest(out: Path) -> dict | None:
    path = out / storage.MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); pass overwrite=True to start the run again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != storage.FORMAT:
        raise ValueError(f"{path} is not a vit_lens run manifest (format {storage.FORMAT}); use another out_dir, or "
                         "overwrite=True to replace it")
    return manifest


def _shards_present(out: Path) -> list[int]:
    return sorted(int(path.name[6:12]) for path in out.glob("shard_*.json"))


def _finished(out: Path, k: int, run_key: str, checksum: bool) -> dict | None:
    """Shard ``k``'s record if it is done (the record belongs to this run and its file matches it), else None."""
    try:
        record = json.loads((out / storage.record_name(k)).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if record.get("run_key") != run_key:
        return None
    problem = storage.check_file(out / record["file"], record, checksum)
    if problem:
        warnings.warn(f"{problem}; computing shard {k} again", stacklevel=3)
        return None
    return record


def _check_shards_cover(out: Path, run_key: str, n_images: int, shard_size: int) -> None:
    """Rank 0, at the end: this run's records are shards ``0..n-1`` holding exactly images ``[k * S, (k + 1) * S)``.

    Shards kept from an earlier pass over a stream that was longer than this one would not.
    """
    n_shards = -(-n_images // shard_size)
    records = {}
    for k in _shards_present(out):
        try:
            record = json.loads((out / storage.record_name(k)).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if record.get("run_key") == run_key:
            records[k] = record
    missing = [k for k in range(n_shards) if k not in records]
    if missing:
        raise RuntimeError(f"Shards {missing} of {out} were not written by any rank; run again to compute them")
    wrong = [k for k, record in sorted(records.items())
             if k >= n_shards or (record["first_image"], record["n_images"])
             != (k * shard_size, min(shard_size, n_images - k * shard_size))]
    if wrong:
        held = {k: (records[k]["first_image"], records[k]["first_image"] + records[k]["n_images"]) for k in wrong}
        raise ValueError(f"The data gave a stream of {n_images} images, which is shorter than the run in {out}: its "
                         f"shards {wrong} hold images {list(held.values())} from an earlier, longer pass. Resume with "
                         "the same stream (or one that goes on further), or pass overwrite=True to start again")


class _ShardWriter:
    """Writes shards on one background thread, so that a shard's serialisation, hashing and fsync overlap
    the next shard's forward passes (file I/O and hashing release the GIL).

    One shard is in flight at most: :meth:`submit` first waits for the previous one, so memory holds at
    most two shards' rows (the one written, the one filled). An error in the thread is raised in the
    caller's thread, by the next :meth:`submit` or by :meth:`raise_error` after :meth:`join`.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[..., None], *args: Any) -> None:
        self.join()
        self.raise_error()
        self._thread = threading.Thread(target=self._call, args=(write, *args), name="vit_lens shard writer")
        self._thread.start()

    def _call(self, write: Callable[..., None], *args: Any) -> None:
        try:
            write(*args)
        except BaseException as error:  # handed to the caller's thread
            self._error = error

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error


def _write_shard(out: Path, k: int, first: int, count: int, rows: dict[str, list[Tensor]],
                 sums: dict[str, Tensor], run_key: str, update_manifest: bool) -> None:
    """Shard ``k``'s file, then (after its fsync and rename) its record, then on rank 0 the manifest."""
    tensors: dict[str, Tensor | list[Tensor]] = {**rows, **sums}
    # One metadata entry, so that the header's bytes depend only on the shard.
    metadata = {"vit_lens": json.dumps({"format": storage.FORMAT, "shard": k, "first_image": first, "n_images": count})}
    written = storage.write_tensors(out / storage.shard_name(k), tensors, metadata)
    record = {"index": k, "file": storage.shard_name(k), "first_image": first, "n_images": count,
              "rows": {key: sum(len(part) for part in parts) for key, parts in rows.items()},
              "run_key": run_key, **written}
    storage.write_json_atomic(out / storage.record_name(k), record)
    if update_manifest:
        _write_manifest(out, run_key, complete=False)


def _write_manifest(out: Path, run_key: str, complete: bool, n_images: int | None = None, reductions: dict | None = None) -> None:
    """Rank 0: the manifest lists every shard with a record (whoever wrote it), in shard order."""
    manifest = _read_manifest(out)
    records = []
    for k in _shards_present(out):
        try:
            records.append(json.loads((out / storage.record_name(k)).read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # another rank's record appears atomically; a file that cannot be read is not one yet
    manifest["shards"] = [record for record in records if record.get("run_key") == run_key]
    manifest["complete"] = complete
    if n_images is not None:
        manifest["n_images"] = n_images
    if reductions is not None:
        manifest["reductions"] = {"file": storage.REDUCTIONS, **reductions}
    storage.write_json_atomic(out / storage.MANIFEST, manifest)
