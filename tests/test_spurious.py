"""Spurious-cue removal: group accuracies by hand, and a planted cue whose head ablation lifts the worst group."""

import pytest
import torch

from tests.conftest import tiny_config
from vit_lens import HookedViT
from vit_lens.intervene.decompose import direct_contributions, direct_effect_mean_ablation
from vit_lens.methods.textspan.spurious import (
    extra_ablation_mask,
    group_accuracy,
    mean_ablate_components,
    mean_ablation_predictions,
    paper_waterbirds_heads,
    random_heads_baseline,
    spurious_cue_removal,
)
from vit_lens.intervene.store import compute_contributions_to_disk

NAMES = ("landbird on land", "landbird on water", "waterbird on land", "waterbird on water")
LABELS = ["embed", "L0H0", "L0MLP", "L1H0", "L1H1", "L1MLP"]


def test_group_accuracy_matches_a_hand_count():
    predictions = torch.tensor([0, 0, 1, 0, 1, 1, 1, 0, 0])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1, 1])
    groups = torch.tensor([0, 0, 0, 3, 3, 3, 1, 2, 2])
    acc = group_accuracy(predictions, labels, groups, group_names=NAMES)
    # group 0: 2 of 3; group 1: 0 of 1; group 2: 0 of 2; group 3: 2 of 3
    assert acc.per_group == pytest.approx({NAMES[0]: 2 / 3, NAMES[1]: 0.0, NAMES[2]: 0.0, NAMES[3]: 2 / 3})
    assert acc.counts == {NAMES[0]: 3, NAMES[1]: 1, NAMES[2]: 2, NAMES[3]: 3}
    assert acc.worst_group == 0.0 and acc.worst_group_name == NAMES[1]  # first of the tied groups
    assert acc.average == pytest.approx(4 / 9)
    assert acc.group_mean == pytest.approx((2 / 3 + 2 / 3) / 4)
    scores = torch.nn.functional.one_hot(predictions, 2).float() * 3 - 1  # argmax gives the same predictions
    assert group_accuracy(scores, labels.tolist(), groups).per_group == pytest.approx({0: 2 / 3, 1: 0.0, 2: 0.0, 3: 2 / 3})
    with pytest.raises(ValueError, match="one length"):
        group_accuracy(predictions[:-1], labels, groups)


def planted_waterbirds():
    """24 + 4 images; class signal in L1H0, the background cue in L1H1 (1.2) and L0H0 (0.3).

    Groups (2y + place) of sizes 12, 4, 4, 8; in every group the class signal strength cycles
    through 0.1, 0.6, 1.1, 1.6 along e_y. The classifier is the identity: score c = coordinate c.
    """
    sizes, strengths = (12, 4, 4, 8), torch.tensor([0.1, 0.6, 1.1, 1.6])
    groups = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    y, place = groups // 2, groups % 2
    s = strengths.repeat(len(groups) // 4)
    values = torch.zeros(len(groups), len(LABELS), 2)
    values[torch.arange(len(groups)), 3, y] = s  # L1H0: the bird
    values[torch.arange(len(groups)), 4, place] = 1.2  # L1H1: the background
    values[torch.arange(len(groups)), 1, place] = 0.3  # L0H0: a weaker background cue in an early layer
    values[:, 0] = torch.tensor([0.05, 0.05])  # embed and MLPs: constant, harmless
    values[:, 2] = values[:, 5] = torch.tensor([0.02, 0.02])
    return values, y, groups


def test_ablating_the_cue_head_lifts_the_worst_group_to_the_hand_computed_numbers():
    values, y, groups = planted_waterbirds()
    result = spurious_cue_removal(values, torch.eye(2), y, groups, "L1H1", component_labels=LABELS, group_names=NAMES)
    # before: cue 1.5 against the bird on conflicting backgrounds, only strength 1.6 wins
    assert list(result.before.per_group.values()) == pytest.approx([1.0, 0.25, 0.25, 1.0])
    assert result.before.worst_group == 0.25 and result.before.average == pytest.approx(22 / 28)
    # after: L1H1 -> its mean 1.2 * (16, 12) / 28; the 0.3 cue of L0H0 remains per image.
    # landbird on water wins iff s + 0.686 > 0.3 + 0.514; waterbird on land iff s + 0.514 > 0.3 + 0.686
    assert list(result.after.per_group.values()) == pytest.approx([1.0, 0.75, 0.75, 1.0])
    assert result.after.worst_group == 0.75 and result.after.average == pytest.approx(26 / 28)
    assert result.extra_only is None and result.heads == result.ablated == ["L1H1"]


def test_paper_extra_ablations_remove_the_early_cue_too():
    values, y, groups = planted_waterbirds()
    result = spurious_cue_removal(values, torch.eye(2), y, groups, [(1, 1)], extra="paper", n_late_layers=1,
                                  component_labels=LABELS)
    assert result.ablated == ["embed", "L0H0", "L0MLP", "L1H1", "L1MLP"]
    # extra only (embed, L0H0, MLPs): the 1.2 cue of L1H1 alone still beats strengths 0.1 to 1.1
    assert list(result.extra_only.per_group.values()) == pytest.approx([1.0, 0.25, 0.25, 1.0])
    # after: both cues are constants 1.5 * (16, 12) / 28; landbirds always win, waterbirds iff s > 0.214
    assert list(result.after.per_group.values()) == pytest.approx([1.0, 1.0, 0.75, 0.75])
    assert result.after.worst_group == 0.75 and result.after.average == pytest.approx(25 / 28)
    assert "worst group" in result.format() and "75.00" in result.format()


def test_random_heads_baseline_reports_the_best_draw():
    values, y, groups = planted_waterbirds()
    control = random_heads_baseline(values, torch.eye(2), y, groups, n_heads=1, trials=6, n_late_layers=1,
                                    component_labels=LABELS, seed=0)
    assert len(control.trials) == 6 and {h[0] for h in control.heads} <= {"L1H0", "L1H1"}
    worst = {"L1H1": 0.75, "L1H0": 0.0}  # ablating the bird head leaves only the background cue
    assert [t.worst_group for t in control.trials] == pytest.approx([worst[h[0]] for h in control.heads])
    assert control.best.worst_group == max(worst[h[0]] for h in control.heads)


def test_mean_ablation_matches_decompose_on_every_source(tmp_path):
    model = HookedViT(tiny_config()).init_weights(seed=0).eval()
    generator = torch.Generator().manual_seed(4)
    data = [torch.randn(5, 3, 32, 32, generator=generator) for _ in range(2)]
    store = compute_contributions_to_disk(model, data, tmp_path / "s", level="head", ln_mode="paper",
                                          progress=False)
    with torch.no_grad():
        parts = direct_contributions(model, model.run_with_cache(torch.cat(data))[1], level="head", ln_mode="paper")
    heads = [(2, 1), "L1H3", "L0MLP"]
    mask = torch.tensor([label in ("L2H1", "L1H3", "L0MLP") for label in parts.labels])
    means = parts.values.mean(0)
    expected = direct_effect_mean_ablation(parts, mask, means)
    torch.testing.assert_close(mean_ablate_components(parts, heads), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean_ablate_components(store, heads, chunk_size=3), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean_ablate_components(parts.values, mask), expected, rtol=1e-5, atol=1e-6)
    # nothing ablated gives the representation itself; means from another dataset are used as given
    classifier = torch.randn(16, 3, generator=generator)
    predictions = mean_ablation_predictions(store, classifier, {"base": None, "heads": heads, "all": parts.labels},
                                            chunk_size=4)
    assert predictions["base"].tolist() == (parts.sum() @ classifier).argmax(-1).tolist()
    assert predictions["heads"].tolist() == (expected @ classifier).argmax(-1).tolist()
    assert len(set(predictions["all"].tolist())) == 1  # every image replaced by the same mean
    other = torch.zeros_like(means)
    torch.testing.assert_close(mean_ablate_components(parts, heads, means=other),
                               direct_effect_mean_ablation(parts, mask, other), rtol=1e-5, atol=1e-6)


def test_paper_heads_extras_and_errors():
    assert len(paper_waterbirds_heads("ViT-L-14")) == 15  # 6 geolocation + 10 setting, (22, 12) in both
    assert paper_waterbirds_heads("open_clip:ViT-H-14")[:2] == [(31, 8), (30, 15)]
    with pytest.raises(KeyError, match="ViT-B-32"):
        paper_waterbirds_heads("ViT-B-32")
    labels = ["embed", "L0H0T0", "L0H0T1", "L0MLP", "L1N0", "L1H0", "bias"]
    assert extra_ablation_mask(labels, "mlps").tolist() == [True, False, False, True, True, False, False]
    assert extra_ablation_mask(labels, "early_layers", n_late_layers=1).tolist() == [False, True, True, False, False, False, False]
    values, y, groups = planted_waterbirds()
    with pytest.raises(ValueError, match="Unknown extra"):
        spurious_cue_removal(values, torch.eye(2), y, groups, "L1H1", extra="heads", component_labels=LABELS)
    with pytest.raises(ValueError, match=r"classifier is \[3, 2\].*d=2"):
        spurious_cue_removal(values, torch.ones(3, 2), y, groups, "L1H1", component_labels=LABELS)
    with pytest.raises(KeyError, match="L1H2"):
        spurious_cue_removal(values, torch.eye(2), y, groups, "L1H2", component_labels=LABELS)
