"""Interactive notebook views: the patch, patching and decomposition explorers.

Built on `anywidget <https://anywidget.dev>`_: each view is one ES module
(``explorers.js``, shipped in this package, no network access and no CDN) plus traitlets that the
kernel and the page keep in sync. anywidget rather than a bespoke ipywidgets extension because its
front end is installed with the Python package for JupyterLab, Notebook 7 and VS Code alike (no
labextension build, no npm), and the same module renders in a static HTML page: ``to_html``
writes one that needs neither a kernel nor the network.

The views compute nothing in the browser that vit_lens does not compute in the kernel: the patch
explorer reads attention patterns from ``run_with_cache``, the patching explorer calls
:func:`vit_lens.intervene.patching.activation_patching`, the decomposition explorer
:func:`vit_lens.intervene.decompose.direct_contributions`, and each exposes those results as
tensors.

anywidget is an optional dependency (``pip install 'vit_lens[widgets]'``); the classes are
imported on first use, so ``import vit_lens.widgets`` always works and a missing anywidget is
reported when a view is built.

Example:
    >>> from vit_lens.widgets import PatchExplorer  # doctest: +SKIP
    >>> PatchExplorer(clip, image)  # click a patch, move the layer and head sliders  # doctest: +SKIP
"""

import importlib
from typing import Any

_VIEWS = ("PatchExplorer", "PatchingExplorer", "DecompositionExplorer")
__all__ = list(_VIEWS)


def __getattr__(name: str) -> Any:
    if name in _VIEWS:
        return getattr(importlib.import_module("vit_lens.viz.widgets.explorers"), name)
    raise AttributeError(f"module 'vit_lens.viz.widgets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
