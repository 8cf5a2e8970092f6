"""docs/supported_models.md is exactly what tools/supported_models.py generates from the equivalence tests."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("supported_models", ROOT / "tools" / "supported_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_table_is_the_generated_one():
    generated = _generator().render()
    committed = (ROOT / "docs" / "supported_models.md").read_text()
    assert committed == generated, "docs/supported_models.md is stale: run `python tools/supported_models.py`"


def test_every_family_of_the_issue_has_an_exact_row():
    rows = _generator().rows()
    exact = " ".join(model for model, _, status in rows if status.startswith("exact"))
    for family in ("ViT-B-16", "EVA01-g-14", "EVA02-B-16", "SigLIP", "SigLIP2", "CLIPVisionModel",
                   "ViTForImageClassification", "Dinov2WithRegistersModel", "SiglipVisionModel", "reg4_dinov2"):
        assert family in exact, family
    assert all(status.startswith(("exact to 1e-5 (`tests/reference/", "refused: ")) for _, _, status in rows)
