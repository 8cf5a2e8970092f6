"""torch.compile keeps the hook contract: hooks added, removed or changed after the first compiled call take effect.

TorchDynamo skips its guards on empty module hook dicts by default (``skip_nnmodule_hook_guards``), so
without vit_lens.model.compile a hook added after compilation was silently ignored. Every test starts
with that default restored and dynamo's caches cleared, so each one sees the unsafe default afresh.
A counting backend (dynamo's graphs run as they are, like backend="eager") shows that the compiled
path ran, and needs no C++ compiler.
"""

import pytest
import torch
import torch._dynamo

from tests.conftest import tiny_config
from vit_lens import HookedViT

RESID = "blocks.0.hook_resid_post"


class CountingBackend:
    """A dynamo backend that runs each captured graph as it is and counts the compilations."""

    def __init__(self):
        self.compilations = 0

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        self.compilations += 1
        return graph_module.forward


def scale_by(factor: float):
    def scale(activation, hook):
        return activation * factor

    return scale


@pytest.fixture(autouse=True)
def dynamo_default_guards():
    """Dynamo's default (hook guards skipped) and empty caches, as in a fresh process."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        yield
    torch._dynamo.reset()


@pytest.fixture
def model():
    return HookedViT(tiny_config(n_layers=2)).init_weights(seed=0).eval()


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def eager_with(model, images, hooks=()):
    with torch.no_grad():
        return model.run_with_hooks(images, fwd_hooks=list(hooks))


@torch.no_grad()
def test_hook_added_after_the_first_compiled_call_takes_effect_and_removing_it_restores(model, images):
    clean, doubled = eager_with(model, images), eager_with(model, images, [(RESID, scale_by(2.0))])
    assert (doubled - clean).abs().max() > 1e-3  # the hook changes the output, so ignoring it would show
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    torch.testing.assert_close(compiled(images), clean, rtol=1e-6, atol=1e-6)
    model.add_hook(RESID, scale_by(2.0))
    torch.testing.assert_close(compiled(images), doubled, rtol=1e-6, atol=1e-6)
    model.reset_hooks()
    torch.testing.assert_close(compiled(images), clean, rtol=1e-6, atol=1e-6)
    with model.hooks(fwd_hooks=[(RESID, scale_by(2.0))]):
        torch.testing.assert_close(compiled(images), doubled, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled(images), clean, rtol=1e-6, atol=1e-6)
    assert backend.compilations >= 2  # one variant without the hook and one with it: both ran compiled


@torch.no_grad()
def test_changing_a_hook_function_after_compilation_takes_effect(model, images):
    factors = (2.0, 3.0, -0.5)
    expected = {factor: eager_with(model, images, [(RESID, scale_by(factor))]) for factor in factors}
    zero_pos = [("hook_pos_embed", lambda pos, hook: pos * 0.0)]
    expected_zero_pos = eager_with(model, images, zero_pos)
    compiled = torch.compile(model, backend=CountingBackend())
    compiled(images)
    for factor in factors:
        model.add_hook(RESID, scale_by(factor))  # the same code with another captured factor
        torch.testing.assert_close(compiled(images), expected[factor], rtol=1e-6, atol=1e-6, msg=f"factor {factor}")
        model.reset_hooks()
    with model.hooks(fwd_hooks=zero_pos):  # another point, another function, and a branch on is_hooked
        torch.testing.assert_close(compiled(images), expected_zero_pos, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_module_compile_runs_run_with_hooks_and_run_with_cache_compiled_with_eager_values(model, images):
    clean = eager_with(model, images)
    eager_hooked = eager_with(model, images, [(RESID, scale_by(2.0))])
    eager_out, eager_cache = model.run_with_cache(images, fwd_hooks=[(RESID, scale_by(2.0))])
    backend = CountingBackend()
    model.compile(backend=backend)  # in place: model(...) and every run_* method go through the compiled call
    torch.testing.assert_close(model(images), clean, rtol=1e-6, atol=1e-6)
    compiled_clean = backend.compilations
    hooked = model.run_with_hooks(images, fwd_hooks=[(RESID, scale_by(2.0))])
    torch.testing.assert_close(hooked, eager_hooked, rtol=1e-6, atol=1e-6)
    out, cache = model.run_with_cache(images, fwd_hooks=[(RESID, scale_by(2.0))])
    assert backend.compilations > compiled_clean  # the hooked runs were compiled, not run eagerly
    torch.testing.assert_close(out, eager_out, rtol=1e-6, atol=1e-6)
    assert sorted(cache.keys()) == sorted(eager_cache.keys())
    for name in eager_cache:
        torch.testing.assert_close(cache[name], eager_cache[name], rtol=1e-6, atol=1e-6, msg=name)
    torch.testing.assert_close(model(images), clean, rtol=1e-6, atol=1e-6)  # the temporary hooks are gone

