"""The REINFORCE loop that trains one SVF expert for a batch of edits.

Each step samples a group of answers for some edit prompts and some neighbour prompts, scores them with the reward
plugins, and pushes z along Σ advantage · ∇log π(answer). Two additions make it work for knowledge editing:

* Guided groups (the sparse-reward fix): a counterfactual target is essentially never sampled by the unedited model,
  so every sampled reward is 0 and plain REINFORCE has no gradient. One member of each group is therefore the
  rewarded answer itself (the new target on edit prompts, the unedited model's own answer on neighbour prompts),
  scored by the same reward; the group baseline gives it a positive advantage exactly while the policy does not yet
  produce it, and none once it does.
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

import contextlib
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rewards import RewardSet
from t2edit.batching import check_fits_context
from t2edit.data.records import EditRecord
from t2edit.distributed import Processes, gather, share
from t2edit.experts import Expert, ExpertInfo
from t2edit.files import atomic_write, atomic_write_json
from t2edit.plots import plot_curves
from t2edit.precision import autocast_context
from t2edit.runs import KEY_NAME, check_run_key, edits_digest, run_lock
from t2edit.rollouts import HFRollouts, greedy_answers
from t2edit.routing.base import edit_entries
from t2edit.routing.embedding import calibrate_own_router
from t2edit.svf import SVFModel, model_bypassed
from t2edit.text import answer_matches
from t2edit.training.config import TrainConfig
from t2edit.training.objective import (forced_answer_hits, group_advantages, make_scheduler, score_rows,
                                       sequence_logprobs)
from t2edit.training.references import UneditedModelCache

log = logging.getLogger("t2edit")
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainItem:
    """One prompt the trainer samples from, with the answers its reward accepts."""

    prompt: str
    answers: list[str]
    kind: str  # "edit" | "neighbour"
    key: int = 0  # position in the step's whole batch (over every process): what its samples are drawn from


class SVFTrainer:
    def __init__(self, model: SVFModel, tokenizer, edits: list[EditRecord], neighbour_prompts: list[str],
                 config: TrainConfig, rollouts=None, accelerator=None, subject_prompts: list[str] = (),
                 unedited: UneditedModelCache | None = None):
        if not edits:
            raise ValueError("no edits to train on; check the data file and the start / n_edits selection")
        if config.objective not in ("reinforce", "ce"):
            raise ValueError(f"objective={config.objective!r}; choose reinforce (the product's) or ce (supervised "
                             f"cross-entropy on the target, the reference it is measured against)")
        check_fits_context(model, tokenizer, [(f"record {r.index}'s edit", f"{r.prompt} {max(r.target_new, key=len)}")
                                              for r in edits], 2)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        # What the unedited model says about the neighbours and negatives: kept by a caller that trains many experts
        # on one base model (a single-edit run, a stream), so each is computed once for all of them.
        self.unedited = unedited if unedited is not None else UneditedModelCache()
        self.accelerator = accelerator
        self.is_main = accelerator is None or accelerator.is_main_process
        # Data parallel under `accelerate launch --num_processes N`: each process takes its share of a step's edits,
        # neighbours and anchors, and z's gradients are summed over the processes. A model sharded across the
        # processes (FSDP, `t2edit.training.sharding`) is not data-split: every process runs the whole step on its
        # shard of the weights, in lock step.
        self.procs = Processes(accelerator.process_index, accelerator.num_processes) if accelerator is not None \
            else Processes()
        self.data_procs = Processes() if getattr(model, "sharded", False) else self.procs
        self.output_dir = Path(config.output_dir)
        self.rewards = RewardSet(config.rewards)
        self.rollouts = rollouts or HFRollouts(model, tokenizer)
        self.edit_items = [TrainItem(r.prompt, list(r.target_new), "edit") for r in edits]
        self.edits = edits
        # Token budgets: the rewards read an answer and the word after it, so an edit prompt generates its own longest
        # accepted answer + 2 tokens (not the longest of the batch: one 23-token answer would make fifty 3-token ones
        # generate 25 tokens each). Neighbour references get the longest edit budget.
        self.budgets = {item.prompt: config.max_new_tokens or 2 + max(
            len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for a in item.answers)
            for item in self.edit_items}
        self.max_new_tokens = max(self.budgets.values())
        # Neighbours keep the unedited model's own answer (not the dataset's): that is what locality measures. The
        # answers are computed lazily, for the neighbours a step draws, and cached: a pool of thousands of prompts
        # costs nothing before step 1.
        self.neighbour_prompts = list(neighbour_prompts)
        self.subject_prompts = list(subject_prompts)
        self.seen_prompts: set[str] = set()  # every prompt the policy was trained on (tests check no leakage)
        single = len(edits) == 1 and config.single_edit_learning_rate is not None
        self.optimizer = torch.optim.Adam(model.z_parameters(),
                                          lr=config.single_edit_learning_rate if single else config.learning_rate)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.step = 0
        self.rng = random.Random(config.seed)  # data order
        torch.manual_seed(config.seed)  # sampling (a resumed run restores the RNG state from its checkpoint)
        self.edit_order: list[int] = []
        self.neighbour_order: list[int] = []
        self.subject_order: list[int] = []

    def _asks_edited_fact(self, prompt: str, answer: str) -> bool:
        """A same-subject anchor the unedited model answers with the edited fact's old or new object asks the
        edited fact again ("The industry of <person> is" → the old spouse): keeping that answer would fight it."""
        return any(record.subject and record.subject in prompt and
                   answer_matches(answer, list(record.ground_truth) + list(record.target_new))
                   for record in self.edits)

    def _with_references(self, keyed: list[tuple[int, str]], anchors: bool) -> list[TrainItem]:
        prompts = [p for _, p in keyed]
        # The answers of the neighbours the next steps will draw are generated in the same call when any is missing.
        order, pool = (self.subject_order, self.subject_prompts) if anchors else \
            (self.neighbour_order, self.neighbour_prompts)
        upcoming = list(dict.fromkeys(pool[i] for i in reversed(order)))[:max(0, self.config.reference_batch
                                                                                  - len(prompts))]
        with model_bypassed(self.model), autocast_context(self.model.device, self.config.precision):
            answers = self.unedited.greedy_answers(self.model, self.tokenizer, prompts, self.max_new_tokens, upcoming)
        items = []
        for (key, prompt), answer in zip(keyed, answers):
            if answer and not (anchors and self._asks_edited_fact(prompt, answer)):
                items.append(TrainItem(prompt, [answer], "neighbour", key))
        return items

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
        """This process's share of the step's batch. Every process draws the same whole batch (same data-order
        state), numbers its items (`TrainItem.key`) and keeps items rank, rank + N, ... of each kind."""
        edits = [self.edit_items[i] for i in self._next_indices("edit_order", len(self.edit_items),
                                                                 self.config.edits_per_step)]
        per_step = self.config.neighbours_per_step
        if self.config.neighbours_per_edit:
            per_step = min(per_step, self.config.neighbours_per_edit * len(self.edit_items))
        neighbours = [self.neighbour_prompts[i] for i in self._next_indices("neighbour_order",
                                                                            len(self.neighbour_prompts), per_step)]
        anchors = [self.subject_prompts[i] for i in self._next_indices(
            "subject_order", len(self.subject_prompts), self.config.subject_neighbours_per_step)]
        edits = [TrainItem(item.prompt, item.answers, item.kind, k) for k, item in enumerate(edits)]
        neighbours = list(enumerate(neighbours, start=len(edits)))
        anchors = list(enumerate(anchors, start=len(edits) + len(neighbours)))
        rank, world = self.data_procs.index, self.data_procs.count
        edits, neighbours, anchors = edits[rank::world], neighbours[rank::world], anchors[rank::world]
        return edits + self._with_references(neighbours, anchors=False) + self._with_references(anchors, True)

    def _sample_seed(self, item: TrainItem) -> int:
        """What an item's rollouts are drawn from at this step: the run's seed, the step and the item's place in
        the whole batch, so a step samples the same rollouts however its batch is split over processes."""
        return (self.config.seed * 1_000_003 + self.step) * 1_000_033 + item.key

    # -- one step ----------------------------------------------------------------------------------------------
    def _answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def _groups(self, items: list[TrainItem]):
        """The rows to score: for each sampled item a group of rollouts (plus the guide), for CE the target alone,
        for neighbours that are not sampled the unedited answer alone (KL-anchored)."""
        config, reinforce = self.config, self.objective_now() == "reinforce"
        sampled_items = [i for i in items if reinforce and (i.kind == "edit" or config.sample_neighbours)]
        with autocast_context(self.model.device, config.precision):  # sampling is a large share of a step in fp32
            sampled = iter(self.rollouts.sample(
                [i.prompt for i in sampled_items], config.group_size, config.temperature,
                [self.budgets.get(i.prompt, self.max_new_tokens) for i in sampled_items], top_k=config.top_k,
                top_p=config.top_p, seeds=[self._sample_seed(i) for i in sampled_items]) if sampled_items else [])
        for item in items:
            if reinforce and (item.kind == "edit" or config.sample_neighbours):
                members = [list(ids) for ids in next(sampled)]
                guide = [self._answer_ids(item.answers[0])] if config.guided else []
                yield item, members + guide, [False] * len(members) + [True] * len(guide)
            else:
                yield item, [self._answer_ids(item.answers[0])], [True]

    def objective_now(self) -> str:
        """The objective of the step about to run: ce during the warm start, the config's after it."""
        return "ce" if self.step < self.config.warm_start_steps else self.config.objective

    def training_step(self) -> dict:
        config, tokenizer = self.config, self.tokenizer
        started, sampling_before = time.perf_counter(), getattr(self.rollouts, "generate_seconds", 0.0)
        items = self.next_batch()
        references_done = time.perf_counter()
        self.seen_prompts.update(item.prompt for item in items)
        prompts, completions, kinds, answers, group_of, is_guide = [], [], [], [], [], []
        for g, (item, members, guides) in enumerate(self._groups(items)):
            for ids, guide in zip(members, guides):
                prompts.append(item.prompt)
                completions.append(ids)
                kinds.append(item.kind)
                answers.append(item.answers)
                group_of.append(g)
                is_guide.append(guide)
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
        total, per_reward = self.rewards(prompts, texts, kind=kinds, answers=answers)
        rewards = torch.tensor(total, dtype=torch.float32)
        groups = torch.tensor(group_of)
        if self.objective_now() == "ce":  # every row is a target: weight 1 on edits, KL alone on neighbours
            advantages = torch.tensor([1.0 if k == "edit" else 0.0 for k in kinds])
        else:
            advantages = group_advantages(rewards, groups, config.baseline) if len(groups) else rewards
            if not config.sample_neighbours:
                advantages[torch.tensor([k == "neighbour" for k in kinds])] = 0.0
        rows = score_rows(completions, advantages, groups, kinds, config.kl_coef > 0)

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        z_params = self.model.z_parameters()
        # The loss is normalised by the whole batch's counts (every process's share), and the processes' gradients
        # are summed: the step's gradient is then the one a single process would take over the whole batch.
        local_kl = sum(kinds[r] == "neighbour" for r in rows.index) if config.kl_coef > 0 else 0
        counts = gather((len(items), local_kl), self.data_procs)
        n_groups = max(1, sum(c[0] for c in counts))
        n_kl = sum(c[1] for c in counts)
        loss_value, kl_values = 0.0, []
        # Rows go through forward + backward in chunks of whole groups (a group shares its prompt's forward), the
        # gradients adding up: a step's memory stays bounded however many rollouts it scores (all rows at once can
        # exhaust memory even on a small model).
        for chunk in _group_chunks(rows.index, group_of, config.rows_per_chunk):
            chunk_rows = [rows.index[k] for k in chunk]
            kl_rows = torch.tensor([kinds[r] == "neighbour" for r in chunk_rows]) if n_kl else None
            logps, kl = sequence_logprobs(self.model, tokenizer, [prompts[r] for r in chunk_rows],
                                          [completions[r] for r in chunk_rows], kl_rows=kl_rows,
                                          precision=config.precision, references=self.unedited)
            # Σ advantage · log π over the distinct rollouts, per prompt of the batch (a fixed denominator: rows
            # whose advantage is 0 are skipped, which must not change the scale of the others).
            loss = -(rows.advantage[chunk].to(logps.device) * logps).sum() / n_groups
            if n_kl:
                kl_values += kl[kl_rows.to(kl.device)].tolist()
                loss = loss + config.kl_coef * kl[kl_rows.to(kl.device)].sum() / n_kl
            if loss.requires_grad:
                loss.backward()
            loss_value += loss.item()
        for p in z_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.data_procs.launched:  # one all-reduce of every z's gradient, flattened together
            summed = self.accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in z_params]), reduction="sum")
            for p, grad in zip(z_params, summed.split([p.numel() for p in z_params])):
                p.grad = grad.view_as(p).clone()
        grad_norm = torch.nn.utils.clip_grad_norm_(z_params, config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.rollouts.sync_weights()
        self.model.eval()
        self.step += 1

        sampled_mask = [not g for g in is_guide]
        # Where a step's time goes: neighbour reference answers (every few steps), sampling, and the rest (scoring,
        # backward, update).
        sampling = getattr(self.rollouts, "generate_seconds", 0.0) - sampling_before
        timing = {"time/references": references_done - started, "time/sampling": sampling,
                  "time/step": time.perf_counter() - started}
        sync = getattr(self.rollouts, "last_sync", None)  # vLLM samplers: what pushing the new z cost
        if sync:
            timing.update({"time/sync": sync["seconds"], "sync/bytes": sync["bytes"]})
            if sync.get("transfer_seconds") is not None:
                timing["time/sync_transfer"] = sync["transfer_seconds"]
        # The step's figures over the whole batch: every process's share, gathered (a no-op in one process).
        mine = {"loss": loss_value, "rows": len(rows.index), "kl": kl_values,
                "reward": [r for r, s in zip(total, sampled_mask) if s],
                "per_reward": {name: [v for v, s in zip(values, sampled_mask) if s and v is not None]
                               for name, values in per_reward.items()},
                "edit_success": [float(answer_matches(t, a)) for t, a, k, s in
                                 zip(texts, answers, kinds, sampled_mask) if k == "edit" and s]}
        shares = gather(mine, self.data_procs)
        metrics = {"step": self.step, **timing, "loss": sum(m["loss"] for m in shares), "grad_norm": grad_norm.item(),
                   "lr": self.optimizer.param_groups[0]["lr"], "rows_scored": sum(m["rows"] for m in shares),
                   "reward": _mean(r for m in shares for r in m["reward"])}
        for name in dict.fromkeys(name for m in shares for name in m["per_reward"]):
            metrics[f"reward/{name}"] = _mean(v for m in shares for v in m["per_reward"].get(name, []))
        metrics["edit_success_sampled"] = _mean(v for m in shares for v in m["edit_success"])
        kl_values = [v for m in shares for v in m["kl"]]
        if kl_values:
            metrics["kl"] = _mean(kl_values)
        z = torch.cat([p.detach().flatten() for p in z_params])
        metrics.update({"z/mean": z.mean().item(), "z/std": z.std().item(), "z/min": z.min().item(),
                        "z/max": z.max().item()})
        return metrics

    def edit_success_greedy(self) -> float:
        """Strict edit success on the training (edit) prompts: greedy answer matches the target."""
        mine = share(self.edit_items, self.data_procs)  # each process checks its share of the edits
        with autocast_context(self.model.device, self.config.precision):
            said = greedy_answers(self.model, self.tokenizer, [i.prompt for i in mine],
                                  [self.budgets[i.prompt] for i in mine]) if mine else []
        hits = gather([float(answer_matches(s, i.answers)) for s, i in zip(said, mine)], self.data_procs)
        return _mean(h for part in hits for h in part)

    def edit_success_forced(self) -> float:
        """The share of edit prompts whose target (any accepted answer) is the argmax at every one of its tokens
        when fed to the model: one forward instead of a greedy decode. A greedy answer that matches its target was
        produced that way, so this is an upper bound of `edit_success_greedy` that gates the greedy check."""
        mine = share(self.edit_items, self.data_procs)
        rows = [(i, answer) for i, item in enumerate(mine) for answer in item.answers]
        with torch.no_grad(), autocast_context(self.model.device, self.config.precision):
            hits = forced_answer_hits(self.model, self.tokenizer, [mine[i].prompt for i, _ in rows],
                                      [self._answer_ids(a)[:-1] for _, a in rows]) if rows else []
        edited = [False] * len(mine)
        for (i, _), hit in zip(rows, hits):
            edited[i] = edited[i] or hit
        return _mean(h for part in gather([float(e) for e in edited], self.data_procs) for h in part)

    def _check_edit_success(self, metrics: dict) -> None:
        """Strict edit success at an evaluation step, into `metrics`; sets `stopped_early` at the target. With a
        target, the greedy decode runs only once the teacher-forced bound reaches it (or at the last step)."""
        target = self.config.stop_at_edit_success
        if target and self.step < self.config.steps:
            metrics["edit_success_forced"] = self.edit_success_forced()
            if metrics["edit_success_forced"] < target:
                return
        metrics["edit_success_greedy"] = self.edit_success_greedy()
        if target and metrics["edit_success_greedy"] >= target:
            self.stopped_early = True

    def calibration_negatives(self) -> list[str]:
        """Prompts the router must leave alone: the neighbours and anchors, a bounded sample of them (encoding a
        pool of thousands of prompts is slow on a real model and moves the threshold little)."""
        prompts = list(dict.fromkeys(self.neighbour_prompts + self.subject_prompts))
        limit = self.config.router_calibration_prompts
        if limit and len(prompts) > limit:
            # The sample is picked by a hash of each prompt, not by its place in the pool, so experts trained on
            # pools that differ by a few prompts share almost all their negatives (and their cached states).
            seed = self.config.seed
            prompts = sorted(prompts, key=lambda p: hashlib.blake2b(f"{seed}:{p}".encode(), digest_size=8).digest())
            prompts = prompts[:limit]
        return prompts

    # -- the loop ----------------------------------------------------------------------------------------------
    def run_key(self) -> dict:
        """What this run's result depends on: the edits, the base model and every setting that changes the outcome
        (not where it writes, how often it saves, or how it reports)."""
        bookkeeping = {"output_dir", "progress", "resume", "report_to", "wandb_project", "save_every",
                       "vllm_server_url", "vllm_gpu_memory_utilization", "rows_per_chunk", "reference_batch"}
        settings = {k: v for k, v in asdict(self.config).items() if k not in bookkeeping}
        return {"edits": edits_digest(self.edits),
                "base_model": self.model.base_fingerprint, **settings}

    def train(self) -> Expert:
        lock = run_lock(self.output_dir) if self.is_main else contextlib.nullcontext()
        with lock:
            return self._train()

    def _train(self) -> Expert:
        from tqdm.auto import tqdm

        config = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = self.output_dir / CHECKPOINT_NAME
        if config.resume:
            if not checkpoint.exists():
                raise FileNotFoundError(f"--resume: {self.output_dir} holds no {CHECKPOINT_NAME} to continue; drop "
                                        f"--resume to start a new run there")
            check_run_key(self.output_dir, self.run_key(), "training run")
            self.load_checkpoint()
            log.info("resuming %s from step %d", self.output_dir, self.step)
        elif checkpoint.exists():
            raise FileExistsError(f"{self.output_dir} holds a checkpoint of an earlier run; pass --resume to "
                                  f"continue it or choose another output_dir")
        elif self.is_main:
            atomic_write_json(self.output_dir / KEY_NAME, self.run_key())
        self.rollouts.sync_weights(full=True)  # a vLLM sampler starts from the policy's z (fresh or resumed)
        tracker = _start_wandb(config) if self.is_main else None
        metrics_path = self.output_dir / METRICS_NAME
        if not config.resume and metrics_path.exists() and self.is_main:
            metrics_path.unlink()
        started = time.time()
        self.stopped_early = False
        bar = tqdm(total=config.steps, initial=self.step, desc="REINFORCE on z", disable=not (config.progress
                                                                                                and self.is_main))
        while self.step < config.steps:
            metrics = self.training_step()
            if config.eval_every and (self.step % config.eval_every == 0 or self.step == config.steps):
                self._check_edit_success(metrics)
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
            if self.stopped_early:
                break
        bar.close()
        # The router's keys are the edit prompts; what it must not route are the prompts trained to stay unchanged.
        router = calibrate_own_router(self.model, self.tokenizer, [r.prompt for r in self.edits],
                                      self.calibration_negatives(), config.route_margin,
                                      negative_states=self.unedited.negative_states)
        info = ExpertInfo(name=self.output_dir.name, steps=self.step, data=config.data, train_config=asdict(config),
                          train_seconds=round(time.time() - started, 2),
                          # the edits with their subjects: what the scope routers key on
                          edits=edit_entries(self.edits))
        expert = Expert.from_model(self.model, router=router, info=info, edit_prompts=[r.prompt for r in self.edits],
            learned_prompts=self.neighbour_prompts + self.subject_prompts)  # trained on; calibrated on a sample
        if self.is_main:
            expert.save_pretrained(self.output_dir / "expert")
            plot_reward_curves(metrics_path, self.output_dir / "reward_curve.png")
        if tracker is not None:
            tracker.finish()
        if self.procs.launched:  # no process returns before the main one has written the expert
            self.accelerator.wait_for_everyone()
        return expert

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self):
        state = {"step": self.step, "z": self.model.get_z(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state(), "python_rng": list(_jsonable_state(self.rng.getstate())),
                 "edit_order": list(self.edit_order), "neighbour_order": list(self.neighbour_order),
                 "subject_order": list(self.subject_order)}
        atomic_write(self.output_dir / CHECKPOINT_NAME, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self):
        path = self.output_dir / CHECKPOINT_NAME
        if not path.exists():
            return  # --resume on a fresh directory starts from step 0
        try:
            state = torch.load(path, weights_only=True)
            missing = [k for k in ("step", "z", "optimizer", "torch_rng", "python_rng") if k not in state]
        except Exception as error:  # truncated, bit-flipped or not a checkpoint at all
            raise ValueError(f"{path} is damaged ({type(error).__name__}); remove it to start over, or restore "
                             f"it") from None
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}; it is not a t2edit checkpoint — remove it to "
                             f"start over")
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
        if metrics_path.exists() and self.is_main:
            atomic_write(metrics_path, "".join(line + "\n" for line in metrics_path.read_text().splitlines()
                                               if _step_of(line) is not None and _step_of(line) <= self.step))


def _step_of(line: str) -> int | None:
    """The step of a metrics line, or None for a torn or foreign one (a kill mid-write leaves half a line)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _group_chunks(index: list[int], group_of: list[int], size: int) -> list[list[int]]:
    """Positions in `index` split into chunks of about `size` rows that never split a group."""
    chunks, current = [], []
    for k, row in enumerate(index):
        if current and len(current) >= size and group_of[row] != group_of[index[current[-1]]]:
            chunks.append(current)
            current = []
        current.append(k)
    return chunks + ([current] if current else [])


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
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    if not rows:
        return
    keys = [k for k in rows[0] if k.startswith("reward") or k == "edit_success_sampled"]
    greedy = [(r["step"], r["edit_success_greedy"]) for r in rows if "edit_success_greedy" in r]
    curves = [(k, [r["step"] for r in rows], [r.get(k) for r in rows], "-") for k in keys]
    curves += [("edit_success_greedy", *zip(*greedy), "o-")] if greedy else []
    plot_curves([("SVF expert training", curves)], out_path, xlabel="step", ylabel="value", panel_width=7)
