"""SVF behind the common Editor interface: one expert trained for the edits (method svf / svf-always), or many
trained experts behind a router (the composition and sequential runs)."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from t2edit.data.records import EditRecord
from t2edit.editors.base import EditedModel, Editor
from t2edit.experts import Expert
from t2edit.leakage import learning_pool
from t2edit.routing import OWN_ROUTER, AdaptiveModel, get_router
from t2edit.svf import apply_svf
from t2edit.training import SVFTrainer, TrainConfig
from t2edit.training.references import UneditedModelCache


class SVFEditor(Editor):
    """Trains an SVF expert for the given edits (or applies a trained one) and returns the edited model.

    `neighbour_records` / `neighbour_prompts` are the other facts used for locality training; the leakage guard
    (t2edit.leakage.learning_pool) removes the prompts the evaluation scores for the edited records, whatever the
    caller passes.

    `route=True` (method "svf") answers in two passes: the expert applies only to the prompts a router picks;
    `route=False` (method "svf-always") applies it to every prompt.

    `router`: with `route=True`, a `t2edit.routing` router name (e.g. "scope-split"), fitted on the expert's edits
    and on `router_negatives` (training-side prompts only), or "own" / None: the router the expert was saved with.

    `trained_experts`: a dict shared by the "svf" and "svf-always" editors of one evaluation, so the expert for a
    set of edits is trained once and scored both ways (keyed by the edits' prompts and targets)."""

    name = "svf"

    def __init__(self, config: TrainConfig | None = None, expert_dir: str | None = None,
                 neighbour_records: list[EditRecord] = (), neighbour_prompts: list[str] = (), route: bool = True,
                 trained_experts: dict | None = None, router: str | None = None, router_negatives=(), **overrides):
        self.config = config or TrainConfig(**overrides)
        self.route = route
        router = None if router == OWN_ROUTER else router
        self.router, self.router_negatives = (router if route else None), list(router_negatives)
        self.name = ("svf" if route else "svf-always") + (f" ({self.router})" if self.router else "")
        self.expert_dir = expert_dir
        self.neighbour_records = list(neighbour_records)
        self.neighbour_prompts = list(neighbour_prompts)
        self.last_trainer: SVFTrainer | None = None
        self.calls = 0
        self.trained_experts = {} if trained_experts is None else trained_experts
        self.report: dict = {}  # merged into the evaluation's `extra`: whether the expert was loaded or trained
        # What the unedited base model says, kept across edit calls (single mode trains an expert and fits a router
        # per record on much the same prompts): the router negatives' pass-1 batches, and the neighbours' answers,
        # their KL references and the calibration negatives' states. Reset when another base model comes in.
        self._pass1_cache: dict = {}
        self.unedited = UneditedModelCache()
        self._pass1_model = None

    def edit(self, model, tokenizer, records):
        if self._pass1_model is not model:
            self._pass1_cache, self.unedited, self._pass1_model = {}, UneditedModelCache(), model
        key = tuple((r.prompt, tuple(r.target_new)) for r in records)
        self.report = {"expert": "loaded" if self.expert_dir else "trained"}
        if self.expert_dir:
            expert = Expert.from_pretrained(self.expert_dir)
            svf_model = expert.load_into(model)
        elif key in self.trained_experts:  # trained for these edits by the other svf method of this evaluation
            self.report["expert"] = "reused"  # its training time is that method's edit time, not this one's
            expert = self.trained_experts[key]
            svf_model = expert.load_into(model)
        else:
            svf_model = apply_svf(model, self.config.svf_config(), progress=False)
            pool = learning_pool(records, self.neighbour_records, self.neighbour_prompts)
            # One directory per edit call; no checkpoints (an evaluation re-runs its edits rather than resuming).
            self.calls += 1
            config = TrainConfig(**{**asdict(self.config), "save_every": 0, "resume": False,
                                    "output_dir": str(Path(self.config.output_dir) / f"edit-{self.calls:04d}")})
            self.last_trainer = SVFTrainer(svf_model, tokenizer, records, pool.neighbour_prompts, config,
                                           subject_prompts=pool.subject_prompts,
                                           unedited=self.unedited)
            expert = self.last_trainer.train()
            self.trained_experts[key] = expert
        svf_model.eval()
        if not self.route:
            return EditedModel(model=svf_model, restore=svf_model.unload)
        if not self.router:
            if expert.router is None:
                svf_model.unload()
                raise ValueError(f"the expert in {self.expert_dir} has no router of its own (a mixture, or trained "
                                 f"without one); evaluate it with method svf-always or name a router")
            routed = AdaptiveModel.with_own_router(svf_model, expert, tokenizer)
            return EditedModel(model=routed.eval(), restore=svf_model.unload)
        started = time.perf_counter()
        adaptive = AdaptiveModel(svf_model, [expert], get_router(self.router), tokenizer,
                                 negatives=self.router_negatives, pass1_cache=self._pass1_cache)
        self.report["router_fit_seconds"] = round(time.perf_counter() - started, 2)
        return EditedModel(model=adaptive.eval(), restore=svf_model.unload)


class ExpertsEditor(Editor):
    """K trained experts behind a router, as an Editor: `edit` loads them over the model and fits the router once
    (on the experts and the negatives; the records it is asked to edit only decide which experts exist)."""

    def __init__(self, expert_dirs: Sequence[str | Path], router_factory: Callable[[], object], name: str,
                 negatives: Sequence[str] = (), mixing: str = "auto", loaded: dict | None = None,
                 pass1_cache: dict | None = None):
        self.expert_dirs, self.router_factory, self.name = [str(d) for d in expert_dirs], router_factory, name
        self.negatives, self.mixing = list(negatives), mixing
        # The negatives' pass-1 batches on the unedited model, shared by the editors of one base model (a sequential
        # curve fits a router at every point on much the same negatives).
        self.pass1_cache = pass1_cache
        # Experts already read from disk, by directory, shared between editors (a sequential curve reads the
        # first experts again at every point); nothing here changes an expert once loaded.
        self.loaded = {} if loaded is None else loaded
        self.router = None
        self.fit_seconds = 0.0

    def edit(self, model, tokenizer, records):
        for d in self.expert_dirs:
            if d not in self.loaded:
                self.loaded[d] = Expert.from_pretrained(d)
        experts = [self.loaded[d] for d in self.expert_dirs]
        fit = self.router is None
        if fit:
            self.router = self.router_factory()
        started = time.perf_counter()
        adaptive = AdaptiveModel.from_experts(model, experts, self.router, tokenizer, mixing=self.mixing, fit=fit,
                                              negatives=self.negatives, pass1_cache=self.pass1_cache)
        if fit:
            self.fit_seconds = time.perf_counter() - started
        elif hasattr(self.router, "model"):
            self.router.model = adaptive
        adaptive.eval()
        return EditedModel(model=adaptive, restore=adaptive.svf_model.unload)


__all__ = ["ExpertsEditor", "SVFEditor"]
