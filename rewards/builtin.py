"""Built-in rewards. Each reads two dataset columns, one entry per completion:

- `kind`: "edit" for edit prompts, "neighbour" for locality-keeping prompts (every row counts as "edit" when
  the column is absent);
- `answers`: the aliases that count as right: the new target and its aliases on edit rows, the unedited
  model's own greedy answer on neighbour rows.

Matching is t2edit.text's one definition (normalised exact match on the first line of the completion).
"""
from __future__ import annotations

from collections.abc import Callable

from rewards.registry import register_reward
from t2edit.text import answer_matches, first_answer_span, normalize_answer

EDIT, NEIGHBOUR = "edit", "neighbour"


def _completion_text(completion: str | list[dict]) -> str:
    """TRL passes chat-format completions as a list of messages; the answer is the last message's content."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _score_rows(
    wanted_kind: str,
    score: Callable[[str, list[str]], float],
    completions: list,
    answers: list | None,
    kind: list[str] | None,
) -> list[float | None]:
    """`score(completion, aliases)` on rows of `wanted_kind`, None on the others."""
    if answers is None:
        raise ValueError("needs a dataset column 'answers' (a list of accepted answers per row)")
    kinds = kind if kind is not None else [EDIT] * len(completions)
    if not len(completions) == len(answers) == len(kinds):
        raise ValueError(
            f"got {len(completions)} completions but {len(answers)} 'answers' and {len(kinds)} 'kind' entries"
        )
    return [
        # A bare string is one alias, not a list of one-character aliases.
        score(_completion_text(completion), [aliases] if isinstance(aliases, str) else list(aliases))
        if row_kind == wanted_kind
        else None
        for completion, aliases, row_kind in zip(completions, answers, kinds)
    ]


def _exact(completion: str, aliases: list[str]) -> float:
    return float(answer_matches(completion, aliases))


def _prefix_fraction(completion: str, aliases: list[str]) -> float:
    """Best over aliases of: leading target words the completion reproduces, in order, over the target's length."""
    said = normalize_answer(first_answer_span(completion)).split()
    best = 0.0
    for alias in aliases:
        gold = normalize_answer(alias).split()
        if not gold:
            continue
        matched = 0
        while matched < min(len(said), len(gold)) and said[matched] == gold[matched]:
            matched += 1
        best = max(best, matched / len(gold))
    return best


@register_reward("exact_match")
def exact_match(prompts: list[str], completions: list, answers=None, kind=None, **_) -> list[float | None]:
    """1.0 when an edit row's completion says the new target (or an alias), else 0.0; None on neighbour rows."""
    return _score_rows(EDIT, _exact, completions, answers, kind)


@register_reward("locality")
def locality(prompts: list[str], completions: list, answers=None, kind=None, **_) -> list[float | None]:
    """1.0 when a neighbour row's completion still gives the unedited model's answer, else 0.0; None on edit
    rows."""
    return _score_rows(NEIGHBOUR, _exact, completions, answers, kind)


@register_reward("partial_credit")
def partial_credit(prompts: list[str], completions: list, answers=None, kind=None, **_) -> list[float | None]:
    """Dense edit reward in [0, 1]: the fraction of the target's words produced as a prefix of the completion
    (1.0 exactly when `exact_match` is 1.0). None on neighbour rows."""
    return _score_rows(EDIT, _prefix_fraction, completions, answers, kind)
