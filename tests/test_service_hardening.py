"""Hostile and careless input against a real `bentoml serve` over real HTTP: oversized bodies (with and without a
Content-Length), unknown paths (which must not become metric series), overload (503 with Retry-After, one log line),
one-line 4xx logs; and the admission queue and the dispatcher fix as units. schemathesis fuzzes the served OpenAPI
document. Media types, encodings, invisible texts, the cost budget, the bearer scheme and the document's truth go
through the service's own app in-process (tests/test_service_inputs.py)."""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tasks.promotion.bento import stop_bento_server
from tasks.serving.http_guard import ServingLimits, openapi_document
from tests.fixtures import serve_from_repository

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(bento_env, tmp_path_factory):
    log = tmp_path_factory.mktemp("hardening") / "serve.log"
    process, url = serve_from_repository(bento_env, log)
    yield url, log
    stop_bento_server(process.pid)


@pytest.fixture(scope="module")
def crowded(bento_env, tmp_path_factory):
    """A server with a token and room for one request at a time, no queue: overload is easy to make."""
    log = tmp_path_factory.mktemp("crowded") / "serve.log"
    env = {**bento_env, "TEXTCLF_API_TOKEN": "s3cret", "TEXTCLF_MAX_IN_FLIGHT": "1", "TEXTCLF_MAX_QUEUED": "0"}
    process, url = serve_from_repository(env, log)
    yield url, log
    stop_bento_server(process.pid)


def post(url: str, content: bytes, content_type: str | None = "application/json", **headers) -> httpx.Response:
    if content_type:
        headers["content-type"] = content_type
    return httpx.post(f"{url}/classify", content=content, headers=headers, timeout=60)


def assert_still_serving(url: str, **headers) -> None:
    ok = httpx.post(f"{url}/classify", json={"texts": ["still here"]}, headers=headers, timeout=60)
    assert ok.status_code == 200, ok.text


# --- bodies, media types, encodings ------------------------------------------------------------------------


@pytest.mark.integration
def test_a_body_over_the_size_limit_gets_413_and_nothing_breaks(served):
    url, _ = served
    huge = b'{"texts": ["' + b"x" * (50 * 1024 * 1024) + b'"]}'  # 50 MB, with a Content-Length
    response = post(url, huge)
    assert response.status_code == 413, response.text[:300]
    assert "larger than 8388608 bytes" in response.json()["error"]

    def streamed():  # no Content-Length: chunked, counted as it arrives
        yield b'{"texts": ["'
        for _ in range(10):
            yield b"y" * (1024 * 1024)
        yield b'"]}'

    response = httpx.post(
        f"{url}/classify", content=streamed(), headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 413
    assert_still_serving(url)


# --- texts ---------------------------------------------------------------------------------------------------


# --- paths and metrics -------------------------------------------------------------------------------------------


def _series(metrics: str) -> set[str]:
    return {line.split(" ")[0] for line in metrics.splitlines() if line and not line.startswith("#")}


@pytest.mark.integration
def test_unknown_paths_get_a_json_404_and_never_become_metric_series(served):
    url, _ = served
    with httpx.Client(base_url=url, timeout=30) as client:
        client.get("/no-such-page-warmup")
        before = _series(client.get("/metrics").text)
        for index in range(300):
            response = client.get(f"/probe/{index}/admin.php")
            assert response.status_code == 404
        assert "'/probe/299/admin.php'" in response.json()["error"] and "POST /classify" in response.json()["error"]
        assert client.post("/wp-login.php", content=b"x").status_code == 404
        after = _series(client.get("/metrics").text)
    assert not any("probe" in series or "wp-login" in series for series in after)
    assert len(after - before) <= 6, sorted(after - before)  # at most the /unmatched series of POST's 404
    assert any('endpoint="/unmatched"' in series for series in after)


@pytest.mark.integration
def test_a_second_server_from_the_same_store_leaves_the_first_s_metrics_alone(served, bento_env, tmp_path):
    # `bentoml serve` empties <BENTOML_HOME>/prometheus_multiproc_dir at start-up; every server the product starts
    # has a folder of its own (tasks/promotion/bento.with_own_metrics_folder), so a promotion's smoke test next to the
    # serving champion cannot blank the champion's /metrics.
    url, _ = served

    def classify_answered() -> float:  # the server's count of classify requests answered 200
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("bentoml_service_request_total{")
            and 'endpoint="/classify"' in line
            and 'http_response_code="200"' in line
        )

    for _ in range(3):
        assert_still_serving(url)
    before = classify_answered()
    assert before >= 3
    process, other = serve_from_repository(bento_env, tmp_path / "other.log")
    try:
        assert_still_serving(other)
        assert_still_serving(url)
        assert classify_answered() >= before + 1  # nothing forgotten while the other server runs
    finally:
        stop_bento_server(process.pid)
    assert_still_serving(url)
    assert classify_answered() >= before + 2


# --- auth and overload ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_overload_gets_503_with_retry_after_as_json_and_one_log_line(crowded):
    url, log = crowded
    headers = {"Authorization": "Bearer s3cret"}
    texts = ["a long enough text about the league and the market " * 6] * 64

    def call(_):
        return httpx.post(f"{url}/classify", json={"texts": texts}, headers=headers, timeout=60)

    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(call, range(48)))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"] == "application/json"
    assert "at capacity" in refused.json()["error"]
    assert_still_serving(url, **headers)
    assert httpx.get(f"{url}/metrics").status_code == 200  # Prometheus scrapes without the token
    text = log.read_text(errors="replace")
    assert "503 at capacity" in text
    assert "Traceback" not in text


# --- docs and logs ----------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_client_errors_are_logged_as_one_line_with_the_request_id(served):
    url, log = served
    response = post(url, b'{"texts": [""]}')
    assert response.status_code == 400
    request_id = response.headers.get("x-bentoml-request-id")
    for _ in range(40):
        lines = [line for line in log.read_text(errors="replace").splitlines() if "Exception on /classify" in line]
        if lines:
            break
        time.sleep(0.25)
    assert lines and "400 ValidationError" in lines[-1] and "[WARNING]" in lines[-1]
    assert request_id and f"span={request_id}" in lines[-1]  # the request id is the span id of the log line
    assert "Traceback" not in log.read_text(errors="replace")


# --- units: admission and the dispatcher's learned wait -------------------------------------------------------


def test_admission_is_first_come_first_served_bounded_and_times_out():
    from tasks.serving.http_guard import Admission, AtCapacity

    async def scenario():
        admission = Admission(max_in_flight=1, max_queued=2, timeout=0.2)
        await admission.acquire()  # the one slot
        order = []

        async def wait(name):
            await admission.acquire()
            order.append(name)

        first, second = asyncio.create_task(wait("first")), asyncio.create_task(wait("second"))
        await asyncio.sleep(0.01)
        with pytest.raises(AtCapacity, match="queue full"):  # two waiting already
            await admission.acquire()
        admission.release()  # the slot goes to the oldest waiter
        await first
        admission.release()
        await second
        assert order == ["first", "second"] and admission.in_flight == 1
        with pytest.raises(AtCapacity, match="queue timeout"):
            await admission.acquire()  # the slot is held: times out after 0.2 s
        admission.release()
        assert admission.in_flight == 0 and not admission.waiters

    asyncio.run(scenario())


def test_a_batch_of_one_forgets_the_wait_learned_under_load():
    from bentoml._internal.marshal.dispatcher import Optimizer

    from tasks.serving.http_guard import forget_stale_batch_wait

    forget_stale_batch_wait()
    optimizer = Optimizer(max_latency=30.0)
    for _ in range(20):  # under load: full batches whose first request waited 300 ms
        optimizer.log_outbound(n=64, wait=0.3, duration=0.3)
    optimizer.trigger_refresh()
    assert optimizer.wait == pytest.approx(0.3)
    optimizer.log_outbound(n=1, wait=0.29, duration=0.01)  # the load stopped: a lone request
    optimizer.trigger_refresh()
    assert optimizer.wait == 0


# --- schemathesis -----------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_document(served):
    """Property-based requests generated from the served OpenAPI document (valid and invalid bodies): no 5xx, and
    every answer's status, content type and body match the document."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    url, log = served
    schema = schemathesis.openapi.from_url(f"{url}/docs.json")
    failures, calls = [], {}
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy()

        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case):
            calls[operation.label] = calls.get(operation.label, 0) + 1
            try:
                # positive_data_acceptance is left out: JSON Schema cannot say "at least one visible character"
                # or "128,000 characters in all", which the server enforces with a 400 the document declares.
                case.call_and_validate(base_url=url, excluded_checks=[schemathesis.checks.positive_data_acceptance])
            except Exception as error:  # collect, so one run reports every operation
                failures.append(f"{operation.label}: {error}")
                raise

        try:
            check()
        except Exception:
            pass
    assert not failures, "\n\n".join(dict.fromkeys(failures))
    assert calls.get("POST /classify", 0) >= 30, calls  # it really sent requests
    assert not re.search(r"Traceback", log.read_text(errors="replace"))


def test_the_openapi_description_and_the_413_message_name_the_service_s_own_limits():
    limits = ServingLimits(max_texts=7, max_text_chars=300, max_request_chars=1_000)
    description = openapi_document({"paths": {}}, limits)["info"]["description"]
    assert (
        "1 to 7 texts" in description
        and "at most 300 characters" in description
        and "1000 characters in all" in description
    )
