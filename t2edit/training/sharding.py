"""Training z on a model too large for one device: the SVF model sharded across processes with FSDP2.

`accelerate launch --use_fsdp --fsdp_version 2 --num_processes N scripts/train_rl.py ...` (or a config file with
`distributed_type: FSDP`) asks for it; `shard_svf_model` then shards, with torch's `fully_shard` (the call
accelerate's own FSDP2 preparation makes) and the launch's FSDP settings (reshard after forward, CPU offload, mixed
precision, the block classes to wrap):

* every decoder block and then the whole model: the frozen base weights and each SVF layer's U, s and Vᵀ (made
  frozen parameters for it) are cut into N shards; a process holds one shard of each and gathers a block's full
  tensors only while that block runs (forward, and again in backward);
* z stays whole on every process (`ignored_params`): it is tiny (the singular values of each matrix), the
  optimizer, checkpoints and experts read it as a plain tensor, and every process computes the same gradient.

Why not `accelerator.prepare(model)`: accelerate ignores whole modules only, and an SVF layer holds z next to its
factors; and it turns its FSDP plugin on for GPU processes only, where torch's FSDP2 also runs on CPU processes
over gloo (which is how tests/test_distributed.py runs it).

A sharded model is not data-split (`SVFTrainer.data_procs`): FSDP gathers weights with collectives, so every
process must run the same forwards in the same order; each process runs the whole step on its shard, and
generation runs in lock step (`synced_gpus`). What sharding buys is memory: 1/N of the weights and factors per
device.
"""
from __future__ import annotations

import os

from accelerate.utils import FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

from t2edit.svf import SVFModel

FSDP_ENV = "ACCELERATE_USE_FSDP"


def fsdp_requested() -> bool:
    """Whether the launch asked for FSDP (`accelerate launch --use_fsdp` or `distributed_type: FSDP`)."""
    return os.environ.get(FSDP_ENV, "false").lower() in ("1", "true", "yes")


def fsdp_plugin(accelerator):
    """The launch's FSDP settings: the accelerator's plugin on GPUs, else read from the same environment variables
    (accelerate builds no plugin for CPU processes)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        plugin = FullyShardedDataParallelPlugin()
    return plugin


def _block_classes(model: SVFModel, plugin) -> set[str]:
    names = getattr(plugin, "transformer_cls_names_to_wrap", None) or \
        getattr(model.base_model, "_no_split_modules", None) or []
    return {names} if isinstance(names, str) else set(names)


def shard_svf_model(model: SVFModel, accelerator, plugin=None) -> SVFModel:
    """Shard `model` (freshly made by `apply_svf`, on the CPU or this process's device) across the launch's
    processes, in place; returns it, marked `sharded`."""
    plugin = plugin or fsdp_plugin(accelerator)
    if getattr(plugin, "fsdp_version", 2) != 2:
        raise ValueError("t2edit shards SVF models with FSDP2: launch with `--use_fsdp --fsdp_version 2` (FSDP1 "
                         "flattens z into the sharded parameters)")
    device = accelerator.device
    layers = model.svf_layers()
    for layer in layers.values():  # the factors become frozen parameters, which FSDP shards (it leaves buffers whole)
        for name in ("U", "s", "Vh"):
            tensor = layer._buffers.pop(name)
            layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        layer._cast_factors = layer._cached_weight = layer._cast_weight = None
        layer.z.data = layer.z.data.to(device)  # FSDP moves what it manages; z it leaves alone
        layer.sharded = True
    z = {layer.z for layer in layers.values()}
    kwargs = {"mesh": init_device_mesh(device.type, (accelerator.num_processes,)),
              "mp_policy": getattr(plugin, "mixed_precision_policy", None) or MixedPrecisionPolicy()}
    offload = getattr(plugin, "cpu_offload", None)
    if isinstance(offload, OffloadPolicy):
        kwargs["offload_policy"] = offload
    blocks = _block_classes(model, plugin)
    if not blocks:
        raise ValueError(f"{type(model.base_model).__name__} names no decoder block class (_no_split_modules): "
                         f"give one with --fsdp_transformer_layer_cls_to_wrap")
    wrapped = 0
    for module in list(model.base_model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, ignored_params=z & set(module.parameters()),
                        reshard_after_forward=getattr(plugin, "reshard_after_forward", True), **kwargs)
            wrapped += 1
    if not wrapped:
        raise ValueError(f"no module of {type(model.base_model).__name__} is a {sorted(blocks)}: check "
                         f"--fsdp_transformer_layer_cls_to_wrap")
    fully_shard(model.base_model, ignored_params=z, **kwargs)  # the rest (embeddings, final norm, head): the root
    model.sharded = True
    return model


def local_fraction(model: SVFModel) -> float:
    """The share of the SVF factors' elements this process holds (1 / processes when sharded, 1.0 otherwise)."""
    held = total = 0
    for layer in model.svf_layers().values():
        for tensor in (layer.U, layer.s, layer.Vh):
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            held += local.numel()
            total += tensor.numel()
    return held / max(1, total)


__all__ = ["fsdp_plugin", "fsdp_requested", "local_fraction", "shard_svf_model"]
