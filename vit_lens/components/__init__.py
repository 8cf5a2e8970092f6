"""Building blocks of HookedViT; each module owns its hook points."""

from vit_lens.components.attention import Attention
from vit_lens.components.block import TransformerBlock
from vit_lens.components.embed import Embed, PosEmbed
from vit_lens.components.mlp import MLP
from vit_lens.components.norm import LayerNorm
from vit_lens.components.pooling import AttentionPool, Head, Pool

__all__ = ["Attention", "TransformerBlock", "Embed", "PosEmbed", "MLP", "LayerNorm", "Head", "Pool", "AttentionPool"]
