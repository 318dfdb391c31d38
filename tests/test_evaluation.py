"""Pins the metric definitions (EasyEdit's and the strict ones), the edit/score/restore protocol and the outputs."""
import copy
import json
import math

import pytest
import torch

from t2edit.data.records import EditRecord, Probe
from t2edit.editors.base import EditedModel, Editor, NoEdit
from t2edit.evaluation import (
    EditorRestoreError,
    EvaluationInputError,
    MethodResult,
    answer_argmax_tokens,
    argmax_agreement,
    evaluate_editor,
    exact_match_scores,
    fluency_scores,
    format_table,
    greedy_completions,
    ngram_entropy,
    same_answer,
    sample_texts,
    teacher_forced_accuracy,
    write_results,
)
from t2edit.evaluation import metrics as metrics_module
from t2edit.evaluation.runner import _knowedit_mean
from t2edit.text import new_fact_context
from t2edit.tiny import build_tiny_model, build_tiny_tokenizer, teach_facts

FACTS = [
    ("The capital of Foo is", "Bar"), ("The capital of Baz is", "Qux"), ("The spouse of Ann is", "Bob Smith"),
    ("The spouse of Eve is", "Carl"), ("The occupation of Ann is", "painter"), ("The occupation of Eve is", "baker"),
    ("The city of Zed is", "Bar"), ("The home of Lu is", "Qux"),
]
EXTRA_WORDS = ["New Fact: Prompt:", "a b c d e f g h i j k , ."]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer([f"{p} {a}" for p, a in FACTS] + EXTRA_WORDS)


@pytest.fixture(scope="module")
def taught(tokenizer):
    """A tiny Llama that answers every fact in FACTS (greedy and teacher-forced)."""
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2)
    teach_facts(model, tokenizer, [f"{p} {a}" for p, a in FACTS], steps=100, lr=3e-3,
                answer_starts=[len(p) + 1 for p, _ in FACTS])
    return model


def ids(tokenizer, words: str) -> list[int]:
    return tokenizer(words, add_special_tokens=False)["input_ids"]


class BigramLM(torch.nn.Module):
    """A fake LM whose logits we control: the prediction after token t is `table[t]` (else <unk>), regardless of
    position, so the expected argmax at every position is known exactly."""

    def __init__(self, tokenizer, table: dict[str, str]):
        super().__init__()
        next_id = torch.full((len(tokenizer),), tokenizer.unk_token_id, dtype=torch.long)
        for current, following in table.items():
            next_id[tokenizer.convert_tokens_to_ids("▁" + current)] = tokenizer.convert_tokens_to_ids("▁" + following)
        self.register_buffer("next_id", next_id)
        self.vocab_size = len(tokenizer)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):  # ignores logits_to_keep
        self.calls.append(input_ids.shape)
        return torch.nn.functional.one_hot(self.next_id[input_ids], self.vocab_size).float()


def make_record(i: int, locality=None, portability=None, target="baker") -> EditRecord:
    prompt, answer = FACTS[i]
    return EditRecord(subject=prompt.split()[-2], prompt=prompt, target_new=[target], ground_truth=[answer],
                      locality=locality or {}, portability=portability or {}, index=i)


def records_for_protocol() -> list[EditRecord]:
    return [
        make_record(0, locality={"relation_specificity": [Probe(*_fact(4))], "forgetfulness": [Probe(*_fact(5))]}),
        make_record(1, locality={"relation_specificity": [Probe(*_fact(2)), Probe(*_fact(3))]}),
        make_record(3, locality={"relation_specificity": [Probe(*_fact(6))]}),
    ]


def _fact(i):
    return FACTS[i][0], [FACTS[i][1]]


# ---------------------------------------------------------------------------------------------- EasyEdit metrics

def test_token_accuracy_counts_target_positions(tokenizer):
    # After "is" the fake says "Bob" (right), after "Bob" it says "Carl" (wrong: gold is "Smith").
    model = BigramLM(tokenizer, {"is": "Bob", "Bob": "Carl"})
    prompt = "The spouse of Ann is"
    assert teacher_forced_accuracy(model, tokenizer, [prompt], ["Bob Smith"]) == [0.5]
    assert math.isnan(metrics_module.token_accuracy([], []))  # no answer tokens: no score, not a crash
    assert answer_argmax_tokens(model, tokenizer, [prompt], ["Bob Smith"]) == [ids(tokenizer, "Bob Carl")]
    model = BigramLM(tokenizer, {"is": "Bob", "Bob": "Smith"})
    assert teacher_forced_accuracy(model, tokenizer, [prompt], ["Bob Smith"]) == [1.0]
    model = BigramLM(tokenizer, {"is": "Carl"})
    assert teacher_forced_accuracy(model, tokenizer, [prompt], ["Bob Smith"]) == [0.0]


def test_alignment_with_context_prefix(tokenizer):
    # The context ends with "Prompt:"; if the prompt length ignored the context, "Prompt:" -> "Bar" would be scored.
    model = BigramLM(tokenizer, {"is": "Bob", "Bob": "Smith", "Prompt:": "Bar", "Fact:": "Bar"})
    prompt = "The spouse of Ann is"
    context = new_fact_context(prompt, "Bob Smith")
    assert teacher_forced_accuracy(model, tokenizer, [prompt], ["Bob Smith"], contexts=[context]) == [1.0]
    assert answer_argmax_tokens(model, tokenizer, [prompt], ["Bob Smith"], contexts=[context]) == \
        [ids(tokenizer, "Bob Smith")]


def test_left_padding_batch_matches_per_example(tokenizer):
    # Bigram fake: checks the per-row slicing under padding exactly; the model ignores logits_to_keep.
    model = BigramLM(tokenizer, {"is": "Bar", "Bar": "Qux", "j": "k"})
    prompts = ["The capital of Foo is", "a b c d e f g h i j", "Ann is"]
    targets = ["Bar Qux", "k", "Bar Bar Qux"]
    batched = teacher_forced_accuracy(model, tokenizer, prompts, targets, batch_size=3)
    assert batched == [1.0, 1.0, pytest.approx(2 / 3)]  # "Bar" -> "Qux" misses the middle one
    assert batched == [teacher_forced_accuracy(model, tokenizer, [p], [t])[0] for p, t in zip(prompts, targets)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padded_batch_equals_unbatched_on_real_attention(tokenizer, arch):
    # Absolute positions (GPT-2) would shift under left padding without position_ids: this fails if they are dropped.
    model = build_tiny_model(tokenizer, arch=arch, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)  # sharper logits, so positions visibly change the argmax
    prompts = ["The capital of Foo is", "a b c d e f g h i j", "The spouse of Ann is", "Ann is"]
    targets = ["Bar", "k", "Bob Smith", "painter Carl Bob"]
    alone = [answer_argmax_tokens(model, tokenizer, [p], [t])[0] for p, t in zip(prompts, targets)]
    assert answer_argmax_tokens(model, tokenizer, prompts, targets, batch_size=4) == alone
    assert [len(a) for a in alone] == [1, 1, 2, 3]


def test_token_accuracy_matches_a_direct_computation(tokenizer):
    model = build_tiny_model(tokenizer, seed=2)
    prompt, target = "The occupation of Ann is", "painter Carl Bob"
    full = torch.tensor([tokenizer(prompt + " " + target)["input_ids"]])
    n_prompt = len(tokenizer(prompt)["input_ids"])
    with torch.no_grad():
        predicted = model(full).logits.argmax(-1)[0, n_prompt - 1:-1]
    expected = (predicted == full[0, n_prompt:]).float().mean().item()
    assert teacher_forced_accuracy(model, tokenizer, [prompt], [target]) == [pytest.approx(expected)]


def test_argmax_agreement_and_same_answer():
    assert argmax_agreement([1, 2], [1, 3]) == 0.5
    assert argmax_agreement([1, 2, 3], [1, 2]) == pytest.approx(2 / 3)  # an extra position counts as changed
    assert math.isnan(argmax_agreement([], []))
    assert same_answer("Paris, France", "Paris\nQuestion: ...") == 1.0
    assert same_answer("London", "Paris") == 0.0
    assert same_answer("", "") == 1.0 and same_answer("x", "") == 0.0


def test_ngram_entropy_on_known_strings():
    # 3 distinct bigrams (log2 3 bits), 2 distinct trigrams (1 bit); weights 2/3 and 4/3, averaged.
    assert ngram_entropy("a b c d") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("x x x x x x") == 0.0
    assert ngram_entropy("") == 0.0
    assert ngram_entropy("a, b") == pytest.approx((2 / 3 * 1.0) / 2)  # punctuation is a token of its own


def test_fluency_sampling_is_seeded_and_leaves_global_rng_alone(tokenizer, taught):
    prompts = ["The capital of Foo is", "The spouse of Eve is"]
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = sample_texts(taught, tokenizer, prompts, max_new_tokens=12, seed=7)
    assert torch.rand(1) == expected_next
    assert sample_texts(taught, tokenizer, prompts, max_new_tokens=12, seed=7) == first
    assert all(text.startswith(p) and len(text.split()) > len(p.split()) for text, p in zip(first, prompts))
    scores = fluency_scores(taught, tokenizer, prompts, max_new_tokens=12, seed=7)
    assert scores == [pytest.approx(ngram_entropy(t)) for t in first]


# ---------------------------------------------------------------------------------------------- strict metrics

def test_exact_match_with_aliases_and_punctuation(tokenizer, taught):
    prompts = ["The capital of Foo is", "The spouse of Ann is", "The capital of Foo is", "The spouse of Ann is"]
    aliases = [["bar."], ["Someone", "the Bob Smith!"], ["Qux"], ["Bob"]]
    assert greedy_completions(taught, tokenizer, prompts[:2], 5)[1].startswith("Bob Smith")
    # "Bob Smith" starts with alias "Bob" at a word boundary: answer_matches counts it.
    assert exact_match_scores(taught, tokenizer, prompts, aliases, batch_size=3) == [1.0, 1.0, 0.0, 1.0]


def test_greedy_budget_cuts_each_row(tokenizer, taught):
    out = greedy_completions(taught, tokenizer, ["The spouse of Ann is", "The capital of Foo is"], [1, 4])
    assert out[0] == "Bob" and out[1].startswith("Bar")


# ---------------------------------------------------------------------------------------------- the runner

class CountingEditor(Editor):
    name = "counting"

    def __init__(self):
        self.edit_calls: list[int] = []
        self.restores = 0
        self.context_prompts: list[str] = []

    def edit(self, model, tokenizer, records):
        self.edit_calls.append(len(records))

        def context(prompt):
            self.context_prompts.append(prompt)
            return ""

        def restore():
            self.restores += 1

        return EditedModel(model=model, context=context, restore=restore)


class PerturbingEditor(Editor):
    """Adds strong noise to every weight matrix; restores exactly unless `broken`."""

    def __init__(self, broken=False):
        self.name = "broken-perturber" if broken else "perturber"
        self.broken = broken

    def edit(self, model, tokenizer, records):
        saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.add_(torch.randn(p.shape, generator=generator) * p.std() * 4)

        def restore():
            if not self.broken:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if n in saved:
                            p.copy_(saved[n])

        return EditedModel(model=model, restore=restore)


def test_no_edit_keeps_locality_and_perturbation_breaks_it(tokenizer, taught):
    records = records_for_protocol()
    none = evaluate_editor(NoEdit(), taught, tokenizer, records, fluency=False, progress=False)
    assert none.locality == 1.0 and none.locality_em == 1.0
    assert none.edit_success == 0.0 and none.edit_success_em == 0.0  # counterfactual targets are not known yet
    model = copy.deepcopy(taught)
    perturbed = evaluate_editor(PerturbingEditor(), model, tokenizer, records, fluency=False, progress=False)
    assert perturbed.locality < 1.0 and perturbed.locality_em < 1.0
    # restore() worked: the weights are the unedited model's again, and so is every score
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), taught.parameters()))
    again = evaluate_editor(NoEdit(), model, tokenizer, records, fluency=False, progress=False)
    untimed = lambda result: {k: v for k, v in result.to_dict().items() if k not in ("seconds", "extra")}
    assert untimed(again) == untimed(none)


def test_restore_guard_names_the_broken_editor(tokenizer, taught):
    model = copy.deepcopy(taught)
    with pytest.raises(EditorRestoreError, match="broken-perturber"):
        evaluate_editor(PerturbingEditor(broken=True), model, tokenizer, records_for_protocol()[:1], fluency=False,
                        progress=False)


@pytest.mark.parametrize("mode, expected_calls", [("batch", [3]), ("single", [1, 1, 1])])
def test_batch_and_single_mode_edit_calls(tokenizer, taught, mode, expected_calls):
    editor = CountingEditor()
    records = records_for_protocol()
    result = evaluate_editor(editor, taught, tokenizer, records, mode=mode, fluency=False, progress=False)
    assert editor.edit_calls == expected_calls
    assert editor.restores == len(expected_calls)
    assert result.mode == mode and result.n_records == 3
    # every scored prompt went through the editor's context (teacher-forced and greedy: twice each)
    scored = {r.prompt for r in records} | {p for r in records for p in r.scored_prompts()}
    assert set(editor.context_prompts) == scored


class StackingEditor(Editor):
    """A sequential editor that records which model each call edited and the order of the restores."""

    name = "stacking"
    sequential = True

    def __init__(self):
        self.calls: list[tuple[int, torch.nn.Module]] = []  # (records in the call, the model it was given)
        self.restored: list[int] = []
        self.returned: list[torch.nn.Module] = []

    def edit(self, model, tokenizer, records):
        call = len(self.calls)
        self.calls.append((len(records), model))
        self.returned.append(copy.deepcopy(model))  # another module than it was given, as a wrapper is
        return EditedModel(model=self.returned[-1], restore=lambda: self.restored.append(call))


def test_sequential_mode_edits_chunk_after_chunk_and_restores_last_first(tokenizer, taught):
    editor = StackingEditor()
    records = records_for_protocol()
    result = evaluate_editor(editor, taught, tokenizer, records, mode="sequential", chunk_size=2, fluency=False,
                             progress=False)
    assert [n for n, _ in editor.calls] == [2, 1]
    assert editor.calls[0][1] is taught
    assert editor.calls[1][1] is editor.returned[0]  # the second call edits the model the first call returned
    assert editor.restored == [1, 0]
    assert result.mode == "sequential" and result.n_records == 3


def test_sequential_mode_accumulates_ft_edits_and_restores_exactly(tokenizer, taught):
    from t2edit.editors import FTEditor, FTEditorConfig

    model = copy.deepcopy(taught)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = records_for_protocol()
    editor = FTEditor(FTEditorConfig(lr=5e-2, steps=30, stop_loss=None))
    batch = evaluate_editor(editor, model, tokenizer, records[:1], mode="batch", fluency=False, progress=False)
    stream = evaluate_editor(editor, model, tokenizer, records, mode="sequential", fluency=False, progress=False)
    assert batch.edit_success == 1.0
    # the first record stays edited while the later two are made on top of it (scored after all three)
    assert stream.edit_success > 0.5
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_sequential_mode_refuses_an_editor_whose_edits_replace_each_other(tokenizer, taught):
    with pytest.raises(EvaluationInputError, match="counting.*does not edit sequentially"):
        evaluate_editor(CountingEditor(), taught, tokenizer, records_for_protocol(), mode="sequential",
                        fluency=False, progress=False)


def test_aggregation_is_knowedits_per_record_then_per_kind():
    per_record = [{"reasoning": [1.0, 0.0], "subject_aliasing": [1.0]}, {}, {"reasoning": [0.0]}]
    # record 0: mean(0.5, 1.0) = 0.75; record 1 has no key; record 2: 0.0 -> mean 0.375 (pooled would be 0.5)
    assert _knowedit_mean(per_record) == pytest.approx(0.375)
    assert _knowedit_mean([{}, {}]) is None
    assert _knowedit_mean([{"a": [math.nan]}, {"a": [1.0]}]) == 1.0  # unscorable probes are skipped


def test_evaluate_editor_aggregates_portability_like_knowedit(tokenizer, taught):
    p = lambda i, answer=None: Probe(FACTS[i][0], [answer or FACTS[i][1]])  # noqa: E731
    records = [
        make_record(0, portability={"reasoning": [p(2), p(3, "Qux")], "Subject_Aliasing": [p(4)]}),
        make_record(1),
        make_record(3, portability={"reasoning": [p(5, "Carl")]}),
    ]
    result = evaluate_editor(NoEdit(), taught, tokenizer, records, fluency=False, progress=False)
    acc = lambda i, answer=None: teacher_forced_accuracy(  # noqa: E731
        taught, tokenizer, [FACTS[i][0]], [answer or FACTS[i][1]])[0]
    record0 = ((acc(2) + acc(3, "Qux")) / 2 + acc(4)) / 2
    expected = (record0 + acc(5, "Carl")) / 2
    assert result.portability == pytest.approx(expected)
    assert result.portability_em == pytest.approx(((1 + 0) / 2 + 1) / 2 / 2)
    assert set(result.portability_by_kind) == {"reasoning", "subject_aliasing"}
    assert result.portability_by_kind["reasoning"]["n_records"] == 2
    assert result.portability_by_kind["subject_aliasing"]["portability_em"] == 1.0
    assert result.locality is None and result.locality_em is None


def test_empty_probes_are_skipped_and_counted(tokenizer, taught):
    records = [make_record(0, locality={"relation_specificity": [Probe("", ["Bar"]), Probe(*_fact(4))]},
                           portability={"reasoning": [Probe(FACTS[2][0], ["", " "])]})]
    result = evaluate_editor(NoEdit(), taught, tokenizer, records, fluency=False, progress=False)
    assert result.extra["n_probes_skipped"] == 2
    assert result.extra["n_probes_scored"] == 2  # the edit prompt and one locality probe
    assert result.portability is None and result.locality == 1.0


def test_pre_edit_references_are_cached_until_the_model_changes(tokenizer, taught, monkeypatch):
    model = copy.deepcopy(taught)
    calls = []
    original = metrics_module.answer_argmax_tokens

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return original(*args, **kwargs)

    monkeypatch.setattr(metrics_module, "answer_argmax_tokens", counting)
    records = records_for_protocol()
    evaluate_editor(NoEdit(), model, tokenizer, records, fluency=False, progress=False)
    evaluate_editor(CountingEditor(), model, tokenizer, records, fluency=False, progress=False)
    assert calls == [5]  # five distinct locality probes, computed once for both methods
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    evaluate_editor(NoEdit(), model, tokenizer, records, fluency=False, progress=False)
    assert calls == [5, 5]


def test_fluency_is_reported_on_easyedits_scale(tokenizer, taught):
    records = records_for_protocol()
    result = evaluate_editor(NoEdit(), taught, tokenizer, records, fluency=True, progress=False, seed=3,
                             fluency_max_new_tokens=20)
    bits = fluency_scores(taught, tokenizer, [r.prompt for r in records], max_new_tokens=20, seed=3)
    assert result.fluency == pytest.approx(100 * sum(bits) / len(bits))


def test_bad_inputs_give_clear_errors(tokenizer, taught):
    with pytest.raises(EvaluationInputError, match="mode"):
        evaluate_editor(NoEdit(), taught, tokenizer, records_for_protocol(), mode="stream")
    with pytest.raises(EvaluationInputError, match="no records"):
        evaluate_editor(NoEdit(), taught, tokenizer, [])
    with pytest.raises(EvaluationInputError, match="targets"):
        teacher_forced_accuracy(taught, tokenizer, ["a", "b"], ["c"])


# ---------------------------------------------------------------------------------------------- outputs

def _result(method, **overrides):
    values = dict(method=method, edit_success=0.875, locality=0.5, portability=None, fluency=551.234,
                  edit_success_em=1.0, locality_em=0.25, portability_em=None,
                  portability_by_kind={"reasoning": {"portability": 0.4, "portability_em": 0.0, "n_records": 2}},
                  n_records=8, seconds=12.34, mode="single", extra={"n_probes_skipped": 1})
    values.update(overrides)
    return MethodResult(**values)


def test_write_results_writes_three_files(tmp_path):
    results = [_result("svf"), _result("lora", edit_success=0.0, fluency=None)]
    paths = write_results(results, tmp_path / "out", title="Tiny world")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json", "results.md", "results.png"]
    data = json.loads(paths["json"].read_text())
    assert [m["method"] for m in data["methods"]] == ["svf", "lora"]
    assert set(data["methods"][0]) == set(MethodResult.__dataclass_fields__)
    assert data["methods"][0]["portability"] is None and data["methods"][0]["edit_success"] == 0.875
    assert "per record" in data["aggregation"]
    md = paths["md"].read_text()
    header = "| Method | Edit Succ. | Locality | Portability | Fluency | ES (EM) | Loc (EM) | Port (EM) | n | seconds |"
    assert header.replace(" ", "") in md.replace(" ", "")
    svf_row = next(line for line in md.splitlines() if line.startswith("| svf"))
    assert [c.strip() for c in svf_row.strip("|").split("|")] == \
        ["svf", "87.5", "50.0", "–", "551.2", "100.0", "25.0", "–", "8", "12.3"]
    assert "Aggregation:" in md and "reasoning" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_leaves_out_metrics_no_method_has_and_takes_a_dozen_methods(tmp_path):
    from t2edit.evaluation.report import plotted_metrics

    without_fluency = [_result(f"method-{m}", fluency=None) for m in range(12)]
    fields = [field for _, field, _ in plotted_metrics(without_fluency)]
    assert "fluency" not in fields and "portability" not in fields  # no method has them: no empty panel
    assert fields == ["edit_success", "locality", "edit_success_em", "locality_em"]
    assert "fluency" in [field for _, field, _ in plotted_metrics(without_fluency + [_result("svf")])]
    png = write_results(without_fluency, tmp_path, title="twelve methods")["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_format_table_lists_every_method():
    table = format_table([_result("a"), _result("b")])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| Method") and lines[3].startswith("| b")
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_single_and_batch_mode_agree_when_nothing_is_edited(tokenizer, taught):
    records = records_for_protocol()
    records[0].portability = {"reasoning": [Probe(*_fact(2)), Probe(FACTS[3][0], ["Qux"])]}
    batch = evaluate_editor(NoEdit(), taught, tokenizer, records, fluency=False, progress=False, batch_size=4)
    single = evaluate_editor(NoEdit(), taught, tokenizer, records, mode="single", fluency=False, progress=False)
    for metric in ("edit_success", "locality", "portability", "edit_success_em", "locality_em", "portability_em"):
        assert getattr(batch, metric) == pytest.approx(getattr(single, metric)), metric
    assert batch.portability == 0.5


def _png_width(path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big")  # IHDR width


def test_plot_sequential_draws_one_panel_per_router_and_leaves_only_the_png(tmp_path):
    from t2edit.evaluation.composition import plot_sequential

    row = dict(edit_success=0.5, locality=None, portability=0.25, edit_success_em=0.5, portability_em=0.0)
    one = [{"router": "embedding", "edits": n, **row} for n in (1, 2, 4)]
    plot_sequential(one, tmp_path / "one.png")
    plot_sequential(one + [{**r, "router": "scope"} for r in one], tmp_path / "two.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "two.png"]
    assert _png_width(tmp_path / "two.png") > 1.8 * _png_width(tmp_path / "one.png")


# ---------------------------------------------------------------------------------------------- plumbing pinned
# Each test here kills survivors of the mutmut run (README, Contributing): what the model is fed and how.

from types import SimpleNamespace  # noqa: E402


class RecordingLM(torch.nn.Module):
    """Records every keyword a metric passes to forward / generate; logits are all zero (argmax = token 0)."""

    def __init__(self, vocab_size, routes_on_prompt=False, new_tokens=(5, 6, 7)):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.routes_on_prompt, self.new_tokens = vocab_size, routes_on_prompt, list(new_tokens)
        self.forward_calls, self.generate_calls = [], []
        self.generation_config = SimpleNamespace(eos_token_id=None)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=None, prompt_end=None):
        self.forward_calls.append(dict(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, logits_to_keep=logits_to_keep,
                                       prompt_end=prompt_end))
        return torch.zeros(*input_ids.shape, self.vocab_size)

    def generate(self, input_ids, attention_mask=None, generation_config=None):
        self.generate_calls.append(dict(input_ids=input_ids, attention_mask=attention_mask,
                                        config=generation_config))
        n = generation_config.max_new_tokens
        new = torch.tensor(self.new_tokens * n)[:n].repeat(input_ids.shape[0], 1)
        return torch.cat([input_ids, new], dim=1)


def test_forward_gets_positions_from_the_mask_kept_logits_and_prompt_ends(tokenizer):
    model = RecordingLM(len(tokenizer), routes_on_prompt=True)
    prompts, targets = ["Ann is", "The capital of Foo is"], ["Bob", "Bar"]
    metrics_module.teacher_forced_predictions(model, tokenizer, prompts, targets, batch_size=2)
    call = model.forward_calls[0]
    mask = call["attention_mask"]
    assert torch.equal(call["position_ids"], (mask.cumsum(-1) - 1).clamp(min=0))
    for row in range(2):
        real = int(mask[row].sum())
        assert call["position_ids"][row, -real:].tolist() == list(range(real))
    width = call["input_ids"].shape[1]
    items = [(len(tokenizer(p + " " + t)["input_ids"]), len(tokenizer(p)["input_ids"]))
             for p, t in zip(prompts, targets)]
    order = sorted(range(2), key=lambda i: items[i][0])
    starts = [max(1, width - items[i][0] + items[i][1]) for i in order]
    assert call["prompt_end"].tolist() == [s - 1 for s in starts]
    assert call["logits_to_keep"] == width - min(starts) + 1
    plain = RecordingLM(len(tokenizer))
    metrics_module.teacher_forced_predictions(plain, tokenizer, prompts, targets)
    assert plain.forward_calls[0]["prompt_end"] is None  # only a model that routes on the prompt is told


def test_forward_accepts_and_left_pad_and_device_helpers():
    accepts = metrics_module._forward_accepts
    assert accepts(SimpleNamespace(forward=lambda input_ids, position_ids=None: 0), "position_ids")
    assert not accepts(SimpleNamespace(forward=lambda input_ids, attention_mask=None: 0), "position_ids")
    assert accepts(SimpleNamespace(forward=lambda input_ids, **kw: 0), "logits_to_keep")
    from t2edit.batching import left_pad

    ids_, mask = left_pad([[7, 8, 9], [4], []], pad_id=0, device="cpu")
    assert ids_.dtype == mask.dtype == torch.long
    assert ids_.tolist() == [[7, 8, 9], [0, 0, 4], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert metrics_module._device(torch.nn.Module()) == torch.device("cpu")


def test_pad_and_stop_ids_fall_back_and_merge():
    pad_id = metrics_module._pad_id
    assert pad_id(SimpleNamespace(pad_token_id=3, eos_token_id=5)) == 3
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=5)) == 5
    with pytest.raises(EvaluationInputError, match="neither a pad token nor an EOS token; set tokenizer.pad_token"):
        pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))
    stop = metrics_module._stop_ids
    tok = SimpleNamespace(eos_token_id=2)
    with_config = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[9, 2]))
    assert stop(with_config, tok) == [2, 9]
    assert stop(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=4)), tok) == [2, 4]
    assert stop(SimpleNamespace(), tok) == [2]
    assert stop(with_config, SimpleNamespace(eos_token_id=None)) == [2, 9]


def test_batches_take_batch_size_one_and_refuse_zero():
    assert list(metrics_module._batches([3, 1, 2], 1, "x", False)) == [[3], [1], [2]]
    assert list(metrics_module._batches([3, 1, 2, 0], 3, "x", False)) == [[3, 1, 2], [0]]
    with pytest.raises(EvaluationInputError, match="batch_size must be at least 1, got 0"):
        list(metrics_module._batches([1], 0, "x", False))


def test_generation_settings_are_explicit_and_complete(tokenizer):
    model = RecordingLM(len(tokenizer))
    model.generation_config = SimpleNamespace(eos_token_id=[tokenizer.eos_token_id, 6])
    out = greedy_completions(model, tokenizer, ["Ann is", "The capital of Foo is"], [2, 3], batch_size=2)
    call = model.generate_calls[0]
    config = call["config"]
    assert call["attention_mask"] is not None and call["attention_mask"][0, 0] == 0  # the short row is padded
    assert (config.num_beams, config.top_p, config.temperature, config.repetition_penalty,
            config.no_repeat_ngram_size, config.do_sample) == (1, 1.0, 1.0, 1.0, 0, False)
    assert config.pad_token_id == tokenizer.pad_token_id and config.max_new_tokens == 3
    assert sorted(config.eos_token_id) == sorted({tokenizer.eos_token_id, 6})
    # New tokens 5, 6, 7: token 6 is a configured stop id, so each row ends before it.
    assert out == [tokenizer.decode([5])] * 2
    model.generate_calls.clear()
    texts = sample_texts(model, tokenizer, ["Ann is"], contexts=["Eve is. "], max_new_tokens=4, top_k=3)
    config = model.generate_calls[0]["config"]
    assert (config.do_sample, config.top_k, config.max_new_tokens, config.min_new_tokens) == (True, 3, 4, 0)
    assert (config.typical_p, config.min_p, config.pad_token_id) == (1.0, 0.0, tokenizer.pad_token_id)
    assert config.eos_token_id in ([], None) and model.generate_calls[0]["attention_mask"] is not None
    fed = model.generate_calls[0]["input_ids"][0].tolist()
    assert fed[-len(tokenizer("Eve is. Ann is")["input_ids"]):] == tokenizer("Eve is. Ann is")["input_ids"]
    assert texts[0].startswith("Ann is") and "Eve" not in texts[0]  # the context is fed, not scored


def test_contexts_reach_the_model_in_every_metric(tokenizer, monkeypatch):
    model = RecordingLM(len(tokenizer))
    context = "Eve is. "
    with_context = tokenizer(context + "Ann is Bob")["input_ids"]
    teacher_forced_accuracy(model, tokenizer, ["Ann is"], ["Bob"], contexts=[context])
    assert model.forward_calls[-1]["input_ids"][0].tolist()[-len(with_context):] == with_context
    answer_argmax_tokens(model, tokenizer, ["Ann is"], ["Bob"], contexts=[context])
    assert model.forward_calls[-1]["input_ids"][0].tolist()[-len(with_context):] == with_context
    with pytest.raises(EvaluationInputError, match="2 max_new_tokens"):
        greedy_completions(model, tokenizer, ["a"], [1, 2])
    seen = {}

    def fake_greedy(model_, tokenizer_, inputs, budgets, batch_size, progress):
        seen.update(inputs=inputs, budgets=budgets)
        return ["Bob"] * len(inputs)

    monkeypatch.setattr(metrics_module, "greedy_completions", fake_greedy)
    assert exact_match_scores(model, tokenizer, ["Ann is"], [["Bob"]], contexts=[context]) == [1.0]
    assert seen["inputs"] == [context + "Ann is"]
    with pytest.raises(EvaluationInputError, match="alias lists"):
        exact_match_scores(model, tokenizer, ["a", "b"], [["c"]])
    with pytest.raises(EvaluationInputError, match="contexts"):
        exact_match_scores(model, tokenizer, ["a"], [["c"]], contexts=["x", "y"])
    with pytest.raises(EvaluationInputError, match="1 contexts"):
        sample_texts(model, tokenizer, ["a", "b"], contexts=["x"])


def test_generate_without_generate_names_the_model():
    with pytest.raises(EvaluationInputError, match="Module has no .generate\\(\\).*Hugging Face generative model"):
        metrics_module._generate(torch.nn.Module(), torch.zeros(1, 1, dtype=torch.long),
                                 torch.ones(1, 1, dtype=torch.long), 0)


# The sampling defaults are EasyEdit's fluency protocol (100 tokens, top-5, a fixed seed); a changed default would
# move every fluency figure in the README without a single argument changing.

def test_sampling_and_fluency_defaults_are_the_documented_ones(tokenizer):
    recorder = RecordingLM(len(tokenizer))
    sample_texts(recorder, tokenizer, ["Ann is"])
    fluency_scores(recorder, tokenizer, ["Ann is"])
    for call in recorder.generate_calls:
        assert (call["config"].max_new_tokens, call["config"].top_k) == (100, 5)
    model = build_tiny_model(tokenizer, seed=3)
    prompts = ["Ann is", "The capital of Foo is"]
    explicit = sample_texts(model, tokenizer, prompts, max_new_tokens=100, top_k=5, seed=0)
    assert sample_texts(model, tokenizer, prompts) == explicit
    assert sample_texts(model, tokenizer, prompts, seed=1) != explicit  # the seed does pick the sample
    assert fluency_scores(model, tokenizer, prompts) == [metrics_module.ngram_entropy(t) for t in explicit]


def test_fluency_samples_with_the_given_contexts_and_top_k(tokenizer):
    recorder = RecordingLM(len(tokenizer))
    fluency_scores(recorder, tokenizer, ["Ann is"], contexts=["Eve is. "], top_k=3, max_new_tokens=4)
    call = recorder.generate_calls[0]
    fed = tokenizer("Eve is. Ann is")["input_ids"]
    assert call["input_ids"][0].tolist()[-len(fed):] == fed
    assert (call["config"].top_k, call["config"].max_new_tokens) == (3, 4)


def test_sampling_never_stops_at_the_models_eos(tokenizer):
    """EasyEdit samples exactly max_new_tokens tokens: a model whose EOS is its likeliest next token still gives
    the full-length text (the sampler must not fall back to the checkpoint's EOS)."""
    model = build_tiny_model(tokenizer, seed=4)
    model.generation_config.eos_token_id = None
    free = sample_texts(model, tokenizer, ["Ann is"], max_new_tokens=8, top_k=1)
    with torch.no_grad():
        first = int(model(**tokenizer(["Ann is"], return_tensors="pt")).logits[0, -1].argmax())
    model.generation_config.eos_token_id = first
    assert sample_texts(model, tokenizer, ["Ann is"], max_new_tokens=8, top_k=1) == free
    assert len(ids(tokenizer, free[0])) > len(ids(tokenizer, "Ann is")) + 4  # (special tokens are decoded away)


def test_sampled_text_joins_blank_lines_and_exact_match_feeds_the_bare_prompt(tokenizer, monkeypatch):
    recorder = RecordingLM(len(tokenizer))
    monkeypatch.setattr(tokenizer, "decode", lambda token_ids, skip_special_tokens: "Ann is\n\nBob\n\nCarl\nEve")
    assert sample_texts(recorder, tokenizer, ["Ann is"], max_new_tokens=2) == ["Ann is Bob Carl\nEve"]
    monkeypatch.undo()
    seen = {}

    def fake_greedy(model_, tokenizer_, inputs, budgets, batch_size, progress):
        seen["inputs"] = inputs
        return ["Bob"] * len(inputs)

    monkeypatch.setattr(metrics_module, "greedy_completions", fake_greedy)
    assert exact_match_scores(recorder, tokenizer, ["Ann is", "Eve is"], [["Bob"], ["Carl"]]) == [1.0, 0.0]
    assert seen["inputs"] == ["Ann is", "Eve is"]  # no context: the prompt alone, nothing prefixed


def test_greedy_answers_drop_special_tokens_that_are_not_stop_ids(tokenizer):
    """A chat model may emit a special token (BOS, a role marker) inside its answer; it is not text."""
    bos = tokenizer.bos_token_id
    model = RecordingLM(len(tokenizer), new_tokens=(bos, *ids(tokenizer, "Bob")))
    out = greedy_completions(model, tokenizer, ["Ann is"], 2)
    assert out[0].strip() == "Bob" and tokenizer.bos_token not in out[0]


def test_teacher_forcing_scores_every_target_token_after_an_empty_prompt(tokenizer):
    """An empty prompt leaves only BOS before the target: the first target token is still predicted and scored."""
    model = BigramLM(tokenizer, {"Bob": "Smith"})
    (predicted, gold), = metrics_module.teacher_forced_predictions(model, tokenizer, [""], ["Bob Smith"])
    assert len(predicted) == len(gold) == len(ids(tokenizer, "Bob Smith"))
