"""The test tiers (a pytest plugin, loaded by `addopts` in pyproject.toml).

Every test is in exactly one tier, so each lane selects what it can afford:
- `unit`: in-process, no server, at most the tiny BERT trained in seconds (`make test-fast`: `pytest -m unit`);
- `integration`: one part against real servers (MLflow, Prefect, `bentoml serve`, Prometheus, PostgreSQL);
- `e2e`: a user's whole journey (the CLI, flows end to end, deployments through workers, the UI in Chromium).
`gpu` is orthogonal: the test needs CUDA and skips, saying so, where none is visible.

A test without a tier mark is a unit test. A test marked unit (or unmarked) that asks for a fixture starting real
servers is refused at collection, so the fast lane cannot silently start servers."""

from __future__ import annotations

import pytest

TIERS = ("unit", "integration", "e2e")
# Session fixtures that start real servers (tests/conftest.py); a test using one is integration or e2e.
REAL_SERVER_FIXTURES = frozenset({"servers", "project_env", "production_stack", "bento_env"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    misfiled = []
    for item in items:
        tiers = [tier for tier in TIERS if item.get_closest_marker(tier)]
        if not tiers:
            item.add_marker(pytest.mark.unit)
            tiers = ["unit"]
        uses_servers = sorted(REAL_SERVER_FIXTURES & set(getattr(item, "fixturenames", ())))
        if len(tiers) > 1:
            misfiled.append(f"{item.nodeid}: marked {' and '.join(tiers)}; give it one tier")
        elif tiers == ["unit"] and uses_servers:
            misfiled.append(
                f"{item.nodeid}: uses {', '.join(uses_servers)} (real servers) but is a unit test; "
                "mark it @pytest.mark.integration or @pytest.mark.e2e"
            )
        if item.get_closest_marker("gpu"):
            import torch

            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch here"))
    if misfiled:
        raise pytest.UsageError("Tests in the wrong tier (tests/tiers.py):\n  " + "\n  ".join(misfiled))
