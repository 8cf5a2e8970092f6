"""The planted classifier's design, training and measurements, checked without the trained weights.

(The trained model's checks — task accuracy, interchange accuracy and inertness on fresh images — come
with its weights, which are not shipped yet: see issue 14.)
"""

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
    with pytest.raises(ValueError, match=r"'clip'.*\['classifier'\]"):
        load_planted("clip")
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
