"""What a single-edit SVF expert costs on a real LLM (default: the shipped SmolLM2-135M) under a few training
settings, and what it scores; a table plus JSON.

Each variant edits training-split records (200 and later) one at a time, `t2edit eval --mode single`'s way, and
is scored as `svf` (behind the expert's own router) and `svf-always` (the expert on every prompt: the expert's
own locality). All variants share one cache of the unedited model's side (neighbours' answers, KL references,
negatives' states), as a single-edit run or a stream does after its first edit; the cold first edit of the run is
reported apart (`cold_first_edit_seconds`).

    python benchmarks/svf_single_grid.py --data data/knowedit/train_cf.json --n 6 --out results/svf_single_grid.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from svf_edit_cost import add_record_arguments, records_found  # benchmarks/ is on sys.path when run as a script

# name -> TrainConfig overrides of the llm preset (each names every setting it varies, so a row does not change
# when the preset does)
VARIANTS = {
    # the greedy edit-success check every 5 steps, lr 0.02, 16 neighbours per step
    "check-5/lr-0.02/nb-16": {"eval_every": 5, "single_edit_learning_rate": 0.02, "neighbours_per_edit": 0},
    # checked after every step: training stops at the first step that edits
    "check-1/lr-0.02/nb-16": {"eval_every": 1, "single_edit_learning_rate": 0.02, "neighbours_per_edit": 0},
    "check-1/lr-0.05/nb-16": {"eval_every": 1, "single_edit_learning_rate": 0.05, "neighbours_per_edit": 0},
    "check-1/lr-0.05/nb-4": {"eval_every": 1, "single_edit_learning_rate": 0.05, "neighbours_per_edit": 4},
    "check-1/lr-0.1/nb-4": {"eval_every": 1, "single_edit_learning_rate": 0.1, "neighbours_per_edit": 4},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_record_arguments(parser, n=6, out="svf_single_grid.json")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    args = parser.parse_args(argv)
    if not records_found(args, parser):
        return 0
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from t2edit.evaluation import evaluate_editor
    from t2edit.jobs import make_editor, train_config_for
    from t2edit.setup import load_setup
    from t2edit.training.references import UneditedModelCache

    setup = load_setup(args.model, args.data, args.start, args.n, progress=False)
    shared = UneditedModelCache()
    # The cold start: the first edit of a run fills the cache (neighbours' answers, the own router's negatives).
    warm = make_editor("svf", setup, train_config=train_config_for(setup, output_dir="/tmp/t2edit-grid/warm",
                                                                   progress=False), router="own")
    warm.unedited, warm._pass1_model = shared, setup.model
    started = time.perf_counter()
    warm.edit(setup.model, setup.tokenizer, [setup.edits[0]]).restore()
    cold = time.perf_counter() - started
    print(f"cold first edit: {cold:.1f} s", flush=True)
    rows = []
    for name in names:
        config = train_config_for(setup, output_dir=f"/tmp/t2edit-grid/{len(rows)}", progress=False,
                                  **VARIANTS[name])
        trained: dict = {}
        row = {"variant": name, "settings": VARIANTS[name]}
        for method in ("svf", "svf-always"):
            editor = make_editor(method, setup, train_config=config, trained_experts=trained, router="own")
            editor.unedited, editor._pass1_model = shared, setup.model
            steps = []
            real_edit = editor.edit

            def edit(model, tokenizer, records, real_edit=real_edit, editor=editor, steps=steps):
                out = real_edit(model, tokenizer, records)
                if editor.report.get("expert") == "trained":
                    steps.append(editor.last_trainer.step)
                return out
            editor.edit = edit
            result = evaluate_editor(editor, setup.model, setup.tokenizer, setup.edits, mode="single", fluency=False,
                                     progress=False, batch_size=16)
            scores = {k: getattr(result, k) for k in ("edit_success", "locality", "portability", "edit_success_em",
                                                       "locality_em", "portability_em")}
            row[method] = {k: None if v is None else round(v, 4) for k, v in scores.items()}
            if method == "svf":
                row["seconds_per_edit"] = round(result.extra["edit_seconds"] / len(setup.edits), 2)
                row["steps"] = steps
                row["mean_steps"] = round(statistics.mean(steps), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    from key_samples import provenance  # benchmarks/ is on sys.path when this runs as a script

    payload = {"provenance": provenance(), "model": args.model,
               "records": f"{Path(args.data).name} {args.start}..{args.start + args.n - 1}",
               "device": f"{torch.get_num_threads()} CPU threads", "cold_first_edit_seconds": round(cold, 1),
               "rows": rows}
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
