"""The drift-monitoring flow: compare a window of production inputs (texts from files, or the service's request
log over the last hours) with the champion's held-out test split; log the drift report (markdown + PNG plots) and
its metrics to the MLflow monitoring experiment and the report as a Prefect artifact. On drift: emit a
`textclf.drift.detected` event, start the retraining deployment on the training data plus new labelled data (when
configured), and notify through a Prefect notification block (a WARNING log line without one). Wiring only; the
stage is `tasks/monitoring/drift.py` (statistics, features, windows and report in its sibling modules), the actions
on drift are `flows/monitoring_actions.py`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from flows.monitoring_actions import (
    build_retraining_dataset_task,
    emit_drift_event_task,
    notify_task,
    trigger_retraining_task,
)
from flows.settings import Settings
from tasks.contracts import CHAMPION_ALIAS, REGISTERED_MODEL_NAME, ScoringSource
from tasks.monitoring.drift import (
    detect_drift_task,
    log_drift_report_task,
    reference_from_test_split_task,
    window_from_request_log_task,
    window_from_source_task,
)
from tasks.monitoring.report import DriftReport, drift_metrics
from tasks.monitoring.statistics import DriftTest, DriftThresholds, Status
from tasks.monitoring.windows import since_until
from tasks.registry import download_model_version_task, fetch_test_split_task, resolve_alias_task
from tasks.tracking import finished_on_exit, log_metrics_task, log_params_task, start_tracking_run_task


class DriftResult(BaseModel):
    """What one monitoring run decided and did."""

    model_config = ConfigDict(frozen=True)

    registered_model_name: str
    model_version: int
    status: Status
    reason: str
    reference_size: int
    window_size: int
    tests: tuple[DriftTest, ...]
    report_path: Path
    mlflow_run_id: str
    event_id: str | None = None
    notified: bool = False
    retraining_flow_run_id: str | None = None
    retraining_dataset: Path | None = None

    @property
    def drift_detected(self) -> bool:
        return self.status == "drift"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def prefect_markdown(report: DriftReport, mlflow_url: str) -> str:
    """The report for the Prefect UI: the same text, with the plots as a link to the MLflow run that holds them."""
    lines = [line for line in report.markdown.splitlines() if not line.startswith("![")]
    if "## Plots" in lines:
        index = lines.index("## Plots")
        lines[index + 1 : index + 1] = [
            "",
            f"The PNG plots and this report are the `drift/` artifacts of the MLflow run: [{mlflow_url}]({mlflow_url})",
        ]
    return "\n".join(lines) + "\n"


def notification_text(
    name: str, version: int, report: DriftReport, mlflow_url: str, retraining: str | None
) -> tuple[str, str]:
    decision = report.decision
    fired = [t for t in decision.tests if t.drift]
    body = [
        f"{decision.reason[0].upper()}{decision.reason[1:]}.",
        f"Window: {decision.window_size} texts; reference: {decision.reference_size} texts.",
    ]
    body += [
        f"- {t.title}: {t.effect_name} {t.effect:.3g} (threshold {t.threshold:g}), Holm-adjusted p {t.p_adjusted:.2g}"
        for t in fired
    ]
    body.append(f"Report: {mlflow_url}")
    if flow_run.get_id():
        body.append(f"Prefect flow run: {flow_run.get_id()}")
    body.append(
        f"Retraining flow run: {retraining}"
        if retraining
        else "No retraining started (set new_labelled_data to retrain on the training data plus new labelled rows)."
    )
    return f"Drift detected for {name} version {version}", "\n".join(body)


@flow(name="drift-monitoring", log_prints=True)
def drift_monitoring(
    source: Annotated[
        ScoringSource | None,
        Field(
            description="The window as texts (files, a glob, a folder or a hub dataset); the champion scores "
            "them here. Empty: the service's request log."
        ),
    ] = None,
    request_log_dir: Annotated[
        str | None,
        Field(
            description="The service's request-log folder; empty: where the service writes it by default "
            "(TEXTCLF_REQUEST_LOG_DIR, else <TEXTCLF_HOME>/request-log). Not with source."
        ),
    ] = None,
    window_hours: Annotated[
        float, Field(gt=0, le=24 * 90, description="With request_log_dir: the last this many hours of requests.")
    ] = 24.0,
    registered_model_name: Annotated[
        str, Field(min_length=1, max_length=256, description="MLflow registered model; its @champion is monitored.")
    ] = REGISTERED_MODEL_NAME,
    thresholds: DriftThresholds = DriftThresholds(),
    notification_block: Annotated[
        str | None,
        Field(
            description="Prefect notification block to alert through on drift, as '<block type>/<name>' (e.g. "
            "'custom-webhook/drift-alerts', 'slack-webhook/ml-alerts'); empty logs a WARNING."
        ),
    ] = None,
    new_labelled_data: Annotated[
        str | None,
        Field(
            description="A labelled CSV/TSV/JSONL/Parquet file (text, label). On drift, the retraining deployment "
            "runs on the champion's training data plus these rows."
        ),
    ] = None,
    retraining_deployment: Annotated[
        str, Field(description="The deployment that retrains, as '<flow>/<deployment>'.")
    ] = "training/retraining",
    max_window_texts: Annotated[
        int, Field(ge=10, le=1_000_000, description="Most window texts compared (a uniform sample when more).")
    ] = 10_000,
    seed: Annotated[int, Field(ge=0, description="Seed of the sampling and the permutation tests.")] = 0,
) -> DriftResult:
    if source is not None and request_log_dir is not None:
        raise ValueError(
            "Give one window: `source` (texts to score, e.g. {'source': 'incoming/*.jsonl'}) or "
            "`request_log_dir` (the service's request log, with window_hours), not both."
        )
    settings = Settings()
    uri, name = settings.resolved_mlflow_tracking_uri, registered_model_name
    champion = resolve_alias_task(uri, name, CHAMPION_ALIAS)
    if champion is None:
        raise ValueError(
            f"Registered model '{name}' has no @{CHAMPION_ALIAS} to monitor: promote one first (`textclf promote`)."
        )
    version = f"{name}/{champion}"
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    tracking = start_tracking_run_task(
        uri,
        settings.monitoring_experiment_name,
        run_name=f"drift-{name}",
        idempotency_key=flow_run.get_id() or f"local-drift-{stamp}",
        tags={
            "prefect.flow_run_id": str(flow_run.get_id()),
            "textclf.kind": "drift-monitoring",
            "registered_model": name,
            "model_version": str(champion),
        },
    )
    work = settings.root / "monitoring" / name / tracking.run_id
    with finished_on_exit(tracking):
        model = download_model_version_task(uri, name, champion, settings.model_download_dir)
        test_split = fetch_test_split_task(uri, name, champion, work)
        reference = reference_from_test_split_task(test_split, version, work / "reference.parquet")
        if source is not None:
            window = window_from_source_task(
                source, model.model_dir, version, work / "window.parquet", max_window_texts, seed
            )
            described = source.source
        else:
            since, until = since_until(window_hours)
            window = window_from_request_log_task(
                request_log_dir,
                since,
                until,
                version,
                work / "window.parquet",
                max_window_texts,
                seed,
                multi_label=reference.multi_label,
            )
            described = f"request log {request_log_dir or '(service default)'}, last {window_hours:g} h"
        report = detect_drift_task(
            reference,
            window,
            model.model_dir,
            thresholds,
            work / "drift",
            context={"Model": f"{name} version {champion} (@{CHAMPION_ALIAS})", "Checked at": stamp},
            seed=seed,
        )
        log_params_task(
            tracking,
            {
                "window": described,
                "model_version": version,
                "window_hours": window_hours,
                "max_window_texts": max_window_texts,
                "seed": seed,
                **{f"threshold_{k}": v for k, v in thresholds.model_dump().items()},
            },
        )
        log_metrics_task(tracking, drift_metrics(report))
        log_drift_report_task(tracking, report)
        mlflow_url = run_url(uri, tracking.experiment_id, tracking.run_id)
        create_markdown_artifact(
            key="drift-report",
            markdown=prefect_markdown(report, mlflow_url),
            description=f"Drift of {described} against {version}'s test split: {report.decision.status}.",
        )
        event_id = retraining_run = dataset_path = None
        notified = False
        if report.decision.drift_detected:
            event_id = emit_drift_event_task(name, champion, report, {"mlflow_run": mlflow_url})
            if new_labelled_data:
                dataset = build_retraining_dataset_task(
                    uri, name, champion, new_labelled_data, settings.snapshot_dir, settings.root / "retraining"
                )
                dataset_path = dataset.path
                retraining_run = trigger_retraining_task(
                    retraining_deployment, dataset.path, name, dataset.version, problem_type=dataset.problem_type
                )
                log_params_task(
                    tracking, {"retraining_flow_run_id": retraining_run, "retraining_dataset": dataset.path}
                )
                print(
                    f"Retraining started: flow run {retraining_run} of {retraining_deployment} on {dataset.path} "
                    f"({dataset.num_rows} rows)"
                )
            subject, body = notification_text(name, champion, report, mlflow_url, retraining_run)
            notified = notify_task(notification_block, subject, body)
        elif report.decision.status == "insufficient_data":
            get_run_logger().warning("Drift not assessed: %s", report.decision.reason)
    decision = report.decision
    print(f"{version}: {decision.status}. {decision.reason}")
    return DriftResult(
        registered_model_name=name,
        model_version=champion,
        status=decision.status,
        reason=decision.reason,
        reference_size=decision.reference_size,
        window_size=decision.window_size,
        tests=decision.tests,
        report_path=report.report_path,
        mlflow_run_id=tracking.run_id,
        event_id=event_id,
        notified=notified,
        retraining_flow_run_id=retraining_run,
        retraining_dataset=dataset_path,
    )
