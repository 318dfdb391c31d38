"""REINFORCE training of one SVF expert for a batch of edits.

Each step samples a group of answers for some edit prompts and some neighbour prompts, scores them with the reward
plugins, and pushes z along Σ advantage · ∇log π(answer). Two additions make it work for knowledge editing:

* Guided groups (the sparse-reward fix): a counterfactual target is essentially never sampled by the unedited model
  (1 in 1,584 samples in our measurements), so every sampled reward is 0 and plain REINFORCE has no gradient. One
  member of each group is therefore the rewarded answer itself (the new target on edit prompts, the unedited model's
  own answer on neighbour prompts), scored by the same reward; the group baseline gives it a positive advantage
  exactly while the policy does not yet produce it, and none once it does.
* Locality is trained for: neighbour prompts come from *other* facts (never the edited records' locality,
  portability or rephrase prompts) and are rewarded for keeping the unedited model's answer; an optional KL term to
  the unedited model (the same SVF model with its layers bypassed) is available.

We run our own loop rather than TRL's GRPOTrainer: the gold member of a group is off-policy (GRPOTrainer's
`rollout_func` is experimental and its loss assumes on-policy samples with their sampling log-probs), the expert
state is only z (HF Trainer checkpoints save the whole model and cannot promise bit-exact z after a kill), and the
per-step overhead matters on CPU. TRL is used where it fits: its reward-function convention, its YAML/CLI parser,
and its vLLM client for GPU rollouts.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rewards import RewardSet
from t2edit.data.records import EditRecord
from t2edit.editing import EditedModel, Editor
from t2edit.experts import Expert
from t2edit.rollouts import HFRollouts
from t2edit.routing import RoutedModel, calibrate_router
from t2edit.svf import SVFConfig, SVFModel, apply_svf, model_bypassed
from t2edit.text import answer_matches

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Everything one training run needs; parsed from YAML + command line by scripts/train_rl.py."""

    # what to edit
    data: str = field(default="builtin", metadata={"help": "KnowEdit/CounterFact/ZsRE file, hub name, or 'builtin'"})
    model: str | None = field(default=None, metadata={"help": "HF model name/path; default: the world model of `data`"})
    world_preset: str = field(default="default", metadata={"help": "fact-world size when model is unset: default | tiny"})
    start: int = field(default=0, metadata={"help": "index of the first edited record"})
    n_edits: int = field(default=50, metadata={"help": "number of records edited into one expert"})
    output_dir: str = field(default="runs/expert", metadata={"help": "expert, checkpoints, metrics, plots"})
    # SVF (Transformer² defaults)
    # SVF. Transformer² uses mask "sigmoid", norm_preserving, z_init 0.1; on fact worlds the identity mask learns
    # edits several times faster (measured: README), so it is the default; configs/knowedit_llama3.2-1b.yaml
    # keeps Transformer²'s.
    target_modules: str = "mlp"
    mask: str = "identity"
    max_mult: float = 1.0
    norm_preserving: bool = False
    z_init: float = 1.0
    # optimisation (Transformer²: Adam, lr 2e-3, grad-norm clip 1e-3; a tiny world needs the larger step)
    learning_rate: float = 0.2
    max_grad_norm: float = 1e-3
    steps: int = 250
    lr_scheduler_type: str = field(default="cosine", metadata={
        "help": "transformers scheduler name: cosine | linear | constant | ... (decays to 0 over `steps`)"})
    warmup_steps: int = 0
    # REINFORCE
    group_size: int = field(default=2, metadata={"help": "sampled answers per prompt (plus the guide, if on)"})
    guided: bool = field(default=True, metadata={"help": "add the rewarded answer to each group (sparse-reward fix)"})
    baseline: str = field(default="group_mean", metadata={"help": "group_mean | leave_one_out | none"})
    temperature: float = 1.0
    max_new_tokens: int = field(default=0, metadata={"help": "0: longest answer in tokens + 2"})
    edits_per_step: int = 50
    neighbours_per_step: int = field(default=64, metadata={"help": "prompts of other facts per step"})
    subject_neighbours_per_step: int = field(default=0, metadata={
        "help": "other relations asked about the edited subjects, trained on per step (0: only calibrate routing)"})
    kl_coef: float = field(default=10.0, metadata={"help": "weight of KL(unedited ‖ edited) on neighbour prompts"})
    rewards: dict = field(default_factory=lambda: {"exact_match": 1.0, "locality": 1.0})
    route_margin: float = field(default=0.5, metadata={
        "help": "router threshold: this far from the closest neighbour prompt's similarity to 1 (t2edit.routing)"})
    neighbour_data: str | None = field(default=None, metadata={"help": "extra file of other facts for neighbours"})
    # bookkeeping
    seed: int = 0
    save_every: int = 25
    eval_every: int = 25
    resume: bool = False
    report_to: str = field(default="none", metadata={"help": "none | wandb"})
    wandb_project: str = "t2edit"
    rollout_backend: str = field(default="transformers", metadata={"help": "transformers | vllm"})
    vllm_server_url: str = "http://localhost:8000"
    progress: bool = True

    def svf_config(self) -> SVFConfig:
        return SVFConfig(target_modules=self.target_modules, mask=self.mask, max_mult=self.max_mult,
                         norm_preserving=self.norm_preserving, z_init=self.z_init)


@dataclass
class TrainItem:
    """One prompt the trainer samples from, with the answers its reward accepts."""

    prompt: str
    answers: list[str]
    kind: str  # "edit" | "neighbour"


# ----------------------------------------------------------------------------------------------------------------
# Building the prompt pools (the no-leakage rule lives here)
# ----------------------------------------------------------------------------------------------------------------

def forbidden_prompts(edits: list[EditRecord]) -> set[str]:
    """What the evaluation scores for these edits besides the edit prompt: never trained on."""
    forbidden = set()
    for record in edits:
        forbidden |= record.scored_prompts()
    return forbidden


def neighbour_candidates(edits: list[EditRecord], others: list[EditRecord], extra_prompts=()) -> list[str]:
    """Prompts of *other* facts: other records' edit, locality and portability prompts, plus extra prompts (e.g. a
    fact world's other facts), minus every prompt the evaluation scores for the edited records and minus the edit
    prompts themselves."""
    blocked = forbidden_prompts(edits) | {r.prompt for r in edits}
    seen, pool = set(), []
    candidates = list(extra_prompts)
    for record in others:
        candidates.append(record.prompt)
        for probes in record.locality.values():
            candidates += [p.prompt for p in probes]
    for prompt in candidates:
        if prompt and prompt not in blocked and prompt not in seen:
            seen.add(prompt)
            pool.append(prompt)
    return pool


SUBJECT_SLOT = "\x00subject\x00"  # a placeholder no prompt contains (prompts may hold literal braces)


def relation_templates(records: list[EditRecord], with_locality: bool = True) -> dict[str, set[str]]:
    """subject → the relation templates ("The spouse of {} is") asked about it in these records' edit prompts (and
    locality prompts). Only prompts that contain the subject verbatim give a template."""
    asked: dict[str, set[str]] = {}
    for record in records:
        if not record.subject:
            continue
        prompts = [record.prompt] + ([p.prompt for probes in record.locality.values() for p in probes]
                                     if with_locality else [])
        for prompt in prompts:
            if record.subject in prompt:
                asked.setdefault(record.subject, set()).add(prompt.replace(record.subject, SUBJECT_SLOT, 1))
    return asked


def subject_neighbour_candidates(edits: list[EditRecord], others: list[EditRecord], per_edit: int = 8) -> list[str]:
    """Same-subject anchors: each edited subject asked about relations other than the edited one.

    An edit should change (subject, relation) and nothing else the model says about the subject (ROME anchors the
    subject's "essence" the same way). The relations come from the *other* records: first those asked about other
    subjects that were also asked the edited relation (people get spouse / occupation / employer, rivers get
    mouth / country ...), then those asked together with these, then the most frequent ones (the other edits'
    relations included). Prompts the evaluation scores for the edited records are
    removed, so the edited records' own locality prompts are never among them."""
    blocked = forbidden_prompts(edits) | {r.prompt for r in edits}
    asked = relation_templates(others)
    frequency: dict[str, int] = {}
    co_occurring: dict[str, dict[str, int]] = {}
    # The edited relations themselves are fair questions about the *other* edited subjects.
    for templates in relation_templates(edits, with_locality=False).values():
        for template in templates:
            frequency[template] = frequency.get(template, 0) + 1
    for templates in asked.values():
        for template in templates:
            frequency[template] = frequency.get(template, 0) + 1
            counts = co_occurring.setdefault(template, {})
            for other in templates - {template}:
                counts[other] = counts.get(other, 0) + 1
    rankings: dict[str, list[str]] = {}  # edited relation → candidate relations, best first (shared by its edits)

    def ranked(edited: str) -> list[str]:
        if edited not in rankings:
            together = co_occurring.get(edited, {})
            two_hops = {t: sum(co_occurring[c].get(t, 0) for c in together) for t in frequency}
            rankings[edited] = sorted(frequency, key=lambda t: (-together.get(t, 0), -two_hops[t], -frequency[t], t))
        return rankings[edited]

    seen, pool = set(), []
    for record in edits:
        if not record.subject or record.subject not in record.prompt:
            continue
        edited = record.prompt.replace(record.subject, SUBJECT_SLOT, 1)
        prompts = [t.replace(SUBJECT_SLOT, record.subject, 1) for t in ranked(edited)]
        fresh = [p for p in prompts if p not in blocked and p not in seen][:per_edit]
        seen.update(fresh)
        pool += fresh
    return pool


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 128) -> list[str]:
    rollouts = HFRollouts(model, tokenizer, batch_size=batch_size)
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        for ids in rollouts.sample(chunk, 1, 0.0, max_new_tokens):
            texts.append(tokenizer.decode(ids[0], skip_special_tokens=True).strip())
    return texts


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------

class SVFTrainer:
    def __init__(self, model: SVFModel, tokenizer, edits: list[EditRecord], neighbour_prompts: list[str],
                 config: TrainConfig, rollouts=None, accelerator=None, subject_prompts: list[str] = ()):
        if not edits:
            raise ValueError("no edits to train on; check the data file and the start / n_edits selection")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.accelerator = accelerator
        self.is_main = accelerator is None or accelerator.is_main_process
        self.output_dir = Path(config.output_dir)
        self.rewards = RewardSet(config.rewards)
        self.rollouts = rollouts or HFRollouts(model, tokenizer)
        self.edit_items = [TrainItem(r.prompt, list(r.target_new), "edit") for r in edits]
        self.edits = edits
        answer_tokens = max(len(tokenizer(" " + a, add_special_tokens=False)["input_ids"])
                            for r in edits for a in r.target_new)
        self.max_new_tokens = config.max_new_tokens or answer_tokens + 2
        # Neighbours keep the unedited model's own answer (not the dataset's): that is what locality measures.
        subject_prompts = list(subject_prompts)
        with model_bypassed(model):
            references = greedy_answers(model, tokenizer, neighbour_prompts + subject_prompts, self.max_new_tokens)
        items = [TrainItem(p, [a], "neighbour") for p, a in zip(neighbour_prompts + subject_prompts, references)]
        self.neighbour_items = [item for item in items[:len(neighbour_prompts)] if item.answers[0]]
        # A same-subject anchor the unedited model answers with the edited fact's old or new object asks the edited
        # fact again ("The industry of <person> is" → the old spouse): keeping that answer would fight the edit.
        self.subject_items = [item for item in items[len(neighbour_prompts):]
                              if item.answers[0] and not self._asks_edited_fact(item)]
        self.seen_prompts: set[str] = set()  # every prompt the policy was trained on (tests check no leakage)
        self.optimizer = torch.optim.Adam(model.z_parameters(), lr=config.learning_rate)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.step = 0
        self.rng = random.Random(config.seed)  # data order
        torch.manual_seed(config.seed)  # sampling (a resumed run restores the RNG state from its checkpoint)
        self.edit_order: list[int] = []
        self.neighbour_order: list[int] = []
        self.subject_order: list[int] = []

    def _asks_edited_fact(self, item: TrainItem) -> bool:
        return any(record.subject and record.subject in item.prompt and
                   answer_matches(item.answers[0], list(record.ground_truth) + list(record.target_new))
                   for record in self.edits)

    # -- data order (part of the checkpoint, so a resumed run sees the same batches) ---------------------------
    def _next_indices(self, order_name: str, pool_size: int, count: int) -> list[int]:
        order = getattr(self, order_name)
        picked = []
        while len(picked) < min(count, pool_size):
            if not order:
                order.extend(self.rng.sample(range(pool_size), pool_size))
            picked.append(order.pop())
        return picked

    def next_batch(self) -> list[TrainItem]:
        edits = [self.edit_items[i] for i in self._next_indices("edit_order", len(self.edit_items),
                                                                 self.config.edits_per_step)]
        neighbours = [self.neighbour_items[i] for i in self._next_indices(
            "neighbour_order", len(self.neighbour_items), self.config.neighbours_per_step)]
        neighbours += [self.subject_items[i] for i in self._next_indices(
            "subject_order", len(self.subject_items), self.config.subject_neighbours_per_step)]
        if self.accelerator is not None and self.accelerator.num_processes > 1:  # each process takes its share
            rank, world = self.accelerator.process_index, self.accelerator.num_processes
            edits, neighbours = edits[rank::world], neighbours[rank::world]
        return edits + neighbours

    # -- one step ----------------------------------------------------------------------------------------------
    def _answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def training_step(self) -> dict:
        config, tokenizer = self.config, self.tokenizer
        items = self.next_batch()
        self.seen_prompts.update(item.prompt for item in items)
        sampled = self.rollouts.sample([i.prompt for i in items], config.group_size, config.temperature,
                                       self.max_new_tokens)
        prompts, completions, kinds, answers, group_of, is_guide = [], [], [], [], [], []
        for g, (item, group) in enumerate(zip(items, sampled)):
            members = [list(ids) for ids in group]
            if config.guided:
                members.append(self._answer_ids(item.answers[0]))
            for m, ids in enumerate(members):
                prompts.append(item.prompt)
                completions.append(ids)
                kinds.append(item.kind)
                answers.append(item.answers)
                group_of.append(g)
                is_guide.append(config.guided and m == len(members) - 1)
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
        total, per_reward = self.rewards(prompts, texts, kind=kinds, answers=answers)
        rewards = torch.tensor(total, dtype=torch.float32)
        advantages = group_advantages(rewards, torch.tensor(group_of), config.baseline)

        self.model.train()
        # The KL anchor applies to neighbour rows only: edit rows are meant to move away from the unedited model.
        kl_rows = torch.tensor([k == "neighbour" for k in kinds]) if config.kl_coef > 0 else None
        logps, kl = sequence_logprobs(self.model, tokenizer, prompts, completions, kl_rows=kl_rows)
        loss = -(advantages * logps).mean()
        if config.kl_coef > 0:
            loss = loss + config.kl_coef * kl.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        z_params = self.model.z_parameters()
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            for p in z_params:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        grad_norm = torch.nn.utils.clip_grad_norm_(z_params, config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.rollouts.sync_weights()
        self.model.eval()
        self.step += 1

        sampled_mask = [not g for g in is_guide]
        metrics = {"step": self.step, "loss": loss.item(), "grad_norm": grad_norm.item(),
                   "lr": self.optimizer.param_groups[0]["lr"],
                   "reward": _mean([r for r, s in zip(total, sampled_mask) if s])}
        for name, values in per_reward.items():
            metrics[f"reward/{name}"] = _mean([v for v, s in zip(values, sampled_mask) if s and v is not None])
        metrics["edit_success_sampled"] = _mean([float(answer_matches(t, a)) for t, a, k, s in
                                                 zip(texts, answers, kinds, sampled_mask) if k == "edit" and s])
        if config.kl_coef > 0:
            metrics["kl"] = kl[kl_rows].mean().item()
        z = torch.cat([p.detach().flatten() for p in z_params])
        metrics.update({"z/mean": z.mean().item(), "z/std": z.std().item(), "z/min": z.min().item(),
                        "z/max": z.max().item()})
        return metrics

    def edit_success_greedy(self) -> float:
        """Strict edit success on the training (edit) prompts: greedy answer matches the target."""
        said = greedy_answers(self.model, self.tokenizer, [i.prompt for i in self.edit_items], self.max_new_tokens)
        return _mean([float(answer_matches(s, i.answers)) for s, i in zip(said, self.edit_items)])

    # -- the loop ----------------------------------------------------------------------------------------------
    def train(self) -> Expert:
        from tqdm.auto import tqdm

        config = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if config.resume:
            self.load_checkpoint()
        elif (self.output_dir / CHECKPOINT_NAME).exists():
            raise FileExistsError(f"{self.output_dir} holds a checkpoint of an earlier run; pass --resume to "
                                  f"continue it or choose another output_dir")
        tracker = _start_wandb(config) if self.is_main else None
        metrics_path = self.output_dir / METRICS_NAME
        if not config.resume and metrics_path.exists():
            metrics_path.unlink()
        started = time.time()
        bar = tqdm(total=config.steps, initial=self.step, desc="REINFORCE on z", disable=not (config.progress
                                                                                                and self.is_main))
        while self.step < config.steps:
            metrics = self.training_step()
            if config.eval_every and (self.step % config.eval_every == 0 or self.step == config.steps):
                metrics["edit_success_greedy"] = self.edit_success_greedy()
            metrics["seconds"] = round(time.time() - started, 2)
            if self.is_main:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(metrics) + "\n")
                if tracker is not None:
                    tracker.log(metrics, step=self.step)
                if config.save_every and self.step % config.save_every == 0:
                    self.save_checkpoint()
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.2f}", es=f"{metrics['edit_success_sampled']:.2f}")
        bar.close()
        # The router's keys are the edit prompts; what it must not route are the prompts trained to stay unchanged.
        router = calibrate_router(self.model, self.tokenizer, [r.prompt for r in self.edits],
                                  [i.prompt for i in self.neighbour_items + self.subject_items], config.route_margin)
        expert = Expert.from_model(self.model, router=router, info={
            "name": self.output_dir.name, "edits": len(self.edits), "steps": self.step, "data": config.data,
            "train_config": asdict(config), "edit_prompts": [r.prompt for r in self.edits]})
        if self.is_main:
            expert.save_pretrained(self.output_dir / "expert")
            plot_reward_curves(metrics_path, self.output_dir / "reward_curve.png")
        if tracker is not None:
            tracker.finish()
        return expert

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self):
        state = {"step": self.step, "z": self.model.get_z(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state(), "python_rng": list(_jsonable_state(self.rng.getstate())),
                 "edit_order": list(self.edit_order), "neighbour_order": list(self.neighbour_order),
                 "subject_order": list(self.subject_order)}
        tmp = self.output_dir / f".{CHECKPOINT_NAME}.tmp{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, self.output_dir / CHECKPOINT_NAME)  # atomic: a kill leaves the old or the new one

    def load_checkpoint(self):
        path = self.output_dir / CHECKPOINT_NAME
        if not path.exists():
            return  # --resume on a fresh directory starts from step 0
        state = torch.load(path, weights_only=True)
        self.model.set_z(state["z"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        version, internal, gauss = state["python_rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.edit_order, self.neighbour_order = list(state["edit_order"]), list(state["neighbour_order"])
        self.subject_order = list(state.get("subject_order", []))
        self.step = state["step"]
        # Metrics logged after this checkpoint by the killed run are dropped so the log has each step once.
        metrics_path = self.output_dir / METRICS_NAME
        if metrics_path.exists():
            kept = [line for line in metrics_path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= self.step]
            metrics_path.write_text("".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------------------------------------------
# Pieces of the objective
# ----------------------------------------------------------------------------------------------------------------

def make_scheduler(optimizer, config: TrainConfig):
    """The learning-rate schedule, by its transformers name. A decaying rate settles z once most edits are learned
    (at a constant lr 0.2, greedy edit success on a KnowEdit world swung between 0.64 and 0.88 from step 200 on)."""
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    names = [kind.value for kind in SchedulerType]
    if config.lr_scheduler_type not in names:
        raise ValueError(f"lr_scheduler_type={config.lr_scheduler_type!r} is not a transformers scheduler; choose "
                         f"one of {', '.join(names)}")
    return get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=config.steps)


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, baseline: str) -> torch.Tensor:
    """reward − baseline within each group: the group mean (GRPO without std scaling), the mean of the other
    members (RLOO), or no baseline (Transformer²'s default)."""
    if baseline == "none":
        return rewards
    n_groups = int(groups.max()) + 1
    sums = torch.zeros(n_groups).index_add_(0, groups, rewards)
    counts = torch.zeros(n_groups).index_add_(0, groups, torch.ones_like(rewards))
    if baseline == "group_mean":
        return rewards - (sums / counts)[groups]
    if baseline == "leave_one_out":
        others = (counts[groups] - 1).clamp(min=1)
        return rewards - (sums[groups] - rewards) / others
    raise ValueError(f"baseline={baseline!r} is not one of group_mean, leave_one_out, none")


def sequence_logprobs(model: SVFModel, tokenizer, prompts: list[str], completions: list[list[int]],
                      kl_rows: torch.Tensor | None = None):
    """Σ log π(completion | prompt) per row (differentiable in z) and, for the rows marked in `kl_rows`, the
    exact KL(π_unedited ‖ π) over the vocabulary, summed over the completion's positions (0 elsewhere)."""
    device = model.device
    rows, starts = [], []
    for prompt, ids in zip(prompts, completions):
        prompt_ids = tokenizer(prompt)["input_ids"]
        rows.append(prompt_ids + list(ids))
        starts.append(len(prompt_ids))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts)):  # right padding keeps positions starting at 0
        input_ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
        target_mask[i, start:len(row)] = True
    input_ids, attention, target_mask = input_ids.to(device), attention.to(device), target_mask.to(device)

    mask = target_mask[:, 1:].float()
    policy = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float(), -1)
    per_row = (policy.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * mask).sum(-1)
    if kl_rows is None or not bool(kl_rows.any()):
        return per_row, torch.zeros_like(per_row)
    kl_rows = kl_rows.to(device)
    with torch.no_grad(), model_bypassed(model):
        reference = torch.log_softmax(model(input_ids=input_ids[kl_rows], attention_mask=attention[kl_rows])
                                      .logits[:, :-1].float(), -1)
    kl_tokens = (reference.exp() * (reference - policy[kl_rows])).sum(-1)
    kl = torch.zeros_like(per_row)
    kl[kl_rows] = (kl_tokens * mask[kl_rows]).sum(-1)
    return per_row, kl


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


def _jsonable_state(state):
    version, internal, gauss = state
    return version, list(internal), gauss


def _start_wandb(config: TrainConfig):
    if config.report_to != "wandb":
        return None
    import wandb

    if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")):
        os.environ["WANDB_MODE"] = "offline"  # never prompt for a login
    return wandb.init(project=config.wandb_project, dir=config.output_dir, config=asdict(config),
                      settings=wandb.Settings(silent=True))


def plot_reward_curves(metrics_path: Path, out_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    if not rows:
        return
    keys = [k for k in rows[0] if k.startswith("reward") or k == "edit_success_sampled"]
    figure, axis = plt.subplots(figsize=(7, 4))
    for key in keys:
        axis.plot([r["step"] for r in rows], [r.get(key) for r in rows], label=key)
    greedy = [(r["step"], r["edit_success_greedy"]) for r in rows if "edit_success_greedy" in r]
    if greedy:
        axis.plot(*zip(*greedy), "o-", label="edit_success_greedy")
    axis.set_xlabel("step")
    axis.set_ylabel("value")
    axis.set_title("SVF expert training")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    os.replace(tmp, out_path)


# ----------------------------------------------------------------------------------------------------------------
# SVF as an Editor (same interface as the baselines, so one evaluation path scores it)
# ----------------------------------------------------------------------------------------------------------------

class SVFEditor(Editor):
    """Trains an SVF expert for the given edits (or applies a trained one) and returns the edited model.

    `neighbour_records` / `neighbour_prompts` are the other facts used for locality training; prompts the
    evaluation scores for the edited records are removed from them here, whatever the caller passes.

    `route=True` (method "svf") answers in two passes: the expert applies only to prompts its router picks
    (t2edit.routing); `route=False` (method "svf-always") applies it to every prompt."""

    name = "svf"

    def __init__(self, config: TrainConfig | None = None, expert_dir: str | None = None,
                 neighbour_records: list[EditRecord] = (), neighbour_prompts: list[str] = (), route: bool = True,
                 **overrides):
        self.config = config or TrainConfig(**overrides)
        self.route = route
        self.name = "svf" if route else "svf-always"
        self.expert_dir = expert_dir
        self.neighbour_records = list(neighbour_records)
        self.neighbour_prompts = list(neighbour_prompts)
        self.last_trainer: SVFTrainer | None = None
        self.calls = 0

    def edit(self, model, tokenizer, records):
        if self.expert_dir:
            expert = Expert.from_pretrained(self.expert_dir)
            svf_model = expert.load_into(model)
        else:
            svf_model = apply_svf(model, self.config.svf_config(), progress=False)
            edited = {r.prompt for r in records}
            others = [r for r in self.neighbour_records if r.prompt not in edited]
            pool = neighbour_candidates(records, others, self.neighbour_prompts)
            subject_pool = subject_neighbour_candidates(records, others)
            # One directory per edit call; no checkpoints (an evaluation re-runs its edits rather than resuming).
            self.calls += 1
            config = TrainConfig(**{**asdict(self.config), "save_every": 0, "resume": False,
                                    "output_dir": str(Path(self.config.output_dir) / f"edit-{self.calls:04d}")})
            self.last_trainer = SVFTrainer(svf_model, tokenizer, records, pool, config, subject_prompts=subject_pool)
            expert = self.last_trainer.train()
        svf_model.eval()
        if not self.route:
            return EditedModel(model=svf_model, restore=svf_model.unload)
        if expert.router is None:
            svf_model.unload()
            raise ValueError(f"the expert in {self.expert_dir} has no router (a mixture, or trained by an older "
                             f"t2edit); evaluate it with method svf-always, or retrain it")
        return EditedModel(model=RoutedModel(svf_model, expert.router), restore=svf_model.unload)


# ----------------------------------------------------------------------------------------------------------------
# Command line: `accelerate launch scripts/train_rl.py --config configs/demo.yaml [--key value ...]`
# ----------------------------------------------------------------------------------------------------------------

def parse_train_config(argv: list[str] | None = None) -> TrainConfig:
    """YAML (`--config FILE`) then command-line overrides, TRL style. `rewards` on the command line is JSON."""
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        path = argv[argv.index("--config") + 1]
        if not Path(path).exists():
            raise FileNotFoundError(f"config file {path} not found; see configs/ for examples")
    rewards = None
    if "--rewards" in argv:  # a mapping does not fit argparse: take it as JSON
        at = argv.index("--rewards")
        try:
            rewards = json.loads(argv[at + 1])
        except (IndexError, json.JSONDecodeError):
            raise ValueError('--rewards takes JSON, e.g. --rewards \'{"exact_match": 1.0, "locality": 1.0}\'') from None
        del argv[at:at + 2]
    (config,) = TrlParser((TrainConfig,)).parse_args_and_config(argv)
    if rewards is not None:
        config.rewards = rewards
    return config


def main(argv: list[str] | None = None):
    from accelerate import Accelerator

    from t2edit.jobs import run_training

    config = parse_train_config(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    expert, setup = run_training(config, accelerator)
    if accelerator.is_main_process:
        print(f"[t2edit] expert for {len(setup.edits)} edits written to {Path(config.output_dir) / 'expert'}")
    return expert
