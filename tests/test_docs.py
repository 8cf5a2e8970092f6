"""The docs pages' examples run as written: every ```python block of docs/from_transformer_lens.md, in order.

Blocks fenced as ```python no-run (downloads of real weights) are shown only.
"""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).parents[1] / "docs"


def python_blocks(page: str) -> list[str]:
    """The runnable blocks of a page: fenced exactly ```python (not ```python no-run)."""
    return re.findall(r"^```python\n(.*?)^```", (DOCS / page).read_text(), flags=re.DOTALL | re.MULTILINE)


def test_the_page_has_runnable_blocks_and_skips_the_no_run_ones():
    text = (DOCS / "from_transformer_lens.md").read_text()
    blocks = python_blocks("from_transformer_lens.md")
    assert len(blocks) >= 10
    assert "```python no-run" in text and not any("from_pretrained(\"ViT-B-32\"" in block for block in blocks)


@pytest.mark.usefixtures("one_thread")
def test_from_transformer_lens_examples_run_and_their_numbers_hold():
    namespace: dict = {}
    for index, block in enumerate(python_blocks("from_transformer_lens.md")):
        exec(compile(block, f"docs/from_transformer_lens.md block {index}", "exec"), namespace)
    model = namespace["model"]
    assert namespace["labels"][:2] == ["CLS", "P(0,0)"] and len(namespace["labels"]) == model.cfg.n_ctx == 65
    assert namespace["logits"].shape == (4, 3) and namespace["pooled"].shape == (4, 128)
    assert namespace["resid_grid"].shape == (4, 8, 8, 128) and namespace["cls_maps"].shape == (4, 4, 8, 8)
    assert sorted(namespace["patterns"]) == [0, 1, 2, 3]
    assert namespace["patch_to_resid"].shape == (3 * 8 * 8, 128)
    # The decomposition identities the page states.
    assert namespace["dla_error"] < 1e-4 and namespace["lens_error"] < 1e-4
    assert namespace["folding_error"] < 1e-4
    # TL's hand-written patching loop, vit_lens.tl_patching and TL's attribution recipe agree.
    resid_pre = namespace["resid_pre"]
    assert resid_pre.shape == (4, 65) and namespace["heads"].shape == (4, 4)
    assert ((namespace["patched"] - resid_pre).abs().max() / resid_pre.abs().max()) < 1e-5
    assert namespace["attribution_error"] < 1e-4 * namespace["head_attr"].abs().max()
    assert namespace["grid"].shape == (4, 8, 8)  # the patching result on the image grid
    assert all(param.grad is None for param in model.parameters())


@pytest.mark.usefixtures("one_thread")
def test_circuits_page_example_runs_and_its_claims_hold(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes its JSON
    blocks = python_blocks("circuits.md")
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "docs/circuits.md", "exec"), namespace)
    # the colour head reads the colour at the object patches through its values; the background is the same
    # pixels in both images of a pair, so the edge carries nothing there
    assert namespace["reads_objects"] > 5.0 and namespace["reads_background"] == 0.0
    assert namespace["colour_head_direct"] > 0.8
