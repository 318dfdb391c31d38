"""AdaptiveModel: K experts over one base model, a mixture per row of the batch, two passes."""
import pytest
import torch

from t2edit.routing import AdaptiveModel
from t2edit.experts import Expert, ExpertMismatchError
from t2edit.routing import FixedRouter, OracleRouter, get_router
from t2edit.routing import calibrate_own_router
from t2edit.svf import SVFConfig, apply_svf, model_bypassed
from t2edit.tiny import build_tiny_model

EDITED = "The spouse of Ann is"
OTHER = "The capital of Baz is"
THIRD = "The capital of Foo is"
NEGATIVES = [THIRD, OTHER, "The occupation of Ann is"]


def _random_expert(svf, seed, router=None, name=""):
    torch.manual_seed(seed)
    svf.set_z({k: 1 + torch.randn_like(v) for k, v in svf.get_z().items()})  # far from neutral
    expert = Expert.from_model(svf, router=router, info={"name": name})
    svf.reset_z()
    return expert


@pytest.fixture
def svf(tiny_tokenizer):
    tiny_tokenizer.padding_side = "left"
    return apply_svf(build_tiny_model(tiny_tokenizer), SVFConfig(mask="identity", z_init=1.0), progress=False).eval()


def _logits(model, tokenizer, prompts, **kwargs):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**batch, position_ids=positions, **kwargs).logits[:, -1]


def _with_expert(svf, expert, tokenizer, prompts):
    expert.apply_to(svf)
    out = _logits(svf, tokenizer, prompts)
    svf.reset_z()
    return out


@pytest.mark.parametrize("mixing", ["groups", "rows"])
def test_one_expert_with_the_embedding_router_is_the_expert_on_routed_rows_only(svf, tiny_tokenizer, mixing):
    """K = 1: the embedding router over one expert decides as the expert's own router, and every mixing path gives
    routed rows the expert alone and the other rows the unedited model (greedy generation included)."""
    router = calibrate_own_router(svf, tiny_tokenizer, [EDITED], NEGATIVES)
    expert = _random_expert(svf, 0, router)
    prompts = [EDITED, OTHER, THIRD, EDITED]
    own = AdaptiveModel.with_own_router(svf, expert, tiny_tokenizer)
    reference = _logits(own, tiny_tokenizer, prompts)
    gate = own.last_weights[:, 0].bool()
    reference_ids = own.generate(**tiny_tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=4,
                                 do_sample=False)
    alone = _with_expert(svf, expert, tiny_tokenizer, prompts)
    with model_bypassed(svf):
        unedited = _logits(svf, tiny_tokenizer, prompts)
    assert gate.tolist() == [True, False, False, True]
    assert torch.allclose(reference[gate], alone[gate], atol=1e-6, rtol=0)
    assert torch.equal(reference[~gate], unedited[~gate])
    adaptive = AdaptiveModel(svf, [expert], get_router("embedding"), tiny_tokenizer, mixing=mixing)
    got = _logits(adaptive, tiny_tokenizer, prompts)
    assert torch.equal(adaptive.last_weights[:, 0].bool(), gate)  # the same routing decisions
    tolerance = 1e-6 if mixing == "groups" else 1e-4  # rows: the factored product rounds differently
    assert torch.allclose(got, reference, atol=tolerance, rtol=0)
    got_ids = adaptive.generate(**tiny_tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=4,
                                do_sample=False)
    assert torch.equal(got_ids, reference_ids)


@pytest.mark.parametrize("mixing", ["groups", "rows", "auto"])
def test_rows_with_different_experts_in_one_batch_match_each_expert_alone(svf, tiny_tokenizer, mixing):
    experts = [_random_expert(svf, seed) for seed in (1, 2, 3)]
    prompts = [EDITED, OTHER, THIRD, EDITED]
    # row 0 → expert 0, row 1 → expert 2, row 2 → none, row 3 → 0.5·expert 1 + 0.5·expert 2
    weights = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0.5, 0.5, 0]], dtype=torch.float32)
    adaptive = AdaptiveModel(svf, experts, FixedRouter(weights=[0, 0, 0, 1]), tiny_tokenizer, mixing=mixing)
    got = _logits(adaptive, tiny_tokenizer, prompts, weights=weights)
    assert torch.allclose(got[0], _with_expert(svf, experts[0], tiny_tokenizer, prompts)[0], atol=1e-4)
    assert torch.allclose(got[1], _with_expert(svf, experts[2], tiny_tokenizer, prompts)[1], atol=1e-4)
    with model_bypassed(svf):
        unedited = _logits(svf, tiny_tokenizer, prompts)
    assert torch.equal(got[2], unedited[2])  # a row with no expert is the unedited model exactly
    mix = Expert.mix([experts[1], experts[2]], [0.5, 0.5])
    mixed = _with_expert(svf, mix, tiny_tokenizer, prompts)[3]
    assert torch.allclose(got[3], mixed, atol=1e-4)
    assert not torch.allclose(got[3], got[0], atol=1e-3)  # the experts really differ


def test_base_weights_are_never_copied_per_expert(svf, tiny_tokenizer):
    experts = [_random_expert(svf, seed) for seed in range(5)]
    before = {name: layer.base_layer.weight.data_ptr() for name, layer in svf.svf_layers().items()}
    adaptive = AdaptiveModel(svf, experts, get_router("uniform"), tiny_tokenizer)
    _logits(adaptive, tiny_tokenizer, [EDITED, OTHER])
    tensors = [t for t in adaptive.z_stack.values()]
    per_expert_floats = sum(t[0].numel() for t in tensors)
    assert per_expert_floats == sum(layer.rank for layer in svf.svf_layers().values())  # z only: ranks, not weights
    assert before == {name: layer.base_layer.weight.data_ptr() for name, layer in svf.svf_layers().items()}
    assert all(layer.row_plan is None for layer in svf.svf_layers().values())  # plan removed after the call


def test_oracle_and_fixed_routers_give_the_weights_asked_for(svf, tiny_tokenizer):
    experts = [_random_expert(svf, seed) for seed in (1, 2)]
    oracle = OracleRouter({EDITED: {1: 1.0}, OTHER: {}})
    adaptive = AdaptiveModel(svf, experts, oracle, tiny_tokenizer)
    _logits(adaptive, tiny_tokenizer, [EDITED, OTHER, THIRD])
    assert adaptive.last_weights.tolist() == [[0, 1, 0], [0, 0, 1], [0, 0, 1]]
    uniform = AdaptiveModel(svf, experts, get_router("uniform"), tiny_tokenizer)
    _logits(uniform, tiny_tokenizer, [EDITED])
    assert uniform.last_weights.tolist() == [[0.5, 0.5, 0.0]]


def test_an_expert_for_another_base_model_is_refused(svf, tiny_tokenizer):
    other = apply_svf(build_tiny_model(tiny_tokenizer, seed=7), SVFConfig(mask="identity", z_init=1.0),
                      progress=False)
    foreign = Expert.from_model(other)
    with pytest.raises(ExpertMismatchError, match="base model"):
        AdaptiveModel(svf, [_random_expert(svf, 0), foreign], get_router("uniform"), tiny_tokenizer)
    with pytest.raises(ValueError, match="at least one expert"):
        AdaptiveModel(svf, [], get_router("uniform"), tiny_tokenizer)


def test_experts_from_directories_and_evaluation_path(svf, tiny_tokenizer, tmp_path):
    """from_pretrained loads directories; the one evaluation path scores the adaptive model (teacher forcing
    routes on the prompt alone)."""
    from t2edit.evaluation.metrics import teacher_forced_predictions

    router = calibrate_own_router(svf, tiny_tokenizer, [EDITED], NEGATIVES)
    _random_expert(svf, 0, router, "a").save_pretrained(tmp_path / "a")
    _random_expert(svf, 1, None, "b").save_pretrained(tmp_path / "b")
    base = svf.unload()
    adaptive = AdaptiveModel.from_pretrained(base, [tmp_path / "a", tmp_path / "b"],
                                             OracleRouter({EDITED: {0: 1.0}}), tiny_tokenizer)
    got = teacher_forced_predictions(adaptive, tiny_tokenizer, [EDITED, OTHER], ["Bob Smith", "Qux"])
    assert sorted(adaptive.last_weights[:, 0].tolist()) == [0.0, 1.0]  # one of the two rows routed
    with model_bypassed(adaptive.svf_model):
        unedited = teacher_forced_predictions(adaptive.svf_model, tiny_tokenizer, [EDITED, OTHER], ["Bob Smith", "Qux"])
    adaptive.experts[0].apply_to(adaptive.svf_model)
    edited = teacher_forced_predictions(adaptive.svf_model, tiny_tokenizer, [EDITED, OTHER], ["Bob Smith", "Qux"])
    assert got[0] == edited[0] and got[1] == unedited[1]
