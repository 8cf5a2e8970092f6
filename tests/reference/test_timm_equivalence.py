"""HookedViT against timm itself: every layer's residual stream and the model output.

Source models have random weights (no downloads) with their vector parameters perturbed, so
every weight the converter maps has to land in the right place for the numbers to agree.
"""

from dataclasses import dataclass

import pytest
import timm
import torch
from torch import Tensor

from tests.conftest import assert_rel_close
from tests.reference._reference import assert_residuals_match, perturb_vector_params_, run_source, seeded_images
from vit_lens import HookedViT
from vit_lens.model.cache import VisionActivationCache

# DINOv2 models default to 518px (1369 patches), which is slow on CPU for no extra coverage:
# built at 126px (9x9 patches of 14px) they have the same blocks, LayerScale and prefix tokens.
DINO_SIZE = dict(img_size=126)

# (timm name, create_model kwargs, input (height, width), batch)
CASES = [
    pytest.param(("vit_tiny_patch16_224", {}, (224, 224), 2), id="vit_tiny_patch16_224"),
    pytest.param(("vit_small_patch16_224", {}, (224, 224), 2), id="vit_small_patch16_224"),
    pytest.param(("vit_base_patch32_clip_224", {}, (224, 224), 2), id="vit_base_patch32_clip_224-norm_pre"),
    pytest.param(("deit_tiny_patch16_224", {}, (224, 224), 2), id="deit_tiny_patch16_224"),
    pytest.param(("deit_small_distilled_patch16_224", {}, (224, 224), 2), id="deit_small_distilled_patch16_224"),
    pytest.param(("vit_small_patch14_dinov2", DINO_SIZE, (126, 126), 2), id="vit_small_patch14_dinov2-126px"),
    pytest.param(
        ("vit_small_patch14_reg4_dinov2", DINO_SIZE, (126, 126), 2), id="vit_small_patch14_reg4_dinov2-126px"
    ),
    pytest.param(
        ("vit_small_patch16_224", dict(global_pool="avg"), (224, 224), 2), id="vit_small_patch16_224-avgpool-fc_norm"
    ),
    pytest.param(("vit_small_patch16_224", dict(num_classes=0), (224, 224), 2), id="vit_small_patch16_224-no_head"),
    pytest.param(
        ("vit_tiny_patch16_224", dict(dynamic_img_size=True), (160, 192), 2), id="vit_tiny_patch16_224-dynamic-160x192"
    ),
    pytest.param(
        ("vit_small_patch14_reg4_dinov2", dict(DINO_SIZE, dynamic_img_size=True), (112, 154), 2),
        id="vit_small_patch14_reg4_dinov2-dynamic-112x154",
    ),
]


@dataclass
class Case:
    source: torch.nn.Module
    source_output: Tensor
    source_resid_pre_0: Tensor
    source_resid_posts: list[Tensor]
    hooked: HookedViT
    hooked_output: Tensor
    cache: VisionActivationCache


@pytest.fixture(scope="module", params=CASES)
def case(request) -> Case:
    name, kwargs, (height, width), batch = request.param
    torch.manual_seed(0)
    source = perturb_vector_params_(timm.create_model(name, pretrained=False, **kwargs).eval(), seed=1)
    images = seeded_images(batch, height, width, seed=2)
    source_output, resid_pre_0, resid_posts = run_source(source, source.norm_pre, source.blocks, images)
    hooked = HookedViT.from_timm(source)
    with torch.no_grad():
        hooked_output, cache = hooked.run_with_cache(images)
    return Case(source, source_output, resid_pre_0, resid_posts, hooked, hooked_output, cache)


def test_residual_stream_matches_at_every_layer(case):
    """The stream entering block 0 (after norm_pre, if any) and every block's output equal timm's."""
    assert_residuals_match(case.cache, case.source_resid_pre_0, case.source_resid_posts)


def test_output_matches_timm(case):
    """Logits (averaged over both heads for distilled DeiT) or the pooled features equal ``model(images)``."""
    assert_rel_close(case.hooked_output, case.source_output, what="HookedViT output")


def test_config_matches_source_structure(case):
    """Prefix tokens, head width and dynamic sizing were read from the source model."""
    cfg, source = case.hooked.cfg, case.source
    assert cfg.n_prefix_tokens == source.num_prefix_tokens
    assert cfg.n_layers == len(source.blocks)
    assert cfg.d_output == case.source_output.shape[-1]
    assert cfg.dynamic_img_size == source.dynamic_img_size
