"""Text pools for TextSpan: candidate descriptions, one per line.

* :func:`default_text_pool` — the packaged pool of general image descriptions, built from our own
  word lists by :mod:`vit_lens.methods.textspan.pools.generate` (colours, shapes, textures, counts, locations,
  scenes, objects, animals, people, art styles, letters, numbers).
* :func:`paper_text_pool` — Gandelsman et al.'s two pools (ChatGPT-written general descriptions and the
  3,498 most common English words), read from a directory you provide. They are not shipped with
  vit_lens; get them from github.com/yossigandelsman/clip_text_span (``text_descriptions/``).
* :func:`load_text_pool` / :func:`save_text_pool` — your own pools.

File format: UTF-8 text, one description per line. Surrounding whitespace is stripped; blank lines
and lines starting with ``#`` are skipped.
"""

import hashlib
import os
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

__all__ = ["load_text_pool", "save_text_pool", "default_text_pool", "paper_text_pool", "PAPER_POOLS"]

# name -> (file name in clip_text_span's text_descriptions/, sha256 of the file at commit 49f70f31)
PAPER_POOLS = {
    "general": (
        "image_descriptions_general.txt", "39c6bf3e788684d9e0e8afa902c13aae1ee8eafefdbab94ba923fd05b9038630",
    ),
    "common_words": (
        "google_3498_english.txt", "d9502487f471d07e44b8ae79e01fd03527ab032be2c7d721c1346f97efdaf2c5",
    ),
}
_ALIASES = {"image_descriptions_general": "general", "google_3498_english": "common_words", "common": "common_words"}


def load_text_pool(path: str | os.PathLike, dedupe: bool = True) -> list[str]:
    """Read a pool of descriptions: one per line, stripped; blank and ``#`` lines skipped.

    Duplicates are removed by default (the first occurrence is kept, order is preserved) and a
    ``UserWarning`` says how many were dropped, so the returned list can be shorter than the
    number of non-blank lines. Pass ``dedupe=False`` to keep every line, e.g. to stay aligned with
    text embeddings computed from the raw file.

    Args:
        path: The text file.
        dedupe: Drop repeated descriptions (after stripping), with a warning naming the count.

    Returns:
        The descriptions, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file holds no description.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "pool.txt"
        >>> _ = path.write_text("# colours\\na red car\\n\\n  a blue sky \\n")
        >>> load_text_pool(path)
        ['a red car', 'a blue sky']
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Text pool {str(path)!r} does not exist (expected a text file, one description per line)"
        )
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [line for line in lines if line and not line.startswith("#")]
    if not texts:
        raise ValueError(f"Text pool {str(path)!r} holds no description (only blank lines or '#' comments)")
    if dedupe:
        unique = list(dict.fromkeys(texts))
        if len(unique) < len(texts):
            warnings.warn(
                f"{path}: dropped {len(texts) - len(unique)} duplicate description(s); {len(unique)} remain "
                "(load_text_pool(..., dedupe=False) keeps them)",
                stacklevel=2,
            )
        texts = unique
    return texts


def save_text_pool(texts: Sequence[str], path: str | os.PathLike) -> Path:
    """Write descriptions one per line, so that :func:`load_text_pool` reads back exactly ``texts``.

    Entries that would not survive the round trip are refused: empty ones, ones with a line break
    or surrounding whitespace, ones starting with ``#``, and duplicates.

    Args:
        texts: The descriptions.
        path: Where to write (parent directories are created).

    Returns:
        The path written.

    Example:
        >>> import tempfile, pathlib
        >>> path = save_text_pool(["a red car", "a blue sky"], pathlib.Path(tempfile.mkdtemp()) / "pool.txt")
        >>> load_text_pool(path)
        ['a red car', 'a blue sky']
    """
    if isinstance(texts, str):
        raise TypeError("save_text_pool takes a sequence of descriptions, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError("save_text_pool: no descriptions to write")
    seen: set[str] = set()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"save_text_pool: entry {i} is {type(text).__name__}, not str: {text!r}")
        problem = (
            "is empty" if not text.strip()
            else "contains a line break" if "\n" in text or "\r" in text
            else "has leading or trailing whitespace" if text != text.strip()
            else "starts with '#' (read back as a comment)" if text.startswith("#")
            else "is a duplicate" if text in seen
            else None
        )
        if problem:
            raise ValueError(f"save_text_pool: entry {i} ({text!r}) {problem}; it would not read back as written")
        seen.add(text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def default_text_pool() -> list[str]:
    """The packaged pool of general image descriptions (a few thousand; see :mod:`vit_lens.methods.textspan.pools.generate`).

    Example:
        >>> pool = default_text_pool()
        >>> "a photo taken in a forest" in pool, "the letter B" in pool
        (True, True)
    """
    with resources.as_file(resources.files("vit_lens.methods.textspan.pools") / "general_descriptions.txt") as path:
        if not path.is_file():
            raise FileNotFoundError(
                f"The packaged pool {path} is missing; reinstall vit_lens or regenerate it with "
                "python -m vit_lens.methods.textspan.pools.generate"
            )
        return load_text_pool(path)


def paper_text_pool(name: str, root: str | os.PathLike, dedupe: bool = False) -> list[str]:
    """One of Gandelsman et al.'s TextSpan pools, read from a directory you provide.

    ``"general"`` is ``image_descriptions_general.txt`` (3,498 ChatGPT-written descriptions, the
    pool of the paper's results) and ``"common_words"`` is ``google_3498_english.txt`` (the 3,498
    most common English words, a baseline). Both come from ``text_descriptions/`` of
    github.com/yossigandelsman/clip_text_span (MIT); vit_lens does not ship them.

    By default every line is kept (stripped), so the list is row-aligned with embeddings computed
    the paper's way: 3,498 entries each. In ``"general"``, 69 lines carry stray spaces and, once
    stripped, 5 descriptions appear twice; ``dedupe=True`` drops those (3,493 remain) with a warning.
    A file whose sha256 differs from the paper's gets a warning too (it is still read).

    Args:
        name: ``"general"`` or ``"common_words"`` (or the file stems
            ``"image_descriptions_general"`` / ``"google_3498_english"``).
        root: The directory holding the file.
        dedupe: Drop repeated descriptions, as :func:`load_text_pool` does.

    Returns:
        The descriptions, in file order.

    Example:
        >>> pool = paper_text_pool("general", "clip_text_span/text_descriptions")  # doctest: +SKIP
        >>> len(pool)  # doctest: +SKIP
        3498
    """
    key = _ALIASES.get(name, name)
    if key not in PAPER_POOLS:
        raise ValueError(f"Unknown paper pool {name!r}; use one of {sorted(PAPER_POOLS)} (or {sorted(_ALIASES)})")
    file_name, sha256 = PAPER_POOLS[key]
    path = Path(root) / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{file_name} not found in {str(Path(root))!r}; download text_descriptions/{file_name} from "
            "github.com/yossigandelsman/clip_text_span and pass the directory holding it as root"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        warnings.warn(
            f"{path} differs from the paper's {file_name} (sha256 {digest[:12]}... instead of {sha256[:12]}...); "
            "results will not be comparable with the paper's",
            stacklevel=2,
        )
    return load_text_pool(path, dedupe=dedupe)
