"""token_mixing: CLS isolation checked against forward passes of CLS alone and of the patches alone
(run block by block here, independently of the hooks); per-token readout against the model's output."""

import pytest
import torch

import vit_lens
from tests.conftest import FAMILIES, assert_rel_close, tiny_config
from vit_lens import HookedViT
from vit_lens import token_mixing as tm

pytestmark = pytest.mark.usefixtures("one_thread")

CLS_FAMILIES = ["clip_like", "vit_like", "deit_distilled_like"]


def model_of(family: str, seed: int = 0) -> HookedViT:
    return HookedViT(tiny_config(**FAMILIES[family])).init_weights(seed=seed).eval()


def images_of(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def start_of_stream(model: HookedViT, images: torch.Tensor) -> torch.Tensor:
    """The residual stream entering block 0, from the model's own embedding modules."""
    resid = model.embed(images) + model.pos_embed(model.cfg.grid_size)[None]
    return model.ln_pre(resid) if model.ln_pre is not None else resid


@pytest.mark.parametrize("family", CLS_FAMILIES)
def test_isolation_switched_off_is_the_normal_forward(family):
    model, images = model_of(family), images_of(3)
    assert_rel_close(tm.isolated_cls_forward(model, images, until_layer=0), model(images), rtol=1e-5, what=family)


@pytest.mark.parametrize("family", CLS_FAMILIES)
def test_isolated_groups_equal_separate_forward_passes(family):
    """Before ``until_layer`` the CLS group runs as if alone and the other tokens as if without it."""
    model, images = model_of(family), images_of(3)
    isolated = tm.isolated_positions(model)
    until = model.cfg.n_layers - 1
    with torch.no_grad():
        _, cache = model.run_with_cache(images, fwd_hooks=tm.isolated_cls_hooks(model, until),
                                        names_filter=f"blocks.{until}.hook_resid_pre")
        resid = start_of_stream(model, images)
        rest = [p for p in range(resid.shape[1]) if p not in isolated]
        alone, others = resid[:, isolated], resid[:, rest]
        for block in model.blocks[:until]:
            alone, others = block(alone), block(others)
    got = cache[f"blocks.{until}.hook_resid_pre"]
    assert_rel_close(got[:, rest], others, rtol=1e-5, what=f"{family} patches")
    assert_rel_close(got[:, isolated], alone, rtol=1e-5, what=f"{family} CLS")
    # the inserted value is the CLS-only pass, a constant over images
    constant = tm.cls_only_residual(model, until)
    assert_rel_close(got[:, isolated], constant.expand_as(got[:, isolated]), rtol=1e-5, what=family)
    assert_rel_close(alone[0], constant, rtol=1e-5)


def test_isolation_everywhere_makes_the_output_image_independent():
    model = model_of("vit_like")
    out = tm.isolated_cls_forward(model, images_of(4), until_layer=model.cfg.n_layers)
    assert_rel_close(out, out[:1].expand_as(out), rtol=1e-5)
    assert (model(images_of(4)) - model(images_of(4))[:1]).abs().max() > 1e-3  # the normal model does depend on it


def test_isolation_changes_the_output_when_on():
    model, images = model_of("vit_like"), images_of(3)
    assert (tm.isolated_cls_forward(model, images) - model(images)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["clip_like", "vit_like", "avg_pool_fc_norm"])
def test_per_token_readout_at_cls_is_the_normal_classification(family):
    model, images = model_of(family), images_of(4)
    classifier = None if model.cfg.n_classes else torch.nn.functional.normalize(
        torch.randn(model.cfg.d_output, 6, generator=torch.Generator().manual_seed(2)), dim=0)
    scores = tm.per_token_scores(model, images, classifier)
    assert scores.shape == (4, model.cfg.n_ctx, 6 if classifier is not None else model.cfg.n_classes)
    if model.cfg.pool_type == "token":
        assert_rel_close(scores[:, 0], tm.class_scores(model, model(images), classifier), rtol=1e-5, what=family)
    # every token goes through the same readout: check one patch by hand
    _, cache = model.run_with_cache(images, names_filter=f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    token = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, -1]
    normed = torch.nn.functional.layer_norm(token, (model.cfg.d_model,), model.ln_final.w, model.ln_final.b, model.cfg.eps)
    if model.cfg.n_classes:
        expected = normed @ model.head.W_head + model.head.b_head
    else:
        feats = normed @ model.W_proj if model.cfg.d_proj else normed
        expected = torch.nn.functional.normalize(feats, dim=-1) @ classifier
    assert_rel_close(scores[:, -1], expected, rtol=1e-5, what=family)


def test_patch_accuracy_streams_to_the_brute_force_numbers():
    model = model_of("vit_like")
    images = images_of(24)
    labels = model(images).argmax(-1)
    labels[::3] = (labels[::3] + 1) % model.cfg.n_classes  # the model is right on two thirds
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=5)
    result = tm.patch_classification_accuracy(model, loader, progress=False)
    scores = tm.per_token_scores(model, images)
    per_position = scores.argmax(-1).eq(labels[:, None]).float().mean(0)
    assert torch.allclose(result.per_position, per_position)
    assert result.normal == pytest.approx(2 / 3)
    assert result.per_position[0].item() == pytest.approx(2 / 3)  # the readout on CLS is the model
    patches = per_position[model.cfg.n_prefix_tokens :]
    assert result.patch_average == pytest.approx(patches.mean().item())
    assert result.best_patch == pytest.approx(patches.max().item())
    assert result.grid.shape == (4, 4) and result.n_images == 24
    assert len(result.figure().data) == 1


def test_cls_isolation_accuracy_on_the_toy_clip():
    from vit_lens.toy import ToyWorld, factor_prompts

    clip = vit_lens.load_toy_clip()
    batch = ToyWorld(seed=5).sample(48)
    classifier = clip.encode_text(factor_prompts("colour"), normalize=True).T
    data = [(batch.images[:24], batch.factors["colour"][:24]), (batch.images[24:], batch.factors["colour"][24:])]
    result = tm.cls_isolation_accuracy(clip, data, classifier, progress=False)
    with torch.no_grad():
        normal = (clip.encode_image(batch.images, normalize=True) @ classifier).argmax(-1).eq(batch.factors["colour"]).float().mean()
        isolated = tm.class_scores(clip, tm.isolated_cls_forward(clip, batch.images), classifier).argmax(-1)
    assert result["normal"] == pytest.approx(normal.item())
    assert result["isolated"] == pytest.approx(isolated.eq(batch.factors["colour"]).float().mean().item())
    off = tm.cls_isolation_accuracy(clip, data, classifier, until_layer=0, progress=False)
    assert off["isolated"] == pytest.approx(off["normal"])


def test_errors_name_what_would_work():
    with pytest.raises(ValueError, match="no CLS readout"):
        tm.isolated_cls_hooks(model_of("avg_pool_fc_norm"))
    with pytest.raises(ValueError, match="classifier="):
        tm.per_token_scores(model_of("clip_like"), images_of(1))
    with pytest.raises(ValueError, match="layer must be an int"):
        tm.isolated_cls_hooks(model_of("vit_like"), until_layer=7)
