"""Cost of writing attention with named-dimension einsums (fancy_einsum, einops) instead of matmuls.

vit_lens writes the explicit attention path (taken when ``hook_attn_scores`` / ``hook_pattern`` is
observed), the per-head ``hook_result`` and the fused q/k/v weight layout as the math reads, with named
dimensions. This script times those expressions against the positional ``torch.matmul`` / ``permute``
forms they replaced, on one ViT-B/16 attention layer's shapes, interleaved repeat by repeat, and prints
the medians and the ratios (named / positional). It also times a whole HookedViT forward with the
pattern hooked, to put the per-call overhead in proportion.

Usage:
    python benchmarks/bench_named_einsum.py                 # batch 8, 2 threads
    python benchmarks/bench_named_einsum.py --batch 2 --repeats 50
"""

import argparse
import statistics
import time

import einops
import torch
from fancy_einsum import einsum


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, pos, h, dh, dm = args.batch, 197, 12, 64, 768
    q, k, v = (torch.randn(b, h, pos, dh) for _ in range(3))
    z = torch.randn(b, pos, h, dh)
    W = [torch.randn(h, dm, dh) for _ in range(3)]
    W_O = torch.randn(h, dh, dm)

    cases = {
        "attention scores": (
            lambda: einsum("batch head query d_head, batch head key d_head -> batch head query key", q, k),
            lambda: torch.matmul(q, k.transpose(-1, -2)),
        ),
        "pattern @ v": (
            lambda: einsum("batch head query key, batch head key d_head -> batch head query d_head", q @ k.transpose(-1, -2), v),
            lambda: torch.matmul(q @ k.transpose(-1, -2), v),
        ),
        "per-head result": (
            lambda: einsum("batch pos head d_head, head d_head d_model -> batch pos head d_model", z, W_O),
            lambda: torch.einsum("bphd,hdm->bphm", z, W_O),
        ),
        "fused qkv weight": (
            lambda: einops.rearrange(torch.stack(W), "qkv head d_model d_head -> d_model (qkv head d_head)"),
            lambda: torch.cat(W).permute(1, 0, 2).reshape(dm, 3 * h * dh),
        ),
    }
    for named, positional in cases.values():  # warm up, and check that both forms agree
        torch.testing.assert_close(named(), positional(), rtol=1e-4, atol=1e-3)
    print(f"batch {b}, ViT-B/16 attention shapes, {args.threads} threads, {args.repeats} repeats (median ms)")
    print(f"{'expression':<20} {'named':>10} {'positional':>11} {'ratio':>7}")
    for name, (named, positional) in cases.items():
        a, c = [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both
            a += _time(named, 1)
            c += _time(positional, 1)
        ma, mc = statistics.median(a) * 1e3, statistics.median(c) * 1e3
        print(f"{name:<20} {ma:>10.3f} {mc:>11.3f} {ma / mc:>7.3f}")

    from vit_lens.model.config import ViTConfig
    from vit_lens.model.hooked_vit import HookedViT

    cfg = ViTConfig(d_model=dm, n_layers=12, n_heads=h, d_head=dh, d_mlp=4 * dm, patch_size=16, image_size=224)
    model = HookedViT(cfg).init_weights(seed=0).eval()
    images = torch.randn(b, 3, 224, 224)
    hooks = [(lambda name: name.endswith("hook_pattern"), lambda t, hook: t)]
    with torch.no_grad():
        model.run_with_hooks(images, fwd_hooks=hooks)
        full = statistics.median(_time(lambda: model.run_with_hooks(images, fwd_hooks=hooks), max(3, args.repeats // 10)))
    print(f"whole HookedViT ViT-B/16 forward with every pattern hooked: {full * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
