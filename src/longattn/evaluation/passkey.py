"""Passkey retrieval (Mohtashami & Jaggi 2023, Landmark Attention): a sentence holding
a random 5-digit key is hidden at a depth fraction of filler text, and the model is
asked to repeat it; greedy decoding of a few tokens either reproduces the key or not.

The prompt is built in token ids, to exactly ``length`` tokens: instruction, filler
sentences (the last one cut to fit), the key sentence inserted between two filler
sentences at ``depth`` (0 = right after the instruction, 1 = right before the
question), and the question. Pieces are tokenized once each and concatenated.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about the important info there.\n")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    """``ids`` (exactly the asked length), ``key`` (the digits to retrieve),
    ``needle_at`` (index of the key sentence's first token), ``depth`` (the asked
    fraction)."""

    ids: list[int]
    key: str
    needle_at: int
    depth: float


def make_key(length: int, depth: float, seed: int = 0) -> str:
    """A reproducible 5-digit key for (length, depth, seed)."""
    return str(random.Random(f"{seed}:{length}:{depth}").randint(10000, 99999))


def build_prompt(encode: Callable[[str], list[int]], length: int, depth: float, key: str) -> PasskeyPrompt:
    """The passkey prompt of exactly ``length`` tokens (module docstring).

    ``encode``: text -> token ids (no special tokens). Raises ValueError for a depth
    outside [0, 1] or a length too short to hold the instruction, key and question
    with at least one filler sentence."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head, needle, tail = encode(INSTRUCTION), encode(NEEDLE.format(key=key)), encode(QUESTION)
    sentence = encode(FILLER)
    room = length - len(head) - len(needle) - len(tail)
    if room < len(sentence):
        raise ValueError(f"length {length} is too short for a passkey prompt: it needs at least "
                         f"{length - room + len(sentence)} tokens")
    full, rest = divmod(room, len(sentence))
    before = round(depth * full)
    ids = head + sentence * before + needle + sentence * (full - before) + sentence[:rest] + tail
    return PasskeyPrompt(ids, key, len(head) + before * len(sentence), depth)


def retrieved(generated: str, key: str) -> bool:
    """True when the first run of digits in ``generated`` is ``key``."""
    m = re.search(r"\d+", generated)
    return m is not None and m.group(0) == key
