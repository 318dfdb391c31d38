"""Write the documentation's result tables from the committed results JSON files (numbers in the docs come from code).

    python tools/readme_tables.py            # rewrite every generated block in README.md and docs/*.md
    python tools/readme_tables.py --check    # exit 1 if any of those files disagrees with its JSON (a test runs this)

Each block sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->`, in whichever of README.md and docs/*.md
holds that marker, and is generated whole: the table, the mean of (ES, Loc, Port) of every method in it (a
comparison leaves no method out), one provenance line (commit, date and machine, from the JSON's `provenance`), the
results file it came from, and the one command that reproduces that file. To refresh a table, run its command, copy
the JSON it writes over the file named here, set its `provenance` ({"commit", "date", "machine"}), and run this
script.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
KNOWEDIT = "data/knowedit/train_cf.json"  # KnowEdit (hub: zjunlp/KnowEdit, benchmark/wiki_counterfact/train_cf.json)


class Table(NamedTuple):
    name: str
    source: str  # results JSON, relative to the repository root
    command: str  # the one command that reproduces it
    writes: str  # the file that command writes (copied over `source` to refresh the table)
    note: str = ""  # said after the command instead of "(writes ...)" where the command writes no such file


_GRID_NOTE = ("no single command: the CLI takes no FT-M / LoRA setting options, so each row is that command's "
              "evaluation run through `evaluate_editor(get_editor(method, **setting), ...)` with the row's "
              "`FTEditorConfig` / `LoRAEditorConfig` settings")
_FIELD_GRID_NOTE = ("each row is that command's evaluation, one record at a time, through "
                    "`evaluate_editor(Editor(Config(**options)), ...)` with the row's `options` from the JSON; "
                    "records 210-229 with `--start 210 --n 20`")
FIELD_EDITORS = "rome,memit,alphaedit,grace,wise,serac"
_SEQ520 = "python benchmarks/device_seq500.py --data " + KNOWEDIT
STREAM_COMMAND = (f"t2edit eval --model smollm2-135m --data {KNOWEDIT} --n 1000 --sequential --method svf "
                  "--points 10,50,100,250,500,560,1000 --score-sample 100 --workers 2 --out runs/stream")
_STREAM_NOTE = ("writes `runs/stream/stream.json`; the other methods' rows: the same command with `--method "
                "lora,ft --points 10,50,100,250,500,1000 --time-budget 35 --out runs/field_a` (then `--method ft --points "
                "10,50,100,250,500 --time-budget 32`, same --out), `--method grace "
                "--time-budget 70 --out runs/field_b` and `--method wise,memit,alphaedit --time-budget 6`; this file "
                "holds their rows")


TABLES = [
    Table("demo-smollm2", "results/demo_smollm2.json", "t2edit demo --out runs/demo", "runs/demo/results.json"),
    Table("demo", "results/demo.json", "t2edit demo --model world --out runs/demo", "runs/demo/results.json"),
    Table("knowedit-cf200", "results/knowedit_cf200.json",
          f"t2edit world build --data {KNOWEDIT} --limit 200 --out worlds/cf200 && "
          "accelerate launch scripts/train_rl.py --config configs/demo.yaml --model worlds/cf200 "
          f"--data {KNOWEDIT} --n_edits 50 --steps 400 --output_dir runs/cf200-svf && "
          f"t2edit eval --model worlds/cf200 --data {KNOWEDIT} --n 50 "
          "--method none,svf,svf-always,lora,ft,ike,prompt --expert runs/cf200-svf/expert --out runs/cf200",
          "runs/cf200/results.json"),
    Table("trainer-ablations", "results/trainer_ablations_world.json",
          "accelerate launch scripts/train_rl.py --config configs/demo.yaml", "",
          "with the row's setting changed on the command line or in the YAML"),
    Table("bench", "results/bench.json", "python benchmarks/bench.py --out results/bench.json", "results/bench.json"),
    Table("bench-adaptive", "results/bench_adaptive.json",
          "python benchmarks/bench.py --only adaptive --out results/bench_adaptive.json",
          "results/bench_adaptive.json"),
    Table("bench-real", "results/bench_real.json",
          f"python benchmarks/bench_real.py --data {KNOWEDIT} --out results/bench_real.json",
          "results/bench_real.json"),
    Table("smollm2-objectives", "results/smollm2_objectives.json",
          f"python benchmarks/compare_objectives.py --model smollm2-135m --data {KNOWEDIT} "
          "--n-edits 50 --out runs/objectives", "runs/objectives/objectives.json"),
    Table("smollm2-knowedit-batch50", "results/smollm2_knowedit_batch50.json",
          f"python benchmarks/compare_objectives.py --model smollm2-135m --data {KNOWEDIT} "
          "--n-edits 50 --objectives reinforce --out runs/objectives && "
          f"t2edit eval --model smollm2-135m --data {KNOWEDIT} --n 50 "
          "--method none,svf,svf-always,lora,ft,ike,prompt --router own --expert runs/objectives/reinforce/expert "
          f"--out runs/smollm2-batch50 && t2edit eval --model smollm2-135m --data {KNOWEDIT} "
          "--n 50 --method svf --router scope-split --expert runs/objectives/reinforce/expert "
          f"--out runs/smollm2-batch50-scope-split && t2edit eval --model smollm2-135m --data {KNOWEDIT} --n 50 "
          f"--method {FIELD_EDITORS} --out runs/smollm2-batch50-field", "runs/smollm2-batch50/results.json",
          "writes `runs/smollm2-batch50/results.json`, the row `svf (scope-split)` into "
          "`runs/smollm2-batch50-scope-split/results.json` and the rows of the field's editors into "
          "`runs/smollm2-batch50-field/results.json`"),
    Table("smollm2-knowedit-single20", "results/smollm2_knowedit_single20.json",
          f"t2edit eval --model smollm2-135m --data {KNOWEDIT} --n 20 --mode single "
          "--method none,lora,ft,ike,prompt --out runs/single20-base && t2edit eval --model smollm2-135m "
          f"--data {KNOWEDIT} --n 20 --mode single --method svf,svf-always --router own --no-fluency "
          "--out runs/single20 && t2edit "
          f"eval --model smollm2-135m --data {KNOWEDIT} --n 20 --mode single --method svf "
          "--router scope-split --no-fluency --out runs/single20-split && t2edit eval --model smollm2-135m "
          f"--data {KNOWEDIT} --n 20 --mode single --method {FIELD_EDITORS} --no-fluency --out runs/single20-field",
          "", "writes the rows of none, LoRA, FT-M, IKE and prompt into `runs/single20-base/results.json`, "
          "`svf` and `svf-always` into `runs/single20/results.json`, the row `svf (scope-split)` into "
          "`runs/single20-split/results.json` and the rows of the field's editors into "
          "`runs/single20-field/results.json`"),
    Table("composition-world", "results/composition_world.json",
          "t2edit eval --n 100 --composition 1,4,16,0 --out runs/composition", "runs/composition/rows-k*.json",
          "writes `runs/composition/rows-k*.json` and `composition.md`; copy the rows' metrics, `seconds` and "
          "`extra.two_hop_across*` into `results/composition_world.json`"),
    Table("sequential-world", "results/sequential_world.json",
          "t2edit eval --sequential --router hybrid,scope,embedding --out runs/sequential",
          "runs/sequential/sequential.json",
          "writes `runs/sequential/sequential.json`, the `curve` of `results/sequential_world.json`; the table "
          "shows the points listed in its `shown_edits`"),
    Table("composition-world-split", "results/composition_world_split.json",
          "t2edit eval --n 100 --composition 1,4,16,0 --router oracle,scope-split,embedding "
          "--out runs/composition-split",
          "runs/composition-split/rows-k*.json",
          "writes `runs/composition-split/rows-k*.json`; copy the rows' metrics, `seconds` and `extra.two_hop_across*` "
          "into `results/composition_world_split.json`"),
    Table("composition-smollm2", "results/composition_smollm2.json",
          f"t2edit eval --model smollm2-135m --data {KNOWEDIT} --n 20 --composition 1,4 "
          "--router oracle,scope-split,embedding --out runs/composition-smollm2",
          "runs/composition-smollm2/rows-k*.json",
          "writes `runs/composition-smollm2/rows-k*.json`; copy the rows' metrics, `seconds` and "
          "`extra.two_hop_across*` into `results/composition_smollm2.json`"),
    Table("sequential-world-split", "results/sequential_world_split.json",
          "t2edit eval --sequential --router scope-split,embedding --workers 2 --out runs/sequential-split",
          "runs/sequential-split/sequential.json",
          "writes `runs/sequential-split/sequential.json`, the `curve` of `results/sequential_world_split.json`"),
    Table("sequential-knowedit520-split", "results/sequential_knowedit520_split.json",
          _SEQ520 + " --out runs/seq520-split --budget 470 --routers scope-split,embedding", "",
          "on one GPU and 16 CPU cores; writes `runs/seq520-split/sequential.json`, the `points` of this file"),
    Table("sequential-knowedit520", "results/sequential_knowedit520.json",
          _SEQ520 + " --out runs/seq520 --device cpu --workers 2 --routers scope,embedding", "",
          "writes `runs/seq520/sequential.json`, the `points` of this file"),
    Table("routing-smollm2", "results/routing_smollm2.json",
          "python benchmarks/routing_rates_real.py --routers embedding scope scope-split",
          "runs/routing_smollm2.json",
          "writes `runs/routing_smollm2.json` in this format; the row without a subject floor: "
          "`--routers no-floor=scope-split --router-kwargs '{\"no-floor\": {\"subject_floor\": 0.0}}'`"),
    Table("routing-smollm2-tuning50", "results/routing_smollm2_tuning50.json",
          "python benchmarks/routing_rates_real.py --first 50 --routers final=scope-split", "runs/routing_smollm2.json",
          "writes `runs/routing_smollm2.json`; each other row: one label=scope-split with its `kwargs` from this "
          "file through `--router-kwargs`"),
    Table("sync-bytes", "t2edit/rollouts.py", "python tools/readme_tables.py", "",
          "computed here by `t2edit.rollouts.sync_bytes` and `t2edit.vllm_worker.encode_z`; no results file"),
    Table("gpu-smoke", "results/gpu_smoke_h100.json", 'bash benchmarks/gpu_smoke.sh "" --steps 100 --n-edits 20', "",
          "prints these figures on a CUDA machine"),
    Table("gpu-smoke-h200", "results/gpu_smoke_h200.json",
          'bash benchmarks/gpu_smoke.sh "" --steps 100 --n-edits 20 --json results/gpu_smoke_h200.json',
          "results/gpu_smoke_h200.json", "on a CUDA machine"),
    Table("gpu-sync-h200", "results/gpu_smoke_h200.json",
          'bash benchmarks/gpu_smoke.sh "" --steps 100 --n-edits 20 --json results/gpu_smoke_h200.json',
          "results/gpu_smoke_h200.json", "its `llama_3.2_1b` part; on a CUDA machine"),
    Table("vllm-cpu-smoke", "results/vllm_cpu_smoke.json",
          'VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/gpu_smoke.py --world "$WORLD" --device cpu --dtype float32 '
          "--steps 100 --vllm all --server-url http://127.0.0.1:8011 --json results/vllm_cpu_smoke.json", "",
          'with `bash scripts/serve_vllm.sh "$WORLD" 8011` running, both in the vllm-cpu environment above'),
    Table("vllm-cpu-training", "results/vllm_cpu_training.json",
          "accelerate launch --num_processes 1 scripts/train_rl.py --config configs/demo.yaml --rollout_backend vllm "
          "--vllm_server_url http://127.0.0.1:8011 --steps 60", "",
          "the first row; the others: the row's config and flags, in the vllm-cpu environment above"),
    Table("vllm-sync-cpu", "results/vllm_sync_cpu.json",
          "KMP_BLOCKTIME=0 python benchmarks/bench_vllm_sync.py --modes server,colocate --targets mlp,all-linear", "",
          "in the vllm-cpu environment above"),
    Table("vllm-sync-models", "results/vllm_sync_cpu_models.json",
          'KMP_BLOCKTIME=0 python benchmarks/bench_vllm_sync.py --model "$MODEL_DIR" --modes server '
          "--targets mlp,all-linear --repeats 20", "", "`MODEL_DIR`: the built-in world, then SmolLM2's dequantized "
          "directory; their `runs` joined, each row given its `model`; in the vllm-cpu environment above"),
    Table("scaling-cpu", "results/scaling_cpu.json", "python benchmarks/bench_scaling.py --json results/scaling_cpu.json",
          "results/scaling_cpu.json"),
    Table("z-payload", "results/z_payload.json",
          "KMP_BLOCKTIME=0 python benchmarks/bench_vllm_sync.py --modes payload --json results/z_payload.json",
          "results/z_payload.json", "no vLLM needed; one `payload` list per machine"),
    Table("baseline-tuning-ft", "results/baseline_tuning_smollm2.json",
          f"t2edit eval --model smollm2-135m --data {KNOWEDIT} --start 200 --n 20 --method ft --no-fluency", "",
          _GRID_NOTE),
    Table("baseline-tuning-lora", "results/baseline_tuning_smollm2.json",
          f"t2edit eval --model smollm2-135m --data {KNOWEDIT} --start 200 --n 20 --method lora --no-fluency", "",
          _GRID_NOTE),
    Table("baseline-single10", "results/baseline_tuning_smollm2.json",
          f"t2edit eval --model smollm2-135m --data {KNOWEDIT} --start 200 --n 10 --mode single --method ft,lora "
          "--no-fluency", "", _GRID_NOTE),
    Table("baseline-chosen50", "results/baseline_tuning_smollm2.json",
          f"t2edit eval --model smollm2-135m --data {KNOWEDIT} --start 200 --n 50 --method none,ft,lora "
          "--no-fluency", "", "writes `runs/eval/results.json`"),
    Table("baseline-batch50", "results/baseline_tuning_smollm2.json",
          f"t2edit eval --model smollm2-135m --data {KNOWEDIT} --start 200 --n 50 --method ft,lora --no-fluency",
          "", "with `batch_size` 50 in the row's `FTEditorConfig` / `LoRAEditorConfig` for the 50 rows"),
    Table("baseline-step-cost", "results/baseline_tuning_smollm2.json",
          f"t2edit eval --model smollm2-135m --data {KNOWEDIT} --n 20 --method ft,lora --no-fluency", "",
          "no script: one optimiser step of each editor timed by hand on that command's model and records"),
    Table("field-tuning-locate", "results/locate_tuning_smollm2.json",
          f"t2edit eval --model smollm2-135m --data {KNOWEDIT} --start 200 --n 10 --mode single "
          "--method rome,memit,alphaedit --no-fluency", "", _FIELD_GRID_NOTE),
    Table("field-tuning-memory", "results/memory_tuning_smollm2.json",
          f"t2edit eval --model smollm2-135m --data {KNOWEDIT} --start 200 --n 10 --mode single "
          "--method grace,wise,serac --no-fluency", "", _FIELD_GRID_NOTE),
    Table("key-samples", "results/key_samples_smollm2.json",
          f"python benchmarks/key_samples.py --data {KNOWEDIT} --n 8 --samples 50,200,1000 --fresh --threads 2",
          "results/key_samples_smollm2.json"),
    Table("crosscheck", "results/crosscheck_ours.json",
          f"python benchmarks/crosscheck_ours.py --data {KNOWEDIT}", "results/crosscheck_ours.json",
          "the EasyEdit side: the steps of `benchmarks/crosscheck_easyedit.md`, which write "
          "`results/crosscheck_easyedit.json`"),
    Table("svf-edit-cost", "results/svf_edit_cost.json",
          f"python benchmarks/svf_edit_cost.py --data {KNOWEDIT} --n 4 --threads 2", "results/svf_edit_cost.json"),
    Table("svf-single-grid", "results/svf_single_grid.json",
          f"python benchmarks/svf_single_grid.py --data {KNOWEDIT} --n 6 --threads 2", "results/svf_single_grid.json"),
    Table("stream-smollm2", "results/stream_smollm2.json", STREAM_COMMAND, "runs/stream/stream.json",
          _STREAM_NOTE),
    Table("routing-scale", "results/routing_scale.json",
          f"python benchmarks/routing_scale.py --data {KNOWEDIT} --k 1,100,1000 --threads 2",
          "results/routing_scale.json"),
    Table("mutmut", "results/mutmut/mutmut_summary.json",
          'mutmut run "t2edit.leakage*" "rewards.builtin*" "t2edit.evaluation.metrics*" "t2edit.svf*" && '
          "python tools/mutmut_report.py results/mutmut", "results/mutmut/mutmut_summary.json"),
]

# Bar plots of the method tables, drawn into docs/ next to them (not compared by --check: PNG bytes depend on the
# matplotlib version).
PLOTS = [("results/smollm2_knowedit_batch50.json", "docs/smollm2_batch50.png",
          "SmolLM2-135M, KnowEdit train_cf: 50 edits in one batch"),
         ("results/smollm2_knowedit_single20.json", "docs/smollm2_single20.png",
          "SmolLM2-135M, KnowEdit train_cf: single edits, records 0-19")]


STREAM_PLOTS = [("results/stream_smollm2.json", "docs/stream_smollm2.png")]


def write_plots(root: Path = REPO) -> list[Path]:
    from t2edit.evaluation.report import bar_plot
    from t2edit.evaluation.runner import MethodResult
    from t2edit.evaluation.stream import plot_stream

    written = []
    for source, target, title in PLOTS:
        payload = json.loads((root / source).read_text(encoding="utf-8"))
        _write_changed(root / target, bar_plot([MethodResult(**row) for row in payload["methods"]], title), written)
    for source, target in STREAM_PLOTS:
        if (root / source).exists():
            payload = json.loads((root / source).read_text(encoding="utf-8"))
            with tempfile.TemporaryDirectory() as scratch:
                image = plot_stream(payload["rows"], Path(scratch) / "stream.png", payload.get("title", "")).read_bytes()
            _write_changed(root / target, image, written)
    return written


def _write_changed(path: Path, image: bytes, written: list[Path]) -> None:
    """Write a plot only when its bytes changed (a clean checkout stays clean)."""
    if not path.exists() or path.read_bytes() != image:
        path.write_bytes(image)
        written.append(path)


# The mutation runs of the mutmut table (mutmut_report.py writes counts only; the provenance is added to its JSON).
MUTMUT_RUNS = [("results/mutmut/mutmut_summary.json", "mutants, share killed or timed out")]


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
    curve = payload["curve"] if "curve" in payload else payload["points"]  # t2edit eval / device_seq500.py
    shown = set(payload.get("shown_edits") or [r["edits"] for r in curve])
    keys = ("edit_success", "locality", "portability", "edit_success_em", "locality_em", "portability_em",
            "first10_edit_success")
    lines = ["| router | edits | ES | Loc | Port | ES (EM) | Loc (EM) | Port (EM) | ES of the first 10 |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['router']} | {r['edits']} | " + " | ".join(_pct(r[k]) for k in keys) + " |"
              for r in curve if r["edits"] in shown]
    if len(shown) < len({r["edits"] for r in curve}):
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

    lines = ["| SVF layers | W' float32 | W' bf16 (merged sync) | z (z-only sync) "
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


def _scaling_block(payload: dict) -> list[str]:
    """benchmarks/bench_scaling.py: 1 process against 2, side by side (one thread per process unless said)."""
    train, experts = payload["train"]["rows"], payload["experts"]["rows"]
    one, two, fsdp = train[0], train[1], train[2]
    settings = payload["train"]["settings"]
    single, pool, launcher = experts[0], experts[1], experts[2]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}"

    rows = [[f"one expert ({settings['edits_per_step']} edits + {settings['neighbours_per_step']} neighbours a "
             "step): steps / s", f"{one['steps_per_second']:.2f}", f"{two['steps_per_second']:.2f} (data parallel)",
             ratio(two["steps_per_second"], one["steps_per_second"])],
            ["the same on a model sharded with FSDP2: steps / s", f"{one['steps_per_second']:.2f}",
             f"{fsdp['steps_per_second']:.2f}", ratio(fsdp["steps_per_second"], one["steps_per_second"])]]
    if len(train) > 3:
        rows.append(["the same, 1 process with 2 threads: steps / s", f"{one['steps_per_second']:.2f}",
                     f"{train[3]['steps_per_second']:.2f} (1 process, 2 threads)",
                     ratio(train[3]["steps_per_second"], one["steps_per_second"])])
    rows += [[f"{single['experts']} single-edit experts: experts / min (training phase)",
              f"{single['experts_per_minute']:.1f}", f"{launcher['experts_per_minute']:.1f} (launcher); "
              f"{pool['experts_per_minute']:.1f} (local pool `--workers 2`)",
              f"{ratio(launcher['experts_per_minute'], single['experts_per_minute'])}; "
              f"{ratio(pool['experts_per_minute'], single['experts_per_minute'])}"],
             ["the same, whole command (start and model load included)",
              f"{single['experts_per_minute_with_start']:.1f}",
              f"{launcher['experts_per_minute_with_start']:.1f} (launcher); "
              f"{pool['experts_per_minute_with_start']:.1f} (local pool)",
              f"{ratio(launcher['experts_per_minute_with_start'], single['experts_per_minute_with_start'])}; "
              f"{ratio(pool['experts_per_minute_with_start'], single['experts_per_minute_with_start'])}"]]
    return _transcribed(["what", "1 process", "2 processes", "ratio"], rows)


def _gpu_smoke_block(payload: dict) -> list[str]:
    return _transcribed(payload["columns"], [[r["what"], r["figure"]] for r in payload["rows"]])


def _milliseconds(seconds: float | None) -> str:
    return "–" if seconds is None else "< 0.1 ms" if seconds < 5e-5 else f"{1e3 * seconds:,.1f} ms"


def _vllm_smoke_block(payload: dict) -> list[str]:
    """benchmarks/gpu_smoke.py's JSON: one row per training run (HF rollouts, then each vLLM mode and sync path)."""
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
    """benchmarks/gpu_smoke.py's JSON on a GPU (HF rollouts): the training run and the sync-path checks."""
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
    """benchmarks/gpu_smoke.py's Llama-3.2-1B-shaped syncs through the worker on the GPU (vLLM's own hop excepted)."""
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
    """benchmarks/bench_vllm_sync.py's JSON: seconds and bytes per sync into a real vLLM engine (a model column when
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
    """benchmarks/bench_vllm_sync.py --modes payload: the z file of the server path by model size and SVF target set,
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


def _field_tuning_block(payload: dict) -> list[str]:
    """A grid of the field's editors: one row per (method, setting, records), the chosen settings in bold."""
    lines = ["| method | setting | records | ES | Loc | Port | mean | ES (EM) | edit s |", "|---" * 9 + "|"]
    for r in payload["rows"]:
        bold = (lambda v: f"**{v}**") if r["chosen"] else str
        cells = [r["method"], bold(r["setting"]), f"{r['records']} ({r['n']})"]
        cells += [bold(r[k]) for k in ("ES", "Loc", "Port", "mean")] + [str(r["ES_em"]), str(r["edit_s_per_edit"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _key_samples_block(payload: dict) -> list[str]:
    """ROME's edits with one k*, v* per record and only C varied: the scores, the cost of C and how far each edit
    reaches other subjects' keys."""
    lines = [f"ROME at layer {payload['layer']}, records {payload['records']}, single mode; the value search "
             f"(k*, v* per record, shared by every row) took {payload['value_search_seconds']:.0f} s.", "",
             "| key samples | keys | C seconds | ES | Loc | Port | ES (EM) | reach, median | reach, p90 | "
             "distance to the largest C |", "|---" * 10 + "|"]
    for r in payload["rows"]:
        seconds = "–" if r["tokens"] == 0 else f"{r['statistics_seconds']:.0f}" + \
            (" (cached)" if r.get("statistics_from_cache") else "")
        distance = "–" if r["distance_to_largest"] is None else f"{r['distance_to_largest']:.3f}"
        lines.append(f"| {r['key_samples']} | {r['tokens']:,} | {seconds} | {r['ES']} | {r['Loc']} | {r['Port']} | "
                     f"{r['ES_em']} | {r['reach_median']:.3f} | {r['reach_p90']:.3f} | {distance} |")
    return lines


def _crosscheck_block(payload: dict, repo: Path | None = None) -> list[str]:
    """Per record, t2edit's ROME and GRACE beside EasyEdit's own code at the same settings."""
    theirs = json.loads(((repo or REPO) / CROSSCHECK_EASYEDIT).read_text(encoding="utf-8"))
    lines = []
    for method in ("rome", "grace"):
        ours_rows, their_rows = payload.get(method, []), {r["record"]: r for r in theirs.get(method, [])}
        lines += [f"**{method}** (t2edit: ES teacher-forced / ES greedy EM; EasyEdit: rewrite_acc)", "",
                  "| record | subject → new object | t2edit ES | ES (EM) | Loc | Port | edit s | EasyEdit rewrite | "
                  "Loc | Port | edit s |", "|---" * 11 + "|"]
        for r in ours_rows:
            e = their_rows.get(r["record"])
            them = "| – | – | – | – |" if e is None else \
                f"| {e['rewrite_acc']:.2f} | {e['locality']:.2f} | {e['portability']:.2f} | {e['seconds']:.0f} |"
            subject = "" if e is None else f"{e['subject']} → {e['target_new']}"
            lines.append(f"| {r['record']} | {subject} | {r['edit_success']:.2f} | {r['edit_success_em']:.0f} | "
                         f"{r['locality']:.2f} | {r['portability']:.2f} | {r['edit_seconds']:.0f} " + them)
        shared = [r for r in ours_rows if r["record"] in their_rows]
        if shared:
            def mean(rows, key):
                return sum(row[key] for row in rows) / len(rows)
            pairs = [their_rows[r["record"]] for r in shared]
            lines.append(f"| **mean** | | {mean(shared, 'edit_success'):.2f} | {mean(shared, 'edit_success_em'):.2f} | "
                         f"{mean(shared, 'locality'):.2f} | {mean(shared, 'portability'):.2f} | "
                         f"{mean(shared, 'edit_seconds'):.0f} | {mean(pairs, 'rewrite_acc'):.2f} | "
                         f"{mean(pairs, 'locality'):.2f} | {mean(pairs, 'portability'):.2f} | "
                         f"{mean(pairs, 'seconds'):.0f} |")
        lines.append("")
    return lines[:-1]


def _svf_edit_cost_block(payload: dict) -> list[str]:
    """Seconds of one single-edit SVF expert by phase, the own router's negatives encoded per edit or kept."""
    phases = ["steps", "greedy checks", "own router calibration", "router fit", "rest"]
    lines = [f"{payload['model']}, records {payload['records']}, {payload['device']}; seconds per edit, mean over "
             "the records after the first (the first also encodes the two-pass router's negatives once).", "",
             "| negatives' pass 1 | edit s | " + " | ".join(phases) + " | steps taken |", "|---" * 8 + "|"]
    for variant in ("per-edit", "shared"):
        row = payload["summary"][variant]
        lines.append(f"| {variant} | **{row['edit_seconds']:.1f}** | " + " | ".join(f"{row[p]:.1f}" for p in phases)
                     + f" | {row['steps_taken']:.0f} |")
    lines += ["", f"Per-edit over shared: {payload['summary']['ratio']:.2f}×."]
    return lines


def _svf_single_grid_block(payload: dict) -> list[str]:
    """A single-edit SVF expert's seconds, steps and scores under each training setting."""
    lines = [f"{payload['model']}, records {payload['records']}, {payload['device']}; one expert per record, the "
             f"unedited model's side already cached (the cold first edit of a run: "
             f"{payload['cold_first_edit_seconds']:.0f} s). ES / Loc / Port teacher-forced (strict EM in brackets); "
             "`svf`: behind the expert's own router, `svf-always`: the expert on every prompt.", "",
             "| setting | s per edit | steps | svf ES | svf Loc | svf Port | svf-always Loc | svf-always Port |",
             "|---" * 8 + "|"]
    for row in payload["rows"]:
        routed, always = row["svf"], row["svf-always"]

        def cell(scores, key):
            return f"{_pct(scores[key])} ({_pct(scores[key + '_em'])})"
        lines.append(f"| {row['variant']} | **{row['seconds_per_edit']:.1f}** | {row['mean_steps']:.1f} | "
                     f"{cell(routed, 'edit_success')} | {cell(routed, 'locality')} | {cell(routed, 'portability')} | "
                     f"{cell(always, 'locality')} | {cell(always, 'portability')} |")
    return lines


def _count(value) -> str:
    return "–" if value is None else str(value)


def _stream_block(payload: dict) -> list[str]:
    """Each method's stream: scores at every point T (on all T edits, or on the evenly spaced sample the row says),
    the first 10 edits' strict ES, seconds per edit."""
    rows = payload["rows"]
    lines = ["| method (edits per call) | T (scored) | ES | Loc | Port | ES EM | Loc EM | Port EM | first 10 ES EM | "
             "Loc probes the stream edited | s per edit |", "|---" * 11 + "|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["edits"])
        for r in mine:
            seconds = "–" if r.get("seconds_per_edit") is None else f"{r['seconds_per_edit']:.2f}"
            scored = r.get("scored", r["edits"])
            t = str(r["edits"]) if scored == r["edits"] else f"{r['edits']} ({scored})"
            lines.append(f"| {method} ({r['edits_per_call']}) | {t} | " + " | ".join(
                _pct(r[k]) for k in ("edit_success", "locality", "portability", "edit_success_em", "locality_em",
                                     "portability_em", "first10_edit_success_em"))
                         + f" | {_count(r.get('edited_locality_probes'))} | {seconds} |")
    reached = {m: max(r["edits"] for r in rows if r["method"] == m) for m in dict.fromkeys(r["method"] for r in rows)}
    lines += ["", "Largest T reached: " + ", ".join(f"{m} {t}" for m, t in reached.items()) + "."]
    return lines


def _routing_scale_block(payload: dict) -> list[str]:
    """Two-pass seconds per prompt against the number of experts, next to the unedited model."""
    lines = [f"{payload['model']}, `{payload['router']}` fitted on {payload['negatives']} negatives; greedy answers "
             f"({payload['max_new_tokens']} tokens) to {payload['prompts']} prompts, best of 2.", "",
             "| experts K | router fit s | two-pass s / prompt | unedited s / prompt | held edits routed | "
             "other prompts routed | store MB |", "|---" * 7 + "|"]
    for r in payload["rows"]:
        lines.append(f"| {r['experts']} | {r['router_fit_seconds']:.1f} | {r['seconds_per_prompt']:.3f} | "
                     f"{r['unedited_seconds_per_prompt']:.3f} | {r['held_edit_prompts_routed']} | "
                     f"{r['other_prompts_routed']} | {r['store_megabytes']:.1f} |")
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
    modules = list(dict.fromkeys(m for summary, _ in runs for m in summary if m != "provenance"))
    lines = ["| module | " + " | ".join(label for _, label in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for module in modules:
        path = module.replace(".", "/") + ".py"
        lines.append(f"| `{path}` | " + " | ".join(_mutmut_cell(summary.get(module)) for summary, _ in runs) + " |")
    return lines


BLOCKS = {"bench": _bench_block, "bench-adaptive": _adaptive_block, "smollm2-objectives": _objectives_block,
          "bench-real": _bench_real_block, "composition-world": _composition_block,
          "sequential-world": _sequential_block, "composition-world-split": _composition_block,
          "composition-smollm2": _composition_block, "sequential-world-split": _sequential_block,
          "sequential-knowedit520": _sequential_block, "sequential-knowedit520-split": _sequential_block,
          "routing-smollm2": _routing_block, "routing-smollm2-tuning50": _routing_block,
          "sync-bytes": _sync_bytes_block, "trainer-ablations": _tuning_block("rows"),
          "gpu-smoke": _gpu_smoke_block, "gpu-smoke-h200": _gpu_smoke_run_block, "gpu-sync-h200": _gpu_sync_block,
          "baseline-tuning-ft": _tuning_block("ft_grid"), "baseline-tuning-lora": _tuning_block("lora_grid"),
          "baseline-single10": _tuning_block("single_10"), "baseline-chosen50": _tuning_block("chosen_50"),
          "baseline-batch50": _tuning_block("batch_50"), "baseline-step-cost": _tuning_block("step_cost"),
          "mutmut": _mutmut_block, "vllm-cpu-smoke": _vllm_smoke_block, "vllm-cpu-training": _tuning_block("rows"),
          "vllm-sync-cpu": _vllm_sync_block, "vllm-sync-models": _vllm_sync_block, "z-payload": _z_payload_block,
          "scaling-cpu": _scaling_block, "field-tuning-locate": _field_tuning_block,
          "field-tuning-memory": _field_tuning_block, "key-samples": _key_samples_block,
          "crosscheck": _crosscheck_block, "svf-edit-cost": _svf_edit_cost_block,
          "svf-single-grid": _svf_single_grid_block, "stream-smollm2": _stream_block,
          "routing-scale": _routing_scale_block}
_NEEDS_REPO = (_mutmut_block, _crosscheck_block)  # blocks that read a second file of the repository
CROSSCHECK_EASYEDIT = "results/crosscheck_easyedit.json"
# Every file a block reads besides its table's own source.
EXTRA_SOURCES = [path for path, _ in MUTMUT_RUNS] + [CROSSCHECK_EASYEDIT]


def provenance_line(payload: dict, source: str) -> str:
    """One line: where and when the numbers of `source` were measured (the JSON's `provenance`)."""
    said = payload.get("provenance")
    if not isinstance(said, dict) or not all(said.get(k) for k in ("commit", "date", "machine")):
        raise ValueError(f"{source} has no provenance {{\"commit\", \"date\", \"machine\"}}: add one (where the "
                         "numbers were measured) before generating its table")
    note = f"; {said['note']}" if said.get("note") else ""
    return f"*Measured at commit {said['commit']}, {said['date']}, on {said['machine']}{note}.*"


def render(table: Table, repo: Path = REPO) -> str:
    """The generated block for one table (without its markers)."""
    path = repo / table.source
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `{table.command}` and copy its results there")
    payload = json.loads(path.read_text()) if path.suffix == ".json" else {}
    edit = "edit that file, not this block" if payload else "edit the code, not this block"
    lines = [f"<!-- generated by tools/readme_tables.py from {table.source}; {edit} -->"]
    block = BLOCKS.get(table.name, _method_block)
    lines += block(payload, repo) if block in _NEEDS_REPO else block(payload)
    lines.append("")
    if payload:
        lines.append(provenance_line(payload, table.source) + f" Source: `{table.source}`.")
    copy = "" if table.writes == table.source else f", then copy it to `{table.source}`"
    said = table.note or f"writes `{table.writes}`{copy}"
    lines.append(f"Reproduce: `{table.command}` ({said}).")
    return "\n".join(lines)


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"^(<!-- table:{re.escape(name)} -->)$(.*?)^(<!-- /table:{re.escape(name)} -->)$", re.S | re.M)


MARKER = re.compile(r"^<!-- table:(\S+) -->$", re.M)  # a marker is a line of its own


def doc_files(root: Path = REPO) -> list[Path]:
    """The markdown files that may hold generated blocks: README.md and docs/*.md."""
    return [root / "README.md"] + sorted((root / "docs").glob("*.md"))


def updated_text(text: str, repo: Path = REPO, where: str = "this file") -> str:
    """`text` with every generated block it holds rewritten from the JSON files under `repo`."""
    known = {t.name: t for t in TABLES}
    for name in MARKER.findall(text):
        if name not in known:
            raise ValueError(f"{where}: <!-- table:{name} --> names no table of tools/readme_tables.py")
        if not _pattern(name).search(text):
            raise ValueError(f"{where}: <!-- table:{name} --> has no closing <!-- /table:{name} -->")
    for name in dict.fromkeys(MARKER.findall(text)):
        block = render(known[name], repo)
        text = _pattern(name).sub(lambda m: m.group(1) + "\n" + block + "\n" + m.group(3), text)
    return text


def updated_files(root: Path = REPO, repo: Path = REPO) -> dict[Path, tuple[str, str]]:
    """{file: (current text, text with its blocks regenerated)} for README.md and docs/*.md under `root`, tables
    from the JSON files under `repo`. Every table of TABLES must sit in one of the files."""
    out = {}
    for path in doc_files(root):
        if path.exists():
            current = path.read_text(encoding="utf-8")
            out[path] = (current, updated_text(current, repo, str(path.relative_to(root))))
    placed = {name for current, _ in out.values() for name in MARKER.findall(current)}
    missing = [t.name for t in TABLES if t.name not in placed]
    if missing:
        raise ValueError("no <!-- table:NAME --> ... <!-- /table:NAME --> block in README.md or docs/*.md for: "
                         + ", ".join(missing))
    return out


def stale_tables(current: str, wanted: str) -> list[str]:
    return [name for name in dict.fromkeys(MARKER.findall(current))
            if _pattern(name).search(current).group(2) != _pattern(name).search(wanted).group(2)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if README.md or a docs/*.md file is not what the JSON files give")
    parser.add_argument("--root", default=str(REPO), help="the repository whose README.md and docs/ are written")
    args = parser.parse_args(argv)
    root = Path(args.root)
    try:
        files = updated_files(root, root)
    except (ValueError, FileNotFoundError) as error:
        print(f"readme_tables.py: error: {error}", file=sys.stderr)
        return 1
    if args.check:
        stale = [f"{path.relative_to(root)} ({', '.join(stale_tables(current, wanted))})"
                 for path, (current, wanted) in files.items() if current != wanted]
        if stale:
            print(f"tables out of date with their results JSON: {'; '.join(stale)}; run python tools/readme_tables.py",
                  file=sys.stderr)
            return 1
        return 0
    for path, (current, wanted) in files.items():
        if wanted != current:
            path.write_text(wanted, encoding="utf-8")
            print(f"updated {path.relative_to(root)}")
    for path in write_plots(root):
        print(f"drew {path.relative_to(root)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
