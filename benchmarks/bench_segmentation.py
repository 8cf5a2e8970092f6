"""ImageNet-segmentation with Gandelsman et al.'s decomposition heatmaps and attention baselines (Chefer et al. protocol).

Runs end to end for one open_clip model: every image of ``gtsegs_ijcv.mat`` (or the first ``--limit``)
goes through each method, the map of the model's own zero-shot top-1 ImageNet class is upsampled
(bilinear) to the mask and scored with ``vit_lens.methods.segmentation.maps.SegmentationMetrics``: pixel accuracy
and 2-class mIoU pooled over the dataset, mAP averaged over images.

Usage:
    python benchmarks/bench_segmentation.py --model open_clip:ViT-B-16 --pretrained laion2b_s34b_b88k \\
        --data /path/to/gtsegs_ijcv.mat [--limit 500] [--batch-size 8] [--device cuda] \\
        [--classifier imagenet_classifier_ViT-B-16.pt] [--json results.json]

Methods (``--methods``; default all):
    decomposition   Gandelsman et al. (2024): per-patch direct contributions of every head of every layer (ln_mode="paper",
                    divided by the embedding norm) along the class vector, minus the mean map over all 1000
                    classes, clipped at 0 before the min-max (as their compute_segmentations.py)
    raw_attention   last layer, CLS row, mean over heads (Chefer et al.'s attn_last_layer)
    rollout         attention rollout from layer 1 (--rollout-start-layer), as Chefer et al.'s benchmark
    gradcam         GradCAM on the last attention map, target = CLIP logit of the class (cosine score)
    chefer          gradient-weighted rollout (Chefer et al., ICCV 2021), from layer 0 (--chefer-start-layer).
                    The paper's "Chefer et al. (2021)" row is their CVPR 2021 LRP-weighted method, which
                    vit_lens does not implement: expect different numbers on that row.
LRP and partial LRP (two rows of the paper's table) are not implemented.

Data geometry (``--mode``): "paper_crop" (default) reproduces Gandelsman et al.'s code, which centre-crops the image
(open_clip preprocessing) but squashes the mask to 224 x 224; "resize" squashes both, as Chefer et al.;
"crop" crops both.

The zero-shot classifier (1000 ImageNet classes x 80 templates, open_clip's lists) takes 80,000 text
encodings; ``--classifier PATH`` loads it from a ``torch.save``d ``[d_embed, 1000]`` tensor, or saves it there.

Exit status: 0 after an evaluation. 2 when something it needs is missing (h5py, the data file, the model
weights, or a classifier file it cannot read): it prints exactly what is missing and how to get it, and
evaluates nothing. (Set HF_HUB_OFFLINE=1 to make a missing weights download fail at once instead of retrying.)

Gandelsman et al. (ICLR 2024), table "ImageNet-segmentation", in percent. The table reports one
model; its caption is not in our copy of the paper: most likely ViT-H-14 laion2b_s32b_b79k, the default of
their compute_segmentations.py (unverified). These are pixel accuracy / mIoU / mAP, not three models' accuracies.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PAPER_TABLE = {  # method: (pixel accuracy, mIoU, mAP), percent
    "LRP": (52.81, 33.57, 54.37),
    "partial-LRP": (61.49, 40.71, 72.29),
    "rollout": (60.63, 40.64, 74.47),
    "raw_attention": (65.67, 43.83, 76.05),
    "gradcam": (70.27, 44.50, 70.30),
    "chefer": (69.21, 47.47, 78.29),
    "decomposition": (75.21, 54.50, 81.61),
}
METHODS = ("decomposition", "raw_attention", "rollout", "gradcam", "chefer")
EXIT_MISSING = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="open_clip:ViT-B-16", help="open_clip architecture, e.g. open_clip:ViT-H-14")
    parser.add_argument("--pretrained", default="laion2b_s34b_b88k", help="open_clip pretrained tag or checkpoint file")
    parser.add_argument("--data", help="path to gtsegs_ijcv.mat")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", choices=("paper_crop", "resize", "crop"), default="paper_crop")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--rollout-start-layer", type=int, default=1)
    parser.add_argument("--chefer-start-layer", type=int, default=0)
    parser.add_argument("--classifier", help="torch.save'd [d_embed, 1000] zero-shot classifier: loaded if present, else saved")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be a positive number of images")
    return args


# ---------------------------------------------------------------------------------- requirements


def missing_data_requirements(args: argparse.Namespace) -> list[str]:
    """What is missing to read the data, as lines telling how to get it (empty when all is there)."""
    missing = []
    try:
        import h5py  # noqa: F401
    except ImportError:
        missing.append("h5py, to read gtsegs_ijcv.mat (MATLAB v7.3 = HDF5): pip install h5py")
    where = ("ImageNet-segmentation (Guillaumin et al. 2014, 4,276 images), the gtsegs_ijcv.mat file that "
             "Chefer et al.'s Transformer-Explainability README links to")
    if args.data is None:
        missing.append(f"--data PATH to gtsegs_ijcv.mat: {where}")
    elif not Path(args.data).is_file():
        missing.append(f"--data {args.data}: no such file; it must be gtsegs_ijcv.mat, {where}")
    return missing


def load_clip(args: argparse.Namespace):
    """``(HookedCLIP, None)``, or ``(None, what is missing)`` when the weights could not be had."""
    from vit_lens import HookedCLIP

    try:
        return HookedCLIP.from_pretrained(args.model, args.pretrained), None
    except (OSError, RuntimeError, ValueError) as error:  # download failed, unknown tag, missing file, bad name
        arch = args.model.split(":", 1)[-1]
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if Path(args.pretrained).suffix or "/" in args.pretrained:
            hint = "pass an existing open_clip checkpoint file, or a pretrained tag such as laion2b_s34b_b88k"
        else:
            hint = (f"fetch them once where the Hugging Face hub is reachable (open_clip.create_model({arch!r}, "
                    f"pretrained={args.pretrained!r}) caches them), or pass --pretrained /path/to/checkpoint")
        return None, f"the weights of open_clip {arch} {args.pretrained!r}: {reason}; {hint}"


def load_classifier(clip, args: argparse.Namespace) -> tuple[torch.Tensor | None, str | None]:
    """ImageNet zero-shot classifier [d_embed, 1000] from --classifier, or built (80 templates) and saved there."""
    d_embed = clip.vision.cfg.d_proj
    if args.classifier and Path(args.classifier).is_file():
        try:
            classifier = torch.load(args.classifier, map_location="cpu")
        except Exception as error:  # torch.load raises many types for a file that is not a tensor
            return None, f"a readable classifier at --classifier {args.classifier} ({type(error).__name__}: {error})"
        if not isinstance(classifier, torch.Tensor) or classifier.shape != (d_embed, 1000):
            held = tuple(classifier.shape) if isinstance(classifier, torch.Tensor) else type(classifier).__name__
            return None, (f"a [{d_embed}, 1000] classifier for this model at --classifier {args.classifier}, which "
                          f"holds {held}; delete the file to rebuild it")
        return classifier, None
    import open_clip

    templates = open_clip.OPENAI_IMAGENET_TEMPLATES
    print(f"building the zero-shot classifier: 1000 classes x {len(templates)} templates ...", flush=True)
    start = time.perf_counter()
    classifier = clip.zero_shot_classifier(list(open_clip.IMAGENET_CLASSNAMES), templates, batch_size=25).cpu()
    print(f"  done in {time.perf_counter() - start:.0f} s")
    if args.classifier:
        torch.save(classifier, args.classifier)
        print(f"  saved to {args.classifier}")
    return classifier, None


def report_missing(lines: list[str]) -> int:
    print("bench_segmentation needs, and did not find:")
    for line in lines:
        print(f"  - {line}")
    print("Gandelsman et al.'s table for comparison (pixel acc. / mIoU / mAP, %; one model, most likely ViT-H-14 laion2b):")
    for name, values in PAPER_TABLE.items():
        print(f"  {name:14} {values[0]:6.2f} {values[1]:6.2f} {values[2]:6.2f}")
    return EXIT_MISSING


# ---------------------------------------------------------------------------------- evaluation


def method_maps(method: str, vision, images: torch.Tensor, classifier: torch.Tensor, chosen: torch.Tensor,
                settings: dict) -> torch.Tensor:
    """``[batch, rows, cols]`` map of the chosen class for one method."""
    from vit_lens import segmentation as seg

    if method == "raw_attention":
        return seg.raw_attention(vision, images)
    if method == "rollout":
        return seg.attention_rollout(vision, images, start_layer=settings["rollout_start_layer"])
    target = classifier[:, chosen].T  # [batch, d_embed]
    if method == "gradcam":
        return seg.attention_gradcam(vision, images, target, normalize_output=True)
    if method == "chefer":
        return seg.chefer_relevance(vision, images, target, start_layer=settings["chefer_start_layer"],
                                    normalize_output=True)
    raise ValueError(f"unknown method {method!r}")


def evaluate(vision, classifier: torch.Tensor, loader, methods: list[str], settings: dict, device: str) -> dict:
    """Run every method on every batch; returns {method: metrics dict with images_per_s}."""
    from vit_lens import segmentation as seg

    classifier = classifier.to(device)
    metrics = {m: seg.SegmentationMetrics(clip_negative=(m == "decomposition")) for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    seen = 0
    for images, masks in loader:
        images, masks = images.to(device), masks.to(device)
        batch = torch.arange(len(images), device=device)
        chosen, maps = None, {}
        if "decomposition" in methods:
            start = _clock(device)
            heatmaps, scores = seg.text_heatmaps(vision, images, classifier, return_scores=True)
            chosen = scores.argmax(dim=1)  # the model's own zero-shot top-1, as Gandelsman et al. (2024)
            maps["decomposition"] = heatmaps[batch, chosen]
            seconds["decomposition"] += _clock(device) - start
        if chosen is None:
            with torch.no_grad():
                chosen = (vision(images) @ classifier).argmax(dim=1)
        for method in methods:
            if method == "decomposition":
                continue
            start = _clock(device)
            maps[method] = method_maps(method, vision, images, classifier, chosen, settings)
            seconds[method] += _clock(device) - start
        for method in methods:
            metrics[method].update(seg.upsample(maps[method].float(), masks.shape[-2:]), masks)
        seen += len(images)
        if seen % 200 < len(images):
            summary = ", ".join(f"{m} {metrics[m].compute()['pixel_accuracy'] * 100:.1f}" for m in methods)
            print(f"  {seen} images; pixel accuracy so far: {summary}", flush=True)
    results = {}
    for method in methods:
        results[method] = metrics[method].compute()
        results[method]["images_per_s"] = seen / max(seconds[method], 1e-9)
    return results


def _clock(device: str) -> float:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def print_table(results: dict) -> None:
    print(f"\n{'method':15} {'pixAcc':>7} {'mIoU':>7} {'mAP':>7}   {'paper: pixAcc':>13} {'mIoU':>6} {'mAP':>6}   {'img/s':>7}")
    for method, row in results.items():
        paper = PAPER_TABLE.get(method)
        paper_text = f"{paper[0]:13.2f} {paper[1]:6.2f} {paper[2]:6.2f}" if paper else f"{'-':>13} {'-':>6} {'-':>6}"
        print(f"{method:15} {row['pixel_accuracy'] * 100:7.2f} {row['miou'] * 100:7.2f} {row['map'] * 100:7.2f}   "
              f"{paper_text}   {row['images_per_s']:7.1f}")
    print("paper rows without a vit_lens method: " + ", ".join(
        f"{name} {values[0]:.2f}/{values[1]:.2f}/{values[2]:.2f}" for name, values in PAPER_TABLE.items()
        if name not in results))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_data_requirements(args)
    if missing:
        return report_missing(missing)
    clip, missing_weights = load_clip(args)
    if clip is None:
        return report_missing([missing_weights])
    clip = clip.to(args.device).eval()
    classifier, missing_classifier = load_classifier(clip, args)
    if classifier is None:
        return report_missing([missing_classifier])

    from vit_lens.methods.segmentation.maps import ImageNetSegmentation

    data = ImageNetSegmentation(args.data, image_size=args.image_size, mode=args.mode)
    if args.limit is not None:
        data = torch.utils.data.Subset(data, range(min(args.limit, len(data))))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=args.num_workers, shuffle=False)
    settings = {"rollout_start_layer": args.rollout_start_layer, "chefer_start_layer": args.chefer_start_layer}
    print(f"{args.model} {args.pretrained} on {args.device}; {len(data)} images, mode {args.mode}, "
          f"batch {args.batch_size}; methods: {' '.join(args.methods)}", flush=True)
    results = evaluate(clip.vision, classifier, loader, args.methods, settings, args.device)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "paper": PAPER_TABLE}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
