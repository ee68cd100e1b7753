"""longattn: efficient self-attention for long sequences, correct and measured.

    >>> import torch, longattn
    >>> q = k = v = torch.randn(1, 8, 4096, 64)
    >>> out = longattn.attention(q, k, v, "local", before=256, after=256)
    >>> [m["name"] for m in longattn.mechanisms()][:3]

See ``longattn.mechanisms()`` for every registered mechanism and its parameters.

``import longattn`` loads only the registry table. ``longattn.attention`` and
``longattn.build`` come from :mod:`longattn.api` (which imports :mod:`longattn.ops`, so
every mechanism is registered) on first access, and the table's first lookup
(``longattn.get``, ``longattn.mechanisms()``) imports it too. The submodules
(``longattn.decoding``, ``longattn.distributed``, ``longattn.ops`` with
``longattn.ops.custom``...) are imported on first attribute access, so ``longattn.decoding.generate(...)`` works after a plain
``import longattn`` without every import paying for ``torch.distributed`` or Dynamo.
"""

from __future__ import annotations

import importlib
from typing import Any

from longattn.registry import Mechanism, Param, fill_with, get, mechanisms, register

__all__ = ["attention", "mechanisms", "get", "build", "register", "Mechanism", "Param"]
__version__ = "0.1.0"

#: names of :mod:`longattn.api` reachable as attributes of the package, imported on first access
API = frozenset({"attention", "build"})

# the table's first lookup imports longattn.api, which imports longattn.ops (registering
# every mechanism); import longattn itself stays light
fill_with(lambda: importlib.import_module(f"{__name__}.api"))

#: submodules reachable as attributes of the package, imported on first access
SUBMODULES = frozenset({
    "bench", "cli", "cli_list", "decoding", "distributed", "evaluation", "integrations", "layers", "model",
    "ops", "patterns", "registry", "api", "compile_ops", "suite", "tasks", "testing", "train", "viz",
})


def __getattr__(name: str) -> Any:
    """Import ``longattn.<name>`` (or :mod:`longattn.api` for ``attention``/``build``) on
    first access (PEP 562); AttributeError otherwise."""
    if name in API:
        return getattr(importlib.import_module(f"{__name__}.api"), name)
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | SUBMODULES | API)
