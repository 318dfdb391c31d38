"""Finding reward functions by name, and combining several with weights.

A reward follows TRL's convention: `f(prompts, completions, **columns) -> list[float | None]`, one value per
completion, None where it does not apply to a row. A spec names one, tried in this order: a name registered with
`@register_reward`, a "package.module:function" path, or a name in the entry-point group "t2edit.rewards".
"""
from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points

RewardFn = Callable[..., list[float | None]]

ENTRY_POINT_GROUP = "t2edit.rewards"
_REGISTERED: dict[str, RewardFn] = {}

_HOW_TO_REGISTER = (
    "Use a built-in name, a 'package.module:function' path, or register your own: decorate it with "
    "@rewards.register_reward('name') and import its module, or declare it in your package's pyproject.toml "
    f"under [project.entry-points.\"{ENTRY_POINT_GROUP}\"] as name = \"package.module:function\"."
)


class UnknownRewardError(ValueError):
    """A reward spec that names nothing we can find or load."""


class RewardPluginError(ValueError):
    """A reward function that raised or returned something other than one finite number (or None) per row."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available to `get_reward(name)` and to configs as `name`."""

    def decorate(fn: RewardFn) -> RewardFn:
        if _REGISTERED.get(name, fn) is not fn:
            raise ValueError(f"Reward name {name!r} is already registered to {_REGISTERED[name]!r}; pick another.")
        _REGISTERED[name] = fn
        return fn

    return decorate


def known_reward_names() -> list[str]:
    """Registered names plus installed entry points, sorted."""
    return sorted(set(_REGISTERED) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def get_reward(spec: str | RewardFn) -> RewardFn:
    """The reward function `spec` names (a callable is returned unchanged)."""
    if callable(spec):
        return spec
    if spec in _REGISTERED:
        return _REGISTERED[spec]
    if ":" in spec:
        fn = _import_function(spec)
    else:
        matches = entry_points(group=ENTRY_POINT_GROUP).select(name=spec)
        if not matches:
            raise UnknownRewardError(
                f"Unknown reward {spec!r}. Known rewards: {', '.join(known_reward_names())}. {_HOW_TO_REGISTER}"
            )
        entry_point = next(iter(matches))
        try:
            fn = entry_point.load()
        except Exception as error:  # a broken third-party package: say which one
            raise UnknownRewardError(
                f"Reward {spec!r} is declared by entry point {entry_point.value!r} (group {ENTRY_POINT_GROUP!r}) "
                f"but failed to load: {type(error).__name__}: {error}"
            ) from error
    if not callable(fn):
        raise UnknownRewardError(f"Reward {spec!r} resolves to {fn!r}, which is not callable.")
    return fn


def _import_function(spec: str) -> RewardFn:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UnknownRewardError(
            f"Reward {spec!r}: cannot import module {module_name!r} ({error}). "
            "Check the module is installed or on PYTHONPATH."
        ) from error
    if not hasattr(module, attribute):
        raise UnknownRewardError(f"Reward {spec!r}: module {module_name!r} has no attribute {attribute!r}.")
    return getattr(module, attribute)


class RewardSet:
    """Several rewards with weights. Calling it gives the weighted total per row and each reward's own values.

    A reward that returns None for a row contributes nothing to that row's total.
    """

    def __init__(self, specs: Mapping[str | RewardFn, float] | Sequence[str | RewardFn]):
        weights = dict(specs) if isinstance(specs, Mapping) else {spec: 1.0 for spec in specs}
        if not weights:
            raise ValueError("RewardSet needs at least one reward, e.g. {'exact_match': 1.0}.")
        for name, weight in weights.items():
            if not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise ValueError(f"Reward {name!r} has weight {weight!r}; weights must be finite numbers.")
        # Keys are the specs as written (or a function's __name__), so logs and configs use the same names.
        self.weights = {_display_name(spec): float(weight) for spec, weight in weights.items()}
        self.rewards = {_display_name(spec): get_reward(spec) for spec in weights}

    def __call__(self, prompts: list[str], completions: list, **columns) -> tuple[list[float], dict[str, list]]:
        totals = [0.0] * len(completions)
        per_reward: dict[str, list[float | None]] = {}
        for name, fn in self.rewards.items():
            try:
                values = fn(prompts, completions, **columns)
            except Exception as error:
                raise RewardPluginError(f"Reward plugin {name!r} raised {type(error).__name__}: {error}") from error
            values = _checked(name, values, len(completions))
            for row, value in enumerate(values):
                if value is not None:
                    totals[row] += self.weights[name] * value
            per_reward[name] = values
        return totals, per_reward


def _display_name(spec: str | RewardFn) -> str:
    return spec if isinstance(spec, str) else getattr(spec, "__name__", repr(spec))


def _checked(name: str, values: object, expected_len: int) -> list[float | None]:
    """The plugin's output as a list of floats/None, or one RewardPluginError saying what is wrong with it."""
    if hasattr(values, "tolist"):  # numpy arrays and torch tensors
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RewardPluginError(
            f"Reward plugin {name!r} returned {type(values).__name__}; it must return a list with one float "
            "(or None) per completion."
        )
    if len(values) != expected_len:
        raise RewardPluginError(f"Reward plugin {name!r} returned {len(values)} values for {expected_len} completions.")
    checked: list[float | None] = []
    for row, value in enumerate(values):
        if value is not None and (not isinstance(value, numbers.Real) or not math.isfinite(value)):
            raise RewardPluginError(
                f"Reward plugin {name!r} returned {value!r} for row {row}; rewards must be finite numbers or None."
            )
        checked.append(None if value is None else float(value))
    return checked
