"""Text metrics for ΔS^l: hand-computed values, corpus dependence of CIDEr, and the adapters' errors."""

import math
import sys
import types

import pytest
import torch

from vit_lens import text_metrics
from vit_lens.methods.layers.text_metrics import bertscore, bleu, cider, exact_match, get_metric, rouge_l

PAIRWISE = [bleu, rouge_l, exact_match]


@pytest.mark.parametrize("metric", PAIRWISE, ids=lambda m: m.__name__)
def test_identical_strings_score_one_and_disjoint_score_zero(metric):
    same = metric(["two small red triangles on the left"], ["two small red triangles on the left"])
    disjoint = metric(["green square"], ["dotted background"])
    assert same.dtype == torch.float64 and same.shape == (1,)
    assert same.item() == pytest.approx(1.0, abs=1e-12)
    assert disjoint.item() == 0.0


def test_bleu_matches_the_geometric_mean_of_clipped_precisions():
    # "the cat sat on the mat" vs "the cat sat on a mat": matched n-grams 5/6, 3/5, 2/4, 1/3; equal lengths (BP 1)
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]).item() == pytest.approx(expected, rel=1e-9)
    # a candidate shorter than its reference pays the brevity penalty exp(1 - r / c)
    short = bleu(["the cat sat on"], ["the cat sat on the mat"]).item()
    assert short == pytest.approx(math.exp(1 - 6 / 4), rel=1e-9)


def test_rouge_l_is_the_f_measure_of_the_longest_common_subsequence():
    # LCS("a red object", "red object on the left") = 2 words: P = 2/3, R = 2/5, F = 2PR / (P + R) = 0.5
    assert rouge_l(["a red object"], ["red object on the left"]).item() == pytest.approx(0.5)
    # word order matters: LCS of "left red" and "red left" is 1 word
    assert rouge_l(["left red"], ["red left"]).item() == pytest.approx(0.5)
    # with several references the best one counts
    best = rouge_l(["a red object"], [["blue sky", "a red object on the left"]]).item()
    assert best == pytest.approx(2 * (3 / 3) * (3 / 6) / (3 / 3 + 3 / 6))


def test_cider_identical_captions_in_a_corpus_of_distinct_vocabularies():
    # two pairs, no shared n-gram: every n-gram has idf log(2) - log(1) > 0 and cosine 1 for each order present
    four_words = cider(["a red square left", "the blue circle right"], ["a red square left", "the blue circle right"])
    two_words = cider(["red square", "blue circle"], ["red square", "blue circle"])
    torch.testing.assert_close(four_words, torch.tensor([10.0, 10.0], dtype=torch.float64))  # 10 * mean(1, 1, 1, 1)
    torch.testing.assert_close(two_words, torch.tensor([5.0, 5.0], dtype=torch.float64))  # 10 * mean(1, 1, 0, 0)


def test_cider_by_hand_and_its_dependence_on_the_corpus():
    # pair 1: candidate "red square", reference "red circle". Only the unigram "red" matches; idf(g) = log N - log df(g)
    # over the references, with df of a candidate-only n-gram taken as 1. No bigram matches; equal lengths.
    def pair_one(n_docs: int, df_circle: int) -> float:
        idf = lambda df: math.log(n_docs) - math.log(df)  # noqa: E731
        candidate = {"red": idf(1), "square": idf(1)}
        reference = {"red": idf(1), "circle": idf(df_circle)}
        dot = sum(min(v, reference.get(g, 0.0)) * reference.get(g, 0.0) for g, v in candidate.items())
        norm = lambda v: math.sqrt(sum(x * x for x in v.values()))  # noqa: E731
        unigram_similarity = dot / (norm(candidate) * norm(reference))
        return 10 * unigram_similarity / 4  # mean over n = 1..4; orders 2..4 contribute 0

    three = cider(["red square", "blue circle", "green box"], ["red circle", "blue circle", "green box"])
    two = cider(["red square", "blue circle"], ["red circle", "blue circle"])
    assert three[0].item() == pytest.approx(pair_one(3, 2), rel=1e-9)
    assert two[0].item() == pytest.approx(pair_one(2, 2), rel=1e-9)  # "circle" is in every reference: idf 0
    assert abs(three[0].item() - two[0].item()) > 0.05  # same pair, different corpus, different score
    assert cider(["red square"], ["red square"]).item() == 0.0  # a single pair: every idf is log 1 = 0


def test_cider_ignores_case_and_punctuation():
    a = cider(["A red square.", "blue circle"], ["a red square", "Blue, circle"])
    b = cider(["a red square", "blue circle"], ["a red square", "blue circle"])
    torch.testing.assert_close(a, b)


def test_exact_match_strips_whitespace_and_accepts_several_references():
    assert exact_match([" red object", "sky"], [["blue object", "red object"], "sky "]).tolist() == [1.0, 1.0]
    assert exact_match(["Red object"], ["red object"]).tolist() == [0.0]


def test_get_metric_by_name_or_function_and_a_directed_error():
    assert get_metric("rouge-l") is rouge_l and get_metric("CIDEr") is cider
    custom = lambda c, r: torch.zeros(len(c))  # noqa: E731
    assert get_metric(custom) is custom
    with pytest.raises(ValueError, match="bleu.*cider"):
        get_metric("meteor")


def test_argument_errors_name_what_was_passed():
    with pytest.raises(ValueError, match="2 candidates but 1 references"):
        rouge_l(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="list of strings"):
        bleu("red object", ["red object"])
    with pytest.raises(TypeError, match="reference 0"):
        cider(["red object"], [[]])
    with pytest.raises(ValueError, match="every reference is empty"):
        cider(["red", "blue"], ["...", "!"])


def test_a_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu.metrics", None)
    with pytest.raises(ImportError, match=r"vit_lens\[text-metrics\]"):
        bleu(["a"], ["a"])
    monkeypatch.setitem(sys.modules, "bert_score", None)
    with pytest.raises(ImportError, match="pip install bert-score"):
        bertscore(["a"], ["a"])


def test_bertscore_adapter_passes_options_and_explains_missing_weights(monkeypatch):
    # A stand-in for the bert-score package: the adapter's job is the call and the error, not BERT itself.
    calls = {}

    def score(cands, refs, **kwargs):
        calls.update(kwargs, cands=cands, refs=refs)
        if kwargs["model_type"] == "missing-model":
            raise OSError("We couldn't connect to the Hub")
        f1 = torch.tensor([0.25, 0.75])
        return f1, f1, f1

    monkeypatch.setitem(sys.modules, "bert_score", types.SimpleNamespace(score=score))
    out = bertscore(["a", "b"], ["c", ["d", "e"]], model_type="tiny", num_layers=2)
    assert out.dtype == torch.float64 and out.tolist() == [0.25, 0.75]
    assert calls["refs"] == [["c"], ["d", "e"]] and calls["model_type"] == "tiny" and calls["num_layers"] == 2
    with pytest.raises(RuntimeError, match="missing-model.*weights are not available"):
        bertscore(["a"], ["b"], model_type="missing-model")


def test_registry_lists_every_metric():
    assert set(text_metrics.METRICS) == {"bleu", "rouge_l", "cider", "bertscore", "exact"}
