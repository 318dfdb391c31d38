"""The side-memory editors (GRACE, WISE, SERAC) on a tiny fact world built here: each answers its edits, leaves
every other prompt to the unedited model, restores exactly, edits sequentially, and learns only from the
leakage guard's pool."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

from t2edit.data.records import EditRecord, Probe
from t2edit.editors.base import EditInputError
from t2edit.editors.grace import Codebook, GraceEditor, GraceEditorConfig, read_layer
from t2edit.editors.serac import SeracEditor, SeracEditorConfig
from t2edit.editors.wise import WiseEditor, WiseEditorConfig, routing_margins, ties_merge
from t2edit.evaluation import exact_match_scores, teacher_forced_accuracy
from t2edit.text import new_fact_context
from t2edit.tiny import build_tiny_model, build_tiny_tokenizer, teach_facts

NAMES = ["Alice", "Bruno", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas"]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo"]
FIRMS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli"]
N_EDITS = 4  # facts 0..3 (Alice and Bruno) are edited; the others are the training pool


def _facts() -> list[tuple[str, str]]:
    facts = []
    for i, name in enumerate(NAMES):
        facts.append((f"{name} lives in", CITIES[i % 5]))
        facts.append((f"{name} works at", FIRMS[(2 * i) % 5]))
    return facts


def _record(index: int, prompt: str, answer: str, shift: int = 1) -> EditRecord:
    options = CITIES if answer in CITIES else FIRMS
    return EditRecord(subject=prompt.split()[0], prompt=prompt,
                      target_new=[options[(options.index(answer) + shift) % len(options)]],
                      ground_truth=[answer], index=index)


@pytest.fixture(scope="module")
def world():
    """20 facts "prompt answer" taught to a hidden-64 Llama (~3 s)."""
    facts = _facts()
    texts = [f"{prompt} {answer}" for prompt, answer in facts]
    tokenizer = build_tiny_tokenizer(texts + ["New Fact: Prompt: the city of"])
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2)
    teach_facts(model, tokenizer, texts, steps=150, lr=3e-3, batch_size=32,
                answer_starts=[len(prompt) + 1 for prompt, _ in facts])
    return {"model": model, "tokenizer": tokenizer, "facts": facts,
            "edits": [_record(i, *facts[i]) for i in range(N_EDITS)],
            "pool": [_record(i, *facts[i], shift=2) for i in range(N_EDITS, len(facts))]}


@pytest.fixture
def model(world):
    return copy.deepcopy(world["model"])


def _editor(method: str, world, **options):
    if method == "grace":
        return GraceEditor(GraceEditorConfig(**{"eps": 0.5, **options}))
    if method == "wise":
        return WiseEditor(WiseEditorConfig(**{"irrelevant_samples": 4, **options}), train_records=world["pool"])
    return SeracEditor(SeracEditorConfig(**options), train_records=world["pool"])


def _edit_success(edited, tokenizer, records) -> float:
    """Mean teacher-forced token accuracy of the targets, scored as the evaluation does (with prompt ends)."""
    prompts = [r.prompt for r in records]
    scores = teacher_forced_accuracy(edited.model, tokenizer, prompts, [r.target for r in records],
                                     contexts=[edited.context(p) for p in prompts])
    return sum(scores) / len(scores)


def _holds(method: str, edited, tokenizer, record) -> bool:
    """Whether an edited model holds an edit: its target answered (GRACE, WISE), or its fact put in front of the
    prompt (SERAC; the tiny model was never taught to read a context)."""
    if method == "serac":
        return edited.context(record.prompt) == new_fact_context(record.prompt, record.target)
    return _edit_success(edited, tokenizer, [record]) == 1.0


def _logits(model, tokenizer, texts) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------------------------------------- GRACE

def test_grace_answers_an_edited_key_and_defers_outside_its_radius(world, model):
    tokenizer, record = world["tokenizer"], world["edits"][0]
    prompts = [prompt for prompt, _ in world["facts"]]
    before = _logits(model, tokenizer, prompts)
    edited = GraceEditor(GraceEditorConfig(eps=0.5)).edit(model, tokenizer, [record])
    assert _edit_success(edited, tokenizer, [record]) == 1.0
    assert exact_match_scores(edited.model, tokenizer, [record.prompt], [[record.target]]) == [1.0]  # generate
    # Which prompts lie outside the radius is read from the codebook itself, so the test checks the rule.
    adaptor = edited.model.adaptor
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    distance, _ = adaptor.codebook.nearest(read_layer(model, adaptor, encoded["input_ids"],
                                                      encoded["attention_mask"])["x"][:, -1])
    outside = [i for i, d in enumerate(distance.tolist()) if d > 0.5]
    assert len(outside) >= 10 and prompts.index(record.prompt) not in outside
    after = _logits(edited.model, tokenizer, prompts)
    assert all(torch.equal(after[i], before[i]) for i in outside)  # exactly the unedited logits
    assert not torch.equal(after[prompts.index(record.prompt)], before[prompts.index(record.prompt)])
    edited.restore()


def test_grace_codebook_adds_expands_and_splits_as_published():
    book = Codebook()
    value = torch.ones(3)
    assert book.write(torch.tensor([0.0, 0.0]), value, "paris", eps=1.0) == "added"
    assert book.write(torch.tensor([5.0, 0.0]), 2 * value, "rome", eps=1.0) == "added"  # beyond radius + eps
    assert book.write(torch.tensor([1.5, 0.0]), 3 * value, "paris", eps=1.0) == "expanded"  # same label
    assert len(book) == 2 and book.radii.tolist() == [1.5, 1.0]
    assert book.write(torch.tensor([0.0, 1.2]), 4 * value, "lima", eps=1.0) == "split"  # a conflicting label
    assert len(book) == 3 and book.radii.tolist() == pytest.approx([0.6, 1.0, 0.6])
    assert book.labels == ["paris", "rome", "lima"]
    snapshot = book.copy()
    assert book.write(torch.tensor([5.0, 0.0]), 5 * value, "oslo", eps=1.0) == "split"  # the same key, re-edited
    distance, index = book.nearest(torch.tensor([[5.0, 0.0]]))
    assert distance.item() == 0 and book.labels[index.item()] == "oslo"  # the newest edit wins
    assert len(snapshot) == 3 and snapshot.radii.tolist() == pytest.approx([0.6, 1.0, 0.6])  # writes never leak


# ---------------------------------------------------------------------------------------------- WISE

def test_wise_routes_edited_prompts_to_side_memory_and_others_to_main(world, model):
    tokenizer, record = world["tokenizer"], world["edits"][0]
    editor = _editor("wise", world)
    edited = editor.edit(model, tokenizer, [record])
    adaptor = edited.model.adaptor
    assert _edit_success(edited, tokenizer, [record]) == 1.0
    assert exact_match_scores(edited.model, tokenizer, [record.prompt], [[record.target]]) == [1.0]  # generate
    _logits(edited.model, tokenizer, [record.prompt])
    assert adaptor.last_routed.tolist() == [True]
    others = editor.last_irrelevant  # what the router learned to leave alone
    assert len(others) == 4
    after = _logits(edited.model, tokenizer, others)
    assert adaptor.last_routed.tolist() == [False] * 4
    # The margins did the separating (70 SGD steps get them half-way on this model): the edit scores well above
    # beta / 2 and above every irrelevant prompt by more than gamma / 2.
    edit_score = adaptor.memory.edit_scores[0]
    assert edit_score > editor.config.beta / 2
    assert edit_score - adaptor.last_scores.max().item() > editor.config.gamma / 2
    edited.restore()
    assert torch.equal(after, _logits(model, tokenizer, others))  # exactly the unedited logits


def test_wise_routing_margins_are_the_published_hinges():
    edit, irrelevant = torch.tensor([12.0]), torch.tensor([3.0, 7.0])
    # irrelevant above alpha: (0 + 2) / 2; edit below beta: 8; gaps short of gamma: (1 + 5) / 2
    assert routing_margins(edit, irrelevant, alpha=5.0, beta=20.0, gamma=10.0).item() == 1 + 8 + 3
    assert routing_margins(torch.tensor([30.0]), torch.tensor([1.0]), alpha=5.0, beta=20.0, gamma=10.0).item() == 0


def test_ties_merge_trims_elects_signs_and_averages_the_agreeing_changes():
    base = torch.zeros(4)
    first, second = torch.tensor([3.0, -1.0, 0.5, 2.0]), torch.tensor([1.0, 2.0, -0.2, -3.0])
    # trimmed to half: [3, 0, 0, 2] and [0, 2, 0, -3]; signs of the sums: +, +, 0, -
    assert ties_merge(base, [first, second], density=0.5).tolist() == [3.0, 2.0, 0.0, -3.0]
    assert ties_merge(base + 1, [first + 1, first + 1], density=1.0).tolist() == (first + 1).tolist()


def test_wise_shards_train_in_their_own_masks_and_merge_with_ties(world, model):
    tokenizer, edits = world["tokenizer"], world["edits"]
    editor = _editor("wise", world, save_freq=1, merge_freq=3, n_iter=20)
    first = editor.edit(model, tokenizer, [edits[0]])
    adaptor = first.model.adaptor
    main = adaptor.main_weight.float()
    shard_one, mask_one = adaptor.memory.current.clone(), adaptor.memory.mask
    assert (shard_one != main).any() and not ((shard_one != main) & ~mask_one).any()
    second = editor.edit(first.model, tokenizer, [edits[2]])
    memory = adaptor.memory
    assert torch.equal(memory.shards[0], shard_one) and not torch.equal(memory.mask, mask_one)
    assert not ((memory.current != main) & ~memory.mask).any()  # the second shard started from the round's start
    merged = ties_merge(main, [shard_one, memory.current], density=0.53)
    assert torch.allclose(adaptor.difference, merged - main)  # what answers is the TIES merge of both shards
    third = editor.edit(second.model, tokenizer, [edits[1]])  # the round's third edit: merged
    memory = adaptor.memory
    assert memory.shards == [] and memory.round_edits == 0 and torch.equal(memory.current, memory.round_start)
    assert not torch.equal(memory.round_start, main)
    for call in (third, second, first):
        call.restore()
    assert _hooks(model) == 0


@pytest.mark.parametrize("method", ["grace", "wise"])
def test_generation_sees_the_memory_as_teacher_forcing_does(method, world, model):
    """Greedy decoding (prompt in the KV cache, one token a step) gets the logits a full forward over prompt +
    generated tokens gets when told where the prompt ends: WISE keeps each row's route for its decoding steps;
    GRACE replaces the prompt's last token only."""
    tokenizer, record = world["tokenizer"], world["edits"][0]
    wrapped = _editor(method, world).edit(model, tokenizer, [record]).model
    encoded = tokenizer([record.prompt], return_tensors="pt")
    with torch.no_grad():
        generated = wrapped.generate(**encoded, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True,
                                     pad_token_id=tokenizer.pad_token_id)
        end = encoded["input_ids"].shape[1] - 1
        forced = wrapped(input_ids=generated.sequences, attention_mask=torch.ones_like(generated.sequences),
                         prompt_end=torch.tensor([end])).logits[0, end:end + 4]
    assert generated.sequences[0, end + 1].item() == tokenizer(record.target, add_special_tokens=False)["input_ids"][0]
    assert torch.allclose(torch.cat(generated.logits), forced, atol=1e-4)


# ---------------------------------------------------------------------------------------------- SERAC

def test_serac_puts_the_edit_in_context_in_scope_and_nothing_out_of_scope(world, model):
    tokenizer, edits = world["tokenizer"], world["edits"]
    alice, bruno = edits[0], edits[2]  # "Alice lives in", "Bruno lives in"
    edited = _editor("serac", world).edit(model, tokenizer, [alice, bruno])
    assert edited.model is model
    for record in (alice, bruno):
        assert edited.context(record.prompt) == new_fact_context(record.prompt, record.target)
    assert edited.context("Alice lives in the city of") == new_fact_context(alice.prompt, alice.target)
    for prompt in ["Alice works at", "Bruno works at", "Carla lives in", "Jonas works at", "Hugo lives in"]:
        assert edited.context(prompt) == ""
    edited.restore()


# ---------------------------------------------------------------------------------------------- all three

METHODS = ["grace", "wise", "serac"]


@pytest.mark.parametrize("method", METHODS)
def test_restore_gives_back_identical_logits(method, world, model):
    tokenizer, records = world["tokenizer"], world["edits"][:2]
    texts = [f"{prompt} {answer}" for prompt, answer in world["facts"]]
    weights, logits = _weights(model), _logits(model, tokenizer, texts)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    edited = _editor(method, world).edit(model, tokenizer, records)
    assert all(_holds(method, edited, tokenizer, record) for record in records)
    edited.restore()
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())
    assert torch.equal(_logits(model, tokenizer, texts), logits)
    assert _hooks(model) == 0
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters()) and not model.training


@pytest.mark.parametrize("method", METHODS)
def test_sequential_calls_accumulate_and_restore_last_first(method, world, model):
    tokenizer, edits = world["tokenizer"], world["edits"]
    probes = [prompt for prompt, _ in world["facts"]]
    base = _logits(model, tokenizer, probes)
    editor = _editor(method, world)
    first = editor.edit(model, tokenizer, [edits[0]])
    after_first = _logits(first.model, tokenizer, probes)
    second = editor.edit(first.model, tokenizer, [edits[2]])
    assert second.model is first.model
    assert _holds(method, second, tokenizer, edits[0])  # the first edit stays
    assert _holds(method, second, tokenizer, edits[2])
    second.restore()  # only the second call's edit goes
    assert _holds(method, first, tokenizer, edits[0])
    assert not _holds(method, first, tokenizer, edits[2])
    assert torch.equal(_logits(first.model, tokenizer, probes), after_first)
    third = editor.edit(first.model, tokenizer, [edits[3]])  # the memory holds the first and third edits only
    size = {"grace": lambda: len(third.model.adaptor.codebook),
            "wise": lambda: len(third.model.adaptor.memory.records),
            "serac": lambda: editor.report["memory_edits"]}[method]()
    assert size == 2
    third.restore()
    first.restore()
    assert torch.equal(_logits(model, tokenizer, probes), base) and _hooks(model) == 0


@pytest.mark.parametrize("method", ["wise", "serac"])
def test_wise_and_serac_learn_only_from_the_learning_pool(method, world, model):
    """A training record whose prompt the evaluation scores for the edit (here the edit's locality and rephrase
    prompts) never reaches the irrelevant samples or the calibration prompts."""
    tokenizer, pool = world["tokenizer"], world["pool"]
    scored = ["Carla lives in", "Carla works at"]
    assert {r.prompt for r in pool} >= set(scored)
    edit = world["edits"][0]
    record = EditRecord(subject=edit.subject, prompt=edit.prompt, target_new=edit.target_new,
                        locality={"relation_specificity": [Probe(scored[0], ["Oslo"])]},
                        rephrase=[Probe(scored[1], ["Rome"])])
    if method == "wise":
        editor = WiseEditor(WiseEditorConfig(irrelevant_samples=100, n_iter=2), train_records=pool)
        editor.edit(model, tokenizer, [record]).restore()
        learned = editor.last_irrelevant
    else:
        editor = SeracEditor(train_records=pool)
        editor.edit(model, tokenizer, [record]).restore()
        learned = editor.last_negatives
    assert len(learned) >= 10
    assert not set(scored) & set(learned)


def test_wise_can_add_the_edited_subjects_other_relations_as_irrelevant_prompts(world, model):
    tokenizer, edit = world["tokenizer"], world["edits"][0]  # "Alice lives in"
    editor = WiseEditor(WiseEditorConfig(irrelevant_samples=1, subject_anchors=1, n_iter=2),
                        train_records=world["pool"])
    editor.edit(model, tokenizer, [edit]).restore()
    assert len(editor.last_irrelevant) == 2 and editor.last_irrelevant[1] == "Alice works at"


def _read_by_the_guard() -> bool:
    """Only t2edit/leakage.py may read what the evaluation scores: it does so to remove it from what editors see."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(os.path.join("t2edit", "leakage.py")):
            return True
        frame = frame.f_back
    return False


class LeakProofRecord(EditRecord):
    """An edit whose evaluation-only fields blow up when anything but the leakage guard reads them."""

    def __getattribute__(self, name):
        if name in ("locality", "portability", "rephrase") and not _read_by_the_guard():
            raise AssertionError(f"an editor read record.{name} (test leakage)")
        return super().__getattribute__(name)


@pytest.mark.parametrize("method", METHODS)
def test_editors_never_read_locality_portability_or_rephrase(method, world, model):
    probe = [Probe("a scored question", ["a scored answer"])]
    records = [LeakProofRecord(subject=r.subject, prompt=r.prompt, target_new=list(r.target_new),
                               locality={"relation_specificity": probe}, portability={"reasoning": probe},
                               rephrase=probe, index=r.index) for r in world["edits"][:2]]
    options = {"grace": {"n_iter": 2}, "wise": {"n_iter": 2}, "serac": {}}[method]
    edited = _editor(method, world, **options).edit(model, world["tokenizer"], records)
    edited.context(records[0].prompt)
    edited.restore()


@pytest.mark.parametrize("method", ["grace", "wise"])
def test_weight_memories_restore_exactly_on_gpt2(method, world):
    """GPT-2's MLP output is a Conv1D (its weight stored transposed)."""
    tokenizer, record = world["tokenizer"], world["edits"][0]
    model = build_tiny_model(tokenizer, arch="gpt2", hidden_size=32, num_layers=2)
    texts = [record.prompt, "Carla works at Acme"]
    weights, logits = _weights(model), _logits(model, tokenizer, texts)
    edited = _editor(method, world, n_iter=10).edit(model, tokenizer, [record])
    assert not torch.equal(_logits(edited.model, tokenizer, texts[:1]), logits[:1])
    edited.restore()
    assert all(torch.equal(t, weights[k]) for k, t in model.state_dict().items())
    assert torch.equal(_logits(model, tokenizer, texts), logits) and _hooks(model) == 0


def test_bad_inputs_get_one_clear_message(world, model):
    tokenizer, edits, pool = world["tokenizer"], world["edits"], world["pool"]
    with pytest.raises(EditInputError, match="eps"):
        GraceEditorConfig(eps=0)
    with pytest.raises(EditInputError, match="val_init"):
        GraceEditorConfig(val_init="hot")
    with pytest.raises(EditInputError, match="mask_ratio"):
        WiseEditorConfig(mask_ratio=0)
    with pytest.raises(EditInputError, match="save_freq <= merge_freq"):
        WiseEditorConfig(save_freq=10, merge_freq=5)
    with pytest.raises(EditInputError, match="router"):
        SeracEditorConfig(router="bm25")
    for editor_class in (WiseEditor, SeracEditor):
        with pytest.raises(EditInputError, match="train_records"):
            editor_class(train_records=[])
    with pytest.raises(EditInputError, match="no records"):
        GraceEditor().edit(model, tokenizer, [])
    with pytest.raises(EditInputError, match="layer=7 does not exist"):
        GraceEditor(GraceEditorConfig(layer=7)).edit(model, tokenizer, edits[:1])
    only_scored = [EditRecord(subject="Alice", prompt=edits[0].prompt, target_new=["Oslo"])]
    with pytest.raises(EditInputError, match="no irrelevant prompts"):
        WiseEditor(train_records=only_scored).edit(model, tokenizer, edits[:1])
    unnamed = EditRecord(subject="Alicia", prompt=edits[0].prompt, target_new=["Oslo"])
    with pytest.raises(EditInputError, match="subject inside its prompt"):
        SeracEditor(SeracEditorConfig(router="scope-split"), train_records=pool).edit(model, tokenizer, [unnamed])
    with pytest.raises(EditInputError, match="router_options"):
        SeracEditor(SeracEditorConfig(router_options={"no_such": 1}), train_records=pool).edit(
            model, tokenizer, edits[:1])
    assert _hooks(model) == 0  # a refused edit leaves nothing behind
