"""Helpers every floor of vit_lens may use: progress bars, plotly figures, hook names (no model code here)."""

from vit_lens._lazy import lazy_package

__getattr__, __dir__, __all__ = lazy_package(
    __name__, {"get_act_name": ".hook_names"}, ("plotting", "progress", "hook_names")
)
