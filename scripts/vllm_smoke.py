"""GPU smoke test of the vLLM seam (run by hand when a GPU is available; CI never runs it).

    CUDA_VISIBLE_DEVICES=0 bash scripts/serve_vllm.sh Qwen/Qwen2.5-0.5B &
    CUDA_VISIBLE_DEVICES=1 python scripts/vllm_smoke.py --model Qwen/Qwen2.5-0.5B

Perturbs z, pushes the merged SVF weights to the server, and checks that vLLM's greedy answers equal those of the
merged transformers model.
"""
import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from t2edit.rollouts import VLLMRollouts
from t2edit.svf import SVFConfig, apply_svf

PROMPTS = ["The capital of France is", "The spouse of Barack Obama is", "The mother tongue of Danielle Darrieux is"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--server", default="http://localhost:8000")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    svf = apply_svf(model, SVFConfig(z_init_noise=0.3))
    rollouts = VLLMRollouts(svf, tokenizer, base_url=args.server)
    rollouts.sync_weights()
    from_vllm = [tokenizer.decode(g[0], skip_special_tokens=True) for g in rollouts.sample(PROMPTS, 1, 0.0, 12)]
    merged = svf.merge_and_unload()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    out = merged.generate(**batch, do_sample=False, max_new_tokens=12)
    from_hf = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    for prompt, a, b in zip(PROMPTS, from_vllm, from_hf):
        print(f"{'OK  ' if a.strip() == b.strip() else 'DIFF'} {prompt!r}: vllm={a!r} hf={b!r}")


if __name__ == "__main__":
    main()
