"""SAE features scored against the toy world's truth (issue 15, point 7).

    python benchmarks/sae_scorecard.py [--model toy|classifier|clip|all] [--steps 600] [--json PATH]

For each model (the toy CLIP; the planted classifier and CLIP of ``vit_lens.load_planted`` when their
weights load) and each setting (hook point, architecture), one SAE is trained with
``vit_lens.sae.train_sae_on_activations`` on the activations of 2,000 toy images (cached once per hook
point and shuffled), and scored on 1,000 fresh images with ``vit_lens.sae.scoring.score_sae_features``:
for each of the 23 factor values, the best single feature's AUROC at detecting it (per image, the
feature's max activation over the tokens, or its activation on CLS), the share of values detected at
AUROC >= 0.95, and the share whose best feature's name (``name_features``: the decoder direction carried
to the output and matched to a text pool) mentions the value, beside the share a random text of the pool
would get. An untrained SAE (random unit directions, the same encoder as decoder) is the baseline.
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

import vit_lens
from vit_lens.sae.model import SAE, SAEConfig
from vit_lens.sae.scoring import SAEScorecard, score_sae_features
from vit_lens.sae.training import train_sae_on_activations
from vit_lens.toy import FACTORS, ToyWorld, description_pool

MODELS = ("toy", "classifier", "clip")


def _settings(n_layers: int) -> list[dict]:
    """(hook, architecture, k) per SAE: TopK on the last three residual streams, and a ReLU (L1) SAE on the last."""
    last = n_layers - 1
    settings = [dict(hook=f"blocks.{layer}.hook_resid_post", architecture="topk", k=16) for layer in (last - 2, last - 1, last)]
    settings.append(dict(hook=f"blocks.{last}.hook_resid_post", architecture="standard", k=None))
    settings.append(dict(hook=f"blocks.{last}.hook_resid_post", architecture="untrained", k=16))
    return settings


def _load(name: str, path: str | None):
    """``(model, texts, text_embeddings)``: the model and the pool its features are named with."""
    if name == "toy":
        return vit_lens.load_toy_clip(), description_pool()[0], None
    planted = vit_lens.load_planted(name, path=path)
    if name == "clip":
        return planted.model, description_pool()[0], None
    # The classifier's outputs are the 23 factor values' logits: a feature is named by the value it raises most.
    values = [value for values in FACTORS.values() for value in values]
    return planted.model, values, torch.eye(len(values))


@torch.no_grad()
def _activations(model, hook: str, images: torch.Tensor, seed: int) -> torch.Tensor:
    rows = torch.cat([model.run_with_cache(chunk, names_filter=hook)[1][hook].flatten(0, 1)
                      for chunk in images.split(250)])
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]


def _row(setting: dict, cards: dict[str, SAEScorecard], explained: float | None, seconds: float) -> dict:
    return {
        "hook": setting["hook"], "architecture": setting["architecture"], "k": setting["k"],
        "explained_variance": explained, "train_seconds": round(seconds, 1),
        **{f"{score}_{key}": value for score, card in cards.items() for key, value in (
            ("mean_auroc", round(card.mean_auroc, 3)), ("detected", round(card.detected_share, 3)),
            ("named", round(card.named_share, 3)), ("named_by_chance", round(card.named_by_chance, 3)))},
        "values": {score: [vars(row) for row in card.rows] for score, card in cards.items()},
    }


def run_model(name: str, path: str | None, args: argparse.Namespace) -> list[dict]:
    model, texts, text_embeddings = _load(name, path)
    cfg = model.cfg
    train_images = ToyWorld(seed=args.seed).sample(args.train_images).images
    test = ToyWorld(seed=args.seed + 1).sample(args.test_images)
    rows, cached = [], {}
    for setting in _settings(cfg.n_layers):
        hook = setting["hook"]
        start = time.perf_counter()
        architecture = "topk" if setting["architecture"] == "untrained" else setting["architecture"]
        sae_cfg = SAEConfig(d_in=cfg.d_model, d_sae=args.d_sae, architecture=architecture, k=setting["k"],
                            hook_name=hook, model_name=cfg.model_name)
        explained = None
        if setting["architecture"] == "untrained":
            sae = SAE(sae_cfg).init_weights(seed=args.seed).eval()
        else:
            if hook not in cached:
                cached = {hook: _activations(model, hook, train_images, args.seed)}
            extra = {"l1_coefficient": args.l1} if architecture == "standard" else {}
            sae, log = train_sae_on_activations(sae_cfg, cached[hook], steps=args.steps, batch_size_tokens=args.batch_tokens,
                                                lr=args.lr, seed=args.seed, progress=False, **extra)
            explained = round(float(log[-1]["explained_variance"]), 3)
        seconds = time.perf_counter() - start
        cards = {score: score_sae_features(model, sae, test, texts=texts, text_embeddings=text_embeddings,
                                           image_score=score, progress=False) for score in ("max", "cls")}
        rows.append(_row(setting, cards, explained, seconds))
        print(f"  {name} {hook} {setting['architecture']}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rows


def markdown(name: str, rows: list[dict]) -> str:
    lines = [
        f"### {name}\n",
        "| SAE | explained variance | mean best AUROC (max / CLS) | values at AUROC >= 0.95 (max / CLS) "
        "| best feature named right (max / CLS) | a random text of the pool |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        k = "" if row["k"] is None else f" k={row['k']}"
        sae = f"{row['architecture']}{k} on `{row['hook']}`"
        explained = "-" if row["explained_variance"] is None else f"{row['explained_variance']:.3f}"
        lines.append(
            f"| {sae} | {explained} | {row['max_mean_auroc']:.3f} / {row['cls_mean_auroc']:.3f} "
            f"| {100 * row['max_detected']:.0f}% / {100 * row['cls_detected']:.0f}% "
            f"| {100 * row['max_named']:.0f}% / {100 * row['cls_named']:.0f}% | {100 * row['max_named_by_chance']:.0f}% |"
        )
    return "\n".join(lines)


def values_markdown(row: dict, score: str) -> str:
    lines = [f"Per factor value, {row['architecture']} on `{row['hook']}`, image score {score}:\n",
             "| factor | value | best feature | AUROC | its name |", "|---|---|---|---|---|"]
    for value in row["values"][score]:
        mark = "right" if value["name_mentions_value"] else "wrong"
        lines.append(f"| {value['factor']} | {value['value']} | {value['feature']} | {value['auroc']:.3f} "
                     f"| {value['name']} ({mark}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=(*MODELS, "all"), default="toy")
    parser.add_argument("--classifier", default=None, help="a planted classifier checkpoint (default: the shipped one)")
    parser.add_argument("--clip", default=None, help="a planted CLIP checkpoint (default: the shipped one)")
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--l1", type=float, default=5.0, help="L1 coefficient of the ReLU SAE")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(Path(__file__).with_suffix(".json")), help="where to write the figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = "python benchmarks/sae_scorecard.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    date = datetime.date.today().isoformat()
    print(f"# SAE features against the truth ({date}; `{command}`; {args.threads} threads)\n")
    names = MODELS if args.model == "all" else (args.model,)
    paths = {"toy": None, "classifier": args.classifier, "clip": args.clip}
    result = {"date": date, "command": command, "torch": torch.__version__, "threads": args.threads, "models": {},
              "not_run": {}}
    start = time.perf_counter()
    for name in names:
        try:
            rows = run_model(name, paths[name], args)
        except (ValueError, FileNotFoundError) as error:
            if name == "toy":
                raise
            print(f"### Planted {name}: not run\n\n{error}\n")
            result["not_run"][name] = str(error)
            continue
        print(markdown(name, rows) + "\n")
        best = max((row for row in rows if row["architecture"] != "untrained"), key=lambda row: row["cls_mean_auroc"])
        print(values_markdown(best, "cls") + "\n")
        result["models"][name] = rows
    result["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"(total {result['seconds']:.0f} s; figures written to {args.json})")
    if result["not_run"]:
        print(f"not run: {sorted(result['not_run'])} (see above)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
