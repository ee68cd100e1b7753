"""The recurrent (linear-attention successor) family: Gated DeltaNet, KDA, Mamba-2 SSD,
GLA and RetNet retention, chunked with a hand-written backward (docs/design.md section 10).

- :mod:`.reference`: the token-by-token recurrence (the reference, and the step core);
- :mod:`.engine`: the chunked forward/backward shared by every member;
- :mod:`.api`: the public functions (``gated_delta_rule(q, k, v, g, beta, ...)`` ...)
  and their one-token ``*_step`` decoders;
- :mod:`.modules`: learned gates and the registry entries.
"""

from longattn.ops.recurrent.api import (  # noqa: F401
    KINDS, gated_delta_rule, gated_delta_rule_step, gla, gla_step, kda, kda_step, l2norm, retention,
    retention_gammas, retention_step, segment_ids_from_cu_seqlens, ssd, ssd_step,
)
from longattn.ops.recurrent.reference import recurrent_reference  # noqa: F401

__all__ = [
    "gated_delta_rule", "kda", "ssd", "gla", "retention",
    "gated_delta_rule_step", "kda_step", "ssd_step", "gla_step", "retention_step",
    "retention_gammas", "segment_ids_from_cu_seqlens", "l2norm", "recurrent_reference", "KINDS",
]

from longattn.ops.recurrent import modules as _modules  # noqa: E402,F401  (registers the mechanisms)
from longattn.ops.recurrent.modules import RecurrentAttention, RecurrentGates  # noqa: E402,F401

__all__ += ["RecurrentAttention", "RecurrentGates"]
