""""Peeling Back the Layers", section 4.2 / figure 2 and section 4.3 / figure 3, end to end.

For every layer (and the ranges given), one of three things is replaced by its dataset average
(``vit_lens.methods.layers.averaging.layer_averaging``):

* output           the block's output tokens (the output then no longer depends on the image)
* attention_input  what the block's attention reads (the paper's main curve)
* residual         the skip connection around the attention (the paper's "confusion")

and the change of the model's output is printed as a table: the cosine similarity of the image
embedding to the unmodified one (the paper measures BERTScore between captions decoded from the
two; any such metric plugs in as a callable), and zero-shot accuracy where labels exist. Then the
output read out at every layer (``upper_layer_contribution``, figure 3).

Usage:
    python benchmarks/bench_layer_averaging.py                           # the built-in toy CLIP, < 1 min on CPU
    python benchmarks/bench_layer_averaging.py --model open_clip:ViT-B-16 --pretrained laion2b_s34b_b88k \\
        --images /data/whoops --ranges 4-8 --limit 500
    python benchmarks/bench_layer_averaging.py --model open_clip:ViT-B-16 --pretrained laion2b_s34b_b88k \\
        --images /data/imagenet_subset --zero-shot        # class folders: also zero-shot accuracy

The paper averages over the images it measures (WHOOPS) and, for one curve, over 500 ImageNet
images: ``--means-images DIR`` takes the means from other images. Without the images or the weights
it prints what it needs and exits with status 2.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench_waterbirds import exit_needs, load_clip, pick_device, weights_need

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
TOY_FACTOR = "colour"  # the toy CLIP reads every factor (its model card); colour is the easiest to picture


def images_need(flag: str) -> str:
    return (f"  - images: {flag} DIR, a folder of image files (.jpg, .png, ...; searched recursively), e.g. the WHOOPS "
            "images the paper uses or any few hundred natural images. With --zero-shot, one sub-folder per class, "
            "named by the class (its name is the zero-shot prompt).")


def find_images(path: str | None) -> list[Path]:
    if path is None or not Path(path).is_dir():
        return []
    return sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class ImageFiles(torch.utils.data.Dataset):
    """Image files through a transform; the label is the index of the file's folder among ``classes``."""

    def __init__(self, files: list[Path], transform, classes: list[str] | None = None):
        self.files, self.transform, self.classes = files, transform, classes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.files[index]) as opened:
            image = self.transform(opened.convert("RGB"))
        label = self.classes.index(self.files[index].parent.name) if self.classes else -1
        return image, label


def real_data(args, clip):
    """(batches, means batches or None, classifier or None, description), or an exit status."""
    from vit_lens.loading.datasets import evenly_spaced

    files = find_images(args.images)
    classes = sorted({f.parent.name for f in files}) if args.zero_shot else None
    if args.zero_shot and len(classes) < 2:
        return exit_needs("bench_layer_averaging.py", [f"  - --zero-shot needs at least two class folders under "
                                                       f"{args.images}; found {len(classes)}."])
    files = [files[i] for i in evenly_spaced(len(files), args.limit)]
    dataset = ImageFiles(files, clip.preprocess, classes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    means_loader = None
    if args.means_images:
        means_files = find_images(args.means_images)
        means_files = [means_files[i] for i in evenly_spaced(len(means_files), args.limit)]
        means_loader = torch.utils.data.DataLoader(ImageFiles(means_files, clip.preprocess), batch_size=args.batch_size,
                                                   num_workers=args.num_workers)
    classifier = None
    if classes:
        with torch.no_grad():
            classifier = clip.zero_shot_classifier([c.replace("_", " ") for c in classes], ["a photo of a {}."]).float()
    description = f"{len(files)} images from {args.images}" + (f", {len(classes)} classes" if classes else "")
    return loader, means_loader, classifier, description


def toy_data(args, clip):
    from vit_lens.toy import ToyWorld, factor_prompts

    batch = ToyWorld(seed=2024).sample(args.limit or 128)
    classifier = clip.encode_text(factor_prompts(TOY_FACTOR), normalize=True).T
    batches = [(batch.images[i : i + args.batch_size], batch.factors[TOY_FACTOR][i : i + args.batch_size])
               for i in range(0, len(batch), args.batch_size)]
    means = None
    if args.means_images == "toy-other":
        means = [ToyWorld(seed=7).sample(args.limit or 128).images]
    return batches, means, classifier, f"{len(batch)} toy-world images (seed 2024), zero-shot {TOY_FACTOR}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy", help="'toy' (built-in toy CLIP, default) or open_clip:<arch>")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path")
    parser.add_argument("--images", default=None, help="folder of images (recursive); class folders with --zero-shot")
    parser.add_argument("--means-images", default=None,
                        help="take the dataset means from these images instead (toy: 'toy-other' for another seed)")
    parser.add_argument("--zero-shot", action="store_true", help="sub-folders are classes: also zero-shot accuracy")
    parser.add_argument("--ranges", nargs="*", default=None,
                        help="layer ranges averaged together, 'first-last' inclusive (default: the middle third)")
    parser.add_argument("--variants", nargs="*", default=None, help="subset of output attention_input residual")
    parser.add_argument("--limit", type=int, default=None,
                        help="use N images, evenly spaced (toy: N fresh images, default 128)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    parser.add_argument("--json", default=None, help="also write the curves here")
    parser.add_argument("--html", default=None, help="also write figures 2 and 3 to this HTML file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    script = "bench_layer_averaging.py"
    if args.threads:
        torch.set_num_threads(args.threads)
    toy = args.model == "toy"
    if not toy:
        if not args.model.startswith("open_clip:"):
            return exit_needs(script, [f"  - --model: 'toy' or open_clip:<arch> (e.g. open_clip:ViT-B-16), "
                                       f"got {args.model!r}."])
        needs = []
        if not find_images(args.images):
            needs.append(images_need("--images"))
        if args.means_images and not find_images(args.means_images):
            needs.append(images_need("--means-images"))
        if args.pretrained is None:
            needs.append("  - --pretrained: an open_clip pretrained tag (e.g. laion2b_s34b_b88k for ViT-B-16) or a "
                         "checkpoint path; random weights would make the curves meaningless.")
        if needs:
            return exit_needs(script, needs + ([weights_need(args.model, args.pretrained)] if args.pretrained else []))

    from vit_lens import experiments as E

    device = pick_device(args.device)
    if toy:
        import vit_lens

        clip = vit_lens.load_toy_clip(device=device)
        batches, means_data, classifier, description = toy_data(args, clip)
    else:
        clip = load_clip(args.model, args.pretrained, device)
        if clip is None:
            return exit_needs(script, [weights_need(args.model, args.pretrained)])
        prepared = real_data(args, clip)
        if isinstance(prepared, int):
            return prepared
        batches, means_data, classifier, description = prepared
    n_layers = clip.vision.cfg.n_layers
    first = n_layers // 3
    ranges = args.ranges if args.ranges is not None else [f"{first}-{max(first + 1, 2 * n_layers // 3 - 1)}"]
    variants = args.variants or list(E.VARIANTS)

    start = time.perf_counter()
    means = E.averaging_statistics(clip, means_data if means_data is not None else batches, variants=variants,
                                   batch_size=args.batch_size)
    means_s = time.perf_counter() - start
    start = time.perf_counter()
    cosine = E.layer_averaging(clip, batches, means=means, variants=variants, ranges=ranges, batch_size=args.batch_size)
    accuracy = None
    if classifier is not None:
        accuracy = E.layer_averaging(clip, batches, means=means, variants=variants, ranges=ranges, metric="accuracy",
                                     classifier=classifier.to(device), batch_size=args.batch_size)
    averaging_s = time.perf_counter() - start
    start = time.perf_counter()
    readout = E.upper_layer_contribution(clip, batches, batch_size=args.batch_size)
    readout_accuracy = None
    if classifier is not None:
        readout_accuracy = E.upper_layer_contribution(clip, batches, metric="accuracy",
                                                      classifier=classifier.to(device), batch_size=args.batch_size)
    readout_s = time.perf_counter() - start

    name = "toy CLIP (vit_lens.load_toy_clip)" if toy else f"{args.model} / {args.pretrained}"
    print(f"\n{name}, {n_layers} layers, device {device}; {description}")
    print(f"means over {'other images' if means_data is not None else 'the same images'}; "
          f"times: means {means_s:.1f} s, averaging {averaging_s:.1f} s, readout {readout_s:.1f} s\n")
    print("Figure 2: the output after averaging a layer (or a range of layers together)")
    print(cosine.table())
    if accuracy is not None:
        print()
        print(accuracy.table())
    print("\nFigure 3: the output read out at each layer")
    print(readout.table())
    if readout_accuracy is not None:
        print()
        print(readout_accuracy.table())
    if args.json:
        result = {"model": name, "data": description, "ranges": ranges,
                  "averaging": {"cosine": cosine.to_pandas().to_dict()},
                  "readout": {"cosine": dict(zip(readout.layers, readout.values.tolist()))}}
        if accuracy is not None:
            result["averaging"]["accuracy"] = accuracy.to_pandas().to_dict()
            result["averaging"]["accuracy_unmodified"] = accuracy.baseline
            result["readout"]["accuracy"] = dict(zip(readout_accuracy.layers, readout_accuracy.values.tolist()))
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.html:
        from vit_lens.utils.plotting import write_html_report

        sections = [("Figure 2: layer averaging, cosine to the unmodified embedding", E.plot_averaging_curves(cosine)),
                    ("Figure 3: read out at each layer", E.plot_readout_curve(readout))]
        if accuracy is not None:
            sections.insert(1, ("Figure 2: layer averaging, zero-shot accuracy", E.plot_averaging_curves(accuracy)))
        print(f"\nfigures: {write_html_report(sections, args.html, title='Layer averaging').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
