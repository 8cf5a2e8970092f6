"""SAE training throughput: vit_lens's training loop against SAELens's own trainer, on the same activations.

Both trainers get the same precomputed activation tensor (the toy CLIP's ``blocks.2.hook_resid_post``,
d_model 128), in the same batches, in the same order, and start from the same weights (SAELens's
initialisation, copied into the vit_lens SAE), with the same settings: Adam at a constant learning rate,
gradient norm clipped at 1, no input normalisation, and a dead-feature window longer than the run (so
neither runs its auxiliary loss). SAELens runs ``SAETrainer.fit()`` with a data provider that yields
the batches; vit_lens runs ``train_sae_on_activations`` on the tensor. Each timing covers the whole call,
SAE construction included. The two compute the same function, so their final weights must agree: the
script prints the largest difference of the decoders, and a timing of a trainer that computed
something else would mean nothing.

Repeats alternate the order of the two trainers. Throughput is activations (rows) per second; the
speed ratio ``vit_lens / SAELens`` is SAELens's time over vit_lens's (above 1: vit_lens is faster): the
median of the per-repeat ratios of wall times, ``(min)`` the ratio of the fastest wall times (contention
only adds time), ``(cpu)`` the median ratio of process CPU times, which a busy machine disturbs least.
Run it in the environment where sae-lens is installed::

    .venv-tl3/bin/python benchmarks/bench_sae_training.py                    # topk and standard, 1 thread
    .venv-tl3/bin/python benchmarks/bench_sae_training.py --steps 200 --device cuda --json gpu.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's fit() draws a bar; it would interleave with the table
os.environ.setdefault("VIT_LENS_PROGRESS", "0")

import torch  # noqa: E402


def toy_activations(n_rows: int, device: str) -> torch.Tensor:
    """``n_rows`` rows of the toy CLIP's blocks.2 residual stream, shuffled, on ``device``."""
    import vit_lens
    from vit_lens.toy import ToyWorld

    clip = vit_lens.load_toy_clip()
    hook = "blocks.2.hook_resid_post"
    rows = []
    with torch.no_grad():
        for seed in range(-(-n_rows // (64 * 65))):
            _, cache = clip.vision.run_with_cache(ToyWorld(seed=seed).sample(64, seed=seed).images, names_filter=[hook],
                                                  stop_at_layer=3)
            rows.append(cache[hook].reshape(-1, 128))
    rows = torch.cat(rows)[:n_rows]
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))].to(device)


def sae_lens_sae(architecture: str, d_in: int, d_sae: int, k: int, l1: float, device: str, seed: int):
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(seed)
    if architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=device))
    return StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=l1,
                                                         l1_warm_up_steps=0, device=device))


def batches(rows: torch.Tensor, batch: int, steps: int):
    for step in range(steps):
        start = (step * batch) % len(rows)
        yield rows[start:start + batch]


def run_sae_lens(architecture, rows, args, seed):
    """SAELens's SAETrainer.fit() on the rows; returns (seconds, trained SAE)."""
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sync(args.device)
    start, cpu = time.perf_counter(), time.process_time()
    sae = sae_lens_sae(architecture, rows.shape[1], args.d_sae, args.k, args.l1, args.device, seed)
    trainer = SAETrainer(
        SAETrainerConfig(total_training_samples=args.steps * args.batch, train_batch_size_samples=args.batch,
                         lr=args.lr, lr_end=args.lr / 10, device=args.device,  # lr_end as SAELens's runner sets it dead_feature_window=10 * args.steps,
                         feature_sampling_window=10 * args.steps, logger=LoggingConfig(log_to_wandb=False)),
        sae, data_provider=batches(rows, args.batch, args.steps),
    )
    trainer.fit()
    sync(args.device)
    return time.perf_counter() - start, time.process_time() - cpu, sae


def run_vit_lens(architecture, rows, args, initial):
    """vit_lens's train_sae_on_activations on the rows, from the same initial weights as SAELens."""
    from vit_lens.sae import SAE, SAEConfig, train_sae_on_activations

    sync(args.device)
    start, cpu = time.perf_counter(), time.process_time()
    cfg = SAEConfig(d_in=rows.shape[1], d_sae=args.d_sae, architecture=architecture,
                    k=args.k if architecture == "topk" else None, rescale_acts_by_decoder_norm=architecture == "topk",
                    device=args.device)
    sae = SAE(cfg)
    sae.load_state_dict({name: initial[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")})
    sae, _ = train_sae_on_activations(sae, rows, steps=args.steps, batch_size_tokens=args.batch, lr=args.lr,
                                      lr_warmup_steps=0, lr_decay_steps=0, l1_coefficient=args.l1, l1_warmup_steps=0,
                                      dead_after_tokens=(10 * args.steps + 1) * args.batch, max_grad_norm=1.0,
                                      device=args.device, progress=False)
    sync(args.device)
    return time.perf_counter() - start, time.process_time() - cpu, sae


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare(architecture: str, rows: torch.Tensor, args) -> dict:
    wall = {"vit_lens": [], "sae_lens": []}
    cpu = {"vit_lens": [], "sae_lens": []}
    difference = None
    for repeat in range(args.warmup + args.repeats):
        order = ("sae_lens", "vit_lens") if repeat % 2 == 0 else ("vit_lens", "sae_lens")
        initial = sae_lens_sae(architecture, rows.shape[1], args.d_sae, args.k, args.l1, args.device,
                               seed=repeat).state_dict()
        trained = {}
        for name in order:
            if name == "sae_lens":
                seconds, cpu_seconds, trained[name] = run_sae_lens(architecture, rows, args, seed=repeat)
            else:
                seconds, cpu_seconds, trained[name] = run_vit_lens(architecture, rows, args, initial)
            if repeat >= args.warmup:
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
        difference = float((trained["vit_lens"].W_dec.detach() - trained["sae_lens"].W_dec.detach()).abs().max())
    rows_trained = args.steps * args.batch

    def speed_ratio(times: dict) -> float:
        return statistics.median(theirs / ours for ours, theirs in zip(times["vit_lens"], times["sae_lens"]))

    return {
        "architecture": architecture,
        "vit_lens_s": statistics.median(wall["vit_lens"]),
        "sae_lens_s": statistics.median(wall["sae_lens"]),
        "vit_lens_rows_per_s": rows_trained / statistics.median(wall["vit_lens"]),
        "sae_lens_rows_per_s": rows_trained / statistics.median(wall["sae_lens"]),
        "speed_ratio": speed_ratio(wall),
        "speed_ratio_min": min(wall["sae_lens"]) / min(wall["vit_lens"]),
        "speed_ratio_cpu": speed_ratio(cpu),
        "max_abs_W_dec_difference": difference,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", nargs="+", default=["topk", "standard"], choices=["topk", "standard"])
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--l1", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rows", type=int, default=65536, help="distinct activation rows, cycled")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    try:
        import sae_lens
    except ImportError:
        print("sae-lens is not installed in this environment; run with .venv-tl3/bin/python.", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()}")
    rows = toy_activations(args.rows, args.device)
    print(f"torch {torch.__version__}, sae-lens {sae_lens.__version__}, device {args.device}, {args.threads} thread(s); "
          f"d_in {rows.shape[1]}, d_sae {args.d_sae}, batch {args.batch} tokens, {args.steps} steps, "
          f"{args.repeats} repeats")
    results = [compare(architecture, rows, args) for architecture in args.architectures]
    print(f"\n{'architecture':<12} {'vit_lens rows/s':>16} {'SAELens rows/s':>15} {'speed vit_lens/SAELens':>23} "
          f"{'(min)':>7} {'(cpu)':>7} {'max|dW_dec|':>12}")
    for r in results:
        print(f"{r['architecture']:<12} {r['vit_lens_rows_per_s']:>16,.0f} {r['sae_lens_rows_per_s']:>15,.0f} "
              f"{r['speed_ratio']:>23.3f} {r['speed_ratio_min']:>7.3f} {r['speed_ratio_cpu']:>7.3f} "
              f"{r['max_abs_W_dec_difference']:>12.2e}")
    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                  "torch": torch.__version__, "sae_lens": sae_lens.__version__, "machine": platform.machine(),
                  "settings": vars(args), "results": results}
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
