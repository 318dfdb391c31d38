"""Where sampled answers come from: `transformers.generate` on the policy itself (CPU, one GPU), or vLLM — a server
on another GPU (TRL's `VLLMClient`) or an engine in the training process on the same GPU (colocate).

Every backend returns completion token ids (ending with EOS when the model stopped) for `n` samples of every
prompt. vLLM backends hold their own copy of the weights, so `sync_weights` pushes the policy's current z to them:

* `sync="z"`: only z travels (a file on this machine, named by a short RPC message);
  `t2edit.vllm_worker.SVFWorkerExtension` on the rollout GPU holds U, s, Vᵀ and recomposes W' there (the factors
  are sent once, at the first full sync).
* `sync="merged"`: W' of every changed SVF layer, cast to the server's dtype, under the base model's parameter
  names (the fallback: works with any vLLM server that has NCCL weight transfer).

vLLM is an optional extra, imported only when a vLLM backend is built.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
import weakref
from typing import Iterator, Protocol

import torch

from t2edit.precision import frozen_weights_cast
from t2edit.svf import SVFModel, svf_config_dict

WORKER_EXTENSION = "t2edit.vllm_worker.SVFWorkerExtension"
INSTALL_HINT = "pip install 't2edit[vllm]' (on a CUDA machine), or set rollout_backend: transformers"


class Rollouts(Protocol):
    def sample(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int | list[int],
               top_k: int = 0, top_p: float = 1.0, seeds: list[int] | None = None) -> list[list[list[int]]]:
        """For each prompt, n completions as token-id lists (`max_new_tokens`: one budget, or one per prompt).
        `seeds`: one per prompt; a prompt's draws then depend on its seed alone, not on the other prompts of the
        call (samplers that cannot promise it may ignore them)."""

    def sync_weights(self, full: bool = False) -> None:
        """Make the sampler use the policy's current z (`full`: every layer, e.g. before step 1 or after a resume)."""


class HFRollouts:
    """Sample with the policy model itself (weights always current: nothing to sync)."""

    def __init__(self, model, tokenizer, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.generated_tokens, self.generate_seconds = 0, 0.0

    @torch.no_grad()
    def sample(self, prompts, n, temperature, max_new_tokens, top_k=0, top_p=1.0, seeds=None):
        """`seeds` (one per prompt): each completion draws its tokens from its own generator, seeded by the
        prompt's seed and the completion's number, so what a prompt samples does not depend on which prompts share
        its call, or its process (the data-parallel trainer relies on it)."""
        tokenizer, device = self.tokenizer, self.model.device
        budgets = per_prompt_budgets(max_new_tokens, len(prompts))
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        completions: list[list[int] | None] = [None] * (len(prompts) * n)
        # A model sharded across processes (FSDP) all-gathers its weights in every forward: every process must run
        # as many forwards as the others, so generation runs until all processes are done.
        synced = {"synced_gpus": True} if getattr(self.model, "sharded", False) else {}
        started = time.perf_counter()
        # A call decodes as many steps as its longest budget: prompts are grouped by budget where that pays.
        step_cost = 32.0 if device.type == "cpu" else 1024.0  # a GPU step costs about the same for 1 or 1,000 rows
        for bucket in budget_groups(budgets, n, step_cost):
            rows = [i * n + j for i in bucket for j in range(n)]
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                batch = tokenizer([prompts[r // n] for r in chunk], return_tensors="pt", padding=True).to(device)
                # Sampling from the policy (top-k / top-p truncation only when asked for), or greedy at temperature 0.
                sampling = dict(do_sample=False)
                steps = max(budgets[r // n] for r in chunk)
                if temperature > 0:
                    uniforms = None if seeds is None else torch.stack(
                        [keyed_uniforms(seeds[r // n], r % n, steps) for r in chunk])
                    sampling["logits_processor"] = [TruncatedSampler(temperature, top_k, top_p, uniforms,
                                                                     batch["input_ids"].shape[1])]
                with frozen_weights_cast(self.model):
                    output = self.model.generate(**batch, **sampling, **synced, max_new_tokens=steps,
                                                 pad_token_id=tokenizer.pad_token_id,
                                                 eos_token_id=tokenizer.eos_token_id)
                for r, ids in zip(chunk, output[:, batch["input_ids"].shape[1]:].tolist()):
                    completions[r] = trim_at_eos(ids[:budgets[r // n]], tokenizer.eos_token_id,
                                                 tokenizer.pad_token_id)
        self.generate_seconds += time.perf_counter() - started
        self.generated_tokens += sum(len(c) for c in completions)
        return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]

    def sync_weights(self, full: bool = False):
        pass


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int | list[int],
                   batch_size: int = 128) -> list[str]:
    """Greedy answers of `model` (anything with `generate`); `max_new_tokens` is one budget or one per prompt."""
    groups = HFRollouts(model, tokenizer, batch_size=batch_size).sample(prompts, 1, 0.0, max_new_tokens)
    return [tokenizer.decode(ids[0], skip_special_tokens=True).strip() for ids in groups]


class TruncatedSampler:
    """A transformers logits processor that draws the next token itself (temperature, then top-k, then top-p, as
    `generate(do_sample=True)` orders them) and returns a score that is 0 for the drawn token and -inf elsewhere, so
    greedy decoding emits it. Why: `generate`'s own sampler draws with `torch.multinomial` over the whole vocabulary
    (an exponential per entry: a sizeable share of a short generation on a CPU) even when top-k keeps 50."""

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0, uniforms: torch.Tensor | None = None,
                 start: int = 0):
        """`uniforms` [rows, steps] (with `start`, the prompt width): row r's token at step t is drawn by inverting
        its distribution's CDF at uniforms[r, t] (its own random numbers, `keyed_uniforms`); None: torch's global
        generator draws, as `torch.multinomial` does."""
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}; sampling needs a temperature > 0 (0 means greedy)")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.uniforms, self.start = uniforms, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            logits, candidates = logits.topk(self.top_k, dim=-1)  # sorted, best first
        elif self.top_p < 1.0:
            logits, candidates = logits.sort(dim=-1, descending=True)
        else:
            candidates = None
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:  # the smallest head of the sorted candidates whose mass reaches top_p (the first kept)
            outside = probs.cumsum(-1) - probs >= self.top_p
            probs = probs.masked_fill(outside, 0.0)
        if self.uniforms is None:
            drawn = torch.multinomial(probs, 1)
        else:  # the first token whose cumulative mass exceeds u · total (never a token of zero mass)
            u = self.uniforms[:, input_ids.shape[1] - self.start].to(probs.device, probs.dtype)
            cdf = probs.cumsum(-1)
            drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=probs.shape[-1] - 1)
        token = candidates.gather(-1, drawn) if candidates is not None else drawn
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)


def keyed_uniforms(seed: int, member: int, steps: int) -> torch.Tensor:
    """The `steps` uniform numbers completion `member` of a prompt with `seed` draws its tokens from."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + member) % 2 ** 63)
    return torch.rand(steps, generator=generator)


def per_prompt_budgets(max_new_tokens: int | list[int], n_prompts: int) -> list[int]:
    """One token budget per prompt, from one number or a list of them."""
    if isinstance(max_new_tokens, int):
        return [max_new_tokens] * n_prompts
    if len(max_new_tokens) != n_prompts:
        raise ValueError(f"got {len(max_new_tokens)} token budgets for {n_prompts} prompts")
    return list(max_new_tokens)


def budget_groups(budgets: list[int], rows_per_prompt: int = 1, step_cost_rows: float = 32.0) -> list[list[int]]:
    """Prompt indices split into generate calls. A call decodes as many steps as its longest budget, and a decoding
    step costs about `step_cost_rows` rows' worth of work however few rows it has (reading every weight once
    dominates a small batch's step). Prompts sorted by budget are cut into the contiguous groups that minimise
    Σ longest budget × (step cost + rows), so one 23-token answer does not make fifty 3-token ones decode 25 steps,
    and short lists stay one call."""
    order = sorted(range(len(budgets)), key=lambda i: budgets[i])
    best = [0.0] + [float("inf")] * len(order)  # best[j]: cheapest split of the first j prompts
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        longest = budgets[order[j - 1]]
        for i in range(j):
            cost = best[i] + longest * (step_cost_rows + (j - i) * rows_per_prompt)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def trim_at_eos(ids: list[int], eos_id: int, pad_id: int | None) -> list[int]:
    """Keep tokens up to and including the first EOS; drop trailing padding."""
    if eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    while ids and pad_id is not None and ids[-1] == pad_id and pad_id != eos_id:
        ids = ids[:-1]
    return ids


def merged_svf_weights(model: SVFModel, dtype: torch.dtype | None = None,
                       names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, current W') for the SVF layers `names` (default: all), in the base model's storage
    convention and in `dtype` (default: the base weight's) — what a vLLM engine's `load_weights` expects. Frozen
    layers never change, so only SVF layers are sent."""
    layers = model.svf_layers()
    for name in names if names is not None else list(layers):
        layer = layers[name]
        weight = layer.merged_weight()
        weight = weight.T.contiguous() if layer.transposed else weight
        yield f"{name}.weight", weight if dtype is None else weight.to(dtype)


def sync_bytes(shapes: list[tuple[int, int]], bytes_per_weight: int = 2) -> dict[str, int]:
    """Bytes one full sync sends for SVF layers of these (out, in) shapes: W' at `bytes_per_weight` (2: bf16)
    against z (float32, one value per singular value)."""
    return {"merged": sum(o * i for o, i in shapes) * bytes_per_weight, "z": sum(min(o, i) for o, i in shapes) * 4}


# Llama shapes the sync sizes are computed at (docs/gpus-and-vllm.md): hidden size, MLP size, layers, query and
# key/value widths (heads × 64 or 128), from the models' published configs.
LLAMA_SHAPES = {"Llama-3.2-1B": dict(hidden=2048, mlp=8192, layers=16, q=32 * 64, kv=8 * 64),
                "Llama-3.1-8B": dict(hidden=4096, mlp=14336, layers=32, q=32 * 128, kv=8 * 128),
                "Llama-3.1-70B": dict(hidden=8192, mlp=28672, layers=80, q=64 * 128, kv=8 * 128),
                "Llama-3.1-405B": dict(hidden=16384, mlp=53248, layers=126, q=128 * 128, kv=8 * 128)}


def llama_svf_layers(all_linear: bool, model: str = "Llama-3.2-1B") -> list[tuple[str, tuple[int, int]]]:
    """(HF name, (out, in)) of a Llama model's SVF layers: the MLP's three projections, or every linear layer."""
    shape = LLAMA_SHAPES[model]
    hidden, mlp, q, kv = shape["hidden"], shape["mlp"], shape["q"], shape["kv"]
    per_layer = [("mlp.gate_proj", (mlp, hidden)), ("mlp.up_proj", (mlp, hidden)), ("mlp.down_proj", (hidden, mlp))]
    if all_linear:
        per_layer = [("self_attn.q_proj", (q, hidden)), ("self_attn.k_proj", (kv, hidden)),
                     ("self_attn.v_proj", (kv, hidden)), ("self_attn.o_proj", (hidden, q))] + per_layer
    return [(f"model.layers.{i}.{name}", dims) for i in range(shape["layers"]) for name, dims in per_layer]


def export_factors(model: SVFModel, directory: str, dtype: str) -> str:
    """Write U, s, Vᵀ of every SVF layer for the rollout worker; returns the manifest `svf_load_factors` reads."""
    from safetensors.torch import save_file

    layers = []
    for index, (name, layer) in enumerate(model.svf_layers().items()):
        path = os.path.join(directory, f"{index:04d}.safetensors")
        save_file({"U": layer.U.contiguous(), "S": layer.s.contiguous(), "Vh": layer.Vh.contiguous()}, path)
        layers.append({"name": name, "path": path, "transposed": layer.transposed})
    return json.dumps({"svf_config": svf_config_dict(model.svf_config), "dtype": dtype, "layers": layers})


# ----------------------------------------------------------------------------------------------------------------
# The two ways of reaching vLLM: a server (HTTP + NCCL) or an engine in this process
# ----------------------------------------------------------------------------------------------------------------

class ServerEngine:
    """A vLLM server reached through TRL's `VLLMClient` (generation, NCCL weight transfer, prefix cache) and vLLM's
    dev-mode `/collective_rpc` endpoint (the z-only worker extension)."""

    def __init__(self, client, base_url: str, session=None):
        self.client, self.base_url = client, base_url.rstrip("/")
        # Kept open across syncs: a new connection per RPC (what `requests.post` makes) costs a TCP handshake and a
        # fresh session every step. Not the client's own session: that retries a refused RPC three times over 14 s.
        self.session = session
        self.communicator_ready = False
        self.z_writer = None  # t2edit.vllm_worker.ZWriter, made on the first z sync

    def generate(self, prompts, n, temperature, max_tokens, top_k=0, top_p=1.0) -> list[list[int]]:
        out = self.client.generate(prompts, n=n, temperature=temperature, max_tokens=max_tokens, top_k=top_k,
                                   top_p=top_p, logprobs=None)
        return [list(ids) for ids in out["completion_ids"]]

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]):
        if not self.communicator_ready:  # NCCL group with the server's workers: only the merged path needs it
            self.client.init_communicator(device=weights[0][1].device)
            self.communicator_ready = True
        metadata = [(name, str(w.dtype).removeprefix("torch."), list(w.shape)) for name, w in weights]
        self.client.update_named_params(metadata, iter(weights))

    def rpc(self, method: str, *args: str):
        import requests

        if self.session is None:
            self.session = requests.Session()
        response = self.session.post(f"{self.base_url}/collective_rpc", json={"method": method, "args": list(args)})
        if response.status_code == 404:
            raise RuntimeError(f"the vLLM server at {self.base_url} has no /collective_rpc endpoint; start it with "
                               f"VLLM_SERVER_DEV_MODE=1 (scripts/serve_vllm.sh does), or use vllm_sync: merged")
        if response.status_code != 200:
            raise RuntimeError(f"the vLLM server at {self.base_url} refused {method}: {response.status_code} "
                               f"{response.text[:300]}; is it running --worker-extension-cls {WORKER_EXTENSION}? "
                               f"(scripts/serve_vllm.sh starts it so), or use vllm_sync: merged")
        return response.json()["results"]  # one result per worker

    def send_z(self, z: dict[str, torch.Tensor]) -> tuple[list[dict], int]:
        """z to the server's workers: a file in shared memory on this machine, overwritten in place, named by a
        short RPC (vLLM's HTTP endpoint passes only strings). Returns the workers' answers and the bytes written."""
        if self.z_writer is None:
            from t2edit.vllm_worker import ZWriter, z_directory

            directory = z_directory()
            weakref.finalize(self, shutil.rmtree, directory, True)  # removed with this engine
            self.z_writer = ZWriter(directory)
        payload = self.z_writer.write(z)
        return self.rpc("svf_set_z", payload), json.loads(payload)["bytes"]

    def needs_every_layer(self) -> bool:
        return False  # W' goes over NCCL into a CUDA server, which loads it in place

    def reset_prefix_cache(self):
        self.client.reset_prefix_cache()

    def dtype(self) -> torch.dtype:
        """The dtype the server holds its weights in (its resolved config), bfloat16 if it does not say."""
        try:
            name = str(self.client.get_server_info()["model_config"]["dtype"])
        except Exception:  # noqa: BLE001 - an older server without /server_info, or another layout
            return torch.bfloat16
        return getattr(torch, name.removeprefix("torch."), torch.bfloat16)


class ColocateEngine:
    """A vLLM engine in the training process, sharing its GPU (TRL's colocate mode)."""

    def __init__(self, llm):
        self.llm = llm

    def generate(self, prompts, n, temperature, max_tokens, top_k=0, top_p=1.0) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, top_k=top_k, top_p=top_p)
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return [list(o.token_ids) for output in outputs for o in output.outputs]

    def _model_runner(self):
        # The in-process worker, as TRL's colocate mode reaches it.
        return self.llm.llm_engine.model_executor.driver_worker.model_runner

    def load_weights(self, weights):
        from t2edit.vllm_worker import load_into_model_runner

        load_into_model_runner(self._model_runner(), weights)

    def needs_every_layer(self) -> bool:
        from t2edit.vllm_worker import reloads_layerwise

        return reloads_layerwise(self._model_runner().model)

    def rpc(self, method: str, *args: str):
        return self.llm.collective_rpc(method, args=tuple(args))  # one result per worker

    def send_z(self, z: dict[str, torch.Tensor]) -> tuple[list[dict], int]:
        """z to the in-process worker as tensors: the colocated engine's `collective_rpc` calls the worker directly
        (TRL's external launcher), so nothing is written or serialised. Returns the answers and z's bytes."""
        results = self.llm.collective_rpc("svf_set_z_tensors", args=(z,))
        return results, sum(t.numel() * t.element_size() for t in z.values())

    def reset_prefix_cache(self):
        self.llm.reset_prefix_cache()

    def dtype(self) -> torch.dtype:
        return self.llm.llm_engine.model_config.dtype


class VLLMRollouts:
    """Rollouts from vLLM (a `ServerEngine` or `ColocateEngine`), kept in step with the policy by `sync_weights`."""

    def __init__(self, model: SVFModel, tokenizer, engine, sync: str = "z", dtype: torch.dtype | None = None):
        if sync not in ("z", "merged"):
            raise ValueError(f"vllm_sync={sync!r}; choose z (send z only) or merged (send W')")
        self.model, self.tokenizer, self.engine, self.sync = model, tokenizer, engine, sync
        self.dtype = dtype or engine.dtype()
        self.sent_z: dict[str, torch.Tensor] | None = None  # z as the engine has it (None: never synced)
        self.last_sync: dict = {}
        self.generated_tokens, self.generate_seconds = 0, 0.0

    def sample(self, prompts, n, temperature, max_new_tokens, top_k=0, top_p=1.0, seeds=None):
        # `seeds` are not used: vLLM samples with its own generator, and vLLM rollouts run in one training process
        # (`check_single_process`), so no other process has to draw the same samples.
        budgets = per_prompt_budgets(max_new_tokens, len(prompts))
        started = time.perf_counter()
        flat = self.engine.generate(prompts, n, temperature, max(budgets, default=1), top_k=top_k, top_p=top_p)
        self.generate_seconds += time.perf_counter() - started
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        ids = [trim_at_eos(c[:budgets[k // n]], eos, pad) for k, c in enumerate(flat)]
        self.generated_tokens += sum(len(c) for c in ids)
        return [ids[i * n:(i + 1) * n] for i in range(len(prompts))]

    def changed_layers(self, full: bool = False) -> list[str]:
        """SVF layers whose z differs from what the engine holds (all of them on a full sync), in model order."""
        z = self.model.get_z()
        if full or self.sent_z is None:
            return list(z)
        return [name for name, value in z.items() if not torch.equal(value, self.sent_z[name])]

    def sync_weights(self, full: bool = False):
        started = time.perf_counter()
        if full or self.sent_z is None:
            full = True
            if self.sync == "z":
                self._send_factors()
        names = self.changed_layers(full)
        z = self.model.get_z()
        split = dict.fromkeys(("worker_seconds", "transfer_seconds", "to_worker_seconds", "from_worker_seconds"))
        if names:
            if self.sync == "z":
                sent, sent_wall = time.perf_counter(), time.time()
                results, sent_bytes = self.engine.send_z({name: z[name] for name in names})
                back, back_wall = time.perf_counter(), time.time()
                # What the workers spent rebuilding and loading W'; the rest of the round trip is transfer: handing
                # z over until a worker has it, and the answer's way back (wall clocks of one machine).
                split["worker_seconds"] = max(r["seconds"] for r in results)
                split["transfer_seconds"] = back - sent - split["worker_seconds"]
                split["to_worker_seconds"] = max(r["arrived"] for r in results) - sent_wall
                split["from_worker_seconds"] = back_wall - max(r["left"] for r in results)
            else:
                if self.engine.needs_every_layer():  # a layer-wise reload (vLLM on CPU)
                    names = list(z)
                weights = list(merged_svf_weights(self.model, self.dtype, names))
                self.engine.load_weights(weights)
                sent_bytes = sum(w.numel() * w.element_size() for _, w in weights)
            self.engine.reset_prefix_cache()  # cached KV of the old weights must not be reused
        else:
            sent_bytes = 0
        self.sent_z = z
        self.last_sync = {"layers": len(names), "bytes": sent_bytes, "full": full,
                          "seconds": time.perf_counter() - started, **split}

    def _send_factors(self):
        # Written to a temporary directory on this machine, read by the workers, then removed: the server must
        # see this filesystem (the two-GPU recipe runs both on one machine).
        with tempfile.TemporaryDirectory(prefix="t2edit-svf-factors-") as directory:
            manifest = export_factors(self.model, directory, str(self.dtype).removeprefix("torch."))
            self.engine.rpc("svf_load_factors", manifest)


# ----------------------------------------------------------------------------------------------------------------
# Building the vLLM backend a training run asks for
# ----------------------------------------------------------------------------------------------------------------

def require_vllm():
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(f"vLLM rollouts need vLLM, which is not installed: {INSTALL_HINT}")


def check_single_process(accelerator):
    """vLLM rollouts run in one training process: the server (or the colocated engine) is driven by it alone."""
    processes = getattr(accelerator, "num_processes", 1) if accelerator is not None else 1
    if processes > 1:
        raise RuntimeError(
            f"vLLM rollouts need one training process, but accelerate started {processes}: launch with "
            f"`accelerate launch --num_processes 1 ...` and show the trainer only its GPU "
            f"(CUDA_VISIBLE_DEVICES=1 for the trainer, CUDA_VISIBLE_DEVICES=0 for the server)")


def connect_server(base_url: str, connection_timeout: float = 240.0):
    """TRL's `VLLMClient` for a running server, or one clear error naming the URL and the fix."""
    require_vllm()
    import requests

    try:
        from trl.generation.vllm_client import VLLMClient

        return VLLMClient(base_url=base_url, connection_timeout=connection_timeout)
    except ImportError as error:
        raise RuntimeError(f"vLLM rollouts could not start ({error}): {INSTALL_HINT}") from None
    except requests.exceptions.ConnectionError:
        raise RuntimeError(f"no vLLM server answers at {base_url} (waited {connection_timeout:.0f} s): start one on "
                           f"the rollout GPU with `CUDA_VISIBLE_DEVICES=0 bash scripts/serve_vllm.sh MODEL`, fix "
                           f"vllm_server_url, or set rollout_backend: transformers") from None


def detect_sync(engine) -> str:
    """"z" when the server runs the t2edit worker extension, else "merged" (the fallback)."""
    try:
        engine.rpc("svf_ping")
        return "z"
    except Exception:  # noqa: BLE001 - any refusal means the extension is not there
        return "merged"


def make_vllm_rollouts(model: SVFModel, tokenizer, mode: str = "server", sync: str = "auto",
                       base_url: str = "http://localhost:8000", accelerator=None, model_name: str | None = None,
                       gpu_memory_utilization: float = 0.3, connection_timeout: float = 240.0) -> VLLMRollouts:
    """The vLLM backend of a training run. `mode`: "server" (another GPU) or "colocate" (this GPU, this process);
    `sync`: "z", "merged" or "auto" (z where the worker extension is loaded)."""
    if mode not in ("server", "colocate"):
        raise ValueError(f"vllm_mode={mode!r}; choose server or colocate")
    check_single_process(accelerator)
    if mode == "server":
        engine = ServerEngine(connect_server(base_url, connection_timeout), base_url)
        if sync == "auto":
            sync = detect_sync(engine)
    else:
        require_vllm()
        engine = ColocateEngine(start_colocated_engine(model, model_name, gpu_memory_utilization))
        sync = "z" if sync == "auto" else sync
    return VLLMRollouts(model, tokenizer, engine, sync=sync)


def start_colocated_engine(model: SVFModel, model_name: str | None, gpu_memory_utilization: float):
    """A vLLM engine in this process on this GPU, with the z-only worker extension loaded."""
    from vllm import LLM

    name = model_name or getattr(model.config, "_name_or_path", None)
    if not name:
        raise ValueError("colocate mode loads the model into vLLM by name or path; set `model` in the config")
    # vLLM's external launcher runs the worker in this process and reads the usual torch.distributed variables.
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dtype = str(next(model.base_model.parameters()).dtype).removeprefix("torch.")
    return LLM(model=name, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
               distributed_executor_backend="external_launcher", worker_extension_cls=WORKER_EXTENSION,
               enable_prefix_caching=True, max_num_batched_tokens=4096)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


__all__ = ["ColocateEngine", "HFRollouts", "greedy_answers", "Rollouts", "ServerEngine", "VLLMRollouts", "check_single_process",
           "connect_server", "export_factors", "keyed_uniforms", "make_vllm_rollouts", "merged_svf_weights", "sync_bytes",
           "trim_at_eos"]
