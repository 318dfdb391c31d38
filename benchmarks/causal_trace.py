"""Causal tracing on a real model, to choose ROME's layer: the mean indirect effect of each layer's MLP at the
subject's last token over KnowEdit training-split records, as JSON and a PNG plot.

    python benchmarks/causal_trace.py --model smollm2-135m --start 200 --n 25

Only training-split records (train_cf.json, 200-249 by default) are traced, so the layer is not chosen on the
records the evaluation scores. Skips cleanly (exit 0) when the data file is missing.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from t2edit.data.loaders import load_records
from t2edit.editors.tracing import causal_trace
from t2edit.files import atomic_write_json
from t2edit.models import load_model
from t2edit.plots import plot_curves

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "knowedit" / "train_cf.json"
TRAINING_RECORDS = range(200, 250)


def provenance() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return {"commit": commit, "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {device}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--start", type=int, default=200)
    parser.add_argument("--n", type=int, default=25)
    parser.add_argument("--window", type=int, default=5, help="layers restored together around each layer")
    parser.add_argument("--noise-samples", type=int, default=3)
    parser.add_argument("--noise-factor", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--out", default=str(REPO / "results" / "causal_trace_smollm2.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found (KnowEdit train_cf.json)")
        return 0
    if args.start not in TRAINING_RECORDS or args.start + args.n - 1 not in TRAINING_RECORDS:
        parser.error(f"trace records {TRAINING_RECORDS.start}..{TRAINING_RECORDS.stop - 1} only (training split)")
    model, tokenizer = load_model(args.model)
    records = load_records(args.data, start=args.start, limit=args.n)
    result = causal_trace(model, tokenizer, records, window=args.window, n_noise=args.noise_samples,
                          noise_factor=args.noise_factor)
    report = {
        "provenance": provenance(),
        "model": args.model,
        "records": f"{Path(args.data).name} {args.start}..{args.start + args.n - 1}",
        "n_traced": result.n_traced,
        "skipped_records": result.skipped,
        "window": result.window,
        "noise_samples": args.noise_samples,
        "noise_std": round(result.noise_std, 5),
        "p_clean_mean": round(sum(result.p_clean) / result.n_traced, 4),
        "p_corrupt_mean": round(sum(result.p_corrupt) / result.n_traced, 4),
        "n_subject_dependent": len(result.dependent),
        "mean_indirect_effect": {str(layer): round(e, 5) for layer, e in zip(result.layers, result.mean_effect)},
        "mean_indirect_effect_subject_dependent": {str(layer): round(e, 5)
                                                   for layer, e in zip(result.layers, result.dependent_effect)},
        "best_layer": result.best_layer,
        "best_layer_chosen_on": "subject-dependent prompts" if len(result.dependent) >= 3 else "all prompts",
        "per_prompt": [{"record": r, "p_clean": round(c, 4), "p_corrupt": round(k, 4)}
                       for r, c, k in zip(result.record_indices, result.p_clean, result.p_corrupt)],
        "n_layers": len(result.layers),
        "seconds": round(result.seconds, 1),
    }
    out = Path(args.out)
    atomic_write_json(out, report)
    curves = [(f"all {result.n_traced} prompts", result.layers, result.mean_effect, "o-")]
    if result.dependent_effect:
        curves.append((f"{len(result.dependent)} subject-dependent prompts", result.layers, result.dependent_effect,
                       "s-"))
    plot_curves([(f"{args.model}: MLP (window {result.window}) restored at the subject's last token", curves)],
                out.with_suffix(".png"), xlabel="layer", ylabel="p_restored - p_corrupt", panel_width=7)
    print(json.dumps({k: report[k] for k in ("best_layer", "best_layer_chosen_on", "n_subject_dependent",
                                             "p_clean_mean", "p_corrupt_mean", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
