"""Atomic file writes: a temporary file beside the target, flushed and fsynced, then
renamed over it (readers see the old file or the whole new one, never a part)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], *, binary: bool = True) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s folder (created if missing),
    then replace ``path`` with it; on any error the temporary file is removed and the
    error raised. ``binary``: open it "wb" (else "w", text). Cost: one fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
