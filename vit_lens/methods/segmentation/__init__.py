"""Zero-shot segmentation (Gandelsman, Efros, Steinhardt, ICLR 2024, Sec. 5): text heatmaps, the
attention rollout, GradCAM and relevance baselines, and the evaluation protocol."""

from vit_lens._lazy import lazy_package

__getattr__, __dir__, __all__ = lazy_package(__name__, {}, ("maps",))
