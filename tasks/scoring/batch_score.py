"""Batch scoring: stream new texts from files (CSV, TSV, JSONL, Parquet, a folder of .txt files, or a glob of
those) or a hub dataset, score them with the champion, and write one Parquet file of predictions.

Memory stays bounded: texts are read in chunks (pandas/pyarrow readers, streaming for the hub) and each scored
chunk is appended to the Parquet file as a row group. The file is written under a temporary name and renamed
when complete, so an interrupted run leaves no partial output (its leftover temporary is removed next time)."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from prefect import task
from pydantic import BaseModel, ConfigDict

from tasks.common.processes import process_alive
from tasks.common.text_sources import count_rows, iter_text_chunks
from tasks.contracts import ScoringSource
from tasks.serving.abstention import UNKNOWN_LABEL, abstains, check_label_names, check_min_confidence
from tasks.serving.http_guard import MAX_REQUEST_CHARS, MAX_TEXT_CHARS
from tasks.serving.windows import has_visible_character

if TYPE_CHECKING:
    import pyarrow as pa

PARTIAL_MARK = ".partial-"
ENDPOINT_RETRIES = 5  # 503 "at capacity" answers retried after their Retry-After


class ScoringSummary(BaseModel):
    """What was scored, where the predictions are, and how they are distributed."""

    model_config = ConfigDict(frozen=True)

    output_path: Path | None  # None when there was nothing to score
    rows: int
    blank_texts: int
    model_version: str
    label_counts: dict[str, int]
    mean_probability: float | None
    low_confidence_share: float | None
    seconds: float
    min_confidence: float | None = None  # below it a text's label is "unknown" (None: never)
    abstained_texts: int = 0  # texts labelled "unknown" (counted in label_counts too)

    @property
    def texts_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


Scorer = Callable[[list[str]], np.ndarray]  # texts -> probabilities (one row per text, columns = label_names)
# The classes each scored text is answered with, from the probabilities the scorer just returned: a multi-label
# model's classes at their thresholds (the `labels` column); None for a single-label model (its `label` says it).
LabelSets = Callable[[np.ndarray], list[list[str]]]


def in_process_scorer(model_dir: Path, batch_size: int = 64) -> tuple[Scorer, list[str], LabelSets | None]:
    from tasks.serving.classifier import TextClassifier

    classifier = TextClassifier(model_dir)
    sets = classifier.label_sets if classifier.multi_label else None
    return (lambda texts: classifier.predict_proba(texts, batch_size)), classifier.label_names, sets


def endpoint_scorer(
    url: str, token: str | None = None, batch_size: int = 64
) -> tuple[Scorer, list[str], str, LabelSets]:
    """Score through the Bento's `/classify` in requests of `batch_size` texts (its documented limit is 64). The
    label sets are the classes the server answered each text with (`labels`: a multi-label model's thresholds)."""
    import httpx

    client = httpx.Client(
        base_url=url.rstrip("/"), timeout=120, headers={"Authorization": f"Bearer {token}"} if token else {}
    )

    def classify(texts: list[str]) -> list[dict[str, Any]]:
        for attempt in range(ENDPOINT_RETRIES + 1):
            response = client.post("/classify", json={"texts": texts})
            if response.status_code != 503 or attempt == ENDPOINT_RETRIES:
                break
            time.sleep(float(response.headers.get("retry-after", "1") or 1))  # the server is at capacity
        if response.status_code != 200:
            raise RuntimeError(f"{url}/classify answered {response.status_code}: {response.text[:500]}")
        answers: list[dict[str, Any]] = response.json()
        return answers

    def requests_of(texts: list[str]) -> Iterator[list[str]]:
        """At most `batch_size` texts and MAX_REQUEST_CHARS characters a request (the service's limits)."""
        batch: list[str] = []
        chars = 0
        for text in (t[:MAX_TEXT_CHARS] for t in texts):  # cut to the service's limit: the model reads far fewer tokens
            if batch and (len(batch) == batch_size or chars + len(text) > MAX_REQUEST_CHARS):
                yield batch
                batch, chars = [], 0
            batch.append(text)
            chars += len(text)
        if batch:
            yield batch

    probe = classify(["probe"])[0]  # the label set and model version come from the service itself
    labels, version = list(probe["probabilities"]), probe["model_version"]

    answered: list[list[str]] = []

    def score(texts: list[str]) -> npt.NDArray[np.float32]:
        rows: list[list[float]] = []
        answered.clear()
        for request in requests_of(texts):
            for answer in classify(request):
                rows.append([answer["probabilities"][label] for label in labels])
                answered.append([str(c) for c in answer.get("labels", [answer["label"]])])
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), len(labels))

    def label_sets(probabilities: np.ndarray) -> list[list[str]]:
        return list(answered)  # of the texts `score` was just called with

    return score, labels, version, label_sets


def _prediction_table(
    chunk: pd.DataFrame,
    probabilities: np.ndarray,
    blank: np.ndarray,
    labels: list[str],
    model_version: str,
    scored_at: pd.Timestamp,
    min_confidence: float | None = None,
    label_sets: list[list[str]] | None = None,
) -> pa.Table:
    import pyarrow as pa

    full = np.full((len(chunk), len(labels)), np.nan, dtype=np.float32)
    full[~blank] = probabilities
    best = np.where(blank, -1, np.nan_to_num(full, nan=-1).argmax(axis=1))
    unknown = abstains(np.nan_to_num(full, nan=1).max(axis=1), min_confidence) & ~blank
    columns = {
        "id": pa.array(chunk["id"].astype(str).to_numpy(), pa.string()),
        "label": pa.array(
            [None if b < 0 else UNKNOWN_LABEL if u else labels[b] for b, u in zip(best, unknown)], pa.string()
        ),
        "probability": pa.array([None if b < 0 else float(full[i, b]) for i, b in enumerate(best)], pa.float32()),
        **({} if label_sets is None else {"labels": _labels_column(label_sets, blank)}),
        **{f"proba_{label}": pa.array(full[:, j], pa.float32(), mask=blank) for j, label in enumerate(labels)},
        "model_version": pa.array([model_version] * len(chunk), pa.string()),
        "scored_at": pa.array([scored_at] * len(chunk), pa.timestamp("us", tz="UTC")),
    }
    return pa.table(columns)


def _labels_column(label_sets: list[list[str]], blank: np.ndarray) -> pa.Array:
    """One list of classes per row (null for a blank text), in the rows' order."""
    import pyarrow as pa

    answers = iter(label_sets)
    return pa.array([None if b else next(answers) for b in blank], pa.list_(pa.string()))


def score_to_parquet(
    config: ScoringSource,
    scorer: Scorer,
    labels: list[str],
    model_version: str,
    output_path: Path,
    chunk_size: int = 10_000,
    low_confidence_threshold: float = 0.5,
    progress: bool = True,
    min_confidence: float | None = None,
    label_sets: LabelSets | None = None,
    count_label_sets: bool = True,
) -> ScoringSummary:
    """Stream, score and append chunk by chunk; rename the finished file into place. Blank texts are kept as
    rows with no label (so output rows always equal input rows) and counted. With `min_confidence`, a text whose
    top-class probability is below it gets the label "unknown" (its probability columns are kept). With
    `label_sets` a `labels` column holds each text's classes, and (with `count_label_sets`, a multi-label model)
    `label_counts` counts the texts answered with each class."""
    min_confidence = check_min_confidence(min_confidence)
    check_label_names(labels, min_confidence)
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    output_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in output_path.parent.glob(f".*{PARTIAL_MARK}*"):
        if not process_alive(stale.name.rsplit(PARTIAL_MARK, 1)[1]):
            stale.unlink(missing_ok=True)  # left by an interrupted run
    partial = output_path.parent / f".{output_path.name}{PARTIAL_MARK}{os.getpid()}"
    started, rows, blanks = time.perf_counter(), 0, 0
    counts: Counter[str] = Counter()
    confidence_sum, low_confidence, abstained = 0.0, 0, 0
    writer = None
    bar = tqdm(total=count_rows(config), unit="text", desc="scoring", disable=not progress)
    try:
        for chunk in iter_text_chunks(config, chunk_size):
            texts = chunk["text"].astype(object).where(chunk["text"].notna(), "").astype(str).tolist()
            blank = np.array([not has_visible_character(t) for t in texts], dtype=bool)
            kept = [t for t, b in zip(texts, blank) if not b]
            probabilities = scorer(kept) if kept else np.zeros((0, len(labels)), dtype=np.float32)
            sets = None if label_sets is None else label_sets(probabilities) if kept else []
            table = _prediction_table(
                chunk, probabilities, blank, labels, model_version, pd.Timestamp.now(tz="UTC"), min_confidence, sets
            )
            if writer is None:
                writer = pq.ParquetWriter(partial, table.schema)
            writer.write_table(table)
            best = probabilities.max(axis=1) if len(kept) else np.zeros(0)
            if kept and sets is not None and count_label_sets:
                counts.update(c for row in sets for c in row)
            elif kept:
                unknown = abstains(best, min_confidence)
                counts.update(UNKNOWN_LABEL if u else labels[i] for i, u in zip(probabilities.argmax(axis=1), unknown))
                abstained += int(unknown.sum())
            confidence_sum += float(best.sum())
            low_confidence += int((best < low_confidence_threshold).sum())
            rows, blanks = rows + len(chunk), blanks + int(blank.sum())
            bar.update(len(chunk))
        if writer is not None:
            writer.close()
            writer = None
            os.replace(partial, output_path)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        partial.unlink(missing_ok=True)
    scored = rows - blanks
    return ScoringSummary(
        output_path=output_path if rows else None,
        rows=rows,
        blank_texts=blanks,
        model_version=model_version,
        label_counts=dict(sorted(counts.items())),
        mean_probability=confidence_sum / scored if scored else None,
        low_confidence_share=low_confidence / scored if scored else None,
        seconds=round(time.perf_counter() - started, 3),
        min_confidence=min_confidence,
        abstained_texts=abstained,
    )


def score_in_process(
    config: ScoringSource,
    model_dir: Path,
    model_version: str,
    output_path: Path,
    chunk_size: int = 10_000,
    low_confidence_threshold: float = 0.5,
    min_confidence: float | None = None,
) -> ScoringSummary:
    """Score with the model folder in this process. `model_version` (`<name>/<version>`) is recorded as the service
    answers it, with the runtime that answered: `<name>/<version>+<runtime>` (the folder's, tasks/serving/onnx_runtime.py)."""
    from tasks.serving.onnx_runtime import folder_runtime

    if "+" not in model_version:
        model_version = f"{model_version}+{folder_runtime(model_dir)}"
    scorer, labels, sets = in_process_scorer(model_dir)
    return score_to_parquet(
        config,
        scorer,
        labels,
        model_version,
        output_path,
        chunk_size,
        low_confidence_threshold,
        min_confidence=min_confidence,
        label_sets=sets,
    )


def score_through_endpoint(
    config: ScoringSource,
    url: str,
    output_path: Path,
    chunk_size: int = 10_000,
    low_confidence_threshold: float = 0.5,
    token: str | None = None,
    min_confidence: float | None = None,
) -> ScoringSummary:
    """Labels come from the answered probabilities with this `min_confidence`, whatever the server's own setting;
    the `labels` column holds the classes the server answered (a multi-label model's: at its thresholds)."""
    scorer, labels, version, sets = endpoint_scorer(url, token)
    return score_to_parquet(
        config,
        scorer,
        labels,
        version,
        output_path,
        chunk_size,
        low_confidence_threshold,
        min_confidence=min_confidence,
        label_sets=sets,
        count_label_sets=False,  # counted by `label`, with this call's min_confidence (the docstring above)
    )


score_in_process_task = task(name="score-in-process")(score_in_process)
score_through_endpoint_task = task(name="score-through-endpoint")(score_through_endpoint)
