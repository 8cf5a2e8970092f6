"""The readout of a HookedViT in TransformerLens's words: ``W_U``, ``b_U``, ``unembed``, residual directions.

TransformerLens calls a language model's last linear map the unembedding (``W_U``, ``b_U``),
applied to the output of the final LayerNorm. A vision transformer reads its residual stream out
through the final LayerNorm (``ln_final``), a pooling (the CLS token, the mean over the patches,
or an attention pool) and a linear map ``R``: the CLIP projection ``W_proj`` (bias ``b_proj``
where the model has one), a classifier head ``W_head`` / ``b_head``, or nothing (a backbone's
pooled representation, ``R`` the identity).

vit_lens presents this readout as TransformerLens presents a model loaded with ``fold_ln=True``,
whether or not the weights were processed:

* the final LayerNorm contributes only its normalisation (centre, divide by the scale):
  ``cache.apply_ln_to_stack``, ``cache.accumulated_resid(apply_ln=True)`` and
  ``cache.pool_stack`` apply that and nothing else;
* ``W_U = diag(ln_final.w) R`` (centred over ``d_model``, as folding leaves it) and
  ``b_U = ln_final.b R + b_R`` carry the LayerNorm's weight and bias.

So ``normalised @ W_U + b_U`` is the model's output, and the direct logit attributions of
TransformerLens's recipes sum (with ``b_U``) to it exactly. Folding the weights
(:func:`vit_lens.model.weight_processing.process_weights_` with ``fold_ln=True``) moves the
LayerNorm's weight and bias into ``R`` and leaves ``W_U`` and ``b_U`` as they were.

Where the readout is not affine in the normalised residual stream there is no ``W_U``, and these
functions say so: an attention pool (SigLIP's MAP head) weights the tokens with a softmax of the
residual stream itself and adds the output of its own MLP; a max pool picks tokens by value; a
distilled DeiT reads two tokens through two heads. :func:`vit_lens.intervene.decompose.direct_contributions`
decomposes those readouts exactly, with the attention pool's pattern fixed at its cached value and
its MLP as one more term (``"POOLMLP"``).
"""

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

_DIRECT_CONTRIBUTIONS = "vit_lens.decompose.direct_contributions(model, cache, directions=...)"


def check_affine_readout(model: Any, what: str) -> None:
    """Raise a ValueError naming the reason where the output is not ``normalised pooled residual @ W_U + b_U``."""
    cfg = model.cfg
    if cfg.pool_type == "map":
        raise ValueError(
            f"{cfg.model_name} pools with an attention pool (SigLIP's MAP head), so {what} is not defined: the pool's "
            "softmax pattern depends on the residual stream itself and its MLP is nonlinear, so the output is not a "
            "linear function of the residual stream that a W_U could describe. Direct attribution through the pool "
            f"fixes the pattern at its cached value and keeps the pool's MLP as one term: {_DIRECT_CONTRIBUTIONS}."
        )
    if cfg.pool_type == "token_dist":
        raise ValueError(
            f"{cfg.model_name} is a distilled DeiT: its logits average two heads, model.head.W_head on the CLS token "
            f"and model.head.W_head_dist on the distillation token, so there is no single W_U and {what} is not "
            "defined. Attribute each token through its own head (cache.apply_ln_to_stack(stack, pos_slice=0) for "
            "CLS, pos_slice=1 for the distillation token, times diag(model.ln_final.w) and the head, halved), or "
            f"decompose the pooled representation with {_DIRECT_CONTRIBUTIONS}."
        )
    if cfg.pool_type in ("max", "avgmax") and cfg.final_norm == "pre_pool":
        raise ValueError(
            f"{cfg.model_name} max-pools the tokens after the final LayerNorm, which is not linear, so {what} is not "
            "defined: the pooled vector is not an affine function of the normalised residual stream."
        )


def readout_matrix(model: Any) -> tuple[Tensor, Tensor]:
    """``(R, b_R)``: the linear map after pooling (projection, head, or the identity) and its bias."""
    cfg = model.cfg
    if cfg.d_proj is not None:
        bias = model.b_proj if cfg.proj_bias else model.W_proj.new_zeros(cfg.d_proj)
        return model.W_proj, bias
    if cfg.n_classes:
        return model.head.W_head, model.head.b_head
    eye = torch.eye(cfg.d_model, device=model.embed.W_E.device, dtype=model.embed.W_E.dtype)
    return eye, eye.new_zeros(cfg.d_model)


def unembedding(model: Any) -> tuple[Float[Tensor, "d_model d_out"], Float[Tensor, " d_out"]]:
    """``(W_U, b_U)``: the readout with the final LayerNorm's weight and bias folded in (see the module docstring).

    ``W_U`` is centred over ``d_model``, as TransformerLens's ``fold_ln`` leaves it: the normalised
    residual stream has no component along the all-ones direction, so this changes no output, and
    it makes ``W_U`` the same matrix before and after folding.
    """
    check_affine_readout(model, "W_U")
    matrix, bias = readout_matrix(model)
    ln = model.ln_final
    if ln is None:
        return matrix, bias
    folded = ln.w[:, None] * matrix
    return folded - folded.mean(dim=0, keepdim=True), ln.b @ matrix + bias


def tokens_to_residual_directions(
    model: Any, tokens: Any  # checked below, with directed messages
) -> Float[Tensor, "... d_model"]:
    """Residual-stream directions whose dot product with the normalised residual is an output entry.

    ``direction @ normalised + b`` is the logit of a class (``b = b_U[class]``), or the image
    embedding's dot product with an output-space vector ``t`` (``b = b_U @ t``), where
    ``normalised`` is the pooled residual stream after the final LayerNorm's normalisation
    (centre, divide by its scale) as ``cache.apply_ln_to_stack`` and ``cache.pool_stack`` give it.

    Args:
        model: A HookedViT.
        tokens: Class indices (an int, or an integer tensor of any shape) of a classifier, or
            output-space vectors ``[..., d_out]`` (float): text embeddings for a CLIP tower,
            arbitrary directions in the logit or embedding space.

    Returns:
        ``[*tokens.shape, d_model]`` for class indices, ``[..., d_model]`` for vectors.
    """
    cfg = model.cfg
    if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)):
        raise TypeError(
            f"{cfg.model_name} is an image tower without a text tower, so it cannot read {tokens!r}. Pass the prompts "
            "to HookedCLIP.tokens_to_residual_directions, or their embeddings here "
            "(clip.encode_text(prompts, normalize=True))."
        )
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        tokens = torch.tensor(tokens)
    if not isinstance(tokens, Tensor) or tokens.dtype == torch.bool:
        raise TypeError(
            f"tokens must be class indices (an int or an integer tensor) or output-space vectors (a float tensor "
            f"[..., {cfg.d_output}]), got {type(tokens).__name__}"
            + (f" of {tokens.dtype}" if isinstance(tokens, Tensor) else "")
        )
    W_U, _ = unembedding(model)
    if tokens.is_floating_point():
        if tokens.shape[-1:] != (cfg.d_output,):
            raise ValueError(
                f"Output-space vectors must have {cfg.d_output} entries in their last axis (the width of "
                f"{cfg.model_name}'s output), got shape {tuple(tokens.shape)}"
            )
        return tokens.to(W_U) @ W_U.T
    if not cfg.n_classes:
        kind = "a backbone without a head"
        if cfg.d_proj is not None:
            kind = "a CLIP image tower: its output is an embedding"
        raise ValueError(
            f"{cfg.model_name} is {kind}, so it has no classes for the indices {tokens.tolist()} to name. Pass "
            "output-space vectors instead (text embeddings: clip.encode_text(prompts, normalize=True), or prompts to "
            "HookedCLIP.tokens_to_residual_directions)."
        )
    if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < cfg.n_classes):
        raise IndexError(
            f"Class indices must be in [0, {cfg.n_classes}) for {cfg.model_name}, got values from "
            f"{int(tokens.min())} to {int(tokens.max())}"
        )
    return W_U.T[tokens.to(W_U.device)]


def normalise(stack: Float[Tensor, "... d_model"], eps: float) -> Float[Tensor, "... d_model"]:
    """A LayerNorm without weight and bias, each vector with its own statistics (TransformerLens's LayerNormPre)."""
    centred = stack - stack.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def pooling_slice(model: Any, n_pos: int) -> slice:
    """The positions the (CLS or average) pooling reads."""
    cfg = model.cfg
    if cfg.pool_type == "token":
        return slice(0, 1)
    return slice(0 if cfg.pool_include_prefix else cfg.n_prefix_tokens, n_pos)


def check_poolable(model: Any) -> None:
    """Pooling a stack is defined for CLS and average pooling; say why not otherwise."""
    cfg = model.cfg
    check_affine_readout(model, "pooling a residual stack")
    if cfg.pool_type not in ("token", "avg"):
        raise ValueError(
            f"{cfg.model_name} pools with {cfg.pool_type!r}, which is not linear in the residual stream, so a stack of "
            "components cannot be pooled term by term; only CLS ('token') and average ('avg') pooling can."
        )
