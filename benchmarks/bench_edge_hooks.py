"""The cost of TransformerLens's edge hook flags: HookedViT with each flag off and on, against the source model.

Variants, timed in the same repeats (paired ratios, order reversed every other repeat), each a plain
forward with no hook attached:

* ``src``: ``timm.create_model(--model, pretrained=False)``.
* ``off``: ``HookedViT.from_timm`` of it, every flag off (the default: one fused product for q, k, v).
* ``split``: ``set_use_split_qkv_input(True)``: per-head copies of the residual stream for queries, keys
  and values, each through ln1, and q, k, v computed per head.
* ``attn_in``: ``set_use_attn_in(True)``: one per-head copy for all three.
* ``mlp_in``: ``set_use_hook_mlp_in(True)``: a copy of resid_mid for the MLP.
* ``split+mlp_in``: both, the setting for edge patching.

Every output is checked against the source's. Ratios are medians of per-repeat ratios; ``(min)`` is
the ratio of the fastest times.

Usage:
    python benchmarks/bench_edge_hooks.py                         # vit_small_patch16_224, batch 8, 1 thread
    python benchmarks/bench_edge_hooks.py --model vit_base_patch16_224 --repeats 5
"""

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FLAGS = {
    "off": {},
    "split": {"set_use_split_qkv_input": True},
    "attn_in": {"set_use_attn_in": True},
    "mlp_in": {"set_use_hook_mlp_in": True},
    "split+mlp_in": {"set_use_split_qkv_input": True, "set_use_hook_mlp_in": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import timm

    from vit_lens import HookedViT

    torch.manual_seed(0)
    source = timm.create_model(args.model, pretrained=False).eval()
    size = source.default_cfg["input_size"][1:]
    images = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(0))
    variants = {"src": source}
    for name, setters in FLAGS.items():
        model = HookedViT.from_timm(source).eval()
        for setter, value in setters.items():
            getattr(model, setter)(value)
        variants[name] = model

    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        reference = source(images)
        scale = reference.abs().max().item()
        for name, model in variants.items():
            diff = (model(images) - reference).abs().max().item()
            print(f"{name:>13}: max|diff| to src {diff:.2e} (output scale {scale:.2e})")
            for _ in range(args.warmup):
                model(images)
        for repeat in range(args.repeats):
            order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
            for name in order:
                start = time.perf_counter()
                variants[name](images)
                times[name].append(time.perf_counter() - start)

    print(f"\n{args.model}, batch {args.batch}, {args.threads} thread(s), {args.repeats} repeats, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'variant':>13} {'median s':>9} {'/src':>7} {'(min)':>7} {'/off':>7} {'(min)':>7}")
    for name, series in times.items():
        paired = {base: statistics.median(t / b for t, b in zip(series, times[base])) for base in ("src", "off")}
        fastest = {base: min(series) / min(times[base]) for base in ("src", "off")}
        print(f"{name:>13} {statistics.median(series):9.3f} {paired['src']:7.3f} {fastest['src']:7.3f} "
              f"{paired['off']:7.3f} {fastest['off']:7.3f}")


if __name__ == "__main__":
    main()
