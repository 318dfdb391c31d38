"""Where a single-edit SVF expert's seconds go, on a real LLM (default: the shipped SmolLM2-135M); a table plus JSON.

`t2edit eval --mode single --method svf` trains one expert per record, then fits the two-pass router over it. This
runs that loop on training-split records (200 and later) twice in one process, on the same base model:

* per-edit: every expert encodes its own router's calibration negatives (up to 512 prompts) through pass 1;
* shared: the negatives' pass-1 states are kept across experts (what `SVFEditor` and the stream do), so each
  negative is encoded once per base model.

The scope router's pass 1 over its negatives is cached across records in both (it is paid by the first record of
the first run). Per record it reports the editing seconds split into the REINFORCE steps, the greedy edit-success
checks, the own router's calibration, the two-pass router's fit and the rest (building the trainer, neighbour
reference answers, saving the expert), and the steps taken.

    python benchmarks/svf_edit_cost.py --data data/knowedit/train_cf.json --n 4 --out results/svf_edit_cost.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "knowedit" / "train_cf.json"
FIRST_TRAINING_RECORD = 200  # records 0-49 are the tables' edits; tuning and benchmarks read 200 and later


class _Timers:
    """Seconds spent in a few trainer functions, by name, while installed."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._undo = []

    def wrap(self, owner, attribute: str, name: str):
        real = getattr(owner, attribute)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        setattr(owner, attribute, timed)
        self._undo.append((owner, attribute, real))

    def remove(self):
        for owner, attribute, real in reversed(self._undo):
            setattr(owner, attribute, real)


def run_variant(name: str, setup, records, shared: bool, pass1_cache: dict) -> list[dict]:
    import t2edit.training.trainer as trainer_module
    from t2edit.jobs import make_editor

    editor = make_editor("svf", setup, output_dir=f"/tmp/t2edit-svf-edit-cost/{name}", router="scope-split")
    rows = []
    for record in records:
        if not shared:
            editor.unedited.negative_states = {}  # the per-edit reference: nothing kept from the previous expert
        editor._pass1_cache, editor._pass1_model = pass1_cache, setup.model  # the scope router's pass 1, kept
        timers = _Timers()
        timers.wrap(trainer_module.SVFTrainer, "training_step", "steps")
        timers.wrap(trainer_module.SVFTrainer, "edit_success_greedy", "greedy checks")
        timers.wrap(trainer_module, "calibrate_own_router", "own router calibration")
        started = time.perf_counter()
        try:
            edited = editor.edit(setup.model, setup.tokenizer, [record])
        finally:
            timers.remove()
        total = time.perf_counter() - started
        edited.restore()
        fit = editor.report.get("router_fit_seconds", 0.0)
        parts = {**{k: round(v, 2) for k, v in timers.seconds.items()}, "router fit": round(fit, 2)}
        parts["rest"] = round(total - sum(parts.values()), 2)
        rows.append({"variant": name, "record": record.index, "edit_seconds": round(total, 2),
                     "steps_taken": editor.last_trainer.step, **parts})
        print(rows[-1], flush=True)
    return rows


def add_record_arguments(parser, n: int, out: str) -> None:
    """The options of a single-edit benchmark on training-split records: model, data, first record, count, threads,
    output JSON (under results/)."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--start", type=int, default=FIRST_TRAINING_RECORD)
    parser.add_argument("--n", type=int, default=n)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=str(REPO / "results" / out))


def records_found(args, parser) -> bool:
    """False (after saying so) when the data file is absent; an error for records of the tables' edits."""
    if args.start < FIRST_TRAINING_RECORD:
        parser.error(f"--start {args.start}: records below {FIRST_TRAINING_RECORD} are the tables' edits")
    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found (KnowEdit train_cf.json)")
        return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_record_arguments(parser, n=4, out="svf_edit_cost.json")
    args = parser.parse_args(argv)
    if not records_found(args, parser):
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from t2edit.setup import load_setup

    setup = load_setup(args.model, args.data, args.start, args.n, progress=False)
    pass1_cache: dict = {}
    rows = run_variant("shared", setup, setup.edits, True, pass1_cache)
    rows += run_variant("per-edit", setup, setup.edits, False, pass1_cache)
    summary = {}
    for variant in ("shared", "per-edit"):
        mine = [r for r in rows if r["variant"] == variant][1:]  # the first record pays the scope router's pass 1
        summary[variant] = {key: round(statistics.mean(r[key] for r in mine), 2)
                            for key in ("edit_seconds", "steps", "greedy checks", "own router calibration",
                                        "router fit", "rest", "steps_taken")}
    summary["ratio"] = round(summary["per-edit"]["edit_seconds"] / summary["shared"]["edit_seconds"], 2)
    print(json.dumps(summary, indent=1))
    from key_samples import provenance  # benchmarks/ is on sys.path when this runs as a script

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"{torch.get_num_threads()} CPU threads"
    payload = {"provenance": provenance(), "model": args.model, "records": f"{Path(args.data).name} {args.start}..{args.start + args.n - 1}",
               "device": device, "summary_excludes_first_record": True, "summary": summary, "rows": rows}
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
