"""End to end: the training flow on a tiny BERT against real Prefect and MLflow servers on loopback."""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd
import pytest
from mlflow import MlflowClient

from flows.training import DatasetParameters, ModelParameters, TrainingParameters, training
from tests.fixtures import flow_run_and_artifacts

pytestmark = pytest.mark.e2e
MODEL_NAME = "e2e-topics"


def _run(csv, model_dir, name=MODEL_NAME):
    return training(
        DatasetParameters(source=str(csv)),
        ModelParameters(base_model=str(model_dir), max_length=32),
        TrainingParameters(epochs=8, batch_size=8, learning_rate=2e-3, early_stopping_patience=0),
        registered_model_name=name,
        return_state=True,
    )


def test_training_flow_registers_a_candidate_that_predicts_labels(
    project_env, servers, fixture_csv, tiny_model_dir, monkeypatch
):
    state = _run(fixture_csv, tiny_model_dir)
    assert state.is_completed(), state.message
    version = state.result()
    assert version.name == MODEL_NAME and version.alias == "candidate"

    # The flow run is on the Prefect server, completed, with the evaluation report as a markdown artifact.
    flow_run, artifacts = flow_run_and_artifacts(servers["prefect"], state.state_details.flow_run_id)
    assert flow_run["state"]["type"] == "COMPLETED"
    report = [a for a in artifacts if a["key"] == "evaluation-report"]
    assert report and "TF-IDF" in report[0]["data"] and f"version **{version.version}**" in report[0]["data"]

    client = MlflowClient(servers["mlflow"])
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    for metric in (
        "test_accuracy",
        "test_macro_f1",
        "test_weighted_f1",
        "test_roc_auc_ovr",
        "test_ece",
        "baseline_macro_f1",
        "latency_ms_per_text_batched",
        "test_f1_sport",
    ):
        assert metric in run.data.metrics, metric
    assert client.get_metric_history(version.run_id, "train/loss"), "step metrics were not logged while training"
    assert run.data.params["epochs"] == "8" and run.data.params["max_length"] == "32"
    assert run.data.params["truncation"] == "head"
    # The tiny model really learned the separable fixture (its topic words decide the label), not just ran.
    assert run.data.metrics["test_macro_f1"] >= 0.9, run.data.metrics["test_macro_f1"]
    assert run.data.tags["data_version"] and run.data.tags["code_version"]
    # What it trained on, as chosen (params hold the requested "auto"): one process, on this machine's device.
    assert run.data.tags["training_processes"] == "1" and run.data.params["precision"] == "auto"
    assert run.data.tags["precision"] in ("fp32", "bf16", "fp16") and run.data.tags["device"] in ("cpu", "cuda")
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "evaluation")}
    for name in ("report.md", "confusion_matrix.png", "reliability_diagram.png", "per_class_f1.png", "metrics.json"):
        assert f"evaluation/{name}" in artifacts
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == run.data.tags["data_version"]

    assert client.get_model_version_by_alias(MODEL_NAME, "candidate").version == str(version.version)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers["mlflow"])
    loaded = mlflow.pyfunc.load_model(version.alias_uri)
    texts = ["the striker scored a goal for the team", "a new laptop chip for the cloud server"]
    predictions = loaded.predict(pd.DataFrame({"text": texts}))
    assert predictions["label"].tolist() == ["sport", "tech"]
    assert predictions["probability"].between(0, 1).all()
    assert loaded.predict(texts)["label"].tolist() == predictions["label"].tolist()  # a plain list works too

    # Second run on the same data: preprocessing comes from the cache, and a new version becomes the candidate.
    second = _run(fixture_csv, tiny_model_dir)
    assert second.is_completed(), second.message
    again = second.result()
    assert again.version == version.version + 1
    assert client.get_run(again.run_id).data.tags["preprocess_cache_hit"] == "true"
    assert run.data.tags["preprocess_cache_hit"] == "false"
    assert client.get_model_version_by_alias(MODEL_NAME, "candidate").version == str(again.version)


def test_bad_dataset_fails_the_flow_with_a_clear_message_and_leaves_nothing(project_env, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.csv"
    bad.write_text("body,label\nhello,a\nworld,b\n")
    state = _run(bad, tiny_model_dir, name="e2e-bad")
    assert state.is_failed()
    with pytest.raises(Exception, match=r"no column 'text' \(columns found: body, label\)"):
        state.result()
    assert not list((project_env / "snapshots").glob("*"))  # no snapshot (a missing folder globs to nothing)
