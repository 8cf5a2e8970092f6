"""Vision transformers whose mechanism is known by construction, with their truth (:func:`vit_lens.load_planted`)."""

from vit_lens.planted.model import PLANTED_MODELS, PlantedModel, load_planted
from vit_lens.planted.truth import CLASSIFIER_HEADS, PlantedHead
from vit_lens.planted.verify import (
    inertness,
    interchange_accuracy,
    reading_fractions,
    task_accuracy,
)

__all__ = [
    "CLASSIFIER_HEADS",
    "PLANTED_MODELS",
    "PlantedCLIP",
    "PlantedHead",
    "PlantedModel",
    "inertness",
    "interchange_accuracy",
    "load_planted",
    "reading_fractions",
    "task_accuracy",
]


def __getattr__(name: str):
    # Imported on first use, so that `python -m vit_lens.planted.clip` does not find the module already loaded.
    if name == "PlantedCLIP":
        from vit_lens.planted.clip import PlantedCLIP

        return PlantedCLIP
    raise AttributeError(f"module 'vit_lens.planted' has no attribute {name!r}")
