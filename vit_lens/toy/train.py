"""Train the toy CLIP contrastively on the toy world (seeded and reproducible).

    python -m vit_lens.toy.train --out vit_lens/toy/toy_clip.safetensors

Each step draws fresh images and, for each image, a caption that mentions a random subset of its
factors (the full caption 30% of the time, otherwise each factor with probability one half). Short
captions are what make single-factor prompts ("red object", "striped background") work for
zero-shot classification.

Colour, size, texture and count together nearly identify an image within a batch of 128, so once
they are learnt the contrastive loss has little reason to learn shape and position. Each step
therefore fixes factors batch-wide: each factor named in ``--fix`` (default colour and size) is,
with probability ``--fix-probability`` and independently of the others, given one value for the
whole batch, which leaves the remaining factors to tell the images apart. The shipped model was
trained in phases from each other's checkpoints (``--init``); its model card gives the commands. Because a short caption fits many images of a batch, the loss counts
every consistent image-caption pair as a positive: it maximises the log of the softmax mass on
all positives, in both directions (a multi-positive InfoNCE).
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


def sample_captions(batch, rng: np.random.Generator, full_fraction: float = 0.3):
    """One partial caption per image, and ``included[i, f]``: caption i mentions factor f."""
    names = list(FACTORS)
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
    """Per-factor zero-shot accuracy on ``n`` images drawn with ``seed`` (:func:`factor_accuracy`)."""
    model.eval()
    result = factor_accuracy(model, world.sample(n, seed=seed))
    model.train()
    return result


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
):
    if threads:
        torch.set_num_threads(threads)
    model = build_toy_clip(seed=seed)
    if init:
        from vit_lens.toy.model import load_toy_clip

        model.load_state_dict(load_toy_clip(init).state_dict())
    world = ToyWorld(seed=seed)
    rng = np.random.default_rng(seed + 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n.lower() and "W_pos" not in n]
    others = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n.lower() and "W_pos" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": others, "weight_decay": 0.0}], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    start = time.time()
    for step in range(1, steps + 1):
        fixed = {}
        for name in fix:
            if rng.random() < fix_probability:
                fixed[name] = FACTORS[name][rng.integers(len(FACTORS[name]))]
        batch = world.sample(batch_size, **fixed)
        captions, included = sample_captions(batch, rng)
        image = model.encode_image(batch.images, normalize=True)
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
            save_toy_clip(model, f"{out}.step{step}", {"step": step})
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
    args = parser.parse_args(argv)
    model, seconds = train(args.steps, args.batch_size, args.lr, args.seed, warmup=args.warmup, threads=args.threads,
                           checkpoint_every=args.checkpoint_every, out=args.out, fix_probability=args.fix_probability,
                           fix=tuple(args.fix.split(",")), init=args.init)
    accuracy = zero_shot_accuracy(model, ToyWorld(seed=args.seed), n=2000)
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
