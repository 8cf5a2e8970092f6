"""Layer decoding ("Peeling Back the Layers", Sec. 3.5): the CLIP lens on the toy CLIP, ΔS^l, convergence layers, pruning evaluation."""

import pytest
import torch
import torch.nn.functional as F

import vit_lens
from tests.conftest import assert_rel_close
from vit_lens.methods.layers.decoding import (
    CaptionerDecoder,
    CLIPLens,
    LayerDescriptions,
    convergence_layer,
    convergence_layers,
    decode_layers,
    delta_s,
    description_scorer,
    evaluate_pruning,
    plot_layer_descriptions,
)
from vit_lens.intervene.decompose import direct_contributions
from vit_lens.intervene.pruning import prune_heads
from vit_lens.methods.layers.text_metrics import exact_match, rouge_l
from vit_lens.toy import ToyWorld, description_pool, factor_prompts


@pytest.fixture(scope="module")
def clip(one_thread):
    return vit_lens.load_toy_clip()


@pytest.fixture(scope="module")
def batch():
    return ToyWorld(seed=5).sample(24)


@pytest.fixture(scope="module")
def pool():
    return description_pool(1)[0]


@pytest.fixture(scope="module")
def lenses(clip, pool):
    embeddings = clip.encode_text(pool, normalize=True)
    return {mode: CLIPLens(clip, pool, text_embeddings=embeddings, mode=mode, k=3) for mode in ("intermediate", "accumulated")}


# ---------------------------------------------------------------------------------------------- CLIP lens


def test_intermediate_lens_at_the_last_layer_is_the_models_retrieval(clip, batch, pool, lenses):
    lens = lenses["intermediate"]
    with torch.no_grad():
        embedding = clip.encode_image(batch.images)
        expected = (F.normalize(embedding, dim=-1) @ clip.encode_text(pool, normalize=True).T).topk(3, dim=-1)
    assert torch.equal(lens.embed_layers(batch.images, [-1])[0], embedding)
    decoded = decode_layers(lens, batch.images, layers=[-1])
    assert torch.equal(decoded.indices[0], expected.indices)
    torch.testing.assert_close(decoded.scores[0], expected.values, rtol=0, atol=1e-6)
    assert decoded.texts[0] == [pool[i] for i in expected.indices[:, 0].tolist()]
    assert decoded.candidates[0][3] == [pool[i] for i in expected.indices[3].tolist()]


def test_intermediate_lens_applies_the_final_layernorm_and_projection_to_each_layer(clip, batch, lenses):
    vision = clip.vision
    _, cache = vision.run_with_cache(batch.images)
    lens = lenses["intermediate"].embed_layers(batch.images)
    for layer in range(vision.cfg.n_layers):
        cls = cache["resid_post", layer][:, 0].double()
        centred = cls - cls.mean(-1, keepdim=True)
        normed = centred / (centred.pow(2).mean(-1, keepdim=True) + vision.cfg.eps).sqrt()
        expected = (normed * vision.ln_final.w.double() + vision.ln_final.b.double()) @ vision.W_proj.double()
        assert_rel_close(lens[layer], expected, rtol=1e-5, what=f"layer {layer}")


@pytest.mark.parametrize("ln_mode", ["center_each", "paper"])
def test_accumulated_lens_sums_to_the_embedding_at_the_last_layer(clip, batch, pool, ln_mode):
    lens = CLIPLens(clip, pool, mode="accumulated", ln_mode=ln_mode)
    with torch.no_grad():
        assert_rel_close(lens.embed_layers(batch.images, [-1])[0], clip.encode_image(batch.images), rtol=1e-5)


def test_accumulated_lens_is_the_partial_residual_under_the_final_scale(clip, batch, lenses):
    # center_each: sum of the embedding and blocks 0..l at CLS is resid_post_l[CLS]; the readout fixes the final
    # LayerNorm's scale of the whole image, so the lens is centre(resid_l) / sigma_final * w P + b P.
    vision = clip.vision
    _, cache = vision.run_with_cache(batch.images)
    sigma = cache["ln_final.hook_scale"][:, 0].double()  # [batch, 1]
    lens = lenses["accumulated"].embed_layers(batch.images)
    for layer in range(vision.cfg.n_layers):
        cls = cache["resid_post", layer][:, 0].double()
        partial = (cls - cls.mean(-1, keepdim=True)) / sigma * vision.ln_final.w.double() + vision.ln_final.b.double()
        assert_rel_close(lens[layer], partial @ vision.W_proj.double(), rtol=1e-5, what=f"layer {layer}")


def test_the_two_modes_differ_before_the_last_layer(batch, lenses):
    early = [lenses[mode].embed_layers(batch.images, [0])[0] for mode in ("intermediate", "accumulated")]
    assert (early[0] - early[1]).norm() > 0.05 * early[0].norm()


def test_toy_model_reads_colour_at_the_last_layer(clip, batch):
    # The toy CLIP reads colour well (its model card and factor_accuracy); the lens at the last layer is its readout.
    colours = factor_prompts("colour")
    decoded = decode_layers(CLIPLens(clip, colours), batch.images, layers=[-1])
    truth = [colours[i] for i in batch.factors["colour"].tolist()]
    accuracy = sum(a == b for a, b in zip(decoded.final(), truth)) / len(truth)
    assert accuracy >= 0.8


def test_batching_and_layer_selection_do_not_change_the_result(batch, lenses):
    lens = lenses["accumulated"]
    whole = decode_layers(lens, batch.images)
    chunked = decode_layers(lens, batch.images, batch_size=5)
    assert chunked.texts == whole.texts and chunked.candidates == whole.candidates
    assert torch.equal(chunked.indices, whole.indices)
    some = decode_layers(lens, batch.images, layers=[-1, 1])
    assert some.layers == [1, 3] and some.texts == [whole.texts[1], whole.texts[3]]
    assert len(whole.to_rows()) == 4 * len(batch) and whole.to_rows()[0]["score"] == pytest.approx(float(whole.scores[0, 0, 0]))


def test_hooks_reach_the_lens(batch, lenses):
    lens = lenses["intermediate"]
    zero = [("blocks.3.hook_mlp_out", lambda x, hook: torch.zeros_like(x))]
    plain, edited = lens.embed_layers(batch.images, [3]), lens.embed_layers(batch.images, [3], zero)
    torch.testing.assert_close(lens.embed_layers(batch.images, [2]), lens.embed_layers(batch.images, [2], zero))
    assert (plain - edited).norm() > 1e-3 * plain.norm()


def test_lens_argument_errors(clip, pool, tiny_model):
    with pytest.raises(TypeError, match="HookedCLIP"):
        CLIPLens(tiny_model, pool)
    with pytest.raises(ValueError, match="mode must be one of"):
        CLIPLens(clip, pool, mode="logit")
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 23\]"):
        CLIPLens(clip, pool, k=24)
    with pytest.raises(ValueError, match=r"text_embeddings must be \[23, 64\]"):
        CLIPLens(clip, pool, text_embeddings=torch.zeros(3, 64))
    lens = CLIPLens(clip, pool)
    with pytest.raises(ValueError, match=r"layers \[4\] out of range"):
        decode_layers(lens, torch.zeros(1, 3, 64, 64), layers=[4])
    with pytest.raises(TypeError, match="decoder must have"):
        decode_layers(object(), torch.zeros(1, 3, 64, 64))


# ---------------------------------------------------------------------------------------------- ΔS and convergence


def test_convergence_layer_on_constructed_sequences():
    assert convergence_layer(["a", "a", "a"]) == 0
    assert convergence_layer(["a", "b", "c"]) == 2
    assert convergence_layer(["x", "y", "x", "x"]) == 2  # an early match that does not stay is not convergence
    assert convergence_layer(["y", "x", "y", "x", "x"]) == 3
    assert convergence_layer(["b", "a ", "a"], layers=[10, 20, 30]) == 20  # whitespace is ignored; layer numbers
    # with a metric: ROUGE-L("red square", "red object") = 0.5, ROUGE-L("sky", "red object") = 0
    seq = ["sky", "red square", "red object on the left", "red object"]
    assert convergence_layer(seq) == 3
    assert convergence_layer(seq, metric="rouge_l", threshold=0.5) == 1
    assert convergence_layer(seq, metric="rouge_l", threshold=0.9) == 3


def test_convergence_layers_per_image_match_the_single_sequence_function():
    texts = [["sky", "red", "x"], ["red", "red", "x"], ["red", "blue", "x"], ["red", "blue", "x"]]  # [layer][image]
    descriptions = LayerDescriptions(texts, [2, 5, 7, 9])
    expected = [convergence_layer([row[n] for row in texts], [2, 5, 7, 9]) for n in range(3)]
    assert convergence_layers(descriptions).tolist() == expected == [5, 7, 2]
    assert descriptions.convergence_layers(metric="exact").tolist() == expected


def test_delta_s_compares_each_layer_with_the_previous_one():
    texts = [["red object", "sky"], ["red object", "red object"], ["red object on the left", "red object"]]
    delta = delta_s(texts, "rouge_l")
    assert delta.shape == (2, 2) and delta.dtype == torch.float64
    # rows: (layer 1 vs 0), (layer 2 vs 1); ROUGE-L("red object on the left", "red object") = 2 * (2/5 * 1) / (2/5 + 1)
    expected = torch.tensor([[1.0, 0.0], [2 * 0.4 / 1.4, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(delta, expected)
    calls = []

    def record(candidates, references):
        calls.append((list(candidates), list(references)))
        return exact_match(candidates, references)

    delta_s(texts, record)
    assert calls[0] == (texts[1], texts[0]) and calls[1] == (texts[2], texts[1])  # candidate: the later layer


def test_delta_s_of_decoded_layers(batch, lenses):
    decoded = decode_layers(lenses["intermediate"], batch.images)
    delta = decoded.delta("exact")
    same = torch.tensor([[a == b for a, b in zip(decoded.texts[i + 1], decoded.texts[i])] for i in range(3)])
    torch.testing.assert_close(delta, same.double())
    # an image whose description never changes back after its convergence layer
    conv = decoded.convergence_layers()
    for n in range(len(batch)):
        sequence = decoded.for_image(n)
        layer = int(conv[n])
        assert all(text == sequence[-1] for text in sequence[layer:])
        assert layer == 0 or sequence[layer - 1] != sequence[-1]


def test_descriptions_errors():
    with pytest.raises(ValueError, match=r"\[layer\]\[image\]"):
        delta_s([["a", "b"], ["a"]])
    with pytest.raises(ValueError, match="2 descriptions but 3 layer numbers"):
        convergence_layer(["a", "b"], layers=[0, 1, 2])


# ---------------------------------------------------------------------------------------------- pruning


def test_evaluating_an_all_ones_mask_changes_nothing(clip, batch, lenses):
    result = evaluate_pruning(lenses["intermediate"], batch.images, torch.ones(4, 4), batch.captions, output_metric="cider")
    assert result.after.texts == result.before.texts
    assert torch.equal(result.convergence_after, result.convergence_before)
    assert torch.equal(result.output_after, result.output_before)


def test_evaluate_pruning_equals_decoding_under_the_pruning_hooks(clip, batch, pool, lenses):
    lens = lenses["intermediate"]
    sample = ToyWorld(seed=11).sample(8).images
    pruning = prune_heads(clip, sample, layers=[2, 3], n_prune=2)
    references = [pool[i % len(pool)] for i in range(len(batch))]
    result = evaluate_pruning(lens, batch.images, pruning, references, output_metric="rouge_l")
    manual = decode_layers(lens, batch.images, fwd_hooks=pruning.hooks())
    assert result.after.texts == manual.texts and torch.equal(result.after.scores, manual.scores)
    assert not torch.equal(result.after.scores, result.before.scores)  # two of four heads gone in two layers
    torch.testing.assert_close(result.output_after, rouge_l(manual.final(), references))
    torch.testing.assert_close(result.convergence_after, convergence_layers(manual))
    summary = result.summary()
    assert summary["convergence_after"] == pytest.approx(convergence_layers(manual).double().mean().item())
    assert summary["output_before"] == pytest.approx(result.output_before.mean().item())
    assert "+ head pruning" in result.report() and "rouge_l" in result.report()
    same_as_mask = evaluate_pruning(lens, batch.images, pruning.coefficients)
    assert same_as_mask.after.texts == result.after.texts and same_as_mask.output_after is None


def test_description_scorer_scores_decoded_heads_against_the_decoded_layer(clip, batch, lenses):
    lens = lenses["intermediate"]
    scorer = description_scorer(lens, "exact")
    images = batch.images[:6]
    _, cache = clip.vision.run_with_cache(images)
    heads = direct_contributions(clip.vision, cache, level="head", layers=[3]).heads()[:, 0]  # [batch, head, d]
    scores = scorer(heads, heads.sum(1))
    combined = lens.describe(heads.sum(1))
    for b in range(len(images)):
        own = lens.describe(heads[b])
        assert scores[b].tolist() == [float(text == combined[b]) for text in own]
    pruning = prune_heads(clip, images, layers=[3], n_prune=1, scorer=scorer)
    assert ((pruning.scores[3] >= 0) & (pruning.scores[3] <= 1)).all()


# ---------------------------------------------------------------------------------------------- captioners, figures


class _FakeCaptioner:
    """Describes each image by the layer asked for and whether hooks were passed."""

    n_layers = 3

    def __init__(self):
        self.calls = []

    def caption(self, images, layer, fwd_hooks, **kwargs):
        self.calls.append((layer, fwd_hooks, kwargs))
        return [f"layer {layer} image {i}{' hooked' if fwd_hooks else ''}" for i in range(len(images))]


def test_captioner_decoder_asks_for_every_layer_and_passes_hooks():
    captioner = _FakeCaptioner()
    hooks = [("blocks.0.hook_resid_post", lambda x, hook: x)]
    decoded = decode_layers(CaptionerDecoder(captioner, max_new_tokens=5), torch.zeros(2, 3, 8, 8), [-1, 0], fwd_hooks=hooks)
    assert decoded.layers == [0, 2] and decoded.texts[1] == ["layer 2 image 0 hooked", "layer 2 image 1 hooked"]
    assert [c[0] for c in captioner.calls] == [0, 2] and captioner.calls[0][1] is hooks
    assert captioner.calls[0][2] == {"max_new_tokens": 5}
    with pytest.raises(TypeError, match="caption"):
        CaptionerDecoder(object())


def test_figures(batch, lenses):
    decoded = decode_layers(lenses["intermediate"], batch.images)
    one = plot_layer_descriptions(decoded, metric="exact", image=2)
    trace = one.data[0]
    assert list(trace.text) == decoded.for_image(2) and list(trace.x) == decoded.layers
    assert list(trace.y[1:]) == delta_s(decoded, "exact")[:, 2].tolist()
    assert one.layout.shapes[0].x0 == float(decoded.convergence_layers()[2])
    mean = decoded.figure(metric="exact")
    assert list(mean.data[0].y) == pytest.approx(delta_s(decoded, "exact").mean(1).tolist())
    assert mean.layout.shapes[0].x0 == pytest.approx(decoded.convergence_layers().double().mean().item())
    result = evaluate_pruning(lenses["intermediate"], batch.images, torch.ones(4, 4))
    histogram = result.figure()
    assert [t.name for t in histogram.data] == ["model", "pruned"] and list(histogram.data[0].x) == result.convergence_before.tolist()
    with pytest.raises(ValueError, match="image must be in"):
        plot_layer_descriptions(decoded, image=len(batch))
