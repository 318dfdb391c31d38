"""How ROME's edit scores depend on the size of the key-statistics corpus (the model's own samples): the same
records edited one at a time with C estimated on 50, 200, 1000, 3000 samples (64 tokens each), and with C = I
(no statistics) as the reference, scored by `t2edit.evaluation.evaluate_editor` (fluency off).

    python benchmarks/key_samples.py --model smollm2-135m --start 200 --n 20 --samples 50,200,1000,3000

ROME's other settings are the `small-real` profile of configs/editors/rome.yaml. Smaller corpora are prefixes of
larger ones (each sampling batch has its own seed), so the rows differ only in how many samples C has seen.
Only training-split records (train_cf.json 200-249) are used. Skips cleanly (exit 0) when the data file is missing.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from t2edit.data.loaders import load_records
from t2edit.editors.keys import layers_at_depths
from t2edit.editors.rome import ROMEEditor, ROMEEditorConfig
from t2edit.evaluation import evaluate_editor
from t2edit.files import CONFIGS_DIR, atomic_write_json, read_yaml
from t2edit.models import load_model

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "knowedit" / "train_cf.json"
TRAINING_RECORDS = range(200, 250)


def provenance() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout.strip()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return {"commit": commit, "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {device}"}


def rome_profile(model, name: str = "small-real") -> dict:
    """configs/editors/rome.yaml's profile, with `depth` turned into this model's layer."""
    options = dict(read_yaml(CONFIGS_DIR / "editors" / "rome.yaml")[name] or {})
    depth = options.pop("depth", None)
    if depth is not None:
        options["layer"] = layers_at_depths(model, (depth,))[0]
    return options


def percent(value) -> float | None:
    return None if value is None else round(100 * value, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--start", type=int, default=200)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--samples", default="50,200,1000,3000", help="comma-separated key sample counts")
    parser.add_argument("--no-identity", action="store_true", help="leave out the C = I reference row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--out", default=str(REPO / "results" / "key_samples_smollm2.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found (KnowEdit train_cf.json)")
        return 0
    if args.start not in TRAINING_RECORDS or args.start + args.n - 1 not in TRAINING_RECORDS:
        parser.error(f"records {TRAINING_RECORDS.start}..{TRAINING_RECORDS.stop - 1} only (training split)")
    model, tokenizer = load_model(args.model)
    records = load_records(args.data, start=args.start, limit=args.n)
    settings = rome_profile(model)
    counts = [int(c) for c in args.samples.split(",") if c.strip()]
    runs = ([] if args.no_identity else [None]) + counts
    rows = []
    for count in runs:
        options = {**settings, "mom2_adjustment": count is not None}
        if count is not None:
            options["key_samples"] = count
        editor = ROMEEditor(ROMEEditorConfig(**options))
        started = time.perf_counter()
        result = evaluate_editor(editor, model, tokenizer, records, mode="single", fluency=False, progress=False)
        cost = next(iter(editor.statistics_cost.values()), {})
        rows.append({"key_samples": count if count is not None else "C = I", "tokens": cost.get("tokens", 0),
                     "statistics_seconds": cost.get("seconds", 0.0),
                     "statistics_from_cache": cost.get("from_cache", False),
                     "ES": percent(result.edit_success), "Loc": percent(result.locality),
                     "Port": percent(result.portability),
                     "edit_seconds": round(result.extra.get("edit_seconds", 0.0), 1),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(rows[-1], flush=True)
    atomic_write_json(args.out, {"provenance": provenance(), "model": args.model,
                                 "records": f"{Path(args.data).name} {args.start}..{args.start + args.n - 1}",
                                 "mode": "single", "fluency": False, "rome_settings": settings,
                                 "sample_length": ROMEEditorConfig().key_sample_length, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
