"""Layer-by-layer analyses ("Peeling Back the Layers: Interpreting the Storytelling of ViT"): CLS attention
maps and their differences, data flow, high-norm tokens, layer averaging and readout, decoding layers
into language and the text metrics that compare the decodings."""

from vit_lens._lazy import lazy_package

__getattr__, __dir__, __all__ = lazy_package(
    __name__, {}, ("attention_maps", "averaging", "decoding", "text_metrics")
)
