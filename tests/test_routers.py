"""Routers: one interface, each tested on what it must route and what it must leave alone."""
import sys

import pytest
import torch

from t2edit.routing import AdaptiveModel
from t2edit.experts import Expert
from t2edit.routing import CEMRouter, annotate_expert, get_router
from t2edit.routing import calibrate_own_router
from t2edit.data.records import EditRecord
from t2edit.svf import SVFConfig, apply_svf
from t2edit.tiny import build_tiny_model, build_tiny_tokenizer

EDITS = [EditRecord(subject="Piet Zelmere", prompt="The spouse of Piet Zelmere is", target_new=["Orla Jorwick"]),
         EditRecord(subject="Vesna Corwick", prompt="The occupation of Vesna Corwick is", target_new=["sculptor"])]
NEGATIVES = ["The occupation of Piet Zelmere is", "The spouse of Vesna Corwick is", "The spouse of Emeric Halholt is",
             "The occupation of Emeric Halholt is", "The capital of Quorland is", "The employer of Orla Jorwick is"]
TEXTS = [r.prompt + " " + r.target for r in EDITS] + [n + " x" for n in NEGATIVES] + [
    "The spouse of Piet L. Zelmere is", "The occupation of the spouse of Piet Zelmere is architect",
    "Question: \nThe question is about: none of these , sculptor painter architect",
    "The spouse of Piet Zelmere which is not Orla Jorwick is", "The spouse of Piet Zelmere which is not Orla Jorwick, is",
    "The capital of Piet Zelmere, is"]


@pytest.fixture
def adaptive_factory():
    tokenizer = build_tiny_tokenizer(TEXTS)
    tokenizer.padding_side = "left"
    svf = apply_svf(build_tiny_model(tokenizer, hidden_size=32), SVFConfig(mask="identity", z_init=1.0),
                    progress=False).eval()
    experts = []
    for seed, record in enumerate(EDITS):
        torch.manual_seed(seed)
        svf.set_z({k: 1 + 0.5 * torch.randn_like(v) for k, v in svf.get_z().items()})
        router = calibrate_own_router(svf, tokenizer, [record.prompt], NEGATIVES)
        expert = Expert.from_model(svf, router=router, info={"name": f"e{seed}"})
        annotate_expert(expert, [record])
        experts.append(expert)
        svf.reset_z()

    def make(router, **fit):
        return AdaptiveModel(svf, experts, router, tokenizer, negatives=NEGATIVES, **fit)
    return make, tokenizer


def _route(model, tokenizer, prompts):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    return model.route(batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("name", ["embedding", "scope", "scope-split", "classifier"])
def test_automatic_routers_send_edit_prompts_to_their_expert_and_negatives_nowhere(adaptive_factory, name):
    make, tokenizer = adaptive_factory
    model = make(get_router(name))
    weights = _route(model, tokenizer, [EDITS[1].prompt, EDITS[0].prompt] + NEGATIVES)
    assert weights[:2].argmax(-1).tolist() == [1, 0]
    assert (weights[2:, -1] == 1).all(), weights[2:]
    assert torch.allclose(weights.sum(-1), torch.ones(len(weights)))


@pytest.mark.parametrize("name", ["embedding", "scope", "scope-split", "classifier"])
def test_fits_sharing_a_pass1_cache_run_the_negatives_once_and_keep_only_the_layers_they_read(adaptive_factory,
                                                                                               name):
    make, tokenizer = adaptive_factory
    cache = {}
    make(get_router(name), pass1_cache=cache)
    entries = dict(cache)
    cached = make(get_router(name), pass1_cache=cache)
    fresh = make(get_router(name))
    assert len(entries) == 1 and cache == entries  # the second fit found the negatives' pass 1 there
    kept = [i for i, h in enumerate(next(iter(cache.values()))[0].hidden_states) if h is not None]
    total = len(next(iter(cache.values()))[0].hidden_states)
    assert 1 <= len(kept) <= 2 < total, kept
    prompts = [r.prompt for r in EDITS] + NEGATIVES + TEXTS
    assert torch.equal(_route(cached, tokenizer, prompts), _route(fresh, tokenizer, prompts))


@pytest.mark.parametrize("shared", [False, True])
def test_the_hybrid_router_runs_the_negatives_through_pass_1_once_for_both_halves(adaptive_factory, monkeypatch,
                                                                                  shared):
    make, tokenizer = adaptive_factory
    negatives_ids = tokenizer(NEGATIVES, return_tensors="pt", padding=True)["input_ids"]
    runs = []
    real_pass1 = AdaptiveModel.pass1

    def counting_pass1(self, input_ids, *args, **kwargs):
        if input_ids.shape == negatives_ids.shape and torch.equal(input_ids.cpu(), negatives_ids):
            runs.append(1)
        return real_pass1(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(AdaptiveModel, "pass1", counting_pass1)
    model = make(get_router("hybrid"), **({"pass1_cache": {}} if shared else {}))
    assert len(runs) == 1  # once, not once per half
    monkeypatch.setattr(AdaptiveModel, "pass1", real_pass1)
    scope, embedding = make(get_router("scope")), make(get_router("embedding"))  # each half fitted on its own
    prompts = [r.prompt for r in EDITS] + NEGATIVES + TEXTS
    by_scope, by_embedding = _route(scope, tokenizer, prompts), _route(embedding, tokenizer, prompts)
    expected = torch.where(by_scope[:, -1:] == 1, by_embedding, by_scope)
    assert torch.equal(_route(model, tokenizer, prompts), expected)


def test_scope_router_recognises_an_alias_and_a_two_hop_question_but_not_another_relation(adaptive_factory):
    make, tokenizer = adaptive_factory
    model = make(get_router("scope"))
    prompts = ["The spouse of Piet L. Zelmere is", "The occupation of the spouse of Piet Zelmere is",
               "The occupation of Piet Zelmere is", "The spouse of Emeric Halholt is"]
    weights = _route(model, tokenizer, prompts)
    assert weights[:, 0].tolist() == [1, 1, 0, 0], (weights, model.router.threshold, model.router.last_scores)


def test_scope_router_needs_subjects(adaptive_factory):
    make, _ = adaptive_factory
    model = make(get_router("uniform"))
    for expert in model.experts:
        expert.info.edits = [{"prompt": "The spouse of Piet Zelmere is"}]  # no subject
    with pytest.raises(ValueError, match="subject"):
        get_router("scope").fit(model, model.tokenizer, NEGATIVES)


def test_cem_finds_weights_at_least_as_good_as_its_starting_mixture(adaptive_factory):
    make, tokenizer = adaptive_factory
    model = make(get_router("uniform"))
    router = CEMRouter(shots=2, population=8, elites=2, iterations=3).fit(model, tokenizer, NEGATIVES)
    examples = [(r.prompt, r.target) for r in EDITS]
    start = CEMRouter._fitness(model, tokenizer, examples, torch.full((2,), 0.5))
    found = CEMRouter._fitness(model, tokenizer, examples, router.alpha)
    assert router.fixed.shape == (3,) and router.fixed.sum().item() == pytest.approx(1.0)
    assert found >= start - 0.5  # searched on a handful of examples (a subset of these), never far worse


def test_prompt_router_returns_one_choice_per_prompt(adaptive_factory):
    make, tokenizer = adaptive_factory
    model = make(get_router("prompt"))
    weights = _route(model, tokenizer, [EDITS[0].prompt, NEGATIVES[4]])
    assert weights.shape == (2, 3) and (weights.sum(-1) == 1).all() and ((weights == 0) | (weights == 1)).all()


def test_unknown_router_is_one_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        get_router("nearest")


def _per_edit_recall(keys, weights, query, mask):
    """The scope score's definition for one edit: Σ w·max_j cos(key, q_j) / Σ w over its tokens (1 if none)."""
    if len(keys) == 0:
        return torch.ones(query.shape[0])
    sims = torch.einsum("kd,btd->bkt", keys, query).masked_fill(~mask[:, None, :], -1.0).max(-1).values
    return (sims.clamp(min=0) * weights).sum(-1) / weights.sum()


def test_scope_router_scores_all_edits_at_once_as_each_edit_alone(adaptive_factory):
    """The scores of K edits come from one padded einsum; each must equal that edit's own definition, whatever
    the other edits' token counts (padding adds nothing) and for an edit with no relation tokens at all."""
    from t2edit.routing import encode

    make, tokenizer = adaptive_factory
    router = make(get_router("scope")).router
    dim = router.subject_keys[0][0].shape[-1]
    (s0, w0), (s1, w1) = router.subject_keys[:2]
    router.subject_keys += [router.subject_keys[0], (torch.cat([s0, s1]), torch.cat([w0, w1]))]  # a longer one
    router.relation_keys += [(torch.zeros(0, dim), torch.zeros(0)), router.relation_keys[1]]  # and an empty one
    router.owner = torch.cat([router.owner, router.owner[:2]])
    router._packed_cache = (None,)
    model = make(get_router("uniform"))
    prompts = ["The spouse of Piet L. Zelmere is", "The occupation of Vesna Corwick is"] + NEGATIVES
    for batch in encode(model, tokenizer, prompts, batch_size=4):
        query = torch.nn.functional.normalize(batch.hidden_states[router.layer].float(), dim=-1)
        mask = batch.prompt_mask()
        expected = torch.stack([torch.minimum(_per_edit_recall(*s, query, mask), _per_edit_recall(*r, query, mask))
                                for s, r in zip(router.subject_keys, router.relation_keys)], -1)
        assert torch.allclose(router._scores(batch), expected, atol=1e-5)
    assert len({len(k) for k, _ in router.subject_keys}) > 1  # edits of different lengths were padded together


def test_embedding_router_takes_each_experts_nearest_key(adaptive_factory):
    """An expert with several keys: its similarity is the best of its own keys, never another expert's."""
    from t2edit.routing import encode

    make, tokenizer = adaptive_factory
    model = make(get_router("uniform"))
    first, second = model.experts[0].router, model.experts[1].router
    first.keys = torch.cat([first.keys, torch.nn.functional.normalize(torch.randn_like(first.keys), dim=-1)])
    router = get_router("embedding").fit(model, tokenizer, NEGATIVES)
    for batch in encode(model, tokenizer, [EDITS[0].prompt, EDITS[1].prompt] + NEGATIVES):
        states = torch.nn.functional.normalize(batch.last_state.float(), dim=-1)
        expected = torch.stack([(states @ first.keys.T).max(-1).values, (states @ second.keys.T).max(-1).values], -1)
        assert torch.allclose(router.similarities(batch), expected, atol=1e-6)
        assert router.weights(batch)[:2].argmax(-1).tolist() == [0, 1]


def test_stored_negative_states_encode_each_negative_once_and_calibrate_the_same_threshold(monkeypatch):
    pass1_module = sys.modules["t2edit.routing.pass1"]  # the package exports a function of the same name

    tokenizer = build_tiny_tokenizer(TEXTS)
    tokenizer.padding_side = "left"
    svf = apply_svf(build_tiny_model(tokenizer, hidden_size=32), SVFConfig(mask="identity", z_init=1.0),
                    progress=False).eval()
    encoded, real = [], pass1_module.last_states
    monkeypatch.setattr(pass1_module, "last_states",
                        lambda model, tok, prompts, *a, **k: encoded.extend(prompts) or real(model, tok, prompts, *a, **k))
    store: dict = {}
    first = calibrate_own_router(svf, tokenizer, [EDITS[0].prompt], NEGATIVES[:4], negative_states=store)
    assert encoded == NEGATIVES[:4]
    encoded.clear()
    second = calibrate_own_router(svf, tokenizer, [EDITS[1].prompt], NEGATIVES[2:], negative_states=store)
    assert encoded == NEGATIVES[4:]  # the two shared negatives come from the store
    for router, edit, negatives in ((first, EDITS[0], NEGATIVES[:4]), (second, EDITS[1], NEGATIVES[2:])):
        plain = calibrate_own_router(svf, tokenizer, [edit.prompt], negatives)
        assert router.threshold == pytest.approx(plain.threshold, abs=1e-5)
        assert torch.allclose(router.keys, plain.keys)


def test_calibration_negatives_of_overlapping_pools_are_the_same_sample(tmp_path):
    from t2edit.training import SVFTrainer, TrainConfig

    tokenizer = build_tiny_tokenizer(TEXTS)
    tokenizer.padding_side = "left"
    svf = apply_svf(build_tiny_model(tokenizer, hidden_size=32), SVFConfig(mask="identity", z_init=1.0),
                    progress=False)
    pool = [f"{negative} ({i})" for i in range(8) for negative in NEGATIVES]  # 48 prompts, never encoded here
    config = TrainConfig(router_calibration_prompts=12, output_dir=str(tmp_path), progress=False)
    full = SVFTrainer(svf, tokenizer, [EDITS[0]], pool, config).calibration_negatives()
    assert len(full) == 12 and set(full) <= set(pool)
    for dropped in full[:3]:  # an edit's own scored prompts leave its pool: the rest of the sample stays
        smaller = SVFTrainer(svf, tokenizer, [EDITS[0]], [p for p in pool if p != dropped],
                             config).calibration_negatives()
        assert len(smaller) == 12 and set(full) - {dropped} <= set(smaller)
