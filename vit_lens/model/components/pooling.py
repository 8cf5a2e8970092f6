"""Pooling of the final tokens (including attention pooling) and the classification head."""

import torch
from fancy_einsum import einsum
from jaxtyping import Float
from torch import Tensor, nn

from vit_lens.model._transformer_lens import HookPoint
from vit_lens.model.components._hooks import is_hooked
from vit_lens.model.components.mlp import MLP
from vit_lens.model.components.norm import LayerNorm
from vit_lens.model.config import ViTConfig


class Pool(nn.Module):
    """Reduce ``[batch, pos, d_model]`` to the pooled representation.

    ``"token"`` gives ``[batch, d_model]`` (CLS); ``"token_dist"`` gives ``[batch, 2, d_model]``
    (CLS and the distillation token, which a DeiT head reads separately); ``"avg"``, ``"max"``
    and ``"avgmax"`` reduce over the patches (and the prefix tokens if ``pool_include_prefix``).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.pool_type = cfg.pool_type
        self.start = 0 if cfg.pool_include_prefix else cfg.n_prefix_tokens

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch *pooled d_model"]:
        if self.pool_type == "token":
            return x[:, 0]
        if self.pool_type == "token_dist":
            return x[:, :2]
        tokens = x[:, self.start :]
        if self.pool_type == "avg":
            return tokens.mean(dim=1)
        if self.pool_type == "max":
            return tokens.amax(dim=1)
        return 0.5 * (tokens.amax(dim=1) + tokens.mean(dim=1))


class Head(nn.Module):
    """Linear classifier ``pooled @ W_head + b_head``.

    For a distilled DeiT the CLS token goes through ``W_head`` and the distillation token
    through ``W_head_dist``; the logits are their average, as timm computes at inference.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.W_head = nn.Parameter(torch.empty(cfg.d_model, cfg.n_classes))
        self.b_head = nn.Parameter(torch.zeros(cfg.n_classes))
        self.distilled = cfg.pool_type == "token_dist"
        if self.distilled:
            self.W_head_dist = nn.Parameter(torch.empty(cfg.d_model, cfg.n_classes))
            self.b_head_dist = nn.Parameter(torch.zeros(cfg.n_classes))

    def forward(self, pooled: Float[Tensor, "batch *pooled d_model"]) -> Float[Tensor, "batch n_classes"]:
        if not self.distilled:
            return torch.matmul(pooled, self.W_head) + self.b_head
        logits = torch.matmul(pooled[:, 0], self.W_head) + self.b_head
        logits_dist = torch.matmul(pooled[:, 1], self.W_head_dist) + self.b_head_dist
        return (logits + logits_dist) / 2


class AttentionPool(nn.Module):
    """Multi-head attention pooling with a learned latent query (SigLIP's MAP head), then ``x + mlp(ln(x))``.

    The query is a learned vector, the keys and values are the tokens after the final LayerNorm.
    Weights follow :class:`~vit_lens.model.components.Attention`'s layout; the hook points mirror a
    block's, with a query axis of length one::

        attn_pool.hook_q / hook_z          [batch, 1, head, d_head]
        attn_pool.hook_k / hook_v          [batch, pos, head, d_head]
        attn_pool.hook_attn_scores         [batch, head, 1, key] (scaled, pre-softmax)
        attn_pool.hook_pattern             [batch, head, 1, key]
        attn_pool.hook_result              [batch, 1, head, d_model] (only when hooked)
        attn_pool.hook_attn_out            [batch, d_model]
        attn_pool.ln.hook_scale/normalized [batch, 1, 1] / [batch, 1, d_model]
        attn_pool.mlp.hook_pre/hook_post   [batch, 1, map_d_mlp]
        attn_pool.hook_mlp_out             [batch, d_model]

    Given the pattern and the final LayerNorm's scales, ``hook_attn_out`` is linear in the
    residual stream, so :func:`vit_lens.intervene.decompose.direct_contributions` splits the pooled vector
    into the components' terms plus one term for this pool's own MLP.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d_model, h = cfg.d_model, cfg.map_n_heads
        self.n_heads, self.d_head = h, d_model // h
        self.scale = self.d_head**-0.5
        self.latent = nn.Parameter(torch.zeros(d_model))
        self.W_Q = nn.Parameter(torch.empty(h, d_model, self.d_head))
        self.W_K = nn.Parameter(torch.empty(h, d_model, self.d_head))
        self.W_V = nn.Parameter(torch.empty(h, d_model, self.d_head))
        self.W_O = nn.Parameter(torch.empty(h, self.d_head, d_model))
        self.b_Q = nn.Parameter(torch.zeros(h, self.d_head))
        self.b_K = nn.Parameter(torch.zeros(h, self.d_head))
        self.b_V = nn.Parameter(torch.zeros(h, self.d_head))
        self.b_O = nn.Parameter(torch.zeros(d_model))
        self.ln = LayerNorm(d_model, cfg.eps)
        self.mlp = MLP(d_model, cfg.map_d_mlp, cfg.act_fn)
        self.hook_q = HookPoint()  # [batch, 1, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, 1, key]
        self.hook_pattern = HookPoint()  # [batch, head, 1, key]
        self.hook_z = HookPoint()  # [batch, 1, head, d_head]
        self.hook_result = HookPoint()  # [batch, 1, head, d_model], only when hooked
        self.hook_attn_out = HookPoint()  # [batch, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch d_model"]:
        batch = x.shape[0]
        q = einsum("d_model, head d_model d_head -> head d_head", self.latent, self.W_Q) + self.b_Q
        q = self.hook_q(q[None, None].expand(batch, 1, -1, -1).clone())
        k = self.hook_k(einsum("batch pos d_model, head d_model d_head -> batch pos head d_head", x, self.W_K) + self.b_K)
        v = self.hook_v(einsum("batch pos d_model, head d_model d_head -> batch pos head d_head", x, self.W_V) + self.b_V)
        q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if is_hooked(self.hook_attn_scores, self.hook_pattern):
            scores = einsum("batch head query d_head, batch head key d_head -> batch head query key", q_t, k_t)
            pattern = self.hook_pattern(torch.softmax(self.hook_attn_scores(scores * self.scale), dim=-1))
            z = einsum("batch head query key, batch head key d_head -> batch head query d_head", pattern, v_t)
        else:
            z = torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t)
        z = self.hook_z(z.transpose(1, 2))  # [batch, 1, head, d_head]
        if is_hooked(self.hook_result):
            result = einsum("batch query head d_head, head d_head d_model -> batch query head d_model", z, self.W_O)
            attn_out = self.hook_result(result).sum(dim=2)[:, 0] + self.b_O
        else:
            attn_out = z.reshape(batch, -1) @ self.W_O.reshape(-1, self.W_O.shape[-1]) + self.b_O
        attn_out = self.hook_attn_out(attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln(attn_out[:, None]))[:, 0])
        return attn_out + mlp_out
