"""`vit-lens demo`: the HTML report on the built-in toy CLIP, and on a timm classifier."""

import re

import pytest
import torch
from PIL import Image

from vit_lens.cli import main


def test_demo_on_the_toy_model_writes_a_self_contained_report(tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["demo", "--out", str(out), "--n-images", "2", "--textspan-images", "300"]) == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed.splitlines()[-1]
    html = out.read_text()
    for heading in ["Images and their best class", "Direct effect on the best class", "Where CLS looks",
                    "TextSpan over 300 images", "Zero-shot segmentation"]:
        assert heading in html, heading
    assert '<script src="http' not in html
    # six TextSpan rows (the six heads with the largest direct effects), five descriptions each
    rows = re.findall(r"<tr><td>L(\d)H(\d)</td><td>([\d.]+)</td><td>(.*?)</td></tr>", html)
    assert len(rows) == 6 and all(row[3].count("%)") == 5 for row in rows)
    effects = [float(row[2]) for row in rows]
    assert effects == sorted(effects, reverse=True) and effects[0] > 0
    ious = [float(v) for v in re.findall(r"IoU of the map thresholded at its mean with the true mask ([\d.]+)", html)]
    assert len(ious) == 2 and all(0 <= v <= 1 for v in ious)


def test_demo_on_a_timm_classifier_explains_its_logits(tmp_path, capsys):
    image = tmp_path / "cat.png"
    Image.fromarray((torch.rand(240, 320, 3) * 255).byte().numpy()).save(image)
    out = tmp_path / "timm.html"
    assert main(["demo", "--model", "timm:vit_tiny_patch16_224", "--image", str(image), "--out", str(out)]) == 0
    html = out.read_text()
    assert "cat.png: best class" in html and "TextSpan" not in html and "Where CLS looks" in html


def test_demo_says_what_it_needs(tmp_path, capsys):
    cases = [
        (["demo", "--model", "timm:vit_tiny_patch16_224"], "needs images: pass one or more --image PATH"),
        (["demo", "--image", "x.png"], "--image needs a real model"),
        (["demo", "--model", "open_clip:ViT-B-32", "--image", str(tmp_path / "missing.jpg")], "missing.jpg"),
    ]
    for argv, message in cases:
        assert main(argv) == 2  # a usage error: one line, no traceback
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
