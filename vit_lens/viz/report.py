"""The HTML report of ``vit-lens demo``: a one-page tour of what vit_lens shows about a CLIP model.

For a few images it draws the direct effect of every layer and head on the image's best text
match, the CLS attention of every layer over the image, the TextSpan descriptions of the heads
with the largest direct effects, and a zero-shot segmentation next to trivial baselines; it can end
with the same kinds of methods scored against a planted model's known truth (``scorecards=``; the toy
demo does). Figures are plotly, the file is self-contained (it opens offline).

The report is a list of :class:`ReportSection` (a title, an opening paragraph that says what the
section shows and how to read it, and the figures and tables) written by :func:`write_report`:
a new analysis is one more function that returns a section. Each image is drawn once, in the first
section; later sections call it "image 1", "image 2", ... and draw maps alone, outlined with the
true objects where their masks are known.

Example:
    >>> import vit_lens
    >>> from vit_lens.viz.report import demo_report
    >>> from vit_lens.toy import ToyWorld, description_pool, factor_prompts
    >>> clip, world = vit_lens.load_toy_clip(), ToyWorld(seed=0)
    >>> shapes, pool = factor_prompts("shape"), description_pool()[0]
    >>> path = demo_report(clip.vision, world.sample(3).images, class_names=shapes,
    ...                    class_directions=clip.encode_text(shapes, normalize=True),
    ...                    pool=pool, pool_embeddings=clip.encode_text(pool, normalize=True),
    ...                    textspan_images=world.sample(500).images, out="report.html")  # doctest: +SKIP
"""

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vit_lens.intervene.decompose import direct_contributions, required_hooks
from vit_lens.utils import plotting as plot

_GANDELSMAN = (
    "Gandelsman, Efros and Steinhardt, <i>Interpreting CLIP's Image Representation via Text-Based "
    "Decomposition</i> (ICLR 2024)"
)
_BALASUBRAMANIAN = (
    "Balasubramanian, Basu and Feizi, <i>Decomposing and Interpreting Image Representations via Text in ViTs "
    "Beyond CLIP</i> (NeurIPS 2024)"
)
_PEELING = "<i>Peeling Back the Layers: Interpreting the Storytelling of ViT</i> (anonymous submission)"
_CHEFER = "Chefer, Gur and Wolf, <i>Transformer Interpretability Beyond Attention Visualization</i> (CVPR 2021)"
_PANEL = 150  # pixels per map panel


@dataclass
class ReportSection:
    """One section of the report.

    Attributes:
        title: The heading; unique within a report.
        intro: Two to four sentences that open the section: what it shows and how to read it
            (axes, colours, what a good and a bad result look like). An HTML fragment.
        content: What follows the intro, side by side: plotly figures, plain text, or
            :class:`vit_lens.utils.plotting.HTML` fragments.
    """

    title: str
    intro: str
    content: list[Any] = field(default_factory=list)


def write_report(
    sections: Sequence[ReportSection], out: str | Path, *, title: str, intro: str | None = None
) -> Path:
    """Write ``sections`` into one self-contained HTML file and return its path.

    Args:
        sections: The report's sections, in order.
        out: Output HTML path.
        title: The page title.
        intro: A paragraph under the title (an HTML fragment).

    Raises:
        ValueError: Two sections have the same title.
    """
    titles = [section.title for section in sections]
    repeated = sorted({t for t in titles if titles.count(t) > 1})
    if repeated:
        raise ValueError(f"section titles must be distinct; repeated: {repeated}")
    pairs = [
        (
            section.title,
            [plot.HTML(f"<p class='section-intro' style='flex-basis:100%;max-width:75em;margin:0 0 .5em'>"
                       f"{section.intro}</p>"), *section.content],
        )
        for section in sections
    ]
    return plot.write_html_report(pairs, out, title=title, intro=intro)


def _progress(message: str, log: Callable[[str], None] | None) -> None:
    if log is not None:
        log(message)


@torch.no_grad()
def head_outputs_over(model, images: Tensor, batch_size: int = 250, out_dir: str | Path | None = None) -> Tensor:
    """``[n_images, n_layers, n_heads, d_repr]``: every head's direct contribution, in batches.

    With ``out_dir`` the terms are computed by the dataset runner into a contribution store there
    (:func:`vit_lens.intervene.store.compute_contributions_to_disk`: resumable, kept for later
    runs) and read back; the values equal the in-memory pass's.
    """
    if out_dir is not None:
        from vit_lens.intervene.store import compute_contributions_to_disk

        store = compute_contributions_to_disk(model, images.split(batch_size), out_dir, level="head", progress=False)
        cfg = model.cfg
        heads = [store.labels.index(f"L{layer}H{head}") for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
        return store[:][:, heads].unflatten(1, (cfg.n_layers, cfg.n_heads))
    chunks = []
    names = required_hooks(model, "head")
    for start in range(0, len(images), batch_size):
        _, cache = model.run_with_cache(images[start : start + batch_size], names_filter=names)
        chunks.append(direct_contributions(model, cache, level="head").heads())
    return torch.cat(chunks)


# ============================================================================ figures


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> plot.HTML:
    """An HTML table; cells are HTML fragments (escape text before passing it)."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return plot.HTML(f"<table style='align-self:flex-start'><tr>{head}</tr>{body}</table>")


def _images_figure(display: Tensor, labels: Sequence[str]):
    """Every image once, titled with its label."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cols = min(len(labels), 6)
    rows = math.ceil(len(labels) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(labels), horizontal_spacing=0.02,
                        vertical_spacing=0.08)
    for i, image in enumerate(display):
        # the plotting module's conversion: [0, 1] or 0-255 images as they are, normalised ones stretched
        fig.add_trace(go.Image(z=plot._image_rgb(image)), row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title="the images", width=_PANEL * cols + 60, height=(_PANEL + 20) * rows + 70,
                      margin=dict(l=10, r=10, t=60, b=10))
    return fig


def _outline(mask: Tensor, grid: tuple[int, int], colour: str):
    """The outline of a pixel mask, in the coordinates of a map with ``grid`` cells (cell centres at integers)."""
    import plotly.graph_objects as go

    height, width = mask.shape
    ys = ((torch.arange(height) + 0.5) * grid[0] / height - 0.5).tolist()
    xs = ((torch.arange(width) + 0.5) * grid[1] / width - 0.5).tolist()
    return go.Contour(
        z=mask.float().cpu().numpy(), x=xs, y=ys, showscale=False, hoverinfo="skip",
        contours=dict(start=0.5, end=0.5, size=1, coloring="lines"), line=dict(width=1.5),
        colorscale=[[0, colour], [1, colour]],  # line contours take their colour from the scale
    )


@dataclass
class _Panel:
    title: str
    values: Tensor  # [rows, cols]
    colorscale: str
    signed: bool  # diverging scale centred at 0
    outline: Tensor | None = None  # [H, W] bool pixel mask
    outline_colour: str = "white"


def _panel_figure(panels: Sequence[_Panel], cols: int, title: str, size: int = _PANEL):
    """Maps drawn alone (no image under them), ``size`` pixels each, one colour scale per panel, outlines if given."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cols = max(1, min(cols, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[p.title for p in panels],
                        horizontal_spacing=0.02, vertical_spacing=40 / ((size + 30) * rows))
    for i, panel in enumerate(panels):
        values = panel.values.detach().float().cpu()
        scale = dict(zmid=0.0) if panel.signed else {}
        row, col = i // cols + 1, i % cols + 1
        fig.add_trace(go.Heatmap(z=values.numpy(), colorscale=panel.colorscale, showscale=False,
                                 hovertemplate="%{z:.3g}<extra></extra>", **scale), row=row, col=col)
        if panel.outline is not None:
            fig.add_trace(_outline(panel.outline, tuple(values.shape), panel.outline_colour), row=row, col=col)
        axis = "" if i == 0 else str(i + 1)
        fig.layout[f"yaxis{axis}"].scaleanchor = f"x{axis}"
    fig.update_xaxes(visible=False, constrain="domain")
    fig.update_yaxes(visible=False, autorange="reversed", constrain="domain")
    fig.update_annotations(font_size=12)
    fig.update_layout(title=title, width=(size + 10) * cols + 40, height=(size + 30) * rows + 70,
                      margin=dict(l=10, r=10, t=70, b=10))
    return fig


# ============================================================================ sections


def _images_section(display, labels, titles, class_names, predicted, scores) -> ReportSection:
    header = ["image", *(["description"] if titles is not None else []), "best class", "score"]
    rows = [
        [html.escape(label), *([html.escape(titles[i])] if titles is not None else []),
         html.escape(class_names[p]), f"{scores[i, p]:.3f}"]
        for i, (label, p) in enumerate(zip(labels, predicted.tolist()))
    ]
    intro = (
        f"These are the {len(labels)} image{'s' if len(labels) > 1 else ''} that the report explains, each drawn "
        "once; later sections refer to them by their labels and draw their maps without the image. An image's best "
        "class is the class whose direction (the text embedding of its prompt for CLIP, its weight vector for a "
        "classifier) has the largest dot product with the image representation, and every later section explains "
        "that score. The score column is that dot product: compare it between the images of one model, not between "
        "models."
    )
    table = _table(header, rows)
    return ReportSection("The images and their best class", intro, [_images_figure(display, labels), table])


def _direct_effect_section(model, cache, heads, direction, cfg) -> tuple[ReportSection, Tensor]:
    effect = (heads.values * direction[:, None]).sum(-1)  # [n, component]
    per_head = effect[:, heads.head >= 0].reshape(len(direction), cfg.n_layers, cfg.n_heads)
    layers = direct_contributions(model, cache, level="layer")
    layer_effect = (layers.values * direction[:, None]).sum(-1).mean(0)
    attn = [layer_effect[layers.labels.index(f"L{l}ATTN")].item() for l in range(cfg.n_layers)]
    mlp = [layer_effect[layers.labels.index(f"L{l}MLP")].item() for l in range(cfg.n_layers)]
    intro = (
        "A component's direct effect is what it writes into the image representation, projected on the best "
        "class's direction; with the final LayerNorm's scale fixed at its value for each image, the effects of all "
        "components (with the embeddings and biases) add up to the score. This is the decomposition of "
        f"{_GANDELSMAN}, which {_BALASUBRAMANIAN} extend to ViTs trained without text. The grid has a row per layer "
        "and a column per head, averaged over the images, blue where a head raises the score and red where it "
        "lowers it; the curves give, layer by layer, the summed effect of the attention heads and that of the MLP. "
        "A model that reads the class from a few components shows a few dark cells, while an effect spread thinly "
        "over every cell means that no single head is responsible."
    )
    figures = [
        plot.layer_head_grid(per_head.mean(0), title="direct effect per head",
                             text_format=None if cfg.n_heads > 8 else ".2f"),
        plot.layer_curves({"attention": attn, "MLP": mlp}, title="direct effect per layer",
                          yaxis_title="direct effect"),
    ]
    return ReportSection("Direct effect of layers and heads on the best class's score", intro, figures), per_head


def _cls_attention_section(cache, cfg, labels, true_masks) -> ReportSection:
    panels = []
    for i, label in enumerate(labels):
        for layer in range(cfg.n_layers):
            row = cache["pattern", layer][i, :, 0].mean(0)  # [key]: CLS query, mean over heads
            grid = row[cfg.n_prefix_tokens :].reshape(*cache.grid_size)
            outline = None if true_masks is None else true_masks[i]
            panels.append(_Panel(f"{label}, L{layer}", grid, "Viridis", signed=False, outline=outline))
    cols = min(cfg.n_layers, 6)
    outlined = ", and the white line outlines the true objects" if true_masks is not None else ""
    intro = (
        "Each panel shows how much the CLS token attends to each image patch in one layer, averaged over the heads, "
        f"as in the per-layer heatmaps of {_PEELING}. An image's panels run from the first layer to the last, left "
        f"to right; yellow marks the patches that CLS reads most{outlined}. Every panel has its own colour "
        "scale, so compare where the attention falls, not how much (attention to CLS itself and to register tokens "
        "is not drawn). A layer that reads the object puts its brightest patches on it; a flat panel, or one "
        "bright background patch, means the layer gathers little from the object."
    )
    return ReportSection("Where CLS looks, layer by layer", intro,
                         [_panel_figure(panels, cols, "CLS attention to the patches, mean over heads")])


def _textspan_section(model, span_images, per_head, pool, pool_embeddings, n_heads_shown, n_texts) -> ReportSection:
    from vit_lens.methods.textspan.textspan import textspan

    cfg = model.cfg
    outputs = head_outputs_over(model, span_images)  # [N, L, H, d]
    importance = per_head.abs().mean(0).flatten()
    chosen = importance.argsort(descending=True)[:n_heads_shown].tolist()
    rows = []
    for index in chosen:
        layer, head = divmod(index, cfg.n_heads)
        span = textspan(outputs[:, layer, head], pool_embeddings, n_texts=n_texts, reconstruct=False)
        picks = sorted(zip(span.step_variance.tolist(), span.indices.tolist()), key=lambda pick: -pick[0])
        items = ", ".join(f"'{html.escape(pool[t])}' ({100 * v:.1f}%)" for v, t in picks)
        rows.append((span.cumulative, [f"L{layer}H{head}", f"{importance[index]:.3f}",
                                       f"{100 * span.cumulative:.1f}%", items]))
    rows.sort(key=lambda row: -row[0])
    intro = (
        f"TextSpan, the method of {_GANDELSMAN}, describes what a head writes: from a pool of {len(pool)} "
        "descriptions it picks, one at a time, the text direction that explains the most of the remaining variance "
        f"of the head's direct contribution over {len(span_images)} images. The table lists the "
        f"{len(chosen)} heads with the largest mean absolute direct effect, sorted by the share of the head's "
        f"variance that its {n_texts} descriptions explain together; within a row the descriptions are sorted by "
        "the share each one adds when TextSpan picks it. A head with a high total whose descriptions name one "
        "property (a colour, a shape) has a clear role, while a low total means that the pool has no words for what "
        "the head writes."
    )
    table = _table(["head", "mean |direct effect|", f"variance explained by {n_texts} texts",
                    "descriptions (share of the head's variance each explains)"], [row for _, row in rows])
    return ReportSection("TextSpan descriptions of the heads with the largest direct effects", intro, [table])


def _segmentation_section(model, images, display, labels, class_names, class_directions, predicted,
                          true_masks, object_colours) -> ReportSection:
    from vit_lens.methods.segmentation.maps import SegmentationMetrics, colour_distance_maps, text_heatmaps, upsample

    maps = text_heatmaps(model, images, class_directions.T)  # [n, k, rows, cols], mean over classes removed
    chosen = maps[torch.arange(len(images)), predicted]
    pixels = upsample(chosen[:, None], tuple(images.shape[-2:]))[:, 0]
    closeness = None if object_colours is None else colour_distance_maps(display.float(), object_colours)
    panels = []
    for i, label in enumerate(labels):
        outline = None if true_masks is None else true_masks[i]
        panels.append(_Panel(f"{label}: text map", pixels[i], "RdBu_r", signed=True, outline=outline,
                             outline_colour="black"))
        if closeness is not None:
            panels.append(_Panel(f"{label}: colour distance", closeness[i], "Viridis", signed=False,
                                 outline=outline, outline_colour="white"))
    cols = 2 if closeness is not None else min(len(labels), 4)
    title = "text maps (left), no-model baseline (right)" if closeness is not None else "text maps of the best class"
    content = [_panel_figure(panels, cols, title, size=200)]
    method = (
        f"The zero-shot map of {_GANDELSMAN} scores each patch by the direct contribution that all heads write "
        "through it, projected on the best class's direction minus the mean over the directions of all classes; red "
        "patches speak for the class and blue ones against it."
    )
    if true_masks is None:
        intro = method + (
            " No true masks were given, so the maps are not scored; on the toy world (<code>vit-lens demo</code> "
            "with its default model) they are scored against the true masks, next to trivial baselines."
        )
        return ReportSection("Zero-shot segmentation of the best class", intro, content)
    candidates = {"zero-shot text map": pixels, "all background (constant map)": torch.zeros_like(pixels)}
    if closeness is not None:
        candidates["colour distance (no model)"] = closeness
    rows = []
    for name, heatmaps in candidates.items():
        metrics = SegmentationMetrics()
        metrics.update(heatmaps, true_masks.to(heatmaps.device))
        scores = metrics.compute()
        per_image = []
        for i in range(len(labels)):
            single = SegmentationMetrics()
            single.update(heatmaps[i : i + 1], true_masks[i : i + 1].to(heatmaps.device))
            per_image.append(f"{100 * single.compute()['iou_foreground']:.1f}")
        pooled = [f"{100 * scores[key]:.1f}" for key in ("pixel_accuracy", "miou", "iou_foreground")]
        rows.append([html.escape(name), *pooled, " / ".join(per_image)])
    content.append(_table(["map", "pixel accuracy", "mIoU", "foreground IoU", "foreground IoU per image"], rows))
    baselines = (
        "an all-background map (constant) and the colour-distance map, which uses no model: each pixel's closeness "
        "to the object's true colour (yellow for close), drawn next to the model's map"
        if closeness is not None else "an all-background map (constant)"
    )
    intro = method + (
        f" As in the protocol of {_CHEFER}, a map becomes a mask by keeping the pixels above its mean, and the table "
        "scores that mask against the true objects (outlined) by pixel accuracy, mean IoU of background and object, "
        "and the object's IoU, in percent, pooled over the images. The trivial baselines go through the same steps: "
        f"{baselines}. A map is useful only where it beats them, and since the objects cover a small part of each "
        "image an all-background map already has a high pixel accuracy, so read the foreground IoU first."
    )
    return ReportSection("Zero-shot segmentation next to trivial baselines", intro, content)


# ============================================================================ the report


def _scorecard_section(card: Any) -> ReportSection:
    """The methods above (and their baselines) scored against a planted model's known heads and the true masks."""
    from vit_lens.methods.scorecard import METHOD_NAMES, format_score

    settings = card.settings
    intro = (
        f"The methods of this report, run on vit_lens's planted {html.escape(card.model)}, a model trained so that "
        "each factor of the toy world flows through known heads (its model card gives the truth), and scored "
        "against that truth. AP is the average precision of a method's head ranking against the factor's planted "
        f"heads, averaged over the six factors (1 is perfect; the chance row is what a random ranking of the "
        f"{settings['n_heads']} heads expects), and top-1 counts the factors whose best-scored head is planted for "
        "them. The second table scores object-localisation maps against the true masks, next to a constant map "
        "and a colour-distance map computed without any model: a map is only useful where it beats both."
    )
    first = card.summary[0]
    rows = [
        [html.escape(METHOD_NAMES[r["method"]]), format_score(r["mean_ap"]),
         f"{r['top1_hits']:g}/{r['n_factors']}", format_score(r["mean_group_ap"]), format_score(r["mean_read_ap"])]
        for r in sorted(card.summary, key=lambda r: -(r["mean_ap"] or 0.0))
    ]
    rows.append(["chance (random ranking, expected)", format_score(first["mean_chance_ap"]), "-",
                 format_score(first["mean_chance_group_ap"]), format_score(first["mean_chance_read_ap"])])
    heads = _table(["head attribution method", "mean AP", "top-1", "AP by output token group",
                    "AP by read token group"], rows)
    maps = _table(["localisation map", "foreground IoU", "mIoU", "pixel accuracy"], [
        [html.escape(r["name"]), f"{100 * r['iou_foreground']:.1f}", f"{100 * r['miou']:.1f}",
         f"{100 * r['pixel_accuracy']:.1f}"]
        for r in sorted(card.localisation, key=lambda r: -r["iou_foreground"])
    ])
    note = plot.HTML(
        f"<p style='flex-basis:100%'>{settings['n_images']} images, {settings['n_pairs']} pairs per factor, "
        f"{settings['n_localisation']} images for the maps, seed {settings['seed']}; the full run is "
        "<code>python benchmarks/method_scorecard.py</code> (figures in <code>benchmarks/README.md</code>).</p>"
    )
    return ReportSection(f"Methods scored against a known truth: the planted {card.model}", intro,
                         [heads, maps, note] if card.localisation else [heads, note])


def _check_inputs(images, class_names, class_directions, pool, pool_embeddings, display, titles, true_masks,
                  object_colours) -> None:
    n = len(images)
    if class_directions.ndim != 2 or class_directions.shape[0] != len(class_names):
        raise ValueError(
            f"class_directions must be [n_classes={len(class_names)}, d_repr], got {tuple(class_directions.shape)}"
        )
    if (pool is None) != (pool_embeddings is None):
        raise ValueError("pass both pool and pool_embeddings for the TextSpan section, or neither")
    if len(display) != n:
        raise ValueError(f"display_images must hold one image per image ({n}), got {len(display)}")
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles must hold one caption per image ({n}), got {len(titles)}")
    if true_masks is not None and tuple(true_masks.shape) != (n, *images.shape[-2:]):
        raise ValueError(
            f"true_masks must be [n_images, height, width] = {(n, *images.shape[-2:])} bool, got "
            f"{tuple(true_masks.shape)}"
        )
    if object_colours is not None and tuple(object_colours.shape) != (n, display.shape[1]):
        raise ValueError(
            f"object_colours must be [n_images, channels] = {(n, display.shape[1])} (each image's object colour, in "
            f"the value range of display_images), got {tuple(object_colours.shape)}"
        )
    flat = images.flatten(1)
    for i in range(n):
        same = [j for j in range(i + 1, n) if torch.equal(flat[i], flat[j])]
        if same:
            raise ValueError(f"images {i} and {same[0]} are identical; pass each image once")


@torch.no_grad()
def demo_report(
    model: Any,
    images: Tensor,
    *,
    class_names: Sequence[str],
    class_directions: Tensor,
    pool: Sequence[str] | None = None,
    pool_embeddings: Tensor | None = None,
    textspan_images: Tensor | None = None,
    out: str | Path = "vit_lens_report.html",
    display_images: Tensor | None = None,
    titles: Sequence[str] | None = None,
    true_masks: Tensor | None = None,
    object_colours: Tensor | None = None,
    scorecards: Sequence[Any] = (),
    n_heads_shown: int = 6,
    n_texts: int = 5,
    model_name: str = "model",
    log: Callable[[str], None] | None = print,
) -> Path:
    """Write the demo report for ``images`` and return its path.

    Args:
        model: A :class:`vit_lens.HookedViT` (for a CLIP model, its ``.vision``).
        images: ``[n, 3, H, W]`` model inputs (a few: every image gets its own panels); no two alike.
        class_names: Names of the classes (zero-shot prompts, or a classifier's labels).
        class_directions: ``[n_classes, d_repr]``: unit text embeddings of the prompts for CLIP,
            the classifier's weight columns for a timm model. Each image is explained with respect
            to its best-scoring class.
        pool: Descriptions for TextSpan, with ``pool_embeddings`` ``[n_texts, d_repr]`` (None: no
            TextSpan section; it needs a text model).
        textspan_images: Images whose head contributions TextSpan analyses (hundreds or more give
            meaningful descriptions; default: ``images``).
        out: Output HTML path.
        display_images: What to draw (default: ``images``; pass unnormalised images when ``images``
            are normalised for the model).
        titles: One description per image (a caption, a file name), listed in the first section.
        true_masks: ``[n, H, W]`` bool foreground masks, if known: the segmentation is scored, next
            to an all-background map scored the same way.
        object_colours: ``[n, 3]``: each image's object colour in the value range of
            ``display_images``, if known (the toy world knows it): adds the no-model colour-distance
            baseline to the segmentation section.
        scorecards: :class:`vit_lens.methods.scorecard.Scorecard` results (of the planted models) to end the
            report with: the same kinds of methods scored against a known truth.
        n_heads_shown: Heads described with TextSpan.
        n_texts: Descriptions per head.
        model_name: Shown in the title.
        log: Progress messages go here (None: silent).
    """
    display = images if display_images is None else display_images
    _check_inputs(images, class_names, class_directions, pool, pool_embeddings, display, titles, true_masks,
                  object_colours)
    cfg = model.cfg
    labels = [f"image {i + 1}" for i in range(len(images))]

    _progress(f"caching {len(images)} image(s) ...", log)
    needed = set(required_hooks(model, "head")) | set(required_hooks(model, "layer"))
    _, cache = model.run_with_cache(images, names_filter=lambda name: name.endswith("hook_pattern") or name in needed)
    heads = direct_contributions(model, cache, level="head")
    scores = heads.sum() @ class_directions.T  # [n, k]
    predicted = scores.argmax(dim=1)
    sections = [_images_section(display, labels, titles, class_names, predicted, scores)]

    _progress("direct effects of layers and heads ...", log)
    effects, per_head = _direct_effect_section(model, cache, heads, class_directions[predicted], cfg)
    sections.append(effects)

    _progress("CLS attention maps per layer ...", log)
    sections.append(_cls_attention_section(cache, cfg, labels, true_masks))

    if pool is not None:
        _progress("TextSpan on the heads with the largest direct effects ...", log)
        span_images = images if textspan_images is None else textspan_images
        sections.append(_textspan_section(model, span_images, per_head, pool, pool_embeddings, n_heads_shown, n_texts))

    _progress("zero-shot segmentation ...", log)
    sections.append(_segmentation_section(model, images, display, labels, class_names, class_directions, predicted,
                                          true_masks, object_colours))
    for card in scorecards:
        sections.append(_scorecard_section(card))

    intro = (
        f"{html.escape(model_name)}: {cfg.n_layers} layers x {cfg.n_heads} heads, d_model {cfg.d_model}, "
        f"{cfg.grid_size[0]}x{cfg.grid_size[1]} patches. Written by <code>vit-lens demo</code>."
    )
    path = write_report(sections, out, title=f"vit_lens: {model_name}", intro=intro)
    _progress(f"report written to {path.resolve()}", log)
    return path
