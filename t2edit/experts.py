"""An SVF expert: the z vectors of one edit (or batch of edits), stored PEFT-style.

    expert = Expert.from_model(svf_model)          # snapshot the trained z
    expert.save_pretrained("experts/spouses")      # expert.safetensors + expert_config.json
    Expert.from_pretrained("experts/spouses").apply_to(svf_model)
    Expert.mix([a, b], [0.5, 0.5]).apply_to(svf_model)

Only z is stored (kilobytes to a few MB); the SVD factors are rebuilt from the base model (and its cache).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from t2edit.files import atomic_write
from t2edit.leakage import expert_prompt_info
from t2edit.svf import SVFConfig, SVFModel, apply_svf, svf_config_dict

WEIGHTS_NAME = "expert.safetensors"
CONFIG_NAME = "expert_config.json"
ROUTER_NAME = "router.safetensors"  # keys of the expert's own router, when it has one
FORMAT = "t2edit-expert/1"


@dataclass
class OwnRouter:
    """The router an expert is saved with: the unedited model's last-token states of its edit prompts (`keys`, unit
    norm) and the cosine `threshold` a prompt's state must reach to be routed to the expert
    (`t2edit.routing.embedding` calibrates it; the embedding router reads it)."""

    keys: torch.Tensor  # [n_edits, hidden]
    threshold: float

    def similarity(self, states: torch.Tensor) -> torch.Tensor:
        """Highest cosine similarity of each state to any key."""
        keys = self.keys.to(states.device, torch.float32)
        return (F.normalize(states.float(), dim=-1) @ keys.T).max(-1).values

    def applies(self, states: torch.Tensor) -> torch.Tensor:
        return self.similarity(states) >= self.threshold


@dataclass
class ExpertInfo:
    """What an expert says about itself (`info` in expert_config.json).

    `edits`: each edit as {"prompt", "subject", "target"} (what the scope, prompt and cem routers read; only the
    edit itself, never an evaluation prompt). The prompt hashes let `t2edit eval --expert` refuse to score prompts
    the expert learned from (`t2edit.leakage.check_expert_may_score`). Keys this record does not know are kept in
    `extra` and written back."""

    name: str = ""
    edits: list[dict] = field(default_factory=list)
    steps: int | None = None
    train_seconds: float | None = None  # training's wall time: steps, edit-success checks, its router's calibration
    data: str | None = None
    train_config: dict = field(default_factory=dict)
    edit_prompt_hashes: list[str] | None = None
    learned_prompt_hashes: list[str] | None = None
    mixed_from: list[str] = field(default_factory=list)
    mix_weights: list[float] = field(default_factory=list)
    created: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict | None, where: str = "the expert") -> "ExpertInfo":
        if raw is not None and not isinstance(raw, dict):
            raise ValueError(f"{where}: `info` in {CONFIG_NAME} must be an object; the file is damaged — retrain "
                             f"or restore the expert")
        raw = dict(raw or {})
        edits = raw.pop("edits", [])
        prompts = raw.pop("edit_prompts", None)  # a config listing edit prompts only (no subjects)
        if not isinstance(edits, list):
            edits = [{"prompt": p} for p in (prompts or [])]
        if not all(isinstance(e, dict) and isinstance(e.get("prompt"), str) for e in edits):
            raise ValueError(f"{where}: `info.edits` in {CONFIG_NAME} must be a list of objects with a \"prompt\" "
                             f"(and \"subject\", \"target\"); the file is damaged — retrain or restore the expert")
        if "weights" in raw and "mix_weights" not in raw:
            raw["mix_weights"] = raw.pop("weights")
        known = {f.name for f in fields(cls)} - {"edits", "extra"}
        values = {k: raw.pop(k) for k in list(raw) if k in known}
        return cls(edits=[dict(e) for e in edits], extra=raw, **values)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "extra" and v not in (None, [], {}, "")}
        return {**self.extra, **out}

    def prompt_hashes(self) -> dict:
        return {"edit_prompt_hashes": self.edit_prompt_hashes, "learned_prompt_hashes": self.learned_prompt_hashes}


class ExpertMismatchError(ValueError):
    """An expert was applied to a model it was not trained for."""


@dataclass
class Expert:
    z: dict[str, torch.Tensor]
    svf_config: dict
    base_fingerprint: str
    base_model_name: str = ""
    info: ExpertInfo = field(default_factory=ExpertInfo)
    router: OwnRouter | None = None  # which prompts the expert applies to (two-pass inference)

    def __post_init__(self):
        if not isinstance(self.info, ExpertInfo):
            self.info = ExpertInfo.from_dict(self.info)

    # -- creation ---------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: SVFModel, info: ExpertInfo | dict | None = None, router: OwnRouter | None = None,
                   edit_prompts: list[str] = (), learned_prompts: list[str] = ()) -> "Expert":
        """Snapshot the z of `model`. A trainer passes `edit_prompts` and `learned_prompts` (every other prompt it
        trained on or calibrated the router against): the expert keeps hashes of them, never their text, so that
        `t2edit eval --expert` can refuse to score them as held out (t2edit.leakage.check_expert_may_score)."""
        info = info if isinstance(info, ExpertInfo) else ExpertInfo.from_dict(info)
        if edit_prompts:
            for key, value in expert_prompt_info(list(edit_prompts), list(learned_prompts)).items():
                setattr(info, key, value)
        return cls(z={k: v.float().cpu() for k, v in model.get_z().items()},
                   svf_config=svf_config_dict(model.svf_config), base_fingerprint=model.base_fingerprint,
                   base_model_name=getattr(model.config, "_name_or_path", "") or "", info=info, router=router)

    @property
    def target_layers(self) -> list[str]:
        return list(self.z)

    def make_svf_config(self, **overrides) -> SVFConfig:
        return SVFConfig(**{**self.svf_config, **overrides})

    # -- files ------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path):
        """Write z (safetensors), the router keys if any, and expert_config.json atomically (temp file + rename,
        config last: a directory with a config is complete)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"base_model_name": self.base_model_name, "base_fingerprint": self.base_fingerprint,
                  "target_layers": self.target_layers, "svf_config": self.svf_config,
                  "info": {"created": self.info.created or time.strftime("%Y-%m-%dT%H:%M:%S"),
                           **self.info.to_dict()},
                  "router_threshold": self.router.threshold if self.router is not None else None,
                  "format": FORMAT}
        z = {k: v.contiguous() for k, v in self.z.items()}
        config["z_sha256"] = {name: tensor_digest(tensor) for name, tensor in z.items()}
        config["svf_config_sha256"] = config_digest(self.svf_config)
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(
            z, str(tmp), metadata={"base_fingerprint": self.base_fingerprint}))
        if self.router is not None:
            keys = {"keys": self.router.keys.float().contiguous()}
            atomic_write(directory / ROUTER_NAME, lambda tmp: save_file(keys, str(tmp)))
        atomic_write(directory / CONFIG_NAME, json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Expert":
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.exists() or not weights_path.exists():
            raise FileNotFoundError(f"{directory} is not an SVF expert directory (needs {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}); pass the directory written by Expert.save_pretrained "
                                    f"or by scripts/train_rl.py")
        try:
            config = json.loads(config_path.read_text())
            z = load_file(str(weights_path))
            router = None
            if config.get("router_threshold") is not None:
                router = OwnRouter(keys=load_file(str(directory / ROUTER_NAME))["keys"],
                                   threshold=float(config["router_threshold"]))
        except Exception as error:
            raise ValueError(f"could not read the expert in {directory} ({type(error).__name__}: {error}); "
                             f"the files are damaged — retrain or restore the expert") from None
        lacking = [k for k in ("svf_config", "base_fingerprint") if not isinstance(config.get(k), (dict, str))]
        if lacking or not isinstance(config["svf_config"], dict):
            raise ValueError(f"{config_path} lacks {lacking[0] if lacking else 'a valid svf_config'}; the file is "
                             f"damaged or not written by t2edit — retrain or restore the expert")
        if config.get("format", FORMAT) != FORMAT:
            raise ValueError(f"{config_path} has format {config.get('format')!r}; this t2edit reads {FORMAT!r} — "
                             f"upgrade t2edit or retrain the expert with this one")
        missing = [k for k in config.get("target_layers", []) if k not in z]
        if missing:
            raise ValueError(f"expert in {directory} lacks z for {missing[0]!r}; the files are inconsistent")
        check_z(z, str(directory / WEIGHTS_NAME), config.get("z_sha256"))
        if "svf_config_sha256" in config and config["svf_config_sha256"] != config_digest(config["svf_config"]):
            raise ValueError(f"{config_path}: svf_config does not match the checksum written with it (mask, "
                             f"targets or scaling were edited); retrain or restore the expert")
        if router is not None:
            check_router(router, str(directory))
        return cls(z=z, svf_config=config["svf_config"], base_fingerprint=config["base_fingerprint"],
                   base_model_name=config.get("base_model_name", ""),
                   info=ExpertInfo.from_dict(config.get("info"), str(directory)), router=router)

    # -- use --------------------------------------------------------------------------------------------------
    def check_compatible(self, model: SVFModel):
        """Refuse (ExpertMismatchError) a model this expert was not trained for, and z that does not fit it."""
        check_z(self.z, f"expert {self.info.name or '(in memory)'}")
        if model.base_fingerprint != self.base_fingerprint:
            raise ExpertMismatchError(
                f"this expert was trained on base model {self.base_model_name or '?'} (fingerprint "
                f"{self.base_fingerprint[:12]}), but the model given is "
                f"{getattr(model.config, '_name_or_path', '') or '?'} (fingerprint {model.base_fingerprint[:12]}); "
                f"load the base model the expert was trained on")
        if set(model.layer_names) != set(self.z):
            raise ExpertMismatchError(f"the expert targets {len(self.z)} layers but the SVF model has "
                                      f"{len(model.layer_names)}; build the SVF model with the expert's "
                                      f"config: apply_svf(model, expert.make_svf_config())")
        if svf_config_dict(model.svf_config).get("mask") != self.svf_config.get("mask"):
            raise ExpertMismatchError("the expert was trained with another mask function; build the SVF model "
                                      "with expert.make_svf_config()")
        for name, layer in model.svf_layers().items():
            if tuple(self.z[name].shape) != tuple(layer.z.shape):
                raise ExpertMismatchError(f"the expert's z for {name!r} has shape {tuple(self.z[name].shape)}, the "
                                          f"model's layer needs {tuple(layer.z.shape)}; the expert is damaged or "
                                          f"belongs to another model")

    def apply_to(self, model: SVFModel) -> SVFModel:
        self.check_compatible(model)
        model.set_z(self.z)
        return model

    def load_into(self, base_model: torch.nn.Module, **svf_overrides) -> SVFModel:
        """Wrap a plain base model in SVF with this expert's config and apply the expert."""
        return self.apply_to(apply_svf(base_model, self.make_svf_config(**svf_overrides)))

    @staticmethod
    def mix(experts: list["Expert"], weights: list[float] | None = None) -> "Expert":
        """z' = Σ αₖ zₖ (in z space; the one mask function f is applied afterwards, as in training). The mixture
        has no router: routing decides between experts before they are mixed."""
        if not experts:
            raise ValueError("Expert.mix needs at least one expert")
        weights = list(weights) if weights is not None else [1.0 / len(experts)] * len(experts)
        if len(weights) != len(experts):
            raise ValueError(f"Expert.mix got {len(experts)} experts but {len(weights)} weights")
        first = experts[0]
        for other in experts[1:]:
            if other.base_fingerprint != first.base_fingerprint or set(other.z) != set(first.z) \
                    or other.svf_config.get("mask") != first.svf_config.get("mask"):
                raise ExpertMismatchError("Expert.mix needs experts trained on the same base model, layers and "
                                          "mask function")
        z = {name: sum(w * e.z[name].float() for w, e in zip(weights, experts)) for name in first.z}
        return Expert(z=z, svf_config=dict(first.svf_config), base_fingerprint=first.base_fingerprint,
                      base_model_name=first.base_model_name,
                      info=ExpertInfo(mixed_from=[e.info.name for e in experts], mix_weights=weights))


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 (16 hex digits) of a tensor's dtype, shape and bytes: written with an expert, checked when it loads."""
    tensor = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def config_digest(svf_config: dict) -> str:
    return hashlib.sha256(json.dumps(svf_config, sort_keys=True).encode()).hexdigest()[:16]


def check_z(z: dict[str, torch.Tensor], where: str, digests: dict | None = None) -> None:
    """One clear error for z an expert must never be used with: not a float vector, not finite, or (given the
    digests saved with it) not the bytes that were written."""
    for name, tensor in z.items():
        if tensor.dim() != 1 or not tensor.is_floating_point() or tensor.numel() == 0:
            raise ValueError(f"{where}: z for {name!r} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}; "
                             f"an expert stores one float vector per layer — retrain or restore the expert")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{where}: z for {name!r} holds NaN or infinite values; the expert is damaged — "
                             f"retrain or restore it")
        if digests is not None and digests.get(name) != tensor_digest(tensor):
            raise ValueError(f"{where}: z for {name!r} does not match the checksum written with it; the file was "
                             f"changed or damaged — retrain or restore the expert")


def check_router(router: OwnRouter, where: str) -> None:
    """An expert's own router must be usable: finite unit-norm keys, a threshold that is a cosine."""
    if not (isinstance(router.threshold, float) and math.isfinite(router.threshold)
            and -1.0 <= router.threshold <= 1.0):
        raise ValueError(f"{where}: router_threshold {router.threshold!r} in {CONFIG_NAME} is not a cosine in "
                         f"[-1, 1]; the file is damaged — retrain or restore the expert")
    keys = router.keys
    if keys.dim() != 2 or not torch.isfinite(keys).all() or \
            not torch.allclose(keys.float().norm(dim=-1), torch.ones(len(keys)), atol=1e-3):
        raise ValueError(f"{where}: {ROUTER_NAME} must hold finite unit-norm keys, one row per edit prompt; the file "
                         f"is damaged — retrain or restore the expert")
