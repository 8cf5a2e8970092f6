"""Activations for SAE training, streamed: from images through a model, and shuffled across image batches.

:class:`ActivationSource` runs a model on batches of images, stops each forward pass after the
block that holds the SAE's hook point(s) (``run_with_cache(names_filter=..., stop_at_layer=...)``)
and keeps the rows of the tokens the SAE is for (``cfg.token_selection``, narrowed by an optional
token mask): one chunk of rows per image batch. :class:`ActivationBuffer` shuffles the chunks'
rows together before serving them as training batches, holding at most ``buffer_tokens`` rows,
so a dataset's activations are never in memory at once. :func:`cached_chunks` serves the same
chunks from activations the dataset runner cached on disk (:class:`vit_lens.runner.ShardedRows`),
so an SAE trained on the cache equals one trained on the streamed images.

Example:
    >>> import vit_lens
    >>> from vit_lens.sae import SAE, SAEConfig
    >>> from vit_lens.toy import ToyWorld
    >>> clip = vit_lens.load_toy_clip()
    >>> sae = SAE(SAEConfig(d_in=128, d_sae=64, hook_name="blocks.2.hook_resid_post", token_selection="patches"))
    >>> source = ActivationSource(clip, sae, [ToyWorld(seed=0).sample(4).images])
    >>> tuple(next(source.chunks()).shape)   # 4 images x 64 patches
    (256, 128)
"""

import math
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from vit_lens.model.hook_layout import hook_axes
from vit_lens.model.hooked_vit import image_tower
from vit_lens.runner.readback import ShardedRows
from vit_lens.sae.model import SAE
from vit_lens.sae.splice import _check_hook_name, _token_slice

TokenMask = Callable[[Tensor, Tensor], Tensor]
"""``token_mask(activations [batch, pos, width], images [batch, C, H, W]) -> bool [batch, pos] or [pos]``."""


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class ActivationBuffer:
    """Rows of activations from several image batches, shuffled together before they are served.

    Chunks (one per image batch, ``[n, width]``) are copied into a store of ``buffer_tokens`` rows.
    When the store is full, its rows are shuffled and the upper half is served as training
    batches of ``batch_size_tokens`` rows; the lower half stays, to be shuffled with the next
    chunks (SAELens's mixing buffer works the same way). A row therefore meets rows of other
    image batches before it is served, and consecutive training batches are not one image
    batch's tokens. The store never holds more than ``buffer_tokens`` rows; the part of a chunk
    that does not fit waits as the pending rows (less than one chunk). When the chunks run out,
    what is left is shuffled and served in whole batches; fewer rows than one batch are dropped.

    Args:
        chunks: An iterator of ``[n, width]`` tensors.
        buffer_tokens: Rows the store holds (at least two batches).
        batch_size_tokens: Rows per served batch.
        generator: The CPU random generator of the shuffles.
        device: Where the store lives (the training device).

    Example:
        >>> chunks = iter([torch.full((5, 2), float(i)) for i in range(8)])
        >>> buffer = ActivationBuffer(chunks, buffer_tokens=16, batch_size_tokens=4,
        ...                           generator=torch.Generator().manual_seed(0))
        >>> batch = next(buffer)
        >>> tuple(batch.shape), len(set(batch[:, 0].tolist())) > 1   # rows of several chunks
        ((4, 2), True)
    """

    def __init__(self, chunks: Iterator[Tensor], *, buffer_tokens: int, batch_size_tokens: int,
                 generator: torch.Generator, device: str | torch.device = "cpu"):
        if buffer_tokens < 2 * batch_size_tokens:
            raise ValueError(f"buffer_tokens ({buffer_tokens}) must hold at least two batches of {batch_size_tokens}")
        self.chunks = chunks
        self.buffer_tokens = buffer_tokens
        self.batch_size_tokens = batch_size_tokens
        self.generator = generator
        self.device = torch.device(device)
        self.chunks_consumed = 0
        self.exhausted = False
        self._rows: Tensor | None = None
        self._count = 0  # rows held, the serving region included
        # [serve_start, serve_end) is being served, batch by batch from next_row; the rows below stay for the next
        # shuffle. The served rows are always the top of the store, so dropping them is lowering the count.
        self._serve_start = self._serve_end = self._next_row = 0
        self._pending: Tensor | None = None

    @property
    def held_tokens(self) -> int:
        """Rows in the store now (never more than ``buffer_tokens``)."""
        return self._count

    def __iter__(self) -> "ActivationBuffer":
        return self

    def _store(self, chunk: Tensor) -> Tensor | None:
        """Copy as much of ``chunk`` as fits; return the rest (None when it all fit)."""
        if self._rows is None:
            self._rows = torch.empty(self.buffer_tokens, chunk.shape[1], dtype=chunk.dtype, device=self.device)
        elif chunk.shape[1] != self._rows.shape[1]:
            raise ValueError(
                f"Activation chunks changed width from {self._rows.shape[1]} to {chunk.shape[1]}; every chunk must "
                "have the same number of columns."
            )
        fit = min(self.buffer_tokens - self._count, len(chunk))
        self._rows[self._count:self._count + fit] = chunk[:fit].to(self.device, self._rows.dtype)
        self._count += fit
        return chunk[fit:] if fit < len(chunk) else None

    def fill(self) -> Tensor:
        """Read chunks until the store is full (or the chunks run out); the rows held, a view."""
        self._fill()
        return self._rows[:self._count] if self._rows is not None else torch.empty(0, 0)

    def _fill(self) -> None:
        while self._count < self.buffer_tokens:
            if self._pending is not None:
                chunk, self._pending = self._pending, None
            elif self.exhausted:
                return
            else:
                try:
                    chunk = next(self.chunks)
                except StopIteration:
                    self.exhausted = True
                    return
                self.chunks_consumed += 1
                if chunk.ndim != 2:
                    raise ValueError(f"Activation chunks must be [rows, width], got shape {tuple(chunk.shape)}")
            self._pending = self._store(chunk)

    def _start_serving(self) -> None:
        self._fill()
        held = self._count
        kept = 0 if self.exhausted else self.buffer_tokens // 2
        n_batches = (held - kept) // self.batch_size_tokens
        if n_batches == 0:
            raise StopIteration
        order = torch.randperm(held, generator=self.generator).to(self.device)
        self._rows[:held] = self._rows[order]
        self._serve_start, self._serve_end = held - n_batches * self.batch_size_tokens, held
        self._next_row = self._serve_start

    def __next__(self) -> Tensor:
        if self._next_row >= self._serve_end:
            self._count -= self._serve_end - self._serve_start
            self._serve_start = self._serve_end = self._next_row = 0
            self._start_serving()
        batch = self._rows[self._next_row:self._next_row + self.batch_size_tokens].clone()
        self._next_row += self.batch_size_tokens
        return batch

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, values)``: what a checkpoint stores to continue this buffer exactly."""
        tensors = {}
        if self._rows is not None:
            tensors["rows"] = self._rows[:self._count].contiguous()
        if self._pending is not None:
            tensors["pending"] = self._pending.contiguous()
        values = {"count": self._count, "serve_start": self._serve_start, "serve_end": self._serve_end,
                  "next_row": self._next_row, "exhausted": self.exhausted,
                  "chunks_consumed": self.chunks_consumed, "generator": self.generator.get_state()}
        return tensors, values

    def load_state(self, tensors: dict[str, Tensor], values: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned (the chunk iterator must already be past the chunks consumed)."""
        rows = tensors.get("rows")
        if rows is not None:
            self._rows = torch.empty(self.buffer_tokens, rows.shape[1], dtype=rows.dtype, device=self.device)
            self._rows[:len(rows)] = rows.to(self.device)
        pending = tensors.get("pending")
        self._pending = None if pending is None else pending.to(self.device)
        self._count, self._next_row = values["count"], values["next_row"]
        self._serve_start, self._serve_end = values["serve_start"], values["serve_end"]
        self.exhausted, self.chunks_consumed = values["exhausted"], values["chunks_consumed"]
        self.generator.set_state(values["generator"])


# ---------------------------------------------------------------------------------------------- activations from images


def _image_tensor(item: Any, position: int) -> Tensor:
    """The images of one item of an image iterable: a tensor, the first element of a tuple, or ``.images``."""
    if isinstance(item, Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        return item[0]
    if isinstance(getattr(item, "images", None), Tensor):
        return item.images
    if isinstance(item, dict):
        for key in ("pixel_values", "images", "image"):
            if isinstance(item.get(key), Tensor):
                return item[key]
    raise TypeError(
        f"Item {position} of the images is a {type(item).__name__}; each item must be a batch of images "
        "[batch, C, H, W]: a tensor, a (images, labels) tuple as a DataLoader yields, an object with .images (a "
        "ToyBatch), or a dict with 'pixel_values'."
    )


def image_batches(images: Any, image_batch_size: int = 64) -> Callable[[], Iterator[Any]]:
    """A function that starts a new pass over ``images`` (a tensor is split into batches of ``image_batch_size``).

    Raises:
        TypeError: ``images`` is not a tensor or an iterable.
    """
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(
                f"A tensor of images must be [n, C, H, W], got shape {tuple(images.shape)}; it is split into batches "
                "of image_batch_size."
            )
        _positive_int("image_batch_size", image_batch_size)
        return lambda: iter(images.split(image_batch_size))
    if isinstance(images, ShardedRows):
        raise TypeError(
            f"images is a ShardedRows: activations cached at {images.key!r}, not images. Train on them with "
            "vit_lens.sae.train_sae_on_activations(cfg, rows, image_batch_size=...), which gives the SAE train_sae "
            "gives on the images those rows were cached from."
        )
    if isinstance(images, (str, bytes)) or not isinstance(images, Iterable):
        raise TypeError(
            f"images must be an iterable of image batches (a DataLoader, a generator, a list) or a tensor "
            f"[n, C, H, W], got a {type(images).__name__}"
        )
    return lambda: iter(images)


def _stop_layer(names: Iterable[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every hook point in ``names`` (None: the whole tower)."""
    stops = []
    for name in names:
        block = re.match(r"blocks\.(\d+)\.", name)
        if block:
            stops.append(int(block.group(1)) + 1)
        elif name.startswith(("hook_embed", "hook_pos_embed", "ln_pre.")):
            stops.append(0)
        else:
            return None
    return max(stops)


class ActivationSource:
    """The rows an SAE trains on, from batches of images run through a model (one chunk per image batch).

    Args:
        model: A HookedViT, or a HookedCLIP (its image tower runs).
        sae: The SAE or transcoder: its hook point(s), token selection and widths.
        images: The images (see :func:`image_batches`).
        token_mask: Optional :data:`TokenMask`, which narrows the SAE's token selection further.
        image_batch_size: Images per batch when ``images`` is a tensor.
        cycle: Start a new pass when ``images`` runs out (only where it can be iterated again).
    """

    def __init__(self, model: Any, sae: SAE, images: Any, *, token_mask: TokenMask | None = None,
                 image_batch_size: int = 64, cycle: bool = True):
        self.tower = image_tower(model)
        cfg = sae.cfg
        if cfg.hook_name is None:
            raise ValueError(
                "The SAE has no hook_name, so there is nothing to train it on: set SAEConfig.hook_name to a hook point "
                "of the model, e.g. 'blocks.3.hook_resid_post'."
            )
        _check_hook_name(self.tower, cfg.hook_name, "hook_name")
        self.names = [cfg.hook_name]
        if cfg.is_transcoder:
            _check_hook_name(self.tower, cfg.hook_name_out, "hook_name_out")
            self.names.append(cfg.hook_name_out)
        if token_mask is not None and not callable(token_mask):
            raise TypeError(
                f"token_mask must be a function (activations [batch, pos, width], images) -> bool [batch, pos], got "
                f"{type(token_mask).__name__}; the SAE's own selection is SAEConfig.token_selection."
            )
        self.sae = sae
        self.token_mask = token_mask
        self.tokens = _token_slice(cfg.token_selection, self.tower.cfg, sae)
        self.stop = _stop_layer(self.names)
        self.new_pass = image_batches(images, image_batch_size)
        self.reiterable = not isinstance(images, Iterator)  # a generator is spent after one pass
        self.cycle = cycle

    def _flat(self, activation: Tensor, name: str, width: int) -> Tensor:
        if self.sae.cfg.reshape_activations == "hook_z":
            activation = activation.flatten(-2)
        if activation.shape[-1] != width:
            role = "d_in" if name == self.sae.cfg.hook_name else "d_out"
            raise ValueError(
                f"The SAE's {role} is {width}, but the activation at {name!r} of {self.tower.cfg.model_name} is "
                f"{tuple(activation.shape)} (width {activation.shape[-1]}); build the SAE with {role}="
                f"{activation.shape[-1]}, or check hook_name" + (" and reshape_activations ('hook_z' flattens heads)."
                                                                 if name.endswith("hook_z") else ".")
            )
        return activation

    def _mask(self, activation: Tensor, images: Tensor, name: str) -> Tensor | None:
        """Bool ``[batch, pos]`` of the rows to keep, or None for every row."""
        position = hook_axes(name, activation.ndim).position
        if position is None:
            if self.tokens is not None or self.token_mask is not None:
                raise ValueError(
                    f"{name!r} has no token axis (shape {tuple(activation.shape)}), so token_selection="
                    f"{self.sae.cfg.token_selection!r} and token_mask cannot apply; use token_selection='all'."
                )
            return None
        batch, pos = activation.shape[0], activation.shape[1]
        if self.tokens is None and self.token_mask is None:
            return None
        keep = torch.zeros(batch, pos, dtype=torch.bool, device=activation.device)
        keep[:, self.tokens if self.tokens is not None else slice(None)] = True
        if self.token_mask is not None:
            user = self.token_mask(activation, images)
            if not isinstance(user, Tensor) or user.dtype != torch.bool or user.shape not in ((batch, pos), (pos,)):
                raise ValueError(
                    f"token_mask must return a bool tensor [batch, pos] = [{batch}, {pos}] or [pos], got "
                    + (f"{user.dtype} {tuple(user.shape)}" if isinstance(user, Tensor) else type(user).__name__)
                )
            keep &= user.to(keep.device)
        return keep

    def prepare_images(self, images: Tensor) -> Tensor:
        """``images`` on the model's device, in its dtype."""
        weight = self.tower.embed.W_E
        return images.to(device=weight.device, dtype=weight.dtype)

    @torch.no_grad()
    def rows(self, images: Tensor) -> Tensor:
        """``[n, d_in]`` (a transcoder: ``[n, d_in + d_out]``, input and target side by side) for one image batch."""
        images = self.prepare_images(images)
        _, cache = self.tower.run_with_cache(images, names_filter=self.names, stop_at_layer=self.stop)
        return self.rows_from_cache(cache, images)

    def rows_from_cache(self, cache: Any, images: Tensor) -> Tensor:
        """The rows of :meth:`rows`, from a cache that holds the SAE's hook point(s) for ``images``."""
        cfg = self.sae.cfg
        widths = [cfg.d_in, cfg.d_out] if cfg.is_transcoder else [cfg.d_in]
        parts = []
        for name, width in zip(self.names, widths):
            activation = self._flat(cache[name], name, width)
            keep = self._mask(activation, images, name)
            parts.append(activation.reshape(-1, width) if keep is None else activation[keep])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def chunks(self, skip: int = 0) -> Iterator[Tensor]:
        """Rows per image batch, passing over the images again while ``cycle``; the first ``skip`` batches are
        read but not run (a resumed run)."""
        seen = 0
        while True:
            batches_this_pass = 0
            for item in self.new_pass():
                batches_this_pass += 1
                seen += 1
                if seen <= skip:
                    continue
                yield self.rows(_image_tensor(item, seen - 1))
            if batches_this_pass == 0:
                if seen == 0:
                    raise ValueError("images yielded no image batches: there is nothing to train on.")
                return
            if not (self.cycle and self.reiterable):
                return


# ---------------------------------------------------------------------------------------------- activations from a cache


def cached_chunks(inputs: ShardedRows, width: int, images_per_chunk: int, *, targets: ShardedRows | None = None,
                  target_width: int | None = None, cycle: bool = True, skip: int = 0) -> Iterator[Tensor]:
    """Chunks ``[rows, width]`` of activations cached by :func:`vit_lens.runner.run_dataset`, as
    :class:`ActivationSource` yields them from the images.

    Chunk ``i`` holds the rows of images ``[i * images_per_chunk, (i + 1) * images_per_chunk)``, token
    by token in image order (the last chunk of a pass may be shorter). With the SAE's token
    selection as the ``Activations`` recorder's ``tokens``, the rows come in the order a streamed
    :class:`ActivationSource` pass over the same images gives them, and the
    :class:`ActivationBuffer`, which fills row by row, serves the same training batches.

    Args:
        inputs: The cached rows (``RunResult.activations(hook)``, ``rows='images'`` or ``'tokens'``).
        width: Columns per row (the SAE's ``d_in``; a ``hook_z`` row ``[head, d_head]`` is flattened).
        images_per_chunk: Images per chunk.
        targets: A transcoder's cached targets, the same images; their rows go beside the inputs'.
        target_width: Columns of a target row (the transcoder's ``d_out``).
        cycle: Start again at the first image when the rows run out.
        skip: Chunks to pass over first (a resumed run); they are not read.

    Raises:
        ValueError: rows that do not split into ``width`` columns, or targets of other images.
    """
    _positive_int("images_per_chunk", images_per_chunk)
    sources = [(inputs, width, "inputs")] + ([(targets, target_width, "targets")] if targets is not None else [])
    counts = []
    for rows, columns, role in sources:
        if not isinstance(rows, ShardedRows):
            raise TypeError(f"{role} must be a vit_lens.runner.ShardedRows (RunResult.activations(hook)), got a "
                            f"{type(rows).__name__}")
        per_row = math.prod(rows.row_shape)
        if per_row % columns:
            raise ValueError(f"The cached {role} {rows.key!r} have rows of shape {rows.row_shape}, which do not split "
                             f"into rows of {columns} columns (the SAE's {'d_in' if role == 'inputs' else 'd_out'}); "
                             "cache the SAE's hook point, or build the SAE with the cached width.")
        counts.append(len(rows) // rows.per_image)
    if len(set(counts)) != 1:
        raise ValueError(f"The cached inputs hold {counts[0]} images and the targets {counts[1]}; cache both hook "
                         "points in one run (one Activations recorder with both hooks).")
    n_images = counts[0]
    n_chunks = -(-n_images // images_per_chunk)
    index = skip
    while index < n_chunks or (cycle and n_chunks):
        first = (index % n_chunks) * images_per_chunk
        stop = min(first + images_per_chunk, n_images)
        parts = [rows.rows(torch.arange(first * rows.per_image, stop * rows.per_image)).reshape(-1, columns)
                 for rows, columns, _ in sources]
        yield parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        index += 1
