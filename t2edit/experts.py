"""An SVF expert: the z vectors of one edit (or batch of edits), stored PEFT-style.

    expert = Expert.from_model(svf_model)          # snapshot the trained z
    expert.save_pretrained("experts/spouses")      # expert.safetensors + expert_config.json
    Expert.from_pretrained("experts/spouses").apply_to(svf_model)
    Expert.mix([a, b], [0.5, 0.5]).apply_to(svf_model)

Only z is stored (kilobytes to a few MB); the SVD factors are rebuilt from the base model (and its cache).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from t2edit.leakage import expert_prompt_info
from t2edit.routing import Router
from t2edit.svf import SVFConfig, SVFModel, apply_svf, svf_config_dict

WEIGHTS_NAME = "expert.safetensors"
CONFIG_NAME = "expert_config.json"
ROUTER_NAME = "router.safetensors"  # keys of the two-pass router (t2edit.routing), when the expert has one


class ExpertMismatchError(ValueError):
    """An expert was applied to a model it was not trained for."""


@dataclass
class Expert:
    z: dict[str, torch.Tensor]
    svf_config: dict
    base_fingerprint: str
    base_model_name: str = ""
    info: dict = field(default_factory=dict)  # creation info: edits, steps, rewards, time, version...
    router: Router | None = None  # which prompts the expert applies to (two-pass inference)

    # -- creation ---------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: SVFModel, info: dict | None = None, router: Router | None = None,
                   edit_prompts: list[str] = (), learned_prompts: list[str] = ()) -> "Expert":
        """Snapshot the z of `model`. A trainer passes `edit_prompts` and `learned_prompts` (every other prompt it
        trained on or calibrated the router against): the expert keeps hashes of them, never their text, so that
        `t2edit eval --expert` can refuse to score them as held out (t2edit.leakage.check_expert_may_score)."""
        info = dict(info or {})
        if edit_prompts:
            info.update(expert_prompt_info(list(edit_prompts), list(learned_prompts)))
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
                  "info": {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), **self.info},
                  "router_threshold": self.router.threshold if self.router is not None else None,
                  "format": "t2edit-expert/1"}
        weights_tmp = directory / f".{WEIGHTS_NAME}.tmp{os.getpid()}"
        save_file({k: v.contiguous() for k, v in self.z.items()}, str(weights_tmp),
                  metadata={"base_fingerprint": self.base_fingerprint})
        os.replace(weights_tmp, directory / WEIGHTS_NAME)
        if self.router is not None:
            router_tmp = directory / f".{ROUTER_NAME}.tmp{os.getpid()}"
            save_file({"keys": self.router.keys.float().contiguous()}, str(router_tmp))
            os.replace(router_tmp, directory / ROUTER_NAME)
        config_tmp = directory / f".{CONFIG_NAME}.tmp{os.getpid()}"
        config_tmp.write_text(json.dumps(config, indent=2))
        os.replace(config_tmp, directory / CONFIG_NAME)

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
                router = Router(keys=load_file(str(directory / ROUTER_NAME))["keys"],
                                threshold=float(config["router_threshold"]))
        except Exception as error:
            raise ValueError(f"could not read the expert in {directory} ({type(error).__name__}: {error}); "
                             f"the files are damaged — retrain or restore the expert") from None
        missing = [k for k in config.get("target_layers", []) if k not in z]
        if missing:
            raise ValueError(f"expert in {directory} lacks z for {missing[0]!r}; the files are inconsistent")
        return cls(z=z, svf_config=config["svf_config"], base_fingerprint=config["base_fingerprint"],
                   base_model_name=config.get("base_model_name", ""), info=config.get("info", {}), router=router)

    # -- use --------------------------------------------------------------------------------------------------
    def check_compatible(self, model: SVFModel):
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
                      info={"mixed_from": [e.info.get("name", "") for e in experts], "weights": weights})
