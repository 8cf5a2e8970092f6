#!/usr/bin/env python3
"""Set up and run vit_lens from a fresh clone, with nothing but Python 3 and a package registry.

    python3 dev.py demo [args]   the main job: `vit-lens demo` (the built-in toy CLIP; writes an HTML report)
    python3 dev.py test [args]   the whole test suite (pytest on every core; extra args are passed on)

The first run creates ./.venv and installs the package with its test extras; later runs reuse
it, and reinstall only when pyproject.toml changes.
"""

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".vit_lens-installed"


def ensure_environment() -> Path:
    """The virtual environment's python, created and brought up to date with pyproject.toml."""
    python = BIN / ("python.exe" if os.name == "nt" else "python")
    if not python.exists():
        print(f"dev.py: creating {VENV.relative_to(ROOT)} ...", flush=True)
        venv.create(VENV, with_pip=True)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not STAMP.exists() or STAMP.read_text().strip() != wanted:
        print("dev.py: installing vit_lens and its test dependencies (first run takes a few minutes) ...", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[test]"], check=True)
        STAMP.write_text(wanted)
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    python = ensure_environment()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if command == "demo":
        return subprocess.call([str(BIN / "vit-lens"), "demo", *rest], cwd=ROOT, env=env)
    if not any(arg.startswith(("-n", "--numprocesses")) for arg in rest):
        rest = ["-n", "auto", *rest]  # one pytest-xdist worker per CPU core (each test pins its own threads)
    return subprocess.call([str(python), "-m", "pytest", *rest], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
