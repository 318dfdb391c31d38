"""The one interface every editing method implements (SVF and every baseline), so one evaluation path
scores them all.

An editor takes the unedited model and a list of edits and returns an `EditedModel`: the module to run
(the same object edited in place, or a wrapper) plus an optional text context per prompt (IKE and prompt-based
editing change the input, not the weights). `restore()` puts the base model back exactly as it was, which is
what single-edit evaluation (edit, score, restore, next record) relies on.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch

from t2edit.data.records import EditRecord


@dataclass
class EditedModel:
    model: torch.nn.Module
    # Text put in front of a scored prompt ("" for weight editors). Receives the prompt being scored.
    context: Callable[[str], str] = field(default=lambda prompt: "")
    # Undo the edit; the base model must give its original logits afterwards.
    restore: Callable[[], None] = field(default=lambda: None)


class Editor(ABC):
    """Subclasses set `name` and implement `edit`. They may read the edit prompt and target only —
    never `record.scored_prompts()` (the evaluation's locality/portability/rephrase prompts)."""

    name: str = "editor"
    # True: edit() may be called again on the `EditedModel.model` of an earlier call, before that call's
    # restore(), and each call adds its edits to the ones already made (a lifelong stream). The caller then
    # restores last-first, and each restore() undoes only its own call's edits.
    sequential: bool = False

    @abstractmethod
    def edit(self, model: torch.nn.Module, tokenizer, records: list[EditRecord]) -> EditedModel: ...


class EditInputError(ValueError):
    """The records handed to an editor cannot be edited as given."""


def check_records(records: list[EditRecord], editor_name: str) -> None:
    """One clear message for the inputs a caller can get wrong, before any model work starts."""
    if not records:
        raise EditInputError(f"{editor_name}: edit() got no records; pass at least one EditRecord")
    for position, record in enumerate(records):
        where = f"record {record.index}" if record.index >= 0 else f"records[{position}]"
        if not record.prompt.strip():
            raise EditInputError(f"{editor_name}: {where} has an empty prompt; every edit needs a prompt")
        if not record.target_new or not record.target.strip():
            raise EditInputError(f"{editor_name}: {where} ({record.prompt!r}) has no target_new; "
                                 "every edit needs a new answer")


class NoEdit(Editor):
    """The unedited model: the reference row of every results table."""

    name = "none"

    def edit(self, model, tokenizer, records):
        return EditedModel(model=model)
