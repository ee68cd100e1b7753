"""Functional mechanisms on [B, H, N, D] tensors, one module per family.

Importing this package imports every family module in it, and each registers its
mechanisms with :mod:`longattn.registry`. A new family is a new file here.
"""

from __future__ import annotations

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
