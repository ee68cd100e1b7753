"""Cost of a mechanism in a model: prefill time and peak memory, decode speed, cache size.

Peak memory is the growth of the process above what it held before the call: on CUDA
``torch.cuda.max_memory_allocated`` (reset first); on CPU the resident-set high-water
mark, reset through ``/proc/self/clear_refs`` (as the benchmark does,
:mod:`longattn.bench.harness`), or None where it cannot be reset. The model's weights
and the text are resident before, so they are not counted; the prefill's scored logits
(L / 2 x vocab floats, the same for every mechanism) are.
"""

from __future__ import annotations

import gc
import inspect
import time
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

from longattn.bench.harness import _reset_peak, _status_kb

T = TypeVar("T")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, float, float | None]:
    """(``step()``, its wall-clock seconds, its peak memory growth in MiB or None)."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t = time.perf_counter()
        result = step()
        _sync(device)
        seconds = time.perf_counter() - t
        return result, seconds, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base_kb = _status_kb("VmRSS")
    exact = _reset_peak()
    t = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - t
    peak = max(0.0, (_status_kb("VmHWM") - base_kb) / 1024) if exact else None
    return result, seconds, peak


def _cache_like(obj: Any) -> bool:
    """A transformers object, or a subclass of one (a cache or cache layer defined
    elsewhere, e.g. :class:`longattn.integrations.transformers.SinkWindowCache`), or a
    longattn object a cache holds (``topk_blocks``' kept block summaries)."""
    return any(c.__module__.startswith(("transformers", "longattn")) for c in type(obj).__mro__)


def _tensors(obj: Any, seen: set[int]) -> list[Tensor]:
    """Every tensor reachable through tuples, lists, dicts and the attributes of a cache
    object (HF's ``DynamicCache.layers[i].keys/values`` or the legacy tuples)."""
    if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return []
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and _cache_like(obj):
        items = list(vars(obj).values())
    else:
        return []
    return [t for it in items for t in _tensors(it, seen)]


def cache_mib(cache: Any) -> float:
    """MiB held by the tensors of a KV cache (each storage counted once)."""
    storages: dict[int, int] = {}
    for t in _tensors(cache, set()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values()) / 2**20


def cache_of(output: Any) -> Any:
    """The KV cache of a model output: ``cache`` (transformers >= 5.25) or
    ``past_key_values`` (earlier 5.x)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def cache_argument(model: Any) -> str:
    """The name under which ``model.forward`` takes the cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``cache`` as the keyword ``model.forward`` takes it ({} for None: the model's own)."""
    return {} if cache is None else {cache_argument(model): cache}


def greedy_decode(model: Any, cache: Any, next_logits: Tensor, steps: int,
                  device: torch.device | str = "cpu") -> tuple[list[int], float]:
    """Greedy-decode ``steps`` tokens over ``cache`` (the prefill's :func:`cache_of`),
    starting from ``next_logits`` [V] or [1, V] (the prefill's last logit row).

    Returns (the tokens, the seconds the ``steps`` one-token forwards took); the cache
    grows in place. Cost per step: one token through the model, attention over what
    the mechanism lets the new query see."""
    device = torch.device(device)
    token = int(next_logits.reshape(-1, next_logits.shape[-1])[-1].argmax())
    tokens = [token]
    seconds = 0.0
    arg = cache_argument(model)
    for _ in range(steps - 1):
        x = torch.tensor([[token]], device=device)
        _sync(device)
        t = time.perf_counter()
        out = model(input_ids=x, use_cache=True, logits_to_keep=1, **{arg: cache})
        _sync(device)
        seconds += time.perf_counter() - t
        cache = cache_of(out)
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
    return tokens, seconds
