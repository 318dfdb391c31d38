"""Every script under scripts/, benchmarks/ and tools/ must at least import against the current package: a renamed
helper in t2edit otherwise breaks a reproduce command without any test noticing."""
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for folder in ("scripts", "benchmarks", "tools") for p in (REPO / folder).glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_imports(script, monkeypatch):
    if script.name == "mutmut_report.py":  # a contributor tool: mutmut is installed only to run it
        pytest.importorskip("mutmut", reason="mutmut is not installed (pip install mutmut==3.8.1)")
    monkeypatch.syspath_prepend(str(script.parent))  # scripts import each other as they do when run
    monkeypatch.setattr(sys, "argv", [str(script)])
    namespace = runpy.run_path(str(script), run_name="imported_by_test")  # top level only: main() does not run
    assert callable(namespace.get("main")), f"{script.name} has no main()"


def test_sync_bench_refuses_a_model_directory_without_a_config(tmp_path, capsys):
    """`bench_vllm_sync.py --model DIR` stops before starting any vLLM engine when DIR holds no checkpoint."""
    namespace = runpy.run_path(str(REPO / "benchmarks" / "bench_vllm_sync.py"), run_name="imported_by_test")
    with pytest.raises(SystemExit):
        namespace["main"](["--model", str(tmp_path), "--modes", "server"])
    assert f"--model {tmp_path}: not a model directory (no config.json)" in capsys.readouterr().err


def test_sync_bench_payload_mode_times_one_float_per_singular_value_at_every_llama_size(tmp_path):
    """`--modes payload` needs no vLLM: its rows cover every Llama size, and each z file holds exactly the z of the
    MLP's SVF layers (what `sync_bytes` says a z-only sync sends)."""
    import json

    from t2edit.rollouts import LLAMA_SHAPES, llama_svf_layers, sync_bytes

    namespace = runpy.run_path(str(REPO / "benchmarks" / "bench_vllm_sync.py"), run_name="imported_by_test")
    out = tmp_path / "payload.json"
    namespace["main"](["--modes", "payload", "--targets", "mlp", "--json", str(out)])
    rows = json.loads(out.read_text())["payload"]
    assert [(r["model"], r["targets"]) for r in rows] == [(model, "mlp") for model in LLAMA_SHAPES]
    for r in rows:
        shapes = [shape for _, shape in llama_svf_layers(False, r["model"])]
        assert r["bytes"] == sync_bytes(shapes)["z"] and r["layers"] == len(shapes)
        assert 0 < r["write_seconds"] and 0 < r["read_seconds"]
