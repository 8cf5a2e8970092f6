"""Text pools: the loader's rules, the packaged pool equals its generator, the paper's pools when present."""

import hashlib
import warnings
from pathlib import Path

import pytest

from vit_lens.methods.textspan.pools import PAPER_POOLS, default_text_pool, load_text_pool, paper_text_pool, save_text_pool
from vit_lens.methods.textspan.pools import generate

PAPER_DIR = Path(__file__).resolve().parents[2] / "shared" / "textspan_text_descriptions"


def test_loader_strips_skips_and_dedupes_with_a_warning(tmp_path):
    path = tmp_path / "pool.txt"
    path.write_text("# a comment\n a red car \n\n\t\nA dog\n  # indented comment\na red car\nthe letter B", encoding="utf-8")
    with pytest.warns(UserWarning, match="dropped 1 duplicate description"):
        assert load_text_pool(path) == ["a red car", "A dog", "the letter B"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_text_pool(path, dedupe=False) == ["a red car", "A dog", "a red car", "the letter B"]


def test_loader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text_pool(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n   \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt.*holds no description"):
        load_text_pool(empty)


def test_save_and_load_round_trip(tmp_path):
    texts = ["a photo of a cat", "Ünïcode façade", "the number 7"]
    path = save_text_pool(texts, tmp_path / "nested" / "pool.txt")
    assert load_text_pool(path) == texts
    assert path.read_text(encoding="utf-8") == "a photo of a cat\nÜnïcode façade\nthe number 7\n"
    for bad, problem in [(["ok", " padded"], "whitespace"), (["a\nb"], "line break"), (["#tag"], "starts with '#'"),
                         (["x", "x"], "duplicate"), (["", "y"], "empty")]:
        with pytest.raises(ValueError, match=problem):
            save_text_pool(bad, tmp_path / "bad.txt")
    with pytest.raises(TypeError, match="not one string"):
        save_text_pool("a cat", tmp_path / "bad.txt")


def test_packaged_pool_is_the_generators_output():
    assert generate.PACKAGED_FILE.read_text(encoding="utf-8") == generate.render()
    pool = default_text_pool()
    assert pool == generate.generate()
    assert 2000 <= len(pool) <= 6000
    assert len({text.lower() for text in pool}) == len(pool)  # no duplicates, not even up to case
    assert all(text == text.strip() and text and not text.startswith("#") for text in pool)
    categories = generate.categories()
    expected = {"colours", "shapes", "textures", "counts", "locations", "scenes", "objects", "animals", "people",
                "art styles", "letters", "numbers"}
    assert set(categories) == expected
    members = set(pool)
    for name, descriptions in categories.items():
        assert len(descriptions) >= 100, name
        assert set(descriptions) <= members, name
    for example in ["a photo taken in a forest", "an image with red colors", "a watercolor painting", "the letter B",
                    "three dogs", "a photo taken in Paris, France", "a triangle", "a furry texture", "the number 42",
                    "a portrait of a woman", "a photo of an elephant"]:
        assert example in members, example
    # articles follow the next word's sound
    assert not [t for t in pool if " a a" in f" {t}" or " a e" in f" {t}" or " a o" in f" {t}"]


def test_generator_cli_writes_and_checks(tmp_path, capsys):
    target = tmp_path / "pool.txt"
    assert generate.main(["--output", str(target), "--check"]) == 1
    assert generate.main(["--output", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == generate.render()
    assert generate.main(["--output", str(target), "--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_paper_pool_loader_with_a_stand_in_file(tmp_path):
    name, _ = PAPER_POOLS["common_words"]
    (tmp_path / name).write_text("the\nof\nand\nthe", encoding="utf-8")
    with pytest.warns(UserWarning, match="differs from the paper's google_3498_english.txt"):
        assert paper_text_pool("common_words", tmp_path) == ["the", "of", "and", "the"]  # rows kept by default
    with pytest.warns(UserWarning):
        assert paper_text_pool("google_3498_english", tmp_path, dedupe=True) == ["the", "of", "and"]
    with pytest.raises(FileNotFoundError, match="image_descriptions_general.txt not found.*clip_text_span"):
        paper_text_pool("general", tmp_path)
    with pytest.raises(ValueError, match="Unknown paper pool 'chatgpt'"):
        paper_text_pool("chatgpt", tmp_path)


def test_paper_pools_from_the_workspace():
    """Reads the paper's files where this workspace has them; elsewhere, the loader must say where to put them."""
    if not PAPER_DIR.is_dir():
        with pytest.raises(FileNotFoundError, match=str(PAPER_DIR.name)):
            paper_text_pool("general", PAPER_DIR)
        return
    for name, (file_name, sha256) in PAPER_POOLS.items():
        assert hashlib.sha256((PAPER_DIR / file_name).read_bytes()).hexdigest() == sha256
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pool = paper_text_pool(name, PAPER_DIR)
        assert len(pool) == 3498, name  # "This results in 3498 sentences"; row-aligned with the paper's embeddings
    with pytest.warns(UserWarning, match="dropped 5 duplicate"):
        assert len(paper_text_pool("general", PAPER_DIR, dedupe=True)) == 3493
    assert len(set(paper_text_pool("common_words", PAPER_DIR))) == 3498
