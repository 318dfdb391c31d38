"""Batches of token rows for a causal LM: left padding and the position ids that go with it.

Every row is padded on the left so that all prompts end at the same position (generation and the routers read each
prompt's last token there); position ids count from each row's first real token, so a padded row sees the
positions it would see alone.
"""
from __future__ import annotations

from typing import Sequence

import torch


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), [len(rows), width]: each row right-aligned after `pad_id`s."""
    width = max([width or 0] + [len(r) for r in rows])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (0 on the padding before it)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad token, else its EOS (Llama-family tokenizers have no pad token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
    return pad




def length_batches(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped by length (shortest first) into batches of at most `max_rows` rows and `max_tokens` padded
    tokens (a batch pads every row to its longest): a long input is batched with few others, not with all."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) == max_rows or lengths[i] * (len(current) + 1) > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def context_limit(model) -> int | None:
    """How many positions the model reads (its config's max_position_embeddings / n_positions), if it says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits_context(model, tokenizer, texts: Sequence[tuple[str, str]], extra_tokens: int = 0) -> None:
    """The rule for input longer than the model reads, the same everywhere: refused, never truncated (a cut prompt
    would be scored or answered as if whole). `texts`: (what it is, e.g. "record 7's prompt", text)."""
    limit = context_limit(model)
    if limit is None:
        return
    for what, text in texts:
        length = len(tokenizer(text)["input_ids"]) + extra_tokens
        if length > limit:
            raise ValueError(f"{what} needs {length} tokens ({text[:60]!r}...), more than the {limit} positions the "
                             f"model reads; shorten it or leave it out")


__all__ = ["check_fits_context", "context_limit", "length_batches", "left_pad", "pad_id_of", "position_ids"]
