"""vit_lens on TransformerLens 3.x and 4.x, and beside SAELens (which requires transformer-lens < 4).

`python3 dev.py test` runs this file twice: in the main environment (TransformerLens 4.x) and in
`.venv-tl3`, where sae-lens 6.x is installed with TransformerLens 3.x; there it sets
VIT_LENS_EXPECT_TRANSFORMER_LENS_MAJOR=3 so that a resolver quietly picking another major fails.
"""

import ast
import os
import runpy
import sys
import types
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import transformer_lens
import transformer_lens.hook_points

import vit_lens.model._transformer_lens as compat
from tests.conftest import assert_rel_close, import_sae_lens, tiny_config
from vit_lens import HookedViT

PACKAGE = Path(compat.__file__).parents[1]
COMPAT_FILE = Path(compat.__file__)
TL_MAJOR = int(version("transformer-lens").split(".")[0])


def test_the_supported_range_is_the_declared_dependency():
    assert f'"{compat.SUPPORTED}"' in (PACKAGE.parent / "pyproject.toml").read_text()


def test_installed_release_is_supported_and_the_expected_major():
    major, minor = (int(part) for part in version("transformer-lens").split(".")[:2])
    assert (3, 3) <= (major, minor) < (5, 0), f"transformer-lens {version('transformer-lens')} is outside {compat.SUPPORTED}"
    expected = os.environ.get("VIT_LENS_EXPECT_TRANSFORMER_LENS_MAJOR")
    if expected is not None:
        assert TL_MAJOR == int(expected), f"expected transformer-lens {expected}.x, found {version('transformer-lens')}"


def test_only_the_compatibility_module_imports_transformer_lens():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == COMPAT_FILE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}" for n in names
                      if n == "transformer_lens" or n.startswith("transformer_lens.")]
    assert found == [], "import TransformerLens names from vit_lens.model._transformer_lens"


@pytest.mark.filterwarnings("ignore:Importing HookedRootModule from transformer_lens.hook_points:DeprecationWarning")
def test_compatibility_names_are_the_installed_classes():
    assert compat.ActivationCache is transformer_lens.ActivationCache
    assert compat.FactoredMatrix is transformer_lens.FactoredMatrix
    assert compat.HookPoint is transformer_lens.hook_points.HookPoint
    # 4.x dropped hook_points.HookedRootModule (asking for it raises ImportError); where both
    # spellings exist they must be one class, or isinstance checks in other libraries (SAELens's
    # activation store) would refuse a HookedViT.
    spellings = []
    for module in (transformer_lens, transformer_lens.hook_points):
        try:
            spellings.append(module.HookedRootModule)
        except (AttributeError, ImportError):
            pass
    assert spellings and all(cls is compat.HookedRootModule.__bases__[0] for cls in spellings)
    if TL_MAJOR >= 4:
        assert len(spellings) == 1
    assert isinstance(HookedViT(tiny_config()), spellings[0])


def _hide_transformer_lens(monkeypatch) -> None:
    """Take the real TransformerLens out of ``sys.modules`` for one test (``from package import name``
    would otherwise find its submodules there)."""
    for name in [n for n in sys.modules if n == "transformer_lens" or n.startswith("transformer_lens.")]:
        monkeypatch.delitem(sys.modules, name)


def _fake_transformer_lens(monkeypatch, top_level_root_module: bool) -> type:
    """Install a stand-in ``transformer_lens`` with the six names; HookedRootModule at the top level
    (3.3 and later) or only in ``hook_points`` (3.0 to 3.2)."""
    _hide_transformer_lens(monkeypatch)

    class FakeRootModule:
        pass

    top = types.ModuleType("transformer_lens")
    top.ActivationCache, top.FactoredMatrix = type("ActivationCache", (), {}), type("FactoredMatrix", (), {})
    hook_points = types.ModuleType("transformer_lens.hook_points")
    hook_points.HookPoint = type("HookPoint", (), {})
    setattr(top if top_level_root_module else hook_points, "HookedRootModule", FakeRootModule)
    utilities = types.ModuleType("transformer_lens.utilities")
    utilities.Slice, utilities.get_act_name = type("Slice", (), {}), lambda *args: "name"
    for name, module in [("", top), (".hook_points", hook_points), (".utilities", utilities)]:
        monkeypatch.setitem(sys.modules, "transformer_lens" + name, module)
    return FakeRootModule


def test_hooked_root_module_extends_the_top_level_class(monkeypatch):
    fake = _fake_transformer_lens(monkeypatch, top_level_root_module=True)
    assert runpy.run_path(str(COMPAT_FILE))["HookedRootModule"].__bases__ == (fake,)


@pytest.mark.parametrize("release", ["before_3.3", "empty"])
def test_an_unsupported_transformer_lens_names_the_release_and_the_fix(monkeypatch, release):
    if release == "empty":
        _hide_transformer_lens(monkeypatch)
        monkeypatch.setitem(sys.modules, "transformer_lens", types.ModuleType("transformer_lens"))
    else:
        _fake_transformer_lens(monkeypatch, top_level_root_module=False)
    with pytest.raises(ImportError) as raised:
        runpy.run_path(str(COMPAT_FILE))
    message = str(raised.value)
    assert f"found transformer-lens {version('transformer-lens')}" in message
    assert ("ActivationCache" if release == "empty" else "HookedRootModule") in message
    assert "pip install 'transformer-lens>=3.3,<5'" in message


@pytest.fixture
def model(one_thread) -> HookedViT:
    return HookedViT(tiny_config()).init_weights(seed=0).eval()


@pytest.fixture
def two_batches() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 32, 32, generator=generator), torch.randn(2, 3, 32, 32, generator=generator)


def test_patching_a_cached_activation_round_trips_through_the_installed_hooks(model, two_batches):
    clean, corrupt = two_batches
    clean_out, clean_cache = model.run_with_cache(clean)
    assert isinstance(clean_cache, transformer_lens.ActivationCache)
    corrupt_out = model(corrupt)
    # Replacing the whole residual stream entering block 1 with the clean one restores the clean output.
    patched = model.run_with_hooks(
        corrupt, fwd_hooks=[("blocks.1.hook_resid_pre", lambda resid, hook: clean_cache["resid_pre", 1])]
    )
    assert_rel_close(patched, clean_out, rtol=1e-6, what="patched output")
    assert (corrupt_out - clean_out).abs().max() > 1e-3
    assert all(not point.fwd_hooks and not point.bwd_hooks for point in model.hook_dict.values())


def test_nested_hook_contexts_and_permanent_hooks_follow_transformer_lens_levels(model, two_batches):
    images = two_batches[0]
    clean = model(images)
    halve = lambda resid, hook: resid * 0.5  # noqa: E731
    model.add_hook("blocks.2.hook_resid_post", halve, is_permanent=True)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", halve)]):
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", halve)]):
            assert len(model.hook_dict["blocks.1.hook_resid_post"].fwd_hooks) == 1
        assert model.hook_dict["blocks.1.hook_resid_post"].fwd_hooks == []
        assert len(model.hook_dict["blocks.0.hook_resid_post"].fwd_hooks) == 1
    assert len(model.hook_dict["blocks.2.hook_resid_post"].fwd_hooks) == 1  # permanent: kept
    model.reset_hooks(including_permanent=True)
    assert_rel_close(model(images), clean, rtol=0, what="output after reset_hooks")


def test_cache_keeps_activation_cache_semantics(model, two_batches):
    images = two_batches[0]
    _, cache = model.run_with_cache(images)
    assert cache["resid_post", 1] is cache["blocks.1.hook_resid_post"]
    assert cache["pattern", 0].shape == (2, 4, model.cfg.n_ctx, model.cfg.n_ctx)
    assert cache["q", 2].shape == (2, model.cfg.n_ctx, 4, 8)
    resid, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "2_pre", "final_post"]
    assert torch.equal(resid[-1], cache["blocks.2.hook_resid_post"])
    first = cache.apply_slice_to_batch_dim(0)
    assert first.has_batch_dim is False and torch.equal(first["resid_post", 0], cache["resid_post", 0][0])


def test_remove_batch_dim_keeps_hooks_without_a_position_axis(model, two_batches):
    """transformer-lens 3.x raised IndexError here: it sliced positions out of ``hook_pooled`` ([batch, d])."""
    images = two_batches[0][:1]
    _, cache = model.run_with_cache(images)
    _, single = model.run_with_cache(images, remove_batch_dim=True, incl_bwd=True, metric=lambda out: out.sum())
    assert single.has_batch_dim is False
    for name in ("blocks.2.hook_resid_post", "blocks.0.attn.hook_pattern", "hook_pooled", "hook_image_embed"):
        assert_rel_close(single[name], cache[name][0], rtol=1e-6, what=f"batchless {name}")
    assert single["hook_pooled_grad"].shape == (model.cfg.d_model,)
    # An int pos_slice keeps a position axis of length one (TransformerLens's rule); pooled has none to slice.
    _, first_token = model.run_with_cache(images, remove_batch_dim=True, pos_slice=0)
    assert_rel_close(first_token["blocks.2.hook_resid_post"], cache["blocks.2.hook_resid_post"][0, :1], rtol=1e-6,
                     what="first token, batchless")
    assert_rel_close(first_token["hook_pooled"], cache["hook_pooled"][0], rtol=1e-6, what="pooled, batchless")


def test_gradients_are_cached_through_the_installed_backward_hooks(model, two_batches):
    images = two_batches[0]
    _, cache = model.run_with_cache(images, incl_bwd=True, metric=lambda out: out.pow(2).sum())
    resid = model.run_with_cache(images, names_filter="blocks.1.hook_resid_post")[1]["resid_post", 1]
    resid = resid.detach().requires_grad_()
    out = model.run_with_hooks(images, fwd_hooks=[("blocks.1.hook_resid_post", lambda r, hook: resid)])
    out.pow(2).sum().backward()
    assert_rel_close(cache["blocks.1.hook_resid_post_grad"], resid.grad, rtol=1e-6, what="cached gradient")


def test_factored_matrices_are_the_installed_class(model):
    ov = model.OV
    assert isinstance(ov, transformer_lens.FactoredMatrix)
    assert_rel_close(ov.AB, model.W_V @ model.W_O, rtol=1e-6, what="OV")


# SAELens 6 warns on its own constructor argument use_error_term=True (it sets the deprecated attribute).
@pytest.mark.filterwarnings("ignore:Setting use_error_term directly on SAE is deprecated:DeprecationWarning")
def test_sae_lens_shares_the_environment_and_splices_into_a_hooked_vit(model, two_batches):
    # sae-lens requires transformer-lens < 4, so it is installed only in dev.py's second environment (.venv-tl3),
    # where `python3 dev.py test` runs this test; the main environment (transformer-lens 4) cannot hold it.
    sae_lens = import_sae_lens()
    assert int(version("sae-lens").split(".")[0]) == 6
    # One TransformerLens serves both: SAELens's SAEs and HookedViT share its HookedRootModule.
    assert issubclass(sae_lens.StandardSAE, compat.HookedRootModule.__bases__[0])
    assert isinstance(model, compat.HookedRootModule.__bases__[0])
    images = two_batches[0]
    clean, cache = model.run_with_cache(images)
    name = "blocks.1.hook_resid_post"
    torch.manual_seed(0)
    sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=model.cfg.d_model, d_sae=64))
    spliced = model.run_with_hooks(images, fwd_hooks=[(name, lambda resid, hook: sae(resid))])
    expected = model.run_with_hooks(images, fwd_hooks=[(name, lambda resid, hook: sae.decode(sae.encode(cache[name])))])
    assert_rel_close(spliced, expected, rtol=1e-6, what="SAE-spliced output")
    assert (spliced - clean).abs().max() > 1e-3
    # With the error term the SAE passes the activation through exactly, and its own hooks see the features.
    with_error = sae_lens.StandardSAE(sae.cfg, use_error_term=True)
    with_error.load_state_dict(sae.state_dict())
    features = {}
    with_error.add_hook("hook_sae_acts_post", lambda acts, hook: features.setdefault("acts", acts))
    passed_through = model.run_with_hooks(images, fwd_hooks=[(name, lambda resid, hook: with_error(resid))])
    assert_rel_close(passed_through, clean, rtol=1e-5, what="SAE with error term")
    assert features["acts"].shape == (2, model.cfg.n_ctx, 64)
