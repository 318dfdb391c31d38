"""Pieces of the REINFORCE objective: advantages, sequence log-probabilities with the KL anchor, the LR schedule."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from t2edit.batching import left_pad, position_ids
from t2edit.precision import autocast_context, frozen_weights_cast
from t2edit.svf import SVFModel, model_bypassed
from t2edit.training.config import TrainConfig


def make_scheduler(optimizer, config: TrainConfig):
    """The learning-rate schedule, by its transformers name. A decaying rate settles z once most edits are learned
    (at a constant rate, greedy edit success keeps swinging from step to step instead of settling)."""
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


@dataclass
class ScoredRows:
    index: list[int]  # which rows of the step are scored
    advantage: torch.Tensor  # the summed advantage of the identical rollouts each scored row stands for


def score_rows(completions: list[list[int]], advantages: torch.Tensor, groups: torch.Tensor, kinds: list[str],
               with_kl: bool) -> ScoredRows:
    """The rows worth a forward and backward: identical completions in one group become one row with their
    advantages summed (same gradient), and rows whose advantage is 0 are dropped, unless they carry the KL anchor
    (neighbour rows). Once an edit is learned its samples equal the guide, every advantage is 0, and its prompt
    costs nothing: the step shrinks to the edits still being learned."""
    merged: dict[tuple, int] = {}
    index, total = [], []
    for row, (ids, advantage, group) in enumerate(zip(completions, advantages.tolist(), groups.tolist())):
        key = (group, tuple(ids))
        if key in merged:
            total[merged[key]] += advantage
            continue
        merged[key] = len(index)
        index.append(row)
        total.append(advantage)
    keep = [i for i, (row, a) in enumerate(zip(index, total))
            if abs(a) > 1e-12 or (with_kl and kinds[row] == "neighbour")]
    return ScoredRows([index[i] for i in keep], torch.tensor([total[i] for i in keep], dtype=torch.float32))


def _decoder_and_head(model):
    """The model's decoder stack and output head, when its logits are plainly head(last hidden state); None when
    the architecture post-processes logits (soft-capping, scaling), which then go through the full forward."""
    base = model.base_model if isinstance(model, SVFModel) else model
    config = base.config
    if getattr(model, "sharded", False):  # FSDP gathers the root's weights (embeddings, head) in its own forward
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def completion_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
    """Logits only at `positions` ([n, 2] of (row, position)): the decoder runs on every token, but the output
    head and the softmax see just the scored ones — on a 49k vocabulary that saves most of a step's memory and a
    good share of its FLOPs."""
    parts = _decoder_and_head(model)
    rows, cols = positions[:, 0], positions[:, 1]
    if parts is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[rows, cols]
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return head(hidden[rows, cols])


SHAPE_BUCKET = 8  # widths are padded to a multiple of this: few distinct shapes keep oneDNN's kernel cache small


def _bucket(n: int) -> int:
    return max(SHAPE_BUCKET, -(-n // SHAPE_BUCKET) * SHAPE_BUCKET)


def _right_padded(rows: list[list[int]], pad_id: int, device):
    width = _bucket(max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def _plain_logits(model, prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int):
    """One forward over prompt + completion per row (right-padded); logits at the completion's positions."""
    device = model.device
    input_ids, attention = _right_padded([p + list(c) for p, c in zip(prompt_ids, completions)], pad_id, device)
    scored = [(i, pos) for i, (p, c) in enumerate(zip(prompt_ids, completions))
              for pos in range(len(p) - 1, len(p) + len(c) - 1)]
    positions = torch.tensor(scored, dtype=torch.long, device=device).view(-1, 2)
    logits = completion_logits(model, input_ids, attention, positions)
    return logits, input_ids[positions[:, 0], positions[:, 1] + 1], positions[:, 0]


def _shared_prefix_logits(model, prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int):
    """The same logits with each distinct prompt run once: its keys and values are computed (with gradient) and
    handed to every member of its group, whose completions then run alone. A group of G+1 rollouts of a 15-token
    prompt with 5-token answers costs 15 + 5(G+1) tokens instead of 20(G+1)."""
    decoder, head = _decoder_and_head(model)
    device = model.device
    unique = list(dict.fromkeys(tuple(p) for p in prompt_ids))
    where = {p: i for i, p in enumerate(unique)}
    row_prompt = torch.tensor([where[tuple(p)] for p in prompt_ids], device=device)
    width = _bucket(max(len(p) for p in unique))  # left padding: every prompt ends at the same position
    prefix, prefix_mask = left_pad(unique, pad_id, device, width=width)
    out = decoder(input_ids=prefix, attention_mask=prefix_mask, position_ids=position_ids(prefix_mask),
                  use_cache=True)
    cache, prompt_end = out.past_key_values, out.last_hidden_state[:, -1]
    # transformers renamed `past_key_values` to `cache` (5.2x); older 5.x only know the first.
    cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    cache.reorder_cache(row_prompt)  # one copy of the prompt's keys/values per member (index_select: differentiable)
    tail, tail_mask = _right_padded([list(c) for c in completions], pad_id, device)
    lengths = torch.tensor([len(p) for p in prompt_ids], device=device)
    hidden = decoder(input_ids=tail, attention_mask=torch.cat([prefix_mask[row_prompt], tail_mask], -1),
                     position_ids=lengths[:, None] + torch.arange(tail.shape[1], device=device),
                     use_cache=True, **{cache_arg: cache}).last_hidden_state
    states, targets, rows = [], [], []
    for r, ids in enumerate(completions):  # token j of row r is predicted by the state before it
        for j in range(len(ids)):
            states.append(prompt_end[row_prompt[r]] if j == 0 else hidden[r, j - 1])
            rows.append(r)
        targets += list(ids)
    if not states:
        return (torch.zeros(0, head.out_features, device=device), torch.zeros(0, dtype=torch.long, device=device),
                torch.zeros(0, dtype=torch.long, device=device))
    return (head(torch.stack(states)), torch.tensor(targets, dtype=torch.long, device=device),
            torch.tensor(rows, dtype=torch.long, device=device))


def scored_logits(model, tokenizer, prompts: list[str], completions: list[list[int]]):
    """(logits, target ids, row of each) at every completion token, row by row in order. Rows that share a prompt
    share its forward pass where the architecture allows it."""
    prompt_ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    # Sharing costs a second forward (prefix, then completions) and a cache copy per row: it pays when prompts
    # repeat on average (groups of rollouts), not when nearly every prompt is distinct (a guided step once an
    # edit's sample is right but not the guide), where the plain forward + backward is much faster.
    shared = len(prompts) >= 2 * len(set(prompts)) and _decoder_and_head(model) is not None
    return (_shared_prefix_logits if shared else _plain_logits)(model, prompt_ids, completions,
                                                                tokenizer.pad_token_id)


def forced_answer_hits(model, tokenizer, prompts: list[str], answers: list[list[int]]) -> list[bool]:
    """Per row: is every token of the answer the model's argmax when the answer is fed after its prompt?"""
    logits, targets, row_of = scored_logits(model, tokenizer, prompts, answers)
    wrong = torch.zeros(len(prompts), device=targets.device).index_add(
        0, row_of, (logits.argmax(-1) != targets).float())
    return [not bool(w) for w in wrong]


def reference_logprobs(model: SVFModel, tokenizer, prompts: list[str], completions: list[list[int]],
                       precision: str = "fp32", cache=None) -> torch.Tensor:
    """log π_unedited over the vocabulary at every completion token, row by row in order (the KL anchor's
    reference). `cache` (a `UneditedModelCache`): rows it holds are not recomputed, and new ones are kept there."""
    keys = [(precision, p, tuple(c)) for p, c in zip(prompts, completions)]
    found = [cache.logprobs(k) if cache is not None else None for k in keys]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        with torch.no_grad(), model_bypassed(model), autocast_context(model.device, precision), \
                frozen_weights_cast(model):
            logits, _, _ = scored_logits(model, tokenizer, [prompts[i] for i in missing],
                                         [completions[i] for i in missing])
        fresh = torch.log_softmax(logits.float(), -1).split([len(completions[i]) for i in missing])
        for i, rows in zip(missing, fresh):
            found[i] = rows.clone() if cache is not None else rows  # a view would keep the whole batch alive
            if cache is not None:
                cache.keep_logprobs(keys[i], found[i])
    return torch.cat(found) if found else torch.zeros(0, device=model.device)


def sequence_logprobs(model: SVFModel, tokenizer, prompts: list[str], completions: list[list[int]],
                      kl_rows: torch.Tensor | None = None, precision: str = "fp32", references=None):
    """Σ log π(completion | prompt) per row (differentiable in z) and, for the rows marked in `kl_rows`, the exact
    KL(π_unedited ‖ π) over the vocabulary, summed over the completion's positions (0 elsewhere). `references`: a
    `UneditedModelCache` that keeps the unedited side of the KL across steps and experts."""
    device = model.device
    if not prompts:  # every rollout of the step had advantage 0: nothing to score
        empty = torch.zeros(0, device=device)
        return empty, empty
    with autocast_context(device, precision), frozen_weights_cast(model):
        logits, targets, row_of = scored_logits(model, tokenizer, prompts, completions)
    policy = torch.log_softmax(logits.float(), -1)
    token_logps = policy.gather(-1, targets[:, None]).squeeze(-1)
    per_row = torch.zeros(len(prompts), device=device).index_add(0, row_of, token_logps)
    if kl_rows is None or not bool(kl_rows.any()):
        return per_row, torch.zeros_like(per_row)
    kl_rows = kl_rows.to(device)
    picked = kl_rows.nonzero().squeeze(-1).tolist()
    reference = reference_logprobs(model, tokenizer, [prompts[i] for i in picked], [completions[i] for i in picked],
                                   precision, references).to(device)
    keep = kl_rows[row_of]  # positions are ordered row by row in both passes, so the KL rows line up
    kl_tokens = (reference.exp() * (reference - policy[keep])).sum(-1)
    kl = torch.zeros_like(per_row).index_add(0, row_of[keep], kl_tokens)
    return per_row, kl
