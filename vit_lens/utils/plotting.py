"""Plotly figures for vision interpretability: maps over images, layer x head grids, per-layer curves.

Every function returns a ``plotly.graph_objects.Figure`` (show it in Jupyter, or collect several
into one self-contained HTML file with :func:`write_html_report`). Tensors may live on any device.

Example:
    >>> import torch
    >>> from vit_lens import plot
    >>> fig = plot.layer_head_grid(torch.randn(4, 4), title="direct effect")
    >>> fig.data[0].zmid
    0.0
"""

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_DIVERGING = "RdBu_r"  # red positive, blue negative
_SEQUENTIAL = "Viridis"


def _go():
    import plotly.graph_objects as go

    return go


def _numpy(x: Any, what: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().float().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x.astype(np.float32)
    raise TypeError(f"{what} must be a torch.Tensor or a numpy array, got {type(x).__name__}")


def _image_rgb(image: Any) -> np.ndarray:
    """``[H, W, 3]`` uint8 from a ``[3, H, W]`` / ``[H, W, 3]`` / ``[H, W]`` image in [0, 1] (or 0-255)."""
    array = _numpy(image, "image")
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"image must be [3, H, W], [H, W, 3] or [H, W], got shape {tuple(array.shape)}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.max() > 1.5:  # 0-255 values
        array = array / 255.0
    else:  # normalised images: stretch to [0, 1] for display
        low, high = array.min(), array.max()
        if low < 0 or high > 1:
            array = (array - low) / max(high - low, 1e-8)
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8)


def _resize_map(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if heatmap.shape == size:
        return heatmap
    tensor = torch.from_numpy(np.ascontiguousarray(heatmap))[None, None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _map_trace(heatmap: np.ndarray, colorscale: str, zmid: float | None, opacity: float, showscale: bool, **kwargs):
    go = _go()
    args = dict(z=heatmap, colorscale=colorscale, opacity=opacity, showscale=showscale, **kwargs)
    if zmid is not None:
        args["zmid"] = zmid
    return go.Heatmap(**args)


def image_heatmap(
    image: Any,
    heatmap: Any,
    *,
    title: str | None = None,
    opacity: float = 0.55,
    colorscale: str | None = None,
    zmid: float | None = None,
    colorbar_title: str | None = None,
) -> "go.Figure":  # noqa: F821
    """A map (patch grid or pixels) drawn over an image, with a colour bar.

    Args:
        image: ``[3, H, W]`` or ``[H, W, 3]`` in [0, 1] (normalised images are stretched for display).
        heatmap: ``[rows, cols]`` (e.g. a patch grid; upsampled bilinearly to the image) or ``[H, W]``.
        title: Figure title.
        opacity: Of the map over the image.
        colorscale: Default: diverging (centred at ``zmid=0``) when the map has both signs, else Viridis.
        zmid: Value at the centre of a diverging scale.
        colorbar_title: Label of the colour bar.

    Example:
        >>> fig = image_heatmap(torch.rand(3, 64, 64), torch.randn(8, 8), title="L3 CLS attention")
        >>> [trace.type for trace in fig.data]
        ['image', 'heatmap']
    """
    go = _go()
    rgb = _image_rgb(image)
    values = _numpy(heatmap, "heatmap")
    if values.ndim != 2:
        raise ValueError(f"heatmap must be 2-D [rows, cols], got shape {tuple(values.shape)}")
    values = _resize_map(values, rgb.shape[:2])
    signed = values.min() < 0 < values.max()
    colorscale = colorscale or (_DIVERGING if signed else _SEQUENTIAL)
    zmid = 0.0 if zmid is None and signed else zmid
    fig = go.Figure([go.Image(z=rgb), _map_trace(values, colorscale, zmid, opacity, True, colorbar=dict(title=colorbar_title))])
    fig.update_layout(title=dict(text=title, font=dict(size=13)), width=420, height=400,
                      margin=dict(l=10, r=10, t=60 if title else 10, b=10))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x")
    return fig


def image_heatmap_grid(
    image: Any,
    heatmaps: Any,
    *,
    titles: Sequence[str] | None = None,
    cols: int = 6,
    title: str | None = None,
    opacity: float = 0.6,
    colorscale: str | None = None,
    shared_scale: bool = True,
) -> "go.Figure":  # noqa: F821
    """Small multiples: several maps over the same image (one per layer, head or text).

    Args:
        image: As in :func:`image_heatmap` (or None to draw the maps alone).
        heatmaps: ``[n, rows, cols]``.
        titles: One per map (default ``"0", "1", ...``).
        cols: Panels per row.
        title: Figure title.
        opacity: Of the maps over the image.
        colorscale: As in :func:`image_heatmap`.
        shared_scale: One colour range for all panels (compare magnitudes) or one per panel.

    Example:
        >>> fig = image_heatmap_grid(torch.rand(3, 64, 64), torch.rand(4, 8, 8), titles=[f"L{l}" for l in range(4)])
        >>> len(fig.data)
        8
    """
    from plotly.subplots import make_subplots

    go = _go()
    maps = _numpy(heatmaps, "heatmaps")
    if maps.ndim != 3:
        raise ValueError(f"heatmaps must be [n, rows, cols], got shape {tuple(maps.shape)}")
    n = len(maps)
    titles = [str(i) for i in range(n)] if titles is None else list(titles)
    if len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} maps")
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    rgb = _image_rgb(image) if image is not None else None
    size = rgb.shape[:2] if rgb is not None else maps.shape[1:]
    resized = np.stack([_resize_map(m, size) for m in maps])
    signed = resized.min() < 0 < resized.max()
    colorscale = colorscale or (_DIVERGING if signed else _SEQUENTIAL)
    low, high = float(resized.min()), float(resized.max())
    if signed:
        high = max(abs(low), abs(high))
        low = -high
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.02, vertical_spacing=0.08)
    for i, values in enumerate(resized):
        r, c = divmod(i, cols)
        if rgb is not None:
            fig.add_trace(go.Image(z=rgb), row=r + 1, col=c + 1)
        scale = dict(zmin=low, zmax=high) if shared_scale else {}
        fig.add_trace(
            _map_trace(values, colorscale, 0.0 if signed and not shared_scale else None, opacity if rgb is not None else 1.0,
                       showscale=(i == 0 and shared_scale), **scale),
            row=r + 1, col=c + 1,
        )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_layout(title=title, width=150 * cols + 80, height=160 * rows + 70, margin=dict(l=10, r=10, t=60, b=10))
    return fig


def layer_head_grid(
    values: Any,
    *,
    title: str | None = None,
    colorscale: str = "RdBu",
    zmid: float = 0.0,
    colorbar_title: str | None = None,
    text_format: str | None = ".2f",
) -> "go.Figure":  # noqa: F821
    """A ``[layer, head]`` grid (direct effects, patching results, pruning scores), centred at zero.

    Args:
        values: ``[n_layers, n_heads]``.
        title: Figure title.
        colorscale: Diverging scale (RdBu: blue positive, red negative, as TransformerLens plots it).
        zmid: Value drawn white.
        colorbar_title: Label of the colour bar.
        text_format: Format of the numbers written in the cells (None: no numbers).

    Example:
        >>> layer_head_grid(torch.randn(3, 4)).data[0].z.shape
        (3, 4)
    """
    go = _go()
    grid = _numpy(values, "values")
    if grid.ndim != 2:
        raise ValueError(f"values must be [n_layers, n_heads], got shape {tuple(grid.shape)}")
    n_layers, n_heads = grid.shape
    text = [[format(v, text_format) for v in row] for row in grid] if text_format else None
    fig = go.Figure(
        go.Heatmap(
            z=grid,
            x=[f"H{h}" for h in range(n_heads)],
            y=[f"L{l}" for l in range(n_layers)],
            colorscale=colorscale,
            zmid=zmid,
            text=text,
            texttemplate="%{text}" if text else None,
            colorbar=dict(title=colorbar_title),
            hovertemplate="layer %{y}, head %{x}: %{z:.4g}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", title="layer")
    fig.update_xaxes(title="head", side="top")
    fig.update_layout(title=title, width=max(360, 60 * n_heads + 160), height=max(280, 40 * n_layers + 140))
    return fig


def layer_curves(
    curves: Mapping[str, Any] | Any,
    *,
    x: Sequence[Any] | None = None,
    title: str | None = None,
    xaxis_title: str = "layer",
    yaxis_title: str | None = None,
) -> "go.Figure":  # noqa: F821
    """One line per curve over layers (or any x): e.g. an accuracy after ablating each layer.

    Args:
        curves: ``{name: values}``, or a single 1-D sequence / tensor.
        x: The x values (default ``0 .. n-1``).
        title, xaxis_title, yaxis_title: Labels.

    Example:
        >>> fig = layer_curves({"attention": [0.1, 0.5, 0.9], "mlp": [0.2, 0.3, 0.8]}, yaxis_title="accuracy")
        >>> [trace.name for trace in fig.data]
        ['attention', 'mlp']
    """
    go = _go()
    if not isinstance(curves, Mapping):
        curves = {"": curves}
    fig = go.Figure()
    for name, values in curves.items():
        ys = _numpy(values, f"curve {name!r}") if isinstance(values, (Tensor, np.ndarray)) else np.asarray(values, dtype=float)
        if ys.ndim != 1:
            raise ValueError(f"curve {name!r} must be 1-D, got shape {tuple(ys.shape)}")
        xs = list(range(len(ys))) if x is None else list(x)
        if len(xs) != len(ys):
            raise ValueError(f"curve {name!r} has {len(ys)} values for {len(xs)} x values")
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name or None, showlegend=bool(name)))
    fig.update_layout(title=title, xaxis_title=xaxis_title, yaxis_title=yaxis_title, width=560, height=360)
    return fig


class HTML(str):
    """A string that :func:`write_html_report` inserts as HTML (plain strings are shown as text)."""


def write_html_report(
    sections: Sequence[tuple[str, Any]], path: str | Path, *, title: str = "vit_lens report", intro: str | None = None
) -> Path:
    """Write figures and text into one self-contained HTML file (plotly.js inlined once; opens offline).

    Args:
        sections: ``(heading, content)`` pairs; content is a plotly Figure, a list of Figures
            (shown side by side), or a string (an HTML fragment, or plain text when it has no tag).
        path: Output file.
        title: Page title.
        intro: A paragraph under the title.

    Returns:
        The path written.

    Example:
        >>> import tempfile, os
        >>> out = write_html_report([("grid", layer_head_grid(torch.randn(2, 2)))], os.path.join(tempfile.mkdtemp(), "r.html"))
        >>> out.read_text().count("<h2>")
        1
    """
    import plotly.io as pio

    path = Path(path)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
        ".row{display:flex;flex-wrap:wrap;gap:8px}pre{background:#f6f6f6;padding:.8em;overflow-x:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if intro:
        parts.append(f"<p>{intro}</p>")
    first = True
    for heading, content in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        items = content if isinstance(content, (list, tuple)) else [content]
        parts.append("<div class='row'>")
        for item in items:
            if isinstance(item, str):
                parts.append(item if isinstance(item, HTML) else f"<pre>{html.escape(item)}</pre>")
            else:
                parts.append(pio.to_html(item, full_html=False, include_plotlyjs=True if first else False))
                first = False
        parts.append("</div>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
