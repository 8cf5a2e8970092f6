"""The toy world: deterministic scenes whose images, masks and captions agree with their factors."""

import numpy as np
import pytest
import torch

from vit_lens.toy import FACTORS, ToyWorld, caption, factor_prompts
from vit_lens.toy.text import VOCABULARY, ToyTokenizer
from vit_lens.toy.train import multi_positive_loss, positives, sample_captions
from vit_lens.toy.world import COLOURS


@pytest.fixture(scope="module")
def batch():
    return ToyWorld(seed=7).sample(300)


def test_same_seed_same_images_and_different_seed_different_images():
    a, b = ToyWorld(seed=1).sample(16), ToyWorld(seed=1).sample(16)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and a.captions == b.captions
    c = ToyWorld(seed=2).sample(16)
    assert not torch.equal(a.images, c.images)
    assert torch.equal(ToyWorld(seed=0).sample(4, seed=5).images, ToyWorld(seed=9).sample(4, seed=5).images)


def test_images_are_in_range_and_factors_cover_every_value(batch):
    assert batch.images.shape == (300, 3, 64, 64) and batch.images.dtype == torch.float32
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    for name, values in FACTORS.items():
        assert set(batch.factors[name].tolist()) == set(range(len(values))), name


def test_masks_count_objects_and_carry_the_object_colour(batch):
    present = batch.masks.flatten(2).any(-1)  # [n, 3]
    assert torch.equal(present.sum(1), batch.factors["count"] + 1)
    for i in range(0, 300, 37):
        rgb = torch.tensor(COLOURS[FACTORS["colour"][batch.factors["colour"][i]]])
        pixels = batch.images[i].permute(1, 2, 0)[batch.foreground[i]]  # [n_pixels, 3]
        assert (pixels - rgb).abs().max() < 0.12  # the colour plus the pixel noise (std 0.02)
    # objects never overlap, so the masks are disjoint and their sizes follow the size factor
    assert batch.masks.sum(1).max() <= 1
    area = batch.masks.flatten(2).sum(-1).float()  # [n, 3]
    per_object = area.sum(1) / present.sum(1)
    small, large = per_object[batch.factors["size"] == 0], per_object[batch.factors["size"] == 1]
    assert small.max() < large.min()


def test_objects_lie_in_the_captioned_region(batch):
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    for i in range(300):
        position = FACTORS["position"][batch.factors["position"][i]]
        for mask in batch.masks[i][batch.masks[i].flatten(1).any(1)]:
            u = (xs[mask].mean() - 31.5).item()
            v = (ys[mask].mean() - 31.5).item()
            expected = {"left": -u > abs(v), "right": u > abs(v), "top": -v > abs(u), "bottom": v > abs(u)}[position]
            assert expected, (i, position, u, v)


def test_captions_follow_the_grammar():
    scene = {"shape": "cross", "colour": "blue", "size": "large", "position": "top", "count": "three", "texture": "dotted"}
    assert caption(scene) == "three large blue crosses on the top, dotted background"
    assert caption(scene, include=["shape", "count"]) == "three crosses"
    assert caption(scene, include=["position"]) == "object on the top"
    assert caption(scene, include=["texture"]) == "dotted background"
    assert factor_prompts("count") == ["one object", "two objects", "three objects"]
    assert factor_prompts("colour")[0] == "red object"
    with pytest.raises(ValueError, match="unknown factor 'hue'"):
        caption(scene, include=["hue"])
    with pytest.raises(ValueError, match="'pink' is not a value of colour"):
        ToyWorld().sample(1, colour="pink")


def test_fixed_factors_and_scene_edits():
    world = ToyWorld(seed=3)
    batch = world.sample(12, shape="triangle", texture="plain")
    assert set(batch.factors["shape"].tolist()) == {2} and set(batch.factors["texture"].tolist()) == {0}
    scene = batch.scenes[0]
    repainted = world.render([scene, scene.with_object_colour(0, "green")])
    changed = (repainted.images[0] - repainted.images[1]).abs().sum(0) > 0
    assert torch.equal(changed, repainted.masks[0, 0])  # only the repainted object's pixels differ
    other = world.render([scene.with_factors(shape="circle")])
    assert other.factors["shape"].item() == 0 and other.captions[0].split()[3] in ("circle", "circles")


def test_tokenizer_round_trip_and_unknown_words():
    tokens = ToyTokenizer()(["two red circles on the left, plain background"])
    words = [VOCABULARY[t] for t in tokens[0] if t != 0]
    assert words == ["<sot>", "two", "red", "circles", "on", "the", "left", ",", "plain", "background", "<eot>"]
    with pytest.raises(ValueError, match=r"does not know the word\(s\) \['dog'\]"):
        ToyTokenizer()(["a red dog"])


def test_contrastive_targets_count_every_consistent_pair():
    factors = {"colour": torch.tensor([0, 0, 1]), "shape": torch.tensor([2, 3, 2])}
    included = torch.tensor([[True, False], [True, True], [False, True]])  # "colour 0", "colour 0 shape 3", "shape 2"
    expected = torch.tensor([[True, False, True], [True, True, False], [False, False, True]])
    assert torch.equal(positives(factors, included), expected)
    logits = torch.randn(3, 3)
    # with one positive per row and column the loss is CLIP's symmetric cross-entropy
    eye = torch.eye(3, dtype=torch.bool)
    clip_loss = (torch.nn.functional.cross_entropy(logits, torch.arange(3)) + torch.nn.functional.cross_entropy(logits.T, torch.arange(3))) / 2
    torch.testing.assert_close(multi_positive_loss(logits, eye), clip_loss)
    captions, included = sample_captions(ToyWorld(seed=0).sample(64), np.random.default_rng(0))
    assert included.any(1).all() and len(set(captions)) > 30
