"""The images of a dataset run, cut into shards: shard ``k`` is always images ``[k * S, (k + 1) * S)``.

A map-style dataset (a torch ``Dataset``, an in-order ``DataLoader`` over one, or a tensor of
images) is indexed, so a rank loads only the images of its own shards and a resumed run only those
of unfinished shards. Any other iterable of batches is streamed: every rank reads it through, runs
the model only on its shards, and the number of images is known at the end.
"""

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler, Subset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def images_of(batch: Any) -> Tensor:
    """The image tensor of a batch: the batch itself, or the first item of an ``(images, labels, ...)`` tuple."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        f"run_dataset takes batches of images [batch, channels, height, width] or (images, labels, ...) tuples, got "
        f"a {type(batch).__name__}; map other formats first, e.g. (b['pixel_values'] for b in loader)"
    )


class ImageFiles(Dataset):
    """The image files under a folder (recursively, sorted by path), each through ``transform``.

    Args:
        root: The folder.
        transform: PIL image -> ``[3, H, W]`` tensor (a model's preprocess).

    Raises:
        FileNotFoundError: ``root`` is no folder, or holds no image file.
    """

    def __init__(self, root: str | Path, transform: Callable[[Any], Tensor]):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a folder of images")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise FileNotFoundError(f"{self.root} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        from PIL import Image

        with Image.open(self.files[index]) as opened:
            return self.transform(opened.convert("RGB"))


class ShardedData:
    """``data`` cut into shards of ``shard_size`` images, loaded in batches of ``batch_size``.

    Args:
        data: A torch ``Dataset`` (items: images or ``(image, label, ...)``), a ``DataLoader`` that
            reads one in order, a tensor ``[n, C, H, W]``, or any iterable of image batches.
        batch_size: Images per forward pass (None: the DataLoader's own, else 32). Batches never
            cross a shard boundary, so a shard's values do not depend on the world size.
        num_workers: DataLoader worker processes for a Dataset.
        pin_memory: Page-locked batches, for non-blocking copies to a GPU.
    """

    def __init__(self, data: Any, batch_size: int | None, *, num_workers: int = 0, pin_memory: bool = False):
        self.collate_fn = None
        self.num_workers, self.pin_memory = num_workers, pin_memory
        if isinstance(data, DataLoader):
            if not isinstance(data.sampler, SequentialSampler) or data.batch_sampler is None:
                raise ValueError(
                    f"run_dataset reads a DataLoader in order so that shard k always holds the same images; this one "
                    f"uses a {type(data.sampler).__name__}. Pass DataLoader(dataset, shuffle=False) or the dataset "
                    "itself (shuffle the cached rows at read-back instead: RunResult.activations(...).loader(shuffle=True))"
                )
            self.collate_fn = data.collate_fn
            self.num_workers = data.num_workers if num_workers == 0 else num_workers
            self.pin_memory = data.pin_memory or pin_memory
            batch_size = batch_size or data.batch_size
            data = data.dataset
        self.batch_size = batch_size or 32
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(data, Tensor) and data.ndim != 4:
            raise ValueError(f"A tensor of images must be [n, channels, height, width], got shape {tuple(data.shape)}")
        indexable = isinstance(data, Tensor) or (
            isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"))
        if not indexable and not isinstance(data, Iterable):
            raise TypeError(f"run_dataset needs a Dataset, a DataLoader, a tensor of images or an iterable of image "
                            f"batches, got a {type(data).__name__}")
        self.data = data
        self.indexable = indexable
        self.n_images: int | None = len(data) if indexable else None
        if self.n_images == 0:
            raise ValueError("run_dataset got an empty dataset (0 images)")

    def shards(self, shard_size: int, wanted: Callable[[int], bool], ended_short: dict[int, int] | None = None,
               ) -> Iterator[tuple[int, int, Iterator[Tensor]]]:
        """``(k, first_image, batches)`` for every shard ``k`` that ``wanted(k)``; consume ``batches`` before the next.

        Args:
            shard_size: Images per shard.
            wanted: Whether to compute shard ``k``.
            ended_short: For a stream: shards an earlier run finished with fewer than ``shard_size``
                images (``k -> images``), so the stream ended there *last time*. Such a shard is kept
                only if the stream ends there again; if it goes on, the shard is yielded (computed
                again) with the images that follow. Only its images are held while this is decided.
        """
        if self.indexable:
            n_shards = -(-self.n_images // shard_size)
            for k in range(n_shards):
                if wanted(k):
                    first = k * shard_size
                    yield k, first, self._indexed(first, min(first + shard_size, self.n_images))
            return
        yield from self._streamed(shard_size, wanted, ended_short or {})

    def _indexed(self, start: int, stop: int) -> Iterator[Tensor]:
        if isinstance(self.data, Tensor):
            for first in range(start, stop, self.batch_size):
                batch = self.data[first:min(first + self.batch_size, stop)]
                yield batch.pin_memory() if self.pin_memory else batch
            return
        kwargs = {} if self.collate_fn is None else {"collate_fn": self.collate_fn}
        loader = DataLoader(Subset(self.data, range(start, stop)), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers, pin_memory=self.pin_memory, **kwargs)
        for batch in loader:
            yield images_of(batch)

    def _streamed(self, shard_size: int, wanted: Callable[[int], bool], ended_short: dict[int, int],
                  ) -> Iterator[tuple[int, int, Iterator[Tensor]]]:
        """Cut a stream of batches at shard boundaries; unwanted shards are read and dropped."""
        stream = iter(self.data)
        pending: list[Tensor] = []  # images read but not yet given to a shard (a batch cut at a boundary)

        def next_images() -> Tensor | None:
            if pending:
                return pending.pop(0)
            batch = next(stream, None)
            if batch is None:
                return None
            images = images_of(batch)
            if images.ndim != 4:
                raise ValueError(f"Each batch must be images [batch, C, H, W], got shape {tuple(images.shape)}")
            return images

        def read(limit: int) -> Iterator[Tensor]:
            """Up to ``limit`` images, in the stream's pieces, cut at ``limit``."""
            held = 0
            while held < limit:
                images = next_images()
                if images is None:
                    return
                if len(images) > limit - held:
                    pending.insert(0, images[limit - held:])
                    images = images[:limit - held]
                held += len(images)
                yield images

        def rebatched(pieces: Iterator[Tensor]) -> Iterator[Tensor]:
            for images in pieces:
                for first in range(0, len(images), self.batch_size):
                    yield images[first:first + self.batch_size]

        k, seen = 0, 0
        while True:
            ahead = next_images()  # look ahead, so that no shard is opened for an ended stream
            if ahead is None:
                break
            pending.insert(0, ahead)
            if k in ended_short and not wanted(k):
                held = list(read(ended_short[k]))
                count = sum(len(images) for images in held)
                ahead = next_images()
                if ahead is None and count == ended_short[k]:  # the stream ends here again: the shard is done
                    seen += count
                    k += 1
                    continue
                pending[:0] = held + ([] if ahead is None else [ahead])
                keep = True
            else:
                keep = wanted(k)
            pieces = read(shard_size)
            if keep:
                counted = _Counted(pieces)
                yield k, seen, rebatched(counted)
                for _ in counted:  # drain what the consumer left
                    pass
                seen += counted.count
            else:
                seen += sum(len(images) for images in pieces)
            k += 1
        self.n_images = seen
        if seen == 0:
            raise ValueError("run_dataset got no images from data (an empty iterable)")


class _Counted:
    """An iterator of image tensors that counts the images it has given out."""

    def __init__(self, pieces: Iterator[Tensor]):
        self.pieces, self.count = pieces, 0

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        images = next(self.pieces)
        self.count += len(images)
        return images
