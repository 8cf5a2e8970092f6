"""Sparse autoencoders and transcoders for vision transformers.

- :mod:`~vit_lens.sae.model`: :class:`SAE` and :class:`SAEConfig`: standard (ReLU, L1), TopK,
  BatchTopK and JumpReLU SAEs, and transcoders, with SAELens's weight and hook-point names.
- :mod:`~vit_lens.sae.files`: :func:`save_sae` / :func:`load_sae` in SAELens's on-disk format,
  :func:`load_prisma_sae` for ViT-Prisma's vision SAEs, :func:`from_sae_lens` for SAELens objects.
- :mod:`~vit_lens.sae.splice`: :func:`spliced`, :func:`run_with_saes`,
  :func:`run_with_cache_with_saes`, :func:`run_with_hooks_with_saes`: SAEs spliced into a HookedViT
  or HookedCLIP with their features as hook points (``blocks.3.hook_resid_post.hook_sae_acts_post``).
- :mod:`~vit_lens.sae.activations`: :class:`ActivationSource` (rows of the SAE's tokens, streamed from
  images through the model) and the shuffling :class:`ActivationBuffer`.
- :mod:`~vit_lens.sae.training`: :func:`train_sae` / :func:`train_transcoder` on activations streamed
  from images; :func:`train_sae_on_activations` on activations you have.
- :mod:`~vit_lens.sae.evaluation`: :func:`evaluate_sae` (L0, explained variance, dead / dense
  features, downstream accuracy spliced against clean and mean-ablated), :func:`evaluate_saes` per layer.
- :mod:`~vit_lens.sae.views`: :func:`feature_views` (top images with patch heatmaps, histograms,
  densities, streamed) and :func:`name_features` (decoder directions carried to the output, matched
  to a text pool); :mod:`~vit_lens.sae.dashboard`: :func:`write_sae_dashboard` (offline HTML).
- :mod:`~vit_lens.sae.scoring`: :func:`score_sae_features`: each factor value's best feature (AUROC)
  and whether its name is right, against the toy world's truth.

Example:
    >>> import torch, vit_lens
    >>> from vit_lens.sae import SAE, SAEConfig, run_with_saes
    >>> clip = vit_lens.load_toy_clip()
    >>> sae = SAE(SAEConfig(d_in=128, d_sae=256, hook_name="blocks.1.hook_resid_post")).init_weights(seed=0)
    >>> images = torch.rand(2, 3, 64, 64)
    >>> torch.allclose(run_with_saes(clip, images, saes=[sae], use_error_term=True), clip(images), atol=1e-5)
    True
"""

from vit_lens._lazy import lazy_package

__getattr__, __dir__, __all__ = lazy_package(
    __name__,
    {
        "SAE": ".model",
        "SAEConfig": ".model",
        "ARCHITECTURES": ".model",
        "save_sae": ".files",
        "load_sae": ".files",
        "load_prisma_sae": ".files",
        "from_sae_lens": ".files",
        "spliced": ".splice",
        "run_with_saes": ".splice",
        "run_with_cache_with_saes": ".splice",
        "run_with_hooks_with_saes": ".splice",
        "train_sae": ".training",
        "train_transcoder": ".training",
        "train_sae_on_activations": ".training",
        "ActivationBuffer": ".activations",
        "ActivationSource": ".activations",
        "evaluate_sae": ".evaluation",
        "evaluate_saes": ".evaluation",
        "feature_views": ".views",
        "feature_image_scores": ".views",
        "name_features": ".views",
        "FeatureView": ".views",
        "FeatureName": ".views",
        "write_sae_dashboard": ".dashboard",
        "score_sae_features": ".scoring",
        "SAEScorecard": ".scoring",
        "auroc": ".scoring",
    },
    ("model", "files", "splice", "activations", "training", "evaluation", "views", "dashboard", "scoring"),
)
