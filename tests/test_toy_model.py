"""The shipped toy CLIP: loads offline, is a HookedCLIP, and reads its world's factors as the model card says."""

import pytest
import torch

import vit_lens
from tests.conftest import assert_rel_close
from vit_lens.toy import FACTORS, ToyWorld, build_toy_clip, factor_prompts, save_toy_clip


@pytest.fixture(scope="module")
def clip():
    return vit_lens.load_toy_clip()


def test_shipped_model_is_a_hooked_clip_with_its_card(clip):
    assert isinstance(clip, vit_lens.HookedCLIP) and isinstance(clip.vision, vit_lens.HookedViT)
    cfg = clip.vision.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.grid_size, cfg.d_proj) == (4, 4, 128, (8, 8), 64)
    assert clip.card["trained"] == "2026-11-24" and "--init" in clip.card["command"]


def test_zero_shot_accuracy_per_factor_on_fresh_images(clip):
    batch = ToyWorld(seed=31).sample(400)
    with torch.no_grad():
        image = clip.encode_image(batch.images, normalize=True)
        accuracy = {
            f: (image @ clip.encode_text(factor_prompts(f), normalize=True).T).argmax(1).eq(batch.factors[f]).float().mean().item()
            for f in FACTORS
        }
    # every factor is learnt (the model card has the figures on 2,000 images), shape and count included
    assert min(accuracy.values()) > 0.95, accuracy


def test_save_and_load_round_trip(tmp_path):
    model = build_toy_clip(seed=3)
    save_toy_clip(model, tmp_path / "m.safetensors", {"note": "test"})
    loaded = vit_lens.load_toy_clip(tmp_path / "m.safetensors")
    images = ToyWorld(seed=0).sample(4).images
    with torch.no_grad():
        # float16 storage: the embeddings agree to float16 precision
        expected = model.half().float().encode_image(images)
        torch.testing.assert_close(loaded.encode_image(images), expected, rtol=1e-4, atol=1e-4)
    assert loaded.card == {"note": "test"}
    with pytest.raises(FileNotFoundError, match="no toy CLIP checkpoint at"):
        vit_lens.load_toy_clip(tmp_path / "missing.safetensors")


def test_folding_the_input_standardisation_is_exact_and_invertible():
    from vit_lens.toy.train import PIXEL_MEAN, PIXEL_STD, fold_input_standardisation

    vision = build_toy_clip(seed=5).vision.eval()
    images = ToyWorld(seed=3).sample(4).images
    on_standardised = vision((images - PIXEL_MEAN) / PIXEL_STD)
    fold_input_standardisation(vision)
    assert_rel_close(vision(images), on_standardised, 1e-5)
    fold_input_standardisation(vision, unfold=True)
    assert_rel_close(vision((images - PIXEL_MEAN) / PIXEL_STD), on_standardised, 1e-5)


def test_the_training_recipe_runs_end_to_end_and_locks_the_image_tower(tmp_path, capsys):
    """Two supervised steps, then two contrastive ones with the image tower locked (the shipped recipe, tiny)."""
    from vit_lens.toy.train import main

    out = tmp_path / "toy.safetensors"
    assert main(["--out", str(out), "--supervised-steps", "2", "--steps", "2", "--batch-size", "8", "--warmup", "1",
                 "--focus-probability", "0.5", "--image-lr-scale", "0"]) == 0
    warm, final = vit_lens.load_toy_clip(f"{out}.supervised"), vit_lens.load_toy_clip(out)
    for name, param in warm.vision.state_dict().items():
        assert torch.equal(param, final.vision.state_dict()[name]), name  # locked: not one weight moved
    text_moved = [not torch.equal(p, final.text_model.state_dict()[n]) for n, p in warm.text_model.state_dict().items()]
    assert any(text_moved)
    assert "image tower      2/2" in capsys.readouterr().out
