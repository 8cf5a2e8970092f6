"""The papers' methods, one family a subpackage.

- :mod:`~vit_lens.methods.textspan`: TextSpan, property retrieval and spurious-cue removal
  (Gandelsman, Efros, Steinhardt, "Interpreting CLIP's Image Representation via Text-Based
  Decomposition", ICLR 2024), with the text pools.
- :mod:`~vit_lens.methods.segmentation`: zero-shot segmentation from text heatmaps and its baselines
  (the same paper's Sec. 5).
- :mod:`~vit_lens.methods.layers`: per-layer attention maps, data flow, layer averaging and readout,
  decoding layers into language ("Peeling Back the Layers: Interpreting the Storytelling of ViT").
- :mod:`~vit_lens.methods.featureviz`: feature visualisation, last-layer token mixing, robustness probes
  (Ghiasi et al., "What do Vision Transformers Learn? A Visual Exploration", 2022).
- :mod:`~vit_lens.methods.alignment`: linear maps from any ViT's components into CLIP space and component
  scores (Balasubramanian, Basu, Feizi, "Decomposing and Interpreting Image Representations via Text in
  ViTs Beyond CLIP", NeurIPS 2024).
"""

from vit_lens._lazy import lazy_package

__getattr__, __dir__, __all__ = lazy_package(
    __name__, {}, ("textspan", "segmentation", "layers", "featureviz", "alignment")
)
