"""Tracking and register stages against a real MLflow server: idempotency and clear errors."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from tasks.common.ports import free_port
from tasks.tracking import TrackingUnavailable, start_tracking_run
from tasks.training.evaluate import evaluate
from tasks.training.register import RegisterConfig, register

pytestmark = pytest.mark.integration


def test_start_tracking_run_is_idempotent_per_key(servers):
    first = start_tracking_run(servers["mlflow"], "idempotency", "run", idempotency_key="flow-run-1")
    again = start_tracking_run(servers["mlflow"], "idempotency", "run", idempotency_key="flow-run-1")
    other = start_tracking_run(servers["mlflow"], "idempotency", "run", idempotency_key="flow-run-2")
    assert first.run_id == again.run_id != other.run_id


def test_unreachable_tracking_server_says_what_to_do():
    with pytest.raises(TrackingUnavailable, match="MLFLOW_TRACKING_URI"):
        start_tracking_run(f"http://127.0.0.1:{free_port()}", "x", "run", idempotency_key="k")


def test_register_twice_for_one_run_makes_one_version(servers, prepared_fixture, tuned_fixture, tmp_path):
    snapshot, prepared = prepared_fixture
    evaluation = evaluate(tuned_fixture, prepared, tmp_path / "eval")
    tracking = start_tracking_run(servers["mlflow"], "register-test", "run", idempotency_key="register-once")
    config = RegisterConfig(registered_model_name="idempotent-model")
    arguments = (tuned_fixture, evaluation, snapshot, prepared, tracking, config, {"epochs": 8}, "test")

    first = register(*arguments)
    retried = register(*arguments)  # what a Prefect retry after a late failure does

    client = MlflowClient(servers["mlflow"])
    versions = client.search_model_versions("name='idempotent-model'")
    assert [v.version for v in versions] == [str(first.version)]
    assert retried.version == first.version
    assert client.get_model_version_by_alias("idempotent-model", "candidate").version == str(first.version)


def test_registered_model_name_is_validated():
    with pytest.raises(ValueError, match="registered_model_name"):
        RegisterConfig(registered_model_name="bad name/with slash")


def test_class_names_mlflow_refuses_in_metric_names_are_made_valid():
    from tasks.tracking import mlflow_key

    # ATIS's combined intents: MLflow refuses '#' in a metric name, which failed the whole training run.
    assert mlflow_key("test_f1_atis_flight#atis_airfare") == "test_f1_atis_flight_atis_airfare"
    assert mlflow_key("test_f1_ok-name.v2/a b:c") == "test_f1_ok-name.v2/a b:c"
    assert len(mlflow_key("x" * 400)) == 250
