"""Multi-head self-attention with every TransformerLens hook point."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import FactoredMatrix
from transformer_lens.hook_points import HookPoint

from vit_lens.components._hooks import is_hooked


class Attention(nn.Module):
    """Bidirectional attention, weights in TransformerLens's layout.

    ``W_Q, W_K, W_V``: ``[head, d_model, d_head]``; ``W_O``: ``[head, d_head, d_model]``.
    A LayerScale of the source model is folded into ``W_O`` and ``b_O`` at load time.

    Attention runs through ``scaled_dot_product_attention`` unless something is attached to
    ``hook_attn_scores`` or ``hook_pattern``; then the pattern is computed explicitly so that
    it can be read and replaced. Per-head outputs (``hook_result``) are computed only when
    something is attached to that hook.
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int):
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_head
        self.scale = d_head**-0.5
        self.W_Q = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_K = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_V = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_O = nn.Parameter(torch.empty(n_heads, d_head, d_model))
        self.b_Q = nn.Parameter(torch.zeros(n_heads, d_head))
        self.b_K = nn.Parameter(torch.zeros(n_heads, d_head))
        self.b_V = nn.Parameter(torch.zeros(n_heads, d_head))
        self.b_O = nn.Parameter(torch.zeros(d_model))

        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, head, d_head]
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

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        batch, pos, d_model = x.shape
        h, dh = self.n_heads, self.d_head
        # One matmul for q, k and v, as the source models do.
        w_qkv = torch.cat([self.W_Q, self.W_K, self.W_V]).permute(1, 0, 2).reshape(d_model, 3 * h * dh)
        b_qkv = torch.cat([self.b_Q, self.b_K, self.b_V]).reshape(3 * h * dh)
        qkv = torch.addmm(b_qkv, x.reshape(batch * pos, d_model), w_qkv).view(batch, pos, 3, h, dh)
        q = self.hook_q(qkv[:, :, 0])
        k = self.hook_k(qkv[:, :, 1])
        v = self.hook_v(qkv[:, :, 2])
        q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.needs_pattern():
            scores = self.hook_attn_scores(torch.matmul(q_t, k_t.transpose(-1, -2)) * self.scale)
            pattern = self.hook_pattern(torch.softmax(scores, dim=-1))
            z = torch.matmul(pattern, v_t)
        else:
            z = F.scaled_dot_product_attention(q_t, k_t, v_t)
        z = self.hook_z(z.transpose(1, 2))
        if is_hooked(self.hook_result):
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
            return result.sum(dim=2) + self.b_O
        out = torch.addmm(self.b_O, z.reshape(batch * pos, h * dh), self.W_O.reshape(h * dh, -1))
        return out.view(batch, pos, -1)
