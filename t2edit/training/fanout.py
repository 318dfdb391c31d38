"""Many experts from one edited set: one expert per chunk of edits, each trained alone in its own directory
(adding an expert never retrains or rewrites another): in this process, in a local pool of worker processes, or,
under `accelerate launch --num_processes N [--num_machines M ...]`, in the launched processes, each training its
share and the main process gathering them into the one expert store.

What each expert learns from follows the no-leakage rule for the whole edited set (`t2edit.leakage.training_pools`).
"""
from __future__ import annotations

import logging
import multiprocessing
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from t2edit.data.records import EditRecord
from t2edit.distributed import Processes, barrier, gather, processes
from t2edit.experts import CONFIG_NAME, Expert
from t2edit.files import atomic_write
from t2edit.leakage import training_pools
from t2edit.runs import LOCK_NAME
from t2edit.setup import load_setup
from t2edit.svf import apply_svf
from t2edit.training.config import TrainConfig, apply_preset
from t2edit.training.references import UneditedModelCache
from t2edit.training.trainer import SVFTrainer

log = logging.getLogger("t2edit")


def steps_for(n_edits: int, base_steps: int) -> int:
    """Fewer steps for small experts: a single edit of the built-in world is learned in a few tens of steps."""
    return max(30, min(base_steps, 30 + 2 * n_edits))


def expert_run_dir(out_dir, k: int) -> Path:
    return Path(out_dir) / f"expert-{k:04d}"


def train_one_expert(setup, chunk: Sequence[EditRecord], run_dir: str | Path, edited: Sequence[EditRecord],
                     base_config=None, unedited: UneditedModelCache | None = None) -> Path:
    """Train the expert of one chunk into run_dir/expert, unless it is already there (adding an expert never
    retrains or rewrites another). Returns the expert directory. `unedited`: kept across the calls on one base
    model, so the unedited model's answers, KL references and negatives' states are computed once for all."""
    # The settings of the model being edited, as `t2edit eval` uses them: the world preset for fact worlds, the
    # llm preset for a pretrained model.
    base = base_config or apply_preset(TrainConfig(
        model=None if setup.world_report is not None else setup.model_name))
    expert_dir = Path(run_dir) / "expert"
    if (expert_dir / CONFIG_NAME).exists():
        found = [e["prompt"] for e in Expert.from_pretrained(expert_dir).info.edits]
        if found != [r.prompt for r in chunk]:
            raise ValueError(f"{expert_dir} holds an expert for other edits ({found[:1]} ...) than this run's "
                             f"({chunk[0].prompt!r} ...); choose another output directory")
        return expert_dir
    # Edit-success checks only where they stop training early (the llm preset: at strict ES 1.0).
    config = replace(base, output_dir=str(run_dir), save_every=0, resume=False, progress=False,
                     eval_every=base.eval_every if base.stop_at_edit_success else 0,
                     steps=steps_for(len(chunk), base.steps), n_edits=len(chunk))
    pool, subject = training_pools(setup, edited, chunk)
    svf_model = apply_svf(setup.model, config.svf_config(), progress=False)
    try:
        # The trainer records each edit's prompt, subject and target in the expert (what the scope routers read).
        expert = SVFTrainer(svf_model, setup.tokenizer, list(chunk), pool, config, subject_prompts=subject,
                            unedited=unedited).train()
        expert.save_pretrained(expert_dir)
    finally:
        svf_model.unload()
    return expert_dir


def trained_experts(setup, chunks: list[list[EditRecord]], out_dir: str | Path, edited: Sequence[EditRecord],
                    base_config=None, progress: bool = True, workers: int = 1, procs: Processes | None = None):
    """Train one expert per chunk (in out_dir/expert-NNNN/expert, skipping those already on disk) and yield k as
    soon as experts 0..k are all on disk, so a caller can score the first k while later ones train.

    `workers` > 1 trains in that many CPU processes of one thread each (`setup.spec` says how each reloads the
    setup): a single-edit expert of a fact world is a few hundred tiny, latency-bound steps that one core runs
    about as fast as a GPU. Each expert is trained alone either way, so the result does not depend on `workers`.

    Under `accelerate launch` with more than one process, every launched process must call this with the same
    arguments: the launched processes are the workers (`workers` must be 1), and see `_trained_across_processes`.
    `procs`: the processes to train across (default: the launch's; `Processes()`: this process alone)."""
    procs = processes() if procs is None else procs
    if procs.launched:
        if workers > 1:
            raise ValueError("--workers starts a local pool of processes; under accelerate launch the launched "
                             "processes train the experts: drop --workers")
        yield from _trained_across_processes(setup, chunks, out_dir, edited, base_config, progress, procs)
        return
    todo = [k for k in range(len(chunks)) if not (expert_run_dir(out_dir, k) / "expert" / CONFIG_NAME).exists()]
    bar = tqdm(total=len(chunks), initial=len(chunks) - len(todo), desc=f"{len(chunks)} experts",
               disable=not progress)
    if workers <= 1 or len(todo) <= 1:
        states = UneditedModelCache()
        for k, chunk in enumerate(chunks):
            if k in todo:
                train_one_expert(setup, chunk, expert_run_dir(out_dir, k), edited, base_config, states)
                bar.update(1)
            yield k
        bar.close()
        return
    if getattr(setup, "spec", None) is None:
        raise ValueError("training experts in worker processes needs a setup from t2edit.setup.load_setup (its "
                         "spec says how each worker reloads it); pass workers=1")
    # Decompose the target matrices once, here, into the shared SVD cache: every process then reads the same
    # factors (each expert's z scales these singular vectors, so all processes must agree on them).
    svf_config = (base_config or TrainConfig()).svf_config()
    if svf_config.svd_cache_dir == "":
        raise ValueError("training experts in worker processes needs the SVD cache (svd_cache_dir not ''), so that "
                         "every process uses the same singular vectors; pass workers=1")
    apply_svf(setup.model, svf_config, progress=False).unload()
    position = {id(r): i for i, r in enumerate(setup.edits)}
    tasks = [(k, [position[id(r)] for r in chunks[k]]) for k in todo]
    done = set(range(len(chunks))) - set(todo)
    next_k = 0
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold a CUDA context
    with context.Pool(min(workers, len(todo)), initializer=_worker_start,
                      initargs=(setup.spec, str(out_dir), [position[id(r)] for r in edited], base_config)) as pool:
        for k, _seconds in pool.imap(_worker_train, tasks):
            done.add(k)
            bar.update(1)
            while next_k in done:
                yield next_k
                next_k += 1
    bar.close()
    yield from range(next_k, len(chunks))


def _trained_across_processes(setup, chunks, out_dir, edited, base_config, progress, procs: Processes):
    """The experts not yet in the main process's store, trained in rounds: in round r process p trains expert
    todo[r·N + p] (the main process into the store, the others into a scratch directory of their own), then the
    main process gathers the others' run directories (z, router keys, config, metrics: kilobytes) and writes them
    into the store. No shared filesystem is needed: the files travel through torch.distributed. Every expert is on
    disk before anything is yielded (scoring between rounds would hold the other processes up); each yields all k.

    The singular vectors every expert scales must be the same in every process: the main process decomposes the
    target matrices first, into the SVD cache, which the others read where they share its filesystem (elsewhere
    they decompose the same weights themselves, equal up to float rounding)."""
    todo = gather([k for k in range(len(chunks)) if not (expert_run_dir(out_dir, k) / "expert" / CONFIG_NAME).exists()]
                  if procs.is_main else None, procs)[0]  # the main process's store decides
    svf_config = (base_config or TrainConfig()).svf_config()
    if todo and procs.is_main:
        apply_svf(setup.model, svf_config, progress=False).unload()
    barrier(procs)
    bar = tqdm(total=len(chunks), initial=len(chunks) - len(todo), desc=f"{len(chunks)} experts, {procs.count} "
               f"processes", disable=not (progress and procs.is_main))
    states = UneditedModelCache()
    with tempfile.TemporaryDirectory(prefix="t2edit-experts-") as scratch:
        for start in range(0, len(todo), procs.count):
            mine = todo[start + procs.index] if start + procs.index < len(todo) else None
            files = None
            if mine is not None:
                run_dir = expert_run_dir(out_dir if procs.is_main else scratch, mine)
                train_one_expert(setup, chunks[mine], run_dir, edited, base_config, states)
                files = None if procs.is_main else _run_files(run_dir)
            for p, (k, sent) in enumerate(gather((mine, files), procs)):
                if k is None:
                    continue
                if procs.is_main:
                    if sent is not None:
                        _write_run_files(expert_run_dir(out_dir, k), sent)
                    log.info("expert %d trained by process %d of %d", k, p, procs.count)
                bar.update(1)
    bar.close()
    barrier(procs)  # the store is complete before any process goes on
    yield from range(len(chunks))


def _run_files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a finished expert's run directory (relative path → bytes), but its lock."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def _write_run_files(run_dir: Path, files: dict[str, bytes]) -> None:
    """`_run_files` written back, each atomically, the expert's config last (a directory with it is complete)."""
    for name in sorted(files, key=lambda n: Path(n).name == CONFIG_NAME):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / name, files[name])


_WORKER: dict = {}


def _worker_start(spec: dict, out_dir: str, edited: list[int], base_config):
    torch.set_num_threads(1)
    setup = load_setup(**{**spec, "progress": False})
    _WORKER.update(setup=setup, out_dir=out_dir, edited=[setup.edits[i] for i in edited], base=base_config,
                   states=UneditedModelCache())


def _worker_train(task: tuple[int, list[int]]) -> tuple[int, float]:
    k, positions = task
    started = time.perf_counter()
    setup = _WORKER["setup"]
    train_one_expert(setup, [setup.edits[i] for i in positions], expert_run_dir(_WORKER["out_dir"], k),
                     _WORKER["edited"], _WORKER["base"], _WORKER["states"])
    return k, time.perf_counter() - started


def train_experts(setup, chunks: list[list[EditRecord]], out_dir: str | Path, edited: Sequence[EditRecord],
                  base_config=None, progress: bool = True, workers: int = 1,
                  procs: Processes | None = None) -> list[Path]:
    """Train one expert per chunk (see `trained_experts`); returns the expert directories."""
    for _ in trained_experts(setup, chunks, out_dir, edited, base_config, progress, workers, procs):
        pass
    return [expert_run_dir(out_dir, k) / "expert" for k in range(len(chunks))]


__all__ = ["expert_run_dir", "steps_for", "train_experts", "train_one_expert", "trained_experts"]
