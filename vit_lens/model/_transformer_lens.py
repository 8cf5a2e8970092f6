"""The one place vit_lens imports TransformerLens; the rest of the package imports its names from here.

vit_lens builds on six TransformerLens names: ``HookPoint``, ``HookedRootModule``,
``ActivationCache``, ``FactoredMatrix``, ``get_act_name`` and ``Slice``, imported from the
paths that transformer-lens 3.3 to 4.x share (4.x removed ``transformer_lens.hook_points.
HookedRootModule``; 3.3 added the top-level one and ``get_full_resid_decomposition``'s
``project_output_onto``, which VisionActivationCache uses, so 3.0 to 3.2 are not supported).
Hook registration and levels, ``setup``, ``hook_dict``, the ``ActivationCache`` constructor and
the cache methods behave the same on both majors but for one difference, handled here: with
``remove_batch_dim``, 3.x decides whether to slice positions from the rank an activation had
*before* its batch axis was dropped, so a hook without a position axis (``[batch, d]``, as
HookedViT's ``hook_pooled``) raised IndexError; :class:`HookedRootModule` below drops the axis
first on both majors.

Supporting both majors lets vit_lens share an environment with SAELens 6.x, which requires
transformer-lens < 4.
"""

from collections.abc import Callable
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from torch import Tensor

SUPPORTED = "transformer-lens>=3.3,<5"


def _installed_version() -> str:
    try:
        return version("transformer-lens")
    except PackageNotFoundError:
        return "not installed"


try:
    from transformer_lens import ActivationCache, FactoredMatrix
    from transformer_lens import HookedRootModule as _TransformerLensRootModule
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.utilities import Slice, get_act_name
except ImportError as error:
    raise ImportError(
        f"vit_lens needs TransformerLens 3.3 or later (3.x or 4.x), found transformer-lens {_installed_version()} "
        f"({error}); install a supported release with: pip install '{SUPPORTED}'"
    ) from error


def _without_batch_axis(save: Callable, activation: Tensor, hook: Any) -> None:
    """Hand ``save`` the activation of a batch of one without its batch axis."""
    save(activation[0] if activation.ndim and activation.shape[0] == 1 else activation, hook=hook)


class HookedRootModule(_TransformerLensRootModule):
    """TransformerLens's ``HookedRootModule``, caching with ``remove_batch_dim`` alike on 3.x and 4.x."""

    def get_caching_hooks(self, names_filter: Any = None, incl_bwd: bool = False, device: Any = None,
                          remove_batch_dim: bool = False, cache: dict | None = None,
                          pos_slice: Any = None) -> tuple[dict, list, list]:
        """TransformerLens's caching hooks; with ``remove_batch_dim`` each sees its activation without
        the batch axis, so positions are sliced only where the batchless activation has them."""
        cache, fwd_hooks, bwd_hooks = super().get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim=False, cache=cache, pos_slice=pos_slice
        )
        if remove_batch_dim:
            fwd_hooks = [(name, partial(_without_batch_axis, save)) for name, save in fwd_hooks]
            bwd_hooks = [(name, partial(_without_batch_axis, save)) for name, save in bwd_hooks]
        return cache, fwd_hooks, bwd_hooks


__all__ = ["ActivationCache", "FactoredMatrix", "HookPoint", "HookedRootModule", "Slice", "get_act_name", "SUPPORTED"]
