"""The Bento service's request log: one row per classified text, written off the request path as Parquet files.

Per served text (a `classify` request answered 200): `time` (UTC, when the request reached the server),
`request_id`, `text_sha256`, `text` (null unless TEXTCLF_REQUEST_LOG_TEXT=true), `length_chars`, `label`, `labels`,
`probability`, `truncated`, `model_version` and `latency_ms` (the whole request as the server saw it: reading
the body, validation, waiting for its adaptive batch, the forward pass and writing the answer).

- `RequestLogMiddleware` (ASGI, added by service.py) keeps references to the request body and the 200 answer of
  each `/classify` request and, before the answer's last byte goes out, hands them to `RequestLogWriter.put`.
- `put` turns them into rows (JSON parsing, SHA-256: tens of microseconds for a news-length text) and appends
  them to a hidden journal file (`.journal-<pid>-<seq>.jsonl`, one JSON row per line, one plain `write`, which the
  kernel keeps when the process is SIGKILLed or OOM-killed), then queues them. So a row is durable before its
  client sees the answer: a kill loses no answered row.
- One background thread writes a Parquet part file when it holds `max_records` rows or its oldest row is
  `flush_seconds` old, under a hidden temporary name renamed to `requests-<UTC time>-<pid>-<seq>.parquet`, so
  readers only see whole files, and then starts a new journal with only the rows not yet written. A writer that
  starts (the next server, or the worker BentoML restarts) turns the journals of dead processes into Parquet
  files. `close()` writes everything left (the middleware calls it at the ASGI lifespan shutdown, after the server
  has finished its in-flight requests; an `atexit` hook is the fallback).
- `read_request_log(log_dir, since, until)` reads them back as one pandas DataFrame (the drift flow's input).

Settings (tasks/serving/settings.py `RequestLogEnv`, part of `ServingSettings`, which service.py reads once and
hands over as `RequestLogSettings.from_settings(...)`; a bad value raises a ValueError naming it):
TEXTCLF_REQUEST_LOG (default true), TEXTCLF_REQUEST_LOG_DIR (default `<TEXTCLF_HOME or .textclf>/request-log`,
a relative path resolved against the server's working directory when the server starts; for a built Bento BentoML
makes that the Bento's own `src` folder, so give an absolute path there, as `textclf serve` does),
TEXTCLF_REQUEST_LOG_TEXT (default false), TEXTCLF_REQUEST_LOG_FLUSH_SECONDS (default 5) and
TEXTCLF_REQUEST_LOG_MAX_RECORDS (default 10,000).

Standard library, pyarrow and pandas only (imported lazily: importing this module is cheap), besides the serving
settings (tasks/serving/settings.py, pydantic-settings), because it ships in the Bento (bentofile.yaml `include`)."""

from __future__ import annotations

import asyncio
import atexit
import datetime as dt
import email.parser
import email.policy
import hashlib
import itertools
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs

from tasks.common.processes import process_alive
from tasks.serving.asgi import ASGIApp, Message, Receive, Scope, Send
from tasks.serving.http_guard import header
from tasks.serving.settings import DEFAULT_FLUSH_SECONDS, DEFAULT_MAX_RECORDS, RequestLogEnv

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

logger = logging.getLogger("textclf.request_log")
logger.setLevel(logging.INFO)  # its start-up and shutdown lines show in the server's log

COLUMNS = (
    "time",
    "request_id",
    "text_sha256",
    "text",
    "length_chars",
    "label",
    "labels",
    "predicted_label",
    "probability",
    "truncated",
    "model_version",
    "latency_ms",
)
FILE_PREFIX = "requests-"
FILE_PATTERN = "requests-*.parquet"
_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"
# A file is skipped by `since` only when it was written this long before `since` (its rows are all older than its
# name's time; the margin covers a wall clock stepped backwards between a request and the write).
_PRUNE_MARGIN = dt.timedelta(minutes=10)


class _Stop:
    """The writer thread's stop signal in its queue."""


_STOP = _Stop()
Record = dict[str, Any]  # one row of the log: COLUMNS to values
JOURNAL_PREFIX = ".journal-"


def schema() -> pa.Schema:
    """The Arrow schema of the log files (pyarrow imported on first use)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("time", pa.timestamp("us", tz="UTC")),
            ("request_id", pa.string()),
            ("text_sha256", pa.string()),
            ("text", pa.string()),
            ("length_chars", pa.int64()),
            ("label", pa.string()),
            ("labels", pa.list_(pa.string())),  # the answer's classes (a multi-label model's: all above threshold)
            ("predicted_label", pa.string()),
            ("probability", pa.float64()),
            ("truncated", pa.bool_()),
            ("model_version", pa.string()),
            ("latency_ms", pa.float64()),
        ]
    )


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestLogSettings:
    enabled: bool = True
    directory: Path = Path(".textclf") / "request-log"  # relative: resolved against the working directory
    log_text: bool = False
    flush_seconds: float = DEFAULT_FLUSH_SECONDS
    max_records: int = DEFAULT_MAX_RECORDS

    @classmethod
    def from_settings(cls, settings: RequestLogEnv) -> RequestLogSettings:
        """The request log's part of the serving settings (tasks/serving/settings.py)."""
        return cls(
            enabled=settings.request_log,
            directory=settings.request_log_directory,
            log_text=settings.request_log_text,
            flush_seconds=settings.request_log_flush_seconds,
            max_records=settings.request_log_max_records,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RequestLogSettings:
        """The TEXTCLF_REQUEST_LOG* variables (and TEXTCLF_HOME) of the process environment, or of `environ`; a bad
        value raises a ValueError that names the variable."""
        return cls.from_settings(RequestLogEnv.load(environ))

    def resolved_directory(self) -> Path:
        """The directory, a relative one resolved against the current working directory (call it in the server
        process once it runs: BentoML imports a built Bento's service.py from inside the Bento's folder)."""
        return (self.directory if self.directory.is_absolute() else Path.cwd() / self.directory).resolve()


# ----------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------


def text_sha256(text: str) -> str:
    """Hex SHA-256 of the text's UTF-8 bytes (lone surrogates, which JSON allows, kept as they are)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _as_texts(value: Any) -> list[str] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    return None


def texts_from_request(content_type: str, body: bytes) -> list[str] | None:
    """The `texts` of a classify request body, parsed as BentoML parses it (JSON; or a form whose `texts` field
    holds a JSON list), or None when that fails."""
    media = content_type.split(";")[0].strip().lower()
    try:
        if media == "multipart/form-data":
            header = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
            found = None
            for part in message.iter_parts():
                if part.get_param("name", header="content-disposition") == "texts":
                    found = cast(bytes, part.get_payload(decode=True)).decode("utf-8")
            return _as_texts(found) if found is not None else None
        if media == "application/x-www-form-urlencoded":
            values = parse_qs(body.decode("utf-8"), keep_blank_values=True).get("texts")
            return _as_texts(values[-1]) if values else None
        data = json.loads(body)  # BentoML reads every other media type as JSON
    except (ValueError, UnicodeError, LookupError, AttributeError, TypeError):
        return None
    return _as_texts(data.get("texts")) if isinstance(data, dict) else None


@dataclass
class ServedRequest:
    """One `classify` request answered 200, as the middleware saw it: raw bytes, parsed later by the writer."""

    started_at: float  # time.time() when the request reached the server
    latency_ms: float
    request_id: str | None
    content_type: str
    body: list[bytes]
    response: list[bytes]

    def to_records(self, log_text: bool) -> list[Record]:
        try:
            predictions = json.loads(b"".join(self.response))
        except ValueError:
            predictions = None
        if not isinstance(predictions, list) or not all(isinstance(p, dict) for p in predictions):
            logger.warning("request log: a 200 answer of classify is not a list of predictions; not logged")
            return []
        texts = texts_from_request(self.content_type, b"".join(self.body))
        if texts is None or len(texts) != len(predictions):
            logger.warning(
                "request log: could not read the texts of a served request (%s); its %d predictions "
                "are logged without hash, text and length",
                self.content_type,
                len(predictions),
            )
            row_texts: list[str | None] = [None] * len(predictions)
        else:
            row_texts = list(texts)
        request_id = self.request_id or uuid.uuid4().hex
        when = int(self.started_at * 1_000_000)
        return [
            {
                "time": when,
                "request_id": request_id,
                "text_sha256": None if text is None else text_sha256(text),
                "text": text if log_text else None,
                "length_chars": None if text is None else len(text),
                "label": prediction.get("label"),
                "labels": prediction.get("labels"),
                "predicted_label": top_class(prediction),
                "probability": prediction.get("probability"),
                "truncated": prediction.get("truncated"),
                "model_version": prediction.get("model_version"),
                "latency_ms": self.latency_ms,
            }
            for text, prediction in zip(row_texts, predictions)
        ]


def top_class(prediction: dict[str, Any]) -> str | None:
    """The most probable class of an answer. It differs from the answered `label` when the server abstained
    ('unknown', TEXTCLF_MIN_CONFIDENCE): the drift monitor compares top classes, so abstaining is not label drift."""
    probabilities = prediction.get("probabilities")
    if isinstance(probabilities, dict) and probabilities:
        return str(max(probabilities, key=lambda name: probabilities[name]))
    label = prediction.get("label")
    return None if label is None else str(label)


def _to_table(records: list[Record]) -> pa.Table:
    """Rows (dicts with COLUMNS; `time` as a datetime or as microseconds since the epoch) as an Arrow table."""
    import pyarrow as pa

    target = schema()
    columns = {}
    for field in target:
        values = [record.get(field.name) for record in records]
        if field.name == "time":
            values = [_micros(v) for v in values]
        columns[field.name] = pa.array(values, type=pa.int64() if field.name == "time" else field.type)
    columns["time"] = columns["time"].cast(target.field("time").type)
    return pa.Table.from_pydict(columns, schema=target)


def _micros(value: dt.datetime | float | str | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        delta = value - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return int(float(value) * 1_000_000)  # seconds since the epoch


# ----------------------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------------------


class RequestLogWriter:
    """Rows in through `put` (parsed and journaled on the caller's thread, so they survive a kill once `put`
    returns), Parquet part files out from one background thread, each at most `max_records` rows, at the latest
    `flush_seconds` after its oldest row arrived."""

    def __init__(
        self,
        directory: str | Path,
        flush_seconds: float = DEFAULT_FLUSH_SECONDS,
        max_records: int = DEFAULT_MAX_RECORDS,
        log_text: bool = False,
    ):
        if flush_seconds <= 0 or max_records < 1:
            raise ValueError("flush_seconds must be positive and max_records at least 1")
        self.directory = Path(directory)
        self.flush_seconds, self.max_records, self.log_text = float(flush_seconds), int(max_records), log_text
        self.records_written = 0
        self.files_written = 0
        self.records_lost = 0
        self.records_recovered = 0
        self._queue: queue.SimpleQueue[list[Record] | _Stop] = queue.SimpleQueue()
        # held while appending to the journal and queueing (callers), and while swapping journals (the thread):
        # every queued row is in the journal the thread drops only once that row is in a Parquet file
        self._journal_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._sequence = itertools.count(1)
        self._journal_segments = itertools.count(1)
        self._journal_fd: int | None = None
        self._journal_file: Path | None = None
        self._journal_broken = False

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> RequestLogWriter:
        """Create the directory (an error here names it) and start the thread; a second call does nothing."""
        if self._thread is not None:
            return self
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise RuntimeError(
                f"the request log directory {self.directory} is not writable ({error}); set "
                f"TEXTCLF_REQUEST_LOG_DIR to a writable folder, or TEXTCLF_REQUEST_LOG=false"
            ) from error
        self.recover_journals()
        self._thread = threading.Thread(target=self._run, name="textclf-request-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)
        return self

    def put(self, item: ServedRequest | Iterable[Record]) -> None:
        """Log one served request (or ready rows): parsed into rows and appended to the journal here, so they are
        safe from a kill when this returns; written to Parquet by the thread later. One small `write`, no fsync."""
        records = self._records(item)
        if not records:
            return
        if self._closed and not self.running:  # after close(): rare (shutdown), written on the caller's thread
            self._write_now(records)
            return
        with self._journal_lock:
            self._journal_append(records)
            self._queue.put(records)

    def close(self, timeout: float = 60.0) -> None:
        """Write every queued row and stop the thread. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
        left: list[Record] = []  # rows queued after the thread stopped (or when it never started)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, _Stop):
                left += item
        self._write_now(left)
        if not self.records_lost and self._journal_fd is not None:  # never started: its journal is written now
            self._journal_swap([])
        try:
            atexit.unregister(self.close)
        except Exception:
            pass

    def _records(self, item: ServedRequest | Iterable[Record]) -> list[Record]:
        try:
            return item.to_records(self.log_text) if isinstance(item, ServedRequest) else list(item)
        except Exception:
            logger.exception("request log: could not turn a served request into rows")
            return []

    def _write_now(self, records: list[Record]) -> None:
        for start in range(0, len(records), self.max_records):
            chunk = records[start : start + self.max_records]
            if not self._write(chunk):
                self.records_lost += len(chunk)
                logger.error("request log: %d rows could not be written to %s", len(chunk), self.directory)

    # --- journal: what a crash must not lose ---------------------------------------------------------------

    def _journal_append(self, records: list[Record]) -> None:
        if not records or self._journal_broken:
            return
        try:
            if self._journal_fd is None:
                self._journal_file = self.directory / (
                    f"{JOURNAL_PREFIX}{os.getpid()}-{next(self._journal_segments):06d}.jsonl"
                )
                self._journal_fd = os.open(self._journal_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            lines = "".join(json.dumps({**r, "time": _micros(r.get("time"))}, default=str) + "\n" for r in records)
            os.write(self._journal_fd, lines.encode("ascii"))
        except Exception as error:
            self._journal_broken = True
            logger.error(
                "request log: cannot write the journal in %s (%s): rows still go to Parquet files, but a "
                "crash would lose the unwritten ones",
                self.directory,
                error,
            )

    def _journal_swap(self, remaining: list[Record]) -> bool:
        """The thread wrote rows of the journal to Parquet: a new journal holds `remaining` (the rows it still
        buffers) and what callers queued meanwhile, which it takes from the queue into `remaining`; then the old
        journal goes. Returns whether the stop signal was among what it took."""
        stopping = False
        with self._journal_lock:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Stop):
                    stopping = True
                else:
                    remaining += item
            old_fd, old_file = self._journal_fd, self._journal_file
            self._journal_fd = self._journal_file = None
            self._journal_append(remaining)
        if old_fd is not None:
            os.close(old_fd)
            if old_file is not None:
                old_file.unlink(missing_ok=True)
        return stopping

    def recover_journals(self) -> int:
        """Write the rows of journals left by processes that are gone (killed before they wrote them to Parquet)
        as Parquet files, then drop those journals. Returns the number of rows recovered."""
        recovered = 0
        for journal in sorted(self.directory.glob(f"{JOURNAL_PREFIX}*.jsonl")):
            try:
                pid = int(journal.name[len(JOURNAL_PREFIX) :].split("-", 1)[0])
            except ValueError:
                continue
            if pid == os.getpid() or process_alive(pid):
                continue
            rows = []
            for line in journal.read_text(encoding="ascii", errors="replace").splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:  # the last line, cut by the kill
                    continue
            if rows and not self._write(rows):
                continue  # keep the journal for the next start
            journal.unlink(missing_ok=True)
            recovered += len(rows)
        if recovered:
            logger.warning("request log: recovered %d rows from the journal of a server that was killed", recovered)
        self.records_recovered += recovered
        return recovered

    def _run(self) -> None:
        buffer: list[Record] = []
        oldest = 0.0  # monotonic time the oldest buffered row arrived
        stopping = False
        while not stopping:
            item: list[Record] | _Stop | None
            try:
                if buffer:
                    item = self._queue.get(timeout=max(0.001, oldest + self.flush_seconds - time.monotonic()))
                else:
                    item = self._queue.get()
            except queue.Empty:
                item = None
            if isinstance(item, _Stop):
                stopping = True
            elif item is not None:
                if not buffer:
                    oldest = time.monotonic()
                buffer += item
            while True:  # until a round writes nothing: a journal swap can take in more rows from the queue
                written = False
                while len(buffer) >= self.max_records:
                    if not self._write(buffer[: self.max_records]):
                        break
                    buffer, written = buffer[self.max_records :], True
                    oldest = time.monotonic()
                if buffer and (stopping or time.monotonic() - oldest >= self.flush_seconds):
                    if self._write(buffer):
                        buffer, written = [], True
                    elif not stopping:
                        oldest = time.monotonic()  # keep the rows, try again one interval later
                if not written:
                    break
                had_buffer = bool(buffer)
                stopping = self._journal_swap(buffer) or stopping  # buffer now holds what callers queued too
                if buffer and not had_buffer:
                    oldest = time.monotonic()
        while True:  # what could not be written yet (max_records chunks), and rows queued after the stop signal
            lost_before = self.records_lost
            self._write_now(buffer)
            if self.records_lost != lost_before:
                break  # the journal keeps them for the next writer
            buffer = []
            self._journal_swap(buffer)
            if not buffer:
                break
        # a journal left here (rows that could not be written) is recovered by the next writer that starts
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None

    def _write(self, records: list[Record]) -> bool:
        """One part file, written under a hidden temporary name and renamed: readers see whole files only."""
        import pyarrow.parquet as pq

        now = dt.datetime.now(dt.UTC)
        name = f"{FILE_PREFIX}{now.strftime(_TIME_FORMAT)}-{os.getpid()}-{next(self._sequence):06d}.parquet"
        temporary = self.directory / f".{name}.tmp"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            pq.write_table(_to_table(records), temporary)
            os.replace(temporary, self.directory / name)
        except Exception:
            logger.exception("request log: writing %d rows to %s failed", len(records), self.directory)
            temporary.unlink(missing_ok=True)
            return False
        self.records_written += len(records)
        self.files_written += 1
        return True


# ----------------------------------------------------------------------------------------------------------
# ASGI middleware
# ----------------------------------------------------------------------------------------------------------


class RequestLogMiddleware:
    """Logs every POST to `paths` answered 200. The writer starts at the ASGI lifespan start-up (or with the
    first request) and is closed at the lifespan shutdown, which the server runs after its in-flight requests
    have been answered (SIGTERM to `bentoml serve`), so no served prediction is lost."""

    def __init__(self, app: ASGIApp, settings: RequestLogSettings, paths: Iterable[str] = ("/classify",)):
        self.app = app
        self.paths = frozenset(paths)
        directory = settings.resolved_directory()
        if not settings.directory.is_absolute() and (Path.cwd().parent / "bento.yaml").exists():
            logger.warning(
                "request log: %s is a relative path and this server runs a built Bento, whose working directory is "
                "the Bento's own folder: the log goes to %s. Set TEXTCLF_REQUEST_LOG_DIR to an absolute path "
                "(`textclf serve` does: <TEXTCLF_HOME>/request-log).",
                settings.directory,
                directory,
            )
        self.writer = RequestLogWriter(directory, settings.flush_seconds, settings.max_records, settings.log_text)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if kind != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.writer._thread is None:  # no lifespan (some test servers): start with the first request
            self.writer.start()

        started_at, started = time.time(), time.perf_counter()
        body: list[bytes] = []
        response: list[bytes] = []
        status = 0
        request_id: str | None = None

        async def logged_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                body.append(message.get("body", b""))
            return message

        async def logged_send(message: Message) -> None:
            nonlocal status, request_id
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                if status == 200:
                    for key, value in message.get("headers", ()):
                        if key.lower() == b"x-bentoml-request-id":
                            request_id = value.decode("latin-1")
            elif kind == "http.response.body" and status == 200:
                response.append(message.get("body", b""))
                if not message.get("more_body", False):
                    latency_ms = (time.perf_counter() - started) * 1000.0
                    # journaled before the client can see the answer: a kill after it loses no answered row
                    self.writer.put(
                        ServedRequest(
                            started_at, latency_ms, request_id, header(scope, b"content-type") or "", body, response
                        )
                    )
            await send(message)

        await self.app(scope, logged_receive, logged_send)

    def _lifespan_send(self, send: Send) -> Send:
        async def lifespan_send(message: Message) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                try:
                    self.writer.start()
                    logger.info(
                        "request log: one row per served text, to %s (texts %s, files every %g s or %d rows)",
                        self.writer.directory,
                        "kept" if self.writer.log_text else "hashed only",
                        self.writer.flush_seconds,
                        self.writer.max_records,
                    )
                except RuntimeError as error:
                    logger.error("request log: %s", error)
                    message = {"type": "lifespan.startup.failed", "message": str(error)}
            elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await asyncio.to_thread(self.writer.close)
                logger.info(
                    "request log: closed, %d rows in %d files written to %s",
                    self.writer.records_written,
                    self.writer.files_written,
                    self.writer.directory,
                )
            await send(message)

        return lifespan_send


# ----------------------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------------------


def _utc(value: Any) -> dt.datetime | None:
    """A datetime, pandas Timestamp or ISO string as an aware UTC datetime (naive ones are taken as UTC)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if hasattr(value, "to_pydatetime"):
        value = value.to_pydatetime()
    if not isinstance(value, dt.datetime):
        raise TypeError(f"since/until must be a datetime or an ISO 8601 string, not {type(value).__name__}")
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _written_at(name: str) -> dt.datetime | None:
    try:
        stamp = name[len(FILE_PREFIX) :].split("-", 1)[0]
        return dt.datetime.strptime(stamp, _TIME_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def read_request_log(log_dir: str | Path, since: Any = None, until: Any = None) -> pd.DataFrame:
    """Every logged row in `log_dir` with `since <= time < until` (either bound optional; datetimes, naive ones
    taken as UTC, or ISO strings), as a pandas DataFrame with COLUMNS, sorted by time. `time` is a UTC timestamp.
    No folder or no rows: an empty frame with the same columns and dtypes."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    target = schema()
    start, end = _utc(since), _utc(until)
    directory = Path(log_dir)
    tables = []
    for path in sorted(directory.glob(FILE_PATTERN)) if directory.is_dir() else []:
        written = _written_at(path.name)
        if start is not None and written is not None and written < start - _PRUNE_MARGIN:
            continue
        try:
            table = pq.read_table(path)
        except FileNotFoundError:  # removed (retention) since it was listed
            continue
        table = pa.Table.from_arrays(
            [
                table[name].cast(field.type) if name in table.column_names else pa.nulls(len(table), field.type)
                for name, field in zip(target.names, target)
            ],
            schema=target,
        )
        if start is not None:
            table = table.filter(pc.greater_equal(table["time"], pa.scalar(start, target.field("time").type)))
        if end is not None:
            table = table.filter(pc.less(table["time"], pa.scalar(end, target.field("time").type)))
        if len(table):
            tables.append(table)
    table = pa.concat_tables(tables) if tables else target.empty_table()
    frame = table.to_pandas()
    return frame.sort_values("time", kind="stable").reset_index(drop=True)
