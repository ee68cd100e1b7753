"""Peak memory of a tiny random-init DeepSeek-V3.2 forward: longattn's registration
against the model's own sdpa (and eager) path (issue 31's DeepSeek-V3.2 target).

B=1, float32, S tokens (default 4096), ``index_topk`` keys per query (default 256), a
small hidden size. Each implementation runs in its own process (peak RSS is per
process: :func:`longattn.bench.subprocess_case.run_case`, the harness's peak call, VmHWM
after clear_refs); the model and the tokens are built before the measured forward.

What differs: sdpa/eager fold the indexer's top-k into a [B, 1, S, S] mask and run
dense attention over it; longattn attends over exactly the ``[B, S, topk]`` indices
(:func:`longattn.ops.given_keys.given_keys_attention`, O(S * topk)). What does not:
HF's indexer itself scores every query against every key ([B, S, index_heads, S] in
fp32) and masks those scores with the model's [B, 1, S, S] causal mask, so both paths
keep an S x S term; the mask (1 byte per element) is the smallest of them.

    python benchmarks/deepseek_v32_memory.py --n 4096 --topk 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch

from longattn.bench.subprocess_case import case_ref, run_case

IMPLS = ("sdpa", "eager", "longattn")


def case(impl: str, n: int, topk: int, layers: int, heads: int, index_heads: int, hidden: int,
         ) -> Callable[[], None]:
    """The no-grad forward of a tiny random-init DeepSeek-V3.2 on S = ``n`` tokens under
    ``impl`` (one of :data:`IMPLS`); the model and tokens are built here, not measured."""
    import transformers as T

    from longattn.integrations.transformers import register
    import longattn.ops.given_keys  # noqa: F401 - imported before the measured forward, as sdpa is

    torch.manual_seed(0)
    cfg = T.DeepseekV32Config(
        vocab_size=128, hidden_size=hidden, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, n_shared_experts=1,
        n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=48,
        qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16, head_dim=16, index_topk=topk,
        index_head_dim=32, index_n_heads=index_heads, first_k_dense_replace=layers, max_position_embeddings=n,
        pad_token_id=0)
    model = T.DeepseekV32ForCausalLM(cfg).eval()
    model.set_attn_implementation(register("full") if impl == "longattn" else impl)
    x = torch.randint(1, 128, (1, n))

    def forward() -> None:
        with torch.no_grad():
            model.model(x)

    return forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="sequence length S")
    ap.add_argument("--topk", type=int, default=256, help="index_topk: keys per query")
    ap.add_argument("--layers", type=int, default=1, help="decoder layers (all dense MLP)")
    ap.add_argument("--heads", type=int, default=8, help="attention heads")
    ap.add_argument("--index-heads", type=int, default=2, help="indexer heads")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--impls", default="sdpa,longattn", help=f"comma list of {sorted(IMPLS)}")
    args = ap.parse_args()
    out = {"n": args.n, "topk": args.topk, "layers": args.layers, "heads": args.heads,
           "index_heads": args.index_heads, "peak_mib": {}}
    for impl in args.impls.split(","):
        if impl not in IMPLS:
            raise SystemExit(f"--impls: {impl!r} is not one of {sorted(IMPLS)}")
        res = run_case(case_ref(__file__, "case"), dict(impl=impl, n=args.n, topk=args.topk, layers=args.layers,
                       heads=args.heads, index_heads=args.index_heads, hidden=args.hidden),
                       threads=args.threads, warmup=0, repeats=0, timeout_s=600)
        if res["status"] != "ok":
            raise RuntimeError(f"{impl} failed:\n{res.get('traceback') or res.get('reason')}")
        out["peak_mib"][impl] = round(res["peak_mb"], 1)
        print(f"{impl:>9}: {out['peak_mib'][impl]:8.1f} MiB", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
