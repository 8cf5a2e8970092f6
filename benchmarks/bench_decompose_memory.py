"""Peak memory of per-head, per-token contributions: vit_lens's pooled-row construction vs the naive one.

The paper's public code (clip_text_span, ``attn_method="head"``) forms, in every layer, the
``[batch, query, key, head, d_model]`` tensor of every (query, key, head) contribution and then keeps
the CLS query row. ``vit_lens.intervene.decompose.direct_contributions(level="head_token")`` forms only the
pooled query row of each pattern, and with ``directions`` projects the value vectors before
expanding over tokens. Each measurement runs in a fresh subprocess and reports the peak RSS of the
decomposition step above the RSS after the forward pass (the cache is held in both cases; the
result's own size is in ``terms MB``), and the two results are checked against each other.

Usage:
    python benchmarks/bench_decompose_memory.py                    # ViT-B-16 and ViT-L-14, batch 1
    python benchmarks/bench_decompose_memory.py --models ViT-B-16 --batch 2
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from _memory import peak_rss_above_baseline

MODES = ("naive_all_queries", "vit_lens", "vit_lens_100_directions")


def naive_head_token(model, cache) -> torch.Tensor:
    """The all-query construction, one layer at a time, keeping the CLS row: [batch, layer, key, head, d_proj]."""
    cfg, ln = model.cfg, model.ln_final
    scale = cache["ln_final.hook_scale"][:, 0]  # [batch, 1]
    readout = ln.w[:, None] * model.W_proj
    readout = readout - readout.mean(0, keepdim=True)  # centre each term, as center_each does
    rows = []
    for layer in range(cfg.n_layers):
        per_cell = torch.einsum("bhnm,bmhc->bnmhc", cache["pattern", layer], cache["v", layer])
        per_cell = torch.einsum("bnmhc,hcd->bnmhd", per_cell, model.blocks[layer].attn.W_O)  # [B, N, N, H, D]
        rows.append(per_cell[:, 0] / scale[:, :, None, None] @ readout)
        del per_cell
    return torch.stack(rows, dim=1)


def probe(model_name: str, mode: str, batch: int, threads: int) -> dict:
    """In a fresh subprocess: peak RSS of building the per-token terms, and a checksum to compare modes."""
    import open_clip

    from vit_lens import HookedViT
    from vit_lens.intervene.decompose import direct_contributions, required_hooks

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = HookedViT.from_open_clip(open_clip.create_model(model_name, pretrained=None))
    images = torch.randn(batch, 3, *model.cfg.image_size, generator=torch.Generator().manual_seed(1))
    directions = torch.randn(model.cfg.d_proj, 100, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        _, cache = model.run_with_cache(images, names_filter=required_hooks(model, "head_token"))
        start = time.perf_counter()
        with peak_rss_above_baseline() as peak:
            if mode == "naive_all_queries":
                terms = naive_head_token(model, cache)  # [B, L, N, H, D]
            else:
                parts = direct_contributions(
                    model, cache, level="head_token", directions=directions if "directions" in mode else None
                )
        seconds = time.perf_counter() - start
        if mode == "naive_all_queries":
            cls_row = terms.permute(0, 1, 3, 2, 4)  # [B, L, H, N, D] as vit_lens orders them
        else:
            prefix, patches = parts.token_maps()
            cls_row = torch.cat([prefix, patches.flatten(3, 4)], dim=3)
        if mode == "vit_lens_100_directions":
            checksum = cls_row.sum().item()
        else:
            checksum = (cls_row @ directions).sum().item()  # same quantity, comparable across modes
    return dict(peak, seconds=seconds, checksum=checksum, terms_mb=cls_row.numel() * 4 / 1e6)


def run_probe(model_name: str, mode: str, batch: int, threads: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--probe", model_name, mode,
               "--batch", str(batch), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-16", "ViT-L-14"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--probe", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(*args.probe, batch=args.batch, threads=args.threads)))
        return

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} threads, batch {args.batch}, float32")
    print(f"{'model':10} {'mode':26} {'peak MB':>9} {'terms MB':>9} {'seconds':>8}  {'checksum rel. diff':>18}")
    results = {}
    for model_name in args.models:
        rows = {mode: run_probe(model_name, mode, args.batch, args.threads) for mode in MODES}
        results[model_name] = rows
        reference = rows["naive_all_queries"].get("checksum")
        for mode, row in rows.items():
            if "error" in row:
                print(f"{model_name:10} {mode:26} failed: {row['error']}")
                continue
            diff = abs(row["checksum"] - reference) / max(abs(reference), 1e-12) if reference is not None else float("nan")
            print(f"{model_name:10} {mode:26} {row['peak_delta_mb']:9.0f} {row['terms_mb']:9.1f} "
                  f"{row['seconds']:8.2f}  {diff:18.1e}")
        naive, ours = rows["naive_all_queries"], rows["vit_lens"]
        if "error" not in naive and "error" not in ours:
            print(f"{model_name:10} peak memory, naive / vit_lens: {naive['peak_delta_mb'] / max(ours['peak_delta_mb'], 1):.0f}x")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
