"""vit_lens's interpretability methods scored against the planted models' known mechanism (issue 14).

    python benchmarks/method_scorecard.py [--model classifier|clip|both] [--json PATH]

For each planted model (``vit_lens.load_planted``), every head method of :mod:`vit_lens.methods.scorecard`
(mean and resample ablation, activation and attribution patching, direct contributions, TextSpan on the
CLIP, and the random and head-output-variance baselines) scores each head for each factor from the model
and fresh images only; the scores are then compared with the planted truth (average precision over the
16 heads, top-1 hit, head x token group AP), and the localisation maps with the world's true masks.
Prints markdown tables (for benchmarks/README.md) and writes the figures, the date and the command as JSON.
"""

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from vit_lens.methods.scorecard import SCORECARD_SEED, scorecard
from vit_lens.planted import load_planted

MODELS = ("classifier", "clip")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=(*MODELS, "both"), default="both")
    parser.add_argument("--classifier", default=None, help="a planted classifier checkpoint (default: the shipped one)")
    parser.add_argument("--clip", default=None, help="a planted CLIP checkpoint (default: the shipped one)")
    parser.add_argument("--images", type=int, default=256, help="images for the ablations, decomposition, TextSpan")
    parser.add_argument("--pairs", type=int, default=64, help="pairs per factor for activation / attribution patching")
    parser.add_argument("--localisation-images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=SCORECARD_SEED)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(Path(__file__).with_suffix(".json")), help="where to write the figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/method_scorecard.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    date = datetime.date.today().isoformat()
    print(f"# Method scorecard on the planted models ({date}; `{command}`; {args.threads} threads)\n")
    names = MODELS if args.model == "both" else (args.model,)
    paths = {"classifier": args.classifier, "clip": args.clip}
    result = {"date": date, "command": command, "torch": torch.__version__, "threads": args.threads, "models": {},
              "not_run": {}}
    start = time.perf_counter()
    for name in names:
        try:
            planted = load_planted(name, path=paths[name])
        except (ValueError, FileNotFoundError) as error:
            print(f"## Planted {name}: not run\n\n{error}\n")
            result["not_run"][name] = str(error)
            continue
        card = scorecard(planted, name, n_images=args.images, n_pairs=args.pairs,
                         n_localisation=args.localisation_images, seed=args.seed)
        print(card.markdown())
        print(f"\n({name}: {card.settings['seconds']:.0f} s)\n")
        result["models"][name] = card.to_json()
    result["seconds"] = round(time.perf_counter() - start, 1)
    previous = Path(args.json)
    if previous.exists() and "circuits" in (kept := json.loads(previous.read_text())):
        result["circuits"] = kept["circuits"]  # benchmarks/circuit_scorecard.py's figures, kept across reruns
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"(total {result['seconds']:.0f} s; figures written to {args.json})")
    if result["not_run"]:
        print(f"not run: {sorted(result['not_run'])} (see above)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
