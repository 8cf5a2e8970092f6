"""Training SAEs and transcoders on a hooked model's activations, streamed from images.

:func:`train_sae` runs the model on batches of images (a DataLoader, a generator, a list, or a
tensor it splits), stops each forward pass after the block that holds the SAE's hook point
(``run_with_cache(names_filter=..., stop_at_layer=...)``), keeps the tokens the SAE is for
(``cfg.token_selection``, narrowed further by an optional ``token_mask``), and pours the rows into
an :class:`ActivationBuffer` that shuffles them across several image batches before they reach
the optimiser. The dataset's activations are never held at once: the buffer holds at most
``buffer_tokens`` rows. :func:`train_sae_on_activations` trains on activations you already have
(a tensor, or an iterable of chunks), with the same optimisation loop.

The optimisation follows the papers each architecture comes from, as SAELens implements them:

* Loss: the squared error summed over the output width and averaged over rows. With
  ``normalize_activations="expected_average_only_in"`` the scaling factor (inputs scaled to average
  norm ``sqrt(d_in)``) is estimated from the first buffer of activations before training, and the
  error is measured in that scaled space, as SAELens does.
* ``"standard"``: plus ``l1_coefficient * sum_i acts_i * ||W_dec[i]||`` (the decoder-norm-weighted L1
  of Conerly et al., "Circuits Updates - April 2024"), its coefficient warmed up linearly from zero.
* ``"topk"`` / ``"batchtopk"``: plus the AuxK loss of Gao et al., "Scaling and evaluating sparse
  autoencoders" (2024): the ``aux_k`` dead features with the largest pre-activations reconstruct
  what the live ones missed, weighted by ``aux_k_coefficient`` (1/32 in the paper). A BatchTopK
  SAE's inference threshold is estimated while it trains (:meth:`~vit_lens.sae.SAE.update_threshold`;
  Bussmann, Leask, Nanda, "BatchTopK Sparse Autoencoders", 2024). ``k`` may be annealed from
  ``k_start`` down to ``cfg.k`` over ``k_anneal_steps``.
* ``"jumprelu"``: plus ``l0_coefficient * L0``, the number of features above their threshold,
  differentiated with the straight-through estimator of Rajamanoharan et al., "Jumping Ahead:
  Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders" (2024); the threshold is
  kept non-negative.
* Adam, with a linear learning-rate warm-up and a linear decay to zero over the last
  ``lr_decay_steps`` (Conerly et al. decay over the last 20%, the default), gradient norm clipped
  at ``max_grad_norm``.
* Decoder rows are kept at unit norm where nothing else fixes their scale (TopK / BatchTopK
  without ``rescale_acts_by_decoder_norm``, and JumpReLU): the gradient's component along each row
  is removed before the step and the rows are renormalised after it, as Gao et al. do.
* Dead features: the tokens since each feature last fired are counted; a feature silent for
  ``dead_after_tokens`` tokens is dead (the AuxK loss works on those; the log reports their share).

Checkpoints (``checkpoint_every`` steps into ``checkpoint_dir``, each written atomically) are
SAELens folders (:func:`~vit_lens.sae.load_sae` reads them) plus the optimiser, the schedules'
step, the dead-feature counters, the random state and the activation buffer's content, so that
``resume=`` continues exactly where the run stopped: the result equals the uninterrupted run's.

Example:
    >>> import vit_lens
    >>> from vit_lens.sae import SAEConfig, train_sae
    >>> from vit_lens.toy import ToyWorld
    >>> clip = vit_lens.load_toy_clip()
    >>> images = ToyWorld(seed=0).sample(256).images
    >>> sae, log = train_sae(clip, SAEConfig(d_in=128, d_sae=256, architecture="topk", k=8,
    ...                      hook_name="blocks.2.hook_resid_post"), images, steps=20,
    ...                      batch_size_tokens=1024, progress=False)  # doctest: +SKIP
    >>> log[-1]["l0"]  # doctest: +SKIP
    8.0
"""

import dataclasses
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vit_lens.model.hooked_vit import image_tower
from vit_lens.runner.readback import ShardedRows
from vit_lens.sae.activations import ActivationBuffer, ActivationSource, TokenMask, cached_chunks
from vit_lens.sae.files import install_folder, load_sae, save_sae
from vit_lens.sae.model import SAE, SAEConfig
from vit_lens.utils.progress import progress as progress_bar

TRAINER_STATE_FILENAME = "trainer_state.pt"
BUFFER_FILENAME = "activation_buffer.safetensors"
CHECKPOINT_PREFIX = "step_"
_STATE_VERSION = 1
# Settings that fix which rows each step sees; a resumed run must keep them to continue the same run.
_DATA_SETTINGS = ("batch_size_tokens", "buffer_tokens", "seed")

# ---------------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """The hyperparameters of one training run, validated (built by :func:`train_sae` from its arguments)."""

    steps: int
    batch_size_tokens: int
    buffer_tokens: int
    lr: float
    adam_betas: tuple[float, float]
    lr_warmup_steps: int
    lr_decay_steps: int
    l1_coefficient: float
    l1_warmup_steps: int
    l0_coefficient: float
    l0_warmup_steps: int
    aux_k: int
    aux_k_coefficient: float
    k_start: int | float | None
    k_anneal_steps: int
    threshold_momentum: float
    dead_after_tokens: int
    max_grad_norm: float | None
    unit_norm_decoder: bool
    seed: int
    log_every: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive_int(name: str, value: Any, allow_zero: bool = False) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} int, got {value!r}")
    return value


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def _default_fraction(value: int | None, steps: int, fraction: float, name: str) -> int:
    return int(steps * fraction) if value is None else _positive_int(name, value, allow_zero=True)


def build_settings(
    sae: SAE,
    *,
    steps: int,
    batch_size_tokens: int = 4096,
    buffer_tokens: int | None = None,
    lr: float = 3e-4,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    lr_warmup_steps: int | None = None,
    lr_decay_steps: int | None = None,
    l1_coefficient: float = 5.0,
    l1_warmup_steps: int | None = None,
    l0_coefficient: float = 1.0,
    l0_warmup_steps: int | None = None,
    aux_k: int | None = None,
    aux_k_coefficient: float = 1 / 32,
    k_start: int | float | None = None,
    k_anneal_steps: int = 0,
    threshold_momentum: float = 0.01,
    dead_after_tokens: int = 1_000_000,
    max_grad_norm: float | None = 1.0,
    unit_norm_decoder: bool | None = None,
    seed: int = 0,
    log_every: int = 10,
) -> TrainingSettings:
    """Validate the training arguments for ``sae`` and fill in the defaults that depend on ``steps``.

    Defaults that depend on the run: ``buffer_tokens`` 16 batches; ``lr_warmup_steps``,
    ``l1_warmup_steps`` and ``l0_warmup_steps`` 5% of ``steps``; ``lr_decay_steps`` 20% of ``steps``;
    ``aux_k`` half of ``d_in`` (Gao et al.); ``unit_norm_decoder`` True for TopK / BatchTopK without
    ``rescale_acts_by_decoder_norm`` and for JumpReLU.
    """
    cfg = sae.cfg
    steps = _positive_int("steps", steps)
    batch_size_tokens = _positive_int("batch_size_tokens", batch_size_tokens)
    buffer_tokens = 16 * batch_size_tokens if buffer_tokens is None else _positive_int("buffer_tokens", buffer_tokens)
    if buffer_tokens < 2 * batch_size_tokens:
        raise ValueError(
            f"buffer_tokens ({buffer_tokens}) must hold at least two batches (2 * batch_size_tokens = "
            f"{2 * batch_size_tokens}) so that it can shuffle across image batches; 16 batches is the default."
        )
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(adam_betas, (tuple, list)) and len(adam_betas) == 2 and all(0 <= b < 1 for b in adam_betas)):
        raise ValueError(f"adam_betas must be two numbers in [0, 1), got {adam_betas!r}")
    if (k_start is None) != (k_anneal_steps == 0):
        raise ValueError(
            f"k_start ({k_start!r}) and k_anneal_steps ({k_anneal_steps!r}) go together: k moves from k_start to "
            "cfg.k over k_anneal_steps. Give both, or neither for a constant k."
        )
    if k_start is not None:
        if cfg.architecture not in ("topk", "batchtopk"):
            raise ValueError(f"k_start anneals k; a {cfg.architecture!r} SAE has no k.")
        if not (isinstance(k_start, (int, float)) and not isinstance(k_start, bool) and cfg.k <= k_start <= cfg.d_sae):
            raise ValueError(f"k_start must lie in [k={cfg.k}, d_sae={cfg.d_sae}], got {k_start!r}")
        if cfg.architecture == "topk" and not isinstance(k_start, int):
            raise ValueError(f"A 'topk' SAE takes an int k_start, got {k_start!r}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a positive number or None (no clipping), got {max_grad_norm!r}")
    if not 0 < threshold_momentum <= 1:
        raise ValueError(f"threshold_momentum must lie in (0, 1], got {threshold_momentum!r}")
    if unit_norm_decoder is None:
        unit_norm_decoder = (cfg.architecture in ("topk", "batchtopk") and not cfg.rescale_acts_by_decoder_norm) or (
            cfg.architecture == "jumprelu")
    return TrainingSettings(
        steps=steps,
        batch_size_tokens=batch_size_tokens,
        buffer_tokens=buffer_tokens,
        lr=float(lr),
        adam_betas=(float(adam_betas[0]), float(adam_betas[1])),
        lr_warmup_steps=_default_fraction(lr_warmup_steps, steps, 0.05, "lr_warmup_steps"),
        lr_decay_steps=_default_fraction(lr_decay_steps, steps, 0.2, "lr_decay_steps"),
        l1_coefficient=_non_negative("l1_coefficient", l1_coefficient),
        l1_warmup_steps=_default_fraction(l1_warmup_steps, steps, 0.05, "l1_warmup_steps"),
        l0_coefficient=_non_negative("l0_coefficient", l0_coefficient),
        l0_warmup_steps=_default_fraction(l0_warmup_steps, steps, 0.05, "l0_warmup_steps"),
        aux_k=max(1, cfg.d_in // 2) if aux_k is None else _positive_int("aux_k", aux_k),
        aux_k_coefficient=_non_negative("aux_k_coefficient", aux_k_coefficient),
        k_start=k_start,
        k_anneal_steps=_positive_int("k_anneal_steps", k_anneal_steps, allow_zero=True),
        threshold_momentum=float(threshold_momentum),
        dead_after_tokens=_positive_int("dead_after_tokens", dead_after_tokens),
        max_grad_norm=None if max_grad_norm is None else float(max_grad_norm),
        unit_norm_decoder=bool(unit_norm_decoder),
        seed=_positive_int("seed", seed, allow_zero=True),
        log_every=_positive_int("log_every", log_every),
    )


# ---------------------------------------------------------------------------------------------- the optimisation


class _JumpReLUL0(torch.autograd.Function):
    """The number of features above threshold, with Rajamanoharan et al.'s pseudo-derivative for the threshold.

    The count is a step function of the threshold; the estimator spreads its derivative over a
    window of width ``bandwidth``: ``d / d threshold = -(1 / bandwidth)`` where
    ``|pre - threshold| < bandwidth / 2``. No gradient reaches ``pre`` (the paper's choice).
    """

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return ((pre > threshold) & (pre > 0)).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, None]:
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        per_row = -(1.0 / ctx.bandwidth) * window * grad
        return None, per_row.reshape(-1, per_row.shape[-1]).sum(0).reshape(threshold.shape), None


def _difference_to_output_space(difference: Tensor, stats: Any) -> Tensor:
    """A difference of reconstructions (no bias) mapped from the SAE's normalised space back to activations."""
    if stats is None:
        return difference
    if isinstance(stats, tuple):
        return difference * stats[1]
    return difference / stats


class SAETrainer:
    """The optimisation loop of :func:`train_sae`: one :meth:`train_step` per batch of activation rows.

    Use it directly to train on batches from anywhere (:func:`train_sae_on_activations` does):

    Args:
        sae: The SAE or transcoder to train (moved to ``device``, put in training mode).
        settings: From :func:`build_settings`.
        device: The training device.

    Attributes:
        step: Steps taken.
        tokens: Rows trained on.
        tokens_since_fired: ``[d_sae]`` rows since each feature was last active.
        log: One dict per logged step (every ``settings.log_every`` steps and the last).
    """

    def __init__(self, sae: SAE, settings: TrainingSettings, device: str | torch.device = "cpu"):
        self.sae = sae.to(device).train()
        self.settings = settings
        self.device = torch.device(device)
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=settings.lr, betas=settings.adam_betas)
        self.step = 0
        self.tokens = 0
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=self.device)
        self.log: list[dict[str, Any]] = []

    # -------------------------------------------------------------- schedules

    def learning_rate(self, step: int | None = None) -> float:
        """Linear warm-up over ``lr_warmup_steps``, constant, then linear decay to zero over ``lr_decay_steps``."""
        s, step = self.settings, self.step if step is None else step
        factor = 1.0
        if step < s.lr_warmup_steps:
            factor = (step + 1) / s.lr_warmup_steps
        if s.lr_decay_steps and step >= s.steps - s.lr_decay_steps:
            factor = min(factor, (s.steps - step) / s.lr_decay_steps)
        return s.lr * factor

    def sparsity_coefficient(self, step: int | None = None) -> float:
        """The L1 (standard) or L0 (JumpReLU) coefficient, warmed up linearly from zero; 0 for the others."""
        s, step = self.settings, self.step if step is None else step
        architecture = self.sae.cfg.architecture
        if architecture == "standard":
            value, warmup = s.l1_coefficient, s.l1_warmup_steps
        elif architecture == "jumprelu":
            value, warmup = s.l0_coefficient, s.l0_warmup_steps
        else:
            return 0.0
        return value * min(1.0, (step + 1) / warmup) if warmup else value

    def current_k(self, step: int | None = None) -> int | float | None:
        """``k`` at ``step``: annealed linearly from ``k_start`` to ``cfg.k`` over ``k_anneal_steps``."""
        s, step, k = self.settings, self.step if step is None else step, self.sae.cfg.k
        if k is None or s.k_start is None or step >= s.k_anneal_steps:
            return k
        value = s.k_start + (k - s.k_start) * step / s.k_anneal_steps
        return round(value) if isinstance(k, int) else value

    # -------------------------------------------------------------- one step

    def _decode_sparse(self, values: Tensor, indices: Tensor, norms: Tensor | None) -> Tensor:
        """``sum_j values_j * W_dec[indices_j]`` per row, without the dense ``[rows, d_sae]`` matrix.

        A TopK SAE's rows have ``k`` features out of ``d_sae``; gathering their decoder rows costs
        ``k / d_sae`` of the dense product, forward and backward (Gao et al. use sparse kernels for
        the same reason).
        """
        weights = values / norms[indices] if norms is not None else values
        return torch.nn.functional.embedding_bag(indices, self.sae.W_dec, per_sample_weights=weights, mode="sum")

    def _batch_top_k(self, pre: Tensor, k: int | float) -> Tensor:
        flat = pre.relu().reshape(-1)
        values, indices = flat.topk(min(flat.numel(), int(k * len(pre))), sorted=False)
        return torch.zeros_like(flat).scatter(0, indices, values).reshape(pre.shape)

    def _aux_k_loss(self, pre: Tensor, residual: Tensor, norms: Tensor | None, stats: Any,
                    scale: float | None) -> Tensor | None:
        """Gao et al.'s AuxK: the top ``aux_k`` dead features reconstruct the live features' residual."""
        dead = self.tokens_since_fired >= self.settings.dead_after_tokens
        n_dead = int(dead.sum())
        if n_dead == 0 or self.settings.aux_k_coefficient == 0:
            return None
        # Raw pre-activations, not ReLU'd: a dead feature's are usually negative, and only they give it a gradient.
        values, indices = pre.masked_fill(~dead, -torch.inf).topk(min(self.settings.aux_k, n_dead), dim=-1,
                                                                  sorted=False)
        error = _difference_to_output_space(self._decode_sparse(values, indices, norms), stats) - residual
        if scale is not None:
            error = error * scale
        return self.settings.aux_k_coefficient * error.pow(2).sum(-1).mean()

    @torch.enable_grad()  # a caller's torch.set_grad_enabled(False) (common in notebooks) must not stop training
    def train_step(self, batch: Tensor) -> dict[str, Any] | None:
        """One optimiser step on ``batch`` (``[rows, d_in]``; a transcoder: ``[rows, d_in + d_out]``).

        Returns:
            The log entry when this step is logged, else None.
        """
        sae, cfg, s = self.sae, self.sae.cfg, self.settings
        batch = batch.to(self.device, sae.W_enc.dtype)
        x = batch[:, :cfg.d_in]
        target = batch[:, cfg.d_in:] if cfg.is_transcoder else x
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        coefficient = self.sparsity_coefficient()
        k = self.current_k()

        stats = sae._normalisation(x)
        pre = sae._pre_acts(sae._normalise(x, stats))
        norms = sae.W_dec.norm(dim=-1) if cfg.rescale_acts_by_decoder_norm else None
        if norms is not None:
            pre = pre * norms  # TopK / BatchTopK select by the decoded size
        if cfg.architecture == "topk":
            values, indices = pre.topk(int(k), dim=-1, sorted=False)
            values = values.relu()
            recon = self._decode_sparse(values, indices, norms) + sae.b_dec
            active = values > 0
            fired = torch.zeros(cfg.d_sae, device=self.device).index_add_(
                0, indices.reshape(-1), active.reshape(-1).to(values.dtype)) > 0
            l0 = active.sum(-1)
        else:
            acts = self._batch_top_k(pre, k) if cfg.architecture == "batchtopk" else sae._activation(pre)
            recon = sae._decode_linear(acts)
            fired = (acts > 0).any(0)
            l0 = (acts > 0).sum(-1)
        out = sae._denormalise(recon, stats)
        # expected_average_only_in: the error is measured in the scaled space, as SAELens does.
        scale = sae.scaling_factor if cfg.normalize_activations == "expected_average_only_in" else None
        error = out - target if scale is None else (out - target) * scale
        mse = error.pow(2).sum(-1).mean()
        loss = mse
        extra = None
        if cfg.architecture == "standard" and coefficient:
            extra = coefficient * (acts * sae.W_dec.norm(dim=-1)).sum(-1).mean()
        elif cfg.architecture == "jumprelu" and coefficient:
            extra = coefficient * _JumpReLUL0.apply(pre, sae.threshold, cfg.jumprelu_bandwidth).sum(-1).mean()
        elif cfg.architecture in ("topk", "batchtopk"):
            extra = self._aux_k_loss(pre, (target - out).detach(), norms, stats, scale)
        if extra is not None:
            loss = loss + extra

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            if s.unit_norm_decoder:
                sae.W_dec.grad -= (sae.W_dec.grad * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec
            if s.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), s.max_grad_norm)
            self.optimizer.step()
            if s.unit_norm_decoder:
                sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
            if cfg.architecture == "jumprelu":
                sae.threshold.clamp_(min=0.0)
            elif cfg.architecture == "batchtopk":
                sae.update_threshold(acts, momentum=s.threshold_momentum)
            self.tokens_since_fired = torch.where(fired, 0, self.tokens_since_fired + len(batch))
        self.step += 1
        self.tokens += len(batch)
        if self.step % s.log_every and self.step != s.steps:
            return None
        with torch.no_grad():
            residual_variance = (out - target).pow(2).sum()
            total_variance = (target - target.mean(0)).pow(2).sum()
            entry = {
                "step": self.step,
                "tokens": self.tokens,
                "loss": loss.item(),
                "mse": mse.item(),
                "sparsity_loss" if cfg.architecture in ("standard", "jumprelu") else "aux_k_loss":
                    0.0 if extra is None else extra.item(),
                "l0": l0.float().mean().item(),
                "explained_variance": (1 - residual_variance / total_variance).item(),
                "dead_fraction": (self.tokens_since_fired >= s.dead_after_tokens).float().mean().item(),
                "lr": lr,
            }
            if cfg.architecture in ("standard", "jumprelu"):
                entry["sparsity_coefficient"] = coefficient
            if k is not None:
                entry["k"] = k
        self.log.append(entry)
        return entry

    # -------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores besides the SAE's weights."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "log": list(self.log),
            "settings": self.settings.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
        self.log = list(state["log"])


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_folder(checkpoint_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` goes: ``<checkpoint_dir>/step_00000200``."""
    return Path(checkpoint_dir) / f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """The complete checkpoints in ``checkpoint_dir``, oldest first."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)
             and (p / TRAINER_STATE_FILENAME).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(trainer: SAETrainer, folder: str | Path, buffer: ActivationBuffer | None = None) -> Path:
    """Write a training checkpoint atomically: a SAELens folder plus the trainer's and the buffer's state.

    The folder appears under its name only once every file is written, so a run killed while
    saving leaves the previous checkpoint as the latest.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.parent / f".{folder.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    save_sae(trainer.sae, temporary, fold_scaling_factor=False)
    try:
        state = {"version": _STATE_VERSION, **trainer.state_dict()}
        if buffer is not None:
            tensors, state["buffer"] = buffer.state()
            if tensors:
                save_file({name: t.cpu() for name, t in tensors.items()}, str(temporary / BUFFER_FILENAME))
        torch.save(state, temporary / TRAINER_STATE_FILENAME)
        install_folder(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return folder


def _resume_folder(resume: str | Path) -> Path:
    path = Path(resume)
    if (path / TRAINER_STATE_FILENAME).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise FileNotFoundError(
        f"resume={str(resume)!r} is neither a training checkpoint (a folder with {TRAINER_STATE_FILENAME}) nor a "
        f"checkpoint_dir holding {CHECKPOINT_PREFIX}* checkpoints."
    )


_SAME_FIELDS = ("d_in", "d_sae", "d_out", "architecture", "k", "hook_name", "hook_name_out", "token_selection",
                "normalize_activations", "reshape_activations", "rescale_acts_by_decoder_norm")


def _load_checkpoint(folder: Path, given: SAEConfig | SAE | None, device: torch.device
                     ) -> tuple[SAE, dict[str, Any], dict[str, Tensor]]:
    sae = load_sae(folder, device=device).train()
    state = torch.load(folder / TRAINER_STATE_FILENAME, map_location=device, weights_only=True)
    if state.get("version") != _STATE_VERSION:
        raise ValueError(f"{folder} holds trainer state version {state.get('version')!r}; this vit_lens reads "
                         f"version {_STATE_VERSION}.")
    if given is not None:
        given_cfg = given.cfg if isinstance(given, SAE) else given
        differ = [name for name in _SAME_FIELDS if getattr(given_cfg, name) != getattr(sae.cfg, name)]
        if differ:
            pairs = ", ".join(f"{name}: {getattr(given_cfg, name)!r} vs {getattr(sae.cfg, name)!r}" for name in differ)
            raise ValueError(
                f"The SAE passed does not match the checkpoint {folder} ({pairs}); pass the same config, or None "
                "to take the checkpoint's."
            )
    buffer_tensors = {}
    if (folder / BUFFER_FILENAME).is_file():
        from safetensors.torch import load_file

        buffer_tensors = load_file(str(folder / BUFFER_FILENAME), device=str(device))
    return sae, state, buffer_tensors


def _check_same_data(settings: TrainingSettings, saved: dict[str, Any], folder: Path) -> None:
    differ = [name for name in _DATA_SETTINGS if saved[name] != getattr(settings, name)]
    if differ:
        pairs = ", ".join(f"{name}={saved[name]!r} (now {getattr(settings, name)!r})" for name in differ)
        raise ValueError(f"{folder} was trained with {pairs}; resume with the same values to continue the same run.")


# ---------------------------------------------------------------------------------------------- the public functions


def _fresh_sae(cfg_or_sae: Any, seed: int) -> tuple[SAE, bool]:
    """``(sae, fresh)``: a new SAE from a config (initialised with ``seed``), or the SAE given."""
    if isinstance(cfg_or_sae, SAE):
        return cfg_or_sae, False
    if isinstance(cfg_or_sae, dict):
        cfg_or_sae = SAEConfig(**cfg_or_sae)
    if not isinstance(cfg_or_sae, SAEConfig):
        raise TypeError(
            f"cfg_or_sae must be an SAEConfig (train a new SAE), an SAE (continue training it) or None with resume=, "
            f"got a {type(cfg_or_sae).__name__}"
        )
    cfg = dataclasses.replace(cfg_or_sae, metadata=dict(cfg_or_sae.metadata))
    return SAE(cfg).init_weights(seed=seed), True


@torch.no_grad()
def prepare_from_activations(sae: SAE, rows: Tensor, fresh: bool) -> None:
    """Before training: estimate the input scaling factor and, for a fresh SAE, start ``b_dec`` at the mean.

    ``expected_average_only_in`` SAEs without a scaling factor get ``sqrt(d_in) / mean ||x||``
    (SAELens's estimate). A fresh SAE's ``b_dec`` starts at the mean of what it rebuilds, in its
    normalised space (an SAE: its input; a transcoder: its target).
    """
    cfg = sae.cfg
    rows = rows.to(sae.W_enc.device, sae.W_enc.dtype)
    x = rows[:, :cfg.d_in]
    if cfg.normalize_activations == "expected_average_only_in" and sae.scaling_factor is None:
        sae.scaling_factor = float(cfg.d_in**0.5 / x.norm(dim=-1).mean())
    if fresh:
        target = rows[:, cfg.d_in:] if cfg.is_transcoder else x
        sae.b_dec.copy_(sae._normalise(target, sae._normalisation(x)).mean(0))


def _train_loop(trainer: SAETrainer, batches: Iterator[Tensor], *, buffer: ActivationBuffer | None,
                checkpoint_dir: str | Path | None, checkpoint_every: int | None, keep_checkpoints: int | None,
                show_progress: bool) -> None:
    steps = trainer.settings.steps
    bar = progress_bar(total=steps, initial=trainer.step, desc=f"train SAE {trainer.sae.cfg.hook_name}", unit="step",
                       enabled=show_progress)
    last_saved = None
    with bar:
        while trainer.step < steps:
            try:
                batch = next(batches)
            except StopIteration:
                if trainer.step == 0:
                    raise ValueError(
                        f"The activations ran out before one batch of {trainer.settings.batch_size_tokens} rows: give "
                        "more images (or a smaller batch_size_tokens)."
                    ) from None
                warnings.warn(
                    f"The images ran out after {trainer.step} of {steps} steps (a one-pass iterator cannot be read "
                    "again); the SAE is returned as trained so far. Pass a list, a tensor or a DataLoader to train "
                    "for several passes.",
                    stacklevel=3,
                )
                break
            entry = trainer.train_step(batch)
            bar.update(1)
            if entry is not None:
                bar.set_postfix(loss=f"{entry['loss']:.4g}", l0=f"{entry['l0']:.1f}",
                                ev=f"{entry['explained_variance']:.3f}", refresh=False)
            if checkpoint_dir is not None and (trainer.step == steps or (
                    checkpoint_every and trainer.step % checkpoint_every == 0)):
                save_checkpoint(trainer, checkpoint_folder(checkpoint_dir, trainer.step), buffer)
                last_saved = trainer.step
                if keep_checkpoints is not None:
                    for old in list_checkpoints(checkpoint_dir)[:-keep_checkpoints]:
                        shutil.rmtree(old)
    if checkpoint_dir is not None and last_saved != trainer.step:
        save_checkpoint(trainer, checkpoint_folder(checkpoint_dir, trainer.step), buffer)


def _check_checkpointing(checkpoint_dir: Any, checkpoint_every: Any, keep_checkpoints: Any) -> None:
    if checkpoint_every is not None:
        _positive_int("checkpoint_every", checkpoint_every)
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir, the folder the checkpoints go to.")
    if keep_checkpoints is not None:
        _positive_int("keep_checkpoints", keep_checkpoints)


def _finish(sae: SAE, trainer: SAETrainer, model_name: str | None) -> SAE:
    if sae.cfg.model_name is None:
        sae.cfg.model_name = model_name
    sae.cfg.metadata.update(training_steps=trainer.step, training_tokens=trainer.tokens)
    return sae.eval()


def train_sae(
    model: Any,
    cfg_or_sae: Any,  # an SAEConfig, SAE, dict or None; checked with a directed message
    images: Any,
    *,
    steps: int,
    batch_size_tokens: int = 4096,
    buffer_tokens: int | None = None,
    token_mask: TokenMask | None = None,
    image_batch_size: int = 64,
    device: str | torch.device | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    **hyperparameters: Any,
) -> tuple[SAE, list[dict[str, Any]]]:
    """Train an SAE (or a transcoder) on the activations of ``model`` at ``cfg.hook_name``, streamed from ``images``.

    Args:
        model: A HookedViT, or a HookedCLIP (its image tower runs); it is not changed.
        cfg_or_sae: An :class:`~vit_lens.sae.SAEConfig` (a new SAE, initialised with ``seed``, its
            ``b_dec`` started at the activations' mean), an :class:`~vit_lens.sae.SAE` (trained
            further, in place), or None with ``resume``. Its ``hook_name`` (and ``hook_name_out``
            for a transcoder) and ``token_selection`` say what it trains on.
        images: Batches of images as the model takes them: a DataLoader (``(images, labels)``
            items are fine), a list, a generator, ToyBatch objects, or one tensor ``[n, C, H, W]``
            split into ``image_batch_size`` batches. Read again when it runs out, where it can be
            (a generator cannot: training then stops early with a warning).
        steps: Optimiser steps.
        batch_size_tokens: Activation rows (tokens) per step.
        buffer_tokens: Rows the shuffling buffer holds (default 16 batches); see :class:`ActivationBuffer`.
        token_mask: Narrows the SAE's ``token_selection`` further: a function
            ``(activations [batch, pos, width], images) -> bool [batch, pos]`` (or ``[pos]``).
        image_batch_size: Images per forward pass when ``images`` is a tensor.
        device: Where the SAE trains (default: the model's device).
        checkpoint_dir: Folder for checkpoints (``step_00000200``, ...); the final state is saved there too.
        checkpoint_every: Save a checkpoint every this many steps.
        keep_checkpoints: Keep only the latest this many checkpoints (default: all).
        resume: A checkpoint folder, or a ``checkpoint_dir`` (its latest checkpoint): continue that
            run. Pass the same ``images`` and arguments; the result equals the uninterrupted run's.
        progress: Show a progress bar with the loss, L0 and explained variance.
        **hyperparameters: ``lr``, ``l1_coefficient``, ``aux_k_coefficient``, ``seed``, ... as
            :func:`build_settings` takes them.

    Returns:
        ``(sae, log)``: the trained SAE in eval mode, and one dict per logged step (``step``,
        ``tokens``, ``loss``, ``mse``, ``l0``, ``explained_variance``, ``dead_fraction``, ``lr``, ...).

    Raises:
        ValueError: a hook point the model lacks, a width that does not match the activations,
            no images, fewer activations than one batch, or a checkpoint of another SAE.
    """
    tower = image_tower(model)
    device = torch.device(device) if device is not None else tower.embed.W_E.device
    _check_checkpointing(checkpoint_dir, checkpoint_every, keep_checkpoints)
    seed = hyperparameters.get("seed", 0)
    if resume is not None:
        folder = _resume_folder(resume)
        sae, state, buffer_tensors = _load_checkpoint(folder, cfg_or_sae, device)
        fresh = False
    else:
        if cfg_or_sae is None:
            raise TypeError("cfg_or_sae is None: pass an SAEConfig or an SAE, or resume= a checkpoint.")
        sae, fresh = _fresh_sae(cfg_or_sae, seed)
    settings = build_settings(sae, steps=steps, batch_size_tokens=batch_size_tokens, buffer_tokens=buffer_tokens,
                              **hyperparameters)
    source = ActivationSource(tower, sae, images, token_mask=token_mask, image_batch_size=image_batch_size)
    trainer = SAETrainer(sae, settings, device)
    generator = torch.Generator().manual_seed(settings.seed)
    if resume is not None:
        _check_same_data(settings, state["settings"], folder)
        trainer.load_state_dict(state)
        buffer = ActivationBuffer(source.chunks(skip=state["buffer"]["chunks_consumed"]),
                                  buffer_tokens=settings.buffer_tokens, batch_size_tokens=settings.batch_size_tokens, generator=generator, device=device)
        buffer.load_state(buffer_tensors, state["buffer"])
    else:
        buffer = ActivationBuffer(source.chunks(), buffer_tokens=settings.buffer_tokens,
                                  batch_size_tokens=settings.batch_size_tokens, generator=generator, device=device)
        prepare_from_activations(sae, buffer.fill(), fresh)
    _train_loop(trainer, buffer, buffer=buffer, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                keep_checkpoints=keep_checkpoints, show_progress=progress)
    return _finish(sae, trainer, tower.cfg.model_name), trainer.log


def train_transcoder(model: Any, cfg_or_sae: Any, images: Any, **kwargs: Any
                     ) -> tuple[SAE, list[dict[str, Any]]]:
    """:func:`train_sae` for a transcoder: ``cfg.hook_name`` is read, ``cfg.hook_name_out`` predicted.

    Raises:
        ValueError: the config is not a transcoder's (no ``hook_name_out``, or the same as ``hook_name``).
    """
    cfg = cfg_or_sae.cfg if isinstance(cfg_or_sae, SAE) else cfg_or_sae
    if isinstance(cfg, dict):
        cfg = SAEConfig(**cfg)
    if cfg is not None and not cfg.is_transcoder:
        raise ValueError(
            f"train_transcoder trains a transcoder: set hook_name_out (the hook point it predicts) as well as "
            f"hook_name ({cfg.hook_name!r}); for an SAE use train_sae."
        )
    return train_sae(model, cfg_or_sae, images, **kwargs)


def _tensor_batches(rows: Tensor, batch_size: int, start_step: int) -> Iterator[Tensor]:
    """Consecutive batches of ``rows``, wrapping around, starting where step ``start_step`` starts."""
    n = len(rows)
    position = (start_step * batch_size) % n
    while True:
        end = position + batch_size
        yield rows[position:end] if end <= n else torch.cat([rows[position:], rows[:end - n]])
        position = end % n


def train_sae_on_activations(
    cfg_or_sae: Any,  # an SAEConfig, SAE, dict or None; checked with a directed message
    activations: Tensor | ShardedRows | Iterable[Tensor | tuple[Tensor, Tensor]],
    *,
    steps: int,
    targets: Tensor | ShardedRows | None = None,
    batch_size_tokens: int = 4096,
    buffer_tokens: int | None = None,
    image_batch_size: int = 64,
    device: str | torch.device | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    **hyperparameters: Any,
) -> tuple[SAE, list[dict[str, Any]]]:
    """Train on activations you already have, with :func:`train_sae`'s optimisation loop.

    Args:
        cfg_or_sae: As in :func:`train_sae`.
        activations: A tensor ``[n, d_in]``, read in order in batches of ``batch_size_tokens``
            (wrapping around; shuffle it first if its rows come in image order), or an iterable of
            chunks ``[rows, d_in]`` (a transcoder: ``(inputs, targets)`` pairs) that go through the
            shuffling :class:`ActivationBuffer`, or activations cached by the dataset runner
            (:class:`vit_lens.runner.ShardedRows`, ``RunResult.activations(hook)``, memory-mapped), read
            in image order as chunks of ``image_batch_size`` images
            (:func:`vit_lens.sae.activations.cached_chunks`) into the buffer, again from the first
            image when they run out. The buffer fills row by row, so rows cached with the SAE's
            ``token_selection`` as the recorder's ``tokens`` train the same SAE as :func:`train_sae`
            on the images they came from, in the same order (and with the same batches of images,
            when the forward pass's batch size changes its float rounding).
        steps: Optimiser steps.
        targets: A transcoder's targets beside ``activations``: ``[n, d_out]`` beside a tensor, a
            ``ShardedRows`` of the same images beside cached inputs.
        image_batch_size: Images per chunk read from cached ``ShardedRows`` activations (how much is
            read at once; a checkpoint counts chunks, so resume with the value the run started with).
        device: Where the SAE trains (default: the tensor's device, else the SAE's).
        batch_size_tokens, buffer_tokens, checkpoint_dir, checkpoint_every, keep_checkpoints,
            resume, progress, hyperparameters: As in :func:`train_sae`.

    Returns:
        ``(sae, log)`` as :func:`train_sae`.
    """
    _check_checkpointing(checkpoint_dir, checkpoint_every, keep_checkpoints)
    seed = hyperparameters.get("seed", 0)
    if device is None:
        device = activations.device if isinstance(activations, Tensor) else (
            cfg_or_sae.W_enc.device if isinstance(cfg_or_sae, SAE) else "cpu")
    device = torch.device(device)
    if resume is not None:
        folder = _resume_folder(resume)
        sae, state, buffer_tensors = _load_checkpoint(folder, cfg_or_sae, device)
        fresh = False
    else:
        if cfg_or_sae is None:
            raise TypeError("cfg_or_sae is None: pass an SAEConfig or an SAE, or resume= a checkpoint.")
        sae, fresh = _fresh_sae(cfg_or_sae, seed)
    cfg = sae.cfg
    settings = build_settings(sae, steps=steps, batch_size_tokens=batch_size_tokens, buffer_tokens=buffer_tokens,
                              **hyperparameters)
    trainer = SAETrainer(sae, settings, device)
    if resume is not None:
        _check_same_data(settings, state["settings"], folder)
        trainer.load_state_dict(state)
    width = cfg.d_in + (cfg.d_out if cfg.is_transcoder else 0)
    buffer = None
    skip = state["buffer"]["chunks_consumed"] if resume is not None and not isinstance(activations, Tensor) else 0
    if isinstance(activations, ShardedRows):
        if cfg.is_transcoder != (targets is not None):
            raise ValueError("A transcoder trains on cached inputs and targets: pass targets=RunResult.activations("
                             "hook_name_out) beside them" if cfg.is_transcoder else
                             "targets= is for transcoders (SAEConfig.hook_name_out set); an SAE rebuilds its input.")
        chunks = cached_chunks(activations, cfg.d_in, image_batch_size, targets=targets,
                               target_width=cfg.d_out if cfg.is_transcoder else None, skip=skip)
    elif isinstance(activations, Tensor):
        if cfg.is_transcoder:
            if targets is None or len(targets) != len(activations):
                raise ValueError(f"A transcoder trains on inputs and targets: pass targets=[n, {cfg.d_out}] beside the "
                                 "activations, one row each.")
            activations = torch.cat([activations, targets], dim=-1)
        elif targets is not None:
            raise ValueError("targets= is for transcoders (SAEConfig.hook_name_out set); an SAE rebuilds its input.")
        if activations.ndim != 2 or activations.shape[1] != width:
            raise ValueError(f"activations must be [n, {width}] for this SAE (d_in={cfg.d_in}"
                             + (f", plus d_out={cfg.d_out} of targets" if cfg.is_transcoder else "")
                             + f"), got shape {tuple(activations.shape)}")
        if len(activations) < settings.batch_size_tokens:
            raise ValueError(f"activations has {len(activations)} rows, fewer than one batch of "
                             f"{settings.batch_size_tokens}.")
        if resume is None:
            prepare_from_activations(sae, activations[:settings.buffer_tokens], fresh)
        batches = _tensor_batches(activations, settings.batch_size_tokens, trainer.step)
    else:
        if isinstance(activations, (str, bytes)) or not isinstance(activations, Iterable):
            raise TypeError(f"activations must be a tensor [n, {width}] or an iterable of chunks, got a "
                            f"{type(activations).__name__}")
        chunks = (torch.cat(chunk, dim=-1) if isinstance(chunk, (tuple, list)) else chunk for chunk in activations)
        for _ in range(skip):
            next(chunks)
    if not isinstance(activations, Tensor):
        buffer = ActivationBuffer(chunks, buffer_tokens=settings.buffer_tokens,
                                  batch_size_tokens=settings.batch_size_tokens,
                                  generator=torch.Generator().manual_seed(settings.seed), device=device)
        if resume is not None:
            buffer.load_state(buffer_tensors, state["buffer"])
        else:
            first = buffer.fill()
            if len(first) == 0:
                raise ValueError("activations yielded no rows: there is nothing to train on.")
            if first.shape[1] != width:
                raise ValueError(f"Activation chunks must have {width} columns for this SAE, got {first.shape[1]}.")
            prepare_from_activations(sae, first, fresh)
        batches = buffer
    _train_loop(trainer, batches, buffer=buffer, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                keep_checkpoints=keep_checkpoints, show_progress=progress)
    model_name = activations.result.settings["model"] if isinstance(activations, ShardedRows) else cfg.model_name
    return _finish(sae, trainer, model_name), trainer.log
