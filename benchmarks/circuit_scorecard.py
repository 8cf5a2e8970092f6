"""Circuit-discovery methods scored against the planted classifier's edge truth (issue 21).

    python benchmarks/circuit_scorecard.py [--model classifier|clip|both] [--pairs 32] [--json PATH]

For each factor of the toy world, every edge method of :mod:`vit_lens.methods.circuit_scorecard` (EAP, EAP-IG
on inputs and on activations, exact edge patching, ACDC, a learned edge mask, and the node-attribution and
random baselines) scores the 479 edges of the planted model's circuit graph from the model and clean /
corrupted pairs only; the scores are then compared with ``vit_lens.planted.truth.edge_truth`` (edge AUROC,
average precision, precision at the true circuit's size, over the known edges), beside MIB's CPR and CMD from
real runs of each method's circuits. Prints markdown tables (for benchmarks/README.md) and writes the
figures, the date and the command as JSON.
"""

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from vit_lens.methods.circuit_scorecard import (
    DEFAULT_PAIRS,
    EDGE_METHODS,
    circuit_scorecard,
)
from vit_lens.methods.scorecard import SCORECARD_SEED
from vit_lens.planted import load_planted

MODELS = ("classifier", "clip")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=(*MODELS, "both"), default="classifier",
                        help="the planted model (the CLIP's image tower is the classifier's, read zero-shot)")
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, help="clean / corrupted pairs per factor")
    parser.add_argument("--methods", nargs="+", choices=list(EDGE_METHODS), default=None, help="default: all")
    parser.add_argument("--seed", type=int, default=SCORECARD_SEED)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(Path(__file__).with_suffix(".json")), help="where to write the figures")
    parser.add_argument("--method-scorecard-json", default=str(Path(__file__).with_name("method_scorecard.json")),
                        help="the head scorecard's figures, which get these under a 'circuits' key ('' to skip)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/circuit_scorecard.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    date = datetime.date.today().isoformat()
    print(f"# Circuit scorecard on the planted models ({date}; `{command}`; {args.threads} threads)\n")
    names = MODELS if args.model == "both" else (args.model,)
    result = {"date": date, "command": command, "torch": torch.__version__, "threads": args.threads, "models": {},
              "not_run": {}}
    start = time.perf_counter()
    for name in names:
        try:
            planted = load_planted(name)
        except (ValueError, FileNotFoundError) as error:
            print(f"## Planted {name}: not run\n\n{error}\n")
            result["not_run"][name] = str(error)
            continue
        card = circuit_scorecard(planted, name, n_pairs=args.pairs, seed=args.seed, methods=args.methods)
        print(card.markdown())
        print(f"\n({name}: {card.settings['seconds']:.0f} s)\n")
        result["models"][name] = card.to_json()
    result["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"(total {result['seconds']:.0f} s; figures written to {args.json})")
    if args.method_scorecard_json:
        add_to_method_scorecard(result, Path(args.method_scorecard_json))
    if result["not_run"]:
        print(f"not run: {sorted(result['not_run'])} (see above)", file=sys.stderr)
        return 2
    return 0


def add_to_method_scorecard(result: dict, path: Path) -> None:
    """Put the circuit figures under the ``"circuits"`` key of the head scorecard's JSON, beside its methods."""
    if not path.exists():
        print(f"({path} does not exist; run benchmarks/method_scorecard.py first to put the circuit figures in it)")
        return
    figures = json.loads(path.read_text())
    figures["circuits"] = result
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(figures, indent=1) + "\n")
    temporary.replace(path)  # never a half-written file
    print(f"(and under 'circuits' in {path})")


if __name__ == "__main__":
    raise SystemExit(main())
