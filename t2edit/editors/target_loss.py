"""What LoRA and FT-M share: input checks, the masked cross-entropy on an edit's target tokens, and one training
loop that leaves the base model's flags, mode, gradients and the caller's RNG as it found them.

The loss is EasyEdit's FT-M objective ("target_new"): the text is `prompt + ' ' + target`, the prompt length is the
token count of `tokenizer(prompt)` (with its special tokens, e.g. BOS), only the positions after it are scored, and
each edit's mean token loss counts once (so a long target does not outweigh a short one in batch mode).

Cost: rows are left-padded with explicit position ids (the evaluation's layout, so every row's positions start at
0), which puts every target at the end of its row; the model is then asked for the logits of the last few
positions only (`logits_to_keep`), never a [rows, length, vocabulary] tensor. On a 49k vocabulary that is most of
the output layer's work.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from tqdm.auto import trange

from t2edit.data.records import EditRecord
from t2edit.batching import left_pad, position_ids
from t2edit.editors.base import EditInputError
from t2edit.precision import autocast_context


def encode_targets(tokenizer, prompts: list[str], targets: list[str],
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded `prompt + ' ' + target` batch. `labels` is [rows, longest target]: each row's target ids
    right-aligned (they are the last tokens of the row), -100 in front of shorter targets."""
    rows = []
    for prompt, target in zip(prompts, targets):
        ids = list(tokenizer(f"{prompt} {target}")["input_ids"])
        n_prompt = len(tokenizer(prompt)["input_ids"])
        if n_prompt >= len(ids):
            raise EditInputError(f"target {target!r} of prompt {prompt!r} adds no tokens after the prompt")
        rows.append((ids, len(ids) - n_prompt))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = left_pad([ids for ids, _ in rows], pad_id, device)
    labels = left_pad([ids[len(ids) - n:] for ids, n in rows], -100)[0]  # the targets, right-aligned
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels.to(device)}


def _forward_accepts(model: torch.nn.Module, name: str) -> bool:
    parameters = inspect.signature(model.forward).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def masked_target_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over edits of each edit's mean cross-entropy on its target tokens (logits at t predict t+1)."""
    labels, mask = batch["labels"], batch["attention_mask"]
    n_keep = labels.shape[1] + 1  # the last target token predicts nothing; the position before the first does
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": mask}
    if _forward_accepts(model, "position_ids"):
        kwargs["position_ids"] = position_ids(mask)
    if _forward_accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = n_keep
    logits = model(**kwargs).logits[:, -n_keep:-1].float()
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                  ignore_index=-100, reduction="none").view_as(labels)
    scored = (labels != -100).float()
    return ((per_token * scored).sum(1) / scored.sum(1)).mean()


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


PRECISIONS = ("auto", "bf16", "fp32")  # autocast_context's choices; checked here first for an EditInputError


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise EditInputError(f"precision={precision!r}; choose one of: {', '.join(PRECISIONS)}")


def train_on_targets(model: torch.nn.Module, parameters: list[torch.nn.Parameter],
                     batches: list[dict[str, torch.Tensor]], steps: int, lr: float, weight_decay: float = 0.0,
                     progress: bool = False, desc: str = "editing", stop_loss: float | None = None,
                     precision: str = "fp32", after_step=None) -> list[float]:
    """Adam on `parameters` against the masked target loss; one step visits every batch. Only `parameters`
    receive gradients (every other flag is switched off and then put back); the model's train/eval mode is
    restored at the end and the trained parameters' `.grad` dropped. Returns the mean loss per step.

    `stop_loss` (EasyEdit's FT rule, 1e-2 there): a batch whose loss is already below it takes no step, and
    training ends after the first step whose mean loss is below it. `precision` "bf16" runs the forward and
    backward under bfloat16 autocast (the trained parameters stay float32); "auto" does so where it is fast.
    `after_step()` runs after every optimizer step (FT-M's norm constraint)."""

    flags = requires_grad_snapshot(model)
    was_training = model.training
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    device = model_device(model)
    check_precision(precision)
    losses = []
    model.train()  # LoRA dropout acts only in training mode
    try:
        with torch.enable_grad():  # an edit may be called from inside an evaluation's no_grad block
            for _ in trange(steps, desc=desc, disable=not progress, leave=False):
                step_loss = 0.0
                for batch in batches:
                    with autocast_context(device, precision):  # the SVF trainer's rule for when bf16 pays
                        loss = masked_target_loss(model, batch)
                    step_loss += loss.item()
                    if stop_loss is not None and loss.item() < stop_loss:
                        continue
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if after_step is not None:
                        after_step()
                losses.append(step_loss / len(batches))
                if stop_loss is not None and losses[-1] < stop_loss:
                    break
    finally:
        model.train(was_training)
        for parameter in parameters:
            parameter.grad = None
        restore_requires_grad(flags)
    return losses
