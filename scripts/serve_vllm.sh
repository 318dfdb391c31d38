#!/usr/bin/env bash
# Serve rollouts for scripts/train_rl.py (rollout_backend: vllm) on one GPU, with NCCL weight transfer so the
# trainer can push merged SVF weights after each step. Needs: pip install 't2edit[vllm]'.
#   CUDA_VISIBLE_DEVICES=0 bash scripts/serve_vllm.sh meta-llama/Llama-3.2-1B [port]
set -euo pipefail
MODEL=${1:?usage: serve_vllm.sh MODEL [PORT]}
PORT=${2:-8000}
exec trl vllm-serve --model "$MODEL" --port "$PORT" --gpu-memory-utilization 0.85
