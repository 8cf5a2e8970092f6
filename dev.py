#!/usr/bin/env python3
"""Set up and run vit_lens from a fresh clone, with nothing but Python 3 and a package registry.

    python3 dev.py demo [args]              the main job: `vit-lens demo` (the built-in toy CLIP; writes an HTML report)
    python3 dev.py test [args]              the whole test suite (pytest on every core; extra args are passed on
                                            to it), then the smoke set beside SAELens (TransformerLens 3.x)
    python3 dev.py test --main-only [args]  the whole test suite only, for quick local runs

The first run creates ./.venv and installs the package with its test extras; later runs reuse
it, and reinstall only when pyproject.toml changes. `test` also keeps ./.venv-tl3 the same way:
vit_lens installed beside sae-lens 6.x, which requires transformer-lens < 4. There the smoke set
(model equivalence, hooks, cache, the TransformerLens version checks, and the SAEs with their
file round trips against sae-lens) shows vit_lens works with TransformerLens 3.x and SAELens in one
environment. The exit status is non-zero if either run fails.
"""

import hashlib
import os
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Environment:
    """A virtual environment holding vit_lens (editable, with test extras) and ``extra`` requirements."""

    folder: str
    extra: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return ROOT / self.folder

    @property
    def bin(self) -> Path:
        return self.path / ("Scripts" if os.name == "nt" else "bin")

    @property
    def python(self) -> Path:
        return self.bin / ("python.exe" if os.name == "nt" else "python")

    def ensure(self) -> Path:
        """The environment's python, created and brought up to date with pyproject.toml and ``extra``."""
        stamp = self.path / ".vit_lens-installed"
        if not self.python.exists():
            print(f"dev.py: creating {self.folder} ...", flush=True)
            venv.create(self.path, with_pip=True)
        wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + "\n".join(self.extra).encode()).hexdigest()
        if not stamp.exists() or stamp.read_text().strip() != wanted:
            print(f"dev.py: installing vit_lens and its test dependencies into {self.folder} "
                  "(first run takes a few minutes) ...", flush=True)
            pip = [str(self.python), "-m", "pip", "install", "--quiet"]
            subprocess.run([*pip, "--upgrade", "pip"], check=True)
            subprocess.run([*pip, "-e", f"{ROOT}[test]", *self.extra], check=True)
            stamp.write_text(wanted)
        return self.python

    def versions(self, *distributions: str) -> str:
        """``name version`` of each installed distribution, read from metadata (nothing is imported)."""
        code = "import sys, importlib.metadata as m; print(', '.join(f'{d} {m.version(d)}' for d in sys.argv[1:]))"
        return subprocess.run([str(self.python), "-c", code, *distributions], capture_output=True, text=True,
                              check=True).stdout.strip()


MAIN = Environment(".venv")
# sae-lens 6.x requires transformer-lens < 4; the smoke set runs there against TransformerLens 3.x.
BESIDE_SAELENS = Environment(".venv-tl3", extra=("sae-lens>=6,<7", "transformer-lens>=3.3,<4"))
# The large-model equivalence cases (marked slow) check the converters, not TransformerLens: left to the main suite.
SMOKE_TESTS = (
    "-m", "not slow",
    "tests/reference/test_open_clip_equivalence.py",
    "tests/reference/test_timm_equivalence.py",
    "tests/test_hooks.py",
    "tests/test_cache.py",
    "tests/test_transformer_lens_versions.py",
    "tests/test_sae.py",  # includes the file round trips against sae-lens itself
)
OFFLINE = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")


def heading(text: str) -> None:
    print(f"\n{'=' * 20} dev.py: {text} {'=' * 20}", flush=True)


def pytest(environment: Environment, args: list[str], **env: str) -> int:
    if not any(arg.startswith(("-n", "--numprocesses")) for arg in args):
        args = ["-n", "auto", *args]  # one pytest-xdist worker per CPU core (each test pins its own threads)
    return subprocess.call([str(environment.python), "-m", "pytest", *args], cwd=ROOT,
                           env=dict(os.environ, **OFFLINE, **env))


def _outcome(status: int) -> str:
    return "ok" if status == 0 else f"FAILED (exit status {status})"


def test(args: list[str]) -> int:
    """The main suite with ``args``, then (unless ``--main-only``) the smoke set beside SAELens."""
    main_only = "--main-only" in args
    args = [arg for arg in args if arg != "--main-only"]
    MAIN.ensure()
    heading(f"main suite in {MAIN.folder} ({MAIN.versions('transformer-lens', 'torch')})")
    main_status = pytest(MAIN, args)
    if main_only:
        return main_status
    try:
        BESIDE_SAELENS.ensure()
    except subprocess.CalledProcessError as error:
        print(f"dev.py: could not install {BESIDE_SAELENS.folder} ({error}); "
              "`python3 dev.py test --main-only` runs the main suite alone", flush=True)
        smoke_status, versions = error.returncode or 1, "not installed"
    else:
        versions = BESIDE_SAELENS.versions("transformer-lens", "sae-lens", "torch")
        heading(f"smoke set beside SAELens in {BESIDE_SAELENS.folder} ({versions})")
        smoke_status = pytest(BESIDE_SAELENS, list(SMOKE_TESTS), VIT_LENS_EXPECT_TRANSFORMER_LENS_MAJOR="3")
    print(f"\ndev.py test: main suite {_outcome(main_status)}; "
          f"smoke set beside SAELens ({versions}) {_outcome(smoke_status)}", flush=True)
    return main_status or smoke_status


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "test":
        return test(rest)
    MAIN.ensure()
    return subprocess.call([str(MAIN.bin / "vit-lens"), "demo", *rest], cwd=ROOT, env=dict(os.environ, **OFFLINE))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
