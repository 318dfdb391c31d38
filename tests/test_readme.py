"""README numbers come from code: every generated block equals what scripts/readme_tables.py makes of its JSON."""
import importlib.util
import json
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
        payload = json.loads((REPO / table.source).read_text())
        for row in payload.get("methods", []):
            assert f"| {row['method']} " in block and f"{row['method']} " in block.split("every method:")[1]


def test_a_changed_number_makes_the_check_fail(tmp_path):
    for table in readme_tables.TABLES:
        target = tmp_path / table.source
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((REPO / table.source).read_text())
    payload = json.loads((tmp_path / "results/demo.json").read_text())
    payload["methods"][1]["locality"] = 0.123
    (tmp_path / "results/demo.json").write_text(json.dumps(payload))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    changed = readme_tables.updated_readme(readme, tmp_path)
    assert changed != readme and "12.3" in changed
    with pytest.raises(ValueError, match="table:demo"):
        readme_tables.updated_readme(readme.replace("<!-- table:demo -->", ""), tmp_path)
