"""The production journey on real servers: Prefect and MLflow on PostgreSQL, the pools and deployments of
prefect.yaml registered, `process` workers polling them. A training run is created through the API exactly as the
Prefect UI's Run button does; the worker runs it; its completion triggers the promotion deployment by itself;
`@champion` moves. And the retraining schedule is registered as declared."""

from __future__ import annotations

import time

import httpx
import pytest
from mlflow import MlflowClient

from tasks.contracts import CANDIDATE_ALIAS, CHAMPION_ALIAS
from tasks.registry import resolve_alias

pytestmark = pytest.mark.e2e
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _deployment(api: str, flow: str, name: str) -> dict:
    return httpx.get(f"{api}/deployments/name/{flow}/{name}").raise_for_status().json()


def _wait_for(api: str, flow_run_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{flow_run_id}").raise_for_status().json()
        if run["state"]["type"] in TERMINAL:
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout} s: {run['state']}")


def _runs_of(api: str, deployment_id: str) -> list[dict]:
    return (
        httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})
        .raise_for_status()
        .json()
    )


def run_deployment_like_the_ui(api: str, deployment_id: str, parameters: dict) -> dict:
    """What the UI's custom-run form sends: the deployment's create_flow_run with the edited parameters."""
    return (
        httpx.post(
            f"{api}/deployments/{deployment_id}/create_flow_run",
            json={"parameters": parameters, "state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"}},
        )
        .raise_for_status()
        .json()
    )


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
    assert set(training_form["properties"]) == {"dataset", "model", "training", "registered_model_name"}


def test_retraining_schedule_is_registered_with_its_cron(production_stack):
    schedules = _deployment(production_stack["prefect"], "training", "retraining")["schedules"]
    assert len(schedules) == 1 and schedules[0]["active"]
    assert schedules[0]["schedule"]["cron"] == "0 3 * * 1" and schedules[0]["schedule"]["timezone"] == "UTC"


def test_a_training_run_from_the_ui_is_run_by_the_worker_and_its_completion_promotes_the_version(
    production_stack, fixture_csv, tiny_model_dir
):
    api, uri, name = production_stack["prefect"], production_stack["mlflow"], "prod-topics"
    training = _deployment(api, "training", "training")
    parameters = {
        "dataset": {"source": str(fixture_csv)},
        "model": {"base_model": str(tiny_model_dir), "max_length": 32},
        "training": {"epochs": 8, "batch_size": 8, "learning_rate": 2e-3, "early_stopping_patience": 0},
        "registered_model_name": name,
    }
    created = run_deployment_like_the_ui(api, training["id"], parameters)
    finished = _wait_for(api, created["id"])
    assert finished["state"]["type"] == "COMPLETED", finished["state"]
    assert finished["work_pool_name"] == "gpu"  # the gpu pool's worker ran it; no GPU here, so on the CPU

    # MLflow (on PostgreSQL) has the run and a new @candidate, registered by exactly this flow run.
    version = resolve_alias(uri, name, CANDIDATE_ALIAS)
    assert version == 1
    model_version = MlflowClient(uri).get_model_version(name, "1")
    assert model_version.tags["prefect.flow_run_id"] == created["id"]
    assert MlflowClient(uri).get_run(model_version.run_id).data.metrics["test_macro_f1"] > 0.5

    # The automation on "training completed" ran the promotion deployment, with that flow run's id.
    promotion = _deployment(api, "promotion", "promotion")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        runs = [
            r for r in _runs_of(api, promotion["id"]) if r["parameters"].get("training_flow_run_id") == created["id"]
        ]
        if runs:
            break
        time.sleep(2)
    assert len(runs) == 1, "the promotion deployment was not triggered by the completed training run"
    assert runs[0]["parameters"] == {"registered_model_name": name, "training_flow_run_id": created["id"]}
    promoted = _wait_for(api, runs[0]["id"])
    assert promoted["state"]["type"] == "COMPLETED", promoted["state"]
    assert resolve_alias(uri, name, CHAMPION_ALIAS) == 1
    assert MlflowClient(uri).get_model_version(name, "1").tags["promotion.decision"] == "promoted"
