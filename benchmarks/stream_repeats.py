"""Routed single-edit experts at the end of a stream, on the edits that are hardest to route apart: every edit whose
subject is edited more than once in the stream, and edits of the relation asked of the most subjects.

Reads the experts a stream trained (`t2edit eval --sequential --method svf --out DIR`: DIR/experts) and the unedited
model's locality answers it saved (DIR/pre_edit_references.json), puts all T experts behind `scope-split` fitted on
the stream's negatives, and scores the two groups (teacher-forced and strict) on the model that holds them all.
`--groups scored` scores instead the edits a stream point scores, split by whether a locality probe of theirs is
another edit's prompt (where locality holds the model to an answer the stream has made out of date).

    python benchmarks/stream_repeats.py --stream runs/stream --n 1000 --at 500 --threads 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from svf_edit_cost import DEFAULT_DATA, REPO  # benchmarks/ is on sys.path when this runs as a script

SCORES = ("edit_success", "locality", "portability", "edit_success_em", "locality_em", "portability_em")


def repeated_groups(records, relation_sample: int) -> dict[str, list[int]]:
    """Indices of the records whose subject is edited more than once, and an evenly spaced sample of the other
    records that ask the relation (the edit prompt with its subject taken out) most records ask."""
    subjects = Counter(r.subject for r in records)
    repeated = [i for i, r in enumerate(records) if subjects[r.subject] > 1]
    taken = set(repeated)
    templates = [r.prompt.replace(r.subject, "{}") if r.subject in r.prompt else None for r in records]
    relation, _ = Counter(t for t in templates if t).most_common(1)[0]
    asked = [i for i, t in enumerate(templates) if t == relation and i not in taken]
    step = max(1, len(asked) // relation_sample)
    return {"repeated subjects": repeated, f"relation {relation!r}": asked[::step][:relation_sample]}


def edited_probe_groups(records, sample: int) -> dict[str, list[int]]:
    """The records a stream point scores (`scored_edits` of all of them), split by whether one of their locality
    probes is another edit's prompt: where the unedited answer the probe holds the model to is out of date."""
    from t2edit.evaluation.stream import edited_locality_probes, scored_edits

    position = {id(r): i for i, r in enumerate(records)}
    scored = [position[id(r)] for r in scored_edits(records, sample)]
    edited = {i for i in scored if edited_locality_probes([records[i]], records)}
    return {"scored, a probe another edit's prompt": [i for i in scored if i in edited],
            "scored, no probe another edit's prompt": [i for i in scored if i not in edited]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--stream", default=str(REPO / "runs" / "stream"), help="the stream's --out")
    parser.add_argument("--n", type=int, default=1000, help="the stream's --n")
    parser.add_argument("--at", type=int, default=None, help="T: the first T experts (default n)")
    parser.add_argument("--relation-sample", type=int, default=60)
    parser.add_argument("--groups", choices=("repeats", "scored"), default="repeats",
                        help="repeats: repeated subjects and the most-asked relation; scored: the point's "
                             "--score-sample edits, split by whether a locality probe is another edit's prompt")
    parser.add_argument("--score-sample", type=int, default=100, help="with --groups scored: the stream's")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=str(REPO / "results" / "stream_repeats.json"))
    args = parser.parse_args(argv)
    stream = Path(args.stream)
    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found (KnowEdit train_cf.json)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from key_samples import provenance

    from t2edit.editors import ExpertsEditor
    from t2edit.evaluation import evaluate_editor
    from t2edit.evaluation.runner import pre_edit_references
    from t2edit.leakage import router_negatives
    from t2edit.routing import get_router
    from t2edit.setup import load_setup
    from t2edit.training import expert_run_dir

    setup = load_setup(args.model, args.data, 0, args.n, progress=False)
    at = args.at or args.n
    edits = setup.edits[:at]
    dirs = [expert_run_dir(stream / "experts", k) / "expert" for k in range(at)]
    missing = [str(d) for d in dirs if not (d / "expert.safetensors").exists()]
    if missing:
        parser.error(f"--stream {stream}: {len(missing)} of the first {at} experts are not there (first: "
                     f"{missing[0]}); run the stream to T = {at} first, or lower --at")
    saved = stream / "pre_edit_references.json"  # the stream's own: nothing is generated again
    references = pre_edit_references(setup.model, setup.tokenizer, setup.edits, progress=False,
                                     known=json.loads(saved.read_text()) if saved.exists() else None)
    # the stream's router at T: fitted on the negatives of its first T edits
    editor = ExpertsEditor(dirs, lambda: get_router("scope-split"), f"scope-split@{at}", router_negatives(setup, edits))
    rows = []
    groups = repeated_groups(edits, args.relation_sample) if args.groups == "repeats" else \
        edited_probe_groups(edits, args.score_sample)
    for group, indices in groups.items():
        if not indices:
            continue
        started = time.perf_counter()
        result = evaluate_editor(editor, setup.model, setup.tokenizer, [edits[i] for i in indices],
                                 fluency=False, progress=True, references=references)
        rows.append({"group": group, "records": len(indices), **{k: getattr(result, k) for k in SCORES},
                     "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
    payload = {"experts": at, "stream_edits": args.n, "router": "scope-split", "negatives": len(editor.negatives),
               "router_fit_seconds": round(editor.fit_seconds, 1), "rows": rows,
               "provenance": {**provenance(), "note": f"the first {at} single-edit experts of the stream in {stream}"}}
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
