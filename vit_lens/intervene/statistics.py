"""Dataset statistics of hook activations: streamed means and variances, saved as safetensors.

:func:`compute_hook_statistics` runs a dataset through the model once, as a
:func:`vit_lens.runner.run_dataset` pass: a :class:`ShiftedMoments` recorder sums, in float64, each
hook's values minus a fixed shift (its value on the dataset's first image), which adds up over
batches, shards and ranks and keeps the digits a plain sum of squares would cancel to a large
offset. Neither the dataset nor its activations are held: in memory by default (and split over
processes under ``torchrun``), or with ``out_dir`` into a run folder that resumes after an
interruption. The result, a :class:`HookStatistics`, is what
:func:`vit_lens.intervene.interventions.mean_ablate` and the layer-averaging hooks take; it keeps
accumulating with :meth:`HookStatistics.update` (Chan et al.'s pairwise update).
"""

import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from vit_lens.model.hook_layout import hook_axes
from vit_lens.model.hooked_vit import image_tower
from vit_lens.runner.run import last_block_needed, run_dataset

_FORMAT = "vit_lens.HookStatistics/1"


class HookStatistics:
    """Count, mean and (optionally) variance of hook activations over a dataset, per hook name.

    Statistics are over the batch axis, kept per token position by default. With
    ``per_position=False`` they are pooled over the token axis too (the query axis of attention
    patterns); that axis is kept with size 1 so the mean still broadcasts to the activation:
    ``[1, d_model]`` for a residual hook, ``[1, head, d_head]`` for ``hook_z``, ``[head, 1, key]``
    for ``hook_pattern``. Hooks without a token axis (``hook_pooled``, ``hook_image_embed``) give
    ``[d]`` either way. Everything is stored in float64.

    Build one with :func:`compute_hook_statistics`, or feed batches yourself with :meth:`update`.

    Example:
        >>> stats = HookStatistics(variance=True)
        >>> stats.update("blocks.0.hook_resid_post", torch.ones(4, 5, 8))
        >>> stats.mean("blocks.0.hook_resid_post").shape, stats.count("blocks.0.hook_resid_post")
        (torch.Size([5, 8]), 4)
    """

    def __init__(self, *, per_position: bool = True, variance: bool = False):
        self.per_position = per_position
        self.variance = variance
        self._counts: dict[str, int] = {}
        self._means: dict[str, Tensor] = {}
        self._m2: dict[str, Tensor] = {}  # sums of squared deviations from the mean

    @property
    def names(self) -> list[str]:
        """The hook names held, in the order they were first seen (forward order)."""
        return list(self._counts)

    def __contains__(self, name: object) -> bool:
        return name in self._counts

    def __getitem__(self, name: str) -> Tensor:
        """The mean of hook ``name``, as :meth:`mean`."""
        return self.mean(name)

    def __repr__(self) -> str:
        kind = "per position" if self.per_position else "pooled over positions"
        return f"HookStatistics({len(self._counts)} hooks, {kind}, variance={self.variance}, names={self.names})"

    def count(self, name: str) -> int:
        """How many values each entry of the mean averages: images, or images x tokens if pooled."""
        return self._counts[self._check_name(name)]

    def mean(self, name: str) -> Tensor:
        """The float64 mean of hook ``name``: the activation's shape without the batch axis (see the class)."""
        return self._means[self._check_name(name)]

    def var(self, name: str, correction: int = 1) -> Tensor:
        """The float64 variance of hook ``name``, with ``correction`` as in ``torch.var`` (1: unbiased).

        Needs ``variance=True`` when the statistics were computed.
        """
        self._check_name(name)
        if not self.variance:
            raise ValueError("These HookStatistics were computed without variances; pass variance=True")
        return self._m2[name] / (self._counts[name] - correction)

    @torch.no_grad()
    def update(self, name: str, activation: Float[Tensor, "batch *rest"]) -> None:
        """Fold one batch of hook ``name``'s activation into the running statistics.

        Args:
            name: The hook point's name (its token axis is read from it).
            activation: ``[batch, ...]`` as the hook point gives it.
        """
        values = activation.detach()
        if values.device.type == "mps":  # MPS has no float64
            values = values.cpu()
        values = values.to(torch.float64)
        position = hook_axes(name, values.ndim).position
        dims = (0,) if self.per_position or position is None else (0, position)
        n_new = math.prod(values.shape[d] for d in dims)
        mean_new = values.mean(dim=dims, keepdim=True)
        m2_new = (values - mean_new).square().sum(dim=dims, keepdim=True).squeeze(0) if self.variance else None
        mean_new = mean_new.squeeze(0)
        if name not in self._counts:
            self._counts[name], self._means[name] = n_new, mean_new
            if m2_new is not None:
                self._m2[name] = m2_new
            return
        mean = self._means[name]
        if mean.shape != mean_new.shape:
            raise ValueError(
                f"{name!r} had shape {tuple(mean.shape)} (without the batch axis) in earlier batches and "
                f"{tuple(mean_new.shape)} now; statistics per position need images of one size "
                "(or use per_position=False)"
            )
        n_old = self._counts[name]
        total = n_old + n_new
        delta = mean_new.to(mean.device) - mean
        mean += delta * (n_new / total)
        if m2_new is not None:
            self._m2[name] += m2_new.to(mean.device) + delta.square() * (n_old * n_new / total)
        self._counts[name] = total

    def save(self, path: str | Path) -> None:
        """Write the statistics to a safetensors file (means, sums of squared deviations, counts).

        Example:
            >>> stats.save("resid_means.safetensors")  # doctest: +SKIP
            >>> stats = HookStatistics.load("resid_means.safetensors")  # doctest: +SKIP
        """
        from safetensors.torch import save_file

        tensors = {f"{name}/mean": mean.contiguous().cpu() for name, mean in self._means.items()}
        tensors.update({f"{name}/m2": m2.contiguous().cpu() for name, m2 in self._m2.items()})
        metadata = {
            "format": _FORMAT,
            "names": json.dumps(self.names),
            "counts": json.dumps(self._counts),
            "per_position": json.dumps(self.per_position),
            "variance": json.dumps(self.variance),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "HookStatistics":
        """Read statistics written by :meth:`save`; :meth:`update` can continue from them."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as file:
            metadata = file.metadata() or {}
            if metadata.get("format") != _FORMAT:
                raise ValueError(
                    f"{path} is not a file written by HookStatistics.save (its metadata format is "
                    f"{metadata.get('format')!r}, expected {_FORMAT!r})"
                )
            stats = cls(per_position=json.loads(metadata["per_position"]), variance=json.loads(metadata["variance"]))
            counts = json.loads(metadata["counts"])
            for name in json.loads(metadata["names"]):
                stats._counts[name] = int(counts[name])
                stats._means[name] = file.get_tensor(f"{name}/mean")
                if stats.variance:
                    stats._m2[name] = file.get_tensor(f"{name}/m2")
        return stats

    def _check_name(self, name: str) -> str:
        if name not in self._counts:
            raise KeyError(
                f"No statistics for {name!r}; these HookStatistics hold {self.names}. Compute it with "
                f"compute_hook_statistics(model, data, [{name!r}, ...])"
            )
        return name


def compute_hook_statistics(
    model: Any,
    data: Iterable,
    names: str | Sequence[str] | Callable[[str], bool],
    *,
    variance: bool = False,
    per_position: bool = True,
    max_batches: int | None = None,
    progress: bool = True,
    out_dir: str | os.PathLike | None = None,
) -> HookStatistics:
    """Stream a dataset through the model once and accumulate statistics of the named hooks.

    Hooks only observe: the pass is a :func:`vit_lens.runner.run_dataset` run whose recorder
    (:class:`ShiftedMoments`) folds each batch into float64 sums and drops its activations, so
    memory does not grow with the dataset and nothing else is cached. When every name is inside
    the first blocks, the forward stops after the last block needed. Under ``torchrun`` each
    process runs its share of the data and the sums are all-reduced: every rank returns the
    dataset's statistics.

    Args:
        model: A ``HookedViT``, or a ``HookedCLIP`` (its image tower is run).
        data: An iterable of image batches ``[batch, channels, height, width]`` (a DataLoader,
            a list of tensors, ...), or of ``(images, labels, ...)`` tuples; images are moved to
            the model's device and dtype. The model runs on batches of the first batch's size
            (larger ones are split, smaller ones joined); the statistics depend on the split only
            as far as the model's own rounding does (a float32 forward rounds a little differently
            per batch size).
        names: Hook names (one or a list), or a filter function of the name.
        variance: Also accumulate variances (:meth:`HookStatistics.var`).
        per_position: Keep statistics per token (default), or pool over tokens.
        max_batches: Stop after this many batches (no batch past them is loaded).
        progress: Show a progress bar (images/s).
        out_dir: None (default): keep the sums in memory. A folder: write the run there (only the
            float64 partial sums per shard, no activations), so that an interrupted pass resumes
            where it stopped; the statistics equal the in-memory pass's.

    Returns:
        A :class:`HookStatistics` with the hooks that were run.

    Example:
        >>> loader = torch.utils.data.DataLoader(dataset, batch_size=64)  # doctest: +SKIP
        >>> names = [f"blocks.{layer}.hook_resid_post" for layer in range(12)]
        >>> stats = compute_hook_statistics(model, loader, names)  # doctest: +SKIP
        >>> stats.mean("blocks.3.hook_resid_post").shape  # [pos, d_model]  # doctest: +SKIP
    """
    tower = image_tower(model)
    if isinstance(names, str):
        names = [names]
    if not callable(names) and not names:
        raise ValueError("compute_hook_statistics needs at least one hook name")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    stream = iter(data if max_batches is None else itertools.islice(data, max_batches))  # loads no batch past the last
    first = next(stream, None)
    if first is None:
        raise ValueError("compute_hook_statistics got no batches from data")
    batch = _images_of(first)
    shifts = _first_image_values(tower, batch[:1], names, per_position)
    recorder = ShiftedMoments(shifts, per_position=per_position, variance=variance)
    # the model runs on batches of the first batch's size: larger ones are split, smaller ones joined
    result = run_dataset(tower, itertools.chain([batch], (_images_of(item) for item in stream)), out_dir, recorder,
                         batch_size=len(batch), progress=progress and "hook statistics")
    stats = HookStatistics(per_position=per_position, variance=variance)
    for name in recorder.hooks:
        stats._counts[name] = int(result.reductions[f"{recorder.name}/{name}/count"].item())
        stats._means[name] = result.reductions[f"{recorder.name}/{name}/mean"]
        if variance:
            stats._m2[name] = result.reductions[f"{recorder.name}/{name}/m2"]
    return stats


def _first_image_values(tower: Any, image: Tensor, names: Any, per_position: bool) -> dict[str, Tensor]:
    """The shifts: each named hook's value on one image (pooled over tokens unless ``per_position``), float64.

    Any value near the data keeps the shifted sums' digits; one image costs one image's forward."""
    values = HookStatistics(per_position=per_position)

    def keep(activation, hook):
        values.update(hook.name, activation)

    # dict.fromkeys: a name listed twice must not be counted twice
    fwd_hooks = [(names, keep)] if callable(names) else [(name, keep) for name in dict.fromkeys(names)]
    reference = next(tower.parameters())
    image = image.to(reference.device)
    # Only float images take the model's dtype: integer pixels must still meet HookedViT's check.
    image = image.to(reference.dtype) if image.is_floating_point() else image
    with torch.no_grad(), tower.hooks(fwd_hooks=fwd_hooks):
        tower(image, stop_at_layer=None if callable(names) else last_block_needed(tower, names))
    return {name: values.mean(name) for name in values.names}


class ShiftedMoments:
    """A runner recorder of :class:`HookStatistics`: count, sum and sum of squares of ``value - shift``.

    The sums add up over batches, shards and ranks, as the runner needs; subtracting a fixed
    ``shift`` near the mean (the dataset's first image's value) first keeps the variance's digits,
    which a plain sum of squares loses to a large offset.

    Args:
        shifts: Hook name -> the shift, the shape of :meth:`HookStatistics.mean` (float64).
        per_position: As :class:`HookStatistics`.
        variance: Also sum squares.
        name: The recorder's name in the run folder.
    """

    tokens = "all"

    def __init__(self, shifts: dict[str, Tensor], *, per_position: bool, variance: bool, name: str = "statistics"):
        self.shifts = shifts
        self.hooks = tuple(shifts)
        self.per_position, self.variance, self.name = per_position, variance, name

    def settings(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for hook, shift in self.shifts.items():
            digest.update(hook.encode() + shift.double().cpu().contiguous().numpy().tobytes())
        return {"kind": "hook_statistics", "hooks": list(self.hooks), "per_position": self.per_position,
                "variance": self.variance, "shift_sha256": "sha256:" + digest.hexdigest()}

    def rows(self, activations: dict[str, Tensor], images: Tensor) -> dict[str, Tensor]:
        return {}

    def partials(self, activations: dict[str, Tensor], images: Tensor) -> dict[str, Tensor]:
        sums = {}
        for hook in self.hooks:
            values = activations[hook].to(torch.float64)
            position = hook_axes(hook, values.ndim).position
            dims = (0,) if self.per_position or position is None else (0, position)
            shifted = values - self.shifts[hook].to(values.device)
            sums[f"{hook}/count"] = torch.tensor([float(math.prod(values.shape[d] for d in dims))],
                                                 dtype=torch.float64, device=values.device)
            sums[f"{hook}/sum"] = shifted.sum(dim=dims, keepdim=True).squeeze(0)
            if self.variance:
                sums[f"{hook}/squares"] = shifted.square().sum(dim=dims, keepdim=True).squeeze(0)
        return sums

    def finalize(self, totals: dict[str, Tensor]) -> dict[str, Tensor]:
        results = {}
        for hook in self.hooks:
            count, total = totals[f"{hook}/count"], totals[f"{hook}/sum"]
            results[f"{hook}/count"] = count
            results[f"{hook}/mean"] = self.shifts[hook].to(total) + total / count
            if self.variance:
                results[f"{hook}/m2"] = totals[f"{hook}/squares"] - total.square() / count
        return results


def _images_of(batch: Any) -> Tensor:
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Tensor):
        return batch
    raise TypeError(
        f"compute_hook_statistics takes batches of images [batch, channels, height, width] or (images, labels) "
        f"tuples, got a {type(batch).__name__}; map other formats first, e.g. (b['pixel_values'] for b in loader)"
    )


