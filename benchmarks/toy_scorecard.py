"""Ground-truth scorecard of the built-in toy CLIP: what interpretability methods find, checked
against the world's known factors and masks.

    python benchmarks/toy_scorecard.py [--images 2000] [--checkpoint PATH]

Prints, as markdown tables (they go into benchmarks/README.md and the model card):

1. zero-shot accuracy per factor on fresh images (single-factor prompts such as "red object");
2. TextSpan head roles: for every head, its top descriptions from the world's own description pool,
   and for each factor the head whose descriptions are purest for it (share of the head's picks that
   mention the factor);
3. zero-shot segmentation (the text direction of each image's true colour) against the true object masks, with the Chefer et al.
   protocol (threshold at the mean; pixel accuracy, mIoU, mAP), next to raw attention, attention
   rollout, GradCAM and Chefer relevance computed on the same model;
4. activation patching of a colour swap (one object repainted): where the colour is carried, by
   layer and token group (the object's patches, CLS, other patches), and the heads that carry it.
"""

import argparse
import time

import torch

import vit_lens
from vit_lens.intervene.interventions import patch_from_cache
from vit_lens.intervene.patching import activation_patching
from vit_lens.methods.scorecard import localisation_scores
from vit_lens.methods.textspan.textspan import textspan
from vit_lens.toy import (
    FACTORS,
    ToyWorld,
    description_pool,
    factor_accuracy,
)
from vit_lens.viz.report import head_outputs_over


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@torch.no_grad()
def head_roles(clip, images, n_texts: int = 5):
    texts, mentions = description_pool(2)
    pool = clip.encode_text(texts, normalize=True)
    outputs = head_outputs_over(clip.vision, images)  # [N, L, H, d]
    cfg = clip.vision.cfg
    rows, purity = [], {}
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            span = textspan(outputs[:, layer, head], pool, n_texts=n_texts, texts=texts)
            picked = span.indices.tolist()
            shares = {f: sum(f in mentions[i] for i in picked) / len(picked) for f in FACTORS}
            purity[(layer, head)] = shares
            best = max(shares, key=shares.get)
            variance = outputs[:, layer, head].var(0).sum().item()
            rows.append([f"L{layer}H{head}", f"{variance:.4f}", f"{100 * span.variance_explained[-1]:.0f}%",
                         f"{best} ({100 * shares[best]:.0f}%)", "; ".join(span.names()[:3])])
    per_factor = []
    for f in FACTORS:
        (layer, head), shares = max(purity.items(), key=lambda item: (item[1][f], -item[0][0]))
        per_factor.append([f, f"L{layer}H{head}", f"{100 * shares[f]:.0f}%"])
    return rows, per_factor


def segmentation(clip, batch) -> list[list]:
    """The maps of vit_lens.methods.scorecard.localisation_scores (true colour), next to its trivial baselines."""
    return [[r["name"], f"{100 * r['pixel_accuracy']:.1f}", f"{100 * r['miou']:.1f}", f"{100 * r['map']:.1f}",
             f"{100 * r['iou_foreground']:.1f}"] for r in localisation_scores(clip, batch=batch)]


@torch.no_grad()
def colour_patching(clip, world: ToyWorld, n: int = 64):
    """Repaint the single object of ``n`` one-object scenes and patch clean activations back."""
    vision, cfg = clip.vision, clip.vision.cfg
    colours = FACTORS["colour"]
    scenes = world.sample_scenes(n, seed=99, count="one")
    generator = torch.Generator().manual_seed(0)
    swaps = [colours[(colours.index(s.colour) + 1 + int(torch.randint(5, (1,), generator=generator))) % 6] for s in scenes]
    clean = world.render(scenes)
    corrupted = world.render([s.with_object_colour(0, c) for s, c in zip(scenes, swaps)])
    prompts = clip.encode_text([f"{c} object" for c in colours], normalize=True)
    clean_dir = prompts[clean.factors["colour"]]
    corrupt_dir = prompts[torch.tensor([colours.index(c) for c in swaps])]
    difference = clean_dir - corrupt_dir  # [n, d]

    def metric(output):  # [batch]: cos(image, clean colour) - cos(image, corrupted colour)
        reps = torch.nn.functional.normalize(output, dim=-1)
        return (reps * difference.repeat(len(output) // n, 1)).sum(-1)

    _, clean_cache = vision.run_with_cache(clean.images)
    base_clean = metric(vision(clean.images)).mean().item()
    base_corrupt = metric(vision(corrupted.images)).mean().item()
    # token groups per image: the patches the object covers, CLS, and all other patches
    rows_, cols_ = cfg.grid_size
    patch = cfg.patch_size[0] if isinstance(cfg.patch_size, tuple) else cfg.patch_size
    covered = clean.masks[:, 0].float().reshape(n, rows_, patch, cols_, patch).mean((2, 4)).flatten(1) > 0.0  # [n, P]
    group_rows = []
    for layer in range(cfg.n_layers):
        recovered = {}
        for group in ("object patches", "CLS", "other patches"):
            values = []
            for i in range(n):
                patches = torch.nonzero(covered[i]).flatten() + cfg.n_prefix_tokens
                others = torch.nonzero(~covered[i]).flatten() + cfg.n_prefix_tokens
                positions = {"object patches": patches.tolist(), "CLS": [0], "other patches": others.tolist()}[group]
                single = {f"blocks.{layer}.hook_resid_pre": clean_cache[f"blocks.{layer}.hook_resid_pre"][i : i + 1]}
                hook = patch_from_cache(single, positions=positions)
                out = vision.run_with_hooks(corrupted.images[i : i + 1], fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook)])
                reps = torch.nn.functional.normalize(out, dim=-1)
                values.append((reps[0] * difference[i]).sum().item())
            recovered[group] = (sum(values) / n - base_corrupt) / (base_clean - base_corrupt)
        group_rows.append([f"L{layer} resid_pre"] + [f"{100 * recovered[g]:.0f}%" for g in ("object patches", "CLS", "other patches")])
    by_head = activation_patching(vision, corrupted.images, clean_cache, metric, activation="z", by="head").normalized()
    flat = by_head.values.flatten()
    top = flat.argsort(descending=True)[:5].tolist()
    head_rows = [[f"L{i // cfg.n_heads}H{i % cfg.n_heads}", f"{100 * flat[i].item():.0f}%"] for i in top]
    return base_clean, base_corrupt, group_rows, head_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="fresh images for zero-shot accuracy and TextSpan")
    parser.add_argument("--segmentation-images", type=int, default=500)
    parser.add_argument("--patching-images", type=int, default=64)
    parser.add_argument("--checkpoint", default=None, help="another toy checkpoint (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    clip = vit_lens.load_toy_clip(args.checkpoint)
    world = ToyWorld(seed=2024)  # the training run used seed 0; these are fresh images
    card = getattr(clip, "card", {})
    print(f"# Toy CLIP scorecard (trained {card.get('trained', '?')}, {card.get('command', '')})\n")

    batch = world.sample(args.images)
    accuracy = factor_accuracy(clip, batch)
    print(f"## Zero-shot accuracy per factor ({args.images} fresh images; chance in brackets)\n")
    print(table(["factor", "accuracy", "chance"],
                [[f, f"{100 * a:.1f}%", f"{100 / len(FACTORS[f]):.0f}%"] for f, a in accuracy.items()]))

    rows, per_factor = head_roles(clip, batch.images)
    print(f"\n## TextSpan head roles ({args.images} images, 5 texts per head from the {len(description_pool(2)[0])} "
          "world descriptions)\n")
    print(table(["factor", "purest head", "purity (share of its 5 texts naming the factor)"], per_factor))
    print()
    print(table(["head", "output variance", "variance explained by 5 texts", "dominant factor", "top 3 texts"], rows))

    seg = world.sample(args.segmentation_images)
    print(f"\n## Zero-shot segmentation with the true colour's prompt ({args.segmentation_images} images, Chefer et al. "
          "protocol; foreground = all objects)\n")
    print(table(["method", "pixel accuracy", "mIoU", "mAP", "foreground IoU"], segmentation(clip, seg)))

    clean, corrupt, group_rows, head_rows = colour_patching(clip, world, args.patching_images)
    print(f"\n## Activation patching of a colour swap ({args.patching_images} one-object scenes; metric "
          f"cos(image, clean colour) - cos(image, swapped colour): clean {clean:.3f}, corrupted {corrupt:.3f})\n")
    print("Share of the clean metric recovered by patching the clean residual stream into the corrupted run:\n")
    print(table(["patched", "object patches", "CLS", "other patches"], group_rows))
    print("\nHeads whose clean output (hook_z) recovers the most:\n")
    print(table(["head", "recovered"], head_rows))
    print(f"\n(scorecard computed in {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
