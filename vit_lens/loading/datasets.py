"""Datasets for the Gandelsman et al. (2024) experiments, read from folders the user downloads.

:class:`Waterbirds` reads the standard release (Sagawa et al., 2019,
``waterbird_complete95_forest2water2``): a folder of CUB bird images pasted on Places
backgrounds plus ``metadata.csv`` with columns ``img_id, img_filename, y, split, place,
place_filename`` (``y``: 0 landbird / 1 waterbird; ``place``: 0 land / 1 water; ``split``: 0 train,
1 val, 2 test). Nothing is downloaded here.
"""

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

WATERBIRDS_URL = "https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz"
WATERBIRDS_SPLITS = {"train": 0, "val": 1, "valid": 1, "test": 2}
# group = 2 * y + place
WATERBIRDS_GROUP_NAMES = ("landbird on land", "landbird on water", "waterbird on land", "waterbird on water")
_WATERBIRDS_COLUMNS = ("img_filename", "y", "split", "place")


class Waterbirds(Dataset):
    """The Waterbirds dataset: ``(image, label, group)`` with ``group = 2 * label + place``.

    Args:
        root: The extracted ``waterbird_complete95_forest2water2`` folder (holding ``metadata.csv``).
        split: ``"train"``, ``"val"`` (or ``"valid"``), ``"test"``, or 0 / 1 / 2. Gandelsman et al. (2024) uses the
            test split (5,794 images).
        transform: Applied to the PIL image (e.g. ``HookedCLIP.preprocess``); without one, items
            hold PIL images.

    Attributes:
        labels, places, groups: ``[n]`` long tensors for the split, available without reading images.
        files: Image paths, in metadata order.

    Example:
        >>> data = Waterbirds("data/waterbird_complete95_forest2water2", "test", clip.preprocess)  # doctest: +SKIP
        >>> image, label, group = data[0]  # doctest: +SKIP
        >>> data.groups.bincount()  # tensor([2255, 2255,  642,  642]) for the test split  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike, split: str | int = "test", transform: Callable | None = None):
        self.root = Path(root)
        self.split = _split_id(split)
        self.transform = transform
        metadata = self.root / "metadata.csv"
        if not metadata.is_file():
            raise FileNotFoundError(
                f"Waterbirds: {metadata} not found. Download {WATERBIRDS_URL} (Sagawa et al., 2019; "
                "github.com/kohpangwei/group_DRO), extract it and pass the waterbird_complete95_forest2water2 "
                "folder (the one holding metadata.csv) as root."
            )
        rows = _read_metadata(metadata)
        try:
            rows = [row for row in rows if int(row["split"]) == self.split]
            self.labels = torch.tensor([int(row["y"]) for row in rows], dtype=torch.long)
            self.places = torch.tensor([int(row["place"]) for row in rows], dtype=torch.long)
        except (TypeError, ValueError) as error:
            raise ValueError(f"Waterbirds: split, y and place in {metadata} must be integers ({error})") from error
        if not rows:
            raise ValueError(f"Waterbirds: {metadata} has no rows with split == {self.split} ({split!r})")
        self.files = [self.root / row["img_filename"] for row in rows]
        self.groups = 2 * self.labels + self.places
        bad = sorted({int(v) for v in torch.cat([self.labels, self.places]).tolist()} - {0, 1})
        if bad:
            raise ValueError(f"Waterbirds: y and place in {metadata} must be 0 or 1, found {bad}")
        missing = [path for path in self.files if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Waterbirds: {len(missing)} of the {len(self.files)} images that {metadata} lists for this split "
                f"are missing, e.g. {missing[0]}; re-extract {WATERBIRDS_URL} into {self.root}"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        from PIL import Image

        with Image.open(self.files[index]) as opened:
            image = opened.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index]), int(self.groups[index])


def evenly_spaced(n: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over ``range(n)`` (all of them when ``limit`` is None or >= n).

    Sorted datasets (ImageNet val in class order, Waterbirds by species) keep every class and
    group represented in a small subset this way.

    Example:
        >>> evenly_spaced(10, 4)
        [0, 2, 5, 7]
    """
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return [(i * n) // limit for i in range(limit)]


def image_batches(
    dataset: Dataset, batch_size: int = 32, *, limit: int | None = None, num_workers: int = 0
) -> DataLoader:
    """A DataLoader over ``dataset`` in order, optionally over ``limit`` evenly spaced items.

    Each batch is the default-collated items: ``(images [batch, 3, H, W], labels, groups)`` for
    :class:`Waterbirds` with a tensor transform. The loader has a length, so progress bars and
    :func:`vit_lens.intervene.store.compute_contributions_to_disk` can resume over it.

    Args:
        dataset: A map-style dataset whose items collate (images must be tensors: set a transform).
        batch_size: Items per batch.
        limit: Use only this many items, spread evenly over the dataset (:func:`evenly_spaced`).
        num_workers: DataLoader worker processes.

    Example:
        >>> batches = image_batches(Waterbirds(root, "test", clip.preprocess), 64, limit=500)  # doctest: +SKIP
        >>> store = compute_contributions_to_disk(clip, batches, "runs/wb", ln_mode="paper")  # doctest: +SKIP
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    subset = dataset if limit is None else Subset(dataset, evenly_spaced(len(dataset), limit))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def subset_tensor(values: Tensor, limit: int | None) -> Tensor:
    """The rows of ``values`` that :func:`image_batches` with the same ``limit`` visits.

    Example:
        >>> subset_tensor(torch.arange(10), 4).tolist()
        [0, 2, 5, 7]
    """
    return values[evenly_spaced(len(values), limit)]


def _split_id(split: str | int) -> int:
    if isinstance(split, int) and not isinstance(split, bool) and split in (0, 1, 2):
        return split
    if isinstance(split, str) and split in WATERBIRDS_SPLITS:
        return WATERBIRDS_SPLITS[split]
    raise ValueError(f"split must be one of {sorted(WATERBIRDS_SPLITS)} or 0 / 1 / 2, got {split!r}")


def _read_metadata(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in _WATERBIRDS_COLUMNS if c not in columns]
        if missing:
            raise ValueError(
                f"Waterbirds: {path} lacks the column(s) {missing}; expected img_id,img_filename,y,split,place,"
                f"place_filename, found {columns}"
            )
        return list(reader)
