"""vLLM integration without vLLM or a GPU: the rollout classes run against `mock.create_autospec` of TRL's real
`VLLMClient` (a changed TRL signature fails these tests), and the z-only worker extension runs on a plain copy of
the base model standing in for vLLM's model (its `load_weights` takes HF names, as vLLM's does)."""
import copy
import http.server
import json
import socket
import threading
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from trl.generation.vllm_client import VLLMClient

from t2edit import rollouts as rollouts_module
from t2edit.data.records import EditRecord
from t2edit.rollouts import (ColocateEngine, HFRollouts, ServerEngine, VLLMRollouts, llama_svf_layers,
                             make_vllm_rollouts, merged_svf_weights, sync_bytes, trim_at_eos)
from t2edit.svf import SVFConfig, apply_svf
from t2edit.tiny import build_tiny_model
from t2edit.rollouts import greedy_answers
from t2edit.training import SVFTrainer, TrainConfig
from t2edit.vllm_worker import SVFWorkerExtension, ZReader, ZWriter, decode_z, encode_z, load_into_model_runner

URL = "http://127.0.0.1:8000"


def autospec_client(completion_ids=()):
    client = mock.create_autospec(VLLMClient, instance=True)
    client.generate.return_value = {"prompt_ids": [], "completion_ids": [list(c) for c in completion_ids],
                                    "logprobs": None, "logprob_token_ids": None}
    client.get_server_info.return_value = {"model_config": {"dtype": "torch.bfloat16"}}
    return client


def recorded_updates(client):
    """The (metadata, tensors) of every update_named_params call; the iterator is consumed like NCCL would."""
    calls = []
    client.update_named_params.side_effect = lambda metadata, params: calls.append(
        (metadata, [(n, t.clone()) for n, t in params]))
    return calls


class FakeVLLMModel:
    """What vLLM's model offers the worker: `load_weights([(hf_name, tensor)])`; here a plain copy of the base
    model whose parameters are overwritten by name."""

    def __init__(self, base_model):
        self.net = copy.deepcopy(base_model)
        self.loaded: list[tuple[str, torch.Tensor]] = []

    def parameters(self):
        return self.net.parameters()

    def load_weights(self, weights):
        params = dict(self.net.named_parameters())
        for name, tensor in weights:
            self.loaded.append((name, tensor.clone()))
            with torch.no_grad():
                params[name].copy_(tensor)


class FakeWorker(SVFWorkerExtension):
    def __init__(self, base_model):
        self.device = torch.device("cpu")
        self.model_runner = SimpleNamespace(model=FakeVLLMModel(base_model))


class FakeSession:
    """vLLM's dev-mode /collective_rpc over HTTP: {"method", "args": [str]} → the worker method, or 404/500."""

    def __init__(self, worker=None, status=200):
        self.worker, self.status, self.posts = worker, status, []

    def post(self, url, json):
        self.posts.append((url, json))
        if self.status != 200:
            return SimpleNamespace(status_code=self.status, text="no", json=lambda: {})
        assert all(isinstance(a, str) for a in json["args"]), "vLLM's endpoint passes only strings"
        result = getattr(self.worker, json["method"])(*json["args"])
        return SimpleNamespace(status_code=200, text="", json=lambda: {"results": [result]})


def svf_pair(tiny_tokenizer, arch="llama", noise=0.5):
    """An SVF model with perturbed z, and a pristine copy of its base model (the server's starting weights)."""
    model = build_tiny_model(tiny_tokenizer, arch=arch)
    pristine = copy.deepcopy(model)
    torch.manual_seed(1)
    return apply_svf(model, SVFConfig(z_init_noise=noise), progress=False), pristine


def test_vllm_rollouts_group_completions_per_prompt_and_trim_at_eos(tiny_tokenizer):
    svf, _ = svf_pair(tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    client = autospec_client([[5, eos, 7], [6], [8, 9, eos], [10, eos]])
    rollouts = VLLMRollouts(svf, tiny_tokenizer, ServerEngine(client, URL), sync="merged")
    groups = rollouts.sample(["p1", "p2"], n=2, temperature=0.7, max_new_tokens=4)
    assert groups == [[[5, eos], [6]], [[8, 9, eos], [10, eos]]]
    client.generate.assert_called_once_with(["p1", "p2"], n=2, temperature=0.7, max_tokens=4, top_k=0, top_p=1.0,
                                            logprobs=None)
    assert rollouts.generated_tokens == 8 and rollouts.dtype == torch.bfloat16  # the server's dtype


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_sync_sends_changed_layers_as_merged_weights_in_the_server_dtype(tiny_tokenizer, arch):
    svf, _ = svf_pair(tiny_tokenizer, arch)
    client = autospec_client()
    updates = recorded_updates(client)
    rollouts = VLLMRollouts(svf, tiny_tokenizer, ServerEngine(client, URL), sync="merged")
    rollouts.sync_weights(full=True)
    client.init_communicator.assert_called_once_with(device=svf.device)
    (metadata, tensors), = updates
    merged = copy.deepcopy(svf).merge_and_unload().state_dict()  # what a HF checkpoint of the edited model holds
    assert [m[0] for m in metadata] == [n for n, _ in tensors] == [f"{n}.weight" for n in svf.layer_names]
    for (name, dtype, shape), (_, tensor) in zip(metadata, tensors):
        assert (dtype, shape, tensor.dtype) == ("bfloat16", list(merged[name].shape), torch.bfloat16), name
        assert torch.equal(tensor, merged[name].to(torch.bfloat16)), name
    assert client.method_calls[-1] == mock.call.reset_prefix_cache()

    with torch.no_grad():  # one layer changes: only it is sent
        svf.z_parameters()[1].add_(0.25)
    rollouts.sync_weights()
    assert [m[0] for m in updates[1][0]] == [f"{svf.layer_names[1]}.weight"]
    calls_before = len(client.method_calls)
    rollouts.sync_weights()  # nothing changed: nothing sent, cache kept
    assert len(client.method_calls) == calls_before and rollouts.last_sync["bytes"] == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_z_only_sync_recomposes_the_policy_weights_on_the_worker(tiny_tokenizer, arch):
    svf, pristine = svf_pair(tiny_tokenizer, arch)
    worker = FakeWorker(pristine)
    session = FakeSession(worker)
    client = autospec_client()
    rollouts = VLLMRollouts(svf, tiny_tokenizer, ServerEngine(client, URL, session=session), sync="z",
                            dtype=torch.float32)
    rollouts.sync_weights(full=True)
    assert [p[1]["method"] for p in session.posts] == ["svf_load_factors", "svf_set_z"]
    assert all(url == f"{URL}/collective_rpc" for url, _ in session.posts)
    client.update_named_params.assert_not_called()  # no W' travels
    client.init_communicator.assert_not_called()  # and no NCCL group is needed
    client.reset_prefix_cache.assert_called_once_with()
    served = worker.model_runner.model.net
    merged = copy.deepcopy(svf).merge_and_unload()
    for name, tensor in merged.state_dict().items():
        assert torch.allclose(served.state_dict()[name], tensor, atol=1e-5, rtol=1e-5), name
    prompts = ["The capital of Foo is", "The spouse of Ann is"]
    assert greedy_answers(served, tiny_tokenizer, prompts, 4) == greedy_answers(svf, tiny_tokenizer, prompts, 4)

    with torch.no_grad():
        svf.z_parameters()[0].mul_(0.5)
    rollouts.sync_weights()
    sent = decode_z(session.posts[-1][1]["args"][0])
    assert list(sent) == [svf.layer_names[0]] and torch.equal(sent[svf.layer_names[0]], svf.z_parameters()[0])
    assert rollouts.last_sync["bytes"] == 4 * svf.z_parameters()[0].numel()  # float32, nothing else


class FakeReloadingRunner:
    """vLLM's CPU backend after loading: the served linears were repacked (empty parameters, no weight loaders), so
    new weights go only through `reload_weights`, which rebuilds each layer it receives from what it is sent."""

    def __init__(self, base_model):
        self.model = FakeVLLMModel(base_model)
        repacked = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        self.model.parameters = lambda: [*self.model.net.parameters(), repacked]
        self.model.load_weights = mock.Mock(side_effect=AssertionError("a repacked model cannot load in place"))
        self.model.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                             "gate_up_proj": ["gate_proj", "up_proj"]}
        self.reloads: list[list[str]] = []

    def reload_weights(self, weights_iterator, is_checkpoint_format):
        assert is_checkpoint_format  # HF names and layouts, not the kernel's
        weights = list(weights_iterator)
        self.reloads.append([name for name, _ in weights])
        params = dict(self.model.net.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)


def test_a_layerwise_reloading_engine_gets_every_layer_and_serves_the_policy(tiny_tokenizer):
    svf, pristine = svf_pair(tiny_tokenizer)
    worker = FakeWorker(pristine)
    worker.model_runner = FakeReloadingRunner(pristine)
    rollouts = VLLMRollouts(svf, tiny_tokenizer, ServerEngine(autospec_client(), URL, session=FakeSession(worker)),
                            sync="z", dtype=torch.float32)
    rollouts.sync_weights(full=True)
    with torch.no_grad():  # one layer's z changes: the worker still rebuilds whole layers, so every one is reloaded
        svf.z_parameters()[0].mul_(0.5)
    rollouts.sync_weights()
    every_layer = [f"{name}.weight" for name in svf.layer_names]
    assert worker.model_runner.reloads == [every_layer, every_layer]
    worker.model_runner.model.load_weights.assert_not_called()
    served = worker.model_runner.model.net
    prompts = ["The capital of Foo is", "The spouse of Ann is"]
    assert greedy_answers(served, tiny_tokenizer, prompts, 4) == greedy_answers(svf, tiny_tokenizer, prompts, 4)
    assert rollouts.last_sync["transfer_seconds"] >= 0 and rollouts.last_sync["worker_seconds"] > 0


def test_merged_sync_into_a_layerwise_reloading_colocated_engine_sends_every_layer(tiny_tokenizer):
    svf, pristine = svf_pair(tiny_tokenizer)
    runner = FakeReloadingRunner(pristine)
    llm = SimpleNamespace(llm_engine=SimpleNamespace(model_executor=SimpleNamespace(
        driver_worker=SimpleNamespace(model_runner=runner))), reset_prefix_cache=mock.Mock())
    rollouts = VLLMRollouts(svf, tiny_tokenizer, ColocateEngine(llm), sync="merged", dtype=torch.float32)
    rollouts.sync_weights(full=True)
    with torch.no_grad():
        svf.z_parameters()[2].add_(0.25)
    rollouts.sync_weights()
    assert runner.reloads[-1] == [f"{name}.weight" for name in svf.layer_names]
    merged = copy.deepcopy(svf).merge_and_unload().state_dict()
    for name, tensor in runner.model.net.state_dict().items():
        assert torch.allclose(tensor, merged[name], atol=1e-5, rtol=1e-5), name


class FakeColocatedLLM:
    """vLLM's `LLM` under TRL's external launcher: `collective_rpc` calls the in-process worker with its arguments as
    they are (no strings, no copies)."""

    def __init__(self, worker):
        self.worker, self.rpcs = worker, []
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker))
        self.reset_prefix_cache = mock.Mock()

    def collective_rpc(self, method, args=()):
        self.rpcs.append(method)
        return [getattr(self.worker, method)(*args)]


def test_colocated_z_sync_hands_tensors_to_the_worker_without_a_file(tiny_tokenizer, monkeypatch):
    svf, pristine = svf_pair(tiny_tokenizer)
    worker = FakeWorker(pristine)
    llm = FakeColocatedLLM(worker)
    # Colocated, z needs no file: writing one would fail this test.
    monkeypatch.setattr("t2edit.vllm_worker.encode_z", mock.Mock(side_effect=AssertionError("z written to a file")))
    rollouts = VLLMRollouts(svf, tiny_tokenizer, ColocateEngine(llm), sync="z", dtype=torch.float32)
    rollouts.sync_weights(full=True)
    prompts = ["The capital of Foo is", "The spouse of Ann is"]
    served = worker.model_runner.model.net
    assert greedy_answers(served, tiny_tokenizer, prompts, 4) == greedy_answers(svf, tiny_tokenizer, prompts, 4)

    with torch.no_grad():
        svf.z_parameters()[0].mul_(0.5)
    rollouts.sync_weights()
    assert llm.rpcs == ["svf_load_factors", "svf_set_z_tensors", "svf_set_z_tensors"]
    assert rollouts.last_sync["layers"] == 1 and rollouts.last_sync["bytes"] == 4 * svf.z_parameters()[0].numel()
    with torch.no_grad():  # the policy moves on; what the worker holds must not move with it
        svf.z_parameters()[0].add_(1.0)
    assert not torch.equal(worker._svf_z[svf.layer_names[0]], svf.z_parameters()[0])
    merged = copy.deepcopy(svf)
    with torch.no_grad():
        merged.z_parameters()[0].sub_(1.0)
    for name, tensor in merged.merge_and_unload().state_dict().items():
        assert torch.allclose(served.state_dict()[name], tensor, atol=1e-5, rtol=1e-5), name


def test_a_layerwise_reload_refuses_a_fused_projection_sent_in_part(tiny_tokenizer):
    runner = FakeReloadingRunner(build_tiny_model(tiny_tokenizer, arch="llama"))
    gate, up = (torch.zeros(1), torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.mlp\.gate_up_proj needs all of \['gate_proj', 'up_proj'\]"):
        load_into_model_runner(runner, [("model.layers.0.mlp.gate_proj.weight", gate)])
    with pytest.raises(RuntimeError, match=r"model\.layers\.1\.mlp\.gate_up_proj"):  # complete in layer 0 only
        load_into_model_runner(runner, [("model.layers.0.mlp.gate_proj.weight", gate),
                                        ("model.layers.0.mlp.up_proj.weight", up),
                                        ("model.layers.1.mlp.up_proj.weight", up)])
    assert runner.reloads == []


def test_z_payload_round_trips_exactly_and_the_message_stays_small(tmp_path):
    z = {"a.b": torch.randn(7), "c": torch.randn(30_000)}
    message = encode_z(z, str(tmp_path))
    back = decode_z(message)
    assert list(back) == ["a.b", "c"] and all(torch.equal(back[k], z[k]) for k in z)
    assert len(message) < 200 and sorted(p.name for p in tmp_path.iterdir()) == ["z-1.bin", "z-1.json"]
    assert json.loads(message)["bytes"] == 4 * 30_007


def test_z_file_is_overwritten_in_place_until_the_layers_sent_change(tmp_path):
    writer, reader = ZWriter(str(tmp_path)), ZReader()
    z = {"a": torch.randn(5), "b": torch.randn(3)}
    first = reader.read(writer.write(z))
    held = first["a"]  # the worker keeps views of what it read
    for step in range(3):  # same layers: same file, written over; the reader follows each write
        z = {"a": torch.randn(5), "b": torch.randn(3)}
        message = writer.write(z)
        assert json.loads(message)["path"] == str(tmp_path / "z-1.bin")
        back = reader.read(message)
        assert all(torch.equal(back[k], z[k]) for k in z) and torch.equal(held, z["a"])
    before_change = back["b"].clone()
    only_a = {"a": torch.randn(5)}  # another layout: a new file, the old one removed, b's last value kept
    back = reader.read(writer.write(only_a))
    assert list(back) == ["a"] and torch.equal(back["a"], only_a["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z-2.bin", "z-2.json"]
    assert torch.equal(first["b"], before_change)
    gpu_like = {"a": torch.randn(5, dtype=torch.float64)}  # not float32 on the CPU: joined, then copied in
    assert torch.equal(reader.read(writer.write(gpu_like))["a"], gpu_like["a"].float())
    with pytest.raises(ValueError, match="no z to send"):
        writer.write({})
    stale = json.dumps({**json.loads(writer.write(only_a)), "version": 4})
    with pytest.raises(ValueError, match="install the same t2edit on the trainer and the vLLM server"):
        ZReader().read(stale)


def test_sync_bytes_match_the_payloads_and_llama_sizes(tiny_tokenizer):
    svf, _ = svf_pair(tiny_tokenizer)
    shapes = [tuple(layer.merged_weight().shape) for layer in svf.svf_layers().values()]
    sizes = sync_bytes(shapes, bytes_per_weight=2)
    assert sizes["merged"] == sum(w.numel() * 2 for _, w in merged_svf_weights(svf, torch.bfloat16))
    assert sizes["z"] == 4 * sum(p.numel() for p in svf.z_parameters())
    mlp = [shape for _, shape in llama_svf_layers(all_linear=False)]  # gate, up, down of 16 layers
    assert mlp[:3] == [(8192, 2048), (8192, 2048), (2048, 8192)] and len(mlp) == 48
    assert sync_bytes(mlp, 2) == {"merged": 1_610_612_736, "z": 393_216}
    every = llama_svf_layers(all_linear=True)
    assert [name for name, _ in every[:7]] == [f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj",
                                               "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                               "mlp.up_proj", "mlp.down_proj")]
    assert sync_bytes([shape for _, shape in every], 2)["merged"] == 1_946_157_056


def tiny_trainer(tiny_tokenizer, output_dir, rollouts_for, steps=2, resume=False):
    model = build_tiny_model(tiny_tokenizer)
    pristine = copy.deepcopy(model)
    edits = [EditRecord("Foo", "The capital of Foo is", ["Qux"], ["Bar"]),
             EditRecord("Ann", "The spouse of Ann is", ["Carl"], ["Bob Smith"])]
    config = TrainConfig(output_dir=str(output_dir), steps=steps, save_every=1, eval_every=0, progress=False,
                         edits_per_step=2, neighbours_per_step=1, resume=resume)
    svf = apply_svf(model, config.svf_config(), progress=False)
    rollouts = rollouts_for(svf, pristine)
    return SVFTrainer(svf, tiny_tokenizer, edits, ["The capital of Baz is"], config, rollouts=rollouts), rollouts


def test_trainer_syncs_in_full_before_step_one_and_after_resume(tiny_tokenizer, tmp_path):
    workers = []

    def z_rollouts(svf, pristine):
        workers.append(FakeWorker(pristine))
        engine = ServerEngine(autospec_client(), URL, session=FakeSession(workers[-1]))
        rollouts = VLLMRollouts(svf, tiny_tokenizer, engine, sync="z", dtype=torch.float32)
        hf = HFRollouts(svf, tiny_tokenizer)
        rollouts.sample = hf.sample  # sample with the policy; only the sync is under test
        return rollouts

    trainer, rollouts = tiny_trainer(tiny_tokenizer, tmp_path / "run", z_rollouts, steps=2)
    first_sync = mock.patch.object(rollouts, "sync_weights", wraps=rollouts.sync_weights)
    with first_sync as spy:
        trainer.train()
    assert spy.call_args_list[0] == mock.call(full=True) and len(spy.call_args_list) == 3  # full + one per step
    trained_z = trainer.model.get_z()

    # A resumed run (here: already at its last step) must bring a fresh server to the checkpoint's z at once.
    resumed, _ = tiny_trainer(tiny_tokenizer, tmp_path / "run", z_rollouts, steps=2, resume=True)
    resumed.train()
    served = workers[-1].model_runner.model
    assert {n.removesuffix(".weight") for n, _ in served.loaded} == set(resumed.model.layer_names)
    merged = copy.deepcopy(resumed.model).merge_and_unload().state_dict()
    assert all(torch.allclose(served.net.state_dict()[n], merged[n], atol=1e-5) for n, _ in served.loaded)
    assert all(torch.equal(resumed.model.get_z()[k], trained_z[k]) for k in trained_z)


class FakeAccelerator:
    def __init__(self, num_processes):
        self.num_processes, self.is_main_process = num_processes, True
        self.device = torch.device("cpu")


def test_multi_process_launch_is_refused_before_any_client_exists(tiny_tokenizer, monkeypatch):
    svf, _ = svf_pair(tiny_tokenizer)
    constructor = mock.create_autospec(VLLMClient)
    monkeypatch.setattr("trl.generation.vllm_client.VLLMClient", constructor)
    with pytest.raises(RuntimeError, match=r"--num_processes 1.*CUDA_VISIBLE_DEVICES"):
        make_vllm_rollouts(svf, tiny_tokenizer, accelerator=FakeAccelerator(2))
    constructor.assert_not_called()


def test_single_process_builds_one_client_on_the_main_process(tiny_tokenizer, monkeypatch):
    svf, _ = svf_pair(tiny_tokenizer)
    constructor = mock.create_autospec(VLLMClient)
    constructor.return_value = autospec_client()
    monkeypatch.setattr("trl.generation.vllm_client.VLLMClient", constructor)
    monkeypatch.setattr(rollouts_module, "require_vllm", lambda: None)
    # The server answers 404 on /collective_rpc (no dev mode): auto falls back to merged-weight sync.
    monkeypatch.setattr(rollouts_module.ServerEngine, "rpc", mock.Mock(side_effect=RuntimeError("404")))
    rollouts = make_vllm_rollouts(svf, tiny_tokenizer, sync="auto", base_url=URL, accelerator=FakeAccelerator(1),
                                  connection_timeout=5)
    constructor.assert_called_once_with(base_url=URL, connection_timeout=5)
    assert rollouts.sync == "merged"


def test_missing_vllm_gives_the_install_fix(tiny_tokenizer, monkeypatch):
    svf, _ = svf_pair(tiny_tokenizer)
    monkeypatch.setattr(rollouts_module.importlib.util, "find_spec", lambda name: None)
    for mode in ("server", "colocate"):
        with pytest.raises(RuntimeError, match=r"not installed: pip install 't2edit\[vllm\]'"):
            make_vllm_rollouts(svf, tiny_tokenizer, mode=mode)


def test_server_down_gives_the_url_and_the_fix(tiny_tokenizer, monkeypatch):
    """TRL's real client against a closed port raises requests.ConnectionError; we turn it into one message."""
    svf, _ = svf_pair(tiny_tokenizer)
    monkeypatch.setattr(rollouts_module, "require_vllm", lambda: None)
    monkeypatch.setattr("trl.generation.vllm_client.is_vllm_available", lambda *a, **k: True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(RuntimeError, match=rf"no vLLM server answers at {url}.*serve_vllm.sh"):
        make_vllm_rollouts(svf, tiny_tokenizer, base_url=url, connection_timeout=0)


def test_server_rpcs_reuse_one_connection():
    """Every sync is an RPC: each must not open a new TCP connection (a handshake and a new session per step)."""
    connections = []

    class CollectiveRPC(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as vLLM's server (uvicorn) speaks

        def setup(self):
            super().setup()
            connections.append(self.client_address)

        def do_POST(self):  # noqa: N802 - the name http.server calls
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body = json.dumps({"results": [f"{request['method']} {request['args']}"]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            """No request log on stderr: the test counts connections instead."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CollectiveRPC)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        engine = ServerEngine(autospec_client(), f"http://127.0.0.1:{server.server_address[1]}")
        answers = [engine.rpc("svf_ping", str(i)) for i in range(3)]
    finally:
        server.shutdown()
        server.server_close()
    assert answers == [["svf_ping ['0']"], ["svf_ping ['1']"], ["svf_ping ['2']"]]
    assert len(connections) == 1


def test_z_sync_names_the_fix_when_the_server_lacks_the_extension(tiny_tokenizer):
    svf, _ = svf_pair(tiny_tokenizer)
    for status, fix in ((404, "VLLM_SERVER_DEV_MODE=1"), (500, "--worker-extension-cls")):
        engine = ServerEngine(autospec_client(), URL, session=FakeSession(status=status))
        with pytest.raises(RuntimeError, match=fix):
            VLLMRollouts(svf, tiny_tokenizer, engine, sync="z").sync_weights(full=True)


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


def test_each_prompt_generates_within_its_own_budget_and_greedy_answers_do_not_depend_on_the_batching(
        tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer)
    prompts = ["The capital of Foo is", "The spouse of", "The capital of Bar is", "Foo"]
    budgets = [1, 6, 3, 12]
    torch.manual_seed(0)
    sampled = HFRollouts(model, tiny_tokenizer).sample(prompts, 2, 1.0, budgets)
    assert [len(g) for g in sampled] == [2, 2, 2, 2]
    assert all(0 < len(ids) <= budget for g, budget in zip(sampled, budgets) for ids in g)
    # Greedy: a prompt batched with short-budget prompts says what it says alone with one long budget, cut at its own.
    together = HFRollouts(model, tiny_tokenizer).sample(prompts, 1, 0.0, budgets)
    for prompt, budget, group in zip(prompts, budgets, together):
        alone = HFRollouts(model, tiny_tokenizer).sample([prompt], 1, 0.0, 12)[0][0]
        assert group[0] == alone[:budget]
    with pytest.raises(ValueError, match="2 token budgets for 4 prompts"):
        HFRollouts(model, tiny_tokenizer).sample(prompts, 1, 0.0, [3, 4])


def test_budget_groups_cover_every_prompt_once_and_split_only_where_it_pays():
    import itertools
    import random

    def cost(groups, budgets, step):
        return sum(max(budgets[i] for i in g) * (step + len(g)) for g in groups)

    rng = random.Random(0)
    for _ in range(30):
        budgets = [rng.choice([2, 3, 4, 6, 9, 25]) for _ in range(rng.randint(1, 7))]
        groups = rollouts_module.budget_groups(budgets, step_cost_rows=4.0)
        assert sorted(i for g in groups for i in g) == list(range(len(budgets)))
        order = sorted(range(len(budgets)), key=lambda i: budgets[i])
        brute = min(cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (len(order),))], budgets, 4.0)
                    for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert cost(groups, budgets, 4.0) == pytest.approx(brute)
    fifty = [3] * 49 + [25]
    assert [len(g) for g in rollouts_module.budget_groups(fifty, step_cost_rows=32.0)] == [49, 1]
    assert [len(g) for g in rollouts_module.budget_groups(fifty, step_cost_rows=1024.0)] == [50]


def test_truncated_sampler_draws_from_the_top_k_top_p_distribution():
    torch.manual_seed(0)
    scores = torch.randn(1, 40) * 2
    draws = 6000

    def frequencies(sampler):
        counts = torch.zeros(40)
        for _ in range(draws):
            out = sampler(None, scores)
            assert torch.isfinite(out).sum() == 1  # one token is left for greedy decoding to emit
            counts[out.argmax()] += 1
        return counts / draws

    probs = torch.softmax(scores[0] / 0.7, -1)
    top5 = probs.topk(5).indices
    freq = frequencies(rollouts_module.TruncatedSampler(0.7, top_k=5))
    expected = torch.zeros(40)
    expected[top5] = probs[top5] / probs[top5].sum()
    assert (freq - expected).abs().max() < 0.03
    assert freq[expected == 0].sum() == 0
    # top-p: the smallest head of the distribution whose mass reaches p
    ordered = probs.sort(descending=True)
    head = int((ordered.values.cumsum(0) < 0.6).sum()) + 1
    freq = frequencies(rollouts_module.TruncatedSampler(0.7, top_p=0.6))
    assert set(freq.nonzero().squeeze(-1).tolist()) <= set(ordered.indices[:head].tolist())
    assert (freq[ordered.indices[:head]] > 0).all()
    # no truncation: the whole softmax at the temperature
    assert (frequencies(rollouts_module.TruncatedSampler(0.7)) - probs).abs().max() < 0.03
    with pytest.raises(ValueError, match="temperature"):
        rollouts_module.TruncatedSampler(0.0)
