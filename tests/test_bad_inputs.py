"""Nothing silently wrong: every case of tools/bad_inputs.py (runs that are not theirs, damaged experts, counts and
options, unbounded or undecodable input) ends in one clear line with exit status 2, or in a correct result."""
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bad_inputs", REPO / "tools" / "bad_inputs.py")
bad_inputs = importlib.util.module_from_spec(spec)
sys.modules["bad_inputs"] = bad_inputs  # its dataclasses look their module up by name
spec.loader.exec_module(bad_inputs)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    """One tiny world for every case (it is written to its own directory, never to the cache)."""
    return bad_inputs.Fixture(tmp_path_factory.mktemp("bad-inputs"))


@pytest.mark.parametrize("case", bad_inputs.CASES, ids=[c.name for c in bad_inputs.CASES])
def test_bad_input_case(case, fixture):
    ok, said = bad_inputs.run_case(case, fixture)
    assert ok, said


def test_the_checker_fails_a_case_that_prints_a_traceback_or_nothing(fixture):
    raises = bad_inputs.Case("raises", "x", "words", lambda f: 1 / 0)
    silent = bad_inputs.Case("silent", "x", "words", lambda f: (0, []))
    two_lines = bad_inputs.Case("two lines", "x", "words", lambda f: (2, ["words", "more"]))
    assert [bad_inputs.run_case(c, fixture)[0] for c in (raises, silent, two_lines)] == [False, False, False]


def test_the_docs_table_lists_every_case():
    table = (REPO / "docs" / "bad-inputs.md").read_text(encoding="utf-8")
    missing = [c.name for c in bad_inputs.CASES if f"| {c.group} | {c.name} |" not in table]
    assert not missing, f"run python tools/bad_inputs.py --markdown docs/bad-inputs.md ({missing})"
