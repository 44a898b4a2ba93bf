"""The request log (tasks/serving/request_log.py): the writer, reader and middleware in-process, and the service through
real `bentoml serve` processes: under concurrent load, after a graceful stop (SIGTERM), exactly one row per served
text; texts only when allowed; files visible within the flush interval while the server runs; bad settings stop
the start-up with the variable's name."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd
import pytest

from tasks.common.processes import process_alive
from tasks.promotion.bento import bento_worker_pids
from tasks.serving.request_log import (
    COLUMNS,
    RequestLogMiddleware,
    RequestLogSettings,
    RequestLogWriter,
    ServedRequest,
    read_request_log,
    texts_from_request,
)
from tests.fixtures import serve_from_repository

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^requests-\d{8}T\d{6}\.\d{6}Z-\d+-\d{6}\.parquet$")
UTC = dt.UTC


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def row(when: dt.datetime, **values) -> dict:
    base = {
        "time": when,
        "request_id": "r1",
        "text_sha256": sha("a"),
        "text": None,
        "length_chars": 1,
        "label": "sport",
        "probability": 0.9,
        "truncated": False,
        "model_version": "m/1",
        "latency_ms": 12.5,
    }
    return {**base, **values}


def part_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("requests-*.parquet"))


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------


def test_settings_defaults_and_values(tmp_path, monkeypatch):
    default = RequestLogSettings.from_env({})
    assert (default.enabled, default.log_text, default.flush_seconds, default.max_records) == (True, False, 5.0, 10_000)
    assert default.directory == Path(".textclf/request-log")
    monkeypatch.chdir(tmp_path)
    assert default.resolved_directory() == tmp_path.resolve() / ".textclf" / "request-log"
    assert RequestLogSettings.from_env({"TEXTCLF_HOME": "/srv/textclf"}).directory == Path("/srv/textclf/request-log")
    given = RequestLogSettings.from_env(
        {
            "TEXTCLF_REQUEST_LOG": "False",
            "TEXTCLF_REQUEST_LOG_DIR": "/var/log/clf",
            "TEXTCLF_REQUEST_LOG_TEXT": "TRUE",
            "TEXTCLF_REQUEST_LOG_FLUSH_SECONDS": "0.5",
            "TEXTCLF_REQUEST_LOG_MAX_RECORDS": "100",
            "TEXTCLF_HOME": "/ignored",
        }
    )
    assert given == RequestLogSettings(False, Path("/var/log/clf"), True, 0.5, 100)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TEXTCLF_REQUEST_LOG", "maybe"),
        ("TEXTCLF_REQUEST_LOG_TEXT", "2"),
        ("TEXTCLF_REQUEST_LOG_FLUSH_SECONDS", "soon"),
        ("TEXTCLF_REQUEST_LOG_FLUSH_SECONDS", "0"),
        ("TEXTCLF_REQUEST_LOG_FLUSH_SECONDS", "nan"),
        ("TEXTCLF_REQUEST_LOG_MAX_RECORDS", "1.5"),
        ("TEXTCLF_REQUEST_LOG_MAX_RECORDS", "0"),
    ],
)
def test_bad_settings_name_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        RequestLogSettings.from_env({name: value})


# ----------------------------------------------------------------------------------------------------------
# Writer and reader
# ----------------------------------------------------------------------------------------------------------


def test_reading_nothing_gives_the_columns_and_dtypes(tmp_path):
    missing = read_request_log(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    empty = read_request_log(tmp_path / "empty")
    for frame in (missing, empty):
        assert list(frame.columns) == list(COLUMNS) and len(frame) == 0
        assert str(frame["time"].dtype) == "datetime64[us, UTC]"
        assert frame["probability"].dtype == "float64" and frame["truncated"].dtype == bool


def test_thread_writes_a_file_within_the_flush_interval_without_close(tmp_path):
    writer = RequestLogWriter(tmp_path, flush_seconds=0.3, max_records=1000).start()
    try:
        writer.put([row(dt.datetime.now(UTC)), row(dt.datetime.now(UTC), text_sha256=sha("b"))])
        deadline = time.monotonic() + 5
        while not part_files(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(part_files(tmp_path)) == 1
        assert len(read_request_log(tmp_path)) == 2  # readable while the writer runs
    finally:
        writer.close()


def test_files_hold_at_most_max_records_and_close_writes_the_rest(tmp_path):
    writer = RequestLogWriter(tmp_path, flush_seconds=60, max_records=3).start()
    now = dt.datetime.now(UTC)
    for i in range(8):
        writer.put([row(now + dt.timedelta(seconds=i), length_chars=i)])
    deadline = time.monotonic() + 5
    while len(part_files(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(part_files(tmp_path)) == 2  # 3 + 3; the last 2 wait for the interval or close()
    writer.close()
    files = part_files(tmp_path)
    assert [len(pd.read_parquet(f)) for f in files] == [3, 3, 2]
    assert all(NAME.match(f.name) for f in files) and f"-{os.getpid()}-" in files[0].name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    frame = read_request_log(tmp_path)
    assert frame["length_chars"].tolist() == list(range(8))  # sorted by time
    assert (writer.records_written, writer.files_written, writer.records_lost) == (8, 3, 0)
    writer.put([row(now, length_chars=99)])  # after close: written at once, not lost
    assert len(read_request_log(tmp_path)) == 9
    writer.close()  # a second close does nothing


def test_a_failed_write_keeps_the_rows_for_the_next_try(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    real, calls = pq.write_table, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(pq, "write_table", flaky)
    writer = RequestLogWriter(tmp_path, flush_seconds=0.1).start()
    writer.put([row(dt.datetime.now(UTC))])
    deadline = time.monotonic() + 5
    while not part_files(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    writer.close()
    assert len(calls) >= 2 and len(read_request_log(tmp_path)) == 1 and writer.records_lost == 0


def test_since_until_bounds(tmp_path):
    base = dt.datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    writer = RequestLogWriter(tmp_path, flush_seconds=60).start()
    writer.put([row(base + dt.timedelta(hours=h), length_chars=h) for h in range(5)])
    writer.close()
    hours = lambda frame: frame["length_chars"].tolist()  # noqa: E731
    assert hours(read_request_log(tmp_path)) == [0, 1, 2, 3, 4]
    assert hours(read_request_log(tmp_path, since=base + dt.timedelta(hours=1))) == [1, 2, 3, 4]  # inclusive
    assert hours(read_request_log(tmp_path, until=base + dt.timedelta(hours=3))) == [0, 1, 2]  # exclusive
    assert hours(read_request_log(tmp_path, since="2025-03-01T13:00:00Z", until="2025-03-01T15:00:00+00:00")) == [1, 2]
    assert hours(read_request_log(tmp_path, since=dt.datetime(2025, 3, 1, 14))) == [2, 3, 4]  # naive = UTC
    assert hours(read_request_log(tmp_path, since=pd.Timestamp("2025-03-01 16:00", tz="Europe/Paris"))) == [3, 4]
    assert len(read_request_log(tmp_path, since=base + dt.timedelta(days=1))) == 0
    # a file written long before `since` is skipped by its name alone
    assert len(read_request_log(tmp_path, since=dt.datetime.now(UTC) + dt.timedelta(days=1))) == 0


# ----------------------------------------------------------------------------------------------------------
# Rows from requests, and the middleware in-process
# ----------------------------------------------------------------------------------------------------------


PREDICTIONS = [
    {"label": "sport", "probability": 0.8, "probabilities": {}, "truncated": False, "model_version": "m/2"},
    {"label": "tech", "probability": 0.6, "probabilities": {}, "truncated": True, "model_version": "m/2"},
]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", json.dumps({"texts": ["héllo 👋", "b"]}).encode()),
        ("", json.dumps({"texts": ["héllo 👋", "b"]}).encode()),
        ("application/x-www-form-urlencoded", b"texts=%5B%22h%C3%A9llo%20%F0%9F%91%8B%22%2C%20%22b%22%5D"),
        (
            "multipart/form-data; boundary=XyZ",
            b'--XyZ\r\nContent-Disposition: form-data; name="texts"\r\n\r\n["h\xc3\xa9llo \xf0\x9f\x91\x8b", "b"]\r\n--XyZ--\r\n',
        ),
    ],
)
def test_rows_from_a_served_request(content_type, body):
    assert texts_from_request(content_type, body) == ["héllo 👋", "b"]
    request = ServedRequest(
        1_700_000_000.25, 42.0, "abc", content_type, [body[:5], body[5:]], [json.dumps(PREDICTIONS).encode()]
    )
    rows = request.to_records(log_text=False)
    assert [r["text_sha256"] for r in rows] == [sha("héllo 👋"), sha("b")]
    assert [r["length_chars"] for r in rows] == [7, 1] and {r["text"] for r in rows} == {None}
    assert [(r["label"], r["probability"], r["truncated"], r["model_version"]) for r in rows] == [
        ("sport", 0.8, False, "m/2"),
        ("tech", 0.6, True, "m/2"),
    ]
    assert {(r["request_id"], r["latency_ms"], r["time"]) for r in rows} == {("abc", 42.0, 1_700_000_000_250_000)}
    assert [r["text"] for r in request.to_records(log_text=True)] == ["héllo 👋", "b"]


def test_an_abstained_answer_logs_its_top_class_beside_the_answered_label():
    answers = [
        {"label": "unknown", "probability": 0.4, "probabilities": {"sport": 0.4, "tech": 0.35, "food": 0.25}},
        {"label": "tech", "probability": 0.9, "probabilities": {"sport": 0.05, "tech": 0.9, "food": 0.05}},
        {"label": "food", "probability": 0.7},  # no probabilities: the label is the top class
    ]
    body = json.dumps({"texts": ["a", "b", "c"]}).encode()
    rows = ServedRequest(0.0, 1.0, "r", "application/json", [body], [json.dumps(answers).encode()]).to_records(False)
    assert [(r["label"], r["predicted_label"]) for r in rows] == [
        ("unknown", "sport"),
        ("tech", "tech"),
        ("food", "food"),
    ]


def test_unreadable_texts_still_log_every_prediction():
    request = ServedRequest(0.0, 1.0, None, "application/json", [b"not json"], [json.dumps(PREDICTIONS).encode()])
    rows = request.to_records(log_text=True)
    assert len(rows) == 2 and {r["text_sha256"] for r in rows} == {None} and rows[0]["request_id"]


def test_middleware_logs_only_200_answers_and_flushes_at_lifespan_shutdown(tmp_path):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        request = json.loads((await receive())["body"])
        if not all(request["texts"]):
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b'{"error": "empty"}'})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"x-bentoml-request-id", b"id-1")],
            }
        )
        answer = json.dumps(PREDICTIONS[: len(request["texts"])]).encode()
        await send({"type": "http.response.body", "body": answer[:10], "more_body": True})
        await send({"type": "http.response.body", "body": answer[10:]})

    settings = RequestLogSettings(directory=tmp_path / "log", flush_seconds=60)
    middleware = RequestLogMiddleware(app, settings, paths=("/classify",))

    async def call(path, texts):
        sent, body = [], json.dumps({"texts": texts}).encode()
        messages = iter([{"type": "http.request", "body": body, "more_body": False}])
        scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-type", b"application/json")]}
        await middleware(scope, lambda: asyncio.sleep(0, next(messages)), lambda m: asyncio.sleep(0, sent.append(m)))
        return sent

    async def lifespan():
        inbox = asyncio.Queue()
        for kind in ("lifespan.startup", "lifespan.shutdown"):
            inbox.put_nowait({"type": kind})
        replies = []

        async def receive():
            message = await inbox.get()
            if message["type"] == "lifespan.shutdown":  # serve the requests between start-up and shutdown
                assert middleware.writer.running
                assert len(await call("/classify", ["x", "y"])) == 3
                await call("/classify", [""])  # 400: not logged
                await call("/other", ["z"])  # another path: not logged
            return message

        await middleware({"type": "lifespan"}, receive, lambda m: asyncio.sleep(0, replies.append(m["type"])))
        return replies

    assert asyncio.run(lifespan()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert not middleware.writer.running
    frame = read_request_log(tmp_path / "log")
    assert frame["text_sha256"].tolist() == [sha("x"), sha("y")] and set(frame["request_id"]) == {"id-1"}
    assert (frame["latency_ms"] > 0).all()


# ----------------------------------------------------------------------------------------------------------
# Real `bentoml serve` processes
# ----------------------------------------------------------------------------------------------------------


def _stop(process, log: Path) -> None:
    """Graceful stop, as an orchestrator does it: SIGTERM, then wait."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"bentoml serve did not stop on SIGTERM: {log.read_text()[-3000:]}") from None


def _bad_request(url: str, i: int) -> httpx.Response:
    body = [b'{"texts": [""]}', b'{"texts": []}', b'{"texts": ', b'{"texts": [' + b",".join([b'"t"'] * 65) + b"]}"][
        i % 4
    ]
    return httpx.post(f"{url}/classify", content=body, headers={"content-type": "application/json"}, timeout=120)


@pytest.mark.integration
def test_under_concurrent_load_every_served_text_is_logged_once(bento_env, prepared_fixture, tmp_path):
    """300 requests of 1 to 3 texts from 24 threads, 24 bad requests among them, a few form-encoded ones; part
    files of at most 50 rows. After SIGTERM: exactly the served texts, each once, with their answers."""
    log_dir = tmp_path / "request-log"
    env = {
        **bento_env,
        "TEXTCLF_REQUEST_LOG_DIR": str(log_dir),
        "TEXTCLF_REQUEST_LOG_MAX_RECORDS": "50",
        "TEXTCLF_REQUEST_LOG_FLUSH_SECONDS": "2",
    }
    base = prepared_fixture[1].split("test")["text"].tolist()
    rng = random.Random(7)
    requests = [[f"{rng.choice(base)} #{i}.{j}" for j in range(rng.randint(1, 3))] for i in range(300)]
    long_text = " ".join(["the striker scored a goal"] * 40)  # truncated by the tiny model's 32 tokens
    requests[5] = [long_text + " #5"]
    requests[7] = ["café ☕ — ünïcode #7", "  padded text #7  "]

    def send(i: int):
        if i >= 300:
            return None, _bad_request(url, i)
        texts = requests[i]
        if i % 50 == 1:  # BentoML also takes the fields as a form
            return texts, httpx.post(f"{url}/classify", data={"texts": json.dumps(texts)}, timeout=120)
        return texts, httpx.post(f"{url}/classify", json={"texts": texts}, timeout=120)

    process, url = serve_from_repository(env, tmp_path / "serve.log")
    started = dt.datetime.now(UTC)
    try:
        order = list(range(324))
        rng.shuffle(order)
        with ThreadPoolExecutor(max_workers=24) as pool:
            answers = list(pool.map(send, order))
    finally:
        _stop(process, tmp_path / "serve.log")
    stopped = dt.datetime.now(UTC)

    served = [(texts, r) for texts, r in answers if texts is not None and r.status_code == 200]
    assert {r.status_code for texts, r in answers if texts is None} == {400}
    assert len(served) >= 290, Counter(r.status_code for _, r in answers)  # a rare 503 under load is allowed
    log = read_request_log(log_dir)
    expected = []
    for texts, response in served:
        for text, prediction in zip(texts, response.json(), strict=True):
            expected.append(
                (
                    response.headers["x-bentoml-request-id"],
                    sha(text),
                    len(text),
                    prediction["label"],
                    round(prediction["probability"], 6),
                    prediction["truncated"],
                    prediction["model_version"],
                )
            )
    got = [
        (r.request_id, r.text_sha256, r.length_chars, r.label, round(r.probability, 6), r.truncated, r.model_version)
        for r in log.itertuples()
    ]
    assert len(log) == len(expected) == sum(len(texts) for texts, _ in served)
    assert Counter(got) == Counter(expected)
    assert log["request_id"].nunique() == len(served)
    assert log["text"].isna().all()
    assert set(log["model_version"]) == {"topics/7+pytorch"}
    if any(texts == requests[5] for texts, _ in served):
        assert log.loc[log["text_sha256"] == sha(long_text + " #5"), "truncated"].tolist() == [True]
    assert ((log["time"] >= started - dt.timedelta(seconds=1)) & (log["time"] <= stopped)).all()
    assert (log["latency_ms"] > 0).all() and (log["latency_ms"] < 120_000).all()
    files = part_files(log_dir)
    assert len(files) >= len(expected) // 50 and all(len(pd.read_parquet(f)) <= 50 for f in files)
    assert not [p for p in log_dir.iterdir() if not NAME.match(p.name)]  # only complete part files


@pytest.mark.integration
def test_texts_are_logged_when_allowed_and_files_appear_while_serving(bento_env, tmp_path):
    log_dir = tmp_path / "request-log"
    env = {
        **bento_env,
        "TEXTCLF_REQUEST_LOG_DIR": str(log_dir),
        "TEXTCLF_REQUEST_LOG_TEXT": "true",
        "TEXTCLF_REQUEST_LOG_FLUSH_SECONDS": "1",
    }
    texts = ["the striker scored a goal for the team", 'Zürich — prices ↑ 5 %, "quoted" \\ back\\slash']
    process, url = serve_from_repository(env, tmp_path / "serve.log")
    try:
        answered = httpx.post(f"{url}/classify", json={"texts": texts}, timeout=60)
        assert answered.status_code == 200
        at = time.monotonic()
        while len(read_request_log(log_dir)) < 2 and time.monotonic() - at < 10:
            time.sleep(0.1)
        seen_after = time.monotonic() - at
        running = read_request_log(log_dir)
        assert len(running) == 2, "no rows in the log 10 s after the answer, with a 1 s flush interval"
        assert seen_after < 1 + 3  # the flush interval, plus slack for a busy machine
        assert process.poll() is None  # read while the server runs
        assert (
            httpx.post(f"{url}/classify", json={"texts": ["one more, flushed at shutdown"]}, timeout=60).status_code
            == 200
        )
    finally:
        _stop(process, tmp_path / "serve.log")
    log = read_request_log(log_dir)
    assert log["text"].tolist() == [*texts, "one more, flushed at shutdown"]
    assert log["text_sha256"].tolist() == [sha(t) for t in log["text"]]
    assert log["length_chars"].tolist() == [len(t) for t in log["text"]]
    assert [p["label"] for p in answered.json()] == log["label"].tolist()[:2]


@pytest.mark.integration
def test_settings_at_service_import(tmp_path):
    """A bad value stops `import service` (so `bentoml serve`) naming the variable; `false` adds no middleware;
    importing creates no folder (the server's worker does, when it starts)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTCLF_")}
    env["TEXTCLF_REQUEST_LOG_DIR"] = str(tmp_path / "log")
    script = (
        "import service; print([m[0].__name__ for m in service.TextClassifierService.middlewares]); "
        "print(service.REQUEST_LOG)"
    )
    bad = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**env, "TEXTCLF_REQUEST_LOG_TEXT": "sure"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "TEXTCLF_REQUEST_LOG_TEXT='sure'" in bad.stderr
    off = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**env, "TEXTCLF_REQUEST_LOG": "false"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert off.returncode == 0, off.stderr[-2000:]
    assert off.stdout.splitlines()[0] == "['RequestIdMiddleware', 'RequestGuard']"
    on = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert on.returncode == 0, on.stderr[-2000:]
    assert on.stdout.splitlines()[0] == "['RequestIdMiddleware', 'RequestGuard', 'RequestLogMiddleware']"
    assert not (tmp_path / "log").exists()


# ----------------------------------------------------------------------------------------------------------
# Crashes: SIGKILL of a writer, of the whole server, of its worker alone
# ----------------------------------------------------------------------------------------------------------

KILLED_WRITER = """
import sys, time, datetime as dt
from tasks.serving.request_log import RequestLogWriter
writer = RequestLogWriter(sys.argv[1], flush_seconds=600).start()
when = dt.datetime(2026, 12, 3, tzinfo=dt.timezone.utc)
for i in range(5):
    writer.put([{"time": when, "request_id": f"r{i}", "text_sha256": f"{i}{j}", "label": "sport"} for j in range(10)])
while writer._journal_file is None or writer._journal_file.read_text().count(chr(10)) < 50:
    time.sleep(0.01)
print("journaled", flush=True)
time.sleep(600)
"""


def test_rows_a_killed_writer_held_are_recovered_by_the_next_writer_and_a_live_ones_are_left_alone(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "journaled"
        alive = RequestLogWriter(tmp_path).start()  # the writer process still runs: its journal is its own
        alive.close()
        assert alive.records_recovered == 0 and not part_files(tmp_path)
    finally:
        process.kill()
        process.wait()
    assert not part_files(tmp_path) and len(list(tmp_path.glob(".journal-*.jsonl"))) == 1  # 600 s flush: no file
    recovering = RequestLogWriter(tmp_path).start()
    recovering.close()
    assert recovering.records_recovered == 50
    log = read_request_log(tmp_path)
    assert sorted(log["text_sha256"]) == sorted(f"{i}{j}" for i in range(5) for j in range(10))
    assert not list(tmp_path.glob(".journal-*"))  # dropped once written


def test_a_writer_keeps_no_journal_for_rows_it_has_written(tmp_path):
    writer = RequestLogWriter(tmp_path, flush_seconds=0.05).start()
    writer.put([row(dt.datetime(2026, 12, 3, tzinfo=UTC))])
    deadline = time.monotonic() + 10
    while not part_files(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    assert part_files(tmp_path) and not list(tmp_path.glob(".journal-*"))
    writer.close()
    assert len(read_request_log(tmp_path)) == 1


def _worker_pid(server_pid: int) -> int:
    """The pid of the BentoML worker under `bentoml serve` (the process that loads the model and logs requests)."""
    workers = bento_worker_pids(server_pid)
    assert len(workers) == 1, f"expected one BentoML worker under {server_pid}, found {workers}"
    return workers[0]


def _serve_and_send(env: dict, log: Path, count: int, tag: str):
    process, url = serve_from_repository(env, log)
    texts = [f"the striker scored a goal {tag} #{i}" for i in range(count)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda t: httpx.post(f"{url}/classify", json={"texts": [t]}, timeout=60), texts))
    assert all(a.status_code == 200 for a in answers)
    return process, url, texts


@pytest.mark.integration
@pytest.mark.parametrize("victim", ["server", "worker"])
def test_a_sigkill_loses_no_served_row(bento_env, tmp_path, victim):
    """Default flush interval (5 s): the rows of the last seconds are still in memory when the server (or its
    worker alone, as the OOM killer does it) is SIGKILLed right after the last answer. None may be lost."""
    log_dir = tmp_path / "request-log"
    env = {**bento_env, "TEXTCLF_REQUEST_LOG_DIR": str(log_dir)}
    env.pop("TEXTCLF_REQUEST_LOG_FLUSH_SECONDS", None)
    process, _url, texts = _serve_and_send(env, tmp_path / "serve.log", 60, victim)
    if victim == "server":  # all of it at once, as when a container or its node dies
        worker = _worker_pid(process.pid)
        os.killpg(process.pid, signal.SIGKILL)
        os.kill(worker, signal.SIGKILL)  # in a process group of its own
        process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while process_alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = sorted(p.name for p in log_dir.iterdir())
        assert len(read_request_log(log_dir)) < len(texts) and any(n.startswith(".journal-") for n in left), left
        RequestLogWriter(log_dir).start().close()  # the next server's writer, in-process here
    else:
        os.kill(_worker_pid(process.pid), signal.SIGKILL)
        try:  # BentoML starts a new worker, whose writer recovers the journal of the killed one
            deadline = time.monotonic() + 120
            while len(read_request_log(log_dir)) < len(texts) and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            _stop(process, tmp_path / "serve.log")
    log = read_request_log(log_dir)
    assert sorted(log["text_sha256"]) == sorted(sha(t) for t in texts)
    assert not list(log_dir.glob(".journal-*"))
