"""Loading errors name what was passed and what would work: names, checkpoint files, downloads, patch grids.

No test touches the network: downloads are checked against an empty (or hand-made) cache, and
the reachability probe is replaced; a guard turns any real connection attempt into a failure.
"""

import socket

import huggingface_hub.constants
import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.reference._reference import perturb_vector_params_
from vit_lens import HookedCLIP, HookedViT, load_toy_clip
from vit_lens.loading import hub
from vit_lens.loading.checkpoints import checkpoint_format
from vit_lens.loading.hub import HubUnavailableError, unreachable_reason

TIMM_TAG_REPO = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # the default weights of vit_tiny_patch16_224


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test at once (instead of a library retrying for half a minute)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the test tried to reach the network: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def hub_online_but_unreachable(monkeypatch, no_network):
    """HF_HUB_OFFLINE unset, and the probe finds the hub unreachable."""
    probed = []

    def probe(url, timeout=hub.PROBE_TIMEOUT_S):
        probed.append(url)
        return "[Errno -2] Name or service not known"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "unreachable_reason", probe)
    return probed


# ---------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", [None, 32, ("ViT-B-32",)])
def test_hooked_clip_from_pretrained_refuses_a_name_that_is_not_a_string(name):
    with pytest.raises(TypeError, match=r"takes an open_clip architecture name such as 'ViT-B-16'.*got"):
        HookedCLIP.from_pretrained(name)


def test_hooked_vit_from_pretrained_refuses_a_name_that_is_not_a_string():
    with pytest.raises(TypeError, match=r"must be a string such as 'open_clip:ViT-B-16'.*got None"):
        HookedViT.from_pretrained(None)


def test_hooked_clip_sends_a_timm_name_to_hooked_vit():
    with pytest.raises(ValueError, match=r"'timm:vit_tiny_patch16_224' is a timm image model.*HookedViT.from_pretrained"):
        HookedCLIP.from_pretrained("timm:vit_tiny_patch16_224")


@pytest.mark.parametrize(
    "name, pretrained, listed",
    [("open_clip:ViT-B-32", "opena", "openai"), ("timm:vit_tiny_patch16_224", "augreg_in22k", "augreg_in21k")],
    ids=["open_clip", "timm"],
)
def test_an_unknown_pretrained_tag_lists_the_real_ones(name, pretrained, listed):
    with pytest.raises(ValueError, match=repr(pretrained).replace(".", r"\.")) as info:
        HookedViT.from_pretrained(name, pretrained=pretrained)
    assert listed in str(info.value)


# ---------------------------------------------------------------------------------------------- checkpoint files


@pytest.mark.parametrize("name", ["open_clip:ViT-B-32", "timm:vit_tiny_patch16_224"], ids=["open_clip", "timm"])
def test_a_directory_as_pretrained_is_reported_as_a_directory_naming_the_file_inside(tmp_path, name):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "README.md").write_text("not a checkpoint")
    with pytest.raises(IsADirectoryError, match="is a directory, not a checkpoint file") as info:
        HookedViT.from_pretrained(name, pretrained=str(tmp_path))
    assert str(tmp_path / "model.safetensors") in str(info.value) and "README" not in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IsADirectoryError, match=r"holds no checkpoint file \(\.pt, \.pth"):
        HookedViT.from_pretrained(name, pretrained=str(empty))


def test_a_relative_directory_name_is_a_directory_not_a_tag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_weights").mkdir()
    with pytest.raises(IsADirectoryError, match="'my_weights'.*is a directory"):
        HookedViT.from_pretrained("timm:vit_tiny_patch16_224", pretrained="my_weights")


@pytest.fixture(scope="module")
def tiny_timm_files(tmp_path_factory):
    """A one-block vit_tiny_patch16_224 (14x14 grid), saved by torch.save and as safetensors."""
    torch.manual_seed(0)
    model = perturb_vector_params_(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1).eval(), seed=1)
    folder = tmp_path_factory.mktemp("tiny_timm")
    torch.save(model.state_dict(), folder / "tiny.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "tiny.safetensors"))
    return model, folder


def test_checkpoint_formats_are_read_from_the_bytes(tiny_timm_files, tmp_path):
    _, folder = tiny_timm_files
    (tmp_path / "notes.txt").write_text("hello")
    assert checkpoint_format(folder / "tiny.pt") == "pytorch"
    assert checkpoint_format(folder / "tiny.safetensors") == "safetensors"
    assert checkpoint_format(tmp_path / "notes.txt") == "unknown"


def test_a_safetensors_file_whose_header_length_starts_with_byte_0x80_is_safetensors(tmp_path):
    # The first byte of a safetensors file is the lowest byte of its header length: 0x80 for one length in 256,
    # the byte that also opens a pickle. Grow the metadata until the header length ends in 0x80.
    import torch
    from safetensors.torch import save_file

    tensors = {"a": torch.zeros(2), "b": torch.ones(3)}
    for pad in range(300):
        path = tmp_path / f"m{pad}.safetensors"
        save_file(tensors, str(path), metadata={"note": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        raise AssertionError("no metadata length gave a header length ending in 0x80")
    assert checkpoint_format(path) == "safetensors"
    torch.save(tensors, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert (tmp_path / "legacy.pt").read_bytes()[0] == 0x80 and checkpoint_format(tmp_path / "legacy.pt") == "pytorch"


@pytest.mark.parametrize(
    "source, renamed, message",
    [
        ("tiny.pt", "pickle.safetensors", r"PyTorch pickle file .* its \.safetensors suffix .* rename it to end in \.pt"),
        ("tiny.safetensors", "safe.pt", r"safetensors file, but its \.pt suffix sends it to torch\.load: rename it to end "
                                        r"in \.safetensors"),
    ],
    ids=["pickle_named_safetensors", "safetensors_named_pt"],
)
def test_a_checkpoint_whose_suffix_lies_is_named_for_what_it_is(tiny_timm_files, tmp_path, source, renamed, message):
    _, folder = tiny_timm_files
    (tmp_path / renamed).write_bytes((folder / source).read_bytes())
    with pytest.raises(ValueError, match=message):
        HookedViT.from_pretrained("timm:vit_tiny_patch16_224", pretrained=str(tmp_path / renamed), depth=1)


def test_load_toy_clip_names_a_pytorch_file_and_how_to_convert_it(tiny_timm_files):
    _, folder = tiny_timm_files
    with pytest.raises(ValueError, match=r"tiny\.pt' is a PyTorch pickle file .*never unpickles.*save_file\(torch\.load"):
        load_toy_clip(folder / "tiny.pt")


def test_load_toy_clip_names_a_safetensors_file_without_the_toy_metadata(tiny_timm_files):
    _, folder = tiny_timm_files
    with pytest.raises(ValueError, match=r"tiny\.safetensors is a safetensors file but not a toy CLIP checkpoint: its "
                                         r"metadata lacks vision_config, text_config"):
        load_toy_clip(folder / "tiny.safetensors")


def test_load_toy_clip_names_a_file_that_is_no_checkpoint_and_a_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt' is not a safetensors file .*save_toy_clip writes"):
        load_toy_clip(tmp_path / "notes.txt")
    with pytest.raises(IsADirectoryError, match="is a directory; load_toy_clip takes a .safetensors file"):
        load_toy_clip(tmp_path)


# ---------------------------------------------------------------------------------------------- patch grids


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a_checkpoint_for_another_patch_grid_is_refused_unless_resampling_is_asked_for(tiny_timm_files, fmt):
    original, folder = tiny_timm_files
    path = str(folder / f"tiny.{fmt}")
    with pytest.raises(ValueError, match=r"a 14x14 patch grid \(197 position rows\), but timm:vit_tiny_patch16_384 has a "
                                         r"24x24 patch grid \(577 rows\).*resample_pos_embed=True"):
        HookedViT.from_pretrained("timm:vit_tiny_patch16_384", pretrained=path, depth=1)

    resampled = HookedViT.from_pretrained("timm:vit_tiny_patch16_384", pretrained=path, depth=1, resample_pos_embed=True)
    expected = timm.layers.resample_abs_pos_embed(original.pos_embed.detach(), (24, 24), num_prefix_tokens=1)[0]
    torch.testing.assert_close(resampled.W_pos, expected)


def test_an_open_clip_checkpoint_for_another_patch_grid_is_refused(tmp_path, monkeypatch):
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    }
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "vit-lens-test-tiny", config)
    torch.manual_seed(0)
    path = tmp_path / "tiny_clip.pt"
    torch.save(open_clip.create_model("vit-lens-test-tiny").state_dict(), path)
    with pytest.raises(ValueError, match=r"a 4x4 patch grid \(17 position rows\), but open_clip:vit-lens-test-tiny has a 5x5"):
        HookedViT.from_pretrained("open_clip:vit-lens-test-tiny", pretrained=str(path), force_image_size=40)
    same = HookedViT.from_pretrained("open_clip:vit-lens-test-tiny", pretrained=str(path))
    assert same.cfg.grid_size == (4, 4)


# ---------------------------------------------------------------------------------------------- downloads


HUB_REPOSITORY = "from the Hugging Face Hub repository"


@pytest.mark.parametrize(
    "name, pretrained, file",
    [
        ("timm:vit_tiny_patch16_224", True, f"model.safetensors or pytorch_model.bin {HUB_REPOSITORY} {TIMM_TAG_REPO}"),
        ("open_clip:ViT-B-32", "openai",
         f"open_clip_model.safetensors or open_clip_pytorch_model.bin {HUB_REPOSITORY} timm/vit_base_patch32_clip_224.openai"),
    ],
    ids=["timm", "open_clip"],
)
def test_offline_download_names_the_model_the_file_and_the_fix(tmp_path, no_network, name, pretrained, file):
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # tests/conftest.py
    with pytest.raises(HubUnavailableError) as info:
        HookedViT.from_pretrained(name, pretrained=pretrained, cache_dir=str(tmp_path))
    message = str(info.value)
    assert name in message and file in message
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in message and "pretrained='path/to/file'" in message


def test_unreachable_hub_fails_at_once_naming_the_fix(tmp_path, hub_online_but_unreachable):
    with pytest.raises(HubUnavailableError) as info:
        HookedViT.from_pretrained("timm:vit_tiny_patch16_224", pretrained=True, cache_dir=str(tmp_path))
    message = str(info.value)
    assert f"needs model.safetensors or pytorch_model.bin {HUB_REPOSITORY} {TIMM_TAG_REPO}" in message
    assert "huggingface.co cannot be reached" in message
    assert "pass a local checkpoint file" in message and "set HF_HUB_OFFLINE=1" in message
    assert hub_online_but_unreachable == ["https://huggingface.co"]


def test_cached_weights_load_without_retrying_an_unreachable_hub(tmp_path, tiny_timm_files, hub_online_but_unreachable):
    """A file in the hub cache loads at once when the hub cannot be reached (no network attempt at all)."""
    original, folder = tiny_timm_files
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / f"models--{TIMM_TAG_REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model.safetensors").write_bytes((folder / "tiny.safetensors").read_bytes())

    model = HookedViT.from_pretrained("timm:vit_tiny_patch16_224", pretrained=True, cache_dir=str(tmp_path), depth=1)
    torch.testing.assert_close(model.blocks[0].attn.b_O, original.blocks[0].attn.proj.bias.detach(), rtol=0, atol=0)
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline mode was scoped to the load


def test_the_probe_is_a_short_connect_to_the_host():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert unreachable_reason(f"http://127.0.0.1:{port}/some/path", timeout=2.0) is None
    finally:
        server.close()
    assert "refused" in unreachable_reason(f"http://127.0.0.1:{port}", timeout=2.0).lower()


def test_blip2_hub_name_offline_fails_at_once_naming_the_fix(tmp_path, monkeypatch, no_network):
    from vit_lens import HookedBlip2

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(HubUnavailableError) as info:
        HookedBlip2.from_pretrained("Salesforce/blip2-opt-2.7b")
    message = str(info.value)
    assert "transformers:Salesforce/blip2-opt-2.7b" in message and "config.json" in message
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in message
