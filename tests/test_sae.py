"""vit_lens.sae: the SAE architectures on hand-made inputs, SAELens / ViT-Prisma files, and splicing into models."""

import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

import vit_lens
from vit_lens import HookedViT
from vit_lens.sae import SAE, SAEConfig, load_prisma_sae, load_sae, save_sae, spliced
from vit_lens.sae.splice import run_with_cache_with_saes, run_with_hooks_with_saes, run_with_saes

from tests.conftest import import_sae_lens, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

RESID = "blocks.1.hook_resid_post"
ARCHITECTURE_CASES = {"standard": None, "topk": 3, "batchtopk": 2, "jumprelu": None}


def make_sae(architecture="standard", k=None, d_in=32, d_sae=48, seed=0, **fields):
    """A random SAE with non-zero biases and thresholds, so every term of the computation matters."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, **fields)).init_weights(seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.W_dec.mul_(1 + torch.rand(sae.W_dec.shape[0], 1, generator=generator))  # decoder rows of unequal norm
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=generator))
        sae.b_dec.copy_(0.1 * torch.randn(sae.b_dec.shape, generator=generator))
        if architecture in ("jumprelu", "batchtopk"):
            sae.threshold.copy_(0.2 * torch.rand(sae.threshold.shape, generator=generator))
    return sae.eval()


def hand_sae(architecture, k=None, **fields):
    """A 4 -> 4 SAE whose pre-activations are its input: identity encoder, zero biases, identity decoder."""
    sae = SAE(SAEConfig(d_in=4, d_sae=4, architecture=architecture, k=k, apply_b_dec_to_input=False, **fields))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


X = torch.tensor([[3.0, -1.0, 0.5, 2.0], [0.25, 4.0, -2.0, 1.0]])


# ------------------------------------------------------------------ architectures on hand-made inputs


def test_standard_sae_is_relu_of_the_affine_map():
    sae = hand_sae("standard")
    assert torch.equal(sae.encode(X), torch.tensor([[3.0, 0.0, 0.5, 2.0], [0.25, 4.0, 0.0, 1.0]]))
    with torch.no_grad():
        sae.b_dec.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    sae.cfg.apply_b_dec_to_input = True  # the input is centred on b_dec before encoding
    assert torch.equal(sae.encode(X), torch.tensor([[2.0, 0.0, 0.0, 1.0], [0.0, 3.0, 0.0, 0.0]]))
    assert torch.equal(sae.decode(torch.tensor([[2.0, 0.0, 0.0, 1.0]])), torch.tensor([[3.0, 1.0, 1.0, 2.0]]))


def test_topk_keeps_exactly_k_largest_per_row():
    acts = hand_sae("topk", k=2).encode(X)
    assert torch.equal(acts, torch.tensor([[3.0, 0.0, 0.0, 2.0], [0.0, 4.0, 0.0, 1.0]]))
    assert (acts > 0).sum(-1).tolist() == [2, 2]
    # A negative winner is ReLU'd: at most k are active.
    assert torch.equal(hand_sae("topk", k=2).encode(torch.tensor([[-1.0, -2.0, 5.0, -3.0]])),
                       torch.tensor([[0.0, 0.0, 5.0, 0.0]]))


def test_topk_rescaled_by_decoder_norm_selects_by_decoded_size():
    sae = hand_sae("topk", k=1, rescale_acts_by_decoder_norm=True)
    with torch.no_grad():
        sae.W_dec[1].mul_(10.0)  # feature 1 writes 10x larger
    x = torch.tensor([[3.0, 1.0, 0.0, 0.0]])
    acts = sae.encode(x)
    assert torch.equal(acts, torch.tensor([[0.0, 10.0, 0.0, 0.0]]))  # 1 * 10 beats 3 * 1
    assert torch.allclose(sae.decode(acts), torch.tensor([[0.0, 10.0, 0.0, 0.0]]))  # acts / 10 @ W_dec


def test_batchtopk_shares_k_across_the_batch_in_training_and_uses_the_threshold_at_inference():
    sae = hand_sae("batchtopk", k=1.5)
    sae.train()
    acts = sae.encode(X)  # 1.5 * 2 rows = 3 largest of the batch: 4, 3, 2
    assert torch.equal(acts, torch.tensor([[3.0, 0.0, 0.0, 2.0], [0.0, 4.0, 0.0, 0.0]]))
    sae.update_threshold(acts, momentum=0.5)  # smallest kept activation 2: 0 -> 1
    assert torch.equal(sae.threshold, torch.full((4,), 1.0))
    sae.eval()
    assert torch.equal(sae.encode(X), torch.tensor([[3.0, 0.0, 0.0, 2.0], [0.0, 4.0, 0.0, 0.0]]))
    # At inference a row's features do not depend on the rest of the batch.
    assert torch.equal(sae.encode(X[1:]), torch.tensor([[0.0, 4.0, 0.0, 0.0]]))


def test_jumprelu_fires_above_the_threshold_and_trains_it_with_the_straight_through_estimator():
    sae = hand_sae("jumprelu", jumprelu_bandwidth=0.5)
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([2.5, 0.5, 0.4, 0.9]))
    x = X.clone().requires_grad_(True)
    acts = sae.encode(x)
    assert torch.equal(acts, torch.tensor([[3.0, 0.0, 0.5, 2.0], [0.0, 4.0, 0.0, 1.0]]))
    acts.sum().backward()
    # d acts / d x: 1 where the feature fires; d / d threshold: -threshold / bandwidth inside the window
    # |pre - threshold| < bandwidth / 2 (entries 0.5 vs 0.4 and 1.0 vs 0.9), summed over rows.
    assert torch.equal(x.grad, (acts > 0).float())
    assert torch.allclose(sae.threshold.grad, torch.tensor([0.0, 0.0, -0.4 / 0.5, -0.9 / 0.5]))


def test_sae_hook_points_see_each_stage_and_a_replacement_takes_effect():
    sae = hand_sae("standard")
    seen = {}
    sae.add_hook("hook_sae_acts_pre", lambda pre, hook: seen.setdefault("pre", pre.clone()))
    sae.add_hook("hook_sae_acts_post", lambda acts, hook: acts * 2)
    out = sae(X)
    sae.reset_hooks()
    assert torch.equal(seen["pre"], X)
    assert torch.equal(out, 2 * X.relu())


def test_error_term_makes_the_output_exact_and_passes_feature_edits_through():
    sae = make_sae("topk", k=5)
    x = torch.randn(3, 7, 32)
    assert torch.allclose(sae(x, use_error_term=True), x, atol=1e-6)
    acts = sae.encode(x)
    sae.add_hook("hook_sae_acts_post", lambda a, hook: a * torch.tensor([0.0] + [1.0] * 47))
    edited = sae(x, use_error_term=True)
    sae.reset_hooks()
    assert torch.allclose(edited, x - acts[..., :1] * sae.W_dec[0], atol=1e-5)


@pytest.mark.parametrize("mode", ["expected_average_only_in", "constant_norm_rescale", "layer_norm"])
def test_normalisations_compute_as_documented(mode):
    sae = make_sae("standard", normalize_activations=mode)
    x = 3.0 * torch.randn(5, 32)
    if mode == "expected_average_only_in":
        sae.scaling_factor = 0.25
        scale = torch.tensor(0.25)
        x_n, undo = x * scale, lambda y: y / scale
    elif mode == "constant_norm_rescale":
        scale = 32**0.5 / x.norm(dim=-1, keepdim=True)
        x_n, undo = x * scale, lambda y: y / scale
    else:
        mean, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
        x_n, undo = (x - mean) / (std + 1e-5), lambda y: y * std + mean
    acts = ((x_n - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    expected = undo(acts @ sae.W_dec + sae.b_dec)
    assert torch.allclose(sae.encode(x), acts, atol=1e-5)
    assert torch.allclose(sae(x), expected, atol=1e-5)
    if mode == "expected_average_only_in":
        assert torch.allclose(sae.decode(sae.encode(x)), expected, atol=1e-5)
        sae.fold_activation_norm_scaling_factor()
        assert sae.cfg.normalize_activations == "none" and sae.scaling_factor is None
        assert torch.allclose(sae(x), expected, atol=1e-5)
    else:
        with pytest.raises(ValueError, match=r"decode needs the input .* sae.decode\(acts, x=x\)"):
            sae.decode(acts)
        assert torch.allclose(sae.decode(acts, x=x), expected, atol=1e-5)


@pytest.mark.parametrize(("architecture", "k", "rescale"), [
    ("standard", None, False), ("jumprelu", None, False), ("batchtopk", 4, False), ("batchtopk", 4, True),
    ("topk", 4, True),
])
def test_folding_decoder_norms_keeps_the_output_and_leaves_unit_rows(architecture, k, rescale):
    sae = make_sae(architecture, k=k, rescale_acts_by_decoder_norm=rescale)
    x = torch.randn(6, 32)
    before_acts, before = sae.encode(x), sae(x)
    norms = sae.W_dec.norm(dim=-1)
    assert (norms - 1).abs().max() > 0.1
    sae.fold_W_dec_norm()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(48), atol=1e-6)
    assert torch.allclose(sae(x), before, atol=1e-5)
    expected_acts = before_acts if rescale else before_acts * norms  # features now carry their decoder's size
    assert torch.allclose(sae.encode(x), expected_acts, atol=1e-5)


def test_folding_a_topk_sae_without_rescaling_is_refused_and_unit_norm_is_a_constraint():
    sae = make_sae("topk", k=4)
    with pytest.raises(ValueError, match="would change which k features win"):
        sae.fold_W_dec_norm()
    sae.set_decoder_norm_to_unit_norm()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(48), atol=1e-6)


@pytest.mark.parametrize(("fields", "message"), [
    (dict(architecture="gated"), r"Unknown SAE architecture 'gated'; vit_lens has \('standard', 'topk'"),
    (dict(architecture="topk"), r"A 'topk' SAE needs k, an int in \[1, d_sae=48\], got k=None"),
    (dict(architecture="topk", k=49), r"got k=49"),
    (dict(k=4), r"a 'standard' SAE takes k=None"),
    (dict(d_out=16), r"d_out must equal d_in \(32\).*set hook_name_out too"),
    (dict(hook_name="a", hook_name_out="b", apply_b_dec_to_input=True), r"not possible for a transcoder"),
    (dict(hook_name_out="blocks.0.hook_mlp_out"), r"A transcoder needs hook_name"),
    (dict(token_selection="cls_only"), r"token_selection must be one of \('all', 'cls', 'patches', 'registers'\)"),
    (dict(dtype="int8"), r"dtype must be one of"),
    (dict(architecture="standard", rescale_acts_by_decoder_norm=True), r"applies to 'topk' and 'batchtopk'"),
])
def test_config_errors_name_what_was_passed_and_what_works(fields, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(d_in=32, d_sae=48, **fields)


def test_encode_refuses_activations_of_the_wrong_width():
    sae = make_sae(hook_name=RESID)
    with pytest.raises(ValueError, match=r"takes \[\.\.\., 32\] .* got shape \(2, 5, 64\); the SAE was trained on"):
        sae.encode(torch.randn(2, 5, 64))


# ------------------------------------------------------------------ files


def _transcoder(architecture, k=None, **fields):
    return make_sae(architecture, k=k, d_out=24, hook_name="blocks.0.ln2.hook_normalized",
                    hook_name_out="blocks.0.hook_mlp_out", **fields)


FILE_CASES = {
    "standard": lambda: make_sae("standard", hook_name=RESID, model_name="tiny", token_selection="patches"),
    "topk": lambda: make_sae("topk", k=5, hook_name=RESID, rescale_acts_by_decoder_norm=True),
    "batchtopk": lambda: make_sae("batchtopk", k=2.5, hook_name=RESID, token_selection="cls"),
    "batchtopk_rescaled": lambda: make_sae("batchtopk", k=3, hook_name=RESID, rescale_acts_by_decoder_norm=True),
    "jumprelu": lambda: make_sae("jumprelu", hook_name=RESID, jumprelu_bandwidth=0.01),
    "transcoder": lambda: _transcoder("standard"),
    "topk_transcoder": lambda: _transcoder("topk", k=4),
    "jumprelu_transcoder": lambda: _transcoder("jumprelu"),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_file_round_trip_keeps_config_and_outputs(case, tmp_path):
    sae = FILE_CASES[case]()
    x = torch.randn(4, 32)
    folder = save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no temporary folder left behind
    loaded = load_sae(folder)
    assert not loaded.training
    assert loaded.cfg.to_dict() == {**sae.cfg.to_dict(), "metadata": {"sae_lens_version": "6.0.0"}}
    assert torch.allclose(loaded(x), sae(x), atol=1e-5)
    assert torch.equal(loaded.encode(x) > 0, sae.encode(x) > 0)


def test_saved_config_uses_sae_lens_names(tmp_path):
    saved = json.loads((save_sae(FILE_CASES["batchtopk"](), tmp_path / "b") / "cfg.json").read_text())
    assert saved["architecture"] == "jumprelu"  # SAELens's export of BatchTopK SAEs
    assert saved["metadata"]["hook_name"] == RESID
    assert saved["metadata"]["vit_lens"]["architecture"] == "batchtopk"
    assert saved["metadata"]["vit_lens"]["token_selection"] == "cls"
    saved = json.loads((save_sae(FILE_CASES["transcoder"](), tmp_path / "t") / "cfg.json").read_text())
    assert (saved["architecture"], saved["d_out"], saved["apply_b_dec_to_input"]) == ("transcoder", 24, False)
    assert saved["metadata"]["hook_name_out"] == "blocks.0.hook_mlp_out"


def test_scaling_factor_is_folded_on_save_or_kept_in_the_activation_scaler(tmp_path):
    sae = make_sae("jumprelu", hook_name=RESID, normalize_activations="expected_average_only_in")
    sae.scaling_factor = 0.3
    x = torch.randn(4, 32)
    folded = load_sae(save_sae(sae, tmp_path / "folded"))
    assert folded.cfg.normalize_activations == "none" and folded.scaling_factor is None
    assert torch.allclose(folded(x), sae(x), atol=1e-5)
    assert sae.scaling_factor == 0.3  # the original is untouched
    kept_folder = save_sae(sae, tmp_path / "kept", fold_scaling_factor=False)
    assert json.loads((kept_folder / "activation_scaler.json").read_text()) == {"scaling_factor": pytest.approx(0.3)}
    kept = load_sae(kept_folder)
    assert (kept.cfg.normalize_activations, kept.scaling_factor) == ("expected_average_only_in", pytest.approx(0.3))
    assert torch.allclose(kept(x), sae(x), atol=1e-6)


def test_save_is_atomic_and_refuses_to_overwrite_by_accident(tmp_path, monkeypatch):
    first, second = make_sae(hook_name=RESID, seed=1), make_sae(hook_name=RESID, seed=2)
    folder = save_sae(first, tmp_path / "sae")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        save_sae(second, folder)
    with pytest.raises(TypeError, match="save_sae saves a vit_lens.sae.SAE, got a dict"):
        save_sae({}, tmp_path / "other")
    import safetensors.torch

    def failing_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_sae(second, folder, overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # the partial folder is gone, the old SAE intact
    assert torch.equal(load_sae(folder).W_enc, first.W_enc)
    save_sae(second, folder, overwrite=True)
    assert torch.equal(load_sae(folder).W_enc, second.W_enc)
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_incomplete_or_inconsistent_folders_raise_clear_errors(tmp_path):
    folder = save_sae(make_sae(hook_name=RESID), tmp_path / "sae")
    weights = (folder / "sae_weights.safetensors").read_bytes()
    config = json.loads((folder / "cfg.json").read_text())

    (folder / "sae_weights.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="is not a complete safetensors file"):
        load_sae(folder)
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has cfg.json but no sae_weights.safetensors: the SAE folder is"):
        load_sae(folder)
    (folder / "sae_weights.safetensors").write_bytes(weights)
    for change, message in [
        (dict(d_sae=64), r"W_enc has shape \(32, 48\), but the config .* needs \(32, 64\)"),
        (dict(architecture="jumprelu"), r"missing \['threshold'\]"),
        (dict(architecture="gated"), r"SAELens architecture 'gated' is not supported; vit_lens reads"),
        (dict(architecture="transcoder", d_out=32), r"names no metadata.hook_name_out"),
    ]:
        (folder / "cfg.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps(config)[:-20])
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_sae(folder)
    with pytest.raises(FileNotFoundError, match="holds no SAE"):
        load_sae(tmp_path)


def _prisma_reference(x, state, cfg, k=None):
    """ViT-Prisma's forward pass, written out: layer-norm the input, subtract b_dec, encode, decode, undo the norm."""
    mean = x.mean(-1, keepdim=True)
    std = (x - mean).std(-1, keepdim=True)
    pre = ((x - mean) / (std + 1e-5) - state["b_dec"]) @ state["W_enc"] + state["b_enc"]
    if k is None:
        acts = pre.relu()
    else:
        top = pre.topk(k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return (acts @ state["W_dec"] + state.get("b_dec_out", state["b_dec"])) * std + mean


def _prisma_folder(folder, config, state):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, folder / "n_images_2600058.pt")
    return folder


def test_prisma_sae_loads_with_its_hook_tokens_and_normalisation(tmp_path):
    generator = torch.Generator().manual_seed(3)
    state = {"W_enc": torch.randn(32, 64, generator=generator) / 6, "b_enc": torch.randn(64, generator=generator) / 10,
             "W_dec": torch.randn(64, 32, generator=generator) / 8, "b_dec": torch.randn(32, generator=generator) / 10}
    config = {"d_in": 32, "expansion_factor": 2, "hook_point_layer": 1, "layer_subtype": "hook_mlp_out",
              "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 6}, "architecture": "standard",
              "normalize_activations": "layer_norm", "use_patches_only": True, "model_name": "open-clip:tiny",
              "dtype": {"__type__": "torch.dtype", "value": "torch.float32"},
              "device": {"__type__": "torch.device", "value": "cuda"}}
    folder = _prisma_folder(tmp_path / "prisma", config, state)
    sae = load_sae(folder)  # the folder is recognised as ViT-Prisma's
    assert (sae.cfg.hook_name, sae.cfg.architecture, sae.cfg.k, sae.cfg.token_selection) == (
        "blocks.1.hook_mlp_out", "topk", 6, "patches")
    x = torch.randn(5, 32)
    assert torch.allclose(sae(x), _prisma_reference(x, state, config, k=6), atol=1e-5)
    # The legacy checkpoint with its config inside, as a plain dict.
    relu_config = {**config, "activation_fn_str": "relu", "activation_fn_kwargs": {}}
    torch.save({"cfg": relu_config, "state_dict": state}, tmp_path / "legacy.pt")
    legacy = load_prisma_sae(tmp_path / "legacy.pt")
    assert torch.allclose(legacy(x), _prisma_reference(x, state, relu_config), atol=1e-5)


def test_prisma_transcoder_folds_its_input_bias(tmp_path):
    generator = torch.Generator().manual_seed(4)
    state = {"W_enc": torch.randn(32, 64, generator=generator) / 6, "b_enc": torch.randn(64, generator=generator) / 10,
             "W_dec": torch.randn(64, 24, generator=generator) / 8, "b_dec": torch.randn(32, generator=generator),
             "b_dec_out": torch.randn(24, generator=generator)}
    config = {"d_in": 32, "d_sae": 64, "hook_point_layer": 0, "layer_subtype": "ln2.hook_normalized",
              "is_transcoder": True, "out_hook_point_layer": 0, "layer_out_subtype": "hook_mlp_out", "d_out": 24}
    sae = load_prisma_sae(_prisma_folder(tmp_path / "tc", config, state))
    assert (sae.cfg.hook_name, sae.cfg.hook_name_out, sae.cfg.normalize_activations) == (
        "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", "layer_norm")  # ViT-Prisma's default
    x = torch.randn(5, 32)
    assert torch.allclose(sae(x), _prisma_reference(x, state, config), atol=1e-5)


def test_prisma_architectures_vit_lens_lacks_are_refused(tmp_path):
    state = {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4), "b_dec": torch.zeros(4)}
    _prisma_folder(tmp_path / "g", {"d_in": 4, "d_sae": 8, "architecture": "gated"}, state)
    with pytest.raises(ValueError, match="architecture='gated' with activation_fn_str='relu' is not supported"):
        load_sae(tmp_path / "g")


# ------------------------------------------------------------------ splicing


@pytest.fixture(scope="module")
def clip():
    return vit_lens.load_toy_clip()


@pytest.fixture(scope="module")
def toy_images():
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _hook_state(model):
    points = {name: (len(p.fwd_hooks), len(p.bwd_hooks), len(p._forward_hooks), len(p._forward_pre_hooks))
              for name, p in model.hook_dict.items()}
    return points, len(model._forward_hooks), len(model._forward_pre_hooks)


@pytest.mark.parametrize("architecture", ARCHITECTURE_CASES)
def test_error_term_splice_leaves_a_hooked_vit_output_unchanged(tiny_model, images, architecture):
    sae = make_sae(architecture, k=ARCHITECTURE_CASES[architecture], hook_name=RESID)
    clean = tiny_model(images)
    spliced_out = run_with_saes(tiny_model, images, saes=[sae], use_error_term=True)
    torch.testing.assert_close(spliced_out, clean, atol=1e-5, rtol=0)
    assert (run_with_saes(tiny_model, images, saes=sae) - clean).abs().max() > 1e-2  # without it the SAE matters


def test_error_term_splice_leaves_clip_logits_unchanged_with_texts(clip, toy_images):
    texts = ["a red circle", "two blue squares", "a large striped cross"]
    saes = [make_sae("topk", k=8, d_in=128, d_sae=256, hook_name="blocks.2.hook_resid_post"),
            make_sae("jumprelu", d_in=128, d_sae=256, d_out=128, hook_name="blocks.1.ln2.hook_normalized",
                     hook_name_out="blocks.1.hook_mlp_out")]
    clean = clip(toy_images, texts)
    torch.testing.assert_close(run_with_saes(clip, toy_images, texts, saes=saes, use_error_term=True), clean,
                               atol=1e-4, rtol=0)
    assert (run_with_saes(clip, toy_images, texts, saes=saes) - clean).abs().max() > 1e-2


def test_an_sae_of_another_dtype_computes_in_its_own_and_hands_back_the_models(tiny_model, images):
    sae = make_sae("topk", k=4, hook_name=RESID).to(torch.float64)
    assert sae.cfg.dtype == "float64"
    _, cache = run_with_cache_with_saes(tiny_model, images, saes=[sae], use_error_term=True)
    assert cache[f"{RESID}.hook_sae_acts_post"].dtype == torch.float64 and cache[RESID].dtype == torch.float32
    torch.testing.assert_close(run_with_saes(tiny_model, images, saes=sae, use_error_term=True), tiny_model(images))


def test_splice_replaces_the_activation_by_the_sae_output(tiny_model, images):
    sae = make_sae("topk", k=4, hook_name=RESID)
    _, cache = tiny_model.run_with_cache(images, names_filter=RESID)
    expected = tiny_model.run_with_hooks(images, fwd_hooks=[(RESID, lambda resid, hook: sae(cache[RESID]))])
    assert torch.equal(run_with_saes(tiny_model, images, saes=[sae]), expected)


@pytest.mark.parametrize(
    ("selection", "positions"), [("cls", [0]), ("registers", [1, 2]), ("patches", list(range(3, 19)))]
)
def test_token_selection_replaces_only_the_selected_tokens(tiny_model, images, selection, positions):
    sae = make_sae("standard", hook_name=RESID, token_selection=selection)
    _, clean = tiny_model.run_with_cache(images, names_filter=RESID)
    _, cache = run_with_cache_with_saes(tiny_model, images, saes=[sae], names_filter=[
        RESID, f"{RESID}.hook_sae_acts_post"])
    others = [p for p in range(19) if p not in positions]
    assert torch.equal(cache[RESID][:, others], clean[RESID][:, others])
    torch.testing.assert_close(cache[RESID][:, positions], sae(clean[RESID][:, positions]))
    assert cache[f"{RESID}.hook_sae_acts_post"].shape == (2, len(positions), 48)


def test_token_selection_on_a_model_without_those_tokens_is_refused(images):
    model = HookedViT(tiny_config(n_registers=0, class_token=False, pool_type="avg")).init_weights(seed=0)
    for selection in ("cls", "registers"):
        with pytest.raises(ValueError, match="trained on (the CLS token|register tokens), but tiny test ViT has none"):
            run_with_saes(model, images, saes=[make_sae(hook_name=RESID, token_selection=selection)])


def test_feature_activations_are_cached_and_ablating_one_moves_the_output_by_its_decoder_row(tiny_model, images):
    sae = make_sae("standard", hook_name=RESID)
    names = [f"{RESID}.hook_sae_{part}" for part in ("input", "acts_pre", "acts_post", "recons", "error", "output")]
    out, cache = tiny_model.run_with_cache_with_saes(images, saes=[sae], use_error_term=True)
    assert set(names) <= set(cache.keys())
    acts = cache[f"{RESID}.hook_sae_acts_post"]
    feature = int(acts[:, 0].sum(0).argmax())  # a feature active on CLS
    assert acts[..., feature].abs().sum() > 0

    def ablate(a, hook):
        a[..., feature] = 0.0
        return a

    ablated = run_with_hooks_with_saes(tiny_model, images, saes=[sae], use_error_term=True,
                                       fwd_hooks=[(f"{RESID}.hook_sae_acts_post", ablate)])
    _, clean = tiny_model.run_with_cache(images, names_filter=RESID)
    predicted_resid = clean[RESID] - acts[..., feature, None] * sae.W_dec[feature]
    predicted = tiny_model.run_with_hooks(images, fwd_hooks=[(RESID, lambda resid, hook: predicted_resid)])
    torch.testing.assert_close(ablated, predicted, atol=1e-5, rtol=0)
    assert (ablated - out).abs().max() > 1e-3
    # Without the error term the output is the decoding of the ablated features.
    ablated_acts = acts.clone()
    ablated_acts[..., feature] = 0
    predicted = tiny_model.run_with_hooks(images, fwd_hooks=[(RESID, lambda resid, hook: sae.decode(ablated_acts))])
    with spliced(tiny_model, [sae]):
        without_error = tiny_model.run_with_hooks(images, fwd_hooks=[(f"{RESID}.hook_sae_acts_post", ablate)])
    torch.testing.assert_close(without_error, predicted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_error_term", [False, True])
def test_gradients_reach_the_features_through_their_decoder_rows(tiny_model, images, use_error_term):
    sae = make_sae("standard", hook_name=RESID)
    acts, output = f"{RESID}.hook_sae_acts_post", f"{RESID}.hook_sae_output"
    _, cache = run_with_cache_with_saes(tiny_model, images, saes=[sae], names_filter=[acts, output], incl_bwd=True,
                                        metric=lambda out: out.square().sum(), use_error_term=use_error_term)
    assert cache[f"{acts}_grad"].abs().sum() > 0
    torch.testing.assert_close(cache[f"{acts}_grad"], cache[f"{output}_grad"] @ sae.W_dec.detach().T, atol=1e-5,
                               rtol=1e-4)
    # A backward hook alone (nothing observes the forward pass) sees the same gradient.
    seen = {}
    with spliced(tiny_model, [sae], use_error_term=use_error_term):
        out = tiny_model.run_with_hooks(images, bwd_hooks=[(acts, lambda grad, hook: seen.setdefault("grad", grad))],
                                        reset_hooks_end=False)
        out.square().sum().backward()
        tiny_model.reset_hooks()
    torch.testing.assert_close(seen["grad"], cache[f"{acts}_grad"], atol=1e-5, rtol=1e-4)


def test_with_the_error_term_gradients_are_the_clean_models(tiny_model, images):
    sae = make_sae("jumprelu", hook_name=RESID)
    transcoder = make_sae("topk", k=4, hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out")
    pixels = images.clone().requires_grad_(True)
    (clean,) = torch.autograd.grad(tiny_model(pixels).square().sum(), pixels)
    with spliced(tiny_model, [sae, transcoder], use_error_term=True):
        (spliced_grad,) = torch.autograd.grad(tiny_model(pixels).square().sum(), pixels)
    torch.testing.assert_close(spliced_grad, clean, atol=1e-5, rtol=1e-4)
    with spliced(tiny_model, [sae, transcoder]):
        (replaced,) = torch.autograd.grad(tiny_model(pixels).square().sum(), pixels)
    assert (replaced - clean).abs().max() > 1e-3


def test_removing_the_sae_restores_the_model_exactly(tiny_model, images):
    sae = make_sae("batchtopk", k=2, hook_name=RESID)
    transcoder = make_sae("standard", hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out")
    names, hooks, state = list(tiny_model.hook_dict), _hook_state(tiny_model), tiny_model.state_dict()
    clean = tiny_model(images)
    with spliced(tiny_model, [sae, transcoder]):
        assert f"{RESID}.hook_sae_acts_post" in tiny_model.hook_dict
        assert tiny_model.hook_dict[f"{RESID}.hook_sae_acts_post"].name == f"{RESID}.hook_sae_acts_post"
        tiny_model.add_hook(f"{RESID}.hook_sae_acts_pre", lambda a, hook: None)  # left behind on purpose
        tiny_model.reset_hooks()  # a TransformerLens habit: it must not unsplice
        assert (tiny_model(images) - clean).abs().max() > 1e-2
    assert list(tiny_model.hook_dict) == names and _hook_state(tiny_model) == hooks
    assert tiny_model.state_dict().keys() == state.keys()
    assert torch.equal(tiny_model(images), clean)
    assert list(sae.hook_dict) == list(SAE(sae.cfg).hook_dict) and sae.hook_sae_acts_post.name == "hook_sae_acts_post"
    assert not sae.hook_sae_acts_pre.fwd_hooks and sae.spliced_at is None


def test_a_transcoder_reads_its_input_after_every_hook_there(tiny_model, images):
    tc = make_sae("standard", hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out")
    _, cache = tiny_model.run_with_cache(images, names_filter="blocks.0.ln2.hook_normalized")
    edited = cache["blocks.0.ln2.hook_normalized"] * 2
    with spliced(tiny_model, tc):
        out = tiny_model.run_with_hooks(images, fwd_hooks=[("blocks.0.ln2.hook_normalized", lambda x, hook: x * 2)])
    expected = tiny_model.run_with_hooks(images, fwd_hooks=[("blocks.0.hook_mlp_out", lambda y, hook: tc(edited))])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_hook_z_sae_reads_the_heads_flattened(tiny_model, images):
    name = "blocks.1.attn.hook_z"
    sae = make_sae("topk", k=4, hook_name=name, reshape_activations="hook_z")
    clean = tiny_model(images)
    out, cache = tiny_model.run_with_cache_with_saes(images, saes=[sae], use_error_term=True)
    torch.testing.assert_close(out, clean, atol=1e-5, rtol=0)
    assert cache[f"{name}.hook_sae_acts_post"].shape == (2, 19, 48)
    assert cache[name].shape == (2, 19, 4, 8)


def test_hooked_vit_methods_match_the_functions(tiny_model, images):
    sae = make_sae("jumprelu", hook_name=RESID)
    assert torch.equal(tiny_model.run_with_saes(images, saes=[sae]), run_with_saes(tiny_model, images, saes=[sae]))
    with pytest.raises(TypeError, match=r"takes the images only.*vit_lens.sae.run_with_saes\(clip, images, texts"):
        tiny_model.run_with_saes(images, ["a text"], saes=[sae])
    with pytest.raises(TypeError, match="saes must hold vit_lens.sae.SAE objects, got a Linear"):
        tiny_model.run_with_saes(images, saes=[torch.nn.Linear(2, 2)])


def test_splicing_errors_name_the_problem(tiny_model, images):
    clean = tiny_model(images)
    with pytest.raises(ValueError, match=r"takes width 32 \(its d_in\), but the activation there is \(2, 19, 64\)"):
        run_with_saes(tiny_model, images, saes=[make_sae(hook_name="blocks.1.mlp.hook_post")])
    with pytest.raises(ValueError, match=r"'blocks.1.hook_resid_pots' is no hook point .* Did you mean: 'blocks.1"):
        run_with_saes(tiny_model, images, saes=[make_sae(hook_name="blocks.1.hook_resid_pots")])
    with pytest.raises(ValueError, match=r"hook_name_out 'blocks.0.hook_mlp_in' is no hook point"):
        run_with_saes(tiny_model, images, saes=[make_sae(hook_name=RESID, hook_name_out="blocks.0.hook_mlp_in")])
    with pytest.raises(RuntimeError, match=r"found no input from 'blocks.2.hook_resid_pre'.* must run before"):
        run_with_saes(tiny_model, images, saes=[make_sae(hook_name="blocks.2.hook_resid_pre",
                                                         hook_name_out="blocks.0.hook_mlp_out")])
    with pytest.raises(ValueError, match="has no hook_name, so it cannot be spliced"):
        run_with_saes(tiny_model, images, saes=[make_sae()])
    on_meta = SAE(SAEConfig(d_in=32, d_sae=8, hook_name=RESID, device="meta"))
    with pytest.raises(ValueError, match=r"The SAE is on meta but the model is on cpu; move it with sae.to\(device\)"):
        run_with_saes(tiny_model, images, saes=on_meta)
    sae = make_sae(hook_name=RESID)
    with pytest.raises(ValueError, match="Two SAEs write the same hook point"):
        run_with_saes(tiny_model, images, saes=[sae, make_sae(hook_name=RESID)])
    with spliced(tiny_model, sae):
        with pytest.raises(ValueError, match="already spliced in at 'blocks.1.hook_resid_post'"):
            run_with_saes(tiny_model, images, saes=[sae])
        with pytest.raises(ValueError, match="Another SAE is already spliced in"):
            run_with_saes(tiny_model, images, saes=[make_sae(hook_name=RESID)])
    assert torch.equal(tiny_model(images), clean)  # every failed splice was undone


def test_the_docs_page_examples_run_and_their_numbers_hold(tmp_path, monkeypatch):
    page = (Path(__file__).parents[1] / "docs" / "sae.md").read_text()
    page = page[:page.index("\n## Train an SAE")]  # training and evaluation: tests/test_sae_training.py
    blocks = re.findall(r"^```python\n(.*?)^```", page, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for index, block in enumerate(blocks):
        exec(compile(block, f"docs/sae.md block {index}", "exec"), namespace)
    assert namespace["features"].shape == (4, 65, 512)
    assert ((namespace["features"] > 0).sum(-1) <= 16).all()
    assert sorted(p.name for p in (tmp_path / "saes" / "toy_clip_resid2").iterdir()) == [
        "cfg.json", "sae_weights.safetensors"]
    clean = namespace["clean"]
    assert (namespace["replaced"] - clean).abs().max() > 1e-2
    assert (namespace["ablated"] - clean).abs().max() > 1e-4


# ------------------------------------------------------------------ SAELens (installed beside vit_lens in .venv-tl3)

SAE_LENS_CASES = ["standard", "topk", "batchtopk", "jumprelu", "transcoder", "jumprelu_transcoder"]


@pytest.mark.parametrize("case", SAE_LENS_CASES)
def test_sae_lens_loads_what_vit_lens_saves(case, tmp_path):
    sae_lens = import_sae_lens()
    assert int(version("sae-lens").split(".")[0]) == 6
    sae = FILE_CASES[case]()
    if sae.cfg.architecture == "standard" and not sae.cfg.is_transcoder:
        sae.cfg.normalize_activations, sae.scaling_factor = "expected_average_only_in", 0.4  # folded on save
    theirs = sae_lens.SAE.load_from_disk(str(save_sae(sae, tmp_path / "sae")))
    x = torch.randn(6, 32)
    expected = {"transcoder": "Transcoder", "jumprelu_transcoder": "JumpReLUTranscoder", "topk": "TopKSAE"}.get(
        case, "JumpReLUSAE" if case in ("batchtopk", "jumprelu") else "StandardSAE")
    assert type(theirs).__name__ == expected
    torch.testing.assert_close(theirs.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs(x), sae(x), atol=1e-5, rtol=1e-5)
    assert theirs.cfg.metadata.hook_name == sae.cfg.hook_name


@pytest.mark.parametrize("case", SAE_LENS_CASES)
def test_vit_lens_loads_what_sae_lens_saves(case, tmp_path):
    sae_lens = import_sae_lens()
    ours = FILE_CASES[case]()
    theirs = sae_lens.SAE.load_from_disk(str(save_sae(ours, tmp_path / "ours")))
    theirs.save_model(str(tmp_path / "theirs"))
    loaded = load_sae(tmp_path / "theirs")
    x = torch.randn(6, 32)
    torch.testing.assert_close(loaded(x), theirs(x), atol=1e-5, rtol=1e-5)
    from vit_lens.sae import from_sae_lens

    torch.testing.assert_close(from_sae_lens(theirs)(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_a_sae_lens_object_is_refused_with_the_conversion_and_splices_once_converted(tiny_model, images):
    sae_lens = import_sae_lens()
    theirs = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=32, d_sae=48))
    with pytest.raises(TypeError, match=r"got a StandardSAE\. Convert a SAELens SAE with vit_lens.sae.from_sae_lens"):
        run_with_saes(tiny_model, images, saes=[theirs])
    with pytest.raises(TypeError, match=r"got a StandardSAE; .*vit_lens.sae.from_sae_lens\(sae\)"):
        tiny_model.run_with_saes(images, saes=theirs)
    from vit_lens.sae import from_sae_lens

    ours = from_sae_lens(theirs)
    ours.cfg.hook_name = RESID
    _, cache = tiny_model.run_with_cache(images, names_filter=RESID)
    expected = tiny_model.run_with_hooks(images, fwd_hooks=[(RESID, lambda resid, hook: theirs(cache[RESID]))])
    torch.testing.assert_close(run_with_saes(tiny_model, images, saes=ours), expected)
