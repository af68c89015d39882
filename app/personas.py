"""Personas for simulated annotators: small plug-in functions that say which answers a kind of annotator prefers.

A persona is `score(prompt, answer) -> float` (higher = better) plus `thumbs(prompt, answer) -> "up"|"down"|None`
(None: no opinion). The simulator ranks an item's K answers by score (equal scores as a tie, or in random order with
--random-ties), then adds noise.
Add one by putting a `Persona` in `PERSONAS`, or pass `--persona package.module:attribute` to the simulator.

Standard library only: the simulator imports this module and must stay importable without the server's packages.
"""

from __future__ import annotations

import importlib
import itertools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Score = Callable[[str, str], float]
Thumbs = Callable[[str, str], str | None]


@dataclass(frozen=True)
class Persona:
    """What one kind of annotator prefers."""

    name: str
    score: Score  # higher = better; only the order of an item's answers matters, not the scale
    thumbs: Thumbs  # "up", "down" or None (no opinion): what this annotator would give one answer on its own
    description: str = ""
    prompts: Callable[[int, int], list[str]] | None = None  # (n, seed) -> prompts this persona has a view on


# -- concise: the fewer words the better ---------------------------------------------------------------------------
CONCISE_UP_WORDS = 25  # two or three sentences: a reader gets it at a glance
CONCISE_DOWN_WORDS = 50  # a long paragraph; also reachable under the app's 96-token cap (~70 words), so thumbs
# from this persona are both up and down on real SmolLM2 answers rather than all up


def word_count(text: str) -> int:
    return len(text.split())


def concise_score(prompt: str, answer: str) -> float:
    """Minus the word count, so the shortest answer ranks first. An empty answer is no answer: it ranks last."""
    words = word_count(answer)
    return float("-inf") if words == 0 else -float(words)


def concise_thumbs(prompt: str, answer: str) -> str | None:
    words = word_count(answer)
    if words == 0 or words > CONCISE_DOWN_WORDS:
        return "down"
    return "up" if words <= CONCISE_UP_WORDS else None


# -- structured: numbered or bulleted lists ------------------------------------------------------------------------
LIST_ITEM = re.compile(r"^\s*(?:\d{1,3}[.)]|[-*+\u2022])\s+\S", re.MULTILINE)  # "1. x", "2) x", "- x", "* x", "• x"


def list_items(text: str) -> int:
    return len(LIST_ITEM.findall(text))


def structured_score(prompt: str, answer: str) -> float:
    """The number of list items, capped at 10 so a list of 40 one-word bullets does not win by length alone."""
    return float(min(list_items(answer), 10))


def structured_thumbs(prompt: str, answer: str) -> str | None:
    return "up" if list_items(answer) >= 2 else "down"


# -- arithmetic: "What is A + B?" answered with the right number ---------------------------------------------------
ARITHMETIC_PROMPT = re.compile(r"what is\s+(-?\d+)\s*([+\-*x\u00d7])\s*(-?\d+)\s*\??", re.IGNORECASE)
NUMBER = re.compile(r"(?<![\d.])-?\d+(?:,\d{3})*(?:\.\d+)?(?![\d])")  # 42, -7, 1,024, 3.5; not the 17 in 117


def arithmetic_answer(prompt: str) -> int | None:
    """The right result of a "What is A + B?" prompt (also -, *, x, ×), None for any other prompt."""
    match = ARITHMETIC_PROMPT.search(prompt)
    if match is None:
        return None
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return {"+": a + b, "-": a - b}.get(op, a * b)


def numbers_in(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in NUMBER.findall(text)]


def arithmetic_score(prompt: str, answer: str) -> float:
    """1 if the answer contains the right number, plus 0.5 if that is the first number it states (no wrong
    guess before it); 0 otherwise, and 0 for every answer to a prompt that is not arithmetic (all tie)."""
    right = arithmetic_answer(prompt)
    if right is None:
        return 0.0
    numbers = numbers_in(answer)
    if right not in numbers:
        return 0.0
    return 1.5 if numbers[0] == right else 1.0


def arithmetic_thumbs(prompt: str, answer: str) -> str | None:
    if arithmetic_answer(prompt) is None:
        return None
    return "up" if arithmetic_score(prompt, answer) > 0 else "down"


def arithmetic_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct prompts "What is A + B?" with 2-digit A and B (reproducible from `seed`)."""
    if not 0 <= n <= 90 * 90:
        raise ValueError(f"n must be in 0..8100 (distinct 2-digit sums), got {n}")
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    prompts = []
    while len(prompts) < n:
        pair = (rng.randint(10, 99), rng.randint(10, 99))
        if pair not in seen:
            seen.add(pair)
            prompts.append(f"What is {pair[0]} + {pair[1]}?")
    return prompts


PERSONAS: dict[str, Persona] = {
    "concise": Persona("concise", concise_score, concise_thumbs, "prefers shorter answers"),
    "structured": Persona("structured", structured_score, structured_thumbs, "prefers numbered or bulleted lists"),
    "arithmetic": Persona("arithmetic", arithmetic_score, arithmetic_thumbs,
                          'prefers answers to "What is A + B?" that contain the right number', arithmetic_prompts),
}


def get_persona(name: str) -> Persona:
    """A registered persona by name, or a plug-in named `package.module:attribute` (a Persona, or a score
    function, whose thumbs are then None)."""
    if name in PERSONAS:
        return PERSONAS[name]
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            found = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load persona {name!r}: {exc}") from None
        if isinstance(found, Persona):
            return found
        if callable(found):
            return Persona(attribute, found, lambda prompt, answer: None, f"plug-in {name}")
        raise ValueError(f"persona {name!r} is neither a Persona nor a score function")
    raise ValueError(f"unknown persona {name!r}; known: {', '.join(PERSONAS)} (or package.module:attribute)")


def rank(persona: Persona, prompt: str, answers: Sequence[tuple[int, str]], rng: random.Random,
         noise: float = 0.0, ties: bool = False) -> list[int | list[int]]:
    """Answer ids best first, sorted by the persona's score. `ties=False`: equal scores in random order (a person who
    must order answers they find alike); `ties=True`: answers with equal scores as one list, a tie (a person who
    says so: no pair between them; all K alike is "no preference"). Then one pass over the adjacent places, top to
    bottom, swapping each with probability `noise` (noise=1 moves the best to last). `answers` is (answer_id, text)
    pairs."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    shuffled = list(answers)
    rng.shuffle(shuffled)  # sort is stable: equal scores keep this random order
    scored = sorted(((persona.score(prompt, text), answer_id) for answer_id, text in shuffled),
                    key=lambda pair: pair[0], reverse=True)
    groups = ([[answer_id for _, answer_id in tie] for _, tie in itertools.groupby(scored, key=lambda pair: pair[0])]
              if ties else [[answer_id] for _, answer_id in scored])
    for i in range(len(groups) - 1):
        if rng.random() < noise:
            groups[i], groups[i + 1] = groups[i + 1], groups[i]
    return [group[0] if len(group) == 1 else group for group in groups]
