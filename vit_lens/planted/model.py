"""Planted-mechanism models: construction, saving and loading (:func:`load_planted`)."""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vit_lens.model.clip import HookedCLIP
from vit_lens.model.config import ViTConfig
from vit_lens.model.hooked_vit import HookedViT
from vit_lens.planted.truth import (
    CLASSIFIER_HEADS,
    CLASSIFIER_INERT_MLPS,
    CLASSIFIER_N_HEADS,
    CLASSIFIER_N_LAYERS,
    PlantedHead,
    heads_by_factor,
    inert_heads,
)
from vit_lens.toy.model import VISION_CONFIG, init_for_training
from vit_lens.toy.world import FACTORS

PLANTED_MODELS = ("classifier", "clip")
"""The names :func:`load_planted` accepts."""

CLASSIFIER_CONFIG = dict(
    # The toy CLIP's image tower (same input, patches, norms and pooling), narrower, with a head of one logit per
    # factor value instead of a CLIP projection.
    {key: value for key, value in VISION_CONFIG.items() if key != "d_proj"},
    d_model=64,
    n_layers=CLASSIFIER_N_LAYERS,
    n_heads=CLASSIFIER_N_HEADS,
    d_head=16,
    d_mlp=256,
    n_classes=sum(len(values) for values in FACTORS.values()),
    model_name="vit_lens-planted-classifier",
)


def factor_slices() -> dict[str, slice]:
    """Factor name -> its slice of the classifier's logits (the factors in :data:`FACTORS` order)."""
    slices, start = {}, 0
    for name, values in FACTORS.items():
        slices[name] = slice(start, start + len(values))
        start += len(values)
    return slices


def build_classifier(seed: int | None = 0, config: dict | None = None) -> HookedViT:
    """A freshly initialised planted classifier (the architecture of ``load_planted("classifier")``)."""
    if seed is not None:
        torch.manual_seed(seed)
    cfg = ViTConfig(**(config or CLASSIFIER_CONFIG))
    model = HookedViT(cfg)
    init_for_training(model)
    return model


@dataclass
class PlantedModel:
    """A model whose mechanism is known by construction, with its truth.

    Attributes:
        model: The :class:`~vit_lens.HookedViT` (eval mode, gradients available); it takes
            ``[batch, 3, 64, 64]`` images in [0, 1] as :meth:`vit_lens.toy.ToyWorld.sample` draws them and
            returns ``[batch, 23]`` logits, one slice per factor (:meth:`factor_logits`). For the planted
            CLIP (:class:`vit_lens.planted.clip.PlantedCLIP`) the :class:`~vit_lens.HookedCLIP`, whose image
            embedding is that logit vector.
        heads: Factor name -> the heads ``(layer, head)`` through which it reaches the output.
        inert_heads: Heads that carry nothing the output uses.
        inert_mlps: Layers whose MLP carries nothing the output uses.
        planted_heads: The full design (:class:`~vit_lens.planted.truth.PlantedHead`: what each head
            reads and where it writes).
        card: The training record stored with the weights (command, time, measured figures).
    """

    model: HookedViT | HookedCLIP
    heads: dict[str, list[tuple[int, int]]]
    inert_heads: list[tuple[int, int]]
    inert_mlps: list[int]
    planted_heads: tuple[PlantedHead, ...] = CLASSIFIER_HEADS
    card: dict[str, Any] = field(default_factory=dict)

    def factor_logits(self, logits: Tensor) -> dict[str, Tensor]:
        """Split ``[batch, 23]`` logits into factor name -> ``[batch, n_values]``."""
        return {name: logits[:, s] for name, s in factor_slices().items()}

    def predict(self, images: Tensor, fwd_hooks: Sequence[tuple[Any, Any]] = ()) -> dict[str, Tensor]:
        """Per factor, the predicted value indices into ``vit_lens.toy.FACTORS[factor]`` (``[batch]`` long).

        Args:
            images: ``[batch, 3, 64, 64]`` in [0, 1].
            fwd_hooks: TransformerLens-style ``(hook name or filter, fn)`` pairs to run the model with.
        """
        with torch.no_grad():
            logits = self.model.run_with_hooks(images, fwd_hooks=list(fwd_hooks))
        return {name: part.argmax(dim=-1) for name, part in self.factor_logits(logits).items()}


def save_classifier(model: HookedViT, path: str | Path, card: dict[str, Any] | None = None) -> None:
    """Save a planted classifier's weights in float16 with its configuration, truth and card as metadata."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().to(torch.float16).contiguous() for name, t in model.state_dict().items()}
    truth = [vars(h) for h in CLASSIFIER_HEADS]
    metadata = {
        "config": json.dumps(model.cfg.to_dict()),
        "truth": json.dumps({"planted_heads": truth, "inert_mlps": list(CLASSIFIER_INERT_MLPS)}),
        "card": json.dumps(card or {}),
    }
    save_file(tensors, str(path), metadata=metadata)


def load_planted(name: str = "classifier", path: str | Path | None = None,
                 device: str | torch.device = "cpu") -> PlantedModel:
    """A planted-mechanism model shipped with vit_lens, offline, with its truth.

    The model card (``vit_lens/planted/MODEL_CARD.md``) gives the truth, the training commands and the
    measured figures (task and interchange accuracy at least 95% per factor, inert components changing
    under 1% of predictions).

    Args:
        name: Which model; one of :data:`PLANTED_MODELS`: ``"classifier"`` (a HookedViT that predicts every
            factor of the toy world, each through known heads) or ``"clip"`` (a
            :class:`~vit_lens.planted.clip.PlantedCLIP`: the same image tower in a HookedCLIP with a text
            tower aligned to it; ``predict`` is zero-shot).
        path: Another checkpoint written by the training scripts (default: the shipped one).
        device: Where to put the model.

    Example:
        >>> import vit_lens
        >>> from vit_lens.toy import ToyWorld
        >>> planted = vit_lens.load_planted("classifier")
        >>> planted.heads["position"]
        [(0, 1), (2, 1)]
        >>> batch = ToyWorld(seed=5).sample(4)
        >>> sorted(planted.predict(batch.images))
        ['colour', 'count', 'position', 'shape', 'size', 'texture']
    """
    from safetensors import safe_open

    from vit_lens.loading.checkpoints import require_safetensors

    if name not in PLANTED_MODELS:
        raise ValueError(f"unknown planted model {name!r}; the planted models are {list(PLANTED_MODELS)}")
    shipped = path is None
    if shipped:
        path = resources.files("vit_lens.planted").joinpath(f"{name}.safetensors")
    path = Path(str(path))
    if not path.is_file():
        where = "the installed package lacks its weights (a partial install?)" if shipped else "no such file"
        raise FileNotFoundError(
            f"no planted {name} checkpoint at {path}: {where}. Train one with `python -m "
            f"vit_lens.planted.{'clip' if name == 'clip' else 'train'} --out {name}.safetensors` and load it with "
            f"load_planted({name!r}, path=...)"
        )
    require_safetensors(path, "load_planted reads the safetensors files that vit_lens.planted.train writes")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if "config" not in metadata or "truth" not in metadata:
            raise ValueError(
                f"{path} is a safetensors file but not a planted {name} checkpoint: its metadata lacks config/truth "
                f"(it has {sorted(metadata) or 'none'}); write one with `python -m vit_lens.planted.train`"
            )
        state = {key: f.get_tensor(key).float() for key in f.keys()}
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(metadata["config"]).items()}
    is_clip = "text_config" in metadata
    if is_clip != (name == "clip"):
        saved = "a planted CLIP" if is_clip else "a planted classifier"
        raise ValueError(f"{path} holds {saved}; load it with load_planted({'clip' if is_clip else 'classifier'!r}, path=...)")
    truth = json.loads(metadata["truth"])
    planted_heads = tuple(PlantedHead(**h) for h in truth["planted_heads"])
    if planted_heads != CLASSIFIER_HEADS:
        raise ValueError(f"{path} was trained for another design than vit_lens.planted.truth.CLASSIFIER_HEADS")
    if is_clip:
        from vit_lens.planted.clip import PlantedCLIP, clip_from_state

        model, kind = clip_from_state(config, state), PlantedCLIP
    else:
        model, kind = build_classifier(seed=None, config=config), PlantedModel
        model.load_state_dict(state, strict=True)
    # Eval mode only: gradients stay available, as for every loaded model (attribution patching).
    model = model.to(device).eval()
    return kind(
        model=model,
        heads=heads_by_factor(planted_heads),
        inert_heads=inert_heads(planted_heads, model.cfg.n_layers, model.cfg.n_heads),
        inert_mlps=list(truth["inert_mlps"]),
        planted_heads=planted_heads,
        card=json.loads(metadata.get("card", "{}")),
    )
