"""The stream of edits (`t2edit eval --sequential --method ...`): edit after edit on the model the last call left,
scored at each point against the unedited model's answers, resumable from its rows."""
import json

import pytest
import torch

from t2edit.evaluation import evaluate_editor
from t2edit.evaluation.stream import FIRST, SCORES, stream_points
from t2edit.jobs import make_editor, run_stream
from t2edit.setup import load_setup
from tests.test_sequential import world_dir  # noqa: F401  (the fixture)

SCORED = SCORES + (f"first{FIRST}_edit_success", f"first{FIRST}_edit_success_em")


def _scores(rows):
    return [(r["method"], r["edits"], *(r[k] for k in SCORED)) for r in rows]


def _logits(setup):
    ids = setup.tokenizer(setup.edits[0].prompt, return_tensors="pt")
    with torch.no_grad():
        return setup.model(**ids).logits


@pytest.mark.parametrize("method", ["ft", "lora", "grace"])
def test_the_last_point_scores_what_a_sequential_evaluation_scores_and_the_model_comes_back(world_dir, tmp_path,
                                                                                            method):
    world, data = world_dir
    setup = load_setup(world, data, 0, 3, progress=False)
    before = _logits(setup)
    rows = run_stream(setup, [method], str(tmp_path / "stream"), points=[1, 3], progress=False)
    assert [r["edits"] for r in rows] == [1, 3]
    assert torch.equal(_logits(setup), before)  # every edit of the stream undone
    # The same edits made in one sequential evaluation, whose locality references come from the unedited model:
    # the stream's model already holds edits when it is scored, and must still be measured against the unedited one.
    reference = evaluate_editor(make_editor(method, setup, output_dir=str(tmp_path / "ref")), setup.model,
                                setup.tokenizer, setup.edits, mode="sequential", fluency=False, progress=False)
    last = rows[-1]
    for key in SCORES:
        assert last[key] == pytest.approx(getattr(reference, key), abs=1e-6), key
    saved = json.loads((tmp_path / "stream" / "stream.json").read_text())
    assert _scores(saved["rows"]) == _scores(rows)
    assert (tmp_path / "stream" / "stream.png").stat().st_size > 1000


def test_a_stopped_stream_continues_from_its_rows_and_gives_the_same_curve(world_dir, tmp_path, monkeypatch):
    world, data = world_dir
    setup = load_setup(world, data, 0, 3, progress=False)
    whole = run_stream(setup, ["grace"], str(tmp_path / "whole"), points=[1, 2, 3], progress=False)
    out = tmp_path / "stopped"
    run_stream(setup, ["grace"], str(out), points=[1, 2, 3], progress=False)
    saved = json.loads((out / "stream.json").read_text())
    saved["rows"] = saved["rows"][:1]  # killed after its first point
    (out / "stream.json").write_text(json.dumps(saved))
    import t2edit.evaluation.stream as stream_module

    scored = []
    real = stream_module.evaluate_editor

    def counting(editor, model, tokenizer, records, **kwargs):
        scored.append(len(records))
        return real(editor, model, tokenizer, records, **kwargs)

    monkeypatch.setattr(stream_module, "evaluate_editor", counting)
    import t2edit.evaluation.metrics as metrics

    references = []
    real_greedy = metrics.greedy_completions
    monkeypatch.setattr(metrics, "greedy_completions", lambda model, *a, **k: references.append(model) or
                        real_greedy(model, *a, **k))
    import t2edit.evaluation.runner as runner

    runner._PRE_EDIT.clear()  # a new process: nothing of the first run in memory
    resumed = run_stream(setup, ["grace"], str(out), points=[1, 2, 3], progress=False)
    assert _scores(resumed) == _scores(whole)
    assert 1 not in scored[::2]  # the first point was replayed, not scored again
    # the unedited model's locality answers were read back from the run's directory, not generated again
    assert setup.model not in references


def test_a_method_that_cannot_stream_is_named_before_anything_runs(world_dir, tmp_path):
    world, data = world_dir
    setup = load_setup(world, data, 0, 3, progress=False)
    with pytest.raises(ValueError, match="ike cannot take edit after edit"):
        run_stream(setup, ["grace", "ike"], str(tmp_path), points=[1], progress=False)
    with pytest.raises(ValueError, match="--score-sample 0"):
        run_stream(setup, ["grace"], str(tmp_path), points=[1], progress=False, score_sample=0)
    assert not (tmp_path / "stream.json").exists()
    assert stream_points(1000) == [10, 50, 100, 250, 500, 1000] and stream_points(30) == [10]
    assert stream_points(5) == [5]
    with pytest.raises(ValueError, match="at least 1"):
        stream_points(10, [0, 5])


def test_a_sampled_point_scores_evenly_spaced_edits_on_the_model_that_holds_them_all(world_dir, tmp_path):
    from t2edit.evaluation.runner import _edit_in_sequence, pre_edit_references
    from t2edit.evaluation.stream import _AsLeft, scored_edits

    assert scored_edits(list(range(10)), 4) == [1, 3, 6, 8]  # the middle of each quarter
    assert scored_edits(list(range(3)), 4) == [0, 1, 2] and scored_edits(list(range(3)), None) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least 1"):
        scored_edits([0], 0)
    world, data = world_dir
    setup = load_setup(world, data, 0, 4, progress=False)
    rows = run_stream(setup, ["ft"], str(tmp_path / "stream"), points=[4], progress=False, score_sample=2)
    assert [(r["edits"], r["scored"]) for r in rows] == [(4, 2)]
    # the same four edits, then only records 1 and 3 scored (the middles of the two halves)
    references = pre_edit_references(setup.model, setup.tokenizer, setup.edits, progress=False)
    editor, calls = make_editor("ft", setup, output_dir=str(tmp_path / "ref")), []
    for k, record in enumerate(setup.edits):
        torch.manual_seed(k)  # the stream's seed for the call that starts at edit k
        calls.append(_edit_in_sequence(editor, calls[-1].model if calls else setup.model, setup.tokenizer, [record],
                                       1))
    try:
        chosen = evaluate_editor(_AsLeft(calls[-1], "ft"), setup.model, setup.tokenizer, setup.edits[1::2],
                                 fluency=False, progress=False, references=references)
    finally:
        for edited in reversed(calls):
            edited.restore()
    for key in SCORES:
        assert rows[0][key] == pytest.approx(getattr(chosen, key), abs=1e-6), key


def test_svf_stream_writes_each_point_at_once_and_a_rerun_scores_only_the_missing_ones(world_dir, tmp_path,
                                                                                     monkeypatch):
    world, data = world_dir
    setup = load_setup(world, data, 0, 2, progress=False)
    out = tmp_path / "stream"
    import t2edit.evaluation.composition as composition

    written = []
    real_write = composition.atomic_write_json
    monkeypatch.setattr(composition, "atomic_write_json", lambda path, payload, **k: written.append(
        json.loads((out / "stream.json").read_text())["rows"] if (out / "stream.json").exists() else []) or
        real_write(path, payload, **k))
    whole = run_stream(setup, ["svf"], str(out), points=[1, 2], progress=False)
    assert [r["edits"] for r in whole] == [1, 2]
    assert [r["edits"] for r in written[1]] == [1]  # point 1 was in stream.json before point 2 was scored
    saved = json.loads((out / "stream.json").read_text())
    saved["rows"] = saved["rows"][:1]  # killed after its first point
    (out / "stream.json").write_text(json.dumps(saved))
    scored = []
    real = composition.evaluate_editor
    monkeypatch.setattr(composition, "evaluate_editor", lambda editor, model, tokenizer, records, **k:
                        scored.append(len(records)) or real(editor, model, tokenizer, records, **k))
    resumed = run_stream(setup, ["svf"], str(out), points=[1, 2], progress=False)
    assert scored == [2, 2]  # point 2 (its edits, then its first edits), not point 1 again
    assert _scores(resumed) == _scores(whole)
    curve = json.loads((out / "svf" / "sequential.json").read_text())
    assert [r["edits"] for r in curve] == [1, 2]  # the rerun's curve file keeps the point it did not score again


def test_locality_probes_the_stream_itself_edited_are_counted():
    from t2edit.data.records import EditRecord, Probe
    from t2edit.evaluation.stream import edited_locality_probes

    employer = EditRecord(subject="Ann", prompt="The employer of Ann is", target_new=["Acme"],
                          locality={"relation_specificity": [Probe("The occupation of Ann is", ["painter"]),
                                                             Probe("The capital of Baz is", ["Qux"])]})
    occupation = EditRecord(subject="Ann", prompt="The occupation of  Ann is", target_new=["pilot"],
                            locality={"relation_specificity": [Probe("The employer of Ann is", ["Initech"])]})
    assert edited_locality_probes([employer], [employer]) == 0  # the occupation is not edited yet
    assert edited_locality_probes([employer], [employer, occupation]) == 1  # same prompt up to spacing
    assert edited_locality_probes([employer, occupation], [employer, occupation]) == 2
