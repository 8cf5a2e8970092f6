"""A pre-LayerNorm transformer block."""

from jaxtyping import Float
from torch import Tensor, nn

from vit_lens.model._transformer_lens import HookPoint
from vit_lens.model.components.attention import Attention
from vit_lens.model.components.mlp import MLP
from vit_lens.model.components.norm import LayerNorm
from vit_lens.model.config import ViTConfig

# The hook points each TransformerLens edge flag of ViTConfig adds to every block.
EDGE_HOOKS = {
    "use_split_qkv_input": ("hook_q_input", "hook_k_input", "hook_v_input"),
    "use_attn_in": ("hook_attn_in",),
    "use_hook_mlp_in": ("hook_mlp_in",),
}


class TransformerBlock(nn.Module):
    """``x + attn(ln1(x))`` then ``+ mlp(ln2(.))``; LayerScale, if any, is folded into the weights.

    The edge hook points exist only while their flag is on (:meth:`set_edge_hooks`); otherwise
    they are None, so they are neither in the model's ``hook_dict`` nor computed.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
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
        self.hook_q_input: HookPoint | None = None  # [batch, pos, head, d_model], use_split_qkv_input
        self.hook_k_input: HookPoint | None = None  # [batch, pos, head, d_model], use_split_qkv_input
        self.hook_v_input: HookPoint | None = None  # [batch, pos, head, d_model], use_split_qkv_input
        self.hook_attn_in: HookPoint | None = None  # [batch, pos, head, d_model], use_attn_in
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_in: HookPoint | None = None  # [batch, pos, d_model], use_hook_mlp_in
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]
        for flag in EDGE_HOOKS:
            self.set_edge_hooks(flag, getattr(cfg, flag))

    def set_edge_hooks(self, flag: str, on: bool) -> None:
        """Add (``on``) or remove the hook points of the ViTConfig flag ``flag`` (a key of ``EDGE_HOOKS``).

        Removing drops whatever hooks are attached to them: ``HookedViT``'s setters refuse to turn
        a flag off while any are, and rebuild the model's ``hook_dict`` afterwards.
        """
        for name in EDGE_HOOKS[flag]:
            if on and getattr(self, name) is None:
                setattr(self, name, HookPoint())
            elif not on:
                setattr(self, name, None)

    def _per_head(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos head d_model"]:
        """One copy of ``resid`` per head: a hook may edit one head's copy in place without touching the others."""
        return resid.unsqueeze(2).repeat(1, 1, self.n_heads, 1)

    def forward(
        self, resid: Float[Tensor, "batch pos d_model"], rotary: Tensor | None = None
    ) -> Float[Tensor, "batch pos d_model"]:
        """``rotary``: the ``[n_patches, 2 * d_head]`` sine/cosine table of a rotary model, else None."""
        resid = self.hook_resid_pre(resid)
        if self.hook_q_input is not None:
            # ln1 normalises each copy on its own, as TransformerLens's split inputs do, so its hooks
            # fire three times (queries', keys', values' input) with [batch, pos, head, *] tensors.
            query_input = self.ln1(self.hook_q_input(self._per_head(resid)))
            key_input = self.ln1(self.hook_k_input(self._per_head(resid)))
            value_input = self.ln1(self.hook_v_input(self._per_head(resid)))
            attn_out = self.attn(query_input, rotary, key_input=key_input, value_input=value_input)
        elif self.hook_attn_in is not None:
            attn_out = self.attn(self.ln1(self.hook_attn_in(self._per_head(resid))), rotary)
        else:
            attn_out = self.attn(self.ln1(resid), rotary)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(attn_out))
        # A copy, so that an edit of the MLP's input never reaches the residual stream.
        mlp_input = resid if self.hook_mlp_in is None else self.hook_mlp_in(resid.clone())
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln2(mlp_input))))
