"""What ROME, MEMIT and AlphaEdit share: the key statistics of an MLP output matrix, where a subject sits in a
prompt, reading activations at chosen tokens, the covariance-weighted least-squares update, and the short texts
the model itself writes to put in front of an edit prompt.

A "key" is the input of a decoder layer's MLP output matrix (`down_proj`, width = the intermediate size); its
"value" is that matrix's output. The three editors rewrite the matrix so that chosen keys map to new values while
keys in general move as little as possible, measured by the keys' second moment C = E[k kᵀ].

The papers estimate C on 100,000 Wikipedia samples. No such corpus is available offline, so C here is estimated
on the unedited model's own samples (temperature 1 from the document-start token): text the model finds typical is
exactly what an edit should leave alone. The default, 1000 samples × 64 tokens = 64,000 keys, is about 40 keys per
dimension of a 1536-wide key (SmolLM2-135M), enough for a full-rank, stable estimate, and costs one generation pass;
benchmarks/key_samples.py measures how the edit scores change with the sample count. C is computed once per (model
weights, layer, corpus) and cached on disk.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from t2edit.batching import left_pad, pad_id_of, position_ids
from t2edit.editors.base import EditInputError
from t2edit.editors.ft import mlp_output_layers
from t2edit.editors.target_loss import model_device
from t2edit.files import atomic_write, cache_dir
from t2edit.svf import weight_fingerprint

log = logging.getLogger("t2edit")

KEY_STATS_VERSION = 1
SAMPLE_BATCH = 50  # rows sampled together; each batch has its own seed, so a smaller corpus is a prefix of a larger
CAPTURE_BATCH = 32


# ---------------------------------------------------------------------------------------------------- layers

def mlp_output_names(model: torch.nn.Module, layers: list[int], editor: str, field_name: str) -> dict[int, str]:
    """Layer index -> module name of its MLP output matrix, for each of `layers` (negative counts from the end)."""
    by_layer = mlp_output_layers(model)
    if not by_layer:
        raise EditInputError(f"{editor} found no MLP output matrix (...<layer>.mlp.down_proj, c_proj or "
                             f"dense_4h_to_h) in {type(model).__name__}; it edits Llama-, Qwen2-, GPT-2- or "
                             "GPT-NeoX-style models")
    names = {}
    for layer in layers:
        index = layer + len(by_layer) if layer < 0 else layer
        if index not in by_layer:
            raise EditInputError(f"{editor}: layer {layer} (from {field_name}) does not exist: {type(model).__name__} "
                                 f"has layers 0..{len(by_layer) - 1}; set {field_name} to layers that exist")
        names[index] = by_layer[index]
    return names


def layers_at_depths(model: torch.nn.Module, depths: tuple[float, ...]) -> list[int]:
    """The layers at these fractions of the decoder stack (a default that carries over to any layer count)."""
    n_layers = len(mlp_output_layers(model))
    return sorted({min(n_layers - 1, round(depth * n_layers)) for depth in depths})


# ---------------------------------------------------------------------------------------------------- corpus

@dataclass(frozen=True)
class KeyCorpus:
    """The text C is estimated on: `n_samples` samples of `sample_length` tokens from the model itself (every
    sampled position contributes one key), plus `texts` when given (every token of each)."""

    n_samples: int = 1000
    sample_length: int = 64
    seed: int = 0
    texts: tuple[str, ...] = ()

    def __post_init__(self):
        if self.n_samples < 0 or self.sample_length < 1:
            raise EditInputError(f"key corpus n_samples={self.n_samples}, sample_length={self.sample_length}: "
                                 "use n_samples >= 0 and sample_length >= 1")
        if self.n_samples == 0 and not self.texts:
            raise EditInputError("key corpus is empty: set key_samples >= 1 or give texts")

    def cache_key(self) -> str:
        key = f"samples{self.n_samples}x{self.sample_length}-seed{self.seed}"
        if self.texts:
            key += "-texts" + hashlib.sha256("\x00".join(self.texts).encode()).hexdigest()[:12]
        return key


@dataclass
class KeyStatistics:
    """C = E[k kᵀ] of one layer's keys (float32, on the CPU) and what computing it cost."""

    layer: int
    module_name: str
    second_moment: torch.Tensor
    tokens: int
    seconds: float  # the computation's wall time (also when this copy was read from the cache)
    corpus: str
    from_cache: bool = False


def model_fingerprint(model: torch.nn.Module) -> str:
    """A stable hash of every parameter (shape, dtype, sum and a strided sample): different weights, different
    statistics."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, parameter in model.named_parameters():
        digest.update(f"{name}:{weight_fingerprint(parameter)}".encode())
    return digest.hexdigest()[:24]


def document_start_ids(tokenizer) -> list[int]:
    """The token a pretraining document starts after: the BOS the tokenizer adds itself (Llama), else
    `<|endoftext|>` when the vocabulary has it (GPT-2, SmolLM2; SmolLM2's BOS is a chat marker), else BOS or EOS."""
    added = list(tokenizer("")["input_ids"])
    if added:
        return added
    vocabulary = tokenizer.get_vocab()
    if "<|endoftext|>" in vocabulary:
        return [vocabulary["<|endoftext|>"]]
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return [token_id]
    raise EditInputError("the tokenizer has no BOS, EOS or <|endoftext|> token to sample the key corpus from; "
                         "give the corpus as texts instead (KeyCorpus(n_samples=0, texts=...))")


def accepts_argument(model: torch.nn.Module, name: str) -> bool:
    parameters = inspect.signature(model.forward).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _cache_argument(model: torch.nn.Module) -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x); older versions only know the first.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_tokens(model: torch.nn.Module, rows: list[list[int]], n_new: int, pad_id: int,
                  generator: torch.Generator, top_k: int | None = None, before_step=None) -> torch.Tensor:
    """[len(rows), n_new] tokens sampled at temperature 1 (from the `top_k` most likely when given) after the
    left-padded `rows`. `before_step(step)` runs before each forward pass (step 0 reads the rows themselves)."""
    device = model_device(model)
    inputs, mask = left_pad(rows, pad_id, device)
    positions = position_ids(mask)
    cache, cache_arg, new = None, _cache_argument(model), []
    keep = {"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}
    for step in range(n_new):
        if before_step is not None:
            before_step(step)
        kwargs = {"input_ids": inputs, "attention_mask": mask, "position_ids": positions, "use_cache": True, **keep}
        if cache is not None:
            kwargs[cache_arg] = cache
        out = model(**kwargs)
        cache = out.cache if "cache" in out else out.past_key_values  # renamed with the argument
        logits = out.logits[:, -1].float()
        if top_k is not None:
            threshold = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        new.append(token)
        inputs = token
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        positions = positions[:, -1:] + 1
    return torch.cat(new, dim=1)


class _SecondMoments:
    """Forward pre-hooks that collect the keys entering the given modules and add their x xᵀ (fp32 products over
    blocks of FLUSH_ROWS keys, fp64 sums). `mask` ([rows, positions], optional) selects the real tokens of a padded
    batch; `enabled` pauses collecting."""

    FLUSH_ROWS = 4096

    def __init__(self, modules: dict[int, torch.nn.Module]):
        self.modules = modules
        self.sums: dict[int, torch.Tensor] = {}
        self.counts = dict.fromkeys(modules, 0)
        self.pending: dict[int, list[torch.Tensor]] = {layer: [] for layer in modules}
        self.enabled = True
        self.mask: torch.Tensor | None = None
        self.handles = []

    def __enter__(self):
        for layer, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.flush()

    def _hook(self, layer: int):
        def collect(module, args):
            if not self.enabled:
                return
            keys = args[0]
            keys = keys[self.mask.bool()] if self.mask is not None else keys.reshape(-1, keys.shape[-1])
            self.pending[layer].append(keys.detach().float())
            self.counts[layer] += keys.shape[0]
            if sum(k.shape[0] for k in self.pending[layer]) >= self.FLUSH_ROWS:
                self._flush_layer(layer)
        return collect

    def _flush_layer(self, layer: int) -> None:
        if not self.pending[layer]:
            return
        keys = torch.cat(self.pending[layer])
        self.pending[layer] = []
        product = (keys.T @ keys).double()
        self.sums[layer] = product if layer not in self.sums else self.sums[layer] + product

    def flush(self) -> None:
        for layer in self.modules:
            self._flush_layer(layer)


def compute_key_statistics(model: torch.nn.Module, tokenizer, layers: list[int], corpus: KeyCorpus,
                           progress: bool = True) -> dict[int, KeyStatistics]:
    """C for each layer, all in one pass over the corpus (sampled now)."""
    names = mlp_output_names(model, layers, "key statistics", "layers")
    modules = {layer: model.get_submodule(name) for layer, name in names.items()}
    device = model_device(model)
    pad_id = pad_id_of(tokenizer)
    start = document_start_ids(tokenizer)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    n_batches = math.ceil(corpus.n_samples / SAMPLE_BATCH)
    bar = tqdm(total=n_batches * (corpus.sample_length + 1) + len(corpus.texts), desc="key statistics",
               disable=not progress, leave=False)
    try:
        with _SecondMoments(modules) as moments, torch.no_grad():
            for batch in range(n_batches):
                rows = min(SAMPLE_BATCH, corpus.n_samples - batch * SAMPLE_BATCH)
                generator = torch.Generator(device=device).manual_seed(corpus.seed * 1_000_003 + batch)

                def count_sampled_positions(step):  # step 0 reads the start token, not a sample
                    moments.enabled = step > 0
                    bar.update(1)

                sample_tokens(model, [start] * rows, corpus.sample_length + 1, pad_id, generator,
                              before_step=count_sampled_positions)
            moments.enabled = True
            for first in range(0, len(corpus.texts), CAPTURE_BATCH):
                texts = corpus.texts[first: first + CAPTURE_BATCH]
                ids, mask = left_pad([tokenizer(t)["input_ids"] for t in texts], pad_id, device)
                moments.mask = mask
                model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
                bar.update(len(texts))
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - started
    stats = {}
    for layer in layers:
        count = moments.counts[layer]
        if count == 0:
            raise EditInputError(f"the key corpus gave no tokens for layer {layer}; give longer texts or samples")
        second_moment = (moments.sums[layer] / count).float().cpu()
        stats[layer] = KeyStatistics(layer, names[layer], second_moment, count, seconds, corpus.cache_key())
    log.info("key statistics of layer(s) %s: %d tokens in %.1f s", layers, stats[layers[0]].tokens, seconds)
    return stats


class KeyStatisticsCache:
    """One safetensors file per (model fingerprint, layer, corpus) under `directory` (default: the t2edit cache's
    key_stats/); "" keeps nothing on disk. A file that does not load or does not match is recomputed."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = None if directory == "" else Path(directory or cache_dir("key_stats"))
        self.computed: list[int] = []  # layers computed (not read) by this cache object, for tests and reports

    def path(self, fingerprint: str, layer: int, corpus: KeyCorpus) -> Path:
        return self.directory / f"{fingerprint}-layer{layer}-{corpus.cache_key()}.safetensors"

    def get(self, model, tokenizer, layers: list[int], corpus: KeyCorpus, fingerprint: str | None = None,
            progress: bool = True) -> dict[int, KeyStatistics]:
        fingerprint = fingerprint or model_fingerprint(model)
        found: dict[int, KeyStatistics] = {}
        if self.directory is not None:
            for layer in layers:
                stats = self._read(self.path(fingerprint, layer, corpus), fingerprint, layer, corpus)
                if stats is not None:
                    found[layer] = stats
        missing = [layer for layer in layers if layer not in found]
        if missing:
            computed = compute_key_statistics(model, tokenizer, missing, corpus, progress)
            self.computed += missing
            if self.directory is not None:
                for layer, stats in computed.items():
                    self._write(self.path(fingerprint, layer, corpus), stats, fingerprint)
            found.update(computed)
        return {layer: found[layer] for layer in layers}

    def _read(self, path: Path, fingerprint: str, layer: int, corpus: KeyCorpus) -> KeyStatistics | None:
        if not path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                second_moment = handle.get_tensor("second_moment")
        except Exception as error:  # noqa: BLE001 - a truncated or corrupt file, whatever safetensors raises
            warnings.warn(f"key statistics {path.name} unreadable ({type(error).__name__}); recomputing", stacklevel=3)
            return None
        expected = {"fingerprint": fingerprint, "layer": str(layer), "corpus": corpus.cache_key(),
                    "version": str(KEY_STATS_VERSION)}
        if any(meta.get(k) != v for k, v in expected.items()) or second_moment.dim() != 2 \
                or not torch.isfinite(second_moment).all():
            warnings.warn(f"key statistics {path.name} do not match the model; recomputing", stacklevel=3)
            return None
        return KeyStatistics(layer, meta["module"], second_moment, int(meta["tokens"]), float(meta["seconds"]),
                             corpus.cache_key(), from_cache=True)

    def _write(self, path: Path, stats: KeyStatistics, fingerprint: str) -> None:
        from safetensors.torch import save_file

        metadata = {"fingerprint": fingerprint, "layer": str(stats.layer), "module": stats.module_name,
                    "corpus": stats.corpus, "tokens": str(stats.tokens), "seconds": f"{stats.seconds:.3f}",
                    "version": str(KEY_STATS_VERSION)}
        tensors = {"second_moment": stats.second_moment.contiguous()}
        try:
            atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        except (OSError, RuntimeError) as error:  # the cache is optional: the edit goes on without it
            warnings.warn(f"key statistics: could not write {path} ({error}); continuing uncached", stacklevel=3)


def key_statistics(model, tokenizer, layers: list[int], corpus: KeyCorpus | None = None,
                   directory: str | Path | None = None, progress: bool = True) -> dict[int, KeyStatistics]:
    """C of each layer's keys for `model`, read from the cache or computed (and cached) in one pass."""
    return KeyStatisticsCache(directory).get(model, tokenizer, list(layers), corpus or KeyCorpus(),
                                             progress=progress)


# ------------------------------------------------------------------------------------------- subject tokens

def subject_token_span(tokenizer, text: str, subject: str, start: int = 0,
                       end: int | None = None) -> tuple[int, int] | None:
    """(first, last) index in `tokenizer(text)["input_ids"]` of the tokens covering the first occurrence of
    `subject` within text[start:end] (exact case first, then ignoring case); None when it is not there."""
    end = len(text) if end is None else end
    if not subject.strip():
        return None
    where = text.find(subject, start, end)
    if where < 0:
        where = text.casefold().find(subject.casefold(), start, end)
    if where < 0:
        return None
    subject_end = where + len(subject)
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    covering = [i for i, (a, b) in enumerate(offsets) if b > a and a < subject_end and b > where]
    return (covering[0], covering[-1]) if covering else None


def subject_last_token(tokenizer, text: str, subject: str, start: int = 0, end: int | None = None) -> int:
    """Index of the subject's last token in `tokenizer(text)` (ROME's "subject_last" key position).

    When the subject does not occur in text[start:end] (a record whose prompt names it differently), the last
    token of text[:end] is used instead: the edit then rewrites the key of the prompt as a whole, which still makes
    this prompt answer the target but carries less to other prompts about the same subject."""
    span = subject_token_span(tokenizer, text, subject, start, end)
    if span is not None:
        return span[1]
    return len(tokenizer(text[:end] if end is not None else text)["input_ids"]) - 1


# ------------------------------------------------------------------------------------- reading activations

def decoder_layer_name(mlp_output_name: str) -> str:
    """`model.layers.8.mlp.down_proj` -> `model.layers.8` (the decoder layer whose output is the residual stream)."""
    return re.sub(r"\.mlp\.[^.]+$", "", mlp_output_name)


def _first_tensor(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_at_positions(model: torch.nn.Module, tokenizer, modules: dict[str, tuple[torch.nn.Module, str]],
                         texts: list[str], positions: list[int],
                         batch_size: int = CAPTURE_BATCH) -> dict[str, torch.Tensor]:
    """For each named (module, "input" | "output"): that activation at token `positions[i]` of `texts[i]`,
    as [len(texts), width] float32. Rows are left-padded with position ids (as `t2edit.batching`)."""
    device = model_device(model)
    pad_id = pad_id_of(tokenizer)
    rows = [tokenizer(text)["input_ids"] for text in texts]
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    where: dict[str, torch.Tensor] = {}

    def hook(name, kind):
        def take(tensor):
            captured[name].append(tensor[where["rows"], where["cols"]].float())

        if kind == "input":
            return lambda module, args: take(args[0])
        return lambda module, args, output: take(_first_tensor(output))

    handles = []
    for name, (module, kind) in modules.items():
        if kind not in ("input", "output"):
            raise ValueError(f"capture kind {kind!r}: use 'input' or 'output'")
        handles.append(module.register_forward_pre_hook(hook(name, kind)) if kind == "input"
                       else module.register_forward_hook(hook(name, kind)))
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(rows), batch_size):
            chunk = rows[first: first + batch_size]
            ids, mask = left_pad(chunk, pad_id, device)
            width = ids.shape[1]
            where["rows"] = torch.arange(len(chunk), device=device)
            where["cols"] = torch.tensor([width - len(r) + p for r, p in zip(chunk, positions[first:])],
                                         device=device)
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in captured.items()}


# ------------------------------------------------------------------------------------------ weight updates

def layer_weight(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight as (out_features, in_features), a view of the stored parameter (GPT-2's Conv1D stores
    it transposed), so in-place updates of the view edit the model."""
    weight = module.weight
    return weight.T if type(module).__name__ == "Conv1D" else weight


def least_squares_update(residuals: torch.Tensor, keys: torch.Tensor, second_moment: torch.Tensor,
                         lam: float) -> torch.Tensor:
    """Δ [out, in] minimising  lam · tr(Δ C Δᵀ) + ‖Δ K − R‖²  (MEMIT's objective, C = E[k kᵀ]):

        Δ = R Kᵀ (lam·C + K Kᵀ)⁻¹ = R (lam·I + Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹

    computed in the second form (one solve with C, one n×n solve), which stays defined at lam = 0: there Δ is
    the change of least C-weighted size with Δ K = R exactly, and for one key it is ROME's rank-one update
    r (C⁻¹k)ᵀ / (kᵀ C⁻¹ k). `residuals` R: [out, n]; `keys` K: [in, n]; float64 inside."""
    dtype = torch.float64
    R, K, C = (t.to(dtype) for t in (residuals, keys, second_moment.to(keys.device)))
    try:
        c_inv_k = torch.linalg.solve(C, K)
        gram = K.T @ c_inv_k + lam * torch.eye(K.shape[1], dtype=dtype, device=K.device)
        return R @ torch.linalg.solve(gram, c_inv_k.T)
    except torch.linalg.LinAlgError:
        raise EditInputError("the key statistics are singular (fewer corpus tokens than key dimensions, or "
                             "keys that never vary); use more key samples (key_samples) or, for MEMIT, "
                             "mom2_update_weight > 0 with a full-rank corpus") from None


# --------------------------------------------------------------------------------------- context prefixes

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")


def context_prefixes(model: torch.nn.Module, tokenizer, lengths: list[tuple[int, int]], seed: int = 0,
                     top_k: int = 5) -> list[str]:
    """"" plus, for each (length, count), `count` short texts of `length` sampled tokens written by the model
    after a neutral opening word, each ending in ". ": the prefixes an edit prompt is put after, so the edit holds
    whatever text comes before the subject (ROME's context templates)."""
    prefixes = [""]
    device = model_device(model)
    pad_id = pad_id_of(tokenizer)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for length, count in lengths:
            if count <= 0:
                continue
            starts = [PREFIX_STARTS[i % len(PREFIX_STARTS)] for i in range(count)]
            rows = [tokenizer(start)["input_ids"] for start in starts]
            new = sample_tokens(model, rows, length, pad_id, generator, top_k=top_k)
            for row, tokens in zip(rows, new.tolist()):
                text = tokenizer.decode(row + tokens, skip_special_tokens=True)
                prefixes.append(" ".join(text.split()) + ". ")
    finally:
        model.train(was_training)
    return prefixes


def check_context_lengths(lengths, field_name: str, editor: str) -> list[tuple[int, int]]:
    try:
        pairs = [(int(length), int(count)) for length, count in lengths]
    except (TypeError, ValueError):
        pairs = None
    if pairs is None or any(length < 1 or count < 0 for length, count in pairs):
        raise EditInputError(f"{editor}: {field_name}={lengths!r}; give [[tokens, count], ...] with tokens >= 1 and "
                             "count >= 0 (e.g. [[5, 10], [10, 10]]; [] uses the bare prompt only)")
    return pairs


class UneditedModelMemo:
    """What an editor computes once per unedited model (key statistics, context prefixes, projections), keyed
    by the model's fingerprint. While an editor's own edits are applied to a model (a sequential stream), the
    fingerprint taken before the first of them is used, so statistics always describe the unedited model."""

    def __init__(self, cache_directory: str | Path | None = None):
        self.cache = KeyStatisticsCache(cache_directory)
        self.values: dict[tuple, object] = {}
        self.open_edits: dict[int, int] = {}
        self.base_fingerprint: dict[int, str] = {}

    def begin(self, model) -> str:
        """The fingerprint of the unedited model; call once per edit() before changing any weight."""
        if self.open_edits.get(id(model), 0) == 0:
            self.base_fingerprint[id(model)] = model_fingerprint(model)
        self.open_edits[id(model)] = self.open_edits.get(id(model), 0) + 1
        return self.base_fingerprint[id(model)]

    def end(self, model) -> None:
        """One edit() of this model was restored."""
        self.open_edits[id(model)] = max(0, self.open_edits.get(id(model), 0) - 1)

    def get(self, key: tuple, compute):
        if key not in self.values:
            self.values[key] = compute()
        return self.values[key]

    def statistics(self, model, tokenizer, fingerprint: str, layers: list[int], corpus: KeyCorpus,
                   progress: bool) -> dict[int, KeyStatistics]:
        missing = [layer for layer in layers if ("stats", fingerprint, layer, corpus) not in self.values]
        if missing:
            for layer, stats in self.cache.get(model, tokenizer, missing, corpus, fingerprint, progress).items():
                self.values[("stats", fingerprint, layer, corpus)] = stats
        return {layer: self.values[("stats", fingerprint, layer, corpus)] for layer in layers}


def describe_statistics(stats: dict[int, KeyStatistics]) -> dict:
    """The cost of the statistics, for reports: tokens, seconds (of the computation) and whether it was cached."""
    return {str(layer): {"tokens": s.tokens, "seconds": round(s.seconds, 2), "from_cache": s.from_cache}
            for layer, s in stats.items()}


__all__ = ["KeyCorpus", "KeyStatistics", "KeyStatisticsCache", "UneditedModelMemo", "capture_at_positions",
           "check_context_lengths", "compute_key_statistics", "context_prefixes", "decoder_layer_name",
           "describe_statistics", "document_start_ids", "key_statistics", "layer_weight", "layers_at_depths",
           "least_squares_update", "mlp_output_names", "model_fingerprint", "sample_tokens", "subject_last_token", "subject_token_span"]
