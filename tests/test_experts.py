import json

import pytest
import torch

from t2edit.experts import CONFIG_NAME, Expert, ExpertMismatchError, OwnRouter
from t2edit.svf import SVFConfig, apply_svf
from t2edit.tiny import build_tiny_model


def _svf(tokenizer, seed=0, noise=0.5):
    model = apply_svf(build_tiny_model(tokenizer, seed=seed), SVFConfig(z_init_noise=noise), progress=False)
    return model


def test_save_and_load_round_trip(tmp_path, tiny_tokenizer, tiny_texts):
    svf = _svf(tiny_tokenizer)
    edits = [{"prompt": "The capital of Foo is", "subject": "Foo", "target": "Bar"}]
    expert = Expert.from_model(svf, info={"name": "capitals", "edits": edits, "note": "kept"})
    expert.save_pretrained(tmp_path / "e")
    files = sorted(p.name for p in (tmp_path / "e").iterdir())
    assert files == ["expert.safetensors", "expert_config.json"]  # no temp files left behind
    config = json.loads((tmp_path / "e" / CONFIG_NAME).read_text())
    assert config["target_layers"] == svf.layer_names and config["svf_config"]["mask"] == "sigmoid"
    assert config["base_fingerprint"] == svf.base_fingerprint and config["info"]["edits"] == edits
    assert config["info"]["note"] == "kept"  # keys the typed record does not know survive a round trip

    loaded = Expert.from_pretrained(tmp_path / "e")
    assert loaded.info.name == "capitals" and loaded.info.edits == edits and loaded.info.extra == {"note": "kept"}
    other = _svf(tiny_tokenizer, noise=0.0)  # same base weights, neutral z
    loaded.apply_to(other)
    batch = tiny_tokenizer(tiny_texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(other(**batch).logits, svf(**batch).logits, atol=1e-6)


def test_only_z_is_stored(tmp_path, tiny_tokenizer):
    svf = _svf(tiny_tokenizer)
    Expert.from_model(svf).save_pretrained(tmp_path / "e")
    size = (tmp_path / "e" / "expert.safetensors").stat().st_size
    z_bytes = sum(z.numel() * 4 for z in svf.get_z().values())
    assert size < z_bytes + 4096


def test_applying_to_another_base_model_fails_clearly(tiny_tokenizer):
    expert = Expert.from_model(_svf(tiny_tokenizer, seed=0))
    with pytest.raises(ExpertMismatchError, match="load the base model the expert was trained on"):
        expert.apply_to(_svf(tiny_tokenizer, seed=1))


def test_mix_is_a_weighted_sum_in_z_space(tiny_tokenizer):
    a = Expert.from_model(_svf(tiny_tokenizer, noise=0.5))
    svf = _svf(tiny_tokenizer, noise=0.5)
    torch.manual_seed(3)
    svf.set_z({k: torch.randn_like(v) for k, v in svf.get_z().items()})
    b = Expert.from_model(svf)
    mixed = Expert.mix([a, b], [0.25, 0.75])
    for name in a.z:
        assert torch.allclose(mixed.z[name], 0.25 * a.z[name] + 0.75 * b.z[name])
    with pytest.raises(ValueError, match="2 experts but 1 weights"):
        Expert.mix([a, b], [1.0])
    with pytest.raises(ExpertMismatchError):
        Expert.mix([a, Expert.from_model(_svf(tiny_tokenizer, seed=2))])


def test_missing_or_damaged_expert_directory(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="not an SVF expert directory"):
        Expert.from_pretrained(tmp_path / "nothing")
    Expert.from_model(_svf(tiny_tokenizer)).save_pretrained(tmp_path / "e")
    (tmp_path / "e" / "expert.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="damaged"):
        Expert.from_pretrained(tmp_path / "e")


def test_an_expert_written_before_edits_held_subjects_still_loads(tmp_path, tiny_tokenizer):
    """Older experts stored the number of edits under "edits" and their prompts under "edit_prompts"."""
    Expert.from_model(_svf(tiny_tokenizer)).save_pretrained(tmp_path / "e")
    path = tmp_path / "e" / CONFIG_NAME
    config = json.loads(path.read_text())
    config["info"] = {"name": "old", "edits": 1, "edit_prompts": ["The spouse of Ann is"], "weights": [1.0]}
    path.write_text(json.dumps(config))
    info = Expert.from_pretrained(tmp_path / "e").info
    assert info.edits == [{"prompt": "The spouse of Ann is"}] and info.mix_weights == [1.0]


@pytest.mark.parametrize("damage", ["no_svf_config", "no_fingerprint", "bad_edits", "info_not_object"])
def test_a_damaged_expert_config_is_one_clear_error(tmp_path, tiny_tokenizer, damage):
    Expert.from_model(_svf(tiny_tokenizer)).save_pretrained(tmp_path / "e")
    path = tmp_path / "e" / CONFIG_NAME
    config = json.loads(path.read_text())
    if damage == "no_svf_config":
        del config["svf_config"]
    elif damage == "no_fingerprint":
        del config["base_fingerprint"]
    elif damage == "bad_edits":
        config["info"]["edits"] = ["not an object"]
    else:
        config["info"] = [1, 2]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="damaged"):
        Expert.from_pretrained(tmp_path / "e")


def _saved(tmp_path, tokenizer):
    svf = _svf(tokenizer)
    Expert.from_model(svf, router=OwnRouter(torch.nn.functional.normalize(torch.randn(2, 8), dim=-1), 0.9)) \
        .save_pretrained(tmp_path / "e")
    return svf, tmp_path / "e"


def _damage_z(directory, change):
    from safetensors.torch import load_file, save_file

    z = load_file(str(directory / "expert.safetensors"))
    change(z)
    save_file(z, str(directory / "expert.safetensors"))


def _damage_config(directory, change):
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("case, damage, message", [
    ("nan in z", lambda d: _damage_z(d, lambda z: z[next(iter(z))].__setitem__(0, float("nan"))), "NaN"),
    ("z of shape (1,)", lambda d: _damage_z(d, lambda z: z.__setitem__(next(iter(z)), torch.ones(1))), "checksum"),
    ("flipped byte", lambda d: (d / "expert.safetensors").write_bytes(
        (d / "expert.safetensors").read_bytes()[:-1] + bytes([(d / "expert.safetensors").read_bytes()[-1] ^ 1])),
     "checksum"),
    ("edited mask", lambda d: _damage_config(d, lambda c: c["svf_config"].__setitem__("mask", "identity")),
     "svf_config"),
    ("threshold NaN", lambda d: _damage_config(d, lambda c: c.__setitem__("router_threshold", float("nan"))),
     "router_threshold"),
    ("threshold -5", lambda d: _damage_config(d, lambda c: c.__setitem__("router_threshold", -5)), "router_threshold"),
    ("unknown format", lambda d: _damage_config(d, lambda c: c.__setitem__("format", "t2edit-expert/99")), "format"),
])
def test_a_damaged_expert_is_refused_when_it_loads(tmp_path, tiny_tokenizer, case, damage, message):
    _, directory = _saved(tmp_path, tiny_tokenizer)
    Expert.from_pretrained(directory)  # intact: loads
    damage(directory)
    with pytest.raises(ValueError, match=message):
        Expert.from_pretrained(directory)


def test_z_that_does_not_fit_the_model_is_refused_on_the_many_experts_path(tmp_path, tiny_tokenizer):
    """An expert built in memory (no file, no checksum) whose z has the wrong shape for a layer: it would broadcast
    and change answers if the mixer stacked it unchecked."""
    from t2edit.routing import AdaptiveModel, get_router

    svf = _svf(tiny_tokenizer)
    expert = Expert.from_model(svf)
    name = next(iter(expert.z))
    expert.z[name] = torch.ones(1)
    with pytest.raises(ExpertMismatchError, match="shape"):
        AdaptiveModel.from_experts(svf, [expert], get_router("uniform"), tiny_tokenizer)
