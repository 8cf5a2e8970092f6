"""Last-layer token mixing (Ghiasi et al. 2022, section 4): isolating CLS, and classifying from single patches.

Two experiments test whether the CLS token gathers global information throughout the network or
only in the last layer:

- **Isolating CLS** (the paper's Table 1, 78.61 % on ViT-B/16): in every block before
  ``until_layer`` (default: the last block) CLS attends only to itself and the patches only to
  patches; the CLS residual entering block ``until_layer`` is the value of a forward pass of the CLS
  token alone (no patches), a constant over images. :func:`isolated_cls_hooks` builds the hooks,
  :func:`cls_only_residual` computes the constant, :func:`cls_isolation_accuracy` measures accuracy.
- **Classifying from single patches** (Table 1 "patch average" 75.75 % / "patch maximum" 80.16 %,
  figure 7): the model's own readout (final LayerNorm, then head or projection) applied to every
  token of the last layer: :func:`per_token_scores`, :func:`patch_classification_accuracy`.

"Classification" is the classifier head of a timm-style ``HookedViT`` (``cfg.n_classes > 0``), or
zero-shot for a CLIP tower: cosine of the image embedding with the columns of ``classifier``
(``HookedCLIP.zero_shot_classifier`` or unit-norm text embeddings ``[d_embed, n_classes]``).

Which tokens are isolated: those the readout pools (CLS; CLS and the distillation token for a
distilled DeiT). Register tokens stay with the patches. Models that average-pool have no CLS to
isolate and are refused.

Example:
    >>> import torch, vit_lens
    >>> from vit_lens.toy import ToyWorld, factor_prompts
    >>> from vit_lens import token_mixing
    >>> clip = vit_lens.load_toy_clip()
    >>> batch = ToyWorld(seed=1).sample(64)
    >>> classifier = clip.encode_text(factor_prompts("colour"), normalize=True).T
    >>> result = token_mixing.cls_isolation_accuracy(clip, [(batch.images, batch.factors["colour"])], classifier, progress=False)
    >>> sorted(result)
    ['isolated', 'normal']
"""

from collections.abc import Callable, Iterable
from vit_lens.model.hooked_vit import image_tower
from vit_lens.utils.progress import progress as progress_bar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

HookPairs = list[tuple[str, Callable]]


def isolated_positions(model: Any) -> list[int]:
    """The token positions that are isolated: those the readout pools (``[0]``, or ``[0, 1]`` for DeiT-distilled).

    Example:
        >>> isolated_positions(vit_lens.load_toy_clip())  # doctest: +SKIP
        [0]
    """
    cfg = _tower(model).cfg
    if cfg.pool_type == "token":
        return [0]
    if cfg.pool_type == "token_dist":
        return [0, 1]
    raise ValueError(
        f"{cfg.model_name} pools with pool_type={cfg.pool_type!r}: it has no CLS readout to isolate. CLS isolation "
        "needs a model that reads CLS (pool_type 'token' or 'token_dist'); per_token_scores works for any model."
    )


@torch.no_grad()
def cls_only_residual(model: Any, layer: int) -> Float[Tensor, "n_isolated d_model"]:
    """The residual stream of the isolated tokens entering block ``layer`` in a forward pass of the
    CLS token (and distillation token) alone, with no patches: a constant over images.

    Computed as the forward pass of a blank image in which, up to ``layer``, the isolated tokens
    attend only to each other: they then never read the patches, so this is the CLS-only pass for
    every architecture the model supports (``tests/test_token_mixing.py`` checks it against the
    blocks run on the CLS token alone).

    Example:
        >>> cls_only_residual(vit_lens.load_toy_clip(), 3).shape  # doctest: +SKIP
        torch.Size([1, 128])
    """
    tower = _tower(model)
    cfg = tower.cfg
    layer = _check_layer(cfg, layer, "cls_only_residual", allow_end=True)
    positions = isolated_positions(tower)
    blank = torch.zeros(1, cfg.in_channels, *cfg.image_size).to(tower.W_E)
    hooks = _score_mask_hooks(positions, layer)
    if layer < cfg.n_layers:
        return tower.run_with_hooks(blank, fwd_hooks=hooks, stop_at_layer=layer)[0, positions]
    saved: dict[str, Tensor] = {}

    def save(resid: Tensor, hook: Any) -> None:
        saved["resid"] = resid

    tower.run_with_hooks(blank, fwd_hooks=hooks + [(f"blocks.{cfg.n_layers - 1}.hook_resid_post", save)])
    return saved["resid"][0, positions]


def _score_mask_hooks(positions: list[int], until: int) -> HookPairs:
    """Hooks on the attention scores of blocks ``[0, until)``: the isolated tokens and the others attend only within their group."""

    def mask_scores(scores: Tensor, hook: Any) -> Tensor:
        isolated = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        isolated[positions] = True
        cross = isolated[:, None] ^ isolated[None, :]  # query and key in different groups
        return scores.masked_fill(cross, float("-inf"))

    return [(f"blocks.{l}.attn.hook_attn_scores", mask_scores) for l in range(until)]


def isolated_cls_hooks(model: Any, until_layer: Any = None) -> HookPairs:
    """Forward hooks that keep CLS out of attention before ``until_layer`` and insert its CLS-only value there.

    In every block ``l < until_layer`` the attention scores from the isolated tokens to the other
    tokens, and from the other tokens to the isolated ones, are set to ``-inf`` (each group attends
    only within itself). At the input of block ``until_layer`` the isolated rows of the residual are
    replaced by :func:`cls_only_residual`. ``until_layer=0`` changes nothing; ``until_layer =
    n_layers`` isolates CLS everywhere (then the output no longer depends on the image).

    Args:
        model: A ``HookedViT`` or ``HookedCLIP``.
        until_layer: First block where everything attends to everything (default: the last block,
            the paper's setting).

    Example:
        >>> logits = model.run_with_hooks(images, fwd_hooks=isolated_cls_hooks(model))  # doctest: +SKIP
    """
    tower = _tower(model)
    cfg = tower.cfg
    until = cfg.n_layers - 1 if until_layer is None else _check_layer(cfg, until_layer, "isolated_cls_hooks", allow_end=True)
    positions = isolated_positions(tower)
    constant = cls_only_residual(tower, until)

    def insert(resid: Tensor, hook: Any) -> Tensor:
        resid = resid.clone()
        resid[:, positions] = constant.to(resid)
        return resid

    hooks = _score_mask_hooks(positions, until)
    insert_at = f"blocks.{until}.hook_resid_pre" if until < cfg.n_layers else f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    hooks.append((insert_at, insert))
    return hooks


def isolated_cls_forward(model: Any, images: Any, until_layer: Any = None) -> Float[Tensor, "batch *out"]:
    """The model's output (embedding or logits) with CLS isolated before ``until_layer`` (:func:`isolated_cls_hooks`).

    Example:
        >>> out = isolated_cls_forward(model, images)  # doctest: +SKIP
        >>> torch.allclose(isolated_cls_forward(model, images, until_layer=0), model(images), atol=1e-5)  # doctest: +SKIP
        True
    """
    tower = _tower(model)
    return tower.run_with_hooks(images, fwd_hooks=isolated_cls_hooks(tower, until_layer))


def class_scores(model: Any, output: Any, classifier: Any = None) -> Float[Tensor, "*batch n_classes"]:
    """Class scores from a model's output: logits as they are, or a CLIP embedding's cosine with ``classifier``.

    Args:
        model: A ``HookedViT`` or ``HookedCLIP``.
        output: ``[..., d_output]``: logits (``cfg.n_classes > 0``) or embeddings.
        classifier: ``[d_embed, n_classes]`` for models without a classifier head.
    """
    cfg = _tower(model).cfg
    if classifier is None:
        if not cfg.n_classes:
            raise ValueError(
                f"{cfg.model_name} has no classifier head (n_classes=0): pass classifier=[d_embed, n_classes], e.g. "
                "clip.zero_shot_classifier(classnames) or clip.encode_text(prompts, normalize=True).T"
            )
        return output
    if not isinstance(classifier, Tensor) or classifier.ndim != 2 or classifier.shape[0] != output.shape[-1]:
        shape = tuple(classifier.shape) if isinstance(classifier, Tensor) else type(classifier).__name__
        raise ValueError(f"classifier must be a [{output.shape[-1]}, n_classes] tensor for this model's output, got {shape}")
    return F.normalize(output, dim=-1) @ classifier.to(output)


def per_token_scores(model: Any, images: Any, classifier: Any = None) -> Float[Tensor, "batch pos n_classes"]:
    """The model's own readout applied to every token of the last layer, one token at a time.

    Each token goes through the final LayerNorm (wherever the model applies it), an attention pool
    over that token alone (SigLIP-style ``pool_type="map"``), then the classifier head (the CLS head
    ``W_head`` for a distilled DeiT) or the projection and the zero-shot ``classifier``. For a model
    that pools CLS, the CLS position gives the model's normal classification.

    Example:
        >>> scores = per_token_scores(clip, images, classifier)  # doctest: +SKIP
        >>> scores.shape  # [batch, pos, n_classes]  # doctest: +SKIP
    """
    tower = _tower(model)
    with torch.no_grad():
        _, resid = _output_and_last_residual(tower, images)
        return _token_readout(tower, resid, classifier)


@dataclass
class PatchAccuracy:
    """What :func:`patch_classification_accuracy` returns.

    Attributes:
        per_position: ``[pos]``: accuracy of the readout applied to each token (prefix tokens first).
        grid: ``[rows, cols]``: the patch positions of ``per_position`` on the patch grid (figure 7).
        normal: Accuracy of the model's own output.
        patch_average: Mean over patch positions (the paper's "patch average").
        best_patch: Highest accuracy over patch positions (the paper's "patch maximum").
        best_patch_index: Its index in the patch grid (raster order).
        n_images: Images seen.
    """

    per_position: Tensor
    grid: Tensor
    normal: float
    patch_average: float
    best_patch: float
    best_patch_index: int
    n_images: int

    def figure(self, title: str | None = None) -> "go.Figure":  # noqa: F821
        """Heat map of per-patch accuracy on the patch grid (the paper's figure 7)."""
        import plotly.graph_objects as go

        grid = self.grid.numpy()
        fig = go.Figure(go.Heatmap(z=grid, colorscale="Viridis", zmin=0, zmax=1, colorbar=dict(title="accuracy"),
                                   text=[[f"{v:.2f}" for v in row] for row in grid], texttemplate="%{text}"))
        fig.update_yaxes(autorange="reversed", scaleanchor="x", title="patch row")
        fig.update_xaxes(title="patch column")
        fig.update_layout(
            title=title or f"head on single patches: mean {self.patch_average:.1%}, best {self.best_patch:.1%} "
            f"(model {self.normal:.1%})",
            width=520, height=480,
        )
        return fig


def patch_classification_accuracy(
    model: Any,
    data: Iterable,
    classifier: Any = None,
    *,
    max_batches: int | None = None,
    progress: bool = True,
) -> PatchAccuracy:
    """Accuracy of the model's readout on every single token of the last layer, streamed over ``data``.

    Args:
        model: A ``HookedViT`` with a head, or a ``HookedViT``/``HookedCLIP`` with ``classifier``.
        data: Batches ``(images, labels, ...)`` of preprocessed images (a DataLoader).
        classifier: ``[d_embed, n_classes]`` for CLIP (zero-shot); None for a classifier head.
        max_batches: Stop after this many batches.
        progress: Show a tqdm bar.

    Example:
        >>> result = patch_classification_accuracy(clip, [(batch.images, batch.factors["colour"])], classifier)  # doctest: +SKIP
        >>> result.figure()  # doctest: +SKIP
    """
    tower = _tower(model)
    cfg = tower.cfg
    correct_tokens = correct_normal = None
    n = 0
    rows = cols = None
    with torch.no_grad():
        for images, labels in _labelled_batches(data, tower, max_batches, progress, "per-patch accuracy"):
            output, resid = _output_and_last_residual(tower, images)
            scores = _token_readout(tower, resid, classifier)
            hits = scores.argmax(-1).eq(labels[:, None]).sum(0).double()
            normal = class_scores(tower, output, classifier).argmax(-1).eq(labels).sum().double()
            correct_tokens = hits if correct_tokens is None else correct_tokens + hits
            correct_normal = normal if correct_normal is None else correct_normal + normal
            n += len(labels)
            rows, cols = images.shape[-2] // cfg.patch_size[0], images.shape[-1] // cfg.patch_size[1]
    if not n:
        raise ValueError("patch_classification_accuracy got no batches from data")
    per_position = (correct_tokens / n).float().cpu()
    patches = per_position[cfg.n_prefix_tokens :]
    best = int(patches.argmax())
    return PatchAccuracy(
        per_position=per_position,
        grid=patches.reshape(rows, cols),
        normal=(correct_normal / n).item(),
        patch_average=patches.mean().item(),
        best_patch=patches[best].item(),
        best_patch_index=best,
        n_images=n,
    )


def cls_isolation_accuracy(
    model: Any,
    data: Iterable,
    classifier: Any = None,
    *,
    until_layer: Any = None,
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Accuracy of the normal model and of the model with CLS isolated before ``until_layer`` (Table 1).

    Args:
        model: A ``HookedViT`` with a head, or a ``HookedViT``/``HookedCLIP`` with ``classifier``.
        data: Batches ``(images, labels, ...)`` of preprocessed images.
        classifier: ``[d_embed, n_classes]`` for CLIP (zero-shot); None for a classifier head.
        until_layer: As in :func:`isolated_cls_hooks` (default: the last block).
        max_batches, progress: As in :func:`patch_classification_accuracy`.

    Returns:
        ``{"normal": accuracy, "isolated": accuracy}``.
    """
    tower = _tower(model)
    hooks = isolated_cls_hooks(tower, until_layer)
    correct = {"normal": 0, "isolated": 0}
    n = 0
    with torch.no_grad():
        for images, labels in _labelled_batches(data, tower, max_batches, progress, "CLS isolation"):
            normal = class_scores(tower, tower(images), classifier)
            isolated = class_scores(tower, tower.run_with_hooks(images, fwd_hooks=hooks), classifier)
            correct["normal"] += normal.argmax(-1).eq(labels).sum().item()
            correct["isolated"] += isolated.argmax(-1).eq(labels).sum().item()
            n += len(labels)
    if not n:
        raise ValueError("cls_isolation_accuracy got no batches from data")
    return {key: value / n for key, value in correct.items()}


# ---------------------------------------------------------------------------------------- helpers


def _tower(model: Any) -> Any:
    return image_tower(model)


def _check_layer(cfg: Any, layer: Any, function: str, allow_end: bool = False) -> int:
    top = cfg.n_layers if allow_end else cfg.n_layers - 1
    if not isinstance(layer, int) or isinstance(layer, bool) or not -cfg.n_layers <= layer <= top:
        raise ValueError(f"{function}: layer must be an int in [0, {top}] (negative counts from the end), got {layer!r}")
    return layer % cfg.n_layers if layer < 0 else layer


def _output_and_last_residual(tower: Any, images: Tensor) -> tuple[Tensor, Tensor]:
    saved: dict[str, Tensor] = {}

    def save(resid: Tensor, hook: Any) -> None:
        saved["resid"] = resid

    output = tower.run_with_hooks(images, fwd_hooks=[(f"blocks.{tower.cfg.n_layers - 1}.hook_resid_post", save)])
    return output, saved["resid"]


def _token_readout(tower: Any, resid: Tensor, classifier: Any) -> Tensor:
    """The readout of ``HookedViT._readout`` with every token pooled on its own."""
    cfg = tower.cfg
    x = resid
    if cfg.final_norm == "pre_pool":
        x = tower.ln_final(x)
    if cfg.pool_type == "map":  # attention pooling over a single token
        batch, pos, d_model = x.shape
        x = tower.attn_pool(x.reshape(batch * pos, 1, d_model)).reshape(batch, pos, d_model)
    if cfg.final_norm == "post_pool":
        x = tower.ln_final(x)
    if cfg.d_proj is not None:
        if classifier is None:
            raise ValueError(
                f"{cfg.model_name} ends in a projection (a CLIP tower): pass classifier=[d_embed, n_classes], e.g. "
                "clip.zero_shot_classifier(classnames)"
            )
        embed = x @ tower.W_proj
        if getattr(cfg, "proj_bias", False):
            embed = embed + tower.b_proj
        return class_scores(tower, embed, classifier)
    if cfg.n_classes:
        if classifier is not None:
            raise ValueError(f"{cfg.model_name} has its own classifier head; leave classifier=None")
        return x @ tower.head.W_head + tower.head.b_head
    if classifier is None:
        raise ValueError(f"{cfg.model_name} has neither a head nor a projection: pass classifier=[d_model, n_classes]")
    return class_scores(tower, x, classifier)


def _labelled_batches(data: Iterable, tower: Any, max_batches: int | None, progress: bool, desc: str):
    reference = tower.W_E
    for index, batch in enumerate(progress_bar(data, desc=desc, unit="batch", enabled=progress, leave=False)):
        if max_batches is not None and index >= max_batches:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"{desc}: data must give (images, labels, ...) batches, got a {type(batch).__name__}")
        images, labels = batch[0], batch[1]
        yield images.to(reference), torch.as_tensor(labels).to(reference.device)
