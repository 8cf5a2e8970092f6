"""Ghiasi et al., "What do Vision Transformers Learn? A Visual Exploration" (2022): feature visualisation,
last-layer token mixing, and robustness probes."""

from vit_lens._lazy import lazy_package

__getattr__, __dir__, __all__ = lazy_package(__name__, {}, ("visualisation", "token_mixing", "robustness"))
