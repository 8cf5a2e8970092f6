"""The `vit-lens` command: fast help, and a demo whose table is checked against the source model."""

import re
import subprocess
import sys

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
