"""The README's quick-start block runs as written (offline, random weights)."""

import re
from pathlib import Path


def test_quick_start_block_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", quick_start, flags=re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md quick start", "exec"), namespace)
    assert namespace["classifier"].shape == (512, 2)
    assert namespace["ablated"].shape == namespace["embed"].shape == (2, 512)
