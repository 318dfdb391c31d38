"""z-only weight sync: the half that runs inside vLLM's workers, on the rollout GPU.

vLLM mixes `SVFWorkerExtension` into its GPU worker when started with
`--worker-extension-cls t2edit.vllm_worker.SVFWorkerExtension` (server) or `LLM(worker_extension_cls=...)`
(colocate), so its methods see the worker's `self.model_runner` and `self.device`. The trainer drives them through
`collective_rpc`; vLLM's HTTP endpoint passes only strings, so every argument is a JSON string:

1. `svf_load_factors(manifest)` once per run (and after a resume): U, s, Vᵀ of every SVF layer, read from the
   safetensors files the trainer wrote (same machine), are kept on the rollout GPU next to the served model.
2. `svf_set_z(payload)` after every optimizer step: only the z vectors (Llama-3.2-1B MLP: 98,304 floats, 393 KB)
   travel, in a file in shared memory that the message names (`ZWriter` / `ZReader`); in colocate mode, where the
   worker lives in the trainer's process, `svf_set_z_tensors(z)` takes the tensors themselves. W' = U diag(s·f(z)) Vᵀ
   is recomposed here, with the trainer's own formula (`recompose`), and handed to the model under the base model's
   parameter names, which vLLM fuses into gate/up and q/k/v (`load_into_model_runner`: in place on CUDA, a
   layer-wise reload on vLLM's CPU backend).

Under vLLM's tensor parallelism each rank holds a slice of every projection; `tp_split`, `tp_shard`, `shard_factors`
and `recompose_shard` give the slice of W' a rank holds from that rank's slice of U or Vᵀ alone (tested on tensors
split as vLLM splits them; the extension does not load slices into a live TP engine yet: docs/scale.md).

This module imports only torch, safetensors and t2edit.svf, so it loads in any vLLM process.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import torch

PAYLOAD_VERSION = 5  # 5: z in a file kept in shared memory, overwritten in place; svf_set_z answers {"layers", ...}


def _layout_path(path: str) -> str:
    return path.removesuffix(".bin") + ".json"


class ZWriter:
    """The trainer's half of z's way to a server's workers: one float32 file in `directory` (shared memory, see
    `z_directory`), mapped once and overwritten in place on every sync while the layers sent stay the same, with
    their names and lengths in a JSON file beside it; a new pair of files when they change. Only a short message
    naming the file crosses vLLM's RPC, which passes strings through its API server and engine processes
    (benchmarks/bench_vllm_sync.py times an RPC carrying z inline against an empty one).

    Why in place: a fresh file costs new memory pages on every sync, so at large-model shapes writing and reading a
    new file is several times slower than overwriting a mapped one (docs/gpus-and-vllm.md). No reader sees half a
    write: the message goes after the write, and the next write waits for the workers' answer to it."""

    def __init__(self, directory: str):
        self.directory = directory
        self.layout: tuple[list[str], list[int]] | None = None
        self.path: str | None = None
        self.buffer: torch.Tensor | None = None  # the file, mapped
        self.files = 0

    def write(self, z: dict[str, torch.Tensor]) -> str:
        """Write z and return the message that names it for `ZReader.read` (`svf_set_z`)."""
        if not z:
            raise ValueError("no z to send: give at least one layer")
        names = list(z)
        lengths = [z[name].numel() for name in names]
        if self.layout != (names, lengths):
            self._new_file(names, lengths)
        flat = [z[name].detach().reshape(-1) for name in names]
        if all(t.device.type == "cpu" and t.dtype == torch.float32 for t in flat):
            torch.cat(flat, out=self.buffer)  # straight into the mapped file
        else:  # joined where z lives, then copied off the GPU once (each copy has a fixed cost, so not one per layer)
            self.buffer.copy_(torch.cat([t.to(flat[0].device, torch.float32) for t in flat]))
        return json.dumps({"version": PAYLOAD_VERSION, "path": self.path, "bytes": self.buffer.numel() * 4})

    def _new_file(self, names: list[str], lengths: list[int]) -> None:
        previous = self.path
        self.files += 1
        path = os.path.join(self.directory, f"z-{self.files}.bin")
        with open(path, "wb") as file:
            file.truncate(4 * sum(lengths))
        partial = f"{_layout_path(path)}.tmp"
        with open(partial, "w") as file:
            json.dump({"names": names, "lengths": lengths}, file)
        os.replace(partial, _layout_path(path))  # a reader never sees half a layout
        self.buffer = torch.from_file(path, shared=True, size=sum(lengths), dtype=torch.float32)
        self.path, self.layout = path, (names, lengths)
        if previous is not None:  # a worker still mapping it keeps its pages until it maps the new one
            for stale in (previous, _layout_path(previous)):
                os.remove(stale)


class ZReader:
    """The worker's half: maps the trainer's z file once per layout and copies z out of it on every sync, into one
    buffer on `device` reused while the layout stays (every layer of the layout is rewritten on each sync, so views
    of the buffer held from the last one stay right)."""

    def __init__(self):
        self.path: str | None = None  # the file mapped now, with its layout and the buffer z is copied into
        self.mapped = self.buffer = None
        self.names: list[str] = []
        self.lengths: list[int] = []

    def read(self, payload: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        data = json.loads(payload)
        if data.get("version") != PAYLOAD_VERSION:
            raise ValueError(f"z payload version {data.get('version')!r}; this worker reads version {PAYLOAD_VERSION} "
                             f"(install the same t2edit on the trainer and the vLLM server)")
        if data["path"] != self.path:
            with open(_layout_path(data["path"])) as file:
                layout = json.load(file)
            total = sum(layout["lengths"])
            self.mapped = torch.from_file(data["path"], shared=True, size=total, dtype=torch.float32)
            self.buffer = torch.empty(total, dtype=torch.float32, device=device)
            self.names, self.lengths, self.path = layout["names"], layout["lengths"], data["path"]
        self.buffer.copy_(self.mapped)
        return dict(zip(self.names, torch.split(self.buffer, self.lengths)))


def encode_z(z: dict[str, torch.Tensor], directory: str) -> str:
    """z written once to a new `ZWriter` in `directory`; returns the message (for one-off use and tests)."""
    return ZWriter(directory).write(z)


def decode_z(payload: str) -> dict[str, torch.Tensor]:
    """z as a message names it, read once (on the CPU)."""
    return ZReader().read(payload)


def z_directory() -> str:
    """A fresh directory for z files: in shared memory where the machine has it (/dev/shm, a RAM filesystem on
    Linux; a disk write can stall), else the system's temporary directory."""
    shared = "/dev/shm"
    base = shared if os.path.isdir(shared) and os.access(shared, os.W_OK) else None
    return tempfile.mkdtemp(prefix="t2edit-svf-z-", dir=base)


def recompose(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, z: torch.Tensor, svf_config: dict) -> torch.Tensor:
    """W' (out, in) in the factors' dtype, exactly as `SVFLinear.merged_weight` builds it."""
    from t2edit.svf import SVFConfig

    config = SVFConfig(**svf_config)
    s32 = s.float()
    sigma = s32 * config.multiplier(z.to(s.device, torch.float32))
    if config.norm_preserving:
        sigma = sigma * (s32.sum() / sigma.sum())
    return (U * sigma.to(U.dtype)) @ Vh


# Tensor parallelism: how vLLM cuts each projection of a Llama-style model across its TP ranks. Column-parallel
# layers (ColumnParallelLinear, and the fused MergedColumnParallelLinear gate_up / QKVParallelLinear qkv, member by
# member) keep a slice of the output rows of W (out, in); row-parallel ones (RowParallelLinear) a slice of its input
# columns.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def tp_split(layer: str) -> str:
    """"column" or "row": the dimension of W (out, in) vLLM splits for this HF layer name across TP ranks."""
    projection = layer.rsplit(".", 1)[-1]
    if projection in COLUMN_PARALLEL:
        return "column"
    if projection in ROW_PARALLEL:
        return "row"
    raise ValueError(f"{layer}: not a projection vLLM's tensor parallelism splits in a known way "
                     f"({', '.join(COLUMN_PARALLEL + ROW_PARALLEL)})")


def tp_shard(layer: str, rank: int, tp_size: int, num_kv_heads: int | None = None) -> tuple[int, int]:
    """(which shard, how many) of `layer`'s split dimension TP rank `rank` holds. k/v projections with fewer
    key/value heads than ranks are replicated as vLLM's QKVParallelLinear does: rank r holds head r // (size / heads)."""
    projection = layer.rsplit(".", 1)[-1]
    if projection in ("k_proj", "v_proj") and num_kv_heads is not None and num_kv_heads < tp_size:
        if tp_size % num_kv_heads:
            raise ValueError(f"{tp_size} TP ranks do not divide into {num_kv_heads} key/value heads")
        return rank // (tp_size // num_kv_heads), num_kv_heads
    return rank, tp_size


def shard_factors(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, split: str, shard: int, shards: int):
    """The factors one TP rank keeps to rebuild its own slice of W' = U diag(σ) Vᵀ: for a column split the rank's
    rows of U (and all of Vᵀ), for a row split the rank's columns of Vᵀ (and all of U). s (and z) stay whole:
    every slice scales the same singular values."""
    if split == "column":
        if U.shape[0] % shards:
            raise ValueError(f"{U.shape[0]} output rows do not split into {shards} shards")
        return U.chunk(shards, 0)[shard].contiguous(), s, Vh
    if split == "row":
        if Vh.shape[1] % shards:
            raise ValueError(f"{Vh.shape[1]} input columns do not split into {shards} shards")
        return U, s, Vh.chunk(shards, 1)[shard].contiguous()
    raise ValueError(f"split {split!r}: column or row")


def recompose_shard(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, z: torch.Tensor, svf_config: dict,
                    split: str, shard: int, shards: int) -> torch.Tensor:
    """This TP rank's slice of W' (what vLLM's loader would narrow the full W' to), from its own factors only:
    1/shards of the recompose arithmetic, and of U or Vᵀ in memory."""
    return recompose(*shard_factors(U, s, Vh, split, shard, shards), z, svf_config)


def reloads_layerwise(model) -> bool:
    """True where vLLM repacked the served weights after loading (its CPU backend hands linear weights to oneDNN and
    leaves empty parameters without weight loaders): new weights must then go through vLLM's layer-wise reload."""
    return any(p.numel() == 0 for p in model.parameters())


def load_into_model_runner(model_runner, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Hand W' (HF names) to a live vLLM model: in place through its weight loaders, as TRL does (CUDA), or through
    `reload_weights`, which reruns the platform's weight processing for every layer it receives (CPU). A layer-wise
    reload must receive every member of a fused projection (gate+up, q+k+v), or the missing part is lost."""
    model = model_runner.model
    if not reloads_layerwise(model):
        model.load_weights(weights)
        return
    received: dict[str, set[str]] = {}  # module prefix -> projections sent ("model.layers.0.mlp" -> {"gate_proj"})
    for name, _ in weights:
        prefix, projection, _ = name.rsplit(".", 2)
        received.setdefault(prefix, set()).add(projection)
    for prefix, projections in received.items():
        for fused, members in getattr(model, "packed_modules_mapping", {}).items():
            if projections & set(members) and not set(members) <= projections:
                raise RuntimeError(f"this vLLM engine reloads weights layer by layer, so {prefix}.{fused} needs all of "
                                   f"{members} but got {sorted(projections & set(members))}: add the others to the "
                                   f"SVF target_modules, or serve on CUDA (weights load in place there)")
    model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)


class SVFWorkerExtension:
    """Mixed into vLLM's worker: holds the SVF factors on the rollout GPU and rebuilds W' from z."""

    def svf_ping(self, payload: str = "") -> str:
        """Whether the extension is loaded (and which payload version it reads); `payload` is ignored, so timing
        pings with and without one measures what carrying it through the RPC costs."""
        return f"t2edit-svf-{PAYLOAD_VERSION}"

    def svf_load_factors(self, manifest: str) -> int:
        from safetensors.torch import load_file

        spec = json.loads(manifest)
        self._svf_config = spec["svf_config"]
        self._svf_dtype = getattr(torch, spec["dtype"])
        self._svf_layers, self._svf_z = {}, {}
        for layer in spec["layers"]:
            tensors = load_file(layer["path"], device=str(self.device))
            self._svf_layers[layer["name"]] = (tensors["U"], tensors["S"], tensors["Vh"], bool(layer["transposed"]))
        return len(self._svf_layers)

    def svf_set_z(self, payload: str) -> dict:
        """Rebuild W' from the z in `payload` (a message from `ZWriter.write`) and load it; returns the layers loaded
        and the seconds it took here, so the trainer can tell transfer time from recompose time."""
        arrived = time.time()  # wall clock, comparable with the trainer's (same machine): splits the transfer in two
        if getattr(self, "_svf_reader", None) is None:
            self._svf_reader = ZReader()
        return self._svf_apply(self._svf_reader.read(payload, self.device), arrived)

    def svf_set_z_tensors(self, z: dict) -> dict:
        """`svf_set_z` for a caller in this process (colocate mode, where `collective_rpc` hands its arguments over
        as they are): z arrives as tensors, with no file to write or read. The worker keeps them; the caller must not
        change them afterwards (`SVFModel.get_z` returns copies)."""
        return self._svf_apply(dict(z), time.time())

    def _svf_apply(self, received: dict, arrived: float) -> dict:
        layers = getattr(self, "_svf_layers", None)
        if layers is None:
            raise RuntimeError("svf_set_z before svf_load_factors: the trainer must send the factors first")
        unknown = sorted(set(received) - set(layers))
        if unknown:
            raise RuntimeError(f"z for layers without factors here: {unknown[:3]}; the trainer must resend the factors")
        started = time.perf_counter()  # reading z counts as transfer; from here on it is the worker's own work
        self._svf_z.update(received)
        # A layer-wise reload (vLLM on CPU) rebuilds whole fused projections: every layer goes, not only the new z.
        wanted = self._svf_z if reloads_layerwise(self.model_runner.model) else received
        names = [name for name in layers if name in wanted]  # model order, as vLLM's loaders expect
        weights = []
        with torch.no_grad():
            for name in names:
                U, s, Vh, transposed = layers[name]
                weight = recompose(U, s, Vh, self._svf_z[name], self._svf_config).to(self._svf_dtype)
                weights.append((f"{name}.weight", weight.T.contiguous() if transposed else weight))
            load_into_model_runner(self.model_runner, weights)
        count = len(weights)
        del weights  # freeing the rebuilt W' is this worker's work too (not negligible at 1B shapes on a CPU)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"layers": count, "seconds": time.perf_counter() - started, "arrived": arrived, "left": time.time()}


__all__ = ["COLUMN_PARALLEL", "ROW_PARALLEL", "SVFWorkerExtension", "ZReader", "ZWriter", "decode_z", "encode_z",
           "load_into_model_runner", "recompose", "recompose_shard", "reloads_layerwise", "shard_factors", "tp_shard",
           "tp_split", "z_directory"]
