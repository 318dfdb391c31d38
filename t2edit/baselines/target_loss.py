"""What LoRA and FT-M share: input checks, the masked cross-entropy on an edit's target tokens, and one training
loop that leaves the base model's flags, mode, gradients and the caller's RNG as it found them.

The loss matches EasyEdit's: the text is `prompt + ' ' + target`, the prompt length is the token count of
`tokenizer(prompt)` (with its special tokens, e.g. BOS), and only the positions after it are scored.
"""
from __future__ import annotations

import contextlib

import torch
from tqdm.auto import trange

from t2edit.data.records import EditRecord


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


def encode_targets(tokenizer, prompts: list[str], targets: list[str],
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded `prompt + ' ' + target` batch with labels on the target tokens only (-100 elsewhere).

    Right padding keeps every row's positions starting at 0, as in an unpadded single-prompt evaluation."""
    rows = []
    for prompt, target in zip(prompts, targets):
        ids = tokenizer(f"{prompt} {target}")["input_ids"]
        n_prompt = len(tokenizer(prompt)["input_ids"])
        if n_prompt >= len(ids):
            raise EditInputError(f"target {target!r} of prompt {prompt!r} adds no tokens after the prompt")
        rows.append((ids, n_prompt))
    width = max(len(ids) for ids, _ in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "labels": labels.to(device)}


def masked_target_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the target tokens of the batch (logits at t predict token t+1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    predicted = logits[:, :-1].float()
    gold = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(predicted.reshape(-1, predicted.size(-1)), gold.reshape(-1),
                                             ignore_index=-100)


def target_batches(tokenizer, records: list[EditRecord], batch_size: int,
                   device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The edits in chunks of `batch_size`, encoded once (one optimisation step visits every chunk)."""
    if batch_size < 1:
        raise EditInputError(f"batch_size must be at least 1, got {batch_size}")
    chunks = [records[start: start + batch_size] for start in range(0, len(records), batch_size)]
    return [encode_targets(tokenizer, [r.prompt for r in chunk], [r.target for r in chunk], device)
            for chunk in chunks]


def requires_grad_snapshot(model: torch.nn.Module) -> dict[torch.nn.Parameter, bool]:
    return {parameter: parameter.requires_grad for parameter in model.parameters()}


def restore_requires_grad(snapshot: dict[torch.nn.Parameter, bool]) -> None:
    for parameter, flag in snapshot.items():
        parameter.requires_grad_(flag)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Seed inside a forked RNG, so that adapter init and dropout repeat exactly from one edit to the next and an
    edit never moves the caller's random state."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def train_on_targets(model: torch.nn.Module, parameters: list[torch.nn.Parameter],
                     batches: list[dict[str, torch.Tensor]], steps: int, lr: float, weight_decay: float = 0.0,
                     progress: bool = False, desc: str = "editing") -> list[float]:
    """Adam on `parameters` against the masked target loss; one step visits every batch. Only `parameters`
    receive gradients (every other flag is switched off and then put back); the model's train/eval mode is
    restored at the end and the trained parameters' `.grad` dropped. Returns the mean loss per step."""
    flags = requires_grad_snapshot(model)
    was_training = model.training
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    losses = []
    model.train()  # LoRA dropout acts only in training mode
    try:
        with torch.enable_grad():  # an edit may be called from inside an evaluation's no_grad block
            for _ in trange(steps, desc=desc, disable=not progress, leave=False):
                step_loss = 0.0
                for batch in batches:
                    loss = masked_target_loss(model, batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step_loss += loss.item()
                losses.append(step_loss / len(batches))
    finally:
        model.train(was_training)
        for parameter in parameters:
            parameter.grad = None
        restore_requires_grad(flags)
    return losses
