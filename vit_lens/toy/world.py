"""A synthetic world of coloured shapes with known factors, exact object masks and generated captions.

Every image shows one to three objects that share a shape, a colour and a size, placed together in
one of four regions of the image (the triangles cut by the two diagonals: left, right, top, bottom),
over a textured grey background. The factors are independent and uniformly drawn, so each one can
be read off the image and off the caption, which is what makes the world a ground truth for
interpretability methods.

Example:
    >>> from vit_lens.toy import ToyWorld
    >>> batch = ToyWorld(seed=0).sample(4)
    >>> batch.images.shape, batch.masks.shape
    (torch.Size([4, 3, 64, 64]), torch.Size([4, 3, 64, 64]))
    >>> batch.captions[0]  # doctest: +SKIP
    'two large yellow crosses on the top, dotted background'
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLOURS = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.72, 0.20),
    "blue": (0.12, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.50, 0.05),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = ("one", "two", "three")
TEXTURES = ("plain", "striped", "dotted", "checkered")

FACTORS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "position": POSITIONS,
    "count": COUNTS,
    "texture": TEXTURES,
}
"""Each factor's values, in index order (``batch.factors[name]`` holds indices into these)."""

MAX_OBJECTS = len(COUNTS)
_RADIUS = {"small": 4.5, "large": 7.5}  # at 64 px; scaled with the image size


@dataclass(frozen=True)
class ToyObject:
    """One object: its shape and colour names, centre (x, y) in pixels and radius in pixels."""

    shape: str
    colour: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw an image: the factors, the objects and the background."""

    shape: str
    colour: str
    size: str
    position: str
    count: str
    texture: str
    objects: tuple[ToyObject, ...]
    background: tuple[float, float]  # the two grey levels of the texture
    phase: int  # texture offset in pixels

    def factor_indices(self) -> dict[str, int]:
        return {name: values.index(getattr(self, name)) for name, values in FACTORS.items()}

    def with_object_colour(self, index: int, colour: str) -> "Scene":
        """The same scene with object ``index`` repainted (the scene's ``colour`` factor is unchanged)."""
        _check_value("colour", colour)
        objects = list(self.objects)
        objects[index] = replace(objects[index], colour=colour)
        return replace(self, objects=tuple(objects))

    def with_factors(self, **factors: str) -> "Scene":
        """The same layout with other factor values for shape, colour or texture (position, size and
        count change the layout: sample a new scene for those)."""
        allowed = {"shape", "colour", "texture"}
        if set(factors) - allowed:
            raise ValueError(f"with_factors can change {sorted(allowed)}; got {sorted(set(factors) - allowed)}")
        for name, value in factors.items():
            _check_value(name, value)
        objects = tuple(
            replace(o, shape=factors.get("shape", o.shape), colour=factors.get("colour", o.colour)) for o in self.objects
        )
        return replace(self, objects=objects, **factors)


@dataclass
class ToyBatch:
    """Images with their ground truth.

    Attributes:
        images: ``[n, 3, H, W]`` float32 in [0, 1].
        masks: ``[n, 3, H, W]`` bool: the visible pixels of object k (all False for absent objects).
        factors: factor name -> ``[n]`` long tensor of indices into :data:`FACTORS`.
        captions: One full caption per image.
        scenes: The scenes drawn.
    """

    images: Tensor
    masks: Tensor
    factors: dict[str, Tensor]
    captions: list[str]
    scenes: list[Scene]

    @property
    def foreground(self) -> Tensor:
        """``[n, H, W]`` bool: pixels covered by any object."""
        return self.masks.any(dim=1)

    def __len__(self) -> int:
        return len(self.scenes)


def _check_value(factor: str, value: str) -> None:
    if factor not in FACTORS:
        raise ValueError(f"unknown factor {factor!r}; the factors are {list(FACTORS)}")
    if value not in FACTORS[factor]:
        raise ValueError(f"{value!r} is not a value of {factor}; choose from {list(FACTORS[factor])}")


def caption(scene: Scene | dict[str, str], include: Iterable[str] | None = None) -> str:
    """The caption of a scene, mentioning only the factors in ``include`` (default: all).

    The grammar: ``[count] [size] [colour] <shape or "object"> [on the <position>][, <texture> background]``;
    the noun is plural when the count is mentioned and above one. A caption of the texture alone
    is ``"<texture> background"``.

    Example:
        >>> caption({"shape": "triangle", "colour": "red", "size": "small", "position": "left",
        ...          "count": "two", "texture": "striped"})
        'two small red triangles on the left, striped background'
        >>> caption({"shape": "triangle", "colour": "red", "count": "two"}, include=["colour"])
        'red object'
    """
    values = {name: getattr(scene, name) for name in FACTORS} if isinstance(scene, Scene) else dict(scene)
    names = list(FACTORS) if include is None else list(include)
    for name in names:
        if name not in FACTORS:
            raise ValueError(f"unknown factor {name!r} in include; the factors are {list(FACTORS)}")
        if name not in values:
            raise ValueError(f"include names {name!r} but the scene gives no value for it")
    if not names:
        raise ValueError("include must name at least one factor")
    if names == ["texture"]:
        return f"{values['texture']} background"
    plural = "count" in names and values["count"] != "one"
    words = []
    if "count" in names:
        words.append(values["count"])
    if "size" in names:
        words.append(values["size"])
    if "colour" in names:
        words.append(values["colour"])
    noun = values["shape"] if "shape" in names else "object"
    words.append(PLURALS.get(noun, "objects") if plural else noun)
    text = " ".join(words)
    if "position" in names:
        text += f" on the {values['position']}"
    if "texture" in names:
        text += f", {values['texture']} background"
    return text


def factor_prompts(factor: str) -> list[str]:
    """One single-factor caption per value of ``factor``: the zero-shot classes for that factor."""
    if factor not in FACTORS:
        raise ValueError(f"unknown factor {factor!r}; the factors are {list(FACTORS)}")
    return [caption({"count": "one", "shape": "object", factor: value}, include=[factor]) for value in FACTORS[factor]]


def description_pool(max_factors: int = 2) -> tuple[list[str], list[tuple[str, ...]]]:
    """The world's own descriptions, for TextSpan: every caption mentioning one to ``max_factors``
    factors, with the factors each one mentions (the ground truth for scoring head roles).

    Example:
        >>> texts, mentions = description_pool(1)
        >>> len(texts), texts[0], mentions[0]
        (23, 'circle', ('shape',))
    """
    from itertools import combinations, product

    if not 1 <= max_factors <= len(FACTORS):
        raise ValueError(f"max_factors must be between 1 and {len(FACTORS)}, got {max_factors}")
    texts, mentions = [], []
    for k in range(1, max_factors + 1):
        for names in combinations(FACTORS, k):
            for values in product(*(FACTORS[n] for n in names)):
                scene = {"count": "one", "shape": "object", **dict(zip(names, values))}
                texts.append(caption(scene, include=names))
                mentions.append(names)
    return texts, mentions


def _layout_seed(scene: Scene) -> int:
    layout = (scene.phase, *scene.background, *[(o.x, o.y, o.radius) for o in scene.objects])
    return hash(layout) & 0xFFFFFFFF  # hashes of numbers do not depend on PYTHONHASHSEED


def _in_region(x: np.ndarray, y: np.ndarray, position: str, size: int, margin: float) -> np.ndarray:
    # The diagonals cut the square into four triangles; a centre must lie inside its triangle
    # by ``margin`` pixels (in the diagonal coordinate) so that its region is unambiguous.
    c = (size - 1) / 2
    u, v = x - c, y - c
    if position == "left":
        return (-u - np.abs(v)) > margin
    if position == "right":
        return (u - np.abs(v)) > margin
    if position == "top":
        return (-v - np.abs(u)) > margin
    return (v - np.abs(u)) > margin


class ToyWorld:
    """Draws scenes of the toy world. Deterministic: the same seed gives the same images.

    Args:
        image_size: Side of the square images in pixels (object sizes scale with it).
        seed: Seed of the generator; :meth:`sample` continues the stream, or takes its own ``seed``.
        noise: Standard deviation of the per-pixel Gaussian noise added to each image.
    """

    def __init__(self, image_size: int = 64, seed: int = 0, noise: float = 0.02):
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels to draw distinguishable shapes, got {image_size}")
        self.image_size = image_size
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        grid = np.arange(image_size, dtype=np.float32)
        self._yy, self._xx = np.meshgrid(grid, grid, indexing="ij")

    # ------------------------------------------------------------------ scenes

    def sample_scene(self, rng: np.random.Generator | None = None, **fixed: str) -> Scene:
        """A random scene; keyword arguments fix factors (``sample_scene(colour="red")``)."""
        rng = self.rng if rng is None else rng
        for name, value in fixed.items():
            _check_value(name, value)
        values = {name: fixed.get(name, options[rng.integers(len(options))]) for name, options in FACTORS.items()}
        scale = self.image_size / 64
        radius = _RADIUS[values["size"]] * scale
        n = COUNTS.index(values["count"]) + 1
        objects: list[ToyObject] = []
        low, high = radius + 1, self.image_size - radius - 2
        while len(objects) < n:
            xs = rng.uniform(low, high, size=256)
            ys = rng.uniform(low, high, size=256)
            ok = _in_region(xs, ys, values["position"], self.image_size, margin=0.35 * radius + 2 * scale)
            for o in objects:
                ok &= np.hypot(xs - o.x, ys - o.y) > 2 * radius + 1.5 * scale
            hits = np.flatnonzero(ok)
            if len(hits) == 0:  # no room left for this layout: start the scene's objects again
                objects = []
                continue
            objects.append(ToyObject(values["shape"], values["colour"], float(xs[hits[0]]), float(ys[hits[0]]), radius))
        base = float(rng.uniform(0.3, 0.6))
        contrast = float(rng.uniform(0.12, 0.22)) * (1 if rng.random() < 0.5 else -1)
        phase = int(rng.integers(0, 64))
        return Scene(**values, objects=tuple(objects), background=(base, base + contrast), phase=phase)

    def sample_scenes(self, n: int, seed: int | None = None, **fixed: str) -> list[Scene]:
        rng = self.rng if seed is None else np.random.default_rng(seed)
        return [self.sample_scene(rng, **fixed) for _ in range(n)]

    def sample(self, n: int, seed: int | None = None, **fixed: str) -> ToyBatch:
        """``n`` random images with masks, factor indices and full captions.

        Args:
            n: Number of images.
            seed: Draw from a fresh generator with this seed (default: continue the world's stream).
            **fixed: Factor values to hold fixed, e.g. ``shape="triangle"``.
        """
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        rng = self.rng if seed is None else np.random.default_rng(seed)
        scenes = [self.sample_scene(rng, **fixed) for _ in range(n)]
        return self.render(scenes, rng=rng)

    # ------------------------------------------------------------------ drawing

    def _background(self, scene: Scene) -> np.ndarray:
        low, high = scene.background
        xx, yy, p = self._xx, self._yy, scene.phase
        step = max(2, round(4 * self.image_size / 64))
        if scene.texture == "plain":
            pattern = np.zeros_like(xx, dtype=bool)
        elif scene.texture == "striped":
            pattern = ((yy + p) // step) % 2 == 1
        elif scene.texture == "dotted":
            period = 2 * step
            pattern = (((xx + p) % period) < step // 2 + 1) & (((yy + p // 2) % period) < step // 2 + 1)
        else:  # checkered
            pattern = (((xx + p) // step + (yy + p) // step) % 2) == 1
        return np.where(pattern, high, low).astype(np.float32)

    def _object_mask(self, o: ToyObject) -> np.ndarray:
        dx, dy, r = self._xx - o.x, self._yy - o.y, o.radius
        if o.shape == "circle":
            return dx * dx + dy * dy <= r * r
        if o.shape == "square":
            side = 0.85 * r
            return (np.abs(dx) <= side) & (np.abs(dy) <= side)
        if o.shape == "triangle":
            return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * 0.62)
        arm = max(1.0, 0.3 * r)  # cross: a plus sign
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        return inside & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))

    def render(self, scenes: Sequence[Scene], rng: np.random.Generator | None = None) -> ToyBatch:
        """Draw ``scenes`` (for instance edited with :meth:`Scene.with_object_colour`).

        The pixel noise comes from ``rng``; by default each image's noise is seeded by its layout
        (object positions and background, not shapes or colours), so a scene and its edited copy
        get the same noise and differ exactly on the edited pixels, as activation patching needs.
        """
        if not scenes:
            raise ValueError("render needs at least one scene")
        size = self.image_size
        images = np.empty((len(scenes), 3, size, size), dtype=np.float32)
        masks = np.zeros((len(scenes), MAX_OBJECTS, size, size), dtype=bool)
        noise_rng = rng
        for i, scene in enumerate(scenes):
            image = np.broadcast_to(self._background(scene), (3, size, size)).copy()
            for k, o in enumerate(scene.objects):
                mask = self._object_mask(o)
                masks[i, :k][:, mask] = False  # a later object hides what it covers
                masks[i, k] = mask
                image[:, mask] = np.asarray(COLOURS[o.colour], dtype=np.float32)[:, None]
            images[i] = image
        if self.noise:
            for i, scene in enumerate(scenes):
                generator = noise_rng if noise_rng is not None else np.random.default_rng(_layout_seed(scene))
                noise = generator.standard_normal(size=images.shape[1:], dtype=np.float32)
                noise *= self.noise
                images[i] += noise
        np.clip(images, 0.0, 1.0, out=images)
        factors = {
            name: torch.tensor([values.index(getattr(s, name)) for s in scenes], dtype=torch.long)
            for name, values in FACTORS.items()
        }
        return ToyBatch(
            images=torch.from_numpy(images),
            masks=torch.from_numpy(masks),
            factors=factors,
            captions=[caption(s) for s in scenes],
            scenes=list(scenes),
        )
