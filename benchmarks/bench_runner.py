"""The dataset runner's images/s as a ratio of the plain model forward's, same device and batch, in one run.

Variants, timed in the same repeats (order alternated every repeat; paired ratios, medians):

* ``forward``: ``HookedViT(images)`` over the dataset in batches, no hooks, nothing kept.
* ``runner cls``: :func:`vit_lens.runner.run_dataset` caching ``blocks.*.hook_resid_post`` at every layer,
  CLS token only, plus the float64 mean of the last layer's residual stream, written to safetensors
  shards in a fresh folder (atomic writes, fsync, checksums, manifest).
* ``runner all``: the same with every token cached (``--tokens all`` of the CLI).
* ``statistics``: :func:`vit_lens.intervene.statistics.compute_hook_statistics` of every layer's residual
  stream, per token, with variances (in memory: it is a ``run_dataset`` pass without a folder).
* ``hook loop``: the same statistics from a hand-written loop, a forward per batch with hooks that fold
  each activation into a :class:`HookStatistics` (what ``compute_hook_statistics`` was before it ran on
  the runner).

Everything the runner does is inside its time: the weights fingerprint, a one-image probe forward, the
shard writes. These fixed costs shrink with the dataset; ``--images`` sets its size.

Usage:
    python benchmarks/bench_runner.py                                   # open_clip ViT-B-32, 64 images, CPU
    python benchmarks/bench_runner.py --model ViT-B-16 --images 32 --threads 2
    python benchmarks/bench_runner.py --device cuda --dtype bfloat16 --images 4096 --batch 128
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VIT_LENS_PROGRESS", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="autocast dtype of both the forward and the runner")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import open_clip

    from vit_lens.intervene.statistics import HookStatistics, compute_hook_statistics
    from vit_lens.model.hooked_vit import HookedViT
    from vit_lens.runner import Activations, Mean, run_dataset

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = HookedViT.from_open_clip(open_clip.create_model(args.model, pretrained=None).visual).eval().to(device)
    images = torch.randn(args.images, 3, *model.cfg.image_size, generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        images = images.pin_memory()
    resid = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            for first in range(0, args.images, args.batch):
                model(images[first:first + args.batch].to(device, non_blocking=True))
        synchronize()

    def runner(tokens: str):
        def run() -> None:
            folder = tempfile.mkdtemp(prefix="bench_runner_")
            try:
                run_dataset(model, images, folder, [Activations(resid, tokens), Mean(resid[-1])],
                            shard_size=args.shard_size, batch_size=args.batch, device=device, dtype=args.dtype,
                            progress=False)
                synchronize()
            finally:
                shutil.rmtree(folder)
        return run

    batches = [images[first:first + args.batch] for first in range(0, args.images, args.batch)]

    def statistics_pass() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            compute_hook_statistics(model, batches, resid, variance=True, progress=False)
        synchronize()

    def hook_loop() -> None:
        stats = HookStatistics(variance=True)
        hooks = [(name, lambda activation, hook: stats.update(hook.name, activation)) for name in resid]
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            with model.hooks(fwd_hooks=hooks):
                for batch in batches:
                    model(batch.to(device, non_blocking=True))
        synchronize()

    variants = {"forward": forward, "runner cls": runner("cls"), "runner all": runner("all"),
                "statistics": statistics_pass, "hook loop": hook_loop}
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    load = os.getloadavg()[0]
    for repeat in range(args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    print(f"{args.model} random weights, {args.images} images, batch {args.batch}, shards of {args.shard_size}, "
          f"device {device}, dtype {args.dtype}, {args.threads} threads, {args.repeats} repeats; "
          f"load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    base = times["forward"]
    print(f"{'variant':<12} {'images/s':>9} {'ratio to forward (paired median)':>33} {'(min)':>7}")
    for name, values in times.items():
        ratio = statistics.median(b / v for b, v in zip(base, values))
        print(f"{name:<12} {args.images / statistics.median(values):>9.1f} {ratio:>33.3f} "
              f"{min(base) / min(values):>7.3f}")


if __name__ == "__main__":
    main()
