"""The no-leakage guard (t2edit/leakage.py) on its own and on the real paths: load_setup → SVFEditor.edit,
run_training, IKE, and `t2edit eval --expert`."""
import json

import pytest

import t2edit.jobs
import t2edit.editors.svf
import t2edit.training.trainer
from t2edit.data.records import EditRecord, Probe
from t2edit.data.world import build_world
from t2edit.leakage import (LeakageError, check_expert_may_score, expert_prompt_info, learning_pool, prompt_key,
                            scored_prompt_keys)
from tests.test_world import NO_TRAINING, hand_made_records, write_records

ANN = EditRecord("Ann", "The city of Ann is", ["Oslo"], ["Rome"],
                 locality={"relation_specificity": [Probe("The job of Ann is", ["cook"])]},
                 portability={"subject_aliasing": [Probe("The pet of Ann is", ["cat"])]},
                 rephrase=[Probe("Ann lives in the city of", ["Oslo"])])
CY = EditRecord("Cy", "The city of Cy is", ["Rome"], ["Lima"],
                locality={"relation_specificity": [Probe("The job of Cy is", ["cook"]), Probe("The pet of Cy is",
                                                                                              ["fish"])]})


def test_guard_drops_every_scored_prompt_after_the_metrics_normalisation():
    # Extra prompts hold each scored prompt of the edit, spelled as the metrics would still count it the same.
    extra = ["the CITY of Ann is", "The job of Ann is?", "  The pet of  Ann is", "Ann lives in city of",
             "The job of Bob is"]
    pool = learning_pool([ANN], [CY], extra)
    assert pool.neighbour_prompts == ["The job of Bob is", "The city of Cy is", "The job of Cy is", "The pet of Cy is"]
    assert pool.demonstrations == [("The city of Cy is", "Rome")]
    assert pool.router_negatives == pool.neighbour_prompts + pool.subject_prompts
    assert scored_prompt_keys([ANN]) == {prompt_key(p) for p in extra[:4]}


def test_a_training_record_that_asks_a_scored_question_is_dropped_whole():
    # Its prompt is Ann's locality prompt: neither a demonstration nor a source of neighbours or relations.
    twin = EditRecord("Ann", "The job of Ann is", ["baker"], ["cook"],
                      locality={"relation_specificity": [Probe("The age of Ann is", ["40"])]})
    pool = learning_pool([ANN], [twin, CY])
    assert pool.demonstrations == [("The city of Cy is", "Rome")]
    assert "The age of Ann is" not in pool.neighbour_prompts + pool.subject_prompts


def test_same_subject_anchors_ask_other_relations_of_edited_subjects_never_scored_ones():
    bob = EditRecord("Bob", "The city of Bob is", ["Lima"], ["Oslo"],
                     locality={"relation_specificity": [Probe("The job of Bob is", ["poet"])]})
    # Ann's job and pet prompts and Bob's job prompt are scored; the city prompts are the edits themselves.
    assert learning_pool([ANN, bob], [CY]).subject_prompts == ["The pet of Bob is"]
    assert learning_pool([ANN, bob], []).subject_prompts == []  # nothing to learn relations from: no anchors
    assert learning_pool([ANN, bob], [CY], anchors_per_edit=0).subject_prompts == []


# ------------------------------------------------------------------------------------------ the real paths

@pytest.fixture(scope="module")
def leaky_world(tmp_path_factory):
    """A 13-record world whose raw facts hold the first records' locality and alias prompts (every fact world
    does), plus a training record that asks record 0's locality question ("The spouse of Ann Kolb is")."""
    records = hand_made_records() + [{"subject": "Ann Kolb", "prompt": "The spouse of Ann Kolb is",
                                      "target_new": "Vic Hale", "ground_truth": "Tom Ruse"}]
    data = write_records(tmp_path_factory.mktemp("data") / "people.json", records)
    out = tmp_path_factory.mktemp("worlds") / "people"
    build_world(data, out, config=NO_TRAINING, progress=False)
    return str(out), str(data)


def _tiny_run(tmp_path, world_dir, data, name, **overrides):
    settings = dict(output_dir=str(tmp_path / name), model=world_dir, data=data, n_edits=4, steps=3,
                    edits_per_step=2, neighbours_per_step=16, subject_neighbours_per_step=4, group_size=2,
                    max_new_tokens=3, save_every=0, eval_every=0, progress=False)
    return t2edit.training.TrainConfig(**{**settings, **overrides})


def test_no_scored_prompt_reaches_training_ike_or_the_router_on_the_real_paths(leaky_world, tmp_path, monkeypatch):
    from t2edit.jobs import make_editor, run_training
    from t2edit.setup import load_setup

    world_dir, data = leaky_world
    setup = load_setup(world_dir, data, start=0, n_edits=4, progress=False)
    scored = scored_prompt_keys(setup.edits)
    edit_keys = {prompt_key(r.prompt) for r in setup.edits}
    raw = {prompt_key(p) for p in setup.extra_neighbour_prompts} | {prompt_key(r.prompt) for r in setup.other_records}
    assert len((raw & scored) - edit_keys) >= 8  # the raw pool does hold scored prompts: the guard has work to do

    trainers, negatives = [], []

    class RecordingTrainer(t2edit.training.trainer.SVFTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    real_calibrate = t2edit.training.trainer.calibrate_own_router
    monkeypatch.setattr(t2edit.training.trainer, "calibrate_own_router",
                        lambda model, tok, keys, neg, *a, **kw: negatives.append(list(neg)) or
                        real_calibrate(model, tok, keys, neg, *a, **kw))
    monkeypatch.setattr(t2edit.editors.svf, "SVFTrainer", RecordingTrainer)  # SVFEditor.edit
    monkeypatch.setattr(t2edit.jobs, "SVFTrainer", RecordingTrainer)  # run_training

    editor = make_editor("svf", setup, train_config=_tiny_run(tmp_path, world_dir, data, "editor"))
    editor.edit(setup.model, setup.tokenizer, setup.edits).restore()
    expert, _ = run_training(_tiny_run(tmp_path, world_dir, data, "train"))
    ike = make_editor("ike", setup).edit(setup.model, setup.tokenizer, setup.edits)
    scored_texts = sorted({p for r in setup.edits for p in r.scored_prompts() | {r.prompt}})
    shown = {demo for p in scored_texts for demo in ike.context(p).split("\n\n")[:-1]}  # the last is the edit

    assert len(trainers) == 2 and len(negatives) == 2
    for trainer, router_negatives in zip(trainers, negatives):
        pools = trainer.neighbour_prompts + trainer.subject_prompts
        trained = trainer.seen_prompts - {r.prompt for r in setup.edits}
        assert trained and router_negatives  # the checks below have something to check
        for what, prompts in (("neighbours and anchors", pools), ("trained prompts", trained),
                              ("router negatives", router_negatives)):
            leaked = sorted(p for p in prompts if prompt_key(p) in scored)
            assert not leaked, f"{what} hold prompts the evaluation scores: {leaked}"
    # `t2edit eval --router NAME` fits that router on these negatives (SVFEditor.edit → AdaptiveModel)
    named_router_negatives = make_editor("svf", setup, router="scope-split").router_negatives
    assert named_router_negatives
    leaked = sorted(p for p in named_router_negatives if prompt_key(p) in scored)
    assert not leaked, f"the named router's negatives hold prompts the evaluation scores: {leaked}"
    assert shown  # IKE did show demonstrations
    leaked = sorted({p for p in scored_texts for demo in shown if prompt_key(p) in prompt_key(demo)})
    assert not leaked, f"IKE demonstrations show prompts the evaluation scores: {leaked}"
    # The expert records hashes of what it learned from, and none of them is a prompt this evaluation scores.
    check_expert_may_score(expert.info, setup.edits, "the expert")


# ------------------------------------------------------------------------------ experts trained elsewhere

def test_an_expert_is_refused_for_records_it_did_not_edit_or_prompts_it_learned_from():
    info = expert_prompt_info([ANN.prompt], ["The city of Cy is", "the job of ann is"])
    with pytest.raises(LeakageError, match=r"1 prompts this evaluation scores .*'The job of Ann is'"):
        check_expert_may_score(info, [ANN], "runs/x/expert")
    with pytest.raises(LeakageError, match=r"1 of the 2 records to score are not edits of runs/x/expert .*Cy"):
        check_expert_may_score(expert_prompt_info([ANN.prompt], []), [ANN, CY], "runs/x/expert")
    with pytest.raises(LeakageError, match="does not record which prompts"):
        check_expert_may_score({"edits": 1}, [ANN], "runs/x/expert")
    check_expert_may_score(expert_prompt_info([ANN.prompt, CY.prompt], ["The city of Bob is"]), [ANN])
    assert "job" not in json.dumps(info)  # hashes only: the expert file does not carry prompt text


# ---------------------------------------------------------------- details a user sees (found by mutation testing)

def _record(subject, relation, *locality_relations, target="x"):
    return EditRecord(subject, f"The {relation} of {subject} is", [target] if target else [], ["y"], locality={
        "relation_specificity": [Probe(f"The {r} of {subject} is", ["z"]) for r in locality_relations]})


def test_anchors_rank_relations_asked_with_the_edited_one_then_two_hops_then_frequency():
    edits = [_record("Ann", "spouse", "hat"), _record("Zed", "river")]
    others = [_record("Bob", "spouse", "job", "home"), _record("Gus", "spouse", "job"), _record("Cy", "job", "pet"),
              _record("Dee", "age", "hat", "car"), _record("Eve", "age"), _record("Fay", "home", "job"),
              EditRecord("", "A subjectless question is", ["x"]), _record("Hal", "b1", "b2", "b3", "b4", "b5", "b6")]
    anchors = learning_pool(edits, others, anchors_per_edit=4).subject_prompts
    # Ann (spouse): job and home are asked with spouse (job twice), pet two hops away, then the most frequent (age).
    # Zed (river, asked with nothing): by frequency — job 4, spouse 3, then age and home 2 (alphabetical).
    assert anchors == ["The job of Ann is", "The home of Ann is", "The pet of Ann is", "The age of Ann is",
                       "The job of Zed is", "The spouse of Zed is", "The age of Zed is", "The home of Zed is"]
    assert len(learning_pool(edits, others).subject_prompts) == 2 * 8  # 8 per edit by default
    assert learning_pool(edits, others, anchors_per_edit=1).subject_prompts == ["The job of Ann is",
                                                                                "The job of Zed is"]


def test_relations_known_only_from_the_edited_records_locality_prompts_are_not_anchors():
    # "hat" is asked only in Ann's (scored) locality prompt: asking Dee about it would teach a scored relation.
    anchors = learning_pool([_record("Ann", "spouse", "hat"), _record("Dee", "spouse")], []).subject_prompts
    assert anchors == []  # spouse is each edit's own prompt: nothing else may be asked


def test_pool_drops_repeats_empty_prompts_and_records_without_a_target():
    others = [_record("Cy", "job"), _record("Cy", "pet", target=None), EditRecord("Dee", "  ", ["x"])]
    pool = learning_pool([ANN], others, ["The job of Bob is", "the job of Bob is.", "", "The job of Cy is"])
    assert pool.neighbour_prompts == ["The job of Bob is", "The job of Cy is", "The pet of Cy is"]
    assert pool.demonstrations == [("The job of Cy is", "x")]


def test_an_expert_missing_either_hash_set_is_refused():
    info = expert_prompt_info([ANN.prompt], [])
    for key in info:
        with pytest.raises(LeakageError, match="does not record"):
            check_expert_may_score({k: v for k, v in info.items() if k != key}, [ANN])


def test_anchor_ranking_counts_how_often_relations_are_asked_together_and_skips_edits_without_their_subject():
    # Asked with spouse: car twice, home once (home is more frequent overall: the co-occurrence count decides).
    # "river" is the relation of two other edits: frequency 2, ahead of pet (1). Ann's prompt lacks her name: no
    # template, no anchors — and the edits after hers still get theirs.
    edits = [EditRecord("Ann", "Who did A. marry?", ["x"]), _record("Dee", "spouse"), _record("Zed", "river"),
             _record("Yan", "river")]
    others = [_record("Bob", "spouse", "car"), _record("Gus", "spouse", "car"), _record("Kit", "spouse", "home"),
              _record("Lu", "home"), _record("Mo", "home"), _record("Cy", "job"), _record("Fay", "job"),
              _record("Hal", "job"), _record("Ivy", "job", "pet")]
    anchors = learning_pool(edits, others).subject_prompts
    assert not [a for a in anchors if "Ann" in a]
    assert [a for a in anchors if "Dee" in a] == ["The car of Dee is", "The home of Dee is", "The job of Dee is",
                                                  "The river of Dee is", "The pet of Dee is"]


def test_svf_and_svf_always_of_one_evaluation_train_each_edit_set_once(leaky_world, tmp_path, monkeypatch):
    from t2edit.jobs import run_eval
    from t2edit.setup import load_setup

    world_dir, data = leaky_world
    setup = load_setup(world_dir, data, start=0, n_edits=2, progress=False)
    trained = []
    real_train = t2edit.training.trainer.SVFTrainer.train
    monkeypatch.setattr(t2edit.training.trainer.SVFTrainer, "train",
                        lambda self: trained.append(tuple(r.prompt for r in self.edits)) or real_train(self))
    results = run_eval(setup, ["svf", "svf-always"], str(tmp_path / "eval"), mode="single", fluency=False,
                       train_config=_tiny_run(tmp_path, world_dir, data, "eval-svf"), progress=False)
    assert sorted(trained) == sorted((r.prompt,) for r in setup.edits)  # one training per edit, not two
    assert [r.method for r in results] == ["svf", "svf-always"]
    assert all(r.n_records == 2 and 0.0 <= r.edit_success <= 1.0 for r in results)  # both scored every edit
