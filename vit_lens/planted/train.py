"""Train the planted classifier with strict interchange interventions (seeded and reproducible).

    python -m vit_lens.planted.train --out classifier.safetensors --seed 0 --threads 2

The model card (``vit_lens/planted/MODEL_CARD.md``) gives the exact command of the shipped model.

Every step draws fresh base images of the toy world and, for each base, a source image and an
intervention, and sums three losses:

* **Task:** cross-entropy of every factor's slice of the logits on the clean base run.
* **Strict interchange intervention (SIIT, after Gupta et al. 2024, "InterpBench: Semi-Synthetic
  Transformers for Evaluating Mechanistic Interpretability Techniques"):** the base is run again
  with some components' outputs replaced by the source run's, through the model's own hooks
  (``run_with_hooks`` on ``blocks.{l}.attn.hook_z`` and ``blocks.{l}.hook_mlp_out``, the source's
  activations from ``run_with_cache``). Each base picks one factor (or none): the planted heads of
  that factor are patched at every position (for the two-hop ``position``, hop 1 alone, hop 2
  alone or both), and the target is the base's labels with that factor set to the source's value.
  Half the sources differ from their base in the chosen factor alone (``differing_scene``), half
  are random images; with a random source each other factor's heads are patched too with
  probability 0.15 (each factor's heads carry that factor whatever the others carry). Independently,
  every inert head and MLP is resampled from the same source with probability one half, and so is,
  at the CLS position only, each head that writes into patches (hop 1 of ``position`` must reach CLS
  through hop 2, not directly); the targets of the factors not patched stay the base's.
* **Attention:** each planted head's attention, from the queries it serves (CLS, or every patch for
  a head that writes into patches), is pulled onto the token group it reads (object or background
  patches, from the world's exact masks), CLS itself allowed as a resting place: the loss is
  ``-log(mass on group + mass on CLS)``. This makes the "reads" column of the truth hold.

Inputs are standardised during training, ``(image - 0.5) / 0.25`` (as the toy CLIP), and the
standardisation is folded into the patch embedding before saving, so the shipped model takes [0, 1]
images.
"""

import argparse
import datetime
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from vit_lens.planted.model import (
    CLASSIFIER_CONFIG,
    PlantedModel,
    build_classifier,
    factor_slices,
    save_classifier,
)
from vit_lens.planted.truth import (
    CLASSIFIER_HEADS,
    CLASSIFIER_INERT_MLPS,
    CLS,
    OBJECT_PATCHES,
    heads_by_factor,
    inert_heads,
)
from vit_lens.planted.verify import (
    differing_scene,
    inertness,
    interchange_accuracy,
    task_accuracy,
)
from vit_lens.toy.train import PIXEL_MEAN, PIXEL_STD, fold_input_standardisation
from vit_lens.toy.world import FACTORS, ToyWorld

FACTOR_NAMES = list(FACTORS)


def factor_losses(logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: F.cross_entropy(logits[:, s], targets[name]) for name, s in factor_slices().items()}


def object_patches(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[n, n_patches]`` bool: the patch holds at least one object pixel (raster order)."""
    foreground = masks.any(dim=1).float()[:, None]
    return F.max_pool2d(foreground, patch_size).flatten(1).bool()


def attention_loss(patterns: dict[int, torch.Tensor], objects: torch.Tensor) -> torch.Tensor:
    """``-log(mass on the head's token group + mass on CLS)``, averaged over planted heads and queries."""
    losses = []
    for h in CLASSIFIER_HEADS:
        pattern = patterns[h.layer][:, h.head]  # [batch, query, key]
        group = objects if h.reads == OBJECT_PATCHES else ~objects
        allowed = torch.cat([torch.ones_like(group[:, :1]), group], dim=1).float()  # CLS key + patches
        queries = pattern[:, :1] if h.writes == CLS else pattern[:, 1:]
        mass = (queries * allowed[:, None, :]).sum(-1)
        losses.append(-torch.log(mass + 1e-6).mean())
    return torch.stack(losses).mean()


def draw_interventions(world: ToyWorld, batch_size: int, rng: np.random.Generator, n_layers: int, n_heads: int):
    """Base and source scenes, the per-example masks of patched heads and MLPs, and the patched factors.

    Returns ``(bases, sources, head_mask, cls_mask, mlp_mask, chosen)``: ``head_mask[i, l, h]`` patches head
    ``(l, h)`` at every position, ``cls_mask[i, l, h]`` at the CLS position only, ``mlp_mask[i, l]`` the MLP of
    layer ``l``; ``chosen[i]`` is the set of factors whose target becomes the source's value.
    """
    heads = heads_by_factor()
    inert = inert_heads(CLASSIFIER_HEADS, n_layers, n_heads)
    writers = [(h.layer, h.head) for h in CLASSIFIER_HEADS if h.writes != CLS]
    bases = world.sample_scenes(batch_size, seed=int(rng.integers(2**31)))
    sources, chosen = [], []
    head_mask = torch.zeros(batch_size, n_layers, n_heads, dtype=torch.bool)
    cls_mask = torch.zeros(batch_size, n_layers, n_heads, dtype=torch.bool)
    mlp_mask = torch.zeros(batch_size, n_layers, dtype=torch.bool)
    for i, scene in enumerate(bases):
        pick = int(rng.integers(len(FACTOR_NAMES) + 1))
        factor = FACTOR_NAMES[pick] if pick < len(FACTOR_NAMES) else None
        factors = set()
        if factor is not None and rng.random() < 0.5:
            sources.append(differing_scene(world, scene, factor, rng))
            factors.add(factor)
        else:
            sources.append(world.sample_scene(rng))
            if factor is not None:
                factors.add(factor)
                # A random source: sometimes patch a second factor's heads too (each factor's heads carry it
                # whatever the others' heads carry).
                for other in FACTOR_NAMES:
                    if other != factor and rng.random() < 0.15:
                        factors.add(other)
        for name in factors:
            route = heads[name]
            if len(route) > 1:  # a multi-hop route: one hop alone, or all of them
                k = int(rng.integers(len(route) + 1))
                route = route if k == len(route) else [route[k]]
            for layer, head in route:
                head_mask[i, layer, head] = True
        for layer, head in inert:
            head_mask[i, layer, head] = rng.random() < 0.5
        # A head that writes into patches carries nothing to CLS directly: its CLS output is inert.
        for layer, head in writers:
            cls_mask[i, layer, head] = rng.random() < 0.5
        for layer in CLASSIFIER_INERT_MLPS:
            mlp_mask[i, layer] = rng.random() < 0.5
        chosen.append(factors)
    return bases, sources, head_mask, cls_mask, mlp_mask, chosen


def interchange_hooks(source_cache, head_mask: torch.Tensor, mlp_mask: torch.Tensor, n_layers: int,
                      cls_mask: torch.Tensor | None = None) -> list:
    """Hooks that take each example's masked heads (``hook_z``) and MLPs from the source run.

    ``head_mask`` ``[batch, layer, head]`` patches every position, ``cls_mask`` (same shape) the CLS position only.
    """
    if cls_mask is None:
        cls_mask = torch.zeros_like(head_mask)

    def patch_z(layer: int):
        def hook(z, hook):
            mask = head_mask[:, None, layer, :].expand(-1, z.shape[1], -1).clone()  # [batch, pos, head]
            mask[:, 0] |= cls_mask[:, layer]
            return torch.where(mask[..., None], source_cache[f"blocks.{layer}.attn.hook_z"], z)

        return hook

    def patch_mlp(layer: int):
        mask = mlp_mask[:, layer, None, None]

        def hook(out, hook):
            return torch.where(mask, source_cache[f"blocks.{layer}.hook_mlp_out"], out)

        return hook

    touched = head_mask | cls_mask
    hooks = [(f"blocks.{l}.attn.hook_z", patch_z(l)) for l in range(n_layers) if touched[:, l].any()]
    return hooks + [(f"blocks.{l}.hook_mlp_out", patch_mlp(l)) for l in range(n_layers) if mlp_mask[:, l].any()]


def evaluate_planted(planted: PlantedModel, n: int = 256) -> dict:
    """Task accuracy, interchange accuracy (each factor, and each hop of a multi-hop route alone) and inertness."""
    result = {
        "task_accuracy": task_accuracy(planted, n=n),
        "interchange_accuracy": {f: interchange_accuracy(planted, f, n=n) for f in FACTORS},
        "inertness": inertness(planted, n=n),
    }
    for factor, route in planted.heads.items():
        if len(route) > 1:
            for layer, head in route:
                result["interchange_accuracy"][f"{factor} via L{layer}H{head} alone"] = interchange_accuracy(
                    planted, factor, n=n, heads=[(layer, head)]
                )
    return result


def evaluate(model, n: int = 256) -> dict:
    """:func:`evaluate_planted` of a classifier being trained (its input standardisation folded for the measurement)."""
    fold_input_standardisation(model)
    model.eval()
    try:
        planted = PlantedModel(model, heads_by_factor(), inert_heads(CLASSIFIER_HEADS, model.cfg.n_layers,
                               model.cfg.n_heads), list(CLASSIFIER_INERT_MLPS))
        return evaluate_planted(planted, n=n)
    finally:
        fold_input_standardisation(model, unfold=True)
        model.train()


def summary(result: dict) -> str:
    """One line of the figures :func:`evaluate_planted` measures, in percent."""
    task = " ".join(f"{k} {100 * v:.1f}" for k, v in result["task_accuracy"].items())
    iia = " ".join(f"{k} {100 * v:.1f}" for k, v in result["interchange_accuracy"].items())
    worst = max(result["inertness"].items(), key=lambda kv: kv[1])
    return f"task [{task}]  interchange [{iia}]  worst inert {worst[0]} {100 * worst[1]:.1f}%"


def train(steps: int, batch_size: int, lr: float, seed: int, warmup: int = 200, attention_weight: float = 0.5,
          siit_weight: float = 2.0,
          threads: int | None = None, log_every: int = 50, eval_every: int = 500, checkpoint_every: int = 0,
          out: str | None = None, init: str | None = None):
    if threads:
        torch.set_num_threads(threads)
    model = build_classifier(seed=seed)
    if init:
        from vit_lens.planted.model import load_planted

        model.load_state_dict(load_planted("classifier", path=init).model.state_dict())
        fold_input_standardisation(model, unfold=True)
    cfg = model.cfg
    world = ToyWorld(seed=seed)
    rng = np.random.default_rng(seed + 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n and "W_pos" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n and "W_pos" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    names = lambda name: name.endswith(("attn.hook_z", "hook_mlp_out"))
    patterns: dict[int, torch.Tensor] = {}  # layer -> this step's attention pattern, kept with its graph

    def keep_pattern(pattern, hook):
        patterns[int(hook.name.split(".")[1])] = pattern

    model.train()
    start = time.time()
    for step in range(1, steps + 1):
        bases, sources, head_mask, cls_mask, mlp_mask, chosen = draw_interventions(world, batch_size, rng, cfg.n_layers,
                                                                         cfg.n_heads)
        base, source = world.render(bases), world.render(sources)
        base_images = (base.images - PIXEL_MEAN) / PIXEL_STD
        patterns.clear()
        with model.hooks(fwd_hooks=[(lambda n: n.endswith("attn.hook_pattern"), keep_pattern)]):
            logits = model(base_images)
        task = factor_losses(logits, base.factors)
        attend = attention_loss(patterns, object_patches(base.masks, cfg.patch_size[0]))
        with torch.no_grad():
            _, source_cache = model.run_with_cache((source.images - PIXEL_MEAN) / PIXEL_STD, names_filter=names)
        targets = {name: base.factors[name].clone() for name in FACTORS}
        for i, factors in enumerate(chosen):
            for factor in factors:
                targets[factor][i] = source.factors[factor][i]
        patched = model.run_with_hooks(base_images, fwd_hooks=interchange_hooks(source_cache, head_mask, mlp_mask,
                                                                                 cfg.n_layers, cls_mask))
        siit = factor_losses(patched, targets)
        loss = sum(task.values()) + siit_weight * sum(siit.values()) + attention_weight * attend
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step:>5}/{steps}  loss {loss.item():.3f}  task {sum(task.values()).item():.3f}  "
                  f"siit {sum(siit.values()).item():.3f}  attention {attend.item():.3f}  {time.time() - start:6.0f}s  "
                  + " ".join(f"{k} {v.item():.2f}" for k, v in siit.items()), flush=True)
        if eval_every and step % eval_every == 0 and step < steps:
            print("  eval: " + summary(evaluate(model, n=128)), flush=True)
        if checkpoint_every and out and step % checkpoint_every == 0 and step < steps:
            fold_input_standardisation(model)
            save_classifier(model, f"{out}.step{step}", {"step": step})
            fold_input_standardisation(model, unfold=True)
    seconds = time.time() - start
    fold_input_standardisation(model)
    return model.eval(), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the safetensors checkpoint")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--attention-weight", type=float, default=0.5)
    parser.add_argument("--siit-weight", type=float, default=2.0, help="weight of the interchange loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--checkpoint-every", type=int, default=0, help="also save OUT.step<N> every N steps")
    parser.add_argument("--init", default=None, help="start from this checkpoint (a second training phase)")
    args = parser.parse_args(argv)
    model, seconds = train(args.steps, args.batch_size, args.lr, args.seed, warmup=args.warmup,
                           attention_weight=args.attention_weight, siit_weight=args.siit_weight, threads=args.threads, eval_every=args.eval_every,
                           checkpoint_every=args.checkpoint_every, out=args.out, init=args.init)
    fold_input_standardisation(model, unfold=True)  # evaluate() folds it itself
    result = evaluate(model, n=512)
    fold_input_standardisation(model)
    card = {
        "trained": datetime.date.today().isoformat(),
        "command": "python -m vit_lens.planted.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_seconds": round(seconds),
        "torch": torch.__version__,
        "config": CLASSIFIER_CONFIG,
        "measured_at_save": result,
    }
    save_classifier(model, args.out, card)
    print("final: " + summary(result))
    print(f"trained in {seconds:.0f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
