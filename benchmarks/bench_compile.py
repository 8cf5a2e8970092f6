"""torch.compile against eager, for a timm ViT and for the HookedViT converted from it, in one run.

Variants, timed in the same repeats (paired ratios, order alternated every repeat):

* ``src``: ``timm.create_model(--model, pretrained=False)`` eager, and ``src compiled`` (``torch.compile``).
* ``hooked``: ``HookedViT.from_timm`` of that model, eager and compiled, no hooks.
* ``cache``: ``run_with_cache`` of the residual stream (every ``blocks.*.hook_resid_post``), eager and
  with the model compiled in place (``model.compile()``), so that the hooked run goes through the
  compiled call: the variant a hook edit makes dynamo compile (vit_lens.model.compile).

Compile time (first call, each variant's compilations) is reported separately; outputs are checked
against eager. The default backend is inductor, which needs a C++ compiler on CPU; ``--backend eager``
measures dynamo's capture alone.

Usage:
    python benchmarks/bench_compile.py                          # vit_small_patch16_224, batch 8, inductor
    python benchmarks/bench_compile.py --depth 4 --repeats 5    # a 4-block model: quicker compiles
"""

import argparse
import os
import shutil
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--depth", type=int, default=None, help="number of blocks (default: the model's own)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, eager)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.backend == "inductor" and shutil.which(os.environ.get("CXX", "g++")) is None:
        raise SystemExit("inductor on CPU needs a C++ compiler (g++ not found); pass --backend aot_eager or eager")

    import timm

    from vit_lens import HookedViT

    torch.manual_seed(0)
    overrides = {} if args.depth is None else {"depth": args.depth}
    source = timm.create_model(args.model, pretrained=False, **overrides).eval()
    hooked = HookedViT.from_timm(source).eval()
    hooked_in_place = HookedViT.from_timm(source).eval()
    size = source.default_cfg["input_size"][1:]
    images = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(0))
    resid_names = [f"blocks.{layer}.hook_resid_post" for layer in range(hooked.cfg.n_layers)]

    def cache_run(model):
        return lambda: model.run_with_cache(images, names_filter=resid_names)[1][resid_names[-1]]

    eager = {"src": source, "hooked": hooked, "cache": cache_run(hooked)}
    compiled_source = torch.compile(source, backend=args.backend)
    compiled_hooked = torch.compile(hooked, backend=args.backend)
    hooked_in_place.compile(backend=args.backend)
    compiled = {"src": compiled_source, "hooked": compiled_hooked, "cache": cache_run(hooked_in_place)}

    print(f"{args.model} depth={hooked.cfg.n_layers} batch={args.batch} threads={args.threads} "
          f"backend={args.backend} torch={torch.__version__} load={os.getloadavg()[0]:.2f}")
    with torch.inference_mode():
        for name, run in compiled.items():
            start = time.perf_counter()
            out = run(images) if name != "cache" else run()
            first_call = time.perf_counter() - start
            reference = eager[name](images) if name != "cache" else eager[name]()
            err = ((out - reference).norm() / reference.norm()).item()
            print(f"  {name:7s} compiled: first call (compilation) {first_call:7.1f} s, relative error vs eager {err:.1e}")
        times = {(name, kind): [] for name in eager for kind in ("eager", "compiled")}
        calls = [(name, kind, table[name]) for name in eager for kind, table in (("eager", eager), ("compiled", compiled))]
        for repeat in range(args.repeats + 1):
            for name, kind, run in calls if repeat % 2 else reversed(calls):
                start = time.perf_counter()
                run(images) if name != "cache" else run()
                if repeat:  # the first pass warms up
                    times[name, kind].append(time.perf_counter() - start)
    print(f"  {'variant':7s} {'eager ms':>9s} {'compiled ms':>12s} {'compiled/eager':>15s} {'(min)':>6s}")
    for name in eager:
        eager_times, compiled_times = times[name, "eager"], times[name, "compiled"]
        paired = statistics.median(c / e for c, e in zip(compiled_times, eager_times))
        print(f"  {name:7s} {1e3 * statistics.median(eager_times):9.1f} {1e3 * statistics.median(compiled_times):12.1f} "
              f"{paired:15.2f} {min(compiled_times) / min(eager_times):6.2f}")
    hooked_eager = statistics.median(h / s for h, s in zip(times["hooked", "eager"], times["src", "eager"]))
    hooked_compiled = statistics.median(h / s for h, s in zip(times["hooked", "compiled"], times["src", "compiled"]))
    print(f"  hooked/src: eager {hooked_eager:.2f}, compiled {hooked_compiled:.2f}; load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
