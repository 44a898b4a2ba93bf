"""The promotion gate: the pure decision on every branch, and the registry side (aliases, rollback, scoring,
recorded decision) against a real MLflow server."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import ValidationError

from tasks.contracts import CHAMPION_ALIAS, PREVIOUS_CHAMPION_ALIAS
from tasks.promotion.gate import GateConfig, GateDecision, decide, record_decision, score_versions
from tasks.promotion.scores import TestScores
from tasks.registry import move_aliases, resolve_alias, rollback


def scores(macro: float, **per_class: float) -> TestScores:
    return TestScores(macro_f1=macro, per_class_f1=per_class)


# --- decide: pure -------------------------------------------------------------------------------------------


def test_first_champion_above_floor_is_promoted():
    decision = decide(scores(0.62, a=0.6, b=0.64), None, GateConfig(), candidate_version=1, champion_version=None)
    assert decision.promote
    assert decision.champion_version is None and decision.champion_macro_f1 is None
    assert decision.macro_f1_delta is None and decision.worst_class is None and decision.per_class_f1_delta == {}
    assert "no champion" in decision.reason and "0.620" in decision.reason and "0.500" in decision.reason


def test_first_champion_below_floor_is_rejected():
    decision = decide(scores(0.42), None, GateConfig(min_macro_f1_first_champion=0.6), 1, None)
    assert not decision.promote
    assert "0.420 < first-champion floor 0.600" in decision.reason


def test_first_champion_exactly_at_floor_is_promoted():
    assert decide(scores(0.5), None, GateConfig(), 1, None).promote


def test_better_candidate_is_promoted_and_reason_names_the_numbers():
    candidate = scores(0.912, tech=0.89, sport=0.95, business=0.896)
    champion = scores(0.880, tech=0.90, sport=0.85, business=0.89)
    decision = decide(candidate, champion, GateConfig(), candidate_version=2, champion_version=1)
    assert decision.promote
    assert decision.macro_f1_delta == pytest.approx(0.032)
    assert decision.worst_class == "tech"
    assert decision.per_class_f1_delta["tech"] == pytest.approx(-0.01)
    assert decision.reason == (
        "candidate macro-F1 0.912 beats champion 0.880 by 0.032 >= 0.000; worst class drop 'tech' -0.010 within 0.050"
    )


def test_worse_candidate_is_rejected():
    decision = decide(scores(0.870, a=0.87), scores(0.880, a=0.88), GateConfig(), 3, 2)
    assert not decision.promote
    assert decision.macro_f1_delta == pytest.approx(-0.01)
    assert "0.870" in decision.reason and "0.880" in decision.reason and "-0.010" in decision.reason
    assert "< required gain 0.000" in decision.reason


def test_better_macro_but_one_class_drops_too_much_is_rejected():
    candidate = scores(0.90, tech=0.80, sport=1.00)
    champion = scores(0.85, tech=0.90, sport=0.80)
    decision = decide(candidate, champion, GateConfig(max_class_f1_drop=0.05), 2, 1)
    assert not decision.promote
    assert decision.worst_class == "tech"
    assert "beats champion 0.850 by 0.050" in decision.reason
    assert "class 'tech' F1 drops by 0.100 (0.900 -> 0.800), beyond 0.050" in decision.reason


def test_gain_exactly_at_the_margin_is_promoted():
    # 0.85 - 0.80 is 0.04999999999999993 in floating point: still "at least 0.05".
    decision = decide(scores(0.85, a=0.85), scores(0.80, a=0.80), GateConfig(min_macro_f1_gain=0.05), 2, 1)
    assert decision.promote
    assert "by 0.050 >= 0.050" in decision.reason


def test_class_drop_exactly_at_the_limit_is_allowed_and_just_beyond_is_not():
    champion = scores(0.80, a=0.90, b=0.70)
    at_limit = decide(scores(0.85, a=0.85, b=0.85), champion, GateConfig(max_class_f1_drop=0.05), 2, 1)
    assert at_limit.promote and "'a' -0.050 within 0.050" in at_limit.reason
    beyond = decide(scores(0.85, a=0.849, b=0.851), champion, GateConfig(max_class_f1_drop=0.05), 2, 1)
    assert not beyond.promote and "class 'a'" in beyond.reason


def test_gain_just_below_the_margin_is_rejected():
    decision = decide(scores(0.849, a=0.849), scores(0.80, a=0.80), GateConfig(min_macro_f1_gain=0.05), 2, 1)
    assert not decision.promote


def test_class_the_champion_lacks_counts_as_champion_f1_zero():
    decision = decide(scores(0.8, a=0.8, new=0.8), scores(0.7, a=0.7), GateConfig(), 2, 1)
    assert decision.per_class_f1_delta == pytest.approx({"a": 0.1, "new": 0.8})
    assert decision.promote


def test_gate_config_bounds():
    with pytest.raises(ValidationError):
        GateConfig(max_class_f1_drop=1.5)
    with pytest.raises(ValidationError):
        GateConfig(min_macro_f1_gain=-0.1)
    with pytest.raises(ValidationError):
        GateConfig().min_macro_f1_gain = 0.2  # frozen


# --- against a real MLflow server ---------------------------------------------------------------------------

MODEL = "promote-model"


@pytest.fixture(scope="module")
def two_versions(servers, prepared_fixture, tuned_fixture, tmp_path_factory):
    """Versions 1 and 2 of a fresh registered model, from two training runs."""
    from tasks.tracking import start_tracking_run
    from tasks.training.evaluate import EvaluationConfig, evaluate
    from tasks.training.register import RegisterConfig, register

    snapshot, prepared = prepared_fixture
    evaluation = evaluate(
        tuned_fixture, prepared, tmp_path_factory.mktemp("promote") / "eval", config=EvaluationConfig(latency_samples=1)
    )
    versions = []
    for key in ("promote-train-1", "promote-train-2"):
        tracking = start_tracking_run(servers["mlflow"], "promote-test", "train", idempotency_key=key)
        versions.append(
            register(
                tuned_fixture,
                evaluation,
                snapshot,
                prepared,
                tracking,
                RegisterConfig(registered_model_name=MODEL),
                {"epochs": 8},
                "test",
            )
        )
    assert [v.version for v in versions] == [1, 2]
    return servers["mlflow"]


@pytest.mark.integration
def test_aliases_move_and_roll_back(two_versions):
    uri = two_versions
    assert resolve_alias(uri, MODEL, CHAMPION_ALIAS) is None
    assert resolve_alias(uri, "no-such-model", CHAMPION_ALIAS) is None

    assert move_aliases(uri, MODEL, 1) == (None, 1)
    assert resolve_alias(uri, MODEL, CHAMPION_ALIAS) == 1
    assert resolve_alias(uri, MODEL, PREVIOUS_CHAMPION_ALIAS) is None

    assert move_aliases(uri, MODEL, 2) == (1, 2)
    assert move_aliases(uri, MODEL, 2) == (1, 2)  # a retry changes nothing
    assert resolve_alias(uri, MODEL, CHAMPION_ALIAS) == 2
    assert resolve_alias(uri, MODEL, PREVIOUS_CHAMPION_ALIAS) == 1

    assert rollback(uri, MODEL) == (1, 2)
    assert resolve_alias(uri, MODEL, CHAMPION_ALIAS) == 1
    assert resolve_alias(uri, MODEL, PREVIOUS_CHAMPION_ALIAS) == 2
    # The other aliases are left alone.
    assert MlflowClient(uri).get_model_version_by_alias(MODEL, "candidate").version == "2"

    with pytest.raises(MlflowException):
        move_aliases(uri, MODEL, 99)  # no such version: no alias moves
    assert resolve_alias(uri, MODEL, CHAMPION_ALIAS) == 1


@pytest.mark.integration
def test_invalid_alias_name_is_an_error_not_a_missing_champion(two_versions):
    with pytest.raises(MlflowException):
        resolve_alias(two_versions, MODEL, "not a valid alias!")


@pytest.mark.integration
def test_rollback_without_previous_champion_says_so(servers):
    MlflowClient(servers["mlflow"]).create_registered_model("promote-fresh-model")
    with pytest.raises(ValueError, match=r"'promote-fresh-model'.*no previous champion to roll back to"):
        rollback(servers["mlflow"], "promote-fresh-model")


@pytest.mark.integration
def test_score_versions_on_the_test_split(two_versions, prepared_fixture):
    _, prepared = prepared_fixture
    test = prepared.split("test")
    result = score_versions(two_versions, MODEL, [1, 2], test[["text", "label"]])
    assert set(result) == {1, 2}
    for version_scores in result.values():
        assert 0.0 <= version_scores.macro_f1 <= 1.0
        assert set(version_scores.per_class_f1) == set(prepared.label_names)
        assert version_scores.n == len(test)
    # Same model, same texts: same scores.
    assert result[1].macro_f1 == pytest.approx(result[2].macro_f1)
    decision = decide(result[2], result[1], GateConfig(), 2, 1)
    assert decision.promote and decision.macro_f1_delta == pytest.approx(0.0)


@pytest.mark.integration
def test_score_versions_scores_a_downloaded_version_from_its_folder_without_downloading_it_again(
    two_versions, prepared_fixture, tmp_path, monkeypatch
):
    import mlflow.artifacts

    from tasks.registry import download_model_version

    test = prepared_fixture[1].split("test")[["text", "label"]]
    downloaded = download_model_version(two_versions, MODEL, 2, tmp_path / "models")
    fetched: list[str] = []
    real_download = mlflow.artifacts.download_artifacts
    monkeypatch.setattr(
        mlflow.artifacts,
        "download_artifacts",
        lambda *a, **kw: fetched.append(kw["artifact_uri"]) or real_download(*a, **kw),
    )
    result = score_versions(two_versions, MODEL, [1, 2], test, downloaded={2: downloaded.pyfunc_dir})
    assert fetched == [MlflowClient(two_versions).get_model_version_download_uri(MODEL, "1")]  # version 1 only
    assert result[2] == result[1]  # the same fine-tuned model in both versions: the same scores


@pytest.mark.integration
def test_record_decision_tags_the_version_and_logs_the_run(two_versions):
    from tasks.tracking import start_tracking_run

    uri = two_versions
    tracking = start_tracking_run(uri, "promote-test", "promotion", idempotency_key="promotion-1")
    decision = GateDecision(
        promote=False,
        reason="class 'tech' F1 drops -0.100",
        candidate_version=2,
        champion_version=1,
        candidate_macro_f1=0.9,
        champion_macro_f1=0.85,
        macro_f1_delta=0.05,
        per_class_f1_delta={"tech": -0.1, "sport": 0.2},
        worst_class="tech",
    )
    record_decision(tracking, MODEL, decision, GateConfig())
    record_decision(tracking, MODEL, decision, GateConfig())  # a retry

    client = MlflowClient(uri)
    tags = client.get_model_version(MODEL, "2").tags
    assert tags["promotion.decision"] == "rejected"
    assert tags["promotion.reason"] == decision.reason
    assert tags["promotion.champion_version"] == "1"
    assert tags["promotion.macro_f1_delta"] == "0.0500"
    run = client.get_run(tracking.run_id)
    assert run.data.metrics["macro_f1_delta"] == pytest.approx(0.05)
    assert run.data.metrics["f1_delta_tech"] == pytest.approx(-0.1)
    assert run.data.metrics["promotion_promoted"] == 0.0
    assert run.data.params["decision"] == "rejected"
    assert run.data.params["gate_max_class_f1_drop"] == "0.05"
