"""`t2edit infer`: load a base model and K experts, route and answer each prompt in two passes."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from t2edit.batching import check_fits_context, length_batches
from t2edit.data.world import build_world, load_world, world_facts
from t2edit.experts import Expert
from t2edit.leakage import negatives_from_edits
from t2edit.models import load_model
from t2edit.rollouts import greedy_answers
from t2edit.routing import AdaptiveModel, EmbeddingRouter, default_router, get_router
from t2edit.setup import is_world_dir

INFER_BATCH = 32  # prompts routed and answered together (one generate call each)
INFER_TOKENS = 8192  # padded prompt tokens per batch: one long prompt shares its batch with few others


def read_prompt_file(path: str, what: str) -> list[str]:
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{what} file {path} not found; give a text file with one prompt per line")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what} file {path} holds no prompts (one per line)")
    return lines


def _load(model_name: str | None):
    """(model, tokenizer, the world's facts: default negatives on a fact world, else [])."""
    if model_name is None or is_world_dir(model_name):
        world = build_world("builtin", progress=False) if model_name is None else load_world(model_name)
        facts = world_facts(world.records, seed=world.report.get("seed", 0)).facts
        return world.model, world.tokenizer, [f.prompt for f in facts]
    model, tokenizer = load_model(model_name)
    return model, tokenizer, []


def run_infer(expert_dirs: Sequence[str], prompts: Sequence[str], model: str | None = None,
              router: str | None = None, negatives: Sequence[str] | None = None, max_new_tokens: int = 8,
              mixing: str = "auto") -> list[dict]:
    """Per prompt: the experts the router picked with their weights, the weight of "no expert", and the answer.

    `router` None: `t2edit.routing.default_router` (scope-split on a real model whose experts name each edit's
    subject), else the experts' own routers (`embedding`). `negatives`: prompts the experts must leave alone
    (default: a world's other facts, else the experts' relations asked about their other subjects)."""
    experts = [Expert.from_pretrained(d) for d in expert_dirs]
    base, tokenizer, world_prompts = _load(model)
    edits = [e for x in experts for e in x.info.edits]
    edit_prompts = {e["prompt"] for e in edits}
    subjects = {e["subject"] for e in edits if e.get("subject")}
    if negatives is not None:
        negatives = [n for n in negatives if n not in edit_prompts]
    elif world_prompts:
        # A world's facts hold the edits' own aliases: no question about an edited subject is a negative there.
        negatives = [n for n in world_prompts if n not in edit_prompts and not any(s in n for s in subjects)]
    else:
        negatives = negatives_from_edits(edits)
    name = router or default_router(edits, world=bool(world_prompts))
    if name == "classifier" and not negatives:
        raise ValueError("--router classifier needs --negatives FILE (prompts the experts must leave alone)")
    for number, prompt in enumerate(prompts, 1):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"prompt {number} ({prompt!r:.60}) holds text that is not valid Unicode; give UTF-8 "
                             f"text") from None
    check_fits_context(base, tokenizer, [(f"prompt {n}", p) for n, p in enumerate(prompts, 1)], max_new_tokens)
    tokenizer.padding_side = "left"
    chosen = get_router(name) if name else EmbeddingRouter()
    adaptive = AdaptiveModel.from_experts(base, experts, chosen, tokenizer, mixing=mixing, negatives=negatives).eval()
    answers, weights = [None] * len(prompts), [None] * len(prompts)
    for chunk in length_batches([len(tokenizer(p)["input_ids"]) for p in prompts], INFER_BATCH, INFER_TOKENS):
        said = greedy_answers(adaptive, tokenizer, [prompts[i] for i in chunk], max_new_tokens,
                              batch_size=INFER_BATCH)
        for i, answer, mix in zip(chunk, said, adaptive.last_weights.tolist()):
            answers[i], weights[i] = answer, mix
    names = [str(Path(d)) for d in expert_dirs]
    rows = []
    for prompt, mix, answer in zip(prompts, weights, answers):
        picked = {names[k]: round(w, 4) for k, w in enumerate(mix[:-1]) if w != 0}
        rows.append({"prompt": prompt, "experts": picked, "none": round(mix[-1], 4), "answer": answer})
    return rows


__all__ = ["read_prompt_file", "run_infer"]
