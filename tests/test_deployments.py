"""The production shape on real servers: Prefect and MLflow on PostgreSQL, the pools and deployments of prefect.yaml
registered, `process` workers polling them: every deployment on its pool with a typed form, and the retraining
schedule as declared. The journey through them (a training run from the Prefect UI, run by the gpu pool's worker,
whose completion triggers the promotion deployment, which moves `@champion`) is tests/test_ui_journeys.py, on the
same session's stack."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.e2e
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _deployment(api: str, flow: str, name: str) -> dict:
    return httpx.get(f"{api}/deployments/name/{flow}/{name}").raise_for_status().json()


def test_every_deployment_is_registered_on_its_pool_with_a_typed_form(production_stack):
    api = production_stack["prefect"]
    expected = {
        ("training", "training"): "gpu",
        ("training", "training-cpu"): "cpu",
        ("training", "retraining"): "gpu",
        ("promotion", "promotion"): "cpu",
        ("rollback", "rollback"): "cpu",
        ("batch-scoring", "batch-scoring"): "cpu",
        ("drift-monitoring", "monitoring"): "cpu",
        ("sweep", "sweep"): "gpu",
    }
    for (flow, name), pool in expected.items():
        deployment = _deployment(api, flow, name)
        assert deployment["work_pool_name"] == pool, name
        assert deployment["parameter_openapi_schema"]["properties"], f"{name} has no parameter form"
    pools = {p["name"]: p["type"] for p in httpx.post(f"{api}/work_pools/filter", json={}).json()}
    assert pools["gpu"] == pools["cpu"] == "process"
    training_form = _deployment(api, "training", "training")["parameter_openapi_schema"]
    assert set(training_form["properties"]) == {"dataset", "model", "training", "evaluation", "registered_model_name"}


def test_retraining_schedule_is_registered_with_its_cron(production_stack):
    schedules = _deployment(production_stack["prefect"], "training", "retraining")["schedules"]
    assert len(schedules) == 1 and schedules[0]["active"]
    assert schedules[0]["schedule"]["cron"] == "0 3 * * 1" and schedules[0]["schedule"]["timezone"] == "UTC"
