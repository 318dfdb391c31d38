"""Guided REINFORCE against supervised cross-entropy on z: the same edits, neighbours, KL anchor and schedule, one
run after the other on the same machine; greedy edit success over wall time for both, as a table, JSON and plot.

    python benchmarks/compare_objectives.py --model smollm2-135m --data data/knowedit/train_cf.json \
        --n-edits 50 --out runs/objectives

Any TrainConfig field can be overridden as `--set key=value` (e.g. `--set learning_rate=0.05`).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from batch_cost import parse_overrides  # benchmarks/ is on sys.path when this runs as a script


def run_one(objective: str, args, overrides: dict) -> dict:
    from t2edit.jobs import run_training
    from t2edit.training import TrainConfig, apply_preset

    config = TrainConfig(model=args.model, data=args.data, start=args.start, n_edits=args.n_edits,
                         output_dir=str(Path(args.out) / objective), objective=objective, save_every=0,
                         progress=args.progress)
    config = apply_preset(config, explicit=set(overrides) | {"model", "data", "start", "n_edits", "output_dir",
                                                             "objective", "save_every", "progress"})
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    started = time.time()
    run_training(config)
    seconds = time.time() - started
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["seconds"], r["edit_success_greedy"]) for r in rows if "edit_success_greedy" in r]
    return {"objective": objective, "config": asdict(config), "total_seconds": round(seconds, 1), "curve": curve,
            "steps": rows[-1]["step"], "final_edit_success": curve[-1][2] if curve else None}


def load_run(objective: str, directory: str) -> dict:
    rows = [json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["seconds"], r["edit_success_greedy"]) for r in rows if "edit_success_greedy" in r]
    return {"objective": objective, "reused_from": directory, "total_seconds": rows[-1]["seconds"], "curve": curve,
            "steps": rows[-1]["step"], "final_edit_success": curve[-1][2] if curve else None}


def seconds_to(curve, level: float):
    return next((seconds for _, seconds, es in curve if es >= level), None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="data/knowedit/train_cf.json")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--n-edits", type=int, default=50)
    parser.add_argument("--out", default="runs/objectives")
    parser.add_argument("--objectives", default="ce,reinforce")
    parser.add_argument("--level", type=float, default=0.9, help="edit success the wall times are measured to")
    parser.add_argument("--set", action="append", default=[], help="TrainConfig override key=value")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--reuse", action="append", default=[],
                        help="OBJECTIVE=DIR: take that objective's curve from an earlier run's DIR/metrics.jsonl "
                             "(same settings, same machine) instead of training it again")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    reused = dict(item.split("=", 1) for item in args.reuse)
    results = [load_run(objective, reused[objective]) if objective in reused else run_one(objective, args, overrides)
               for objective in args.objectives.split(",")]
    for result in results:
        result["seconds_to_level"] = seconds_to(result["curve"], args.level)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "objectives.json").write_text(json.dumps({"level": args.level, "results": results}, indent=1))
    print(f"| objective | steps | wall s | s to ES {args.level:.2f} | final greedy ES |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['objective']} | {r['steps']} | {r['total_seconds']} | {r['seconds_to_level']} | "
              f"{r['final_edit_success']} |")
    by_name = {r["objective"]: r for r in results}
    if {"ce", "reinforce"} <= set(by_name) and by_name["ce"]["seconds_to_level"] and \
            by_name["reinforce"]["seconds_to_level"]:
        ratio = by_name["reinforce"]["seconds_to_level"] / by_name["ce"]["seconds_to_level"]
        print(f"REINFORCE / CE wall time to ES {args.level:.2f}: {ratio:.2f}x")
    _plot(results, out / "objectives.png", args.level)


def _plot(results, path: Path, level: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for r in results:
        axis.plot([c[1] for c in r["curve"]], [c[2] for c in r["curve"]], "o-", label=r["objective"])
    axis.axhline(level, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("wall seconds (training loop)")
    axis.set_ylabel("greedy edit success (strict)")
    axis.set_title("Guided REINFORCE vs cross-entropy on z")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
