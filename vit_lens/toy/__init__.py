"""The built-in toy world and the small CLIP trained on it (:func:`vit_lens.load_toy_clip`)."""

from vit_lens.toy.model import build_toy_clip, factor_accuracy, load_toy_clip, save_toy_clip
from vit_lens.toy.text import VOCABULARY, ToyTextTower, ToyTokenizer
from vit_lens.toy.world import FACTORS, Scene, ToyBatch, ToyObject, ToyWorld, caption, description_pool, factor_prompts

__all__ = [
    "FACTORS", "Scene", "ToyBatch", "ToyObject", "ToyWorld", "caption", "description_pool", "factor_prompts",
    "VOCABULARY", "ToyTextTower", "ToyTokenizer", "build_toy_clip", "factor_accuracy", "load_toy_clip", "save_toy_clip",
]
