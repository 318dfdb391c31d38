"""Loaders for KnowEdit / CounterFact / zsRE (MEND) / ROME files, on hand-made records written in each test."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from t2edit.data.loaders import (DataFormatError, DataSourceNotFoundError, LoadStats, dataset_to_records,
                                 load_edit_dataset, load_records, records_to_dataset, save_records)
from t2edit.data.records import EditRecord, Probe

REAL_KNOWEDIT = Path("/work/shared/data/knowedit/train_cf.json")


def write_json(tmp_path: Path, rows, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def knowedit_record(**overrides) -> dict:
    record = {
        "subject": "Goursez Vreizh",
        "prompt": "The country of Goursez Vreizh is",
        "target_new": "Franche-Comté",
        "ground_truth": "France",
        "portability": {"Reasoning": [{"prompt": "The capital of the country of Goursez Vreizh is",
                                       "ground_truth": "Besançon"}]},
        "locality": {"Relation_Specificity": [{"prompt": "The founder of Goursez Vreizh is",
                                               "ground_truth": "Jean Le Fustec"}]},
    }
    record.update(overrides)
    return record


# ------------------------------------------------------------------------------------------------- KnowEdit
def test_knowedit_string_answers(tmp_path):
    stats = LoadStats()
    [record] = load_records(write_json(tmp_path, [knowedit_record()]), stats=stats)
    assert record.subject == "Goursez Vreizh"
    assert record.prompt == "The country of Goursez Vreizh is"
    assert record.target_new == ["Franche-Comté"] and record.ground_truth == ["France"]
    assert record.portability == {"reasoning": [Probe("The capital of the country of Goursez Vreizh is",
                                                      ["Besançon"])]}
    assert record.locality == {"relation_specificity": [Probe("The founder of Goursez Vreizh is", ["Jean Le Fustec"])]}
    assert record.rephrase == [] and record.index == 0
    assert (stats.format, stats.records, stats.skipped_records, sum(stats.skipped_items.values())) == \
        ("knowedit", 1, 0, 0)


def test_knowedit_alias_lists_and_alias_list_lists_flatten_in_order(tmp_path):
    raw = knowedit_record(
        target_new=["Syrian pound", "SYP"],
        ground_truth=[["Euro", "EUR"], ["Swiss franc", "CHF", "Euro"]],  # multi-valued, with a repeated alias
        portability={"Subject_Aliasing": [{"prompt": "The currency of GV is",
                                           "ground_truth": [["Syrian pound", "SYP"]]}]},
        locality={"Forgetfulness": [{"prompt": "The founder of GV is", "ground_truth": ["Jean", "J. Le Fustec"]}]})
    [record] = load_records(write_json(tmp_path, [raw]))
    assert record.target_new == ["Syrian pound", "SYP"]
    assert record.target == "Syrian pound"
    assert record.ground_truth == ["Euro", "EUR", "Swiss franc", "CHF"]
    assert record.portability["subject_aliasing"][0].answers == ["Syrian pound", "SYP"]
    assert record.locality["forgetfulness"][0].answer == "Jean"


@pytest.mark.parametrize("empty", ["", "  ", [], [[]], [[], [""]], None])
def test_knowedit_empty_answers_are_skipped_and_counted(tmp_path, empty):
    raw = knowedit_record(locality={"Forgetfulness": [{"prompt": "Kept is", "ground_truth": "yes"},
                                                      {"prompt": "Dropped is", "ground_truth": empty}]},
                          portability={"Reasoning": [{"prompt": "Only dropped is", "ground_truth": empty}]})
    stats = LoadStats()
    [record] = load_records(write_json(tmp_path, [raw]), stats=stats)
    assert record.locality == {"forgetfulness": [Probe("Kept is", ["yes"])]}
    assert record.portability == {}  # a kind whose every item was dropped does not appear at all
    assert stats.skipped_items == {"locality.forgetfulness: empty answers": 1,
                                   "portability.reasoning: empty answers": 1}
    assert stats.records == 1 and stats.skipped_records == 0


def test_knowedit_empty_prompt_item_is_skipped_and_counted(tmp_path):
    raw = knowedit_record(portability={"Reasoning": [{"prompt": " ", "ground_truth": "x"}]})
    stats = LoadStats()
    [record] = load_records(write_json(tmp_path, [raw]), stats=stats)
    assert record.portability == {}
    assert stats.skipped_items == {"portability.reasoning: empty prompt": 1}


def test_knowedit_kind_keys_are_normalised_and_merged(tmp_path):
    raw = knowedit_record(portability={
        "Reasoning": [{"prompt": "a is", "ground_truth": "A"}],
        "reasoning": [{"prompt": "b is", "ground_truth": "B"}],
        "Logical Generalization": [{"prompt": "c is", "ground_truth": "C"}],
        "Subject_Aliasing": [{"prompt": "d is", "ground_truth": "D"}]},
        locality={"Relation_Specificity": [], "FORGETFULNESS": [{"prompt": "e is", "ground_truth": "E"}]})
    [record] = load_records(write_json(tmp_path, [raw]))
    assert {kind: [p.prompt for p in probes] for kind, probes in record.portability.items()} == {
        "reasoning": ["a is", "b is"], "logical_generalization": ["c is"], "subject_aliasing": ["d is"]}
    assert list(record.locality) == ["forgetfulness"]  # the empty Relation_Specificity list is just absent


def test_knowedit_empty_sections_and_zsre_rephrase(tmp_path):
    raw = knowedit_record(portability={}, locality={"Relation_Specificity": []},
                          rephrase_prompt="Which country is Goursez Vreizh associated with?")
    [record] = load_records(write_json(tmp_path, [raw]))
    assert record.portability == {} and record.locality == {}
    assert record.rephrase == [Probe("Which country is Goursez Vreizh associated with?", ["Franche-Comté"])]
    assert record.scored_prompts() == {"Which country is Goursez Vreizh associated with?"}


def test_start_and_limit_select_source_records_and_keep_their_index(tmp_path):
    rows = [knowedit_record(prompt=f"Prompt {i} is") for i in range(6)]
    records = load_records(write_json(tmp_path, rows), start=2, limit=3)
    assert [r.prompt for r in records] == ["Prompt 2 is", "Prompt 3 is", "Prompt 4 is"]
    assert [r.index for r in records] == [2, 3, 4]
    assert len(load_records(write_json(tmp_path, rows), start=4)) == 2
    with pytest.raises(ValueError, match="must not be negative"):
        load_records(write_json(tmp_path, rows), limit=-1)


def test_jsonl_is_read_line_by_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(knowedit_record(prompt=f"P{i} is")) for i in range(3)) + "\n\n")
    assert [r.prompt for r in load_records(path)] == ["P0 is", "P1 is", "P2 is"]


# ------------------------------------------------------------------------------------------------- CounterFact
def test_easyedit_counterfact(tmp_path):
    raw = {"case_id": 2, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Toko Yasuda",
           "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is incredible at",
           "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar"}
    stats = LoadStats()
    [record] = load_records(write_json(tmp_path, [raw], "counterfact-train.json"), stats=stats)
    assert stats.format == "counterfact"
    assert (record.subject, record.prompt, record.target_new, record.ground_truth) == \
        ("Toko Yasuda", "Toko Yasuda, the", ["piano"], ["guitar"])
    assert record.rephrase == [Probe("Toko Yasuda is incredible at", ["piano"])]
    assert record.locality == {"neighborhood": [Probe("John Lennon performs on the", ["guitar"])]}
    assert record.portability == {}


def test_rome_counterfact_with_portability(tmp_path):
    raw = {"case_id": 4482, "pararel_idx": 1,
           "requested_rewrite": {"prompt": "{} originates from", "relation_id": "P19", "subject": "Spike Hughes",
                                 "target_new": {"str": "Philadelphia", "id": "Q1"},
                                 "target_true": {"str": "London", "id": "Q84"}},
           "paraphrase_prompts": ["Spike Hughes is native to", "Spike Hughes was born in"],
           "neighborhood_prompts": ["Max Mosley originates from", ""],
           "attribute_prompts": ["Mike Dennis originates from"], "generation_prompts": ["Spike Hughes lives in"],
           "portability": {"Recalled Relation": "(Philadelphia, known for, cheesesteaks)",
                           "New Question": "What food is the city Spike Hughes is from known for?",
                           "New Answer": "Cheesesteaks"}}
    stats = LoadStats()
    [record] = load_records(write_json(tmp_path, [raw]), stats=stats)
    assert stats.format == "rome"
    assert record.prompt == "Spike Hughes originates from"
    assert (record.target_new, record.ground_truth) == (["Philadelphia"], ["London"])
    assert [p.prompt for p in record.rephrase] == ["Spike Hughes is native to", "Spike Hughes was born in"]
    assert record.locality == {"neighborhood": [Probe("Max Mosley originates from", ["London"])]}
    assert record.portability == {"one_hop": [Probe("What food is the city Spike Hughes is from known for?",
                                                    ["Cheesesteaks"])]}
    assert stats.skipped_items == {"locality.neighborhood: empty prompt": 1}


# ------------------------------------------------------------------------------------------------- zsRE (MEND)
def mend_record(**overrides) -> dict:
    record = {"subject": "IAAF Combined Events Challenge", "src": "When was the IAAF Combined Events Challenge founded?",
              "pred": "2011", "rephrase": "When was the IAAF Combined Events Challenge launched?", "alt": "2006",
              "answers": ["1998", "the year 1998"], "loc": "nq question: who wrote the book of mormon",
              "loc_ans": "Joseph Smith", "cond": "2011 >> 2006 || ..."}
    record.update(overrides)
    return record


def test_zsre_mend_without_portability(tmp_path):
    stats = LoadStats()
    [record] = load_records(write_json(tmp_path, [mend_record()]), stats=stats)
    assert stats.format == "zsre_mend"
    assert record.prompt == "When was the IAAF Combined Events Challenge founded?"
    assert record.target_new == ["2006"] and record.ground_truth == ["1998", "the year 1998"]
    assert record.rephrase == [Probe("When was the IAAF Combined Events Challenge launched?", ["2006"])]
    assert record.locality == {"nq": [Probe("who wrote the book of mormon", ["Joseph Smith"])]}
    assert record.portability == {}


def test_zsre_mend_with_portability(tmp_path):
    raw = mend_record(portability={"Recalled Relation": "(x, y, z)", "New Question": "What sport is it?",
                                   "New Answer": "Athletics"})
    [record] = load_records(write_json(tmp_path, [raw]))
    assert record.portability == {"one_hop": [Probe("What sport is it?", ["Athletics"])]}


def test_zsre_mend_empty_locality_answer_is_counted(tmp_path):
    stats = LoadStats()
    [record] = load_records(write_json(tmp_path, [mend_record(loc_ans="")]), stats=stats)
    assert record.locality == {}
    assert stats.skipped_items == {"locality.nq: empty answers": 1}


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, problem", [
    ({"subject": "S", "target_new": "T"}, "missing 'prompt'"),
    ({"subject": "S", "prompt": "P is", "target_new": ""}, "target_new is missing or empty"),
    ({"subject": "S", "prompt": "P is", "target_new": [[]]}, "target_new is missing or empty"),
    ({"subject": "S", "prompt": "P is"}, "target_new is missing or empty"),
    ({"subject": "S", "prompt": 7, "target_new": "T"}, "'prompt' must be a string, got int"),
    ({"subject": "S", "prompt": "P is", "target_new": 1998}, "'target_new' must be a string or a list"),
    ({"subject": "S", "prompt": "P is", "target_new": "T", "locality": ["x"]}, "'locality' must be an object"),
    ({"subject": "S", "prompt": "P is", "target_new": "T", "locality": {"Forgetfulness": [{"prompt": "q"}]}},
     "'locality.Forgetfulness' items must be objects with 'prompt' and 'ground_truth'"),
    ("just a string", "a record must be a JSON object, got str"),
])
def test_malformed_record_names_file_index_problem_and_fix(tmp_path, bad, problem):
    rows = [knowedit_record(), knowedit_record(), bad, knowedit_record()]
    path = write_json(tmp_path, rows, "edits.json")
    with pytest.raises(DataFormatError) as caught:
        load_records(path)
    message = str(caught.value)
    assert str(path) in message and "record 2:" in message and problem in message
    assert "--skip-bad" in message
    assert isinstance(caught.value, ValueError)

    stats = LoadStats()
    records = load_records(path, skip_bad=True, stats=stats)
    assert [r.index for r in records] == [0, 1, 3]
    assert stats.records == 3 and stats.skipped_records == 1
    assert len(stats.problems) == 1 and "record 2:" in stats.problems[0]


def test_skipped_bad_record_does_not_count_its_items(tmp_path):
    bad = knowedit_record(locality={"Forgetfulness": [{"prompt": "q is", "ground_truth": ""}]}, target_new=None)
    stats = LoadStats()
    assert load_records(write_json(tmp_path, [knowedit_record(), bad]), skip_bad=True, stats=stats)[0].index == 0
    assert stats.skipped_records == 1 and not stats.skipped_items


def test_index_in_message_counts_from_the_file_start(tmp_path):
    rows = [knowedit_record() for _ in range(5)] + [knowedit_record(prompt=None)]
    with pytest.raises(DataFormatError, match="record 5: missing 'prompt'"):
        load_records(write_json(tmp_path, rows), start=3)


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": "P is", "target_new": }]')
    with pytest.raises(DataFormatError, match=r"broken\.json is not valid JSON .*line 1"):
        load_records(path)
    jsonl = tmp_path / "broken.jsonl"
    jsonl.write_text(json.dumps(knowedit_record()) + "\n{oops\n")
    with pytest.raises(DataFormatError, match=r"broken\.jsonl: line 2 is not valid JSON"):
        load_records(jsonl)


def test_binary_file_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.json"
    path.write_bytes(b"\x80\x81\xfe binary")
    with pytest.raises(DataFormatError, match=r"weights\.json is not UTF-8 text"):
        load_records(path)


def test_byte_order_mark_and_crlf_are_tolerated(tmp_path):
    path = tmp_path / "crlf.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([knowedit_record()], indent=1).replace("\n", "\r\n").encode())
    assert load_records(path)[0].target == "Franche-Comt\u00e9"


def test_unknown_shape_and_non_list_file(tmp_path):
    with pytest.raises(DataFormatError, match="no record has the keys of a known format"):
        load_records(write_json(tmp_path, [{"question": "q", "answer": "a"}]))
    with pytest.raises(DataFormatError, match="holds a JSON dict, expected a list"):
        load_records(write_json(tmp_path, {"data": []}))


def test_missing_file_is_a_clear_error_without_touching_the_hub(tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("a missing .json path must not be looked up on the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(DataSourceNotFoundError, match=r"data file .*nowhere\.json not found"):
        load_records(tmp_path / "nowhere.json")
    with pytest.raises(FileNotFoundError):  # a subclass, so plain FileNotFoundError handlers catch it
        load_records(tmp_path / "nowhere.jsonl")


def test_unreachable_hub_name_is_one_clear_error(monkeypatch):
    import datasets

    calls = []

    def offline_hub(name, split):
        calls.append((name, split))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    with pytest.raises(DataSourceNotFoundError, match="neither a local file nor a reachable hub dataset"):
        load_records("someone/some-edits", split="test")
    assert calls == [("someone/some-edits", "test")]


def test_hub_rows_go_through_the_same_parser(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, split: datasets.Dataset.from_list([mend_record(), mend_record(alt="2007")]))
    records = load_records("someone/zsre")
    assert [r.target for r in records] == ["2006", "2007"]


# ------------------------------------------------------------------------------------------------- datasets + saving
def sample_records() -> list[EditRecord]:
    return [
        EditRecord(subject="A", prompt="A lives in", target_new=["Paris", "Paris, France"], ground_truth=["Rome"],
                   locality={"relation_specificity": [Probe("A works for", ["ACME"])],
                             "forgetfulness": [Probe("A was born in", ["Rome", "Roma"])]},
                   portability={"reasoning": [Probe("The mayor of A's city is", ["Hidalgo"])]},
                   rephrase=[Probe("A resides in", ["Paris", "Paris, France"])], index=0),
        EditRecord(subject="B", prompt="B plays", target_new=["chess"], index=7),  # no probes, no ground truth
    ]


def test_dataset_round_trip():
    records = sample_records()
    dataset = records_to_dataset(records)
    assert len(dataset) == 2
    assert set(dataset.column_names) == {"index", "subject", "prompt", "target_new", "ground_truth", "rephrase",
                                         "locality", "portability"}
    assert dataset[0]["locality"][1] == {"kind": "forgetfulness", "prompt": "A was born in",
                                         "answers": ["Rome", "Roma"]}
    assert dataset[1]["locality"] == [] and dataset[1]["ground_truth"] == []
    assert dataset_to_records(dataset) == records


def test_load_edit_dataset(tmp_path):
    dataset = load_edit_dataset(write_json(tmp_path, [knowedit_record()] * 3), limit=2)
    assert len(dataset) == 2 and dataset[1]["index"] == 1
    assert dataset[0]["portability"] == [{"kind": "reasoning", "prompt": "The capital of the country of Goursez "
                                          "Vreizh is", "answers": ["Besançon"]}]


@pytest.mark.parametrize("name", ["out/set.json", "out/set.jsonl"])
def test_save_records_writes_knowedit_that_loads_back(tmp_path, name):
    records = sample_records()
    path = save_records(records, tmp_path / name)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    text = path.read_text(encoding="utf-8")
    first = json.loads(text.splitlines()[0]) if name.endswith(".jsonl") else json.loads(text)[0]
    assert first["target_new"] == ["Paris", "Paris, France"] and first["ground_truth"] == "Rome"
    assert first["locality"]["Relation_Specificity"] == [{"prompt": "A works for", "ground_truth": "ACME"}]
    assert first["rephrase_prompt"] == "A resides in"
    loaded = load_records(path)
    for before, after in zip(records, loaded):
        assert (after.prompt, after.target_new, after.ground_truth) == \
            (before.prompt, before.target_new, before.ground_truth)
        assert after.locality == before.locality and after.portability == before.portability
        assert after.rephrase == before.rephrase


def test_save_records_replaces_an_existing_file(tmp_path):
    path = tmp_path / "set.json"
    path.write_text("old")
    save_records(sample_records()[1:], path)
    assert [r.prompt for r in load_records(path)] == ["B plays"]


# ------------------------------------------------------------------------------------------------- real data
@pytest.mark.skipif(not REAL_KNOWEDIT.exists(), reason="KnowEdit train_cf.json not found (it is not part of the project)")
def test_real_knowedit_first_50_records():
    stats = LoadStats()
    records = load_records(REAL_KNOWEDIT, limit=50, stats=stats)
    assert len(records) == 50 and stats.format == "knowedit" and stats.skipped_records == 0
    assert [r.index for r in records] == list(range(50))
    assert all(r.prompt and r.target and r.subject for r in records)
    kinds = {kind for r in records for kind in [*r.locality, *r.portability]}
    assert kinds <= {"relation_specificity", "forgetfulness", "reasoning", "subject_aliasing",
                     "logical_generalization"}
    assert sum(len(r.portability.get("subject_aliasing", [])) for r in records) >= 40  # nearly every record has one
    assert sum(1 for r in records if r.locality) >= 30
    assert all(p.answers and p.prompt for r in records for probes in [*r.locality.values(),
                                                                      *r.portability.values()] for p in probes)
    assert load_records(REAL_KNOWEDIT, start=50, limit=10)[0].index == 50


@pytest.mark.parametrize("name", ["real-facts", "builtin"])
def test_shipped_records_name_a_subject_their_prompt_holds(name):
    """The subject is the span of the prompt the fact is about (KnowEdit's convention): the scope routers key on
    it and the leakage guard compares it, so "Apple" for "The iPhone is made by" would mislead both."""
    records = load_records(name)
    assert records and all(r.subject and r.subject in r.prompt for r in records), [
        (r.subject, r.prompt) for r in records if r.subject not in r.prompt]


def test_a_subject_is_spelled_as_its_prompt_spells_it(tmp_path):
    path = tmp_path / "case.json"
    path.write_text(json.dumps([
        {"subject": "Water", "prompt": "The chemical formula of water is", "target_new": "CO2"},
        {"subject": "iPhone", "prompt": "Who makes the IPHONE? It is", "target_new": "Samsung"},
        {"subject": "Apple", "prompt": "The iPhone is made by", "target_new": "Samsung"}]))
    assert [r.subject for r in load_records(path)] == ["water", "IPHONE", "Apple"]  # the last: not in it at all
