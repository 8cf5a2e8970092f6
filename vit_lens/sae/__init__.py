"""Sparse autoencoders and transcoders for vision transformers.

- :mod:`~vit_lens.sae.model`: :class:`SAE` and :class:`SAEConfig`: standard (ReLU, L1), TopK,
  BatchTopK and JumpReLU SAEs, and transcoders, with SAELens's weight and hook-point names.
- :mod:`~vit_lens.sae.files`: :func:`save_sae` / :func:`load_sae` in SAELens's on-disk format,
  :func:`load_prisma_sae` for ViT-Prisma's vision SAEs, :func:`from_sae_lens` for SAELens objects.
- :mod:`~vit_lens.sae.splice`: :func:`spliced`, :func:`run_with_saes`,
  :func:`run_with_cache_with_saes`, :func:`run_with_hooks_with_saes`: SAEs spliced into a HookedViT
  or HookedCLIP with their features as hook points (``blocks.3.hook_resid_post.hook_sae_acts_post``).

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
    },
    ("model", "files", "splice"),
)
