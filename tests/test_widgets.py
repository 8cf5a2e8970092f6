"""The notebook explorers (vit_lens.widgets), kernel side: every number they show is vit_lens's own.

Changing a traitlet the page sends back (the query patch, the painted region, the fill, the metric,
the selected head) must recompute in the kernel, and what the widget then holds must equal what
activation_patching / direct_contributions / run_with_cache return for the same inputs. The page
itself is tested in a real browser by tests/test_widgets_browser.py.
"""

import importlib
import json
import sys

import pytest
import torch

# anywidget is in the test extras, so the suite always runs these; the skip is for a bare `pip install vit_lens`.
pytest.importorskip("anywidget", reason="vit_lens.widgets needs anywidget: pip install 'vit_lens[widgets]'")

import vit_lens
from vit_lens.intervene.decompose import direct_contributions
from vit_lens.intervene.patching import activation_patching
from vit_lens.toy import ToyWorld, factor_prompts
from vit_lens.widgets import DecompositionExplorer, PatchExplorer, PatchingExplorer


@pytest.fixture(scope="module")
def clip():
    torch.set_grad_enabled(False)
    yield vit_lens.load_toy_clip()
    torch.set_grad_enabled(True)


@pytest.fixture(scope="module")
def pair():
    world = ToyWorld(seed=3)
    scene = world.sample_scenes(1, seed=5, count="one", colour="red")[0]
    return world.render([scene]).images[0], world.render([scene.with_object_colour(0, "blue")]).images[0]


def _rounded(values: torch.Tensor) -> list:
    return values.double().round(decimals=6).tolist()


def test_short_name_is_the_widgets_package():
    assert vit_lens.widgets is importlib.import_module("vit_lens.viz.widgets")
    assert vit_lens.widgets.PatchExplorer is PatchExplorer


def test_patch_explorer_follows_the_query(clip, pair):
    clean, _ = pair
    explorer = PatchExplorer(clip, clean)
    _, cache = clip.vision.run_with_cache(clean[None])
    assert explorer.query == 0 and explorer.token_labels[0] == "CLS"
    explorer.query = 17
    for layer in range(4):
        for head in range(4):
            expected = cache["pattern", layer][0, head, 17]
            assert torch.equal(explorer.attention[layer, head], expected)
            assert explorer.attention_rows[layer][head] == _rounded(expected)
    assert explorer.attention_rows[2][1] != _rounded(cache["pattern", 2][0, 1, 0])  # really moved off CLS


def test_patch_explorer_terms_are_the_tokens_direct_contributions(clip, pair):
    clean, _ = pair
    texts = factor_prompts("colour")
    explorer = PatchExplorer(clip, clean, texts=texts, query=20, top_k=3)
    _, cache = clip.vision.run_with_cache(clean[None])
    terms = direct_contributions(clip.vision, cache, level="head_token", directions=clip.encode_text(texts, normalize=True).T)
    by_label = {label: terms.values[0, i] for i, label in enumerate(terms.labels)}
    assert len(explorer.terms) == 3
    values = []
    for term in explorer.terms:
        expected = by_label[f"{term['head']}T20"][texts.index(term["text"])]
        assert term["value"] == round(float(expected), 6)
        values.append(abs(term["value"]))
    assert values == sorted(values, reverse=True)
    explorer.query = 0
    assert [t["value"] for t in explorer.terms] != values  # recomputed for CLS


def test_patching_explorer_equals_activation_patching(clip, pair):
    clean, corrupted = pair
    explorer = PatchingExplorer(clip, clean, corrupted, metric="factor:colour")
    _, cache = clip.vision.run_with_cache(clean[None])
    metric = explorer.metric_function()
    expected = activation_patching(clip.vision, corrupted[None], cache, metric, activation="resid_pre", by="position")
    heads = activation_patching(clip.vision, corrupted[None], cache, metric, activation="z", by="head")
    assert torch.equal(explorer.result.values, expected.values)
    assert torch.equal(explorer.head_result.values, heads.values)
    assert explorer.position_values == _rounded(expected.normalized().values)
    assert explorer.baselines["clean"] > 0 > explorer.baselines["corrupted"]  # red versus blue, read by the toy CLIP
    # at layer 0 the colour sits on the object's own patches: patching them restores the most
    changed = (clean != corrupted).any(dim=0).reshape(8, 8, 8, 8).any(dim=(1, 3)).flatten()
    first_layer = expected.normalized().values[0, 1:]
    assert first_layer[changed].max() == first_layer.max() > 0.05
    assert explorer.layer_labels == ["L0", "L1", "L2", "L3"] and explorer.head_labels == ["H0", "H1", "H2", "H3"]
    before = explorer.result
    explorer.region = [0, 1]  # painting while the corrupted run is the other image changes nothing yet
    assert explorer.result is before


def test_painting_a_region_recomputes(clip, pair):
    clean, corrupted = pair
    rows, cols = 8, 8
    changed = (clean != corrupted).any(dim=0).reshape(rows, 8, cols, 8).any(dim=(1, 3)).flatten()
    region = changed.nonzero().flatten().tolist()  # the object's patches
    explorer = PatchingExplorer(clip, clean, corrupted, metric=["factor:colour", "text:one red object"], fill="swap",
                                region=region)
    # swapping the object's patches from the other image is that image, pixel for pixel
    assert torch.equal(explorer.corrupted_image, corrupted)
    swapped_values = explorer.position_values
    explorer.fill = "mean"
    assert explorer.position_values != swapped_values
    mean_fill = explorer.corrupted_image
    outside = ~changed.reshape(rows, cols).repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert torch.equal(mean_fill[:, outside], clean[:, outside])
    assert torch.allclose(mean_fill[:, ~outside], clean.mean(dim=(1, 2))[:, None].expand(3, int((~outside).sum())))
    _, cache = clip.vision.run_with_cache(clean[None])
    expected = activation_patching(clip.vision, mean_fill[None], cache, explorer.metric_function(), activation="resid_pre")
    assert torch.equal(explorer.result.values, expected.values)
    explorer.metric = "text:one red object"
    text = clip.encode_text(["one red object"], normalize=True)[0]
    clean_cosine = float(torch.nn.functional.normalize(clip.vision(clean[None]), dim=-1)[0] @ text)
    assert explorer.baselines["clean"] == pytest.approx(clean_cosine, abs=1e-6)
    figure = explorer.figure("head")
    assert figure.data[0].z is not None and len(figure.data[0].z) == 4


def test_patching_explorer_refuses_bad_choices(clip, pair):
    clean, corrupted = pair
    with pytest.raises(ValueError, match="needs a metric"):
        PatchingExplorer(clip, clean, corrupted)
    with pytest.raises(ValueError, match="'class', 'text' or 'factor'"):
        PatchingExplorer(clip, clean, corrupted, metric="logit:3")
    with pytest.raises(ValueError, match=r"fill='swap' is not available here; choose from \['mean', 'blur'\]"):
        PatchingExplorer(clip, clean, metric="factor:colour", fill="swap")
    with pytest.raises(ValueError, match="unknown factor 'hue'"):
        PatchingExplorer(clip, clean, corrupted, metric="factor:hue")
    explorer = PatchingExplorer(clip, clean, metric="class:0", fill="blur")
    with pytest.raises(ValueError, match="region patch=64 is out of range"):
        explorer.region = [64]
    assert "region patch=64" in explorer.error  # the page shows it too


def test_decomposition_explorer_equals_direct_contributions(clip):
    images = ToyWorld(seed=4).sample(12, seed=9).images
    texts = factor_prompts("colour")
    explorer = DecompositionExplorer(clip, images, texts=texts, top_k=3)
    _, cache = clip.vision.run_with_cache(images)
    heads = direct_contributions(clip.vision, cache, level="head", directions=clip.encode_text(texts, normalize=True).T).heads()
    assert torch.equal(explorer.contributions, heads)
    assert explorer.head_means[1] == _rounded(heads[..., 1].mean(0).flatten())
    per_head = heads[..., 2].flatten(1)  # [image, head]
    assert explorer.top_images[2][5] == per_head[:, 5].argsort(descending=True)[:3].tolist()
    explorer.direction = 2
    explorer.selected_head = "L3H1"
    token_map = explorer.head_token_map()
    # head x token terms sum to the head's term (exact decomposition at the pooled query)
    assert token_map.sum().item() == pytest.approx(heads[:, 3, 1, 2].mean().item(), abs=1e-5)
    assert explorer.token_values == _rounded(token_map)
    with pytest.raises(ValueError, match="exactly one of texts"):
        DecompositionExplorer(clip, images)


def test_to_html_writes_a_page_without_a_kernel(clip, pair, tmp_path):
    clean, _ = pair
    explorer = PatchExplorer(clip, clean, query=5)
    page = explorer.to_html(tmp_path / "patch.html").read_text()
    state = json.loads(page.split('id="vit-lens-state">')[1].split("</script>")[0])
    assert state["_view"] == "patch" and state["_static"] is True and state["query"] == 5
    # every query's attention travels with the page, so clicks work offline
    assert state["_all_attention"][9][1][2] == _rounded(explorer.patterns[1, 2, 9])
    assert "function renderPatch" in page and "http" not in page.split("<script")[0]
    with pytest.raises(ValueError, match="writes an .html page"):
        explorer.to_html(tmp_path / "patch.png")


def test_missing_anywidget_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "anywidget", None)
    monkeypatch.delitem(sys.modules, "vit_lens.viz.widgets.explorers")
    with pytest.raises(ImportError, match=r"pip install 'vit_lens\[widgets\]'"):
        importlib.import_module("vit_lens.viz.widgets.explorers")


def test_progress_bar_is_the_widget_in_a_kernel_only(tmp_path, monkeypatch):
    """With ipywidgets installed, a kernel gets tqdm's widget bar and no 'IProgress not found' warning."""
    # Both are test extras (always present under dev.py); outside them the widget bar is not offered at all.
    pytest.importorskip("ipywidgets")
    nbformat = pytest.importorskip("nbformat")
    from ipykernel.kernelspec import install as install_kernelspec
    from nbclient import NotebookClient

    install_kernelspec(kernel_name="vit-lens-widgets", prefix=str(tmp_path))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    code = "from vit_lens.utils.progress import progress\nbar = progress(range(2))\nlist(bar)\nprint(type(bar).__module__)"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    NotebookClient(nb, kernel_name="vit-lens-widgets", timeout=120).execute()
    outputs = nb.cells[0].outputs
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "tqdm.notebook" in text
    assert "IProgress" not in text
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
