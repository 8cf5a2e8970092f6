"""Peak memory of ``run_with_cache``: the full cache against a residual-stream names filter and CLS-only positions.

A HookedViT with ViT-B/16 dimensions (random weights, built from a ``ViTConfig``) runs a batch of
images once per variant, each in a fresh subprocess:

* ``forward``: the plain forward, no cache (the floor);
* ``full``: ``run_with_cache(images)``, every hook point;
* ``resid``: ``names_filter`` of every ``blocks.*.hook_resid_post``;
* ``resid_cls``: the same at CLS only (``pos_slice=0``).

On the CPU, torch's allocator is invisible to ``tracemalloc``, so two figures are reported: the
bytes the cache holds (its tensors' storages, each counted once) and the process's peak RSS above
the RSS before the run (``_memory.peak_rss_above_baseline``). On CUDA (``--device cuda``) the
figure is ``torch.cuda.max_memory_allocated`` above the memory allocated before the run, with the
cache kept on the GPU and offloaded as it is recorded (``device="cpu"``).

Usage:
    python benchmarks/bench_cache_memory.py                  # CPU, batch 8
    python benchmarks/bench_cache_memory.py --device cuda    # also the CPU-offload variants
"""

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from _memory import peak_rss_above_baseline

VARIANTS = {
    "forward": None,
    "full": {},
    "resid": {"names_filter": lambda name: name.endswith("hook_resid_post")},
    "resid_cls": {"names_filter": lambda name: name.endswith("hook_resid_post"), "pos_slice": 0},
}
OFFLOADED = ("full_offload", "resid_offload")  # CUDA only: the same caches with device="cpu"


def vit_b16():
    from vit_lens.model.config import ViTConfig
    from vit_lens.model.hooked_vit import HookedViT

    cfg = ViTConfig(d_model=768, n_layers=12, n_heads=12, d_head=64, d_mlp=3072, patch_size=16, image_size=224,
                    class_token=True, n_classes=1000, model_name="ViT-B/16 dimensions, random weights")
    return HookedViT(cfg).init_weights(seed=0).eval()


def cache_bytes(cache) -> int:
    """Bytes the cache keeps alive: each tensor's storage once (views of one activation share it)."""
    storages = {}
    for tensor in cache.cache_dict.values():
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def probe(variant: str, device: str, batch: int) -> dict:
    """In this (fresh) process: build, warm up, then measure one run of ``variant``."""
    torch.set_num_threads(1)
    model = vit_b16().to(device)
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    offload = variant.endswith("_offload")
    kwargs = dict(VARIANTS[variant.removesuffix("_offload")] or {})
    if offload:
        kwargs["device"] = "cpu"
    run = (lambda: (model(images), None)) if variant == "forward" else (lambda: model.run_with_cache(images, **kwargs))
    with torch.no_grad():
        run()  # warm-up: one-time allocations are not the cache's
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            _, cache = run()
            torch.cuda.synchronize()
            peak = {"peak_delta_mb": (torch.cuda.max_memory_allocated() - before) / 1e6,
                    "method": "torch.cuda.max_memory_allocated"}
        else:
            with peak_rss_above_baseline() as peak:
                _, cache = run()
    return {"variant": variant, "cache_mb": cache_bytes(cache) / 1e6 if cache is not None else 0.0,
            "n_entries": len(cache.cache_dict) if cache is not None else 0, **peak}


def measure(variant: str, device: str, batch: int) -> dict:
    command = [sys.executable, __file__, "--probe", variant, "--device", device, "--batch", str(batch)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe, args.device, args.batch)))
        return
    variants = list(VARIANTS) + (list(OFFLOADED) if args.device == "cuda" else [])
    rows = [measure(variant, args.device, args.batch) for variant in variants]
    full = next(row for row in rows if row["variant"] == "full")
    print(f"ViT-B/16 dimensions, batch {args.batch}, {args.device}, torch {torch.__version__}; peak: {rows[0]['method']}")
    print("| variant | cache entries | cache MB | cache / full | peak MB above start | peak / full |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        cache_ratio = row["cache_mb"] / full["cache_mb"]
        peak_ratio = row["peak_delta_mb"] / full["peak_delta_mb"]
        print(f"| {row['variant']} | {row['n_entries']} | {row['cache_mb']:.1f} | {cache_ratio:.4f} | "
              f"{row['peak_delta_mb']:.1f} | {peak_ratio:.3f} |")


if __name__ == "__main__":
    main()
