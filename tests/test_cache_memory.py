"""run_with_cache's memory controls: a cache device and a token selection, both applied as each activation is recorded."""

import numpy as np
import pytest
import torch

from conftest import tiny_config
from vit_lens.model.hooked_vit import HookedViT

N_TOKENS = 19  # tiny_config: CLS + 2 registers + 4x4 patches
LAYOUT_SAMPLES = {
    "blocks.1.hook_resid_post": 1,  # [batch, pos, d_model]
    "blocks.1.ln1.hook_scale": 1,  # [batch, pos, 1]
    "blocks.1.mlp.hook_post": 1,  # [batch, pos, d_mlp]
    "blocks.1.attn.hook_q": 1,  # [batch, pos, head, d_head]
    "blocks.1.attn.hook_z": 1,
    "blocks.1.attn.hook_pattern": 2,  # [batch, head, query, key]: the query axis
    "blocks.1.attn.hook_attn_scores": 2,
}


@pytest.fixture(scope="module")
def model() -> HookedViT:
    return HookedViT(tiny_config()).init_weights(seed=0).eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def full_cache(model, batch):
    with torch.no_grad():
        return model.run_with_cache(batch)[1]


SELECTIONS = {
    "cls": (0, [0]),
    "negative_int": (-1, [N_TOKENS - 1]),
    "tuple": ((1, 3), [1, 2]),
    "slice_step": (slice(3, None, 4), [3, 7, 11, 15]),
    "index_list": ([0, 5, 18], [0, 5, 18]),
    "index_tensor": (torch.tensor([4, 2]), [4, 2]),
    "index_array": (np.array([7]), [7]),
    "bool_mask": (torch.arange(N_TOKENS) % 5 == 0, [0, 5, 10, 15]),
}


@pytest.mark.parametrize("selection", SELECTIONS, ids=list(SELECTIONS))
def test_pos_slice_equals_the_full_caches_rows_on_every_layout(model, batch, full_cache, selection):
    pos_slice, kept = SELECTIONS[selection]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, pos_slice=pos_slice)
    kept = torch.tensor(kept)
    for name, axis in LAYOUT_SAMPLES.items():
        torch.testing.assert_close(cache[name], full_cache[name].index_select(axis, kept), rtol=0, atol=0, msg=name)
    # Patterns keep every key: a CLS-only cache still holds CLS's whole attention row.
    assert cache["blocks.0.attn.hook_pattern"].shape[-1] == N_TOKENS


def test_hooks_after_pooling_are_kept_whole(model, batch, full_cache):
    """TransformerLens slices axis -2 of any 2-D tensor, which for hook_pooled [batch, d] is the batch."""
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, pos_slice=0)
    for name in ("hook_pooled", "hook_image_embed"):
        torch.testing.assert_close(cache[name], full_cache[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("pos_slice", [0, (0, 1), [0]], ids=["int", "tuple", "list"])
def test_selected_tokens_do_not_keep_the_full_activation_alive(model, batch, pos_slice):
    """A view of the full activation (what a basic slice gives) would hold all its memory."""
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, pos_slice=pos_slice)
    for name, tensor in cache.cache_dict.items():
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name


def test_pos_slice_with_names_filter_and_remove_batch_dim(model, batch, full_cache):
    with torch.no_grad():
        _, cache = model.run_with_cache(batch[:1], names_filter=["blocks.2.hook_resid_post", "blocks.2.attn.hook_pattern"],
                                        pos_slice=[0, 3], remove_batch_dim=True)
    assert sorted(cache.cache_dict) == ["blocks.2.attn.hook_pattern", "blocks.2.hook_resid_post"]
    torch.testing.assert_close(cache["blocks.2.hook_resid_post"], full_cache["blocks.2.hook_resid_post"][0, [0, 3]])
    torch.testing.assert_close(cache["blocks.2.attn.hook_pattern"], full_cache["blocks.2.attn.hook_pattern"][0, :, [0, 3]])


def test_gradients_are_sliced_like_activations(model, batch):
    images = batch.clone().requires_grad_(True)
    metric = lambda out: out.sum()  # noqa: E731
    _, full = model.run_with_cache(images, names_filter="blocks.1.hook_resid_pre", incl_bwd=True, metric=metric)
    _, cls = model.run_with_cache(images, names_filter="blocks.1.hook_resid_pre", incl_bwd=True, metric=metric,
                                  pos_slice=0)
    torch.testing.assert_close(cls["blocks.1.hook_resid_pre_grad"], full["blocks.1.hook_resid_pre_grad"][:, [0]])


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_each_activation_is_on_the_cache_device_as_soon_as_it_is_recorded(model, batch, device):
    """The cache moves entries one by one during the run, not at the end: seen from a hook later in the run."""
    cache, fwd_hooks, _ = model.get_caching_hooks(["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"],
                                                  device=device, pos_slice=[0, 1])
    seen = {}

    def look_at_cache(activation, hook):
        seen.update({name: (tensor.device.type, tuple(tensor.shape)) for name, tensor in cache.items()})

    with torch.no_grad():
        model.run_with_hooks(batch, fwd_hooks=fwd_hooks + [("blocks.1.hook_resid_pre", look_at_cache)])
    assert seen == {
        "blocks.0.hook_resid_post": (device, (3, 2, 32)),
        "blocks.0.attn.hook_pattern": (device, (3, 4, 2, N_TOKENS)),
    }


def test_device_cache_holds_the_same_values(model, batch, full_cache):
    with torch.no_grad():
        _, on_meta = model.run_with_cache(batch, device="meta")
        _, on_cpu = model.run_with_cache(batch, device=torch.device("cpu"), names_filter="blocks.2.hook_resid_post")
    assert {tensor.device.type for tensor in on_meta.cache_dict.values()} == {"meta"}
    assert on_meta.cache_dict.keys() == full_cache.cache_dict.keys()
    for name, tensor in full_cache.cache_dict.items():
        assert on_meta.cache_dict[name].shape == tensor.shape, name
    # Not bitwise: without a cached pattern the model takes the fused attention kernel.
    torch.testing.assert_close(on_cpu["blocks.2.hook_resid_post"], full_cache["blocks.2.hook_resid_post"])


@pytest.mark.parametrize(
    "pos_slice, error, words",
    [
        ("cls", TypeError, "pos_slice='cls'"),
        (0.5, TypeError, "not a token selection"),
        ([[0, 1]], ValueError, "1-D"),
        ([], ValueError, "non-empty"),
        ([0.0, 1.0], ValueError, "integers or booleans"),
        (torch.zeros(N_TOKENS, dtype=torch.bool), ValueError, "no True entry"),
    ],
    ids=["string", "float", "2d", "empty", "float_list", "all_false_mask"],
)
def test_bad_pos_slice_raises_before_the_run(model, batch, pos_slice, error, words):
    ran = []
    with pytest.raises(error, match=words):
        model.run_with_cache(batch, pos_slice=pos_slice, fwd_hooks=[("hook_embed", lambda a, hook: ran.append(1))])
    assert ran == []


@pytest.mark.parametrize(
    "pos_slice, words",
    [
        ([0, 19], r"\[19\] are out of range .* 19 tokens"),
        ([-20], r"\[-20\] are out of range"),
        (torch.ones(7, dtype=torch.bool), "mask of 7 entries but hook_embed has 19 tokens"),
        ((30, 40), "keeps no token of the 19"),
    ],
    ids=["index_too_large", "index_too_negative", "mask_length", "empty_slice"],
)
def test_selection_that_does_not_fit_the_tokens_names_the_hook(model, batch, pos_slice, words):
    with pytest.raises(ValueError, match=words):
        model.run_with_cache(batch, pos_slice=pos_slice)


def test_bad_device_raises(model, batch):
    with pytest.raises(ValueError, match="device='gpu' is not a torch device; pass e.g. 'cpu'"):
        model.run_with_cache(batch, device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is missing")
def test_cuda_cache_without_cuda_says_so(model, batch):
    with pytest.raises(ValueError, match="CUDA is not available"):
        model.run_with_cache(batch, device="cuda")
