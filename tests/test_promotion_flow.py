"""End to end: the promotion and rollback flows against real Prefect and MLflow servers, with real `bentoml build`
and `bentoml serve` processes. Model quality is set exactly by relabelling one tiny fine-tuned model: the same
weights with two class names swapped (macro-F1 1/3) or all of them rotated (macro-F1 0)."""

from __future__ import annotations

import httpx
import mlflow.pyfunc
import pytest
import yaml
from mlflow import MlflowClient

from flows.promotion import promotion, rollback
from tasks.common.ports import free_port
from tasks.contracts import CHAMPION_ALIAS, PREVIOUS_CHAMPION_ALIAS
from tasks.promotion.bento import pick_smoke_texts, start_bento_server, stop_bento_server, wait_until_ready
from tasks.promotion.gate import GateConfig
from tasks.registry import resolve_alias
from tests.fixtures import flow_run_and_artifacts, register_model_versions

pytestmark = pytest.mark.e2e
FIRST_CHAMPION_FLOOR = GateConfig(min_macro_f1_first_champion=0.3)


def _bento_labels(tag: str) -> dict:
    import bentoml

    return dict(bentoml.bentos.get(tag).info.labels)


def _version_tags(uri: str, name: str, version: int) -> dict:
    return MlflowClient(uri).get_model_version(name, str(version)).tags


def test_promotion_gates_builds_serves_and_rolls_back(project_env, servers, prepared_fixture, tuned_fixture, tmp_path):
    uri, name = servers["mlflow"], "promo-flow"
    fair, worse, good = register_model_versions(
        servers, prepared_fixture, tuned_fixture, tmp_path, name, ["fair", "worse", "good"]
    )

    # 1. No champion yet: the first candidate above the floor becomes the champion, with a built, checked Bento.
    state = promotion(name, candidate_version=fair, gate=FIRST_CHAMPION_FLOOR, return_state=True)
    assert state.is_completed(), state.message
    first = state.result()
    assert first.decision.promote and "no champion yet" in first.decision.reason
    assert (first.champion_version, first.previous_champion_version) == (fair, None)
    assert resolve_alias(uri, name, CHAMPION_ALIAS) == fair
    assert _bento_labels(first.bento.bento_tag) == {
        "project": "textclf",
        "registered_model": name,
        "model_version": str(fair),
    }
    # No Docker engine here: no image, a clear message, and the generated Dockerfile to build one elsewhere.
    assert first.bento.container_image is None and "No Docker engine" in first.bento.container_message
    assert first.bento.dockerfile.is_file() and "FROM" in first.bento.dockerfile.read_text()
    assert _version_tags(uri, name, fair)["promotion.decision"] == "promoted"
    flow_run, artifacts = flow_run_and_artifacts(servers["prefect"], state.state_details.flow_run_id)
    assert flow_run["state"]["type"] == "COMPLETED"
    decision_md = next(a for a in artifacts if a["key"] == "promotion-decision")["data"]
    assert "**promoted**" in decision_md and f"version {fair}" in decision_md

    # 2. A worse candidate is rejected and changes nothing; the decision is on the version and on a run.
    state = promotion(name, candidate_version=worse, gate=FIRST_CHAMPION_FLOOR, return_state=True)
    assert state.is_completed(), state.message
    rejected = state.result()
    assert not rejected.decision.promote and rejected.bento is None
    assert rejected.decision.champion_version == fair
    assert rejected.decision.macro_f1_delta == pytest.approx(-1 / 3, abs=0.02)
    assert resolve_alias(uri, name, CHAMPION_ALIAS) == fair
    assert resolve_alias(uri, name, PREVIOUS_CHAMPION_ALIAS) is None
    tags = _version_tags(uri, name, worse)
    assert tags["promotion.decision"] == "rejected" and "< required gain" in tags["promotion.reason"]
    run = MlflowClient(uri).get_run(tags["promotion.run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["champion_macro_f1"] == pytest.approx(1 / 3, abs=0.02)
    assert run.data.metrics["candidate_macro_f1"] == pytest.approx(0.0, abs=0.02)
    assert run.data.params["decision"] == "rejected"

    # 3. A better candidate (the default: the version behind @candidate) is promoted; the former champion is kept.
    state = promotion(name, gate=FIRST_CHAMPION_FLOOR, return_state=True)
    assert state.is_completed(), state.message
    better = state.result()
    assert better.decision.promote and better.decision.candidate_version == good
    assert (better.champion_version, better.previous_champion_version) == (good, fair)
    assert resolve_alias(uri, name, CHAMPION_ALIAS) == good
    assert resolve_alias(uri, name, PREVIOUS_CHAMPION_ALIAS) == fair

    # The built Bento, served, answers like mlflow.pyfunc on the same texts.
    texts = prepared_fixture[1].split("test")["text"].tolist()
    expected = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION_ALIAS}").predict(texts)["label"].tolist()
    port, log = free_port(), tmp_path / "serve.log"
    process = start_bento_server(better.bento.bento_tag, "127.0.0.1", port, log)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", process, log, 180)
        answers = httpx.post(f"http://127.0.0.1:{port}/classify", json={"texts": texts}, timeout=60).json()
    finally:
        stop_bento_server(process.pid)
    assert [a["label"] for a in answers] == expected
    assert {a["model_version"] for a in answers} == {f"{name}/{good}+{better.bento.runtime}"}

    # 4. Rollback: the former champion serves again (rebuilt and checked), the demoted one stays one step away.
    state = rollback(name, return_state=True)
    assert state.is_completed(), state.message
    rolled = state.result()
    assert (rolled.champion_version, rolled.previous_champion_version) == (fair, good)
    assert resolve_alias(uri, name, CHAMPION_ALIAS) == fair
    assert resolve_alias(uri, name, PREVIOUS_CHAMPION_ALIAS) == good
    assert _bento_labels(rolled.bento.bento_tag)["model_version"] == str(fair)

    def packed_model(bento) -> str:
        manifest = yaml.safe_load((bento.dockerfile.parents[2] / "bento.yaml").read_text())
        return manifest["services"][0]["models"][0]["tag"]

    assert packed_model(rolled.bento) == packed_model(first.bento)  # the same model, not a second import
    import bentoml

    imported = [m for m in bentoml.models.list("text-classifier") if m.info.labels.get("registered_model") == name]
    assert len(imported) == 2  # fair and good, each imported once (other tests share the store)


def test_a_bento_that_fails_its_smoke_test_leaves_the_champion_alone(
    project_env, servers, prepared_fixture, tuned_fixture, tmp_path
):
    uri, name = servers["mlflow"], "promo-failure"
    fair, good = register_model_versions(servers, prepared_fixture, tuned_fixture, tmp_path, name, ["fair", "good"])
    assert (
        promotion(name, candidate_version=fair, gate=FIRST_CHAMPION_FLOOR, containerize=False).champion_version == fair
    )

    # The gate passes, but the Bento cannot become ready within 1 s: the flow fails and no alias moves.
    state = promotion(name, candidate_version=good, smoke_test_timeout_seconds=1, return_state=True)
    assert state.is_failed()
    assert "was not ready within 1 s" in state.message
    assert resolve_alias(uri, name, CHAMPION_ALIAS) == fair
    assert resolve_alias(uri, name, PREVIOUS_CHAMPION_ALIAS) is None
    tags = _version_tags(uri, name, good)
    assert tags["promotion.decision"] == "failed" and "BentoError" in tags["promotion.error"]
    assert MlflowClient(uri).get_run(tags["promotion.run_id"]).info.status == "FAILED"


def test_promotion_without_a_candidate_and_rollback_without_a_previous_champion_say_so(project_env, servers):
    state = promotion("never-trained", return_state=True)
    assert state.is_failed() and "has no @candidate version: train one first" in state.message
    state = rollback("never-trained", return_state=True)
    assert state.is_failed() and "no former champion to roll back to" in state.message


def test_smoke_texts_include_the_longest_test_text(tmp_path):
    import pandas as pd

    path = tmp_path / "test.parquet"
    pd.DataFrame({"text": ["a", "b", "a", "c" * 50, "d"], "label": ["x"] * 5}).to_parquet(path)
    assert pick_smoke_texts(path, 2) == ["a", "c" * 50]
    assert pick_smoke_texts(path, 10) == ["a", "b", "c" * 50, "d"]
    assert pick_smoke_texts(path, 1) == ["a"]
