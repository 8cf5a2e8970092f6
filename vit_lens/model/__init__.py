"""The hooked models: HookedViT, HookedCLIP, their config, components, hook layout and activation cache."""

from vit_lens._lazy import lazy_package

__getattr__, __dir__, __all__ = lazy_package(
    __name__,
    {
        "HookedViT": ".hooked_vit",
        "HookedCLIP": ".clip",
        "ViTConfig": ".config",
        "VisionActivationCache": ".cache",
        "HookedBlip2": ".blip2",
    },
    (
        "hooked_vit", "clip", "config", "cache", "components", "hook_layout", "hook_checks", "blip2", "readout",
        "weight_processing",
    ),
)
