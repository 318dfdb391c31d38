"""Reward plugins for t2edit's REINFORCE trainer (TRL convention: `f(prompts, completions, **columns)`)."""
from rewards import builtin  # noqa: F401  (registers the built-in rewards)
from rewards.registry import (
    ENTRY_POINT_GROUP,
    RewardFn,
    RewardPluginError,
    RewardSet,
    UnknownRewardError,
    get_reward,
    known_reward_names,
    register_reward,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "RewardFn",
    "RewardPluginError",
    "RewardSet",
    "UnknownRewardError",
    "get_reward",
    "known_reward_names",
    "register_reward",
]
