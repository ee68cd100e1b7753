"""A Qwen3.5-style hybrid model's training step on longattn's recurrent kernels vs
transformers' torch fallback (what runs without fla, e.g. on the CPU).

    python benchmarks/hybrid_model_step.py                 # N=8192, B=1, fp32
    python benchmarks/hybrid_model_step.py --n 4096 --repeats 3

Model: random-init ``Qwen3_5ForCausalLM`` (transformers 5.x), hidden 64, 4 layers
(3 Gated DeltaNet + 1 full attention, the 3:1 pattern), linear heads 2 q/k x 4 v of
dim 32, vocab 256. Step = forward, cross-entropy, backward (no optimiser). The same
weights and batch run through both paths (:func:`longattn.integrations.hf_recurrent.
use_longattn_kernels` / :func:`restore_hf_kernels` on one model), interleaved; reported:
median step time of each, the ratio, and the losses (equal to 1e-5).

Measured (2-core CPU shared with 7 other jobs, OMP_NUM_THREADS=2, torch 2.13,
transformers 5.25, N=8192, B=1, fp32, median of 3 after 1 warm-up; loads vary):

    path                     step s        loss
    transformers torch      105.152    5.555921
    longattn kernels         30.046    5.555921
    speed-up 3.50x, |loss difference| 0.00e+00 (same to fp32 rounding)

On a quiet machine (December 2026, the engine that runs heads in slices):

    transformers torch        3.181    5.555921
    longattn kernels          2.384    5.555921
    speed-up 1.33x, |loss difference| 0.00e+00
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import transformers

from longattn.integrations.hf_recurrent import restore_hf_kernels, use_longattn_kernels


def build(seed: int = 0) -> torch.nn.Module:
    """The random-init tiny hybrid model (fp32, train mode)."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen3_5TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"], use_cache=False)
    return transformers.Qwen3_5ForCausalLM(cfg).train()


def step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """(seconds, loss) of one forward + cross-entropy + backward."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    logits = model(ids, use_cache=False).logits
    loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    loss.backward()
    return time.perf_counter() - t0, loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    model = build()
    ids = torch.randint(0, 256, (1, args.n), generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {"torch": [], "longattn": []}
    losses: dict[str, float] = {}
    for i in range(args.warmup + args.repeats):
        for path in ("torch", "longattn"):
            (use_longattn_kernels if path == "longattn" else restore_hf_kernels)(model)
            dt, losses[path] = step(model, ids)
            if i >= args.warmup:
                times[path].append(dt)
    t_torch, t_ours = statistics.median(times["torch"]), statistics.median(times["longattn"])
    print(f"N={args.n} B=1 fp32, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'path':<22}{'step s':>9}{'loss':>12}")
    print(f"{'transformers torch':<22}{t_torch:>9.3f}{losses['torch']:>12.6f}")
    print(f"{'longattn kernels':<22}{t_ours:>9.3f}{losses['longattn']:>12.6f}")
    print(f"speed-up {t_torch / t_ours:.2f}x, |loss difference| {abs(losses['torch'] - losses['longattn']):.2e}")


if __name__ == "__main__":
    main()
