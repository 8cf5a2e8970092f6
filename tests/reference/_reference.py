"""Shared pieces of the reference tests: seeded inputs, weight perturbation, source-side residual capture."""

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from tests.conftest import assert_rel_close
from vit_lens.model.cache import VisionActivationCache
from vit_lens.model.hooked_vit import HookedViT


def seeded_images(batch: int, height: int, width: int, seed: int = 0) -> Tensor:
    """Standard-normal float32 images, the same for every run."""
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def perturb_vector_params_(model: nn.Module, seed: int) -> nn.Module:
    """Add seeded noise to every vector-like parameter (norm weights and biases, linear biases,
    LayerScale gammas, class/distillation/register tokens).

    Random initialisation leaves LayerNorms at identity, most biases at zero and timm's CLS and
    register tokens at ~1e-6, so a converter that dropped, swapped or transposed any of them
    would still match the source. After this every such parameter is distinct and matters.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.squeeze().ndim <= 1 or "token" in name:
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


@torch.no_grad()
def run_source(
    forward: Callable[[Tensor], Tensor], pre_blocks: nn.Module, blocks: Sequence[nn.Module], images: Tensor
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Run ``forward(images)`` and capture the residual stream entering the first block
    (the output of ``pre_blocks``, the pre-transformer norm or its Identity) and every block's output.

    Returns ``(output, resid_pre_0, [resid_post_0, resid_post_1, ...])``.
    """
    captured: dict[str, list[Tensor]] = {"pre": [], "post": []}
    handles = [pre_blocks.register_forward_hook(lambda _m, _i, out: captured["pre"].append(out.detach().clone()))]
    for block in blocks:
        handles.append(block.register_forward_hook(lambda _m, _i, out: captured["post"].append(out.detach().clone())))
    try:
        output = forward(images)
    finally:
        for handle in handles:
            handle.remove()
    assert len(captured["pre"]) == 1 and len(captured["post"]) == len(blocks), "source hooks fired unexpectedly"
    return output, captured["pre"][0], captured["post"]


def assert_residuals_match(cache: VisionActivationCache, resid_pre_0: Tensor, resid_posts: list[Tensor]) -> None:
    """``blocks.0.hook_resid_pre`` and every ``blocks.{l}.hook_resid_post`` equal the source's to 1e-5."""
    assert len(resid_posts) == cache.model.cfg.n_layers
    assert_rel_close(cache["blocks.0.hook_resid_pre"], resid_pre_0, what="blocks.0.hook_resid_pre")
    for layer, expected in enumerate(resid_posts):
        name = f"blocks.{layer}.hook_resid_post"
        assert_rel_close(cache[name], expected, what=name)


@dataclass
class Case:
    """One source model and its conversion, run on the same images, for the equivalence tests."""

    source: nn.Module
    images: Tensor
    source_output: Tensor
    resid_pre_0: Tensor
    resid_posts: list[Tensor]
    hooked: HookedViT
    hooked_output: Tensor
    cache: VisionActivationCache


def equivalence_case(source: nn.Module, hooked: HookedViT, images: Tensor, forward: Callable[[Tensor], Tensor],
                     pre_blocks: nn.Module, blocks: Sequence[nn.Module]) -> Case:
    """Run the source (recording block 0's input and every block's output) and the converted model."""
    output, pre, posts = run_source(forward, pre_blocks, blocks, images)
    with torch.no_grad():
        hooked_output, cache = hooked.run_with_cache(images)
    return Case(source, images, output, pre, posts, hooked, hooked_output, cache)
