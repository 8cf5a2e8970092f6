"""Bad input gets a clear error that names what was wrong and what would work."""

import pytest
import timm
import torch
from torch import nn

from tests.conftest import assert_rel_close, tiny_config
from vit_lens import HookedViT, ViTConfig


@pytest.mark.parametrize(
    "images, error, message",
    [
        ([[0.0]], TypeError, "takes images as a torch.Tensor"),
        (torch.randn(3, 32, 32), ValueError, r"add a batch axis with images.unsqueeze\(0\)"),
        (torch.randn(2, 3, 32, 32, 1), ValueError, "got a 5-d tensor"),
        (torch.randn(2, 1, 32, 32), ValueError, "expects 3 channels at axis 1"),
        (torch.randn(2, 32, 32, 3), ValueError, r"Channels-last\? Use images.permute\(0, 3, 1, 2\)"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), TypeError, "takes float images, got torch.uint8"),
        (torch.randn(2, 3, 32, 32, dtype=torch.float64), TypeError, "Images are torch.float64 .* model is torch.float32"),
        (torch.randn(2, 3, 48, 48), ValueError, "takes 32x32 images, got 48x48.*dynamic_img_size=True"),
    ],
    ids=["list", "unbatched", "5d", "one_channel", "channels_last", "uint8", "float64", "wrong_size"],
)
def test_bad_images_are_refused_with_a_directed_message(tiny_model, images, error, message):
    with pytest.raises(error, match=message):
        tiny_model(images)


def test_dynamic_image_size_needs_a_multiple_of_the_patch_size():
    model = HookedViT(tiny_config(dynamic_img_size=True)).init_weights(seed=0)
    with pytest.raises(ValueError, match="not a (positive )?multiple of the patch size 8x8"):
        model(torch.randn(1, 3, 36, 40))
    assert model(torch.randn(1, 3, 40, 24)).shape == (1, 16)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=0), "d_model must be a positive int"),
        (dict(act_fn="relu"), "act_fn must be one of"),
        (dict(pool_type="cls"), "pool_type must be one of"),
        (dict(class_token=False), "needs class_token=True"),
        (dict(image_size=30), "not a multiple of patch_size"),
        (dict(n_classes=10), "either d_proj .* or n_classes"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_round_trips_through_a_dict():
    cfg = tiny_config()
    again = ViTConfig(**cfg.to_dict())
    assert again == cfg and again.n_prefix_tokens == 3 and again.n_ctx == 19


def test_hooked_vit_takes_a_config_or_its_dict():
    assert HookedViT(tiny_config().to_dict()).cfg == tiny_config()


@pytest.mark.parametrize(
    "kwargs, feature",
    [
        (dict(qk_norm=True), "q/k normalisation"),
        (dict(global_pool="prr"), "attention pooling"),
        (dict(global_pool=""), "global_pool=''"),
        (dict(act_layer="relu"), "activation ReLU"),
    ],
    ids=["qk_norm", "map_pool", "no_pool", "relu"],
)
def test_unsupported_timm_features_are_refused_by_name(kwargs, feature):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, **kwargs)
    with pytest.raises(NotImplementedError, match=feature):
        HookedViT.from_timm(source)


def test_a_source_parameter_with_no_place_is_an_error_not_a_silent_drop():
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32)
    source.blocks[1].attn.extra_bias = nn.Parameter(torch.ones(3))
    with pytest.raises(NotImplementedError, match=r"no place for \(blocks.1.attn.extra_bias\)"):
        HookedViT.from_timm(source)


def test_non_vit_sources_are_refused():
    with pytest.raises(NotImplementedError, match="converts timm VisionTransformer models"):
        HookedViT.from_timm(timm.create_model("resnet18", pretrained=False))
    with pytest.raises(NotImplementedError, match="vision tower is a Linear"):
        HookedViT.from_open_clip(nn.Linear(2, 2))


def test_timm_dynamic_size_can_be_switched_on_at_conversion():
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).eval()
    model = HookedViT.from_timm(source, dynamic_img_size=True)
    images = torch.randn(1, 3, 160, 128)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, dynamic_img_size=True).eval()
    reference.load_state_dict(source.state_dict())
    with torch.no_grad():
        assert_rel_close(model(images), reference(images), rtol=1e-5, what="dynamic size")
