"""Which axis of a hook point's activation holds tokens, heads, keys and MLP neurons.

Shared by the interventions (to select what to edit) and the dataset statistics (to pool over
tokens), so that both read the same layout table as the README's hook list.
"""

from dataclasses import dataclass

_HEAD_FIRST = ("hook_attn_scores", "hook_pattern")  # [batch, head, query, key]
_TOKEN_HEAD = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z", "hook_result")  # [batch, pos, head, d]
# Block-level per-head copies of the residual stream (TransformerLens's edge hooks), [batch, pos, head, d_model].
_PER_HEAD_INPUTS = ("hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_in")
_MLP_NEURONS = ("hook_pre", "hook_pre_linear", "hook_post")  # [batch, pos, d_mlp] under mlp.
_NO_TOKENS = ("hook_pooled", "hook_image_embed", "hook_logits")  # after pooling


@dataclass(frozen=True)
class HookAxes:
    """Axes of one hook point's activation (batch is always axis 0); None where there is none.

    Attributes:
        position: The token axis; for attention scores and patterns, the query axis.
        head: The attention-head axis.
        key: The key-token axis of attention scores and patterns.
        neuron: The MLP-neuron axis of ``mlp.hook_pre`` / ``mlp.hook_post``.
    """

    position: int | None
    head: int | None = None
    key: int | None = None
    neuron: int | None = None


def hook_axes(name: str, ndim: int) -> HookAxes:
    """The layout of the activation of hook point ``name``, which has ``ndim`` axes.

    ``ndim`` settles the final LayerNorm, which acts per token ([batch, pos, d]) or on the
    pooled vector ([batch, d]) depending on the model, and ``ln1``, which acts on per-head
    copies ([batch, pos, head, d]) while the model has per-head attention inputs
    (``use_split_qkv_input`` / ``use_attn_in``).
    """
    parent, _, leaf = name.rpartition(".")
    in_attn = parent.endswith("attn") or parent == "attn_pool"
    if in_attn and leaf in _HEAD_FIRST:
        return HookAxes(position=2, head=1, key=3)
    if in_attn and leaf in _TOKEN_HEAD:
        return HookAxes(position=1, head=2)
    if leaf in _PER_HEAD_INPUTS or (parent.endswith("ln1") and ndim == 4):
        return HookAxes(position=1, head=2)
    if parent.endswith("mlp") and leaf in _MLP_NEURONS:
        return HookAxes(position=1, neuron=2)
    if leaf in _NO_TOKENS or ndim < 3:
        return HookAxes(position=None)
    return HookAxes(position=1)
