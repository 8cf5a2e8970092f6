"""``get_act_name``: TransformerLens's shorthand for hook point names, without importing TransformerLens.

transformer-lens 4 removed ``transformer_lens.utils`` (``transformer_lens.utils.get_act_name`` is the
first line of many notebooks); ``vit_lens.get_act_name`` and ``vit_lens.utils.get_act_name`` give the
same names as ``transformer_lens.utilities.get_act_name``, so that shorthand written for
TransformerLens finds vit_lens's hook points, which carry TransformerLens's names.
"""

import re

# Shorthand TransformerLens accepts for an activation, and for the module that holds it.
_NAME_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}
_LAYER_TYPE_ALIASES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_ATTENTION_NAMES = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores")
_MLP_NAMES = ("pre", "post", "mid", "pre_linear")
_LAYER_NORM_NAMES = ("scale", "normalized")


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """The full hook point name for TransformerLens's shorthand.

    The rules are TransformerLens's: a full name (one with a dot, or starting with ``hook_``) is
    returned as it is; ``"k6"`` is ``("k", 6)`` and ``"scale4ln1"`` is ``("scale", 4, "ln1")``;
    ``attn`` means ``pattern``, ``attn_logits`` ``attn_scores``, ``key`` / ``query`` / ``value``
    ``k`` / ``q`` / ``v``; attention activations live under ``attn.``, MLP activations
    (``pre``, ``post``, ``pre_linear``) under ``mlp.``; ``scale`` / ``normalized`` without a layer
    belong to ``ln_final``. One difference: a LayerNorm named with ``layer_type`` and no layer is
    that LayerNorm (``get_act_name("scale", layer_type="ln_pre")`` is ``"ln_pre.hook_scale"``,
    CLIP's LayerNorm before the first block), where TransformerLens would prefix ``ln_final.``.

    ``mid`` has no hook point in a vision transformer (the model says so, with the closest real names,
    when a hook or a cache lookup uses it); ``attn_in``, ``q_input`` / ``k_input`` / ``v_input`` and
    ``mlp_in`` exist once ``set_use_attn_in`` / ``set_use_split_qkv_input`` / ``set_use_hook_mlp_in``
    turned them on, and until then the model names the setter to call.

    Args:
        name: The shorthand or full name.
        layer: The block, for activations inside blocks.
        layer_type: The module within the block (``"ln1"``, ``"ln2"``, ``"attn"``, ``"mlp"``, or
            the aliases ``"a"``, ``"m"``).

    Example:
        >>> get_act_name("resid_pre", 3), get_act_name("pattern", 0), get_act_name("z5")
        ('blocks.3.hook_resid_pre', 'blocks.0.attn.hook_pattern', 'blocks.5.attn.hook_z')
        >>> get_act_name("scale", 2, "ln1"), get_act_name("post", 1), get_act_name("scale")
        ('blocks.2.ln1.hook_scale', 'blocks.1.mlp.hook_post', 'ln_final.hook_scale')
    """
    if not isinstance(name, str):
        raise TypeError(f"get_act_name takes the activation's name as a string, got {type(name).__name__}")
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.groups()
    name = _NAME_ALIASES.get(name, name)
    if name in _LAYER_NORM_NAMES and layer is None and layer_type:
        return f"{layer_type}.hook_{name}"
    if name in _ATTENTION_NAMES:
        layer_type = "attn"
    elif name in _MLP_NAMES:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    full_name = f"blocks.{layer}." if layer is not None else ""
    full_name += f"{layer_type}.hook_{name}" if layer_type else f"hook_{name}"
    if name in _LAYER_NORM_NAMES and layer is None:
        full_name = f"ln_final.{full_name}"
    return full_name
