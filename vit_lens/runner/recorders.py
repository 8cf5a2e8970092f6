"""What a dataset run records: per-image rows written to shards, or partial sums reduced over the dataset.

A recorder is any object with the :class:`Recorder` interface. The runner groups recorders by
their token selection, records each group's hooks with the model's caching hooks
(:func:`vit_lens.model.cache_hooks.caching_hooks`: the tokens are cut inside the hook, so nothing
unneeded is kept), runs the forward pass once per batch, and hands every recorder the activations
of its own hooks. A recorder returns

* ``rows(...)``: named tensors with the batch as first axis, concatenated over the images of a shard
  and written to the shard file (``"<recorder>/<name>"``), read back row by row later;
* ``partials(...)``: named float64 tensors that *add up* over batches, shards and ranks (counts, sums,
  sums of outer products). The runner keeps each shard's sums in its file and all-reduces them
  across ranks; ``finalize`` turns the dataset totals into results (a mean, a covariance).

Everything a recorder's results depend on goes into ``settings()``: a run resumes only with equal
settings. Decomposition terms, TextSpan head outputs or SAE buffers are recorders written by their
own modules against this interface.
"""

import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from vit_lens.model.cache_hooks import TokenSelection
from vit_lens.model.hook_checks import hook_name_advice
from vit_lens.model.hook_layout import hook_axes

TOKEN_FORMS = (
    "'all', 'cls', 'patches', 'prefix', an int token index, a list of token indices, or a (start, stop[, step]) "
    "range"
)
_STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@runtime_checkable
class Recorder(Protocol):
    """The interface every recorder has (duck-typed; this Protocol documents and checks it).

    Attributes:
        name: Unique within a run; prefixes the recorder's tensors in shard files and results.
        hooks: The hook points it reads.
        tokens: A token selection (:data:`TOKEN_FORMS`), resolved by :func:`resolve_tokens`.
    """

    name: str
    hooks: tuple[str, ...]
    tokens: Any

    def settings(self) -> dict[str, Any]:
        """JSON-serialisable description; a run resumes only if it is unchanged."""

    def rows(self, activations: dict[str, Tensor], images: Tensor) -> dict[str, Tensor]:
        """Tensors ``[batch, ...]`` to write to the shard (``{}`` for a pure reduction)."""

    def partials(self, activations: dict[str, Tensor], images: Tensor) -> dict[str, Tensor]:
        """float64 tensors that add up over batches (``{}`` when nothing is reduced)."""

    def finalize(self, totals: dict[str, Tensor]) -> dict[str, Tensor]:
        """Results from the dataset totals of :meth:`partials`."""


def resolve_tokens(tokens: Any, cfg: Any) -> Any:
    """A token selection as ``pos_slice`` for the model with config ``cfg`` (None: every token).

    Raises:
        ValueError: an unknown name, or 'cls' on a model without a CLS token.
    """
    if tokens is None or tokens == "all":
        return None
    if isinstance(tokens, str):
        if tokens == "cls":
            if not cfg.class_token:
                raise ValueError(f"tokens='cls': {cfg.model_name} has no CLS token; use 'all', 'patches' or indices")
            return 0
        if tokens == "patches":
            return (cfg.n_prefix_tokens, None)
        if tokens == "prefix":
            if cfg.n_prefix_tokens == 0:
                raise ValueError(f"tokens='prefix': {cfg.model_name} has no prefix tokens (CLS, registers)")
            return (0, cfg.n_prefix_tokens)
        raise ValueError(f"tokens={tokens!r} is not a token selection; pass {TOKEN_FORMS}")
    if isinstance(tokens, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ValueError(f"tokens={tokens!r}: a list of token indices must hold ints only; pass {TOKEN_FORMS}")
    try:
        selection = TokenSelection(tokens)
        selection.indices(cfg.n_ctx, "the residual stream")  # out-of-range indices fail here, before any work
    except (TypeError, ValueError) as error:
        raise ValueError(f"tokens={tokens!r}: {error}") from None
    return tokens


def token_settings(tokens: Any) -> Any:
    """``tokens`` in JSON form, for the manifest (tuples become lists)."""
    if isinstance(tokens, tuple):
        return list(tokens)
    if isinstance(tokens, Tensor):
        return tokens.tolist()
    return tokens


def check_hooks(hooks: Any, model: Any, who: str) -> tuple[str, ...]:
    """``hooks`` (one name or several) as a tuple, each a hook point of ``model``, in the order given."""
    names = (hooks,) if isinstance(hooks, str) else tuple(hooks)
    if not names:
        raise ValueError(f"{who} needs at least one hook name, e.g. 'blocks.0.hook_resid_post'")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{who}: hook names are strings, got {name!r} ({type(name).__name__})")
        if name not in model.hook_dict:
            raise ValueError(f"{who}: {model.cfg.model_name} has no hook point {name!r}. "
                             f"{hook_name_advice(name, list(model.hook_dict), model.cfg.n_layers)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{who}: hooks {list(names)} name a hook twice; list each once")
    return names


class Activations:
    """Cache activations at ``hooks``, keeping ``tokens``, as rows ``[image, ...]`` in the shards.

    Args:
        hooks: A hook name or a list of them.
        tokens: Which tokens to keep (:data:`TOKEN_FORMS`); ``'cls'`` keeps ``[image, 1, d]``.
        store_dtype: ``'float32'`` (default), ``'bfloat16'`` or ``'float16'``: the dtype on disk.
        name: The recorder's name in shard files and results.

    Example:
        >>> Activations(["blocks.3.hook_resid_post"], tokens="cls").settings()["tokens"]
        'cls'
    """

    def __init__(self, hooks: Any, tokens: Any = "all", *, store_dtype: str = "float32", name: str = "activations"):
        if store_dtype not in _STORE_DTYPES:
            raise ValueError(f"store_dtype={store_dtype!r}; use one of {sorted(_STORE_DTYPES)}")
        self.hooks = (hooks,) if isinstance(hooks, str) else tuple(hooks)
        self.tokens = tokens
        self.store_dtype = store_dtype
        self.name = name

    def settings(self) -> dict[str, Any]:
        return {"kind": "activations", "hooks": list(self.hooks), "tokens": token_settings(self.tokens),
                "store_dtype": self.store_dtype}

    def rows(self, activations: dict[str, Tensor], images: Tensor) -> dict[str, Tensor]:
        dtype = _STORE_DTYPES[self.store_dtype]
        return {hook: activations[hook].to(dtype) for hook in self.hooks}

    def partials(self, activations: dict[str, Tensor], images: Tensor) -> dict[str, Tensor]:
        return {}

    def finalize(self, totals: dict[str, Tensor]) -> dict[str, Tensor]:
        return {}


class Moments:
    """Dataset mean (and optionally covariance) of activations at ``hooks``, summed in float64.

    Partial sums are a count, the sum and (for the covariance) the sum of outer products of the
    values: they add exactly over batches, shards and ranks. In float64 this keeps about
    ``16 - 2 * log10(|mean| / std)`` significant digits of the covariance, so at least 8 digits as long
    as the mean is within 10^4 standard deviations.

    Args:
        hooks: A hook name or a list of them.
        tokens: Which tokens (:data:`TOKEN_FORMS`).
        over: ``'images'``: one value per image; the mean keeps the selected token axis
            (``[tokens, d]``) and the covariance is over the flattened per-image vector.
            ``'tokens'``: every selected token of every image is one value; the token axis is pooled
            (mean ``[d]``, covariance ``[d, d]``).
        covariance: Also accumulate the covariance (``[features, features]``: mind its size at
            ``over='images'`` with many tokens).
        name: The recorder's name (default ``'covariance'`` or ``'mean'``).

    Results (:meth:`finalize`): ``'<hook>/mean'``, ``'<hook>/count'``, and with ``covariance=True``
    ``'<hook>/covariance'`` (unbiased, divisor ``count - 1``) and ``'<hook>/second_moment'``
    (``E[x x^T]``).
    """

    def __init__(self, hooks: Any, tokens: Any = "all", *, over: str = "images", covariance: bool = False,
                 name: str | None = None):
        if over not in ("images", "tokens"):
            raise ValueError(f"over={over!r}; use 'images' (one value per image) or 'tokens' (every token is a value)")
        self.hooks = (hooks,) if isinstance(hooks, str) else tuple(hooks)
        self.tokens = tokens
        self.over = over
        self.covariance = covariance
        self.name = name or ("covariance" if covariance else "mean")

    def settings(self) -> dict[str, Any]:
        return {"kind": "moments", "hooks": list(self.hooks), "tokens": token_settings(self.tokens),
                "over": self.over, "covariance": self.covariance}

    def _values(self, hook: str, activation: Tensor) -> Tensor:
        """``[values, *feature_shape]`` in float64."""
        values = activation.to(torch.float64)
        if self.over == "tokens":
            position = hook_axes(hook, values.ndim).position
            if position is not None:
                values = values.movedim(position, 1).flatten(0, 1)
        return values

    def rows(self, activations: dict[str, Tensor], images: Tensor) -> dict[str, Tensor]:
        return {}

    def partials(self, activations: dict[str, Tensor], images: Tensor) -> dict[str, Tensor]:
        sums = {}
        for hook in self.hooks:
            values = self._values(hook, activations[hook])
            sums[f"{hook}/count"] = torch.tensor([float(len(values))], dtype=torch.float64, device=values.device)
            sums[f"{hook}/sum"] = values.sum(0)
            if self.covariance:
                flat = values.flatten(1)
                sums[f"{hook}/outer"] = flat.T @ flat
        return sums

    def finalize(self, totals: dict[str, Tensor]) -> dict[str, Tensor]:
        results = {}
        for hook in self.hooks:
            count = totals[f"{hook}/count"]
            n = float(count.item())
            mean = totals[f"{hook}/sum"] / max(n, 1.0)
            results[f"{hook}/count"] = count
            results[f"{hook}/mean"] = mean
            if self.covariance:
                flat_mean = mean.flatten()
                second = totals[f"{hook}/outer"] / max(n, 1.0)
                results[f"{hook}/second_moment"] = second
                scatter = totals[f"{hook}/outer"] - n * torch.outer(flat_mean, flat_mean)
                results[f"{hook}/covariance"] = scatter / (n - 1) if n > 1 else torch.full_like(scatter, math.nan)
        return results


class Mean(Moments):
    """The dataset mean of activations at ``hooks``: :class:`Moments` without the covariance."""

    def __init__(self, hooks: Any, tokens: Any = "all", *, over: str = "images", name: str = "mean"):
        super().__init__(hooks, tokens, over=over, covariance=False, name=name)


class Covariance(Moments):
    """Mean, covariance and second moment of activations at ``hooks``: :class:`Moments` with the covariance."""

    def __init__(self, hooks: Any, tokens: Any = "all", *, over: str = "tokens", name: str = "covariance"):
        super().__init__(hooks, tokens, over=over, covariance=True, name=name)
