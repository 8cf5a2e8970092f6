"""The MLP of a transformer block."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": _gelu_tanh, "quick_gelu": quick_gelu}


class MLP(nn.Module):
    """``W_out(act(x @ W_in + b_in)) + b_out``, weights in TransformerLens's right-multiply layout.

    A LayerScale of the source model is folded into ``W_out`` and ``b_out`` at load time, so
    ``hook_mlp_out`` and per-neuron contributions (``post[..., n] * W_out[n]``) already include it.
    """

    def __init__(self, d_model: int, d_mlp: int, act_fn: str):
        super().__init__()
        self.act_fn = act_fn
        self._act = ACTIVATIONS[act_fn]
        self.W_in = nn.Parameter(torch.empty(d_model, d_mlp))
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        self.W_out = nn.Parameter(torch.empty(d_mlp, d_model))
        self.b_out = nn.Parameter(torch.zeros(d_model))
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        # addmm fuses the bias into the matmul: no extra temporary, as nn.Linear does
        flat = x.reshape(-1, x.shape[-1])
        pre = self.hook_pre(torch.addmm(self.b_in, flat, self.W_in).view(*x.shape[:-1], -1))
        post = self.hook_post(self._act(pre))
        return torch.addmm(self.b_out, post.reshape(flat.shape[0], -1), self.W_out).view(x.shape)
