"""vLLM integration, tested against recorded calls of TRL's VLLMClient (no vLLM or GPU needed)."""
import torch

from t2edit.rollouts import HFRollouts, VLLMRollouts, merged_svf_weights, trim_at_eos
from t2edit.svf import SVFConfig, apply_svf
from t2edit.tiny import build_tiny_model


class RecordingClient:
    """Stands in for trl.generation.vllm_client.VLLMClient and records what the trainer sends it."""

    def __init__(self, completion_ids):
        self.completion_ids = completion_ids
        self.calls = []

    def generate(self, prompts, n=1, temperature=1.0, max_tokens=16, logprobs=0, **_):
        self.calls.append(("generate", list(prompts), n, temperature, max_tokens))
        return {"prompt_ids": [[1]] * len(prompts), "completion_ids": self.completion_ids}

    def update_named_params(self, metadata, named_params):
        self.calls.append(("update_named_params", metadata, [(n, t.clone()) for n, t in named_params]))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def test_vllm_rollouts_group_completions_per_prompt_and_trim_at_eos(tiny_tokenizer):
    svf = apply_svf(build_tiny_model(tiny_tokenizer), SVFConfig(), progress=False)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    client = RecordingClient([[5, eos, 7], [6], [8, 9, eos], [10, eos]])
    rollouts = VLLMRollouts(svf, tiny_tokenizer, client=client)
    groups = rollouts.sample(["p1", "p2"], n=2, temperature=0.7, max_new_tokens=4)
    assert groups == [[[5, eos], [6]], [[8, 9, eos], [10, eos]]]
    assert client.calls[0] == ("generate", ["p1", "p2"], 2, 0.7, 4)


def test_vllm_weight_sync_sends_merged_weights_under_hf_names(tiny_tokenizer):
    for arch in ("llama", "gpt2"):
        model = build_tiny_model(tiny_tokenizer, arch=arch)
        svf = apply_svf(model, SVFConfig(z_init_noise=0.5), progress=False)
        client = RecordingClient([])
        VLLMRollouts(svf, tiny_tokenizer, client=client).sync_weights()
        (_, metadata, tensors), reset = client.calls
        assert reset == ("reset_prefix_cache",)
        merged = svf.merge_and_unload().state_dict()  # what a plain HF checkpoint of the edited model holds
        assert len(tensors) == len(svf.layer_names) and [m[0] for m in metadata] == [n for n, _ in tensors]
        for (name, dtype, shape), (_, tensor) in zip(metadata, tensors):
            assert name in merged, name
            assert list(merged[name].shape) == shape and dtype == "float32"
            assert torch.allclose(tensor, merged[name], atol=1e-6), name


def test_hf_rollouts_sample_n_per_prompt(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer)
    torch.manual_seed(0)
    groups = HFRollouts(model, tiny_tokenizer).sample(["The capital of Foo is", "The spouse of"], 3, 1.0, 4)
    assert [len(g) for g in groups] == [3, 3]
    assert all(0 < len(ids) <= 4 for g in groups for ids in g)
    greedy = HFRollouts(model, tiny_tokenizer).sample(["The capital of Foo is"], 2, 0.0, 4)
    assert greedy[0][0] == greedy[0][1]


def test_trim_at_eos():
    assert trim_at_eos([4, 5, 2, 0, 0], eos_id=2, pad_id=0) == [4, 5, 2]
    assert trim_at_eos([4, 5, 0, 0], eos_id=2, pad_id=0) == [4, 5]
    assert trim_at_eos([4, 5], eos_id=2, pad_id=0) == [4, 5]
