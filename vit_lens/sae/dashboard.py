"""An HTML dashboard of SAE features: names, densities, activation histograms, top images with patch heatmaps.

:func:`write_sae_dashboard` streams the images once through the model (twice when it chooses the
features itself) and writes one self-contained HTML file (plotly inlined, images embedded as PNG
data; it opens offline): an overview table of the features, then one section per feature with its
name (the texts whose embeddings best match what its decoder direction writes into the output,
:func:`vit_lens.sae.views.name_features`), its density, the histogram of its non-zero activations,
and the images where it fires most, each with the feature's activation per patch drawn over it.

Example:
    >>> import vit_lens
    >>> from vit_lens.sae import SAE, SAEConfig
    >>> from vit_lens.sae.dashboard import write_sae_dashboard
    >>> from vit_lens.toy import ToyWorld, description_pool
    >>> clip = vit_lens.load_toy_clip()
    >>> sae = SAE(SAEConfig(d_in=128, d_sae=256, architecture="topk", k=8,
    ...                     hook_name="blocks.3.hook_resid_post")).init_weights(seed=0)
    >>> path = write_sae_dashboard(clip, sae, ToyWorld(seed=0).sample(200).images, features=[0, 1],
    ...                            texts=description_pool()[0], path="dashboard.html")  # doctest: +SKIP
"""

import base64
import html
import io
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vit_lens.model.hooked_vit import image_tower
from vit_lens.sae.model import SAE
from vit_lens.sae.views import FeatureView, _check_sae, check_features, feature_image_scores, feature_views
from vit_lens.utils import plotting as plot

_PANEL = 150  # pixels per image panel


def _png_data_uri(image: Tensor) -> str:
    """A ``[C, H, W]`` image as an embedded PNG (no file, no URL to fetch)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(plot._image_rgb(image)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _top_images_figure(view: FeatureView, patch_size: tuple[int, int], cols: int):
    """The top images, each above the feature's activation per patch (one colour scale for the feature)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = len(view.top_indices)
    cols = max(1, min(cols, n))
    maps = view.heatmaps is not None
    per_image = 2 if maps else 1  # an image row, then its maps' row
    rows = math.ceil(n / cols) * per_image
    titles = []
    for start in range(0, n, cols):
        chunk = range(start, min(start + cols, n))
        titles += [f"#{int(view.top_indices[i])}: {float(view.top_scores[i]):.3g}" for i in chunk]
        titles += [""] * (cols - len(chunk))
        if maps:
            titles += [""] * cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.02,
                        vertical_spacing=30 / ((_PANEL + 20) * rows))
    high = max(float(view.heatmaps.max()), 1e-8) if maps else 1.0
    for i in range(n):
        row, col = (i // cols) * per_image + 1, i % cols + 1
        fig.add_trace(go.Image(source=_png_data_uri(view.top_images[i]), hoverinfo="skip"), row=row, col=col)
        if maps:
            # The patch grid over the pixels it covers, smoothed by the browser: the activation per
            # token upsampled onto the image, while the file holds only the grid.
            fig.add_trace(go.Heatmap(
                z=view.heatmaps[i].numpy(), x0=(patch_size[1] - 1) / 2, dx=patch_size[1],
                y0=(patch_size[0] - 1) / 2, dy=patch_size[0], zmin=0.0, zmax=high, colorscale="Viridis",
                zsmooth="best", showscale=(i == 0), colorbar=dict(title="activation", len=0.8),
                hovertemplate="activation %{z:.3g}<extra></extra>",
            ), row=row + 1, col=col)
    height, width = (int(size) for size in view.top_images.shape[-2:])
    for index in range(rows * cols):
        axis = "" if index == 0 else str(index + 1)
        fig.layout[f"xaxis{axis}"].range = [-0.5, width - 0.5]
        fig.layout[f"yaxis{axis}"].range = [height - 0.5, -0.5]
        fig.layout[f"yaxis{axis}"].scaleanchor = f"x{axis}"
    fig.update_xaxes(visible=False, constrain="domain")
    fig.update_yaxes(visible=False, constrain="domain")
    fig.update_annotations(font_size=11)
    what = "each above the feature's activation per patch" if maps else "the SAE reads no patch, so there are no maps"
    fig.update_layout(title=f"top images (index in the stream: score), {what}",
                      width=(_PANEL + 10) * cols + 120, height=(_PANEL + 20) * rows + 70,
                      margin=dict(l=10, r=10, t=70, b=10))
    return fig


def _histogram_figure(view: FeatureView):
    import plotly.graph_objects as go

    edges = view.histogram_edges.numpy()
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure(go.Bar(x=centres, y=view.histogram.numpy(), width=edges[1] - edges[0], marker_color="#3b6ea5",
                           hovertemplate="%{x:.3g}: %{y} tokens<extra></extra>"))
    fig.update_xaxes(range=[0, max(view.max_activation, float(edges[1])) * 1.02])
    fig.update_layout(title=f"non-zero activations ({int(view.histogram.sum())} tokens)", xaxis_title="activation",
                      yaxis_title="tokens", width=420, height=300, margin=dict(l=50, r=10, t=50, b=40), bargap=0)
    return fig


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> plot.HTML:
    """An HTML table; cells are HTML fragments (escape text first)."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return plot.HTML(f"<table style='align-self:flex-start'><tr>{head}</tr>{body}</table>")


def _name_cell(view: FeatureView) -> str:
    return "(no text pool)" if view.name is None else html.escape(view.name.texts[0])


def _feature_section(view: FeatureView, patch_size: tuple[int, int], cols: int) -> tuple[str, list[Any]]:
    summary = (
        f"<p id='feature-{view.feature}' style='flex-basis:100%;margin:0'>Fires on "
        f"{100 * view.image_density:.1f}% of the images and {100 * view.token_density:.2f}% of the tokens; largest "
        f"activation {view.max_activation:.3g}.</p>"
    )
    content: list[Any] = [plot.HTML(summary)]
    if view.name is not None:
        content.append(_table(["text", "cosine"], [[html.escape(text), f"{float(score):.3f}"]
                                                   for text, score in zip(view.name.texts, view.name.scores)]))
    if int(view.histogram.sum()):
        content.append(_histogram_figure(view))
    if len(view.top_indices):
        content.append(_top_images_figure(view, patch_size, cols))
    else:
        content.append(plot.HTML("<p>No image scores above 0 for this feature.</p>"))
    heading = f"feature {view.feature}" + ("" if view.name is None else f": {view.name.texts[0]}")
    return heading, content


def _is_one_shot(images: Any) -> bool:
    return isinstance(images, Iterator)


def choose_features(
    model: Any, sae: SAE, images: Any, n_features: int, *, image_score: str = "max", batch_size: int = 64,
    progress: bool = True,
) -> list[int]:
    """The ``n_features`` features whose image scores vary most over ``images`` (standard deviation).

    A feature that fires alike on every image (a background feature) or on none comes last; one
    that tells images apart comes first.
    """
    scores = feature_image_scores(model, sae, images, image_score=image_score, batch_size=batch_size,
                                  progress=progress)
    spread = scores.std(dim=0) if len(scores) > 1 else scores[0]
    return spread.argsort(descending=True)[: min(n_features, sae.cfg.d_sae)].tolist()


def write_sae_dashboard(
    model: Any,
    sae: SAE,
    images: Any,
    *,
    features: Sequence[int] | None = None,
    path: str | Path = "sae_dashboard.html",
    texts: Sequence[str] | None = None,
    text_embeddings: Tensor | None = None,
    n_features: int = 12,
    k: int = 8,
    image_score: str = "max",
    n_texts: int = 5,
    title: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Write an offline HTML dashboard of SAE features and return its path.

    Args:
        model: A HookedViT or HookedCLIP (the model the SAE reads).
        sae: The SAE.
        images: A ``[n, C, H, W]`` tensor or an iterable of image batches
            (:func:`vit_lens.sae.views.image_batches`); they are drawn as given, in [0, 1] (or
            stretched to it).
        features: The features to show; default: the ``n_features`` whose image scores vary most
            (:func:`choose_features`, which needs a second pass over ``images``, so it cannot be a
            one-shot iterator).
        path: The HTML file to write.
        texts: A text pool to name the features (TextSpan's ``default_text_pool()``, the toy world's
            ``description_pool()[0]``, your own); None: no names.
        text_embeddings: Output-space vectors for ``texts`` (default: the CLIP text tower's).
        n_features: How many features to choose when ``features`` is None.
        k: Top images per feature.
        image_score: How images are ranked: ``"max"``, ``"cls"`` or ``"mean"`` of the feature over the tokens.
        n_texts: Texts listed per feature.
        title: The page title (default: the SAE's hook point and the model's name).
        batch_size: Images per forward pass when ``images`` is one tensor.
        progress: Show progress bars.

    Returns:
        The path written.
    """
    tower = image_tower(model)
    sae = _check_sae(sae)
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"path {str(path)!r} is a directory; pass a file path such as {str(path / 'sae_dashboard.html')!r}")
    if features is None:
        if not isinstance(n_features, int) or isinstance(n_features, bool) or n_features < 1:
            raise ValueError(f"n_features must be a positive int, got {n_features!r}")
        if _is_one_shot(images):
            raise ValueError(
                "Choosing the features takes a pass over the images before the dashboard's own, and an iterator can be "
                "read once: pass features=[...], or images as a tensor or a list of batches."
            )
        features = choose_features(tower, sae, images, n_features, image_score=image_score, batch_size=batch_size,
                                   progress=progress)
    else:
        features = check_features(features, sae.cfg.d_sae)
    views = feature_views(model, sae, images, features=features, k=k, image_score=image_score, texts=texts,
                          text_embeddings=text_embeddings, n_texts=n_texts, batch_size=batch_size, progress=progress)
    cfg = sae.cfg
    overview = _table(
        ["feature", "name", "images where it fires", "tokens where it fires", "largest activation"],
        [[f"<a href='#feature-{v.feature}'>{v.feature}</a>", _name_cell(v), f"{100 * v.image_density:.1f}%",
          f"{100 * v.token_density:.2f}%", f"{v.max_activation:.3g}"] for v in views],
    )
    named = (
        "A feature's name is the text whose embedding is closest (cosine) to what the feature's decoder direction "
        "writes into the model's output along the direct path (through the final LayerNorm, with its scale frozen, "
        "and the readout); the table under the heading lists the best texts with their cosines."
        if texts is not None else "No text pool was given, so the features are not named."
    )
    intro = (
        f"{len(views)} features of a {html.escape(cfg.architecture)} SAE with {cfg.d_sae} features on "
        f"<code>{html.escape(str(cfg.hook_name))}</code> (tokens: {html.escape(cfg.token_selection)}) of "
        f"{html.escape(tower.cfg.model_name)}, over {views[0].n_images} images. {named} Each section gives how "
        "often the feature fires, the histogram of its non-zero activations over all tokens, and the images where "
        f"its {image_score} activation over the image's tokens is largest, titled with their index in the image "
        "stream and that score, each above a map of the feature's activation at each patch, on one colour scale "
        "per feature. Written by vit_lens."
    )
    cols = min(k, 8)
    patch_size = tuple(tower.cfg.patch_size)
    sections = [("features", [overview])] + [_feature_section(view, patch_size, cols) for view in views]
    title = title or f"SAE features: {cfg.hook_name} of {tower.cfg.model_name}"
    return plot.write_html_report(sections, path, title=title, intro=intro)
