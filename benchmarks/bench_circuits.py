"""Circuit methods' time and peak memory, as ratios of one plain forward + backward on the same model and batch.

Models (no downloads): the toy CLIP's image tower (``vit_lens.load_toy_clip()``), the planted classifier
(``vit_lens.load_planted("classifier")``) and a random-weight ViT-B/16 (timm ``vit_base_patch16_224``'s
shape, ``init_weights(seed=0)``). Metric: a logit difference (the planted classifier's position factor on
its task pairs; output 0 minus output 1 on the others).

Times, in the same repeats (paired ratios, order reversed every other repeat):

* ``fwd+bwd``: the baseline: one forward of the clean batch and one backward of the metric to the input
  pixels (activation gradients only, like the methods' backward passes);
* ``fwd+bwd(params)``: the same backward into every parameter (a training step's), for reference;
* ``EAP``, ``EAP-IG-inputs(k)``, ``EAP-IG-activations(k)``, ``node attribution``, and ``exact`` (exact edge
  patching of every edge; only where the graph is small, ``--exact-max-edges``).

Peak memory: each method run once in a fresh subprocess, the peak RSS above the RSS after the model and the
images were built (``benchmarks/_memory.py``), against the size of the senders' outputs
``[n_senders, batch, pos, d_model]`` in float32, the tensor every method holds twice (clean - source, and
the source itself).

Usage:
    python benchmarks/bench_circuits.py                       # all three models, 1 thread
    python benchmarks/bench_circuits.py --models planted --repeats 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = ("toy_clip", "planted", "vit_b16")
METHODS = ("fwd+bwd", "fwd+bwd(params)", "EAP", "EAP-IG-inputs", "EAP-IG-activations", "node attribution", "exact")


def build(name: str, batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, Callable]:
    """``(tower, clean, corrupted, metric)`` for one benchmark model."""
    import vit_lens
    from vit_lens.model.hooked_vit import image_tower

    if name == "vit_b16":
        from vit_lens.model.config import ViTConfig
        from vit_lens.model.hooked_vit import HookedViT

        cfg = ViTConfig(d_model=768, n_layers=12, n_heads=12, d_head=64, d_mlp=3072, patch_size=16, image_size=224,
                        eps=1e-6, n_classes=1000, model_name="random vit_base_patch16_224")
        tower = HookedViT(cfg).init_weights(seed=0).eval()
        generator = torch.Generator().manual_seed(0)
        clean, corrupted = torch.randn(2, batch, 3, 224, 224, generator=generator)
        return tower, clean, corrupted, _difference_of_first_two
    from vit_lens.methods.scorecard import factor_readout, logit_difference, task_data

    pairs = task_data(n_images=4, n_pairs=batch, factors=["position"]).pairs["position"]
    if name == "toy_clip":
        return image_tower(vit_lens.load_toy_clip()), pairs.clean, pairs.corrupted, _difference_of_first_two
    if name == "planted":
        tower = vit_lens.load_planted("classifier").model
        readout = factor_readout(tower)

        def metric(output: torch.Tensor) -> torch.Tensor:
            return logit_difference(readout.logits(output, "position"), pairs.clean_values, pairs.corrupted_values)

        return tower, pairs.clean, pairs.corrupted, metric
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def _difference_of_first_two(output: torch.Tensor) -> torch.Tensor:
    return output[:, 0] - output[:, 1]


def runner(method: str, tower, graph, clean, corrupted, metric, steps: int) -> Callable[[], object]:
    from vit_lens.circuits import (
        eap_ig,
        edge_attribution_patching,
        exact_edge_patching,
        node_attribution_patching,
    )

    def plain(parameters: bool) -> Callable[[], object]:
        def run() -> object:
            images = clean.clone().requires_grad_(True)
            value = metric(tower(images)).sum()
            if parameters:
                tower.zero_grad(set_to_none=True)
                value.backward()
                return None
            return torch.autograd.grad(value, [images])

        return run

    table = {
        "fwd+bwd": plain(False),
        "fwd+bwd(params)": plain(True),
        "EAP": lambda: edge_attribution_patching(tower, graph, clean, corrupted, metric),
        "EAP-IG-inputs": lambda: eap_ig(tower, graph, clean, corrupted, metric, steps=steps, interpolate="inputs"),
        "EAP-IG-activations": lambda: eap_ig(tower, graph, clean, corrupted, metric, steps=steps,
                                             interpolate="activations"),
        "node attribution": lambda: node_attribution_patching(tower, graph, clean, corrupted, metric),
        "exact": lambda: exact_edge_patching(tower, graph, clean, corrupted, metric),
    }
    return table[method]


def time_model(name: str, batch: int, args: argparse.Namespace) -> None:
    from vit_lens.circuits import CircuitGraph

    tower, clean, corrupted, metric = build(name, batch)
    graph = CircuitGraph.from_model(tower)
    methods = [m for m in METHODS if m != "exact" or graph.n_edges <= args.exact_max_edges]
    runs = {m: runner(m, tower, graph, clean, corrupted, metric, args.steps) for m in methods}
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {m: [] for m in methods}
    for repeat in range(args.repeats):
        for method in methods if repeat % 2 == 0 else reversed(methods):
            start = time.perf_counter()
            runs[method]()
            times[method].append(time.perf_counter() - start)
    cfg = tower.cfg
    activations = graph.n_senders * batch * cfg.n_ctx * cfg.d_model * 4
    print(f"\n{name}: {cfg.n_layers} layers x {cfg.n_heads} heads, d_model {cfg.d_model}, {cfg.n_ctx} tokens, "
          f"{graph.n_edges} edges; batch {batch}; senders' outputs {activations / 1e6:.1f} MB")
    memory = {m: peak_memory(name, batch, m, args) for m in methods} if args.memory else {}
    print(f"{'method':>20} {'median s':>9} {'/fwd+bwd':>9} {'(min)':>7} {'peak MB':>8} {'/acts':>6}")
    for method, series in times.items():
        paired = statistics.median(t / b for t, b in zip(series, times["fwd+bwd"], strict=True))
        fastest = min(series) / min(times["fwd+bwd"])
        label = f"{method}({args.steps})" if method.startswith("EAP-IG") else method
        peak = memory.get(method)
        peak_text = f"{peak:8.1f} {peak * 1e6 / activations:6.2f}" if peak is not None else f"{'':>8} {'':>6}"
        print(f"{label:>20} {statistics.median(series):9.3f} {paired:9.2f} {fastest:7.2f} {peak_text}")


def peak_memory(name: str, batch: int, method: str, args: argparse.Namespace) -> float | None:
    """Peak RSS above the built model's, in MB, of one run of ``method`` in a fresh subprocess."""
    command = [sys.executable, __file__, "--one", name, method, "--batch-for-one", str(batch), "--steps",
               str(args.steps), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"memory of {method} on {name} failed:\n{done.stderr[-2000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_delta_mb"]


def measure_one(name: str, method: str, batch: int, steps: int) -> None:
    from _memory import peak_rss_above_baseline

    from vit_lens.circuits import CircuitGraph

    tower, clean, corrupted, metric = build(name, batch)
    graph = CircuitGraph.from_model(tower)
    run = runner(method, tower, graph, clean, corrupted, metric, steps)
    with peak_rss_above_baseline() as result:
        run()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--toy-batch", type=int, default=16, help="pairs for the toy CLIP and the planted classifier")
    parser.add_argument("--vit-batch", type=int, default=2, help="pairs for the random ViT-B/16")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--exact-max-edges", type=int, default=2000, help="exact edge patching only up to this size")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--batch-for-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        measure_one(args.one[0], args.one[1], args.batch_for_one, args.steps)
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} repeats, EAP-IG steps {args.steps}, "
          f"load average {os.getloadavg()[0]:.2f}")
    for name in args.models:
        time_model(name, args.vit_batch if name == "vit_b16" else args.toy_batch, args)


if __name__ == "__main__":
    main()
