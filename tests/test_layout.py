"""The package's floors: every import (module level or inside a function) points down or sideways, never up."""

import ast
import importlib
import json
import re
from pathlib import Path

import pytest

import vit_lens

PACKAGE = Path(vit_lens.__file__).parent
ROOT = PACKAGE.parent

# (module prefix, floor); the longest matching prefix wins
FLOORS = [
    ("vit_lens._lazy", 0),
    ("vit_lens.utils", 0),
    ("vit_lens.model.config", 0),
    ("vit_lens.model.hook_layout", 0),
    ("vit_lens.loading", 1),
    ("vit_lens.model", 2),
    ("vit_lens.intervene", 3),
    ("vit_lens.toy", 3),
    ("vit_lens.runner", 3),
    ("vit_lens.circuits", 3),
    ("vit_lens.planted", 3),
    ("vit_lens.sae", 3),
    ("vit_lens.methods", 4),
    ("vit_lens.viz", 5),
    ("vit_lens.cli", 6),
]


def _floor(module: str) -> int | None:
    best = None
    for prefix, floor in FLOORS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, floor)
    return None if best is None else best[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
    return [(line, target) for line, target in found if target == "vit_lens" or target.startswith("vit_lens.")]


def _package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_floor():
    missing = [_module_name(p) for p in _package_modules() if p != PACKAGE / "__init__.py" and _floor(_module_name(p)) is None]
    assert missing == []


def _upward(here: str, imports: list[tuple[int, str]]) -> list[str]:
    found = []
    for line, target in imports:
        if target == "vit_lens":
            found.append(f"{here}:{line} imports the top-level package; import from the module that defines the name")
        elif (_floor(target) or 0) > _floor(here):
            found.append(f"{here}:{line} (floor {_floor(here)}) imports {target} (floor {_floor(target)})")
    return found


def test_imports_point_down():
    upward = []
    for path in _package_modules():
        if path != PACKAGE / "__init__.py":  # the top-level package re-exports everything, lazily
            upward += _upward(_module_name(path), _imports(path))
    assert upward == []


def test_floor_check_sees_an_upward_import():
    """The check itself can fail: a model module importing a method inside a function, or the top package."""
    assert _upward("vit_lens.model.clip", [(7, "vit_lens.methods.textspan")]) == [
        "vit_lens.model.clip:7 (floor 2) imports vit_lens.methods.textspan (floor 4)"
    ]
    assert len(_upward("vit_lens.intervene.patching", [(3, "vit_lens")])) == 1
    assert _upward("vit_lens.methods.layers.decoding", [(1, "vit_lens.intervene.pruning")]) == []


def test_short_names_are_the_real_modules():
    for short, real in vit_lens.SHORT_NAMES.items():
        module = importlib.import_module(f"vit_lens.{short}")
        assert module is importlib.import_module(real), short
        assert getattr(vit_lens, short) is module


def test_short_name_submodule_is_not_a_second_copy():
    import vit_lens.pools.generate as via_short

    assert via_short is importlib.import_module("vit_lens.methods.textspan.pools.generate")


def test_short_name_keeps_the_real_modules_spec():
    """importlib.resources and pickling read ``__spec__``: importing by the short name must not replace it."""
    import importlib.resources

    import vit_lens.pools as via_short

    assert via_short.__spec__.name == "vit_lens.methods.textspan.pools"
    assert (importlib.resources.files(via_short) / "general_descriptions.txt").is_file()


def _documented_imports() -> list[str]:
    """Every ``from vit_lens... import ...`` / ``import vit_lens...`` in the README, the docs and the tutorials."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    sources = [p.read_text() for p in texts]
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        sources += ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    pattern = re.compile(r"^\s*(?:>>>\s*)?(from\s+vit_lens[\w.]*\s+import\s+[\w, ()]+|import\s+vit_lens[\w.]*)", re.M)
    return sorted({m.group(1).strip().rstrip("(") for text in sources for m in pattern.finditer(text)})


@pytest.mark.parametrize("statement", _documented_imports())
def test_documented_import_works(statement):
    exec(statement, {})
