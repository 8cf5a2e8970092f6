"""The README's examples run as written (offline, random weights)."""

import re

import torch
from pathlib import Path

README = (Path(__file__).parents[1] / "README.md").read_text()


def first_python_block(section: str) -> str:
    return re.search(r"```python\n(.*?)```", README.split(section, 1)[1], flags=re.DOTALL).group(1)


def test_quick_start_decomposition_and_interventions_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write files
    namespace: dict = {}
    exec(compile(first_python_block("## Quick start"), "README.md quick start", "exec"), namespace)
    assert namespace["classifier"].shape == (512, 2)
    assert namespace["ablated"].shape == namespace["embed"].shape == (2, 512)
    exec(compile(first_python_block("## Direct contributions"), "README.md decomposition", "exec"), namespace)
    assert namespace["heads"].heads().shape == (2, 12, 12, 512)
    assert namespace["patches"].shape == (2, 2, 12, 14, 14, 2)
    exec(compile(first_python_block("## Interventions"), "README.md interventions", "exec"), namespace)
    assert namespace["by_position"].values.shape == (2, 5)
    assert namespace["by_head"].values.shape == (12, 12)
    assert namespace["store"].shape == (6, len(namespace["store"].labels), 512)
    assert not torch.equal(namespace["masked"], namespace["embed"])


def test_toy_and_textspan_blocks_run():
    namespace: dict = {}
    exec(compile(first_python_block("## The built-in toy world"), "README.md toy", "exec"), namespace)
    assert namespace["batch"].images.shape == (64, 3, 64, 64) and namespace["scores"].shape == (64, 4)
    exec(compile(first_python_block("## TextSpan, head roles"), "README.md textspan", "exec"), namespace)
    assert namespace["heads"].values.shape[:2] == (500, 22)
    assert len(namespace["one"].indices) == 5 and namespace["pixels"].shape == (8, 64, 64)
    assert namespace["similar"].indices.shape == (5,) and namespace["rollout"].shape == (8, 8, 8)
