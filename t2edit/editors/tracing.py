"""Causal tracing (Meng et al., 2022, ROME §2): which layers' MLPs, at the subject's last token, carry a fact.

For a prompt about a subject, the model's own answer has probability p_clean. Gaussian noise (noise_factor × the
standard deviation of the subjects' token embeddings) added to the subject's token embeddings drops it to
p_corrupt. Re-running the corrupted prompt with the MLP outputs of a window of layers around layer l put back to
their clean values, at the subject's last token only, recovers p_restored(l). The indirect effect of layer l is
p_restored(l) − p_corrupt; ROME edits the layer where its average over many facts peaks.

Only prompts whose answer depends on the subject say anything about where the subject's facts are: a prompt whose
answer survives the corruption (a generic continuation such as " a") has nothing to restore. The layer is therefore
chosen on the prompts the corruption hurts (p_corrupt < `dependent_ratio` × p_clean), when there are at least three
of them, else on all; both averages are reported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from t2edit.data.records import EditRecord
from t2edit.editors.ft import mlp_output_layers
from t2edit.editors.keys import subject_token_span
from t2edit.editors.target_loss import model_device


@dataclass
class TraceResult:
    layers: list[int]
    mean_effect: list[float]  # per layer: mean over all traced prompts of p_restored − p_corrupt
    dependent_effect: list[float]  # the same over the subject-dependent prompts (empty when there are none)
    per_prompt: list[list[float]] = field(default_factory=list)
    p_clean: list[float] = field(default_factory=list)  # per traced prompt
    p_corrupt: list[float] = field(default_factory=list)
    dependent: list[int] = field(default_factory=list)  # positions (in per_prompt) of the subject-dependent prompts
    best_layer: int = -1
    window: int = 1
    noise_std: float = 0.0
    n_traced: int = 0
    skipped: list[int] = field(default_factory=list)  # record indices whose subject is not in the prompt
    record_indices: list[int] = field(default_factory=list)  # of the traced prompts
    seconds: float = 0.0


def subject_embedding_std(model: torch.nn.Module, tokenizer, subjects: list[str]) -> float:
    """Standard deviation of the entries of the subjects' token embeddings (ROME's noise unit)."""
    ids = sorted({i for s in subjects for i in tokenizer(s, add_special_tokens=False)["input_ids"]})
    if not ids:
        raise ValueError("no subject tokens to measure the embedding scale on; give records with subjects")
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight[torch.tensor(ids, device=model_device(model))]
    return embeddings.float().std().item()


def _window(center: int, n_layers: int, window: int) -> list[int]:
    low = max(0, center - window // 2)
    return list(range(low, min(n_layers, low + window)))


@torch.no_grad()
def trace_prompt(model: torch.nn.Module, tokenizer, prompt: str, span: tuple[int, int], noise_std: float,
                 window: int, n_noise: int, generator: torch.Generator) -> tuple[float, float, list[float]]:
    """(p_clean, p_corrupt, p_restored per layer) for the model's own greedy answer to `prompt`; the subject
    occupies tokens span[0]..span[1]. All layers' restorations run as rows of one batch per noise sample."""
    device = model_device(model)
    mlp_outputs = mlp_output_layers(model)
    n_layers = len(mlp_outputs)
    modules = [model.get_submodule(mlp_outputs[i]) for i in range(n_layers)]
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
    first, last = span
    clean_values: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(module, args, output):
            clean_values[layer] = output[0, last].detach().clone()
        return hook

    handles = [module.register_forward_hook(keep(i)) for i, module in enumerate(modules)]
    try:
        logits = model(input_ids=ids).logits[0, -1].float()
    finally:
        for handle in handles:
            handle.remove()
    answer = int(logits.argmax())
    p_clean = torch.softmax(logits, -1)[answer].item()

    rows = n_layers + 1  # row 0: corrupted only; row 1 + l: corrupted, window around l restored
    batch = ids.expand(rows, -1)
    restored_rows = {layer: [1 + c for c in range(n_layers) if layer in _window(c, n_layers, window)]
                     for layer in range(n_layers)}
    embedding = model.get_input_embeddings()
    noise_holder: dict[str, torch.Tensor] = {}

    def corrupt(module, args, output):
        output = output.clone()
        output[:, first: last + 1] += noise_holder["noise"].to(output.dtype)
        return output

    def restore(layer):
        def hook(module, args, output):
            where = restored_rows[layer]
            if not where:
                return output
            output = output.clone()
            output[where, last] = clean_values[layer].to(output.dtype)
            return output
        return hook

    handles = [embedding.register_forward_hook(corrupt)]
    handles += [module.register_forward_hook(restore(i)) for i, module in enumerate(modules)]
    totals = torch.zeros(rows, dtype=torch.float64)
    try:
        for _ in range(n_noise):
            width = embedding.weight.shape[1]
            noise = torch.randn(last - first + 1, width, generator=generator, device=device) * noise_std
            noise_holder["noise"] = noise
            probs = torch.softmax(model(input_ids=batch).logits[:, -1].float(), -1)[:, answer]
            totals += probs.double().cpu()
    finally:
        for handle in handles:
            handle.remove()
    means = (totals / n_noise).tolist()
    return p_clean, means[0], means[1:]


def causal_trace(model: torch.nn.Module, tokenizer, records: list[EditRecord], window: int = 5, n_noise: int = 3,
                 noise_factor: float = 3.0, seed: int = 0, progress: bool = True,
                 dependent_ratio: float = 0.5) -> TraceResult:
    """Mean indirect effect of each layer's MLP (a `window` of layers around it) at the subject's last token,
    over the records whose prompt contains their subject."""
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    noise_std = noise_factor * subject_embedding_std(model, tokenizer, [r.subject for r in records])
    generator = torch.Generator(device=model_device(model)).manual_seed(seed)
    per_prompt, clean, corrupt, skipped, traced = [], [], [], [], []
    try:
        for record in tqdm(records, desc="causal trace", disable=not progress):
            span = subject_token_span(tokenizer, record.prompt, record.subject)
            if span is None:
                skipped.append(record.index)
                continue
            p_clean, p_corrupt, restored = trace_prompt(model, tokenizer, record.prompt, span, noise_std, window,
                                                        n_noise, generator)
            clean.append(p_clean)
            corrupt.append(p_corrupt)
            per_prompt.append([p - p_corrupt for p in restored])
            traced.append(record.index)
    finally:
        model.train(was_training)
    if not per_prompt:
        raise ValueError("no record's prompt contains its subject: nothing to trace")
    n_layers = len(per_prompt[0])
    dependent = [i for i in range(len(per_prompt)) if corrupt[i] < dependent_ratio * clean[i]]
    mean_effect = _column_means(per_prompt, range(len(per_prompt)), n_layers)
    dependent_effect = _column_means(per_prompt, dependent, n_layers) if dependent else []
    chosen_on = dependent_effect if len(dependent) >= 3 else mean_effect
    best = max(range(n_layers), key=lambda i: chosen_on[i])
    return TraceResult(list(range(n_layers)), mean_effect, dependent_effect, per_prompt, clean, corrupt, dependent,
                       best_layer=best, window=window, noise_std=noise_std, n_traced=len(per_prompt),
                       skipped=skipped, record_indices=traced, seconds=time.perf_counter() - started)


def _column_means(rows: list[list[float]], which, n_columns: int) -> list[float]:
    which = list(which)
    return [sum(rows[i][c] for i in which) / len(which) for c in range(n_columns)]


__all__ = ["TraceResult", "causal_trace", "subject_embedding_std", "trace_prompt"]
