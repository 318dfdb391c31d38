import json

import pytest
import torch

from t2edit.experts import CONFIG_NAME, Expert, ExpertMismatchError
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
