"""Baseline editors (LoRA, FT-M, IKE, prompt) on a tiny fact world built here: they edit, restore exactly, work
in batch mode, and never read what the evaluation scores."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

from t2edit.editors import (METHODS, EditInputError, FTEditor, FTEditorConfig, IKEEditor, LoRAEditor,
                              LoRAEditorConfig, PromptEditor, UnknownEditorError, get_editor)
from t2edit.editors.settings import editor_config, profile, profile_name
from t2edit.editors.ft import mlp_output_module_name
from t2edit.editors.ike import BM25
from t2edit.text import copy_demo
from t2edit.editors.target_loss import masked_target_loss, target_batches, train_on_targets
from t2edit.data.records import EditRecord, Probe
from t2edit.editors.base import Editor, NoEdit
from t2edit.evaluation import teacher_forced_accuracy
from t2edit.text import new_fact_context
from t2edit.tiny import build_tiny_model, build_tiny_tokenizer, teach_facts

NAMES = "Alice Bruno Carla Dmitri Elena Farid Greta Hugo Ines Jonas".split()
CITIES = "Paris Rome Oslo Lima Cairo".split()
FIRMS = "Acme Globex Initech Umbrella Hooli".split()
N_EDITS = 4  # facts 0..3 are edited; the others form IKE's training pool and teach in-context copying


def _facts() -> list[tuple[str, str]]:
    facts = []
    for i, name in enumerate(NAMES):
        facts.append((f"{name} lives in", CITIES[i % 5]))
        facts.append((f"{name} works at", FIRMS[(2 * i) % 5]))
    return facts


def _counterfactual(answer: str, shift: int = 1) -> str:
    """Another answer of the same relation — by construction also the true answer of some other fact."""
    options = CITIES if answer in CITIES else FIRMS
    return options[(options.index(answer) + shift) % len(options)]


def _record(index: int, prompt: str, answer: str, shift: int = 1) -> EditRecord:
    return EditRecord(subject=prompt.split()[0], prompt=prompt, target_new=[_counterfactual(answer, shift)],
                      ground_truth=[answer], index=index)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Hidden-64 models gain nothing from a second thread, and spinning OpenMP threads slow down ~6x when other
    processes share the two cores (measured: world build 9.6 s on 1 thread vs 58 s on 2 under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world():
    """20 facts "prompt answer", plus in-context copy examples (0-2 demos + new fact + prompt -> target) built
    from the pool facts only, so copying the edited facts from context is generalisation. ~4 s."""
    facts = _facts()
    edits = [_record(i, *facts[i]) for i in range(N_EDITS)]
    pool = [_record(i, *facts[i], shift=2) for i in range(N_EDITS, len(facts))]
    texts = [f"{prompt} {answer}" for prompt, answer in facts]
    starts = [len(prompt) + 1 for prompt, _ in facts]
    for repeat in range(6):
        for offset, record in enumerate(pool):
            target = _counterfactual(record.ground_truth[0], 1 + (repeat + offset) % 4)
            demos = "".join(copy_demo(pool[(offset + 3 * d + repeat + 1) % len(pool)].prompt,
                                      pool[(offset + 3 * d + repeat + 1) % len(pool)].target)
                            for d in range(repeat % 3))
            text = demos + new_fact_context(record.prompt, target) + record.prompt + " " + target
            texts.append(text)
            starts.append(len(text) - len(target))
    tokenizer = build_tiny_tokenizer(texts)
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2)
    teach_facts(model, tokenizer, texts, steps=150, lr=3e-3, batch_size=32, answer_starts=starts)
    return {"model": model, "tokenizer": tokenizer, "facts": facts, "edits": edits, "pool": pool}


@pytest.fixture
def model(world):
    return copy.deepcopy(world["model"])


def _editor(method: str, world) -> Editor:
    """Each baseline with settings that suit a hidden-64 world (LoRA keeps EasyEdit's defaults)."""
    if method == "lora":
        return LoRAEditor(LoRAEditorConfig())
    if method == "ft":
        return FTEditor(FTEditorConfig(lr=1e-2))
    if method == "ike":
        return IKEEditor(train_records=world["pool"], k=2)
    return PromptEditor()


def _edit_success(model, tokenizer, records, context=None) -> float:
    """Mean teacher-forced token accuracy of the targets (EasyEdit's Edit Succ.), with the editor's contexts."""
    prompts = [r.prompt for r in records]
    contexts = [context(p) for p in prompts] if context else None
    scores = teacher_forced_accuracy(model, tokenizer, prompts, [r.target for r in records], contexts=contexts)
    return sum(scores) / len(scores)


def _logits(model, tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


BASELINES = ["lora", "ft", "ike", "prompt"]


@pytest.mark.parametrize("method", BASELINES)
def test_single_edit_succeeds_then_restores_the_base_model(method, world, model):
    tokenizer, records = world["tokenizer"], world["edits"]
    editor = _editor(method, world)
    weights_before = _weights(model)
    probe_texts = [f"{prompt} {answer}" for prompt, answer in world["facts"]]
    logits_before = _logits(model, tokenizer, probe_texts)
    flags_before = {name: p.requires_grad for name, p in model.named_parameters()}
    module_types_before = [(name, type(m)) for name, m in model.named_modules()]

    before, after = [], []
    for record in records:
        before.append(_edit_success(model, tokenizer, [record]))
        edited = editor.edit(model, tokenizer, [record])
        after.append(_edit_success(edited.model, tokenizer, [record], edited.context))
        edited.restore()
    assert sum(before) / len(before) < 0.25  # the unedited model answers the old fact
    assert sum(after) / len(after) > sum(before) / len(before) + 0.5

    weights_after = _weights(model)
    assert weights_after.keys() == weights_before.keys()
    assert all(torch.equal(weights_after[name], weights_before[name]) for name in weights_before)
    assert torch.equal(_logits(model, tokenizer, probe_texts), logits_before)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags_before
    assert [(name, type(m)) for name, m in model.named_modules()] == module_types_before
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


@pytest.mark.parametrize("method", BASELINES)
def test_batch_edit_of_several_records(method, world, model):
    tokenizer, records = world["tokenizer"], world["edits"]
    before = _edit_success(model, tokenizer, records)
    with torch.no_grad():  # as inside an evaluation loop: weight editors must still train
        edited = _editor(method, world).edit(model, tokenizer, records)
    after = _edit_success(edited.model, tokenizer, records, edited.context)
    assert after > before + 0.5
    if method in ("ike", "prompt"):  # each question gets its own fact back from the retriever
        for record in records:
            assert new_fact_context(record.prompt, record.target) in edited.context(record.prompt)
    edited.restore()
    assert torch.equal(_logits(model, tokenizer, [r.prompt for r in records]),
                       _logits(world["model"], tokenizer, [r.prompt for r in records]))


def _read_by_the_guard() -> bool:
    """Only t2edit/leakage.py may read what the evaluation scores: it does so to remove it from what editors see."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(os.path.join("t2edit", "leakage.py")):
            return True
        frame = frame.f_back
    return False


class LeakProofRecord(EditRecord):
    """An edit whose evaluation-only fields blow up when anything but the leakage guard reads them."""

    def __getattribute__(self, name):
        if name in ("locality", "portability", "rephrase") and not _read_by_the_guard():
            raise AssertionError(f"an editor read record.{name} (test leakage)")
        return super().__getattribute__(name)


def _leak_proof(record: EditRecord) -> LeakProofRecord:
    probe = [Probe("a scored question", ["a scored answer"])]
    return LeakProofRecord(subject=record.subject, prompt=record.prompt, target_new=list(record.target_new),
                           ground_truth=list(record.ground_truth), locality={"relation_specificity": probe},
                           portability={"reasoning": probe}, rephrase=probe, index=record.index)


@pytest.mark.parametrize("method", BASELINES)
def test_editors_never_read_locality_portability_or_rephrase(method, world, model):
    tokenizer = world["tokenizer"]
    records = [_leak_proof(r) for r in world["edits"]]
    with pytest.raises(AssertionError, match="test leakage"):
        records[0].scored_prompts()  # the tripwire works
    if method == "ike":
        editor = IKEEditor(train_records=[_leak_proof(r) for r in world["pool"]], k=2)
    else:
        editor = _editor(method, world)
    if method in ("lora", "ft"):  # keep it quick: the point is which fields are read
        editor.config.steps = 2
    for batch in ([records[0]], records):
        edited = editor.edit(model, tokenizer, batch)
        for record in batch:
            edited.context(record.prompt)
        edited.restore()


def test_ike_demonstrations_come_from_the_pool_never_the_edited_prompts(world):
    edits, pool = world["edits"], world["pool"]
    # A pool that also holds the edited prompts (with other targets) must not lend them as demos.
    leaky_pool = pool + [_record(r.index, r.prompt, r.ground_truth[0], shift=3) for r in edits]
    editor = IKEEditor(train_records=leaky_pool, k=3)
    edited = editor.edit(None, world["tokenizer"], edits[:1])
    context = edited.context(edits[0].prompt)
    assert context.endswith(new_fact_context(edits[0].prompt, edits[0].target))
    demos = context[: -len(new_fact_context(edits[0].prompt, edits[0].target))]
    assert demos.count("New Fact:") == 3
    assert f"New Fact: {edits[0].prompt} " not in demos
    assert demos.endswith("\n\n")


def test_ike_needs_a_pool_and_prompt_editing_has_no_demos(world):
    with pytest.raises(EditInputError, match="train_records"):
        IKEEditor(train_records=[], k=4)
    record = world["edits"][0]
    context = PromptEditor().edit(None, world["tokenizer"], [record]).context("any question")
    assert context == new_fact_context(record.prompt, record.target)


def test_bm25_ranks_shared_rare_words_first():
    index = BM25(["Alice lives in Paris", "Bruno lives in Rome", "Carla works at Acme"])
    assert index.ranked("Where does Bruno live?")[0] == 1
    assert index.ranked("Carla works at")[0] == 2
    assert index.ranked("Alice works at", exclude={0})[0] == 2


def test_lora_targets_q_and_v_projections_by_default(world, model):
    record = world["edits"][0]
    edited = LoRAEditor(LoRAEditorConfig(steps=1)).edit(model, world["tokenizer"], [record])
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    edited.restore()
    assert not any(hasattr(module, "lora_A") for module in model.modules())


def test_lora_in_a_stream_trains_one_adapter_further_and_each_restore_undoes_its_own_call(world, model):
    tokenizer, first, second = world["tokenizer"], world["edits"][0], world["edits"][1]
    texts = [first.prompt, second.prompt]
    unedited = _logits(model, tokenizer, texts)
    editor = LoRAEditor(LoRAEditorConfig(steps=5, lr=1e-2, dropout=0.0))
    one = editor.edit(model, tokenizer, [first])
    after_one = _logits(model, tokenizer, texts)
    n_adapted = sum(hasattr(module, "lora_A") for module in model.modules())
    base = {k: t.clone() for k, t in model.state_dict().items() if "lora_" not in k}
    two = editor.edit(one.model, tokenizer, [second])
    # The second call trained the same layers (no adapter wrapped in another), and moved the model.
    assert sum(hasattr(module, "lora_A") for module in model.modules()) == n_adapted
    assert not torch.allclose(_logits(model, tokenizer, texts), after_one)
    assert all(torch.equal(t, base[k]) for k, t in model.state_dict().items() if "lora_" not in k)
    two.restore()
    assert torch.allclose(_logits(model, tokenizer, texts), after_one)
    one.restore()
    assert not any(hasattr(module, "lora_A") for module in model.modules())
    assert torch.equal(_logits(model, tokenizer, texts), unedited)


def test_ft_trains_only_the_middle_layers_mlp_output(world, model):
    name = mlp_output_module_name(model, None)
    assert name == "model.layers.1.mlp.down_proj"
    before = _weights(model)
    edited = FTEditor(FTEditorConfig(steps=3, lr=1e-2)).edit(model, world["tokenizer"], world["edits"][:1])
    changed = {key for key, tensor in model.state_dict().items() if not torch.equal(tensor, before[key])}
    assert changed == {name + ".weight"}
    edited.restore()
    with pytest.raises(EditInputError, match="layer 7 does not exist"):
        FTEditor(FTEditorConfig(layer=7)).edit(model, world["tokenizer"], world["edits"][:1])


@pytest.mark.filterwarnings("ignore:fan_in_fan_out")  # PEFT switches it on for GPT-2 Conv1D itself
@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_weight_editors_restore_exactly_on_other_architectures(arch, tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, arch=arch, hidden_size=32, num_layers=2)
    record = EditRecord(subject="Foo", prompt="The capital of Foo is", target_new=["Qux"])
    texts = ["The capital of Foo is Qux", "The spouse of Ann is"]
    weights, logits = _weights(model), _logits(model, tiny_tokenizer, texts)
    for editor in (LoRAEditor(LoRAEditorConfig(steps=3)), FTEditor(FTEditorConfig(steps=3, lr=1e-2))):
        edited = editor.edit(model, tiny_tokenizer, [record])
        assert not torch.equal(_logits(edited.model, tiny_tokenizer, texts), logits)
        edited.restore()
        assert all(torch.equal(t, weights[k]) for k, t in model.state_dict().items())
        assert torch.equal(_logits(model, tiny_tokenizer, texts), logits)


def test_edits_are_deterministic_and_leave_the_callers_rng_alone(world, model):
    tokenizer, record = world["tokenizer"], world["edits"][0]
    editor = LoRAEditor(LoRAEditorConfig(steps=5))
    runs = []
    for _ in range(2):
        rng_state = torch.get_rng_state()
        edited = editor.edit(model, tokenizer, [record])
        assert torch.equal(torch.get_rng_state(), rng_state)
        runs.append(_logits(model, tokenizer, [record.prompt]))
        edited.restore()
    assert torch.equal(runs[0], runs[1])


def test_bad_inputs_get_one_clear_message(world, model):
    tokenizer = world["tokenizer"]
    with pytest.raises(EditInputError, match="no records"):
        FTEditor().edit(model, tokenizer, [])
    no_target = EditRecord(subject="Alice", prompt="Alice lives in", target_new=[], index=7)
    with pytest.raises(EditInputError, match="record 7 .* no target_new"):
        LoRAEditor().edit(model, tokenizer, [no_target])
    with pytest.raises(EditInputError, match="target_modules"):
        LoRAEditor(LoRAEditorConfig(target_modules=("no_such_proj",))).edit(model, tokenizer, world["edits"][:1])
    assert not any(hasattr(module, "lora_A") for module in model.modules())


def test_registry_builds_each_method_and_names_the_choices(world):
    assert isinstance(get_editor("none"), NoEdit)
    lora = get_editor("lora", rank=4, lr=1e-2)
    assert isinstance(lora, LoRAEditor) and lora.config.rank == 4 and lora.config.lr == 1e-2
    assert get_editor("ft", config=FTEditorConfig(layer=0)).config.layer == 0
    assert get_editor("ike", train_records=world["pool"], k=3).k == 3
    assert isinstance(get_editor("prompt"), PromptEditor)
    assert get_editor("rome", layer=3).config.layer == 3
    assert get_editor("serac", train_records=world["pool"]).train_records == list(world["pool"])
    with pytest.raises(UnknownEditorError, match="no option.*train_records"):
        get_editor("rome", train_records=world["pool"])  # ROME learns from no training split
    with pytest.raises(UnknownEditorError) as error:
        get_editor("mend")
    assert all(method in str(error.value) for method in METHODS)
    with pytest.raises(UnknownEditorError, match="no option.*rnak.*rank"):
        get_editor("lora", rnak=4)


# ---------------------------------------------------------------------------------------------- the training loop

def test_batched_target_loss_is_the_mean_of_each_edit_alone(world, model):
    """Left padding, position ids and logits of the last positions only give each edit the loss it has alone."""
    tokenizer, records = world["tokenizer"], world["edits"] + world["pool"][:3]
    device = torch.device("cpu")
    with torch.no_grad():
        alone = [masked_target_loss(model, target_batches(tokenizer, [r], 1, device)[0]) for r in records]
        together = masked_target_loss(model, target_batches(tokenizer, records, 32, device)[0])
    assert torch.allclose(together, torch.stack(alone).mean(), atol=1e-5)


def test_stop_loss_skips_steps_once_the_targets_are_learned(world, model):
    tokenizer, record = world["tokenizer"], world["edits"][0]
    weights = _weights(model)
    edited = FTEditor(FTEditorConfig(lr=1e-2, stop_loss=1e6)).edit(model, tokenizer, [record])
    assert all(torch.equal(t, weights[k]) for k, t in model.state_dict().items())  # loss < 1e6: no step at all
    edited.restore()
    batches = target_batches(tokenizer, [record], 1, torch.device("cpu"))
    layer = model.get_submodule(mlp_output_module_name(model, None))
    losses = train_on_targets(model, [layer.weight], batches, steps=50, lr=1e-2, stop_loss=0.5)
    assert len(losses) < 50 and losses[-1] < 0.5 <= min(losses[:-1], default=1.0)


def test_ft_norm_constraint_keeps_every_entry_near_the_original(world, model):
    name = mlp_output_module_name(model, None) + ".weight"
    original = model.state_dict()[name].clone()
    edited = FTEditor(FTEditorConfig(lr=1e-2, steps=5, stop_loss=None, norm_constraint=1e-3)).edit(
        model, world["tokenizer"], world["edits"][:2])
    change = (model.state_dict()[name] - original).abs()
    assert 0 < change.max() <= 1e-3 + 1e-7
    edited.restore()
    assert torch.equal(model.state_dict()[name], original)


def test_bf16_edits_keep_float32_weights_and_restore_exactly(world, model):
    tokenizer, records = world["tokenizer"], world["edits"]
    weights = _weights(model)
    for editor in (FTEditor(FTEditorConfig(lr=1e-2, precision="bf16")),
                   LoRAEditor(LoRAEditorConfig(precision="bf16"))):
        before = _edit_success(model, tokenizer, records)
        edited = editor.edit(model, tokenizer, records)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert _edit_success(edited.model, tokenizer, records) > before + 0.5
        edited.restore()
        assert all(torch.equal(t, weights[k]) for k, t in model.state_dict().items())
    with pytest.raises(EditInputError, match="precision='fp16'.*auto, bf16, fp32"):
        LoRAEditorConfig(precision="fp16")


def test_lora_layers_limit_the_adapters_to_those_layers(world, model):
    edited = LoRAEditor(LoRAEditorConfig(steps=1, layers=(1,))).edit(model, world["tokenizer"], world["edits"][:1])
    adapted = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted and all(".layers.1." in name for name in adapted)
    edited.restore()


# ---------------------------------------------------------------------------------------------- defaults by model

def _meta_llama(num_layers: int, hidden: int, intermediate: int):
    """A Llama of the given shape with no memory behind it: enough to count parameters and layers."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=32000)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_settings_follow_the_kind_of_model(world, tiny_tokenizer):
    tiny_llama = build_tiny_model(tiny_tokenizer, hidden_size=32, num_layers=6)
    assert profile_name(world["model"], world=True) == "world"
    assert profile_name(tiny_llama, world=False) == "small-real"
    assert profile_name(_meta_llama(32, 4096, 11008), world=False) == "large-real"  # Llama-2-7b's shape

    world_ft = editor_config("ft", world["model"], world=True)
    assert (world_ft.lr, world_ft.stop_loss, world_ft.layer) == (1e-2, None, None)
    assert editor_config("lora", world["model"], world=True) == LoRAEditorConfig()
    small_ft = editor_config("ft", tiny_llama, world=False)
    assert small_ft.layer == 1 and small_ft.lr == profile("ft", "small-real")["lr"]  # depth 1/6 of 6 layers
    assert editor_config("ft", _meta_llama(30, 64, 128), world=False).layer == 5  # SmolLM2's 30 layers
    assert editor_config("ft", _meta_llama(32, 4096, 11008), world=False).layer == 21  # EasyEdit's layer
    assert editor_config("lora", tiny_llama, world=False).lr == profile("lora", "small-real")["lr"]
    with pytest.raises(ValueError, match="cover lora, ft, rome, .*not .ike."):
        editor_config("ike", tiny_llama, world=False)


def test_every_configured_method_has_every_profile_and_its_layers_follow_depth(world, tiny_tokenizer):
    from t2edit.editors import CONFIGURED
    from t2edit.editors.settings import PROFILES

    smollm2_shape, llama7b_shape = _meta_llama(30, 64, 128), _meta_llama(32, 4096, 11008)
    for method, (_, config_class) in CONFIGURED.items():
        for name in PROFILES:
            assert isinstance(profile(method, name), dict)  # the file has it (an empty profile is {})
        for model, world_flag in ((world["model"], True), (smollm2_shape, False), (llama7b_shape, False)):
            config = editor_config(method, model, world=world_flag)
            assert isinstance(config, config_class)
            n_layers = model.config.num_hidden_layers
            for layer in [getattr(config, "layer", None), *(getattr(config, "layers", None) or ())]:
                assert layer is None or 0 <= layer < n_layers
    # EasyEdit's published layers come back on a 32-layer model: ROME 5, MEMIT 4-8
    assert editor_config("rome", llama7b_shape, world=False).layer == 5
    assert editor_config("memit", llama7b_shape, world=False).layers == (4, 5, 6, 7, 8)


def test_make_editor_gives_world_and_real_models_their_own_settings(world, tiny_tokenizer):
    from t2edit.jobs import make_editor
    from t2edit.setup import EditingSetup

    tiny_llama = build_tiny_model(tiny_tokenizer, hidden_size=32, num_layers=6)
    as_world = EditingSetup(world["model"], world["tokenizer"], world["edits"], world["pool"], [], "world",
                            world_report={"seed": 0})
    as_real = EditingSetup(tiny_llama, tiny_tokenizer, world["edits"], world["pool"], [], "tiny-llama")
    world_ft, real_ft = make_editor("ft", as_world), make_editor("ft", as_real)
    assert (world_ft.config.lr, world_ft.config.layer, world_ft.config.stop_loss) == (1e-2, None, None)
    assert (real_ft.config.lr, real_ft.config.layer, real_ft.config.precision) == (2e-3, 1, "auto")
    assert make_editor("lora", as_world).config == LoRAEditorConfig()
    assert make_editor("lora", as_real).config.steps == profile("lora", "small-real")["steps"]
    # the editors that learn from the training split get the setup's records that are not edited
    assert make_editor("serac", as_real).train_records == list(world["pool"])


def test_real_model_ft_trains_only_its_named_layer_and_restores_exactly(world, tiny_tokenizer):
    from t2edit.jobs import make_editor
    from t2edit.setup import EditingSetup

    model = build_tiny_model(tiny_tokenizer, hidden_size=32, num_layers=6)
    record = EditRecord(subject="Foo", prompt="The capital of Foo is", target_new=["Qux"])
    weights = _weights(model)
    editor = make_editor("ft", EditingSetup(model, tiny_tokenizer, [record], [], [], "tiny-llama"))
    edited = editor.edit(model, tiny_tokenizer, [record])
    changed = {k for k, t in model.state_dict().items() if not torch.equal(t, weights[k])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}
    edited.restore()
    assert all(torch.equal(t, weights[k]) for k, t in model.state_dict().items())
