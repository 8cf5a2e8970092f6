"""HookedCLIP beyond the equivalence checks: logits, shared text weights, delegation, directed errors."""

import open_clip
import pytest
import torch

from tests.conftest import assert_rel_close
from vit_lens import HookedCLIP, VisionActivationCache


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16)
    text = dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=1)
    return open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text).eval()


@pytest.fixture(scope="module")
def clip(source):
    return HookedCLIP.from_open_clip(source, tokenizer=lambda texts: open_clip.tokenize(texts, context_length=16))


def test_logits_match_open_clip(clip, source):
    images = torch.randn(3, 3, 32, 32)
    texts = ["a red square", "a blue circle"]
    with torch.no_grad():
        logits = clip(images, texts)
        image = source.encode_image(images, normalize=True)
        text = source.encode_text(open_clip.tokenize(texts, context_length=16), normalize=True)
    assert logits.shape == (3, 2)
    assert_rel_close(logits, source.logit_scale.exp() * image @ text.T, rtol=1e-5, what="logits")


def test_text_tower_is_shared_not_copied(clip, source):
    assert clip.text_model.token_embedding.weight is source.token_embedding.weight
    assert clip.logit_scale is source.logit_scale
    assert not hasattr(clip.text_model, "visual") and hasattr(source, "visual")


def test_hooks_and_cache_go_to_the_image_tower(clip):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        embed, cache = clip.run_with_cache(images)
        zeroed = clip.run_with_hooks(images, fwd_hooks=[("hook_image_embed", lambda act, hook: torch.zeros_like(act))])
    assert isinstance(cache, VisionActivationCache)
    torch.testing.assert_close(cache["hook_image_embed"], embed)
    assert zeroed.abs().max() == 0


def test_preprocess_is_the_source_eval_transform(clip):
    from PIL import Image

    image = Image.new("RGB", (50, 40), color=(255, 0, 0))
    tensor = clip.preprocess(image)
    assert tensor.shape == (3, 32, 32)
    expected_red = (1.0 - 0.48145466) / 0.26862954  # OpenAI CLIP mean/std for the red channel
    assert abs(tensor[0].mean().item() - expected_red) < 1e-5


def test_directed_errors(clip, source):
    no_tokenizer = HookedCLIP.from_open_clip(source)
    with pytest.raises(ValueError, match="tokenizer=open_clip.get_tokenizer"):
        no_tokenizer.encode_text(["a dog"])
    assert no_tokenizer.encode_text(open_clip.tokenize(["a dog"], context_length=16)).shape == (1, 24)
    with pytest.raises(ValueError, match="non-empty list of class names"):
        clip.zero_shot_classifier("dog")
    with pytest.raises(ValueError, match="non-empty list of format strings"):
        clip.zero_shot_classifier(["dog"], templates="a photo of a {}")
    with pytest.raises(TypeError, match="needs a whole open_clip CLIP model"):
        HookedCLIP.from_open_clip(source.visual)


def test_zero_shot_classifier_columns_are_unit_template_means(clip):
    weights = clip.zero_shot_classifier(["dog", "cat", "car"], templates=["a {}.", lambda c: f"a photo of a {c}."], batch_size=2)
    assert weights.shape == (24, 3)
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(3))
    with torch.no_grad():
        dog = clip.encode_text(["a dog.", "a photo of a dog."], normalize=True).mean(0)
    torch.testing.assert_close(weights[:, 0], dog / dog.norm())
