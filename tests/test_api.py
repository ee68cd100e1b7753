"""The registry is a pure table and the only switchboard (issue 30, step 2).

- ``longattn.registry`` imports no other longattn module; the functional API lives in
  ``longattn.api`` and the old names are forwarded at attribute access.
- Behaviour follows a mechanism's typed registry fields, never its name: a copy of a
  spec registered under another name behaves as the original everywhere.
- One parameter check (``Mechanism.check_params`` / ``resolve``).
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from longattn import api, registry

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "longattn"
D64 = torch.float64


def _oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense float64 softmax attention over a bool [Nq, Nk] mask (rows without keys: 0)."""
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v.double()


@contextmanager
def _copy_of(name: str, new: str) -> Iterator[registry.Mechanism]:
    """``name``'s spec registered again as ``new`` for the block (removed after)."""
    spec = registry.add(dataclasses.replace(registry.get(name), name=new))
    try:
        yield spec
    finally:
        del registry._REGISTRY[new]


def test_registry_imports_no_longattn_module() -> None:
    tree = ast.parse((SRC / "registry.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    named = [a.name for n in imports if isinstance(n, ast.Import) for a in n.names]
    named += [n.module or "" for n in imports if isinstance(n, ast.ImportFrom)]
    assert not [m for m in named if m == "longattn" or m.startswith("longattn.")], named


def test_old_names_forward_to_api_and_unknown_ones_raise() -> None:
    for name in ("attention", "run", "build", "routed", "FunctionalAttention"):
        assert getattr(registry, name) is getattr(api, name)
    import longattn

    assert longattn.attention is api.attention and longattn.build is api.build
    with pytest.raises(AttributeError, match="no_such_name"):
        registry.no_such_name  # noqa: B018


def test_table_is_full_after_a_plain_import_longattn() -> None:
    """``import longattn`` loads no ops; the table's first lookup fills it."""
    code = ("import sys, longattn\nfrom longattn import registry\n"
            "assert 'longattn.ops' not in sys.modules and 'longattn.api' not in sys.modules\n"
            "assert registry.get('local').name == 'local' and 'full' in registry.names()\n"
            "assert 'longattn.api' in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


_NAMES_OF_A_MECHANISM = ("mechanism", "name")


def _name_comparisons(path: pathlib.Path, mechanisms: set[str]) -> list[str]:
    """``x == "local"`` / ``spec.name != "full"`` / ``name in ("a", "b")`` with a registered name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        left = node.left
        is_name = (isinstance(left, ast.Name) and left.id in _NAMES_OF_A_MECHANISM) or (
            isinstance(left, ast.Attribute) and left.attr == "name")
        consts = [c for c in node.comparators if isinstance(c, ast.Constant)]
        consts += [e for c in node.comparators if isinstance(c, (ast.Tuple, ast.Set, ast.List)) for e in c.elts
                   if isinstance(e, ast.Constant)]
        hits = [c.value for c in consts if c.value in mechanisms]
        if is_name and hits:
            found.append(f"{path.relative_to(SRC)}:{node.lineno} {hits}")
    return found


def test_no_code_outside_the_registry_switches_on_a_mechanism_name() -> None:
    files = [SRC / "api.py", SRC / "ops" / "custom.py", SRC / "integrations" / "transformers.py",
             SRC / "bench" / "error.py", SRC / "bench" / "cases.py", SRC / "decoding.py",
             *sorted((SRC / "distributed").glob("*.py")), *sorted((SRC / "layers").glob("*.py"))]
    mechanisms = set(registry.names())
    assert not [hit for f in files for hit in _name_comparisons(f, mechanisms)]


def test_a_renamed_full_is_routed_by_its_fields() -> None:
    """compile op, Dynamo tracing, sequence parallelism and the random parameters come
    from the spec's fields: a copy of ``full`` under another name gets them all."""
    from longattn import distributed
    from longattn.ops import custom

    with _copy_of("full", "full_copy_for_test"):
        assert custom.supported("full_copy_for_test") and not custom.supported("full_copy_for_test",
                                                                                {"dropout": 0.1})
        custom.NATIVE.add("full_copy_for_test")
        try:
            assert custom.traced_natively("full_copy_for_test", True, 5, 5)
            assert not custom.traced_natively("full_copy_for_test", True, 3, 5)
        finally:
            custom.NATIVE.discard("full_copy_for_test")
        assert "full_copy_for_test" in distributed.supported()
        assert "full_copy_for_test" in distributed.RING_MECHANISMS
    assert "full_copy_for_test" not in distributed.supported()


def test_a_renamed_local_runs_the_tile_engine_op_exactly() -> None:
    """A copy of ``local`` under another name runs the engine custom op (its pattern comes
    from ``spec.pattern``, not the name) and equals a dense masked float64 oracle."""
    from longattn.ops import custom

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 8, generator=g, dtype=D64) for _ in range(3))
    i, j = torch.arange(37)[:, None], torch.arange(37)[None, :]
    mask = (j >= i - 5) & (j <= i + 2)
    with _copy_of("local", "local_copy_for_test"):
        key = custom.config_key("local_copy_for_test", False, None, "cpu", True, (), ("after", "before"), 2, 5)
        assert "|engine|" in key
        out = custom.attention(q, k, v, "local_copy_for_test", before=5, after=2)
    torch.testing.assert_close(out, _oracle(q, k, v, mask), rtol=1e-10, atol=1e-12)


def test_window_params_field_fills_a_models_sliding_window() -> None:
    from longattn.integrations.transformers import _Choice, _resolve

    with _copy_of("local", "local_copy_for_test"):
        name, params = _resolve(_Choice("local_copy_for_test", {}), "sliding_attention", 4, True, 10, [], "toy")
        assert (name, params) == ("local_copy_for_test", {"before": 3, "after": 0})
        with pytest.raises(ValueError, match="local_copy_for_test.*without before="):
            _resolve(_Choice("local_copy_for_test", {}), "full_attention", None, True, 10, [], "toy")


def test_one_parameter_check() -> None:
    spec = registry.get("graph")  # edge_index is required
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['nope'\]"):
        spec.check_params({"nope": 1}, complete=False)
    spec.check_params({}, complete=False)
    with pytest.raises(TypeError, match=r"needs parameter\(s\) \['edge_index'\]"):
        spec.check_params({})
    with pytest.raises(ValueError, match="cannot be causal"):
        registry.get("nystrom").resolve({}, causal=True)
    assert registry.get("local").resolve({"before": 3}) == {**registry.get("local").defaults(), "before": 3}
    assert registry.get("full").random({"dropout": 0.1}) and not registry.get("full").random({"dropout": 0.0})


def test_layer_uses_the_one_check_per_call() -> None:
    from longattn.layers.attention import HeadGroup

    grp = HeadGroup("graph", {}, 0, 2, 8, causal=False, attn_dropout=0.0, alibi=False, global_tokens=0)
    q = torch.randn(1, 2, 11, 8)
    with pytest.raises(TypeError, match=r"needs parameter\(s\) \['edge_index'\]"):
        grp(q, q, q, causal=False, key_padding_mask=None)
    with pytest.raises(TypeError, match="unknown parameter.*it accepts"):
        grp(q, q, q, causal=False, key_padding_mask=None, nope=1)


def test_error_meter_exact_checks_against_hand_masks() -> None:
    """The error meter's exact rows (its per-mechanism small-N table) are ~0, and
    local2d's dense mask is the hand-drawn 2-D neighbourhood."""
    from longattn.bench import error

    p = {"height": 3, "width": 4, "radius_h": 1, "radius_w": 0}
    m = error.exact_mask("local2d", p, 12, 1)[0]
    want = torch.zeros(12, 12, dtype=torch.bool)
    for a in range(12):
        for b in range(12):
            want[a, b] = abs(a // 4 - b // 4) <= 1 and a % 4 == b % 4
    assert torch.equal(m, want)
    doc = error.measure(error.ErrorConfig(n=48, exact_n=48, heads=2, dim=8, inputs=("gaussian",),
                                          mechanisms=["local", "graph", "full", "nystrom"]))
    assert {r["mechanism"] for r in doc["exact"]} == {"local", "graph", "full"}
    assert all(r["rel_error"] < 1e-12 for r in doc["exact"])
    assert [r["budget"] for r in doc["approximate"]] == [4, 16]
