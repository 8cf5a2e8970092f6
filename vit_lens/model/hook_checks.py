"""Checks that make hook mistakes loud: unknown names, wrong signatures, lost replacements."""

import difflib
import inspect
import re
from functools import partial
from collections.abc import Callable
from typing import Any

from torch import Tensor


def unknown_hook_error(name: str, hook_names: list[str], n_layers: int) -> ValueError:
    """A ValueError naming the closest real hook points to a mistyped ``name``."""
    message = f"HookedViT has no hook point named {name!r}."
    layer = re.match(r"blocks\.(-?\d+)\.", name)
    if layer and not 0 <= int(layer.group(1)) < n_layers:
        message += f" The model has {n_layers} blocks, numbered 0 to {n_layers - 1}."
    close = difflib.get_close_matches(name, hook_names, n=5, cutoff=0.6)
    if close:
        message += " Did you mean: " + ", ".join(repr(c) for c in close) + "?"
    message += " (model.hook_dict lists every hook point.)"
    return ValueError(message)


def check_hook_signature(fn: Any, hook_name: str) -> None:
    """Raise a TypeError now if ``fn`` cannot be called as ``fn(activation, hook=hook_point)``."""
    if not callable(fn):
        raise TypeError(f"The hook for {hook_name!r} is a {type(fn).__name__}, not a function.")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C callables expose no signature
        return
    try:
        signature.bind(None, hook=None)
    except TypeError:
        raise TypeError(
            f"The hook {describe(fn)} for {hook_name!r} has signature {signature}, but hooks are called as "
            f"fn(activation, hook=hook_point). Define it as `def {getattr(fn, '__name__', 'my_hook')}"
            f"(activation, hook): ...` and return None to observe or a tensor of the same shape to replace."
        ) from None


def describe(fn: Callable) -> str:
    """A short, cheap description of a hook function (partials over big tensors have huge reprs)."""
    if isinstance(fn, partial):
        return f"partial({describe(fn.func)}, ...)"
    return getattr(fn, "__qualname__", None) or type(fn).__name__


class CheckedHook:
    """Wraps a user hook so that a returned value that cannot take effect raises instead of vanishing."""

    def __init__(self, fn: Callable, hook_name: str):
        self.fn = fn
        self.hook_name = hook_name

    def __call__(self, activation: Tensor, hook):
        out = self.fn(activation, hook=hook)
        if out is None or out is activation:
            return out
        if not isinstance(out, Tensor):
            raise TypeError(
                f"The hook {describe(self.fn)} on {self.hook_name!r} returned a {type(out).__name__}. "
                f"Return None to leave the activation alone, or a tensor of shape {tuple(activation.shape)} "
                f"to replace it."
            )
        if out.shape != activation.shape:
            raise ValueError(
                f"The hook {describe(self.fn)} on {self.hook_name!r} returned shape {tuple(out.shape)}, but the "
                f"activation has shape {tuple(activation.shape)}; a replacement must have the same shape."
            )
        if out.dtype != activation.dtype or out.device != activation.device:
            raise TypeError(
                f"The hook {describe(self.fn)} on {self.hook_name!r} returned a {out.dtype} tensor on "
                f"{out.device}, but the activation is {activation.dtype} on {activation.device}; convert it "
                f"with .to(activation)."
            )
        return out

    def __repr__(self) -> str:
        return describe(self.fn)
