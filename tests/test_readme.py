"""Every ```python block of README.md runs as pasted, each in a fresh namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown ``text``, in order."""
    return _BLOCK.findall(text)


def test_readme_has_the_guide_snippets() -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 8
    text = README.read_text()
    for needed in ("make demo", "make test", "make docs"):
        assert needed in text


@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text()))))
def test_readme_snippet_runs(index: int) -> None:
    code = python_blocks(README.read_text())[index]
    if "transformers" in code:
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    namespace: dict[str, object] = {"__name__": f"readme_snippet_{index}"}
    try:
        exec(compile(code, f"README.md[python block {index}]", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # a failed snippet left its group
            dist.destroy_process_group()


def test_submodules_reachable_after_import_longattn() -> None:
    """``longattn.decoding`` / ``distributed`` / ``ops.custom`` work after a plain
    ``import longattn`` (lazy, PEP 562), which itself loads neither ops nor decoding."""
    import subprocess
    import sys

    code = (
        "import sys, longattn\n"
        "light = [m for m in ('longattn.ops', 'longattn.decoding', 'longattn.distributed') if m in sys.modules]\n"
        "assert not light, light\n"
        "assert callable(longattn.decoding.generate) and callable(longattn.distributed.attention)\n"
        "assert callable(longattn.ops.custom.attention)\n"
        "assert 'decoding' in dir(longattn)\n"
        "try:\n    longattn.no_such_module\nexcept AttributeError as e:\n    assert 'no_such_module' in str(e)\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
