"""Pieces of the REINFORCE objective: advantages, sequence log-probabilities with the KL anchor, the LR schedule."""
from __future__ import annotations

import torch

from t2edit.svf import SVFModel, model_bypassed
from t2edit.training.config import TrainConfig


def make_scheduler(optimizer, config: TrainConfig):
    """The learning-rate schedule, by its transformers name. A decaying rate settles z once most edits are learned
    (at a constant lr 0.2, greedy edit success on a KnowEdit world swung between 0.64 and 0.88 from step 200 on)."""
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    names = [kind.value for kind in SchedulerType]
    if config.lr_scheduler_type not in names:
        raise ValueError(f"lr_scheduler_type={config.lr_scheduler_type!r} is not a transformers scheduler; choose "
                         f"one of {', '.join(names)}")
    return get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=config.steps)


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, baseline: str) -> torch.Tensor:
    """reward − baseline within each group: the group mean (GRPO without std scaling), the mean of the other
    members (RLOO), or no baseline (Transformer²'s default)."""
    if baseline == "none":
        return rewards
    n_groups = int(groups.max()) + 1
    sums = torch.zeros(n_groups).index_add_(0, groups, rewards)
    counts = torch.zeros(n_groups).index_add_(0, groups, torch.ones_like(rewards))
    if baseline == "group_mean":
        return rewards - (sums / counts)[groups]
    if baseline == "leave_one_out":
        others = (counts[groups] - 1).clamp(min=1)
        return rewards - (sums[groups] - rewards) / others
    raise ValueError(f"baseline={baseline!r} is not one of group_mean, leave_one_out, none")


def sequence_logprobs(model: SVFModel, tokenizer, prompts: list[str], completions: list[list[int]],
                      kl_rows: torch.Tensor | None = None):
    """Σ log π(completion | prompt) per row (differentiable in z) and, for the rows marked in `kl_rows`, the
    exact KL(π_unedited ‖ π) over the vocabulary, summed over the completion's positions (0 elsewhere)."""
    device = model.device
    rows, starts = [], []
    for prompt, ids in zip(prompts, completions):
        prompt_ids = tokenizer(prompt)["input_ids"]
        rows.append(prompt_ids + list(ids))
        starts.append(len(prompt_ids))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts)):  # right padding keeps positions starting at 0
        input_ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
        target_mask[i, start:len(row)] = True
    input_ids, attention, target_mask = input_ids.to(device), attention.to(device), target_mask.to(device)

    mask = target_mask[:, 1:].float()
    policy = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float(), -1)
    per_row = (policy.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * mask).sum(-1)
    if kl_rows is None or not bool(kl_rows.any()):
        return per_row, torch.zeros_like(per_row)
    kl_rows = kl_rows.to(device)
    with torch.no_grad(), model_bypassed(model):
        reference = torch.log_softmax(model(input_ids=input_ids[kl_rows], attention_mask=attention[kl_rows])
                                      .logits[:, :-1].float(), -1)
    kl_tokens = (reference.exp() * (reference - policy[kl_rows])).sum(-1)
    kl = torch.zeros_like(per_row)
    kl[kl_rows] = (kl_tokens * mask[kl_rows]).sum(-1)
    return per_row, kl
