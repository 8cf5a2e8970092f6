"""The planted models' design, training and measurements, checked without the trained weights
(the shipped models' thresholds are in tests/test_planted_model.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch

import vit_lens
from vit_lens.planted import (
    CLASSIFIER_HEADS,
    PlantedModel,
    inertness,
    interchange_accuracy,
    load_planted,
)
from vit_lens.planted.model import CLASSIFIER_CONFIG, build_classifier
from vit_lens.planted.truth import (
    CLASSIFIER_INERT_MLPS,
    CLS,
    TOKEN_GROUPS,
    heads_by_factor,
    inert_heads,
)
from vit_lens.planted.verify import differing_scene
from vit_lens.toy import FACTORS, ToyWorld

SEED = 424_242


@pytest.fixture(scope="module")
def untrained() -> PlantedModel:
    """The planted architecture and truth with random weights: the measurements must find nothing there."""
    torch.set_num_threads(1)
    return PlantedModel(build_classifier(seed=3).eval(), heads_by_factor(), inert_heads(), list(CLASSIFIER_INERT_MLPS))


def test_the_truth_is_consistent():
    cfg = CLASSIFIER_CONFIG
    heads, inert = heads_by_factor(), inert_heads()
    assert set(heads) == set(FACTORS)
    all_planted = [head for factor_heads in heads.values() for head in factor_heads]
    assert len(all_planted) == len(set(all_planted)), "a head carries two factors"
    for layer, head in all_planted + inert:
        assert 0 <= layer < cfg["n_layers"] and 0 <= head < cfg["n_heads"]
    assert not set(all_planted) & set(inert)
    assert len(all_planted) + len(inert) == cfg["n_layers"] * cfg["n_heads"]
    assert len(inert) >= 4 and len(CLASSIFIER_INERT_MLPS) >= 1
    assert all(0 <= layer < cfg["n_layers"] for layer in CLASSIFIER_INERT_MLPS)
    assert len({layer for layer, _ in all_planted}) == cfg["n_layers"], "the factors spread over every layer"
    assert all(h.reads in TOKEN_GROUPS for h in CLASSIFIER_HEADS)
    two_hop = [f for f, factor_heads in heads.items() if len(factor_heads) == 2]
    assert two_hop == ["position"]
    first, second = (h for h in CLASSIFIER_HEADS if h.factor == "position")
    assert first.writes == "patches" and second.writes == CLS and first.layer < second.layer


def test_unknown_names_and_foreign_files_are_refused_with_what_works():
    with pytest.raises(ValueError, match=r"'vit'.*\['classifier', 'clip'\]"):
        load_planted("vit")
    toy = Path(vit_lens.toy.__file__).parent / "toy_clip.safetensors"
    with pytest.raises(ValueError, match="not a planted classifier checkpoint"):
        load_planted("classifier", path=toy)


@pytest.mark.parametrize("factor", list(FACTORS))
def test_differing_scene_changes_that_factor_alone(factor):
    world, rng = ToyWorld(seed=SEED), np.random.default_rng(SEED)
    for scene in world.sample_scenes(20, seed=SEED):
        other = differing_scene(world, scene, factor, rng)
        changed = {name for name in FACTORS if getattr(other, name) != getattr(scene, name)}
        assert changed == {factor}


def test_the_measurements_find_nothing_in_an_untrained_model(untrained):
    # The same architecture and truth with random weights: interchange fails and "inert" heads move
    # predictions, so the thresholds the trained model is held to are not met by construction.
    assert interchange_accuracy(untrained, "colour", n=128, seed=SEED) < 0.5
    assert max(inertness(untrained, n=128, seed=SEED).values()) > 0.02


def test_measurements_refuse_unknown_factors_and_empty_head_lists(untrained):
    with pytest.raises(ValueError, match="unknown factor 'hue'"):
        interchange_accuracy(untrained, "hue", n=4)
    with pytest.raises(ValueError, match="heads is empty"):
        interchange_accuracy(untrained, "colour", n=4, heads=[])


def test_training_is_seeded_and_reproducible():
    from vit_lens.planted.train import train

    first, _ = train(steps=2, batch_size=8, lr=1e-3, seed=5, warmup=1, threads=1, log_every=100, eval_every=0)
    second, _ = train(steps=2, batch_size=8, lr=1e-3, seed=5, warmup=1, threads=1, log_every=100, eval_every=0)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_missing_checkpoint_names_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file.*python -m vit_lens.planted.train"):
        load_planted("classifier", path=tmp_path / "absent.safetensors")


def test_a_classifier_file_is_not_loaded_as_a_clip_and_back(tmp_path, untrained):
    from vit_lens.planted.clip import build_planted_clip, save_planted_clip
    from vit_lens.planted.model import save_classifier

    save_classifier(untrained.model, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"holds a planted classifier; load it with load_planted\('classifier'"):
        load_planted("clip", path=tmp_path / "c.safetensors")
    save_planted_clip(build_planted_clip(untrained.model), tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match=r"holds a planted CLIP; load it with load_planted\('clip'"):
        load_planted("classifier", path=tmp_path / "p.safetensors")
    loaded = load_planted("clip", path=tmp_path / "p.safetensors")
    assert isinstance(loaded.model, vit_lens.HookedCLIP) and loaded.heads == untrained.heads


def test_the_clip_image_tower_is_the_classifier_and_value_prompts_predict_what_it_predicts(untrained):
    from vit_lens.planted.clip import PlantedCLIP, build_planted_clip, value_directions
    from vit_lens.planted.model import factor_slices

    clip = build_planted_clip(untrained.model).eval()
    images = ToyWorld(seed=SEED).sample(64, seed=SEED).images
    with torch.no_grad():
        assert torch.equal(clip.encode_image(images), untrained.model(images))
    planted = PlantedCLIP(clip, untrained.heads, untrained.inert_heads, untrained.inert_mlps)
    # A text tower that puts each prompt exactly on its value's direction: zero-shot is then the classifier's
    # argmax within every factor (the claim of vit_lens.planted.clip), even for a random image tower.
    directions = torch.nn.functional.normalize(value_directions(), dim=-1)
    planted._prompts.update({name: directions[s] for name, s in factor_slices().items()})
    ours, theirs = planted.predict(images), untrained.predict(images)
    for name in FACTORS:
        assert torch.equal(ours[name], theirs[name]), name
    # ...and a text tower that does not (random rows) disagrees somewhere: the check can fail.
    planted._prompts.update({name: torch.randn(len(FACTORS[name]), 23) for name in FACTORS})
    assert any(not torch.equal(planted.predict(images)[n], theirs[n]) for n in FACTORS)


def test_text_targets_sum_the_mentioned_values_directions():
    from vit_lens.planted.clip import text_targets, value_directions
    from vit_lens.planted.model import factor_slices

    directions, slices = value_directions(), factor_slices()
    red = slices["colour"].start + FACTORS["colour"].index("red")
    circle = slices["shape"].start + FACTORS["shape"].index("circle")
    # Each direction sums to zero within its factor: a factor's constant offset is in no text.
    assert torch.allclose(directions[red, slices["colour"]].sum(), torch.tensor(0.0), atol=1e-6)
    single, pair, plural = text_targets(["red object", "red circle", "two red circles"])
    assert torch.allclose(single, directions[red] / directions[red].norm())
    expected = directions[red] + directions[circle]
    assert torch.allclose(pair, expected / expected.norm())
    assert plural[slices["count"]].argmax() == FACTORS["count"].index("two")
    with pytest.raises(ValueError, match="mentions no value"):
        text_targets(["object"])
