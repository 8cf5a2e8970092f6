"""Gandelsman et al. (2024), Sec. 3.2 / Fig. 3 / App. A.2: ImageNet zero-shot accuracy under mean-ablations of direct effects.

Each image's CLIP embedding is split into the direct contributions of the embedding (ln_pre
output), every attention layer and every MLP (``ln_mode="paper", normalize=True``, written to disk
with ``vit_lens.intervene.store``); a mean-ablation replaces terms by their means over the same images (as
the paper's ``compute_ablations.py`` does) and the zero-shot classifier (1000 ImageNet classes x
the 80 OpenAI templates) is applied to the re-summed embedding. Printed:

* base (the unmodified model)                             paper: 70.22 / 75.25 / 77.95
* + MLPs: every MLP term and the embedding term           paper: 67.04 / 74.12 / 76.30
* attention layers 0..l mean-ablated, MLPs kept (Fig. 3: flat until only the last 4 layers remain)
* MLPs + every attention layer but the last 4 (the "other terms" of the paper's TextSpan evaluation;
  the paper gives no number for it alone)
* with ``--class-token``: the class token's own term in every attention layer (the CLS key,
  summed over heads; App. A.2), alone and with the MLPs: paper 69.37 / 74.38 / 76.89 and
  67.32 / 73.87 / 76.29. This needs a second pass over the images (per-token decomposition).

Paper numbers: ViT-B-16 / L-14 / H-14 with laion2b_s34b_b88k / laion2b_s32b_b82k / laion2b_s32b_b79k,
all 50,000 validation images.

Usage:
    python benchmarks/bench_imagenet_ablation.py --model open_clip:ViT-B-16 --data /data/imagenet/val
    python benchmarks/bench_imagenet_ablation.py --data /data/imagenet/val --limit 5000 --class-token
    python benchmarks/bench_imagenet_ablation.py --smoke    # random weights, 4 synthetic classes: pipeline check only

Without the images or the weights it prints what it needs and exits with status 2.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_waterbirds import OnDevice, decomposition_check, exit_needs, load_clip, pick_device, weights_need

PAPER_TAGS = {"ViT-B-16": "laion2b_s34b_b88k", "ViT-L-14": "laion2b_s32b_b82k", "ViT-H-14": "laion2b_s32b_b79k"}
PAPER = {  # percent, ImageNet val
    "ViT-B-16": {"base": 70.22, "mlps": 67.04, "class_token": 69.37, "mlps+class_token": 67.32},
    "ViT-L-14": {"base": 75.25, "mlps": 74.12, "class_token": 74.38, "mlps+class_token": 73.87},
    "ViT-H-14": {"base": 77.95, "mlps": 76.30, "class_token": 76.89, "mlps+class_token": 76.29},
}
N_LATE = 4


def data_need(classnames_available: bool) -> list[str]:
    needs = [
        "  - ImageNet-1k validation images in one folder per class: --data PATH with PATH/<wnid>/<image>.JPEG, 1000 "
        "folders named by WordNet id (n01440764, n01443537, ...), as torchvision's ImageFolder reads them. Get "
        "ILSVRC2012_img_val.tar from image-net.org (free registration) and sort it into class folders (the widely "
        "used valprep.sh does this); PATH may also be the folder that holds such a val/ folder."
    ]
    if not classnames_available:
        needs.append("  - the class names: open_clip's IMAGENET_CLASSNAMES could not be imported here; pass --classnames "
                     "FILE with 1000 lines, one name per class in sorted-wnid order.")
    return needs


def find_image_folder(path: str | None) -> Path | None:
    if path is None:
        return None
    root = Path(path)
    for candidate in (root, root / "val"):
        if candidate.is_dir() and any(p.is_dir() and p.name.startswith("n") for p in candidate.iterdir()):
            return candidate
    return None


def read_classnames(path: str | None) -> list[str] | None:
    if path is not None:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    except ImportError:
        return None
    return list(IMAGENET_CLASSNAMES)


def synthetic_imagenet(root: Path, classes: int = 4, per_class: int = 3) -> Path:
    """A tiny ImageFolder of random images under the first wnids (for --smoke)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for c, wnid in enumerate(["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"][:classes]):
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (torch.rand(80, 96, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / wnid / f"ILSVRC2012_val_{c}{i}.JPEG", format="JPEG")
    return root


def class_token_terms(clip, batches, device, n_layers: int) -> torch.Tensor:
    """Per image, the sum over layers of the CLS key's term (all heads), paper LN mode, normalised: [N, d]."""
    from tqdm.auto import tqdm

    from vit_lens.intervene.decompose import direct_contributions, required_hooks

    model = clip.vision
    # each call expands one layer to tokens and keeps the others whole, so it reads both kinds of hooks
    names = sorted(set(required_hooks(model, "head_token")) | set(required_hooks(model, "layer")))
    out = []
    for images in tqdm(OnDevice(batches, device), desc="class-token terms", unit="batch"):
        with torch.no_grad():
            _, cache = model.run_with_cache(images, names_filter=names)
            total = 0
            for layer in range(n_layers):  # one layer per call keeps [batch, head * token, d] small
                parts = direct_contributions(model, cache, level="head_token", layers=[layer], ln_mode="paper",
                                             normalize=True)
                cls_key = (parts.layer == layer) & (parts.token == 0)
                total = total + parts.values[:, cls_key].sum(dim=1)
        out.append(total.float().cpu())
    return torch.cat(out)


def class_token_accuracies(store, classifier, labels, cls_terms, mlp_mask, chunk: int = 1024) -> dict[str, float]:
    """Accuracy with the class-token terms mean-ablated, without and with the MLP terms."""
    device = classifier.device
    means = store.mean().to(device)
    cls_mean = cls_terms.mean(dim=0).to(device)
    mlp_mean = means[mlp_mask.to(device)].sum(dim=0)
    hits = {"class_token": 0, "mlps+class_token": 0}
    for start in range(0, len(store), chunk):
        x = store[start : start + chunk].to(device)
        target = labels[start : start + chunk].to(device)
        without_cls = x.sum(dim=1) - cls_terms[start : start + chunk].to(device) + cls_mean
        with_mlps = without_cls - x[:, mlp_mask.to(device)].sum(dim=1) + mlp_mean
        hits["class_token"] += int(((without_cls @ classifier).argmax(-1) == target).sum())
        hits["mlps+class_token"] += int(((with_mlps @ classifier).argmax(-1) == target).sum())
    return {name: count / len(store) for name, count in hits.items()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="open_clip:ViT-B-16", help="open_clip:<arch> (default: %(default)s)")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag or checkpoint path (default: the paper's laion2b tag for the arch)")
    parser.add_argument("--data", default=None, help="ImageNet val in class folders (or the folder holding val/)")
    parser.add_argument("--classnames", default=None,
                        help="file with one class name per line, sorted-wnid order (default: open_clip's IMAGENET_CLASSNAMES)")
    parser.add_argument("--limit", type=int, default=None, help="use N images, evenly spaced (default: all 50,000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--class-token", action="store_true", help="also the App. A.2 class-token ablations (second pass)")
    parser.add_argument("--store", default=None, help="where the decomposition goes (default: vit_lens_runs/imagenet_...)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--smoke", action="store_true",
                        help="random weights on 12 synthetic images in 4 classes: checks the pipeline, numbers mean nothing")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    arch = args.model.split(":", 1)[-1]
    script = "bench_imagenet_ablation.py"
    temporary = tempfile.TemporaryDirectory() if args.smoke else None
    if args.smoke:
        args.data = str(synthetic_imagenet(Path(temporary.name) / "val"))
        args.pretrained, args.store = None, str(Path(temporary.name) / "store")
    elif args.pretrained is None:
        args.pretrained = PAPER_TAGS.get(arch)
        if args.pretrained is None:
            return exit_needs(script, [f"  - --pretrained: no paper default for {arch}; pass an open_clip tag or checkpoint."])

    from torchvision.datasets import ImageFolder

    from vit_lens.loading.datasets import image_batches, subset_tensor
    from vit_lens.methods.textspan.retrieval import select_components
    from vit_lens.methods.textspan.spurious import extra_ablation_mask, mean_ablation_predictions
    from vit_lens.intervene.store import compute_contributions_to_disk

    classnames = read_classnames(args.classnames)
    folder = find_image_folder(args.data)
    if folder is None or classnames is None:
        return exit_needs(script, data_need(classnames is not None) + [weights_need(args.model, args.pretrained)])
    n_folders = sum(1 for p in folder.iterdir() if p.is_dir())
    if args.smoke:
        classnames = classnames[:n_folders]
    if n_folders != len(classnames):
        return exit_needs(script, [f"  - {folder} has {n_folders} class folders but there are {len(classnames)} class "
                                   "names; ImageNet val has 1000 (pass --classnames for another set)."])

    device = pick_device(args.device)
    clip = load_clip(args.model, args.pretrained, device)
    if clip is None:
        return exit_needs(script, [weights_need(args.model, args.pretrained)])
    dataset = ImageFolder(str(folder), transform=clip.preprocess)
    batches = image_batches(dataset, args.batch_size, limit=args.limit, num_workers=args.num_workers)
    labels = subset_tensor(torch.tensor(dataset.targets), args.limit)
    store_dir = Path(args.store or f"vit_lens_runs/imagenet_val_{arch}_{Path(str(args.pretrained)).name}_{args.limit or 'all'}")

    start = time.perf_counter()
    store = compute_contributions_to_disk(clip, OnDevice(batches, device), store_dir, level="layer", ln_mode="paper",
                                          normalize=True, shard_batches=max(1, 4096 // args.batch_size))
    decompose_s = time.perf_counter() - start
    if len(store) != len(labels):
        print(f"{store_dir} holds {len(store)} images but this run has {len(labels)}; use another --store", file=sys.stderr)
        return 1
    check = decomposition_check(clip, store, batches, device)
    classifier_file = store_dir / f"classifier_{len(classnames)}.pt"
    if classifier_file.exists():
        classifier = torch.load(classifier_file, map_location=device)
    else:
        with torch.no_grad():
            classifier = clip.zero_shot_classifier(classnames).float()
        torch.save(classifier.cpu(), classifier_file)
    classifier = classifier.to(device)

    n_layers = clip.vision.cfg.n_layers
    mlps = extra_ablation_mask(store.labels, "mlps")
    ablations = {"base": None, "mlps": mlps,
                 f"mlps + attention layers 0..{n_layers - N_LATE - 1}": extra_ablation_mask(store.labels, "paper", N_LATE)}
    for layer in range(n_layers):
        ablations[f"attention layers 0..{layer}"] = select_components(store.labels, [f"L{l}ATTN" for l in range(layer + 1)])
    start = time.perf_counter()
    predictions = mean_ablation_predictions(store, classifier, ablations)
    accuracy = {name: (p.cpu() == labels).double().mean().item() for name, p in predictions.items()}
    if args.class_token:
        cls_file = store_dir / "class_token_terms.npy"
        cls_terms = torch.from_numpy(np.load(cls_file)) if cls_file.exists() else None
        if cls_terms is None or len(cls_terms) != len(store):
            cls_terms = class_token_terms(clip, batches, device, n_layers)
            np.save(cls_file, cls_terms.numpy())
        accuracy.update(class_token_accuracies(store, classifier, labels, cls_terms, mlps))
    ablate_s = time.perf_counter() - start

    paper = PAPER.get(arch) if args.pretrained == PAPER_TAGS.get(arch) else {}
    print(f"\nImageNet val, {len(labels)} images, {len(classnames)} classes"
          f"{' (SMOKE TEST: random weights, synthetic images; numbers mean nothing)' if args.smoke else ''}")
    print(f"{args.model} / {args.pretrained}, device {device}; decomposition {decompose_s:.1f} s (store {store_dir}), "
          f"ablations {ablate_s:.2f} s")
    print(f"check: max |sum of terms - normalised embedding| on the first batch = {check:.2e}")
    if not paper:
        print(f"(paper numbers are for {', '.join(f'{a} {t}' for a, t in PAPER_TAGS.items())} on all 50,000 images)")
    print(f"\n{'mean-ablated':<40} {'top-1 %':>8} {'paper':>7}")
    order = ["base", "mlps", "class_token", "mlps+class_token", f"mlps + attention layers 0..{n_layers - N_LATE - 1}"]
    order += [f"attention layers 0..{layer}" for layer in range(n_layers)]
    for name in order:
        if name in accuracy:
            reference = paper.get(name)
            shown = {"base": "nothing (base)", "mlps": "MLPs + embedding term", "class_token": "class token (all layers)",
                     "mlps+class_token": "MLPs + class token"}.get(name, name)
            print(f"{shown:<40} {100 * accuracy[name]:8.2f} {f'{reference:.2f}' if reference else '-':>7}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "pretrained": args.pretrained, "n_images": len(labels), "accuracy": accuracy,
            "paper": paper, "decomposition_check": check, "smoke": args.smoke,
        }, indent=2))
    if temporary is not None:
        temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
