"""A pre-LayerNorm transformer block."""

from jaxtyping import Float
from torch import Tensor, nn

from vit_lens.model._transformer_lens import HookPoint
from vit_lens.model.components.attention import Attention
from vit_lens.model.components.mlp import MLP
from vit_lens.model.components.norm import LayerNorm
from vit_lens.model.config import ViTConfig


class TransformerBlock(nn.Module):
    """``x + attn(ln1(x))`` then ``+ mlp(ln2(.))``; LayerScale, if any, is folded into the weights."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(
            cfg.d_model, cfg.n_heads, cfg.d_head, rotary=cfg.rotary, n_prefix_tokens=cfg.n_prefix_tokens,
            norm_eps=cfg.eps if cfg.attn_norm else None,
        )
        self.ln2 = LayerNorm(cfg.d_model, cfg.eps)
        self.mlp = MLP(
            cfg.d_model, cfg.d_mlp, cfg.act_fn, gated=cfg.mlp_type == "gated", norm_eps=cfg.eps if cfg.mlp_norm else None
        )
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(
        self, resid: Float[Tensor, "batch pos d_model"], rotary: Tensor | None = None
    ) -> Float[Tensor, "batch pos d_model"]:
        """``rotary``: the ``[n_patches, 2 * d_head]`` sine/cosine table of a rotary model, else None."""
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(self.ln1(resid), rotary)))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln2(resid))))
