# GPU image for training with vLLM rollouts (two GPUs: vLLM on one, the policy on the other).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WORKDIR /t2edit
COPY pyproject.toml README.md ./
COPY t2edit ./t2edit
COPY rewards ./rewards
RUN pip install --no-cache-dir '.[vllm]'
COPY configs ./configs
COPY scripts ./scripts
CMD ["t2edit", "demo"]
