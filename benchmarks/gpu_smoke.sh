#!/usr/bin/env bash
# GPU smoke test (never part of CI): bf16 training with HF rollouts, both sync paths checked against the policy,
# and, where vLLM is installed, vLLM rollouts in colocate mode (and server mode when a server answers).
#   bash benchmarks/gpu_smoke.sh [WORLD_DIR] [extra gpu_smoke.py flags]
# WORLD_DIR defaults to the built-in fact world (built and cached on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
WORLD=${1:-}
shift || true
if [ -z "$WORLD" ]; then
    WORLD=$(python -c "from t2edit.data.world import build_world; print(build_world('builtin', progress=False).path)")
fi
VLLM=none
if python -c "import vllm" 2>/dev/null; then
    VLLM=colocate
    if curl -sf "${T2EDIT_VLLM_URL:-http://127.0.0.1:8000}/health" >/dev/null 2>&1; then VLLM=all; fi
fi
exec python benchmarks/gpu_smoke.py --world "$WORLD" --vllm "$VLLM" --server-url "${T2EDIT_VLLM_URL:-http://127.0.0.1:8000}" "$@"
