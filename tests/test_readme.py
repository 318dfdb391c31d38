"""README numbers come from code: every generated block equals what scripts/readme_tables.py makes of its JSON."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("readme_tables", REPO / "scripts" / "readme_tables.py")
readme_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_tables)


def test_readme_tables_match_their_results_json():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme_tables.updated_readme(readme) == readme, "run python scripts/readme_tables.py"


def test_every_table_lists_every_method_of_its_json_and_names_its_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for table in readme_tables.TABLES:
        block = readme_tables._pattern(table.name).search(readme).group(2)
        assert f"Reproduce: `{table.command}`" in block
        if not table.source.endswith(".json"):
            continue  # computed by code (sync-bytes): no results file
        payload = json.loads((REPO / table.source).read_text())
        for row in payload.get("methods", []):
            assert f"| {row['method']} " in block and f"{row['method']} " in block.split("every method:")[1]


def test_a_changed_number_makes_the_check_fail(tmp_path):
    sources = [t.source for t in readme_tables.TABLES] + [path for path, _ in readme_tables.MUTMUT_RUNS]
    for source in sources:
        target = tmp_path / source
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((REPO / source).read_text())
    payload = json.loads((tmp_path / "results/demo.json").read_text())
    payload["methods"][1]["locality"] = 0.123
    (tmp_path / "results/demo.json").write_text(json.dumps(payload))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    changed = readme_tables.updated_readme(readme, tmp_path)
    assert changed != readme and "12.3" in changed
    with pytest.raises(ValueError, match="table:demo"):
        readme_tables.updated_readme(readme.replace("<!-- table:demo -->", ""), tmp_path)


# The tables that hold settings or a design, not measurements: the only `|` tables allowed outside the markers.
NOT_MEASURED = ["| | Transformer² | t2edit default | why |", "| kind of model | FT-M (one MLP output matrix",
                "| package | for |"]


def test_no_measured_table_is_left_outside_the_generated_blocks():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    outside = re.sub(r"<!-- table:(\S+) -->.*?<!-- /table:\1 -->", "", readme, flags=re.S)
    lines = outside.split("\n")
    headers = [line for i, line in enumerate(lines) if line.startswith("|") and not lines[i - 1].startswith("|")]
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
