"""Reward plugins: the built-ins on hand-made rows, the three ways of naming a reward, and plugin validation."""
from __future__ import annotations

import math
import sys
import textwrap

import pytest

from rewards import RewardPluginError, RewardSet, UnknownRewardError, get_reward, register_reward
from rewards.builtin import exact_match, locality, partial_credit
from rewards.registry import ENTRY_POINT_GROUP, _REGISTERED

PROMPTS = ["p"] * 4


# --- built-ins ---------------------------------------------------------------------------------------------


def test_exact_match_normalises_case_punctuation_articles_and_accepts_aliases():
    completions = ["THE  Eiffel Tower!", "Eiffel Tower, in Paris", "Big Ben", "the tour eiffel\nmore text"]
    answers = [["Eiffel Tower"], ["eiffel tower"], ["Eiffel Tower"], ["Eiffel Tower", "Tour Eiffel"]]
    assert exact_match(PROMPTS, completions, answers=answers, kind=["edit"] * 4) == [1.0, 1.0, 0.0, 1.0]
    assert exact_match(["p"], ["An apple."], answers=[["apple"]], kind=["edit"]) == [1.0]


def test_exact_match_needs_a_word_boundary_and_treats_a_bare_string_as_one_alias():
    assert exact_match(["p", "p"], ["Parisian", "Paris"], answers=["Paris", "Paris"]) == [0.0, 1.0]


def test_each_builtin_is_none_on_the_other_kind():
    completions = ["Rome", "Rome", "Oslo", "Oslo"]
    answers = [["Rome"], ["Rome"], ["Rome"], ["Rome"]]
    kind = ["edit", "neighbour", "edit", "neighbour"]
    assert exact_match(PROMPTS, completions, answers=answers, kind=kind) == [1.0, None, 0.0, None]
    assert locality(PROMPTS, completions, answers=answers, kind=kind) == [None, 1.0, None, 0.0]
    assert partial_credit(PROMPTS, completions, answers=answers, kind=kind) == [1.0, None, 0.0, None]


def test_partial_credit_orders_closer_answers_higher_and_takes_the_best_alias():
    target = ["Peter Arno Smith"]
    completions = ["nobody", "Peter", "peter arno", "Peter Arno Smith Jr.", "Arno Smith", "Peter Smith"]
    scores = partial_credit(["p"] * 6, completions, answers=[target] * 6, kind=["edit"] * 6)
    assert scores[:4] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert scores[4] == 0.0  # words out of place earn nothing: it rewards a prefix, not a bag of words
    assert scores[5] == pytest.approx(1 / 3)
    assert partial_credit(["p"], ["Arno"], answers=[["Peter Arno", "Arno"]], kind=["edit"]) == [1.0]
    assert partial_credit(["p"], ["Arno"], answers=[["", "the", "Arno"]], kind=["edit"]) == [1.0]  # empty aliases skipped


def test_partial_credit_is_one_exactly_when_exact_match_is_one():
    completions = ["the Red Sea", "Red", "red sea, south", "Redsea", "Red Sea\nRed", "Black Sea"]
    answers = [["Red Sea"]] * len(completions)
    dense = partial_credit(["p"] * 6, completions, answers=answers)
    strict = exact_match(["p"] * 6, completions, answers=answers)
    assert [d == 1.0 for d in dense] == [s == 1.0 for s in strict]
    assert strict == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_builtins_read_chat_format_completions_and_ignore_extra_columns():
    chat = [[{"role": "assistant", "content": "Rome"}]]
    assert exact_match(["p"], chat, answers=[["Rome"]], kind=["edit"], trainer_state=None, subject=["x"]) == [1.0]


def test_builtins_say_which_column_is_missing_or_short():
    with pytest.raises(ValueError, match="^needs a dataset column 'answers'"):
        exact_match(["p"], ["Rome"], kind=["edit"])
    with pytest.raises(ValueError, match="2 completions but 1 'answers'"):
        locality(["p", "p"], ["Rome", "Oslo"], answers=[["Rome"]], kind=["neighbour", "neighbour"])


# --- RewardSet ---------------------------------------------------------------------------------------------


def test_reward_set_weights_and_skips_rewards_that_do_not_apply():
    rewards = RewardSet({"exact_match": 2.0, "locality": 0.5, "partial_credit": 1.0})
    totals, per_reward = rewards(
        PROMPTS,
        ["Peter Arno", "Peter", "Oslo", "Rome"],
        answers=[["Peter Arno"], ["Peter Arno"], ["Oslo"], ["Oslo"]],
        kind=["edit", "edit", "neighbour", "neighbour"],
    )
    assert totals == pytest.approx([2.0 + 1.0, 0.5, 0.5, 0.0])
    assert per_reward["locality"] == [None, None, 1.0, 0.0]
    assert list(per_reward) == ["exact_match", "locality", "partial_credit"]


def test_reward_set_from_a_list_uses_weight_one_and_rejects_bad_weights():
    totals, _ = RewardSet(["exact_match", "partial_credit"])(["p"], ["Rome"], answers=[["Rome"]], kind=["edit"])
    assert totals == [2.0]
    with pytest.raises(ValueError, match="'locality' has weight nan"):
        RewardSet({"locality": math.nan})
    with pytest.raises(ValueError, match="at least one reward"):
        RewardSet([])


# --- registry ----------------------------------------------------------------------------------------------


def test_builtins_are_found_by_name():
    assert get_reward("exact_match") is exact_match
    assert get_reward("partial_credit") is partial_credit


def test_register_reward_makes_a_name_usable_and_refuses_to_shadow(monkeypatch):
    monkeypatch.setattr("rewards.registry._REGISTERED", dict(_REGISTERED))

    @register_reward("always_half")
    def always_half(prompts, completions, **_):
        return [0.5] * len(completions)

    assert get_reward("always_half") is always_half
    with pytest.raises(ValueError, match="'exact_match' is already registered"):
        register_reward("exact_match")(always_half)


def test_module_function_spec_is_imported(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "def length_bonus(prompts, completions, **_):\n    return [float(len(c)) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards_mod", raising=False)  # restored (i.e. removed) after the test
    fn = get_reward("my_rewards_mod:length_bonus")
    assert fn(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]
    totals, _ = RewardSet({"my_rewards_mod:length_bonus": 0.5})(["p"], ["abcd"])
    assert totals == [2.0]
    with pytest.raises(UnknownRewardError, match="has no attribute 'nope'"):
        get_reward("my_rewards_mod:nope")
    with pytest.raises(UnknownRewardError, match="cannot import module 'no_such_module_xyz'"):
        get_reward("no_such_module_xyz:fn")


def _install_fake_distribution(root, entry_points: str, module_source: str) -> None:
    """What `pip install` leaves behind for a package declaring rewards: a module and a .dist-info folder."""
    dist_info = root / "fake_rewards_pkg-0.1.dist-info"  # one per test's tmp_path, so tests do not interfere
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-rewards-pkg\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(entry_points)
    (root / "fake_rewards_pkg.py").write_text(textwrap.dedent(module_source))


def test_entry_point_reward_is_discovered_and_used(tmp_path, monkeypatch):
    _install_fake_distribution(
        tmp_path,
        f"[{ENTRY_POINT_GROUP}]\nfake_name = fake_rewards_pkg:says_yes\nbroken = fake_rewards_pkg:missing\n",
        """
        def says_yes(prompts, completions, **_):
            return [0.25 if c.startswith("yes") else -1.0 for c in completions]
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_rewards_pkg", raising=False)

    fn = get_reward("fake_name")
    assert fn.__module__ == "fake_rewards_pkg"
    totals, per_reward = RewardSet({"fake_name": 2.0, "exact_match": 1.0})(
        ["p", "p"], ["yes", "no"], answers=[["no"], ["no"]], kind=["edit", "edit"]
    )
    assert per_reward["fake_name"] == [0.25, -1.0]
    assert totals == [0.5, -1.0]
    with pytest.raises(UnknownRewardError, match="'broken'.*failed to load"):
        get_reward("broken")


def test_unknown_name_lists_known_names_and_how_to_register(tmp_path, monkeypatch):
    _install_fake_distribution(tmp_path, f"[{ENTRY_POINT_GROUP}]\nfake_name = fake_rewards_pkg:f\n", "f = len\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnknownRewardError) as caught:
        RewardSet({"exact_matsh": 1.0})
    message = str(caught.value)
    for expected in ["'exact_matsh'", "exact_match", "locality", "partial_credit", "fake_name",
                     "module:function", ENTRY_POINT_GROUP]:
        assert expected in message


# --- plugin validation -------------------------------------------------------------------------------------


def _bad_plugins():
    def raises(prompts, completions, **_):
        raise KeyError("column 'gold' missing")

    def too_short(prompts, completions, **_):
        return [1.0] * (len(completions) - 1)

    def nan(prompts, completions, **_):
        return [0.0, math.nan]

    def infinite(prompts, completions, **_):
        return [math.inf, 0.0]

    def text(prompts, completions, **_):
        return ["1.0", 0.0]

    def scalar(prompts, completions, **_):
        return 1.0

    return {
        "raises": (raises, "raised KeyError: \"column 'gold' missing\""),
        "too_short": (too_short, "returned 1 values for 2 completions"),
        "nan": (nan, "returned nan for row 1"),
        "infinite": (infinite, "returned inf for row 0"),
        "text": (text, "returned '1.0' for row 0"),
        "scalar": (scalar, "returned float"),
    }


@pytest.mark.parametrize("plugin_name", list(_bad_plugins()))
def test_a_misbehaving_plugin_stops_with_one_error_naming_it(plugin_name, monkeypatch):
    fn, expected = _bad_plugins()[plugin_name]
    monkeypatch.setitem(_REGISTERED, plugin_name, fn)
    with pytest.raises(RewardPluginError) as caught:
        RewardSet(["exact_match", plugin_name])(["p", "p"], ["a", "b"], answers=[["a"], ["b"]])
    assert f"Reward plugin {plugin_name!r}" in str(caught.value)
    assert expected in str(caught.value)


def test_plugin_may_return_none_numpy_values_and_ints():
    np = pytest.importorskip("numpy")

    def mixed(prompts, completions, **_):
        return np.array([1, 0]) if completions[0] == "np" else [None, 1]

    totals, per_reward = RewardSet({mixed: 3.0})(["p", "p"], ["np", "x"])
    assert per_reward["mixed"] == [1.0, 0.0] and totals == [3.0, 0.0]
    totals, per_reward = RewardSet({mixed: 3.0})(["p", "p"], ["list", "x"])
    assert per_reward["mixed"] == [None, 1.0] and totals == [0.0, 3.0]
