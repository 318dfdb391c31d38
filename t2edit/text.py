"""Answer normalisation and matching, shared by the strict metrics and the reward plugins (one definition)."""
from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse whitespace (SQuAD-style)."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def first_answer_span(completion: str) -> str:
    """The part of a free generation that is the answer: up to the first newline."""
    return completion.split("\n", 1)[0]


def answer_matches(completion: str, aliases: list[str]) -> bool:
    """Strict exact match: the generated answer equals an alias after normalisation, or starts with it at a
    word boundary (a model that says "Paris, the capital" has answered "Paris")."""
    said = normalize_answer(first_answer_span(completion))
    for alias in aliases:
        gold = normalize_answer(alias)
        if gold and (said == gold or said.startswith(gold + " ")):
            return True
    return False


# The one template for putting a new fact in a model's context (prompt-based editing, IKE, and the fact world's
# in-context training). EasyEdit's IKE/ICE query form.
def new_fact_context(prompt: str, target: str) -> str:
    return f"New Fact: {prompt} {target}\nPrompt: "


def copy_demo(prompt: str, target: str) -> str:
    """An IKE "copy" demonstration: the new-fact context, then the prompt answered with the new fact."""
    return new_fact_context(prompt, target) + prompt + " " + target + "\n\n"
