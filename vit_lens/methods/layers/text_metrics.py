"""Similarity of two descriptions, for the "Peeling Back the Layers" paper's linguistic difference ΔS^l and its CIDEr scores.

Every metric takes ``candidates`` (one string each) and ``references`` (one string, or a list of
strings, per candidate) and returns a ``[n]`` float64 tensor, one score per pair; higher means
more similar. They are thin adapters over maintained packages, imported only when a metric is
first used (``pip install 'vit_lens[text-metrics]'`` installs sacrebleu, rouge-score and
pycocoevalcap; BERTScore needs ``pip install bert-score`` and its model's weights):

=================  =============================================================  ============
name               what it computes                                               range
=================  =============================================================  ============
``"bleu"``         sentence BLEU (sacrebleu, 13a tokens, exponential smoothing,   0 .. 1
                   effective order), divided by 100
``"rouge_l"``      ROUGE-L F-measure (rouge-score; longest common subsequence;    0 .. 1
                   the best reference when there are several)
``"cider"``        CIDEr as the COCO caption evaluation computes it               0 .. 10
                   (pycocoevalcap; the "CIDEr-D" variant: clipped tf-idf n-gram
                   counts, n = 1..4, Gaussian length penalty, times 10)
``"bertscore"``    BERTScore F1 (bert-score), with the package's model            about 0 .. 1
``"exact"``        1 where the two strings are equal (after stripping), else 0    0 or 1
=================  =============================================================  ============

CIDEr depends on the whole set it is given: its inverse document frequencies are computed over
the references of *all* pairs in one call, so the score of a pair changes with the other pairs.
An n-gram that occurs in every reference has zero weight; with a single pair every n-gram does,
and the score is always 0. Score a whole corpus (e.g. every image's description at two adjacent
layers) in one call, as the paper's CIDEr averages do. The other metrics score each pair on its
own. pycocoevalcap's usual tokenizer needs Java; here text is lower-cased and split into words
(``[a-z0-9]+``, punctuation dropped) before CIDEr, which is what that tokenizer does to plain
English captions.

Example:
    >>> from vit_lens.methods.layers.text_metrics import rouge_l
    >>> rouge_l(["a red square on the left"], ["a red circle on the left"]).tolist()  # LCS 5 of 6 words
    [0.8333333333333334]
"""

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

TextMetric = Callable[..., Tensor]
EXTRA = "pip install 'vit_lens[text-metrics]'"
_WORD = re.compile(r"[a-z0-9]+")


def _require(module: str, package: str, metric: str, install: str = EXTRA):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"The {metric!r} metric needs the {package} package, which is not installed: {install} "
            f"(or pip install {package})"
        ) from error


def _pairs(candidates: Any, references: Any, metric: str) -> tuple[list[str], list[list[str]]]:
    """Validate and normalise to ``(candidates, [[reference, ...], ...])``."""
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise TypeError(f"{metric}: candidates must be a list of strings, got {type(candidates).__name__}")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise TypeError(
            f"{metric}: references must be a list with one string (or one list of strings) per candidate, "
            f"got {type(references).__name__}"
        )
    if len(candidates) != len(references):
        raise ValueError(
            f"{metric}: {len(candidates)} candidates but {len(references)} references; give one reference "
            "(or one list of references) per candidate"
        )
    refs = []
    for i, (candidate, reference) in enumerate(zip(candidates, references)):
        if not isinstance(candidate, str):
            raise TypeError(f"{metric}: candidate {i} is {type(candidate).__name__}, not str: {candidate!r}")
        group = [reference] if isinstance(reference, str) else list(reference)
        if not group or not all(isinstance(r, str) for r in group):
            raise TypeError(f"{metric}: reference {i} must be a string or a non-empty list of strings, got {reference!r}")
        refs.append(group)
    return list(candidates), refs


def _tokens(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def bleu(
    candidates: Sequence[str],
    references: Sequence[Any],
    *,
    max_order: int = 4,
    smooth_method: str = "exp",
    lowercase: bool = False,
) -> Float[Tensor, " n"]:
    """Sentence-level BLEU of each candidate against its reference(s), in [0, 1] (sacrebleu / 100).

    Args:
        candidates: One string per pair.
        references: One string, or a list of strings, per pair.
        max_order: Largest n-gram order (4 is standard BLEU; sacrebleu's effective order drops
            the orders a short candidate has no n-grams for).
        smooth_method: sacrebleu's smoothing for zero n-gram matches (``"exp"``, ``"floor"``,
            ``"add-k"``, ``"none"``).
        lowercase: Compare case-insensitively.

    Example:
        >>> round(bleu(["the cat sat on the mat"], ["the cat sat on a mat"]).item(), 4)  # (5/6*3/5*2/4*1/3)**(1/4)
        0.5373
    """
    cands, refs = _pairs(candidates, references, "bleu")
    sacrebleu = _require("sacrebleu.metrics", "sacrebleu", "bleu")
    scorer = sacrebleu.BLEU(
        lowercase=lowercase, smooth_method=smooth_method, max_ngram_order=max_order, effective_order=True
    )
    return torch.tensor([scorer.sentence_score(c, r).score / 100.0 for c, r in zip(cands, refs)], dtype=torch.float64)


def rouge_l(candidates: Sequence[str], references: Sequence[Any], *, use_stemmer: bool = False) -> Float[Tensor, " n"]:
    """ROUGE-L F-measure (longest common subsequence of words) of each pair, in [0, 1].

    With several references the best one counts (rouge-score's ``score_multi``). rouge-score
    lower-cases and keeps only letters and digits.

    Example:
        >>> rouge_l(["a red object"], ["red object on the left"]).item()  # LCS 2: P 2/3, R 2/5
        0.5
    """
    cands, refs = _pairs(candidates, references, "rouge_l")
    module = _require("rouge_score.rouge_scorer", "rouge-score", "rouge_l")
    scorer = module.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    scores = [scorer.score_multi(r, c)["rougeL"].fmeasure for c, r in zip(cands, refs)]
    return torch.tensor(scores, dtype=torch.float64)


def cider(
    candidates: Sequence[str], references: Sequence[Any], *, max_order: int = 4, sigma: float = 6.0
) -> Float[Tensor, " n"]:
    """CIDEr of each candidate against its references, with document frequencies over *all* pairs given.

    The score depends on the corpus (see the module docstring): pass every pair of an evaluation
    in one call. A single pair always scores 0. The corpus mean is ``cider(...).mean()``.

    Args:
        candidates: One string per pair.
        references: One string, or a list of strings, per pair.
        max_order: Largest n-gram order (4 in the paper and the COCO evaluation).
        sigma: Standard deviation (in words) of the Gaussian length penalty.

    Example:
        >>> # every n-gram has idf log 2; cosine 1 for 1- and 2-grams, 0 for the absent 3- and 4-grams
        >>> cider(["red square", "blue circle"], ["red square", "blue circle"]).tolist()
        [5.0, 5.0]
    """
    cands, refs = _pairs(candidates, references, "cider")
    if not cands:
        return torch.zeros(0, dtype=torch.float64)
    refs = [[_tokens(r) for r in group] for group in refs]
    if not any(r for group in refs for r in group):
        raise ValueError("cider: every reference is empty (no words); CIDEr needs words to count n-grams")
    module = _require("pycocoevalcap.cider.cider_scorer", "pycocoevalcap", "cider")
    scorer = module.CiderScorer(n=max_order, sigma=sigma)
    for candidate, group in zip(cands, refs):
        scorer += (_tokens(candidate), group)
    _, scores = scorer.compute_score()
    return torch.as_tensor(scores, dtype=torch.float64)


def exact_match(candidates: Sequence[str], references: Sequence[Any]) -> Float[Tensor, " n"]:
    """1.0 where the candidate equals one of its references after stripping whitespace, else 0.0.

    Example:
        >>> exact_match(["red object ", "blue object"], ["red object", "red object"]).tolist()
        [1.0, 0.0]
    """
    cands, refs = _pairs(candidates, references, "exact")
    same = [any(c.strip() == r.strip() for r in group) for c, group in zip(cands, refs)]
    return torch.tensor(same, dtype=torch.float64)


def bertscore(
    candidates: Sequence[str],
    references: Sequence[Any],
    *,
    model_type: str | None = None,
    lang: str = "en",
    num_layers: int | None = None,
    batch_size: int = 64,
    device: str | None = None,
    rescale_with_baseline: bool = False,
) -> Float[Tensor, " n"]:
    """BERTScore F1 of each pair (the metric of the paper's Algorithm 1), with the bert-score package.

    The model (``model_type``, default bert-score's choice for ``lang``, ``roberta-large`` for
    English) must be available: in the Hugging Face cache when offline. vit_lens never downloads
    it in tests; this raises a clear error when it cannot be loaded.

    Args:
        candidates, references: As for the other metrics (several references: the best counts).
        model_type, lang, num_layers, batch_size, device, rescale_with_baseline: Passed to
            ``bert_score.score``.

    Example:
        >>> bertscore(["a red square"], ["a red box"], model_type="roberta-large")  # doctest: +SKIP
        tensor([0.9650], dtype=torch.float64)
    """
    cands, refs = _pairs(candidates, references, "bertscore")
    module = _require("bert_score", "bert-score", "bertscore", install="pip install bert-score")
    try:
        _, _, f1 = module.score(
            cands, refs, model_type=model_type, lang=lang, num_layers=num_layers, batch_size=batch_size,
            device=device, rescale_with_baseline=rescale_with_baseline, verbose=False,
        )
    except OSError as error:
        name = model_type or f"bert-score's default model for lang={lang!r}"
        raise RuntimeError(
            f"BERTScore could not load {name}: its weights are not available (offline, or not in the Hugging Face "
            "cache). Download them once with network access, or use another metric: 'rouge_l', 'bleu', 'cider'."
        ) from error
    return f1.to(torch.float64)


METRICS: dict[str, TextMetric] = {
    "bleu": bleu,
    "rouge_l": rouge_l,
    "cider": cider,
    "bertscore": bertscore,
    "exact": exact_match,
}
"""Metric names accepted wherever vit_lens takes ``metric=``."""


def get_metric(metric: Any) -> TextMetric:
    """A metric function from its name (``"bleu"``, ``"rouge_l"``, ``"cider"``, ``"bertscore"``,
    ``"exact"``) or a callable ``metric(candidates, references) -> [n]`` passed through.

    Example:
        >>> get_metric("rouge_l") is rouge_l
        True
    """
    if callable(metric):
        return metric
    if isinstance(metric, str):
        key = metric.lower().replace("-", "_")
        if key in METRICS:
            return METRICS[key]
    raise ValueError(
        f"Unknown text metric {metric!r}: use one of {sorted(METRICS)} or a function "
        "metric(candidates: list[str], references: list[str]) -> tensor of per-pair scores"
    )
