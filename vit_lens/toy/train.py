"""Train the toy CLIP on the toy world (seeded and reproducible).

    python -m vit_lens.toy.train --out toy_clip.safetensors --supervised-steps 1500 --steps 1000 ...

The model card (``vit_lens/toy/MODEL_CARD.md``) gives the exact commands of the shipped model.

**Contrastive phase.** Each step draws fresh images and, for each image, a caption that mentions a
random subset of its factors (the full caption 30% of the time, otherwise each factor with
probability one half). Short captions are what make single-factor prompts ("red object", "striped
background") work for zero-shot classification. Because a short caption fits many images of a
batch, the loss counts every consistent image-caption pair as a positive: it maximises the log of
the softmax mass on all positives, in both directions (a multi-positive InfoNCE). Colour, size,
texture and count together nearly identify an image within a batch of 128, so each factor named in
``--fix`` is, with probability ``--fix-probability``, given one value for the whole batch, which
leaves the other factors to tell the images apart; and with probability ``--focus-probability`` a
batch varies in one factor alone, every caption naming only that factor.

**Why a supervised warm start.** Trained contrastively from scratch, this small model learns colour
first and then stalls: the text tower maps "plain background" and "striped background" (and every
shape, position and count prompt) to one embedding, the image tower stops encoding what no caption
distinguishes, and the two sit at a saddle where neither gets a gradient to leave (measured: text
cosine 1.00 between all four texture prompts, nearest-class-mean accuracy at chance, after 500 to 1,000
steps in several runs). ``--supervised-steps N`` therefore first trains the image tower alone for ``N`` steps, with one
linear probe per factor on the image embedding (cross-entropy), and then the contrastive phase
aligns the text tower to it, with the image tower's learning rate scaled by ``--image-lr-scale``
(0 locks it, as in LiT, Zhai et al. 2022).

The image tower is trained on standardised pixels, ``(image - 0.5) / 0.25``: on raw [0, 1] pixels the
grey background dominates every patch embedding and learning is several times slower. The
standardisation is folded into the patch embedding before saving (:func:`fold_input_standardisation`),
so the shipped model takes [0, 1] images as :meth:`ToyWorld.sample` draws them.
"""

import argparse
import datetime
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from vit_lens.toy.model import TEXT_CONFIG, VISION_CONFIG, build_toy_clip, factor_accuracy, save_toy_clip
from vit_lens.toy.world import FACTORS, ToyWorld, caption


PIXEL_MEAN, PIXEL_STD = 0.5, 0.25


@torch.no_grad()
def fold_input_standardisation(vision: torch.nn.Module, mean: float = PIXEL_MEAN, std: float = PIXEL_STD,
                               unfold: bool = False) -> None:
    """Make ``vision`` on raw pixels compute what it computed on ``(pixels - mean) / std`` (in place).

    ``W_E (x - mean) / std + b = (W_E / std) x + (b - mean / std * sum(W_E))``; ``unfold=True`` inverts it.
    """
    embed = vision.embed
    if unfold:
        embed.b_E += mean * embed.W_E.sum(dim=(1, 2, 3))
        embed.W_E *= std
    else:
        embed.b_E -= mean / std * embed.W_E.sum(dim=(1, 2, 3))
        embed.W_E /= std


def sample_captions(batch, rng: np.random.Generator, full_fraction: float = 0.3, focus: str | None = None):
    """One partial caption per image, and ``included[i, f]``: caption i mentions factor f.

    With ``focus`` (a factor name) every caption names that factor alone ("circle", "two objects").
    """
    names = list(FACTORS)
    if focus is not None:
        included = np.zeros((len(batch), len(names)), dtype=bool)
        included[:, names.index(focus)] = True
    else:
        included = rng.random((len(batch), len(names))) < 0.5
        included[rng.random(len(batch)) < full_fraction] = True
        empty = ~included.any(axis=1)
        included[empty, rng.integers(len(names), size=int(empty.sum()))] = True
    captions = [
        caption(scene, include=[n for n, keep in zip(names, row) if keep]) for scene, row in zip(batch.scenes, included)
    ]
    return captions, torch.from_numpy(included)


def positives(factors: dict[str, torch.Tensor], included: torch.Tensor) -> torch.Tensor:
    """``[image, caption]`` bool: caption j is true of image i (every factor it mentions matches)."""
    values = torch.stack(list(factors.values()), dim=1)  # [n, n_factors]
    agree = values[:, None, :] == values[None, :, :]  # [image, caption, factor]
    return (agree | ~included[None, :, :]).all(dim=-1)


def multi_positive_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    def one_way(scores, mask):
        return -(torch.logsumexp(scores.masked_fill(~mask, -torch.inf), dim=1) - torch.logsumexp(scores, dim=1)).mean()

    return (one_way(logits, positive) + one_way(logits.T, positive.T)) / 2


@torch.no_grad()
def zero_shot_accuracy(model, world: ToyWorld, n: int = 1000, seed: int = 12345) -> dict[str, float]:
    """Per-factor zero-shot accuracy on ``n`` images drawn with ``seed`` (:func:`factor_accuracy`), of a
    model in training (standardised inputs: folded for the evaluation, then unfolded)."""
    model.eval()
    fold_input_standardisation(model.vision)
    try:
        return factor_accuracy(model, world.sample(n, seed=seed))
    finally:
        fold_input_standardisation(model.vision, unfold=True)
        model.train()


def _weight_decayed(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim >= 2 and "embed" not in name.lower() and "W_pos" not in name


def _adamw(module: torch.nn.Module, lr: float, image_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW with weight decay 0.05 on matrices (not embeddings); the image tower's rate scaled."""
    groups = {}
    for name, param in module.named_parameters():
        scale = image_lr_scale if name.startswith("vision.") else 1.0
        decay = 0.05 if _weight_decayed(name, param) else 0.0
        groups.setdefault((scale, decay), []).append(param)
    return torch.optim.AdamW(
        [{"params": ps, "lr": lr * scale, "weight_decay": decay} for (scale, decay), ps in groups.items()], lr=lr
    )


def _cosine(optimizer: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )


def pretrain_image_tower(model, world: ToyWorld, steps: int, batch_size: int, lr: float, warmup: int,
                         log_every: int = 100) -> None:
    """Train the image tower alone to read every factor (cross-entropy of one linear probe per factor on
    the image embedding), before the contrastive phase: a warm start, as LiT starts from a pretrained tower.
    """
    heads = torch.nn.ModuleDict({f: torch.nn.Linear(model.vision.cfg.d_proj, len(v)) for f, v in FACTORS.items()})
    optimizer = _adamw(torch.nn.ModuleDict({"vision": model.vision, "heads": heads}), lr)
    schedule = _cosine(optimizer, warmup, steps)
    model.vision.train()
    start = time.time()
    for step in range(1, steps + 1):
        batch = world.sample(batch_size)
        embed = model.vision((batch.images - PIXEL_MEAN) / PIXEL_STD)
        losses = {f: F.cross_entropy(heads[f](embed), batch.factors[f]) for f in FACTORS}
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.vision.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"image tower {step:>6}/{steps}  loss {loss.item():.3f}  {time.time() - start:7.0f}s  "
                  + "  ".join(f"{f} {l.item():.2f}" for f, l in losses.items()), flush=True)


def train(
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    warmup: int = 300,
    log_every: int = 100,
    threads: int | None = None,
    checkpoint_every: int = 0,
    out: str | None = None,
    fix_probability: float = 0.5,
    fix: tuple[str, ...] = ("colour", "size"),
    init: str | None = None,
    focus_probability: float = 0.0,
    supervised_steps: int = 0,
    image_lr_scale: float = 1.0,
):
    if threads:
        torch.set_num_threads(threads)
    model = build_toy_clip(seed=seed)
    if init:
        from vit_lens.toy.model import load_toy_clip

        model.load_state_dict(load_toy_clip(init).state_dict())
        fold_input_standardisation(model.vision, unfold=True)
    world = ToyWorld(seed=seed)
    rng = np.random.default_rng(seed + 1)
    start = time.time()
    if supervised_steps:
        pretrain_image_tower(model, world, supervised_steps, batch_size, lr, warmup, log_every)
        if out:
            fold_input_standardisation(model.vision)
            save_toy_clip(model, f"{out}.supervised", {"supervised_steps": supervised_steps})
            fold_input_standardisation(model.vision, unfold=True)
    optimizer = _adamw(model, lr, image_lr_scale)
    schedule = _cosine(optimizer, warmup, steps)
    model.train()
    for step in range(1, steps + 1):
        focus = list(FACTORS)[rng.integers(len(FACTORS))] if rng.random() < focus_probability else None
        # A focus batch varies in its focus factor alone and its captions name only that factor.
        fixed = {}
        for name in (n for n in FACTORS if n != focus) if focus else fix:
            if focus or rng.random() < fix_probability:
                fixed[name] = FACTORS[name][rng.integers(len(FACTORS[name]))]
        batch = world.sample(batch_size, **fixed)
        captions, included = sample_captions(batch, rng, focus=focus)
        image = model.encode_image((batch.images - PIXEL_MEAN) / PIXEL_STD, normalize=True)
        text = model.encode_text(captions, normalize=True)
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
        loss = multi_positive_loss(logits, positives(batch.factors, included))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            line = f"step {step:>6}/{steps}  loss {loss.item():.3f}  {time.time() - start:7.0f}s"
            if step % (log_every * 5) == 0 or step == steps:
                accuracy = zero_shot_accuracy(model, world, n=500)
                line += "  " + "  ".join(f"{k} {100 * v:.0f}%" for k, v in accuracy.items())
            print(line, flush=True)
        if checkpoint_every and out and step % checkpoint_every == 0 and step < steps:
            fold_input_standardisation(model.vision)
            save_toy_clip(model, f"{out}.step{step}", {"step": step})
            fold_input_standardisation(model.vision, unfold=True)
    fold_input_standardisation(model.vision)
    return model, time.time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the safetensors checkpoint")
    parser.add_argument("--steps", type=int, default=3500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=0, help="also save OUT.step<N> every N steps")
    parser.add_argument("--fix-probability", type=float, default=0.5,
                        help="probability that a batch shares one colour (and, independently, one size, ...)")
    parser.add_argument("--fix", default="colour,size", help="factors that may be fixed batch-wide (comma-separated)")
    parser.add_argument("--init", default=None, help="start from this checkpoint (a second training phase)")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--supervised-steps", type=int, default=0,
                        help="first train the image tower alone for this many steps (a linear probe per factor)")
    parser.add_argument("--image-lr-scale", type=float, default=1.0,
                        help="the image tower's learning rate in the contrastive phase, relative to --lr (0: locked)")
    parser.add_argument("--focus-probability", type=float, default=0.0,
                        help="probability of a focus batch: one factor (chosen uniformly) varies, every other one is "
                             "fixed batch-wide, and every caption names that factor alone")
    args = parser.parse_args(argv)
    model, seconds = train(args.steps, args.batch_size, args.lr, args.seed, warmup=args.warmup, threads=args.threads,
                           checkpoint_every=args.checkpoint_every, out=args.out, fix_probability=args.fix_probability,
                           fix=tuple(args.fix.split(",")), init=args.init,
                           focus_probability=args.focus_probability, supervised_steps=args.supervised_steps,
                           image_lr_scale=args.image_lr_scale)
    model.eval()  # train() returns the model with the standardisation folded in: raw [0, 1] pixels
    accuracy = factor_accuracy(model, ToyWorld(seed=args.seed).sample(2000, seed=12345))
    card = {
        "trained": datetime.date.today().isoformat(),
        "command": "python -m vit_lens.toy.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_seconds": round(seconds),
        "torch": torch.__version__,
        "vision_config": VISION_CONFIG,
        "text_config": TEXT_CONFIG,
        "zero_shot_accuracy_at_save": accuracy,
    }
    save_toy_clip(model, args.out, card)
    print("final zero-shot accuracy: " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in accuracy.items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
