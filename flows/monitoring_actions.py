"""What the drift-monitoring flow does when a window drifts, on the Prefect side: emit the `textclf.drift.detected`
event (automations can react to it), build the retraining dataset (the champion's training snapshot plus new
labelled rows, with the ingest stage's own reading and validation), start the retraining deployment on it, and
notify through a Prefect notification block. The decision itself is tasks/monitoring/drift.py's."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.blocks.core import Block
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.events import emit_event
from prefect.exceptions import MissingContextError

from tasks.contracts import DatasetSnapshot, DatasetValidationError, ProblemType
from tasks.monitoring.drift import retry_unless_misconfigured
from tasks.monitoring.report import DriftReport, drift_metrics
from tasks.training.ingest import (
    SNAPSHOT_COLUMNS,
    IngestConfig,
    content_version,
    ingest,
    read_source,
    validate,
    write_snapshot,
)

logger = logging.getLogger(__name__)

DRIFT_EVENT = "textclf.drift.detected"


def emit_drift_event(
    name: str, model_version: int, report: DriftReport, links: dict[str, str] | None = None
) -> str | None:
    """A `textclf.drift.detected` Prefect event about the registered model (automations can react to it).
    Returns the event id (None when events are off)."""
    event = emit_event(
        event=DRIFT_EVENT,
        resource={
            "prefect.resource.id": f"textclf.registered-model.{name}",
            "prefect.resource.name": name,
            "textclf.model-version": str(model_version),
        },
        payload={
            "status": report.decision.status,
            "reason": report.decision.reason,
            "fired": report.decision.fired,
            "metrics": drift_metrics(report),
            **(links or {}),
        },
    )
    return str(event.id) if event is not None else None


def notify(block_slug: str | None, subject: str, body: str) -> bool:
    """Send through the Prefect notification block `block_slug` ('<block type>/<name>', e.g.
    'custom-webhook/drift-alerts' or 'slack-webhook/ml-alerts'); without one, a WARNING log line. A failed send
    raises, so the flow run shows it. Returns whether a block was used."""
    try:
        log = get_run_logger()
    except MissingContextError:
        log = logger
    if not block_slug:
        log.warning("%s\n%s", subject, body)
        return False
    if "/" not in block_slug:
        raise ValueError(
            f"notification_block {block_slug!r} is not a block slug: use '<block type>/<block name>', "
            f"e.g. 'custom-webhook/drift-alerts' or 'slack-webhook/ml-alerts'."
        )
    try:
        # Any: a notification block of whichever type; called from sync code, `load` returns the block itself
        block: Any = Block.load(block_slug)
    except ValueError as error:
        raise ValueError(
            f"Cannot load notification block {block_slug!r} ({error}): create it in the Prefect UI "
            f"(Blocks) or with Block.save(), or fix the name."
        ) from error
    if not callable(getattr(block, "notify", None)):
        raise ValueError(
            f"Block {block_slug!r} is a {type(block).__name__}, which cannot send notifications: use a "
            f"notification block (custom-webhook, slack-webhook, ...)."
        )
    raise_on_failure = getattr(block, "raise_on_failure", None)
    if raise_on_failure is not None:
        with raise_on_failure():
            block.notify(body, subject)
    else:
        block.notify(body, subject)
    log.info("Drift notification sent through %s", block_slug)
    return True


def _params_to_ingest_config(params: dict[str, str], source: str) -> IngestConfig:
    values: dict[str, object] = {}
    for key in IngestConfig.model_fields:
        if key in params:
            values[key] = None if params[key] == "None" else params[key]
    values["source"] = source
    return IngestConfig.model_validate(values)


def _problem_type(params: dict[str, str]) -> ProblemType:
    """The training run's problem type (runs from before multi-label support are single-label)."""
    return "multi_label" if params.get("problem_type") == "multi_label" else "single_label"


def training_snapshot(
    tracking_uri: str, name: str, version: int, snapshot_dir: Path
) -> tuple[pd.DataFrame, str, list[str]]:
    """The dataset snapshot the model version was trained on (text, label, split), found from its training run:
    the Parquet named by its dataset input, else `snapshot_dir/<data_version>.parquet`, else the run's
    `data_source` ingested again with the run's ingest parameters. Returns (frame, where it came from, notes)."""
    from mlflow import MlflowClient  # here, not at import: the flow module loads fast without it

    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = client.get_model_version(name, str(version)).run_id
    if run_id is None:
        raise ValueError(f"{name} version {version} has no training run: its training data cannot be found.")
    run = client.get_run(run_id)
    data_version, data_source = run.data.tags.get("data_version"), run.data.tags.get("data_source")
    candidates: list[Path] = []
    for dataset_input in run.inputs.dataset_inputs if run.inputs else []:
        try:
            uri = json.loads(dataset_input.dataset.source).get("uri", "")
        except (TypeError, ValueError, AttributeError):
            continue
        if uri:
            candidates.append(Path(uri.removeprefix("file://")))
    if data_version:
        candidates.append(snapshot_dir / f"{data_version}.parquet")
    notes: list[str] = []
    for path in candidates:
        if path.is_file():
            frame = pd.read_parquet(path)
            if data_version and content_version(frame, _problem_type(run.data.params)) != data_version:
                notes.append(f"{path} does not hold data version {data_version}; skipped.")
                continue
            return frame[SNAPSHOT_COLUMNS], str(path), notes
    if not data_source:
        raise ValueError(
            f"Cannot find the training data of {name} version {version}: its run {run.info.run_id} has no snapshot "
            f"reachable here ({', '.join(map(str, candidates)) or 'none recorded'}) and no data_source tag."
        )
    config = _params_to_ingest_config(run.data.params, data_source)
    with tempfile.TemporaryDirectory(prefix="textclf-reingest-") as folder:
        snapshot = ingest(config, Path(folder))
        frame = pd.read_parquet(snapshot.path)
    if data_version and snapshot.version != data_version:
        notes.append(
            f"The training data source {data_source!r} changed since {name} version {version} was trained "
            f"(data version {data_version}, now {snapshot.version}); its current content was used."
        )
    return frame[SNAPSHOT_COLUMNS], f"{data_source} (ingested again)", notes


def build_retraining_dataset(
    tracking_uri: str,
    name: str,
    version: int,
    new_labelled_data: str,
    snapshot_dir: Path,
    target_dir: Path,
    text_column: str = "text",
    label_column: str = "label",
) -> DatasetSnapshot:
    """The champion's training snapshot plus the new labelled rows, validated like any dataset and written
    atomically (content-addressed) under `target_dir`. When the training data has its own splits the new rows
    join `train`; otherwise the training flow splits the combined data. Returns the DatasetSnapshot."""
    base, origin, notes = training_snapshot(tracking_uri, name, version, snapshot_dir)
    for note in notes:
        logger.warning(note)
    path = Path(new_labelled_data).expanduser()
    if not path.is_file():
        raise ValueError(
            f"new_labelled_data {new_labelled_data!r}: no such file. Give a CSV, TSV, JSONL or Parquet "
            f"file with columns {text_column!r} and {label_column!r}."
        )
    # A multi-label champion: the new rows' labels are lists, or strings split at its training data's delimiter.
    champion_params = _champion_params(tracking_uri, name, version)
    problem_type = _problem_type(champion_params)
    delimiter = champion_params.get("label_delimiter")
    delimiter = None if delimiter in (None, "None") else delimiter
    new = read_source(
        IngestConfig(
            source=str(path),
            text_column=text_column,
            label_column=label_column,
            problem_type=problem_type,
            label_delimiter=delimiter,
        )
    )
    if new.empty:
        raise DatasetValidationError(f"{path} holds no rows: there is nothing to add to the training data.")
    has_splits = bool(base["split"].notna().any())
    new = new.assign(split="train" if has_splits else None)
    base = base.assign(origin=origin, row=range(1, len(base) + 1))
    combined = pd.concat([base, new[["text", "label", "split", "origin", "row"]]], ignore_index=True)
    source = f"{origin} + {path}"
    frame = validate(combined, IngestConfig(source=source, problem_type=problem_type, label_delimiter=delimiter))
    return write_snapshot(frame, target_dir, source=source, problem_type=problem_type)


def _champion_params(tracking_uri: str, name: str, version: int) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = client.get_model_version(name, str(version)).run_id
    return dict(client.get_run(run_id).data.params) if run_id else {}


def trigger_retraining(
    deployment: str,
    dataset_path: Path,
    registered_model_name: str,
    data_version: str,
    extra_parameters: dict[str, Any] | None = None,
    problem_type: ProblemType = "single_label",
) -> str:
    """Start a run of the retraining deployment on the combined dataset, without waiting for it. The
    idempotency key is the combined data's version: drift that persists over several monitoring runs with the
    same new data starts one retraining, not one a day."""
    flow_run: FlowRun = run_deployment(  # type: ignore[assignment]  # a sync call returns the FlowRun, not a coroutine
        name=deployment,
        parameters={
            # the combined snapshot holds label lists for a multi-label champion: its run must read them as such
            "dataset": {
                "source": str(dataset_path),
                **({"problem_type": problem_type} if problem_type != "single_label" else {}),
            },
            "registered_model_name": registered_model_name,
            **(extra_parameters or {}),
        },
        timeout=0,
        idempotency_key=f"textclf-drift-retraining-{registered_model_name}-{data_version}",
        tags=["textclf", "drift-retraining"],
    )
    return str(flow_run.id)


emit_drift_event_task = task(name="emit-drift-event")(emit_drift_event)
notify_task = task(
    name="notify-drift", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_misconfigured
)(notify)
build_retraining_dataset_task = task(name="build-retraining-dataset")(build_retraining_dataset)
trigger_retraining_task = task(name="trigger-retraining", retries=2, retry_delay_seconds=10)(trigger_retraining)
