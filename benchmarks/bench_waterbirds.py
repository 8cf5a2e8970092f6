"""Gandelsman et al. (2024), Table 2: Waterbirds worst-group accuracy before and after mean-ablating spurious-cue heads.

Gandelsman et al. read each late head's TextSpan descriptions, picked the "geolocation" and "image
setting" heads, and mean-ablated their direct contributions to the CLIP image embedding. Their
code (``compute_use_specific_heads.py``) also mean-ablates every MLP term (and the embedding term)
and every attention head of the layers before the last four, with means over the Waterbirds test
set itself; ``--extra paper`` (the default) does the same, ``--extra none`` ablates the heads only.

Protocol: zero-shot classes ("landbird", "waterbird") x the 80 OpenAI ImageNet templates; test
split (5,794 images); groups 2 * y + place; decomposition ``level="head", ln_mode="paper",
normalize=True`` written to disk once (resumable) with ``vit_lens.intervene.store``; "base" is the unmodified
model; "random" is the best worst-group accuracy of 5 draws of 10 random heads from the last
four layers, with the same extra ablations (the paper does not say which heads it drew from).

Usage:
    python benchmarks/bench_waterbirds.py --model open_clip:ViT-L-14 --pretrained laion2b_s32b_b82k \\
        --data /data/waterbird_complete95_forest2water2
    python benchmarks/bench_waterbirds.py --data PATH --limit 600 --batch-size 64      # a quick subset
    python benchmarks/bench_waterbirds.py --heads L11H6,L11H0 --extra none             # your own heads
    python benchmarks/bench_waterbirds.py --smoke     # random weights on a synthetic folder: checks the pipeline only

Without the dataset or the weights it prints what it needs and exits with status 2.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

PAPER_TAGS = {"ViT-B-16": "laion2b_s34b_b88k", "ViT-L-14": "laion2b_s32b_b82k", "ViT-H-14": "laion2b_s32b_b79k"}
# Table 2 and appendix tables, percent. Groups in id order 2 * y + place:
# landbird on land, landbird on water, waterbird on land, waterbird on water.
PAPER = {
    "ViT-B-16": {"worst": (45.6, 52.3, 57.5), "average": (76.7, 83.8),
                 "base": (96.1, 45.6, 63.5, 86.1), "ours": (94.3, 57.5, 81.6, 80.5)},
    "ViT-L-14": {"worst": (47.7, 57.7, 72.9), "average": (73.1, 84.2),
                 "base": (94.8, 47.7, 66.2, 93.1), "ours": (94.9, 72.9, 77.8, 92.1)},
    "ViT-H-14": {"worst": (37.2, 37.0, 43.3), "average": (77.0, 84.1),
                 "base": (96.4, 71.0, 37.2, 69.8), "ours": (98.0, 87.9, 43.3, 62.3)},
}


class OnDevice:
    """Batches moved to ``device`` on the fly; keeps the loader's length (progress, resuming)."""

    def __init__(self, batches, device: torch.device):
        self.batches, self.device = batches, device

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            yield images.to(self.device, non_blocking=True)


def weights_need(model: str, pretrained: str | None) -> str:
    return (
        f"  - the open_clip weights {model} / {pretrained}: open_clip downloads them from the Hugging Face hub on "
        "first use (needs network once; then they are cached), or pass --pretrained /path/to/checkpoint "
        "(e.g. open_clip_pytorch_model.bin of that model)."
    )


def exit_needs(script: str, needs: list[str]) -> int:
    print(f"{script} cannot run yet. It needs:", file=sys.stderr)
    for need in needs:
        print(need, file=sys.stderr)
    return 2


def load_clip(model: str, pretrained: str | None, device: torch.device):
    """A HookedCLIP on ``device``, or None after printing why the weights could not be loaded."""
    from vit_lens import HookedCLIP

    try:
        clip = HookedCLIP.from_pretrained(model, pretrained)
    except Exception as error:  # any failure to get weights is reported the same way: what is needed
        print(f"Loading {model} / {pretrained} failed: {type(error).__name__}: {error}", file=sys.stderr)
        return None
    return clip.to(device).eval()


def decomposition_check(clip, store, batches, device) -> float:
    """Largest |sum of the stored terms - normalised embedding| over the first batch."""
    images = next(iter(OnDevice(batches, device)))
    with torch.no_grad():
        embedding = clip.encode_image(images, normalize=True).float().cpu()
    return (store[: len(images)].sum(dim=1) - embedding).abs().max().item()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synthetic_waterbirds(root: Path, per_group: int = 4) -> Path:
    """A small Waterbirds-layout folder of random images (for --smoke)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for i in range(4 * per_group):
        y, place = (i % 4) // 2, i % 2
        name = f"{y:03d}.bird/img_{i}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(64, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / name)
        lines.append(f"{i},{name},{y},2,{place},none.jpg")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="open_clip:ViT-B-16", help="open_clip:<arch> (default: %(default)s)")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag or checkpoint path (default: the paper's laion2b tag for the arch)")
    parser.add_argument("--data", default=None, help="the waterbird_complete95_forest2water2 folder (with metadata.csv)")
    parser.add_argument("--limit", type=int, default=None, help="use N test images, evenly spaced (default: all 5,794)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--heads", default="paper",
                        help="'paper' (the heads the paper's code ablates for this arch) or comma-separated labels, e.g. L11H6,L11H0")
    parser.add_argument("--extra", default="paper", choices=["paper", "none", "mlps", "early_layers"],
                        help="further mean-ablations in 'after' (default: the paper code's: MLPs + attention before the last 4 layers)")
    parser.add_argument("--random-trials", type=int, default=5)
    parser.add_argument("--random-heads", type=int, default=10)
    parser.add_argument("--store", default=None, help="where the decomposition goes (default: vit_lens_runs/waterbirds_...)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--smoke", action="store_true",
                        help="random weights on a 16-image synthetic folder: checks the pipeline, numbers mean nothing")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    arch = args.model.split(":", 1)[-1]
    script = "bench_waterbirds.py"
    temporary = tempfile.TemporaryDirectory() if args.smoke else None
    if args.smoke:
        args.data = str(synthetic_waterbirds(Path(temporary.name) / "waterbirds"))
        args.pretrained, args.store = None, str(Path(temporary.name) / "store")
    elif args.pretrained is None:
        args.pretrained = PAPER_TAGS.get(arch)
        if args.pretrained is None:
            return exit_needs(script, [f"  - --pretrained: no paper default for {arch}; pass an open_clip tag or checkpoint."])

    from vit_lens.loading.datasets import WATERBIRDS_GROUP_NAMES, WATERBIRDS_URL, Waterbirds, image_batches, subset_tensor
    from vit_lens.methods.textspan.spurious import paper_waterbirds_heads, random_heads_baseline, spurious_cue_removal, waterbirds_classifier
    from vit_lens.intervene.store import compute_contributions_to_disk

    data_need = (
        f"  - the Waterbirds dataset (Sagawa et al., 2019): download {WATERBIRDS_URL}, extract it, and pass "
        "--data /path/to/waterbird_complete95_forest2water2 (the folder holding metadata.csv and the image folders)."
    )
    if args.data is None:
        return exit_needs(script, [data_need, weights_need(args.model, args.pretrained)])
    try:
        Waterbirds(args.data, "test")
    except (FileNotFoundError, ValueError) as error:
        return exit_needs(script, [data_need + f"\n    ({error})", weights_need(args.model, args.pretrained)])
    if args.heads == "paper":
        try:
            heads = paper_waterbirds_heads(arch)
        except KeyError as error:
            return exit_needs(script, [f"  - --heads L<layer>H<head>,...: {error.args[0]}"])
    else:
        heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    extra = () if args.extra == "none" else args.extra

    device = pick_device(args.device)
    clip = load_clip(args.model, args.pretrained, device)
    if clip is None:
        return exit_needs(script, [weights_need(args.model, args.pretrained)])
    dataset = Waterbirds(args.data, "test", transform=clip.preprocess)
    batches = image_batches(dataset, args.batch_size, limit=args.limit, num_workers=args.num_workers)
    labels, groups = subset_tensor(dataset.labels, args.limit), subset_tensor(dataset.groups, args.limit)
    store_dir = Path(args.store or f"vit_lens_runs/waterbirds_test_{arch}_{Path(str(args.pretrained)).name}_{args.limit or 'all'}")

    start = time.perf_counter()
    store = compute_contributions_to_disk(clip, OnDevice(batches, device), store_dir, level="head", ln_mode="paper",
                                          normalize=True, shard_batches=max(1, 2048 // args.batch_size))
    decompose_s = time.perf_counter() - start
    if len(store) != len(labels):
        print(f"{store_dir} holds {len(store)} images but this run has {len(labels)}; use another --store", file=sys.stderr)
        return 1
    check = decomposition_check(clip, store, batches, device)
    with torch.no_grad():
        classifier = waterbirds_classifier(clip).float()
    start = time.perf_counter()
    result = spurious_cue_removal(store, classifier, labels, groups, heads, extra=extra, group_names=WATERBIRDS_GROUP_NAMES)
    control = random_heads_baseline(store, classifier, labels, groups, n_heads=args.random_heads,
                                    trials=args.random_trials, extra=extra, group_names=WATERBIRDS_GROUP_NAMES)
    ablate_s = time.perf_counter() - start

    paper = PAPER.get(arch) if args.pretrained == PAPER_TAGS.get(arch) else None
    print(f"\nWaterbirds test, {len(labels)} images{' (SMOKE TEST: random weights, synthetic images; numbers mean nothing)' if args.smoke else ''}")
    print(f"{args.model} / {args.pretrained}, device {device}; decomposition {decompose_s:.1f} s "
          f"(store {store_dir}), ablations {ablate_s:.2f} s")
    print(f"check: max |sum of terms - normalised embedding| on the first batch = {check:.2e}")
    print(f"ablated heads ({len(result.heads)}): {', '.join(result.heads)}")
    print(f"extra ablations: {args.extra} ({len(result.ablated) - len(result.heads)} further components)")
    if paper is None:
        print(f"(paper numbers are for {', '.join(f'{a} {t}' for a, t in PAPER_TAGS.items())} on all 5,794 images)")
    print(f"\n{'group':<22} {'n':>5} {'base':>7} {'paper':>7}  {'after':>7} {'paper':>7}")
    for i, name in enumerate(WATERBIRDS_GROUP_NAMES):
        if name not in result.before.per_group:
            continue
        ref = (f"{paper['base'][i]:7.1f}", f"{paper['ours'][i]:7.1f}") if paper else ("      -", "      -")
        print(f"{name:<22} {result.before.counts[name]:>5} {100 * result.before.per_group[name]:7.1f} {ref[0]}  "
              f"{100 * result.after.per_group[name]:7.1f} {ref[1]}")
    worst = paper["worst"] if paper else None
    print(f"\n{'':<28}{'measured':>9} {'paper':>7}")
    rows = [("worst group, base", result.before.worst_group, worst and worst[0]),
            (f"worst group, random x{args.random_trials}", control.best.worst_group, worst and worst[1]),
            ("worst group, after", result.after.worst_group, worst and worst[2]),
            ("average, base", result.before.average, paper and paper["average"][0]),
            ("average, after", result.after.average, paper and paper["average"][1])]
    if result.extra_only is not None:
        rows.insert(2, ("worst group, extras only", result.extra_only.worst_group, None))
    for name, value, reference in rows:
        print(f"{name:<28}{100 * value:9.1f} {reference if reference is not None else '-':>7}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "pretrained": args.pretrained, "n_images": len(labels), "heads": result.heads,
            "extra": args.extra, "before": vars(result.before), "after": vars(result.after),
            "extra_only": vars(result.extra_only) if result.extra_only else None,
            "random_best_worst_group": control.best.worst_group,
            "random_worst_groups": [t.worst_group for t in control.trials], "random_heads": control.heads,
            "decomposition_check": check, "paper": paper, "smoke": args.smoke,
        }, indent=2))
    if temporary is not None:
        temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
