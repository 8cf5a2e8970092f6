"""The `vit-lens` command: fast help, a demo whose table is checked against the source model, and one-line errors
that come before any expensive work."""

import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from vit_lens.cli import main


def test_help_does_not_import_torch_or_transformer_lens():
    code = "import sys; from vit_lens import cli; print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_check_prints_a_per_layer_table_that_matches_the_source(capsys):
    assert main(["check", "--model", "timm:vit_tiny_patch16_224", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d+)\s+[\d.]+\s+[\d.]+\s+H\d+ \d+%\s+([\d.e+-]+)$", out, flags=re.MULTILINE)
    assert [int(layer) for layer, _ in rows] == list(range(12))
    assert max(float(error) for _, error in rows) < 1e-5
    assert re.search(r"output \(1, 1000\): relative error vs the source model", out)


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture
def nothing_is_built(monkeypatch):
    """Every way the CLI builds a model raises: a test using this shows an error came before any expensive work."""

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    import vit_lens.loading
    import vit_lens.toy
    from vit_lens.model.clip import HookedCLIP

    monkeypatch.setattr(vit_lens.loading, "load_source_model", built)
    monkeypatch.setattr(vit_lens.toy, "load_toy_clip", built)
    monkeypatch.setattr(HookedCLIP, "from_pretrained", classmethod(built))


def test_an_unknown_model_is_one_line_and_a_non_zero_exit_from_the_installed_command():
    """The issue's done-means: `vit-lens check --model open_clip:ViT-B-99` prints at most three lines."""
    result = subprocess.run(
        [sys.executable, "-m", "vit_lens.cli", "check", "--model", "open_clip:ViT-B-99"],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300, check=False,
    )
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1
    assert len(lines) <= 3, lines
    assert "Traceback" not in result.stderr
    assert "Unknown model 'ViT-B-99'. Did you mean: ViT-B-32" in result.stderr


def test_pretrained_weights_that_cannot_be_downloaded_are_one_error_line(capsys, tmp_path, monkeypatch):
    """The issue's 61 lines of three chained tracebacks for `--pretrained` offline: now one line and the hint."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), "orange").save(image)
    argv = ["demo", "--model", "timm:vit_tiny_patch16_224", "--pretrained", "augreg_in21k", "--image", str(image),
            "--out", str(tmp_path / "report.html")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1] == "(add --debug to see the traceback)", err
    assert "HubUnavailableError" in err[0] and "vit_tiny_patch16_224" in err[0] and "HF_HUB_OFFLINE=1" in err[0]


def test_debug_shows_the_traceback(capsys):
    assert main(["check", "--model", "timm:vit_tiny_patch16_225"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("vit-lens check: error: ValueError: Unknown model 'vit_tiny_patch16_225'")
    assert err[1] == "(add --debug to see the traceback)" and len(err) == 2
    with pytest.raises(ValueError, match="Unknown model 'vit_tiny_patch16_225'"):
        main(["check", "--model", "timm:vit_tiny_patch16_225", "--debug"])


def _one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == "", (captured.out, lines)
    return lines[0]


def test_a_text_file_given_as_image_fails_before_the_model_is_built(tmp_path, capsys, nothing_is_built):
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list")
    line = _one_error_line(capsys, ["demo", "--model", "open_clip:ViT-B-32", "--image", str(notes)])
    assert line == f"vit-lens demo: error: --image {notes} is not an image file PIL can read; pass a JPEG, PNG, WebP, BMP or TIFF file"
    for argv in (["--image", str(tmp_path / "missing.png")], ["--image", str(tmp_path)]):
        assert "--image" in _one_error_line(capsys, ["demo", "--model", "timm:vit_tiny_patch16_224", *argv])


def test_a_real_image_passes_the_checks_and_the_model_is_built_next(tmp_path, capsys, nothing_is_built):
    image = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(image)
    assert main(["demo", "--model", "timm:vit_tiny_patch16_224", "--image", str(image),
                 "--out", str(tmp_path / "r.html")]) == 1
    assert "a model was built before the arguments were checked" in capsys.readouterr().err


@pytest.mark.parametrize(
    "out, message",
    [
        ("{tmp}", "--out {tmp} is a directory; pass a file path such as {tmp}/vit_lens_report.html"),
        ("{tmp}/missing/r.html", "--out {tmp}/missing/r.html: the directory {tmp}/missing does not exist"),
        ("{tmp}/notes.txt/r.html", "--out {tmp}/notes.txt/r.html: {tmp}/notes.txt is not a directory"),
    ],
    ids=["directory", "missing_directory", "under_a_file"],
)
def test_an_unwritable_output_path_fails_before_the_model_is_built(tmp_path, capsys, nothing_is_built, out, message):
    (tmp_path / "notes.txt").write_text("a file")
    line = _one_error_line(capsys, ["demo", "--out", out.format(tmp=tmp_path)])
    assert line.startswith("vit-lens demo: error: " + message.format(tmp=tmp_path)), line


@pytest.mark.parametrize("flag", ["--n-images", "--textspan-images", "--threads"])
def test_a_count_below_one_names_the_flag_and_the_valid_range(capsys, flag):
    with pytest.raises(SystemExit) as info:
        main(["demo", flag, "0"])
    assert info.value.code == 2
    assert f"argument {flag}: must be 1 or more, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--image", "x.png"], "--image needs a real model"),
        (["demo", "--pretrained", "openai"], "--pretrained needs a real model"),
        (["demo", "--model", "open_clip:ViT-B-32"], "--model open_clip:ViT-B-32 needs images"),
        (["demo", "--model", "ViT-B-32"], "--model ViT-B-32: use 'toy', 'open_clip:<arch>'"),
        (["check", "--model", "resnet50"], "--model resnet50: use 'open_clip:<arch>'"),
    ],
    ids=["toy_image", "toy_pretrained", "no_image", "no_prefix", "check_no_prefix"],
)
def test_argument_combinations_are_refused_before_any_work(capsys, nothing_is_built, argv, message):
    assert message in _one_error_line(capsys, argv)


def test_demo_reports_a_misspelt_model_before_announcing_the_load(tmp_path, capsys, nothing_is_built):
    image = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(image)
    assert main(["demo", "--model", "timm:vit_tiny_patch16_225", "--image", str(image), "--out", str(tmp_path / "r.html")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "Unknown model 'vit_tiny_patch16_225'" in captured.err
