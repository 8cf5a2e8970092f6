"""Multi-head self-attention with every TransformerLens hook point."""

import einops
import torch
import torch.nn.functional as F
from fancy_einsum import einsum
from jaxtyping import Float
from torch import Tensor, nn

from vit_lens.model._transformer_lens import FactoredMatrix, HookPoint
from vit_lens.model.components._hooks import is_hooked
from vit_lens.model.components.norm import LayerNorm


def rotate_pairs(x: Tensor, mode: str) -> Tensor:
    """The 90-degree rotation of each rotary pair: interleaved ``(x0, x1)`` or halves ``(x_i, x_{i+d/2})``."""
    if mode == "interleaved":
        return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"], sin_cos: Float[Tensor, "n_patches two_d_head"], n_prefix: int, mode: str
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate the patch rows of ``x`` (prefix tokens stay as they are) with a ``[sin | cos]`` table."""
    sin, cos = sin_cos[:, None].chunk(2, dim=-1)  # [n_patches, 1, d_head] each
    patches = x[:, n_prefix:]
    rotated = (patches * cos + rotate_pairs(patches, mode) * sin).to(x.dtype)
    return torch.cat([x[:, :n_prefix], rotated], dim=1) if n_prefix else rotated


def _per_head_projection(
    x: Float[Tensor, "batch pos head d_model"], weight: Float[Tensor, "head d_model d_head"], bias: Tensor
) -> Float[Tensor, "batch pos head d_head"]:
    """Each head's own input times that head's weights (TransformerLens's split-input einsum)."""
    if x.ndim != 4 or x.shape[2] != weight.shape[0]:
        raise ValueError(
            f"A per-head attention input must be [batch, pos, head={weight.shape[0]}, d_model], got shape "
            f"{tuple(x.shape)}"
        )
    return einsum("batch pos head d_model, head d_model d_head -> batch pos head d_head", x, weight) + bias


class Attention(nn.Module):
    """Bidirectional attention, weights in TransformerLens's layout.

    ``W_Q, W_K, W_V``: ``[head, d_model, d_head]``; ``W_O``: ``[head, d_head, d_model]``.
    A LayerScale of the source model is folded into ``W_O`` and ``b_O`` at load time.

    Attention runs through ``scaled_dot_product_attention`` unless something is attached to
    ``hook_attn_scores`` or ``hook_pattern``; then the pattern is computed explicitly so that
    it can be read and replaced. Per-head outputs (``hook_result``) are computed only when
    something is attached to that hook.

    Options of EVA-style models: ``rotary`` rotates q and k of the patch tokens after
    ``hook_q``/``hook_k`` (``hook_rot_q``/``hook_rot_k`` hold the rotated ones, as in
    TransformerLens); ``norm_eps`` adds a LayerNorm ``ln_z`` over the concatenated heads
    before ``W_O`` (EVA-CLIP's ``scale_attn_inner``). ``W_O`` then reads the normalised heads,
    and head ``h``'s ``hook_result`` is ``ln_z(z)[..., h, :] @ W_O[h]``.

    Inputs per head (TransformerLens's ``use_split_qkv_input`` / ``use_attn_in``, set up by the
    block): an input of shape ``[batch, pos, head, d_model]`` gives each head its own input, and
    separate ``key_input`` / ``value_input`` give keys and values their own; each head's q, k and
    v are then computed from its own row. A ``[batch, pos, d_model]`` input alone, the default,
    runs the fused product of the source models.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_head: int,
        rotary: str = "none",
        n_prefix_tokens: int = 0,
        norm_eps: float | None = None,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_head
        self.scale = d_head**-0.5
        self.rotary = rotary
        self.n_prefix_tokens = n_prefix_tokens
        self.W_Q = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_K = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_V = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_O = nn.Parameter(torch.empty(n_heads, d_head, d_model))
        self.b_Q = nn.Parameter(torch.zeros(n_heads, d_head))
        self.b_K = nn.Parameter(torch.zeros(n_heads, d_head))
        self.b_V = nn.Parameter(torch.zeros(n_heads, d_head))
        self.b_O = nn.Parameter(torch.zeros(d_model))
        self.ln_z = LayerNorm(n_heads * d_head, norm_eps) if norm_eps is not None else None

        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, head, d_head]
        if rotary != "none":
            self.hook_rot_q = HookPoint()  # [batch, pos, head, d_head], after the rotary embedding
            self.hook_rot_k = HookPoint()  # [batch, pos, head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query, key], scaled, before softmax
        self.hook_pattern = HookPoint()  # [batch, head, query, key]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model], only when hooked

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V @ W_O`` per head, ``[head, d_model, d_model]`` (right-multiplies the residual)."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q @ W_K^T`` per head, ``[head, d_model, d_model]``: query side on the left."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-1, -2))

    def needs_pattern(self) -> bool:
        """Whether the explicit (non-fused) path must run, because the pattern is observed."""
        return is_hooked(self.hook_attn_scores, self.hook_pattern)

    def forward(
        self,
        x: Float[Tensor, "batch pos *head_axis d_model"],
        rotary: Tensor | None = None,
        key_input: Float[Tensor, "batch pos head d_model"] | None = None,
        value_input: Float[Tensor, "batch pos head d_model"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attend; ``x`` is the queries' input, and the keys' and values' unless ``key_input`` / ``value_input`` are given.

        ``rotary``: the ``[n_patches, 2 * d_head]`` sine/cosine table of a rotary model, else None.
        """
        batch, pos = x.shape[:2]
        h, dh = self.n_heads, self.d_head
        if x.ndim == 3 and key_input is None and value_input is None:
            # One matmul for q, k and v, as the source models do.
            w_qkv = einops.rearrange(
                torch.stack([self.W_Q, self.W_K, self.W_V]), "qkv head d_model d_head -> d_model (qkv head d_head)"
            )
            b_qkv = einops.rearrange(
                torch.stack([self.b_Q, self.b_K, self.b_V]), "qkv head d_head -> (qkv head d_head)"
            )
            qkv = torch.addmm(b_qkv, x.reshape(batch * pos, -1), w_qkv).view(batch, pos, 3, h, dh)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = _per_head_projection(x, self.W_Q, self.b_Q)
            k = _per_head_projection(x if key_input is None else key_input, self.W_K, self.b_K)
            v = _per_head_projection(x if value_input is None else value_input, self.W_V, self.b_V)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.rotary != "none":
            q = self.hook_rot_q(apply_rotary(q, rotary, self.n_prefix_tokens, self.rotary))
            k = self.hook_rot_k(apply_rotary(k, rotary, self.n_prefix_tokens, self.rotary))
        q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.needs_pattern():
            scores = einsum("batch head query d_head, batch head key d_head -> batch head query key", q_t, k_t)
            pattern = self.hook_pattern(torch.softmax(self.hook_attn_scores(scores * self.scale), dim=-1))
            z = einsum("batch head query key, batch head key d_head -> batch head query d_head", pattern, v_t)
        else:
            z = F.scaled_dot_product_attention(q_t, k_t, v_t)
        z = self.hook_z(z.transpose(1, 2))
        if self.ln_z is not None:
            z = self.ln_z(z.reshape(batch, pos, h * dh)).view(batch, pos, h, dh)
        if is_hooked(self.hook_result):
            result = self.hook_result(
                einsum("batch pos head d_head, head d_head d_model -> batch pos head d_model", z, self.W_O)
            )
            return result.sum(dim=2) + self.b_O
        out = torch.addmm(self.b_O, z.reshape(batch * pos, h * dh), self.W_O.reshape(h * dh, -1))
        return out.view(batch, pos, -1)
