"""`t2edit infer` / scripts/infer.py: load a base model and K experts, route and answer each prompt."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from t2edit.routers import ROUTERS, names_its_subject


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None,
                        help="world directory or model name (smollm2-135m, a transformers path); default: the "
                             "built-in fact world")
    parser.add_argument("--experts", nargs="+", required=True, help="expert directories (expert_config.json inside)")
    parser.add_argument("--router", default=None, choices=sorted(set(ROUTERS) - {"oracle"}),
                        help="how experts are picked per prompt (default: scope-split, subject + relation, on a "
                             "real model whose experts name each edit's subject inside its prompt; else embedding)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    source.add_argument("--prompts", help="text file, one prompt per line")
    parser.add_argument("--negatives", default=None,
                        help="text file of prompts the experts must leave alone (calibrates the routers; default: "
                             "a world's other facts, else the experts' relations asked about their other subjects)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--mixing", choices=["auto", "rows", "groups"], default="auto")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")
    return parser


def _read_lines(path: str, what: str) -> list[str]:
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{what} file {path} not found; give a text file with one prompt per line")
    lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what} file {path} holds no prompts (one per line)")
    return lines


def _load(model_name: str | None):
    """(model, tokenizer, default negatives)."""
    from t2edit.jobs import is_world_dir

    if model_name is None or is_world_dir(model_name):
        from t2edit.data.world import build_world, load_world, world_facts

        world = build_world("builtin", progress=False) if model_name is None else load_world(model_name)
        facts = world_facts(world.records, seed=world.report.get("seed", 0)).facts
        return world.model, world.tokenizer, [f.prompt for f in facts]
    from t2edit.models import load_model

    model, tokenizer = load_model(model_name)
    return model, tokenizer, []


def default_router(edits: list[dict], world: bool) -> str:
    """scope-split on a real model (it recognises an edited subject and relation in other words) when every edit
    names its subject inside its prompt, which it keys on; embedding otherwise, and on a fact world."""
    named = bool(edits) and all(names_its_subject(e.get("subject"), e["prompt"]) for e in edits)
    return "scope-split" if named and not world else "embedding"


def negatives_from_edits(edits: list[dict]) -> list[str]:
    """Prompts no expert should take, built from the experts' own edits when no other facts are at hand: each
    edit's relation asked about the other edits' subjects and objects, and each edited subject asked about the
    other relations (what `scope-split` calibrates its subject and relation thresholds on), minus the edits."""
    from t2edit.data.records import EditRecord
    from t2edit.evaluation.composition import template_prompts
    from t2edit.leakage import prompt_key

    records = [EditRecord(subject=e["subject"], prompt=e["prompt"], target_new=[e["target"]]) for e in edits
               if e.get("target") and names_its_subject(e.get("subject"), e["prompt"])]
    return template_prompts(records, {prompt_key(e["prompt"]) for e in edits}, limit=800)


def run(args) -> list[dict]:
    import torch

    from t2edit.adaptation import AdaptiveModel
    from t2edit.experts import Expert
    from t2edit.routers import edits_of, get_router

    prompts = args.prompt or _read_lines(args.prompts, "--prompts")
    experts = [Expert.from_pretrained(d) for d in args.experts]
    model, tokenizer, world_facts = _load(args.model)
    edits = [e for x in experts for e in edits_of(x)]
    edit_prompts = {e["prompt"] for e in edits}
    subjects = {e["subject"] for e in edits if e.get("subject")}
    if args.negatives:
        negatives = [n for n in _read_lines(args.negatives, "--negatives") if n not in edit_prompts]
    elif world_facts:
        # A world's facts hold the edits' own aliases: no question about an edited subject is a negative there.
        negatives = [n for n in world_facts if n not in edit_prompts and not any(s in n for s in subjects)]
    else:
        negatives = negatives_from_edits(edits)
    router = args.router or default_router(edits, world=bool(world_facts))
    if router == "classifier" and not negatives:
        raise ValueError("--router classifier needs --negatives FILE (prompts the experts must leave alone)")
    tokenizer.padding_side = "left"
    adaptive = AdaptiveModel.from_experts(model, experts, get_router(router), tokenizer, mixing=args.mixing,
                                          negatives=negatives).eval()
    names = [str(Path(d)) for d in args.experts]
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(adaptive.device)
    with torch.no_grad():
        out = adaptive.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    rows = []
    for prompt, weights, answer in zip(prompts, adaptive.last_weights.tolist(), answers):
        chosen = {names[k]: round(w, 4) for k, w in enumerate(weights[:-1]) if w != 0}
        rows.append({"prompt": prompt, "experts": chosen, "none": round(weights[-1], 4), "answer": answer.strip()})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="infer", description=__doc__))
    args = parser.parse_args(argv)
    try:
        rows = run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"infer: error: {error}", file=sys.stderr)
        return 2
    for row in rows:
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            chosen = ", ".join(f"{k} ({w:g})" for k, w in row["experts"].items()) or "no expert"
            answer = " ".join(row["answer"].split())  # one line per answer here; --json keeps it exact
            print(f"{row['prompt']!r}\n  experts: {chosen}\n  answer:  {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
