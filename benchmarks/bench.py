"""Speed benchmarks, measured side by side in one run; prints a table and writes JSON.

    python benchmarks/bench.py [--hidden 1024 --intermediate 4096 --layers 4] [--out bench.json]

* svd_cache: apply_svf with a cold SVD cache (decompose + write) vs a warm one (read + verify).
* forward: an SVF model's forward (weight recomposed once per z change) vs the base model's forward.
* routing: two-pass inference (router pass over the unedited model, then the expert on routed rows) vs one pass.
* train_step: forward + backward to z (factored gradient) vs the same through the base model's full weights.
* adaptive_k{K}: K experts behind a router (t2edit.adaptation), every row of the batch a different expert,
  two passes vs one SVF pass, for K = 1, 16 and N (--experts-n), each mixing strategy (rows: per-row singular
  values through U and V; groups: one U diag(σ) Vᵀ per distinct mixture); also one prompt alone (auto too), and the
  memory of one expert on disk and in RAM. A batch of 4 prompts holds at most 4 distinct experts; K = 16 and N
  differ from K = 4 in the experts held (z stacks) and the router's choices, not in the mixtures per call.
  `--only adaptive` runs these rows alone (writes the same JSON layout, e.g. results/bench_adaptive.json).
* world_build: a tiny fact world (first 12 built-in records, WorldConfig.tiny()) pretrained from scratch vs loaded
  from its cache. Targets: pretraining under 30 s on an idle 2-core machine, a cache hit under 5 s (these were
  timed assertions in tests/test_world.py; on a shared machine they belong here). `--no-world` skips it.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def _timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512, help="batch of 4 sequences of tokens/4")
    parser.add_argument("--experts-n", type=int, default=100, help="N for the adaptive_k{N} rows")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--no-world", action="store_true", help="skip the world_build row")
    parser.add_argument("--only", choices=("all", "adaptive"), default="all",
                        help="adaptive: only the adaptive_k* rows and the expert's memory")
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from t2edit.experts import Expert, OwnRouter
    from t2edit.routing import AdaptiveModel
    from t2edit.svf import SVFConfig, apply_svf

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16,
                         vocab_size=1024)
    model = LlamaForCausalLM(config).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    ids = torch.randint(0, 1024, (4, args.tokens // 4), device=device)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        svf_config = SVFConfig(svd_cache_dir=cache)
        if args.only == "adaptive":
            with torch.no_grad():
                memory = adaptive_rows(apply_svf(model, svf_config, progress=False), ids, args.experts_n, rows)
            return _report(args, device, rows, memory)
        cold = _timed(lambda: apply_svf(model, svf_config, progress=False).unload(), repeat=1)
        warm = _timed(lambda: apply_svf(model, svf_config, progress=False).unload(), repeat=3)
        rows.append(("svd_cache", "decompose (cold)", cold, "load (warm)", warm))

        with torch.no_grad():
            base_fwd = _timed(lambda: model(ids))
            svf = apply_svf(model, svf_config, progress=False)
            svf(ids)  # builds W' once
            svf_fwd = _timed(lambda: svf(ids))
            # Two-pass inference: the router's pass over the unedited model, then the routed rows with W'.
            keys = torch.nn.functional.normalize(torch.randn(8, args.hidden), dim=-1)
            routed = AdaptiveModel.with_own_router(svf, Expert.from_model(svf, router=OwnRouter(keys, 0.0)))
            mask = torch.ones_like(ids)
            routed_fwd = _timed(lambda: routed(input_ids=ids, attention_mask=mask))
        rows.append(("forward", "base", base_fwd, "SVF (cached W')", svf_fwd))
        rows.append(("routing", "SVF (one pass)", svf_fwd, "two-pass (routed)", routed_fwd))
        with torch.no_grad():
            memory = adaptive_rows(svf, ids, args.experts_n, rows)

        optimizer = torch.optim.Adam(svf.z_parameters(), lr=1e-3)

        def svf_step():
            loss = svf(ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        svf_train = _timed(svf_step)
        base = svf.unload()
        for p in base.parameters():
            p.requires_grad_(False)
        mlp_weights = [m.weight for n, m in base.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))]
        for w in mlp_weights:
            w.requires_grad_(True)

        def full_step():
            loss = base(ids, labels=ids).loss
            base.zero_grad()
            loss.backward()

        full_train = _timed(full_step)
        rows.append(("train_step", "full MLP weight grads", full_train, "SVF z grads + step", svf_train))

    if not args.no_world:
        rows.append(_world_build_row())
    _report(args, device, rows, memory)


def _report(args, device, rows, memory):
    print(f"device: {device}, Llama hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers, "
          f"{args.tokens} tokens")
    print(f"{'benchmark':<12} {'reference':<24} {'s':>8} {'candidate':<22} {'s':>8} {'ratio':>7}")
    results = []
    for name, ref_name, ref, cand_name, cand, *prompts in rows:
        print(f"{name:<12} {ref_name:<24} {ref:8.3f} {cand_name:<22} {cand:8.3f} {ref / cand:7.1f}x")
        results.append({"benchmark": name, "reference": ref_name, "reference_s": ref, "candidate": cand_name,
                        "candidate_s": cand, "speedup": ref / cand, **({"prompts": prompts[0]} if prompts else {})})
    print(f"one expert: {memory['disk_bytes'] / 1024:.1f} KiB on disk, {memory['ram_bytes'] / 1024:.1f} KiB in RAM "
          f"(z only; the base weights are shared by all experts)")
    with open(args.out, "w") as handle:
        json.dump({"device": device, "args": vars(args), "results": results, "expert_memory": memory}, handle,
                  indent=2)
    print(f"wrote {args.out}")


def adaptive_rows(svf, ids, n_experts: int, rows: list) -> dict:
    """Two-pass latency with K experts (each row of the batch routed to another expert) against one SVF pass."""
    import os

    from t2edit.experts import Expert
    from t2edit.routing import AdaptiveModel, ExpertRouter, one_hot_choice

    class EachRowAnotherExpert(ExpertRouter):
        name = "bench"

        def weights(self, batch):
            choice = torch.arange(batch.input_ids.shape[0]) % self.num_experts
            return one_hot_choice(choice, self.num_experts)

    def make_expert(seed):
        generator = torch.Generator().manual_seed(seed)
        z = {k: 1 + 0.1 * torch.randn(v.shape, generator=generator) for k, v in svf.get_z().items()}
        svf.set_z(z)
        expert = Expert.from_model(svf)
        svf.reset_z()
        return expert

    experts = [make_expert(seed) for seed in range(max(n_experts, 16))]
    mask = torch.ones_like(ids)
    one_pass = _timed(lambda: svf(input_ids=ids, attention_mask=mask))
    single = ids[:1]
    one_pass_single = _timed(lambda: svf(input_ids=single, attention_mask=mask[:1]))
    for k in sorted({1, 16, n_experts}):
        for mixing in ("rows", "groups"):
            model = AdaptiveModel(svf, experts[:k], EachRowAnotherExpert(), mixing=mixing)
            two = _timed(lambda: model(input_ids=ids, attention_mask=mask))
            rows.append((f"adaptive_k{k}", "SVF (one pass)", one_pass, f"two-pass, {mixing}", two, len(ids)))
        for mixing in ("rows", "groups", "auto"):
            model = AdaptiveModel(svf, experts[:k], EachRowAnotherExpert(), mixing=mixing)
            two = _timed(lambda: model(input_ids=single, attention_mask=mask[:1]))
            rows.append((f"adaptive_k{k}_1prompt", "SVF (one pass)", one_pass_single, f"two-pass, {mixing}", two, 1))
    with tempfile.TemporaryDirectory() as directory:
        experts[0].save_pretrained(directory)
        disk = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    ram = sum(t.numel() * t.element_size() for t in experts[0].z.values())
    return {"disk_bytes": disk, "ram_bytes": ram}


def _world_build_row():
    from t2edit.data.world import WorldConfig, build_world

    with tempfile.TemporaryDirectory() as out:
        cold = _timed(lambda: build_world("builtin", out, limit=12, config=WorldConfig.tiny(), progress=False), 1)
        warm = _timed(lambda: build_world("builtin", out, limit=12, config=WorldConfig.tiny(), progress=False), 3)
    return ("world_build", "pretrain 12 records (cold)", cold, "cache hit (warm)", warm)


if __name__ == "__main__":
    main()
