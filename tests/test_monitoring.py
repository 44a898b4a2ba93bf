"""Drift monitoring: the statistics keep their false-alarm promise on same-distribution data and catch shifts;
the flow stays quiet on held-out texts like the champion's, fires on texts of other words and lengths (and on real
SMS messages), logs its report and metrics to MLflow and Prefect, emits an event, calls a real notification block
(a webhook on loopback) and starts the retraining deployment on the training data plus the new labelled rows."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from tasks.monitoring.statistics import DriftThresholds, Sample, compare_samples, holm, psi
from tasks.monitoring.windows import reference_from_test_split, window_from_request_log_frame
from tests.conftest import SHARED_DATA
from tests.fixtures import make_texts

NAME = "session-topics"  # the session champion (tests/conftest.py)
OTHER_WORDS = [
    "invoice",
    "tomorrow",
    "meeting",
    "please",
    "urgent",
    "office",
    "parcel",
    "delivery",
    "refund",
    "password",
    "account",
    "weekend",
    "mum",
    "sorry",
    "ticket",
    "train",
    "station",
    "holiday",
]


# ----------------------------------------------------------------------------------------------------------
# The statistics, on synthetic samples (no servers)
# ----------------------------------------------------------------------------------------------------------


def _synthetic(
    rng: np.random.Generator, n: int, label_p=(0.3, 0.25, 0.2, 0.15, 0.1), length_mu=6.0, embedding_shift=0.0
) -> Sample:
    tokens = rng.integers(20, 200, n)
    return Sample(
        labels=rng.choice(list("abcde"), size=n, p=label_p),
        confidence=rng.beta(8, 1.5, n),
        length=rng.lognormal(length_mu, 0.5, n).astype(int),
        unknown=rng.binomial(tokens, 0.002),
        tokens=tokens,
        embeddings=rng.normal(embedding_shift, 1.0, (n, 16)),
    )


def test_same_distribution_windows_rarely_fire():
    """100 windows drawn from the reference's distribution (a fresh reference each time), with no effect-size
    gates: Holm at alpha 0.05 promises at most ~5 false alarms in 100; allow 8 (the seeds are fixed, so this is
    deterministic). The default thresholds (alpha 0.01 and the gates) fire less still."""
    rng = np.random.default_rng(7)
    ungated = DriftThresholds(
        alpha=0.05,
        permutations=200,
        label_psi=0,
        confidence_ks=0,
        low_confidence_share_change=0,
        length_psi=0,
        unknown_token_rate_change=0,
    )
    decisions = [compare_samples(_synthetic(rng, 150), _synthetic(rng, 120), ungated, seed=i) for i in range(100)]
    assert sum(d.drift_detected for d in decisions) <= 8
    p_values = np.array([t.p_value for d in decisions for t in d.tests])
    assert 0.35 < p_values.mean() < 0.65  # roughly uniform p-values: the tests are calibrated, not just timid


@pytest.mark.parametrize(
    ("shift", "expected"),
    [
        ({"label_p": (0.05, 0.05, 0.1, 0.2, 0.6)}, "label"),
        ({"length_mu": 4.0}, "length"),
        ({"embedding_shift": 0.5}, "embedding"),
    ],
)
def test_a_shift_fires_the_test_that_measures_it(shift, expected):
    rng = np.random.default_rng(3)
    decision = compare_samples(_synthetic(rng, 200), _synthetic(rng, 200, **shift), DriftThresholds(), seed=0)
    assert decision.status == "drift" and expected in decision.fired, decision.reason


def test_significant_but_small_shifts_and_small_windows_do_not_fire():
    rng = np.random.default_rng(5)
    reference = _synthetic(rng, 5000, length_mu=6.0)
    window = _synthetic(rng, 5000, length_mu=6.08)  # big windows: significant, but a PSI far below 0.2
    decision = compare_samples(reference, window, DriftThresholds(), seed=0)
    length = decision.test("length")
    assert length.p_adjusted < 0.01 and length.effect < 0.2 and not length.drift
    assert decision.status == "no_drift" and "below the effect threshold" in decision.reason
    small = compare_samples(reference, _synthetic(rng, 30, length_mu=3.0), DriftThresholds(), seed=0)
    assert small.status == "insufficient_data" and not small.tests and "minimum 100" in small.reason


def test_abstained_requests_count_as_their_top_class_not_as_unknown(tmp_path):
    """With TEXTCLF_MIN_CONFIDENCE set the service answers 'unknown' for unsure texts; the window compares the top
    class (the log's predicted_label), which is what the reference holds. A log written before that column: label."""
    texts = make_texts(per_class=10, seed=3)["text"].tolist()
    frame = pd.DataFrame(_request_log(texts, "m/2", "unknown"))
    frame["predicted_label"] = ["sport", "tech"] * (len(texts) // 2)
    window = window_from_request_log_frame(frame, "m/2", tmp_path / "window.parquet")
    labels = pd.read_parquet(window.path)["label"]
    assert "unknown" not in set(labels) and set(labels) == {"sport", "tech"}
    older = pd.DataFrame(_request_log(texts, "m/2", "sport"))  # no predicted_label column
    window = window_from_request_log_frame(older, "m/2", tmp_path / "older.parquet")
    assert set(pd.read_parquet(window.path)["label"]) == {"sport"}


def test_psi_and_holm():
    assert psi(np.array([50, 50]), np.array([50, 50])) == pytest.approx(0.0)
    assert psi(np.array([100, 0]), np.array([0, 100])) > 4  # smoothing keeps it finite
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_request_log_window_keeps_the_champions_requests_and_says_what_it_lacks(tmp_path):
    """A log in the schema of tasks/serving/request_log.read_request_log, with raw-text logging off: only the champion's
    requests count, one per text hash; text-based tests are skipped with the reason in the report."""
    texts = make_texts(per_class=40, seed=21)["text"].tolist()
    frame = pd.DataFrame(_request_log(texts + texts[:10], "m/2", "topic"))  # 10 texts asked twice
    frame.loc[:4, "model_version"] = "m/1"  # served by the previous champion
    window = window_from_request_log_frame(frame, "m/2", tmp_path / "window.parquet")
    assert window.rows == 120 and window.duplicates_dropped == 5 and window.texts == 0
    assert any("raw-text logging" in note for note in window.notes)
    assert any("5 of 130 requests were served by other model versions (m/1)" in note for note in window.notes)


def _request_log(texts: list[str], model_version: str, label: str, with_text: bool = False) -> dict[str, list]:
    now = pd.Timestamp.now(tz="UTC")
    return {
        "time": [now - pd.Timedelta(minutes=i) for i in range(len(texts))],
        "request_id": [f"r{i}" for i in range(len(texts))],
        "text_sha256": [hashlib.sha256(t.encode()).hexdigest() for t in texts],
        "text": [t if with_text else None for t in texts],
        "length_chars": [len(t) for t in texts],
        "label": [label] * len(texts),
        "probability": [0.9] * len(texts),
        "truncated": [False] * len(texts),
        "model_version": [model_version] * len(texts),
        "latency_ms": [5.0] * len(texts),
    }


# ----------------------------------------------------------------------------------------------------------
# The flow, against real MLflow and Prefect servers
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drift_champion(session_champion):
    """The session's champion (tests/conftest.py): its test split of 108 held-out texts is the reference."""
    assert session_champion["name"] == NAME
    return session_champion


def _texts_file(folder: Path, texts: list[str], name: str = "window.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    pd.DataFrame({"text": texts}).to_csv(path, index=False)
    return path


def _other_texts(count: int, seed: int = 0) -> list[str]:
    """Texts of words the model never saw (all unknown to its whole-word vocabulary), and longer."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(OTHER_WORDS, rng.integers(18, 40))) for _ in range(count)]


def _run(**parameters):
    from flows.monitoring import drift_monitoring

    state = drift_monitoring(registered_model_name=NAME, return_state=True, **parameters)
    assert state.is_completed(), state.message
    return state.result(), state.state_details.flow_run_id


@pytest.mark.integration
def test_same_distribution_texts_do_not_fire(project_env, servers, drift_champion, tmp_path):
    """Fresh texts drawn like the training data: no drift, nothing sent; report and metrics logged."""
    from mlflow import MlflowClient

    from tests.fixtures import flow_run_and_artifacts

    texts = make_texts(per_class=50, seed=12)["text"].tolist()
    result, flow_run_id = _run(source={"source": str(_texts_file(tmp_path, texts))})
    assert result.status == "no_drift", result.reason
    assert (
        result.window_size == 150 and result.reference_size == 108 and result.model_version == drift_champion["version"]
    )
    assert {t.name for t in result.tests if t.ran} == {
        "label",
        "confidence",
        "low_confidence",
        "length",
        "unknown_tokens",
        "embedding",
    }
    assert not result.notified and result.retraining_flow_run_id is None and result.event_id is None

    client = MlflowClient(servers["mlflow"])
    run = client.get_run(result.mlflow_run_id)
    assert run.data.metrics["drift_detected"] == 0 and run.data.metrics["drift_window_size"] == 150
    for key in (
        "drift_label_psi",
        "drift_label_pvalue",
        "drift_confidence_ks_pvalue",
        "drift_length_psi",
        "drift_unknown_tokens_pvalue",
        "drift_mmd_pvalue",
        "drift_mmd2",
    ):
        assert key in run.data.metrics, key
    assert run.data.tags["drift.status"] == "no_drift" and run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "drift")}
    assert {
        "drift/report.md",
        "drift/labels.png",
        "drift/confidence.png",
        "drift/length.png",
        "drift/embeddings.png",
        "drift/drift.json",
    } <= artifacts
    _, prefect_artifacts = flow_run_and_artifacts(servers["prefect"], flow_run_id)
    (report,) = [a for a in prefect_artifacts if a["key"] == "drift-report"]
    assert report["type"] == "markdown" and "no drift" in report["data"] and result.mlflow_run_id in report["data"]


class _Webhook:
    """A tiny HTTP server on a free loopback port that records what is POSTed to it."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def webhook():
    hook = _Webhook()
    yield hook
    hook.close()


@pytest.fixture()
def retraining_deployment(servers):
    """`training/retraining` registered on the test Prefect server (no worker: its runs stay scheduled)."""
    from flows.training import training

    deployment_id = training.to_deployment(
        name="retraining",
        parameters={"dataset": {"source": "bbc-news"}, "registered_model_name": "text-classifier"},
    ).apply()
    return deployment_id


def _drift_events(api_url: str, since: dt.datetime) -> list[dict]:
    response = httpx.post(
        f"{api_url}/events/filter",
        json={
            "filter": {"event": {"name": ["textclf.drift.detected"]}, "occurred": {"since": since.isoformat()}},
        },
    )
    return response.raise_for_status().json()["events"]


@pytest.mark.integration
def test_shifted_texts_fire_notify_and_start_retraining(
    project_env, servers, drift_champion, webhook, retraining_deployment, tmp_path
):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    CustomWebhookNotificationBlock(
        name="drift-alerts",
        url=webhook.url,
        json_data={"subject": "{{subject}}", "text": "{{body}}"},
    ).save("drift-alerts", overwrite=True)
    new_rows = make_texts(per_class=5, seed=31).assign(text=lambda f: f["text"] + " refund")
    new_rows.to_json(tmp_path / "new.jsonl", orient="records", lines=True)

    result, _flow_run_id = _run(
        source={"source": str(_texts_file(tmp_path, _other_texts(120)))},
        notification_block="custom-webhook/drift-alerts",
        new_labelled_data=str(tmp_path / "new.jsonl"),
    )
    assert result.status == "drift" and result.drift_detected
    fired = {t.name for t in result.tests if t.drift}
    assert {"unknown_tokens", "length", "embedding"} <= fired, result.reason

    # The notification block was called: the webhook got the subject and the reason.
    assert result.notified
    (message,) = webhook.received
    assert message["subject"] == f"Drift detected for {NAME} version {drift_champion['version']}"
    assert "Unknown-token rate" in message["text"] and result.retraining_flow_run_id in message["text"]

    # The retraining deployment got a flow run on the combined dataset (training snapshot + the new rows).
    run = httpx.get(f"{servers['prefect']}/flow_runs/{result.retraining_flow_run_id}").raise_for_status().json()
    assert run["deployment_id"] == str(retraining_deployment)
    assert run["parameters"]["dataset"] == {"source": str(result.retraining_dataset)}
    assert run["parameters"]["registered_model_name"] == NAME
    combined = pd.read_parquet(result.retraining_dataset)
    snapshot = pd.read_parquet(drift_champion["snapshot"].path)
    assert len(combined) == len(snapshot) + len(new_rows)
    assert set(new_rows["text"]) <= set(combined["text"]) and combined["split"].isna().all()
    assert result.retraining_dataset.parent == project_env.resolve() / "retraining"
    httpx.post(
        f"{servers['prefect']}/flow_runs/{result.retraining_flow_run_id}/set_state",
        json={"state": {"type": "CANCELLED"}, "force": True},
    ).raise_for_status()

    # Metrics and the event.
    from mlflow import MlflowClient

    metrics = MlflowClient(servers["mlflow"]).get_run(result.mlflow_run_id).data.metrics
    assert metrics["drift_detected"] == 1 and metrics["drift_unknown_token_rate"] > 0.9
    deadline = time.monotonic() + 30
    while not (events := _drift_events(servers["prefect"], started)) and time.monotonic() < deadline:
        time.sleep(0.5)
    (event,) = [e for e in events if e["id"] == result.event_id]
    assert event["resource"]["prefect.resource.id"] == f"textclf.registered-model.{NAME}"
    assert event["payload"]["metrics"]["drift_detected"] == 1


@pytest.mark.integration
def test_a_label_shift_fires_and_without_a_block_logs_a_warning(project_env, servers, drift_champion, tmp_path, caplog):
    """Known words, known lengths, but only one topic: the label distribution drifts. No block: a WARNING."""
    sport = make_texts(per_class=130, seed=13).query("label == 'sport'")["text"].tolist()
    with caplog.at_level("WARNING"):
        result, _ = _run(source={"source": str(_texts_file(tmp_path, sport))})
    assert result.status == "drift" and "label" in {t.name for t in result.tests if t.drift}, result.reason
    assert not result.notified
    assert any(r.levelname == "WARNING" and "Drift detected for" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
def test_request_log_window_without_raw_texts(project_env, servers, drift_champion, tmp_path, monkeypatch):
    """The service's request log as the window, raw-text logging off, written by its own writer and read back by
    read_request_log from the default folder (<TEXTCLF_HOME>/request-log): label, confidence and length are
    compared; the report says embedding and unknown-token drift need raw texts. Rows older than the window and
    rows of another model version are left out."""
    request_log = pytest.importorskip(
        "tasks.serving.request_log",
        reason="tasks/serving/request_log.py (the service's request log) is not in this checkout",
    )
    from tasks.registry import download_model_version
    from tasks.serving.classifier import TextClassifier

    monkeypatch.delenv("TEXTCLF_REQUEST_LOG_DIR", raising=False)
    version = f"{NAME}/{drift_champion['version']}"
    texts = make_texts(per_class=50, seed=14)["text"].tolist()
    model = download_model_version(servers["mlflow"], NAME, drift_champion["version"], tmp_path / "models")
    predicted = TextClassifier(model.model_dir).predict(texts)
    log = pd.DataFrame(_request_log(texts, version, "x"))
    log["label"], log["probability"] = predicted["label"].to_numpy(), predicted["probability"].to_numpy()
    stale = pd.DataFrame(_request_log(_other_texts(50), version, "food")).assign(
        time=pd.Timestamp.now(tz="UTC") - pd.Timedelta(hours=30)
    )  # drifted, but before the window
    other = pd.DataFrame(_request_log(_other_texts(50, seed=1), f"{NAME}/999", "food"))  # another model's answers
    writer = request_log.RequestLogWriter(project_env / "request-log", flush_seconds=0.05).start()
    for frame in (log, stale, other):
        writer.put(frame.to_dict("records"))
    writer.close()

    result, _ = _run(window_hours=24)
    assert result.status == "no_drift" and result.window_size == 150, result.reason
    skipped = {t.name: t.skipped for t in result.tests if not t.ran}
    assert set(skipped) == {"unknown_tokens", "embedding"} and "TEXTCLF_REQUEST_LOG_TEXT=true" in skipped["embedding"]
    report = result.report_path.read_text()
    assert "raw-text logging" in report and "50 of 200 requests were served by other model versions" in report


def _sms_texts(count: int) -> list[str]:
    path = SHARED_DATA / "sms_spam_collection" / "SMSSpamCollection"
    if not path.exists():
        pytest.skip(
            f"{path} is absent (the shared data folder ../shared/data is not checked out next to the repository)"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split("\t", 1)[1] for line in lines[:count]]


@pytest.mark.integration
@pytest.mark.shared_data
def test_real_sms_messages_sent_to_the_topic_model_fire(project_env, servers, drift_champion, tmp_path):
    result, _ = _run(source={"source": str(_texts_file(tmp_path, _sms_texts(200)))})
    assert result.status == "drift", result.reason
    assert {"unknown_tokens", "embedding"} <= {t.name for t in result.tests if t.drift}


def test_reference_is_the_champions_test_predictions(tmp_path):
    frame = pd.DataFrame(
        {"text": ["a b", "c d e"], "label": ["x", "y"], "predicted": ["x", "x"], "probability": [0.9, 0.6]}
    )
    frame.to_parquet(tmp_path / "test.parquet")
    window = reference_from_test_split(tmp_path / "test.parquet", "m/1", tmp_path / "ref.parquet")
    stored = window.frame()
    assert stored["label"].tolist() == ["x", "x"] and stored["length_chars"].tolist() == [3, 5]
    with pytest.raises(ValueError, match="lacks column"):
        reference_from_test_split(tmp_path / "ref.parquet", "m/1", tmp_path / "again.parquet")


def test_the_flow_refuses_two_windows():
    from flows.monitoring import drift_monitoring

    with pytest.raises(ValueError, match="not both"):
        drift_monitoring.fn(source={"source": "x.csv"}, request_log_dir="logs", registered_model_name=NAME)


def test_a_notification_block_name_without_its_type_says_how_to_write_it():
    from flows.monitoring_actions import notify

    with pytest.raises(ValueError, match="'<block type>/<block name>'"):
        notify("drift-alerts", "subject", "body")


def test_the_text_models_are_the_pytorch_ones_whatever_runtime_the_champion_answers_with(tmp_path, fixture_frame):
    """A champion promoted with an ONNX runtime (runtime.json) still holds its PyTorch weights: the embeddings come
    from that encoder, which ONNX Runtime does not expose (the folder's onnx/ file is never read here)."""
    from tasks.monitoring.features import TextModels, embed_texts
    from tasks.serving.onnx_runtime import RUNTIME_FILE
    from tests.fixtures import make_tiny_bert

    model_dir = make_tiny_bert(tmp_path / "champion", fixture_frame["text"].tolist())
    (model_dir / "labels.json").write_text(json.dumps(["negative", "positive"]))
    (model_dir / "textclf.json").write_text(json.dumps({"max_length": 32}))
    (model_dir / RUNTIME_FILE).write_text(
        json.dumps({"runtime": "onnx-int8", "file": "onnx/model.int8.onnx", "sha256": "0" * 64})
    )
    models = TextModels.load(model_dir)
    embeddings = embed_texts(models.tokenizer, models.encoder, fixture_frame["text"].tolist()[:3], models.max_length)
    assert embeddings.shape[0] == 3 and models.max_length == 32
