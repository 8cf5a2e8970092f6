"""The HTML report of ``vit-lens demo``: a one-page tour of what vit_lens shows about a CLIP model.

For a few images it draws the direct effect of every layer and head on the image's best text
match, the CLS attention of every layer over the image, the TextSpan descriptions of the heads
with the largest direct effects, and a zero-shot segmentation; figures are plotly, the file is
self-contained (it opens offline).

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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vit_lens.utils import plotting as plot
from vit_lens.intervene.decompose import direct_contributions, required_hooks


def _progress(message: str, log: Callable[[str], None] | None) -> None:
    if log is not None:
        log(message)


@torch.no_grad()
def head_outputs_over(model, images: Tensor, batch_size: int = 250) -> Tensor:
    """``[n_images, n_layers, n_heads, d_repr]``: every head's direct contribution, in batches."""
    chunks = []
    names = required_hooks(model, "head")
    for start in range(0, len(images), batch_size):
        _, cache = model.run_with_cache(images[start : start + batch_size], names_filter=names)
        chunks.append(direct_contributions(model, cache, level="head").heads())
    return torch.cat(chunks)


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
    n_heads_shown: int = 6,
    n_texts: int = 5,
    model_name: str = "model",
    log: Callable[[str], None] | None = print,
) -> Path:
    """Write the demo report for ``images`` and return its path.

    Args:
        model: A :class:`vit_lens.HookedViT` (for a CLIP model, its ``.vision``).
        images: ``[n, 3, H, W]`` model inputs (a few: every image gets its own panels).
        class_names: Names of the classes (zero-shot prompts, or a classifier's labels).
        class_directions: ``[n_classes, d_repr]``: unit text embeddings of the prompts for CLIP,
            the classifier's weight columns for a timm model. Each image is explained with respect
            to its best-scoring class.
        pool: Descriptions for TextSpan, with ``pool_embeddings`` ``[n_texts, d_repr]`` (None: no
            TextSpan section; it needs a text model).
        textspan_images: Images whose head contributions TextSpan analyses (hundreds or more give
            meaningful descriptions; default: ``images``).
        out: Output HTML path.
        display_images: What to draw under the maps (default: ``images``; pass unnormalised
            images when ``images`` are normalised for the model).
        titles: One caption per image.
        true_masks: ``[n, H, W]`` bool foreground masks, if known: the segmentation is scored.
        n_heads_shown: Heads described with TextSpan.
        n_texts: Descriptions per head.
        model_name: Shown in the title.
        log: Progress messages go here (None: silent).
    """
    from vit_lens.methods.segmentation.maps import text_heatmaps, upsample
    from vit_lens.methods.textspan.textspan import textspan

    cfg = model.cfg
    if class_directions.ndim != 2 or class_directions.shape[0] != len(class_names):
        raise ValueError(
            f"class_directions must be [n_classes={len(class_names)}, d_repr], got {tuple(class_directions.shape)}"
        )
    if (pool is None) != (pool_embeddings is None):
        raise ValueError("pass both pool and pool_embeddings for the TextSpan section, or neither")
    display = images if display_images is None else display_images
    titles = [f"image {i}" for i in range(len(images))] if titles is None else list(titles)
    sections: list[tuple[str, Any]] = []

    _progress(f"caching {len(images)} image(s) ...", log)
    needed = set(required_hooks(model, "head")) | set(required_hooks(model, "layer"))
    _, cache = model.run_with_cache(images, names_filter=lambda name: name.endswith("hook_pattern") or name in needed)
    heads = direct_contributions(model, cache, level="head")
    scores = heads.sum() @ class_directions.T  # [n, k]
    predicted = scores.argmax(dim=1)
    lines = [
        f"{t}: best class '{class_names[p]}' (score {scores[i, p]:.3f})"
        for i, (t, p) in enumerate(zip(titles, predicted.tolist()))
    ]
    sections.append(("Images and their best class", "\n".join(lines)))

    _progress("direct effects of layers and heads ...", log)
    direction = class_directions[predicted]  # [n, d]
    effect = (heads.values * direction[:, None]).sum(-1)  # [n, component]
    per_head = effect[:, heads.head >= 0].reshape(len(images), cfg.n_layers, cfg.n_heads)
    layers = direct_contributions(model, cache, level="layer")
    layer_effect = (layers.values * direction[:, None]).sum(-1).mean(0)
    attn = [layer_effect[layers.labels.index(f"L{l}ATTN")].item() for l in range(cfg.n_layers)]
    mlp = [layer_effect[layers.labels.index(f"L{l}MLP")].item() for l in range(cfg.n_layers)]
    sections.append(
        (
            "Direct effect on the best class's score",
            [
                plot.layer_head_grid(per_head.mean(0), title="heads, mean over the images", text_format=None if cfg.n_heads > 8 else ".2f"),
                plot.layer_curves({"attention": attn, "MLP": mlp}, title="layers", yaxis_title="direct effect"),
            ],
        )
    )

    _progress("CLS attention maps per layer ...", log)
    attention_maps = []
    for i in range(len(images)):
        rows = torch.stack([cache["pattern", l][i, :, 0].mean(0) for l in range(cfg.n_layers)])  # [layer, key]
        grid = rows[:, cfg.n_prefix_tokens :].reshape(cfg.n_layers, *cache.grid_size)
        attention_maps.append(
            plot.image_heatmap_grid(
                display[i], grid, titles=[f"L{l}" for l in range(cfg.n_layers)], cols=min(cfg.n_layers, 6),
                title=f"{titles[i]}<br>CLS attention to patches (mean over heads)", shared_scale=False,
            )
        )
    sections.append(("Where CLS looks, layer by layer", attention_maps))

    if pool is not None:
        _progress("TextSpan on the heads with the largest direct effects ...", log)
        span_images = images if textspan_images is None else textspan_images
        outputs = head_outputs_over(model, span_images)  # [N, L, H, d]
        importance = per_head.abs().mean(0).flatten()
        chosen = importance.argsort(descending=True)[:n_heads_shown].tolist()
        table = ["<table><tr><th>head</th><th>mean |direct effect|</th><th>TextSpan descriptions (variance explained)</th></tr>"]
        for index in chosen:
            layer, head = divmod(index, cfg.n_heads)
            span = textspan(outputs[:, layer, head], pool_embeddings, n_texts=n_texts)
            items = ", ".join(f"'{pool[t]}' ({100 * v:.0f}%)" for t, v in zip(span.indices.tolist(), span.step_variance.tolist()))
            table.append(f"<tr><td>L{layer}H{head}</td><td>{importance[index]:.3f}</td><td>{items}</td></tr>")
        table.append("</table>")
        sections.append((f"TextSpan over {len(span_images)} images", plot.HTML("".join(table))))

    _progress("zero-shot segmentation ...", log)
    maps = text_heatmaps(model, images, class_directions.T)  # [n, k, rows, cols], mean over classes removed
    chosen_maps = maps[torch.arange(len(images)), predicted]
    pixels = upsample(chosen_maps[:, None], tuple(images.shape[-2:]))[:, 0]
    figures, notes = [], []
    for i in range(len(images)):
        figures.append(plot.image_heatmap(display[i], pixels[i], title=f"{titles[i]}<br>map of '{class_names[predicted[i]]}'"))
        if true_masks is not None:
            guess = pixels[i] > pixels[i].mean()
            truth = true_masks[i].to(guess.device)
            iou = (guess & truth).sum() / (guess | truth).sum().clamp_min(1)
            notes.append(f"{titles[i]}: IoU of the map thresholded at its mean with the true mask {iou:.2f}")
    sections.append(("Zero-shot segmentation of the best class", figures + (["\n".join(notes)] if notes else [])))

    intro = (
        f"{model_name}: {cfg.n_layers} layers x {cfg.n_heads} heads, d_model {cfg.d_model}, "
        f"{cfg.grid_size[0]}x{cfg.grid_size[1]} patches. Written by <code>vit-lens demo</code>."
    )
    path = plot.write_html_report(sections, out, title=f"vit_lens: {model_name}", intro=intro)
    _progress(f"report written to {path.resolve()}", log)
    return path
