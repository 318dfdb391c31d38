"""Where sampled answers come from: `transformers.generate` on the policy itself (CPU, one GPU), or a vLLM server on
another GPU that receives the merged SVF weights after every optimizer step (TRL's `VLLMClient`).

Both return completion token ids (ending with EOS when the model stopped) for `n` samples of every prompt.
"""
from __future__ import annotations

from typing import Iterator, Protocol

import torch

from t2edit.svf import SVFModel


class Rollouts(Protocol):
    def sample(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int, top_k: int = 0,
               top_p: float = 1.0) -> list[list[list[int]]]:
        """For each prompt, n completions as token-id lists."""

    def sync_weights(self) -> None:
        """Make the sampler use the policy's current z."""


class HFRollouts:
    """Sample with the policy model itself (weights always current: nothing to sync)."""

    def __init__(self, model, tokenizer, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def sample(self, prompts, n, temperature, max_new_tokens, top_k=0, top_p=1.0):
        tokenizer, device = self.tokenizer, self.model.device
        expanded = [p for p in prompts for _ in range(n)]
        completions: list[list[int]] = []
        for start in range(0, len(expanded), self.batch_size):
            chunk = expanded[start:start + self.batch_size]
            batch = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            # Sampling from the policy (top-k / top-p truncation only when asked for), or greedy at temperature 0.
            sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if temperature > 0 \
                else dict(do_sample=False)
            output = self.model.generate(**batch, **sampling, max_new_tokens=max_new_tokens,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for row in output[:, batch["input_ids"].shape[1]:].tolist():
                completions.append(trim_at_eos(row, tokenizer.eos_token_id, tokenizer.pad_token_id))
        return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]

    def sync_weights(self):
        pass


def trim_at_eos(ids: list[int], eos_id: int, pad_id: int | None) -> list[int]:
    """Keep tokens up to and including the first EOS; drop trailing padding."""
    if eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    while ids and pad_id is not None and ids[-1] == pad_id and pad_id != eos_id:
        ids = ids[:-1]
    return ids


def merged_svf_weights(model: SVFModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, current W') for every SVF layer, in the base model's storage convention — what a vLLM
    engine's `load_weights` expects. Frozen layers never change, so only these are sent."""
    for name, layer in model.svf_layers().items():
        weight = layer.merged_weight()
        yield f"{name}.weight", (weight.T.contiguous() if layer.transposed else weight)


class VLLMRollouts:
    """Sample from a running vLLM server (`trl vllm-serve` / `vllm serve` with NCCL weight transfer) and push
    the merged SVF weights to it after each optimizer step. Needs `pip install t2edit[vllm]` and a GPU."""

    def __init__(self, model: SVFModel, tokenizer, base_url: str = "http://localhost:8000",
                 connection_timeout: float = 240.0, client=None):
        self.model, self.tokenizer = model, tokenizer
        if client is None:
            try:
                from trl.generation.vllm_client import VLLMClient
            except ImportError as error:  # vllm / requests missing
                raise RuntimeError(f"vLLM rollouts need the vllm extra: pip install 't2edit[vllm]' ({error})") from None
            try:
                client = VLLMClient(base_url=base_url, connection_timeout=connection_timeout)
            except ConnectionError:
                raise RuntimeError(f"no vLLM server answers at {base_url}; start one with scripts/serve_vllm.sh "
                                   f"on the rollout GPU, or set rollout_backend: transformers") from None
            client.init_communicator(device=model.device)
        self.client = client

    def sample(self, prompts, n, temperature, max_new_tokens, top_k=0, top_p=1.0):
        out = self.client.generate(prompts, n=n, temperature=temperature, max_tokens=max_new_tokens,
                                   top_k=top_k, top_p=top_p, logprobs=None)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        ids = [trim_at_eos(list(c), eos, pad) for c in out["completion_ids"]]
        return [ids[i * n:(i + 1) * n] for i in range(len(prompts))]

    def sync_weights(self):
        weights = list(merged_svf_weights(self.model))
        metadata = [(name, str(w.dtype).removeprefix("torch."), list(w.shape)) for name, w in weights]
        self.client.update_named_params(metadata, iter(weights))
        self.client.reset_prefix_cache()
