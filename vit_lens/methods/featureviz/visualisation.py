"""Feature visualisation (Ghiasi et al. 2022, "What do Vision Transformers Learn?", section 3).

Optimise an image so that it maximises an activation, with the paper's regularisers and
augmentations, and find the dataset images that activate a feature most, with their per-patch
activation maps (the paper's figure 3).

The pieces:

- **Objectives** say what to maximise. :func:`neuron` (default of the paper: one MLP neuron after the
  nonlinearity, ``blocks.{l}.mlp.hook_post``, averaged over the patch tokens), :func:`channel` (one
  channel of any hook), :func:`head_direction` (a head's output along a direction of the residual
  stream), :func:`text_direction` (cosine of a CLIP image embedding with a text), :func:`layer`
  (the whole layer, mean squared activation) and :func:`class_logit`. Objectives add and scale:
  ``neuron(3, 7) - 0.5 * neuron(3, 8)``.
- **Augmentations** (:class:`Jitter`, :class:`ColorShift`, :class:`AdditiveNoise`) act on the
  ensemble of augmented copies made every step; :func:`paper_augmentations` builds the paper's
  ``GS(CS(Jitter(x)))``.
- **Parameterisations**: :class:`PixelImage` (the paper's: raw pixels, clamped to [0, 1] after each
  step) and :class:`FourierImage` (a decorrelated, 1/f-scaled spectrum with optional colour
  decorrelation, squashed by a sigmoid), which usually gives cleaner images.
- :func:`visualize` runs the optimisation; :func:`dataset_examples` streams a DataLoader and keeps the
  top-k images with their activation maps; :func:`feature_figure` draws both.

Where the paper and its public code differ, both are available:

- **Noise.** The paper adds per-pixel noise ``eps ~ N(0, 1)``; the code adds a per-sample,
  per-channel constant ``N(0, 1) * 0.5`` whose scale decays linearly to zero over the run.
  ``AdditiveNoise(per="pixel")`` vs ``AdditiveNoise(per="channel", std=0.5, decay=True)``, or
  ``paper_augmentations(noise="paper" | "code")``.
- **Ensemble reduction.** Eq. 2 sums the loss over the augmented copies; the code averages it and,
  through a ``.diag()`` quirk, divides it once more by the ensemble size.
  ``visualize(..., ensemble_reduction="sum" | "mean" | "code")``. With Adam, only the ratio of the
  feature term to the total-variation term matters.
- **Colour shift.** The paper writes ``sigma * x + mu``; the code computes ``(x - mu) / sigma``.
  ``ColorShift(form="paper" | "code")``.

Pixel space: images are optimised in [0, 1]; ``mean``/``std`` (or ``preprocess``) turn them into the
model's input. The toy CLIP takes [0, 1] images as they are; for an open_clip model the mean and std
are read from ``clip.preprocess`` when not given.

Example:
    >>> import vit_lens
    >>> from vit_lens import featureviz as fv
    >>> clip = vit_lens.load_toy_clip()
    >>> result = fv.visualize(clip, fv.neuron(2, 5), steps=20, progress=False)
    >>> result.image.shape, len(result.losses)
    (torch.Size([3, 64, 64]), 20)
"""

from collections.abc import Callable, Iterable, Sequence
from vit_lens.model.hooked_vit import frozen_parameters, image_tower
from vit_lens.utils.progress import progress as progress_bar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------- objectives

ScoreFn = Callable[[dict[str, Tensor], Any], Tensor]


@dataclass(frozen=True)
class Objective:
    """Something to maximise: a function of the activations at some hook points.

    Build one with :func:`neuron`, :func:`channel`, :func:`head_direction`, :func:`text_direction`,
    :func:`layer` or :func:`class_logit`; combine them with ``+``, ``-`` and scalar ``*``.

    Attributes:
        name: For titles and progress bars.
        hooks: The hook names whose activations ``score`` reads.
        score: ``score(activations, cfg) -> [batch]``: the value to maximise, per image.
        per_token: ``per_token(activations, cfg) -> [batch, pos]`` before the reduction over tokens,
            for activation maps (None when the objective has no per-token form).
    """

    name: str
    hooks: tuple[str, ...]
    score: ScoreFn
    per_token: ScoreFn | None = None

    def __add__(self, other: "Objective") -> "Objective":
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(
            f"{self.name} + {other.name}",
            tuple(dict.fromkeys(self.hooks + other.hooks)),
            lambda acts, cfg: self.score(acts, cfg) + other.score(acts, cfg),
            _combine_tokens(self, other, 1.0),
        )

    def __sub__(self, other: "Objective") -> "Objective":
        if not isinstance(other, Objective):
            return NotImplemented
        return self + (-1.0) * other

    def __mul__(self, factor: float) -> "Objective":
        if not isinstance(factor, (int, float)):
            return NotImplemented
        tokens = self.per_token
        return Objective(
            f"{factor:g} * ({self.name})",
            self.hooks,
            lambda acts, cfg: factor * self.score(acts, cfg),
            None if tokens is None else (lambda acts, cfg: factor * tokens(acts, cfg)),
        )

    __rmul__ = __mul__

    def __neg__(self) -> "Objective":
        return (-1.0) * self


def _combine_tokens(a: Objective, b: Objective, sign: float) -> ScoreFn | None:
    if a.per_token is None or b.per_token is None:
        return None
    return lambda acts, cfg: a.per_token(acts, cfg) + sign * b.per_token(acts, cfg)


def _reduce_tokens(values: Tensor, cfg: Any, tokens: Any, reduce: str) -> Tensor:
    """``[batch, pos]`` -> ``[batch]`` over the selected tokens."""
    if tokens == "patches":
        values = values[:, cfg.n_prefix_tokens :]
    elif tokens == "cls":
        values = values[:, :1]
    elif isinstance(tokens, int) and not isinstance(tokens, bool):
        values = values[:, tokens : tokens + 1] if tokens != -1 else values[:, -1:]
    return values.sum(dim=1) if reduce == "sum" else values.mean(dim=1)


def _check_tokens(tokens: Any, reduce: Any, function: str) -> None:
    if not (tokens in ("patches", "all", "cls") or (isinstance(tokens, int) and not isinstance(tokens, bool))):
        raise ValueError(
            f"{function}: tokens must be 'patches' (the paper's choice), 'all', 'cls' or a token index, got {tokens!r}"
        )
    if reduce not in ("mean", "sum"):
        raise ValueError(f"{function}: reduce must be 'mean' or 'sum' (paper Eq. 1 sums over patches), got {reduce!r}")


def channel(hook_name: str, index: Any, *, tokens: Any = "patches", reduce: Any = "mean") -> Objective:
    """One channel (last axis) of any ``[batch, pos, ..., channel]`` hook, reduced over tokens.

    Args:
        hook_name: E.g. ``"blocks.3.mlp.hook_post"``, ``"blocks.3.hook_resid_post"``.
        index: The channel; for ``[batch, pos, head, d_head]`` hooks a ``(head, channel)`` pair.
        tokens: ``"patches"`` (patch tokens only), ``"all"``, ``"cls"`` or one token index.
        reduce: ``"mean"`` over the tokens, or ``"sum"`` (paper Eq. 1).

    Example:
        >>> objective = channel("blocks.1.hook_resid_post", 17, tokens="cls")
        >>> objective.hooks
        ('blocks.1.hook_resid_post',)
    """
    _check_tokens(tokens, reduce, "channel")
    where = tuple(index) if isinstance(index, (tuple, list)) else (index,)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in where):
        raise TypeError(f"channel: index must be an int (or a (head, channel) pair), got {index!r}")

    def per_token(acts: dict[str, Tensor], cfg: Any) -> Tensor:
        act = acts[hook_name]
        if act.ndim != 2 + len(where):
            raise ValueError(
                f"channel: {hook_name} has shape {tuple(act.shape)}; index {index!r} needs "
                f"{2 + len(where)}-d activations [batch, pos, ...]"
            )
        return act[(slice(None), slice(None)) + where]

    return Objective(
        f"{hook_name}[{', '.join(map(str, where))}]",
        (hook_name,),
        lambda acts, cfg: _reduce_tokens(per_token(acts, cfg), cfg, tokens, reduce),
        per_token,
    )


def neuron(layer: int, index: int, *, hook: str = "mlp.hook_post", tokens: Any = "patches", reduce: Any = "mean") -> Objective:
    """One MLP neuron after the nonlinearity, averaged over the patch tokens: the paper's objective.

    Args:
        layer: Block index, from 0 (the objective exists before it meets a model, so it cannot count
            from the end: use ``model.cfg.n_layers - 1`` for the last block).
        index: Neuron index in ``[0, d_mlp)`` (negative ones count from the end); checked against the
            model's ``d_mlp`` when the objective is evaluated.
        hook: The hook inside the block (``"mlp.hook_pre"`` for before the nonlinearity).
        tokens, reduce: As in :func:`channel`. The paper's code averages over the patch tokens
            (CLS excluded); Eq. 1 sums them (``reduce="sum"``).

    Example:
        >>> neuron(3, 41).hooks
        ('blocks.3.mlp.hook_post',)
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(
            f"neuron: layer must be a block index >= 0 (use model.cfg.n_layers - 1 for the last block), got {layer!r}"
        )
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"neuron: index must be an int (a neuron of the MLP, 0 to d_mlp - 1), got {index!r}")
    objective = channel(f"blocks.{layer}.{hook}", index, tokens=tokens, reduce=reduce)
    hook_name = objective.hooks[0]

    def per_token(acts: dict[str, Tensor], cfg: Any) -> Tensor:
        width = acts[hook_name].shape[-1]
        if not -width <= index < width:
            size = f"d_mlp={width} neurons" if width == getattr(cfg, "d_mlp", None) else f"{width} channels"
            raise ValueError(
                f"neuron({layer}, {index}): {hook_name} has {size}, so the index must be in [0, {width - 1}] "
                f"(or [-{width}, -1] counting from the end)"
            )
        return objective.per_token(acts, cfg)

    return Objective(
        f"L{layer} neuron {index}",
        objective.hooks,
        lambda acts, cfg: _reduce_tokens(per_token(acts, cfg), cfg, tokens, reduce),
        per_token,
    )


def head_direction(model: Any, layer: int, head: int, direction: Any, *, tokens: Any = "patches", reduce: Any = "mean") -> Objective:
    """A head's output projected on a direction: ``(z[head] @ W_O[head]) . d`` per token, then reduced.

    Args:
        model: A ``HookedViT`` or ``HookedCLIP`` (for ``W_O``).
        layer, head: The head.
        direction: ``[d_model]`` (in the residual stream, normalised here) or ``[d_head]`` (on ``z``).
        tokens, reduce: As in :func:`channel` (``tokens="cls"`` for the CLS output).

    Example:
        >>> objective = head_direction(clip, 3, 1, torch.randn(128))  # doctest: +SKIP
    """
    _check_tokens(tokens, reduce, "head_direction")
    tower = _tower(model)
    cfg = tower.cfg
    if not (isinstance(layer, int) and -cfg.n_layers <= layer < cfg.n_layers):
        raise ValueError(f"head_direction: layer must be an int in [0, {cfg.n_layers}), got {layer!r}")
    if not (isinstance(head, int) and 0 <= head < cfg.n_heads):
        raise ValueError(f"head_direction: head must be an int in [0, {cfg.n_heads}), got {head!r}")
    layer = layer % cfg.n_layers
    direction = torch.as_tensor(direction).detach().float()
    if direction.shape == (cfg.d_model,):
        reader = tower.blocks[layer].attn.W_O[head].detach() @ direction.to(tower.W_E) / direction.norm()
    elif direction.shape == (cfg.d_head,):
        reader = direction.to(tower.W_E) / direction.norm()
    else:
        raise ValueError(
            f"head_direction: direction must be [d_model={cfg.d_model}] or [d_head={cfg.d_head}], "
            f"got shape {tuple(direction.shape)}"
        )
    name = f"blocks.{layer}.attn.hook_z"

    def per_token(acts: dict[str, Tensor], cfg: Any) -> Tensor:
        return acts[name][:, :, head] @ reader.to(acts[name])

    return Objective(
        f"L{layer}H{head} direction", (name,), lambda acts, cfg: _reduce_tokens(per_token(acts, cfg), cfg, tokens, reduce), per_token
    )


def text_direction(clip: Any, text: Any) -> Objective:
    """Cosine between the CLIP image embedding (``hook_image_embed``) and a text embedding.

    Args:
        clip: A ``HookedCLIP`` (to encode ``text``), or None when ``text`` is already a vector.
        text: A string (encoded by ``clip``) or a ``[d_embed]`` embedding.

    Example:
        >>> objective = text_direction(vit_lens.load_toy_clip(), "red object")  # doctest: +SKIP
    """
    if isinstance(text, str):
        if clip is None or not hasattr(clip, "encode_text"):
            raise TypeError("text_direction: a string needs a HookedCLIP to encode it; pass clip=, or pass an embedding")
        with torch.no_grad():
            vector = clip.encode_text([text], normalize=True)[0]
        name = repr(text)
    elif isinstance(text, Tensor) and text.ndim == 1:
        vector, name = F.normalize(text.detach().float(), dim=0), "text direction"
    else:
        raise TypeError(f"text_direction: text must be a string or a 1-d embedding tensor, got {type(text).__name__}")

    def score(acts: dict[str, Tensor], cfg: Any) -> Tensor:
        embed = acts["hook_image_embed"]
        if embed.shape[-1] != vector.shape[0]:
            raise ValueError(f"text_direction: the text embedding has {vector.shape[0]} dims, the image embedding {embed.shape[-1]}")
        return F.normalize(embed, dim=-1) @ vector.to(embed)

    return Objective(name, ("hook_image_embed",), score)


def layer(hook_name: str, *, tokens: Any = "all") -> Objective:
    """A whole layer: the mean over tokens and channels of the squared activation (DeepDream's objective).

    Example:
        >>> layer("blocks.2.mlp.hook_post").hooks
        ('blocks.2.mlp.hook_post',)
    """
    _check_tokens(tokens, "mean", "layer")

    def per_token(acts: dict[str, Tensor], cfg: Any) -> Tensor:
        act = acts[hook_name]
        return act.pow(2).flatten(2).mean(dim=-1)

    return Objective(
        f"{hook_name} (all channels)", (hook_name,), lambda acts, cfg: _reduce_tokens(per_token(acts, cfg), cfg, tokens, "mean"), per_token
    )


def class_logit(index: int) -> Objective:
    """One logit of a classifier head (``hook_logits``).

    Example:
        >>> class_logit(3).hooks
        ('hook_logits',)
    """
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError(f"class_logit: index must be an int, got {index!r}")
    return Objective(f"class {index}", ("hook_logits",), lambda acts, cfg: acts["hook_logits"][:, index])


def evaluate(model: Any, objective: Objective, images: Any, *, mean: Any = None, std: Any = None, preprocess: Any = None) -> Float[Tensor, " batch"]:
    """The objective on ``images`` (pixel space, [0, 1]; no augmentation, no gradient).

    Example:
        >>> evaluate(clip, neuron(2, 5), torch.rand(4, 3, 64, 64)).shape  # doctest: +SKIP
        torch.Size([4])
    """
    tower = _tower(model)
    prepare = _input_transform(model, mean, std, preprocess)
    with torch.no_grad():
        acts = _activations(tower, objective, prepare(_as_images(images, tower)))
        return objective.score(acts, tower.cfg)


def _activations(tower: Any, objective: Objective, inputs: Tensor) -> dict[str, Tensor]:
    acts: dict[str, Tensor] = {}

    def save(activation: Tensor, hook: Any) -> None:
        acts[hook.name] = activation

    with tower.hooks(fwd_hooks=[(name, save) for name in objective.hooks]):
        tower(inputs, stop_at_layer=_stop_layer(objective.hooks, tower.cfg.n_layers))
    missing = [name for name in objective.hooks if name not in acts]
    if missing:
        raise RuntimeError(f"the hooks {missing} did not run; is {objective.name!r} built for this model?")
    return acts


def _stop_layer(names: Sequence[str], n_layers: int) -> int | None:
    """The ``stop_at_layer`` that still runs every named hook (None: the whole tower)."""
    layers = []
    for name in names:
        parts = name.split(".")
        if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
            return None
        layers.append(int(parts[1]))
    stop = max(layers) + 1
    return stop if stop < n_layers else None


# ---------------------------------------------------------------------------------------- augmentations


class Jitter:
    """Random roll by up to ``max_shift`` pixels along each axis (Yin et al. 2020; the paper's Jitter).

    Args:
        max_shift: Largest shift in pixels (the paper's code: 32 at 224-384 px).
        per_sample: One shift per copy (True) or one for the whole ensemble, as the code does (False).
    """

    def __init__(self, max_shift: int = 32, per_sample: bool = False):
        if not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(f"Jitter: max_shift must be a non-negative int of pixels, got {max_shift!r}")
        self.max_shift = max_shift
        self.per_sample = per_sample

    def __call__(self, images: Tensor, *, progress: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        n = len(images) if self.per_sample else 1
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (n, 2), generator=generator).tolist()
        if not self.per_sample:
            return torch.roll(images, shifts=tuple(shifts[0]), dims=(-2, -1))
        return torch.stack([torch.roll(image, shifts=tuple(s), dims=(-2, -1)) for image, s in zip(images, shifts)])

    def __repr__(self) -> str:
        return f"Jitter(max_shift={self.max_shift}, per_sample={self.per_sample})"


class ColorShift:
    """Per-copy, per-channel affine colour change (Ghiasi et al. 2021).

    ``form="paper"``: ``sigma * x + mu``; ``form="code"``: ``(x - mu) / sigma``; with
    ``mu ~ U(-shift, shift)`` and ``sigma = exp(U(-log_scale, log_scale))``, drawn afresh every step.

    Args:
        shift: Range of ``mu`` (the paper: 1).
        log_scale: Range of ``log(sigma)`` (the paper: 1).
        form: ``"paper"`` or ``"code"``.
    """

    def __init__(self, shift: float = 1.0, log_scale: float = 1.0, form: str = "paper"):
        if form not in ("paper", "code"):
            raise ValueError(f"ColorShift: form must be 'paper' (sigma * x + mu) or 'code' ((x - mu) / sigma), got {form!r}")
        if shift < 0 or log_scale < 0:
            raise ValueError(f"ColorShift: shift and log_scale must be >= 0, got {shift}, {log_scale}")
        self.shift, self.log_scale, self.form = float(shift), float(log_scale), form
        self.last: tuple[Tensor, Tensor] | None = None  # (mu, sigma) of the last call, [batch, channel, 1, 1]

    def __call__(self, images: Tensor, *, progress: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        shape = (images.shape[0], images.shape[1], 1, 1)
        mu = (torch.rand(shape, generator=generator) * 2 - 1) * self.shift
        sigma = torch.exp((torch.rand(shape, generator=generator) * 2 - 1) * self.log_scale)
        mu, sigma = mu.to(images), sigma.to(images)
        self.last = (mu, sigma)
        return sigma * images + mu if self.form == "paper" else (images - mu) / sigma

    def __repr__(self) -> str:
        return f"ColorShift(shift={self.shift}, log_scale={self.log_scale}, form={self.form!r})"


class AdditiveNoise:
    """Additive Gaussian noise, the paper's "Gaussian smoothing" GS.

    Args:
        std: Standard deviation (the paper: 1; the code: 0.5).
        per: ``"pixel"`` (the paper: independent per pixel and channel) or ``"channel"`` (the code:
            one constant per copy and channel).
        decay: Scale the std by the fraction of the run left (the code: linearly from ``std`` to 0).
    """

    def __init__(self, std: float = 1.0, per: str = "pixel", decay: bool = False):
        if per not in ("pixel", "channel"):
            raise ValueError(f"AdditiveNoise: per must be 'pixel' (paper) or 'channel' (public code), got {per!r}")
        if std < 0:
            raise ValueError(f"AdditiveNoise: std must be >= 0, got {std}")
        self.std, self.per, self.decay = float(std), per, decay

    def __call__(self, images: Tensor, *, progress: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        std = self.std * (1.0 - progress) if self.decay else self.std
        shape = images.shape if self.per == "pixel" else (images.shape[0], images.shape[1], 1, 1)
        return images + std * torch.randn(shape, generator=generator).to(images)

    def __repr__(self) -> str:
        return f"AdditiveNoise(std={self.std}, per={self.per!r}, decay={self.decay})"


GaussianNoise = AdditiveNoise  # the paper's name for it


def paper_augmentations(image_size: int = 224, noise: str = "paper", color_form: str = "paper") -> list[Callable]:
    """The paper's ``GS(CS(Jitter(x)))``: jitter, then colour shift, then additive noise.

    Args:
        image_size: Jitter is up to ``image_size / 7`` pixels (32 at 224 px, as the code).
        noise: ``"paper"`` (per-pixel N(0, 1)), ``"code"`` (per-channel, 0.5, decaying) or ``"none"``.
        color_form: Passed to :class:`ColorShift`.

    Example:
        >>> [type(a).__name__ for a in paper_augmentations(64)]
        ['Jitter', 'ColorShift', 'AdditiveNoise']
    """
    augmentations: list[Callable] = [Jitter(max(1, round(image_size / 7))), ColorShift(form=color_form)]
    if noise == "paper":
        augmentations.append(AdditiveNoise(1.0, per="pixel"))
    elif noise == "code":
        augmentations.append(AdditiveNoise(0.5, per="channel", decay=True))
    elif noise != "none":
        raise ValueError(f"noise must be 'paper', 'code' or 'none', got {noise!r}")
    return augmentations


def total_variation(images: Float[Tensor, "batch channel height width"], diagonals: bool = True) -> Float[Tensor, " batch"]:
    """Total variation as the paper's code computes it, per image.

    For each image and channel, the L2 norms (not squared) of the horizontal and vertical
    differences (and of both diagonal differences when ``diagonals``) are added; the result is
    averaged over channels.

    Example:
        >>> total_variation(torch.ones(2, 3, 8, 8)).tolist()
        [0.0, 0.0]
    """
    x = images
    diffs = [x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]]
    if diagonals:
        diffs += [x[..., 1:, 1:] - x[..., :-1, :-1], x[..., 1:, :-1] - x[..., :-1, 1:]]
    # vector_norm's gradient at zero is zero (a plain sqrt of a sum of squares would give NaN there)
    per_channel = sum(torch.linalg.vector_norm(d.flatten(2), dim=-1) for d in diffs)
    return per_channel.mean(dim=1)


# ---------------------------------------------------------------------------------------- parameterisations


class PixelImage(nn.Module):
    """Raw pixels in [0, 1], clamped after every step (the paper's parameterisation).

    Args:
        size: (height, width).
        init: ``"uniform"`` (U(0, 1), as the code), ``"grey"`` (0.5 plus small noise) or an image
            ``[3, H, W]`` in [0, 1] to start from.
        generator: For the random start.
    """

    def __init__(self, size: tuple[int, int], init: Any = "uniform", generator: torch.Generator | None = None):
        super().__init__()
        if isinstance(init, Tensor):
            if init.shape != (3, *size):
                raise ValueError(f"PixelImage: init image must be [3, {size[0]}, {size[1]}], got {tuple(init.shape)}")
            start = init.detach().float().clamp(0, 1).clone()
        elif init == "uniform":
            start = torch.rand(3, *size, generator=generator)
        elif init == "grey":
            start = 0.5 + 0.01 * torch.randn(3, *size, generator=generator)
        else:
            raise ValueError(f"PixelImage: init must be 'uniform', 'grey' or a [3, H, W] tensor, got {init!r}")
        self.pixels = nn.Parameter(start[None])

    def forward(self) -> Float[Tensor, "1 3 height width"]:
        return self.pixels

    @torch.no_grad()
    def post_step(self) -> None:
        self.pixels.clamp_(0, 1)


def colour_correlation_sqrt(images: Float[Tensor, "batch 3 height width"]) -> Float[Tensor, "3 3"]:
    """A square root ``M`` of the pixel colour covariance of ``images`` (``M @ M.T`` = covariance),
    scaled so that its largest column has unit norm; for :class:`FourierImage` colour decorrelation.

    Example:
        >>> matrix = colour_correlation_sqrt(torch.rand(8, 3, 16, 16))
        >>> matrix.shape
        torch.Size([3, 3])
    """
    pixels = images.detach().double().permute(1, 0, 2, 3).reshape(3, -1)
    covariance = torch.cov(pixels)
    values, vectors = torch.linalg.eigh(covariance)
    root = vectors * values.clamp_min(0).sqrt()
    return (root / root.norm(dim=0).max()).float()


class FourierImage(nn.Module):
    """A decorrelated parameterisation: the image is the inverse FFT of a spectrum whose amplitude is
    scaled by ``1 / f**decay``, optionally mixed by a colour matrix, then squashed by a sigmoid.

    Gradient steps then move low frequencies as easily as high ones, which removes much of the
    high-frequency noise that pixel optimisation produces (Olah et al. 2017).

    Args:
        size: (height, width).
        decay: Exponent of the ``1/f`` amplitude scaling.
        colour_matrix: ``[3, 3]`` (e.g. :func:`colour_correlation_sqrt` of dataset images), or None.
        init_std: Standard deviation of the initial spectrum coefficients.
        generator: For the random start.
    """

    def __init__(
        self,
        size: tuple[int, int],
        decay: float = 1.0,
        colour_matrix: Tensor | None = None,
        init_std: float = 0.01,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        height, width = size
        self.size = (height, width)
        fy = torch.fft.fftfreq(height)[:, None]
        fx = torch.fft.rfftfreq(width)[None, :]
        frequency = (fx.pow(2) + fy.pow(2)).sqrt().clamp_min(1.0 / max(height, width))
        self.register_buffer("scale", frequency.pow(-decay) / frequency.pow(-decay).max() * max(height, width) ** 0.5)
        if colour_matrix is not None and tuple(colour_matrix.shape) != (3, 3):
            raise ValueError(f"FourierImage: colour_matrix must be [3, 3], got {tuple(colour_matrix.shape)}")
        self.register_buffer("colour", None if colour_matrix is None else colour_matrix.detach().float().clone())
        self.spectrum = nn.Parameter(init_std * torch.randn(1, 3, height, width // 2 + 1, 2, generator=generator))

    def forward(self) -> Float[Tensor, "1 3 height width"]:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        image = torch.fft.irfft2(spectrum, s=self.size, norm="ortho")
        if self.colour is not None:
            image = torch.einsum("ij,bjhw->bihw", self.colour, image)
        return torch.sigmoid(image)

    def post_step(self) -> None:
        pass


# ---------------------------------------------------------------------------------------- the optimisation


@dataclass
class FeatureVisualization:
    """What :func:`visualize` returns.

    Attributes:
        image: ``[3, H, W]`` in [0, 1]: the optimised image.
        losses: ``[steps]``: the loss at every step (what was minimised).
        activations: ``[steps]``: the objective averaged over the augmented copies, per step.
        activation: The objective on the final image, without augmentation.
        objective: The :class:`Objective`.
        settings: The settings used (steps, lr, ensemble, tv_weight, ...).
    """

    image: Tensor
    losses: Tensor
    activations: Tensor
    activation: float
    objective: Objective
    settings: dict[str, Any] = field(default_factory=dict)

    def loss_figure(self) -> "go.Figure":  # noqa: F821
        """The loss and the augmented activation over the steps."""
        from vit_lens.utils import plotting as plot

        return plot.layer_curves(
            {"loss": self.losses, "activation (augmented)": self.activations},
            xaxis_title="step",
            title=f"optimising {self.objective.name}",
        )


def default_settings(model: Any) -> dict[str, Any]:
    """Settings of :func:`visualize` for a model family.

    - Images under 128 px (the toy CLIP): 150 steps, lr 0.1, ensemble 8, TV 0.002, a grey start and
      no augmentations. Measured on the toy CLIP: the most variable layer-1 neuron reaches 11.8 (dataset
      max 3.4) without augmentations, but 0.04 with a 1-pixel jitter and -0.03 with the paper's set
      scaled to the toy's input range: this model reads exact pixel patterns of a synthetic world
      with a flat grey background, and every augmentation moves it out of that world. Pass
      ``augmentations=paper_augmentations(64)`` for the paper's set.
    - CLIP towers (``d_proj``): the paper's code for CLIP: 400 steps, lr 1.0, ensemble 8, TV 0.0005.
    - Other ViTs (classifiers, DINO...): the paper's code for ViTs: 400 steps, lr 0.1, ensemble 8, TV 0.0005.

    Real-model families use the public code's augmentations: noise ``"code"`` (per-channel, decaying),
    ColorShift with the paper's ranges and jitter of about a seventh of the image. ``fourier_lr`` (0.3) replaces ``lr`` for the Fourier
    parameterisation, whose coefficients move the image on another scale (tuned on the toy CLIP).

    Example:
        >>> default_settings(vit_lens.load_toy_clip())["steps"]  # doctest: +SKIP
        150
    """
    cfg = _tower(model).cfg
    size = max(cfg.image_size)
    if size < 128:
        return dict(steps=150, lr=0.1, fourier_lr=0.3, ensemble=8, tv_weight=0.002, jitter=0, noise="none",
                    colour_shift=0.0, init="grey")
    lr = 1.0 if cfg.d_proj is not None else 0.1
    return dict(steps=400, lr=lr, fourier_lr=0.3, ensemble=8, tv_weight=0.0005, jitter=max(1, round(size / 7)), noise="code",
                colour_shift=1.0, init="uniform")


def visualize(
    model: Any,
    objective: Any,
    *,
    steps: Any = None,
    lr: Any = None,
    ensemble: Any = None,
    tv_weight: Any = None,
    augmentations: Sequence[Callable] | None = None,
    parameterization: Any = "pixel",
    ensemble_reduction: Any = "mean",
    mean: Any = None,
    std: Any = None,
    preprocess: Callable | None = None,
    init: Any = None,
    betas: tuple[float, float] = (0.5, 0.99),
    seed: int | None = 0,
    progress: bool = True,
) -> FeatureVisualization:
    """Optimise an image to maximise ``objective`` (paper Eq. 2).

    Each step makes ``ensemble`` copies of the image, augments each, runs them through the model,
    and minimises ``-reduce_k objective(a_k(x)) + tv_weight * reduce_k TV(a_k(x))`` with Adam and a
    cosine learning-rate schedule to zero (the paper's code: betas (0.5, 0.99)).

    Args:
        model: A ``HookedViT`` or ``HookedCLIP``.
        objective: An :class:`Objective` (e.g. :func:`neuron`).
        steps, lr, ensemble, tv_weight: Default: :func:`default_settings` for the model.
        augmentations: Callables ``aug(images, progress=, generator=)``; default
            ``[Jitter, ColorShift, AdditiveNoise]`` with the noise of the defaults (``"code"``).
            Pass ``[]`` for none.
        parameterization: ``"pixel"`` (:class:`PixelImage`), ``"fourier"`` (:class:`FourierImage`)
            or a module with ``forward() -> [1, 3, H, W]`` in [0, 1] and ``post_step()``.
        ensemble_reduction: ``"mean"`` over the copies, ``"sum"`` (paper Eq. 2), or ``"code"``
            (the mean divided again by the ensemble size, as the public code does).
        mean, std: Per-channel normalisation into the model's input space (default: read from a
            HookedCLIP's ``preprocess``; none for the toy CLIP).
        preprocess: A differentiable function of [0, 1] images instead of mean/std.
        init: Start of a pixel image: ``"uniform"``, ``"grey"`` or a ``[3, H, W]`` image (default: the
            family's, see :func:`default_settings`).
        betas: Adam's betas.
        seed: Seeds the start and the augmentations (None: not seeded).
        progress: Show a tqdm bar with the loss and activation.

    Returns:
        A :class:`FeatureVisualization`.

    Example:
        >>> result = visualize(clip, text_direction(clip, "red object"), steps=40, progress=False)  # doctest: +SKIP
        >>> result.activation > evaluate(clip, text_direction(clip, "red object"), torch.rand(1, 3, 64, 64)).item()  # doctest: +SKIP
        True
    """
    if not isinstance(objective, Objective):
        raise TypeError(
            f"visualize: objective must be an Objective (neuron(layer, index), text_direction(clip, 'red object'), ...), "
            f"got {type(objective).__name__}"
        )
    tower = _tower(model)
    settings = default_settings(model)
    if parameterization == "fourier":
        settings["lr"] = settings["fourier_lr"]
    for key, value in dict(steps=steps, lr=lr, ensemble=ensemble, tv_weight=tv_weight).items():
        if value is not None:
            settings[key] = value
    _check_settings(settings)
    if ensemble_reduction not in ("mean", "sum", "code"):
        raise ValueError(
            f"visualize: ensemble_reduction must be 'mean', 'sum' (paper Eq. 2) or 'code' (mean / ensemble, the public "
            f"code), got {ensemble_reduction!r}"
        )
    prepare = _input_transform(model, mean, std, preprocess)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    size = tuple(tower.cfg.image_size)
    if augmentations is None:
        augmentations = [Jitter(settings["jitter"])] if settings["jitter"] else []
        if settings["colour_shift"]:
            augmentations.append(ColorShift(settings["colour_shift"], settings["colour_shift"]))
        if settings["noise"] == "code":
            augmentations.append(AdditiveNoise(0.5, per="channel", decay=True))
        elif settings["noise"] == "paper":
            augmentations.append(AdditiveNoise(1.0))
    if init is None:
        init = settings["init"]
    image_module = _parameterization(parameterization, size, init, generator).to(tower.W_E)
    optimiser = torch.optim.Adam(image_module.parameters(), lr=settings["lr"], betas=betas, eps=1e-8)
    n_steps, k = settings["steps"], settings["ensemble"]
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=n_steps, eta_min=0.0)
    losses, values = [], []
    was_training = tower.training
    tower.eval()
    bar = progress_bar(total=n_steps, desc=f"featureviz {objective.name}", unit="step", enabled=progress, leave=False)
    try:
        # Only the image is optimised: frozen weights keep the model's .grad untouched and skip their gradients.
        with torch.enable_grad(), frozen_parameters(tower):
            for step in range(n_steps):
                copies = image_module().expand(k, -1, -1, -1)
                augmented = copies
                for augmentation in augmentations:
                    augmented = augmentation(augmented, progress=step / n_steps, generator=generator)
                scores = objective.score(_activations(tower, objective, prepare(augmented)), tower.cfg)
                tv = total_variation(augmented)
                if ensemble_reduction == "sum":
                    loss = -scores.sum() + settings["tv_weight"] * tv.sum()
                else:
                    loss = -scores.mean() / (k if ensemble_reduction == "code" else 1) + settings["tv_weight"] * tv.mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                image_module.post_step()
                losses.append(loss.item())
                values.append(scores.mean().item())
                bar.update()
                if step % 10 == 0 or step == n_steps - 1:
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", activation=f"{values[-1]:.4g}")
    finally:
        bar.close()
        tower.train(was_training)
    with torch.no_grad():
        image = image_module().detach()[0].clamp(0, 1)
    final = evaluate(model, objective, image[None], preprocess=prepare).item()
    settings.update(ensemble_reduction=ensemble_reduction, parameterization=type(image_module).__name__,
                    augmentations=[repr(a) for a in augmentations], seed=seed)
    return FeatureVisualization(image.cpu(), torch.tensor(losses), torch.tensor(values), final, objective, settings)


def _check_settings(settings: dict[str, Any]) -> None:
    for key in ("steps", "ensemble"):
        if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] < 1:
            raise ValueError(f"visualize: {key} must be a positive int, got {settings[key]!r}")
    for key in ("lr", "tv_weight"):
        if not isinstance(settings[key], (int, float)) or settings[key] < 0:
            raise ValueError(f"visualize: {key} must be a non-negative number, got {settings[key]!r}")


def _parameterization(kind: Any, size: tuple[int, int], init: Any, generator: torch.Generator | None) -> nn.Module:
    if isinstance(kind, nn.Module):
        return kind
    if kind == "pixel":
        return PixelImage(size, init, generator)
    if kind == "fourier":
        return FourierImage(size, generator=generator)
    raise ValueError(
        f"visualize: parameterization must be 'pixel', 'fourier' or a module (PixelImage, FourierImage(...)), got {kind!r}"
    )


# ---------------------------------------------------------------------------------------- dataset examples


@dataclass
class DatasetExamples:
    """The images of a dataset that activate a feature most (the paper's figure 3, centre and right).

    Attributes:
        scores: ``[k]``: the objective on the top images, descending.
        indices: ``[k]``: their positions in the stream of images.
        images: ``[k, C, H, W]``: the images as the loader gave them.
        maps: ``[k, rows, cols]``: the per-patch activation map (None for objectives without one).
        all_scores: ``[n]``: the objective on every image, in order.
        objective: The :class:`Objective`.
    """

    scores: Tensor
    indices: Tensor
    images: Tensor
    maps: Tensor | None
    all_scores: Tensor
    objective: Objective

    @property
    def mean_score(self) -> float:
        return self.all_scores.mean().item()


def dataset_examples(
    model: Any,
    data: Iterable,
    objective: Any,
    k: int = 8,
    *,
    mean: Any = None,
    std: Any = None,
    preprocess: Callable | None = None,
    max_batches: int | None = None,
    progress: bool = True,
) -> DatasetExamples:
    """Stream ``data`` through the model and keep the ``k`` images with the highest objective.

    Only the top ``k`` images and maps are held; the score of every image is kept (one float each).

    Args:
        model: A ``HookedViT`` or ``HookedCLIP``.
        data: Batches of images ``[batch, C, H, W]`` or ``(images, ...)`` tuples (a DataLoader).
            Images are in the same space as :func:`visualize` optimises in (mean/std or preprocess
            applied here), so the top examples can be shown beside the optimised image.
        objective: An :class:`Objective`; its per-token values give the activation maps.
        k: How many examples.
        mean, std, preprocess: As in :func:`visualize`.
        max_batches: Stop after this many batches.
        progress: Show a tqdm bar.

    Example:
        >>> from vit_lens.toy import ToyWorld
        >>> loader = [ToyWorld(seed=0).sample(64).images for _ in range(4)]  # doctest: +SKIP
        >>> top = dataset_examples(clip, loader, neuron(2, 5), k=6)  # doctest: +SKIP
        >>> top.maps.shape  # doctest: +SKIP
        torch.Size([6, 8, 8])
    """
    if not isinstance(objective, Objective):
        raise TypeError(f"dataset_examples: objective must be an Objective, got {type(objective).__name__}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"dataset_examples: k must be a positive int, got {k!r}")
    tower = _tower(model)
    cfg = tower.cfg
    prepare = _input_transform(model, mean, std, preprocess)
    top_scores = top_images = top_maps = top_indices = None
    all_scores: list[Tensor] = []
    seen = 0
    with torch.no_grad():
        for batch_index, batch in enumerate(progress_bar(data, desc="dataset examples", unit="batch", enabled=progress, leave=False)):
            if max_batches is not None and batch_index >= max_batches:
                break
            images = _as_images(batch, tower)
            acts = _activations(tower, objective, prepare(images))
            scores = objective.score(acts, cfg).float().cpu()
            maps = None
            if objective.per_token is not None:
                tokens = objective.per_token(acts, cfg)[:, cfg.n_prefix_tokens :].float().cpu()
                rows, cols = images.shape[-2] // cfg.patch_size[0], images.shape[-1] // cfg.patch_size[1]
                maps = tokens.reshape(len(images), rows, cols)
            indices = torch.arange(seen, seen + len(images))
            seen += len(images)
            all_scores.append(scores)
            if top_scores is None:
                top_scores, top_images, top_maps, top_indices = scores, images.cpu(), maps, indices
            else:
                top_scores = torch.cat([top_scores, scores])
                top_images = torch.cat([top_images, images.cpu()])
                top_maps = None if maps is None else torch.cat([top_maps, maps])
                top_indices = torch.cat([top_indices, indices])
            order = top_scores.argsort(descending=True, stable=True)[:k]
            top_scores, top_images, top_indices = top_scores[order], top_images[order], top_indices[order]
            top_maps = None if top_maps is None else top_maps[order]
    if top_scores is None:
        raise ValueError("dataset_examples got no batches from data")
    return DatasetExamples(top_scores, top_indices, top_images, top_maps, torch.cat(all_scores), objective)


# ---------------------------------------------------------------------------------------- figures


def feature_figure(
    visualization: FeatureVisualization | None = None,
    examples: DatasetExamples | None = None,
    *,
    n_examples: int = 4,
    title: str | None = None,
) -> "go.Figure":  # noqa: F821
    """The paper's figure 3: the optimised image, the top dataset images, and their activation maps.

    Row 1: the optimised image (if given) then the top ``n_examples`` images; row 2 (when the
    objective has per-token values): each example's per-patch activation map over it.

    Example:
        >>> fig = feature_figure(result, top, n_examples=4)  # doctest: +SKIP
    """
    from plotly.subplots import make_subplots

    from vit_lens.utils import plotting as plot

    go = plot._go()
    if visualization is None and examples is None:
        raise ValueError("feature_figure needs a FeatureVisualization, DatasetExamples, or both")
    n = 0 if examples is None else min(n_examples, len(examples.scores))
    offset = int(visualization is not None)
    cols = offset + n
    with_maps = examples is not None and examples.maps is not None and n > 0
    rows = 2 if with_maps else 1
    titles = ([f"optimised: {visualization.activation:.3g}"] if visualization is not None else [])
    titles += [f"#{i + 1}: {examples.scores[i].item():.3g}" for i in range(n)]
    if with_maps:
        titles += [""] * offset + [f"map #{i + 1}" for i in range(n)]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.02, vertical_spacing=0.08)
    if visualization is not None:
        fig.add_trace(go.Image(z=plot._image_rgb(visualization.image)), row=1, col=1)
    for i in range(n):
        rgb = plot._image_rgb(examples.images[i])
        fig.add_trace(go.Image(z=rgb), row=1, col=offset + i + 1)
        if with_maps:
            fig.add_trace(go.Image(z=rgb), row=2, col=offset + i + 1)
            heat = plot._resize_map(plot._numpy(examples.maps[i], "map"), rgb.shape[:2])
            low, high = examples.maps[:n].min().item(), examples.maps[:n].max().item()
            fig.add_trace(
                go.Heatmap(z=heat, colorscale="Viridis", opacity=0.6, zmin=low, zmax=high, showscale=(i == 0)),
                row=2, col=offset + i + 1,
            )
    objective = (visualization or examples).objective
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_layout(title=title or objective.name, width=150 * cols + 80, height=170 * rows + 80,
                      margin=dict(l=10, r=10, t=70, b=10))
    return fig


# ---------------------------------------------------------------------------------------- helpers


def _tower(model: Any) -> Any:
    return image_tower(model)


def _as_images(batch: Any, tower: Any) -> Tensor:
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise TypeError(
            "expected image batches [batch, channels, height, width] or (images, labels) tuples, got "
            f"{type(images).__name__}{'' if not isinstance(images, Tensor) else f' of shape {tuple(images.shape)}'}"
        )
    return images.to(tower.W_E)


def _normalization_from_preprocess(preprocess: Any) -> tuple[Any, Any] | None:
    for step in getattr(preprocess, "transforms", ()):
        if hasattr(step, "mean") and hasattr(step, "std"):
            return step.mean, step.std
    return None


def _input_transform(model: Any, mean: Any, std: Any, preprocess: Any) -> Callable[[Tensor], Tensor]:
    """[0, 1] images -> the model's input."""
    if preprocess is not None:
        if mean is not None or std is not None:
            raise ValueError("pass either preprocess= or mean=/std=, not both")
        if not callable(preprocess):
            raise TypeError(f"preprocess must be a function of image tensors, got {type(preprocess).__name__}")
        return preprocess
    if mean is None and std is None:
        found = _normalization_from_preprocess(getattr(model, "preprocess", None))
        if found is None:
            return lambda images: images
        mean, std = found
    if mean is None or std is None:
        raise ValueError("pass both mean= and std= (per-channel, e.g. (0.5, 0.5, 0.5)), or neither")
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    if mean_t.shape[1] not in (1, 3) or std_t.shape[1] not in (1, 3) or bool((std_t <= 0).any()):
        raise ValueError(f"mean and std must be 1 or 3 values with std > 0, got mean={mean!r}, std={std!r}")
    return lambda images: (images - mean_t.to(images)) / std_t.to(images)
