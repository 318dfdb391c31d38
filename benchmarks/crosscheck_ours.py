"""t2edit's ROME and GRACE, per record, at the settings EasyEdit's own run used (benchmarks/crosscheck_easyedit.md):
the other half of the cross-check with the reference implementations.

    python benchmarks/crosscheck_ours.py --data data/knowedit/train_cf.json --out results/crosscheck_ours.json

Each of records 0-9 is edited alone from the unedited SmolLM2-135M, scored with t2edit's metrics (EasyEdit's
teacher-forced token accuracy and the strict greedy exact match), and restored, as EasyEdit's single-edit run does.
The settings are EasyEdit's hparams/ROME/llama-7b.yaml and hparams/GRACE/llama-7B.yaml with the layers of that run
(ROME 6, GRACE 25 of 30); ROME without key statistics (`mom2_adjustment: false`, as that file says).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from datetime import date
from pathlib import Path

from t2edit.editors import GraceEditor, GraceEditorConfig, ROMEEditor, ROMEEditorConfig
from t2edit.evaluation import evaluate_editor
from t2edit.files import atomic_write_json
from t2edit.setup import load_setup

SETTINGS = {  # GRACE first: it takes seconds per record, ROME minutes
    "grace": lambda: GraceEditor(GraceEditorConfig(layer=25, eps=1.0, lr=1.0, n_iter=50, val_init="cold")),
    "rome": lambda: ROMEEditor(ROMEEditorConfig(layer=6, v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3,
                                                clamp_norm_factor=4.0, kl_factor=0.0625, mom2_adjustment=False,
                                                context_templates=((5, 10), (10, 10)))),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="KnowEdit train_cf.json")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--out", default="results/crosscheck_ours.json")
    args = parser.parse_args()
    setup = load_setup("smollm2-135m", args.data, 0, args.n)
    out_path = Path(args.out)
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    if out.get("records") != [r.index for r in setup.edits]:  # another run's file: start over
        out = {}
    out.update(records=[r.index for r in setup.edits], settings={k: repr(v().config) for k, v in SETTINGS.items()})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for method, make in SETTINGS.items():
        rows = out.get(method, [])  # a stopped run continues after its last written record
        editor = make()  # one editor per method, as EasyEdit's run: ROME's prefixes are sampled once
        for record in setup.edits[len(rows):]:
            started = time.perf_counter()
            result = evaluate_editor(editor, setup.model, setup.tokenizer, [record], mode="single", fluency=False,
                                     progress=False)
            rows.append({"record": record.index, "edit_success": result.edit_success, "locality": result.locality,
                         "portability": result.portability, "edit_success_em": result.edit_success_em,
                         "edit_seconds": result.extra["edit_seconds"],
                         "seconds": time.perf_counter() - started})
            print(method, rows[-1], flush=True)
            out[method] = rows
            out["provenance"] = {"commit": commit, "date": str(date.today()), "machine": "2 CPU cores"}
            atomic_write_json(out_path, out)


if __name__ == "__main__":
    main()
