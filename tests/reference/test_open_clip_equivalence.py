"""HookedViT / HookedCLIP against open_clip itself: every layer's residual stream and the outputs.

Source models have random weights (no downloads) with their vector parameters perturbed, so
every weight the converter maps has to land in the right place for the numbers to agree.
"""

import copy
from dataclasses import dataclass

import open_clip
import pytest
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import Tensor

from tests.conftest import assert_rel_close
from tests.reference._reference import assert_residuals_match, perturb_vector_params_, run_source, seeded_images
from vit_lens import HookedCLIP, HookedViT
from vit_lens.model.cache import VisionActivationCache


def small_clip(**vision_overrides) -> open_clip.CLIP:
    """A tiny open_clip CLIP (4 heads of width 16, 2 layers, 32px images) with vision options set."""
    vision_cfg = dict(width=64, layers=2, head_width=16, patch_size=8, image_size=32, **vision_overrides)
    text_cfg = dict(width=32, heads=2, layers=1, context_length=16, vocab_size=100)
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg)


def vit_h_14_four_layers() -> open_clip.CLIP:
    """ViT-H-14 with 4 vision and 2 text layers.

    The full model has ~1B parameters, too slow to build and run on CPU in a test. Depth is the
    only change: each block keeps ViT-H's width 1280, 16 heads of width 80 (not 64) and
    MLP 5120, at 224px with 14px patches, so the per-layer computation checked is ViT-H's.
    """
    cfg = copy.deepcopy(open_clip.get_model_config("ViT-H-14"))
    cfg["vision_cfg"]["layers"] = 4
    cfg["text_cfg"]["layers"] = 2
    return open_clip.CLIP(**cfg)


BUILDERS = {
    "ViT-B-32": lambda: open_clip.create_model("ViT-B-32", pretrained=None),
    "ViT-B-32-quickgelu": lambda: open_clip.create_model("ViT-B-32-quickgelu", pretrained=None),
    "ViT-B-16": lambda: open_clip.create_model("ViT-B-16", pretrained=None),
    "ViT-L-14": lambda: open_clip.create_model("ViT-L-14", pretrained=None),
    "ViT-H-14-4layers": vit_h_14_four_layers,
    "layerscale": lambda: small_clip(ls_init_value=0.1),
    "avgpool-final_ln_after_pool": lambda: small_clip(pool_type="avg", final_ln_after_pool=True),
    "no_ln_pre": lambda: small_clip(no_ln_pre=True),
}
# (builder key, batch size); the large models run one image to keep CPU time down.
CASES = [
    pytest.param(("ViT-B-32", 2), id="ViT-B-32"),
    pytest.param(("ViT-B-32-quickgelu", 2), id="ViT-B-32-quickgelu"),
    pytest.param(("ViT-B-16", 2), id="ViT-B-16"),
    pytest.param(("ViT-L-14", 1), id="ViT-L-14", marks=pytest.mark.slow),
    pytest.param(("ViT-H-14-4layers", 1), id="ViT-H-14-4layers", marks=pytest.mark.slow),
    pytest.param(("layerscale", 2), id="layerscale"),
    pytest.param(("avgpool-final_ln_after_pool", 2), id="avgpool-final_ln_after_pool"),
    pytest.param(("no_ln_pre", 2), id="no_ln_pre"),
]


@dataclass
class Case:
    source: open_clip.CLIP
    images: Tensor
    source_embed: Tensor
    source_resid_pre_0: Tensor
    source_resid_posts: list[Tensor]
    hooked_embed: Tensor
    cache: VisionActivationCache


@pytest.fixture(scope="module", params=CASES)
def case(request) -> Case:
    key, batch = request.param
    torch.manual_seed(0)
    source = perturb_vector_params_(BUILDERS[key]().eval(), seed=1)
    visual = source.visual
    images = seeded_images(batch, *visual.image_size, seed=2)
    source_embed, resid_pre_0, resid_posts = run_source(
        source.encode_image, visual.ln_pre, visual.transformer.resblocks, images
    )
    hooked = HookedViT.from_open_clip(visual)
    with torch.no_grad():
        hooked_embed, cache = hooked.run_with_cache(images)
    return Case(source, images, source_embed, resid_pre_0, resid_posts, hooked_embed, cache)


def test_residual_stream_matches_at_every_layer(case):
    """The stream entering block 0 (after ln_pre, if any) and every block's output equal open_clip's."""
    assert_residuals_match(case.cache, case.source_resid_pre_0, case.source_resid_posts)


def test_image_embedding_matches_encode_image(case):
    """The HookedViT output and ``hook_image_embed`` equal ``encode_image``."""
    assert_rel_close(case.hooked_embed, case.source_embed, what="HookedViT output")
    assert_rel_close(case.cache["hook_image_embed"], case.source_embed, what="hook_image_embed")


def test_hooked_clip_encode_image_matches(case):
    """HookedCLIP built from the whole CLIP model embeds images as ``encode_image`` does."""
    clip = HookedCLIP.from_open_clip(case.source)
    with torch.no_grad():
        assert_rel_close(clip.encode_image(case.images), case.source_embed, what="encode_image")


def test_attentional_pool_is_refused():
    """A CoCa-style attentional pooler is not implemented, so conversion refuses instead of diverging."""
    torch.manual_seed(0)
    source = small_clip(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=4)
    with pytest.raises(NotImplementedError, match="attentional"):
        HookedViT.from_open_clip(source)


# ---------------------------------------------------------------- text side (ViT-B-32 only, for time)

TEXTS = ["a photo of a dog", "a diagram", "two cats on a red sofa"]


@pytest.fixture(scope="module")
def b32():
    torch.manual_seed(0)
    source = perturb_vector_params_(open_clip.create_model("ViT-B-32", pretrained=None).eval(), seed=1)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    return source, tokenizer, HookedCLIP.from_open_clip(source, tokenizer=tokenizer)


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_encode_text_matches_source(b32, normalize):
    """Strings go through the model's tokenizer and the source text tower: identical embeddings."""
    source, tokenizer, clip = b32
    with torch.no_grad():
        actual = clip.encode_text(TEXTS, normalize=normalize)
        expected = source.encode_text(tokenizer(TEXTS), normalize=normalize)
    assert actual.shape == (len(TEXTS), 512)
    assert torch.equal(actual, expected)


def test_zero_shot_classifier_matches_open_clip(b32):
    """The default templates are open_clip's 80 OpenAI ImageNet ones and the classifier is open_clip's."""
    source, tokenizer, clip = b32
    classnames = ["dog", "cat"]  # two classes in batches of one: the column concatenation is exercised
    with torch.no_grad():
        expected = build_zero_shot_classifier(source, tokenizer, classnames, open_clip.OPENAI_IMAGENET_TEMPLATES)
    actual = clip.zero_shot_classifier(classnames, batch_size=1)
    assert actual.shape == (512, 2)
    assert_rel_close(actual, expected, rtol=1e-6, what="zero-shot classifier")


def test_image_text_logits_match_source(b32):
    """HookedCLIP(images, texts) is open_clip's ``logit_scale.exp() * normalised image @ normalised text.T``."""
    source, tokenizer, clip = b32
    images = seeded_images(2, 224, 224, seed=2)
    with torch.no_grad():
        image_features, text_features, scale = source(images, tokenizer(TEXTS))
        actual = clip(images, TEXTS)
    assert actual.shape == (2, len(TEXTS))
    assert_rel_close(actual, scale * image_features @ text_features.T, what="image-text logits")
