"""Checks every mechanism must pass, reusable by users who add their own.

- :func:`assert_no_causal_leak`: perturbing inputs after t leaves out[:t] unchanged,
  and d out[:t] / d inputs[t:] is zero (docs/design.md section 1).
- :func:`assert_padding_no_leak`: changing padded keys/values changes nothing.
- :func:`peak_memory_mb`: peak RSS growth of a snippet run in a fresh subprocess,
  for memory tests that fail if an N x N tensor is built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Callable

import torch
from torch import Tensor

Attn = Callable[[Tensor, Tensor, Tensor], Tensor]


def assert_no_causal_leak(fn: Attn, q: Tensor, k: Tensor, v: Tensor, t: int, atol: float = 0.0) -> None:
    """``fn(q, k, v)`` -> [B, H, N, Dv]; fails if anything at positions > t reaches out[:, :, :t+1]."""
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    v = v.detach().clone().requires_grad_(True)
    out = fn(q, k, v)
    past = out[:, :, : t + 1]
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :]) * 3.0
    with torch.no_grad():
        out2 = fn(q2, k2, v2)
    diff = (out2[:, :, : t + 1].double() - past.detach().double()).abs().max().item()
    assert diff <= atol, f"causal leak: outputs up to t={t} moved by {diff:g} when the future changed"
    g = torch.autograd.grad(past.sum(), (q, k, v), allow_unused=True)
    for name, gi in zip("qkv", g):
        if gi is None:
            continue
        fut = gi[:, :, t + 1 :].abs().max().item()
        assert fut == 0.0, f"causal leak: d out[:{t + 1}] / d {name}[{t + 1}:] = {fut:g}, not 0"


def assert_padding_no_leak(
    fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor,
    atol: float = 0.0,
) -> None:
    """``fn(q, k, v, key_padding_mask)``; changing padded k/v must not move any output."""
    with torch.no_grad():
        out = fn(q, k, v, key_padding_mask)
        pad = ~key_padding_mask[:, None, :, None]
        k2 = torch.where(pad, torch.randn_like(k) * 5, k)
        v2 = torch.where(pad, torch.randn_like(v) * 5, v)
        out2 = fn(q, k2, v2, key_padding_mask)
    assert torch.isfinite(out).all(), "non-finite output with key padding"
    diff = (out.double() - out2.double()).abs().max().item()
    assert diff <= atol, f"padding leak: changing padded keys/values moved outputs by {diff:g}"


_MEM_PRELUDE = """
import json, resource, sys, torch
torch.manual_seed(0)
def _rss_mb():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
def _peak_mb():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
"""


def peak_memory_mb(setup: str, run: str, *, threads: int = 1, timeout: float = 600) -> float:
    """Peak RSS growth (MiB) of ``run`` after ``setup``, in a fresh Python process.

    ``setup`` builds the inputs (not counted); ``run`` is the measured work, e.g.
    ``"out = f(q, k, v); out.sum().backward()"``. Linux only (reads /proc).
    """
    code = (
        _MEM_PRELUDE
        + f"torch.set_num_threads({threads})\n"
        + textwrap.dedent(setup)
        + "\nimport gc; gc.collect()\n"
        + "with open('/proc/self/clear_refs', 'w') as f: f.write('5')\n"
        + "_base = _rss_mb()\n"
        + textwrap.dedent(run)
        + "\nprint('__PEAK__' + json.dumps(_peak_mb() - _base))\n"
    )
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
    )
    if res.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{res.stderr[-4000:]}")
    for line in res.stdout.splitlines():
        if line.startswith("__PEAK__"):
            return float(json.loads(line[len("__PEAK__"):]))
    raise RuntimeError(f"memory probe printed no result:\n{res.stdout[-2000:]}")
