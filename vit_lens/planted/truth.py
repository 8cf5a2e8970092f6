"""The planted design of the ``classifier``, as data: which heads carry which factor, and what they read.

Every factor of the toy world (:data:`vit_lens.toy.FACTORS`) reaches the classifier's CLS readout
through the heads listed here and through no other head. ``position`` is routed in two hops: head
(0, 1) reads the object patches from every patch query and writes where the objects are into all
patch tokens; head (2, 1) then moves it from the background patches into CLS. Every head not
listed for a factor is inert, and so is the MLP of layer 3: resampling their outputs from another
image changes no prediction (training enforced both with strict interchange interventions; the
tests measure them on fresh images).
"""

from dataclasses import dataclass

OBJECT_PATCHES, BACKGROUND_PATCHES, CLS = "object patches", "background patches", "CLS"
TOKEN_GROUPS = (OBJECT_PATCHES, BACKGROUND_PATCHES, CLS)


@dataclass(frozen=True)
class PlantedHead:
    """One planted head: the factor it carries, the queries it serves and the keys it reads.

    Attributes:
        layer: Block index.
        head: Head index within the block.
        factor: The factor (a key of :data:`vit_lens.toy.FACTORS`) it carries.
        writes: ``"CLS"`` (it moves the factor into CLS, the readout) or ``"patches"`` (it writes the
            factor into every patch token, for a later head to move).
        reads: The token group its attention reads (one of :data:`TOKEN_GROUPS`).
    """

    layer: int
    head: int
    factor: str
    writes: str
    reads: str


CLASSIFIER_HEADS = (
    PlantedHead(0, 0, "colour", "CLS", OBJECT_PATCHES),
    PlantedHead(0, 1, "position", "patches", OBJECT_PATCHES),  # hop 1 of the two-hop route
    PlantedHead(1, 0, "texture", "CLS", BACKGROUND_PATCHES),
    PlantedHead(1, 1, "shape", "CLS", OBJECT_PATCHES),
    PlantedHead(2, 0, "size", "CLS", OBJECT_PATCHES),
    PlantedHead(2, 1, "position", "CLS", BACKGROUND_PATCHES),  # hop 2: reads what hop 1 wrote
    PlantedHead(3, 0, "count", "CLS", OBJECT_PATCHES),
)
"""The planted heads of the ``classifier``, in layer order."""

CLASSIFIER_N_LAYERS, CLASSIFIER_N_HEADS = 4, 4
CLASSIFIER_INERT_MLPS = (3,)
"""Layers whose MLP is inert (the other MLPs are free to compute what the heads need)."""


def heads_by_factor(planted_heads: tuple[PlantedHead, ...] = CLASSIFIER_HEADS) -> dict[str, list[tuple[int, int]]]:
    """Factor name -> its heads as ``(layer, head)``, in layer order."""
    result: dict[str, list[tuple[int, int]]] = {}
    for h in planted_heads:
        result.setdefault(h.factor, []).append((h.layer, h.head))
    return result


def inert_heads(planted_heads: tuple[PlantedHead, ...] = CLASSIFIER_HEADS, n_layers: int = CLASSIFIER_N_LAYERS,
                n_heads: int = CLASSIFIER_N_HEADS) -> list[tuple[int, int]]:
    """Every head that carries no factor, as ``(layer, head)``."""
    planted = {(h.layer, h.head) for h in planted_heads}
    return [(layer, head) for layer in range(n_layers) for head in range(n_heads) if (layer, head) not in planted]
