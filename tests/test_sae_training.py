"""vit_lens.sae.training and vit_lens.sae.evaluation: SAEs trained on the toy CLIP, the buffer, resume, evaluation."""

import re
import warnings
from pathlib import Path

import pytest
import torch

import vit_lens
from vit_lens.planted.model import PlantedModel, build_classifier
from vit_lens.sae import (
    SAE,
    SAEConfig,
    evaluate_sae,
    evaluate_saes,
    load_sae,
    train_sae,
    train_sae_on_activations,
)
from vit_lens.sae.activations import ActivationBuffer, ActivationSource
from vit_lens.sae.training import (
    SAETrainer,
    _JumpReLUL0,
    build_settings,
    list_checkpoints,
    train_transcoder,
)
from vit_lens.toy import ToyWorld

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def clip():
    return vit_lens.load_toy_clip()


@pytest.fixture(scope="module")
def toy_activations(clip):
    """8320 shuffled rows of the toy CLIP's blocks.2 residual stream (128 images)."""
    with torch.no_grad():
        _, cache = clip.vision.run_with_cache(ToyWorld(seed=0).sample(128).images, names_filter=[HOOK],
                                              stop_at_layer=3)
    rows = cache[HOOK].reshape(-1, 128)
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]


@pytest.fixture(scope="module")
def trained_topk(clip):
    """A TopK SAE trained on the toy CLIP from images: 160 steps of 256 tokens (about 630 images' worth)."""
    cfg = SAEConfig(d_in=128, d_sae=256, architecture="topk", k=8, hook_name=HOOK)
    return train_sae(clip, cfg, ToyWorld(seed=0).sample(256).images, steps=160, batch_size_tokens=256,
                     lr=5e-3, progress=False, log_every=20)


def explained_variance(sae, x):
    with torch.no_grad():
        return float(1 - (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def identity_sae(d, hook_name):
    """relu(x) - relu(-x) = x: an SAE of 2d features that rebuilds its input exactly."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, hook_name=hook_name, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([torch.eye(d), -torch.eye(d)], 1))
        sae.W_dec.copy_(torch.cat([torch.eye(d), -torch.eye(d)], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


# ------------------------------------------------------------------ training on the toy CLIP


def test_topk_sae_on_the_toy_clip_explains_held_out_activations_with_exactly_k_features(clip, trained_topk):
    sae, log = trained_topk
    assert not sae.training and sae.cfg.model_name == clip.vision.cfg.model_name
    assert sae.cfg.metadata["training_tokens"] == 160 * 256
    assert [entry["step"] for entry in log] == list(range(20, 161, 20))
    assert all(entry["l0"] == 8.0 for entry in log)
    assert log[-1]["mse"] < 0.5 * log[0]["mse"]  # training reduces the loss (fixed seed)
    with torch.no_grad():
        _, cache = clip.vision.run_with_cache(ToyWorld(seed=7).sample(64).images, names_filter=[HOOK], stop_at_layer=3)
    held_out = cache[HOOK].reshape(-1, 128)
    assert explained_variance(sae, held_out) > 0.8  # measured 0.854
    assert ((sae.encode(held_out) > 0).sum(-1) == 8).all()


def test_standard_sae_l0_falls_as_the_l1_coefficient_grows(toy_activations):
    l0 = []
    for coefficient in (0.5, 2.0, 8.0):
        cfg = SAEConfig(d_in=128, d_sae=256, normalize_activations="expected_average_only_in")
        sae, log = train_sae_on_activations(cfg, toy_activations, steps=80, batch_size_tokens=512, lr=4e-3,
                                            l1_coefficient=coefficient, progress=False)
        with torch.no_grad():
            l0.append(float((sae.encode(toy_activations) > 0).sum(-1).float().mean()))
        assert log[-1]["sparsity_coefficient"] == coefficient
    assert l0[0] > 1.5 * l0[1] > 1.5 * 1.5 * l0[2]  # measured 49.5, 16.7, 1.8
    assert l0[2] > 0


def test_training_runs_where_the_caller_turned_gradients_off(toy_activations):
    # Notebooks often call torch.set_grad_enabled(False); training must still step (it did not: "element 0 of
    # tensors does not require grad").
    cfg = SAEConfig(d_in=128, d_sae=64, architecture="topk", k=4)
    with torch.no_grad():
        sae, log = train_sae_on_activations(cfg, toy_activations, steps=20, batch_size_tokens=256, lr=4e-3, progress=False)
    assert len(log) >= 1 and log[-1]["loss"] < log[0]["loss"]


def test_expected_average_scaling_factor_is_estimated_before_training(toy_activations):
    cfg = SAEConfig(d_in=128, d_sae=64, normalize_activations="expected_average_only_in")
    sae, _ = train_sae_on_activations(cfg, toy_activations, steps=1, batch_size_tokens=512, buffer_tokens=2048,
                                      progress=False)
    first = toy_activations[:2048]
    assert sae.scaling_factor == pytest.approx(128**0.5 / float(first.norm(dim=-1).mean()), rel=1e-6)


def test_schedules_warm_up_and_decay_as_documented():
    sae = SAE(SAEConfig(d_in=8, d_sae=16))
    trainer = SAETrainer(sae, build_settings(sae, steps=100, lr=1e-3, l1_coefficient=2.0, lr_warmup_steps=10,
                                             lr_decay_steps=20, l1_warmup_steps=4))
    assert trainer.learning_rate(0) == pytest.approx(1e-4)
    assert trainer.learning_rate(9) == pytest.approx(1e-3)
    assert trainer.learning_rate(50) == pytest.approx(1e-3)
    assert trainer.learning_rate(90) == pytest.approx(1e-3 * 10 / 20)
    assert trainer.learning_rate(99) == pytest.approx(1e-3 / 20)
    assert [trainer.sparsity_coefficient(step) for step in (0, 1, 3, 50)] == [0.5, 1.0, 2.0, 2.0]
    topk = SAE(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2))
    annealed = SAETrainer(topk, build_settings(topk, steps=100, k_start=10, k_anneal_steps=8))
    assert [annealed.current_k(step) for step in (0, 4, 8, 50)] == [10, 6, 2, 2]
    with pytest.raises(ValueError, match="k_start .10. and k_anneal_steps .0. go together"):
        build_settings(topk, steps=100, k_start=10)


# ------------------------------------------------------------------ losses and dead features on hand-made cases


def hand_trainer(architecture="standard", k=None, **settings):
    """A 4 -> 4 SAE whose pre-activations are its input (identity encoder), trained at a negligible rate."""
    sae = SAE(SAEConfig(d_in=4, d_sae=4, architecture=architecture, k=k, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    defaults = dict(steps=10, batch_size_tokens=5, lr=1e-12, lr_warmup_steps=0, lr_decay_steps=0, log_every=1,
                    l1_coefficient=0.0)
    return SAETrainer(sae, build_settings(sae, **{**defaults, **settings}))


def test_dead_features_are_the_ones_silent_for_dead_after_tokens():
    trainer = hand_trainer(dead_after_tokens=12)
    firing = [[1.0, 1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0], [1.0, 1.0, -1.0, -1.0]]  # feature 3 never, 2 once
    for signs in firing:
        log = trainer.train_step(torch.tensor(signs).repeat(5, 1))
    assert trainer.tokens_since_fired.tolist() == [0, 0, 10, 15]
    assert log["dead_fraction"] == 0.25  # only feature 3 has been silent for 12 tokens or more
    trainer.train_step(torch.tensor([1.0, 1.0, 1.0, 1.0]).repeat(5, 1))
    assert trainer.tokens_since_fired.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("aux_k_coefficient", [0.0, 1 / 32])
def test_aux_k_moves_only_dead_features_encoders_and_only_when_on(aux_k_coefficient):
    trainer = hand_trainer("topk", k=2, lr=1e-2, dead_after_tokens=5, aux_k_coefficient=aux_k_coefficient,
                           max_grad_norm=None)
    trainer.train_step(torch.tensor([2.0, 1.0, -0.5, -1.0]).repeat(5, 1))  # features 2, 3 silent: dead from now
    before = trainer.sae.W_enc.detach().clone()
    log = trainer.train_step(torch.tensor([2.0, 1.0, -0.5, -1.0]).repeat(5, 1) + 0.3 * torch.eye(4)[[0, 1, 2, 3, 0]])
    moved = (trainer.sae.W_enc - before).abs().sum(0) > 0
    assert moved[2:].tolist() == [aux_k_coefficient > 0] * 2
    assert (log["aux_k_loss"] > 0) == (aux_k_coefficient > 0)


def test_jumprelu_l0_loss_counts_active_features_and_pushes_thresholds_up():
    pre = torch.tensor([[0.30, 0.02, 0.50], [0.12, 0.00, 0.05]])
    threshold = torch.tensor([0.1, 0.01, 0.6], requires_grad=True)
    l0 = _JumpReLUL0.apply(pre, threshold, 0.05)
    assert l0.sum(-1).tolist() == [2.0, 1.0]
    l0.sum().backward()
    # -1/bandwidth for every entry within bandwidth/2 of its threshold: (0.12 vs 0.1), (0.02 vs 0.01), (0.0 vs 0.01)
    assert torch.allclose(threshold.grad, torch.tensor([-20.0, -40.0, 0.0]))


def test_batchtopk_training_estimates_its_inference_threshold(toy_activations):
    cfg = SAEConfig(d_in=128, d_sae=256, architecture="batchtopk", k=8)
    sae, log = train_sae_on_activations(cfg, toy_activations, steps=60, batch_size_tokens=512, lr=4e-3,
                                        threshold_momentum=0.1, progress=False)
    assert all(entry["l0"] == 8.0 for entry in log)
    assert float(sae.threshold.min()) > 0 and torch.all(sae.threshold == sae.threshold[0])
    with torch.no_grad():
        inference_l0 = float((sae.encode(toy_activations) > 0).sum(-1).float().mean())
    assert 4 < inference_l0 < 16  # the threshold keeps about k features per row at inference (measured ~9)


def test_unit_norm_decoder_is_kept_where_nothing_else_fixes_the_scale(toy_activations):
    for architecture, k, expected in (("topk", 4, True), ("jumprelu", None, True), ("standard", None, False)):
        cfg = SAEConfig(d_in=128, d_sae=64, architecture=architecture, k=k)
        sae, _ = train_sae_on_activations(cfg, toy_activations, steps=20, batch_size_tokens=512, lr=1e-2,
                                          progress=False)
        norms = sae.W_dec.norm(dim=-1)
        assert torch.allclose(norms, torch.ones(64), atol=1e-5) == expected, architecture


# ------------------------------------------------------------------ the buffer


def numbered_chunks(sizes):
    """Chunk i holds rows (i, j): chunk number and row number, so every row is told apart."""
    return [torch.stack([torch.full((n,), float(i)), torch.arange(n, dtype=torch.float32)], 1)
            for i, n in enumerate(sizes)]


def test_buffer_never_holds_more_than_its_size_mixes_chunks_and_serves_each_row_once():
    chunks = numbered_chunks([7] * 20)
    buffer = ActivationBuffer(iter(chunks), buffer_tokens=32, batch_size_tokens=8,
                              generator=torch.Generator().manual_seed(0))
    served, held = [], []
    for batch in buffer:
        held.append(buffer.held_tokens)
        served.append(batch)
    assert max(held) <= 32 and buffer._rows.shape[0] == 32
    assert all(len(batch) == 8 for batch in served)
    rows = {tuple(row) for batch in served for row in batch.tolist()}
    assert len(rows) == sum(len(batch) for batch in served) == 8 * (140 // 8)  # each row once; the last 4 dropped
    mixed = [len(set(batch[:, 0].tolist())) for batch in served]
    assert min(mixed) >= 2 and sum(mixed) / len(mixed) > 3  # batches draw on several chunks
    # Rows read ahead with fill() (to estimate the scaling factor) are served, shuffled, like any others.
    ahead = ActivationBuffer(iter(numbered_chunks([3] * 4)), buffer_tokens=16, batch_size_tokens=4,
                             generator=torch.Generator().manual_seed(0))
    assert len(ahead.fill()) == 12
    assert sorted(map(tuple, torch.cat(list(ahead)).tolist())) == sorted(
        map(tuple, torch.cat(numbered_chunks([3] * 4)).tolist()))
    # A chunk larger than the whole buffer passes through in parts.
    big = ActivationBuffer(iter(numbered_chunks([50, 3])), buffer_tokens=16, batch_size_tokens=4,
                           generator=torch.Generator().manual_seed(0))
    assert sum(len(batch) for batch in big) == 52


def test_buffer_is_reproducible_from_its_seed_and_refuses_a_buffer_smaller_than_two_batches():
    def run(seed):
        buffer = ActivationBuffer(iter(numbered_chunks([5] * 8)), buffer_tokens=12, batch_size_tokens=4,
                                  generator=torch.Generator().manual_seed(seed))
        return torch.cat(list(buffer))
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))
    with pytest.raises(ValueError, match="at least two batches"):
        ActivationBuffer(iter([]), buffer_tokens=6, batch_size_tokens=4, generator=torch.Generator())


def test_token_selection_and_mask_choose_the_rows(clip):
    images = ToyWorld(seed=0).sample(8).images
    with torch.no_grad():
        _, cache = clip.vision.run_with_cache(images, names_filter=[HOOK], stop_at_layer=3)
    cls_sae = SAE(SAEConfig(d_in=128, d_sae=16, hook_name=HOOK, token_selection="cls"))
    assert torch.equal(ActivationSource(clip, cls_sae, [images]).rows(images), cache[HOOK][:, 0])
    patches = SAE(SAEConfig(d_in=128, d_sae=16, hook_name=HOOK, token_selection="patches"))
    left_half = torch.zeros(65, dtype=torch.bool)
    left_half[1:] = (torch.arange(64) % 8 < 4)
    rows = ActivationSource(clip, patches, [images], token_mask=lambda acts, imgs: left_half).rows(images)
    assert torch.equal(rows, cache[HOOK][:, left_half].reshape(-1, 128))
    with pytest.raises(ValueError, match=r"token_mask must return a bool tensor \[batch, pos\] = \[8, 65\]"):
        ActivationSource(clip, patches, [images], token_mask=lambda acts, imgs: left_half.float()).rows(images)


# ------------------------------------------------------------------ checkpoints and resume


def run_with_checkpoints(clip, folder, resume=None):
    cfg = SAEConfig(d_in=128, d_sae=64, architecture="batchtopk", k=4, hook_name=HOOK)
    batches = [ToyWorld(seed=3).sample(4, seed=s).images for s in range(6)]  # 260 rows each, cycled
    return train_sae(clip, None if resume else cfg, batches, steps=24, batch_size_tokens=256, buffer_tokens=1024,
                     lr=3e-3, dead_after_tokens=1024, checkpoint_dir=folder, checkpoint_every=8, resume=resume,
                     progress=False, log_every=4)


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_result(clip, tmp_path):
    full, full_log = run_with_checkpoints(clip, tmp_path / "full")
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == ["step_00000008", "step_00000016",
                                                                      "step_00000024"]
    assert any(entry["dead_fraction"] > 0 for entry in full_log)  # AuxK was active, its counters matter
    resumed, resumed_log = run_with_checkpoints(clip, tmp_path / "resumed", resume=tmp_path / "full" / "step_00000008")
    for name, tensor in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert resumed_log == full_log
    # A checkpoint is a SAELens folder vit_lens loads as the SAE it was at that step.
    at_8 = load_sae(tmp_path / "full" / "step_00000008")
    assert at_8.cfg.architecture == "batchtopk" and not torch.equal(at_8.W_enc, full.W_enc)


def test_resume_from_a_checkpoint_dir_takes_the_latest_and_a_crash_leaves_complete_checkpoints(clip, tmp_path):
    class CrashingImages(list):
        served = 0

        def __iter__(self):
            for item in super().__iter__():
                CrashingImages.served += 1
                if CrashingImages.served > 9:
                    raise RuntimeError("power cut")
                yield item

    cfg = SAEConfig(d_in=128, d_sae=64, architecture="topk", k=4, hook_name=HOOK)
    batches = [ToyWorld(seed=3).sample(4, seed=s).images for s in range(6)]
    kwargs = dict(steps=24, batch_size_tokens=256, buffer_tokens=1024, lr=3e-3, progress=False)
    with pytest.raises(RuntimeError, match="power cut"):
        train_sae(clip, cfg, CrashingImages(batches), checkpoint_dir=tmp_path, checkpoint_every=4, **kwargs)
    saved = list_checkpoints(tmp_path)
    assert saved and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written folder
    resumed, _ = train_sae(clip, cfg, batches, resume=tmp_path, **kwargs)
    uninterrupted, _ = train_sae(clip, cfg, batches, **kwargs)
    assert torch.equal(resumed.W_dec, uninterrupted.W_dec) and torch.equal(resumed.b_enc, uninterrupted.b_enc)


def test_resume_on_an_activation_tensor_and_keep_checkpoints(toy_activations, tmp_path):
    cfg = SAEConfig(d_in=128, d_sae=32)
    kwargs = dict(steps=12, batch_size_tokens=512, lr=1e-2, progress=False)
    full, _ = train_sae_on_activations(cfg, toy_activations, checkpoint_dir=tmp_path, checkpoint_every=3,
                                       keep_checkpoints=2, **kwargs)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000009", "step_00000012"]
    resumed, _ = train_sae_on_activations(cfg, toy_activations, resume=tmp_path / "step_00000009", **kwargs)
    assert torch.equal(resumed.W_enc, full.W_enc)
    with pytest.raises(ValueError, match=r"batch_size_tokens=512 \(now 256\)"):
        train_sae_on_activations(cfg, toy_activations, resume=tmp_path, **{**kwargs, "batch_size_tokens": 256})
    with pytest.raises(ValueError, match="d_sae: 64 vs 32"):
        train_sae_on_activations(SAEConfig(d_in=128, d_sae=64), toy_activations, resume=tmp_path, **kwargs)


# ------------------------------------------------------------------ transcoders


def test_transcoder_trains_on_input_and_target_side_by_side(clip):
    cfg = SAEConfig(d_in=128, d_sae=256, architecture="topk", k=16, hook_name="blocks.1.ln2.hook_normalized",
                    hook_name_out="blocks.1.hook_mlp_out")
    transcoder, log = train_transcoder(clip, cfg, ToyWorld(seed=0).sample(64).images, steps=40,
                                       batch_size_tokens=512, lr=4e-3, progress=False)
    assert transcoder.cfg.is_transcoder and log[-1]["mse"] < 0.7 * log[0]["mse"]
    with pytest.raises(ValueError, match="train_transcoder trains a transcoder"):
        train_transcoder(clip, SAEConfig(d_in=128, d_sae=16, hook_name=HOOK), [], steps=1)


# ------------------------------------------------------------------ bad input


def test_bad_input_raises_errors_that_say_what_to_do(clip, toy_activations):
    images = ToyWorld(seed=0).sample(4).images
    with pytest.raises(ValueError, match="'blocks.9.hook_resid_post' is no hook point"):
        train_sae(clip, SAEConfig(d_in=128, d_sae=16, hook_name="blocks.9.hook_resid_post"), images, steps=1)
    with pytest.raises(ValueError, match=r"d_in is 64, but the activation at 'blocks.2.hook_resid_post'.*d_in=128"):
        train_sae(clip, SAEConfig(d_in=64, d_sae=16, hook_name=HOOK), images, steps=1, progress=False)
    with pytest.raises(ValueError, match="images yielded no image batches"):
        train_sae(clip, SAEConfig(d_in=128, d_sae=16, hook_name=HOOK), [], steps=1, progress=False)
    with pytest.raises(ValueError, match="no hook_name"):
        train_sae(clip, SAEConfig(d_in=128, d_sae=16), images, steps=1)
    with pytest.raises(ValueError, match="ran out before one batch of 4096 rows"):
        train_sae(clip, SAEConfig(d_in=128, d_sae=16, hook_name=HOOK), iter([images]), steps=1,
                  batch_size_tokens=4096, progress=False)
    with pytest.raises(TypeError, match="images must be an iterable of image batches"):
        train_sae(clip, SAEConfig(d_in=128, d_sae=16, hook_name=HOOK), 3, steps=1)
    with pytest.raises(ValueError, match=r"buffer_tokens \(100\) must hold at least two batches"):
        train_sae_on_activations(SAEConfig(d_in=128, d_sae=16), toy_activations, steps=1, batch_size_tokens=64,
                                 buffer_tokens=100)
    with pytest.raises(ValueError, match=r"activations must be \[n, 128\]"):
        train_sae_on_activations(SAEConfig(d_in=128, d_sae=16), toy_activations[:, :64], steps=1)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train_sae_on_activations(SAEConfig(d_in=128, d_sae=16), toy_activations, steps=0)
    with pytest.raises(TypeError, match="cfg_or_sae must be an SAEConfig"):
        train_sae_on_activations("topk", toy_activations, steps=1)


def test_a_one_pass_generator_that_runs_out_stops_training_with_a_warning(clip):
    batches = (ToyWorld(seed=0).sample(8, seed=s).images for s in range(4))  # 2080 rows: 8 batches of 256
    with pytest.warns(UserWarning, match="ran out after 8 of 50 steps"):
        _, log = train_sae(clip, SAEConfig(d_in=128, d_sae=16, hook_name=HOOK), batches, steps=50,
                           batch_size_tokens=256, buffer_tokens=512, progress=False, log_every=4)
    assert log[-1]["step"] == 8


# ------------------------------------------------------------------ evaluation


def test_an_identity_sae_explains_everything_and_leaves_the_downstream_accuracy_as_clean(clip):
    batches = [ToyWorld(seed=1).sample(32, seed=s) for s in range(2)]
    result = evaluate_sae(clip, identity_sae(128, HOOK), batches)
    assert result.n_tokens == 64 * 65
    assert result.explained_variance == pytest.approx(1.0, abs=1e-9) and result.mse < 1e-12
    assert result.l0 == 128.0 and result.dead_fraction == 0.0
    assert result.downstream["sae"] == result.downstream["clean"]
    assert set(result.downstream["clean"]) == {"shape", "colour", "size", "position", "count", "texture"}
    assert result.downstream["clean"]["colour"] > 0.9 and result.downstream["mean_ablated"]["colour"] < 0.5
    assert all(value == 1.0 for value in result.recovered().values())


def test_evaluation_figures_of_a_trained_sae_and_of_a_silent_one(clip, trained_topk):
    batches = [ToyWorld(seed=1).sample(32, seed=s) for s in range(2)]
    sae, _ = trained_topk
    silent = SAE(SAEConfig(d_in=128, d_sae=16, hook_name="blocks.1.hook_resid_post", apply_b_dec_to_input=False))
    with torch.no_grad():
        silent.W_enc.zero_()
        silent.b_enc.fill_(-1.0)
    results = evaluate_saes(clip, [sae, silent], batches, dense_threshold=0.5)
    trained, quiet = results[HOOK], results["blocks.1.hook_resid_post"]
    assert trained.l0 == 8.0 and 0.8 < trained.explained_variance < 1.0
    assert trained.feature_frequency.sum().item() == pytest.approx(8.0, abs=1e-4)
    assert trained.dense_fraction == float((trained.feature_frequency > 0.5).float().mean())
    assert trained.downstream["clean"] == quiet.downstream["clean"]  # one clean run, shared
    assert trained.downstream["sae"]["colour"] > trained.downstream["mean_ablated"]["colour"]
    assert quiet.l0 == 0.0 and quiet.dead_fraction == 1.0
    assert quiet.explained_variance < 0  # rebuilding everything as zero is worse than the mean
    row = trained.to_dict()
    assert row["sae/colour"] == trained.downstream["sae"]["colour"] and "recovered/texture" in row


def test_a_user_metric_on_a_hooked_vit_and_the_planted_classifiers_factor_accuracy(tiny_model):
    images = [torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)]

    def mean_output(model, item):
        return float(model(item).mean())

    sae = identity_sae(32, "blocks.1.hook_resid_post")
    result = evaluate_sae(tiny_model, sae, images, metric=mean_output)
    with torch.no_grad():
        expected = sum(float(tiny_model(batch).mean()) for batch in images) / 2
    assert result.downstream["clean"]["metric"] == pytest.approx(expected, rel=1e-6)
    assert result.downstream["sae"]["metric"] == pytest.approx(expected, rel=1e-5)
    assert result.downstream["mean_ablated"]["metric"] != pytest.approx(expected, rel=1e-3)
    planted = PlantedModel(model=build_classifier(seed=0).eval(), heads={}, inert_heads=[], inert_mlps=[])
    toy = [ToyWorld(seed=2).sample(16)]
    on_planted = evaluate_sae(planted, identity_sae(64, "blocks.0.hook_resid_post"), toy)
    predicted = planted.predict(toy[0].images)
    assert on_planted.downstream["clean"]["shape"] == float((predicted["shape"] == toy[0].factors["shape"]).float().mean())
    assert on_planted.downstream["sae"] == on_planted.downstream["clean"]
    with pytest.raises(ValueError, match="a generator can be read once"):
        evaluate_sae(tiny_model, sae, (batch for batch in images), metric=mean_output)
    with pytest.raises(ValueError, match="no image batches"):
        evaluate_sae(tiny_model, sae, [])


# ------------------------------------------------------------------ the docs page


def test_the_docs_training_and_evaluation_examples_run(tmp_path, monkeypatch):
    page = (Path(__file__).parents[1] / "docs" / "sae.md").read_text()
    section = page[page.index("\n## Train an SAE"):page.index("\n## Read the features")]  # views: test_sae_views.py
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for index, block in enumerate(blocks):
            exec(compile(block, f"docs/sae.md training block {index}", "exec"), namespace)
    assert namespace["log"][-1]["l0"] == 16.0 and namespace["log"][-1]["explained_variance"] > 0.8
    assert namespace["result"].explained_variance > 0.8
    assert (tmp_path / "saes" / "toy_clip_topk" / "cfg.json").is_file()


# ------------------------------------------------------------------ training on activations cached by the dataset runner


def test_an_sae_trained_on_runner_cached_activations_equals_one_trained_on_the_streamed_images(clip, tmp_path):
    from vit_lens.runner import Activations, run_dataset

    images = ToyWorld(seed=5).sample(20).images  # chunks of 8, 8 and 4 images: 512, 512, 256 patch rows, cycled
    cfg = SAEConfig(d_in=128, d_sae=64, architecture="topk", k=4, hook_name=HOOK, token_selection="patches")
    kwargs = dict(steps=24, batch_size_tokens=128, buffer_tokens=512, lr=3e-3, progress=False, log_every=4)
    streamed, streamed_log = train_sae(clip, cfg, images, image_batch_size=8, **kwargs)
    result = run_dataset(clip, images, tmp_path / "cache", Activations(HOOK, tokens="patches"), batch_size=8,
                         progress=False)
    rows = result.activations(HOOK, rows="tokens")
    assert len(rows) == 20 * 64
    cached, cached_log = train_sae_on_activations(cfg, rows, image_batch_size=8, checkpoint_dir=tmp_path / "ckpt",
                                                  checkpoint_every=12, **kwargs)
    assert cached_log == streamed_log and len(cached_log) == 6
    for name, tensor in streamed.state_dict().items():
        assert torch.equal(cached.state_dict()[name], tensor), name
    assert cached.cfg.model_name == streamed.cfg.model_name == clip.vision.cfg.model_name
    # the same rows per image, read as one row per image, and a resumed run: still the same SAE
    resumed, _ = train_sae_on_activations(None, result.activations(HOOK), image_batch_size=8,
                                          resume=tmp_path / "ckpt" / "step_00000012", **kwargs)
    assert torch.equal(resumed.W_enc, streamed.W_enc) and torch.equal(resumed.b_dec, streamed.b_dec)
    # the buffer fills row by row, so the chunk size does not matter; the order of the images does
    smaller_chunks, _ = train_sae_on_activations(cfg, rows, image_batch_size=3, **kwargs)
    assert torch.equal(smaller_chunks.W_enc, streamed.W_enc)
    reordered = run_dataset(clip, images.roll(1, 0), tmp_path / "reordered", Activations(HOOK, tokens="patches"),
                            batch_size=8, progress=False).activations(HOOK, rows="tokens")
    assert not torch.equal(train_sae_on_activations(cfg, reordered, image_batch_size=8, **kwargs)[0].W_enc,
                           streamed.W_enc)

    with pytest.raises(TypeError, match=r"images is a ShardedRows.*train_sae_on_activations\(cfg, rows, "
                                        r"image_batch_size=\.\.\.\)"):
        train_sae(clip, cfg, rows, **kwargs)
    with pytest.raises(ValueError, match=r"have rows of shape \(128,\), which do not split into rows of 96 columns"):
        train_sae_on_activations(SAEConfig(d_in=96, d_sae=8), rows, **kwargs)
