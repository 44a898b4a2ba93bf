"""The two sides the drift monitor compares, each written as a Parquet window (columns text, label, probability,
length_chars) under the monitoring run's folder: the reference (the champion's held-out test split) and the
current window, either texts from a source (files, a glob, a folder or a hub dataset) that the champion scores
here, or the service's request log over a time range."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict

from tasks.common.atomic import atomic_file
from tasks.common.text import clean_text
from tasks.common.text_sources import iter_text_chunks
from tasks.contracts import ScoringSource
from tasks.monitoring.features import label_lists, predict_labels, window_label
from tasks.serving.request_log import COLUMNS as REQUEST_LOG_COLUMNS  # the writer's columns, declared once

WINDOW_COLUMNS = ("text", "label", "probability", "length_chars")  # and `labels` for a multi-label champion
RAW_TEXT_NOTE = (
    "The request log holds no raw texts for this window (raw-text logging is off), so embedding "
    "drift and unknown-token drift were not measured. Turn on raw-text logging in the service "
    "(TEXTCLF_REQUEST_LOG_TEXT=true) to monitor them, or point the monitor at the texts themselves "
    "(`source`)."
)


class Window(BaseModel):
    """A reference to one side of the comparison, written as Parquet with columns text (null when unknown),
    label, probability and length_chars."""

    model_config = ConfigDict(frozen=True)

    path: Path
    rows: int
    texts: int  # rows whose text is known
    description: str
    model_version: str
    duplicates_dropped: int = 0
    rows_seen: int = 0
    notes: tuple[str, ...] = ()
    multi_label: bool = False  # the champion is multi-label: the frame has `labels`, compared per class

    def frame(self) -> pd.DataFrame:
        return pd.read_parquet(self.path)


def _write_parquet_atomically(frame: pd.DataFrame, path: Path) -> None:
    with atomic_file(path) as temporary:
        frame.to_parquet(temporary, index=False)


def _window_frame(
    text: ArrayLike,
    label: ArrayLike,
    probability: ArrayLike,
    length: ArrayLike,
    label_sets: list[list[str]] | None = None,
) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "text": pd.Series(text, dtype=object),
            "label": pd.Series(label, dtype=object).astype(str),
            "probability": pd.Series(probability, dtype=float),
            "length_chars": pd.Series(length, dtype="Int64"),  # null where the request log could not read the text
        }
    )
    if label_sets is not None:  # a multi-label champion: the classes of each answer, compared per class
        frame["labels"] = pd.Series([list(map(str, s)) for s in label_sets], dtype=object)
    return frame


def reference_from_test_split(test_split: Path, model_version: str, target: Path) -> Window:
    """The champion's held-out test split (text, label, predicted, probability) as the reference window: what
    the champion predicted, and how confidently, on in-distribution texts it was not trained on."""
    frame = pd.read_parquet(test_split)
    missing = {"text", "predicted", "probability"} - set(frame.columns)
    if missing:
        raise ValueError(
            f"{test_split} lacks column(s) {', '.join(sorted(missing))}: it is not the evaluation stage's "
            f"test_predictions.parquet. Register models with the training flow, which writes it."
        )
    texts = frame["text"].astype(str)
    sets = label_lists(frame["predicted"])
    window = _window_frame(
        texts.to_numpy(),
        [window_label(s) for s in sets] if sets is not None else frame["predicted"].astype(str).to_numpy(),
        frame["probability"].to_numpy(),
        texts.str.len().to_numpy(),
        sets,
    )
    _write_parquet_atomically(window, target)
    return Window(
        path=target,
        rows=len(window),
        texts=len(window),
        rows_seen=len(frame),
        model_version=model_version,
        description=f"test split of {model_version} ({len(window)} held-out texts)",
        multi_label=sets is not None,
    )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def collect_texts(
    source: ScoringSource, max_texts: int, seed: int = 0, chunk_size: int = 10_000
) -> tuple[list[str], int, int]:
    """The source's texts, normalised like the training data (tasks.common.text.clean_text), blank ones and
    exact duplicates dropped (the reference has none either), and at most `max_texts` of them: a uniform random
    sample when there are more. Returns (texts, texts read, duplicates dropped)."""
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    kept = pd.DataFrame({"key": pd.Series(dtype=float), "text": pd.Series(dtype=object)})
    read = duplicates = 0
    for chunk in iter_text_chunks(source, chunk_size):
        texts = [clean_text(str(t)) for t in chunk["text"] if isinstance(t, str)]
        read += len(chunk)
        fresh = []
        for text in texts:
            if not text:
                continue
            digest = _digest(text)
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            fresh.append(text)
        if fresh:  # random keys, keep the smallest: a uniform sample without replacement, in bounded memory
            kept = pd.concat([kept, pd.DataFrame({"key": rng.random(len(fresh)), "text": fresh})], ignore_index=True)
            if len(kept) > max_texts:
                kept = kept.nsmallest(max_texts, "key")
    return kept.sort_index()["text"].tolist(), read, duplicates


def window_from_source(
    source: ScoringSource, model_dir: Path, model_version: str, target: Path, max_texts: int = 10_000, seed: int = 0
) -> Window:
    """Texts from files (or a hub dataset), scored here by the champion: labels, confidences and the texts."""
    texts, read, duplicates = collect_texts(source, max_texts, seed)
    notes = []
    if read - duplicates > max_texts:
        notes.append(f"{read - duplicates} distinct texts in the source; a uniform sample of {max_texts} was compared.")
    labels, confidence, sets = predict_labels(model_dir, texts)
    frame = _window_frame(texts, labels, confidence, [len(t) for t in texts], sets)
    _write_parquet_atomically(frame, target)
    return Window(
        path=target,
        rows=len(frame),
        texts=len(frame),
        rows_seen=read,
        duplicates_dropped=duplicates,
        model_version=model_version,
        notes=tuple(notes),
        description=f"{source.source}: {read} texts read, {len(frame)} distinct compared",
        multi_label=sets is not None,
    )


def window_from_request_log_frame(
    log: pd.DataFrame,
    model_version: str,
    target: Path,
    max_texts: int = 10_000,
    seed: int = 0,
    description: str = "request log",
    multi_label: bool = False,
) -> Window:
    """Requests of the log (columns of `tasks.serving.request_log.read_request_log`) served by `model_version`,
    deduplicated by text hash, as a window. Texts are kept where the log has them (raw-text logging on)."""
    missing = {"label", "probability", "length_chars", "model_version"} - set(log.columns)
    if missing:
        raise ValueError(
            f"The request log lacks column(s) {', '.join(sorted(missing))}; expected the columns "
            f"{', '.join(REQUEST_LOG_COLUMNS)}."
        )
    notes = []
    rows = len(log)
    # The service answers `<name>/<version>+<runtime>` (the runtime that answered, tasks/serving/onnx_runtime.py): every
    # runtime of the version counts as that version (older logs have no `+<runtime>`).
    ours = log["model_version"].astype(str).str.split("+", n=1).str[0] == model_version.split("+", 1)[0]
    served = log[ours]
    if len(served) < rows:
        others = log.loc[~ours, "model_version"].astype(str)
        notes.append(
            f"{rows - len(served)} of {rows} requests were served by other model versions "
            f"({', '.join(sorted(others.unique())[:5])}) and are not compared with {model_version}'s reference."
        )
    served = served[served["label"].notna() & served["probability"].notna()]
    before = len(served)
    if "text_sha256" in served.columns:  # the same text asked again (retries, popular texts) counts once
        served = served[served["text_sha256"].isna() | ~served["text_sha256"].duplicated()]
    duplicates = before - len(served)
    if len(served) > max_texts:
        served = served.sample(n=max_texts, random_state=seed).sort_index()
        notes.append(
            f"{before - duplicates} distinct requests in the window; a uniform sample of {max_texts} was compared."
        )
    text = served["text"] if "text" in served.columns else pd.Series([None] * len(served), index=served.index)
    text = text.where(text.notna(), None)
    # The top class, not the answered label: where the server abstained the label is 'unknown', which the reference
    # (the champion's predictions on its test split) never holds. Logs written before `predicted_label` have the label.
    label = served["label"]
    if "predicted_label" in served.columns:
        label = served["predicted_label"].where(served["predicted_label"].notna(), label)
    # A multi-label champion's answers: every answered class (a single-label answer's `labels` is [label]).
    sets = label_lists(served["labels"]) if multi_label and "labels" in served.columns else None
    frame = _window_frame(
        text.to_numpy(),
        [window_label(s) for s in sets] if sets is not None else label.to_numpy(),
        served["probability"].to_numpy(),
        served["length_chars"].to_numpy(),
        sets,
    )
    known = int(frame["text"].notna().sum())
    if known < len(frame):
        notes.append(
            RAW_TEXT_NOTE
            if known == 0
            else f"Only {known} of {len(frame)} requests have their raw text logged: embedding and unknown-token "
            f"drift use those only."
        )
    notes.append(
        "Request-log lengths are of the raw request texts; the reference lengths are of the training "
        "data's normalised texts (whitespace runs collapsed), which can be slightly shorter."
    )
    _write_parquet_atomically(frame, target)
    return Window(
        path=target,
        rows=len(frame),
        texts=known,
        rows_seen=rows,
        duplicates_dropped=duplicates,
        model_version=model_version,
        notes=tuple(notes),
        description=f"{description}: {rows} requests, {len(frame)} distinct served by {model_version}",
        multi_label=sets is not None,
    )


def default_request_log_dir() -> Path:
    """Where the service writes its request log by default: TEXTCLF_REQUEST_LOG_DIR, else
    <TEXTCLF_HOME or .textclf>/request-log (the service's own rule, tasks.serving.request_log.RequestLogSettings)."""
    from tasks.serving.request_log import RequestLogSettings

    return RequestLogSettings.from_env().resolved_directory()


def window_from_request_log(
    log_dir: str | Path | None,
    since: dt.datetime,
    until: dt.datetime,
    model_version: str,
    target: Path,
    max_texts: int = 10_000,
    seed: int = 0,
    multi_label: bool = False,
) -> Window:
    """The service's request log between `since` and `until` (read with tasks.serving.request_log.read_request_log);
    `log_dir` None: the folder the service writes to by default. `multi_label`: the champion is multi-label (the
    reference window says so), so each row's answered classes (`labels`) are compared per class."""
    from tasks.serving.request_log import read_request_log

    log_dir = Path(log_dir) if log_dir is not None else default_request_log_dir()
    if not log_dir.is_dir():
        raise ValueError(
            f"Request log folder {log_dir} does not exist: set request_log_dir (or "
            f"TEXTCLF_REQUEST_LOG_DIR) to the folder the service writes its request log to, or give "
            f"`source` to monitor a set of texts instead."
        )
    log = read_request_log(log_dir, since=since, until=until)
    return window_from_request_log_frame(
        log,
        model_version,
        target,
        max_texts,
        seed,
        description=f"request log {log_dir} from {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC",
        multi_label=multi_label,
    )


def since_until(window_hours: float, until: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
    """The last `window_hours` hours up to `until` (default now), both timezone-aware (naive means UTC)."""
    end = until or dt.datetime.now(dt.UTC)
    if end.tzinfo is None:
        end = end.replace(tzinfo=dt.UTC)
    return end - dt.timedelta(hours=window_hours), end
