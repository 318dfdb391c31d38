"""Every script under scripts/ must at least import against the current package: a renamed helper in t2edit
otherwise breaks a reproduce command without any test noticing (gpu_smoke.py did once)."""
import runpy
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parent.parent / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_imports(script, monkeypatch):
    if script.name == "mutmut_report.py":  # a contributor tool: mutmut is installed only to run it
        pytest.importorskip("mutmut", reason="mutmut is not installed (pip install mutmut==3.8.1)")
    monkeypatch.syspath_prepend(str(script.parent))  # scripts import each other as they do when run
    monkeypatch.setattr(sys, "argv", [str(script)])
    namespace = runpy.run_path(str(script), run_name="imported_by_test")  # top level only: main() does not run
    assert callable(namespace.get("main")), f"{script.name} has no main()"
