"""Balasubramanian, Basu, Feizi, "Decomposing and Interpreting Image Representations via Text in ViTs Beyond
CLIP" (NeurIPS 2024): per-component linear maps into CLIP space (CompAlign) and component scores."""

from vit_lens._lazy import lazy_package

__getattr__, __dir__, __all__ = lazy_package(__name__, {}, ("compalign",))
