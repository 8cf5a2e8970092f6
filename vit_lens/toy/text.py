"""The toy CLIP's text side: a word-level tokenizer over the world's vocabulary and a small transformer."""

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from vit_lens.toy.world import FACTORS, PLURALS

SPECIAL = ("<pad>", "<sot>", "<eot>")
VOCABULARY: tuple[str, ...] = SPECIAL + tuple(
    dict.fromkeys(
        [word for values in FACTORS.values() for word in values]
        + list(PLURALS.values())
        + ["object", "objects", "on", "the", "background", ",", "a", "photo", "of", "with", "and"]
    )
)
"""Every word the toy text tower knows, in token-id order."""


class ToyTokenizer:
    """Word-level tokenizer: ``<sot> words... <eot>`` padded with ``<pad>`` (id 0) to ``context_length``.

    Words outside :data:`VOCABULARY` raise a ``ValueError`` that names them: the toy model only
    knows its world's words, and silently mapping them to an unknown token would hide that.

    Example:
        >>> ToyTokenizer()(["two red circles"])[0, :5].tolist()
        [1, 20, 7, 26, 2]
    """

    def __init__(self, context_length: int = 16):
        self.context_length = context_length
        self.vocabulary = VOCABULARY
        self.index = {word: i for i, word in enumerate(VOCABULARY)}

    def words(self, text: str) -> list[str]:
        return re.findall(r"[a-z]+|,", text.lower())

    def __call__(self, texts: str | Sequence[str]) -> Int[Tensor, "n context"]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokens = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            words = self.words(text)
            unknown = sorted({w for w in words if w not in self.index})
            if unknown:
                raise ValueError(
                    f"the toy CLIP does not know the word(s) {unknown} in {text!r}; its vocabulary is the "
                    "world's factor values plus 'object(s) on the background , a photo of with and' "
                    "(vit_lens.toy.VOCABULARY)"
                )
            ids = [self.index["<sot>"]] + [self.index[w] for w in words] + [self.index["<eot>"]]
            if len(ids) > self.context_length:
                raise ValueError(f"{text!r} has {len(words)} words; the toy tokenizer takes at most {self.context_length - 2}")
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens


class ToyTextTower(nn.Module):
    """A small pre-norm transformer over word tokens, read out at ``<eot>`` and projected.

    It implements ``encode_text(tokens, normalize)``, the interface :class:`vit_lens.HookedCLIP`
    expects of a text tower.
    """

    def __init__(self, width: int = 96, layers: int = 2, heads: int = 4, d_proj: int = 64, context_length: int = 16):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(len(VOCABULARY), width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, d_proj))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def encode_text(self, tokens: Int[Tensor, "n context"], normalize: bool = False) -> Float[Tensor, "n d_proj"]:
        padding = tokens == 0
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.transformer(x, src_key_padding_mask=padding)
        eot = (tokens == VOCABULARY.index("<eot>")).int().argmax(dim=1)
        x = self.ln_final(x[torch.arange(len(tokens)), eot]) @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, tokens: Tensor) -> Tensor:
        return self.encode_text(tokens)
