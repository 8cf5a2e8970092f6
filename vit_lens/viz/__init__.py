"""What people look at: the HTML report of ``vit-lens demo`` (the plotly helpers live in
:mod:`vit_lens.utils.plotting`, one floor down, because the methods draw with them)."""

from vit_lens._lazy import lazy_package

__getattr__, __dir__, __all__ = lazy_package(__name__, {}, ("report",))
