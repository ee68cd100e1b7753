"""A Hugging Face model at long context with longattn attention, beside its own sdpa.

A random-init Mistral-style model (grouped KV heads, sliding window) is built from a
config (no download) and run at N tokens with one padded token (what a batch of
real prompts has): once with transformers' sdpa attention and once per longattn
mechanism, each in a fresh process so that peak memory is its own. Prints time and
peak memory side by side.

    python examples/hf_long_context.py                       # N=16384, window 4096
    python examples/hf_long_context.py --n 8192 --mechanisms local,performer

Needs the ``hf`` extra: pip install -e '.[hf]'.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

#: mechanism -> the parameters it is registered with (local follows the sliding window)
MECHANISMS = {
    "local": {},
    "bigbird": {"block": 64, "random_blocks": 3},
    "performer": {"num_features": 256},
}

_RUN = r"""
import json, sys, time, torch
from transformers import MistralConfig, MistralForCausalLM
from longattn.integrations.transformers import register
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.manual_seed(0)
cfg = MistralConfig(vocab_size=1000, hidden_size=args["dim"], intermediate_size=2 * args["dim"],
                    num_hidden_layers=args["layers"], num_attention_heads=args["heads"],
                    num_key_value_heads=args["kv_heads"], sliding_window=args["window"],
                    max_position_embeddings=args["n"])
model = MistralForCausalLM(cfg).eval()
impl = "sdpa" if args["mechanism"] == "sdpa" else register(args["mechanism"], **args["params"])
model.set_attn_implementation(impl)
x = torch.randint(0, 1000, (1, args["n"]))
mask = torch.ones_like(x)
mask[0, 0] = 0  # one padded token
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = hwm()
with torch.no_grad():
    t = time.perf_counter()
    model.model(x, attention_mask=mask)
    seconds = time.perf_counter() - t
print("__RESULT__" + json.dumps({"seconds": seconds, "peak_mib": hwm() - base}))
"""


def run_one(mechanism: str, params: dict, args: argparse.Namespace) -> dict:
    """One forward in a fresh process; {"seconds", "peak_mib"} or {"error"}."""
    spec = {"mechanism": mechanism, "params": params, "n": args.n, "window": args.window, "dim": args.dim,
            "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads, "threads": args.threads}
    res = subprocess.run([sys.executable, "-c", _RUN, json.dumps(spec)], capture_output=True, text=True)
    for line in res.stdout.splitlines():
        if line.startswith("__RESULT__"):
            return json.loads(line[len("__RESULT__"):])
    return {"error": (res.stderr.strip().splitlines() or ["no output"])[-1]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384, help="tokens (default 16384)")
    p.add_argument("--window", type=int, default=4096, help="the model's sliding window")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mechanisms", default=",".join(MECHANISMS), help="comma-separated longattn mechanisms")
    args = p.parse_args(argv)
    rows = [("sdpa (transformers)", "sdpa", {})]
    for name in filter(None, args.mechanisms.split(",")):
        if name not in MECHANISMS:
            p.error(f"--mechanisms: unknown {name!r}; choose from {sorted(MECHANISMS)}")
        label = f"longattn {name}" + (f" (window {args.window})" if name == "local" else "")
        rows.append((label, name, MECHANISMS[name]))
    print(f"Mistral-style model, random init: N={args.n}, window {args.window}, dim {args.dim}, "
          f"{args.layers} layers, {args.heads} heads / {args.kv_heads} kv heads, one padded token, "
          f"{args.threads} threads, forward")
    print(f"{'attention':<32} {'time s':>8} {'peak MiB':>9}")
    for label, mech, params in rows:
        r = run_one(mech, params, args)
        if "error" in r:
            print(f"{label:<32} failed: {r['error']}")
        else:
            print(f"{label:<32} {r['seconds']:>8.2f} {r['peak_mib']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
