"""What every method builds on: decomposition, intervention hooks, patching sweeps, pruning, dataset statistics, stores."""

from vit_lens._lazy import lazy_package

__getattr__, __dir__, __all__ = lazy_package(
    __name__, {}, ("decompose", "interventions", "patching", "pruning", "statistics", "store")
)
