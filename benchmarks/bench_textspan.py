"""TextSpan: the covariance-update path (``method="fast"``) against the public code's steps (``"faithful"``).

Both run in one process on the same synthetic head: ``N`` outputs of width ``d`` with a low-rank
signal (``--signal-rank`` directions with distinct, decaying scales, so the top ``--rank`` singular
subspace is well defined), a mean offset and isotropic noise, float32; and a pool of ``T`` unit-norm
text vectors that partly align with the signal. The paper's sizes are the defaults: ImageNet val
(50,000 images), ViT-L-14's embedding width (768), the 3,498-description pool, rank 80, 10 texts.

The script checks that both paths pick the same texts and agree on the variance curve, then
prints each path's median time and the ratio. ``faithful`` costs one ``[N, d] x [d, T]`` product
per pick (about ``2 N d T`` flops); ``fast`` one ``[d, d]`` covariance pass over the data
(``2 N d^2``, in float64), one ``O(T d^2)`` scoring, and ``O(T d + d^2)`` per pick.

Usage:
    python benchmarks/bench_textspan.py                                   # paper sizes, 2 threads
    python benchmarks/bench_textspan.py --n 2000 --d 64 --texts 300 --rank 16 --picks 5   # smoke run
"""

import argparse
import os
import statistics
import time

import torch

from vit_lens.methods.textspan.textspan import textspan


def synthetic_head(n: int, d: int, n_texts: int, signal_rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A low-rank-plus-noise head output matrix [n, d] and a text pool [n_texts, d], float32."""
    generator = torch.Generator().manual_seed(seed)
    signal_rank = min(signal_rank, d)
    directions = torch.linalg.qr(torch.randn(d, signal_rank, generator=generator))[0]  # [d, r] orthonormal
    scales = torch.linspace(3.0, 0.5, signal_rank)
    outputs = torch.empty(n, d)
    for start in range(0, n, 8192):  # build in chunks to keep the peak low
        rows = min(8192, n - start)
        latent = torch.randn(rows, signal_rank, generator=generator) * scales
        outputs[start : start + rows] = latent @ directions.T + 0.02 * torch.randn(rows, d, generator=generator)
    outputs += 0.5 * torch.randn(d, generator=generator)  # a mean offset, as heads have
    texts = 0.6 * torch.randn(n_texts, signal_rank, generator=generator) @ directions.T
    texts += torch.randn(n_texts, d, generator=generator) / d**0.5
    return outputs, torch.nn.functional.normalize(texts, dim=-1)


def timed(function, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="images (rows of the head output matrix)")
    parser.add_argument("--d", type=int, default=768, help="embedding width")
    parser.add_argument("--texts", type=int, default=3498, help="size of the text pool")
    parser.add_argument("--picks", type=int, default=10, help="texts to pick per head")
    parser.add_argument("--rank", type=int, default=80, help="rank of the span the texts are projected onto")
    parser.add_argument("--signal-rank", type=int, default=96, help="rank of the synthetic signal")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each path (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    outputs, pool = synthetic_head(args.n, args.d, args.texts, args.signal_rank, args.seed)
    print(f"N={args.n} d={args.d} T={args.texts} picks={args.picks} rank={args.rank} float32, "
          f"{args.threads} threads, torch {torch.__version__}; load average at start {os.getloadavg()[0]:.2f}")
    small = outputs[: min(args.n, 512)]  # warm-up: first-call allocations and kernel selection
    for method in ("fast", "faithful"):
        textspan(small, pool, min(args.picks, small.shape[0] - 1, args.rank), args.rank, method, reconstruct=False)

    fast_times, fast = timed(lambda: textspan(outputs, pool, args.picks, args.rank, "fast", reconstruct=False), args.repeats)
    faithful_times, faithful = timed(
        lambda: textspan(outputs, pool, args.picks, args.rank, "faithful", reconstruct=False), args.repeats
    )
    same = bool((fast.indices == faithful.indices).all())
    curve_error = float((fast.variance_explained - faithful.variance_explained).abs().max()
                        / faithful.variance_explained.abs().max())
    fast_s, faithful_s = statistics.median(fast_times), statistics.median(faithful_times)
    print(f"picks fast     : {fast.indices.tolist()}")
    print(f"picks faithful : {faithful.indices.tolist()}")
    print(f"same picks: {same}; variance curves max relative difference {curve_error:.2e}; "
          f"variance explained by {args.picks} texts {100 * fast.cumulative:.1f}%")
    print(f"fast     {fast_s:8.2f} s  (runs: {', '.join(f'{t:.2f}' for t in fast_times)})")
    print(f"faithful {faithful_s:8.2f} s  (runs: {', '.join(f'{t:.2f}' for t in faithful_times)})")
    print(f"ratio faithful/fast: {faithful_s / fast_s:.1f}x; load average at end {os.getloadavg()[0]:.2f}")
    if not same:
        raise SystemExit("the two paths picked different texts")


if __name__ == "__main__":
    main()
