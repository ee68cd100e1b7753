"""longattn: efficient self-attention for long sequences, correct and measured.

    >>> import torch, longattn
    >>> q = k = v = torch.randn(1, 8, 4096, 64)
    >>> out = longattn.attention(q, k, v, "local", before=256, after=256)
    >>> [m["name"] for m in longattn.mechanisms()][:3]

See ``longattn.mechanisms()`` for every registered mechanism and its parameters.
"""

from longattn.registry import Mechanism, Param, attention, build, get, mechanisms, register

__all__ = ["attention", "mechanisms", "get", "build", "register", "Mechanism", "Param"]
__version__ = "0.1.0"
