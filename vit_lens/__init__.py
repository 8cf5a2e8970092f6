"""vit_lens: mechanistic interpretability for vision transformers."""

from vit_lens.cache import VisionActivationCache
from vit_lens.clip import HookedCLIP
from vit_lens.config import ViTConfig
from vit_lens.hooked_vit import HookedViT

__all__ = ["HookedViT", "HookedCLIP", "ViTConfig", "VisionActivationCache"]
__version__ = "0.1.0"
