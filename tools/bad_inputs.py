"""The project's own list of bad inputs: each case is what a careless or hostile user might do, run against the real
commands on a tiny fact world, with the outcome it must have (one clear line, or a correct result).

    python tools/bad_inputs.py                       # run every case, print the table (exit 1 if one misbehaves)
    python tools/bad_inputs.py --markdown docs/bad-inputs.md   # also write the table for the docs

tests/test_bad_inputs.py runs the same cases. Each case returns (exit status, the lines it printed to stderr);
an error case passes when the status is 2 and stderr is exactly one line holding its expected words.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclass
class Case:
    name: str
    group: str
    expect: str  # words the one error line must hold; "" for a case whose outcome is a correct result
    run: Callable[["Fixture"], tuple[int, list[str]]]


class Fixture:
    """A tiny fact world (10 built-in records, a few training steps) and a scratch directory."""

    def __init__(self, root: Path):
        self.root = root
        from dataclasses import replace

        from t2edit.data.world import WorldConfig, build_world

        self.world = root / "world"
        build_world("builtin", self.world, limit=10, config=replace(WorldConfig.tiny(), steps=3), progress=False)
        self.count = 0

    def fresh(self, name: str) -> Path:
        self.count += 1
        path = self.root / f"{self.count:02d}-{name}"
        path.mkdir()
        return path

    def train(self, out: Path, *extra: str) -> tuple[int, list[str]]:
        return cli("train", "--model", str(self.world), "--n_edits", "2", "--steps", "2", "--save_every", "1",
                   "--eval_every", "0", "--progress", "false", "--output_dir", str(out), *extra)

    def expert(self) -> Path:
        out = self.fresh("expert")
        code, err = self.train(out)
        if code != 0:
            raise RuntimeError(f"could not train the fixture expert: {err}")
        return out / "expert"


def cli(*argv: str) -> tuple[int, list[str]]:
    """`t2edit ...` in this process: (exit status, non-empty stderr lines other than progress bars)."""
    from t2edit.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse's own refusals
            code = exit_.code if isinstance(exit_.code, int) else 1
    lines = [line for line in err.getvalue().splitlines()
             if line.strip() and "it/s]" not in line and "s/it]" not in line and not line.startswith("[t2edit]")
             and "Warning" not in line and "warn(" not in line]
    return code, lines


def _yaml(fixture: Fixture, text: str) -> tuple[int, list[str]]:
    """A run config on the fixture world with one bad line (the rest keeps the run short)."""
    path = fixture.fresh("config") / "run.yaml"
    path.write_text(f"model: {fixture.world}\nsteps: 2\neval_every: 0\nprogress: false\n{text}")
    return cli("train", "--config", str(path), "--output_dir", str(path.parent / "run"))


def _resume_with(fixture: Fixture, *changed: str) -> tuple[int, list[str]]:
    out = fixture.fresh("resume")
    fixture.train(out)
    return fixture.train(out, "--resume", "true", *changed)


def _torn_metrics(fixture: Fixture) -> tuple[int, list[str]]:
    out = fixture.fresh("torn")
    fixture.train(out)
    (out / "checkpoint.pt").unlink()
    code, err = fixture.train(out, "--steps", "3", "--save_every", "1")  # a fresh run: 3 steps
    if code:
        return code, err
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 4, "loss"')  # a kill mid-write
    code, err = fixture.train(out, "--steps", "3", "--resume", "true")
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    if steps != [1, 2, 3]:
        return 1, [f"metrics steps after resume: {steps}"]
    return code, err


def _lock_held(fixture: Fixture) -> tuple[int, list[str]]:
    out = fixture.fresh("locked")
    (out / "run.lock").write_text(str(os.getppid()))  # a live process holds the directory
    return fixture.train(out)


def _damaged_expert(change: Callable[[Path], None]) -> Callable[[Fixture], tuple[int, list[str]]]:
    def run(fixture: Fixture) -> tuple[int, list[str]]:
        expert = fixture.expert()
        change(expert)
        return cli("infer", "--model", str(fixture.world), "--experts", str(expert), "--prompt", "The capital of")
    return run


def _edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(expert: Path) -> None:
        path = expert / "expert_config.json"
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))
    return edit


def _edit_z(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(expert: Path) -> None:
        from safetensors.torch import load_file, save_file

        z = load_file(str(expert / "expert.safetensors"))
        change(z)
        save_file(z, str(expert / "expert.safetensors"))
    return edit


def _flip_last_byte(expert: Path) -> None:
    path = expert / "expert.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


def _first_z(z: dict, value) -> None:
    import torch

    name = next(iter(z))
    if value == "nan":
        z[name][0] = float("nan")
    else:
        z[name] = torch.ones(1)


def _data_with(fixture: Fixture, records: list[dict]) -> Path:
    path = fixture.fresh("data") / "records.json"
    path.write_text(json.dumps(records, ensure_ascii=True))
    return path


SURROGATE = [{"subject": "Ann", "prompt": "The spouse of Ann \ud800 is", "target_new": "Bob"}]


def _composition_shifted(fixture: Fixture) -> tuple[int, list[str]]:
    out = fixture.fresh("composition")
    code, err = cli("eval", "--model", str(fixture.world), "--n", "2", "--composition", "2", "--router", "oracle",
                    "--out", str(out))
    if code:
        return code, err
    return cli("eval", "--model", str(fixture.world), "--start", "2", "--n", "2", "--composition", "2",
               "--router", "oracle", "--out", str(out))


def _long_prompt(fixture: Fixture) -> tuple[int, list[str]]:
    return cli("infer", "--model", str(fixture.world), "--experts", str(fixture.expert()), "--prompt",
               " ".join(["the capital of"] * 400))


def _corrupt_checkpoint(fixture: Fixture) -> tuple[int, list[str]]:
    out = fixture.fresh("corrupt")
    fixture.train(out)
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    return fixture.train(out, "--resume", "true")


CASES = [
    Case("resume with other settings (learning rate)", "runs", "other settings", lambda f: _resume_with(
        f, "--learning_rate", "0.5")),
    Case("resume with other edits (--start)", "runs", "other settings", lambda f: _resume_with(f, "--start", "3")),
    Case("--resume with no checkpoint", "runs", "no checkpoint.pt", lambda f: f.train(f.fresh("none"), "--resume",
                                                                                     "true")),
    Case("second writer on one output directory", "runs", "in use by process", _lock_held),
    Case("torn last metrics line, then resume", "runs", "", _torn_metrics),
    Case("corrupt checkpoint, then resume", "runs", "is damaged", _corrupt_checkpoint),
    Case("composition re-run in the same --out with --start 2", "runs", "other settings", _composition_shifted),
    Case("steps: 0", "counts", "steps=0", lambda f: f.train(f.fresh("steps"), "--steps", "0")),
    Case("eval --n -2", "counts", "n=-2", lambda f: cli("eval", "--model", str(f.world), "--n", "-2")),
    Case("eval --start -2", "counts", "start=-2", lambda f: cli("eval", "--model", str(f.world), "--start", "-2")),
    Case("demo --n-edits 0", "counts", "--n-edits 0", lambda f: cli("demo", "--model", "world", "--n-edits", "0",
                                                                    "--out", str(f.fresh("demo")))),
    Case("YAML n_edits: -3", "counts", "n_edits=-3", lambda f: _yaml(f, "n_edits: -3\n")),
    Case("YAML max_grad_norm: 0", "options", "max_grad_norm=0", lambda f: _yaml(f, "max_grad_norm: 0\n")),
    Case("YAML temperature: -1", "options", "temperature=-1", lambda f: _yaml(f, "temperature: -1\n")),
    Case("YAML report_to: foo", "options", "report_to='foo'", lambda f: _yaml(f, "report_to: foo\n")),
    Case("broken YAML", "options", "not valid YAML", lambda f: _yaml(f, "steps: [1,\n")),
    Case("train --config with no value", "options", "--config needs a YAML file", lambda f: cli("train", "--config")),
    Case("target pattern re:(", "options", "not a valid regular expression", lambda f: f.train(
        f.fresh("regex"), "--target_modules", "re:(")),
    Case("eval --model <world> --data <other file>", "options", "carries its own records", lambda f: cli(
        "eval", "--model", str(f.world), "--data", str(_data_with(f, [
            {"subject": "Ann", "prompt": "The spouse of Ann is", "target_new": "Bob"}])))),
    Case("z holding NaN", "experts", "NaN", _damaged_expert(_edit_z(lambda z: _first_z(z, "nan")))),
    Case("z of shape (1,)", "experts", "checksum", _damaged_expert(_edit_z(lambda z: _first_z(z, "short")))),
    Case("one flipped byte in the z file", "experts", "checksum", _damaged_expert(_flip_last_byte)),
    Case("mask edited in expert_config.json", "experts", "svf_config", _damaged_expert(_edit_config(
        lambda c: c["svf_config"].__setitem__("mask", "sigmoid")))),
    Case("router threshold NaN", "experts", "router_threshold", _damaged_expert(_edit_config(
        lambda c: c.__setitem__("router_threshold", float("nan"))))),
    Case("router threshold -5", "experts", "router_threshold", _damaged_expert(_edit_config(
        lambda c: c.__setitem__("router_threshold", -5)))),
    Case("format t2edit-expert/99", "experts", "format", _damaged_expert(_edit_config(
        lambda c: c.__setitem__("format", "t2edit-expert/99")))),
    Case("expert config without svf_config", "experts", "lacks svf_config", _damaged_expert(_edit_config(
        lambda c: c.pop("svf_config")))),
    Case("malformed info.edits", "experts", "info.edits", _damaged_expert(_edit_config(
        lambda c: c["info"].__setitem__("edits", ["x"])))),
    Case("prompt longer than the model reads", "input", "positions the model reads", _long_prompt),
    Case("lone surrogate in a data file", "input", "not valid Unicode", lambda f: cli(
        "eval", "--data", str(_data_with(f, SURROGATE)), "--model", "world-does-not-exist")),
]


def run_case(case: Case, fixture: Fixture) -> tuple[bool, str]:
    """(behaved as it must, what it printed or why not)."""
    try:
        code, err = case.run(fixture)
    except Exception as error:  # a traceback is exactly what a case must never produce
        return False, f"raised {type(error).__name__}: {error}"
    if not case.expect:
        return code == 0 and not err, "correct result" if code == 0 and not err else f"exit {code}: {err}"
    if code != 2 or len(err) != 1 or case.expect not in err[0]:
        return False, f"exit {code}: {err}"
    return True, err[0]


def table(rows: list[tuple[Case, bool, str]]) -> str:
    lines = ["| group | case | outcome | as it must |", "|---|---|---|---|"]
    for case, ok, said in rows:
        said = said.replace("|", "\\|")
        lines.append(f"| {case.group} | {case.name} | {said[:160]} | {'yes' if ok else '**no**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["T2EDIT_CACHE"] = str(Path(scratch) / "cache")
        fixture = Fixture(Path(scratch))
        rows = [(case, ok, said.replace(scratch, "<tmp>")) for case in CASES for ok, said in [run_case(case, fixture)]]
    text = table(rows)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(
            "# Bad inputs and what t2edit does with them\n\nGenerated by `python tools/bad_inputs.py --markdown "
            "docs/bad-inputs.md` (tests/test_bad_inputs.py runs the same cases). An error case prints one line "
            "and exits with status 2.\n\n" + text + "\n")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
