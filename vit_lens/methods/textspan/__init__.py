"""TextSpan and what builds on it (Gandelsman, Efros, Steinhardt, ICLR 2024): text descriptions of heads,
property-based retrieval, spurious-cue removal, and the text pools."""

from vit_lens._lazy import lazy_package

__getattr__, __dir__, __all__ = lazy_package(__name__, {}, ("textspan", "retrieval", "spurious", "pools"))
