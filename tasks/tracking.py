"""MLflow run bookkeeping shared by the stages. Everything goes through an explicit `MlflowClient` for a given
tracking URI: no global MLflow state is touched."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prefect import task
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from mlflow import MlflowClient

IDEMPOTENCY_TAG = "textclf.idempotency_key"
_NOT_IN_MLFLOW_KEYS = re.compile(r"[^/\w.\- :]")


class TrackingRef(BaseModel):
    """Which MLflow run a flow run writes to."""

    model_config = ConfigDict(frozen=True)

    tracking_uri: str
    experiment_id: str
    run_id: str

    def client(self) -> MlflowClient:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)


class TrackingUnavailable(RuntimeError):
    pass


def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except urllib.error.HTTPError:
        return True  # something answered (auth, or a server without /health): let the client decide
    except (urllib.error.URLError, OSError):
        return False


def start_tracking_run(
    tracking_uri: str, experiment_name: str, run_name: str, idempotency_key: str, tags: dict[str, str] | None = None
) -> TrackingRef:
    """Create the MLflow run for one flow run, or return the one a previous attempt created."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    unreachable = (
        f"Cannot reach the MLflow tracking server at {tracking_uri}. Start the embedded one with "
        f"`textclf stack up`, or point MLFLOW_TRACKING_URI at a running server."
    )
    # Fail in seconds, not after the MLflow client's minutes of back-off retries.
    if tracking_uri.startswith(("http://", "https://")) and not _answers(f"{tracking_uri.rstrip('/')}/health"):
        raise TrackingUnavailable(unreachable)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        experiment = client.get_experiment_by_name(experiment_name)
    except MlflowException as error:
        raise TrackingUnavailable(f"{unreachable} ({error})") from error
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    existing = client.search_runs([experiment_id], filter_string=f"tags.`{IDEMPOTENCY_TAG}` = '{idempotency_key}'")
    if existing:
        run_id = existing[0].info.run_id
    else:
        run = client.create_run(
            experiment_id, run_name=run_name, tags={IDEMPOTENCY_TAG: idempotency_key, **(tags or {})}
        )
        run_id = run.info.run_id
    return TrackingRef(tracking_uri=tracking_uri, experiment_id=experiment_id, run_id=run_id)


def end_tracking_run(tracking: TrackingRef, status: str = "FINISHED") -> None:
    tracking.client().set_terminated(tracking.run_id, status=status, end_time=int(time.time() * 1000))


def mlflow_key(name: str) -> str:
    """A metric or param name MLflow accepts: class names such as ATIS's `atis_flight#atis_airfare` appear in
    per-class metric names, and MLflow refuses any character but letters, digits, `_ - . : /` and spaces."""
    return _NOT_IN_MLFLOW_KEYS.sub("_", name)[:250]


def log_metrics(tracking: TrackingRef, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(mlflow_key(key), float(value), now, step) for key, value in metrics.items()]
    for start in range(0, len(batch), 900):  # the tracking server takes at most 1000 metrics a call
        tracking.client().log_batch(tracking.run_id, metrics=batch[start : start + 900])


def log_params(tracking: TrackingRef, params: dict[str, object]) -> None:
    from mlflow.entities import Param

    existing = tracking.client().get_run(tracking.run_id).data.params
    # Params are write-once in MLflow; a retried task logs only the new ones.
    fresh = [Param(mlflow_key(k), str(v)[:6000]) for k, v in params.items() if mlflow_key(k) not in existing]
    for start in range(0, len(fresh), 90):
        tracking.client().log_batch(tracking.run_id, params=fresh[start : start + 90])


start_tracking_run_task = task(name="start-tracking-run", retries=2, retry_delay_seconds=5)(start_tracking_run)
end_tracking_run_task = task(name="end-tracking-run", retries=2, retry_delay_seconds=5)(end_tracking_run)
log_metrics_task = task(name="log-metrics", retries=2, retry_delay_seconds=5)(log_metrics)
log_params_task = task(name="log-params", retries=2, retry_delay_seconds=5)(log_params)


@contextlib.contextmanager
def finished_on_exit(
    tracking: TrackingRef, on_failure: Callable[[BaseException], None] | None = None
) -> Iterator[TrackingRef]:
    """The body of a flow that owns `tracking`: the run ends FINISHED when the body completes (through the retried
    task), FAILED when it raises, after `on_failure(error)` if given (the promotion tags the version with it). A
    tracking error while failing never hides the body's own error."""
    try:
        yield tracking
    except BaseException as error:
        with contextlib.suppress(Exception):
            end_tracking_run(tracking, status="FAILED")
            if on_failure is not None:
                on_failure(error)
        raise
    end_tracking_run_task(tracking)
