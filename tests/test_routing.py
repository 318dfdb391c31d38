"""Two-pass inference with one expert (K = 1) behind its own router: the router picks prompts by the unedited
model's state; picked rows get the expert, the others the unedited model."""
import pytest
import torch

from t2edit.evaluation.metrics import teacher_forced_predictions
from t2edit.experts import Expert, OwnRouter
from t2edit.routing import AdaptiveModel, calibrate_own_router, last_states
from t2edit.svf import SVFConfig, apply_svf, model_bypassed
from t2edit.tiny import build_tiny_model

EDITED = "The spouse of Ann is"
OTHER = "The capital of Baz is"


@pytest.fixture
def svf(tiny_tokenizer):
    tiny_tokenizer.padding_side = "left"
    model = apply_svf(build_tiny_model(tiny_tokenizer), SVFConfig(mask="identity", z_init=1.0), progress=False)
    torch.manual_seed(0)
    model.set_z({k: 1 + torch.randn_like(v) for k, v in model.get_z().items()})  # an expert far from neutral
    return model.eval()


def _logits(model, tokenizer, prompts):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**batch, position_ids=positions).logits[:, -1]


def test_routed_rows_get_the_expert_and_the_others_the_unedited_model(svf, tiny_tokenizer):
    prompts = [EDITED, OTHER]
    router = OwnRouter(keys=torch.nn.functional.normalize(last_states(svf, tiny_tokenizer, [EDITED]), dim=-1),
                       threshold=0.999)
    routed = AdaptiveModel.with_own_router(svf, Expert.from_model(svf, router=router), tiny_tokenizer)
    mixed = _logits(routed, tiny_tokenizer, prompts)
    assert routed.last_weights[:, 0].bool().tolist() == [True, False]
    edited = _logits(svf, tiny_tokenizer, prompts)
    with model_bypassed(svf):
        unedited = _logits(svf, tiny_tokenizer, prompts)
    assert not torch.allclose(edited[0], unedited[0], atol=1e-3)  # the expert does change this prompt
    assert torch.allclose(mixed[0], edited[0], atol=1e-5)
    assert torch.allclose(mixed[1], unedited[1], atol=1e-5)


def test_calibrated_threshold_routes_edit_prompts_and_not_the_negatives(svf, tiny_tokenizer):
    negatives = ["The capital of Foo is", OTHER, "The occupation of Ann is"]
    router = calibrate_own_router(svf, tiny_tokenizer, [EDITED], negatives, margin=0.5)
    closest = router.similarity(last_states(svf, tiny_tokenizer, negatives)).max().item()
    assert closest < router.threshold == pytest.approx(closest + 0.5 * (1 - closest))
    assert router.applies(last_states(svf, tiny_tokenizer, [EDITED])).all()
    assert not router.applies(last_states(svf, tiny_tokenizer, negatives)).any()
    # Held-out prompts (never calibrated against) about other subjects or relations are not routed either, though
    # some sit closer to the edit prompt than any negative: the margin, not the calibration set, keeps them out.
    held_out = ["The spouse of Eve is", "The occupation of Eve is", "The capital of Qux is", "The spouse of Carl is",
                "The capital of Bar is"]
    similarity = router.similarity(last_states(svf, tiny_tokenizer, held_out))
    assert similarity.max().item() > closest
    assert not router.applies(last_states(svf, tiny_tokenizer, held_out)).any(), similarity.tolist()
    with pytest.raises(ValueError, match="route_margin"):
        calibrate_own_router(svf, tiny_tokenizer, [EDITED], negatives, margin=1.5)


def test_teacher_forced_scoring_routes_on_the_prompt_alone(svf, tiny_tokenizer):
    """The evaluation feeds prompt + answer; the router must decide from the prompt's last token, not the answer."""
    router = OwnRouter(keys=torch.nn.functional.normalize(last_states(svf, tiny_tokenizer, [EDITED]), dim=-1),
                       threshold=0.999)
    routed = AdaptiveModel.with_own_router(svf, Expert.from_model(svf, router=router), tiny_tokenizer)
    prompts, targets = [EDITED, OTHER], ["Bob Smith", "Qux"]
    got = teacher_forced_predictions(routed, tiny_tokenizer, prompts, targets)
    edited = teacher_forced_predictions(svf, tiny_tokenizer, prompts, targets)
    with model_bypassed(svf):
        unedited = teacher_forced_predictions(svf, tiny_tokenizer, prompts, targets)
    assert got[0] == edited[0] and got[1] == unedited[1]


def test_router_is_saved_with_the_expert(svf, tiny_tokenizer, tmp_path):
    router = calibrate_own_router(svf, tiny_tokenizer, [EDITED, OTHER], ["The capital of Foo is"])
    Expert.from_model(svf, router=router).save_pretrained(tmp_path / "e")
    loaded = Expert.from_pretrained(tmp_path / "e").router
    assert loaded.threshold == pytest.approx(router.threshold) and torch.equal(loaded.keys, router.keys)
    Expert.from_model(svf).save_pretrained(tmp_path / "plain")
    assert Expert.from_pretrained(tmp_path / "plain").router is None


def test_one_expert_without_a_router_of_its_own_is_refused(svf, tiny_tokenizer):
    with pytest.raises(ValueError, match="no router of its own"):
        AdaptiveModel.with_own_router(svf, Expert.from_model(svf), tiny_tokenizer)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pass1_stops_at_the_deepest_layer_read_and_gives_the_same_states(tiny_tokenizer, arch):
    from t2edit.routing import pass1
    from t2edit.routing.pass1 import decoder_layers

    tiny_tokenizer.padding_side = "left"
    model = apply_svf(build_tiny_model(tiny_tokenizer, arch=arch, num_layers=4), progress=False).eval()
    model.set_z({k: 1 + torch.randn_like(v) for k, v in model.get_z().items()})  # pass 1 must not see the expert
    batch = tiny_tokenizer([EDITED, "Baz"], return_tensors="pt", padding=True)
    full = pass1(model, batch["input_ids"], batch["attention_mask"])
    ran = []
    hooks = [block.register_forward_hook(lambda m, a, o, k=k: ran.append(k))
             for k, block in enumerate(decoder_layers(model))]
    early = pass1(model, batch["input_ids"], batch["attention_mask"], layers=[0, 2])
    for hook in hooks:
        hook.remove()
    assert ran == [0, 1]  # blocks 2 and 3 never ran
    mask = batch["attention_mask"].bool()
    for layer in (0, 2):
        assert torch.allclose(early.hidden_states[layer][mask], full.hidden_states[layer][mask], atol=1e-5)
    assert early.hidden_states[1] is None and early.hidden_states[-1] is None
    last = pass1(model, batch["input_ids"], batch["attention_mask"], layers=[-1])  # the last: the whole model
    assert torch.allclose(last.last_state, full.last_state, atol=1e-5)
