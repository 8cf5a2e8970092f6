"""Beyond CLIP end to end on the toy world: align "non-CLIP" towers to the toy CLIP, score, interpret, ablate.

Two image towers play the non-CLIP model; the toy CLIP (``vit_lens.load_toy_clip()``) is the target:

* ``tower``: the toy CLIP's own image tower with its projection removed (its representation is the
  final-LayerNorm CLS vector, 128-d). Its exact maps into CLIP space are all ``W_proj``, so the
  trained maps can be checked against a known answer: the component scores they give should rank
  components as CLIP's own decomposition does.
* ``random``: a timm ``VisionTransformer`` (64 px, 8 px patches, 4 layers x 3 heads, width 192)
  with random weights, converted with ``HookedViT.from_timm``: features that know nothing about
  the world, a floor for the alignment.

For each: decompose ``--train`` ToyWorld images per head (``ln_mode="paper"``), fit the maps
(``train_aligner``) to the CLIP image embeddings, and on ``--test`` fresh images print: the
alignment cosine, zero-shot accuracy per factor through the aligned representation (CLIP's own in
brackets), the top components per factor (score and property-specific score) next to CLIP's own
top components, the Spearman correlation of each factor's component scores with CLIP's, TextSpan
descriptions of the top colour component through the maps, and the effect on zero-shot accuracy
of mean-ablating the top-3 texture-specific components.

Usage:
    python benchmarks/bench_align.py                     # 3000 train / 1000 test images, about a minute
    python benchmarks/bench_align.py --train 800 --test 400 --epochs 10   # smoke run
"""

import argparse
import dataclasses
import time

import torch

from vit_lens import HookedViT, load_toy_clip
from vit_lens.methods.alignment.compalign import (
    ComponentAligner,
    alignment_data,
    component_scores,
    interpret_components,
    property_embeddings,
    train_aligner,
)
from vit_lens.methods.textspan.spurious import mean_ablate_components
from vit_lens.toy import FACTORS, ToyWorld, description_pool, factor_prompts


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def zero_shot(representation: torch.Tensor, classifiers: dict, labels: dict) -> dict[str, float]:
    out = {}
    for factor, classifier in classifiers.items():
        predictions = (representation @ classifier).argmax(dim=-1)
        out[factor] = float((predictions == labels[factor]).float().mean())
    return out


def tower_without_projection(clip) -> HookedViT:
    vision = clip.vision
    cfg = dataclasses.replace(vision.cfg, d_proj=None, model_name="toy CLIP tower without W_proj")
    plain = HookedViT(cfg).eval()
    plain.load_state_dict({k: v for k, v in vision.state_dict().items() if k != "W_proj"})
    return plain


def random_timm_tower(seed: int) -> HookedViT:
    import timm

    torch.manual_seed(seed)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=4,
                               num_classes=0)
    return HookedViT.from_timm(source.eval())


def batches(images: torch.Tensor, size: int = 250) -> list[torch.Tensor]:
    return [images[i : i + size] for i in range(0, len(images), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    clip = load_toy_clip()
    train = ToyWorld(seed=args.seed).sample(args.train)
    test = ToyWorld(seed=args.seed + 1).sample(args.test)
    factors = list(FACTORS)
    properties = property_embeddings(clip, {f: factor_prompts(f) for f in factors}, templates=["{}"])
    classifiers = {f: emb.T for f, emb in properties.items()}  # zero-shot classes = the factor's prompts

    with torch.no_grad():
        clip_parts, clip_test = alignment_data(clip.vision, clip, batches(test.images), progress=False)
    clip_scores = component_scores(clip_parts, properties)
    clip_accuracy = zero_shot(torch.nn.functional.normalize(clip_test, dim=-1), classifiers, test.factors)
    print(f"toy CLIP itself, {args.test} test images: zero-shot " +
          ", ".join(f"{f} {100 * a:.1f}%" for f, a in clip_accuracy.items()))
    print(clip_scores.report(k=3))

    pool_texts, _ = description_pool(1)
    pool = clip.encode_text(pool_texts, normalize=True).detach()
    models = {"tower": tower_without_projection(clip), "random": random_timm_tower(args.seed)}
    for name, model in models.items():
        print(f"\n=== {name}: {model.cfg.model_name} (d_model {model.cfg.d_model}) ===")
        start = time.perf_counter()
        with torch.no_grad():
            parts, targets = alignment_data(model, clip, batches(train.images), progress=False)
            test_parts, test_targets = alignment_data(model, clip, batches(test.images), progress=False)
        decompose_s = time.perf_counter() - start
        start = time.perf_counter()
        fit = train_aligner(parts, targets, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            seed=args.seed, progress=False)
        train_s = time.perf_counter() - start
        aligner = fit.aligner
        print(f"decompose {decompose_s:.1f} s, CompAlign {train_s:.1f} s: {fit.report()}")
        with torch.no_grad():
            aligned = aligner.aligned_sum(test_parts.values)
        test_cos = float(torch.nn.functional.cosine_similarity(aligned, test_targets, dim=-1).mean())
        accuracy = zero_shot(torch.nn.functional.normalize(aligned, dim=-1), classifiers, test.factors)
        print(f"test alignment cosine {test_cos:.4f}; zero-shot through the maps (CLIP's own): " +
              ", ".join(f"{f} {100 * a:.1f}% ({100 * clip_accuracy[f]:.1f})" for f, a in accuracy.items()))

        scores = component_scores(test_parts, properties, aligner=aligner)
        print(scores.report(k=3))
        print(scores.report(k=3, specific=True))
        if name == "tower":
            exact = ComponentAligner.from_weights(test_parts.labels, clip.vision.W_proj.detach().repeat(
                len(test_parts.labels), 1, 1), torch.zeros(clip.vision.cfg.d_proj))
            exact_scores = component_scores(test_parts, properties, aligner=exact)
            gap = float((exact_scores.scores - clip_scores.scores).abs().max())
            print(f"exact maps (W_proj) reproduce CLIP's scores: max |difference| {gap:.2e}")
            print("Spearman(trained-map scores, CLIP's own scores) per factor: " + ", ".join(
                f"{f} {spearman(scores[f], clip_scores[f]):.3f}" for f in factors))

        top_colour = scores.ranking("colour")[0]
        roles = interpret_components(test_parts, aligner, pool, components=[top_colour], n_texts=4,
                                     texts=pool_texts, rank=64, progress=False)
        print(f"TextSpan of {top_colour} through the maps: {roles[top_colour].texts}")

        texture_heads = scores.mask("texture", 3, specific=True)
        with torch.no_grad():
            ablated_parts = aligner.align(test_parts).values
        ablated = mean_ablate_components(ablated_parts, texture_heads, labels=test_parts.labels)
        after = zero_shot(torch.nn.functional.normalize(ablated, dim=-1), classifiers, test.factors)
        chosen = [label for label, keep in zip(scores.labels, texture_heads.tolist()) if keep]
        print(f"mean-ablating {chosen} (top texture-specific): " +
              ", ".join(f"{f} {100 * accuracy[f]:.1f}% -> {100 * a:.1f}%" for f, a in after.items()))


if __name__ == "__main__":
    main()
