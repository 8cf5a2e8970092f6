"""The one progress bar of vit_lens: tqdm, quiet when asked, one bar per rank in distributed runs.

Every loop over batches, images or steps goes through :func:`progress`, so a notebook, a terminal and a
``torchrun`` job all get the same behaviour:

- In a Jupyter kernel with ipywidgets installed, the bar is a notebook widget; without ipywidgets (or
  outside a kernel) it is tqdm's text bar, so no "IProgress not found" warning is ever printed.
- ``enabled=False`` (every public function's ``progress=`` argument), or the environment variable
  ``VIT_LENS_PROGRESS=0``, silences every bar.
- Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set, world size above 1) each rank draws its own bar
  on its own line, labelled with the rank.
"""

import importlib.util
import os
import sys
from collections.abc import Iterable
from typing import Any


def _rank() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment; ``(0, 1)`` outside a distributed run."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


def _in_notebook_kernel() -> bool:
    if "IPython" not in sys.modules:  # a kernel has imported it long before any vit_lens call
        return False
    shell = sys.modules["IPython"].get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _bar_class() -> type:
    if _in_notebook_kernel() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm


def progress(
    iterable: Iterable | None = None,
    *,
    desc: str | None = None,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
    initial: int = 0,
    leave: bool = True,
) -> Any:
    """A tqdm bar over ``iterable`` (or one to ``update()`` by hand when ``iterable`` is None).

    Args:
        iterable: What to iterate over; its ``len`` is the total when it has one.
        desc: The bar's label.
        total: The number of steps, when ``iterable`` has no length (or is None).
        unit: What one step is ("batch", "image", "step").
        enabled: False returns a silent bar with the same interface (iterating, ``update``,
            ``set_postfix``, ``close``, use as a context manager).
        initial: Steps already done (a resumed run).
        leave: Keep the finished bar on screen.

    Returns:
        A tqdm object: iterate over it, or call ``update(n)``.

    Example:
        >>> from vit_lens.utils.progress import progress
        >>> sum(progress(range(3), desc="demo", enabled=False))
        3
    """
    rank, world = _rank()
    if os.environ.get("VIT_LENS_PROGRESS", "1").strip().lower() in ("0", "false", "no", "off"):
        enabled = False
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    kwargs: dict[str, Any] = {"desc": desc, "total": total, "unit": unit, "initial": initial, "leave": leave,
                              "disable": not enabled}
    if world > 1:
        kwargs["desc"] = f"[rank {rank}] {desc}" if desc else f"[rank {rank}]"
        kwargs["position"] = rank
    return _bar_class()(iterable, **kwargs)
