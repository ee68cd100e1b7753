"""Perplexity against context length: score each window's second half.

A window of L tokens runs through the model once; the loss counts only the targets
at positions ``L // 2 .. L - 1``, so every scored token has at least L / 2 tokens of
context (the protocol of e.g. Press et al. 2022, ALiBi, and Xiao et al. 2024,
StreamingLLM, in its non-sliding form). Perplexity = exp(total NLL / scored tokens)
over the windows. Only the logits of the scored half are formed (HF's
``logits_to_keep``): O(L / 2 x vocab) memory instead of O(L x vocab).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from longattn.evaluation.timing import cache_kwargs


@dataclass
class WindowScore:
    """One window: ``nll`` (sum over scored tokens, nats), ``count`` (scored tokens),
    ``output`` (the model's output: ``logits`` [1, count + 1, V] and the KV cache)."""

    nll: float
    count: int
    output: Any


def score_window(model: Any, ids: Tensor, start: int | None = None, *, use_cache: bool = True,
                 cache: Any = None) -> WindowScore:
    """Run ``ids`` [L] (or [1, L]) through the causal LM ``model`` and sum the NLL of
    the targets ``ids[start:]`` (default ``start = L // 2``); ``cache``: the KV cache
    object to fill (default: the model's own, when ``use_cache``).

    Cost: one forward of L tokens, logits for L - start + 1 positions. The last logit
    row (the prediction after the window) is kept in ``output.logits`` for decoding."""
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be [L] or [1, L], got shape {tuple(ids.shape)}")
    n = ids.shape[1]
    start = n // 2 if start is None else start
    if not 1 <= start < n:
        raise ValueError(f"start must be in [1, {n - 1}] for a window of {n} tokens, got {start}")
    out = model(input_ids=ids, use_cache=use_cache, logits_to_keep=n - start + 1, **cache_kwargs(model, cache))
    logits = out.logits[0, :-1]  # predictions for positions start .. n-1, in fp32 at least
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logits.shape[0] != n - start:
        raise ValueError(f"the model returned {out.logits.shape[1]} logit rows; expected {n - start + 1} "
                         "(does it honour logits_to_keep?)")
    nll = torch.nn.functional.cross_entropy(logits, ids[0, start:].to(logits.device), reduction="sum")
    return WindowScore(float(nll), n - start, out)


def windows(tokens: Tensor, length: int, count: int) -> list[Tensor]:
    """``count`` consecutive non-overlapping windows of ``length`` tokens from the start
    of ``tokens`` [T]. Raises ValueError when the tokens are too few."""
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    if count < 1:
        raise ValueError(f"windows must be >= 1, got {count}")
    if tokens.numel() < length * count:
        raise ValueError(f"{count} window(s) of {length} tokens need {length * count} tokens; "
                         f"the text has {tokens.numel()}")
    return [tokens[i * length:(i + 1) * length] for i in range(count)]


def perplexity(nll: float, count: int) -> float:
    """exp(nll / count): the perplexity of ``count`` tokens with total NLL ``nll`` (nats)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return math.exp(nll / count)
