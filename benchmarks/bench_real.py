"""Benchmarks on a real LLM (default: the shipped SmolLM2-135M), side by side in one run; a table plus JSON.

* setup: seconds from nothing loaded to the trainer's first step (model from the t2edit cache, SVD from its cache,
  trainer built), as `scripts/train_rl.py` pays them.
* reinforce_step: one guided-REINFORCE step of the llm preset (sampling, rewards, scoring, update) against a plain
  forward + backward of the rows that step scored: what the step costs beyond its tokens.
* step_update: the same step less its sampling and neighbour-reference time (the trainer's `time/sampling` and
  `time/references`): scoring, KL and the update against the same forward + backward.
* svf_vs_lora: forward + backward of the same rows through SVF (z of every MLP matrix) and through PEFT LoRA r=8
  on q_proj / v_proj (EasyEdit's LoRA); target: SVF ≤ 1.2× LoRA.
* precision: the same SVF forward + backward in fp32 and under bf16 autocast.

    python benchmarks/bench_real.py --data data/knowedit/train_cf.json --out results/bench_real.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch  # noqa: F401  (loaded before transformers, as bench.py does)

from bench import _timed  # benchmarks/ is on sys.path when this runs as a script: one timer for both benches


def _warm_timed(fn) -> float:
    fn()  # warm-up (kernel selection, caches) before the timed repeats
    return _timed(fn)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="real-facts", help="records file (or a shipped name such as real-facts)")
    parser.add_argument("--n-edits", type=int, default=24)
    parser.add_argument("--out", default="bench_real.json")
    args = parser.parse_args(argv)

    from t2edit.data.loaders import load_records
    from t2edit.leakage import learning_pool
    from t2edit.models import load_model
    from t2edit.svf import apply_svf
    from t2edit.training import SVFTrainer, TrainConfig, apply_preset, sequence_logprobs

    rows = []
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    records = load_records(args.data)
    edits, others = records[:args.n_edits], records[args.n_edits:]
    config = apply_preset(TrainConfig(model=args.model, output_dir="/tmp/t2edit-bench-real", progress=False,
                                      save_every=0, eval_every=0))
    pool = learning_pool(edits, others)
    svf = apply_svf(model, config.svf_config(), progress=False)
    trainer = SVFTrainer(svf, tokenizer, edits, pool.neighbour_prompts, config, subject_prompts=pool.subject_prompts)
    setup = time.perf_counter() - started
    rows.append(("setup", "-", float("nan"), "load + SVD + trainer", setup))

    captured = {}
    scorer = sequence_logprobs

    def spy(model_, tokenizer_, prompts, completions, **kwargs):  # records what a step scores
        captured.setdefault("prompts", []).extend(prompts)
        captured.setdefault("completions", []).extend(completions)
        return scorer(model_, tokenizer_, prompts, completions, **kwargs)

    import t2edit.training.trainer as trainer_module

    trainer_module.sequence_logprobs = spy
    trainer.training_step()  # warm-up step (first neighbour references, kernel selection)
    captured.clear()
    step_start = time.perf_counter()
    step_metrics = trainer.training_step()
    step = time.perf_counter() - step_start
    # The part of the step that scores its rows and updates z (no sampling, no neighbour reference answers).
    update = step - step_metrics["time/sampling"] - step_metrics["time/references"]
    trainer_module.sequence_logprobs = scorer
    prompts, completions = captured["prompts"], captured["completions"]

    def forward_backward(net, precision):
        def run():
            logps, _ = sequence_logprobs(net, tokenizer, prompts, completions, precision=precision)
            logps.sum().backward()
        return run

    from peft import LoraConfig, get_peft_model

    # LoRA on a second copy of the base model, so the two are timed turn about in the same minutes: a busy moment
    # of the machine then slows both sides of the ratio instead of one.
    lora = get_peft_model(load_model(args.model)[0],
                          LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    svf_run, lora_run = forward_backward(svf, "auto"), forward_backward(lora, "auto")
    svf_run(), lora_run()  # warm-up (kernel selection, caches)
    svf_bf16 = lora_bf16 = float("inf")
    for _ in range(5):
        svf_bf16 = min(svf_bf16, _timed(svf_run, repeat=1))
        lora_bf16 = min(lora_bf16, _timed(lora_run, repeat=1))
    rows.append(("reinforce_step", f"fwd+bwd of its {len(prompts)} rows", svf_bf16, "one REINFORCE step", step))
    rows.append(("step_update", f"fwd+bwd of its {len(prompts)} rows", svf_bf16, "step less sampling/refs", update))
    svf_fp32 = _warm_timed(forward_backward(svf, "fp32"))
    rows.append(("precision", "SVF fwd+bwd fp32", svf_fp32, "bf16 autocast", svf_bf16))
    rows.append(("svf_vs_lora", "LoRA r=8 q/v fwd+bwd", lora_bf16, "SVF (MLP z) fwd+bwd", svf_bf16))

    print(f"{args.model}: {len(edits)} edits, {len(prompts)} rows scored in the timed step")
    print(f"{'benchmark':<15} {'reference':<28} {'s':>8} {'candidate':<24} {'s':>8} {'ratio':>7}")
    results = []
    for name, ref_name, ref, cand_name, cand in rows:
        print(f"{name:<15} {ref_name:<28} {ref:8.3f} {cand_name:<24} {cand:8.3f} {cand / ref:7.2f}x")
        results.append({"benchmark": name, "reference": ref_name, "reference_s": ref, "candidate": cand_name,
                        "candidate_s": cand, "ratio": cand / ref if ref == ref else None})
    with open(args.out, "w") as handle:
        json.dump({"model": args.model, "device": str(svf.device), "edits": len(edits), "rows": len(prompts),
                   "results": results}, handle, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
