import json

import pytest

from t2edit.cli import main
from t2edit.data.world import build_world
from t2edit.leakage import prompt_hashes
from tests.test_world import NO_TRAINING, hand_made_records, write_records


def test_eval_with_a_missing_data_file_is_one_clear_error(tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "missing.json"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing.json" in err[0]


def test_unknown_method_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--method", "none,mend"])
    assert "unknown method(s) ['mend']" in capsys.readouterr().err


def test_train_with_a_missing_config_is_one_clear_error(tmp_path, capsys):
    code = main(["train", "--config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "nope.yaml" in err and "configs/" in err


@pytest.fixture(scope="module")
def world_and_expert(tmp_path_factory):
    """A 12-record world and an expert trained (3 steps) for its first 4 records."""
    from t2edit.jobs import run_training
    from t2edit.training import TrainConfig

    data = write_records(tmp_path_factory.mktemp("data") / "people.json", hand_made_records())
    world = tmp_path_factory.mktemp("worlds") / "people"
    build_world(data, world, config=NO_TRAINING, progress=False)
    out = tmp_path_factory.mktemp("svf")
    run_training(TrainConfig(output_dir=str(out), model=str(world), data=str(data), n_edits=4, steps=3,
                             edits_per_step=2, neighbours_per_step=8, group_size=2, max_new_tokens=3, save_every=0,
                             eval_every=0, progress=False))
    return str(world), str(data), out / "expert"


def _eval_expert(world_and_expert, tmp_path, *extra):
    world, data, expert = world_and_expert
    return main(["eval", "--model", world, "--data", data, "--method", "svf", "--expert", str(expert),
                 "--no-fluency", "--out", str(tmp_path / "out"), *extra])


def _errors(capsys) -> list[str]:
    """stderr lines other than progress bars (loading the world model draws one)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s]" not in line]


def test_eval_expert_scores_its_own_edits(world_and_expert, tmp_path):
    assert _eval_expert(world_and_expert, tmp_path, "--n", "4") == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]
    assert [row["n_records"] for row in (rows.values() if isinstance(rows, dict) else rows)] == [4]


def test_eval_routes_an_expert_with_a_named_router(world_and_expert, tmp_path, capsys):
    """--router scope-split scores method svf two-pass behind that router, fitted on training-side prompts: edit
    prompts reach the expert, locality prompts run the unedited model exactly (the expert alone moves them)."""
    from t2edit.jobs import make_editor
    from t2edit.setup import load_setup

    world, data, expert = world_and_expert
    assert main(["eval", "--model", world, "--data", data, "--method", "svf-always,svf", "--expert",
                 str(expert), "--router", "scope-split", "--n", "4", "--no-fluency", "--out",
                 str(tmp_path / "out")]) == 0
    rows = {row["method"]: row for row in json.loads((tmp_path / "out" / "results.json").read_text())["methods"]}
    assert set(rows) == {"svf-always", "svf (scope-split)"}
    assert rows["svf (scope-split)"]["locality"] == 1.0 > rows["svf-always"]["locality"]

    setup = load_setup(world, data, 0, 4)
    edited = make_editor("svf", setup, str(expert), router="scope-split").edit(setup.model, setup.tokenizer,
                                                                              setup.edits)
    locality = [p.prompt for r in setup.edits for ps in r.locality.values() for p in ps]
    batch = setup.tokenizer([r.prompt for r in setup.edits] + locality, return_tensors="pt", padding=True)
    weights = edited.model.route(batch["input_ids"], batch["attention_mask"])
    edited.restore()
    assert weights[:4, 0].tolist() == [1.0] * 4 and weights[4:, -1].tolist() == [1.0] * len(locality)


@pytest.mark.parametrize("named, world, subjects_in_prompts, used", [
    (None, False, True, "scope-split"),  # a real model: the router that recognises subject and relation
    (None, False, False, "own"),         # scope-split keys on the subject's span: the expert's own router
    (None, True, True, "own"),           # a fact world: the expert's own router, as its tables were measured
    ("own", False, True, "own"),
    ("embedding", True, True, "embedding")])
def test_two_pass_svf_routes_with_scope_split_on_a_real_model_unless_told_otherwise(
        named, world, subjects_in_prompts, used, monkeypatch):
    from t2edit import jobs
    from t2edit.data.records import EditRecord
    from t2edit.setup import EditingSetup

    class Chosen(Exception):
        """Raised with the router run_eval hands the SVF editor, so the evaluation stops there."""

    def make_editor(method, setup, expert_dir, train_config, out_dir, trained_experts, router):
        raise Chosen(router)

    monkeypatch.setattr(jobs, "make_editor", make_editor)
    subject = "Foo" if subjects_in_prompts else "Bar"
    setup = EditingSetup(model=None, tokenizer=None, model_name="m", extra_neighbour_prompts=[], other_records=[],
                         edits=[EditRecord(subject=subject, prompt="The capital of Foo is", target_new=["Baz"])],
                         world_report={"pre_edit_recall": {}} if world else None)
    with pytest.raises(Chosen) as chosen:
        jobs.run_eval(setup, ["svf"], "unused", router=named)
    assert chosen.value.args[0] == used


def test_single_mode_runs_the_router_negatives_through_pass_1_once(world_and_expert, monkeypatch):
    """One router fit per record (single mode) on the same negatives: their pass 1 runs at the first fit only, and
    later fits calibrate exactly as a fresh fit does."""
    from t2edit.routing import AdaptiveModel
    from t2edit.jobs import make_editor
    from t2edit.setup import load_setup

    world, data, expert = world_and_expert
    setup = load_setup(world, data, 0, 4)
    rows_through_pass1 = []
    original = AdaptiveModel.pass1
    monkeypatch.setattr(AdaptiveModel, "pass1", lambda self, input_ids, *a, **k: (
        rows_through_pass1.append(len(input_ids)), original(self, input_ids, *a, **k))[1])

    def fit_once(editor):
        rows_through_pass1.clear()
        edited = editor.edit(setup.model, setup.tokenizer, setup.edits)
        router = edited.model.router
        edited.restore()
        return sum(rows_through_pass1), (router.subject_threshold.tolist(), router.relation_threshold)

    editor = make_editor("svf", setup, str(expert), router="scope-split")
    negatives = len(editor.router_negatives)
    first_rows, first = fit_once(editor)
    second_rows, second = fit_once(editor)
    fresh_rows, fresh = fit_once(make_editor("svf", setup, str(expert), router="scope-split"))
    assert negatives > 0 and first_rows == fresh_rows >= negatives
    assert second_rows == first_rows - negatives  # the edits' own prompts and targets only
    assert second == first == fresh


def test_svf_methods_of_one_evaluation_say_whether_their_expert_was_trained_or_reused(world_and_expert, tmp_path):
    """svf and svf-always share the experts one of them trained: only that one's edit time includes the training
    (the README's seconds-per-edit line reads this report)."""
    from dataclasses import replace

    from t2edit.jobs import make_editor
    from t2edit.setup import load_setup
    from t2edit.training import TrainConfig, apply_preset

    world, data, _ = world_and_expert
    setup = load_setup(world, data, 0, 2)
    config = replace(apply_preset(TrainConfig(output_dir=str(tmp_path), progress=False)), steps=2, save_every=0)
    shared = {}
    reports = []
    for method in ("svf", "svf-always", "svf"):
        editor = make_editor(method, setup, train_config=config, trained_experts=shared)
        editor.edit(setup.model, setup.tokenizer, setup.edits).restore()
        reports.append(editor.report["expert"])
    assert reports == ["trained", "reused", "reused"] and len(shared) == 1


def test_eval_refuses_a_router_that_needs_labels(world_and_expert, tmp_path, capsys):
    assert _eval_expert(world_and_expert, tmp_path, "--n", "4", "--router", "oracle") == 2
    err = _errors(capsys)
    assert len(err) == 1 and "--router 'oracle'" in err[0] and "scope-split" in err[0], err


def test_eval_expert_refuses_records_it_did_not_edit(world_and_expert, tmp_path, capsys):
    code = _eval_expert(world_and_expert, tmp_path)  # no --n: all 12 records, 8 of them not the expert's edits
    err = _errors(capsys)
    assert code == 2 and len(err) == 1, err
    assert "8 of the 12 records to score are not edits of" in err[0] and "--n" in err[0]
    assert not (tmp_path / "out" / "results.json").exists()


def test_eval_expert_refuses_prompts_it_trained_or_calibrated_on(world_and_expert, tmp_path, capsys):
    world, data, expert = world_and_expert
    copied = tmp_path / "expert"
    copied.mkdir()
    for file in expert.iterdir():
        (copied / file.name).write_bytes(file.read_bytes())
    config = json.loads((copied / "expert_config.json").read_text())
    scored = hand_made_records()[1]["locality"]["Relation_Specificity"][0]["prompt"]  # scored for edited record 1
    config["info"]["learned_prompt_hashes"] += prompt_hashes([scored])
    (copied / "expert_config.json").write_text(json.dumps(config))
    code = _eval_expert((world, data, copied), tmp_path, "--n", "4")
    err = _errors(capsys)
    assert code == 2 and len(err) == 1 and "1 prompts this evaluation scores" in err[0] and repr(scored) in err[0]
    del config["info"]["learned_prompt_hashes"]
    (copied / "expert_config.json").write_text(json.dumps(config))
    assert _eval_expert((world, data, copied), tmp_path, "--n", "4") == 2
    assert "does not record which prompts" in capsys.readouterr().err


def test_infer_routes_a_trained_experts_edit_prompt_and_leaves_another_fact_alone(world_and_expert, capsys):
    """scripts/train_rl.py's experts record only the number of their edits (no subjects): the embedding router
    still works from their saved keys; the scope router says what is missing."""
    world, _, expert = world_and_expert
    edit, other = hand_made_records()[0]["prompt"], hand_made_records()[8]["prompt"]
    code = main(["infer", "--model", world, "--experts", str(expert), "--router", "embedding",
                 "--prompt", edit, "--prompt", other, "--json"])
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert code == 0 and [r["prompt"] for r in rows] == [edit, other]
    assert rows[0]["experts"] == {str(expert): 1.0} and rows[0]["none"] == 0.0
    assert rows[1]["experts"] == {} and rows[1]["none"] == 1.0
    # the trainer stores each edit's subject, so the scope router (subject + relation) works on its experts too
    assert main(["infer", "--model", world, "--experts", str(expert), "--router", "scope", "--prompt", edit,
                 "--prompt", other, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert rows[0]["experts"] == {str(expert): 1.0} and rows[1]["experts"] == {}


@pytest.mark.slow
def test_infer_without_negatives_on_a_real_model_asks_the_edits_relations_about_their_other_subjects():
    """What scope-split calibrates on when no facts are at hand: each edited subject asked about the other edited
    relation, each relation asked about the other subject and the objects; never an edit itself."""
    from t2edit.leakage import negatives_from_edits

    edits = [{"prompt": "The spouse of Piet Zelmere is", "subject": "Piet Zelmere", "target": "Orla Jorwick"},
             {"prompt": "The occupation of Vesna Corwick is", "subject": "Vesna Corwick", "target": "sculptor"}]
    negatives = negatives_from_edits(edits)
    assert {"The occupation of Piet Zelmere is", "The spouse of Vesna Corwick is",
            "The spouse of Orla Jorwick is"} <= set(negatives)
    assert not {e["prompt"] for e in edits} & set(negatives)


def test_infer_routes_with_scope_split_on_a_real_model_whose_edits_name_their_subjects():
    from t2edit.routing import default_router

    named = [{"prompt": "The spouse of Piet Zelmere is", "subject": "Piet Zelmere", "target": "Orla Jorwick"}]
    assert default_router(named, world=False) == "scope-split"
    # None: the experts' own routers (`embedding` over K experts, the expert's own for one)
    assert default_router(named, world=True) is None
    assert default_router([{"prompt": "The spouse of Piet Zelmere is"}], world=False) is None  # old expert
    assert default_router([{**named[0], "subject": "Piet"}, {**named[0], "subject": "Orla"}], world=False) is None


def test_demo_end_to_end_on_a_tiny_world(tmp_path):
    out = tmp_path / "demo"
    code = main(["demo", "--model", "world", "--world", "tiny", "--n-edits", "6", "--steps", "30", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["methods"]
    methods = {row["method"]: row for row in (rows.values() if isinstance(rows, dict) else rows)}
    assert set(methods) == {"none", "svf", "svf-always", "lora", "ft", "ike", "prompt"}
    assert methods["svf"]["edit_success"] > methods["none"]["edit_success"]
    # The router only takes the expert away from prompts, so two-pass SVF keeps at least svf-always's locality.
    assert methods["svf"]["locality"] >= methods["svf-always"]["locality"]
    assert (out / "results.md").exists() and (out / "results.png").exists()
    assert (out / "svf" / "expert" / "expert_config.json").exists()
    assert (out / "svf" / "reward_curve.png").exists()


def test_vllm_colocate_is_given_a_directory_for_a_model_named_by_alias(world_and_expert, tmp_path, monkeypatch):
    """vLLM loads a directory or a hub name: a shipped model's short name must reach it as its directory."""
    import t2edit.jobs
    import t2edit.models
    from t2edit.jobs import run_training
    from t2edit.training import TrainConfig

    world, data, _ = world_and_expert
    alias = lambda spec: world if spec == "my-shipped" else spec  # noqa: E731
    monkeypatch.setattr(t2edit.models, "resolve_model_path", alias)  # what load_model reads
    monkeypatch.setattr(t2edit.jobs, "resolve_model_path", alias)  # what reaches vLLM
    seen = {}

    class Built(Exception):
        """Stops the run once the vLLM backend would be built."""

    def record(model, tokenizer, **kwargs):
        seen.update(kwargs)
        raise Built

    monkeypatch.setattr(t2edit.jobs, "make_vllm_rollouts", record)
    with pytest.raises(Built):
        run_training(TrainConfig(output_dir=str(tmp_path / "svf"), model="my-shipped", data=data, n_edits=2,
                                 steps=1, save_every=0, eval_every=0, progress=False, rollout_backend="vllm",
                                 vllm_mode="colocate"))
    assert seen["model_name"] == world and seen["mode"] == "colocate"
