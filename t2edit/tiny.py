"""Tiny causal LMs and tokenizers built in-process (no download), for tests, examples and fact worlds.

The tokenizer is word-level over whitespace-separated words (Metaspace), so every word the model is taught is one
token and decoding gives back the exact text — what exact-match metrics on a toy world need.
"""
from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


def build_tiny_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word in `texts` (plus <pad> <unk> <s> </s>).
    Adds <s> in front of each sequence, as Llama's tokenizer does."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    # Newlines are tokens of their own (in-context templates use them); every other word is split on spaces.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.padding_side = "left"
    return fast


def build_tiny_model(tokenizer, arch: str = "llama", hidden_size: int = 64, num_layers: int = 2,
                     intermediate_size: int | None = None, num_heads: int = 4, seed: int = 0):
    """A randomly initialised causal LM of the given family ("llama", "qwen2" or "gpt2"), float32."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    intermediate_size = intermediate_size or 4 * hidden_size
    if arch == "llama":
        config = LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                             num_hidden_layers=num_layers, num_attention_heads=num_heads,
                             num_key_value_heads=num_heads, max_position_embeddings=512,
                             tie_word_embeddings=False, **common)
    elif arch == "qwen2":
        config = Qwen2Config(hidden_size=hidden_size, intermediate_size=intermediate_size,
                             num_hidden_layers=num_layers, num_attention_heads=num_heads,
                             num_key_value_heads=max(1, num_heads // 2), max_position_embeddings=512,
                             tie_word_embeddings=True, **common)
    elif arch == "gpt2":
        config = GPT2Config(n_embd=hidden_size, n_inner=intermediate_size, n_layer=num_layers, n_head=num_heads,
                            n_positions=512, **common)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose llama, qwen2 or gpt2")
    return AutoModelForCausalLM.from_config(config).float().eval()


def teach_facts(model, tokenizer, texts: list[str], steps: int = 300, lr: float = 3e-3,
                batch_size: int = 64, seed: int = 0, answer_starts: list[int] | None = None,
                progress: bool = False) -> list[float]:
    """Train `model` (all parameters) on full texts `[BOS] text [EOS]` with AdamW; returns the loss per step.

    If `answer_starts[i]` is given, the loss of text i covers only its tokens from that character offset on
    (e.g. the answer after a prompt), so the model learns to answer, not to recite prompts."""
    from tqdm.auto import trange

    rng = random.Random(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batches = _encode_for_lm(tokenizer, texts, answer_starts)
    losses = []
    for _ in trange(steps, desc="teaching facts", disable=not progress):
        idx = rng.sample(range(len(texts)), min(batch_size, len(texts)))
        input_ids, attention_mask, labels = _collate([batches[i] for i in idx], tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _encode_for_lm(tokenizer, texts, answer_starts):
    encoded = []
    for i, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        labels = list(ids)
        if answer_starts is not None and answer_starts[i] is not None:
            n_prompt = len(tokenizer(text[: answer_starts[i]].rstrip())["input_ids"])
            labels[:n_prompt] = [-100] * n_prompt
        encoded.append((ids, labels))
    return encoded


def _collate(items, pad_id):
    """Right-pad for training (positions then start at 0 for every sequence)."""
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, labels
