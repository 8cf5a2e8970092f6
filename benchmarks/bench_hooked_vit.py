"""Speed and memory of HookedViT against the source model on the same weights, measured in one run.

For each model it times, interleaved repeat by repeat so that machine drift hits every variant
alike: the source model's forward, HookedViT's forward with no hooks, and HookedViT's
``run_with_cache`` (every hook point). It prints the medians and the ratios, the cache's size,
and the peak resident memory of one call, each measured in a fresh subprocess.

If ``vit_prisma`` can be imported, its HookedViT is built on the same weights and timed too.

Usage:
    python benchmarks/bench_hooked_vit.py                        # default model set, batch 8, 2 threads
    python benchmarks/bench_hooked_vit.py --models vit_b_32 --repeats 5
    python benchmarks/bench_hooked_vit.py --models vit_l_14 --json results.json
"""

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from _memory import peak_rss_above_baseline

# name on the command line -> (library, model name in that library)
MODELS = {
    "vit_b_32": ("open_clip", "ViT-B-32"),
    "vit_b_16": ("open_clip", "ViT-B-16"),
    "vit_l_14": ("open_clip", "ViT-L-14"),
    "vit_small": ("timm", "vit_small_patch16_224"),
    "deit_small_distilled": ("timm", "deit_small_distilled_patch16_224"),
}
DEFAULT_MODELS = ["vit_b_32", "vit_b_16", "vit_small", "deit_small_distilled"]
TARGET_FORWARD_RATIO = 1.10
IMAGE_SIZE = 224
MEMORY_MODES = ("source", "hooked", "hooked_cache")
PRISMA_MEMORY_MODES = ("prisma", "prisma_cache")


# ---------------------------------------------------------------------------------- models


def build_source(key: str) -> torch.nn.Module:
    """The source model's image tower, random weights (seeded), eval mode, float32."""
    library, name = MODELS[key]
    torch.manual_seed(0)
    if library == "open_clip":
        import open_clip

        return open_clip.create_model(name, pretrained=None).visual.eval()
    import timm

    return timm.create_model(name, pretrained=False).eval()


def build_hooked(key: str, source: torch.nn.Module) -> torch.nn.Module:
    import vit_lens

    library, _ = MODELS[key]
    if library == "open_clip":
        return vit_lens.HookedViT.from_open_clip(source)
    return vit_lens.HookedViT.from_timm(source)


def prisma_status() -> tuple[bool, str]:
    """Whether vit_prisma imports here, and its version or the reason it does not."""
    try:
        import vit_prisma  # noqa: F401
    except Exception as error:  # noqa: BLE001 - not installed, or broken by its own dependencies
        return False, f"`import vit_prisma` failed: {type(error).__name__}: {error}"
    try:
        return True, importlib.metadata.version("vit-prisma")
    except importlib.metadata.PackageNotFoundError:
        return True, getattr(sys.modules["vit_prisma"], "__version__", "unknown version")


def build_prisma(key: str, source: torch.nn.Module) -> torch.nn.Module:
    """ViT-Prisma's HookedViT on the source's weights, built offline.

    Written against the vit-prisma 0.1.x API (the version on PyPI): ``HookedViTConfig`` plus a
    state dict in its layout. Its own loaders fetch configs from the Hugging Face Hub, so the
    open_clip mapping is done here and the timm one uses its ``convert_timm_weights``.
    Raises NotImplementedError for architectures it cannot represent.
    """
    import einops
    from vit_prisma.configs.HookedViTConfig import HookedViTConfig
    from vit_prisma.models.base_vit import HookedViT as PrismaViT

    library = MODELS[key][0]
    common = {
        "image_size": IMAGE_SIZE,
        "n_channels": 3,
        "classification_type": "cls",
        "return_type": "class_logits",
        "activation_name": "gelu",
        "normalization_type": "LN",
        "use_wandb": False,
    }
    if library == "open_clip":
        blocks = source.transformer.resblocks
        if any(not isinstance(b.ls_1, torch.nn.Identity) for b in blocks):
            raise NotImplementedError("LayerScale")
        if type(blocks[0].mlp.gelu).__name__ != "GELU":
            raise NotImplementedError(f"activation {type(blocks[0].mlp.gelu).__name__}")
        d_model, n_heads = source.transformer.width, blocks[0].attn.num_heads
        d_head = d_model // n_heads
        cfg = HookedViTConfig(
            n_layers=len(blocks),
            d_model=d_model,
            n_heads=n_heads,
            d_head=d_head,
            d_mlp=blocks[0].mlp.c_fc.out_features,
            eps=blocks[0].ln_1.eps,
            patch_size=source.conv1.kernel_size[0],
            n_classes=source.proj.shape[1],
            layer_norm_pre=True,
            **common,
        )
        sd = source.state_dict()
        new = {
            "cls_token": sd["class_embedding"].reshape(1, 1, -1),
            "pos_embed.W_pos": sd["positional_embedding"],
            "embed.proj.weight": sd["conv1.weight"],
            "embed.proj.bias": torch.zeros(d_model),
            "ln_pre.w": sd["ln_pre.weight"],
            "ln_pre.b": sd["ln_pre.bias"],
            "ln_final.w": sd["ln_post.weight"],
            "ln_final.b": sd["ln_post.bias"],
            "head.W_H": sd["proj"],
            "head.b_H": torch.zeros(source.proj.shape[1]),
        }
        for layer in range(len(blocks)):
            old, dst = f"transformer.resblocks.{layer}", f"blocks.{layer}"
            for ln_old, ln_new in (("ln_1", "ln1"), ("ln_2", "ln2")):
                new[f"{dst}.{ln_new}.w"] = sd[f"{old}.{ln_old}.weight"]
                new[f"{dst}.{ln_new}.b"] = sd[f"{old}.{ln_old}.bias"]
            for part, w, b in zip(
                "QKV", sd[f"{old}.attn.in_proj_weight"].chunk(3), sd[f"{old}.attn.in_proj_bias"].chunk(3)
            ):
                new[f"{dst}.attn.W_{part}"] = einops.rearrange(w, "(h dh) d -> h d dh", h=n_heads)
                new[f"{dst}.attn.b_{part}"] = einops.rearrange(b, "(h dh) -> h dh", h=n_heads)
            new[f"{dst}.attn.W_O"] = einops.rearrange(
                sd[f"{old}.attn.out_proj.weight"], "d (h dh) -> h dh d", h=n_heads
            )
            new[f"{dst}.attn.b_O"] = sd[f"{old}.attn.out_proj.bias"]
            new[f"{dst}.mlp.W_in"] = sd[f"{old}.mlp.c_fc.weight"].T
            new[f"{dst}.mlp.b_in"] = sd[f"{old}.mlp.c_fc.bias"]
            new[f"{dst}.mlp.W_out"] = sd[f"{old}.mlp.c_proj.weight"].T
            new[f"{dst}.mlp.b_out"] = sd[f"{old}.mlp.c_proj.bias"]
    else:
        from vit_prisma.prisma_tools.loading_from_pretrained import convert_timm_weights

        if getattr(source, "num_prefix_tokens", 1) != 1 or getattr(source, "dist_token", None) is not None:
            raise NotImplementedError("distillation / register tokens")
        blocks = source.blocks
        cfg = HookedViTConfig(
            n_layers=len(blocks),
            d_model=source.embed_dim,
            n_heads=blocks[0].attn.num_heads,
            d_head=source.embed_dim // blocks[0].attn.num_heads,
            d_mlp=blocks[0].mlp.fc1.out_features,
            eps=blocks[0].norm1.eps,
            patch_size=source.patch_embed.proj.kernel_size[0],
            n_classes=source.num_classes,
            layer_norm_pre=False,
            **common,
        )
        new = convert_timm_weights(source.state_dict(), cfg)
    model = PrismaViT(cfg)
    model.load_state_dict({k: v.contiguous() for k, v in new.items()}, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------- timing


@dataclass
class Variant:
    name: str
    run: Callable[[torch.Tensor], object]


def cache_nbytes(cache) -> int:
    values = cache.values() if hasattr(cache, "values") else cache.cache_dict.values()
    return sum(t.nbytes for t in values if isinstance(t, torch.Tensor))


def time_interleaved(
    variants: list[Variant], images: torch.Tensor, warmup: int, repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds per call for every variant.

    Each repeat runs every variant once, in reversed order every other repeat, so that drift and
    order effects fall on all variants alike.
    """
    for _ in range(warmup):
        for variant in variants:
            variant.run(images)
    wall: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    for repeat in range(repeats):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            result = variant.run(images)
            wall[variant.name].append(time.perf_counter() - start_wall)
            cpu[variant.name].append(time.process_time() - start_cpu)
            del result
    return wall, cpu


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repeats of num/den measured in the same repeat (drift cancels within a repeat)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def min_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Ratio of the fastest runs: contention only ever adds time, so minima are its least-disturbed estimate."""
    return min(times[num]) / min(times[den])


def spread(values: list[float]) -> float | None:
    """Interquartile range over the median: how noisy the repeats were (0.05 = 5 %); None under 3 repeats."""
    if len(values) < 3:
        return None
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / statistics.median(values)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------- memory


def probe_memory(key: str, mode: str, batch: int, threads: int) -> dict:
    """Runs in a fresh subprocess: peak RSS of one call above the RSS after building the model."""
    torch.set_num_threads(threads)
    source = build_source(key)
    if mode == "source":
        model = source
    elif mode.startswith("hooked"):
        model = build_hooked(key, source)
    else:
        model = build_prisma(key, source)
    images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with peak_rss_above_baseline() as peak, torch.inference_mode():
        if mode.endswith("_cache"):
            if mode.startswith("prisma"):
                _, cache = model.run_with_cache(images, return_cache_object=False)
            else:
                _, cache = model.run_with_cache(images)
            cache_mb = cache_nbytes(cache) / 1e6
        else:
            model(images)
            cache_mb = None
    return dict(peak, cache_mb=cache_mb)


def measure_memory(key: str, mode: str, batch: int, threads: int) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--probe-memory",
        key,
        mode,
        "--batch",
        str(batch),
        "--threads",
        str(threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"subprocess failed: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- one model


def bench_model(key: str, args: argparse.Namespace, with_prisma: bool) -> dict:
    library, name = MODELS[key]
    print(f"\n[{key}] {library} {name}: building ...", flush=True)
    source = build_source(key)
    hooked = build_hooked(key, source)
    prisma, prisma_error = None, None
    if with_prisma:
        try:
            prisma = build_prisma(key, source)
        except Exception as error:  # noqa: BLE001 - a third-party converter: report whatever it raises
            prisma_error = f"{type(error).__name__}: {error}"
    images = torch.randn(args.batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    row: dict = {"model": key, "library": library, "name": name}

    with torch.inference_mode():
        reference = source(images)
        row["max_abs_diff_hooked"] = max_abs_diff(hooked(images), reference)
        if prisma is not None:
            row["max_abs_diff_prisma"] = max_abs_diff(prisma(images), reference)
        _, cache = hooked.run_with_cache(images)
        row["cache_mb"] = cache_nbytes(cache) / 1e6
        row["cache_entries"] = len(cache)
        del cache
        variants = [
            Variant("source", source),
            Variant("hooked", hooked),
            Variant("hooked_cache", hooked.run_with_cache),
        ]
        if prisma is not None:
            _, prisma_cache = prisma.run_with_cache(images, return_cache_object=False)
            row["prisma_cache_mb"] = cache_nbytes(prisma_cache) / 1e6
            del prisma_cache
            variants += [
                Variant("prisma", prisma),
                Variant("prisma_cache", lambda x, model=prisma: model.run_with_cache(x, return_cache_object=False)),
            ]
        print(f"[{key}] timing {len(variants)} variants x {args.repeats} repeats ...", flush=True)
        times, cpu_times = time_interleaved(variants, images, args.warmup, args.repeats)

    row["times_s"] = times
    row["cpu_times_s"] = cpu_times
    row["median_s"] = {k: statistics.median(v) for k, v in times.items()}
    row["source_spread"] = spread(times["source"])
    row["ratio_hooked_vs_source"] = paired_ratio(times, "hooked", "source")
    row["min_ratio_hooked_vs_source"] = min_ratio(times, "hooked", "source")
    row["cpu_ratio_hooked_vs_source"] = paired_ratio(cpu_times, "hooked", "source")
    row["ratio_cache_vs_hooked"] = paired_ratio(times, "hooked_cache", "hooked")
    row["ratio_cache_vs_source"] = paired_ratio(times, "hooked_cache", "source")
    if prisma is not None:
        row["prisma_ratio_vs_source"] = paired_ratio(times, "prisma", "source")
        row["prisma_cache_ratio_vs_source"] = paired_ratio(times, "prisma_cache", "source")
        row["prisma_cache_ratio_vs_prisma"] = paired_ratio(times, "prisma_cache", "prisma")
    if prisma_error:
        row["prisma_error"] = prisma_error
    del source, hooked, prisma
    gc.collect()

    if not args.no_memory:
        modes = list(MEMORY_MODES) + (list(PRISMA_MEMORY_MODES) if "prisma" in row["median_s"] else [])
        print(f"[{key}] peak memory, one subprocess per mode: {', '.join(modes)} ...", flush=True)
        row["memory"] = {mode: measure_memory(key, mode, args.batch, args.threads) for mode in modes}
        for mode, result in row["memory"].items():
            if "error" in result:
                print(f"[{key}] peak memory of {mode} not measured: {result['error']}", flush=True)
    return row


# ---------------------------------------------------------------------------------- report


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _peak(row: dict, mode: str):
    return row.get("memory", {}).get(mode, {}).get("peak_delta_mb")


def print_table(rows: list[dict], args: argparse.Namespace, prisma: tuple[bool, str]) -> None:
    print(
        f"\nbatch {args.batch} x 3 x {IMAGE_SIZE} x {IMAGE_SIZE}, float32, inference_mode, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up(s)"
    )
    print(
        "hooked/src and the other ratios: median over repeats of the two wall times taken in the same repeat; "
        "(min): ratio of the fastest wall times;\n(cpu): paired median of process CPU times; "
        "noise: interquartile range / median of the source's wall times; "
        "peak: max RSS of one call minus RSS after building, fresh subprocess per cell\n"
    )
    header = (
        "model",
        "source s",
        "noise",
        "hooked s",
        "hooked/src",
        "(min)",
        "(cpu)",
        "cache s",
        "cache/hooked",
        "cache MB",
        "peak src MB",
        "peak fwd MB",
        "peak cache MB",
        "max|diff|",
    )
    lines = [header]
    for r in rows:
        m = r["median_s"]
        flag = " !" if r["ratio_hooked_vs_source"] > TARGET_FORWARD_RATIO else ""
        noise = "-" if r["source_spread"] is None else f"{100 * r['source_spread']:.0f}%"
        lines.append(
            (
                r["model"],
                f"{m['source']:.3f}",
                noise,
                f"{m['hooked']:.3f}",
                f"{r['ratio_hooked_vs_source']:.3f}x{flag}",
                f"{r['min_ratio_hooked_vs_source']:.3f}x",
                f"{r['cpu_ratio_hooked_vs_source']:.3f}x",
                f"{m['hooked_cache']:.3f}",
                f"{r['ratio_cache_vs_hooked']:.2f}x",
                f"{r['cache_mb']:.0f}",
                _fmt(_peak(r, "source"), ".0f"),
                _fmt(_peak(r, "hooked"), ".0f"),
                _fmt(_peak(r, "hooked_cache"), ".0f"),
                f"{r['max_abs_diff_hooked']:.1e}",
            )
        )
    _print_rows(lines)
    over = [r["model"] for r in rows if r["ratio_hooked_vs_source"] > TARGET_FORWARD_RATIO]
    print(
        f"\ntarget: hooked/src <= {TARGET_FORWARD_RATIO:.2f}x; "
        + (f"over the target (!): {', '.join(over)}" if over else "all within the target")
    )

    available, detail = prisma
    if not available:
        print(f"\nViT-Prisma: not measured ({detail}).")
        return
    print(f"\nViT-Prisma {detail} HookedViT on the same weights:")
    lines = [
        (
            "model",
            "prisma s",
            "prisma/src",
            "p.cache s",
            "p.cache/src",
            "p.cache/prisma",
            "p.cache MB",
            "peak fwd MB",
            "peak cache MB",
            "max|diff|",
        )
    ]
    for r in rows:
        if "prisma" not in r["median_s"]:
            continue
        m = r["median_s"]
        lines.append(
            (
                r["model"],
                f"{m['prisma']:.3f}",
                f"{r['prisma_ratio_vs_source']:.3f}x",
                f"{m['prisma_cache']:.3f}",
                f"{r['prisma_cache_ratio_vs_source']:.2f}x",
                f"{r['prisma_cache_ratio_vs_prisma']:.2f}x",
                f"{r['prisma_cache_mb']:.0f}",
                _fmt(_peak(r, "prisma"), ".0f"),
                _fmt(_peak(r, "prisma_cache"), ".0f"),
                f"{r['max_abs_diff_prisma']:.1e}",
            )
        )
    _print_rows(lines)
    for r in rows:
        if "prisma" not in r["median_s"]:
            print(f"{r['model']}: ViT-Prisma model not built ({r.get('prisma_error', 'unknown reason')})")


def _print_rows(lines: list[tuple]) -> None:
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(f"{c!s:<{w}}" if i == 0 else f"{c!s:>{w}}" for i, (c, w) in enumerate(zip(line, widths))))


# ---------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=DEFAULT_MODELS,
        metavar="MODEL",
        help=f"any of {', '.join(MODELS)}, or 'all' (default: {' '.join(DEFAULT_MODELS)}); comma- or space-separated",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of every variant first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement to this JSON file")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-prisma", action="store_true", help="do not time ViT-Prisma even if it imports")
    parser.add_argument("--probe-memory", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m for item in args.models for m in item.split(",") if m]
    if "all" in models:
        models = list(MODELS)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)} or 'all'")
    args.models = models
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe_memory:
        print(json.dumps(probe_memory(*args.probe_memory, args.batch, args.threads)))
        return
    prisma = (False, "--no-prisma") if args.no_prisma else prisma_status()
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"threads {torch.get_num_threads()}, models {' '.join(args.models)}"
    )
    if prisma[0]:
        print(f"ViT-Prisma {prisma[1]} imports: timing its HookedViT too")
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows = [bench_model(key, args, with_prisma=prisma[0]) for key in args.models]
    print_table(rows, args, prisma)
    load_after = os.getloadavg()
    print(
        f"\ntotal wall time {time.perf_counter() - started:.0f} s; 1-min load average {load_before[0]:.2f} "
        f"at the start, {load_after[0]:.2f} at the end (above {os.cpu_count()} means other work shared the CPUs)"
    )
    if args.json:
        versions = {}
        for dist in ("torch", "open_clip_torch", "timm", "transformer-lens", "vit-lens", "vit-prisma"):
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = None
        meta = {
            "argv": sys.argv,
            "batch": args.batch,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "versions": versions,
            "prisma": {"available": prisma[0], "detail": prisma[1]},
            "loadavg_start": load_before,
            "loadavg_end": load_after,
        }
        with open(args.json, "w") as out:
            json.dump({"meta": meta, "rows": rows}, out, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
