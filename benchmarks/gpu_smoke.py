"""GPU smoke test of training and rollouts (run by hand or by benchmarks/gpu_smoke.sh; CI never runs it). Exits non-zero
when something is wrong.

    python benchmarks/gpu_smoke.py --world DIR                      # bf16 on the GPU, HF rollouts + sync checks
    python benchmarks/gpu_smoke.py --world DIR --device cpu --dtype float32 --steps 20   # the same on CPU
    python benchmarks/gpu_smoke.py --world DIR --vllm colocate       # also vLLM in this process (needs t2edit[vllm])
    python benchmarks/gpu_smoke.py --world DIR --vllm server --server-url http://127.0.0.1:8000
        # with `CUDA_VISIBLE_DEVICES=0 bash scripts/serve_vllm.sh DIR` running and this on CUDA_VISIBLE_DEVICES=1

Checks, each an assertion:
1. a short REINFORCE training in `--dtype` with HF rollouts raises greedy edit success on the edit prompts;
2. after a sync, a copy of the base model loaded through each sync path (merged W' in the server dtype; z only,
   recomposed by `SVFWorkerExtension`, sent as a file as to a server or as tensors as in colocate mode) answers
   the edit prompts greedily exactly as the policy does;
3. with `--vllm`, the same training and check with vLLM rollouts (server and/or colocate, z-only and merged).
Prints step time, rollout tokens/s and sync (payload build / recompose) time, and, on a GPU, bytes and seconds per
sync of Llama-3.2-1B-shaped SVF layers through the worker (transfer and rebuild apart; vLLM's own hop excepted).

Needs only torch, transformers and t2edit (no trl, datasets or wandb): the world directory holds the model.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from t2edit.setup import load_setup  # noqa: E402
from t2edit.rollouts import (ColocateEngine, HFRollouts, ServerEngine, VLLMRollouts, llama_svf_layers,  # noqa: E402
                             make_vllm_rollouts, merged_svf_weights, start_colocated_engine, sync_bytes)
from t2edit.svf import apply_svf  # noqa: E402
from t2edit.leakage import learning_pool  # noqa: E402
from t2edit.rollouts import greedy_answers  # noqa: E402
from t2edit.training import SVFTrainer, TrainConfig  # noqa: E402
from t2edit.vllm_worker import SVFWorkerExtension, encode_z, recompose  # noqa: E402

def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class CopyModel:
    """Stands in for vLLM's model: `load_weights([(hf_name, tensor)])` into named tensors (a copy of the base model's
    parameters, or bare tensors of the right shapes), in place as vLLM does on CUDA."""

    def __init__(self, params: dict[str, torch.Tensor], net=None):
        self.net, self.params = net, params

    def parameters(self):
        return iter(self.params.values())

    @torch.no_grad()
    def load_weights(self, weights):
        for name, tensor in weights:
            self.params[name].copy_(tensor)


class InProcessLLM:
    """vLLM's `LLM` under TRL's external launcher, without vLLM: its worker is `SVFWorkerExtension` over a
    `CopyModel` in this process, and `collective_rpc` calls it directly. `ColocateEngine(InProcessLLM(...))` is the
    colocate path (z handed over as tensors, merged W' loaded in place); `InProcessServer` the server path."""

    def __init__(self, served: CopyModel, device, dtype):
        self.worker = type("Worker", (SVFWorkerExtension,), {})()
        self.worker.device, self.worker.model_runner = torch.device(device), SimpleNamespace(model=served)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=self.worker),
                                          model_config=SimpleNamespace(dtype=dtype))

    def collective_rpc(self, method, args=()):
        return [getattr(self.worker, method)(*args)]  # one result per worker, as vLLM answers

    def reset_prefix_cache(self):
        pass


class InProcessServer(ServerEngine):
    """The server path's z sync (a file in shared memory named by a string RPC), the "server" being this process:
    everything of it but vLLM's HTTP hop."""

    def __init__(self, llm: InProcessLLM):
        super().__init__(client=None, base_url="in-process")
        self.llm = llm

    def rpc(self, method, *args: str):
        return self.llm.collective_rpc(method, args)

    def reset_prefix_cache(self):
        pass

    def dtype(self):
        return self.llm.llm_engine.model_config.dtype


def served_copy(base) -> CopyModel:
    return CopyModel(dict(base.named_parameters()), net=base)


def build(args, world):
    setup = load_setup(world, "builtin", 0, args.n_edits, progress=False)
    dtype = getattr(torch, args.dtype)
    setup.model.to(args.device, dtype)
    pristine = copy.deepcopy(setup.model)  # the "server's" copy, before SVF layers go in
    config = TrainConfig(output_dir=tempfile.mkdtemp(prefix="t2edit-smoke-"), n_edits=args.n_edits, steps=args.steps,
                         eval_every=args.steps, save_every=0, progress=False, edits_per_step=args.n_edits)
    allowed = learning_pool(setup.edits, setup.other_records, setup.extra_neighbour_prompts)
    pool, subject_pool = allowed.neighbour_prompts, allowed.subject_prompts
    model = apply_svf(setup.model, config.svf_config(), progress=False)
    return setup, model, pristine, config, pool, subject_pool


def train(args, world, label, make_rollouts):
    """Train once; returns (figures, model, pristine copy, setup, rollouts)."""
    setup, model, pristine, config, pool, subject_pool = build(args, world)
    rollouts = make_rollouts(model, setup.tokenizer)
    trainer = SVFTrainer(model, setup.tokenizer, setup.edits, pool, config, rollouts=rollouts,
                         subject_prompts=subject_pool)
    before = trainer.edit_success_greedy()
    synchronize(args.device)
    started = time.perf_counter()
    trainer.train()
    synchronize(args.device)
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(config.output_dir, ignore_errors=True)  # the trained model stays in memory; its files go
    after = rows[-1]["edit_success_greedy"]
    figures = {"run": label, "device": args.device, "dtype": args.dtype, "edits": len(setup.edits),
               "steps": len(rows), "edit_success_before": before, "edit_success_after": after,
               "seconds_per_step": rows[-1]["seconds"] / len(rows), "train_seconds": time.perf_counter() - started,
               "rollout_tokens_per_s": rollouts.generated_tokens / max(rollouts.generate_seconds, 1e-9)}
    for key in ("time/sync", "time/sync_transfer", "sync/bytes"):  # vLLM runs: per-step sync after the first
        values = sorted(row[key] for row in rows if key in row)
        if values:
            figures[f"median_{key.replace('/', '_')}"] = values[len(values) // 2]
    print(json.dumps(figures), flush=True)
    assert after >= before + args.min_gain, f"{label}: edit success {before:.2f} -> {after:.2f}, wanted +{args.min_gain}"
    return figures, model, pristine, setup, rollouts


def check_sync_paths(args, model, pristine, setup):
    """Every sync path brings a copy of the base model to the policy's greedy answers; times the payload build."""
    prompts = [r.prompt for r in setup.edits]
    policy = greedy_answers(model, setup.tokenizer, prompts, 8)
    dtype = getattr(torch, args.dtype)
    figures = {}
    for label, sync, engine_type in (("merged", "merged", ColocateEngine), ("z_file", "z", InProcessServer),
                                     ("z_tensors", "z", ColocateEngine)):
        llm = InProcessLLM(served_copy(copy.deepcopy(pristine)), args.device, dtype)
        rollouts = VLLMRollouts(model, setup.tokenizer, engine_type(llm), sync=sync)
        rollouts.sync_weights(full=True)
        served = greedy_answers(llm.worker.model_runner.model.net, setup.tokenizer, prompts, 8)
        agree = sum(a == b for a, b in zip(served, policy)) / len(prompts)
        figures[f"{label}_sync_agreement"] = agree
        assert agree == 1.0, f"{label} sync: served answers differ from the policy's on {1 - agree:.0%} of prompts"
    with torch.no_grad():  # a changed z forces every W' to be rebuilt, as after an optimizer step
        for z in model.z_parameters():
            z.add_(1e-3)
    synchronize(args.device)
    started = time.perf_counter()
    weights = list(merged_svf_weights(model, dtype))
    synchronize(args.device)
    figures["merged_payload_build_ms"] = 1e3 * (time.perf_counter() - started)
    figures["merged_payload_bytes"] = sum(w.numel() * w.element_size() for _, w in weights)
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        payload = encode_z(model.get_z(), directory)
        figures["z_payload_build_ms"] = 1e3 * (time.perf_counter() - started)
    figures["z_payload_bytes"] = json.loads(payload)["bytes"]
    print(json.dumps(figures), flush=True)
    return figures


class ZOnly:
    """The policy side of a sync at Llama-3.2-1B shapes without the model: `get_z` is all `VLLMRollouts` reads for
    a z-only sync once the factors are on the worker."""

    def __init__(self, z: dict[str, torch.Tensor]):
        self.z = z

    def get_z(self):
        return {name: value.clone() for name, value in self.z.items()}


@torch.no_grad()
def llama_1b_sync(args, repeats: int = 5):
    """Seconds per sync of Llama-3.2-1B-shaped SVF layers on this device (random bf16 weights and fp32 factors, every
    z changed before each sync; median of `repeats` after a warm-up): z only through the server path (file in shared
    memory + string RPC, vLLM's HTTP hop excepted) and handed over as tensors (colocate), each split into transfer and
    the worker's rebuild + in-place load; merged: W' built in bf16 by the trainer and copied into the served weights
    (over NCCL to a server, which needs a second GPU: not timed here)."""
    dtype, device = torch.bfloat16, torch.device(args.device)
    rows = {}
    for label, all_linear in (("mlp", False), ("all-linear", True)):
        layers = llama_svf_layers(all_linear)
        sizes = sync_bytes([shape for _, shape in layers], bytes_per_weight=2)
        row = {"layers": len(layers), "merged_bf16_bytes": sizes["merged"], "z_fp32_bytes": sizes["z"]}
        factors = {}  # one set of factors per distinct shape, shared by the layers of that shape
        for _, (out_f, in_f) in layers:
            if (out_f, in_f) not in factors:
                r = min(out_f, in_f)
                factors[(out_f, in_f)] = (torch.randn(out_f, r, device=device) / r ** 0.5,
                                          torch.rand(r, device=device) + 0.1, torch.randn(r, in_f, device=device))
        served = CopyModel({f"{name}.weight": torch.zeros(shape, dtype=dtype, device=device) for name, shape in layers})
        llm = InProcessLLM(served, device, dtype)
        worker = llm.worker
        worker._svf_config, worker._svf_dtype, worker._svf_z = {"mask": "identity", "norm_preserving": False}, dtype, {}
        worker._svf_layers = {name: (*factors[shape], False) for name, shape in layers}
        z = {name: torch.ones(min(shape), device=device) for name, shape in layers}
        for path, engine in (("z_file", InProcessServer(llm)), ("z_tensors", ColocateEngine(llm))):
            rollouts = VLLMRollouts(ZOnly(z), None, engine, sync="z", dtype=dtype)
            rollouts.sent_z = {name: torch.zeros_like(value) for name, value in z.items()}  # factors already there
            syncs = []
            for _ in range(repeats + 1):
                for value in z.values():
                    value.add_(1e-3)
                rollouts.sync_weights()
                assert rollouts.last_sync["layers"] == len(layers), rollouts.last_sync
                syncs.append(rollouts.last_sync)
            for key in ("seconds", "worker_seconds", "transfer_seconds", "to_worker_seconds", "from_worker_seconds"):
                row[f"{path}_{key.removesuffix('_seconds')}_ms"] = 1e3 * statistics.median([s[key] for s in syncs[1:]])
            row[f"{path}_transfer_max_ms"] = 1e3 * max(s["transfer_seconds"] for s in syncs[1:])
            row[f"{path}_bytes"] = syncs[-1]["bytes"]
        expected = recompose(*factors[layers[0][1]], z[layers[0][0]], worker._svf_config).to(dtype)
        assert torch.equal(served.params[f"{layers[0][0]}.weight"], expected), "the worker loaded another W'"
        builds, loads = [], []
        for _ in range(repeats + 1):  # merged: the trainer rebuilds every W' in bf16, then it is loaded in place
            synchronize(device)
            started = time.perf_counter()
            weights = [(f"{name}.weight", recompose(*factors[shape], z[name], worker._svf_config).to(dtype))
                       for name, shape in layers]
            synchronize(device)
            built = time.perf_counter()
            served.load_weights(weights)
            synchronize(device)
            builds.append(built - started)
            loads.append(time.perf_counter() - built)
            del weights
        row["merged_build_ms"] = 1e3 * statistics.median(builds[1:])
        row["merged_load_in_place_ms"] = 1e3 * statistics.median(loads[1:])
        rows[label] = row
        del factors, served, llm, worker
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps({"llama_3.2_1b_sync": rows}), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", required=True, help="a fact-world directory (t2edit world build)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--n-edits", type=int, default=20)
    parser.add_argument("--min-gain", type=float, default=0.3, help="edit success must rise at least this much")
    parser.add_argument("--vllm", choices=["none", "server", "colocate", "all"], default="none")
    parser.add_argument("--server-url", default="http://127.0.0.1:8000")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        print(f"[gpu_smoke] {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    results = {}
    figures, model, pristine, setup, _ = train(args, args.world, "hf", lambda m, t: HFRollouts(m, t))
    results["hf"] = figures
    results["sync_paths"] = check_sync_paths(args, model, pristine, setup)
    if args.device != "cpu":  # minutes of matrix products on a CPU
        results["llama_3.2_1b"] = llama_1b_sync(args)
    engines = {}
    modes = {"none": [], "server": ["server"], "colocate": ["colocate"], "all": ["server", "colocate"]}[args.vllm]
    for mode in modes:
        for sync in ("z", "merged"):
            if mode == "server" and sync == "merged" and args.device == "cpu":
                print("[gpu_smoke] skipped vllm-server-merged: TRL sends W' to a server over NCCL, CUDA only", flush=True)
                continue
            def make(m, t, mode=mode, sync=sync):
                if mode == "server":
                    return make_vllm_rollouts(m, t, mode=mode, sync=sync, base_url=args.server_url)
                # One colocated engine for both sync paths: a second engine in one process would share (and, when the
                # first is collected, lose) vLLM's process groups. Each run's first full sync resets its weights.
                if "colocate" not in engines:
                    engines["colocate"] = ColocateEngine(start_colocated_engine(m, args.world, 0.3))
                return VLLMRollouts(m, t, engines["colocate"], sync=sync)
            figures, model, _, setup, rollouts = train(args, args.world, f"vllm-{mode}-{sync}", make)
            prompts = [r.prompt for r in setup.edits]  # the trainer synced after its last step
            served = [setup.tokenizer.decode(g[0], skip_special_tokens=True).strip()
                      for g in rollouts.sample(prompts, 1, 0.0, 8)]
            policy = greedy_answers(model, setup.tokenizer, prompts, 8)
            assert served == policy, f"vllm-{mode}-{sync}: rollouts after a sync differ from the policy's greedy answers"
            results[f"vllm-{mode}-{sync}"] = figures
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print("[gpu_smoke] all checks passed", flush=True)


if __name__ == "__main__":
    main()
