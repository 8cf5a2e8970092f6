"""The planted CLIP: the planted classifier's image tower, with a text tower aligned to its readout.

    python -m vit_lens.planted.clip --classifier classifier.safetensors --out clip.safetensors --seed 0

The image tower is the planted classifier, unchanged: its 23-logit head becomes the CLIP projection
(``W_proj``, ``b_proj``), so the image embedding *is* the classifier's logit vector and every head
carries the factor it carries in the classifier, read at the same tokens (the same truth,
:data:`vit_lens.planted.truth.CLASSIFIER_HEADS`). The image tower stays locked while the text tower is
trained, as in LiT (Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", CVPR 2022).

The text tower (:class:`vit_lens.toy.ToyTextTower`, the toy CLIP's) is trained to put each text on
the directions of the values it mentions: the direction of a value ``v`` of factor ``f`` is the unit
logit axis of ``v`` minus the mean axis of ``f``'s values (so a factor's constant offset, which no
prediction depends on, is not part of any text), and a text mentioning several values points along
the sum of their directions. With single-value prompts (:func:`vit_lens.toy.factor_prompts`: "red
object", "two objects") the cosine of the image embedding with the value's direction is the value's
logit minus its factor's mean logit, divided by norms that are the same for every value of the
factor: zero-shot classification then predicts what the classifier predicts, and TextSpan, text
directions and zero-shot segmentation apply to a model whose answer is known. The model card
(``vit_lens/planted/MODEL_CARD.md``) gives the measured agreement.
"""

import argparse
import copy
import datetime
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vit_lens.model.clip import HookedCLIP
from vit_lens.model.config import ViTConfig
from vit_lens.model.hooked_vit import HookedViT
from vit_lens.planted.model import PlantedModel, factor_slices
from vit_lens.planted.truth import CLASSIFIER_HEADS, CLASSIFIER_INERT_MLPS
from vit_lens.toy.text import ToyTextTower, ToyTokenizer
from vit_lens.toy.train import sample_captions
from vit_lens.toy.world import FACTORS, PLURALS, ToyWorld, description_pool, factor_prompts

TEXT_CONFIG = dict(width=96, layers=2, heads=4, context_length=16)
"""The text tower of the planted CLIP (its ``d_proj`` is the classifier's number of logits, 23)."""

LOGIT_SCALE = math.log(100.0)
"""``log`` of the temperature of image-text logits (CLIP's trained value is about 100)."""

_VALUE_INDEX = {value: (name, i) for name, values in FACTORS.items() for i, value in enumerate(values)}
_VALUE_INDEX.update({plural: _VALUE_INDEX[shape] for shape, plural in PLURALS.items()})


def value_directions() -> Tensor:
    """``[23, 23]``: row ``k`` is the direction of logit ``k``'s value (its axis minus its factor's mean axis)."""
    n = sum(len(values) for values in FACTORS.values())
    directions = torch.eye(n)
    for s in factor_slices().values():
        directions[s, s] -= 1.0 / (s.stop - s.start)
    return directions


def text_targets(texts: list[str]) -> Tensor:
    """``[len(texts), 23]`` unit targets: the sum of the directions of the values each text mentions.

    Raises ValueError for a text that mentions no value (such as "object"): it has no direction.
    """
    directions, slices = value_directions(), factor_slices()
    tokenizer = ToyTokenizer()
    rows = []
    for text in texts:
        mentioned = [_VALUE_INDEX[w] for w in tokenizer.words(text) if w in _VALUE_INDEX]
        if not mentioned:
            raise ValueError(f"{text!r} mentions no value of the toy world's factors; it has no target direction")
        rows.append(sum(directions[slices[name].start + i] for name, i in mentioned))
    return F.normalize(torch.stack(rows), dim=-1)


def image_tower_from_classifier(classifier: HookedViT) -> HookedViT:
    """A copy of the classifier whose head is a CLIP projection with bias: the same function, ``return_type="embed"``."""
    cfg = classifier.cfg.to_dict()
    if not cfg.get("n_classes"):
        raise ValueError("image_tower_from_classifier takes the planted classifier (a HookedViT with a head)")
    cfg.update(n_classes=0, d_proj=cfg["n_classes"], proj_bias=True, model_name="vit_lens-planted-clip")
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    vision = HookedViT(ViTConfig(**cfg))
    state = {k: v for k, v in copy.deepcopy(classifier.state_dict()).items() if not k.startswith("head.")}
    state["W_proj"] = classifier.head.W_head.detach().clone()
    state["b_proj"] = classifier.head.b_head.detach().clone()
    vision.load_state_dict(state, strict=True)
    return vision


def build_planted_clip(classifier: HookedViT, seed: int | None = 0) -> HookedCLIP:
    """The planted CLIP around ``classifier``'s image tower, with a freshly initialised text tower."""
    if seed is not None:
        torch.manual_seed(seed)
    vision = image_tower_from_classifier(classifier)
    text = ToyTextTower(d_proj=vision.cfg.d_proj, **TEXT_CONFIG)
    return HookedCLIP(vision, text, torch.nn.Parameter(torch.tensor(LOGIT_SCALE)),
                      tokenizer=ToyTokenizer(TEXT_CONFIG["context_length"]))


@dataclass
class PlantedCLIP(PlantedModel):
    """A planted model whose :attr:`model` is a :class:`~vit_lens.HookedCLIP`: predictions are zero-shot.

    :meth:`predict` compares the image embedding with the single-value prompts of every factor
    (:func:`vit_lens.toy.factor_prompts`) and picks the most similar; hooks act on the image tower.
    """

    _prompts: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)

    def prompt_embeddings(self) -> dict[str, Tensor]:
        """Factor name -> ``[n_values, 23]`` unit text embeddings of its prompts (computed once)."""
        if not self._prompts:
            with torch.no_grad():
                self._prompts.update({name: self.model.encode_text(factor_prompts(name), normalize=True)
                                      for name in FACTORS})
        return self._prompts

    def factor_logits(self, embeddings: Tensor) -> dict[str, Tensor]:
        """Image embeddings ``[batch, 23]`` -> factor name -> zero-shot logits ``[batch, n_values]``."""
        image = F.normalize(embeddings, dim=-1)
        scale = self.model.logit_scale.exp()
        return {name: scale * image @ text.T for name, text in self.prompt_embeddings().items()}


def agreement(clip: PlantedCLIP, classifier: PlantedModel, n: int = 1000, seed: int = 4242) -> dict[str, float]:
    """Per factor, the share of ``n`` fresh images on which the CLIP's zero-shot prediction is the classifier's."""
    images = ToyWorld(seed=seed).sample(n, seed=seed).images
    ours, theirs = clip.predict(images), classifier.predict(images)
    return {name: ours[name].eq(theirs[name]).float().mean().item() for name in FACTORS}


def training_texts(world: ToyWorld, rng: np.random.Generator, n: int) -> list[str]:
    """``n`` texts: the world's captions of random scenes, each mentioning a random subset of its factors."""
    batch = world.sample(n, seed=int(rng.integers(2**31)))
    return sample_captions(batch, rng)[0]


def train_text_tower(clip: HookedCLIP, steps: int = 600, batch_size: int = 256, lr: float = 2e-3, seed: int = 0,
                     log_every: int = 100) -> float:
    """Train the text tower alone (cosine loss to :func:`text_targets`); the image tower is not touched.

    Each batch mixes the description pool of up to three factors (what TextSpan reads) with captions of
    random scenes (up to all six factors). Returns the training time in seconds.
    """
    rng = np.random.default_rng(seed)
    world = ToyWorld(seed=seed)
    pool = description_pool(3)[0]
    text = clip.text_model
    optimizer = torch.optim.AdamW(text.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    text.train()
    start = time.time()
    for step in range(1, steps + 1):
        half = batch_size // 2
        texts = [pool[i] for i in rng.integers(len(pool), size=half)] + training_texts(world, rng, batch_size - half)
        loss = (1 - F.cosine_similarity(clip.encode_text(texts), text_targets(texts), dim=-1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step:>4}/{steps}  cosine loss {loss.item():.5f}  {time.time() - start:5.0f}s", flush=True)
    text.eval()
    return time.time() - start


def save_planted_clip(clip: HookedCLIP, path: str | Path, card: dict[str, Any] | None = None) -> None:
    """Save the planted CLIP (float16 weights) with both towers' configurations, its truth and card."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().to(torch.float16).contiguous() for name, t in clip.state_dict().items()}
    metadata = {
        "config": json.dumps(clip.vision.cfg.to_dict()),
        "text_config": json.dumps(TEXT_CONFIG),
        "truth": json.dumps({"planted_heads": [vars(h) for h in CLASSIFIER_HEADS],
                             "inert_mlps": list(CLASSIFIER_INERT_MLPS)}),
        "card": json.dumps(card or {}),
    }
    save_file(tensors, str(path), metadata=metadata)


def clip_from_state(config: dict, state: dict[str, Tensor]) -> HookedCLIP:
    """Rebuild a saved planted CLIP from its image-tower configuration and state dict."""
    vision = HookedViT(ViTConfig(**config))
    text = ToyTextTower(d_proj=vision.cfg.d_proj, **TEXT_CONFIG)
    clip = HookedCLIP(vision, text, torch.nn.Parameter(torch.tensor(0.0)),
                      tokenizer=ToyTokenizer(TEXT_CONFIG["context_length"]))
    clip.load_state_dict(state, strict=True)
    return clip


def main(argv: list[str] | None = None) -> int:
    from vit_lens.planted.model import load_planted
    from vit_lens.planted.train import evaluate_planted, summary

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier", default=None, help="the planted classifier to build on (default: the shipped one)")
    parser.add_argument("--out", required=True, help="where to write the safetensors checkpoint")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    classifier = load_planted("classifier", path=args.classifier)
    clip = build_planted_clip(classifier.model, seed=args.seed)
    seconds = train_text_tower(clip, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    clip.eval()
    planted = PlantedCLIP(clip, classifier.heads, classifier.inert_heads, classifier.inert_mlps)
    result = evaluate_planted(planted, n=512)
    result["agreement_with_classifier"] = agreement(planted, classifier)
    card = {
        "trained": datetime.date.today().isoformat(),
        "command": "python -m vit_lens.planted.clip " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_seconds": round(seconds),
        "torch": torch.__version__,
        "classifier": classifier.card.get("command", "the shipped classifier"),
        "measured_at_save": result,
    }
    save_planted_clip(clip, args.out, card)
    print("final: " + summary(result))
    print("zero-shot agreement with the classifier: "
          + " ".join(f"{k} {100 * v:.1f}" for k, v in result["agreement_with_classifier"].items()))
    print(f"trained in {seconds:.0f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
