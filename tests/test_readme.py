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


def test_transformer_lens_readout_block_runs():
    namespace: dict = {}
    exec(compile(first_python_block("## Coming from TransformerLens"), "README.md readout", "exec"), namespace)
    assert namespace["attrs"].shape == (namespace["model"].cfg.n_layers * namespace["model"].cfg.n_heads + 1, 16)
    assert namespace["accuracy_by_layer"].shape == (namespace["model"].cfg.n_layers + 1,)
    assert namespace["accuracy_by_layer"][-1] >= 0.9  # the toy CLIP reads shape at its output (99% on fresh images)


def test_toy_and_textspan_blocks_run():
    namespace: dict = {}
    exec(compile(first_python_block("## The built-in toy world"), "README.md toy", "exec"), namespace)
    assert namespace["batch"].images.shape == (64, 3, 64, 64) and namespace["scores"].shape == (64, 4)
    exec(compile(first_python_block("## TextSpan, head roles"), "README.md textspan", "exec"), namespace)
    assert namespace["heads"].values.shape[:2] == (500, 22)
    assert len(namespace["one"].indices) == 5 and namespace["pixels"].shape == (8, 64, 64)
    assert namespace["similar"].indices.shape == (5,) and namespace["rollout"].shape == (8, 8, 8)


def test_layer_by_layer_and_decoding_blocks_run():
    namespace: dict = {}
    exec(compile(first_python_block("## Layer by layer"), "README.md layers", "exec"), namespace)
    assert namespace["maps"].maps.shape == (64, 4, 8, 8)
    assert namespace["contribution_map"].shape == (64, 1, 8, 8)
    curves = namespace["curves"]
    assert curves.values.shape == (3, 5)  # variants x (layers 0-3, the range 1-2)
    assert all(name in curves.table() for name in ("output", "attention_input", "residual", "1-2"))
    exec(compile(first_python_block("### Decoding layers into language"), "README.md decoding", "exec"), namespace)
    assert namespace["delta"].shape == (3, 32)
    assert "convergence" in namespace["result"].report()


def test_feature_visualisation_block_runs():
    namespace: dict = {}
    exec(compile(first_python_block("## Feature visualisation"), "README.md featureviz", "exec"), namespace)
    result = namespace["result"]
    assert result.image.shape == (3, 64, 64) and 0 <= result.image.min() and result.image.max() <= 1
    assert result.activation > namespace["top"].scores.mean()
    assert namespace["patches"].grid.shape == (8, 8)


def test_beyond_clip_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(first_python_block("## Beyond CLIP"), "README.md align", "exec"), namespace)
    assert namespace["scores"].scores.shape[0] == 2 and namespace["without_texture"].shape == (400, 192)
    assert (tmp_path / "vit_tiny_to_toy_clip.safetensors").exists()


def test_supported_models_block_runs():
    namespace: dict = {}
    exec(compile(first_python_block("## Supported models"), "README.md supported models", "exec"), namespace)
    assert namespace["logits"].shape == (2, 3)


def test_planted_models_block_runs():
    namespace: dict = {}
    exec(compile(first_python_block("## Planted-mechanism models"), "README.md planted", "exec"), namespace)
    assert namespace["planted"].heads["position"] == [(0, 1), (2, 1)]
    assert sorted(namespace["predicted"]) == ["colour", "count", "position", "shape", "size", "texture"]


def test_circuits_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes the circuit's JSON
    namespace: dict = {}
    exec(compile(first_python_block("## Circuits"), "README.md circuits", "exec"), namespace)
    direct, into_hop_2 = namespace["direct"].values, namespace["into_hop_2"].values
    assert abs(direct[0, 1]) < 0.1 and direct[2, 1] > 0.6 and into_hop_2[0, 1] > 0.6
    assert namespace["graph"].n_edges == 479
    assert namespace["curve"].cpr > 0.7
    assert "edges" in (tmp_path / "position_circuit.json").read_text()


def test_sparse_autoencoder_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes the dashboard
    namespace: dict = {}
    exec(compile(first_python_block("## Sparse autoencoders"), "README.md sae", "exec"), namespace)
    result = namespace["result"]
    assert result.l0 == 16 and result.explained_variance > 0.8
    assert (namespace["features"] > 0).sum(-1).eq(16).all()
    assert "<script src=\"http" not in (tmp_path / "sae_dashboard.html").read_text()
