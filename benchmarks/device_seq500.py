"""Sequential editing at scale on a KnowEdit fact world: build the world, add single-edit experts one at a time,
score all edits so far at ~10 points (issue 10, requirement 5). Made for one GPU and 16 CPU cores in ~7 minutes;
runs (slowly) on a CPU too.

    python benchmarks/device_seq500.py --data .devdata/train_cf.json --out OUT            # 520 records, all edited
    python benchmarks/device_seq500.py --data ... --out OUT --records 80 --world-steps 300 --workers 2  # CPU dry run

Phases, each timed and printed: (1) pretrain the world of the first --records records on the GPU (its report goes
to OUT/world.json at once); (2) train one expert per edit in --workers CPU processes of one thread each while
(3) the main process scores the curve on the GPU as soon as the experts of each point exist, appending each point
to OUT/sequential.json and redrawing OUT/sequential.png. No point starts after --budget seconds (counted from
the start), nor one that the previous point's time says would end after it, so a run cut short keeps every
finished point. OUT/timings.json holds the phase times; OUT/error.txt the traceback if a phase failed.

Experts and the world are written under --work (default: a temporary directory), not OUT: 500 expert
directories are not worth sending back. The no-leakage rule holds as in `t2edit eval --sequential`: no expert
trains on, and no router is fitted on, a prompt the evaluation scores for any edited record.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def log(message: str, started: float):
    print(f"[seq500 {time.perf_counter() - started:6.1f} s] {message}", flush=True)


def write_json(path: Path, value):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


def main(argv=None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="KnowEdit-format JSON (WikiData_counterfact train_cf.json)")
    parser.add_argument("--out", required=True, help="where sequential.json/png, world.json and timings.json go")
    parser.add_argument("--records", type=int, default=520, help="world = the first N records of --data")
    parser.add_argument("--edits", type=int, default=None, help="edit the first N records (default: all)")
    parser.add_argument("--points", type=int, default=10, help="curve points besides 1 edit")
    parser.add_argument("--routers", default="scope-split,embedding")
    parser.add_argument("--workers", type=int, default=None,
                        help="CPU processes training experts (default: CPU cores - 1)")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--world-steps", type=int, default=None,
                        help="world pretraining steps (default: the recipe's, 3 per fact)")
    parser.add_argument("--batch-size", type=int, default=None, help="scoring batch (default: 256 GPU, 64 CPU)")
    parser.add_argument("--budget", type=float, default=390.0,
                        help="seconds from the start after which no new curve point starts")
    parser.add_argument("--work", default=None, help="world and experts directory (default: a temporary one)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="t2edit-seq500-"))
    work.mkdir(parents=True, exist_ok=True)
    # SVD factors and anything else cached go to the work directory: every process (the workers too) reads the
    # same factors, and nothing outside it is written.
    os.environ.setdefault("T2EDIT_CACHE", str(work / "cache"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import transformers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cores = os.cpu_count() or 1
    workers = args.workers or max(1, cores - 1)
    timings: dict = {"device": device, "cpu_cores": cores, "workers": workers, "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}
    log(f"start: {json.dumps(timings)}; work dir {work}", started)

    def phase_done(name: str, since: float):
        timings[name] = round(time.perf_counter() - since, 1)
        timings["total"] = round(time.perf_counter() - started, 1)
        write_json(out / "timings.json", timings)
        log(f"{name}: {timings[name]} s", started)

    try:
        from t2edit.data.world import WorldConfig, build_world, format_report

        phase = time.perf_counter()
        # On a GPU a whole batch is one microbatch (the per-microbatch launches, not the padding, cost time there).
        config = WorldConfig(steps=args.world_steps,
                             tokens_per_microbatch=1 << 16 if device.startswith("cuda") else 512)
        try:
            world = build_world(args.data, work / "world", limit=args.records, config=config, device=device,
                                progress=False)
        except Exception:  # noqa: BLE001 - the prefetching worker is the one part never run on this machine
            if not device.startswith("cuda"):
                raise
            log(f"world build with prefetched steps failed, again without:\n{traceback.format_exc()}", started)
            timings["world_prefetch_failed"] = traceback.format_exc().strip().splitlines()[-1]
            world = build_world(args.data, work / "world", limit=args.records, config=config, device=device,
                                progress=False, prefetch=False, force=True)
        shutil.copy(work / "world" / "world.json", out / "world.json")
        print(format_report(world.report), flush=True)
        recall = world.report["pre_edit_recall"]
        timings["world_train_seconds"] = world.report["train_seconds"]
        timings["world_steps"] = world.report["config"]["steps"]
        timings["pre_edit_recall"] = {g: v["recall"] for g, v in recall.items()}
        low = {g: v["recall"] for g, v in recall.items() if v["recall"] is not None and v["recall"] < 0.95}
        if low:
            log(f"WARNING: pre-edit recall below 0.95: {low}", started)
        phase_done("world_seconds", phase)

        from t2edit.evaluation.composition import run_sequential, sequential_sizes
        from t2edit.setup import load_setup

        phase = time.perf_counter()
        setup = load_setup(str(work / "world"), args.data, 0, args.edits, progress=False)
        from t2edit.svf import model_fingerprint

        on_cpu = model_fingerprint(setup.model)  # what the CPU workers' experts will carry
        setup.model.to(device)
        timings["fingerprint_same_on_device"] = model_fingerprint(setup.model) == on_cpu
        if device.startswith("cuda"):
            # The main process feeds the GPU and routes; the cores belong to the training workers.
            torch.set_num_threads(1)
        n = len(setup.edits)
        sizes = sequential_sizes(n, args.points)
        timings.update(edits=n, sizes=sizes)
        phase_done("setup_seconds", phase)

        phase = time.perf_counter()
        log(f"training {n} single-edit experts in {workers} CPU processes; scoring at {sizes} on {device}",
            started)
        routers = [r.strip() for r in args.routers.split(",")]
        try:
            curve = run_sequential(setup, str(out), routers=routers, sizes=sizes, workers=workers,
                                   batch_size=args.batch_size or (256 if device.startswith("cuda") else 64),
                                   deadline=started + args.budget, experts_dir=work / "experts", progress=False)
        except Exception:  # noqa: BLE001
            if not device.startswith("cuda"):
                raise
            # Scoring many experts on a GPU has not run before this script: rather than lose the run, score on
            # the CPU (the experts already trained are kept and reused).
            (out / "error-gpu.txt").write_text(traceback.format_exc())
            timings["gpu_scoring_failed"] = traceback.format_exc().strip().splitlines()[-1]
            log(f"scoring on the GPU failed, going on on the CPU:\n{traceback.format_exc()}", started)
            setup.model.to("cpu")
            torch.set_num_threads(2)
            curve = run_sequential(setup, str(out), routers=routers, sizes=sizes, workers=max(1, workers - 1),
                                   batch_size=64, deadline=started + args.budget, experts_dir=work / "experts",
                                   progress=False)
        timings["points_scored"] = sorted({row["edits"] for row in curve})
        timings["experts_on_disk"] = sum(1 for _ in (work / "experts").glob("expert-*/expert/expert_config.json"))
        phase_done("sequential_seconds", phase)
    except BaseException:  # noqa: BLE001 - whatever happened, say it and keep the finished points
        (out / "error.txt").write_text(traceback.format_exc())
        timings["error"] = traceback.format_exc().strip().splitlines()[-1]
        timings["total"] = round(time.perf_counter() - started, 1)
        write_json(out / "timings.json", timings)
        traceback.print_exc()
        return 1
    for row in curve:
        print(f"{row['router']:>10} {row['edits']:4d} edits  ES {100 * row['edit_success']:5.1f}  "
              f"Loc {100 * row['locality']:5.1f}  Port {100 * row['portability']:5.1f}  "
              f"first10 ES {100 * row['first10_edit_success']:5.1f}  ({row['seconds']} s)")
    log(f"done: {json.dumps(timings)}", started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
