"""experiments: the "Peeling Back the Layers" paper's layer-averaging curves (section 4.2, figure 2) and layer readout (section 4.3).

The curves are checked against the averaging hooks run by hand, against exact identities (the mean
of a one-image dataset changes nothing; averaging a block's output makes the output image-independent;
a block cannot change what an earlier block wrote), and on the toy CLIP against properties any trained
model has (the output variant, which erases the image, keeps less than the attention-input variant).
"""

import pytest
import torch
import torch.nn.functional as F

import vit_lens
from tests.conftest import FAMILIES, tiny_config
from vit_lens import HookedViT
from vit_lens import experiments as E
from vit_lens.intervene.interventions import average_attention_input, average_layer_output, average_residual_connection
from vit_lens.toy import ToyWorld, factor_prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def toy_clip():
    return vit_lens.load_toy_clip()


@pytest.fixture(scope="module")
def toy_batch():
    return ToyWorld(seed=11).sample(24)


def cosine(a, b):
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=-1)


# ------------------------------------------------------------------------------ layer averaging


@pytest.mark.parametrize("family", ["clip_like", "vit_like", "avg_pool_fc_norm"])
def test_the_mean_of_a_one_image_dataset_changes_nothing(family):
    model = HookedViT(tiny_config(**FAMILIES[family])).init_weights(seed=1).eval()
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    curves = E.layer_averaging(model, image, ranges=["0-2", [0, 2]])
    assert curves.labels == ["0", "1", "2", "0-2", "0,2"]
    assert curves.values.shape == (3, 5) and curves.per_image.shape == (3, 5, 1)
    torch.testing.assert_close(curves.values, torch.ones(3, 5, dtype=torch.float64), atol=1e-6, rtol=0)
    assert curves.baseline == pytest.approx(1.0)


def test_curves_are_the_averaging_hooks_run_by_hand(toy_clip, toy_batch):
    images = toy_batch.images
    means = E.averaging_statistics(toy_clip, images, batch_size=10)
    curves = E.layer_averaging(toy_clip, images, means=means, ranges=[range(1, 3)], batch_size=10)
    assert curves.labels == ["0", "1", "2", "3", "1-2"] and curves.n_images == 24
    with torch.no_grad():
        clean = toy_clip.encode_image(images)
        by_hand = {
            ("output", 2): average_layer_output(toy_clip, 2, means),
            ("attention_input", (1, 2)): average_attention_input(toy_clip, 1, means)
            + average_attention_input(toy_clip, 2, means),
            ("residual", 0): average_residual_connection(toy_clip, 0, means),
        }
        for (variant, layers), hooks in by_hand.items():
            expected = cosine(toy_clip.run_with_hooks(images, fwd_hooks=hooks), clean)
            row, column = curves.variants.index(variant), curves.conditions.index(
                layers if isinstance(layers, tuple) else (layers,))
            torch.testing.assert_close(curves.per_image[row, column], expected, atol=1e-6, rtol=0)
            assert curves.value(variant, layers) == pytest.approx(expected.mean().item(), abs=1e-6)
    # means=None computes the same statistics over the same images
    default = E.layer_averaging(toy_clip, images, ranges=[range(1, 3)], batch_size=10)
    torch.testing.assert_close(default.values, curves.values, atol=1e-6, rtol=0)
    layers, values = curves.curve("residual")
    assert layers == [0, 1, 2, 3] and torch.equal(values, curves.values[2, :4])
    assert (curves.values < 1 - 1e-3).all()  # every intervention on a trained model changes the embedding


def test_averaging_a_block_output_makes_the_output_image_independent(toy_clip, toy_batch):
    outputs = []

    def record(output, reference):
        outputs.append(output)
        return torch.zeros(len(output))

    E.layer_averaging(toy_clip, toy_batch.images, variants=["output"], layers=[1], metric=record)
    modified = outputs[1]  # the first call scores the unmodified output against itself
    torch.testing.assert_close(modified, modified[:1].expand_as(modified), atol=1e-5, rtol=1e-5)
    # so its accuracy is the share of the one class it predicts: at most the largest class's share
    labels = toy_batch.factors["colour"]
    classifier = toy_clip.encode_text(factor_prompts("colour"), normalize=True).T
    curves = E.layer_averaging(toy_clip, toy_batch.images, metric="accuracy", labels=labels, classifier=classifier)
    largest_share = labels.bincount().max().item() / len(labels)
    assert (curves.values[0] <= largest_share + 1e-9).all()
    with torch.no_grad():
        predicted = (toy_clip.encode_image(toy_batch.images, normalize=True) @ classifier).argmax(-1)
    assert curves.baseline == pytest.approx((predicted == labels).double().mean().item())


def test_a_block_cannot_change_what_earlier_blocks_wrote(toy_clip, toy_batch):
    means = E.averaging_statistics(toy_clip, toy_batch.images)
    early = E.layer_averaging(toy_clip, toy_batch.images, means=means, layers=[2, 3],
                              readout="blocks.1.hook_resid_post")
    torch.testing.assert_close(early.values, torch.ones_like(early.values), atol=1e-6, rtol=0)
    replaced = []
    E.layer_averaging(toy_clip, toy_batch.images, means=means, variants="output", layers=[1],
                      readout="blocks.1.hook_resid_post", metric=lambda out, ref: replaced.append(out) or 0.0)
    mean = means.mean("blocks.1.hook_resid_post").float()
    torch.testing.assert_close(replaced[1], mean.expand_as(replaced[1]), atol=1e-6, rtol=1e-6)


def test_toy_clip_keeps_more_when_only_the_attention_reads_the_average(toy_clip, toy_batch):
    curves = E.layer_averaging(toy_clip, toy_batch.images)
    output, attention_input = curves.values[0], curves.values[1]
    # "output" erases the image; "attention_input" keeps every image's own residual stream
    assert attention_input.mean() > output.mean()


def test_iterable_batches_with_labels_give_the_same_curves(toy_clip, toy_batch):
    labels = toy_batch.factors["texture"]
    classifier = toy_clip.encode_text(factor_prompts("texture"), normalize=True).T
    images = toy_batch.images
    from_tensor = E.layer_averaging(toy_clip, images, metric="accuracy", labels=labels, classifier=classifier,
                                    variants=["attention_input"], layers=[0, 3], batch_size=8)
    batches = [(images[i : i + 5], labels[i : i + 5]) for i in range(0, 24, 5)]
    from_batches = E.layer_averaging(toy_clip, batches, metric="accuracy", classifier=classifier,
                                     variants=["attention_input"], layers=[0, 3])
    torch.testing.assert_close(from_batches.values, from_tensor.values)
    assert from_batches.baseline == from_tensor.baseline and from_batches.n_images == 24


def test_classifier_models_score_their_own_logits():
    model = HookedViT(tiny_config(**FAMILIES["vit_like"])).init_weights(seed=5).eval()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        predicted = model(images).argmax(-1)
    curves = E.layer_averaging(model, images, metric="accuracy", labels=predicted, layers=[1])
    assert curves.baseline == 1.0  # labelled with its own predictions


def test_averaging_errors_say_what_to_pass(toy_clip, toy_batch):
    images = toy_batch.images[:4]
    with pytest.raises(ValueError, match="needs classifier="):
        E.layer_averaging(toy_clip, images, metric="accuracy", labels=torch.zeros(4, dtype=torch.long))
    classifier = torch.randn(64, 3)
    with pytest.raises(ValueError, match="needs labels="):
        E.layer_averaging(toy_clip, images, metric="accuracy", classifier=classifier, layers=[0])
    with pytest.raises(ValueError, match=r"classifier must be \[d_out=64, n_classes\]"):
        E.layer_averaging(toy_clip, images, metric="accuracy", classifier=torch.randn(3, 64))
    with pytest.raises(ValueError, match="cannot be used with readout="):
        E.layer_averaging(toy_clip, images, metric="accuracy", classifier=classifier, readout="hook_pooled")
    with pytest.raises(ValueError, match="readout must be 'output' or a hook name"):
        E.layer_averaging(toy_clip, images, readout="blocks.9.hook_resid_post")
    with pytest.raises(ValueError, match="variants must be"):
        E.layer_averaging(toy_clip, images, variants=["mlp"])
    with pytest.raises(ValueError, match="must look like '11-20'"):
        E.layer_averaging(toy_clip, images, ranges=["1..2"])
    with pytest.raises(ValueError, match=r"layer must be an int in \[-4, 3\]"):
        E.layer_averaging(toy_clip, images, layers=[4])
    with pytest.raises(ValueError, match="nothing to do"):
        E.layer_averaging(toy_clip, images, layers=[])
    with pytest.raises(TypeError, match="means must be a HookStatistics"):
        E.layer_averaging(toy_clip, images, means=torch.zeros(3))
    with pytest.raises(ValueError, match="one number per image"):
        E.layer_averaging(toy_clip, images, layers=[0], metric=lambda out, ref: torch.zeros(2))
    with pytest.raises(ValueError, match="labels has 3 entries for 4 images"):
        E.layer_averaging(toy_clip, images, metric="accuracy", classifier=classifier, labels=[0, 1, 2])


# ------------------------------------------------------------------------------ upper-layer contribution


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reading_out_the_last_layer_is_the_output(family, images):
    model = HookedViT(tiny_config(**FAMILIES[family])).init_weights(seed=2).eval()
    early = E.layer_readout(model, images)
    with torch.no_grad():
        output = model(images)
    assert early.shape == (2, 3, *output.shape[1:])
    torch.testing.assert_close(early[:, -1], output, atol=1e-6, rtol=1e-6)


def test_readout_applies_ln_post_and_the_projection_to_cls(toy_clip, toy_batch):
    images = toy_batch.images
    tower = toy_clip.vision
    early = E.layer_readout(toy_clip, images, layers=[0, -2])
    with torch.no_grad():
        _, cache = toy_clip.run_with_cache(images)
    for i, layer in enumerate([0, 2]):
        cls = cache["resid_post", layer][:, 0]
        expected = F.layer_norm(cls, (128,), tower.ln_final.w, tower.ln_final.b, tower.cfg.eps) @ tower.W_proj
        torch.testing.assert_close(early[:, i], expected, atol=1e-5, rtol=1e-5)
    curve = E.upper_layer_contribution(toy_clip, images, batch_size=10)
    assert curve.layers == [0, 1, 2, 3] and curve.final == pytest.approx(1.0)
    assert curve.values[-1].item() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        output, every_layer = toy_clip.encode_image(images), E.layer_readout(toy_clip, images)
    expected = torch.stack([cosine(every_layer[:, layer], output) for layer in range(4)])
    torch.testing.assert_close(curve.per_image, expected, atol=1e-6, rtol=0)


def test_position_is_read_better_at_the_end_than_after_one_layer(toy_clip):
    batch = ToyWorld(seed=12).sample(48)
    classifier = toy_clip.encode_text(factor_prompts("position"), normalize=True).T
    curve = E.upper_layer_contribution(toy_clip, batch.images, metric="accuracy", labels=batch.factors["position"],
                                       classifier=classifier)
    # where the objects are needs attention across patches: the readout after one block does not have it yet
    assert curve.values[-1] >= curve.values[0]
    assert curve.values[-1].item() == pytest.approx(curve.final)
    assert "layer" in curve.table() and list(curve.to_pandas().index) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------ results and figures


def test_tables_frames_and_figures(toy_clip, toy_batch):
    curves = E.layer_averaging(toy_clip, toy_batch.images[:8], ranges=["2-3"])
    frame = curves.to_pandas()
    assert list(frame.columns) == list(E.VARIANTS) and list(frame.index) == ["0", "1", "2", "3", "2-3"]
    assert frame.loc["2-3", "residual"] == pytest.approx(curves.value("residual", [2, 3]))
    table = curves.table()
    assert table.splitlines()[0].startswith("cosine (unmodified: 1.0000, 8 images)") and len(table.splitlines()) == 7
    fig = E.plot_averaging_curves(curves)
    names = [trace.name for trace in fig.data]
    assert names[:2] == ["output", "output, layers 2-3 together"] and len(names) == 6
    assert list(fig.data[1].x) == [2, 3]
    with pytest.raises(KeyError, match="no condition"):
        curves.value("output", [0, 1])
    with pytest.raises(KeyError, match="was not run"):
        curves.curve("mlp")
    readout = E.upper_layer_contribution(toy_clip, toy_batch.images[:8], layers=[1, 3])
    fig = E.plot_readout_curve(readout)
    assert list(fig.data[0].x) == [1, 3]
