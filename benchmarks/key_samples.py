"""How many key samples ROME needs on a model: the edit scores and how far each edit reaches other subjects' keys,
as the corpus the key statistics C = E[k kᵀ] are estimated on grows (the model's own samples, 64 tokens each).

    python benchmarks/key_samples.py --model smollm2-135m --start 200 --n 10 --samples 50,100,200,500,1000

ROME's key k* and value v* do not depend on C (only the final rank-one update does), so each record's k* and v*
are found once (the `small-real` profile of configs/editors/rome.yaml) and the update is then written with every
C in turn, plus C = I (no statistics) as the reference. For each C the benchmark reports
- the edit scores of `t2edit.evaluation.evaluate_editor` (single mode, fluency off), and
- the reach of the edits to other subjects: |Δ k'| / |Δ k*| = |k'ᵀ C⁻¹ k*| / (k*ᵀ C⁻¹ k*) over the keys k' of the
  other records' prompts (their subject's last token), median and 90th percentile: what C is there to keep small;
- ‖C − C_largest‖ / ‖C_largest‖, how far each estimate is from the largest corpus's.
Smaller corpora are prefixes of larger ones (each sampling batch has its own seed). Training-split records
(train_cf.json 200-249) only. Skips cleanly (exit 0) when the data file is missing.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from t2edit.data.loaders import load_records
from t2edit.editors.base import EditedModel, Editor
from t2edit.editors.keys import (
    KeyCorpus,
    context_prefixes,
    key_statistics,
    layer_weight,
    layers_at_depths,
    least_squares_update,
    mlp_output_names,
)
from t2edit.editors.rome import ROMEEditorConfig, mean_keys, optimise_values
from t2edit.evaluation import evaluate_editor
from t2edit.files import CONFIGS_DIR, atomic_write_json, read_yaml
from t2edit.models import load_model

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "knowedit" / "train_cf.json"
TRAINING_RECORDS = range(200, 250)


def provenance() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout.strip()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return {"commit": commit, "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {device}"}


def rome_profile(model, name: str = "small-real") -> dict:
    """configs/editors/rome.yaml's profile, with `depth` turned into this model's layer."""
    options = dict(read_yaml(CONFIGS_DIR / "editors" / "rome.yaml")[name] or {})
    depth = options.pop("depth", None)
    if depth is not None:
        options["layer"] = layers_at_depths(model, (depth,))[0]
    return options


def percent(value) -> float | None:
    return None if value is None else round(100 * value, 1)


class FixedRankOne(Editor):
    """Writes ROME's rank-one update for records whose key and value were found beforehand, with a given C."""

    name = "rome"

    def __init__(self, module, found: dict[int, tuple[torch.Tensor, torch.Tensor]], second_moment: torch.Tensor):
        self.module, self.found, self.second_moment = module, found, second_moment

    def edit(self, model, tokenizer, records):
        original = self.module.weight.detach().clone()
        with torch.no_grad():
            for record in records:
                key, value = self.found[record.index]
                current = self.module(key[None].to(self.module.weight.dtype))[0].float()
                update = least_squares_update((value - current)[:, None], key[:, None], self.second_moment, lam=0.0)
                layer_weight(self.module).add_(update.to(self.module.weight.dtype))

        def restore():
            with torch.no_grad():
                self.module.weight.copy_(original)

        return EditedModel(model=model, restore=restore)


def reach(edit_keys: torch.Tensor, other_keys: list[torch.Tensor], second_moment: torch.Tensor) -> list[float]:
    """|k'ᵀ C⁻¹ k*| / (k*ᵀ C⁻¹ k*) for each edit key k* and each key k' of the other records."""
    c_inv_k = torch.linalg.solve(second_moment.double(), edit_keys.double().T)  # [in, edits]
    values = []
    for i in range(edit_keys.shape[0]):
        own = edit_keys[i].double() @ c_inv_k[:, i]
        for j, keys in enumerate(other_keys):
            if j != i:
                values += ((keys.double() @ c_inv_k[:, i]).abs() / own.abs()).tolist()
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--start", type=int, default=200)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--samples", default="50,100,200,500,1000", help="comma-separated key sample counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--fresh", action="store_true",
                        help="compute every C anew instead of reading the cache, so its seconds are this run's")
    parser.add_argument("--out", default=str(REPO / "results" / "key_samples_smollm2.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found (KnowEdit train_cf.json)")
        return 0
    if args.start not in TRAINING_RECORDS or args.start + args.n - 1 not in TRAINING_RECORDS:
        parser.error(f"records {TRAINING_RECORDS.start}..{TRAINING_RECORDS.stop - 1} only (training split)")
    counts = sorted(int(c) for c in args.samples.split(",") if c.strip())
    model, tokenizer = load_model(args.model)
    records = load_records(args.data, start=args.start, limit=args.n)
    settings = rome_profile(model)
    config = ROMEEditorConfig(**settings)
    ((layer, name),) = mlp_output_names(model, [config.layer], "rome", "layer").items()
    module = model.get_submodule(name)

    started = time.perf_counter()
    prefixes = context_prefixes(model, tokenizer, list(config.context_templates), config.seed)
    found, other_keys = {}, []
    for record in records:
        key = mean_keys(model, tokenizer, [record], prefixes, {"key": (module, "input")})["key"][0]
        targets = optimise_values(model, tokenizer, [record], prefixes, module, layer_weight(module).shape[0], config)
        found[record.index] = (key, targets.base[0] + targets.delta[0])
        bare = mean_keys(model, tokenizer, [record], [""], {"key": (module, "input")})["key"]
        other_keys.append(bare)
        print(f"record {record.index}: k*, v* found ({targets.steps} steps)", flush=True)
    search_seconds = time.perf_counter() - started
    edit_keys = torch.stack([found[r.index][0] for r in records])

    moments = {"C = I": (torch.eye(edit_keys.shape[1]), 0, 0.0, False)}
    for count in counts:
        stats = key_statistics(model, tokenizer, [layer], KeyCorpus(n_samples=count, seed=config.seed),
                               directory="" if args.fresh else None)[layer]
        moments[count] = (stats.second_moment, stats.tokens, stats.seconds, stats.from_cache)
    largest = moments[counts[-1]][0]
    rows = []
    for label, (second_moment, tokens, seconds, from_cache) in moments.items():
        result = evaluate_editor(FixedRankOne(module, found, second_moment), model, tokenizer, records, mode="single",
                                 fluency=False, progress=False)
        spread = torch.tensor(reach(edit_keys, other_keys, second_moment))
        rows.append({"key_samples": label, "tokens": tokens, "statistics_seconds": round(seconds, 1),
                     "statistics_from_cache": from_cache,
                     "ES": percent(result.edit_success), "Loc": percent(result.locality),
                     "Port": percent(result.portability), "ES_em": percent(result.edit_success_em),
                     "reach_median": round(spread.median().item(), 4),
                     "reach_p90": round(spread.quantile(0.9).item(), 4),
                     "distance_to_largest": None if label == "C = I" else
                     round(((second_moment - largest).norm() / largest.norm()).item(), 4)})
        print(rows[-1], flush=True)
    atomic_write_json(args.out, {"provenance": provenance(), "model": args.model,
                                 "records": f"{Path(args.data).name} {args.start}..{args.start + args.n - 1}",
                                 "mode": "single", "fluency": False, "rome_settings": settings, "layer": layer,
                                 "sample_length": config.key_sample_length,
                                 "value_search_seconds": round(search_seconds, 1), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
