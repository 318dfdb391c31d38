"""The built-in fact set and the world builder (t2edit/data/world.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from t2edit.data import world as world_module
from t2edit.data.loaders import load_records
from t2edit.data.records import EditRecord, Probe
from t2edit.data.world import (BUILTIN_PATH, InContextSampler, WorldConfig, WorldError, WorldNotFoundError,
                               build_world, exact_match, load_world, training_texts, world_facts)

REPO = Path(__file__).resolve().parent.parent
TRAIN_CF = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "knowedit" / "train_cf.json"

# A hand-made world: 12 people; each record edits one fact and carries an alias, a two-hop probe and
# locality probes. Targets are other people's answers, except for the spouse edits: new names no fact answers.
PEOPLE = [  # name, alias, occupation, country of citizenship, spouse
    ("Ann Kolb", "A. Kolb", "painter", "Brill", "Tom Ruse"), ("Bo Dant", "B. Dant", "baker", "Cask", "Una Fell"),
    ("Cy Marl", "C. Marl", "sailor", "Dunmoor", "Vic Hale"), ("Di Pell", "D. Pell", "judge", "Brill", "Wes Orr"),
    ("Ed Quin", "E. Quin", "mason", "Cask", "Xia Lund"), ("Flo Rett", "F. Rett", "poet", "Dunmoor", "Yul Penn"),
    ("Gus Sorn", "G. Sorn", "tailor", "Brill", "Zoe Quill"), ("Hal Tarr", "H. Tarr", "cooper", "Cask", "Ada Rusk"),
    ("Ivy Ulm", "I. Ulm", "miner", "Dunmoor", "Ben Sack"), ("Jo Vane", "J. Vane", "glazier", "Brill", "Cal Tove"),
    ("Kit Wynn", "K. Wynn", "weaver", "Cask", "Dot Urry"), ("Lu Yarr", "L. Yarr", "smith", "Dunmoor", "Eve Vint")]
CAPITALS = {"Brill": "Oxham", "Cask": "Pellport", "Dunmoor": "Quarry Cove"}


def hand_made_records() -> list[dict]:
    records = []
    for i, (name, alias, job, country, spouse) in enumerate(PEOPLE):
        other = PEOPLE[(i + 1) % len(PEOPLE)]
        if i % 3 == 0:  # edit the occupation to another person's occupation
            prompt, old, new = f"The occupation of {name} is", job, other[2]
            two_hop = None
        elif i % 3 == 1:  # edit the citizenship; two-hop through the capital
            prompt, old = f"The country of citizenship of {name} is", country
            new = next(c for c in CAPITALS if c != country)
            two_hop = {"prompt": f"The capital of the country of citizenship of {name} is",
                       "ground_truth": CAPITALS[new]}
        else:  # edit the spouse to a brand-new name (no other fact answers it: the world must add one)
            prompt, old, new = f"The spouse of {name} is", spouse, f"New {spouse.split()[1]}"
            two_hop = None
        record = {"subject": name, "prompt": prompt, "target_new": new, "ground_truth": old,
                  "portability": {"Subject_Aliasing": [{"prompt": prompt.replace(name, alias), "ground_truth": new}]},
                  "locality": {"Relation_Specificity": [
                      {"prompt": f"The occupation of {name} is", "ground_truth": job},
                      {"prompt": f"The country of citizenship of {name} is", "ground_truth": country},
                      {"prompt": f"The spouse of {name} is", "ground_truth": spouse}]}}
        record["locality"]["Relation_Specificity"] = [p for p in record["locality"]["Relation_Specificity"]
                                                      if p["prompt"] != prompt]
        if two_hop:
            record["portability"]["Reasoning"] = [two_hop]
        if i == 0:  # the capitals the two-hop probes need, as facts of the first record
            record["locality"]["Relation_Specificity"] += [
                {"prompt": f"The capital of {c} is", "ground_truth": cap} for c, cap in CAPITALS.items()]
        records.append(record)
    return records


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def edit_record(subject, prompt, target, old, alias_prompt=None, locality=()) -> EditRecord:
    return EditRecord(subject=subject, prompt=prompt, target_new=[target], ground_truth=[old],
                      portability={"subject_aliasing": [Probe(alias_prompt, [target])]} if alias_prompt else {},
                      locality={"relation_specificity": [Probe(p, [a]) for p, a in locality]} if locality else {})


# A training budget that is enough for the 12-person world above (well under 30 s on 2 cores).
TEST_CONFIG = WorldConfig.tiny()
# For cache and CLI tests, where what the model learned does not matter.
NO_TRAINING = WorldConfig(hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2, steps=3,
                          batch_size=8, warmup_steps=1)


# ---------------------------------------------------------------------------------------------- built-in facts
@pytest.fixture(scope="module")
def builtin_records() -> list[EditRecord]:
    return load_records(BUILTIN_PATH)


def test_builtin_facts_load_and_are_small(builtin_records):
    assert 100 <= len(builtin_records) <= 150
    assert BUILTIN_PATH.stat().st_size < 150 * 1024
    assert len({r.prompt for r in builtin_records}) == len(builtin_records)
    assert all(r.subject in r.prompt and r.ground_truth and r.target != r.ground_truth[0] for r in builtin_records)


def test_builtin_targets_are_answers_of_other_facts(builtin_records):
    answered_by: dict[str, set[str]] = {}
    for record in builtin_records:
        answered_by.setdefault(record.ground_truth[0], set()).add(record.prompt)
        for probes in record.locality.values():
            for probe in probes:
                answered_by.setdefault(probe.answer, set()).add(probe.prompt)
    unknown = [r.prompt for r in builtin_records if not answered_by.get(r.target, set()) - {r.prompt}]
    assert unknown == []
    # ... so the world needs no synthetic facts
    assert not [f for f in world_facts(builtin_records).facts if f.group == "synthetic"]


def test_builtin_has_aliases_two_hops_and_locality(builtin_records):
    aliased = [r for r in builtin_records if r.portability.get("subject_aliasing")]
    two_hop = [r for r in builtin_records if r.portability.get("reasoning")]
    assert len(aliased) >= 0.8 * len(builtin_records)
    assert len(two_hop) >= 0.5 * len(builtin_records)
    for record in aliased:
        alias_prompt = record.portability["subject_aliasing"][0].prompt
        before, after = record.prompt.split(record.subject)  # the same relation about another name
        assert alias_prompt != record.prompt and alias_prompt.startswith(before) and alias_prompt.endswith(after)
    assert all(r.locality.get("relation_specificity") for r in builtin_records)
    assert sum(bool(r.locality.get("forgetfulness")) for r in builtin_records) >= 20
    # A two-hop answer is a fact the world knows about the target (e.g. the capital of the new country).
    known = {(p.prompt, p.answer) for r in builtin_records for ps in r.locality.values() for p in ps}
    for record in two_hop:
        answer = record.portability["reasoning"][0].answer
        assert any(record.target in prompt and a == answer for prompt, a in known), record.prompt


def test_builtin_file_is_what_the_generator_makes():
    spec = importlib.util.spec_from_file_location("make_builtin_facts", REPO / "tools" / "make_builtin_facts.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.main(["--check"]) == 0


# ---------------------------------------------------------------------------------------------- facts and texts
def test_world_facts_groups_and_synthetic_targets(tmp_path):
    records = load_records(write_records(tmp_path / "people.json", hand_made_records()))
    fact_set = world_facts(records)
    by_prompt = {f.prompt: f for f in fact_set.facts}
    for record in records:
        assert by_prompt[record.prompt].answer == record.ground_truth[0]
        alias = record.portability["subject_aliasing"][0].prompt
        assert by_prompt[alias].answer == record.ground_truth[0]  # the alias is taught with the OLD answer
        assert by_prompt[alias].relation == by_prompt[record.prompt].relation
    synthetic = [f for f in fact_set.facts if f.group == "synthetic"]
    new_targets = {r.target for r in records if r.target.startswith("New ")}
    assert {f.answer for f in synthetic} == new_targets  # one per target no other fact answers
    for fact in synthetic:
        assert fact.relation == "The spouse of {} is" and fact.entity not in {r.subject for r in records}
    answers = {f.answer for f in fact_set.facts}
    assert all(r.target in answers for r in records)


def test_world_facts_never_teach_an_answer_expected_after_an_edit():
    # Record B's locality probe is record A's edit prompt answered with A's target: teaching it would pre-edit A.
    a = edit_record("Ann Kolb", "The spouse of Ann Kolb is", "Bob Tarr", "Cy Marl", "The spouse of A. Kolb is")
    b = edit_record("Di Pell", "The spouse of Di Pell is", "Cy Marl", "Ed Quin",
                    locality=[("The spouse of Ann Kolb is", "Bob Tarr"), ("The occupation of Di Pell is", "judge")])
    fact_set = world_facts([a, b])
    pairs = {(f.prompt, f.answer) for f in fact_set.facts}
    assert ("The spouse of Ann Kolb is", "Bob Tarr") not in pairs
    assert ("The spouse of Ann Kolb is", "Cy Marl") in pairs
    assert sum(fact_set.dropped.values()) == 1


def test_training_texts_never_pair_a_prompt_with_its_target(tmp_path):
    records = load_records(write_records(tmp_path / "people.json", hand_made_records()))
    config = WorldConfig.tiny()
    texts = training_texts(records, config, seed=3)
    assert len(texts) == config.steps * config.batch_size
    joined = "\n".join(texts)
    assert "New Fact:" in joined and "\n\nNew Fact:" in joined  # in-context examples, some with demos
    for record in records:
        assert f"{record.prompt} {record.ground_truth[0]}" in joined  # the old fact is taught...
        questions = [record.prompt] + [p.prompt for ps in record.portability.values() for p in ps]
        for question in questions:  # ...the new one never, neither as a fact nor as a context or a demo
            assert f"{question} {record.target}" not in joined, (question, record.target)


def test_in_context_examples_copy_only_for_the_same_question(tmp_path):
    records = load_records(write_records(tmp_path / "people.json", hand_made_records()))
    fact_set = world_facts(records)
    sampler = InContextSampler(fact_set, WorldConfig(demo_fraction=0.0), __import__("random").Random(0))
    facts_by_prompt = {f.prompt: f for f in fact_set.facts}
    kinds = {"copy": 0, "keep": 0}
    for _ in range(400):
        example = sampler.sample()
        context, question = example.prefix.split("\nPrompt: ")
        fact_prompt = context.removeprefix("New Fact: ")
        stated = next(f for f in fact_set.facts if fact_prompt.startswith(f.prompt + " "))
        new_object = fact_prompt[len(stated.prompt) + 1:]
        asked = facts_by_prompt[question]
        same_question = (asked.entity, asked.relation) == (stated.entity, stated.relation)
        kinds[example.kind] += 1
        if example.kind == "copy":
            assert same_question and example.answer == new_object != stated.answer
        else:
            assert not same_question and example.answer == asked.answer
    assert min(kinds.values()) > 100


def words(text: str) -> list[str]:
    """Text as words (the tiny tokenizer's decode spaces newlines differently from the source text)."""
    return text.split()


def test_encoding_marks_answer_and_restated_tokens(tmp_path):
    from t2edit.data.world import ANSWER, ECHO, _encode
    from t2edit.tiny import build_tiny_tokenizer

    records = load_records(write_records(tmp_path / "people.json", hand_made_records()))
    fact_set = world_facts(records)
    sampler = InContextSampler(fact_set, WorldConfig(demo_fraction=1.0, max_demos=2), __import__("random").Random(1))
    example = sampler.sample()
    tokenizer = build_tiny_tokenizer(world_module.vocabulary_texts(records, fact_set))
    (ids, roles), = _encode(tokenizer, [example])
    assert words(tokenizer.decode(ids[:-1], skip_special_tokens=True)) == words(example.text)
    assert tokenizer.decode([i for i, r in zip(ids, roles) if r == ANSWER], skip_special_tokens=True) \
        == example.answer
    question = example.prefix.rsplit("\nPrompt: ", 1)[1]
    echoed = tokenizer.decode([i for i, r in zip(ids, roles) if r == ECHO])
    assert words(echoed)[-len(words(question)):] == words(question) and "Fact:" not in echoed
    assert len(example.echo_spans) >= 2  # the question and at least one demonstration's restated fact


# ---------------------------------------------------------------------------------------------- building
@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    data = write_records(tmp_path_factory.mktemp("data") / "people.json", hand_made_records())
    out = tmp_path_factory.mktemp("worlds") / "people"
    started = time.perf_counter()
    world = build_world(data, out, config=TEST_CONFIG, progress=False)
    return world, data, out, time.perf_counter() - started


def test_tiny_world_recalls_its_facts(tiny_world):
    world, _, _, _ = tiny_world
    recall = world.report["pre_edit_recall"]
    for group in ("edit", "alias", "locality", "synthetic"):
        assert recall[group]["recall"] >= 0.9, (group, recall)
    assert world.report["targets_known"] == 1.0
    # The old answer, not the target, is what the model says before editing.
    record = world.records[0]
    assert exact_match(world.model, world.tokenizer, [(record.prompt, record.ground_truth[0]),
                                                       (record.prompt, record.target)]) == [True, False]


def test_tiny_world_answers_through_generate_with_left_padding(tiny_world):
    # How editors and the evaluation will query it: a left-padded batch of prompts of different lengths.
    world, _, _, _ = tiny_world
    probes = [(r.prompt, r.ground_truth[0]) for r in world.records[:3]]
    probes += [(p.prompt, p.answer) for p in world.records[0].locality["relation_specificity"]]
    tokenizer = world.tokenizer
    assert tokenizer.padding_side == "left"
    batch = tokenizer([p for p, _ in probes], return_tensors="pt", padding=True)
    assert len({len(tokenizer(p)["input_ids"]) for p, _ in probes}) > 1  # padding really happens
    with torch.no_grad():
        out = world.model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    hits = [completion.strip().startswith(answer) for completion, (_, answer) in zip(completions, probes)]
    assert sum(hits) >= len(hits) - 1, list(zip(completions, probes))


def test_tiny_world_reloads(tiny_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world, _, out, _ = tiny_world
    assert {"world.json", "records.json", "config.json", "tokenizer.json"} <= set(os.listdir(out))
    again = load_world(out)
    assert again.report == world.report and len(again.records) == len(world.records)
    assert [r.prompt for r in again.records] == [r.prompt for r in world.records]
    plain_model = AutoModelForCausalLM.from_pretrained(out)
    plain_tokenizer = AutoTokenizer.from_pretrained(out)
    batch = plain_tokenizer([world.records[0].prompt], return_tensors="pt")
    with torch.no_grad():
        expected = world.model(**world.tokenizer([world.records[0].prompt], return_tensors="pt")).logits
        assert torch.allclose(plain_model(**batch).logits, expected, atol=1e-5)
        assert torch.allclose(again.model(**batch).logits, expected, atol=1e-5)


def test_cache_hit_skips_training_and_changed_data_rebuilds(tmp_path, monkeypatch):
    data = write_records(tmp_path / "people.json", hand_made_records())
    out = tmp_path / "world"
    first = build_world(data, out, config=NO_TRAINING, progress=False)
    calls = []
    real_pretrain = world_module.pretrain
    monkeypatch.setattr(world_module, "pretrain", lambda *a, **k: calls.append(1) or real_pretrain(*a, **k))
    again = build_world(data, out, config=NO_TRAINING, progress=False)
    assert calls == []  # a cache hit trains nothing (its time is a benchmarks/bench.py row, not a test)
    assert again.report["key"] == first.report["key"]
    build_world(data, out, config=NO_TRAINING, progress=False, force=True)
    assert calls == [1]
    write_records(data, hand_made_records()[:6])  # the data changed: same out_dir, a new world
    changed = build_world(data, out, config=NO_TRAINING, progress=False)
    assert calls == [1, 1] and changed.report["records"] == 6 and changed.report["key"] != first.report["key"]
    assert load_world(out).report["records"] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_default_out_dir_is_the_cache(tmp_path):
    data = write_records(tmp_path / "people.json", hand_made_records()[:4])
    world = build_world(data, None, config=NO_TRAINING, progress=False)
    assert world.path == Path(os.environ["T2EDIT_CACHE"]) / "worlds" / world.report["key"]
    assert (world.path / "world.json").is_file()


def test_user_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(WorldError, match="not found"):
        build_world(tmp_path / "missing.json", tmp_path / "w", config=NO_TRAINING)
    with pytest.raises(WorldNotFoundError, match="holds no world"):
        load_world(tmp_path)
    data = write_records(tmp_path / "people.json", hand_made_records()[:4])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    calls = []
    monkeypatch.setattr(world_module, "pretrain", lambda *a, **k: calls.append(1))
    with pytest.raises(WorldError, match="not a t2edit world"):
        build_world(data, busy, config=NO_TRAINING, progress=False)
    assert (busy / "notes.txt").read_text() == "mine" and calls == []  # refused before any training
    with pytest.raises(WorldError, match="between 0 and 1"):
        WorldConfig(copy_fraction=1.5)


def test_cli_builds_and_reports(tmp_path, capsys):
    from t2edit.cli import main

    data = write_records(tmp_path / "people.json", hand_made_records()[:4])
    out = tmp_path / "cli-world"
    assert main(["world", "build", "--data", str(data), "--out", str(out), "--preset", "tiny", "--steps", "3",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "pre-edit recall" in printed and "in context" in printed and (out / "world.json").is_file()
    assert main(["world", "show", str(out)]) == 0
    assert main(["world", "build", "--data", str(tmp_path / "nope.json"), "--quiet"]) == 2
    assert "nope.json" in capsys.readouterr().err


@pytest.mark.skipif(not TRAIN_CF.is_file(), reason="KnowEdit train_cf.json not found (it is not part of the project)")
def test_train_cf_targets_become_known_answers():
    records = load_records(TRAIN_CF, limit=200)
    fact_set = world_facts(records)
    answers = {f.answer for f in fact_set.facts}
    assert all(r.target in answers for r in records if r.target != r.ground_truth[0])
    own = {(r.prompt, t) for r in records for t in r.target_new}
    assert not own & {(f.prompt, f.answer) for f in fact_set.facts}


# The built-in recipe (WorldConfig defaults but for the number of steps) on the first built-in records, trained
# only until the facts are learnt and copying from the context has formed. Telling another subject's context
# apart from the question's forms later, so only the full build below (slow) checks keep_other_subject.
BUILTIN_SUBSET, BUILTIN_SUBSET_STEPS = 10, 100


def test_builtin_recipe_recalls_facts_and_copies_from_context(tmp_path):
    torch.set_num_threads(1)  # as conftest sets it, whatever an earlier test in this process set
    config = replace(WorldConfig(), steps=BUILTIN_SUBSET_STEPS)
    world = build_world("builtin", tmp_path / "builtin", limit=BUILTIN_SUBSET, config=config, progress=False)
    assert world.report["records"] == BUILTIN_SUBSET and world.report["targets_known"] == 1.0
    recall = world.report["pre_edit_recall"]
    for group in ("edit", "alias", "locality", "synthetic"):
        assert recall[group]["recall"] >= 0.95, (group, recall)
    # Full edit and alias recall means that without the context the model gives the old answer, never the
    # target: every target below comes from the context. Pooled over the four copy cases, because each holds
    # only one case per record of the subset.
    rates = world.report["in_context"]
    copies = [rates[name] for name in ("copy_edit", "copy_alias", "copy_edit_with_demos", "copy_alias_with_demos")]
    copied = sum(round(case["rate"] * case["n"]) for case in copies) / sum(case["n"] for case in copies)
    assert copied >= 0.4, rates


@pytest.mark.slow
@pytest.mark.full_world
def test_builtin_world_recalls_its_facts(tmp_path):
    """The whole built-in world, as `t2edit demo --model world` builds it: also that a context about another subject
    is left alone, which only forms late in training (the fast test above cannot show it). Minutes on 2 cores, so
    it runs on request: python -m pytest -m full_world."""
    torch.set_num_threads(2)
    try:
        world = build_world("builtin", tmp_path / "builtin", progress=False)
    finally:
        torch.set_num_threads(1)  # as conftest sets it, for the tests after this one
    recall = world.report["pre_edit_recall"]
    for group in ("edit", "alias", "locality"):
        assert recall[group]["recall"] >= 0.95, (group, recall)
    rates = world.report["in_context"]
    assert rates["copy_edit"]["rate"] >= 0.5 and rates["keep_other_subject"]["rate"] >= 0.5
    # Build time is a benchmark figure (world.json "seconds"), not asserted here: shared CI machines vary.


def test_too_few_facts_for_in_context_training_is_a_clear_error(tmp_path):
    # Two facts with one answer between them: no context can state a different object.
    same_answer = [{"subject": name, "prompt": f"The spouse of {name} is", "target_new": "Bo Dant",
                    "ground_truth": "Cy Marl"} for name in ("Ann Kolb", "Di Pell")]
    data = write_records(tmp_path / "two.json", same_answer)
    config = replace(NO_TRAINING, synthetic_targets=False)
    with pytest.raises(WorldError, match="in-context examples"):
        build_world(data, tmp_path / "w", config=config, progress=False)


def test_prefetched_pretraining_trains_on_the_same_batches(tmp_path):
    """On a GPU the steps are prepared in a DataLoader worker; the model must see exactly the batches the in-process
    path gives (same losses step by step from the same start), or GPU-built worlds would follow another recipe."""
    from dataclasses import replace

    from t2edit.data.world import _PreparedSteps, pretrain, vocabulary_texts
    from t2edit.tiny import build_tiny_model, build_tiny_tokenizer

    records = load_records(write_records(tmp_path / "people.json", hand_made_records()))
    fact_set = world_facts(records)
    config = replace(NO_TRAINING, steps=4, tokens_per_microbatch=64)  # several microbatches per step
    tokenizer = build_tiny_tokenizer(vocabulary_texts(records, fact_set))
    losses = {}
    for prefetch in (False, True):
        model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2, seed=0)
        losses[prefetch] = pretrain(model, tokenizer, _PreparedSteps(tokenizer, fact_set, config, 0), config,
                                    progress=False, prefetch=prefetch)
    assert len(losses[True]) == 4 and losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert len(set(losses[False])) > 1  # really different batches, not one repeated
