"""HookedViT.from_hf / HookedCLIP.from_hf against Hugging Face transformers models built from configs.

Random weights, built offline from small configs (width 32, 2 layers, 4 heads, 32px images of 8px
patches), vector parameters perturbed. Checked: the residual stream entering block 0 and after
every block (read with forward hooks on the source's layers), and the output the source returns
(``image_embeds``, ``logits`` or ``pooler_output``), to 1e-5 relative in float32.
"""


import pytest
import torch
import transformers as hf
from torch import Tensor, nn

from tests.conftest import assert_rel_close
from tests.reference._reference import (
    Case, assert_residuals_match, equivalence_case, perturb_vector_params_, seeded_images,
)
from vit_lens import HookedCLIP, HookedViT
from vit_lens.intervene.decompose import direct_contributions
from vit_lens.loading.hf import _layers

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
DINO = dict({k: v for k, v in VISION.items() if k != "intermediate_size"}, mlp_ratio=2)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
            max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def clip_model() -> nn.Module:
    return hf.CLIPModel(hf.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16))


# id: (model as the docs table shows it, source, builder)
MODELS = {
    "CLIPVisionModel": ("`CLIPVisionModel` (OpenAI CLIP image tower)", "transformers",
                        lambda: hf.CLIPVisionModel(hf.CLIPVisionConfig(**VISION))),
    "CLIPVisionModelWithProjection": (
        "`CLIPVisionModelWithProjection`", "transformers",
        lambda: hf.CLIPVisionModelWithProjection(hf.CLIPVisionConfig(**VISION, projection_dim=16)),
    ),
    "CLIPModel": ("`CLIPModel` (image tower + projection; `HookedCLIP.from_hf`)", "transformers", clip_model),
    "ViTForImageClassification": ("`ViTForImageClassification` (fine-tunes)", "transformers",
                                  lambda: hf.ViTForImageClassification(hf.ViTConfig(**VISION, num_labels=5))),
    "ViTModel": ("`ViTModel` (`add_pooling_layer=False`)", "transformers",
                 lambda: hf.ViTModel(hf.ViTConfig(**VISION), add_pooling_layer=False)),
    "Dinov2Model": ("`Dinov2Model`", "transformers", lambda: hf.Dinov2Model(hf.Dinov2Config(**DINO))),
    "Dinov2Model-swiglu": ("`Dinov2Model` with SwiGLU (DINOv2-giant)", "transformers",
                           lambda: hf.Dinov2Model(hf.Dinov2Config(**DINO, use_swiglu_ffn=True))),
    "Dinov2WithRegistersModel": (
        "`Dinov2WithRegistersModel` (registers)", "transformers",
        lambda: hf.Dinov2WithRegistersModel(hf.Dinov2WithRegistersConfig(**DINO, num_register_tokens=4)),
    ),
    "SiglipVisionModel": ("`SiglipVisionModel` (MAP head)", "transformers",
                          lambda: hf.SiglipVisionModel(hf.SiglipVisionConfig(**VISION))),
}
SUPPORTED = [(key, label, source) for key, (label, source, _) in MODELS.items()]
REFUSED_MODELS = {
    "ViTModel-pooler": ("`ViTModel` with its tanh pooler", "transformers",
                        lambda: hf.ViTModel(hf.ViTConfig(**VISION)), "ViT pooler"),
    "SiglipVisionModel-no-head": (
        "`SiglipVisionModel` with `vision_use_head=False`", "transformers",
        lambda: hf.SiglipVisionModel(hf.SiglipVisionConfig(**VISION, vision_use_head=False)), "no attention-pooling head",
    ),
    "ConvNextModel": ("other architectures (e.g. `ConvNextModel`)", "transformers",
                      lambda: hf.ConvNextModel(hf.ConvNextConfig(num_stages=2, depths=[1, 1], hidden_sizes=[8, 16])),
                      "from_hf converts"),
}
REFUSED = [(key, label, source, words) for key, (label, source, _, words) in REFUSED_MODELS.items()]


def source_output(model: nn.Module, images: Tensor) -> Tensor:
    """What the source model returns for images: image_embeds, logits or pooler_output."""
    if isinstance(model, hf.CLIPModel):
        features = model.get_image_features(pixel_values=images)
        return getattr(features, "pooler_output", features)
    out = model(pixel_values=images)
    for field in ("image_embeds", "logits", "pooler_output"):
        if getattr(out, field, None) is not None:
            return getattr(out, field)
    return out.last_hidden_state[:, 0]  # ViTModel without pooler: the final-normed CLS


def _tower(model: nn.Module) -> nn.Module:
    return getattr(model, "vision_model", None) or getattr(model, "vit", None) or model


def _pre_blocks(tower: nn.Module) -> nn.Module:
    return getattr(tower, "pre_layrnorm", None) or tower.embeddings


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def case(request, one_thread) -> Case:
    torch.manual_seed(0)
    source = perturb_vector_params_(MODELS[request.param][2]().eval(), seed=1)
    tower = _tower(source)
    images = seeded_images(2, 32, 32, seed=2)
    hooked = HookedViT.from_hf(source)
    return equivalence_case(source, hooked, images, lambda x: source_output(source, x), _pre_blocks(tower), _layers(tower))


def test_residual_stream_matches_at_every_layer(case):
    """Block 0's input (after CLIP's pre-LayerNorm) and every layer's output equal the source's."""
    assert_residuals_match(case.cache, case.resid_pre_0, case.resid_posts)


def test_output_matches_source(case):
    assert_rel_close(case.hooked_output, case.source_output, what="HookedViT output")


def test_config_reads_the_source_structure(case):
    config = getattr(case.source.config, "vision_config", case.source.config)
    cfg = case.hooked.cfg
    assert cfg.n_layers == config.num_hidden_layers and cfg.n_heads == config.num_attention_heads
    assert cfg.n_prefix_tokens == int(cfg.class_token) + getattr(config, "num_register_tokens", 0)
    assert cfg.d_output == case.source_output.shape[-1]


@pytest.mark.parametrize("level", ["head", "neuron"])
def test_direct_contributions_sum_to_the_representation(case, level):
    parts = direct_contributions(case.hooked, case.cache, level=level)
    target = case.cache["hook_image_embed"] if case.hooked.cfg.d_proj else case.cache["hook_pooled"]
    assert_rel_close(parts.sum(), target, what=f"{level} contributions")


@pytest.mark.parametrize("key", list(REFUSED_MODELS))
def test_refused_with_the_feature_named(key):
    _, _, build, words = REFUSED_MODELS[key]
    torch.manual_seed(0)
    with pytest.raises(NotImplementedError, match=words):
        HookedViT.from_hf(build())


# ---------------------------------------------------------------- HookedCLIP.from_hf


@pytest.fixture(scope="module")
def clip_pair(one_thread):
    torch.manual_seed(0)
    source = perturb_vector_params_(clip_model().eval(), seed=1)
    return source, HookedCLIP.from_hf(source)


TOKENS = torch.tensor([[1, 5, 9, 2, 0, 0], [1, 7, 8, 11, 12, 2], [1, 3, 2, 0, 0, 0]])


def test_hooked_clip_from_hf_text_and_logits_match(clip_pair):
    """Text features are ``get_text_features``; image-text logits are CLIPModel's ``logits_per_image``."""
    source, clip = clip_pair
    images = seeded_images(2, 32, 32, seed=2)
    with torch.no_grad():
        expected_text = source.get_text_features(input_ids=TOKENS)
        expected_text = getattr(expected_text, "pooler_output", expected_text)
        assert_rel_close(clip.encode_text(TOKENS), expected_text, what="encode_text")
        logits = source(input_ids=TOKENS, pixel_values=images).logits_per_image
        assert_rel_close(clip(images, TOKENS), logits, what="logits_per_image")


def test_hooked_clip_from_hf_tokenizes_and_preprocesses_with_the_processor(clip_pair):
    """A processor's tokenizer and image processor become ``tokenize`` and ``preprocess``."""
    source, _ = clip_pair

    class Tokenizer:
        def __call__(self, texts, padding, return_tensors):
            ids = [[1] + [3 + len(word) for word in text.split()] + [2] for text in texts]
            width = max(map(len, ids))
            return {"input_ids": torch.tensor([row + [0] * (width - len(row)) for row in ids])}

    class ImageProcessor:
        def __call__(self, images, return_tensors):
            return {"pixel_values": torch.full((1, 3, 32, 32), float(images))}

    processor = type("Processor", (), {"tokenizer": Tokenizer(), "image_processor": ImageProcessor()})()
    clip = HookedCLIP.from_hf(source, processor)
    assert clip.tokenize(["a dog", "two red cats"]).tolist() == [[1, 4, 6, 2, 0], [1, 6, 6, 7, 2]]
    assert torch.equal(clip.preprocess(0.5), torch.full((3, 32, 32), 0.5))


def test_hooked_clip_from_hf_refuses_a_vision_only_model():
    with pytest.raises(TypeError, match="HookedViT.from_hf"):
        HookedCLIP.from_hf(hf.CLIPVisionModel(hf.CLIPVisionConfig(**VISION)))
