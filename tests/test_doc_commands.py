"""Every command in a fenced ```bash block of README.md and docs/*.md runs from a fresh clone as written: the paths
into the repository it names exist, and its arguments pass the real parsers (`t2edit.cli.build_parser()`, the
training config parser with its YAML file, accelerate's launcher, and each script's own argparse parser, stopped
right after parsing). Data under data/ is exempt from the existence check where the same page says where to get it.
The reproduce commands of the generated tables (tools/readme_tables.py) are checked the same way."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
# Tokens naming a file or folder of the repository (checked to exist); data/ only where the page says where to get it.
REPO_PREFIXES = ("configs/", "scripts/", "benchmarks/", "tools/", "docs/", "t2edit/", "tests/", "rewards/")
OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", ">&", "&>", "2>", "1>"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SKIPPED = {"cd", "pip", "pip3", "export", "git", ".", "source"}  # environment set-up: not the project's commands
PYTHON = re.compile(r"^python(3(\.\d+)?)?$")


def bash_blocks(text: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang in ("bash", "sh", "shell", "console")]


def prose_of(text: str) -> str:
    """The page without its fenced blocks."""
    return FENCE.sub("", text)


def commands_of(block: str) -> list[list[str]]:
    """The commands of a bash block as token lists: continuation lines joined, comments dropped, `&&` / `|` / `;`
    chains split, redirections and leading VAR=value assignments removed; lines that only assign a variable from a
    command substitution (`WORLD=$(python -c ...)`) are set-up and skipped."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=\$\(", line):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens, current, skip_next = list(lexer), [], False
        for token in tokens + [";"]:
            if skip_next:
                skip_next = False
            elif token in REDIRECTS or (token.endswith(">") and token.rstrip(">&").isdigit()):
                skip_next = True
            elif token in OPERATORS:
                while current and ASSIGNMENT.match(current[0]):
                    current.pop(0)
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


class _Parsed(Exception):
    """Raised right after a script's argparse parser accepted its arguments (nothing after that runs)."""


@contextlib.contextmanager
def _in_repo():
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(cwd)


def _parse_script(script: Path, args: list[str]) -> str | None:
    """Run `script` as __main__ with `args` until its argparse parser has parsed them; None if they were accepted,
    else the parser's message. Appending --help would prove nothing: argparse prints help and exits 0 as soon as it
    meets --help, before it reports an unknown flag."""
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argv, path, err = sys.argv, sys.path[:], io.StringIO()
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))  # as when the script runs: it may import its neighbours
    argparse.ArgumentParser.parse_args = parse_only
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(script), run_name="__main__")
    except _Parsed:
        return None
    except SystemExit as exit_:
        return None if exit_.code in (0, None) else (err.getvalue().strip().splitlines() or [f"exit {exit_.code}"])[-1]
    except Exception as error:  # noqa: BLE001  (a script that breaks before its parser does not run as written)
        return f"{script.relative_to(REPO)} fails before parsing its arguments: {type(error).__name__}: {error}"
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv, sys.path[:] = argv, path
    return f"{script.relative_to(REPO)} finished without parsing its arguments"


def _parse_train(args: list[str]) -> str | None:
    """The training config parser (TRL's, with the YAML file read: unknown keys and flags are errors)."""
    from t2edit.training.config import parse_train_config

    if "--help" in args or "-h" in args:
        return None
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parse_train_config(list(args))
    except SystemExit as exit_:
        return None if exit_.code in (0, None) else err.getvalue().strip() or f"exit {exit_.code}"
    except (ValueError, FileNotFoundError) as error:
        return str(error)
    return None


def _parse_t2edit(args: list[str]) -> str | None:
    from t2edit.cli import build_parser

    if args[:1] == ["train"]:
        return _parse_train(args[1:])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(args)
    except SystemExit as exit_:
        return None if exit_.code in (0, None) else (err.getvalue().strip().splitlines() or [f"exit {exit_.code}"])[-1]
    return None


def _parse_python(args: list[str]) -> str | None:
    """`python SCRIPT ARGS`: scripts/train_rl.py through the training config parser, other scripts under scripts/
    and benchmarks/ through their own parsers; `python -m ...` / `-c ...` and tools are not parsed."""
    if not args or args[0].startswith("-"):
        return None
    script = args[0]
    if script == "scripts/train_rl.py":
        return _parse_train(args[1:])
    if script.startswith(("scripts/", "benchmarks/")) and script.endswith(".py") and (REPO / script).exists():
        return _parse_script(REPO / script, args[1:])
    return None


def _parse_accelerate(args: list[str]) -> str | None:
    if args[:1] != ["launch"]:
        return None
    from accelerate.commands.launch import launch_command_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            launched = launch_command_parser().parse_args(args[1:])
    except SystemExit as exit_:
        return (err.getvalue().strip().splitlines() or [f"exit {exit_.code}"])[-1]
    return _parse_python([launched.training_script, *launched.training_script_args])


def _where_to_get(path: str, prose: str) -> bool:
    """The page says where to get a data file: a paragraph of its prose names the path and a source for it."""
    return any(path in paragraph and re.search(r"hub|release|download", paragraph, re.I)
               for paragraph in re.split(r"\n\s*\n", prose))


def _missing_paths(command: list[str], prose: str) -> list[str]:
    problems = []
    for token in command:
        value = token.split("=", 1)[1] if token.startswith("--") and "=" in token else token
        value = value.rstrip(",;)")
        if value.startswith(REPO_PREFIXES):
            found = list(REPO.glob(value)) if any(c in value for c in "*?[") else [REPO / value]
            if not any(p.exists() for p in found):
                problems.append(f"{value} does not exist")
        elif value.startswith("data/") and not (REPO / value).exists() and not _where_to_get(value, prose):
            problems.append(f"{value} does not exist and the page does not say where to get it")
    return problems


def check_command(command: list[str], prose: str = "") -> list[str]:
    """What is wrong with one command (token list) as written on a page whose prose is `prose`."""
    if not command or command[0] in SKIPPED:
        return []
    problems = _missing_paths(command, prose)
    head, args = command[0], command[1:]
    with _in_repo():
        if head == "t2edit":
            error = _parse_t2edit(args)
        elif PYTHON.match(head):
            error = _parse_python(args)
        elif head == "accelerate":
            error = _parse_accelerate(args)
        else:
            error = None  # bash scripts/*.sh, mutmut, ...: their paths are checked above
    if error:
        problems.append(f"rejected by its parser: {error}")
    return problems


def check_page(text: str) -> list[str]:
    """Every problem of every command of every bash block of a markdown page, as `command: problem`."""
    prose = prose_of(text)
    return [f"`{shlex.join(command)}`: {problem}"
            for block in bash_blocks(text) for command in commands_of(block)
            for problem in check_command(command, prose)]


@pytest.mark.parametrize("page", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_every_bash_command_of_the_docs_runs_as_written(page):
    problems = check_page(page.read_text(encoding="utf-8"))
    assert not problems, f"{page.relative_to(REPO)}:\n" + "\n".join(problems)


def test_the_docs_have_commands_to_check():
    commands = [c for page in DOCS for block in bash_blocks(page.read_text(encoding="utf-8"))
                for c in commands_of(block)]
    heads = {c[0] for c in commands}
    assert {"t2edit", "accelerate", "python", "bash"} <= heads
    assert any(c[:2] == ["t2edit", "eval"] for c in commands) and any(c[:2] == ["t2edit", "train"] for c in commands)


def test_the_reproduce_commands_of_the_generated_tables_run_as_written():
    spec = importlib.util.spec_from_file_location("readme_tables", REPO / "tools" / "readme_tables.py")
    readme_tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_tables)
    pages = "\n".join(p.read_text(encoding="utf-8") for p in DOCS)
    problems = [f"{table.name}: `{shlex.join(command)}`: {problem}" for table in readme_tables.TABLES
                for command in commands_of(table.command) for problem in check_command(command, prose_of(pages))]
    assert not problems, "\n".join(problems)


def test_the_check_reports_missing_paths_unknown_flags_and_unknown_config_keys(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("steps: 3\nno_such_setting: 1\n")
    page = f"""Some prose.

```bash
accelerate launch --num_processes 1 scripts/train_rl.py --config configs/no_such_config.yaml
t2edit eval --method svf --no-such-flag 3
t2edit eval --method svf --routers scope-split
t2edit eval --method svf,mend
python benchmarks/bench.py --no-such-flag
python benchmarks/no_such_bench.py --out x.json
accelerate launch --num_processes 1 scripts/train_rl.py --config configs/demo.yaml --no_such_setting 1
t2edit train --config {bad_yaml}
CUDA_VISIBLE_DEVICES=0 bash scripts/no_such_server.sh model &
t2edit eval --data data/other/records.json --n 5
```
"""
    problems = check_page(page)
    rejected = "rejected by its parser"
    expected = {  # a piece of the command: pieces of its problem
        "configs/no_such_config.yaml": ["configs/no_such_config.yaml does not exist"],
        "--no-such-flag 3": [rejected, "--no-such-flag"],
        "--routers": [rejected, "--routers"],
        "mend": [rejected, "mend"],
        "benchmarks/bench.py --no-such-flag": [rejected, "--no-such-flag"],
        "no_such_bench.py": ["benchmarks/no_such_bench.py does not exist"],
        "--no_such_setting 1": [rejected, "--no_such_setting"],
        "bad.yaml": [rejected, "no_such_setting"],
        "no_such_server.sh": ["scripts/no_such_server.sh does not exist"],
        "data/other/records.json": ["does not say where to get it"],
    }
    for command, pieces in expected.items():
        assert any(command in p and all(piece in p for piece in pieces) for p in problems), (command, problems)
    unexpected = [p for p in problems if not any(command in p for command in expected)]
    assert not unexpected, unexpected


def test_the_check_passes_good_commands_and_data_the_page_says_where_to_get():
    page = """KnowEdit's file comes from the Hugging Face hub (`zjunlp/KnowEdit`); put it at
`data/knowedit/train_cf.json`.

```bash
pip install -e '.[dev]'                     # set-up lines are not checked
t2edit eval --model smollm2-135m --data data/knowedit/train_cf.json --n 20 --composition 1,4 \\
    --router oracle,scope-split,embedding --out runs/x
accelerate launch --num_processes 1 --mixed_precision no scripts/train_rl.py --config configs/demo.yaml --steps 5
KMP_BLOCKTIME=0 python benchmarks/bench_vllm_sync.py --modes payload --json runs/z.json && echo done
python benchmarks/bench.py --help
```
"""
    assert check_page(page) == []
    assert check_page(page.replace("Hugging Face hub", "usual place")) != []  # no source said: not exempt
