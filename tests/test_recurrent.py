"""The recurrent family (longattn.ops.recurrent): chunked engine == float64 token-by-token
reference (outputs, final state, every gradient), decode steps, state continuation,
packed documents, GQA, causality, half precision, errors, memory, HF's Qwen3-Next."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as Fn

import longattn
from longattn.ops import recurrent as R
from longattn.testing import assert_no_causal_leak

D64 = torch.float64
MEMBERS = ("gated_delta", "kda", "ssd", "gla", "retention")
CHUNKED = {"gated_delta": R.gated_delta_rule, "kda": R.kda, "ssd": R.ssd, "gla": R.gla, "retention": R.retention}
STEPS = {"gated_delta": R.gated_delta_rule_step, "kda": R.kda_step, "ssd": R.ssd_step, "gla": R.gla_step,
         "retention": R.retention_step}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(kind, B=2, Hk=2, Hv=4, N=37, Dk=8, Dv=6, dtype=D64, seed=0, decay=0.5):
    """q, k [B, Hk, N, Dk], v [B, Hv, N, Dv], gates of ``kind`` (g, beta; gamma for retention), state."""
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=D64)

    q, k, v = r(B, Hk, N, Dk), Fn.normalize(r(B, Hk, N, Dk), dim=-1), r(B, Hv, N, Dv)
    spec = R.KINDS[kind]
    if kind == "retention":
        gates = [torch.rand(Hv, generator=gen, dtype=D64) * 0.5 + 0.45]  # gamma
    else:
        g = -torch.rand(B, Hv, N, *((Dk,) if spec.per_channel else ()), generator=gen, dtype=D64) * decay
        gates = [g] + ([torch.rand(B, Hv, N, generator=gen, dtype=D64)] if spec.delta else [])
    s0 = r(B, Hv, Dk, Dv)
    return [x.to(dtype) for x in (q, k, v, *gates)], s0.to(dtype)


def _reference(kind, q, k, v, gates, s0, *, scale=None, resets=None):
    """The float64 recurrence on expanded heads (written from the recurrence, not the engine)."""
    Hv, Dk = v.shape[1], q.shape[-1]
    q, k = (x.double().repeat_interleave(Hv // q.shape[1], 1) for x in (q, k))
    if kind == "retention":
        g, beta = torch.log(gates[0].double())[None, :, None].expand(q.shape[0], Hv, q.shape[2]), None
    else:
        g, beta = gates[0].double(), (gates[1].double() if len(gates) > 1 else None)
    return R.recurrent_reference(q, k, v.double(), g, beta, scale=Dk ** -0.5 if scale is None else scale,
                                 initial_state=None if s0 is None else s0.double(), resets=resets)


def _close(a, b, tol=1e-10, what="output"):
    err = (a.double() - b.double()).abs().max().item()
    assert err < tol, f"{what} differs by {err:g}"


def _match_with_gradients(got, ref, inputs):
    """(o, final state) equal to the reference's, and so are the gradients of a random
    weighting of both wrt every input (q, k, v, g|gamma, beta, initial_state)."""
    (o, s), (ro, rs) = got, ref
    _close(o, ro)
    _close(s, rs, what="final state")
    wo, ws = torch.randn_like(o), torch.randn_like(s)
    ga = torch.autograd.grad((o * wo).sum() + (s * ws).sum(), inputs)
    gb = torch.autograd.grad((ro * wo).sum() + (rs * ws).sum(), inputs)
    names = ["q", "k", "v", "g|gamma", "beta"][: len(inputs) - 1] + ["initial_state"]
    for name, a, b in zip(names, ga, gb):
        _close(a, b, what=f"d{name}")


# ----------------------------------------------------------------------- chunked == reference
@pytest.mark.parametrize("N,chunk", [(37, 16), (130, 64)])
@pytest.mark.parametrize("kind", MEMBERS)
def test_chunked_equals_the_float64_recurrence_with_gradients(kind, N, chunk):
    """Outputs, final state and the gradients of q, k, v, g, beta, initial_state (GQA 2 -> 4)."""
    ins, s0 = _inputs(kind, N=N)
    ins = [x.requires_grad_() for x in ins]
    s0.requires_grad_()
    o, s = CHUNKED[kind](*ins, initial_state=s0, output_final_state=True, chunk_size=chunk)
    ro, rs = _reference(kind, *ins[:3], ins[3:], s0)
    _match_with_gradients((o, s), (ro, rs), ins + [s0])


@pytest.mark.parametrize("kind", ["gated_delta", "kda", "ssd"])
def test_head_slices_with_l2norm_packing_and_gqa_equal_the_float64_recurrence(kind, monkeypatch):
    """One q/k head per slice (the engine walks the heads in slices), GQA 3 -> 6, q/k L2 norm
    and scale (their backward is hand-written), packed documents: outputs, final state and
    every gradient against the recurrence on inputs normalised by autograd in float64."""
    from longattn.ops.recurrent import function

    monkeypatch.setattr(function, "SLICE_ELEMENTS", 1)
    ins, s0 = _inputs(kind, Hk=3, Hv=6, N=45)
    ins = [x.requires_grad_() for x in ins]
    s0.requires_grad_()
    seg = torch.tensor([[0] * 20 + [1] * 25, [0] * 45])
    o, s = CHUNKED[kind](*ins, initial_state=s0, output_final_state=True, use_qk_l2norm=True, scale=0.7,
                         segment_ids=seg, chunk_size=16)

    def norm(x):
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)

    resets = torch.zeros(2, 45, dtype=torch.bool)
    resets[0, 20] = True
    ro, rs = _reference(kind, norm(ins[0]), norm(ins[1]), ins[2], ins[3:], s0, scale=0.7, resets=resets)
    _match_with_gradients((o, s), (ro, rs), ins + [s0])


def test_forward_saves_only_its_inputs_for_the_backward():
    """The backward recomputes the chunk states and U: what autograd keeps between the
    forward and the backward is the raw q, k, v, g, beta (no normalised q/k copies, no
    [N/C, Dk, Dv] states), measured by a saved-tensor hook."""
    ins, _ = _inputs("gated_delta", B=1, Hk=2, Hv=2, N=256, Dk=16, Dv=16, dtype=torch.float32)
    ins = [x.requires_grad_() for x in ins]
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, _ = R.gated_delta_rule(*ins, use_qk_l2norm=True, chunk_size=16)
    inputs = sum(x.numel() * x.element_size() for x in ins) + 2 * 256 * 4  # + the float32 copy of g
    assert sum(saved.values()) <= inputs, f"saved {sum(saved.values())} bytes for inputs of {inputs}"
    o.sum().backward()


@pytest.mark.parametrize("kind", ["kda", "gla"])
def test_strong_per_channel_decays_do_not_overflow(kind):
    """log decays down to -40 per step: exp(-G) of a chunk would overflow float32 (and
    float64); every exponent the engine forms is <= 0."""
    ins, s0 = _inputs(kind, B=1, Hk=1, Hv=2, N=70, decay=40.0, dtype=torch.float32)
    o, s = CHUNKED[kind](*ins, initial_state=s0, output_final_state=True)
    ro, rs = _reference(kind, *ins[:3], ins[3:], s0)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    _close(o, ro, tol=1e-4)
    _close(s, rs, tol=1e-4, what="final state")


# ----------------------------------------------------------------------- decode, continuation
@pytest.mark.parametrize("kind", MEMBERS)
def test_decode_steps_equal_the_chunked_form(kind):
    ins, s0 = _inputs(kind, N=21)
    o, s = CHUNKED[kind](*ins, initial_state=s0, output_final_state=True, chunk_size=8)
    state, outs = s0, []
    for t in range(21):
        tok = [x[:, :, t : t + 1] for x in ins[:3]]
        if kind == "retention":
            gates = ins[3:]
        else:
            gates = [x[:, :, t] for x in ins[3:]]
        ot, state = STEPS[kind](*tok, *gates, state)
        outs.append(ot)
    _close(torch.cat(outs, 2), o)
    _close(state, s, what="state")


@pytest.mark.parametrize("kind", ["gated_delta", "kda"])
def test_prompt_then_rest_equals_the_whole(kind):
    ins, _ = _inputs(kind, N=100)
    whole, s_all = CHUNKED[kind](*ins, output_final_state=True, chunk_size=32)

    def part(a, b):
        return [x[:, :, a:b] for x in ins]

    first, s1 = CHUNKED[kind](*part(0, 45), output_final_state=True, chunk_size=32)
    rest, s2 = CHUNKED[kind](*part(45, 100), initial_state=s1, output_final_state=True, chunk_size=32)
    _close(torch.cat([first, rest], 2), whole)
    _close(s2, s_all, what="final state")


# ----------------------------------------------------------------------- packed documents
DOCS = [1, 37, 30, 2]  # none a chunk multiple; a one-token document


@pytest.mark.parametrize("kind", ["gated_delta", "kda", "gla"])
def test_packed_documents_equal_each_document_alone(kind):
    N = sum(DOCS)
    ins, s0 = _inputs(kind, B=1, N=N)
    ins = [x.requires_grad_() for x in ins]
    s0.requires_grad_()
    seg = R.segment_ids_from_cu_seqlens(torch.tensor([0, 1, 38, 68, 70]), total=N)
    assert seg.tolist() == [sum([[i] * n for i, n in enumerate(DOCS)], [])]
    o, s = CHUNKED[kind](*ins, initial_state=s0, output_final_state=True, segment_ids=seg * 7, chunk_size=16)
    outs, start, state = [], 0, s0  # the initial state continues the row's first document
    for n in DOCS:
        od, sd = CHUNKED[kind](*[x[:, :, start : start + n] for x in ins], initial_state=state,
                               output_final_state=True, chunk_size=16)
        outs.append(od)
        start, state = start + n, None
    ref = torch.cat(outs, 2)
    _close(o, ref)
    _close(s, sd, what="final state (last document)")
    resets = torch.zeros(1, N, dtype=torch.bool)
    resets[0, [1, 38, 68]] = True
    _close(o, _reference(kind, *ins[:3], ins[3:], s0, resets=resets)[0], what="vs the recurrence")
    w = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad((o * w).sum(), ins + [s0]), torch.autograd.grad((ref * w).sum(), ins + [s0])):
        _close(a, b, what="gradient")


# ----------------------------------------------------------------------- causality, precision
@pytest.mark.parametrize("kind", ["gated_delta", "kda"])
def test_no_causal_leak(kind):
    ins, _ = _inputs(kind, B=1, N=90)
    t = 40
    o = CHUNKED[kind](*ins, chunk_size=32)[0]
    moved = [x.clone() for x in ins]
    for x in moved:
        x[:, :, t + 1 :] = x[:, :, t + 1 :] * 3 - 0.5  # g stays <= 0 after * 3 - 0.5
    o2 = CHUNKED[kind](*moved, chunk_size=32)[0]
    assert (o2[:, :, : t + 1] - o[:, :, : t + 1]).abs().max() == 0
    ins = [x.requires_grad_() for x in ins]
    out = CHUNKED[kind](*ins, chunk_size=32)[0]
    for x, gx in zip(ins, torch.autograd.grad(out[:, :, : t + 1].sum(), ins)):
        assert gx[:, :, t + 1 :].abs().max() == 0
    # and through the registry, with the module's learned gates
    mod = longattn.build(kind, heads=2, head_dim=8).double()
    assert_no_causal_leak(lambda q, k, v: mod(q, k, v, causal=True), *(torch.randn(1, 2, 90, 8, dtype=D64)
                                                                       for _ in range(3)), t=t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_close_to_float32(dtype):
    ins, s0 = _inputs("gated_delta", N=100, dtype=torch.float32)
    o32, s32 = R.gated_delta_rule(*ins, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
    o, s = R.gated_delta_rule(*[x.to(dtype) for x in ins], initial_state=s0, output_final_state=True,
                              use_qk_l2norm=True)
    assert o.dtype == dtype and s.dtype == torch.float32  # the state accumulates in float32
    rel = ((o.float() - o32).norm() / o32.norm()).item()
    assert rel < 0.03, rel
    assert ((s - s32).norm() / s32.norm()).item() < 0.03


def test_bad_inputs_name_the_argument():
    (q, k, v, g, beta), s0 = _inputs("gated_delta", N=10)
    cases = [
        (dict(q=q[..., :-1]), ValueError, "q and k"),
        (dict(v=v[:, :3]), ValueError, "multiple"),
        (dict(g=g[..., None]), ValueError, "g must"),
        (dict(beta=beta[:, :, :-1]), ValueError, "beta"),
        (dict(q=q.long()), TypeError, "q must"),
        (dict(g=[1.0]), TypeError, "g must"),
    ]
    for change, err, match in cases:
        args = {**dict(q=q, k=k, v=v, g=g, beta=beta), **change}
        with pytest.raises(err, match=match):
            R.gated_delta_rule(**args)
    with pytest.raises(ValueError, match="initial_state"):
        R.gated_delta_rule(q, k, v, g, beta, initial_state=s0[..., :-1])
    with pytest.raises(ValueError, match="segment_ids"):
        R.gated_delta_rule(q, k, v, g, beta, segment_ids=torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        R.gated_delta_rule(q, k, v, g, beta, chunk_size=0)
    with pytest.raises(ValueError, match="gamma"):
        R.retention(q, k, v, torch.full((4,), 1.5, dtype=D64))
    with pytest.raises(ValueError, match="cu_seqlens"):
        R.segment_ids_from_cu_seqlens(torch.tensor([0, 5, 5, 9]))
    with pytest.raises(ValueError, match="causal"):
        longattn.attention(q, k, v[:, :2], "gated_delta", causal=False)


def _status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_memory_has_no_n_by_n_tensor():
    """N = 16384, forward + backward: an N x N float32 tensor alone would be 1 GiB (it
    would be mmap-ed fresh, so the peak RSS of this process would show it)."""
    q, k, v = (torch.randn(1, 1, 16384, 32, requires_grad=True) for _ in range(3))
    g = (-torch.rand(1, 1, 16384) * 0.1).requires_grad_()
    beta = torch.rand(1, 1, 16384).requires_grad_()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = _status_mb("VmRSS:")
    o, _ = R.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)
    o.sum().backward()
    peak = _status_mb("VmHWM:") - base
    assert peak < 200, f"peak {peak:.0f} MiB"


# ----------------------------------------------------------------------- HF Qwen3-Next
def _hf_chunked():
    try:
        mod = importlib.import_module("transformers.models.qwen3_next.modeling_qwen3_next")
    except Exception:  # noqa: BLE001 - transformers absent or too old
        return None
    return getattr(mod, "torch_chunk_gated_delta_rule", None)


def test_equals_transformers_torch_chunk_gated_delta_rule():
    hf = _hf_chunked()
    if hf is None:
        pytest.skip("transformers' Qwen3-Next torch_chunk_gated_delta_rule is not importable")
    (q, k, v, g, beta), s0 = _inputs("gated_delta", N=77, dtype=torch.float32)
    o, s = R.gated_delta_rule(q, k * 3, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
    t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731 - [B, H, N, D] -> HF's [B, N, H, D]
    ho, hs = hf(t(q), t(k * 3), t(v), t(g), t(beta), initial_state=s0, output_final_state=True,
                use_qk_l2norm_in_kernel=True)
    _close(o, ho.transpose(1, 2), tol=1e-4)
    _close(s, hs, tol=1e-4, what="final state")


# ----------------------------------------------------------------------- registry and model
def test_registered_members_and_the_model_trains():
    from longattn.model import ModelConfig, Transformer

    for name in MEMBERS:
        spec = longattn.registry.get(name)
        assert spec.family == "recurrent" and spec.causal and spec.packed and spec.paper
        assert spec.learned == (name != "retention")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=16, max_len=40, dim=32, depth=1, heads=2, mechanism="gated_delta"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.randint(0, 16, (4, 39))
    losses = []
    for _ in range(8):
        loss = Fn.cross_entropy(model(x[:, :-1]).reshape(-1, 16), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    gates = model.blocks[0].attn.groups[0].impl.gates
    assert gates.A_log.grad is not None and gates.w_beta.grad.abs().sum() > 0  # the gates learn


# ----------------------------------------------------------------------- short convolution
def test_short_conv_equals_a_hand_written_causal_convolution():
    """ShortConv against the definition y_t = silu(sum_{j<K} w_j x_{t-(K-1)+j}), x_{<0} = 0,
    and with ``history`` continuing a sequence cut in two."""
    from longattn.ops.recurrent.modules import ShortConv

    conv = ShortConv(2, 3, 4).double()
    with torch.no_grad():
        conv.weight.normal_()
    x = torch.randn(2, 2, 11, 3, dtype=D64)
    w = conv.weight.detach()
    ref = torch.zeros_like(x)
    for t in range(11):
        for j in range(4):
            s = t - 3 + j
            if s >= 0:
                ref[:, :, t] += w[None, :, :, j] * x[:, :, s]
    _close(conv(x), torch.nn.functional.silu(ref), what="short conv")
    _close(conv(x[:, :, 7:], history=x[:, :, 4:7]), torch.nn.functional.silu(ref)[:, :, 7:], what="continued")


def test_short_conv_module_is_causal_and_the_functional_form_refuses_it():
    mod = longattn.build("gated_delta", heads=2, head_dim=8, short_conv=4).double()
    assert_no_causal_leak(lambda q, k, v: mod(q, k, v, causal=True),
                          *(torch.randn(1, 2, 45, 8, dtype=D64) for _ in range(3)), t=20)
    q = torch.randn(1, 2, 9, 8)
    with pytest.raises(ValueError, match="short_conv"):
        longattn.attention(q, q, q, "gated_delta", causal=True, short_conv=4)


def test_output_norm_is_a_per_head_rms_norm_with_a_learned_scale():
    """output_norm=True: each head's output over Dv divided by its RMS (eps 1e-6), times the
    head's learned scale; the same weights without it give the plain output."""
    torch.manual_seed(0)
    plain = longattn.build("gated_delta", heads=2, head_dim=8, short_conv=3).double()
    normed = longattn.build("gated_delta", heads=2, head_dim=8, short_conv=3, output_norm=True).double()
    normed.load_state_dict({**plain.state_dict(), "o_scale": torch.rand(2, 1, 8, dtype=D64) + 0.5})
    q, k, v = (torch.randn(1, 2, 23, 8, dtype=D64) for _ in range(3))
    o = plain(q, k, v, causal=True)
    ref = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * normed.o_scale
    _close(normed(q, k, v, causal=True), ref, what="output norm")
    with pytest.raises(ValueError, match="output_norm"):
        longattn.attention(q, k, v, "gated_delta", causal=True, output_norm=True)


def test_output_gate_multiplies_by_silu_of_a_projection_of_the_raw_query():
    """output_gate=True: the (normed) output times silu(q_t W_h + b_h), q_t the head's query
    before the short convolution, written out per head with a loop."""
    torch.manual_seed(0)
    plain = longattn.build("gated_delta", heads=2, head_dim=8, short_conv=3, output_norm=True).double()
    gated = longattn.build("gated_delta", heads=2, head_dim=8, short_conv=3, output_norm=True,
                           output_gate=True).double()
    w, b = torch.randn(2, 8, 8, dtype=D64), torch.randn(2, 1, 8, dtype=D64)
    gated.load_state_dict({**plain.state_dict(), "w_gate": w, "b_gate": b})
    q, k, v = (torch.randn(1, 2, 23, 8, dtype=D64) for _ in range(3))
    o = plain(q, k, v, causal=True)
    ref = torch.stack([o[:, h] * Fn.silu(q[:, h] @ w[h] + b[h]) for h in range(2)], 1)
    _close(gated(q, k, v, causal=True), ref, what="output gate")
    fresh = longattn.build("gated_delta", heads=2, head_dim=8, short_conv=3, output_norm=True,
                           output_gate=True).double()
    fresh.load_state_dict({**plain.state_dict(), "w_gate": fresh.w_gate, "b_gate": fresh.b_gate})
    _close(fresh(q, k, v, causal=True), o, tol=1e-4 * o.abs().max().item(), what="the gate at its start")
    with pytest.raises(ValueError, match="output_gate"):
        longattn.attention(q, k, v, "gated_delta", causal=True, output_gate=True)
    with pytest.raises(TypeError, match="output_gate"):
        longattn.build("gated_delta", heads=2, head_dim=8, output_gate="yes")
