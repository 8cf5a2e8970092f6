"""Shared fixtures. Tests never touch the network: hub libraries are forced offline here."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vit_lens import HookedViT, ViTConfig  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: each worker (and every kernel or CLI it starts) on one thread,
    # since two workers of two threads each on a 2-core machine oversubscribe it and every test waits.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def import_sae_lens():
    """The ``sae_lens`` module, or a skip that says where it runs.

    sae-lens 6 requires transformer-lens < 4, so it lives in dev.py's second environment (``.venv-tl3``), whose
    smoke run sets ``VIT_LENS_EXPECT_TRANSFORMER_LENS_MAJOR=3``: there a missing sae-lens is a failure, not a skip.
    """
    if os.environ.get("VIT_LENS_EXPECT_TRANSFORMER_LENS_MAJOR") == "3":
        import sae_lens

        return sae_lens
    return pytest.importorskip(
        "sae_lens", reason="sae-lens needs transformer-lens < 4: it is installed in .venv-tl3, where `python3 dev.py "
        "test` runs this test (the smoke set)"
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """Same shape, and relative error (Frobenius) at most ``rtol``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def tiny_config(**overrides) -> ViTConfig:
    """A small ViT with every optional part switched on: CLS, registers, ln_pre, projection."""
    fields = dict(
        d_model=32, n_layers=3, n_heads=4, d_head=8, d_mlp=64, patch_size=8, image_size=32,
        class_token=True, n_registers=2, ln_pre=True, d_proj=16, model_name="tiny test ViT",
    )
    fields.update(overrides)
    return ViTConfig(**fields)


def seeded_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """``n`` random images of ``size`` pixels square, the same for the same seed."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def first_minus_second(output: torch.Tensor) -> torch.Tensor:
    """A logit difference: output 0 minus output 1, per image (the circuit tests' metric)."""
    return output[:, 0] - output[:, 1]


# Architecture variants of the tiny model, one per kind of source model, for tests that must hold on all.
FAMILIES = {
    # CLIP-like: ln_pre, CLS, two registers, projection.
    "clip_like": {},
    # timm augreg-like: no ln_pre, CLS, head.
    "vit_like": dict(n_registers=0, ln_pre=False, d_proj=None, n_classes=5),
    # DINOv2-reg-like: registers without position embeddings, pooled representation.
    "dinov2_reg_like": dict(n_registers=4, ln_pre=False, d_proj=None, pos_embed_on_prefix=False),
    # DeiT distilled: CLS + distillation token, two heads.
    "deit_distilled_like": dict(n_registers=0, ln_pre=False, d_proj=None, n_classes=5,
                                distillation_token=True, pool_type="token_dist"),
    # timm global_pool="avg": mean over patches, then fc_norm.
    "avg_pool_fc_norm": dict(ln_pre=False, d_proj=None, pool_type="avg", final_norm="post_pool"),
    # open_clip pool_type="avg" with ln_post before pooling and a projection.
    "avg_pool_pre_norm_proj": dict(ln_pre=False, d_proj=8, pool_type="avg"),
    "no_final_norm": dict(final_norm="none"),
}


@pytest.fixture
def tiny_model() -> HookedViT:
    return HookedViT(tiny_config()).init_weights(seed=0).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: two threads on a busy 2-core machine were 100x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
