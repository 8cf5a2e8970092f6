"""Beyond CLIP: read any ViT's components through linear maps into a CLIP space (Balasubramanian et al. 2024).

Balasubramanian, Basu and Feizi (NeurIPS 2024) interpret the components of ViTs that have no text
encoder (DeiT, DINO, DINOv2, ...) in three steps; this module does each one on top of
:func:`vit_lens.intervene.decompose.direct_contributions`:

1. **Decompose** the model's final representation into per-component terms ``c_i`` (embedding,
   heads, MLPs), exactly as for CLIP. :func:`alignment_data` does it for a set of images and
   encodes the same images with a CLIP model, the target space.
2. **CompAlign**: one linear map per component and a shared bias (:class:`ComponentAligner`),
   ``f_i(c_i) = c_i W_i + b / C`` (the bias split equally over the ``C`` components, as the
   public code does), trained by :func:`train_aligner` so that the aligned sum
   ``z = sum_i f_i(c_i)`` points where the CLIP image embedding of the same image points:

       loss = mean_batch(1 - cos(z, clip_image)) + lambda * sum_i ||W_i^T W_i - I||_F^2 / (C * d_clip)

   ``lambda`` is ``orthonormality`` (the code's ``lambda * d_clip * mean_{i,a,b}(...)^2`` written
   out). The penalty keeps every map close to an isometry, so that the geometry of a component's
   terms (which directions vary, by how much) survives the map and the maps cannot trade scale
   between components. Adam, minibatches, early stopping on a held-out split, a tqdm bar; the
   maps are saved and loaded as safetensors.
3. **Component scores** (:func:`component_scores`): a property (``"colour"``) is a few text
   descriptions, encoded by the CLIP text tower (:func:`property_embeddings`) and orthonormalised
   by QR (:func:`property_basis`, Gram-Schmidt in the order given: ``b_1, ..., b_k``). Then

       score_i(p) = (1/k) sum_j Corr_images(<f_i(c_i), b_j>, <z, b_j>)

   the mean over the basis of the Pearson correlation, across images, between the component's
   aligned term and the whole aligned representation projected on ``b_j``: how much of the
   representation's variation along the property the component carries. Ranking components by
   it finds the heads of a property; the property-specific score ``score_p - max_{q != p} score_q``
   (:meth:`ComponentScores.specific`) finds heads that carry ``p`` and nothing else scored.

On top of the maps: TextSpan on aligned terms (:func:`interpret_components`), property-based
retrieval (:func:`nearest_by_property`; text-based retrieval is
:func:`vit_lens.methods.textspan.retrieval.nearest_by_text` on ``aligner.align(contributions)``), and mean-ablation of
the top components of a spurious property, on stored terms
(:func:`vit_lens.methods.textspan.spurious.mean_ablate_components` with :meth:`ComponentScores.mask`) or in the
forward pass (:func:`mean_ablation_hooks`).

Where this differs from the public code (``helpers/model_utils.py``, ``helpers/decompose_utils.py``
of ``SriramB-98/vit-decompose``; nothing of it is copied here):

* Early stopping there watches the *training* batch loss (stop after 50 batches without a new
  minimum) and keeps the last weights. The default here watches the loss on a held-out split every
  ``eval_every`` batches and restores the best weights; :data:`PAPER_SETTINGS` gives the code's
  rule (``validation=None, eval_every=1, patience=50, restore_best=False``).
* The score there mixes a biased covariance with unbiased standard deviations, so its values are
  this module's times ``(N - 1) / N``; rankings are identical. A component whose projection does
  not vary (a constant ``"bias"`` term) scores 0 here instead of NaN.
* Decomposition: vit-decompose walks the autograd graph and splits LayerNorm and linear biases
  equally over the terms; vit_lens uses hooks, and ``ln_mode="paper"`` (the default of
  :func:`alignment_data`) is the same equal split. Layer-level names are vit_lens's (``L0`` is the
  first block; their ``layer:00`` is the last).
* Property descriptions: the paper averages 80 prompt templates per description;
  :func:`property_embeddings` does when given ``templates`` (``None``: open_clip's 80 ImageNet
  ones), or takes the descriptions as they are with ``templates=["{}"]``.
"""

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from vit_lens.intervene.decompose import Contributions, direct_contributions, required_hooks
from vit_lens.methods.textspan.retrieval import ComponentSource, Retrieval, nearest_by_components
from vit_lens.model.hooked_vit import image_tower
from vit_lens.utils.progress import progress as progress_bar

_FORMAT = "vit_lens.ComponentAligner/1"
_CONSTANT_LABELS = ("bias",)  # terms that do not vary across images (center_each mode's bias term)
_BLOCK_BYTES = 64 * 2**20  # contiguous rows read from a ContributionStore at a time while training
_LABEL = re.compile(r"^L(\d+)(?:(ATTN)|(MLP)|H(\d+)(T\d+)?|N(\d+))$")

PAPER_SETTINGS: dict[str, Any] = {
    "validation": None, "eval_every": 1, "patience": 50, "restore_best": False, "batch_size": 32,
    "epochs": 2, "lr": 3e-4, "weight_decay": 1e-6, "orthonormality": 1.0,
}
"""The public code's training settings, for ``train_aligner(..., **PAPER_SETTINGS)``."""


# ---------------------------------------------------------------------------------------------- the maps


class ComponentAligner(nn.Module):
    """One linear map per component into a CLIP image-embedding space, and a shared bias.

    ``aligner(x)[:, i] = x[:, i] @ weight[i] + bias / C``; the aligned terms sum to
    ``sum_i x[:, i] @ weight[i] + bias`` (:meth:`aligned_sum`).

    Attributes:
        weight: ``[component, d_in, d_clip]`` parameter.
        bias: ``[d_clip]`` parameter.
        labels: Component labels, as :attr:`vit_lens.intervene.decompose.Contributions.labels`.

    Example:
        >>> aligner = ComponentAligner(["embed", "L0H0", "L0MLP"], d_in=8, d_clip=4, seed=0)
        >>> x = torch.randn(5, 3, 8)
        >>> aligner(x).shape, torch.allclose(aligner(x).sum(1), aligner.aligned_sum(x), atol=1e-6)
        (torch.Size([5, 3, 4]), True)
    """

    def __init__(self, labels: Sequence[str], d_in: int, d_clip: int, *, init_scale: float = 0.02, seed: int | None = 0):
        super().__init__()
        labels = list(labels)
        if not labels or len(set(labels)) != len(labels) or not all(isinstance(label, str) for label in labels):
            raise ValueError(f"labels must be a non-empty list of distinct strings (Contributions.labels), got {labels!r}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in (d_in, d_clip)):
            raise ValueError(f"d_in and d_clip must be positive ints, got {d_in!r} and {d_clip!r}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.labels = labels
        self.metadata: dict[str, Any] = {}  # what load() read from the file's user metadata
        # N(0, init_scale^2) entries, as the public code's torch.randn(...) * 0.02
        self.weight = nn.Parameter(init_scale * torch.randn(len(labels), d_in, d_clip, generator=generator))
        self.bias = nn.Parameter(init_scale * torch.randn(d_clip, generator=generator))

    @classmethod
    def from_weights(
        cls, labels: Sequence[str], weight: Float[Tensor, "component d_in d_clip"], bias: Float[Tensor, " d_clip"]
    ) -> "ComponentAligner":
        """An aligner with given maps (copied).

        Example:
            >>> identity = ComponentAligner.from_weights(["a", "b"], torch.eye(3).repeat(2, 1, 1), torch.zeros(3))
            >>> identity.d_in, identity.d_clip
            (3, 3)
        """
        if weight.ndim != 3 or bias.shape != (weight.shape[-1],) or weight.shape[0] != len(labels):
            raise ValueError(
                f"weight must be [component={len(labels)}, d_in, d_clip] and bias [d_clip]; got "
                f"{tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        aligner = cls(labels, weight.shape[1], weight.shape[2], seed=None)
        with torch.no_grad():
            aligner.weight.copy_(weight)
            aligner.bias.copy_(bias)
        return aligner.to(weight.device)

    @classmethod
    def identity(cls, labels: Sequence[str], d: int) -> "ComponentAligner":
        """Identity maps and zero bias: for the CLIP model itself, whose terms already live in its space."""
        return cls.from_weights(labels, torch.eye(d).repeat(len(labels), 1, 1), torch.zeros(d))

    @property
    def d_in(self) -> int:
        """Width of the components' terms (the model's representation width)."""
        return self.weight.shape[1]

    @property
    def d_clip(self) -> int:
        """Width of the CLIP image embedding."""
        return self.weight.shape[2]

    def forward(self, contributions: Float[Tensor, "batch component d_in"]) -> Float[Tensor, "batch component d_clip"]:
        """Each component's aligned term ``x_i W_i + b / C``."""
        self._check(contributions)
        x = contributions.to(self.weight)
        return torch.einsum("bci,cio->bco", x, self.weight) + self.bias / len(self.labels)

    def aligned_sum(self, contributions: Float[Tensor, "batch component d_in"]) -> Float[Tensor, "batch d_clip"]:
        """The aligned representation ``sum_i x_i W_i + b`` (without forming the per-component terms)."""
        self._check(contributions)
        x = contributions.to(self.weight)
        # one [batch, C * d_in] x [C * d_in, d_clip] product: the sum over components is the contraction
        return x.reshape(len(x), -1) @ self.weight.reshape(-1, self.d_clip) + self.bias

    def align(self, contributions: Any) -> Any:
        """Aligned terms of a ``[batch, component, d_in]`` tensor or of a :class:`Contributions`.

        A :class:`Contributions` comes back as a :class:`Contributions` with the same labels and
        indices and ``values`` in the CLIP space, so every vit_lens analysis of terms (TextSpan,
        retrieval, spurious-cue ablations) runs on it unchanged. For a
        :class:`~vit_lens.intervene.store.ContributionStore`, align one component at a time
        (:meth:`align_component`) or use :func:`component_scores` / :func:`interpret_components`,
        which stream.

        Example:
            >>> aligned = aligner.align(parts)  # doctest: +SKIP
            >>> vit_lens.methods.textspan.retrieval.nearest_by_text(aligned, "L11H3", clip.encode_text("a red car"))  # doctest: +SKIP
        """
        if isinstance(contributions, Contributions):
            if list(contributions.labels) != self.labels:
                raise ValueError(_label_mismatch(contributions.labels, self.labels))
            with torch.no_grad():
                return replace(contributions, values=self(contributions.values), _index={})
        if isinstance(contributions, Tensor):
            with torch.no_grad():
                return self(contributions)
        raise TypeError(
            f"align takes a [batch, component, d_in] tensor or a Contributions, got {type(contributions).__name__}; "
            "for a ContributionStore use align_component or component_scores / interpret_components"
        )

    def align_component(self, values: Float[Tensor, "batch d_in"], component: str | int) -> Float[Tensor, "batch d_clip"]:
        """One component's aligned term ``x W_i + b / C`` from its ``[batch, d_in]`` terms."""
        index = self.index(component)
        if values.shape[-1] != self.d_in:
            raise ValueError(f"values must be [batch, d_in={self.d_in}], got {tuple(values.shape)}")
        with torch.no_grad():
            return values.to(self.weight) @ self.weight[index] + self.bias / len(self.labels)

    def index(self, component: str | int) -> int:
        """The position of a component, by label or index."""
        if isinstance(component, int) and not isinstance(component, bool):
            if not -len(self.labels) <= component < len(self.labels):
                raise IndexError(f"component {component} out of range for {len(self.labels)} components")
            return component % len(self.labels)
        if component not in self.labels:
            raise KeyError(f"No component {component!r}; this aligner maps {self.labels[:3]} ... {self.labels[-2:]}")
        return self.labels.index(component)

    def orthonormality_penalty(self) -> Float[Tensor, ""]:
        """``sum_i ||W_i^T W_i - I||_F^2 / (C * d_clip)``: zero when every map has orthonormal columns.

        When ``d_in < d_clip`` the columns cannot be orthonormal; the penalty is then smallest
        (``(d_clip - d_in) / d_clip``) for maps with orthonormal rows. The smaller Gram matrix is
        formed, using ``||W^T W - I_o||^2 = ||W W^T - I_i||^2 + (o - i)``.
        """
        w = self.weight
        n_components, d_in, d_clip = w.shape
        if d_in >= d_clip:
            gram, size, excess = w.transpose(1, 2) @ w, d_clip, 0
        else:
            gram, size, excess = w @ w.transpose(1, 2), d_in, d_clip - d_in
        eye = torch.eye(size, device=w.device, dtype=w.dtype)
        return ((gram - eye).square().sum() + n_components * excess) / (n_components * d_clip)

    def save(self, path: str | Path, metadata: Mapping[str, Any] | None = None) -> None:
        """Write the maps to a safetensors file; ``metadata`` (JSON-serialisable) is stored with them.

        Example:
            >>> aligner.save("deit_to_clip.safetensors", {"model": "timm:deit_base_patch16_224"})  # doctest: +SKIP
            >>> aligner = ComponentAligner.load("deit_to_clip.safetensors")  # doctest: +SKIP
        """
        from safetensors.torch import save_file

        tensors = {"weight": self.weight.detach().contiguous().cpu(), "bias": self.bias.detach().contiguous().cpu()}
        info = {
            "format": _FORMAT, "labels": json.dumps(self.labels), "d_in": str(self.d_in), "d_clip": str(self.d_clip),
            "user": json.dumps(dict(metadata or {})),
        }
        save_file(tensors, str(path), metadata=info)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "ComponentAligner":
        """Read maps written by :meth:`save`; :attr:`metadata` holds what was saved with them."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as file:
            info = file.metadata() or {}
            if info.get("format") != _FORMAT:
                raise ValueError(
                    f"{path} is not a file written by ComponentAligner.save (its metadata format is "
                    f"{info.get('format')!r}, expected {_FORMAT!r})"
                )
            aligner = cls.from_weights(json.loads(info["labels"]), file.get_tensor("weight"), file.get_tensor("bias"))
        aligner.metadata = json.loads(info.get("user", "{}"))
        return aligner

    def extra_repr(self) -> str:
        return f"components={len(self.labels)}, d_in={self.d_in}, d_clip={self.d_clip}"

    def _check(self, contributions: Tensor) -> None:
        if contributions.ndim != 3 or contributions.shape[1:] != (len(self.labels), self.d_in):
            raise ValueError(
                f"contributions must be [batch, component={len(self.labels)}, d_in={self.d_in}], got "
                f"{tuple(contributions.shape)}"
            )


# ---------------------------------------------------------------------------------------------- training


@dataclass
class AlignmentFit:
    """The result of :func:`train_aligner`.

    Attributes:
        aligner: The trained maps (the best ones seen, with ``restore_best``).
        history: One dict per check: ``step`` (batches so far), ``epoch``, ``train_loss`` and
            ``train_cosine`` (means over the batches since the previous check), ``penalty``,
            and ``val_loss`` / ``val_cosine`` when there is a validation split.
        stopped_early: Whether ``patience`` checks passed without improvement.
        best_step: The step of the best monitored loss.
        steps: Batches trained.
        validation_cosine: Mean cosine between the aligned sum and the CLIP embedding on the
            validation images, for the returned maps (None without a validation split).
    """

    aligner: ComponentAligner
    history: list[dict[str, float | int]]
    stopped_early: bool
    best_step: int
    steps: int
    validation_cosine: float | None = None

    def report(self) -> str:
        """One line: steps, why training stopped, and the final losses."""
        last = self.history[-1] if self.history else {}
        why = "early stop" if self.stopped_early else "all epochs"
        val = f", validation cosine {self.validation_cosine:.4f}" if self.validation_cosine is not None else ""
        return (f"{self.steps} steps ({why}; best at step {self.best_step}), train cosine "
                f"{last.get('train_cosine', float('nan')):.4f}, penalty {last.get('penalty', float('nan')):.4g}{val}")


def train_aligner(
    contributions: Any,
    targets: Any,
    *,
    labels: Sequence[str] | None = None,
    aligner: ComponentAligner | None = None,
    validation: float | int | None = 0.1,
    batch_size: int = 32,
    epochs: int = 2,
    lr: float = 3e-4,
    weight_decay: float = 1e-6,
    orthonormality: float = 1.0,
    eval_every: int | None = None,
    patience: int = 5,
    min_delta: float = 0.0,
    restore_best: bool = True,
    seed: int = 0,
    device: Any = None,
    progress: bool = True,
) -> AlignmentFit:
    """Fit one linear map per component (and a shared bias) so the aligned sum matches CLIP (CompAlign).

    Minimises ``mean(1 - cos(sum_i c_i W_i + b, target)) + orthonormality * penalty`` (module
    docstring) with Adam over shuffled minibatches. Every ``eval_every`` batches the monitored
    loss (validation loss, or without a validation split the mean training loss since the last
    check) is compared with the best so far; after ``patience`` checks without an improvement
    larger than ``min_delta`` training stops.

    Args:
        contributions: ``[image, component, d_in]`` tensor (with ``labels``), a
            :class:`~vit_lens.intervene.decompose.Contributions`, or a
            :class:`~vit_lens.intervene.store.ContributionStore` (read in contiguous blocks of about 64 MB,
            shuffled by block and within blocks, so it never has to fit in memory).
        targets: ``[image, d_clip]`` CLIP image embeddings of the same images, in the same order
            (normalised or not: the loss is a cosine). A tensor built on a memory-mapped array
            (``torch.from_numpy(np.load(path, mmap_mode="r"))``) is read batch by batch.
        labels: Component labels of a plain tensor (default ``"#0"``, ``"#1"``, ...).
        aligner: Maps to start from (default: new ones, ``N(0, 0.02^2)`` as the public code).
        validation: Images held out for early stopping: a fraction in (0, 1) or a count, drawn at
            random (seeded); None or 0 watches the training loss instead. The held-out terms are
            kept in memory: ``n_val * component * d_in * 4`` bytes, so give a count (a few
            thousand) for a large store.
        batch_size, epochs, lr, weight_decay: Adam settings (the public code: 32, 2, 3e-4, 1e-6).
        orthonormality: Weight of the orthonormality penalty (the public code: 1.0).
        eval_every: Batches between checks (default: 50, or one epoch when that is shorter).
        patience: Checks without improvement before stopping.
        min_delta: The improvement that counts.
        restore_best: Return the maps of the best check instead of the last ones.
        seed: Seeds the initial maps, the validation split and the shuffling.
        device: Where to train (default: the aligner's, else the tensor's; a store: CPU).
        progress: Show a tqdm progress bar (with the latest losses).

    Returns:
        :class:`AlignmentFit` with the aligner and the training history.

    Example:
        >>> parts, clip_embeds = alignment_data(deit, clip, loader)  # doctest: +SKIP
        >>> fit = train_aligner(parts, clip_embeds, epochs=5, lr=1e-3)  # doctest: +SKIP
        >>> print(fit.report())  # doctest: +SKIP
        >>> fit.aligner.save("deit_to_clip.safetensors")  # doctest: +SKIP
    """
    source = ComponentSource(contributions, labels)
    names = source.labels or [f"#{i}" for i in range(source.n_components)]
    if not isinstance(targets, Tensor) or targets.ndim != 2 or targets.shape[0] != source.n_images:
        raise ValueError(
            f"targets must be an [image={source.n_images}, d_clip] tensor of CLIP image embeddings (one per "
            f"image of contributions, same order), got {_describe(targets)}"
        )
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(epochs, "epochs")
    _check_positive_int(patience, "patience")
    if eval_every is not None:
        _check_positive_int(eval_every, "eval_every")
    if not (lr > 0 and weight_decay >= 0 and orthonormality >= 0 and min_delta >= 0):
        raise ValueError(
            f"need lr > 0 and weight_decay, orthonormality, min_delta >= 0; got {lr}, {weight_decay}, "
            f"{orthonormality}, {min_delta}"
        )
    if aligner is None:
        aligner = ComponentAligner(names, source.d, targets.shape[1], seed=seed)
    elif aligner.labels != names or aligner.d_in != source.d or aligner.d_clip != targets.shape[1]:
        raise ValueError(
            f"aligner= maps {len(aligner.labels)} components {aligner.d_in} -> {aligner.d_clip}; the data have "
            f"{source.n_components} components of width {source.d} and targets of width {targets.shape[1]}"
            + ("" if aligner.labels == names or len(aligner.labels) != len(names) else " (the labels differ)")
        )
    if device is None:
        device = aligner.weight.device if aligner.weight.device.type != "cpu" else source.device
    aligner = aligner.to(device)

    generator = torch.Generator().manual_seed(seed)
    val_index = _validation_index(validation, source.n_images, generator)
    is_train = torch.ones(source.n_images, dtype=torch.bool)
    is_train[val_index] = False
    rows = _Rows(source)
    val_x = rows.read(val_index) if len(val_index) else None
    val_y = targets[val_index] if len(val_index) else None

    n_train = int(is_train.sum())
    per_epoch = math.ceil(n_train / batch_size)
    eval_every = eval_every or min(50, per_epoch)
    optimizer = torch.optim.Adam(aligner.parameters(), lr=lr, weight_decay=weight_decay)
    bar = progress_bar(total=epochs * per_epoch, desc="CompAlign", unit="batch", enabled=progress)

    history: list[dict[str, float | int]] = []
    best, best_step, since_best, step = math.inf, 0, 0, 0
    best_state = None
    stopped = False
    window_loss, window_cos, window_n = 0.0, 0.0, 0
    for epoch in range(epochs):
        for x, index in rows.epoch(is_train, batch_size, generator):
            x = x.to(device, aligner.weight.dtype)
            y = targets[index].to(device, aligner.weight.dtype)
            cosine = F.cosine_similarity(aligner.aligned_sum(x), y, dim=-1).mean()
            penalty = aligner.orthonormality_penalty()
            loss = (1 - cosine) + orthonormality * penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            window_loss, window_cos, window_n = window_loss + loss.item(), window_cos + cosine.item(), window_n + 1
            bar.update()
            if step % eval_every and step != epochs * per_epoch:
                continue
            record = {"step": step, "epoch": epoch, "train_loss": window_loss / window_n,
                      "train_cosine": window_cos / window_n, "penalty": penalty.item()}
            window_loss, window_cos, window_n = 0.0, 0.0, 0
            if val_x is not None:
                record["val_cosine"] = _mean_cosine(aligner, val_x, val_y)
                record["val_loss"] = 1 - record["val_cosine"] + orthonormality * record["penalty"]
            history.append(record)
            monitored = record.get("val_loss", record["train_loss"])
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("train_loss", "val_cosine")})
            if monitored < best - min_delta:
                best, best_step, since_best = monitored, step, 0
                if restore_best:
                    best_state = {k: v.detach().clone() for k, v in aligner.state_dict().items()}
            else:
                since_best += 1
                if since_best >= patience:
                    stopped = True
                    break
        if stopped:
            break
    bar.close()
    if restore_best and best_state is not None:
        aligner.load_state_dict(best_state)
    aligner.eval()
    val_cos = _mean_cosine(aligner, val_x, val_y) if val_x is not None else None
    return AlignmentFit(aligner, history, stopped, best_step, step, val_cos)


@torch.no_grad()
def alignment_data(
    model: Any,
    clip: Any,
    batches: Iterable[Any],
    *,
    level: str = "head",
    layers: list[int] | None = None,
    ln_mode: str = "paper",
    transform: Callable[[Tensor], Tensor] | None = None,
    clip_transform: Callable[[Tensor], Tensor] | None = None,
    progress: bool = True,
) -> tuple[Contributions, Float[Tensor, "image d_clip"]]:
    """Decompose images with ``model`` and embed the same images with ``clip``: training data for the maps.

    Everything is kept in memory; for large sets write the terms with
    :func:`vit_lens.intervene.store.compute_contributions_to_disk` and collect the CLIP embeddings in the
    same order, then pass both to :func:`train_aligner`.

    Args:
        model: The (non-CLIP) ``HookedViT`` to interpret.
        clip: A :class:`vit_lens.HookedCLIP` (or anything with ``encode_image``), the target space.
        batches: Image batches ``[batch, 3, H, W]`` or ``(images, ...)`` tuples.
        level, layers, ln_mode: As :func:`vit_lens.intervene.decompose.direct_contributions` (default: per
            head, LayerNorm mean and bias split equally, as Balasubramanian et al.'s decomposition).
        transform, clip_transform: Applied to each batch before ``model`` / ``clip`` (each model's
            own preprocessing, as the paper does); default: none.
        progress: Show a progress bar.

    Returns:
        ``(contributions, clip_embeddings)``: a :class:`Contributions` over all images and their
        un-normalised CLIP image embeddings ``[image, d_clip]``.

    Example:
        >>> parts, targets = alignment_data(deit, clip, [images])  # doctest: +SKIP
        >>> parts.values.shape, targets.shape  # ([n, components, 384], [n, 512])  # doctest: +SKIP
    """
    model = image_tower(model)
    encode = getattr(clip, "encode_image", None)
    if encode is None:
        raise TypeError(f"clip must have an encode_image method (a vit_lens.HookedCLIP), got {type(clip).__name__}")
    names = required_hooks(model, level, layers)
    parts, embeds = [], []
    for batch in progress_bar(batches, desc="decompose + CLIP", unit="batch", enabled=progress):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(images, Tensor):
            raise TypeError(f"batches must yield image tensors or (images, ...) tuples, got {type(images).__name__}")
        model_images = transform(images) if transform is not None else images
        _, cache = model.run_with_cache(model_images, names_filter=names)
        parts.append(direct_contributions(model, cache, level=level, layers=layers, ln_mode=ln_mode))
        embeds.append(encode(clip_transform(images) if clip_transform is not None else images))
    if not parts:
        raise ValueError("alignment_data got no batches")
    values = torch.cat([p.values for p in parts])
    return replace(parts[0], values=values, _index={}), torch.cat(embeds)


# ---------------------------------------------------------------------------------------------- scores


def property_basis(embeddings: Any) -> Float[Tensor, "k d"]:
    """An orthonormal basis of a property's description embeddings, by QR (Gram-Schmidt in order).

    Row ``j`` is ``embeddings[j]`` with its components along rows ``0..j-1`` removed, normalised
    (signs as the descriptions point). The component score depends on this choice of basis within
    the span (it averages over the basis vectors), so the order of descriptions matters, as in the
    public code, which uses ``torch.qr`` the same way.

    Args:
        embeddings: ``[k, d]`` text embeddings (``k <= d``), linearly independent.

    Example:
        >>> basis = property_basis(torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
        >>> torch.equal(basis.abs(), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])), (basis[:, :2] >= 0).all().item()
        (True, True)
    """
    if not isinstance(embeddings, Tensor) or embeddings.ndim not in (1, 2) or not embeddings.is_floating_point():
        raise TypeError(f"embeddings must be a float [k, d] (or [d]) tensor of text embeddings, got {_describe(embeddings)}")
    matrix = embeddings.reshape(-1, embeddings.shape[-1])
    k, d = matrix.shape
    if k > d:
        raise ValueError(f"{k} descriptions in {d} dimensions cannot be linearly independent; give at most {d}")
    q, r = torch.linalg.qr(matrix.double().T)  # [d, k], [k, k]
    diagonal = r.diagonal()
    tiny = diagonal.abs() <= 1e-6 * matrix.double().norm(dim=-1).max()
    if tiny.any():
        raise ValueError(
            f"descriptions {tiny.nonzero().flatten().tolist()} are (nearly) linear combinations of the ones before "
            "them; drop them (the basis needs linearly independent embeddings)"
        )
    return (q * diagonal.sign()).T.to(embeddings.dtype)


@torch.no_grad()
def property_embeddings(
    clip: Any, properties: Mapping[str, Sequence[str]], templates: Sequence[Any] | None = None
) -> dict[str, Float[Tensor, "k d_clip"]]:
    """Encode each property's descriptions with the CLIP text tower, averaged over prompt templates.

    Args:
        clip: A :class:`vit_lens.HookedCLIP`.
        properties: Property name -> descriptions, e.g. ``{"colour": ["red", "blue", "green"]}``.
        templates: Format strings or functions; the embedding of a description is the normalised
            mean of its normalised templated embeddings (:meth:`HookedCLIP.zero_shot_classifier`).
            Default (None): open_clip's 80 ImageNet templates, as the paper; ``["{}"]`` uses the
            descriptions as written (the toy CLIP knows only its own words).

    Returns:
        Property name -> ``[k, d_clip]`` unit-norm rows.

    Example:
        >>> from vit_lens import load_toy_clip
        >>> clip = load_toy_clip()
        >>> embeds = property_embeddings(clip, {"colour": ["red object", "blue object"]}, templates=["{}"])
        >>> embeds["colour"].shape
        torch.Size([2, 64])
    """
    if not isinstance(properties, Mapping) or not properties:
        raise TypeError("properties must be a non-empty mapping of name -> list of descriptions")
    out = {}
    for name, descriptions in properties.items():
        if isinstance(descriptions, str) or not descriptions:
            raise ValueError(f"property {name!r} needs a non-empty list of descriptions, got {descriptions!r}")
        out[name] = clip.zero_shot_classifier(list(descriptions), templates).T.contiguous()
    return out


@dataclass
class ComponentScores:
    """Component scores per property (:func:`component_scores`).

    Attributes:
        scores: ``[property, component]``: mean correlation over the property's basis.
        properties: Property names, in row order.
        labels: Component labels, in column order.
        per_direction: Property name -> ``[k, component]`` correlations per basis vector.
    """

    scores: Float[Tensor, "property component"]
    properties: list[str]
    labels: list[str]
    per_direction: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def __getitem__(self, prop: str) -> Float[Tensor, " component"]:
        return self.scores[self._row(prop)]

    def specific(self) -> Float[Tensor, "property component"]:
        """``score_p - max_{q != p} score_q`` for every property (needs two or more properties)."""
        if len(self.properties) < 2:
            raise ValueError(
                f"property-specific scores compare properties; these scores have only {self.properties}. "
                "Score two or more (e.g. the spurious property and the core one) together"
            )
        out = torch.empty_like(self.scores)
        for p in range(len(self.properties)):
            others = torch.cat([self.scores[:p], self.scores[p + 1 :]])
            out[p] = self.scores[p] - others.max(dim=0).values
        return out

    def ranking(self, prop: str, *, specific: bool = False) -> list[str]:
        """Every component label, best first, by ``prop``'s score (or its specific score)."""
        values = self.specific()[self._row(prop)] if specific else self[prop]
        order = torch.sort(values, descending=True, stable=True).indices
        return [self.labels[i] for i in order.tolist()]

    def top(self, prop: str, k: int = 5, *, specific: bool = False) -> list[tuple[str, float]]:
        """The ``k`` best components for ``prop`` as ``(label, score)`` pairs.

        Example:
            >>> scores = ComponentScores(torch.tensor([[0.1, 0.9, 0.3]]), ["colour"], ["L0H0", "L0H1", "L1H0"])
            >>> scores.top("colour", 2)
            [('L0H1', 0.9), ('L1H0', 0.3)]
        """
        _check_positive_int(k, "k")
        values = self.specific()[self._row(prop)] if specific else self[prop]
        ranked = self.ranking(prop, specific=specific)[:k]
        return [(label, round(float(values[self.labels.index(label)]), 6)) for label in ranked]

    def mask(self, prop: str, k: int, *, specific: bool = False) -> Tensor:
        """``[component]`` bool mask of the ``k`` best components: for mean-ablations and retrieval.

        Example:
            >>> scores = ComponentScores(torch.tensor([[0.1, 0.9, 0.3]]), ["colour"], ["L0H0", "L0H1", "L1H0"])
            >>> scores.mask("colour", 1).tolist()
            [False, True, False]
        """
        chosen = set(self.ranking(prop, specific=specific)[:k])
        return torch.tensor([label in chosen for label in self.labels])

    def report(self, k: int = 5, *, specific: bool = False) -> str:
        """One line per property with its ``k`` best components."""
        kind = "property-specific score" if specific else "score"
        lines = [f"Top {k} components per property ({kind})"]
        for prop in self.properties:
            pairs = ", ".join(f"{label} {value:+.3f}" for label, value in self.top(prop, k, specific=specific))
            lines.append(f"  {prop}: {pairs}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()

    def _row(self, prop: str) -> int:
        if prop not in self.properties:
            raise KeyError(f"No property {prop!r}; these scores are for {self.properties}")
        return self.properties.index(prop)


@torch.no_grad()
def component_scores(
    contributions: Any,
    properties: Any,
    *,
    aligner: ComponentAligner | None = None,
    labels: Sequence[str] | None = None,
    chunk_size: int | None = None,
) -> ComponentScores:
    """Score every component for every property: mean correlation with the representation along the property.

    For property ``p`` with orthonormal basis ``b_1..b_k`` (:func:`property_basis`) and aligned terms
    ``a_i = f_i(c_i)`` with sum ``z``: ``score_i(p) = mean_j Corr_images(<a_i, b_j>, <z, b_j>)``.
    ``z`` is the sum of *all* the given components (the aligned representation when they are all
    the model's terms). Streamed in one pass (float64 sums), projecting onto the basis through the
    maps (``c_i (W_i b_j)``), so the aligned terms are never formed.

    Args:
        contributions: ``[image, component, d]`` tensor, :class:`Contributions` or
            :class:`ContributionStore`: the model's terms (with ``aligner``), or terms already in the
            CLIP space (a CLIP model's own, or ``aligner.align(...)``) without it.
        properties: Property name -> ``[k, d_clip]`` description embeddings
            (:func:`property_embeddings`), or one ``[k, d_clip]`` tensor (named ``"property"``).
        aligner: The maps into the CLIP space; None when the terms are already there.
        labels: Component labels of a plain tensor.
        chunk_size: Images per chunk (default: about 256 MB of terms).

    Returns:
        :class:`ComponentScores`.

    Example:
        >>> embeds = property_embeddings(clip, {"colour": colours, "texture": textures}, templates=["{}"])  # doctest: +SKIP
        >>> scores = component_scores(parts, embeds, aligner=aligner)  # doctest: +SKIP
        >>> scores.top("colour", 3), scores.top("colour", 3, specific=True)  # doctest: +SKIP
    """
    source = ComponentSource(contributions, labels)
    names = source.labels or [f"#{i}" for i in range(source.n_components)]
    if source.n_images < 2:
        raise ValueError(f"component scores are correlations across images; got {source.n_images} image(s)")
    if isinstance(properties, Tensor):
        properties = {"property": properties}
    if not isinstance(properties, Mapping) or not properties:
        raise TypeError(f"properties must be a mapping name -> [k, d_clip] embeddings or one tensor, got {_describe(properties)}")
    bases = {name: property_basis(embeds) for name, embeds in properties.items()}
    d_clip = aligner.d_clip if aligner is not None else source.d
    bad = {name: tuple(b.shape) for name, b in bases.items() if b.shape[1] != d_clip}
    if bad:
        raise ValueError(
            f"property embeddings must have width {d_clip} (the {'aligner output' if aligner else 'contributions'}), got {bad}"
        )
    if aligner is not None and (aligner.labels != names or aligner.d_in != source.d):
        raise ValueError(
            _label_mismatch(names, aligner.labels) if aligner.labels != names
            else f"aligner maps width {aligner.d_in} but the contributions have d={source.d}"
        )
    stacked = torch.cat(list(bases.values()))  # [K, d_clip]
    owner = torch.cat([torch.full((len(b),), i) for i, b in enumerate(bases.values())])
    if aligner is not None:
        project = torch.einsum("cio,ko->cik", aligner.weight.detach(), stacked.to(aligner.weight))  # [C, d_in, K]
        offset = aligner.bias.detach().to(project) @ stacked.to(project).T / len(names)  # [K]
    moments = _Moments()
    for chunk in source.chunks(chunk_size):
        if aligner is not None:
            s = torch.einsum("nci,cik->nck", chunk.to(project), project) + offset
        else:
            s = chunk @ stacked.to(chunk).T  # [n, C, K]
        moments.update(s.double())
    correlation = moments.correlation()  # [C, K]
    per_direction = {name: correlation[:, owner == i].T.float() for i, name in enumerate(bases)}
    scores = torch.stack([per_direction[name].mean(dim=0) for name in bases])
    return ComponentScores(scores, list(bases), names, per_direction)


class _Moments:
    """Running sums for Pearson correlations between every component's projection and the total's."""

    def __init__(self):
        self.n = 0
        self.shift_s = self.shift_t = None

    def update(self, s: Tensor) -> None:  # s: [n, C, K] float64
        t = s.sum(dim=1)  # [n, K]: the projection of the sum of all components
        if self.shift_s is None:  # sums around the first chunk's means keep the variances exact
            self.shift_s, self.shift_t = s.mean(0), t.mean(0)
            self.ss = torch.zeros_like(self.shift_s)
            self.st = torch.zeros_like(self.shift_t)
            self.sss, self.stt, self.sst = torch.zeros_like(self.ss), torch.zeros_like(self.st), torch.zeros_like(self.ss)
        s, t = s - self.shift_s, t - self.shift_t
        self.n += len(s)
        self.ss += s.sum(0)
        self.st += t.sum(0)
        self.sss += s.square().sum(0)
        self.stt += t.square().sum(0)
        self.sst += (s * t[:, None]).sum(0)

    def correlation(self) -> Tensor:
        n = self.n
        cov = self.sst - self.ss * self.st / n
        var_s = (self.sss - self.ss.square() / n).clamp_min(0)
        var_t = (self.stt - self.st.square() / n).clamp_min(0)
        denominator = (var_s * var_t).sqrt()
        # a projection that varies less than float32 round-off of its raw values is constant: no correlation
        raw_s = (self.sss + 2 * self.shift_s * self.ss) / n + self.shift_s.square()
        raw_t = (self.stt + 2 * self.shift_t * self.st) / n + self.shift_t.square()
        constant = (var_s <= 1e-12 * n * raw_s) | (var_t <= 1e-12 * n * raw_t)[None] | (denominator == 0)
        return torch.where(constant, torch.zeros_like(cov), cov / denominator.clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------- text, retrieval, ablation


def interpret_components(
    contributions: Any,
    aligner: ComponentAligner | None,
    text_embeddings: Any,
    *,
    components: Any = None,
    n_texts: int = 5,
    texts: Sequence[str] | None = None,
    rank: int = 80,
    method: str = "fast",
    labels: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """TextSpan on each component's aligned terms: text descriptions of a non-CLIP model's heads.

    Each selected component's terms are mapped into the CLIP space (one component at a time, so a
    store is read column by column) and :func:`vit_lens.methods.textspan.textspan.textspan` picks the descriptions
    that span their variance.

    Args:
        contributions: ``[image, component, d_in]`` tensor, :class:`Contributions` or :class:`ContributionStore`.
        aligner: The maps; None for terms already in the CLIP space.
        text_embeddings: ``[T, d_clip]`` the description pool (CLIP text embeddings).
        components: Which components (labels, ``(layer, head)`` tuples or a bool mask; see
            :func:`vit_lens.methods.textspan.retrieval.select_components`). Default: all but constant terms (``"bias"``).
        n_texts, texts, rank, method: As :func:`vit_lens.methods.textspan.textspan.textspan`.
        labels: Component labels of a plain tensor.
        progress: Show a progress bar over components.

    Returns:
        Label -> :class:`vit_lens.methods.textspan.textspan.TextSpanResult`.

    Example:
        >>> pool = clip.encode_text(descriptions, normalize=True)  # doctest: +SKIP
        >>> roles = interpret_components(parts, aligner, pool, components=scores.ranking("colour")[:3],
        ...                              texts=descriptions)  # doctest: +SKIP
        >>> print(roles["L11H3"].report())  # doctest: +SKIP
    """
    from vit_lens.methods.textspan.textspan import textspan

    source = ComponentSource(contributions, labels)
    names = source.labels or [f"#{i}" for i in range(source.n_components)]
    if aligner is not None and (aligner.labels != names or aligner.d_in != source.d):
        raise ValueError(_label_mismatch(names, aligner.labels) if aligner.labels != names
                         else f"aligner maps width {aligner.d_in} but the contributions have d={source.d}")
    if components is None:
        mask = torch.tensor([name not in _CONSTANT_LABELS for name in names])
    else:
        mask = source.mask(components)
    results = {}
    for i in progress_bar(mask.nonzero().flatten().tolist(), desc="TextSpan (aligned)", enabled=progress):
        column = source.values[:, i] if source.values is not None else source.store.component(names[i])
        aligned = aligner.align_component(column, i) if aligner is not None else column
        results[names[i]] = textspan(aligned, text_embeddings, n_texts, rank, method, texts=texts, reconstruct=False)
    return results


def nearest_by_property(
    query: Any,
    contributions: Any,
    scores: ComponentScores,
    prop: str,
    *,
    n_components: int = 5,
    specific: bool = False,
    k: int = 10,
    metric: str = "cosine",
    exclude_query: bool = True,
) -> Retrieval:
    """Images nearest to a query by the summed terms of a property's top components (Balasubramanian et al.'s image retrieval).

    As the public code, images are compared by the **unaligned** terms of the ``n_components`` best
    components for ``prop`` (:meth:`ComponentScores.ranking`); the maps are only used to score.

    Args:
        query: An image index (or indices) into ``contributions``, or the query's own terms (see
            :func:`vit_lens.methods.textspan.retrieval.nearest_by_components`).
        contributions: ``[image, component, d]`` tensor, :class:`Contributions` or
            :class:`ContributionStore`, with the components of ``scores`` in the same order.
        scores: From :func:`component_scores`.
        prop: The property to retrieve by.
        n_components: How many top components to compare by.
        specific: Rank by the property-specific score.
        k, metric, exclude_query: As :func:`vit_lens.methods.textspan.retrieval.nearest_by_components`.

    Example:
        >>> similar = nearest_by_property(7, parts, scores, "colour", n_components=3, k=5)  # doctest: +SKIP
    """
    _check_positive_int(n_components, "n_components")
    own = ComponentSource(contributions, None if not isinstance(contributions, Tensor) else scores.labels)
    if own.labels is not None and list(own.labels) != scores.labels:
        raise ValueError(_label_mismatch(own.labels, scores.labels))
    mask = scores.mask(prop, n_components, specific=specific)
    labels = scores.labels if isinstance(contributions, Tensor) else None
    return nearest_by_components(query, contributions, mask, k, labels=labels, metric=metric, exclude_query=exclude_query)


def ablation_hook_names(components: Sequence[str]) -> list[str]:
    """The hook points :func:`mean_ablation_hooks` edits for these component labels.

    Pass them to :func:`vit_lens.intervene.statistics.compute_hook_statistics` to get the means.

    Example:
        >>> ablation_hook_names(["L3H1", "L3H5", "L2MLP", "embed"])
        ['blocks.3.attn.hook_z', 'blocks.2.hook_mlp_out', 'blocks.0.hook_resid_pre']
    """
    return list(_hook_plan(components))


def mean_ablation_hooks(components: Sequence[str], means: Any) -> list[tuple[str, Callable]]:
    """Forward hooks that mean-ablate components in the forward pass (their total effect).

    A head ``L{l}H{h}`` is ablated at ``blocks.{l}.attn.hook_z`` (its output at every position
    replaced by the dataset mean), ``L{l}MLP`` at ``hook_mlp_out``, ``L{l}ATTN`` at ``hook_attn_out``,
    a neuron ``L{l}N{n}`` at ``mlp.hook_post``, and ``embed`` at ``blocks.0.hook_resid_pre`` (which
    fixes the whole input). Unlike :func:`vit_lens.methods.textspan.spurious.mean_ablate_components`, which replaces
    only the *direct* terms, later layers see the change. Per-token terms (``L{l}H{h}T{t}``) and the
    constant ``"bias"`` term have no activation of their own: ablate the head, or use the direct
    ablation.

    Args:
        components: Component labels, e.g. ``[label for label, _ in scores.top("background", 10)]``.
        means: A :class:`vit_lens.intervene.statistics.HookStatistics` holding (at least) the hooks of
            :func:`ablation_hook_names`.

    Returns:
        ``[(hook_name, hook_fn)]`` for ``model.run_with_hooks(images, fwd_hooks=...)``.

    Example:
        >>> heads = [label for label, _ in scores.top("background", 5, specific=True)]  # doctest: +SKIP
        >>> stats = compute_hook_statistics(model, loader, ablation_hook_names(heads))  # doctest: +SKIP
        >>> ablated = model.run_with_hooks(images, fwd_hooks=mean_ablation_hooks(heads, stats))  # doctest: +SKIP
    """
    from vit_lens.intervene.interventions import mean_ablate
    from vit_lens.intervene.statistics import HookStatistics

    if not isinstance(means, HookStatistics):
        raise TypeError(
            f"means must be a HookStatistics (compute_hook_statistics(model, data, ablation_hook_names(components))), "
            f"got {type(means).__name__}"
        )
    plan = _hook_plan(components)
    missing = [name for name in plan if name not in means]
    if missing:
        raise KeyError(
            f"means hold no statistics for {missing}; compute them with "
            f"compute_hook_statistics(model, data, ablation_hook_names(components))"
        )
    hooks = []
    for name, (axis, indices) in plan.items():
        selection = {axis: indices} if axis else {}
        hooks.append((name, mean_ablate(means, **selection)))
    return hooks


# ---------------------------------------------------------------------------------------------- internals


def _hook_plan(components: Sequence[str]) -> dict[str, tuple[str | None, list[int] | None]]:
    """hook name -> (selection keyword, indices) for mean_ablate; whole activations have no selection."""
    if isinstance(components, str):
        components = [components]
    if not isinstance(components, Sequence) or not components:
        raise TypeError(f"components must be a non-empty list of component labels ('L3H1', 'L2MLP', ...), got {components!r}")
    plan: dict[str, tuple[str | None, list[int] | None]] = {}
    for label in components:
        if label == "embed":
            plan["blocks.0.hook_resid_pre"] = (None, None)
            continue
        match = _LABEL.match(label) if isinstance(label, str) else None
        if match is None or match.group(5):
            why = (
                "per-token terms have no activation of their own (ablate the head, or use the direct ablation "
                "vit_lens.methods.textspan.spurious.mean_ablate_components)" if match is not None
                else "the constant 'bias' term cannot be mean-ablated" if label == "bias"
                else "expected 'embed', 'L{l}ATTN', 'L{l}MLP', 'L{l}H{h}' or 'L{l}N{n}'"
            )
            raise ValueError(f"Cannot mean-ablate component {label!r} in the forward pass: {why}")
        layer = int(match.group(1))
        if match.group(2):
            plan[f"blocks.{layer}.hook_attn_out"] = (None, None)
        elif match.group(3):
            plan[f"blocks.{layer}.hook_mlp_out"] = (None, None)
        else:
            head, neuron = match.group(4), match.group(6)
            name, axis, index = (
                (f"blocks.{layer}.attn.hook_z", "heads", int(head)) if head is not None
                else (f"blocks.{layer}.mlp.hook_post", "neurons", int(neuron))
            )
            _, chosen = plan.setdefault(name, (axis, []))
            if chosen is not None and index not in chosen:
                chosen.append(index)
    return plan


class _Rows:
    """Reads images' terms from a ComponentSource: by index, and as shuffled training batches."""

    def __init__(self, source: ComponentSource):
        self.source = source
        self.block = max(1, _BLOCK_BYTES // (4 * source.n_components * source.d))

    def read(self, index: Tensor) -> Tensor:
        if self.source.values is not None:
            return self.source.values[index.to(self.source.values.device)]
        store, pieces = self.source.store, []
        runs = _contiguous_runs(index.tolist())
        for start, stop in runs:
            pieces.append(store[start:stop])
        return torch.cat(pieces) if pieces else torch.zeros(0, self.source.n_components, self.source.d)

    def epoch(self, is_train: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """``(terms, indices)`` batches covering every training image once, in random order."""
        if self.source.values is not None:
            order = is_train.nonzero().flatten()
            order = order[torch.randperm(len(order), generator=generator)]
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                yield self.source.values[index.to(self.source.values.device)], index
            return
        # a store: contiguous blocks in random order, rows shuffled within each block
        n = self.source.n_images
        starts = torch.arange(0, n, self.block)[torch.randperm(math.ceil(n / self.block), generator=generator)]
        pending_x, pending_i = [], []
        count = 0
        for start in starts.tolist():
            stop = min(start + self.block, n)
            local = is_train[start:stop].nonzero().flatten()
            if not len(local):
                continue
            local = local[torch.randperm(len(local), generator=generator)]
            pending_x.append(self.source.store[start:stop][local])
            pending_i.append(local + start)
            count += len(local)
            while count >= batch_size:
                x, i = torch.cat(pending_x), torch.cat(pending_i)
                yield x[:batch_size], i[:batch_size]
                pending_x, pending_i, count = [x[batch_size:]], [i[batch_size:]], count - batch_size
        if count:
            yield torch.cat(pending_x), torch.cat(pending_i)


def _contiguous_runs(indices: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _validation_index(validation: Any, n: int, generator: torch.Generator) -> Tensor:
    if validation is None or validation == 0:
        return torch.zeros(0, dtype=torch.long)
    if isinstance(validation, float) and 0 < validation < 1:
        n_val = max(1, round(validation * n))
    elif isinstance(validation, int) and not isinstance(validation, bool) and validation > 0:
        n_val = validation
    else:
        raise ValueError(f"validation must be a fraction in (0, 1), a positive count, or None; got {validation!r}")
    if n_val >= n:
        raise ValueError(f"validation holds out {n_val} of {n} images, leaving none to train on; give fewer")
    return torch.randperm(n, generator=generator)[:n_val].sort().values


@torch.no_grad()
def _mean_cosine(aligner: ComponentAligner, x: Tensor, y: Tensor, chunk: int = 1024) -> float:
    total = 0.0
    for start in range(0, len(x), chunk):
        xs = x[start : start + chunk].to(aligner.weight)
        ys = y[start : start + chunk].to(aligner.weight)
        total += float(F.cosine_similarity(aligner.aligned_sum(xs), ys, dim=-1).sum())
    return total / len(x)


def _check_positive_int(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _describe(value: Any) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def _label_mismatch(given: Sequence[str], expected: Sequence[str]) -> str:
    return (
        f"The contributions' components ({len(given)}: {list(given)[:3]} ...) are not the ones the aligner / "
        f"scores were made for ({len(expected)}: {list(expected)[:3]} ...); decompose with the same level and layers"
    )


