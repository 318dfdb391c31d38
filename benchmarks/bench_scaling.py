"""Scaling on one machine, measured side by side: training steps per second of one expert at 1 and 2 processes
(`accelerate launch --num_processes 2`, data parallel over gloo; and FSDP2 for reference), and experts per minute
when many experts are trained at 1 process, in a local pool of 2 worker processes (`--workers 2`) and under the
launcher with 2 processes.

    python benchmarks/bench_scaling.py --json results/scaling_cpu.json
    python benchmarks/bench_scaling.py --device cuda --json results/scaling_gpu.json      # 1 process on one GPU
    python benchmarks/bench_scaling.py --device cuda --model meta-llama/Llama-3.2-1B --data data/knowedit/train_cf.json

`--device cuda` runs the one-process rows only, on the GPU: the check of the single-GPU term of docs/scale.md's
projection (with `--model` and `--data`, on that model and records instead of the fact world).

The world: the built-in records on a fact-world model of the default shape (128 hidden, 4 layers), barely
pretrained (the edits are never learned, so every step scores every rollout and steps cost the same throughout).
Each configuration runs as its own command, the way a user runs it; the rates exclude process start and model
load (the steady-state steps, the expert-training phase), the `wall_s` figures include them.

`--part fanout` is the worker of the expert rows (run by this script, alone or under `accelerate launch`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from t2edit.data.world import WorldConfig, build_world
from t2edit.distributed import processes
from t2edit.evaluation.composition import split_records
from t2edit.setup import load_setup
from t2edit.training import train_experts


def fanout(args) -> None:
    """Train one single-edit expert per record of the first --experts records; the main process writes the time
    of the training phase to --json."""
    procs = processes()
    if procs.launched or args.workers > 1:
        torch.set_num_threads(1)
    setup = load_setup(args.world, args.data, 0, args.experts, progress=False)
    if torch.cuda.is_available():
        setup.model.to("cuda")
    chunks = split_records(setup.edits, len(setup.edits))
    started = time.perf_counter()
    train_experts(setup, chunks, args.out, setup.edits, progress=False, workers=args.workers)
    seconds = time.perf_counter() - started
    if procs.is_main:
        Path(args.json).write_text(json.dumps({"experts": len(chunks), "train_seconds": seconds,
                                               "processes": procs.count, "workers": args.workers}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(processes: int, fsdp: bool = False) -> list[str]:
    if processes == 1:
        return [sys.executable]
    how = ["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port())]


def _run(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - started


def train_row(world: str, work: Path, env: dict, processes: int, steps: int, fsdp: bool = False,
              threads: int = 1, data: str | None = None) -> dict:
    out = work / f"train-{processes}{'-fsdp' if fsdp else ''}-t{threads}"
    wall = _run([*_launch(processes, fsdp), "-m", "t2edit.cli", "train", "--model", world,
                 *(["--data", data] if data else []), "--n_edits", "24",
                 "--edits_per_step", "24", "--neighbours_per_step", "32", "--group_size", "2", "--steps", str(steps),
                 "--eval_every", "0", "--save_every", "0", "--progress", "false", "--output_dir", str(out)], {**env, "OMP_NUM_THREADS": str(threads)})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warm = 2  # the first steps also generate the neighbours' reference answers
    steady = (rows[-1]["seconds"] - rows[warm - 1]["seconds"]) / (len(rows) - warm)
    return {"processes": processes, "fsdp": fsdp, "threads_per_process": threads, "steps": len(rows), "seconds_per_step": round(steady, 4),
            "steps_per_second": round(1 / steady, 3), "wall_s": round(wall, 1),
            "rows_scored_per_step": rows[-1]["rows_scored"], "expert": str(out / "expert")}


def fanout_row(world: str, work: Path, env: dict, experts: int, processes: int, workers: int,
               threads: int = 1, data: str | None = None) -> dict:
    name = f"fanout-p{processes}-w{workers}-t{threads}"
    result = work / f"{name}.json"
    wall = _run([*_launch(processes), str(Path(__file__).resolve()), "--part", "fanout", "--world", world,
                 *(["--data", data] if data else []),
                 "--experts", str(experts), "--workers", str(workers), "--out", str(work / name),
                 "--json", str(result)], {**env, "OMP_NUM_THREADS": str(threads)})
    timing = json.loads(result.read_text())
    return {"processes": processes, "local_pool_workers": workers, "threads_per_process": threads, "experts": experts,
            "train_seconds": round(timing["train_seconds"], 1),
            "experts_per_minute": round(60 * experts / timing["train_seconds"], 2), "wall_s": round(wall, 1),
            "experts_per_minute_with_start": round(60 * experts / wall, 2)}


def _z_diff(a: str, b: str) -> float:
    za, zb = load_file(Path(a) / "expert.safetensors"), load_file(Path(b) / "expert.safetensors")
    return max((za[k] - zb[k]).abs().max().item() for k in za)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="results/scaling_cpu.json")
    parser.add_argument("--work", default="runs/bench_scaling", help="worlds, experts and runs go here")
    parser.add_argument("--steps", type=int, default=14, help="training steps per run")
    parser.add_argument("--experts", type=int, default=8, help="single-edit experts per fan-out run")
    parser.add_argument("--part", choices=("all", "fanout"), default="all")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: every row, GPUs hidden; cuda: the one-process rows on the GPU")
    parser.add_argument("--model", default=None, help="a model instead of the fact world (needs --data)")
    parser.add_argument("--data", default=None, help="records for --model")
    parser.add_argument("--world", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.part == "fanout":
        return fanout(args)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("*"):
        if stale.name not in ("world", "cache") and stale.is_dir():
            subprocess.run(["rm", "-rf", str(stale)], check=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "T2EDIT_CACHE": str(work / "cache"), "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["T2EDIT_CACHE"] = env["T2EDIT_CACHE"]
    if args.model:
        if not args.data:
            raise SystemExit("--model needs --data (the records to edit)")
        world, data = args.model, args.data
    else:
        world, data = str(build_world("builtin", work / "world", config=WorldConfig(steps=3, warmup_steps=1),
                                      progress=False).path), None
    load_before = os.getloadavg()
    started = time.time()
    steps, experts = args.steps, args.experts
    if args.device == "cuda":
        print("one process on the GPU: one expert, then single-edit experts", flush=True)
        train = [train_row(world, work, env, 1, steps, data=data)]
        fan = [fanout_row(world, work, env, experts, 1, 1, data=data)]
    else:
        print("training one expert: 1 process (1 thread, 2 threads), 2 processes (data parallel), 2 processes "
              "(FSDP2)", flush=True)
        train = [train_row(world, work, env, 1, steps, data=data), train_row(world, work, env, 2, steps, data=data),
                 train_row(world, work, env, 2, steps, fsdp=True, data=data),
                 train_row(world, work, env, 1, steps, threads=2, data=data)]
        print(f"training {experts} single-edit experts: 1 process, local pool of 2, launcher with 2", flush=True)
        fan = [fanout_row(world, work, env, experts, 1, 1, data=data),
               fanout_row(world, work, env, experts, 1, 2, data=data),
               fanout_row(world, work, env, experts, 2, 1, data=data),
               fanout_row(world, work, env, experts, 1, 1, 2, data=data)]
    for row in train[1:]:
        row["max_z_diff_to_one_process"] = _z_diff(train[0]["expert"], row["expert"])
    print(json.dumps(train + fan, indent=1), flush=True)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout.strip()
    device = "one " + torch.cuda.get_device_name(0) if args.device == "cuda" else f"{os.cpu_count()} CPU cores"

    def ratio(rows, i, key):
        return round(rows[i][key] / rows[0][key], 3) if len(rows) > i else None

    result = {
        "what": "one expert's REINFORCE steps per second, and single-edit experts per minute, at 1 and 2 processes",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "note": "a 2-core machine shared with other jobs: the figures are indicative"},
        "commit": commit, "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - started, 1),
        "provenance": {"commit": commit, "date": time.strftime("%Y-%m-%d"),
                       "machine": f"{device}, torch {torch.__version__}, load average {load_before[0]:.1f} at the "
                                  "start",
                       "note": "one run of each, side by side"},
        "world": {"records": "built-in (first 24 edited)", "model": "fact world, 128 hidden, 4 layers, barely trained"}
        if not args.model else {"model": args.model, "data": args.data},
        "train": {"settings": {"n_edits": 24, "edits_per_step": 24, "neighbours_per_step": 32, "group_size": 2,
                               "steps": args.steps},
                  "rows": [{k: v for k, v in row.items() if k != "expert"} for row in train],
                  "speedup_2_processes": ratio(train, 1, "steps_per_second"),
                  "speedup_2_processes_fsdp": ratio(train, 2, "steps_per_second"),
                  "speedup_1_process_2_threads": ratio(train, 3, "steps_per_second")},
        "experts": {"rows": fan,
                    "speedup_local_pool_2": ratio(fan, 1, "experts_per_minute"),
                    "speedup_launcher_2": ratio(fan, 2, "experts_per_minute"),
                    "launcher_over_local_pool": round(fan[2]["experts_per_minute"] / fan[1]["experts_per_minute"], 3)
                    if len(fan) > 2 else None},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("train", "experts")}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
