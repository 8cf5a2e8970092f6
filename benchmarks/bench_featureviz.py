"""Feature visualisation on the toy CLIP: how much more the optimised images activate their features.

For the most variable MLP neurons of each layer (variance over dataset images of the patch-mean activation)
and for a few text directions, ``vit_lens.methods.featureviz.visualisation.visualize`` optimises an image with the toy defaults and
each parameterisation, then the script prints, per feature: the activation of the optimised image, of the best
of 64 uniform random images, of the dataset's average image, and the dataset's mean and maximum, with the
ratio "optimised / dataset max" and the margin over the random and average images in dataset standard
deviations. Everything is measured in one run on the same weights; no timing is reported.

Usage:
    python benchmarks/bench_featureviz.py [--neurons-per-layer 2] [--steps 150] [--images 512]
        [--parameterizations pixel fourier] [--threads 1] [--json results.json]
"""

import argparse
import json

import torch

import vit_lens
from vit_lens import featureviz as fv
from vit_lens.toy import ToyWorld


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--neurons-per-layer", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--parameterizations", nargs="+", default=["pixel", "fourier"], choices=["pixel", "fourier"])
    parser.add_argument("--texts", nargs="+", default=["red object", "blue object", "striped background", "object on the left"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    clip = vit_lens.load_toy_clip()
    model = clip.vision
    images = ToyWorld(seed=2024).sample(args.images).images
    random_images = torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    average_image = images.mean(0, keepdim=True)

    objectives = []
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.mlp.hook_post"
        _, cache = model.run_with_cache(images, names_filter=name)
        per_image = cache[name][:, model.cfg.n_prefix_tokens :].mean(1)
        for index in per_image.std(0).argsort(descending=True)[: args.neurons_per_layer].tolist():
            objectives.append(fv.neuron(layer, index))
    objectives += [fv.text_direction(clip, text) for text in args.texts]

    rows = []
    header = f"{'feature':24} {'param':8} {'optimised':>9} {'random':>8} {'avg img':>8} {'ds mean':>8} {'ds max':>8} {'opt/max':>8} {'margin/sd':>9}"
    print(header)
    print("-" * len(header))
    for objective in objectives:
        dataset = fv.evaluate(clip, objective, images)
        random_best = fv.evaluate(clip, objective, random_images).max().item()
        average = fv.evaluate(clip, objective, average_image).item()
        for parameterization in args.parameterizations:
            result = fv.visualize(clip, objective, steps=args.steps, parameterization=parameterization, progress=False)
            spread = dataset.std().item()
            row = dict(
                feature=objective.name,
                parameterization=parameterization,
                optimised=result.activation,
                random_best=random_best,
                average_image=average,
                dataset_mean=dataset.mean().item(),
                dataset_max=dataset.max().item(),
                ratio_to_dataset_max=result.activation / dataset.max().item(),
                margin_in_sd=(result.activation - max(random_best, average)) / spread,
            )
            rows.append(row)
            print(
                f"{row['feature'][:24]:24} {parameterization:8} {row['optimised']:9.3f} {random_best:8.3f} {average:8.3f} "
                f"{row['dataset_mean']:8.3f} {row['dataset_max']:8.3f} {row['ratio_to_dataset_max']:8.2f} {row['margin_in_sd']:9.1f}"
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
