"""The editing methods by name: `get_editor("lora", rank=4, lr=1e-2)` -> an `Editor`.

Options go to the method's config dataclass (LoRAEditorConfig, FTEditorConfig) field by field, or whole as
`config=...`; IKE takes `train_records=` and `k=`; SVF's options go to `t2edit.training.SVFEditor` as given.
"""
from __future__ import annotations

from dataclasses import fields

from t2edit.baselines.ft import FTEditor, FTEditorConfig
from t2edit.baselines.ike import IKEEditor
from t2edit.baselines.lora import LoRAEditor, LoRAEditorConfig
from t2edit.baselines.prompt import PromptEditor
from t2edit.baselines.target_loss import EditInputError
from t2edit.editing import Editor, NoEdit

METHODS = ("none", "lora", "ft", "ike", "prompt", "svf", "svf-always")

__all__ = ["METHODS", "get_editor", "UnknownEditorError", "EditInputError", "FTEditor", "FTEditorConfig",
           "IKEEditor", "LoRAEditor", "LoRAEditorConfig", "PromptEditor"]


class UnknownEditorError(ValueError):
    """An editing method name or option that does not exist."""


def get_editor(name: str, **options) -> Editor:
    method = name.strip().lower()
    if method in ("svf", "svf-always"):  # two-pass (routed) / the expert on every prompt
        from t2edit.training import SVFEditor  # lazy: pulls in the trainer stack only when asked for

        return SVFEditor(**{"route": method == "svf", **options})
    if method == "lora":
        return LoRAEditor(_config(LoRAEditorConfig, method, options))
    if method == "ft":
        return FTEditor(_config(FTEditorConfig, method, options))
    if method in ("ike", "prompt", "none"):
        allowed = {"ike": ("train_records", "k"), "prompt": (), "none": ()}[method]
        _reject_unknown(method, options, allowed)
        return {"ike": IKEEditor, "prompt": PromptEditor, "none": NoEdit}[method](**options)
    raise UnknownEditorError(f"unknown editing method {name!r}; choose one of: {', '.join(METHODS)}")


def _config(config_class, method: str, options: dict):
    if "config" in options:
        _reject_unknown(method, options, ("config",))
        return options["config"]
    _reject_unknown(method, options, tuple(f.name for f in fields(config_class)))
    return config_class(**options)


def _reject_unknown(method: str, options: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        choices = ", ".join(allowed) if allowed else "none"
        raise UnknownEditorError(f"editing method {method!r} has no option(s) {', '.join(unknown)}; "
                                 f"its options are: {choices}")
