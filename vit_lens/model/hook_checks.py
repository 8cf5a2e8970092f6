"""Checks that make hook mistakes loud: unknown names, wrong signatures, lost replacements, edited caches."""

import difflib
import inspect
import re
from functools import partial
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor

# TransformerLens hook points that vit_lens does not have (the leaf of the name), and what to use
# instead.
_TRANSFORMER_LENS_ONLY = {
    "hook_tokens": "is TransformerLens's input token ids; images have none. The first activation is 'hook_embed'.",
}
# TransformerLens's edge hook points, which exist only while their config flag is on; "{l}" is the
# layer of the requested name. Difflib alone would offer hook_attn_out for hook_attn_in: a near
# spelling, and a different activation.
_FLAG_ONLY = {
    "hook_attn_in": (
        "is the per-head copy of the attention input [batch, pos, head, d_model] that each head's queries, keys "
        "and values read; it exists only while cfg.use_attn_in is on: call model.set_use_attn_in(True) first. "
        "Without it, every head reads 'blocks.{l}.ln1.hook_normalized' [batch, pos, d_model]."
    ),
    "hook_mlp_in": (
        "is the copy of the residual stream that only the MLP reads [batch, pos, d_model]; it exists only while "
        "cfg.use_hook_mlp_in is on: call model.set_use_hook_mlp_in(True) first. Without it, the MLP reads "
        "'blocks.{l}.ln2.hook_normalized', and 'blocks.{l}.hook_resid_mid' is the residual stream before ln2."
    ),
}
for _part, _role in (("q", "queries"), ("k", "keys"), ("v", "values")):
    _FLAG_ONLY[f"hook_{_part}_input"] = (
        f"is the per-head copy of the {_role}' input [batch, pos, head, d_model]; it exists only while "
        f"cfg.use_split_qkv_input is on: call model.set_use_split_qkv_input(True) first. Without it, to change "
        f"one head's {_role}, edit 'blocks.{{l}}.attn.hook_{_part}' [batch, pos, head, d_head]."
    )
# Hook points that only some architectures have.
_ARCHITECTURE_ONLY = {
    "hook_rot_q": "exists only in models with rotary position embeddings (EVA02); this model's queries are "
    "'blocks.{l}.attn.hook_q'.",
    "hook_rot_k": "exists only in models with rotary position embeddings (EVA02); this model's keys are "
    "'blocks.{l}.attn.hook_k'.",
    "hook_pre_linear": "exists only in gated (SwiGLU) MLPs; this model's MLP input is 'blocks.{l}.mlp.hook_pre'.",
    "hook_image_embed": "exists only in models with a CLIP projection (cfg.d_proj); this model's pooled "
    "representation is 'hook_pooled'.",
    "hook_logits": "exists only in models with a classifier head (cfg.n_classes); this model's pooled "
    "representation is 'hook_pooled'.",
}
_ARCHITECTURE_PREFIXES = {
    "ln_pre.": "exists only in models with a LayerNorm before the first block (CLIP's ln_pre, cfg.ln_pre); this "
    "model's residual stream starts at 'blocks.0.hook_resid_pre'.",
    "attn_pool.": "exists only in models with attention pooling (SigLIP's MAP head); this model's pooled "
    "representation is 'hook_pooled'.",
    "ln_final.": "exists only in models with a final LayerNorm (cfg.final_norm); this model's pooled "
    "representation is 'hook_pooled'.",
}


def unknown_hook_error(name: str, hook_names: list[str], n_layers: int) -> ValueError:
    """A ValueError for a hook point the model does not have, naming what to use instead."""
    return ValueError(
        f"HookedViT has no hook point named {name!r}. {hook_name_advice(name, hook_names, n_layers)}"
        " (model.hook_dict lists every hook point.)"
    )


def hook_name_advice(name: str, candidates: Iterable[str], n_layers: int) -> str:
    """What to use instead of a hook name that is not among ``candidates``, in one or two sentences.

    A TransformerLens hook point that vit_lens does not have, an edge hook point whose flag is
    off (with the setter that adds it), or one that only other architectures have, is explained
    with what to use instead; a layer out of range names the range; otherwise
    the closest of ``candidates`` are suggested.
    """
    layer = re.match(r"blocks\.(-?\d+)\.", name)
    advice = []
    if layer and not 0 <= int(layer.group(1)) < n_layers:
        advice.append(f"The model has {n_layers} blocks, numbered 0 to {n_layers - 1}.")
    leaf = name.rpartition(".")[2]
    explanation = _TRANSFORMER_LENS_ONLY.get(leaf) or _FLAG_ONLY.get(leaf) or _ARCHITECTURE_ONLY.get(leaf)
    subject = leaf
    if explanation is None:
        prefix = next((prefix for prefix in _ARCHITECTURE_PREFIXES if name.startswith(prefix)), None)
        subject, explanation = (prefix[:-1], _ARCHITECTURE_PREFIXES[prefix]) if prefix else (leaf, None)
    if explanation:
        advice.append(f"{subject!r} {explanation.replace('{l}', layer.group(1) if layer else '{l}')}")
        return " ".join(advice)
    close = difflib.get_close_matches(name, list(candidates), n=5, cutoff=0.6)
    if close:
        advice.append("Did you mean: " + ", ".join(repr(c) for c in close) + "?")
    return " ".join(advice)


def check_ln_scale_per_token(name: str, scale: Tensor, has_batch_dim: bool) -> None:
    """Raise a ValueError if the cached LayerNorm scale ``name`` is per head (``[batch, pos, head, 1]``).

    ``ln1`` acts on per-head copies of the residual stream while the model has per-head attention
    inputs (``use_split_qkv_input`` / ``use_attn_in``); such a scale cannot divide a residual stack
    ``[component, batch, pos, d_model]``, and broadcasting it would give wrong numbers.
    """
    if scale.ndim != 3 + int(has_batch_dim):
        return
    raise ValueError(
        f"{name!r} in this cache is per head, {tuple(scale.shape)}: the run had per-head attention inputs "
        "(cfg.use_split_qkv_input or cfg.use_attn_in), where ln1 normalises each head's copy of the residual stream "
        "(with split inputs the cache keeps the values' copy). Divide by one head's scale yourself "
        f"(cache[{name!r}][:, :, head]), use mlp_input=True or the final layer, or cache the run with the flags off "
        "(model.set_use_split_qkv_input(False), model.set_use_attn_in(False))."
    )


class MissingActivationError(KeyError):
    """A cache lookup of a name the cache does not hold; a KeyError whose text reads as a sentence."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def missing_activation_error(
    key: Any, name: str | None, cached_names: Iterable[str], hook_names: Iterable[str], n_layers: int
) -> MissingActivationError:
    """The error for ``cache[key]`` (``name``: the full hook name ``key`` stands for, None if it stands for none).

    A hook point the run did not cache is told how to cache it; a name that is no hook point
    gets the closest cached names, or what to use instead of a TransformerLens-only hook point.
    """
    cached_names = list(cached_names)
    listing = f"(cache.keys() lists the {len(cached_names)} cached names.)"
    if name is None:
        return MissingActivationError(
            f"Cache keys are hook names such as 'blocks.0.hook_resid_post', or TransformerLens shorthand such as "
            f"cache['pattern', 0]; got {key!r}. {listing}"
        )
    spelled = "" if name == key else f" (what {key!r} stands for)"
    if name in hook_names:
        if name.endswith("attn.hook_result"):
            advice = (
                "Per-head results [batch, pos, head, d_model] are not cached by default: cache.stack_head_results() "
                "derives them from hook_z, and cache.compute_head_results() adds them to this cache; or cache them "
                f"with run_with_cache(..., names_filter=[..., {name!r}]), or set cfg.use_attn_result=True."
            )
        else:
            advice = (
                "It is a hook point of the model, but the run's names_filter left it out; cache it with "
                f"run_with_cache(..., names_filter=[..., {name!r}])."
            )
    elif name.endswith("_grad") and name[: -len("_grad")] in hook_names:
        advice = "Gradients are cached by run_with_cache(..., incl_bwd=True, metric=...) for the names in names_filter."
    else:
        advice = hook_name_advice(name, cached_names, n_layers)
    message = [f"This cache has no activation {name!r}{spelled}.", advice, listing]
    return MissingActivationError(" ".join(part for part in message if part))


def hook_pairs(hooks: Any, argument: str) -> list[tuple[Any, Callable]]:
    """``fwd_hooks`` / ``bwd_hooks`` as a list of ``(name, fn)`` pairs.

    TransformerLens takes a list of pairs; a dict ``{name: fn}`` is accepted too, since its
    meaning is the same. Anything else raises a TypeError saying what to pass.
    """
    if hooks is None:
        return []
    if isinstance(hooks, Mapping):
        return list(hooks.items())
    expected = f"{argument} must be a list of (hook_name, fn) pairs, {argument}=[(name, fn)], or a dict {{name: fn}}"
    if isinstance(hooks, (str, bytes)) or not isinstance(hooks, Iterable):
        raise TypeError(f"{expected}; got a {type(hooks).__name__}: {hooks!r:.80}")
    pairs = list(hooks)
    if len(pairs) == 2 and isinstance(pairs[0], str) and callable(pairs[1]):
        raise TypeError(f"{expected}; got one pair ({pairs[0]!r}, {describe(pairs[1])}) not in a list: wrap it, "
                        f"{argument}=[({pairs[0]!r}, fn)].")
    for item in pairs:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"{expected}; got an item that is a {type(item).__name__}: {item!r:.80}")
    return [tuple(item) for item in pairs]


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


def _storage_key(tensor: Tensor) -> tuple[Any, int] | None:
    """Which memory ``tensor`` lives in: equal for a tensor, its detached copy and all their views."""
    try:
        return tensor.device, tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without plain storage (functorch wrappers)
        return None


class InPlaceEditGuard:
    """A hook that keeps cached activations from being rewritten by a later hook's in-place edit.

    Some activations reach two hook points as one tensor, or as views of one tensor:
    ``blocks.{l}.hook_resid_post`` is ``blocks.{l+1}.hook_resid_pre``, ``ln_pre.hook_normalized`` is
    ``blocks.0.hook_resid_pre``, ``hook_pooled`` is a row of ``ln_final.hook_normalized`` (or of the
    last ``hook_resid_post``), and ``attn.hook_q/k/v`` are slices of one product. A cache holds its
    tensors without copying, so ``t.zero_()`` at the later point would rewrite what the cache
    recorded at the earlier one. Attached first at every hook point where another hook may edit,
    this guard clones the cached entries that share memory with the tensor about to be handed to
    that hook; entries that share nothing are never copied.

    Args:
        cache: The cache being filled (name -> tensor), in the order the hook points ran.
    """

    def __init__(self, cache: dict[str, Tensor]):
        self.cache = cache
        self._indexed = 0
        self._names_by_storage: dict[tuple[Any, int] | None, list[str]] = {}

    def __call__(self, activation: Tensor, hook: Any) -> None:
        names = list(self.cache)
        for name in names[self._indexed :]:
            self._names_by_storage.setdefault(_storage_key(self.cache[name]), []).append(name)
        self._indexed = len(names)
        key = _storage_key(activation)
        if key is not None:
            for name in self._names_by_storage.pop(key, ()):
                self.cache[name] = self.cache[name].clone()

    def __repr__(self) -> str:
        return "InPlaceEditGuard"
