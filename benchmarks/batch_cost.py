"""What one batch of edits costs per edit with SVF against LoRA and FT-M, side by side in one process on one machine
(default: 50 training-split records on the shipped SmolLM2-135M); a table plus JSON.

Each method edits the whole batch at once, `t2edit eval --mode batch`'s way, at its settings for the model (SVF:
the llm preset, plus any `--set` overrides; LoRA and FT-M: the tuned settings of `t2edit.editors.settings`), and is
scored on the batch's records. The ratio the target reads is SVF's editing seconds per edit over LoRA's, at SVF's
strict edit success against LoRA's.

    python benchmarks/batch_cost.py --data data/knowedit/train_cf.json --out results/batch_cost.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from svf_edit_cost import add_record_arguments, records_found  # benchmarks/ is on sys.path when run as a script


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings as TrainConfig overrides, values read as JSON where they parse."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write it as key=value (e.g. --set learning_rate=0.03)")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def run_method(method: str, setup, overrides: dict, workdir: str) -> dict:
    from t2edit.evaluation import evaluate_editor
    from t2edit.jobs import make_editor, svf_router, train_config_for

    config = train_config_for(setup, output_dir=f"{workdir}/{method}", progress=False, **overrides) \
        if method == "svf" else None
    router = svf_router(setup, ["svf"], None) if method == "svf" else None
    editor = make_editor(method, setup, train_config=config, output_dir=workdir, router=router)
    started = time.perf_counter()
    result = evaluate_editor(editor, setup.model, setup.tokenizer, setup.edits, mode="batch", fluency=False,
                             progress=False)
    row = {"method": method, "edit_seconds": round(result.extra["edit_seconds"], 1),
           "seconds_per_edit": round(result.extra["edit_seconds"] / len(setup.edits), 2),
           "strict_es": result.edit_success_em, "es": result.edit_success, "strict_loc": result.locality_em,
           "loc": result.locality, "strict_port": result.portability_em,
           "wall_seconds": round(time.perf_counter() - started, 1)}
    trainer = getattr(editor, "last_trainer", None)
    if trainer is not None:  # where SVF's seconds go: the REINFORCE loop (its checks included) and the router fit
        steps = [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
        row.update(steps=trainer.step, loop_seconds=steps[-1]["seconds"],
                   first_step_seconds=round(steps[0]["time/step"], 1),
                   later_step_seconds=round(sum(s["time/step"] for s in steps[1:]) / max(1, len(steps) - 1), 1),
                   greedy_checks=sum("edit_success_greedy" in s for s in steps),
                   router_fit_seconds=editor.report.get("router_fit_seconds", 0.0))
    print(row, flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_record_arguments(parser, n=50, out="batch_cost.json")
    parser.add_argument("--methods", default="lora,ft,svf", help="comma-separated; svf is compared with lora")
    parser.add_argument("--set", action="append", default=[], help="SVF TrainConfig override key=value")
    parser.add_argument("--stop-at-lora", action="store_true",
                        help="SVF stops at LoRA's strict edit success (the target's comparison) instead of the "
                             "preset's 1.0; LoRA runs first")
    args = parser.parse_args(argv)
    if not records_found(args, parser):
        return 0
    overrides = parse_overrides(args.set)
    if args.threads:
        torch.set_num_threads(args.threads)
    from t2edit.setup import load_setup

    setup = load_setup(args.model, args.data, args.start, args.n, progress=False)
    with tempfile.TemporaryDirectory(prefix="t2edit-batch-cost-") as workdir:
        methods = [m for m in args.methods.split(",") if m]
        if args.stop_at_lora:
            if "lora" not in methods or "svf" not in methods:
                parser.error("--stop-at-lora compares SVF with LoRA: give --methods with both")
            methods = ["lora"] + [m for m in methods if m != "lora"]
        rows = []
        for method in methods:
            if method == "svf" and args.stop_at_lora:
                overrides["stop_at_edit_success"] = rows[0]["strict_es"]
            rows.append(run_method(method, setup, overrides, workdir))
    by_method = {r["method"]: r for r in rows}
    summary = {}
    if {"svf", "lora"} <= set(by_method):
        svf, lora = by_method["svf"], by_method["lora"]
        summary = {"svf_over_lora_seconds_per_edit": round(svf["edit_seconds"] / lora["edit_seconds"], 2),
                   "target": "<= 2.0 at strict ES >= LoRA's",
                   "met": svf["edit_seconds"] <= 2 * lora["edit_seconds"] and svf["strict_es"] >= lora["strict_es"]}
    print("| method | edit s | s / edit | strict ES | ES | strict Loc | steps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['edit_seconds']} | {r['seconds_per_edit']} | {r['strict_es']:.2f} | "
              f"{r['es']:.3f} | {r['strict_loc']:.2f} | {r.get('steps', '')} |")
    print(json.dumps(summary))
    from key_samples import provenance  # benchmarks/ is on sys.path when this runs as a script

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"{torch.get_num_threads()} CPU threads"
    payload = {"provenance": provenance(), "model": args.model,
               "records": f"{Path(args.data).name} {args.start}..{args.start + args.n - 1}", "device": device,
               "svf_overrides": overrides, "summary": summary, "rows": rows}
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
