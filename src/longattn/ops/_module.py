"""The common ``forward`` of the attention modules that wrap one functional
mechanism (linear attention, Linformer, compressed attention, the Synthesizer)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["MechanismModule"]


class MechanismModule(nn.Module):
    """An ``nn.Module`` over a functional mechanism: :meth:`forward` takes the
    registry's call (q, k, v, causal, key_padding_mask, scale) and hands it to
    :meth:`attend`, which adds the module's own weights and settings."""

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:
        """q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] -> [B, H, Nq, Dv]
        (cost: the mechanism's)."""
        return self.attend(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, **call: Any) -> Tensor:  # pragma: no cover
        """The functional mechanism on (q, k, v) with ``call`` (causal,
        key_padding_mask, scale) and the module's weights and settings."""
        raise NotImplementedError
