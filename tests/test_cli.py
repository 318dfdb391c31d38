import json

import pytest

from t2edit.cli import main


def test_eval_with_a_missing_data_file_is_one_clear_error(tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "missing.json"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing.json" in err[0]


def test_unknown_method_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--method", "none,rome"])
    assert "unknown method(s) ['rome']" in capsys.readouterr().err


def test_train_with_a_missing_config_is_one_clear_error(tmp_path, capsys):
    code = main(["train", "--config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "nope.yaml" in err and "configs/" in err


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_world(tmp_path):
    out = tmp_path / "demo"
    code = main(["demo", "--model", "world", "--world", "tiny", "--n-edits", "6", "--steps", "30", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["methods"]
    methods = {row["method"]: row for row in (rows.values() if isinstance(rows, dict) else rows)}
    assert {"none", "svf", "lora", "ft", "ike", "prompt"} <= set(methods)
    for row in methods.values():
        for key in ("edit_success", "locality", "portability", "edit_success_em"):
            assert 0.0 <= row[key] <= 1.0
    assert methods["svf"]["edit_success"] > methods["none"]["edit_success"]
    assert (out / "results.md").exists() and (out / "results.png").exists()
    assert (out / "svf" / "expert" / "expert_config.json").exists()
    assert (out / "svf" / "reward_curve.png").exists()
