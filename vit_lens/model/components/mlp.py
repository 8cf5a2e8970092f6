"""The MLP of a transformer block: standard, or gated (SwiGLU), with an optional inner LayerNorm."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from vit_lens.model._transformer_lens import HookPoint
from vit_lens.model.components.norm import LayerNorm


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": _gelu_tanh, "quick_gelu": quick_gelu, "silu": F.silu}


class MLP(nn.Module):
    """``W_out(act(x @ W_in + b_in)) + b_out``, weights in TransformerLens's right-multiply layout.

    With ``gated=True`` (SwiGLU, as TransformerLens's gated MLP names it) the hidden activation
    is ``act(x @ W_gate + b_gate) * (x @ W_in + b_in)``: ``hook_pre`` is the gate's input,
    ``hook_pre_linear`` the linear branch and ``hook_post`` their product, so a neuron's
    contribution is still ``post[..., n] * W_out[n]``. With ``norm_eps`` a LayerNorm
    (``ln_hidden``, EVA02's ``scale_mlp``) acts on ``hook_post`` before ``W_out``; a neuron's
    contribution is then ``ln_hidden.hook_normalized[..., n] * W_out[n]``.

    A LayerScale of the source model is folded into ``W_out`` and ``b_out`` at load time, so
    ``hook_mlp_out`` and per-neuron contributions already include it.
    """

    def __init__(self, d_model: int, d_mlp: int, act_fn: str, gated: bool = False, norm_eps: float | None = None):
        super().__init__()
        self.act_fn = act_fn
        self.gated = gated
        self._act = ACTIVATIONS[act_fn]
        self.W_in = nn.Parameter(torch.empty(d_model, d_mlp))
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        if gated:
            self.W_gate = nn.Parameter(torch.empty(d_model, d_mlp))
            self.b_gate = nn.Parameter(torch.zeros(d_mlp))
        self.ln_hidden = LayerNorm(d_mlp, norm_eps) if norm_eps is not None else None
        self.W_out = nn.Parameter(torch.empty(d_mlp, d_model))
        self.b_out = nn.Parameter(torch.zeros(d_model))
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]; the gate's input when gated
        if gated:
            self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        # addmm fuses the bias into the matmul: no extra temporary, as nn.Linear does
        flat = x.reshape(-1, x.shape[-1])
        if self.gated:
            pre = self.hook_pre(torch.addmm(self.b_gate, flat, self.W_gate).view(*x.shape[:-1], -1))
            linear = self.hook_pre_linear(torch.addmm(self.b_in, flat, self.W_in).view(*x.shape[:-1], -1))
            post = self.hook_post(self._act(pre) * linear)
        else:
            pre = self.hook_pre(torch.addmm(self.b_in, flat, self.W_in).view(*x.shape[:-1], -1))
            post = self.hook_post(self._act(pre))
        if self.ln_hidden is not None:
            post = self.ln_hidden(post)
        return torch.addmm(self.b_out, post.reshape(flat.shape[0], -1), self.W_out).view(x.shape)
