"""vit_lens: mechanistic interpretability for vision transformers.

The public names are imported on first use, so that ``import vit_lens`` (and the
``vit-lens --help`` command) does not pay for importing torch and TransformerLens.
"""

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "HookedViT": "vit_lens.hooked_vit",
    "HookedCLIP": "vit_lens.clip",
    "ViTConfig": "vit_lens.config",
    "VisionActivationCache": "vit_lens.cache",
    "load_toy_clip": "vit_lens.toy.model",
}
# Submodules reachable as attributes (``vit_lens.decompose.direct_contributions``), also imported lazily.
_SUBMODULES = (
    "decompose", "interventions", "patching", "pruning", "statistics", "store", "loading", "toy", "plot",
    "textspan", "pools", "segmentation", "retrieval", "spurious", "datasets", "report",
    "layers", "experiments", "decoding", "text_metrics", "featureviz", "token_mixing", "robustness", "align",
)
__all__ = list(_EXPORTS) + list(_SUBMODULES)

if TYPE_CHECKING:
    from vit_lens.cache import VisionActivationCache
    from vit_lens.clip import HookedCLIP
    from vit_lens.config import ViTConfig
    from vit_lens.hooked_vit import HookedViT
    from vit_lens.toy.model import load_toy_clip


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"vit_lens.{name}")
    raise AttributeError(f"module 'vit_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
