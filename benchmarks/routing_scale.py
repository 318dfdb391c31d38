"""Two-pass inference against the number of experts K, on a real LLM (default: the shipped SmolLM2-135M); a table
plus JSON.

K experts, one per KnowEdit record (its edit prompt, subject and target recorded in the expert, as a trained
single-edit expert records them), behind the `scope-split` router fitted on training-side negatives. Their z are
drawn near the neutral point (what routing and the per-row mixture cost does not depend on z's values, so no
expert needs training for this; the stream's trained experts are scored in docs/results.md). For each K: the
router's fit, greedy answers (8 tokens) for 32 prompts (16 edit prompts of the experts, 16 prompts of other
records) in seconds per prompt next to the unedited model, which of them were routed, and the disk size of the K
experts saved as `t2edit` writes them.

    python benchmarks/routing_scale.py --data data/knowedit/train_cf.json --k 1,100,1000 --out results/routing_scale.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import _timed  # benchmarks/ is on sys.path when this runs as a script: one timer for the benches

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "knowedit" / "train_cf.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--k", default="1,100,1000", help="numbers of experts")
    parser.add_argument("--negatives", type=int, default=256, help="training-side prompts the router is fitted on")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(REPO / "results" / "routing_scale.json"))
    args = parser.parse_args(argv)
    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found (KnowEdit train_cf.json)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = sorted(int(k) for k in args.k.split(","))
    from t2edit.evaluation.metrics import greedy_completions
    from t2edit.experts import Expert, ExpertInfo
    from t2edit.jobs import train_config_for
    from t2edit.leakage import router_negatives
    from t2edit.routing import AdaptiveModel, annotate_expert, encode, get_router
    from t2edit.setup import load_setup
    from t2edit.svf import apply_svf

    setup = load_setup(args.model, args.data, 0, max(ks), progress=False)
    tokenizer = setup.tokenizer
    tokenizer.padding_side = "left"
    negatives = router_negatives(setup, setup.edits)[:args.negatives]
    # the same 32 prompts at every K: the first 16 records' edit prompts (an expert's own prompt once K reaches it)
    # and 16 prompts of records no expert holds
    prompts = [r.prompt for r in setup.edits[:16]] + [r.prompt for r in setup.other_records[:16]]
    unedited = _timed(lambda: greedy_completions(setup.model, tokenizer, prompts, 8, batch_size=32), repeat=2)
    svf = apply_svf(setup.model, train_config_for(setup).svf_config(), progress=False)
    generator = torch.Generator().manual_seed(0)
    experts = []
    for record in setup.edits:
        with torch.no_grad():
            for z in svf.z_parameters():
                z.copy_(1 + 0.01 * torch.randn(z.shape, generator=generator))
        expert = Expert.from_model(svf, info=ExpertInfo(name=f"k-{len(experts)}"))
        annotate_expert(expert, [record])
        experts.append(expert)
    rows = []
    for k in ks:
        mine = experts[:k]
        started = time.perf_counter()
        adaptive = AdaptiveModel(svf, mine, get_router("scope-split"), tokenizer, negatives=negatives).eval()
        fit = time.perf_counter() - started
        seconds = _timed(lambda model=adaptive: greedy_completions(model, tokenizer, prompts, 8, batch_size=32), repeat=2)
        weights = torch.cat([adaptive.router.weights(b) for b in encode(adaptive, tokenizer, prompts, 32)])
        routed = (weights.argmax(-1) < k).tolist()
        with tempfile.TemporaryDirectory() as store:
            for i, expert in enumerate(mine):
                expert.save_pretrained(Path(store) / f"expert-{i:04d}")
            size = sum(p.stat().st_size for p in Path(store).rglob("*") if p.is_file())
        row = {"experts": k, "router_fit_seconds": round(fit, 2),
               "seconds_per_prompt": round(seconds / len(prompts), 4),
               "unedited_seconds_per_prompt": round(unedited / len(prompts), 4),
               "held_edit_prompts_routed": f"{sum(routed[:min(k, 16)])}/{min(k, 16)}",
               "other_prompts_routed": f"{sum(routed[min(k, 16):])}/{len(prompts) - min(k, 16)}",
               "store_megabytes": round(size / 2 ** 20, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    svf.unload()
    from key_samples import (
        provenance,  # benchmarks/ is on sys.path when this runs as a script
    )

    payload = {"provenance": provenance(), "model": args.model, "router": "scope-split",
               "negatives": len(negatives), "prompts": 32, "max_new_tokens": 8, "rows": rows}
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
