"""longattn: efficient self-attention for long sequences, correct and measured.

    >>> import torch, longattn
    >>> q = k = v = torch.randn(1, 8, 4096, 64)
    >>> out = longattn.attention(q, k, v, "local", before=256, after=256)
    >>> [m["name"] for m in longattn.mechanisms()][:3]

See ``longattn.mechanisms()`` for every registered mechanism and its parameters.

``import longattn`` loads only the registry. The submodules (``longattn.decoding``,
``longattn.distributed``, ``longattn.ops`` with ``longattn.ops.custom``...) are imported
on first attribute access, so ``longattn.decoding.generate(...)`` works after a plain
``import longattn`` without every import paying for ``torch.distributed`` or Dynamo.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from longattn.registry import Mechanism, Param, attention, build, get, mechanisms, register

__all__ = ["attention", "mechanisms", "get", "build", "register", "Mechanism", "Param"]
__version__ = "0.1.0"

#: submodules reachable as attributes of the package, imported on first access
SUBMODULES = frozenset({
    "bench", "cli", "cli_list", "decoding", "distributed", "evaluation", "integrations", "layers", "model",
    "ops", "patterns", "registry", "suite", "tasks", "testing", "train", "viz",
})


def __getattr__(name: str) -> ModuleType:
    """Import ``longattn.<name>`` on first access (PEP 562); AttributeError otherwise."""
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | SUBMODULES)
