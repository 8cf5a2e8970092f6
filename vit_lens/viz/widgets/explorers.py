"""The three explorers: anywidget views whose numbers come from vit_lens's own functions.

Each view keeps what the page shows in synced traitlets (plain lists of floats, image data URLs)
and recomputes them in the kernel when a selection the page sends back changes (the query patch,
the corrupted region, the metric, the direction). The page only draws; the tensors stay on the
Python side (``.attention``, ``.result``, ``.contributions``), so what a test or a user reads from
the widget is exactly what vit_lens computed.
"""

import base64
import html
import io
import json
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from vit_lens.intervene.decompose import direct_contributions
from vit_lens.intervene.patching import PatchingResult, activation_patching
from vit_lens.model.hooked_vit import image_tower

try:
    import anywidget
    import traitlets
except ImportError as error:  # pragma: no cover - exercised by the message test with the module hidden
    raise ImportError(
        "vit_lens.widgets needs anywidget (and ipywidgets for the notebook front end): "
        "pip install 'vit_lens[widgets]'"
    ) from error

_ASSETS = resources.files("vit_lens.viz.widgets")
FILLS = ("mean", "blur", "swap")
# A static page carries every query's attention when it stays this small (floats); larger models
# get the selected query's only.
STATIC_ATTENTION_LIMIT = 2_000_000


def _data_url(image: Tensor) -> str:
    """A ``[3, H, W]`` image as a PNG data URL; values outside [0, 1] are rescaled to it."""
    from PIL import Image

    image = image.detach().float().cpu()
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected one image [channels, height, width] with 1 or 3 channels, got {tuple(image.shape)}")
    if image.min() < 0 or image.max() > 1:  # preprocessed (standardised) pixels: show their range
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    pixels = (image.expand(3, -1, -1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _one_image(image: Any, name: str) -> Tensor:
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} must be an image tensor [channels, height, width] (or [1, C, H, W]), got {type(image).__name__}")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3:
        raise ValueError(f"{name} must be one image [channels, height, width] (or [1, C, H, W]), got {tuple(image.shape)}")
    return image


def _rounded(values: Tensor, digits: int = 6) -> list:
    """Nested lists of floats for the page (NaN becomes None: JSON has no NaN)."""
    rounded = values.detach().double().cpu().round(decimals=digits)
    return [[None if v != v else v for v in row] for row in rounded.tolist()] if rounded.ndim == 2 else rounded.tolist()


class _Explorer(anywidget.AnyWidget):
    """Shared by the views: the ES module and style sheet, and the static HTML export."""

    _esm = Path(str(_ASSETS.joinpath("explorers.js")))
    _css = Path(str(_ASSETS.joinpath("explorers.css")))
    _view = traitlets.Unicode("").tag(sync=True)
    busy = traitlets.Bool(False).tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)

    def _static_state(self) -> dict[str, Any]:
        """Extra state a page without a kernel needs to stay interactive (the view's precomputed tables)."""
        return {}

    def to_html(self, path: str | Path, title: str | None = None) -> Path:
        """Write a self-contained HTML page showing this view, interactive without a kernel.

        The page inlines the ES module, the style sheet and the current state; selections that
        need the model (a new corrupted region, another metric) are answered from what was
        precomputed, or shown as needing a kernel.

        Args:
            path: The ``.html`` file to write.
            title: The page title; default: the view's class name.

        Returns:
            The path written.
        """
        path = Path(path)
        if path.suffix.lower() not in (".html", ".htm"):
            raise ValueError(f"to_html writes an .html page; got {str(path)!r} (use e.g. 'patch_explorer.html')")
        # the views' own traits; anywidget's and ipywidgets' (module names, layout) mean nothing here
        inherited = set(anywidget.AnyWidget.class_trait_names(sync=True))
        state = {name: getattr(self, name) for name in self.trait_names(sync=True) if name not in inherited}
        state.update(self._static_state())
        state["_static"] = True
        module = _ASSETS.joinpath("explorers.js").read_text()
        css = _ASSETS.joinpath("explorers.css").read_text()
        title = html.escape(title or type(self).__name__)
        # "</" inside a script element would end it early
        data = json.dumps(state, allow_nan=False).replace("</", "<\\/")
        source = json.dumps(module).replace("</", "<\\/")
        page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title><style>{css}</style></head>
<body><div id="vit-lens-view"></div>
<script type="application/json" id="vit-lens-state">{data}</script>
<script type="module">
const source = {source};
const view = await import(URL.createObjectURL(new Blob([source], {{type: "text/javascript"}})));
const state = JSON.parse(document.getElementById("vit-lens-state").textContent);
const listeners = {{}};
const model = {{
  get: (name) => state[name],
  set: (name, value) => {{ state[name] = value; (listeners["change:" + name] || []).forEach((f) => f()); }},
  save_changes: () => {{}},
  on: (event, callback) => {{ (listeners[event] = listeners[event] || []).push(callback); }},
  off: () => {{}},
  send: () => {{}},
}};
(view.default.render)({{model, el: document.getElementById("vit-lens-view")}});
</script></body></html>
"""
        path.write_text(page, encoding="utf-8")
        return path

    def _compute(self, update: Callable[[], None]) -> None:
        """Run ``update``, showing a busy flag and any error on the page as well as raising it."""
        self.busy = True
        try:
            update()
            self.error = ""
        except Exception as error:
            self.error = f"{type(error).__name__}: {error}"
            raise
        finally:
            self.busy = False


class PatchExplorer(_Explorer):
    """An image's patch grid: click a patch (or CLS) to see its attention over the image.

    Sliders choose the layer and head. For a CLIP with ``texts``, the panel also lists the
    selected token's largest direct contributions (per head) to each text's direction, from
    :func:`~vit_lens.intervene.decompose.direct_contributions` at ``head_token`` level.

    Args:
        model: A HookedViT, or a HookedCLIP (its image tower is used).
        image: One preprocessed image, ``[channels, height, width]`` (or ``[1, C, H, W]``).
        texts: For a HookedCLIP: descriptions whose directions the token's terms are read along.
        layer, head, query: The initial selection (``query`` is a token index; 0 is CLS where there is one).
        top_k: How many terms to list.

    Attributes:
        patterns: ``[layer, head, query, key]``, the attention patterns of the image's run.
        attention: ``[layer, head, key]``, the selected query's row of every pattern (what the page draws).
    """

    query = traitlets.Int(0).tag(sync=True)
    layer = traitlets.Int(0).tag(sync=True)
    head = traitlets.Int(0).tag(sync=True)
    image_url = traitlets.Unicode("").tag(sync=True)
    grid = traitlets.List([]).tag(sync=True)
    n_prefix = traitlets.Int(0).tag(sync=True)
    n_layers = traitlets.Int(0).tag(sync=True)
    n_heads = traitlets.Int(0).tag(sync=True)
    token_labels = traitlets.List([]).tag(sync=True)
    attention_rows = traitlets.List([]).tag(sync=True)
    terms = traitlets.List([]).tag(sync=True)
    _all_attention = traitlets.List([]).tag(sync=True)

    def __init__(self, model: Any, image: Tensor, texts: Sequence[str] | None = None, *, layer: int = 0, head: int = 0,
                 query: int = 0, top_k: int = 8, **kwargs: Any):
        tower = image_tower(model)
        image = _one_image(image, "image")
        self._model, self._tower, self._top_k = model, tower, top_k
        # the default cache, as users record it: a names_filter can change which attention kernel
        # runs, and with it the last bits of the patterns
        with torch.no_grad():
            _, cache = tower.run_with_cache(image[None])
            self.patterns = torch.stack([cache["pattern", layer][0] for layer in range(tower.cfg.n_layers)])
            self._token_terms = self._decompose(model, tower, cache, texts) if texts else None
        self._texts = list(texts or [])
        n_tokens = self.patterns.shape[-1]
        labels = tower.token_labels(image[None])
        _check_index(query, n_tokens, "query", f"a token index below {n_tokens} (0 is {labels[0]})")
        _check_index(layer, tower.cfg.n_layers, "layer", f"0 to {tower.cfg.n_layers - 1}")
        _check_index(head, tower.cfg.n_heads, "head", f"0 to {tower.cfg.n_heads - 1}")
        super().__init__(
            _view="patch", image_url=_data_url(image), grid=list(cache.grid_size), n_prefix=tower.cfg.n_prefix_tokens,
            n_layers=tower.cfg.n_layers, n_heads=tower.cfg.n_heads, token_labels=labels, layer=layer, head=head,
            query=query, **kwargs,
        )
        self._update()

    @staticmethod
    def _decompose(model: Any, tower: Any, cache: Any, texts: Sequence[str]) -> Tensor:
        """``[layer, head, token, text]``: each head's per-token direct term along each text's direction."""
        if not hasattr(model, "encode_text"):
            raise TypeError(f"texts need a model with a text tower (HookedCLIP); got {type(model).__name__}")
        directions = model.encode_text(list(texts), normalize=True).T  # [d_embed, n_texts]
        terms = direct_contributions(tower, cache, level="head_token", directions=directions)
        mask = terms.token >= 0
        return terms.values[0, mask].reshape(tower.cfg.n_layers, tower.cfg.n_heads, -1, len(texts))

    @property
    def attention(self) -> Tensor:
        """``[layer, head, key]``: the selected query's attention in every layer and head."""
        return self.patterns[:, :, self.query]

    @traitlets.observe("query")
    def _on_query(self, change: dict) -> None:
        self._compute(self._update)

    def _update(self) -> None:
        _check_index(self.query, self.patterns.shape[-1], "query", f"a token index below {self.patterns.shape[-1]}")
        self.attention_rows = [_rounded(rows) for rows in self.attention]
        if self._token_terms is not None:
            terms = self._token_terms[:, :, self.query]  # [layer, head, text]
            order = terms.flatten().abs().argsort(descending=True)[: self._top_k].tolist()
            n_heads, n_texts = terms.shape[1], terms.shape[2]
            self.terms = [
                {"head": f"L{i // (n_heads * n_texts)}H{i // n_texts % n_heads}", "text": self._texts[i % n_texts],
                 "value": round(float(terms.flatten()[i]), 6)}
                for i in order
            ]

    def _static_state(self) -> dict[str, Any]:
        if self.patterns.numel() > STATIC_ATTENTION_LIMIT:
            return {}
        return {"_all_attention": [[_rounded(head) for head in layer] for layer in self.patterns.permute(2, 0, 1, 3)]}


def _check_index(value: int, size: int, name: str, expected: str) -> None:
    if not 0 <= value < size:
        raise ValueError(f"{name}={value} is out of range; expected {expected}")


def _metric_from_spec(spec: Any, model: Any) -> tuple[str, Callable[[Tensor], Tensor] | str]:
    """``(name, metric or factor spec)`` for one metric choice; factor metrics are built per corruption."""
    if callable(spec):
        return getattr(spec, "__name__", "custom"), spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"metric {spec!r} is not understood; pass a callable metric(output) -> Tensor, 'class:<index>' (a class "
            "logit), 'text:<prompt>' (cosine with a text, CLIP) or 'factor:<name>' (a toy-world factor via its prompts)"
        )
    kind, _, argument = spec.partition(":")
    if kind == "class":
        if not argument.strip().isdigit():
            raise ValueError(f"metric {spec!r}: after 'class:' give a class index, e.g. 'class:3'")
        index = int(argument)
        return spec, lambda output: output[:, index]
    if kind in ("text", "factor"):
        if not hasattr(model, "encode_text"):
            raise TypeError(f"metric {spec!r} reads text directions, which needs a HookedCLIP; got {type(model).__name__}")
        if kind == "text":
            with torch.no_grad():
                direction = model.encode_text([argument], normalize=True)[0]
            return spec, lambda output: F.normalize(output, dim=-1) @ direction
        from vit_lens.toy.world import FACTORS

        if argument not in FACTORS:
            raise ValueError(f"metric {spec!r}: unknown factor {argument!r}; the factors are {list(FACTORS)}")
        return spec, spec
    raise ValueError(f"metric {spec!r}: the kind before ':' must be 'class', 'text' or 'factor', got {kind!r}")


class PatchingExplorer(_Explorer):
    """Activation patching on one image pair, recomputed in the kernel as the selection changes.

    Corrupt the clean image with another image (``fill="image"``), or paint patches of the clean
    image on the page and replace them by the image's mean colour (``"mean"``), a blur of the image
    (``"blur"``) or the same pixels of the other image (``"swap"``). The page shows the layer x
    position heatmap (patching ``resid_pre`` token by token) on the patch grid and the layer x head
    heatmap (patching each head's ``z``), both normalised: 0 is the corrupted run, 1 the clean one.

    Args:
        model: A HookedViT, or a HookedCLIP (its image tower's output is the metric's input).
        clean: The clean image, ``[channels, height, width]``.
        corrupted: The other image (the corrupted run with ``fill="image"``, the source of ``"swap"``).
        metric: One choice or a list of them: a callable ``metric(output) -> Tensor`` (a scalar or
            one value per image), ``"class:<index>"`` (that output logit), ``"text:<prompt>"``
            (cosine of the image embedding with the prompt's, CLIP), or ``"factor:<name>"`` (toy
            world: the cosine with the prompt of the clean image's predicted value of that factor minus
            that with the corrupted image's, over :func:`~vit_lens.toy.world.factor_prompts`; minus
            the mean over the other values' prompts when both predictions agree).
        fill: ``"image"``, ``"mean"``, ``"blur"`` or ``"swap"``.
        region: Patch indices (raster order over the grid) to corrupt for the painted fills.

    Attributes:
        result: The :class:`PatchingResult` of the layer x position sweep (``resid_pre``), unnormalised.
        head_result: The :class:`PatchingResult` of the layer x head sweep (``z``), unnormalised.
        corrupted_image: The corrupted image of the current selection.
    """

    metric_names = traitlets.List([]).tag(sync=True)
    metric = traitlets.Unicode("").tag(sync=True)
    fill = traitlets.Unicode("image").tag(sync=True)
    fills = traitlets.List([]).tag(sync=True)
    region = traitlets.List([]).tag(sync=True)
    clean_url = traitlets.Unicode("").tag(sync=True)
    corrupted_url = traitlets.Unicode("").tag(sync=True)
    grid = traitlets.List([]).tag(sync=True)
    n_prefix = traitlets.Int(0).tag(sync=True)
    token_labels = traitlets.List([]).tag(sync=True)
    layer_labels = traitlets.List([]).tag(sync=True)
    head_labels = traitlets.List([]).tag(sync=True)
    position_values = traitlets.List([]).tag(sync=True)
    head_values = traitlets.List([]).tag(sync=True)
    baselines = traitlets.Dict({}).tag(sync=True)

    def __init__(self, model: Any, clean: Tensor, corrupted: Tensor | None = None, metric: Any = None, *,
                 fill: str | None = None, region: Sequence[int] = (), **kwargs: Any):
        self._model, self._tower = model, image_tower(model)
        self.clean_image = _one_image(clean, "clean")
        self._other = None if corrupted is None else _one_image(corrupted, "corrupted")
        if self._other is not None and self._other.shape != self.clean_image.shape:
            raise ValueError(
                f"clean {tuple(self.clean_image.shape)} and corrupted {tuple(self._other.shape)} images differ in size; "
                "patching needs images of one size"
            )
        if metric is None:
            raise ValueError(
                "PatchingExplorer needs a metric: a callable metric(output) -> Tensor, 'class:<index>', "
                "'text:<prompt>' or 'factor:<name>' (or a list of them to choose from)"
            )
        specs = metric if isinstance(metric, (list, tuple)) else [metric]
        self._metrics = dict(_metric_from_spec(spec, model) for spec in specs)
        fills = ["image", *FILLS] if self._other is not None else ["mean", "blur"]
        fill = fill or fills[0]
        if fill not in fills:
            raise ValueError(
                f"fill={fill!r} is not available here; choose from {fills}"
                + ("" if self._other is not None else " ('image' and 'swap' need a corrupted image)")
            )
        with torch.no_grad():
            _, self._clean_cache = self._tower.run_with_cache(self.clean_image[None])
        cfg = self._tower.cfg
        rows, cols = self._clean_cache.grid_size
        super().__init__(
            _view="patching", metric_names=list(self._metrics), metric=next(iter(self._metrics)), fills=fills,
            fill=fill, region=list(region), clean_url=_data_url(self.clean_image), grid=[rows, cols],
            n_prefix=cfg.n_prefix_tokens, token_labels=self._tower.token_labels(self.clean_image[None]), **kwargs,
        )
        self._update()

    @property
    def corrupted_image(self) -> Tensor:
        """The corrupted image the current fill and region give."""
        clean = self.clean_image
        if self.fill == "image":
            return self._other
        rows, cols = self.grid
        height, width = clean.shape[-2:]
        mask = torch.zeros(rows * cols, dtype=torch.bool)
        for index in self.region:
            _check_index(index, rows * cols, "region patch", f"patch indices 0 to {rows * cols - 1} (raster order)")
            mask[index] = True
        pixels = F.interpolate(mask.reshape(1, 1, rows, cols).float(), size=(height, width), mode="nearest")[0] > 0
        if self.fill == "mean":
            replacement = clean.mean(dim=(1, 2), keepdim=True).expand_as(clean)
        elif self.fill == "blur":
            replacement = _blur(clean)
        elif self.fill == "swap":
            replacement = self._other
        else:
            raise ValueError(f"fill={self.fill!r} is not one of {self.fills}")
        return torch.where(pixels, replacement, clean)

    def metric_function(self, corrupted: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """The selected metric as ``metric(output) -> Tensor`` for this pair (factor metrics depend on it)."""
        chosen = self._metrics[self.metric]
        if callable(chosen):
            return chosen
        from vit_lens.toy.world import factor_prompts

        corrupted = self.corrupted_image if corrupted is None else corrupted
        with torch.no_grad():
            prompts = self._model.encode_text(factor_prompts(chosen.partition(":")[2]), normalize=True)
            logits = F.normalize(self._tower(torch.stack([self.clean_image, corrupted])), dim=-1) @ prompts.T
        clean_value, corrupted_value = logits.argmax(dim=-1).tolist()
        # a corruption that leaves the prediction alone still moves the clean value's logit: read it
        # against the mean of the other values then
        others = prompts[[i for i in range(len(prompts)) if i != clean_value]].mean(dim=0)
        direction = prompts[clean_value] - (prompts[corrupted_value] if corrupted_value != clean_value else others)
        return lambda output: F.normalize(output, dim=-1) @ direction

    @traitlets.observe("metric", "fill", "region")
    def _on_selection(self, change: dict) -> None:
        if change["name"] == "region" and self.fill == "image":
            return  # the corrupted run is the other image: the painted region applies once a fill is chosen
        self._compute(self._update)

    def _update(self) -> None:
        if self.metric not in self._metrics:
            raise ValueError(f"metric {self.metric!r} is not one of this explorer's metrics {list(self._metrics)}")
        corrupted = self.corrupted_image
        metric = self.metric_function(corrupted)
        with torch.no_grad():
            self.result = activation_patching(self._tower, corrupted[None], self._clean_cache, metric,
                                              activation="resid_pre", by="position")
            self.head_result = activation_patching(self._tower, corrupted[None], self._clean_cache, metric,
                                                   activation="z", by="head")
        span = self.result.baseline_clean - self.result.baseline_corrupted
        shown_position = self.result.normalized() if span != 0 else self.result
        shown_head = self.head_result.normalized() if span != 0 else self.head_result
        self.corrupted_url = _data_url(corrupted)
        self.layer_labels = self.result.labels[0]
        self.head_labels = self.head_result.labels[1]
        self.position_values = _rounded(shown_position.values)
        self.head_values = _rounded(shown_head.values)
        self.baselines = {"clean": self.result.baseline_clean, "corrupted": self.result.baseline_corrupted,
                          "normalized": span != 0}

    def figure(self, by: str = "position", title: str | None = None) -> Any:
        """The plotly figure of the current result (``by="position"`` or ``"head"``), normalised where possible."""
        if by not in ("position", "head"):
            raise ValueError(f"by must be 'position' or 'head', got {by!r}")
        result: PatchingResult = self.result if by == "position" else self.head_result
        shown = result.normalized() if result.baseline_clean != result.baseline_corrupted else result
        return shown.figure(title=title)


def _blur(image: Tensor, radius: int = 3) -> Tensor:
    """A box blur of ``[C, H, W]`` (edges padded by reflection), the 'blur' fill."""
    size = 2 * radius + 1
    padded = F.pad(image[None], (radius,) * 4, mode="reflect")
    return F.avg_pool2d(padded, size, stride=1)[0]


class DecompositionExplorer(_Explorer):
    """Per-head direct contributions to a text or class direction over a set of images, sortable.

    The table lists every head's mean contribution over the images along the chosen direction
    (click a column header to sort); hovering a head shows its top images; clicking it shows the
    head x token map (the head's per-token terms, averaged over the images) on the patch grid.

    Args:
        model: A HookedViT, or a HookedCLIP.
        images: ``[batch, channels, height, width]``.
        texts: For a HookedCLIP: prompts whose (normalised) embeddings are the directions.
        directions: Instead of texts: ``[d_repr, k]`` columns (class vectors, probe weights).
        direction_names: A name per column of ``directions``; default ``d0, d1, ...``.
        top_k: How many top images to show per head.

    Attributes:
        contributions: ``[batch, layer, head, direction]``, from ``direct_contributions(level="head").heads()``.
        token_map: ``[rows, cols]`` plus prefix: the selected head's mean per-token terms (see :meth:`head_token_map`).
    """

    direction_names = traitlets.List([]).tag(sync=True)
    direction = traitlets.Int(0).tag(sync=True)
    selected_head = traitlets.Unicode("").tag(sync=True)
    head_labels = traitlets.List([]).tag(sync=True)
    head_means = traitlets.List([]).tag(sync=True)
    top_images = traitlets.List([]).tag(sync=True)
    thumbnails = traitlets.List([]).tag(sync=True)
    grid = traitlets.List([]).tag(sync=True)
    n_prefix = traitlets.Int(0).tag(sync=True)
    token_values = traitlets.List([]).tag(sync=True)

    def __init__(self, model: Any, images: Tensor, texts: Sequence[str] | None = None, *,
                 directions: Tensor | None = None, direction_names: Sequence[str] | None = None, top_k: int = 4,
                 **kwargs: Any):
        if (texts is None) == (directions is None):
            raise ValueError("DecompositionExplorer needs exactly one of texts= (prompts, CLIP) or directions= ([d_repr, k])")
        if not isinstance(images, Tensor) or images.ndim != 4:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a batch [batch, channels, height, width], got {got}")
        self._tower = image_tower(model)
        if texts is not None:
            if not hasattr(model, "encode_text"):
                raise TypeError(
                    f"texts need a model with a text tower (HookedCLIP); got {type(model).__name__}: pass directions="
                )
            with torch.no_grad():
                directions = model.encode_text(list(texts), normalize=True).T
            names = list(texts)
        else:
            names = list(direction_names) if direction_names is not None else [f"d{i}" for i in range(directions.shape[1])]
            if len(names) != directions.shape[1]:
                raise ValueError(f"{len(names)} direction_names for {directions.shape[1]} directions")
        self.images, self.directions = images, directions
        with torch.no_grad():
            _, self._cache = self._tower.run_with_cache(images)
            self.contributions = direct_contributions(self._tower, self._cache, level="head", directions=directions).heads()
        cfg = self._tower.cfg
        n_layers, n_heads = self.contributions.shape[1:3]
        labels = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
        per_head = self.contributions.flatten(1, 2)  # [batch, head, direction]
        top = per_head.argsort(dim=0, descending=True)[:top_k]  # [top_k, head, direction]
        super().__init__(
            _view="decomposition", direction_names=names, head_labels=labels,
            head_means=_rounded(per_head.mean(dim=0).T), top_images=top.permute(2, 1, 0).tolist(),
            thumbnails=[_data_url(image) for image in images], grid=list(self._cache.grid_size),
            n_prefix=cfg.n_prefix_tokens, **kwargs,
        )

    def head_token_map(self, head: str | None = None) -> Tensor:
        """``[n_tokens]``: a head's per-token terms along the selected direction, averaged over the images.

        Args:
            head: ``"L{layer}H{head}"``; default: the selected head.
        """
        head = head or self.selected_head
        if head not in self.head_labels:
            raise ValueError(f"head {head!r} is not one of this model's heads ({self.head_labels[0]} ... {self.head_labels[-1]})")
        layer, index = (int(part) for part in head[1:].split("H"))
        with torch.no_grad():
            terms = direct_contributions(self._tower, self._cache, level="head_token", layers=[layer],
                                         directions=self.directions[:, self.direction : self.direction + 1])
        mask = (terms.head == index) & (terms.token >= 0)
        return terms.values[:, mask, 0].mean(dim=0)

    @traitlets.observe("selected_head", "direction")
    def _on_selection(self, change: dict) -> None:
        if not 0 <= self.direction < len(self.direction_names):
            raise ValueError(f"direction={self.direction} is out of range; 0 to {len(self.direction_names) - 1}")
        if self.selected_head:
            self._compute(lambda: setattr(self, "token_values", _rounded(self.head_token_map())))
