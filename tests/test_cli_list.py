"""``longattn list``: the capability columns agree with the registry's specs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from longattn import cli, cli_list, registry


def _table_rows(text: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0].strip("`")] = dict(zip(header, cells))
    return header, rows


def test_list_columns_match_the_specs(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    header, rows = _table_rows(capsys.readouterr().out)
    for title in ("gqa", "decode", "packed", "cross", "seq-parallel", "compile op", "learned",
                  "sinks", "softcap"):
        assert title in header
    assert sorted(rows) == registry.names()
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    for spec in registry.specs():
        row = rows[spec.name]
        assert row["family"] == spec.family
        assert row["exact"] == yes(spec.exact) and row["causal"] == yes(spec.causal)
        assert row["gqa"] == yes(spec.gqa) and row["decode"] == yes(spec.bottom_right or spec.family == "recurrent")
        assert row["packed"] == yes(spec.packed) and row["cross"] == yes(spec.cross)
        assert row["learned"] == yes(spec.learned)
        assert row["sinks"] == yes(getattr(spec, "sinks", False))
        assert row["softcap"] == yes(getattr(spec, "softcap", False))


def test_list_hand_checked_rows(capsys: pytest.CaptureFixture[str]) -> None:
    """A few rows written out by hand from the docs (distributed.py's and custom.py's
    module docstrings), independent of the code that derives the columns."""
    cli.main(["list"])
    _, rows = _table_rows(capsys.readouterr().out)
    expect = {
        # name: (gqa, decode, packed, seq-parallel, compile op, learned)
        "local": ("yes", "yes", "yes", "yes", "yes", "no"),
        "bigbird": ("yes", "yes", "yes", "yes", "yes", "no"),
        "full": ("yes", "yes", "yes", "yes", "yes", "no"),
        "performer": ("yes", "yes", "yes", "yes", "yes", "yes"),
        "lsh": ("no", "no", "no", "no", "no", "no"),
        "sinkhorn": ("no", "no", "no", "no", "no", "yes"),
        "nystrom": ("no", "no", "no", "no", "yes", "no"),
        # decodes through the model's O(state) recurrent step, not a bottom-right call
        "gated_delta": ("no", "yes", "yes", "yes", "no", "yes"),
    }
    cols = ("gqa", "decode", "packed", "seq-parallel", "compile op", "learned")
    for name, want in expect.items():
        assert tuple(rows[name][c] for c in cols) == want, name
    assert rows["linformer"]["causal"] == "no"


def test_list_json_has_capabilities(capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["list", "--json"])
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["local"]["capabilities"]["seq-parallel"] is True
    assert records["lsh"]["capabilities"]["compile op"] is False
    assert records["local"]["params"]["before"] == registry.get("local").defaults()["before"]


def test_sinks_and_softcap_read_when_present() -> None:
    spec = registry.get("local")
    fields = ("name", "exact", "causal", "gqa", "bottom_right", "packed", "cross", "learned",
              "subquadratic")
    fake = SimpleNamespace(**{f: getattr(spec, f) for f in fields}, defaults=spec.defaults,
                           sinks=True, softcap=False)
    caps = cli_list.capabilities(fake)  # type: ignore[arg-type]
    assert caps["sinks"] is True and caps["softcap"] is False
    assert cli_list.capabilities(spec)["sinks"] is bool(getattr(spec, "sinks", False))
