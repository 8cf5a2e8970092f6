"""vit_lens: mechanistic interpretability for vision transformers.

The package is built in floors, each importing only from the ones below it::

    utils, model.config, model.hook_layout   progress bars, plotly helpers, the config and hook layout (data)
    loading/                                  source libraries (open_clip, timm, transformers) and datasets
    model/                                    HookedViT, HookedCLIP, components, activation cache
    intervene/  toy/  planted/  sae/          decomposition, interventions, patching, statistics, stores; the toy world;
    runner/  circuits/                        the planted-mechanism models; sparse autoencoders; the dataset runner;
                                              circuits (edge patching, EAP, path patching)
    methods/                                  the papers' methods, one subpackage a family
    viz/  cli                                 the HTML report and the ``vit-lens`` command

The public names are imported on first use, so ``import vit_lens`` (and ``vit-lens --help``) does
not pay for torch and TransformerLens. The most used modules also answer to a short name:
``vit_lens.decompose`` is :mod:`vit_lens.intervene.decompose`, ``vit_lens.textspan`` is
:mod:`vit_lens.methods.textspan.textspan`, and so on (``from vit_lens.decompose import ...`` works too).
"""

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "HookedViT": "vit_lens.model.hooked_vit",
    "HookedCLIP": "vit_lens.model.clip",
    "HookedBlip2": "vit_lens.model.blip2",
    "ViTConfig": "vit_lens.model.config",
    "VisionActivationCache": "vit_lens.model.cache",
    "load_toy_clip": "vit_lens.toy.model",
    "load_planted": "vit_lens.planted.model",
    "get_act_name": "vit_lens.utils.hook_names",
    "image_tower": "vit_lens.model.hooked_vit",
}
# Short names for the modules users reach most: ``vit_lens.<short>`` is the module on the right.
SHORT_NAMES = {
    "config": "vit_lens.model.config",
    "hooked_vit": "vit_lens.model.hooked_vit",
    "clip": "vit_lens.model.clip",
    "cache": "vit_lens.model.cache",
    "components": "vit_lens.model.components",
    "plot": "vit_lens.utils.plotting",
    "datasets": "vit_lens.loading.datasets",
    "decompose": "vit_lens.intervene.decompose",
    "interventions": "vit_lens.intervene.interventions",
    "patching": "vit_lens.intervene.patching",
    "tl_patching": "vit_lens.intervene.tl_patching",
    "pruning": "vit_lens.intervene.pruning",
    "statistics": "vit_lens.intervene.statistics",
    "store": "vit_lens.intervene.store",
    "textspan": "vit_lens.methods.textspan.textspan",
    "retrieval": "vit_lens.methods.textspan.retrieval",
    "spurious": "vit_lens.methods.textspan.spurious",
    "pools": "vit_lens.methods.textspan.pools",
    "segmentation": "vit_lens.methods.segmentation.maps",
    "layers": "vit_lens.methods.layers.attention_maps",
    "experiments": "vit_lens.methods.layers.averaging",
    "decoding": "vit_lens.methods.layers.decoding",
    "text_metrics": "vit_lens.methods.layers.text_metrics",
    "featureviz": "vit_lens.methods.featureviz.visualisation",
    "token_mixing": "vit_lens.methods.featureviz.token_mixing",
    "robustness": "vit_lens.methods.featureviz.robustness",
    "align": "vit_lens.methods.alignment.compalign",
    "report": "vit_lens.viz.report",
    "widgets": "vit_lens.viz.widgets",
}
_PACKAGES = ("model", "loading", "intervene", "methods", "toy", "planted", "sae", "runner", "circuits", "viz", "utils")
__all__ = list(_EXPORTS) + list(SHORT_NAMES) + list(_PACKAGES)

if TYPE_CHECKING:
    from vit_lens.model.blip2 import HookedBlip2
    from vit_lens.model.cache import VisionActivationCache
    from vit_lens.model.clip import HookedCLIP
    from vit_lens.model.config import ViTConfig
    from vit_lens.model.hooked_vit import HookedViT, image_tower
    from vit_lens.planted.model import load_planted
    from vit_lens.toy.model import load_toy_clip
    from vit_lens.utils.hook_names import get_act_name


class _ShortNameFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Lets ``import vit_lens.<short>`` (and its submodules) import the module it stands for.

    The short name and the real name are one module object, so a hook or a monkeypatch applied
    through either is seen through both.
    """

    def _target(self, fullname: str) -> str | None:
        parts = fullname.split(".")
        if len(parts) < 2 or parts[0] != __name__ or parts[1] not in SHORT_NAMES:
            return None
        return ".".join([SHORT_NAMES[parts[1]], *parts[2:]])

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        real = self._target(fullname)
        if real is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=importlib.util.find_spec(real).submodule_search_locations is not None)

    def create_module(self, spec):
        module = importlib.import_module(self._target(spec.name))
        spec.loader_state = module.__spec__  # the import system overwrites __spec__ next; exec_module restores it
        return module

    def exec_module(self, module) -> None:
        """The real module has already run: only give it back its own spec (resources, reloads, pickling)."""
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _ShortNameFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _ShortNameFinder())


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in SHORT_NAMES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _PACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'vit_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (what tab completion shows), not this module's own imports."""
    return sorted({*__all__, "SHORT_NAMES", "__version__"})
