"""``from_pretrained`` with a local checkpoint: the file's weights are really loaded, and bad names fail loudly.

The saved models have their vector parameters perturbed with a separate generator, so a
model that silently kept its random initialisation (even one drawn from the same global seed)
cannot match the saved one.
"""

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.conftest import assert_rel_close
from tests.reference._reference import perturb_vector_params_, seeded_images
from vit_lens import HookedCLIP, HookedViT


@pytest.fixture(scope="module")
def open_clip_checkpoint(tmp_path_factory):
    """A perturbed random ViT-B-32 and the path of its saved state_dict."""
    torch.manual_seed(0)
    model = perturb_vector_params_(open_clip.create_model("ViT-B-32", pretrained=None).eval(), seed=1)
    path = tmp_path_factory.mktemp("open_clip") / "ckpt.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def b32_images():
    return seeded_images(2, 224, 224, seed=2)


def test_open_clip_checkpoint_is_loaded(open_clip_checkpoint, b32_images):
    """HookedViT.from_pretrained on a checkpoint matches open_clip loading it, and the saved model."""
    original, path = open_clip_checkpoint
    torch.manual_seed(0)
    hooked = HookedViT.from_pretrained("open_clip:ViT-B-32", pretrained=str(path))
    reloaded = open_clip.create_model("ViT-B-32", pretrained=str(path)).eval()
    with torch.no_grad():
        actual = hooked(b32_images)
        assert_rel_close(actual, reloaded.encode_image(b32_images), what="vs open_clip loading the checkpoint")
        assert_rel_close(actual, original.encode_image(b32_images), what="vs the saved in-memory model")


def test_hooked_clip_checkpoint_is_loaded(open_clip_checkpoint, b32_images):
    """HookedCLIP.from_pretrained loads both towers from the checkpoint and brings the matching tokenizer."""
    original, path = open_clip_checkpoint
    torch.manual_seed(0)
    clip = HookedCLIP.from_pretrained("ViT-B-32", pretrained=str(path))
    texts = ["a photo of a dog", "a diagram"]
    tokens = open_clip.get_tokenizer("ViT-B-32")(texts)
    with torch.no_grad():
        assert_rel_close(clip.encode_image(b32_images), original.encode_image(b32_images), what="encode_image")
        assert_rel_close(clip.encode_text(texts), original.encode_text(tokens), rtol=1e-6, what="encode_text")
    assert torch.equal(clip.logit_scale, original.logit_scale)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_timm_checkpoint_is_loaded(tmp_path, fmt):
    """HookedViT.from_pretrained("timm:...") on a checkpoint matches timm loading it, and the saved model."""
    name = "vit_tiny_patch16_224"
    torch.manual_seed(0)
    original = perturb_vector_params_(timm.create_model(name, pretrained=False).eval(), seed=1)
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "pt":
        torch.save(original.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))
    torch.manual_seed(0)
    hooked = HookedViT.from_pretrained(f"timm:{name}", pretrained=str(path))
    reloaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}).eval()
    images = seeded_images(2, 224, 224, seed=2)
    with torch.no_grad():
        actual = hooked(images)
        assert_rel_close(actual, reloaded(images), what="vs timm loading the checkpoint")
        assert_rel_close(actual, original(images), what="vs the saved in-memory model")


@pytest.mark.parametrize("name", ["open_clip:ViT-B-32", "timm:vit_tiny_patch16_224"], ids=["open_clip", "timm"])
def test_missing_checkpoint_raises_file_not_found(tmp_path, name):
    """A checkpoint path that does not exist is reported as such, not as a pretrained tag or a download."""
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HookedViT.from_pretrained(name, pretrained=str(missing))
    # A bare relative file name must not fall back to a pretrained tag (for timm: a download).
    with pytest.raises(FileNotFoundError, match="'my_checkpoint.safetensors'.*does not exist"):
        HookedViT.from_pretrained(name, pretrained="my_checkpoint.safetensors")


@pytest.mark.parametrize("name", ["ViT-B-32", "openclip:ViT-B-32", "hf:vit_tiny_patch16_224"])
def test_unknown_prefix_raises(name):
    """A name without an 'open_clip:' or 'timm:' prefix is refused with the accepted forms."""
    with pytest.raises(ValueError, match="must start with a source prefix"):
        HookedViT.from_pretrained(name)


@pytest.mark.parametrize(
    "name, suggestion",
    [("open_clip:ViT-B-33", "ViT-B-32"), ("timm:vit_tiny_patch16_225", "vit_tiny_patch16_224")],
    ids=["open_clip", "timm"],
)
def test_unknown_architecture_suggests_close_names(name, suggestion):
    """A misspelt architecture raises ValueError naming it and suggesting the close real names."""
    arch = name.split(":", 1)[1]
    with pytest.raises(ValueError, match="Did you mean") as info:
        HookedViT.from_pretrained(name)
    assert repr(arch) in str(info.value)
    assert suggestion in str(info.value)
