"""Head pruning ("Peeling Back the Layers", Algorithm 1): scores, softmax coefficients, pruning, and hooks that apply them."""

import pytest
import torch

from tests.conftest import tiny_config
from vit_lens import HookedViT
from vit_lens.intervene.decompose import direct_contributions
from vit_lens.intervene.pruning import cosine_scorer, head_scores, prune_heads


@pytest.fixture(scope="module")
def model():
    return HookedViT(tiny_config()).init_weights(seed=2).eval()


@pytest.fixture(scope="module")
def sample():
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(3, 3, 32, 32, generator=generator) for _ in range(2)]


def test_scores_are_sample_averages_of_the_scorer(model, sample):
    scores = head_scores(model, sample, layers=[1, 2])
    assert torch.isnan(scores[0]).all() and not torch.isnan(scores[1:]).any()
    with torch.no_grad():
        heads = torch.cat([direct_contributions(model, model.run_with_cache(x)[1], level="head").heads() for x in sample])
    expected = cosine_scorer(heads[:, 2], heads[:, 2].sum(1)).mean(0)
    torch.testing.assert_close(scores[2], expected, rtol=1e-5, atol=1e-6)
    assert (scores[1:].abs() <= 1 + 1e-6).all()


def test_coefficients_are_a_scaled_softmax_with_the_lowest_heads_pruned(model, sample):
    pruning = prune_heads(model, sample, layers=[-1], n_prune=1)
    last = model.cfg.n_layers - 1
    softmax = torch.softmax(pruning.scores[last], dim=0) * model.cfg.n_heads
    lowest = int(pruning.scores[last].argmin())
    assert pruning.pruned[last].tolist() == [h == lowest for h in range(model.cfg.n_heads)]
    assert pruning.coefficients[last, lowest] == 0
    keep = [h for h in range(model.cfg.n_heads) if h != lowest]
    torch.testing.assert_close(pruning.coefficients[last, keep], softmax[keep])
    assert (pruning.coefficients[:last] == 1).all() and pruning.layers == [last]
    paper = prune_heads(model, sample, layers=[-1], n_prune=0, paper_scale=True)
    torch.testing.assert_close(paper.coefficients[last].sum(), torch.tensor(1.0))


def test_hooks_apply_the_coefficients(model, sample):
    images = sample[0]
    pruning = prune_heads(model, sample, layers=[1], n_prune=2)
    with torch.no_grad():
        out = model.run_with_hooks(images, fwd_hooks=pruning.hooks())
        scales = pruning.coefficients[1]

        def scale_heads(z, hook):
            return z * scales[None, None, :, None]

        expected = model.run_with_hooks(images, fwd_hooks=[("blocks.1.attn.hook_z", scale_heads)])
        assert (out - model(images)).abs().max() > 1e-4
    torch.testing.assert_close(out, expected)
    # with every head kept at coefficient 1, nothing changes; a pruned head is zero-ablated
    none = prune_heads(model, sample, layers=[1], n_prune=0, temperature=1e9)
    with torch.no_grad():
        torch.testing.assert_close(model.run_with_hooks(images, fwd_hooks=none.hooks()), model(images), rtol=1e-5, atol=1e-5)


def test_bad_arguments(model, sample):
    with pytest.raises(ValueError, match=r"n_prune must be in \[0, 3\]"):
        prune_heads(model, sample, n_prune=4)
    with pytest.raises(ValueError, match="temperature must be positive"):
        prune_heads(model, sample, temperature=0)
    with pytest.raises(ValueError, match=r"scorer must return \[batch, head\]"):
        head_scores(model, sample, scorer=lambda heads, layer: heads.sum(-1).sum(-1))
