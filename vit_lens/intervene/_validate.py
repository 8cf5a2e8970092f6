"""Checks for layer and head arguments, shared by the decomposition, intervention and pruning functions.

Layers and heads follow TransformerLens: an index ``i`` in ``[0, n)``, or a negative one counting
from the end (``-1`` is the last layer). Every function normalises negative indices to ``[0, n)``
before using them and reports the normalised ones in its results, so ``layers=[-1]`` on a 12-layer
model comes back as ``[11]``. Anything else (out of range, a bool, a float, a string) raises a
ValueError or TypeError that names the value and the valid range.
"""

import operator
from collections.abc import Iterable
from typing import Any


def check_index(value: Any, size: int, what: str, function: str) -> int:
    """``value`` as an index in ``[0, size)``: an int in ``[-size, size)``, negative ones counting from the end.

    Args:
        value: The index the user passed.
        size: How many there are (``cfg.n_layers``, ``cfg.n_heads``).
        what: The argument's name in messages (``"layer"``, ``"head"``).
        function: The public function that was called, for messages.

    Example:
        >>> check_index(-1, 12, "layer", "prune_heads")
        11
    """
    index = _as_int(value, what, function, size)
    if not -size <= index < size:
        raise ValueError(f"{function}: {what} {value!r} is out of range; {_valid_range(what, size)}")
    return index % size


def check_indices(values: Any, size: int, what: str, function: str, *, allow_empty: bool = True) -> list[int]:
    """Indices in ``[0, size)``, sorted and without repeats: ``None`` (all), one int, or an iterable of ints.

    Args:
        values: What the user passed: None for every index, an int (TransformerLens habit), or a
            list / tuple / range / 1-d tensor of ints; negative ones count from the end.
        size: How many there are.
        what: The argument's name in messages, plural (``"layers"``, ``"heads"``).
        function: The public function that was called, for messages.
        allow_empty: Whether an empty selection is meaningful for the caller.

    Example:
        >>> check_indices([-1, 0, 11], 12, "layers", "head_scores")
        [0, 11]
    """
    if values is None:
        return list(range(size))
    if getattr(values, "ndim", None) == 0:  # a 0-d tensor or numpy scalar: one index
        values = [values.item()]
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        values = [values]
    if getattr(values, "ndim", 1) != 1:
        raise ValueError(f"{function}: {what}= takes a 1-d sequence of indices, got shape {tuple(values.shape)}")
    items = list(values.tolist() if hasattr(values, "tolist") else values)
    if not items and not allow_empty:
        raise ValueError(f"{function}: {what}= selects nothing; give at least one, {_valid_range(what, size)}")
    indices = [_as_int(item, what, function, size) for item in items]
    bad = [index for index in indices if not -size <= index < size]
    if bad:
        raise ValueError(f"{function}: {what} {bad} out of range; {_valid_range(what, size)}")
    return sorted({index % size for index in indices})


def _as_int(value: Any, what: str, function: str, size: int) -> int:
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{function}: {what} takes ints, got {value!r}; {_valid_range(what, size)}")


def _valid_range(what: str, size: int) -> str:
    noun = what.rstrip("s")
    model_has = f"the model has {size} {noun}{'s' if size != 1 else ''}"
    return f"{model_has}, so valid {noun}s are 0 to {size - 1} (or -{size} to -1, counting from the end)"
