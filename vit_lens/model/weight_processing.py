"""Weight processing with TransformerLens's names: ``fold_ln``, ``center_writing_weights``, ``center_unembed``,
``fold_value_biases`` and ``refactor_factored_attn_matrices``.

Each step rewrites a HookedViT's weights in place so that the output stays what it was (for
``center_unembed``, up to a per-image constant added to every logit, which the softmax removes:
TransformerLens defines its invariance after the final softmax) while the weights become easier to
read. TransformerLens's ``from_pretrained`` applies them by default; vit_lens loads models
unprocessed, so that every hook holds what the source model computes, and applies them on request:
``HookedViT.from_pretrained(name, fold_ln=True, ...)`` or ``model.process_weights_(...)``.
The readout API (``model.W_U``, ``model.b_U``, ``cache.apply_ln_to_stack``, ``cache.logit_attrs``)
gives the same numbers either way.

What each step does, and what it changes in the hooks:

* ``fold_ln``: every LayerNorm followed by a linear map keeps only its normalisation (centre,
  divide by the scale), and its weight and bias move into that map, whose weights are then centred
  over their input axis as TransformerLens does: ``ln1`` into ``W_Q``, ``W_K``, ``W_V``
  (and their biases), ``ln2`` into ``W_in`` (and ``W_gate``), the final LayerNorm into the
  projection ``W_proj`` (a ``b_proj`` is added where the model has none) or the classifier head,
  or into the keys and values of an attention pool, whose own LayerNorm goes into its MLP; EVA's
  sub-LayerNorms go into ``W_O`` (``attn.ln_z``) and ``W_out`` (``mlp.ln_hidden``), uncentred so
  that each head's and neuron's term keeps its value. These LayerNorms' ``hook_normalized`` then
  hold the normalised vector without weight and bias (TransformerLens's ``LayerNormPre``); their
  ``hook_scale`` and every other activation are unchanged. Not folded, with the reason:
  ``ln_pre``, whose output is the residual stream itself (no linear map follows it); the final
  LayerNorm of a backbone whose output is the pooled vector itself (no readout matrix to take it)
  or that max-pools after it (a maximum does not commute with a negative weight); a warning says so.
* ``center_writing_weights``: removes the mean over ``d_model`` from everything that writes to
  the residual stream: ``W_E``, ``b_E``, the CLS, distillation and register tokens, ``W_pos``,
  ``ln_pre``'s bias, ``W_O``, ``b_O``, ``W_out``, ``b_out``. Each token's residual stream moves
  along the all-ones direction, which every reader removes because every reader is a LayerNorm
  that centres: ``hook_embed``, ``hook_pos_embed``, ``hook_resid_*``, ``hook_attn_out``,
  ``hook_mlp_out`` and per-head results change by such a shift; normalised activations, patterns
  and the output do not. ``ln_pre``'s weight cannot be centred, so a CLIP tower's stream keeps a
  small mean. Refused where a reader does not centre: a model with no final LayerNorm, or one that
  pools the raw stream through an attention or max pool before its final LayerNorm.
* ``center_unembed``: subtracts the mean over classes from a classifier head's weights and bias.
  The logits move by a per-image constant; the probabilities do not. Refused for CLIP image towers
  and backbones: their output is an embedding, compared by cosine similarity, and centring it
  would change it and every zero-shot logit.
* ``fold_value_biases``: moves ``b_V`` through ``W_O`` into ``b_O`` (an attention pattern sums
  to one, so the value bias adds a constant to each head's output), in every block and in an
  attention pool. ``hook_v``, ``hook_z`` and per-head results lose the bias; ``hook_attn_out`` is
  unchanged. Refused where a LayerNorm acts on ``z`` before ``W_O`` (EVA-CLIP's ``attn.ln_z``).
* ``refactor_factored_attn_matrices``: rewrites each head's factors so that ``W_Q`` and ``W_K``
  (with their biases) share the singular values of ``W_Q W_K^T`` evenly and ``W_O`` has
  orthonormal rows (``W_V = U S``, ``W_O = V^T`` from the SVD of ``W_V W_O``), after folding the
  value biases. ``W_Q W_K^T``, ``W_V W_O``, patterns and outputs are unchanged; ``hook_q``,
  ``hook_k``, ``hook_v`` and ``hook_z`` change basis. Refused with rotary embeddings (the
  query-key product then depends on the positions) and with ``attn.ln_z`` (a LayerNorm between
  ``z`` and ``W_O``).

Steps run in TransformerLens's order: fold, centre the writers, centre the unembedding, fold the
value biases, refactor. Every step is idempotent, and the arithmetic is done in float64.
"""

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn

PROCESSING_ARGS = (
    "fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases", "refactor_factored_attn_matrices",
)


def process_weights_(
    model: Any,
    fold_ln: bool = True,
    center_writing_weights: bool | None = None,
    center_unembed: bool | None = None,
    fold_value_biases: bool | None = None,
    refactor_factored_attn_matrices: bool = False,
) -> Any:
    """Process a HookedViT's weights in place, as TransformerLens's ``process_weights_`` does.

    Args:
        model: The HookedViT (a HookedCLIP passes its image tower).
        fold_ln: Fold the LayerNorms' weights and biases into the linear maps that read them.
        center_writing_weights: Centre every weight and bias that writes to the residual stream.
            None (default): wherever that leaves the output unchanged.
        center_unembed: Centre a classifier head over its classes. None (default): for
            classifiers only.
        fold_value_biases: Fold ``b_V`` into ``b_O``. None (default): wherever that is exact.
        refactor_factored_attn_matrices: Rewrite ``W_Q, W_K`` and ``W_V, W_O`` into their even
            SVD factors.

    Returns:
        ``model``, processed.

    Raises:
        ValueError: A step asked for with True where it would change the output (the module
            docstring lists where, and why).
    """
    cfg = model.cfg
    centre_writers = _resolve("center_writing_weights", center_writing_weights, _writer_centring_refusal(cfg))
    centre_unembed = _resolve("center_unembed", center_unembed, _unembed_centring_refusal(cfg))
    if fold_value_biases and _value_bias_refusal(cfg):
        raise ValueError(f"fold_value_biases=True is not possible: {_value_bias_refusal(cfg)}")
    if refactor_factored_attn_matrices:
        refusal = _refactor_refusal(cfg)
        if refusal:
            raise ValueError(f"refactor_factored_attn_matrices=True is not possible: {refusal}")
    with torch.no_grad():
        if fold_ln:
            fold_layer_norm_(model)
        if centre_writers:
            center_writing_weights_(model)
        if centre_unembed:
            center_unembed_(model)
        if fold_value_biases is not False:
            fold_value_biases_(model)
        if refactor_factored_attn_matrices:
            refactor_factored_attn_matrices_(model)
    return model


def pop_processing_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take TransformerLens's processing keywords out of ``kwargs`` (the rest goes to the source library).

    Returns the arguments for :func:`process_weights_`, every step not named switched off (a model
    loaded by name is processed only as asked), or ``{}`` if none was named.
    """
    named = {name: kwargs.pop(name) for name in PROCESSING_ARGS if name in kwargs}
    return {**dict.fromkeys(PROCESSING_ARGS, False), **named} if named else {}


def fold_layer_norm_(model: Any) -> None:
    """``fold_ln``: see the module docstring."""
    cfg = model.cfg
    for block in model.blocks:
        attn = block.attn
        _fold(block.ln1, [(attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V)], centre=True)
        readers = [(block.mlp.W_in, block.mlp.b_in)]
        if block.mlp.gated:
            readers.append((block.mlp.W_gate, block.mlp.b_gate))
        _fold(block.ln2, readers, centre=True)
        if attn.ln_z is not None:
            ln = attn.ln_z
            weight, bias = _grouped(ln.w, attn.W_O), _grouped(ln.b, attn.W_O)
            attn.b_O.copy_(attn.b_O.double() + torch.einsum("hd,hdm->m", bias, attn.W_O.double()))
            attn.W_O.copy_(weight[..., None] * attn.W_O.double())
            _reset(ln)
        if block.mlp.ln_hidden is not None:
            _fold(block.mlp.ln_hidden, [(block.mlp.W_out, block.mlp.b_out)], centre=False)
    if cfg.pool_type == "map":
        pool = model.attn_pool
        _fold(pool.ln, [(pool.mlp.W_in, pool.mlp.b_in)], centre=True)
    if model.ln_final is None:
        return
    if cfg.final_norm == "pre_pool" and cfg.pool_type == "map":
        pool = model.attn_pool
        _fold(model.ln_final, [(pool.W_K, pool.b_K), (pool.W_V, pool.b_V)], centre=True)
        return
    kept = _final_fold_refusal(cfg)
    if kept:
        warnings.warn(f"fold_ln kept {cfg.model_name}'s final LayerNorm: {kept}", UserWarning, stacklevel=3)
        return
    if cfg.d_proj is not None:
        if not cfg.proj_bias:
            _add_projection_bias(model)
        readers = [(model.W_proj, model.b_proj)]
    else:
        readers = [(model.head.W_head, model.head.b_head)]
        if cfg.pool_type == "token_dist":
            readers.append((model.head.W_head_dist, model.head.b_head_dist))
    _fold(model.ln_final, readers, centre=True)


def center_writing_weights_(model: Any) -> None:
    """``center_writing_weights``: see the module docstring."""
    refusal = _writer_centring_refusal(model.cfg)
    if refusal:
        raise ValueError(f"center_writing_weights=True is not possible: {refusal}")
    embed = model.embed
    _centre(embed.W_E, dim=0)
    for vector in (embed.b_E, embed.cls_token, embed.dist_token, embed.registers, model.pos_embed.W_pos):
        if vector is not None:
            _centre(vector, dim=-1)
    if model.ln_pre is not None:
        _centre(model.ln_pre.b, dim=-1)
    for block in model.blocks:
        for weight in (block.attn.W_O, block.attn.b_O, block.mlp.W_out, block.mlp.b_out):
            _centre(weight, dim=-1)


def center_unembed_(model: Any) -> None:
    """``center_unembed``: see the module docstring."""
    refusal = _unembed_centring_refusal(model.cfg)
    if refusal:
        raise ValueError(f"center_unembed=True is not possible: {refusal}")
    head = model.head
    weights = [head.W_head, head.b_head]
    if model.cfg.pool_type == "token_dist":
        weights += [head.W_head_dist, head.b_head_dist]
    for weight in weights:
        _centre(weight, dim=-1)


def fold_value_biases_(model: Any) -> None:
    """``fold_value_biases``, in the blocks (where exact) and in an attention pool: see the module docstring."""
    attentions = [] if model.cfg.attn_norm else [block.attn for block in model.blocks]
    if model.cfg.pool_type == "map":
        attentions.append(model.attn_pool)
    for attn in attentions:
        attn.b_O.copy_(attn.b_O.double() + torch.einsum("hd,hdm->m", attn.b_V.double(), attn.W_O.double()))
        attn.b_V.zero_()


def refactor_factored_attn_matrices_(model: Any) -> None:
    """``refactor_factored_attn_matrices``, in every block: see the module docstring."""
    refusal = _refactor_refusal(model.cfg)
    if refusal:
        raise ValueError(f"refactor_factored_attn_matrices=True is not possible: {refusal}")
    for block in model.blocks:
        attn = block.attn
        # the biases ride along as an extra input coordinate that is always 1
        query = torch.cat([attn.W_Q.double(), attn.b_Q.double()[:, None]], dim=1)
        key = torch.cat([attn.W_K.double(), attn.b_K.double()[:, None]], dim=1)
        left, singular, right = _factored_svd(query, key.transpose(-1, -2))
        root = singular.sqrt()[:, None, :]
        query, key = left * root, right * root
        attn.W_Q.copy_(query[:, :-1])
        attn.b_Q.copy_(query[:, -1])
        attn.W_K.copy_(key[:, :-1])
        attn.b_K.copy_(key[:, -1])
        attn.b_O.copy_(attn.b_O.double() + torch.einsum("hd,hdm->m", attn.b_V.double(), attn.W_O.double()))
        attn.b_V.zero_()
        left, singular, right = _factored_svd(attn.W_V.double(), attn.W_O.double())
        attn.W_V.copy_(left * singular[:, None, :])
        attn.W_O.copy_(right.transpose(-1, -2))


# ---------------------------------------------------------------------------------------------- internals


def _resolve(name: str, requested: bool | None, refusal: str | None) -> bool:
    if requested and refusal:
        raise ValueError(f"{name}=True is not possible: {refusal}")
    return bool(refusal is None if requested is None else requested)


def _writer_centring_refusal(cfg: Any) -> str | None:
    if cfg.final_norm == "none":
        return (
            f"{cfg.model_name} has no final LayerNorm, so its readout reads the residual stream as it is and a shift "
            "along the all-ones direction would change the output"
        )
    if cfg.final_norm == "post_pool" and cfg.pool_type in ("map", "max", "avgmax"):
        return (
            f"{cfg.model_name} pools the raw residual stream ({cfg.pool_type!r} pooling) before its final LayerNorm, "
            "and that pooling is not blind to a shift along the all-ones direction"
        )
    return None


def _unembed_centring_refusal(cfg: Any) -> str | None:
    if cfg.n_classes:
        return None
    if cfg.d_proj is not None:
        return (
            f"{cfg.model_name} is a CLIP image tower: its output is an embedding compared by cosine similarity, not "
            "logits under a softmax, and centring the projection would change the embedding and every zero-shot logit"
        )
    return f"{cfg.model_name} outputs its pooled representation, not class logits, so there is no unembedding to centre"


def _value_bias_refusal(cfg: Any) -> str | None:
    if cfg.attn_norm:
        return (
            f"{cfg.model_name} normalises the concatenated heads before W_O (attn.ln_z, EVA-CLIP's scale_attn_inner), "
            "so the value bias passes through a LayerNorm and is not a constant of W_O's output"
        )
    return None


def _refactor_refusal(cfg: Any) -> str | None:
    if cfg.rotary != "none":
        return (
            f"{cfg.model_name} rotates queries and keys by position (rotary embeddings), so W_Q W_K^T depends on the "
            "positions and a change of basis of q and k would change the attention scores"
        )
    if cfg.attn_norm:
        return (
            f"{cfg.model_name} normalises the concatenated heads before W_O (attn.ln_z), so a change of basis of z "
            "would change what the LayerNorm sees"
        )
    return None


def _final_fold_refusal(cfg: Any) -> str | None:
    if cfg.d_proj is None and not cfg.n_classes:
        return (
            "the model's output is the pooled, normalised vector itself, with no projection or head to take the "
            "weight and bias; model.W_U (diag(ln_final.w)) and model.b_U (ln_final.b) carry them"
        )
    if cfg.final_norm == "pre_pool" and cfg.pool_type in ("max", "avgmax"):
        return "it max-pools after the final LayerNorm, and a maximum does not commute with a negative weight"
    return None


def _fold(ln: nn.Module, readers: list[tuple[Tensor, Tensor]], centre: bool) -> None:
    """Fold LayerNorm ``ln`` into maps ``x @ W + b`` whose input axis (``-2`` of ``W``) it normalises."""
    weight, bias = ln.w.double(), ln.b.double()
    for matrix, matrix_bias in readers:
        folded = weight[:, None] * matrix.double()
        matrix_bias.copy_(matrix_bias.double() + (bias[:, None] * matrix.double()).sum(dim=-2))
        if centre:
            # the normalised input is centred, so the matrix's mean over its input axis never contributes
            folded = folded - folded.mean(dim=-2, keepdim=True)
        matrix.copy_(folded)
    _reset(ln)


def _reset(ln: nn.Module) -> None:
    ln.w.fill_(1.0)
    ln.b.zero_()


def _grouped(vector: Tensor, W_O: Tensor) -> Tensor:
    """A LayerNorm parameter over the concatenated heads, as ``[head, d_head]``."""
    return vector.double().view(W_O.shape[0], W_O.shape[1])


def _centre(tensor: Tensor, dim: int) -> None:
    tensor.copy_(tensor.double() - tensor.double().mean(dim=dim, keepdim=True))


def _add_projection_bias(model: Any) -> None:
    """Give a projection without a bias one (zero), so that the final LayerNorm's bias has somewhere to go."""
    # a copy: another model may have been built from the same config object
    model.cfg = copy.copy(model.cfg)
    model.cfg.proj_bias = True
    model.b_proj = nn.Parameter(model.W_proj.new_zeros(model.cfg.d_proj))


def _factored_svd(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``left @ right`` (``[..., m, r] @ [..., r, n]``, rank ``r``) without forming the product.

    Returns ``(U [..., m, r], S [..., r], V [..., n, r])`` with ``left @ right == U diag(S) V^T``.
    """
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.transpose(-1, -2))
    u, s, vh = torch.linalg.svd(r_left @ r_right.transpose(-1, -2))
    return q_left @ u, s, q_right @ vh.transpose(-1, -2)
