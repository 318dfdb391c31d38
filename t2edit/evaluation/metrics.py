"""Per-prompt metrics on a causal LM: the one definition every editing method is scored with.

EasyEdit/KnowEdit definitions (matched token for token):
- `teacher_forced_accuracy`: the input is `context + prompt + ' ' + target`, tokenized with the tokenizer's
  default special tokens and left-padded in a batch; the prompt length is pad count + `len(tok(context + prompt))`;
  labels are the ids from there on; predictions are the argmax of the logits one position earlier; the score is
  the fraction of label positions predicted right.
- `answer_argmax_tokens`: those argmax ids themselves (locality compares them before and after the edit).
- `ngram_entropy` / `fluency_scores`: top-k=5 sampling, then the mean of (2/3 · 2-gram entropy, 4/3 · 3-gram
  entropy) in bits of the prompt + generated text. EasyEdit reports the mean over records ×100 (`FLUENCY_SCALE`).

One deliberate difference: we pass `position_ids` computed from the attention mask, so a left-padded prompt gets
the same positions as when it runs alone. EasyEdit passes none. With rotary positions (Llama, Qwen) that changes
nothing, since attention sees only relative offsets; with absolute positions (GPT-2) EasyEdit's padded scores
depend on what else is in the batch. On unpadded inputs the two agree exactly.

Strict definitions: `greedy_completions` (left-padded batch, greedy, stop at EOS) and `exact_match_scores`
(`answer_matches` against any alias, budget = longest alias in tokens + 3).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import re
import unicodedata
from collections import Counter
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from t2edit.batching import left_pad, position_ids
from t2edit.text import answer_matches, first_answer_span, normalize_answer

DEFAULT_BATCH_SIZE = 16
# KnowEdit's runner multiplies the mean n-gram entropy (bits) by 100, so fluent text scores in the hundreds.
FLUENCY_SCALE = 100.0
STRICT_EXTRA_TOKENS = 3  # greedy budget beyond the longest alias, so "Paris, France" can still be read as "Paris"


class EvaluationInputError(ValueError):
    """Inputs to a metric that cannot be scored (mismatched lengths, a tokenizer without pad/EOS, ...)."""


# ---------------------------------------------------------------------------------------------- plumbing

def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise EvaluationInputError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
    return pad


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids with the tokenizer's default special tokens (BOS for Llama), as EasyEdit tokenizes."""
    return list(tokenizer(text)["input_ids"])


def _forward_accepts(model: torch.nn.Module, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _batches(order: list[int], batch_size: int, desc: str, progress: bool) -> Iterator[list[int]]:
    if batch_size < 1:
        raise EvaluationInputError(f"batch_size must be at least 1, got {batch_size}")
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False):
        yield order[start:start + batch_size]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Score with dropout off (a LoRA editor may hand back a model in train mode), then put every module's
    mode back as it was."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _logits(model, input_ids, attention_mask, n_keep: int, prompt_end: list[int] | None = None) -> torch.Tensor:
    """Logits of the last `n_keep` positions of a left-padded batch (positions counted from each row's first
    real token). A model that routes on the prompt (two-pass SVF) is told where each row's prompt ends."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if prompt_end is not None and getattr(model, "routes_on_prompt", False):
        kwargs["prompt_end"] = torch.tensor(prompt_end, device=input_ids.device)
    if _forward_accepts(model, "position_ids"):
        kwargs["position_ids"] = position_ids(attention_mask)
    if _forward_accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = n_keep  # only the answer positions: no [batch, length, vocab] tensor
    out = model(**kwargs)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return logits[:, -n_keep:]


def _check_lengths(prompts, other, name):
    if len(prompts) != len(other):
        raise EvaluationInputError(f"got {len(prompts)} prompts but {len(other)} {name}; pass one per prompt")


# ---------------------------------------------------------------------------------------------- teacher forcing

def teacher_forced_predictions(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                               contexts: Sequence[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                               progress: bool = False) -> list[tuple[list[int], list[int]]]:
    """(argmax ids, gold ids) at the target positions of `context + prompt + ' ' + target`, EasyEdit's alignment."""
    contexts = list(contexts) if contexts is not None else [""] * len(prompts)
    _check_lengths(prompts, targets, "targets")
    _check_lengths(prompts, contexts, "contexts")
    items = [(_encode(tokenizer, c + p + " " + t), len(_encode(tokenizer, c + p)))
             for c, p, t in zip(contexts, prompts, targets)]
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))  # similar lengths share a batch
    results: list[tuple[list[int], list[int]]] = [([], [])] * len(items)
    pad_id, device = _pad_id(tokenizer), _device(model)
    with torch.inference_mode(), eval_mode(model):
        for batch in _batches(order, batch_size, "teacher-forced", progress):
            ids, mask = left_pad([items[i][0] for i in batch], pad_id, device)
            width = ids.shape[1]
            # EasyEdit's prompt length: pads in front + tokens of the prompt alone (never the first position).
            starts = [max(1, width - len(items[i][0]) + items[i][1]) for i in batch]
            n_keep = width - min(starts) + 1
            predicted = _logits(model, ids, mask, n_keep, [start - 1 for start in starts]).argmax(-1).cpu()
            offset = width - predicted.shape[1]
            gold = ids.cpu()
            for row, (i, start) in enumerate(zip(batch, starts)):
                labels = gold[row, start:].tolist()
                preds = predicted[row, start - 1 - offset: width - 1 - offset].tolist()
                results[i] = (preds, labels)
    return results


def teacher_forced_accuracy(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                            contexts: Sequence[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                            progress: bool = False) -> list[float]:
    """EasyEdit's Edit Succ. / Portability per prompt: fraction of target tokens the model predicts when fed the
    gold prefix. NaN where the target has no tokens of its own (EasyEdit skips those)."""
    pairs = teacher_forced_predictions(model, tokenizer, prompts, targets, contexts, batch_size, progress)
    return [token_accuracy(preds, gold) for preds, gold in pairs]


def token_accuracy(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """Fraction of gold positions predicted right; NaN if there are none."""
    return sum(p == g for p, g in zip(predicted, gold)) / len(gold) if gold else math.nan


def answer_argmax_tokens(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                         contexts: Sequence[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                         progress: bool = False) -> list[list[int]]:
    """The argmax ids at the answer positions (EasyEdit's locality output; the gold answer only fixes where)."""
    return [preds for preds, _ in
            teacher_forced_predictions(model, tokenizer, prompts, targets, contexts, batch_size, progress)]


def argmax_agreement(post: Sequence[int], pre: Sequence[int]) -> float:
    """EasyEdit locality of one probe: fraction of answer positions whose argmax token is unchanged. If a context
    changed how the answer tokenizes (rare), the unmatched extra positions count as changed. NaN if empty."""
    n = max(len(post), len(pre))
    return sum(a == b for a, b in zip(post, pre)) / n if n else math.nan


# ---------------------------------------------------------------------------------------------- generation

def _stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
    return sorted(ids)


def _generate(model, input_ids, attention_mask, pad_id: int, **settings) -> torch.Tensor:
    """New tokens only. Every setting that changes the output is given explicitly, so a checkpoint's own
    generation_config (a chat model's temperature 0.6, top_p 0.9, repetition penalty) cannot leak in."""
    from transformers import GenerationConfig

    if not hasattr(model, "generate"):
        raise EvaluationInputError(f"{type(model).__name__} has no .generate(); strict metrics and fluency need a "
                                   "Hugging Face generative model (EditedModel.model)")
    if settings.get("do_sample"):
        settings = {"typical_p": 1.0, "min_p": 0.0, **settings}
    config = GenerationConfig(num_beams=1, top_p=1.0, temperature=1.0, repetition_penalty=1.0,
                              no_repeat_ngram_size=0, pad_token_id=pad_id, **settings)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    return out[:, input_ids.shape[1]:].cpu()


def greedy_completions(model, tokenizer, inputs: Sequence[str], max_new_tokens: int | Sequence[int],
                       batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> list[str]:
    """Greedy continuation of each input (left-padded batches), cut at its own token budget and at the first EOS."""
    budgets = [max_new_tokens] * len(inputs) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    _check_lengths(inputs, budgets, "max_new_tokens")
    encoded = [_encode(tokenizer, text) for text in inputs]
    order = sorted(range(len(inputs)), key=lambda i: len(encoded[i]))
    stop = set(_stop_ids(model, tokenizer))
    pad_id, device = _pad_id(tokenizer), _device(model)
    completions = [""] * len(inputs)
    with torch.inference_mode(), eval_mode(model):
        for batch in _batches(order, batch_size, "greedy", progress):
            ids, mask = left_pad([encoded[i] for i in batch], pad_id, device)
            new = _generate(model, ids, mask, pad_id, do_sample=False, max_new_tokens=max(budgets[i] for i in batch),
                            eos_token_id=sorted(stop) or None)
            for row, i in enumerate(batch):
                tokens = new[row, :budgets[i]].tolist()
                end = next((k for k, t in enumerate(tokens) if t in stop), len(tokens))
                completions[i] = tokenizer.decode(tokens[:end], skip_special_tokens=True)
    return completions


def answer_token_budget(tokenizer, aliases: Sequence[str]) -> int:
    """Strict metrics' greedy budget: the longest alias in tokens + 3."""
    return max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in aliases) + STRICT_EXTRA_TOKENS


def exact_match_scores(model, tokenizer, prompts: Sequence[str], aliases: Sequence[Sequence[str]],
                       contexts: Sequence[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                       progress: bool = False) -> list[float]:
    """Strict score per prompt: 1.0 if the greedy answer matches any alias (`answer_matches`), else 0.0."""
    contexts = list(contexts) if contexts is not None else [""] * len(prompts)
    _check_lengths(prompts, aliases, "alias lists")
    _check_lengths(prompts, contexts, "contexts")
    budgets = [answer_token_budget(tokenizer, a) for a in aliases]
    completions = greedy_completions(model, tokenizer, [c + p for c, p in zip(contexts, prompts)], budgets,
                                     batch_size, progress)
    return [float(answer_matches(c, list(a))) for c, a in zip(completions, aliases)]


def same_answer(post: str, pre: str) -> float:
    """Strict locality of one probe: 1.0 if the greedy answer after the edit matches the greedy answer before it
    (`answer_matches` against the first line of the pre-edit generation; two empty answers also count as equal)."""
    reference = first_answer_span(pre)
    if not normalize_answer(reference):
        return float(not normalize_answer(first_answer_span(post)))
    return float(answer_matches(post, [reference]))


# ---------------------------------------------------------------------------------------------- fluency

# Word and punctuation tokens: a stand-in for nltk.word_tokenize (EasyEdit's; nltk is not a dependency here).
# It differs only on clitics ("don't" stays one token) and quote marks, which barely move a 100-token entropy.
_WORDS = re.compile(r"\w+(?:[-'’.]\w+)*|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """EasyEdit's n-gram entropy of one text, in bits: mean over n of weight_n · entropy of the n-gram
    distribution. Unscaled: multiply a mean over records by `FLUENCY_SCALE` for the number EasyEdit reports."""
    tokens = _WORDS.findall(text)
    weighted = []
    for n, weight in zip(ns, weights):
        counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return sum(weighted) / len(weighted)


def sample_texts(model, tokenizer, prompts: Sequence[str], contexts: Sequence[str] | None = None,
                 max_new_tokens: int = 100, top_k: int = 5, seed: int = 0,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> list[str]:
    """Prompt + a top-k sample of exactly `max_new_tokens` tokens (EasyEdit's sampler never stops at EOS), decoded
    without special tokens, NFKD-normalised, blank lines joined. The context is fed but not part of the text."""
    contexts = list(contexts) if contexts is not None else [""] * len(prompts)
    _check_lengths(prompts, contexts, "contexts")
    encoded = [_encode(tokenizer, c + p) for c, p in zip(contexts, prompts)]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad_id, device = _pad_id(tokenizer), _device(model)
    texts = [""] * len(prompts)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.inference_mode(), eval_mode(model):
        torch.manual_seed(seed)  # seeded without touching the caller's RNG stream
        for batch in _batches(order, batch_size, "sampling", progress):
            ids, mask = left_pad([encoded[i] for i in batch], pad_id, device)
            new = _generate(model, ids, mask, pad_id, do_sample=True, top_k=top_k, max_new_tokens=max_new_tokens,
                            min_new_tokens=0, eos_token_id=[])
            for row, i in enumerate(batch):
                text = tokenizer.decode(_encode(tokenizer, prompts[i]) + new[row].tolist(), skip_special_tokens=True)
                texts[i] = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    return texts


def fluency_scores(model, tokenizer, prompts: Sequence[str], contexts: Sequence[str] | None = None,
                   max_new_tokens: int = 100, top_k: int = 5, seed: int = 0,
                   batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> list[float]:
    """`ngram_entropy` (bits, unscaled) of a seeded top-k sample from each prompt."""
    texts = sample_texts(model, tokenizer, prompts, contexts, max_new_tokens, top_k, seed, batch_size, progress)
    return [ngram_entropy(text) for text in texts]
