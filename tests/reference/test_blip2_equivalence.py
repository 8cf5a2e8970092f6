"""HookedBlip2 against transformers' BLIP-2 / InstructBLIP: the vision tower layer by layer, and generate().

Tiny models are built offline from configs with random weights (vision vector parameters
perturbed so that every LayerNorm, bias and the class token matters); the language models are a
decoder-only OPT and an encoder-decoder T5 (the paper's InstructBLIP uses Flan-T5).
"""

import copy

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    OPTConfig,
    T5Config,
)

from tests.conftest import assert_rel_close
from tests.reference._reference import assert_residuals_match, perturb_vector_params_, run_source, seeded_images
from vit_lens.methods.layers.decoding import CaptionerDecoder, decode_layers
from vit_lens.loading.blip2 import convert_blip2_vision
from vit_lens.model.blip2 import HookedBlip2, hooked_vit_from_blip2

N_QUERY = 4
IMAGE_TOKEN = 59
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8, qkv_bias=True)
QFORMER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
               encoder_hidden_size=32, vocab_size=50, max_position_embeddings=32)
OPT = OPTConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2, pad_token_id=1)
T5 = T5Config(vocab_size=60, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0,
              pad_token_id=0, eos_token_id=1, bos_token_id=1)


def build(kind: str):
    config_class, model_class = (
        (InstructBlipConfig, InstructBlipForConditionalGeneration) if kind == "instructblip-opt"
        else (Blip2Config, Blip2ForConditionalGeneration)
    )
    text = T5 if kind == "blip2-t5" else OPT
    config = config_class(vision_config=VISION, qformer_config=QFORMER, text_config=text.to_dict(),
                          num_query_tokens=N_QUERY, image_token_index=IMAGE_TOKEN)
    torch.manual_seed(0)
    model = model_class(config).eval()
    perturb_vector_params_(model.vision_model, seed=1)
    return model


def prompt(kind: str, batch: int) -> dict:
    if kind != "instructblip-opt":
        return {}
    return {"qformer_input_ids": torch.tensor([[5, 6, 7]] * batch),
            "input_ids": torch.tensor([[IMAGE_TOKEN] * N_QUERY + [2, 10]] * batch)}


GREEDY = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)


# Rows of docs/supported_models.md (tools/supported_models.py): the vision towers shown exact here.
SUPPORTED = [
    ("blip2-opt", "`Blip2ForConditionalGeneration` vision tower (OPT language model)", "transformers"),
    ("blip2-t5", "`Blip2ForConditionalGeneration` vision tower (Flan-T5 language model)", "transformers"),
    ("instructblip-opt", "`InstructBlipForConditionalGeneration` vision tower", "transformers"),
]
EXACT_TEST = "test_vision_tower_matches_layer_by_layer"


@pytest.fixture(scope="module", params=[key for key, _, _ in SUPPORTED])
def case(request, one_thread):
    kind = request.param
    source = build(kind)
    return kind, source, HookedBlip2.from_hf(source), seeded_images(2, 32, 32, seed=3)


def assert_same_generation(expected, actual):
    assert torch.equal(expected.sequences, actual.sequences)
    for step, (a, b) in enumerate(zip(expected.scores, actual.scores)):
        assert_rel_close(b, a, rtol=1e-5, what=f"scores at step {step}")


def test_vision_tower_matches_layer_by_layer(case):
    _, source, blip, images = case
    tower = source.vision_model
    with torch.no_grad():
        expected, resid_pre_0, resid_posts = run_source(
            lambda x: tower(x).last_hidden_state, tower.embeddings, tower.encoder.layers, images
        )
        pooler = tower(images).pooler_output
        _, cache = blip.run_with_cache(images)
    assert_residuals_match(cache, resid_pre_0, resid_posts)
    assert_rel_close(blip.image_tokens(images), expected, what="Q-Former input (post_layernorm, every token)")
    assert_rel_close(blip.model.vision_model(images).pooler_output, pooler, what="pooler_output")
    assert_rel_close(blip.vision(images), expected[:, 0], what="HookedViT output (normalised CLS)")
    assert type(source.vision_model).__name__.endswith("VisionModel")  # the source model was left as it was


def test_generate_is_token_identical(case):
    kind, source, blip, images = case
    expected = source.generate(pixel_values=images, **prompt(kind, 2), **GREEDY)
    actual = blip.generate(images, **prompt(kind, 2), **GREEDY)
    assert_same_generation(expected, actual)


def _edit(resid, hook=None):
    """Overwrite the patch tokens with a fixed pattern (the same edit on both models)."""
    pattern = torch.linspace(-2.0, 2.0, resid.shape[-1])
    edited = resid.clone()
    edited[:, 1:] = pattern
    return edited


def test_a_hook_edit_reaches_the_q_former_as_the_same_edit_in_transformers(case):
    kind, source, blip, images = case
    seen = []
    handle = blip.model.qformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        plain = blip.generate(images, **prompt(kind, 2), **GREEDY)
        edited = blip.generate(images, fwd_hooks=[("blocks.1.hook_resid_post", _edit)], **prompt(kind, 2), **GREEDY)
    finally:
        handle.remove()
    assert (seen[0] - seen[1]).norm() > 0.1 * seen[0].norm()  # the Q-Former saw the edited tokens
    assert max((a - b).abs().max().item() for a, b in zip(plain.scores, edited.scores)) > 1e-3
    hf_handle = source.vision_model.encoder.layers[1].register_forward_hook(lambda module, args, out: _edit(out))
    try:
        expected = source.generate(pixel_values=images, **prompt(kind, 2), **GREEDY)
    finally:
        hf_handle.remove()
    assert_same_generation(expected, edited)
    assert not blip.vision.hook_dict["blocks.1.hook_resid_post"].fwd_hooks  # the hook was temporary


def test_decoding_an_earlier_layer_equals_a_truncated_tower(case):
    kind, source, blip, images = case
    truncated = copy.deepcopy(source)
    truncated.vision_model.encoder.layers = truncated.vision_model.encoder.layers[:2]
    expected = truncated.generate(pixel_values=images, **prompt(kind, 2), **GREEDY)
    assert_same_generation(expected, blip.generate(images, layer=1, **prompt(kind, 2), **GREEDY))
    assert_same_generation(expected, blip.generate(images, layer=-2, **prompt(kind, 2), **GREEDY))
    with pytest.raises(ValueError, match=r"layer must be an int in \[-3, 2\]"):
        blip.generate(images, layer=3)


class _WordTokenizer:
    """Decodes id i as "w{i}", dropping the special ids 0, 1, 2 and the image token."""

    def batch_decode(self, ids, skip_special_tokens=True):
        special = {0, 1, 2, IMAGE_TOKEN} if skip_special_tokens else set()
        return [" ".join(f"w{i}" for i in row.tolist() if i not in special) for row in ids]


def test_caption_and_layer_decoding_through_the_captioner_decoder(case):
    kind, source, blip, images = case
    blip.tokenizer = _WordTokenizer()
    try:
        ids = source.generate(pixel_values=images, max_new_tokens=5, do_sample=False, **prompt(kind, 2))
        if kind != "blip2-t5":  # a decoder-only model returns its prompt first
            ids = ids[:, prompt(kind, 2)["input_ids"].shape[1] if prompt(kind, 2) else N_QUERY + 1 :]
        expected = _WordTokenizer().batch_decode(ids)
        assert blip.caption(images, max_new_tokens=5, **prompt(kind, 2)) == expected
        decoded = decode_layers(CaptionerDecoder(blip, max_new_tokens=5, **prompt(kind, 2)), images)
        assert decoded.layers == [0, 1, 2] and decoded.final() == expected
        assert decoded.texts[1] == blip.caption(images, layer=1, max_new_tokens=5, **prompt(kind, 2))
    finally:
        blip.tokenizer = None


def test_from_pretrained_loads_a_saved_checkpoint(tmp_path):
    source = build("blip2-opt")
    source.save_pretrained(tmp_path)
    blip = HookedBlip2.from_pretrained(str(tmp_path), processor=False)
    images = seeded_images(1, 32, 32, seed=4)
    assert_same_generation(source.generate(pixel_values=images, **GREEDY), blip.generate(images, **GREEDY))


def test_converter_reads_the_architecture_and_refuses_what_it_cannot_hold():
    source = build("blip2-opt")
    cfg, state_dict = convert_blip2_vision(source)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_mlp) == (32, 3, 4, 8, 64)
    assert cfg.patch_size == (8, 8) and cfg.eps == source.config.vision_config.layer_norm_eps
    assert not cfg.ln_pre and cfg.final_norm == "pre_pool" and cfg.d_proj is None and cfg.act_fn == "gelu"
    assert hooked_vit_from_blip2(source.vision_model).cfg == cfg
    source.vision_model.encoder.layers[0].mlp.activation_fn = torch.nn.Tanh()
    with pytest.raises(NotImplementedError, match="activation Tanh"):
        convert_blip2_vision(source)
    with pytest.raises(TypeError, match="Blip2ForConditionalGeneration"):
        convert_blip2_vision(torch.nn.Linear(2, 2))


def test_hooks_that_cannot_take_effect_are_refused(case):
    kind, _, blip, images = case
    with pytest.raises(ValueError, match="hook_pooled"):
        blip.generate(images, fwd_hooks=[("hook_pooled", lambda x, hook: x)], **prompt(kind, 2))
    with pytest.raises(NotImplementedError, match="interpolate_pos_encoding"):
        blip.generate(images, interpolate_pos_encoding=True, **prompt(kind, 2))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        blip.caption(images)
