"""The batch-scoring flow: score new texts with the current champion (in-process, or through the Bento endpoint),
write the predictions to Parquet under the data folder, and log a summary to the monitoring experiment in MLflow
and as a Prefect table artifact. Wiring only; the work is in `tasks/scoring/batch_score.py`."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from pydantic import Field

from flows.settings import Settings
from tasks.contracts import CHAMPION_ALIAS, REGISTERED_MODEL_NAME, ScoringSource
from tasks.registry import download_model_version_task, resolve_alias_task
from tasks.scoring.batch_score import ScoringSummary, score_in_process_task, score_through_endpoint_task
from tasks.tracking import finished_on_exit, log_metrics_task, log_params_task, start_tracking_run_task


def summary_metrics(summary: ScoringSummary) -> dict[str, float]:
    metrics: dict[str, float] = {
        "rows": summary.rows,
        "blank_texts": summary.blank_texts,
        "seconds": summary.seconds,
        "texts_per_second": summary.texts_per_second,
    }
    if summary.mean_probability is not None and summary.low_confidence_share is not None:
        metrics |= {"mean_probability": summary.mean_probability, "low_confidence_share": summary.low_confidence_share}
    scored = max(1, summary.rows - summary.blank_texts)
    if summary.min_confidence is not None:
        metrics["abstained_share"] = summary.abstained_texts / scored
    metrics |= {f"label_share_{label}": count / scored for label, count in summary.label_counts.items()}
    return metrics


@flow(name="batch-scoring", log_prints=True)
def batch_scoring(
    source: ScoringSource,
    registered_model_name: Annotated[
        str, Field(min_length=1, max_length=256, description="MLflow registered model; its @champion scores.")
    ] = REGISTERED_MODEL_NAME,
    mode: Annotated[
        Literal["in-process", "endpoint"],
        Field(description="in-process: load the champion here; endpoint: send the texts to the Bento service."),
    ] = "in-process",
    endpoint_url: Annotated[str, Field(description="The Bento service, for mode=endpoint.")] = "http://127.0.0.1:3000",
    chunk_size: Annotated[int, Field(ge=1, le=1_000_000, description="Texts read and written at a time.")] = 10_000,
    low_confidence_threshold: Annotated[
        float, Field(gt=0, lt=1, description="Predictions below this probability count as low-confidence.")
    ] = 0.5,
    min_confidence: Annotated[
        float | None,
        Field(
            ge=0,
            le=1,
            description="Abstain below this top-class probability: the text's label is 'unknown' "
            "(its probabilities are kept). Unset: never abstain. The training run suggests one (MLflow metric "
            "suggested_min_confidence).",
        ),
    ] = None,
) -> ScoringSummary:
    settings = Settings()
    uri, name = settings.resolved_mlflow_tracking_uri, registered_model_name
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    output_path = (
        settings.predictions_dir / name / f"predictions-{stamp}-{str(flow_run.get_id() or 'local')[:8]}.parquet"
    )
    tracking = start_tracking_run_task(
        uri,
        settings.monitoring_experiment_name,
        run_name=f"batch-scoring-{name}",
        idempotency_key=flow_run.get_id() or f"local-batch-{stamp}",
        tags={"prefect.flow_run_id": str(flow_run.get_id()), "textclf.kind": "batch-scoring"},
    )
    with finished_on_exit(tracking):
        if mode == "endpoint":
            summary = score_through_endpoint_task(
                source, endpoint_url, output_path, chunk_size, low_confidence_threshold, min_confidence=min_confidence
            )
        else:
            champion = resolve_alias_task(uri, name, CHAMPION_ALIAS)
            if champion is None:
                raise ValueError(
                    f"Registered model '{name}' has no @{CHAMPION_ALIAS} to score with: promote one "
                    f"first (`textclf promote`)."
                )
            model = download_model_version_task(uri, name, champion, settings.model_download_dir)
            summary = score_in_process_task(
                source,
                model.model_dir,
                f"{name}/{champion}",
                output_path,
                chunk_size,
                low_confidence_threshold,
                min_confidence,
            )
        log_params_task(
            tracking,
            {
                "source": source.source,
                "mode": mode,
                "model_version": summary.model_version,
                "output_path": summary.output_path,
                "min_confidence": min_confidence,
            },
        )
        log_metrics_task(tracking, summary_metrics(summary))
        create_table_artifact(
            key="batch-scoring-summary",
            table=[{"label": label, "texts": count} for label, count in summary.label_counts.items()],
            description=f"{summary.rows} texts from {source.source} scored by {summary.model_version} "
            f"({summary.blank_texts} blank) -> {summary.output_path}",
        )
    print(
        f"Scored {summary.rows} texts with {summary.model_version} in {summary.seconds:.1f} s -> {summary.output_path}"
    )
    return summary
