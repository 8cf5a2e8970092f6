"""Robustness probes (Ghiasi et al. 2022, section 5): foreground/background masking and low-pass filtering.

The paper compares ViTs with CNNs on images whose foreground (inside the ImageNet bounding boxes of
the true class) or background (outside them) is blanked out (its Table 2, top-5 accuracy relative to
the full image), and on low-pass filtered images (its figure 16). This module gives:

- :func:`parse_voc_xml`: the boxes of an ImageNet / PASCAL-VOC style XML file (``xml.etree``);
  :func:`box_mask` turns them into a pixel mask; :func:`mask_boxes` blanks one side of it.
- :class:`BoxMaskedImages`: a dataset of ``(image, label, box_mask)`` from image files and the XML box
  files the user downloads (ImageNet's ``ILSVRC2012_bbox_train_v2.tar.gz`` / ``..._val_v3.tgz``),
  resized and centre-cropped, with the mask carried through the same geometry.
- :func:`low_pass`: an ideal low-pass filter in the 2-D Fourier domain (``torch.fft``).
- :func:`accuracy_curves`: top-1 / top-k accuracy of any number of models under any number of
  conditions (:func:`box_conditions`, :func:`low_pass_conditions`), side by side, with a plotly
  figure. Models are ``HookedViT`` / ``HookedCLIP`` or any classifier ``nn.Module`` (a timm CNN),
  each with its own normalisation (:func:`as_classifier`): images stay in [0, 1] pixel space until
  each model normalises them, so the masking and filtering are the same for every model.

Example:
    >>> import torch
    >>> from vit_lens import robustness
    >>> images = torch.rand(2, 3, 32, 32)
    >>> torch.allclose(robustness.low_pass(images, 1.0, norm="max"), images, atol=1e-5)
    True
"""

import math
from vit_lens.utils.progress import progress as progress_bar
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor
from torch.utils.data import Dataset

# ---------------------------------------------------------------------------------------- boxes


@dataclass(frozen=True)
class Box:
    """One bounding box: the object's name (an ImageNet WordNet id such as ``"n01440764"``) and its
    corners as inclusive pixel indices, as written in the XML file."""

    name: str
    xmin: int
    ymin: int
    xmax: int
    ymax: int


@dataclass(frozen=True)
class BoxAnnotation:
    """The contents of one XML box file: image file name, image size (as annotated) and boxes."""

    filename: str
    width: int
    height: int
    boxes: tuple[Box, ...]

    def boxes_named(self, name: str) -> tuple[Box, ...]:
        """The boxes of one class (the paper keeps only those of the image's true class)."""
        return tuple(box for box in self.boxes if box.name == name)


def parse_voc_xml(source: Any) -> BoxAnnotation:
    """Read an ImageNet / PASCAL-VOC style annotation: ``<size>`` and every ``<object>``'s ``<bndbox>``.

    Args:
        source: A path to the XML file, or the XML text itself.

    Example:
        >>> text = ('<annotation><filename>n01440764_18</filename><size><width>500</width><height>375</height>'
        ...         '</size><object><name>n01440764</name><bndbox><xmin>60</xmin><ymin>24</ymin><xmax>345</xmax>'
        ...         '<ymax>304</ymax></bndbox></object></annotation>')
        >>> parse_voc_xml(text).boxes[0]
        Box(name='n01440764', xmin=60, ymin=24, xmax=345, ymax=304)
    """
    if isinstance(source, (str, os.PathLike)) and not str(source).lstrip().startswith("<"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"parse_voc_xml: no XML file at {path}; pass a path to a box file or the XML text")
        root = ET.parse(path).getroot()
        where = str(path)
    elif isinstance(source, str):
        root = ET.fromstring(source)
        where = "the XML text"
    else:
        raise TypeError(f"parse_voc_xml takes a path or XML text, got {type(source).__name__}")

    def number(node: Any, tag: str) -> int:
        child = node.find(tag)
        if child is None or child.text is None:
            raise ValueError(f"parse_voc_xml: {where} has no <{tag}> in <{node.tag}>")
        return int(round(float(child.text)))

    size = root.find("size")
    if size is None:
        raise ValueError(f"parse_voc_xml: {where} has no <size> element (is it a VOC-style annotation?)")
    boxes = []
    for obj in root.iter("object"):
        bndbox = obj.find("bndbox")
        name = obj.findtext("name", default="").strip()
        if bndbox is None:
            continue
        boxes.append(Box(name, *(number(bndbox, tag) for tag in ("xmin", "ymin", "xmax", "ymax"))))
    filename = (root.findtext("filename") or "").strip()
    return BoxAnnotation(filename, number(size, "width"), number(size, "height"), tuple(boxes))


def box_mask(boxes: Iterable[Box], height: int, width: int, *, one_based: bool = False) -> Bool[Tensor, "height width"]:
    """``[height, width]`` bool: True on the pixels inside any of ``boxes`` (inclusive corners, clipped).

    Args:
        boxes: Boxes in the pixel grid of a ``height x width`` image.
        one_based: Whether the coordinates count from 1 (PASCAL VOC's convention); ImageNet's files
            are read as 0-based by default (the difference is one pixel).

    Example:
        >>> box_mask([Box("x", 1, 0, 2, 1)], 3, 4).int().tolist()
        [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    """
    mask = torch.zeros(height, width, dtype=torch.bool)
    shift = 1 if one_based else 0
    for box in boxes:
        x0, x1 = max(box.xmin - shift, 0), min(box.xmax - shift, width - 1)
        y0, y1 = max(box.ymin - shift, 0), min(box.ymax - shift, height - 1)
        if x0 <= x1 and y0 <= y1:
            mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def mask_boxes(
    images: Float[Tensor, "batch channel height width"],
    masks: Any,
    keep: Any,
    fill: float = 0.0,
) -> Float[Tensor, "batch channel height width"]:
    """Blank out the foreground or the background of images.

    Args:
        images: Images in pixel space ([0, 1]).
        masks: ``[batch, height, width]`` bool, True inside the boxes (the foreground).
        keep: ``"foreground"`` (blank outside the boxes), ``"background"`` (blank inside, the
            paper's "background only" images) or ``"full"`` (unchanged).
        fill: The value of blanked pixels (0: black, as the paper's code).

    Example:
        >>> masks = torch.zeros(1, 4, 4, dtype=torch.bool); masks[0, :2] = True
        >>> mask_boxes(torch.ones(1, 3, 4, 4), masks, "background")[0, 0, :, 0].tolist()
        [0.0, 0.0, 1.0, 1.0]
    """
    if keep not in ("foreground", "background", "full"):
        raise ValueError(f"keep must be 'foreground', 'background' or 'full', got {keep!r}")
    if not isinstance(masks, Tensor) or masks.shape != (images.shape[0], *images.shape[-2:]):
        shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise ValueError(f"masks must be a bool tensor [batch, height, width] = {(images.shape[0], *images.shape[-2:])}, got {shape}")
    if keep == "full":
        return images
    blank = ~masks.bool() if keep == "foreground" else masks.bool()
    return images.masked_fill(blank[:, None].to(images.device), fill)


def _resize_center_crop(tensor: Tensor, size: int, resize_size: int, nearest: bool) -> Tensor:
    """Resize the short side to ``resize_size`` then centre-crop ``size x size`` (the usual ImageNet evaluation)."""
    height, width = tensor.shape[-2:]
    scale = resize_size / min(height, width)
    new = (max(size, round(height * scale)), max(size, round(width * scale)))
    batch = tensor[None].float()
    if nearest:
        resized = F.interpolate(batch, size=new, mode="nearest")
    else:
        resized = F.interpolate(batch, size=new, mode="bilinear", align_corners=False, antialias=True)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return resized[0, ..., top : top + size, left : left + size]


class BoxMaskedImages(Dataset):
    """Images with the box mask of their true class: items ``(image [3, size, size] in [0, 1], label, mask [size, size])``.

    Images are resized (short side ``resize_size``, bilinear, antialiased) and centre-cropped to
    ``size``; the mask is built in the original pixel grid from the XML boxes of the image's class
    and carried through the same resize (nearest) and crop. Normalisation is left to each model
    (:func:`as_classifier`), so every model sees the same pixels.

    Args:
        pairs: ``(image_path, xml_path)`` pairs (:func:`find_box_pairs` matches them by file stem).
        wnids: The model's classes as WordNet ids, in the model's class order (for ImageNet-1k: the
            1000 sorted synsets of the train folder).
        size: Crop size (the model's input size).
        resize_size: Short side before the crop (default ``size / 0.875``).
        one_based: Passed to :func:`box_mask`.

    The label is the class of the file name (``n01440764_10026``: ``n01440764``) when it has one, else
    of the first box; only boxes of that class make the mask (the paper's rule).

    Example:
        >>> pairs = find_box_pairs("imagenet/train", "imagenet/bbox_train")  # doctest: +SKIP
        >>> data = BoxMaskedImages(pairs, wnids, size=224)  # doctest: +SKIP
        >>> image, label, mask = data[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Any, Any]],
        wnids: Sequence[str],
        size: int = 224,
        resize_size: int | None = None,
        one_based: bool = False,
    ):
        if not pairs:
            raise ValueError("BoxMaskedImages needs at least one (image_path, xml_path) pair; see find_box_pairs")
        self.pairs = [(Path(image), Path(xml)) for image, xml in pairs]
        self.class_index = {wnid: i for i, wnid in enumerate(wnids)}
        self.size = size
        self.resize_size = resize_size or int(round(size / 0.875))
        self.one_based = one_based

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, int, Tensor]:
        import numpy as np
        from PIL import Image

        image_path, xml_path = self.pairs[index]
        annotation = parse_voc_xml(xml_path)
        wnid = _wnid_of(image_path, annotation)
        if wnid not in self.class_index:
            raise ValueError(f"BoxMaskedImages: {image_path} is of class {wnid!r}, which is not in wnids")
        with Image.open(image_path) as opened:
            rgb = np.asarray(opened.convert("RGB"), dtype=np.float32) / 255.0
        image = torch.from_numpy(rgb).permute(2, 0, 1)
        height, width = image.shape[-2:]
        boxes = annotation.boxes_named(wnid)
        if (annotation.width, annotation.height) != (width, height):  # boxes annotated on another size
            sx, sy = width / annotation.width, height / annotation.height
            boxes = tuple(Box(b.name, int(b.xmin * sx), int(b.ymin * sy), int(b.xmax * sx), int(b.ymax * sy)) for b in boxes)
        mask = box_mask(boxes, height, width, one_based=self.one_based)
        image = _resize_center_crop(image, self.size, self.resize_size, nearest=False).clamp(0, 1)
        mask = _resize_center_crop(mask.float()[None], self.size, self.resize_size, nearest=True)[0] > 0.5
        return image, self.class_index[wnid], mask


def _wnid_of(image_path: Path, annotation: BoxAnnotation) -> str:
    stem = image_path.stem
    prefix = stem.split("_")[0]
    if prefix.startswith("n") and prefix[1:].isdigit():
        return prefix
    if annotation.boxes:
        return annotation.boxes[0].name
    raise ValueError(f"cannot tell the class of {image_path}: no WordNet id in its name and no boxes in its XML")


def find_box_pairs(image_root: Any, box_root: Any, extensions: Sequence[str] = (".JPEG", ".jpeg", ".jpg", ".png")) -> list[tuple[Path, Path]]:
    """``(image_path, xml_path)`` for every image under ``image_root`` with an XML of the same stem under ``box_root``.

    Example:
        >>> pairs = find_box_pairs("imagenet/val", "imagenet/bbox_val")  # doctest: +SKIP
    """
    image_root, box_root = Path(image_root), Path(box_root)
    for root, what in ((image_root, "image_root"), (box_root, "box_root")):
        if not root.is_dir():
            raise FileNotFoundError(f"find_box_pairs: {what} {root} is not a folder")
    xmls = {path.stem: path for path in box_root.rglob("*.xml")}
    pairs = [(path, xmls[path.stem]) for path in sorted(image_root.rglob("*")) if path.suffix in extensions and path.stem in xmls]
    if not pairs:
        raise ValueError(
            f"find_box_pairs: no image under {image_root} has an XML of the same name under {box_root} "
            f"({len(xmls)} XML files found); ImageNet's box files are named like the images (n01440764_10026.xml)"
        )
    return pairs


# ---------------------------------------------------------------------------------------- low-pass filtering


def low_pass(images: Float[Tensor, "*batch height width"], cutoff: float, *, norm: str = "l2") -> Float[Tensor, "*batch height width"]:
    """Keep only the spatial frequencies up to ``cutoff`` (an ideal filter in the 2-D FFT domain).

    Frequencies are measured as a fraction of the Nyquist frequency (0.5 cycles per pixel) along each
    axis; a frequency ``(fy, fx)`` is kept when ``||(fy, fx)|| / nyquist <= cutoff``, with the
    Euclidean norm (``norm="l2"``, a disc: the full band is ``cutoff >= sqrt(2)``) or the largest
    component (``norm="max"``, a square: the full band is ``cutoff >= 1``). ``cutoff=0`` keeps only
    the mean of each channel. Works on any leading axes; apply it to [0, 1] pixels, before
    normalisation (the result may overshoot [0, 1] slightly: ringing).

    Example:
        >>> x = torch.zeros(1, 8, 8); x[0, ::2, ::2] = 1.0   # a pattern at the Nyquist frequency
        >>> low_pass(x, 0.5).std().item() < 1e-6   # only its mean survives
        True
    """
    if norm not in ("l2", "max"):
        raise ValueError(f"low_pass: norm must be 'l2' (disc) or 'max' (square), got {norm!r}")
    if not isinstance(cutoff, (int, float)) or cutoff < 0:
        raise ValueError(f"low_pass: cutoff must be a non-negative fraction of the Nyquist frequency, got {cutoff!r}")
    height, width = images.shape[-2:]
    fy = torch.fft.fftfreq(height, device=images.device)[:, None].abs() / 0.5
    fx = torch.fft.fftfreq(width, device=images.device)[None, :].abs() / 0.5
    radius = (fy.pow(2) + fx.pow(2)).sqrt() if norm == "l2" else torch.maximum(fy.expand(height, width), fx.expand(height, width))
    keep = radius <= cutoff + 1e-9
    spectrum = torch.fft.fft2(images.float())
    return torch.fft.ifft2(spectrum * keep).real.to(images.dtype)


# ---------------------------------------------------------------------------------------- accuracy curves

Condition = Callable[[Tensor, Tensor | None], Tensor]


def box_conditions(fill: float = 0.0) -> dict[str, Condition]:
    """The paper's three views: the full image, the foreground only, the background only.

    Example:
        >>> list(box_conditions())
        ['full', 'foreground', 'background']
    """

    def view(keep: str) -> Condition:
        def apply(images: Tensor, masks: Tensor | None) -> Tensor:
            if masks is None:
                raise ValueError(
                    f"the {keep!r} condition needs box masks: give batches (images, labels, masks), e.g. from BoxMaskedImages"
                )
            return mask_boxes(images, masks, keep, fill)

        return apply

    return {keep: view(keep) for keep in ("full", "foreground", "background")}


def low_pass_conditions(cutoffs: Sequence[float], *, norm: str = "l2") -> dict[str, Condition]:
    """One condition per cut-off (names are the cut-offs), for :func:`accuracy_curves`.

    Example:
        >>> list(low_pass_conditions([1.0, 0.5, 0.25]))
        ['1', '0.5', '0.25']
    """
    return {f"{c:g}": (lambda images, masks, c=c: low_pass(images, c, norm=norm).clamp(0, 1)) for c in cutoffs}


def as_classifier(model: Any, *, classifier: Any = None, mean: Any = None, std: Any = None) -> Callable[[Tensor], Tensor]:
    """A function ``[0, 1] images -> class scores`` for a model.

    Args:
        model: A ``HookedViT`` with a head, a ``HookedCLIP``/CLIP ``HookedViT`` with ``classifier``
            (``[d_embed, n_classes]``; scores are cosines), or any ``nn.Module`` returning logits (a timm CNN).
        classifier: Zero-shot class embeddings for CLIP models.
        mean, std: Per-channel normalisation applied first (e.g. ImageNet's for a timm model).

    Example:
        >>> import timm  # doctest: +SKIP
        >>> cnn = as_classifier(timm.create_model("resnet50", pretrained=True).eval(),
        ...                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))  # doctest: +SKIP
    """
    from vit_lens.methods.featureviz.token_mixing import class_scores

    if not callable(model):
        raise TypeError(f"as_classifier: model must be a module or function, got {type(model).__name__}")
    if (mean is None) != (std is None):
        raise ValueError("as_classifier: pass both mean= and std=, or neither")
    normalise = (lambda x: x) if mean is None else _normaliser(mean, std)
    tower = getattr(model, "vision", model)
    if hasattr(tower, "cfg") and hasattr(tower, "blocks"):
        return lambda images: class_scores(tower, tower(normalise(images.to(tower.W_E))), classifier)
    if classifier is not None:
        return lambda images: F.normalize(model(normalise(images)), dim=-1) @ classifier
    return lambda images: model(normalise(images))


def _normaliser(mean: Any, std: Any) -> Callable[[Tensor], Tensor]:
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return lambda x: (x - mean_t.to(x)) / std_t.to(x)


@dataclass
class AccuracyCurves:
    """What :func:`accuracy_curves` returns.

    Attributes:
        top1: ``{model: {condition: accuracy}}``.
        topk: The same for top-``k``.
        k: The ``k`` of ``topk``.
        n_images: Images seen.
    """

    top1: dict[str, dict[str, float]]
    topk: dict[str, dict[str, float]]
    k: int
    n_images: int

    def relative(self, reference: str, metric: str = "topk") -> dict[str, dict[str, float]]:
        """Accuracies divided by each model's accuracy under ``reference`` (the paper's Table 2 uses
        top-5 relative to ``"full"``)."""
        table = self._table(metric)
        out = {}
        for model, row in table.items():
            if reference not in row:
                raise KeyError(f"no condition {reference!r}; the conditions are {list(row)}")
            base = row[reference]
            out[model] = {c: (v / base if base > 0 else math.nan) for c, v in row.items()}
        return out

    def _table(self, metric: str) -> dict[str, dict[str, float]]:
        if metric not in ("top1", "topk"):
            raise ValueError(f"metric must be 'top1' or 'topk', got {metric!r}")
        return self.top1 if metric == "top1" else self.topk

    def figure(self, metric: str = "top1", *, relative_to: str | None = None, title: str | None = None,
               xaxis_title: str = "condition") -> "go.Figure":  # noqa: F821
        """One line per model over the conditions (e.g. accuracy against the low-pass cut-off)."""
        from vit_lens.utils import plotting as plot

        table = self.relative(relative_to, metric) if relative_to else self._table(metric)
        conditions = list(next(iter(table.values())))
        name = "top-1" if metric == "top1" else f"top-{self.k}"
        return plot.layer_curves(
            {model: [row[c] for c in conditions] for model, row in table.items()},
            x=conditions,
            title=title or f"{name} accuracy" + (f" relative to {relative_to!r}" if relative_to else ""),
            xaxis_title=xaxis_title,
            yaxis_title=name + (" (relative)" if relative_to else ""),
        )


def accuracy_curves(
    models: Mapping[str, Any],
    data: Iterable,
    conditions: Mapping[str, Condition],
    *,
    k: int = 5,
    max_batches: int | None = None,
    progress: bool = True,
) -> AccuracyCurves:
    """Accuracy of several models under several image conditions, in one pass over ``data``.

    Args:
        models: ``{name: model}``; a model is a function ``[0, 1] images -> scores`` (build one with
            :func:`as_classifier` to add a normalisation or a CLIP classifier), or a ``HookedViT``
            with a head (used as it is).
        data: Batches ``(images, labels)`` or ``(images, labels, masks)`` with images in [0, 1]
            (e.g. a DataLoader over :class:`BoxMaskedImages`).
        conditions: ``{name: fn(images, masks) -> images}`` (:func:`box_conditions`,
            :func:`low_pass_conditions`, or your own).
        k: Also report top-``k`` accuracy.
        max_batches: Stop after this many batches.
        progress: Show a tqdm bar.

    Example:
        >>> curves = accuracy_curves({"ViT": as_classifier(vit, mean=m, std=s), "ResNet": as_classifier(cnn, mean=m, std=s)},
        ...                          loader, low_pass_conditions([1.4, 0.5, 0.25, 0.1]))  # doctest: +SKIP
        >>> curves.figure(xaxis_title="cut-off (fraction of Nyquist)")  # doctest: +SKIP
    """
    if not models or not conditions:
        raise ValueError("accuracy_curves needs at least one model and one condition")
    runners = {name: (model if _is_plain_function(model) else as_classifier(model)) for name, model in models.items()}
    hits1 = {m: {c: 0 for c in conditions} for m in runners}
    hitsk = {m: {c: 0 for c in conditions} for m in runners}
    n = 0
    with torch.no_grad():
        for index, batch in enumerate(progress_bar(data, desc="accuracy curves", unit="batch", enabled=progress, leave=False)):
            if max_batches is not None and index >= max_batches:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError(f"accuracy_curves: data must give (images, labels[, masks]) batches, got {type(batch).__name__}")
            images, labels = batch[0].float(), torch.as_tensor(batch[1])
            masks = batch[2] if len(batch) > 2 else None
            for condition, apply in conditions.items():
                changed = apply(images, masks)
                for name, run in runners.items():
                    scores = run(changed)
                    top = scores.topk(min(k, scores.shape[-1]), dim=-1).indices.cpu()
                    hits1[name][condition] += top[:, 0].eq(labels).sum().item()
                    hitsk[name][condition] += top.eq(labels[:, None]).any(-1).sum().item()
            n += len(labels)
    if not n:
        raise ValueError("accuracy_curves got no batches from data")
    return AccuracyCurves(
        {m: {c: v / n for c, v in row.items()} for m, row in hits1.items()},
        {m: {c: v / n for c, v in row.items()} for m, row in hitsk.items()},
        k,
        n,
    )


def _is_plain_function(model: Any) -> bool:
    """A function (or any callable) that is not a module: used as it is."""
    return callable(model) and not isinstance(model, torch.nn.Module)
