"""LayerNorm with TransformerLens's hook points."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from vit_lens.model._transformer_lens import HookPoint
from vit_lens.model.components._hooks import is_hooked


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, with weight ``w`` and bias ``b``.

    When nothing is attached to its hooks it calls ``F.layer_norm`` (what the source models
    call); otherwise it computes the same thing in steps so that ``hook_scale`` and
    ``hook_normalized`` can be observed and replaced.
    """

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint()  # [batch, pos, 1] (or [batch, 1] on a pooled vector)
        self.hook_normalized = HookPoint()  # [batch, pos, d_model] (or [batch, d_model])

    def forward(self, x: Float[Tensor, "*batch_pos d_model"]) -> Float[Tensor, "*batch_pos d_model"]:
        if not is_hooked(self.hook_scale, self.hook_normalized):
            return F.layer_norm(x, self.w.shape, self.w, self.b, self.eps)
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale * self.w + self.b)
