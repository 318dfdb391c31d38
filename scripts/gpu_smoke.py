"""GPU smoke test of training and rollouts (run by hand or by scripts/gpu_smoke.sh; CI never runs it). Exits non-zero
when something is wrong.

    python scripts/gpu_smoke.py --world DIR                      # bf16 on the GPU, HF rollouts + sync checks
    python scripts/gpu_smoke.py --world DIR --device cpu --dtype float32 --steps 20   # the same on CPU
    python scripts/gpu_smoke.py --world DIR --vllm colocate       # also vLLM in this process (needs t2edit[vllm])
    python scripts/gpu_smoke.py --world DIR --vllm server --server-url http://127.0.0.1:8000
        # with `CUDA_VISIBLE_DEVICES=0 bash scripts/serve_vllm.sh DIR` running and this on CUDA_VISIBLE_DEVICES=1

Checks, each an assertion:
1. a short REINFORCE training in `--dtype` with HF rollouts raises greedy edit success on the edit prompts;
2. after a sync, a copy of the base model loaded through each sync path (merged W' in the server dtype; z only,
   recomposed by `SVFWorkerExtension`) answers the edit prompts greedily exactly as the policy does;
3. with `--vllm`, the same training and check with vLLM rollouts (server and/or colocate, z-only and merged).
Prints step time, rollout tokens/s and sync (payload build / recompose) time, and the bytes per sync of
Llama-3.2-1B-shaped SVF layers with the time to rebuild them on this device.

Needs only torch, transformers and t2edit (no trl, datasets or wandb): the world directory holds the model.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from t2edit.jobs import load_setup  # noqa: E402
from t2edit.rollouts import (ColocateEngine, HFRollouts, VLLMRollouts, make_vllm_rollouts, merged_svf_weights,  # noqa: E402
                             start_colocated_engine, sync_bytes)
from t2edit.svf import apply_svf  # noqa: E402
from t2edit.leakage import learning_pool  # noqa: E402
from t2edit.training import SVFTrainer, TrainConfig, greedy_answers  # noqa: E402
from t2edit.vllm_worker import SVFWorkerExtension, encode_z, recompose  # noqa: E402

LLAMA_1B = dict(hidden=2048, mlp=8192, layers=16, heads=32, kv_heads=8, head_dim=64)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class CopyModel:
    """Stands in for vLLM's model: `load_weights([(hf_name, tensor)])` into a copy of the base model."""

    def __init__(self, base):
        self.net = base
        self.params = dict(base.named_parameters())

    def parameters(self):
        return self.net.parameters()

    @torch.no_grad()
    def load_weights(self, weights):
        for name, tensor in weights:
            self.params[name].copy_(tensor)


class InProcessEngine:
    """An engine whose worker is `SVFWorkerExtension` over a `CopyModel` in this process (no vLLM needed)."""

    def __init__(self, base, device, dtype):
        self.worker = type("Worker", (SVFWorkerExtension,), {})()
        self.worker.device, self.worker.model_runner = torch.device(device), SimpleNamespace(model=CopyModel(base))
        self._dtype = dtype

    def load_weights(self, weights):
        self.worker.model_runner.model.load_weights(weights)

    def rpc(self, method, *args):
        return [getattr(self.worker, method)(*args)]  # one result per worker, as vLLM answers

    def needs_every_layer(self):
        return False  # the copy loads in place

    def reset_prefix_cache(self):
        pass

    def dtype(self):
        return self._dtype


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
    """Both sync paths bring a copy of the base model to the policy's greedy answers; times the payload build."""
    prompts = [r.prompt for r in setup.edits]
    policy = greedy_answers(model, setup.tokenizer, prompts, 8)
    figures = {}
    for sync in ("merged", "z"):
        engine = InProcessEngine(copy.deepcopy(pristine), args.device, getattr(torch, args.dtype))
        rollouts = VLLMRollouts(model, setup.tokenizer, engine, sync=sync)
        rollouts.sync_weights(full=True)
        served = greedy_answers(engine.worker.model_runner.model.net, setup.tokenizer, prompts, 8)
        agree = sum(a == b for a, b in zip(served, policy)) / len(prompts)
        figures[f"{sync}_sync_agreement"] = agree
        assert agree == 1.0, f"{sync} sync: served answers differ from the policy's on {1 - agree:.0%} of prompts"
    with torch.no_grad():  # a changed z forces every W' to be rebuilt, as after an optimizer step
        for z in model.z_parameters():
            z.add_(1e-3)
    synchronize(args.device)
    started = time.perf_counter()
    weights = list(merged_svf_weights(model, getattr(torch, args.dtype)))
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


def llama_1b_shapes(all_linear: bool):
    h, m, n = LLAMA_1B["hidden"], LLAMA_1B["mlp"], LLAMA_1B["layers"]
    per_layer = [(m, h), (m, h), (h, m)]
    if all_linear:
        q, kv = LLAMA_1B["heads"] * LLAMA_1B["head_dim"], LLAMA_1B["kv_heads"] * LLAMA_1B["head_dim"]
        per_layer += [(q, h), (kv, h), (kv, h), (h, q)]
    return per_layer * n


@torch.no_grad()
def llama_1b_rebuild(args):
    """Bytes per sync for Llama-3.2-1B-shaped SVF layers, and the time to recompose every W' from z on this device
    (what the trainer does before a merged sync, and the worker after a z-only one)."""
    rows = {}
    for label, all_linear in (("mlp", False), ("all-linear", True)):
        shapes = llama_1b_shapes(all_linear)
        sizes = sync_bytes(shapes, bytes_per_weight=2)
        row = {"merged_bf16_bytes": sizes["merged"], "merged_fp32_bytes": sizes["merged"] * 2,
               "z_fp32_bytes": sizes["z"], "recompose_ms": None}
        if args.device != "cpu":
            distinct = {s: None for s in shapes}  # factors of each distinct shape, reused for every layer
            for out_f, in_f in distinct:
                r = min(out_f, in_f)
                distinct[(out_f, in_f)] = (torch.randn(out_f, r, device=args.device),
                                           torch.rand(r, device=args.device) + 0.1,
                                           torch.randn(r, in_f, device=args.device))
            zs = {f"layer{i}": torch.ones(min(s)) for i, s in enumerate(shapes)}
            config = {"mask": "identity", "norm_preserving": False}
            for repeat in range(2):  # the first pass warms up the kernels
                synchronize(args.device)
                started = time.perf_counter()
                for i, shape in enumerate(shapes):
                    U, s, Vh = distinct[shape]
                    recompose(U, s, Vh, zs[f"layer{i}"], config).to(torch.bfloat16)
                synchronize(args.device)
            row["recompose_ms"] = 1e3 * (time.perf_counter() - started)
            del distinct
            torch.cuda.empty_cache()
        rows[label] = row
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
    results["llama_3.2_1b"] = llama_1b_rebuild(args)
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
