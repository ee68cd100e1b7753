"""GPU check for the FlexAttention path: one command, one table.

    python benchmarks/gpu_check.py                  # every pattern, N = 4K..128K, bf16 + fp32
    python benchmarks/gpu_check.py --quick          # N = 4K, 16K; a few patterns
    python benchmarks/gpu_check.py --sizes 4096 --patterns local bigbird --dtypes bf16

For every pattern, length and dtype: forward + backward time (median of --repeat
runs, CUDA events) and peak GPU memory of

- ``ours``: :func:`longattn.ops.flex.flex_pattern_attention` with the BlockMask built
  from the pattern's components, its heavy query/key blocks (global rows and
  columns) split out and attended outside Flex (:func:`split_block_mask_for`; its
  build time is reported separately, ``build ms``, with the heavy blocks found);
- ``flex+cbm``: the same compiled ``flex_attention`` and mask_mod, with the BlockMask
  made by ``create_block_mask`` (which evaluates the mask_mod over every (i, j) pair:
  its build time is the price of the usual route);
- ``sdpa``: dense ``scaled_dot_product_attention`` (flash for bf16, the efficient
  kernel for fp32), no pattern: the ceiling every sparse path is compared with.

Then correctness: at small N in fp32, ours equals the engine path
(:func:`longattn.ops.blocksparse.pattern_attention`) in outputs and gradients (with
padding, causal, documents, grouped KV heads, bottom-right Nq < Nk; at N = 4000 the
global rows and columns are split out of Flex and merged by log-sum-exp: the
``split`` cases, whose label says how many heavy blocks were found), and the bf16
error of ours against the fp32 engine is printed.

Without a CUDA device the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback


def _patterns(make, PerHead, Local, Strided, GlobalTokens):
    """name -> (pattern factory, causal)."""
    return {
        "local": (lambda: make("local", before=256, after=256), False),
        "local_causal": (lambda: make("local", before=512, after=0), True),
        "dilated": (lambda: make("dilated", radius=128, dilation=2), False),
        "strided": (lambda: make("strided", stride=512), False),
        "block_diagonal": (lambda: make("block_diagonal", block=512), False),
        "global": (lambda: make("global", indices=range(64)), False),
        "random": (lambda: make("random", blocks_per_row=3, block=64), False),
        "bigbird": (lambda: make("bigbird", block=64), False),
        "longformer": (lambda: make("longformer", window=256), False),
        "st_strided_heads": (lambda: make("sparse_transformer_strided", l=256), True),
        "st_strided_union": (lambda: make("sparse_transformer_strided", l=256, mode="union"), True),
        "st_fixed_heads": (lambda: make("sparse_transformer_fixed", l=256, c=32), True),
        "st_fixed_union": (lambda: make("sparse_transformer_fixed", l=256, c=32, mode="union"), True),
        "per_head": (lambda: PerHead([Local(256, 256), Strided(512), GlobalTokens(range(64)), Local(64, 64)]), False),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--patterns", nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cbm-max", type=int, default=65536,
                    help="largest N for the create_block_mask peer (it evaluates N x N pairs)")
    ap.add_argument("--quick", action="store_true", help="N = 4K, 16K and five patterns")
    ap.add_argument("--skip-checks", action="store_true", help="only the timing table")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not installed; nothing to check.")
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); "
              "this check needs a GPU. Nothing was run.")
        return 0
    from longattn.ops import flex as F

    if not F.flex_available():
        print(f"gpu_check: torch {torch.__version__} has no FlexAttention (needs >= 2.5). Nothing was run.")
        return 0
    from torch.nn.attention.flex_attention import create_block_mask

    from longattn.patterns import GlobalTokens, Local, PerHead, Strided, make

    pats = _patterns(make, PerHead, Local, Strided, GlobalTokens)
    if args.quick:
        args.sizes = [4096, 16384]
        args.patterns = args.patterns or ["local", "bigbird", "longformer", "st_fixed_heads", "per_head"]
    names = args.patterns or list(pats)
    unknown = [n for n in names if n not in pats]
    if unknown:
        print(f"gpu_check: unknown pattern(s) {unknown}; known: {sorted(pats)}")
        return 2
    dev = torch.device("cuda")
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):  # many shapes and patterns in one process
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
    print(f"gpu_check: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"B={args.batch} H={args.heads} D={args.dim}, median of {args.repeat}")

    failures = 0
    if not args.skip_checks:
        failures += _checks(torch, F, pats, names, dev)
    _table(torch, F, create_block_mask, pats, names, dev, args)
    if failures:
        print(f"\ngpu_check: {failures} correctness check(s) FAILED (see above).")
        return 1
    print("\ngpu_check: done.")
    return 0


# ----------------------------------------------------------------------------------------
# Correctness: ours == engine (fp32, outputs and gradients); bf16 error
# ----------------------------------------------------------------------------------------


def _checks(torch, F, pats, names, dev) -> int:
    from longattn.ops.blocksparse import pattern_attention

    print("\n== correctness: Flex (ours) vs the engine (pattern_attention), fp32 ==")
    print(f"{'pattern':<18} {'case':<26} {'max|out|':>10} {'max|grad|':>10} {'bf16 err':>10}  result")
    print("(split cases: N = 4000, heavy query (q) and key (k) blocks taken out of Flex)")
    failures = 0
    torch.manual_seed(0)
    for name in names:
        make_p, causal = pats[name]
        for case in ("plain", "padding", "gqa+bottom_right", "documents", "split", "split+padding+gqa"):
            try:
                p = make_p()
                n, B, H, Hkv, D = (4000 if case.startswith("split") else 1000), 2, 4, 4, 64
                nq = n
                kpm = seg = None
                if "padding" in case:
                    kpm = torch.rand(B, n, device=dev) > 0.1
                    kpm[1, : n // 2] = False
                if case == "gqa+bottom_right":
                    Hkv, nq = 2, 333
                if case == "split+padding+gqa":
                    Hkv = 2
                if case == "documents":
                    seg = (torch.arange(n, device=dev) // 300).expand(B, n).contiguous()
                if case.startswith("split"):
                    sbm = F.split_block_mask_for(p, n, H, causal=causal, key_padding_mask=kpm, q_len=nq, device=dev)
                    case = f"{case} ({sbm.heavy_q_blocks.numel()}q+{sbm.heavy_k_blocks.numel()}k)"
                q = torch.randn(B, H, nq, D, device=dev, requires_grad=True)
                k = torch.randn(B, Hkv, n, D, device=dev, requires_grad=True)
                v = torch.randn(B, Hkv, n, D, device=dev, requires_grad=True)
                g = torch.randn(B, H, nq, D, device=dev)
                out = F.flex_pattern_attention(q, k, v, p, causal=causal, key_padding_mask=kpm, segment_ids=seg,
                                               enable_gqa=Hkv != H)
                grads = torch.autograd.grad(out, (q, k, v), g)
                ref, rgrads = _engine(torch, pattern_attention, q, k, v, g, p, causal, kpm, seg)
                if ref is None:
                    print(f"{name:<18} {case:<26} {'':>10} {'':>10} {'':>10}  (engine has no {case})")
                    continue
                e_out = (out - ref).abs().max().item()
                e_grad = max((a - b).abs().max().item() for a, b in zip(grads, rgrads))
                with torch.no_grad():
                    ob = F.flex_pattern_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), p, causal=causal,
                                                  key_padding_mask=kpm, segment_ids=seg, enable_gqa=Hkv != H)
                e_bf16 = (ob.float() - ref).abs().max().item()
                ok = e_out < 1e-4 and e_grad < 1e-3 and not math.isnan(e_out) and e_bf16 < 5e-2
                failures += not ok
                print(f"{name:<18} {case:<26} {e_out:10.2e} {e_grad:10.2e} {e_bf16:10.2e}  {'ok' if ok else 'FAIL'}")
            except Exception as e:  # noqa: BLE001 - report and go on
                failures += 1
                print(f"{name:<18} {case:<26} ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                traceback.print_exc(limit=3, file=sys.stdout)
    return failures


def _engine(torch, pattern_attention, q, k, v, g, p, causal, kpm, seg):
    """The engine's output and gradients (segment_ids: passed through when the engine
    takes them, else documents one by one)."""
    qe, ke, ve = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    if seg is None:
        out = pattern_attention(qe, ke, ve, p, causal=causal, key_padding_mask=kpm)
    else:
        try:
            out = pattern_attention(qe, ke, ve, p, causal=causal, key_padding_mask=kpm, segment_ids=seg)
        except TypeError:  # no segment_ids in this engine: each document alone
            ids = seg[0].tolist()
            if any(seg[b].tolist() != ids for b in range(seg.shape[0])) or q.shape[2] != k.shape[2]:
                return None, None
            cuts = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]
            parts = []
            for a, b in zip(cuts[:-1], cuts[1:]):
                parts.append(pattern_attention(qe[:, :, a:b], ke[:, :, a:b], ve[:, :, a:b], p, causal=causal,
                                               key_padding_mask=None if kpm is None else kpm[:, a:b]))
            out = torch.cat(parts, 2)
    grads = torch.autograd.grad(out, (qe, ke, ve), g)
    return out.detach(), grads


# ----------------------------------------------------------------------------------------
# Timing table
# ----------------------------------------------------------------------------------------


def _measure(torch, fn, repeat: int):
    """(median ms, peak MB above the inputs) of fn() (forward + backward)."""
    torch.cuda.synchronize()
    fn()  # warm-up (compiles)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times.sort()
    return times[len(times) // 2], peak


def _cell(res) -> str:
    if isinstance(res, str):
        return f"{res:>17}"
    ms, mb = res
    return f"{ms:9.2f} {mb:7.0f}"


def _table(torch, F, create_block_mask, pats, names, dev, args) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    print("\n== fwd+bwd time (ms, median) and peak memory (MB above inputs) ==")
    hdr = (f"{'pattern':<18} {'N':>7} {'dtype':<5} {'build ms':>13} {'ours ms':>9} {'MB':>7} "
           f"{'cbm build':>10} {'flex+cbm':>9} {'MB':>7} {'sdpa ms':>9} {'MB':>7} {'ours/sdpa':>9}")
    print(hdr)
    B, H, D = args.batch, args.heads, args.dim
    for name in names:
        make_p, causal = pats[name]
        for n in args.sizes:
            for dn in args.dtypes:
                dt = dtypes[dn]
                p = make_p()
                torch.manual_seed(0)
                try:
                    q, k, v = (torch.randn(B, H, n, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
                except torch.cuda.OutOfMemoryError:
                    print(f"{name:<18} {n:>7} {dn:<5}  inputs do not fit")
                    continue
                g = torch.randn(B, H, n, D, device=dev, dtype=dt)

                def run(f):
                    try:
                        return _measure(torch, f, args.repeat)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        return "OOM"
                    except Exception as e:  # noqa: BLE001
                        torch.cuda.empty_cache()
                        return f"err {type(e).__name__}"[:17]

                # ours: build time (host index math + copy to the GPU), then fwd+bwd
                sbm = None
                try:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    sbm = F.split_block_mask_for(p, n, H, causal=causal, device=dev)
                    torch.cuda.synchronize()
                    build = f"{(time.perf_counter() - t0) * 1e3:.1f}"
                    if sbm.heavy_q_blocks.numel() or sbm.heavy_k_blocks.numel():  # split out: q rows, k columns
                        build += f"/{sbm.heavy_q_blocks.numel()}q{sbm.heavy_k_blocks.numel()}k"
                    bm = sbm.block_mask
                except Exception as e:  # noqa: BLE001
                    bm, build = None, f"err {type(e).__name__}"[:9]

                def ours():
                    out = F.flex_pattern_attention(q, k, v, p, causal=causal)
                    torch.autograd.grad(out, (q, k, v), g)

                r_ours = run(ours) if bm is not None else "no mask"
                # flex with create_block_mask (the same mask_mod; it evaluates every pair)
                r_cbm, cbuild = "skipped", "skipped"
                if bm is not None and n <= args.cbm_max:
                    try:
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        cbm = create_block_mask(sbm.mask_mod, 1, H, n, n, device=dev, _compile=True)
                        torch.cuda.synchronize()
                        cbuild = f"{(time.perf_counter() - t0) * 1e3:10.1f}"

                        cbm_flex = F._compiled(("create_block_mask", name, n, dn))  # its own compile cache

                        def flex_cbm():
                            out = cbm_flex(q, k, v, cbm, None, False)
                            torch.autograd.grad(out, (q, k, v), g)

                        r_cbm = run(flex_cbm)
                        del cbm
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        cbuild, r_cbm = "OOM", "OOM"
                    except Exception as e:  # noqa: BLE001
                        cbuild = f"err {type(e).__name__}"[:10]

                # dense SDPA: flash for half types, memory-efficient for fp32
                backend = SDPBackend.FLASH_ATTENTION if dt != torch.float32 else SDPBackend.EFFICIENT_ATTENTION

                def sdpa():
                    with sdpa_kernel(backend):
                        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    torch.autograd.grad(out, (q, k, v), g)

                r_sdpa = run(sdpa)
                ratio = (f"{r_ours[0] / r_sdpa[0]:9.3f}" if not isinstance(r_ours, str)
                         and not isinstance(r_sdpa, str) else f"{'-':>9}")
                print(f"{name:<18} {n:>7} {dn:<5} {build:>13} {_cell(r_ours)} {cbuild:>10} {_cell(r_cbm)} "
                      f"{_cell(r_sdpa)} {ratio}", flush=True)
                del q, k, v, g, bm, sbm
                torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
