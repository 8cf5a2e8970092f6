"""Pooling of the final tokens and the classification head."""

import torch
from jaxtyping import Float
from torch import Tensor, nn

from vit_lens.config import ViTConfig


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
