"""Splicing SAEs and transcoders into a HookedViT or HookedCLIP, as SAELens's ``HookedSAETransformer``.

While an SAE is spliced in, the activation at its output hook point (``cfg.hook_name`` for an
SAE, ``cfg.hook_name_out`` for a transcoder) is replaced by the SAE's output at the tokens it
was trained on (``cfg.token_selection``; the other tokens pass untouched). With
``use_error_term=True`` the SAE's error (the activation minus the clean reconstruction) is
added back, so the model's output is the clean output, and an edit of the features changes it
by exactly the edit's decoded effect.

The SAE's hook points join the model's under the output hook point's name, as in SAELens:
``blocks.3.hook_resid_post.hook_sae_acts_post`` ``[batch, pos, d_sae]`` (``pos`` counts the
selected tokens), ``...hook_sae_input``, ``...hook_sae_acts_pre``, ``...hook_sae_recons``,
``...hook_sae_error`` (with the error term) and ``...hook_sae_output``. So ``run_with_cache``
caches them, ``run_with_hooks`` patches and ablates features, and gradients reach them
(``incl_bwd=True``). With the error term the gradients at the model's own hook points are the
clean model's too: unlike SAELens, which makes the error a constant, vit_lens lets gradients flow
through it, so only the features' share of the gradient goes through the SAE.

Design (the model never imports this package): splicing uses only the model's public hook
API. The replacement is a permanent TransformerLens hook at the output hook point, first in
line, so every other hook there (a cache, a patch) sees and edits what flows on; a permanent
hook survives ``model.reset_hooks()`` inside the block. The SAE's hook points are registered
as submodules of that hook point and ``model.setup()`` is rerun, which is how they enter
``model.hook_dict``; leaving the block removes exactly what was added (including hooks added to
the SAE's points meanwhile) and reruns ``setup()`` on both, so the model is as before.
``HookedViT.run_with_saes`` reaches this module through the ``SAE.spliced_into`` method of the
SAEs it is given. A transcoder reads its input hook point as it finally flows on (after every
hook there) and writes its output hook point later in the same forward pass.

Example:
    >>> import torch, vit_lens
    >>> from vit_lens.sae import SAE, SAEConfig, run_with_cache_with_saes
    >>> clip = vit_lens.load_toy_clip()
    >>> sae = SAE(SAEConfig(d_in=128, d_sae=512, architecture="topk", k=16,
    ...                     hook_name="blocks.2.hook_resid_post")).init_weights(seed=0)
    >>> images = torch.rand(2, 3, 64, 64)
    >>> out, cache = run_with_cache_with_saes(clip, images, saes=[sae], use_error_term=True)
    >>> torch.allclose(out, clip(images), atol=1e-5)
    True
    >>> tuple(cache["blocks.2.hook_resid_post.hook_sae_acts_post"].shape)
    (2, 65, 512)
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import Tensor

from vit_lens.model.config import ViTConfig
from vit_lens.model.hook_checks import hook_name_advice
from vit_lens.model.hook_layout import hook_axes
from vit_lens.model.hooked_vit import HookedViT, image_tower
from vit_lens.sae.model import HOOK_NAMES, SAE


def _token_slice(selection: str, cfg: ViTConfig, sae: SAE) -> slice | None:
    """The positions ``selection`` names in ``cfg``'s residual stream (None: every position)."""
    if selection == "all":
        return None
    if selection == "patches":
        return slice(cfg.n_prefix_tokens, None)
    if selection == "cls":
        if not cfg.class_token:
            raise ValueError(f"{sae.cfg.hook_name!r}: the SAE was trained on the CLS token, but {cfg.model_name} "
                             "has none.")
        return slice(0, 1)
    if cfg.n_registers == 0:
        raise ValueError(f"{sae.cfg.hook_name!r}: the SAE was trained on register tokens, but {cfg.model_name} "
                         "has none.")
    first = int(cfg.class_token) + int(cfg.distillation_token)
    return slice(first, first + cfg.n_registers)


def _check_hook_name(tower: HookedViT, name: str, role: str) -> None:
    if name not in tower.hook_dict:
        raise ValueError(
            f"The SAE's {role} {name!r} is no hook point of {tower.cfg.model_name}. "
            f"{hook_name_advice(name, list(tower.hook_dict), tower.cfg.n_layers)} "
            "(model.hook_dict lists every hook point.)"
        )


class _Splice:
    """The hook functions of one spliced SAE: reshape and select its tokens, run it, put its output back."""

    def __init__(self, sae: SAE, tokens: slice | None, use_error_term: bool):
        self.sae = sae
        self.tokens = tokens
        self.use_error_term = use_error_term
        # One frame per forward pass of the tower (nested for a hook that runs the model again), holding the
        # transcoder input captured in that pass; a pass stopped early (stop_at_layer) leaves nothing behind.
        self.frames: list[dict[str, Tensor]] = []

    def _flat(self, activation: Tensor, width: int, where: str) -> Tensor:
        cfg = self.sae.cfg
        if cfg.reshape_activations == "hook_z":
            if activation.ndim < 2 or activation.shape[-2] * activation.shape[-1] != width:
                raise ValueError(
                    f"The SAE at {where!r} reads [..., n_heads, d_head] flattened to {width} (reshape_activations="
                    f"'hook_z'), but the activation there is {tuple(activation.shape)}."
                )
            activation = activation.flatten(-2)
        if activation.shape[-1] != width:
            raise ValueError(
                f"The SAE spliced at {where!r} takes width {width} (its {'d_in' if width == cfg.d_in else 'd_out'}), "
                f"but the activation there is {tuple(activation.shape)}. It was built for another hook point or "
                "model; check sae.cfg.hook_name (and hook_name_out) against model.hook_dict."
            )
        return activation

    def _select(self, flat: Tensor, where: str) -> Tensor:
        if self.tokens is None:
            return flat
        if hook_axes(where, flat.ndim).position != 1:
            raise ValueError(
                f"token_selection={self.sae.cfg.token_selection!r} needs a token axis, but {where!r} has none "
                f"(shape {tuple(flat.shape)}); use token_selection='all' for it."
            )
        return flat[:, self.tokens]

    def _put_back(self, activation: Tensor, flat: Tensor, out: Tensor) -> Tensor:
        out = out.to(activation.dtype)
        if self.tokens is not None:
            full = flat.clone()
            full[:, self.tokens] = out
            out = full
        return out.reshape(activation.shape)

    def replace(self, activation: Tensor, hook: Any) -> Tensor:
        """The SAE's hook at its hook point: the activation rebuilt by the SAE."""
        where = self.sae.cfg.hook_name
        flat = self._flat(activation, self.sae.cfg.d_in, where)
        out = self.sae(self._select(flat, where), use_error_term=self.use_error_term)
        return self._put_back(activation, flat, out)

    def enter_pass(self, module: Any, args: Any) -> None:
        """A forward pre-hook on the tower: a fresh frame for this forward pass."""
        self.frames.append({})

    def leave_pass(self, module: Any, args: Any, output: Any) -> None:
        """A forward hook on the tower, called even when the pass raises: drop its frame."""
        if self.frames:
            self.frames.pop()

    def capture(self, activation: Tensor, hook: Any) -> None:
        """A transcoder's hook at its input hook point: keep the input for the output hook point."""
        if self.frames:
            self.frames[-1]["input"] = activation

    def replace_output(self, activation: Tensor, hook: Any) -> Tensor:
        """A transcoder's hook at its output hook point: the activation predicted from the captured input."""
        cfg = self.sae.cfg
        captured = self.frames[-1].pop("input", None) if self.frames else None
        if captured is None:
            raise RuntimeError(
                f"The transcoder writing {cfg.hook_name_out!r} found no input from {cfg.hook_name!r} in this forward "
                f"pass: {cfg.hook_name!r} must run before {cfg.hook_name_out!r}; check the order of the two hook "
                "points."
            )
        x = self._select(self._flat(captured, cfg.d_in, cfg.hook_name), cfg.hook_name)
        flat = self._flat(activation, cfg.d_out, cfg.hook_name_out)
        target = self._select(flat, cfg.hook_name_out) if self.use_error_term else None
        out = self.sae(x, use_error_term=self.use_error_term, target=target)
        return self._put_back(activation, flat, out)


def _add_permanent_hook(point: Any, fn: Callable, prepend: bool = False) -> Any:
    """Add ``fn`` to ``point`` as a permanent forward hook and return its handle (3.x's add_hook returns none)."""
    before = {id(handle) for handle in point.fwd_hooks}
    point.add_hook(fn, dir="fwd", is_permanent=True, prepend=prepend)
    (handle,) = [handle for handle in point.fwd_hooks if id(handle) not in before]
    return handle


def _remove(point: Any, handle: Any) -> None:
    handle.hook.remove()
    for handles in (point.fwd_hooks, point.bwd_hooks):
        if handle in handles:
            handles.remove(handle)


def _not_an_sae(obj: Any) -> TypeError:
    from_sae_lens = type(obj).__module__.startswith("sae_lens")
    hint = " Convert a SAELens SAE with vit_lens.sae.from_sae_lens(sae)." if from_sae_lens else ""
    return TypeError(f"saes must hold vit_lens.sae.SAE objects, got a {type(obj).__name__}.{hint}")


@contextmanager
def splice_one(model: Any, sae: Any, *, use_error_term: bool = False) -> Iterator[SAE]:
    """Context manager: ``sae`` spliced into ``model`` (a HookedViT, or a HookedCLIP's image tower) for the block.

    :func:`spliced` takes several SAEs; the module docstring describes what splicing does.
    """
    if not isinstance(sae, SAE):
        raise _not_an_sae(sae)
    if not isinstance(use_error_term, bool):
        raise TypeError(f"use_error_term must be True or False, got {use_error_term!r}")
    tower = image_tower(model)
    cfg = sae.cfg
    if cfg.hook_name is None:
        raise ValueError(
            "This SAE has no hook_name, so it cannot be spliced: set sae.cfg.hook_name to the hook point it was "
            "trained on, e.g. 'blocks.3.hook_resid_post'."
        )
    _check_hook_name(tower, cfg.hook_name, "hook_name")
    out_name = cfg.output_hook_name
    if cfg.is_transcoder:
        _check_hook_name(tower, out_name, "hook_name_out")
        if cfg.reshape_activations != "none":
            raise ValueError("reshape_activations='hook_z' is supported for SAEs, not for transcoders.")
    if sae.spliced_at is not None:
        raise ValueError(
            f"This SAE is already spliced in at {sae.spliced_at!r}; one SAE object splices in at one place at a time "
            "(copy.deepcopy(sae) for a second place)."
        )
    out_point = tower.hook_dict[out_name]
    if any(name in out_point._modules for name in HOOK_NAMES):
        raise ValueError(f"Another SAE is already spliced in at {out_name!r}; splice one SAE per hook point.")
    weight = tower.embed.W_E
    if sae.W_enc.device != weight.device:
        raise ValueError(
            f"The SAE is on {sae.W_enc.device} but the model is on {weight.device}; move it with sae.to(device)."
        )
    splice = _Splice(sae, _token_slice(cfg.token_selection, tower.cfg, sae), use_error_term)
    with tower.hooks():  # holds the model's run lock: no other thread runs it half-spliced
        sae_points = {name: getattr(sae, name) for name in HOOK_NAMES}
        existing = {name: {id(h) for h in [*p.fwd_hooks, *p.bwd_hooks]} for name, p in sae_points.items()}
        added: list[tuple[Any, Any]] = []
        undo: list[Callable[[], None]] = []
        try:
            for name, point in sae_points.items():
                out_point.add_module(name, point)
            tower.setup()
            sae.spliced_at = out_name
            if cfg.is_transcoder:
                in_point = tower.hook_dict[cfg.hook_name]
                undo.append(tower.register_forward_pre_hook(splice.enter_pass).remove)
                undo.append(tower.register_forward_hook(splice.leave_pass, always_call=True).remove)
                capture = _add_permanent_hook(in_point, splice.capture)
                added.append((in_point, capture))
                # Hooks added later at the input point run after this one in registration order; moving it to the
                # end before every call makes the transcoder read the input as it finally flows on.
                undo.append(in_point.register_forward_pre_hook(
                    lambda module, args: module._forward_hooks.move_to_end(capture.hook.id)
                ).remove)
                added.append((out_point, _add_permanent_hook(out_point, splice.replace_output, prepend=True)))
            else:
                added.append((out_point, _add_permanent_hook(out_point, splice.replace, prepend=True)))
            yield sae
        finally:
            for point, handle in added:
                _remove(point, handle)
            for remove in undo:
                remove()
            for name, point in sae_points.items():
                for handle in [h for h in [*point.fwd_hooks, *point.bwd_hooks] if id(h) not in existing[name]]:
                    _remove(point, handle)
                out_point._modules.pop(name, None)
            tower.setup()
            sae.setup()
            sae.spliced_at = None


def _as_sae_list(saes: Any) -> list[SAE]:
    if isinstance(saes, SAE):
        return [saes]
    if isinstance(saes, (str, bytes)) or not isinstance(saes, Sequence):
        raise TypeError(f"saes must be an SAE or a list of SAEs, got a {type(saes).__name__}")
    saes = list(saes)
    for sae in saes:
        if not isinstance(sae, SAE):
            raise _not_an_sae(sae)
    outputs = [sae.cfg.output_hook_name for sae in saes]
    repeated = sorted({name for name in outputs if outputs.count(name) > 1 and name is not None})
    if repeated:
        raise ValueError(
            f"Two SAEs write the same hook point ({', '.join(map(repr, repeated))}); splice one per hook point."
        )
    return saes


@contextmanager
def spliced(model: Any, saes: Any, *, use_error_term: bool = False) -> Iterator[Any]:
    """Context manager: ``saes`` spliced into ``model`` for the block; on exit the model is exactly as before.

    Args:
        model: A HookedViT, or a HookedCLIP (its image tower gets the SAEs).
        saes: An :class:`~vit_lens.sae.SAE` or a list of them, one per output hook point.
        use_error_term: Add each SAE's error back, so the model's output is unchanged unless a
            hook edits the features.

    Example:
        >>> with spliced(model, [sae]):  # doctest: +SKIP
        ...     out = model.run_with_hooks(images, fwd_hooks=[
        ...         ("blocks.2.hook_resid_post.hook_sae_acts_post", lambda acts, hook: acts * 0)])
    """
    with ExitStack() as stack:
        for sae in _as_sae_list(saes):
            stack.enter_context(splice_one(model, sae, use_error_term=use_error_term))
        yield model


def run_with_saes(
    model: Any, *model_args: Any, saes: Any, use_error_term: bool = False, **model_kwargs: Any
) -> Tensor | None:
    """``model(*model_args, **model_kwargs)`` with ``saes`` spliced in (a HookedCLIP takes texts too)."""
    with spliced(model, saes, use_error_term=use_error_term):
        return model(*model_args, **model_kwargs)


def run_with_cache_with_saes(
    model: Any, *model_args: Any, saes: Any, use_error_term: bool = False, **kwargs: Any
) -> tuple[Tensor | None, Any]:
    """``model.run_with_cache(*model_args, **kwargs)`` with ``saes`` spliced in; the cache holds their hook points."""
    with spliced(model, saes, use_error_term=use_error_term):
        return model.run_with_cache(*model_args, **kwargs)


def run_with_hooks_with_saes(
    model: Any, *model_args: Any, saes: Any, use_error_term: bool = False, **kwargs: Any
) -> Tensor | None:
    """``model.run_with_hooks(*model_args, **kwargs)`` with ``saes`` spliced in; hooks may name their hook points."""
    with spliced(model, saes, use_error_term=use_error_term):
        return model.run_with_hooks(*model_args, **kwargs)
