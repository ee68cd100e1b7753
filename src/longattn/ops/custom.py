"""Old path of :mod:`longattn.compile_ops` (the torch.compile custom ops).

The custom ops wrap the public API (:mod:`longattn.api`), which sits above ``ops``, so
they live at the top of the package. This module is kept so that ``longattn.ops.custom``
and ``from longattn.ops import custom`` keep working: it is the same module object
(``sys.modules`` alias), so reading or setting an attribute here reads or sets it there.
"""

import sys

from longattn import compile_ops as _compile_ops

sys.modules[__name__] = _compile_ops
