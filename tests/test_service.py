"""The Bento service through a real `bentoml serve` process and real HTTP: predictions, truncation, batching
consistency, docs/health/metrics, request ids, the built Bento, tracing. Bad input, auth and the OpenAPI document
go through the service's own app in-process (tests/test_service_inputs.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tasks.common.ports import free_port
from tasks.promotion.bento import start_bento_server, stop_bento_server, wait_until_ready
from tests.fixtures import serve_from_repository

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve") / "serve.log"


@pytest.fixture(scope="module")
def server(bento_env, server_log):
    process, url = serve_from_repository(bento_env, server_log)
    yield url
    stop_bento_server(process.pid)


def classify(url, texts, **kwargs):
    return httpx.post(f"{url}/classify", json={"texts": texts}, timeout=60, **kwargs)


def test_classify_returns_label_probabilities_version_and_truncation(server, tuned_fixture, prepared_fixture):
    _, prepared = prepared_fixture
    long_text = " ".join(["the striker scored a goal"] * 40)  # far over the tiny model's 32 tokens
    response = classify(server, ["the striker scored a goal for the team", long_text])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    short, long = response.json()
    for prediction in (short, long):
        assert prediction["label"] in prepared.label_names
        assert set(prediction["probabilities"]) == set(prepared.label_names)
        assert prediction["probability"] == pytest.approx(max(prediction["probabilities"].values()))
        assert prediction["model_version"] == "topics/7+pytorch"
    assert (short["truncated"], long["truncated"]) == (False, True)


def test_answers_match_the_model_in_process(server, tuned_fixture, prepared_fixture):
    from tasks.serving.classifier import TextClassifier

    texts = prepared_fixture[1].split("test")["text"].tolist()
    expected = TextClassifier(tuned_fixture.model_dir).predict(texts)["label"].tolist()
    assert [p["label"] for p in classify(server, texts).json()] == expected


def test_concurrent_single_text_requests_equal_one_batched_call_in_order(server, prepared_fixture):
    texts = prepared_fixture[1].split("test")["text"].tolist() * 2
    batched = classify(server, texts).json()
    with ThreadPoolExecutor(max_workers=16) as pool:
        singles = list(pool.map(lambda text: classify(server, [text]), texts))
    assert all(r.status_code == 200 for r in singles)
    assert [r.json()[0]["label"] for r in singles] == [p["label"] for p in batched]
    for single, together in zip(singles, batched):
        assert single.json()[0]["probability"] == pytest.approx(together["probability"], abs=1e-4)


def test_docs_health_and_prometheus_metrics(server):
    assert httpx.get(f"{server}/livez").status_code == 200
    assert httpx.get(f"{server}/readyz").status_code == 200
    docs = httpx.get(f"{server}/docs.json").json()
    assert "/classify" in docs["paths"]
    # The answer is documented as JSON: an array of predictions, each with its label and probabilities.
    answer = docs["paths"]["/classify"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["type"] == "array"
    prediction = docs["components"]["schemas"][answer["items"]["$ref"].rsplit("/", 1)[-1]]
    assert {"label", "probability", "probabilities", "truncated", "model_version"} <= set(prediction["properties"])
    ui = httpx.get(f"{server}/")  # BentoML serves the Swagger UI at the root
    assert ui.status_code == 200 and "swagger" in ui.text.lower()
    classify(server, ["warm the metrics"])
    metrics = httpx.get(f"{server}/metrics").text
    assert "bentoml_service_adaptive_batch_size_bucket" in metrics
    assert 'method_name="classify"' in metrics


def test_bentofile_builds_a_bento_with_its_dockerfile_and_the_built_bento_serves(bento_env, tmp_path):
    """`bentoml build` from bentofile.yaml (the only build configuration), then `bentoml serve <bento tag>`.
    Containerizing needs a Docker engine, which is not available here: the generated Dockerfile is checked."""
    import yaml

    built = subprocess.run(
        [str(Path(sys.executable).parent / "bentoml"), "build", "--output", "tag"],
        cwd=ROOT,
        env=bento_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento_dir = Path(bento_env["BENTOML_HOME"]) / "bentos" / name / version
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM" in dockerfile and "bentoml" in dockerfile.lower()
    manifest = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert [m["tag"] for m in manifest["services"][0]["models"]] == [bento_env["TEXTCLF_BENTO_MODEL"]]
    assert (bento_dir / "src" / "tasks" / "serving" / "classifier.py").exists()

    port, log = free_port(), tmp_path / "serve" / "serve.log"
    process = start_bento_server(tag, "127.0.0.1", port, log, env=bento_env)  # drops TEXTCLF_BENTO_MODEL
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, process, log, 120)
        answer = classify(url, ["the striker scored a goal"])
        assert answer.status_code == 200 and answer.json()[0]["model_version"] == "topics/7+pytorch"
    finally:
        stop_bento_server(process.pid)


def _log_line_of(log: Path, request_id: str, timeout_seconds: float = 10) -> str:
    """The server's access-log line that names `request_id` as its span (log lines are written asynchronously)."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        lines = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if f"span={request_id}" in line and "/classify" in line
        ]
        if lines or time.monotonic() > deadline:
            assert lines, f"no log line names span={request_id}:\n{log.read_text(errors='replace')[-3000:]}"
            return lines[0]
        time.sleep(0.2)


def test_each_classify_request_has_its_own_id_in_the_header_and_the_log(server, server_log):
    """No tracing exporter is configured (the default), so `classify` is left out of BentoML's spans and
    service.RequestIdMiddleware gives each request its id, as BentoML's span does with tracing on."""
    ids = [classify(server, [f"text number {i}"]).headers["x-bentoml-request-id"] for i in range(5)]
    assert len(set(ids)) == 5 and all(re.fullmatch(r"[0-9a-f]{16}", i) and i != "0" * 16 for i in ids)
    line = _log_line_of(server_log, ids[-1])
    assert "status=200" in line and "sampled=0" in line


# BentoML's in-memory span exporter, in its v2 configuration (the form the service's worker reads).
TRACING_EXPORTER = "services.tracing.exporter_type=in_memory services.tracing.sample_rate=1.0"


def test_with_tracing_switched_on_bentoml_traces_classify(bento_env, tmp_path):
    """TEXTCLF_TRACING=true and an exporter configured: BentoML's own spans cover `classify`, sampled."""
    log = tmp_path / "serve.log"
    process, url = serve_from_repository(
        {**bento_env, "TEXTCLF_TRACING": "true", "BENTOML_CONFIG_OPTIONS": TRACING_EXPORTER}, log
    )
    try:
        answer = classify(url, ["the striker scored a goal"])
        assert answer.status_code == 200
        assert "sampled=1" in _log_line_of(log, answer.headers["x-bentoml-request-id"])
    finally:
        stop_bento_server(process.pid)


def test_an_exporter_without_the_tracing_switch_is_warned_about_and_a_bad_switch_stops_the_start_up():
    script = (
        "import service; service.TextClassifierService.inject_config(); "
        "service.RequestIdMiddleware(None, ('/classify',))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TEXTCLF_TRACING"}
    warned = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "BENTOML_CONFIG_OPTIONS": TRACING_EXPORTER},
    )
    assert warned.returncode == 0, warned.stderr[-2000:]
    assert "left out of tracing: set TEXTCLF_TRACING=true" in warned.stderr
    bad = subprocess.run(
        [sys.executable, "-c", "import service"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "TEXTCLF_TRACING": "maybe"},
    )
    assert bad.returncode != 0 and "TEXTCLF_TRACING='maybe' is not true or false" in bad.stderr
