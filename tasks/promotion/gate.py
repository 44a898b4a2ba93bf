"""Stage 6, promote: the promotion gate. Score the candidate and the current champion on the same test texts,
decide whether the candidate may replace the champion, record why on the candidate model version and on a
promotion run, and move the `champion` / `previous-champion` aliases (or roll them back).

Everything goes through an explicit `MlflowClient` for a given tracking URI: no global MLflow state is touched.
`decide` is pure; the other functions talk to the registry."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.promotion.scores import TestScores, answer_classes, as_answers, is_label_sets, score_answers
from tasks.registry import mlflow_client
from tasks.tracking import TrackingRef, log_metrics, log_params

# Written by the evaluate stage and logged under `evaluation/` of the training run: the test split it scored.
# Float arithmetic must not turn "exactly at the margin" into a rejection (0.85 - 0.80 = 0.0499999...).
TOLERANCE = 1e-9


class GateConfig(BaseModel):
    """When a candidate may replace the champion."""

    model_config = ConfigDict(frozen=True)

    min_macro_f1_gain: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Candidate test macro-F1 must beat the champion's by at least this much.",
    )
    max_class_f1_drop: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="No class's test F1 may drop by more than this compared with the champion.",
    )
    min_macro_f1_first_champion: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Test macro-F1 a candidate needs to become the first champion (when there is none yet).",
    )


class GateDecision(BaseModel):
    """What the gate decided, and the numbers it decided on."""

    model_config = ConfigDict(frozen=True)

    promote: bool
    reason: str
    candidate_version: int
    champion_version: int | None
    candidate_macro_f1: float
    champion_macro_f1: float | None = None
    macro_f1_delta: float | None = None
    per_class_f1_delta: dict[str, float] = Field(default_factory=dict)
    worst_class: str | None = None

    @property
    def label(self) -> str:
        return "promoted" if self.promote else "rejected"


def score_versions(
    tracking_uri: str,
    name: str,
    versions: list[int],
    test: pd.DataFrame | Path,
    labels: list[str] | None = None,
    downloaded: dict[int, Path] | None = None,
) -> dict[int, TestScores]:
    """Test macro-F1 and per-class F1 (keyed by label string) of each model version, on the same texts.

    `test` (a DataFrame, or a Parquet file of one) has `text` and `label` columns (the candidate's test split). The classes scored are `labels`, by
    default the labels present in `test`; a class a version never predicts simply scores F1 0.
    `downloaded` maps versions already on disk (tasks/registry.py `download_model_version`'s pyfunc folder) to
    their folder, so that the candidate the promotion goes on to package is downloaded once. Returns
    {version: TestScores}."""
    import mlflow.artifacts
    import mlflow.pyfunc

    if isinstance(test, (str, Path)):
        test = pd.read_parquet(test)
    if not {"text", "label"} <= set(test.columns):
        raise ValueError(f"The test data needs `text` and `label` columns, it has {list(test.columns)}.")
    if test.empty:
        raise ValueError("The test data is empty: there is nothing to score the model versions on.")
    texts = test["text"].astype(str).tolist()
    truth = as_answers(test["label"].tolist())  # label lists for a multi-label model's test split
    multi_label = is_label_sets(truth)
    labels = [str(label) for label in labels] if labels is not None else answer_classes(truth)
    client = mlflow_client(tracking_uri)
    scores: dict[int, TestScores] = {}
    for version in dict.fromkeys(int(v) for v in versions):
        if downloaded and version in downloaded:
            predicted = mlflow.pyfunc.load_model(str(downloaded[version])).predict(texts)
        else:
            source = client.get_model_version_download_uri(name, str(version))
            with tempfile.TemporaryDirectory(prefix=f"textclf-score-{version}-") as staging:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=staging, tracking_uri=tracking_uri
                )
                predicted = mlflow.pyfunc.load_model(local).predict(texts)
        if multi_label:
            if not isinstance(predicted, pd.DataFrame) or "labels" not in predicted.columns:
                raise ValueError(
                    f"Version {version} is not a multi-label model (its answers have no `labels`), but the test split "
                    "holds label lists: compare versions trained on the same kind of labels."
                )
            answered = as_answers(predicted["labels"].tolist())
        else:
            answered = (
                (predicted["label"] if isinstance(predicted, pd.DataFrame) else pd.Series(predicted))
                .astype(str)
                .tolist()
            )
        scores[version] = score_answers(truth, answered, labels)
    return scores


def decide(
    candidate_scores: TestScores,
    champion_scores: TestScores | None,
    config: GateConfig,
    candidate_version: int,
    champion_version: int | None,
) -> GateDecision:
    """Pure gate. The champion itself is never re-promoted. No champion: promote iff the candidate's macro-F1 reaches the first-champion floor.
    Otherwise promote iff macro-F1 gains at least `min_macro_f1_gain` and no class's F1 drops by more
    than `max_class_f1_drop`. The reason names the numbers."""
    candidate_f1 = candidate_scores.macro_f1
    if champion_version is not None and champion_version == candidate_version:
        return GateDecision(
            promote=False,
            reason=f"version {candidate_version} is already the champion: nothing to promote",
            candidate_version=candidate_version,
            champion_version=champion_version,
            candidate_macro_f1=candidate_f1,
            champion_macro_f1=candidate_f1,
            macro_f1_delta=0.0,
        )
    if champion_scores is None:
        floor = config.min_macro_f1_first_champion
        promote = candidate_f1 + TOLERANCE >= floor
        relation = ">=" if promote else "<"
        return GateDecision(
            promote=promote,
            reason=f"no champion yet; candidate macro-F1 {candidate_f1:.3f} {relation} first-champion floor "
            f"{floor:.3f}",
            candidate_version=candidate_version,
            champion_version=None,
            candidate_macro_f1=candidate_f1,
        )

    champion_f1 = champion_scores.macro_f1
    delta = candidate_f1 - champion_f1
    candidate_classes = candidate_scores.per_class_f1
    champion_classes = champion_scores.per_class_f1
    classes = list(dict.fromkeys([*candidate_classes, *champion_classes]))
    per_class = {c: float(candidate_classes.get(c, 0.0)) - float(champion_classes.get(c, 0.0)) for c in classes}
    worst = min(per_class, key=lambda c: per_class[c]) if per_class else None

    gain_ok = delta + TOLERANCE >= config.min_macro_f1_gain
    dropped = {c: d for c, d in per_class.items() if -d > config.max_class_f1_drop + TOLERANCE}
    if gain_ok:
        macro = (
            f"candidate macro-F1 {candidate_f1:.3f} beats champion {champion_f1:.3f} by {delta:.3f} "
            f">= {config.min_macro_f1_gain:.3f}"
        )
    else:
        macro = (
            f"candidate macro-F1 {candidate_f1:.3f} vs champion {champion_f1:.3f}: delta {delta:.3f} "
            f"< required gain {config.min_macro_f1_gain:.3f}"
        )
    if worst is None:
        by_class = "no per-class F1 to compare"
    elif dropped:
        by_class = "; ".join(
            f"class '{c}' F1 drops by {-d:.3f} ({float(champion_classes.get(c, 0.0)):.3f} -> "
            f"{float(candidate_classes.get(c, 0.0)):.3f}), beyond {config.max_class_f1_drop:.3f}"
            for c, d in sorted(dropped.items(), key=lambda item: item[1])
        )
    else:
        by_class = f"worst class drop '{worst}' {per_class[worst]:+.3f} within {config.max_class_f1_drop:.3f}"
    promote = gain_ok and not dropped
    return GateDecision(
        promote=promote,
        reason=f"{macro}; {by_class}",
        candidate_version=candidate_version,
        champion_version=champion_version,
        candidate_macro_f1=candidate_f1,
        champion_macro_f1=champion_f1,
        macro_f1_delta=delta,
        per_class_f1_delta=per_class,
        worst_class=worst,
    )


def record_decision(tracking: TrackingRef, name: str, decision: GateDecision, config: GateConfig | None = None) -> None:
    """Tag the candidate model version with the decision, and log its numbers to the promotion run.
    Safe to retry: tags are overwritten with the same values, params already logged are skipped."""
    client = tracking.client()
    version = str(decision.candidate_version)
    tags = {
        "promotion.decision": decision.label,
        "promotion.reason": decision.reason[:5000],
        "promotion.champion_version": "none" if decision.champion_version is None else str(decision.champion_version),
        "promotion.macro_f1_delta": "none" if decision.macro_f1_delta is None else f"{decision.macro_f1_delta:.4f}",
        "promotion.run_id": tracking.run_id,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)

    metrics = {"promotion_promoted": float(decision.promote), "candidate_macro_f1": decision.candidate_macro_f1}
    if decision.champion_macro_f1 is not None:
        metrics["champion_macro_f1"] = decision.champion_macro_f1
    if decision.macro_f1_delta is not None:
        metrics["macro_f1_delta"] = decision.macro_f1_delta
    for label, delta in decision.per_class_f1_delta.items():
        metrics[f"f1_delta_{label}"] = delta  # log_metrics makes any class name a valid MLflow key
    log_metrics(tracking, metrics)
    params: dict[str, object] = {
        "registered_model_name": name,
        "candidate_version": decision.candidate_version,
        "champion_version": decision.champion_version,
        "decision": decision.label,
        "worst_class": decision.worst_class,
    }
    if config is not None:
        params.update({f"gate_{key}": value for key, value in config.model_dump().items()})
    log_params(tracking, params)
    client.set_tag(tracking.run_id, "promotion.decision", decision.label)
    client.set_tag(tracking.run_id, "promotion.reason", decision.reason[:5000])


def record_failure(tracking_uri: str, name: str, version: int, error: BaseException) -> None:
    """Mark a candidate whose promotion failed after the gate (build or smoke test): the aliases did not move."""
    client = mlflow_client(tracking_uri)
    client.set_model_version_tag(name, str(version), "promotion.decision", "failed")
    client.set_model_version_tag(name, str(version), "promotion.error", f"{type(error).__name__}: {error}"[:5000])


score_versions_task = task(name="score-versions", retries=2, retry_delay_seconds=5)(score_versions)
decide_task = task(name="decide-promotion")(decide)
record_decision_task = task(name="record-decision", retries=2, retry_delay_seconds=5)(record_decision)
