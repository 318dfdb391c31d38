"""What a job edits: a model, the records to edit, and the other facts an editor may learn from.

`load_setup` turns a model spec and a data file into an `EditingSetup`: a shipped model, local path or hub name
with records from the file, or a fact world (built and cached from the file, or loaded from its directory).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from t2edit.data.loaders import load_records
from t2edit.data.records import EditRecord
from t2edit.data.world import WorldConfig, build_world, load_world, world_facts
from t2edit.models import load_model


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


def load_setup(model: str | None, data: str | None = None, start: int = 0, n_edits: int | None = None,
               progress: bool = True, world_preset: str = "default", train_data: str | None = None,
               skip_bad: bool = False) -> EditingSetup:
    """`model` None or a world directory → the fact world of `data` (built and cached if needed); otherwise a
    shipped model name (`smollm2-135m`), a local path or a hub name, with records from `data`.

    What editors may learn from (IKE demonstrations, SVF neighbours, router negatives) is `train_data`'s records
    when given (KnowEdit's protocol: a training split), else the records of `data` that are not edited. `data`
    None: the built-in records (a world directory: its own records; naming other data there is refused)."""
    if start < 0:
        raise ValueError(f"start={start}: the first edited record is an index from 0 (negative values do not count "
                         f"from the end); pass --start 0 or more")
    if n_edits is not None and n_edits < 1:
        raise ValueError(f"n={n_edits}: the number of records to edit must be at least 1 (leave it out for all)")
    world = None
    data = "builtin" if data is None and not is_world_dir(model) else data
    if model is None:
        if world_preset not in ("default", "tiny"):
            raise ValueError(f"world_preset={world_preset!r}; choose default or tiny")
        config = WorldConfig.tiny() if world_preset == "tiny" else WorldConfig()
        world = build_world(data, config=config, progress=progress, skip_bad=skip_bad)
    elif is_world_dir(model):
        world = load_world(model)
        source = world.report.get("source")
        if data is not None and _data_key(data) != _data_key(source):
            raise ValueError(f"--data {data}: the world in {model} was built from {source} and carries its own "
                             f"records; drop --data, or build a world from that file (t2edit world build --data ...)")
        data = source
    if world is not None:
        records = world.records
        facts = world_facts(records, seed=world.report.get("seed", 0)).facts
        extra = [f.prompt for f in facts]
        net, tokenizer, name, report = world.model, world.tokenizer, str(world.path or "world"), world.report
    else:
        records = load_records(data, skip_bad=skip_bad)
        net, tokenizer = load_model(model)
        extra, name, report = [], model, None
    end = len(records) if n_edits is None else start + n_edits
    edits = records[start:end]
    if not edits:
        raise ValueError(f"no records selected from {data} (start={start}, n={n_edits}, {len(records)} records)")
    others = records[:start] + records[end:]
    if train_data is not None:
        edited = {r.prompt for r in edits}
        others = [r for r in load_records(train_data, skip_bad=skip_bad) if r.prompt not in edited]
    net.eval()
    # A world is reloaded from its directory (built once, here), whatever `model` named.
    spec = {"model": str(world.path) if world is not None and world.path else model, "data": data, "start": start,
            "n_edits": n_edits, "world_preset": world_preset, "train_data": train_data, "skip_bad": skip_bad}
    return EditingSetup(net, tokenizer, edits, others, extra, name, report, spec)


def _data_key(data) -> str:
    """A data argument as a world records its source: 'builtin', or the file's resolved path."""
    return "builtin" if str(data) == "builtin" else str(Path(str(data)).expanduser().resolve())


__all__ = ["EditingSetup", "is_world_dir", "load_setup"]
