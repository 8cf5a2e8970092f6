"""Sparse autoencoders and transcoders on the activations of a hooked model.

One class, :class:`SAE`, covers the four activation functions researchers train today and both
kinds of dictionary: an SAE reads and rebuilds the activation at one hook point
(``cfg.hook_name``); a transcoder reads one hook point and stands in for another
(``cfg.hook_name_out``, e.g. ``blocks.3.ln2.hook_normalized`` -> ``blocks.3.hook_mlp_out``).
Weights and hook points carry SAELens's names, so an SAE saved here loads in SAELens and back
(:mod:`vit_lens.sae.files`), and splicing (:mod:`vit_lens.sae.splice`) gives its features hook
names in the model's cache as SAELens's ``HookedSAETransformer`` does.

The computation, for input activations ``x`` ``[..., d_in]``::

    x_n  = normalise(x)                       # cfg.normalize_activations, see below
    pre  = (x_n - b_dec * apply_b_dec_to_input) @ W_enc + b_enc       # [..., d_sae]
    acts = activation(pre)                    # cfg.architecture, see below
    out  = denormalise(acts @ W_dec + b_dec)  # [..., d_out]

Architectures (``cfg.architecture``):

* ``"standard"``: ``relu(pre)``, trained with an L1 penalty (Bricken et al., "Towards
  Monosemanticity", 2023).
* ``"topk"``: the ``k`` largest pre-activations of each row, ReLU'd; the rest zero (Gao et al.,
  "Scaling and evaluating sparse autoencoders", 2024). At most ``k`` features are active, exactly
  ``k`` when ``k`` pre-activations are positive.
* ``"batchtopk"``: in training mode (``sae.train()``) the ``k * n_rows`` largest ReLU'd
  pre-activations of the whole batch survive, so rows share a budget of ``k`` on average; in
  evaluation mode (``sae.eval()``, what :func:`~vit_lens.sae.files.load_sae` returns) each feature
  fires where ``pre > threshold``, the threshold the BatchTopK paper estimates from training
  batches (Bussmann, Leask, Nanda, "BatchTopK Sparse Autoencoders", 2024), so a row's features do
  not depend on the other rows of its batch. The mode switch is BatchNorm's: batch statistics
  while training, a running estimate at inference (:meth:`SAE.update_threshold`).
* ``"jumprelu"``: ``relu(pre) * (pre > threshold)`` with a learned threshold per feature; its
  gradient reaches the threshold through the straight-through estimator of Rajamanoharan et al.,
  "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders" (2024),
  with kernel width ``cfg.jumprelu_bandwidth``.

Input normalisation (``cfg.normalize_activations``, SAELens's names):

* ``"none"``.
* ``"expected_average_only_in"``: ``x`` is multiplied by :attr:`SAE.scaling_factor` (chosen in
  training so that inputs have average norm ``sqrt(d_in)``) and the output divided by it;
  ``scaling_factor=None`` is the identity, as in SAELens. :meth:`SAE.fold_activation_norm_scaling_factor`
  folds it into the weights.
* ``"constant_norm_rescale"``: each row scaled to norm ``sqrt(d_in)``, the output scaled back.
* ``"layer_norm"``: each row centred and divided by its standard deviation (+1e-5), the output
  mapped back with the row's mean and deviation (SAELens's and ViT-Prisma's run-time norms).

Hook points (SAELens's names): ``hook_sae_input`` (``x``), ``hook_sae_acts_pre`` (``pre``),
``hook_sae_acts_post`` (``acts``), ``hook_sae_recons`` (``acts @ W_dec + b_dec``, before
denormalisation), ``hook_sae_error`` and ``hook_sae_output`` (in :meth:`SAE.forward`).

Example:
    >>> import torch
    >>> from vit_lens.sae import SAE, SAEConfig
    >>> sae = SAE(SAEConfig(d_in=32, d_sae=128, architecture="topk", k=8,
    ...                     hook_name="blocks.1.hook_resid_post")).init_weights(seed=0)
    >>> acts = sae.encode(torch.randn(2, 17, 32))
    >>> tuple(acts.shape), int((acts > 0).sum(-1).max())
    ((2, 17, 128), 8)
    >>> tuple(sae.decode(acts).shape)
    (2, 17, 32)
"""

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from vit_lens.model._transformer_lens import HookedRootModule, HookPoint

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
TOKEN_SELECTIONS = ("all", "cls", "patches", "registers")
RESHAPES = ("none", "hook_z")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
HOOK_NAMES = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
              "hook_sae_output")
_LAYER_NORM_EPS = 1e-5


def dtype_name(dtype: str | torch.dtype) -> str:
    """``"float32"`` for ``torch.float32`` or ``"torch.float32"``; a ValueError names the dtypes an SAE may have."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"An SAE's dtype must be one of {tuple(DTYPES)} (or the torch dtype), got {dtype!r}")
    return name


@dataclass
class SAEConfig:
    """The shape, activation function and provenance of an :class:`SAE` or transcoder.

    Attributes:
        d_in: Width of the activations the SAE reads (``d_model`` for the residual stream,
            ``n_heads * d_head`` for ``attn.hook_z`` with ``reshape_activations="hook_z"``).
        d_sae: Number of features.
        architecture: ``"standard"`` (ReLU, L1), ``"topk"``, ``"batchtopk"`` or ``"jumprelu"``
            (the module docstring defines each).
        k: Active features per row for ``"topk"`` (an int), the average per row for
            ``"batchtopk"`` (may be fractional); None for the others.
        hook_name: The hook point the SAE reads (TransformerLens naming,
            ``"blocks.3.hook_resid_post"``). Needed to splice it into a model.
        hook_name_out: For a transcoder, the hook point whose activation it stands in for
            (``"blocks.3.hook_mlp_out"``); None for an SAE, which rebuilds ``hook_name`` itself.
        d_out: Width of the output: ``d_in`` for an SAE (None means that), the output hook's width
            for a transcoder.
        apply_b_dec_to_input: Subtract ``b_dec`` from the input before encoding (an SAE's
            default). None means True for an SAE and False for a transcoder, whose ``b_dec`` lives in
            the output space; True for a transcoder is refused.
        normalize_activations: Input normalisation, SAELens's names (module docstring).
        reshape_activations: ``"hook_z"``: the SAE reads ``[..., n_heads, d_head]`` activations
            flattened to ``[..., n_heads * d_head]`` (splicing flattens and restores them).
        rescale_acts_by_decoder_norm: ``"topk"`` / ``"batchtopk"`` only: select features by
            ``pre * ||W_dec[i]||`` and decode ``acts / ||W_dec[i]||``, so the choice does not depend
            on the decoder's scale (SAELens's option of the same name).
        jumprelu_init_threshold: The threshold a fresh ``"jumprelu"`` SAE starts from.
        jumprelu_bandwidth: Width of the kernel of the JumpReLU straight-through estimator.
        token_selection: The tokens the SAE was trained on and is spliced at: ``"all"``, ``"cls"``,
            ``"patches"`` or ``"registers"``; splicing leaves the other tokens untouched.
        model_name: The model whose activations it was trained on (``cfg.model_name`` of the model).
        dtype: ``"float32"`` (default), ``"float64"``, ``"float16"`` or ``"bfloat16"``.
        device: Where a new SAE's weights are created (``"cpu"``, ``"cuda"``, ...).
        metadata: Other SAELens ``cfg.json`` metadata (``dataset_path``, ``context_size``, ...),
            carried through loading and saving unchanged.
    """

    d_in: int
    d_sae: int
    architecture: str = "standard"
    k: int | float | None = None
    hook_name: str | None = None
    hook_name_out: str | None = None
    d_out: int | None = None
    apply_b_dec_to_input: bool | None = None
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    rescale_acts_by_decoder_norm: bool = False
    jumprelu_init_threshold: float = 0.001
    jumprelu_bandwidth: float = 0.001
    token_selection: str = "all"
    model_name: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"Unknown SAE architecture {self.architecture!r}; vit_lens has {ARCHITECTURES}. (SAELens's "
                "'gated', 'matching_pursuit' and skip transcoders are not supported.)"
            )
        self._check_k()
        if self.hook_name_out is not None and self.hook_name is None:
            raise ValueError(
                f"A transcoder needs hook_name (the hook point it reads) as well as hook_name_out "
                f"({self.hook_name_out!r}, the one it writes)."
            )
        if self.d_out is None:
            self.d_out = self.d_in
        elif not isinstance(self.d_out, int) or isinstance(self.d_out, bool) or self.d_out <= 0:
            raise ValueError(f"SAEConfig.d_out must be a positive int (or None: d_in), got {self.d_out!r}")
        if self.d_out != self.d_in and not self.is_transcoder:
            raise ValueError(
                f"An SAE rebuilds its input, so d_out must equal d_in ({self.d_in}), got d_out={self.d_out}; a "
                "dictionary that writes another hook point is a transcoder: set hook_name_out too."
            )
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = not self.is_transcoder
        elif self.apply_b_dec_to_input and self.is_transcoder:
            raise ValueError(
                "apply_b_dec_to_input=True is not possible for a transcoder: its b_dec is an output bias (as in "
                "SAELens). Leave it None (False)."
            )
        for name, allowed in (("normalize_activations", NORMALIZATIONS), ("token_selection", TOKEN_SELECTIONS),
                              ("reshape_activations", RESHAPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"SAEConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.rescale_acts_by_decoder_norm and self.architecture not in ("topk", "batchtopk"):
            raise ValueError(
                f"rescale_acts_by_decoder_norm applies to 'topk' and 'batchtopk' SAEs, not {self.architecture!r}"
            )
        if not self.jumprelu_bandwidth > 0:
            raise ValueError(f"SAEConfig.jumprelu_bandwidth must be positive, got {self.jumprelu_bandwidth!r}")
        self.dtype = dtype_name(self.dtype)
        self.device = str(self.device)

    def _check_k(self) -> None:
        k = self.k
        if self.architecture == "topk":
            if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= self.d_sae:
                raise ValueError(f"A 'topk' SAE needs k, an int in [1, d_sae={self.d_sae}], got k={k!r}")
        elif self.architecture == "batchtopk":
            if not isinstance(k, (int, float)) or isinstance(k, bool) or not 0 < k <= self.d_sae:
                raise ValueError(
                    f"A 'batchtopk' SAE needs k, the average number of active features per row, in "
                    f"(0, d_sae={self.d_sae}], got k={k!r}"
                )
        elif k is not None:
            raise ValueError(f"k applies to 'topk' and 'batchtopk' SAEs; a {self.architecture!r} SAE takes k=None")

    @property
    def is_transcoder(self) -> bool:
        """Whether this dictionary writes a hook point other than the one it reads."""
        return self.hook_name_out is not None and self.hook_name_out != self.hook_name

    @property
    def output_hook_name(self) -> str | None:
        """The hook point whose activation the SAE's output replaces (SAELens: ``hook_name_out or hook_name``)."""
        return self.hook_name_out if self.is_transcoder else self.hook_name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _JumpReLU(torch.autograd.Function):
    """``relu(pre) * (pre > threshold)``, with the pseudo-derivative of Rajamanoharan et al. (2024) for the threshold.

    The jump is a step in the threshold, so its true derivative is zero almost everywhere; the
    estimator spreads it over a window of width ``bandwidth`` around the threshold:
    ``d out / d threshold = -(threshold / bandwidth)`` where ``|pre - threshold| < bandwidth / 2``.
    The derivative with respect to ``pre`` is the true one, 1 where the feature fires.
    """

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * ((pre > threshold) & (pre > 0)).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * ((pre > threshold) & (pre > 0)).to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            window = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
            per_row = -(threshold / ctx.bandwidth) * window * grad
            grad_threshold = per_row.reshape(-1, per_row.shape[-1]).sum(0).reshape(threshold.shape)
        return grad_pre, grad_threshold, None


def _unit_rows(rows: Tensor) -> Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)


class SAE(HookedRootModule):
    """A sparse autoencoder (or transcoder) with SAELens's weights and hook points.

    Weights: ``W_enc`` ``[d_in, d_sae]``, ``b_enc`` ``[d_sae]``, ``W_dec`` ``[d_sae, d_out]``,
    ``b_dec`` ``[d_out]``, and ``threshold`` ``[d_sae]`` for ``"jumprelu"`` (a parameter) and
    ``"batchtopk"`` (a buffer, the inference threshold). A new SAE has unit-norm decoder rows and
    the encoder their transpose (:meth:`init_weights`). The module docstring gives the
    computation, the architectures and the normalisations.

    Modes: only ``"batchtopk"`` depends on ``sae.train()`` / ``sae.eval()`` (batch top-k versus the
    threshold); :func:`~vit_lens.sae.files.load_sae` returns SAEs in eval mode.

    Attributes:
        cfg: The :class:`SAEConfig`.
        scaling_factor: For ``normalize_activations="expected_average_only_in"``: inputs are
            multiplied by it and outputs divided by it (None: by 1). Saved folded into the weights
            by default (:func:`~vit_lens.sae.files.save_sae`).

    Example:
        >>> sae = SAE(SAEConfig(d_in=4, d_sae=3, apply_b_dec_to_input=False))
        >>> with torch.no_grad():
        ...     _ = sae.W_enc.copy_(torch.eye(4, 3)); _ = sae.b_enc.zero_()
        >>> sae.encode(torch.tensor([[1.0, -2.0, 3.0, 4.0]])).tolist()  # relu(x @ W_enc + b_enc)
        [[1.0, 0.0, 3.0]]
    """

    def __init__(self, cfg: SAEConfig | dict[str, Any]):
        super().__init__()
        cfg = SAEConfig(**cfg) if isinstance(cfg, dict) else cfg
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"SAE takes an SAEConfig (or a dict of its fields), got {type(cfg).__name__}")
        self.cfg = cfg
        factory = {"dtype": DTYPES[cfg.dtype], "device": cfg.device}
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, **factory))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **factory))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_out, **factory))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, **factory))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold, **factory))
        elif cfg.architecture == "batchtopk":
            self.register_buffer("threshold", torch.zeros(cfg.d_sae, **factory))
        self.scaling_factor: float | None = None
        self.hook_sae_input = HookPoint()  # [..., d_in]
        self.hook_sae_acts_pre = HookPoint()  # [..., d_sae]
        self.hook_sae_acts_post = HookPoint()  # [..., d_sae]
        self.hook_sae_recons = HookPoint()  # [..., d_out], before denormalisation
        self.hook_sae_error = HookPoint()  # [..., d_out], only with use_error_term
        self.hook_sae_output = HookPoint()  # [..., d_out]
        self.spliced_at: str | None = None  # the model hook point it is spliced at, set by vit_lens.sae.splice
        self.setup()
        self.init_weights()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "SAE":
        """``nn.Module._apply`` (behind ``to``, ``cuda``, ``half``, ...), keeping ``cfg.device`` and ``cfg.dtype``."""
        module = super()._apply(fn, *args, **kwargs)
        self.cfg.device = str(self.W_enc.device)
        self.cfg.dtype = dtype_name(self.W_enc.dtype)
        return module

    def extra_repr(self) -> str:
        cfg = self.cfg
        k = f", k={cfg.k}" if cfg.k is not None else ""
        hooks = f"{cfg.hook_name!r}" + (f" -> {cfg.hook_name_out!r}" if cfg.is_transcoder else "")
        return f"{cfg.architecture}{k}, d_in={cfg.d_in}, d_sae={cfg.d_sae}, d_out={cfg.d_out}, hook={hooks}"

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "SAE":
        """Fresh weights: unit-norm random decoder rows, the encoder their transpose, zero biases.

        Tying the encoder to the decoder at the start is what Gao et al. (2024) and Anthropic's
        training updates (Conerly et al., 2024) do; it keeps early features alive.

        Returns:
            This SAE.
        """
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        directions = _unit_rows(torch.randn(self.cfg.d_sae, self.cfg.d_out, generator=generator, dtype=torch.float64))
        self.W_dec.copy_(directions.to(self.W_dec))
        if self.cfg.d_out == self.cfg.d_in:
            self.W_enc.copy_(directions.T.to(self.W_enc))
        else:
            encoder = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator, dtype=torch.float64)
            self.W_enc.copy_(_unit_rows(encoder).T.to(self.W_enc))
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.cfg.architecture == "jumprelu":
            self.threshold.fill_(self.cfg.jumprelu_init_threshold)
        elif self.cfg.architecture == "batchtopk":
            self.threshold.zero_()
        return self

    # ------------------------------------------------------------------ the computation

    def _check_width(self, x: Any, width: int, what: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"SAE.{what} takes a torch.Tensor [..., {width}], got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != width:
            raise ValueError(
                f"SAE.{what} takes [..., {width}] (the SAE's {'d_in' if what == 'encode' else 'd_sae'}), got shape "
                f"{tuple(x.shape)}" + (f"; the SAE was trained on {self.cfg.hook_name!r}" if self.cfg.hook_name else "")
            )

    def _normalisation(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor] | float | None:
        """What ``normalize_activations`` divides the output by for input ``x`` (for layer_norm: (mean, deviation))."""
        mode = self.cfg.normalize_activations
        if mode == "expected_average_only_in":
            return self.scaling_factor
        if mode == "constant_norm_rescale":
            return self.cfg.d_in**0.5 / x.norm(dim=-1, keepdim=True)
        if mode == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            return mean, (x - mean).std(dim=-1, keepdim=True)
        return None

    @staticmethod
    def _normalise(x: Tensor, stats: Any) -> Tensor:
        if stats is None:
            return x
        if isinstance(stats, tuple):
            mean, deviation = stats
            return (x - mean) / (deviation + _LAYER_NORM_EPS)
        return x * stats

    @staticmethod
    def _denormalise(y: Tensor, stats: Any) -> Tensor:
        if stats is None:
            return y
        if isinstance(stats, tuple):
            mean, deviation = stats
            return y * deviation + mean
        return y / stats

    def _pre_acts(self, x_normalised: Tensor) -> Tensor:
        sae_in = x_normalised - self.b_dec if self.cfg.apply_b_dec_to_input else x_normalised
        return sae_in @ self.W_enc + self.b_enc

    def _decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=-1)

    def _activation(self, pre: Tensor) -> Tensor:
        architecture = self.cfg.architecture
        if architecture == "standard":
            return pre.relu()
        if architecture == "jumprelu":
            return _JumpReLU.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self._decoder_norms()
        if architecture == "topk":
            values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, indices, values.relu())
        if self.training:
            return self._batch_top_k(pre)
        return pre * ((pre > self.threshold) & (pre > 0)).to(pre.dtype)

    def _batch_top_k(self, pre: Tensor) -> Tensor:
        acts = pre.relu()
        flat = acts.reshape(-1)
        rows = flat.numel() // self.cfg.d_sae
        keep = min(flat.numel(), int(self.cfg.k * rows))
        values, indices = flat.topk(keep, sorted=False)
        return torch.zeros_like(flat).scatter(0, indices, values).reshape(acts.shape)

    def _decode_linear(self, acts: Tensor) -> Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            acts = acts / self._decoder_norms()
        return acts @ self.W_dec + self.b_dec

    def _encode_with_stats(self, x: Tensor) -> tuple[Tensor, Any]:
        self._check_width(x, self.cfg.d_in, "encode")
        x = self.hook_sae_input(x.to(self.W_enc.dtype))
        stats = self._normalisation(x)
        pre = self.hook_sae_acts_pre(self._pre_acts(self._normalise(x, stats)))
        return self.hook_sae_acts_post(self._activation(pre)), stats

    def _stats_for_decode(self, x: Tensor | None) -> Any:
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            if x is None:
                raise ValueError(
                    f"This SAE normalises each input row (normalize_activations={self.cfg.normalize_activations!r}), "
                    "so decode needs the input the features came from to undo it: sae.decode(acts, x=x), or sae(x)."
                )
            self._check_width(x, self.cfg.d_in, "decode's x")
            return self._normalisation(x.to(self.W_enc.dtype))
        return self.scaling_factor if self.cfg.normalize_activations == "expected_average_only_in" else None

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Feature activations of ``x`` (computed in the SAE's dtype).

        Hook points ``hook_sae_input``, ``hook_sae_acts_pre`` and ``hook_sae_acts_post`` fire, and
        a hook's replacement flows on.
        """
        return self._encode_with_stats(x)[0]

    def decode(
        self, feature_acts: Float[Tensor, "*batch d_sae"], x: Float[Tensor, "*batch d_in"] | None = None
    ) -> Float[Tensor, "*batch d_out"]:
        """The reconstruction (or, for a transcoder, the prediction) from feature activations.

        Args:
            feature_acts: ``[..., d_sae]``, e.g. from :meth:`encode`, edited or not.
            x: The input the features came from; needed only when ``normalize_activations`` is
                ``"constant_norm_rescale"`` or ``"layer_norm"``, which undo a per-row scale.

        ``hook_sae_recons`` fires on ``feature_acts @ W_dec + b_dec`` before denormalisation.
        """
        self._check_width(feature_acts, self.cfg.d_sae, "decode")
        stats = self._stats_for_decode(x)
        return self._denormalise(self.hook_sae_recons(self._decode_linear(feature_acts.to(self.W_dec.dtype))), stats)

    def forward(
        self,
        x: Float[Tensor, "*batch d_in"],
        use_error_term: bool = False,
        target: Float[Tensor, "*batch d_out"] | None = None,
    ) -> Float[Tensor, "*batch d_out"]:
        """Encode and decode ``x``; with ``use_error_term``, add what the SAE misses so the output is exact.

        Args:
            x: ``[..., d_in]`` input activations.
            use_error_term: Add ``hook_sae_error = target - decode(encode(x))``, computed without
                the hooks (as SAELens), so the output equals ``target`` when no hook edits the
                features, and moves by exactly the edit's decoded effect when one does. Gradients
                flow through the error (unlike SAELens, which makes it a constant): the output's
                gradient with respect to ``x`` and ``target`` is the clean model's, and a feature's
                gradient is what reaches it through its decoder row, as for any hook point.
            target: The activation the output stands in for: ``x`` for an SAE (the default), the
                activation at ``hook_name_out`` for a transcoder (required there with
                ``use_error_term``).

        Returns:
            ``hook_sae_output``: ``[..., d_out]`` in the SAE's dtype.
        """
        acts, stats = self._encode_with_stats(x)
        out = self._denormalise(self.hook_sae_recons(self._decode_linear(acts)), stats)
        if use_error_term:
            if target is None:
                if self.cfg.is_transcoder:
                    raise ValueError(
                        "A transcoder's error term is the difference from the activation it stands in for: pass "
                        f"target=<the activation at {self.cfg.hook_name_out!r}>."
                    )
                target = x
            error = target.to(out.dtype) - self._clean_output(x, out)
            out = out + self.hook_sae_error(error)
        return self.hook_sae_output(out)

    def _clean_output(self, x: Tensor, output: Tensor) -> Tensor:
        """``decode(encode(x))`` without the hooks, on a path of its own when gradients are on.

        With gradients off and no hook that could have edited it, that is ``output`` itself. With
        gradients on it is always recomputed, so that ``output - clean`` cancels in the gradient
        with respect to ``x`` while the features keep theirs.
        """
        points = (self.hook_sae_input, self.hook_sae_acts_pre, self.hook_sae_acts_post, self.hook_sae_recons)
        if not torch.is_grad_enabled() and not any(point.fwd_hooks for point in points):
            return output
        x = x.to(self.W_enc.dtype)
        stats = self._normalisation(x)
        acts = self._activation(self._pre_acts(self._normalise(x, stats)))
        return self._denormalise(self._decode_linear(acts), stats)

    # ------------------------------------------------------------------ decoder norms, scaling, thresholds

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Scale every decoder row to unit norm (a training constraint; unlike folding, it changes the output)."""
        self.W_dec.copy_(_unit_rows(self.W_dec))

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Move the decoder rows' norms into the encoder, so ``W_dec`` has unit rows and the output is unchanged.

        Feature ``i``'s activation is multiplied by ``||W_dec[i]||`` (``W_enc[:, i]``, ``b_enc[i]``
        and a JumpReLU / BatchTopK threshold with it) and its decoder row divided by it, so features
        become comparable in size (SAELens's ``fold_W_dec_norm``). A ``"topk"`` SAE without
        ``rescale_acts_by_decoder_norm`` is refused: scaling pre-activations by different amounts
        can change which ``k`` win. For ``"batchtopk"`` the fold is exact at inference (the
        threshold); batch top-k selection in training mode compares the rescaled values.
        """
        if self.cfg.architecture == "topk" and not self.cfg.rescale_acts_by_decoder_norm:
            raise ValueError(
                "Folding decoder norms into a 'topk' SAE would change which k features win (each feature's "
                "pre-activation is scaled by a different amount); SAELens refuses it too. Train with "
                "rescale_acts_by_decoder_norm=True to make selection independent of the decoder's scale."
            )
        norms = self.W_dec.norm(dim=-1).clamp_min(1e-8)
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms)
        self.b_enc.mul_(norms)
        # With rescale_acts_by_decoder_norm the threshold is compared with pre * norm, which folding leaves as it was.
        if self.cfg.architecture in ("jumprelu", "batchtopk") and not self.cfg.rescale_acts_by_decoder_norm:
            self.threshold.mul_(norms)

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self) -> None:
        """Fold :attr:`scaling_factor` into the weights; ``normalize_activations`` becomes ``"none"``, the output stays.

        With ``x`` scaled by ``s``: ``W_enc`` is multiplied by ``s``, ``W_dec`` and ``b_dec`` divided by
        it (SAELens's ``fold_activation_norm_scaling_factor``); the threshold of a BatchTopK SAE that
        rescales by decoder norms is divided by it too, since it is compared with ``pre * ||W_dec||``.
        """
        if self.cfg.normalize_activations != "expected_average_only_in":
            raise ValueError(
                f"Only normalize_activations='expected_average_only_in' has a scaling factor to fold; this SAE has "
                f"{self.cfg.normalize_activations!r}."
            )
        scale = 1.0 if self.scaling_factor is None else float(self.scaling_factor)
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)
        if self.cfg.architecture == "batchtopk" and self.cfg.rescale_acts_by_decoder_norm:
            self.threshold.div_(scale)
        self.scaling_factor = None
        self.cfg.normalize_activations = "none"

    @torch.no_grad()
    def update_threshold(self, feature_acts: Tensor, momentum: float = 0.01) -> None:
        """Move a BatchTopK SAE's inference threshold toward the batch's smallest active feature activation.

        The BatchTopK paper sets the inference threshold to the average, over training batches, of
        the smallest positive activation batch top-k kept; this keeps that average as an
        exponential moving average (``threshold <- (1 - momentum) threshold + momentum min_active``).
        Call it in training with the activations :meth:`encode` returned in train mode.
        """
        if self.cfg.architecture != "batchtopk":
            raise ValueError(f"Only a 'batchtopk' SAE has a running threshold; this one is {self.cfg.architecture!r}")
        active = feature_acts[feature_acts > 0]
        if active.numel():
            self.threshold.mul_(1 - momentum).add_(momentum * active.min().to(self.threshold.dtype))

    # ------------------------------------------------------------------ splicing

    @contextmanager
    def spliced_into(self, model: Any, use_error_term: bool = False) -> Iterator["SAE"]:
        """Context manager: this SAE spliced into ``model`` (see :func:`vit_lens.sae.splice.spliced`).

        The protocol ``HookedViT.run_with_saes`` relies on, so that the model never imports this package.
        """
        from vit_lens.sae.splice import splice_one

        with splice_one(model, self, use_error_term=use_error_term):
            yield self
