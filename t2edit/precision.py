"""bf16 where it is fast, and frozen weights cast once instead of on every call.

Under `torch.autocast` every matmul casts its fp32 weight to bf16 again, on every call: in a short generation on a
small model on a CPU those casts cost more time than the matmuls themselves. Frozen weights never change, so
`frozen_weights_cast` swaps in bf16 copies made once; the result is bit for bit what autocast computes (autocast's
cast of a tensor that already has its dtype is a no-op)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # AMX tiles: bf16 matmuls several times faster than fp32
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(probe and probe())
    return False


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast where it is fast (GPUs with bf16, CPUs with AMX), fp32 otherwise. `precision` is "auto",
    "bf16" or "fp32"; z, its optimizer state and the SVD factors stay fp32 either way."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision={precision!r}; choose auto, bf16 or fp32")
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_is_fast(device))
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matmuls in right now on `device`, or None outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class FrozenCastCache:
    """bf16 (or any autocast dtype) copies of frozen `nn.Linear` weights, kept across calls: made once, reused as
    long as the module still holds the same weight tensor."""

    def __init__(self):
        self._copies: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}

    def copy_of(self, module: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
        source = module.weight
        cached = self._copies.get(id(module))
        if cached is None or cached[0] is not source or cached[1].dtype != dtype:
            cached = (source, source.detach().to(dtype))
            self._copies[id(module)] = cached
        return cached[1]


@contextlib.contextmanager
def frozen_weights_cast(model: nn.Module):
    """Inside an autocast region: give every frozen floating-point `nn.Linear` of `model` its weight in the autocast
    dtype for the duration of the block (a tied output head gets its own copy; the embedding keeps its weight). The
    copies live on the model (one per weight, made at the first use). Outside autocast, or for weights that are
    trained, nothing changes. Gradients still reach the activations (and z) as under plain autocast."""
    device = next(model.parameters()).device
    dtype = autocast_dtype(device)
    swapped: list[tuple[nn.Linear, nn.Parameter]] = []
    try:
        # A model sharded across processes (FSDP) casts its gathered weights by its own mixed-precision policy.
        if dtype is not None and not getattr(model, "sharded", False):
            cache = model.__dict__.setdefault("_frozen_cast_cache", FrozenCastCache())
            for module in model.modules():
                weight = getattr(module, "weight", None)
                if (type(module) is nn.Linear and weight is not None and not weight.requires_grad
                        and weight.is_floating_point() and weight.dtype != dtype):
                    swapped.append((module, weight))
                    module.weight = nn.Parameter(cache.copy_of(module, dtype), requires_grad=False)
        yield
    finally:
        for module, weight in swapped:
            module.weight = weight
