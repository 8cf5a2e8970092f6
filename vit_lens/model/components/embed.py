"""Patch, prefix-token and position embeddings."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from vit_lens.model._transformer_lens import HookPoint
from vit_lens.model.config import ViTConfig


class Embed(nn.Module):
    """Patchify with a strided convolution and prepend CLS, distillation and register tokens.

    ``W_E`` is kept in convolution layout ``[d_model, channels, patch_h, patch_w]``.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.W_E = nn.Parameter(torch.empty(cfg.d_model, cfg.in_channels, *cfg.patch_size))
        self.b_E = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.patch_bias else None
        self.cls_token = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.distillation_token else None
        self.registers = nn.Parameter(torch.zeros(cfg.n_registers, cfg.d_model)) if cfg.n_registers else None

    def forward(self, images: Float[Tensor, "batch channel height width"]) -> Float[Tensor, "batch pos d_model"]:
        patches = F.conv2d(images, self.W_E, self.b_E, stride=self.patch_size)
        patches = patches.flatten(2).transpose(1, 2)
        batch, _, d_model = patches.shape
        prefix = [
            token.reshape(1, -1, d_model).expand(batch, -1, -1)
            for token in (self.cls_token, self.dist_token, self.registers)
            if token is not None
        ]
        return torch.cat(prefix + [patches], dim=1) if prefix else patches


def resample_patch_pos_embed(
    pos: Float[Tensor, "n_patches d_model"], old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> Float[Tensor, "n_new d_model"]:
    """Bicubic, antialiased resampling of patch position embeddings (timm's ``dynamic_img_size`` rule)."""
    d_model = pos.shape[-1]
    grid = pos.float().reshape(1, old_grid[0], old_grid[1], d_model).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(-1, d_model).to(pos.dtype)


class PosEmbed(nn.Module):
    """Learned absolute position embeddings.

    ``W_pos`` has one row per patch, preceded by rows for the prefix tokens when
    ``cfg.pos_embed_on_prefix``; otherwise prefix tokens receive a zero position embedding, so
    ``hook_embed + hook_pos_embed`` is always the residual stream's starting value (before
    ``ln_pre``).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.grid_size = cfg.grid_size
        self.n_prefix_tokens = cfg.n_prefix_tokens
        self.pos_embed_on_prefix = cfg.pos_embed_on_prefix
        n_rows = cfg.n_patches + (cfg.n_prefix_tokens if cfg.pos_embed_on_prefix else 0)
        self.W_pos = nn.Parameter(torch.zeros(n_rows, cfg.d_model))

    def forward(self, grid: tuple[int, int]) -> Float[Tensor, "pos d_model"]:
        n_prefix_rows = self.n_prefix_tokens if self.pos_embed_on_prefix else 0
        prefix, patches = self.W_pos[:n_prefix_rows], self.W_pos[n_prefix_rows:]
        if tuple(grid) != tuple(self.grid_size):
            patches = resample_patch_pos_embed(patches, self.grid_size, grid)
        if not self.pos_embed_on_prefix:
            prefix = self.W_pos.new_zeros(self.n_prefix_tokens, self.W_pos.shape[1])
        return torch.cat([prefix, patches]) if len(prefix) else patches
