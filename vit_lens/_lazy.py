"""Lazy attribute access for packages: names and submodules are imported on first use.

``import vit_lens`` (and ``vit-lens --help``) must not pay for torch, open_clip or TransformerLens,
so every package ``__init__`` declares what it offers and imports it only when it is read.
"""

import importlib
from collections.abc import Callable, Iterable
from typing import Any


def lazy_package(
    package: str, names: dict[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``.

    Args:
        package: The package's ``__name__``.
        names: Public name -> module that defines it (absolute, or relative to ``package`` with a leading dot).
        submodules: Submodules reachable as attributes (``package.sub``), imported on first access.
    """
    submodules = tuple(submodules)
    exported = list(names) + list(submodules)

    def __getattr__(name: str) -> Any:
        if name in names:
            module = importlib.import_module(names[name], package)
            return getattr(module, name)
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(exported) | set(importlib.import_module(package).__dict__))

    return __getattr__, __dir__, exported
