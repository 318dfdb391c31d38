"""Routing rates on a real model (docs/routing.md, "Routing on SmolLM2-135M"): KnowEdit records [0, n) edited, one placeholder
expert each; negatives from records that are neither edited nor evaluated (their edit / locality prompts, and the
edited subjects asked about those records' relations, via `t2edit.leakage.learning_pool`); held-out facts = edit
prompts of other records. Writes the rates per router as JSON.

    python benchmarks/routing_rates_real.py --routers embedding scope scope-split --out runs/routing_smollm2.json
"""
import argparse
import json
import sys
from pathlib import Path

from t2edit.data.loaders import load_records
from t2edit.evaluation.composition import routing_rates
from t2edit.leakage import learning_pool
from t2edit.models import load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/knowedit/train_cf.json")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--first", type=int, default=0, help="first edited record")
    ap.add_argument("--edits", type=int, default=50, help="records [first, first + edits) are edited")
    ap.add_argument("--negatives-from", type=int, nargs=2, default=(100, 300), help="records for the negatives")
    ap.add_argument("--held-out-from", type=int, nargs=2, default=(300, 400), help="records for held-out facts")
    ap.add_argument("--routers", nargs="+", default=["embedding", "scope", "scope-split"],
                    help="router names, or label=name to run one router under several settings")
    ap.add_argument("--router-kwargs", default="{}", help='JSON: {"label or router name": {kwarg: value}}')
    ap.add_argument("--out", default="runs/routing_smollm2.json",
                    help="JSON {provenance, rows: [{router, label, rates}]} as results/routing_smollm2.json; rows "
                         "of the same label are replaced")
    args = ap.parse_args(argv)
    records = load_records(args.data)
    edits = records[args.first:args.first + args.edits]
    pool = learning_pool(edits, records[slice(*args.negatives_from)])
    negatives = pool.neighbour_prompts[:400] + pool.subject_prompts[:400]
    held_out = [r.prompt for r in records[slice(*args.held_out_from)]]
    model, tok = load_model(args.model)
    all_kwargs = json.loads(args.router_kwargs)
    out = Path(args.out)
    for spec in args.routers:
        label, _, name = spec.rpartition("=")
        label = label or name
        kwargs = all_kwargs.get(label, {})
        row = routing_rates(model, tok, edits, negatives, held_out, routers=[name],
                            router_kwargs={name: kwargs})[name]
        rendered = {k: (round(v["to_right_expert"], 2), round(v["routed"], 2)) for k, v in row.items()
                    if isinstance(v, dict)}
        print(label, "threshold", row.get("threshold"), rendered, flush=True)
        table = json.loads(out.read_text()) if out.exists() else {"provenance": f"{args.model}, {args.data}", "rows": []}
        table["rows"] = [r for r in table["rows"] if r["label"] != label] + [
            {"router": name, "label": label, "kwargs": kwargs, "command": " ".join(["python"] + sys.argv),
             "negatives": len(negatives), "rates": row}]
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(out)


if __name__ == "__main__":
    main()
