"""The settings each trained editor gets for each kind of model, read from configs/editors/<method>.yaml.

One set of hyperparameters does not fit all (EasyEdit's FT-M moves a hidden-64 fact world not at all, and its LoRA
keeps little locality on a 135M model), so each file holds one profile per kind of model. `depth` / `depths` give
edited layers as fractions of the decoder stack, turned into `layer` / `layers` for the model at hand:

- `world`: t2edit's own fact worlds;
- `small-real`: a real model under 1B parameters (tuned on training-split records only);
- `large-real`: a real model of 1B parameters or more (EasyEdit's published llama-7b settings).
"""
from __future__ import annotations

import torch

from t2edit.editors import CONFIGURED
from t2edit.editors.ft import mlp_output_layers
from t2edit.files import CONFIGS_DIR, read_yaml

LARGE_MODEL_PARAMETERS = 1_000_000_000
PROFILES = ("world", "small-real", "large-real")
CONFIG_CLASSES = {method: config_class for method, (_, config_class) in CONFIGURED.items()}


def profile_name(model: torch.nn.Module, world: bool) -> str:
    if world:
        return "world"
    n_parameters = sum(parameter.numel() for parameter in model.parameters())
    return "large-real" if n_parameters >= LARGE_MODEL_PARAMETERS else "small-real"


def profile(method: str, name: str) -> dict:
    """The raw settings of one profile of configs/editors/<method>.yaml."""
    if method not in CONFIG_CLASSES:
        raise ValueError(f"per-model settings cover {', '.join(CONFIG_CLASSES)}, not {method!r}")
    path = CONFIGS_DIR / "editors" / f"{method}.yaml"
    profiles = read_yaml(path)
    if name not in profiles:
        raise ValueError(f"{path} has no profile {name!r}; it needs one for each of {', '.join(PROFILES)}")
    return dict(profiles[name] or {})


def layer_at(depth: float, n_layers: int) -> int | None:
    """The decoder layer at `depth` (a fraction of the stack, so one profile carries to other layer counts)."""
    return min(round(depth * n_layers), n_layers - 1) if n_layers else None


def editor_config(method: str, model: torch.nn.Module, world: bool):
    """The typed config (`FTEditorConfig`, `LoRAEditorConfig`, ...) of `method` for `model`."""
    options = profile(method, profile_name(model, world))
    n_layers = len(mlp_output_layers(model))
    # A model whose MLP outputs cannot be found keeps layer None: the editor then names the fix when it edits.
    if "depth" in options:
        options["layer"] = layer_at(options.pop("depth"), n_layers)
    if "depths" in options:
        options["layers"] = tuple(sorted({layer_at(depth, n_layers) for depth in options.pop("depths")})) \
            if n_layers else None
    try:
        return CONFIG_CLASSES[method](**options)
    except TypeError as error:
        raise ValueError(f"configs/editors/{method}.yaml: {error}; use the fields of "
                         f"{CONFIG_CLASSES[method].__name__}") from None


__all__ = ["PROFILES", "editor_config", "profile", "profile_name"]
