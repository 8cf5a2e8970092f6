"""`vit-lens demo`: the HTML report on the built-in toy CLIP, and on a timm classifier.

The report is read back as a person reads it: every section opens with a short paragraph, no title
or image appears twice, TextSpan tables are sorted by variance explained, and the zero-shot
segmentation is scored next to trivial baselines computed on the same images.
"""

import html
import json
import re

import pytest
import torch
from PIL import Image

from vit_lens.cli import main

_SECTION = re.compile(r"<h2>(.*?)</h2>\s*<div class='row'>\s*<p class='section-intro'[^>]*>(.*?)</p>", re.DOTALL)
_TEXTSPAN_ROW = re.compile(r"<tr><td>L(\d+)H(\d+)</td><td>([\d.]+)</td><td>([\d.]+)%</td><td>(.*?)</td></tr>")
_BASELINES = ("zero-shot text map", "all background (constant map)", "colour distance (no model)")
_SEGMENTATION_ROW = re.compile(
    r"<tr><td>(zero-shot text map|all background \(constant map\)|colour distance \(no model\))</td>"
    r"<td>([\d.]+)</td><td>([\d.]+)</td><td>([\d.]+)</td><td>([\d. /]+)</td></tr>"
)


def _figures(page: str) -> list[dict]:
    """The data and layout of every plotly figure, parsed from the ``Plotly.newPlot(id, data, layout, ...)`` calls."""
    decoder, separator = json.JSONDecoder(), re.compile(r"\s*,\s*")
    figures = []
    for call in re.finditer(r"Plotly\.newPlot\(\s*", page):
        _, position = decoder.raw_decode(page, call.end())  # the div's id
        data, position = decoder.raw_decode(page, separator.match(page, position).end())
        layout, _ = decoder.raw_decode(page, separator.match(page, position).end())
        figures.append({"data": data, "layout": layout})
    return figures


def _sentences(fragment: str) -> list[str]:
    text = html.unescape(re.sub(r"<[^>]+>", "", fragment))
    return re.split(r"(?<=[.!?])\s+(?=[A-Z0-9])", " ".join(text.split()))


def _check_structure(page: str, n_images: int) -> dict[str, str]:
    """Every section opens with 2-4 sentences; no section title, figure title or image appears twice.

    Returns the intros by section title.
    """
    headings = [html.unescape(h) for h in re.findall(r"<h2>(.*?)</h2>", page)]
    intros = {html.unescape(title): intro for title, intro in _SECTION.findall(page)}
    assert list(intros) == headings, "a section does not open with its intro paragraph"
    assert len(set(headings)) == len(headings), headings
    for title, intro in intros.items():
        sentences = _sentences(intro)
        assert 2 <= len(sentences) <= 4, (title, sentences)
        assert all(s.endswith(".") and len(s.split()) >= 6 for s in sentences), (title, sentences)

    figures = _figures(page)
    assert figures, "no figure found"
    figure_titles = []
    for figure in figures:
        layout = figure["layout"]
        title = layout.get("title", {}).get("text")
        figure_titles += [title] if title else []
        figure_titles += [annotation["text"] for annotation in layout.get("annotations", [])]
    repeated = sorted({t for t in figure_titles if figure_titles.count(t) > 1})
    assert not repeated, f"figure titles shown twice: {repeated}"

    images = [json.dumps(trace.get("z", trace.get("source")), sort_keys=True)
              for figure in figures for trace in figure["data"] if trace["type"] == "image"]
    images += re.findall(r"<img[^>]+src=['\"](data:[^'\"]+)", page)
    assert len(images) == n_images and len(set(images)) == n_images, f"{len(images)} images drawn, {len(set(images))} distinct"
    return intros


def test_demo_on_the_toy_model_writes_a_self_contained_report(tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["demo", "--out", str(out), "--n-images", "4", "--textspan-images", "300", "--scorecard-images", "24"]) == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed.splitlines()[-1]
    page = out.read_text()
    assert '<script src="http' not in page
    intros = _check_structure(page, n_images=4)
    assert list(intros) == [
        "The images and their best class", "Direct effect of layers and heads on the best class's score",
        "Where CLS looks, layer by layer", "TextSpan descriptions of the heads with the largest direct effects",
        "Zero-shot segmentation next to trivial baselines", "Methods scored against a known truth: the planted clip",
    ]
    assert "Peeling Back the Layers" in intros["Where CLS looks, layer by layer"]
    assert "over 300 images" in intros["TextSpan descriptions of the heads with the largest direct effects"]

    # four different toy scenes, each of its own colour (the class the report explains)
    descriptions = re.findall(r"<tr><td>image (\d)</td><td>(.*?)</td><td>(.*?)</td><td>([\d.]+)</td></tr>", page)
    assert [int(d[0]) for d in descriptions] == [1, 2, 3, 4]
    colours = {word for _, caption, _, _ in descriptions for word in caption.split()} & {
        "red", "green", "blue", "yellow", "purple", "orange"}
    assert len(colours) == 4, descriptions

    # TextSpan: the six heads with the largest direct effects, sorted by the share of the head's variance its
    # five texts explain; within a head the texts by the share each explains, which add up to the total
    rows = _TEXTSPAN_ROW.findall(page)
    assert len(rows) == 6
    totals = [float(row[3]) for row in rows]
    assert totals == sorted(totals, reverse=True) and 0 < totals[-1] and totals[0] <= 100
    assert len({(row[0], row[1]) for row in rows}) == 6 and all(float(row[2]) > 0 for row in rows)
    for row, total in zip(rows, totals):
        shares = [float(v) for v in re.findall(r"\(([\d.]+)%\)", row[4])]
        assert len(shares) == 5 and shares == sorted(shares, reverse=True), row[4]
        assert abs(sum(shares) - total) <= 0.3, (shares, total)

    # segmentation: the model's map and both trivial baselines, scored the same way, in percent
    scored = {name: [float(v) for v in values[:3]] + [[float(v) for v in values[3].split(" / ")]]
              for name, *values in _SEGMENTATION_ROW.findall(page)}
    assert list(scored) == list(_BASELINES)
    for name, (accuracy, miou, foreground, per_image) in scored.items():
        assert all(0 <= v <= 100 for v in (accuracy, miou, foreground, *per_image)) and len(per_image) == 4, name
    accuracy, miou, foreground, per_image = scored["all background (constant map)"]
    # predicting background everywhere: background IoU = pixel accuracy, foreground IoU 0
    assert foreground == 0 and per_image == [0] * 4 and abs(miou - accuracy / 2) <= 0.1 and accuracy > 80

    # the closing scorecard: every head method and baseline against the planted CLIP's truth, then the maps
    section = page[page.index("Methods scored against a known truth"):]
    ap = {name: (float(mean_ap), top1) for name, mean_ap, top1 in
          re.findall(r"<tr><td>([^<]+)</td><td>([\d.]+)</td><td>(\d+/6|-)</td>", section)}
    assert {"mean ablation", "activation patching", "attribution patching", "direct contributions", "TextSpan",
            "random ranking (baseline)", "head-output variance (baseline)", "chance (random ranking, expected)"} <= set(ap)
    assert all(0 <= value <= 1 for value, _ in ap.values())
    # the planted heads are found by ablation and missed by a random ranking (its expected AP is the chance row's)
    assert ap["mean ablation"][0] > 0.9 > 0.5 > ap["random ranking (baseline)"][0]
    assert "constant map (baseline)" in section and "colour distance, no model (baseline)" in section


def test_the_segmentation_scores_are_the_protocol_s_on_the_report_s_images(tmp_path):
    """The table's numbers are those of SegmentationMetrics on the same maps, images and masks."""
    import vit_lens
    from vit_lens.methods.segmentation.maps import SegmentationMetrics, colour_distance_maps, text_heatmaps, upsample
    from vit_lens.toy import ToyWorld, factor_prompts
    from vit_lens.toy.world import COLOURS
    from vit_lens.viz.report import demo_report

    clip = vit_lens.load_toy_clip()
    batch = ToyWorld(seed=5).sample(3)
    colours = torch.tensor([COLOURS[scene.colour] for scene in batch.scenes])
    prompts = factor_prompts("colour")
    with torch.no_grad():
        directions = clip.encode_text(prompts, normalize=True)
        maps, scores = text_heatmaps(clip.vision, batch.images, directions.T, return_scores=True)
    path = demo_report(clip.vision, batch.images, class_names=prompts, class_directions=directions,
                       out=tmp_path / "r.html", true_masks=batch.foreground, object_colours=colours, log=None)
    page = path.read_text()
    _check_structure(page, n_images=3)
    table = {name: values for name, *values in _SEGMENTATION_ROW.findall(page)}

    best = maps[torch.arange(3), scores.argmax(1)]
    expected = {
        "zero-shot text map": upsample(best, (64, 64)),
        "all background (constant map)": torch.zeros(3, 64, 64),
        "colour distance (no model)": colour_distance_maps(batch.images, colours),
    }
    for name, heatmaps in expected.items():
        metrics = SegmentationMetrics()
        metrics.update(heatmaps, batch.foreground)
        result = metrics.compute()
        reported = [float(v) for v in table[name][:3]]
        wanted = [100 * result[key] for key in ("pixel_accuracy", "miou", "iou_foreground")]
        assert reported == pytest.approx(wanted, abs=0.051), name
    assert float(table["all background (constant map)"][0]) == pytest.approx(
        100 * (1 - batch.foreground.float().mean().item()), abs=0.051)


def test_report_inputs_are_checked(tmp_path):
    import vit_lens
    from vit_lens.toy import ToyWorld, factor_prompts
    from vit_lens.viz.report import ReportSection, demo_report, write_report

    clip = vit_lens.load_toy_clip()
    batch = ToyWorld(seed=1).sample(2)
    prompts = factor_prompts("colour")
    with torch.no_grad():
        directions = clip.encode_text(prompts, normalize=True)
    common = dict(class_names=prompts, class_directions=directions, out=tmp_path / "r.html", log=None)
    twice = torch.cat([batch.images, batch.images[:1]])
    with pytest.raises(ValueError, match="images 0 and 2 are identical; pass each image once"):
        demo_report(clip.vision, twice, **common)
    with pytest.raises(ValueError, match=r"object_colours must be \[n_images, channels\] = \(2, 3\) .* got \(3,\)"):
        demo_report(clip.vision, batch.images, object_colours=torch.rand(3), **common)
    with pytest.raises(ValueError, match=r"true_masks must be \[n_images, height, width\] = \(2, 64, 64\) bool, got \(2, 32, 32\)"):
        demo_report(clip.vision, batch.images, true_masks=torch.zeros(2, 32, 32, dtype=torch.bool), **common)
    assert not (tmp_path / "r.html").exists()
    sections = [ReportSection("maps", "One. Two."), ReportSection("maps", "Three. Four.")]
    with pytest.raises(ValueError, match=r"section titles must be distinct; repeated: \['maps'\]"):
        write_report(sections, tmp_path / "w.html", title="t")


def test_demo_on_a_timm_classifier_explains_its_logits(tmp_path, capsys):
    image = tmp_path / "cat.png"
    Image.fromarray((torch.rand(240, 320, 3) * 255).byte().numpy()).save(image)
    out = tmp_path / "timm.html"
    assert main(["demo", "--model", "timm:vit_tiny_patch16_224", "--image", str(image), "--out", str(out)]) == 0
    page = out.read_text()
    intros = _check_structure(page, n_images=1)
    assert list(intros) == [
        "The images and their best class", "Direct effect of layers and heads on the best class's score",
        "Where CLS looks, layer by layer", "Zero-shot segmentation of the best class",
    ]  # no TextSpan without a text model; no scores without masks
    assert "<td>cat.png</td>" in page and "No true masks were given" in intros["Zero-shot segmentation of the best class"]


def test_demo_says_what_it_needs(tmp_path, capsys):
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), "orange").save(image)
    cases = [
        (["demo", "--model", "timm:vit_tiny_patch16_224"], "needs images: pass one or more --image PATH"),
        (["demo", "--image", "x.png"], "--image needs a real model"),
        (["demo", "--model", "open_clip:ViT-B-32", "--image", str(tmp_path / "missing.jpg")], "missing.jpg"),
        (["demo", "--model", "timm:vit_tiny_patch16_224", "--image", str(image), "--image", str(image)],
         f"--image {image} is the file already given as {image}; pass each image once"),
    ]
    for argv, message in cases:
        assert main(argv) == 2  # a usage error: one line, no traceback
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
