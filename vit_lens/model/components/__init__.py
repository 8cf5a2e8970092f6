"""Building blocks of HookedViT; each module owns its hook points."""

from vit_lens.model.components.attention import Attention
from vit_lens.model.components.block import TransformerBlock
from vit_lens.model.components.embed import Embed, PosEmbed
from vit_lens.model.components.mlp import MLP
from vit_lens.model.components.norm import LayerNorm
from vit_lens.model.components.pooling import AttentionPool, Head, Pool

__all__ = ["Attention", "TransformerBlock", "Embed", "PosEmbed", "MLP", "LayerNorm", "Head", "Pool", "AttentionPool"]
