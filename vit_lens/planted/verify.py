"""Measure a planted model's truth on fresh images: task accuracy, interchange accuracy, inertness.

Example:
    >>> import vit_lens
    >>> from vit_lens.planted import interchange_accuracy, inertness
    >>> planted = vit_lens.load_planted("classifier")
    >>> interchange_accuracy(planted, "colour", n=64) > 0.9
    True
    >>> max(inertness(planted, n=64).values()) < 0.1
    True
"""

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from vit_lens.planted.model import PlantedModel
from vit_lens.toy.world import FACTORS, Scene, ToyWorld

LAYOUT_FACTORS = ("size", "count", "position")
"""Factors whose change needs a new layout (the others are edited in place with ``Scene.with_factors``)."""

FRESH_SEED = 1_000_003
"""Default seed of the evaluation images; training draws from its own seed, far from this one."""


def differing_scene(world: ToyWorld, scene: Scene, factor: str, rng: np.random.Generator) -> Scene:
    """A scene that differs from ``scene`` in ``factor`` alone (a new random value of it).

    Shape, colour and texture are edited in place (same layout, same noise); size, count and position
    need a new layout, drawn with every other factor held at ``scene``'s values.
    """
    if factor not in FACTORS:
        raise ValueError(f"unknown factor {factor!r}; the factors are {list(FACTORS)}")
    current = getattr(scene, factor)
    others = [v for v in FACTORS[factor] if v != current]
    value = others[rng.integers(len(others))]
    if factor not in LAYOUT_FACTORS:
        return scene.with_factors(**{factor: value})
    fixed = {name: getattr(scene, name) for name in FACTORS if name != factor}
    return world.sample_scene(rng, **fixed, **{factor: value})


def patch_z_hooks(source_z: dict[int, Tensor], heads: Sequence[tuple[int, int]]) -> list:
    """Forward hooks that replace each head's ``hook_z`` (all positions) by ``source_z[layer]``'s."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def make(layer: int, layer_heads: list[int]):
        def hook(z: Tensor, hook) -> Tensor:
            z = z.clone()
            z[:, :, layer_heads] = source_z[layer][:, :, layer_heads]
            return z

        return hook

    return [(f"blocks.{layer}.attn.hook_z", make(layer, hs)) for layer, hs in by_layer.items()]


def _source_cache(planted: PlantedModel, images: Tensor) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    with torch.no_grad():
        _, cache = planted.model.run_with_cache(
            images, names_filter=lambda name: name.endswith(("attn.hook_z", "hook_mlp_out"))
        )
    layers = range(planted.model.cfg.n_layers)
    return {l: cache[f"blocks.{l}.attn.hook_z"] for l in layers}, {l: cache[f"blocks.{l}.hook_mlp_out"] for l in layers}


def task_accuracy(planted: PlantedModel, n: int = 512, seed: int = FRESH_SEED) -> dict[str, float]:
    """Per factor, the fraction of ``n`` fresh images (drawn with ``seed``) whose value is predicted."""
    batch = ToyWorld(seed=seed).sample(n, seed=seed)
    predicted = planted.predict(batch.images)
    return {name: predicted[name].eq(batch.factors[name]).float().mean().item() for name in FACTORS}


def interchange_accuracy(planted: PlantedModel, factor: str, n: int = 256, seed: int = FRESH_SEED,
                         heads: Sequence[tuple[int, int]] | None = None) -> float:
    """How often patching ``factor``'s planted heads moves exactly that factor to the source's value.

    Draws ``n`` fresh base images and, for each, a source that differs in ``factor`` alone
    (:func:`differing_scene`); runs the base with the heads' ``hook_z`` replaced, at every position, by
    the source run's. A pair counts as a success when the base's prediction of ``factor`` becomes the
    source's value and every other factor's prediction is what the unpatched base predicts.

    Args:
        planted: The planted model.
        factor: A factor name (a key of :data:`vit_lens.toy.FACTORS`).
        n: Number of pairs.
        seed: Seed of the images.
        heads: The heads to patch (default: ``planted.heads[factor]``); pass others for controls.
    """
    if factor not in planted.heads:
        raise ValueError(f"unknown factor {factor!r}; the planted factors are {list(planted.heads)}")
    heads = list(planted.heads[factor] if heads is None else heads)
    if not heads:
        raise ValueError("heads is empty; name at least one (layer, head) to patch")
    world = ToyWorld(seed=seed)
    rng = np.random.default_rng(seed)
    bases = world.sample_scenes(n, seed=seed)
    base = world.render(bases)
    source = world.render([differing_scene(world, scene, factor, rng) for scene in bases])
    source_z, _ = _source_cache(planted, source.images)
    clean = planted.predict(base.images)
    patched = planted.predict(base.images, fwd_hooks=patch_z_hooks(source_z, heads))
    success = patched[factor].eq(source.factors[factor])
    for name in FACTORS:
        if name != factor:
            success &= patched[name].eq(clean[name])
    return success.float().mean().item()


def inertness(planted: PlantedModel, n: int = 256, seed: int = FRESH_SEED) -> dict[str, float]:
    """For every inert head (``"L{l}H{h}"``) and MLP (``"MLP{l}"``): the fraction of ``n`` fresh images
    whose prediction (of any factor) changes when that component's output is resampled from another image.
    """
    world = ToyWorld(seed=seed)
    images = world.sample(n, seed=seed).images
    other = world.sample(n, seed=seed + 1).images
    source_z, source_mlp = _source_cache(planted, other)
    clean = planted.predict(images)

    def changed(hooks: list) -> float:
        patched = planted.predict(images, fwd_hooks=hooks)
        moved = torch.zeros(n, dtype=torch.bool)
        for name in FACTORS:
            moved |= patched[name].ne(clean[name])
        return moved.float().mean().item()

    result = {f"L{l}H{h}": changed(patch_z_hooks(source_z, [(l, h)])) for l, h in planted.inert_heads}
    for layer in planted.inert_mlps:
        result[f"MLP{layer}"] = changed([(f"blocks.{layer}.hook_mlp_out", lambda out, hook, l=layer: source_mlp[l])])
    return result


def reading_fractions(planted: PlantedModel, n: int = 128, seed: int = FRESH_SEED) -> dict[str, float]:
    """For every planted head (``"L{l}H{h}"``): the share of its attention on patches that falls on the token
    group it reads, from the queries it serves (CLS, or every patch for a head that writes into patches).

    The attention a head keeps on CLS (where it rests when it has nothing to read) is left out of both
    sides of the share; object patches are those holding at least one object pixel.
    """
    from vit_lens.planted.truth import CLS, OBJECT_PATCHES

    batch = ToyWorld(seed=seed).sample(n, seed=seed)
    patch = planted.model.cfg.patch_size[0]
    objects = torch.nn.functional.max_pool2d(batch.foreground.float()[:, None], patch).flatten(1).bool()
    with torch.no_grad():
        _, cache = planted.model.run_with_cache(batch.images, names_filter=lambda name: name.endswith("hook_pattern"))
    result = {}
    for h in planted.planted_heads:
        pattern = cache[f"blocks.{h.layer}.attn.hook_pattern"][:, h.head]
        queries = pattern[:, :1] if h.writes == CLS else pattern[:, 1:]
        on_patches = queries[..., 1:]  # the patch keys
        group = (objects if h.reads == OBJECT_PATCHES else ~objects).float()[:, None, :]
        result[f"L{h.layer}H{h.head}"] = ((on_patches * group).sum() / on_patches.sum()).item()
    return result
