"""The scope-split router: subject and relation calibrated apart, on the tiny world of test_routers."""
import pytest

from t2edit.routing import ScopeRouter, SplitScopeRouter, encode, get_router
from tests.test_routers import EDITS, NEGATIVES, _route, adaptive_factory  # noqa: F401  (the fixture)

ALIAS, TWO_HOP = "The spouse of Piet L. Zelmere is", "The occupation of the spouse of Piet Zelmere is"
OTHER_RELATION, OTHER_SUBJECT = "The occupation of Piet Zelmere is", "The spouse of Emeric Halholt is"
# A negative that restates edit 0's own question (KnowEdit repeats subject-relation pairs across records).
RESTATING = NEGATIVES + ["The spouse of Piet Zelmere is"]
FORGETFULNESS = "The spouse of Piet Zelmere which is not Orla Jorwick is"  # the tiny tokenizer splits on spaces only


def test_scope_split_routes_an_alias_and_a_two_hop_question_but_not_another_relation_or_subject(adaptive_factory):
    make, tokenizer = adaptive_factory
    model = make(get_router("scope-split"))
    weights = _route(model, tokenizer, [ALIAS, TWO_HOP, OTHER_RELATION, OTHER_SUBJECT])
    assert weights[:, 0].tolist() == [1, 1, 0, 0], (weights, model.router.threshold)
    assert (weights[2:, -1] == 1).all()


def test_a_negative_restating_the_edit_caps_scope_but_not_scope_split(adaptive_factory):
    """One min-threshold goes to its cap (then only prompts holding every edit token route); the split thresholds
    drop the restating negative, stay below the cap, and still route the two-hop question while leaving the
    edited subject's other relation and the edited relation's other subject alone."""
    make, tokenizer = adaptive_factory
    from t2edit.routing import AdaptiveModel

    base = make(get_router("uniform"))
    capped = AdaptiveModel(base.svf_model, base.experts, ScopeRouter(), tokenizer, negatives=RESTATING)
    split = AdaptiveModel(base.svf_model, base.experts, SplitScopeRouter(), tokenizer, negatives=RESTATING)
    assert capped.router.threshold == pytest.approx(1 - 1e-4)
    assert split.router.dropped == 1
    assert max(split.router.subject_threshold.max().item(), split.router.relation_threshold) < 0.999
    weights = _route(split, tokenizer, [ALIAS, TWO_HOP, OTHER_RELATION, OTHER_SUBJECT])
    assert weights[:, 0].tolist() == [1, 1, 0, 0], (weights, split.router.threshold)


def test_scope_split_leaves_a_prompt_holding_the_new_answer_alone_unless_told_not_to(adaptive_factory):
    make, tokenizer = adaptive_factory
    vetoing = make(get_router("scope-split"))
    assert _route(vetoing, tokenizer, [FORGETFULNESS, EDITS[0].prompt])[:, 0].tolist() == [0, 1]
    plain = make(get_router("scope-split", target_veto=None))
    assert _route(plain, tokenizer, [FORGETFULNESS])[0, 0] == 1


def test_a_negative_naming_the_edited_subject_in_other_tokens_does_not_raise_its_bar(adaptive_factory):
    """"Zelmere," is another token than "Zelmere" (as BPE splits a name at a prompt's start otherwise): the negative
    still names edit 0's subject, so it calibrates the relation, not the subject."""
    make, tokenizer = adaptive_factory
    from t2edit.routing import AdaptiveModel

    base = make(get_router("uniform"))
    glued = "The capital of Piet Zelmere, is"
    assert "▁Zelmere," in tokenizer.tokenize(glued)
    thresholds = [AdaptiveModel(base.svf_model, base.experts, SplitScopeRouter(subject_floor=0.0), tokenizer,
                                negatives=negatives).router.subject_threshold[0].item()
                  for negatives in (NEGATIVES, NEGATIVES + [glued])]
    assert thresholds[1] == pytest.approx(thresholds[0], abs=0.02)  # the negatives also move the IDF weights a little


def test_without_look_alike_negatives_a_shared_first_name_is_not_enough(adaptive_factory):
    """No negative names another Piet, so the calibrated bar for edit 0 is low; the floor still asks for more of
    the subject than one of its two names, while an alias that keeps both still routes."""
    make, tokenizer = adaptive_factory
    prompts = ["The spouse of Piet Halholt is", ALIAS]
    assert _route(make(get_router("scope-split", subject_floor=0.0)), tokenizer, prompts)[:, 0].tolist() == [1, 1]
    floored = make(get_router("scope-split"))
    assert floored.router.subject_threshold.min() > floored.router.subject_floor
    assert _route(floored, tokenizer, prompts)[:, 0].tolist() == [0, 1]


def test_scope_split_leaves_the_new_answer_alone_when_the_tokenizer_glues_punctuation_to_it(adaptive_factory):
    """The tiny tokenizer makes "Jorwick," a token of its own, so the target's tokens are not all in the prompt;
    the answer's words are, and the prompt asks about the answer, not the fact."""
    make, tokenizer = adaptive_factory
    glued = "The spouse of Piet Zelmere which is not Orla Jorwick, is"
    assert "▁Jorwick," in tokenizer.tokenize(glued)
    assert _route(make(get_router("scope-split", target_veto=None)), tokenizer, [glued])[0, 0] == 1
    assert _route(make(get_router("scope-split")), tokenizer, [glued, EDITS[0].prompt])[:, 0].tolist() == [0, 1]


def test_a_prompt_about_one_edits_new_answer_goes_to_no_expert_even_when_that_answer_is_another_edit(
        adaptive_factory):
    """Edit 0 makes Orla Jorwick Piet Zelmere's spouse; here edit 1 is about Orla Jorwick's own spouse. "The spouse
    of Piet Zelmere which is not Orla Jorwick is" asks about edit 0's answer: edit 1's subject and relation are in
    it too, and it still goes to no expert."""
    make, tokenizer = adaptive_factory
    from t2edit.routing import AdaptiveModel

    base = make(get_router("uniform"))
    base.experts[1].info.edits = [{"prompt": "The spouse of Orla Jorwick is", "subject": "Orla Jorwick",
                                      "target": "sculptor"}]
    model = AdaptiveModel(base.svf_model, base.experts, SplitScopeRouter(), tokenizer, negatives=NEGATIVES)
    router, prompt = model.router, FORGETFULNESS
    batch = encode(model, tokenizer, [prompt])[0]
    subject, relation = router._parts(batch)
    assert subject[0, 1] >= router.subject_threshold[1] and relation[0, 1] >= router.relation_threshold
    assert _route(model, tokenizer, [prompt, "The spouse of Orla Jorwick is"]).argmax(-1).tolist() == [2, 1]


def test_scope_split_target_veto_needs_targets(adaptive_factory):
    make, tokenizer = adaptive_factory
    model = make(get_router("uniform"))
    for expert in model.experts:
        for edit in expert.info.edits:
            edit["target"] = ""
    with pytest.raises(ValueError, match="target"):
        SplitScopeRouter().fit(model, tokenizer, NEGATIVES)
    assert SplitScopeRouter(target_veto=None).fit(model, tokenizer, NEGATIVES).target_keys is None


def test_each_edits_subject_is_calibrated_on_its_own_look_alikes(adaptive_factory):
    """A negative about another "Piet" raises edit 0's subject bar (so that Piet no longer routes) and leaves edit
    1's alone (its alias with an added initial still routes)."""
    make, tokenizer = adaptive_factory
    from t2edit.routing import AdaptiveModel

    base = make(get_router("uniform"))
    look_alike = "The capital of Piet Halholt is"  # shares "Piet" with edit 0's subject, nothing with edit 1's
    # subject_floor=0: the negatives alone set the bar (the floor is tested below)
    plain = AdaptiveModel(base.svf_model, base.experts, SplitScopeRouter(subject_floor=0.0), tokenizer,
                          negatives=NEGATIVES)
    other_piet = "The spouse of Piet Halholt is"
    assert _route(plain, tokenizer, [other_piet])[0, 0] == 1  # what the look-alike negative is there to stop
    split = AdaptiveModel(base.svf_model, base.experts, SplitScopeRouter(subject_floor=0.0), tokenizer,
                          negatives=NEGATIVES + [look_alike])
    before, after = plain.router.subject_threshold.tolist(), split.router.subject_threshold.tolist()
    assert after[0] > before[0] and after[1] == pytest.approx(before[1])
    weights = _route(split, tokenizer, [other_piet, "The occupation of Vesna L. Corwick is", EDITS[0].prompt])
    assert weights.argmax(-1).tolist() == [2, 1, 0], (weights, after)


def test_thresholds_past_torch_quantiles_input_limit_use_the_highest_score():
    """KnowEdit-sized runs (thousands of negatives × hundreds of edits) pass 2**24 scores; a NaN column (an edit no
    negative calibrates) takes the overall value."""
    import torch

    scores = torch.rand(1 << 13, 1 << 11) * 0.5
    scores[0, 0], scores[:, 1] = 0.9, float("nan")
    router = SplitScopeRouter()
    bars = router._above(scores, 0.1)
    assert bars[0].item() == pytest.approx(0.9 + 0.1 * 0.1)
    assert bars[1].item() == pytest.approx(bars[0].item())
    assert bars[2].item() == pytest.approx(scores[:, 2].max().item() * 0.9 + 0.1)
