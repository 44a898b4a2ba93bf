"""The tier plugin (tests/tiers.py): every test in exactly one tier, the fast lane never starts a server."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import pytest

@pytest.fixture
def servers():  # stands for the real fixture of tests/conftest.py: only its name matters to the plugin
    return {}
"""


def _run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_sample=source)
    return pytester.runpytest_inprocess("-p", "tests.tiers", *args)


def test_an_unmarked_test_is_a_unit_test(pytester):
    result = _run(pytester, "def test_plain():\n    pass\n", "-m", "unit")
    result.assert_outcomes(passed=1)


def test_a_unit_test_asking_for_real_servers_is_refused_naming_it(pytester):
    result = _run(pytester, "def test_uses_servers(servers):\n    pass\n")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_uses_servers: uses servers (real servers) but is a unit test*"])


def test_two_tiers_are_refused(pytester):
    source = "import pytest\n\n@pytest.mark.unit\n@pytest.mark.e2e\ndef test_both():\n    pass\n"
    result = _run(pytester, source)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_both: marked unit and e2e; give it one tier*"])


def test_an_integration_test_may_use_servers_and_is_not_in_the_fast_lane(pytester):
    source = "import pytest\n\n@pytest.mark.integration\ndef test_uses_servers(servers):\n    pass\n"
    assert _run(pytester, source, "-m", "unit").ret == pytest.ExitCode.NO_TESTS_COLLECTED
