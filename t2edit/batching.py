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


__all__ = ["left_pad", "pad_id_of", "position_ids"]
