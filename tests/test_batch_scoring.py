"""Batch scoring: every source kind streams the same rows in bounded chunks; the flow scores them with the champion
(in-process and through a real `bentoml serve`), writes exactly one row per input row with the right columns and
types, logs a summary to MLflow and Prefect, and an interrupted run leaves no partial file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from flows.batch_scoring import batch_scoring
from tasks.common.text_sources import ScoringSourceError, iter_text_chunks
from tasks.contracts import ScoringSource
from tasks.scoring.batch_score import PARTIAL_MARK, score_to_parquet
from tests.fixtures import flow_run_and_artifacts, serve_from_repository

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def texts_frame(fixture_frame) -> pd.DataFrame:
    frame = fixture_frame.head(50).copy()
    frame["doc_id"] = [f"doc-{i}" for i in range(len(frame))]
    return frame


def _all_rows(config: ScoringSource, chunk_size: int) -> tuple[pd.DataFrame, list[int]]:
    chunks = list(iter_text_chunks(config, chunk_size))
    return pd.concat(chunks, ignore_index=True), [len(c) for c in chunks]


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl", "parquet"])
def test_table_files_stream_in_bounded_chunks_with_ids(texts_frame, tmp_path, suffix):
    path = tmp_path / f"new.{suffix}"
    {
        "csv": lambda: texts_frame.to_csv(path, index=False),
        "tsv": lambda: texts_frame.to_csv(path, sep="\t", index=False),
        "jsonl": lambda: texts_frame.to_json(path, orient="records", lines=True),
        "parquet": lambda: texts_frame.to_parquet(path, index=False),
    }[suffix]()
    rows, sizes = _all_rows(ScoringSource(source=str(path), id_column="doc_id"), chunk_size=16)
    assert sizes == [16, 16, 16, 2]
    assert rows["id"].tolist() == texts_frame["doc_id"].tolist()
    assert rows["text"].tolist() == texts_frame["text"].tolist()


def test_a_glob_and_a_text_folder(texts_frame, tmp_path):
    for part in range(2):
        texts_frame.iloc[part * 25 : (part + 1) * 25].to_csv(tmp_path / f"part-{part}.csv", index=False)
    rows, _ = _all_rows(ScoringSource(source=str(tmp_path / "part-*.csv")), chunk_size=10)
    assert len(rows) == 50 and rows["id"].iloc[25] == "part-1.csv:0"
    folder = tmp_path / "letters"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"letter number {i}")
    rows, _ = _all_rows(ScoringSource(source=str(folder)), chunk_size=2)
    assert rows["text"].tolist() == ["letter number 0", "letter number 1", "letter number 2"]
    assert list(iter_text_chunks(ScoringSource(source=str(tmp_path / "nothing-*.csv")), 10)) == []  # nothing new


def test_bad_sources_say_what_is_wrong(texts_frame, tmp_path):
    with pytest.raises(ScoringSourceError, match="does not exist"):
        list(iter_text_chunks(ScoringSource(source=str(tmp_path / "missing.csv")), 10))
    texts_frame.rename(columns={"text": "body"}).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(ScoringSourceError, match=r"no column 'text'.*Set text_column"):
        list(iter_text_chunks(ScoringSource(source=str(tmp_path / "other.csv")), 10))


def test_scoring_reads_files_with_the_ingest_reader_s_errors_and_replaces_stray_bytes(tmp_path):
    """One reader for both (tasks/common/tables.py): a gzip, a binary file and a broken JSONL line are named as
    ingest names them; a byte that is not UTF-8 in a production text is replaced, not a failed run."""
    import gzip

    (tmp_path / "texts.csv").write_bytes(gzip.compress(b"text\nhello\n"))
    with pytest.raises(ScoringSourceError, match=r"texts.csv is a gzip file; decompress it \(`gunzip texts.csv`\)"):
        list(iter_text_chunks(ScoringSource(source=str(tmp_path / "texts.csv")), 10))
    (tmp_path / "image.csv").write_bytes(b"text\n\x89PNG\x00\x00\x01")
    with pytest.raises(ScoringSourceError, match=r"image.csv is a binary file \(a NUL byte at byte 9\)"):
        list(iter_text_chunks(ScoringSource(source=str(tmp_path / "image.csv")), 10))
    (tmp_path / "broken.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": \n')
    with pytest.raises(ScoringSourceError, match=r"broken.jsonl line 3 is not valid JSON"):
        list(iter_text_chunks(ScoringSource(source=str(tmp_path / "broken.jsonl")), 2))
    (tmp_path / "latin.csv").write_bytes("text\ncaf\u00e9 cr\u00e8me\nplain\n".encode("cp1252"))
    rows, _ = _all_rows(ScoringSource(source=str(tmp_path / "latin.csv")), chunk_size=1)
    assert rows["text"].tolist() == ["caf\ufffd cr\ufffdme", "plain"]
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext\nwith a byte-order mark\n")
    rows, _ = _all_rows(ScoringSource(source=str(tmp_path / "bom.csv")), chunk_size=10)
    assert rows["text"].tolist() == ["with a byte-order mark"]


def test_a_failure_midway_leaves_no_partial_file(texts_frame, tmp_path):
    """The second file lacks the text column: the first was already scored, yet nothing is left behind."""
    texts_frame.to_csv(tmp_path / "a.csv", index=False)
    texts_frame.rename(columns={"text": "body"}).to_csv(tmp_path / "b.csv", index=False)
    output = tmp_path / "out" / "predictions.parquet"
    scorer = lambda texts: __import__("numpy").full((len(texts), 2), 0.5)  # noqa: E731 - scoring is not under test
    with pytest.raises(ScoringSourceError):
        score_to_parquet(
            ScoringSource(source=str(tmp_path / "*.csv")),
            scorer,
            ["x", "y"],
            "m/1",
            output,
            chunk_size=10,
            progress=False,
        )
    assert list((tmp_path / "out").iterdir()) == []


@pytest.fixture(scope="module")
def champion(session_champion):
    return session_champion["name"], session_champion["version"]


@pytest.mark.integration
def test_batch_scoring_flow_in_process(project_env, servers, champion, texts_frame, tmp_path):
    name, version = champion
    texts_frame.loc[3, "text"] = "   "  # a blank text is kept as a row without a label
    source = tmp_path / "incoming.jsonl"
    texts_frame.to_json(source, orient="records", lines=True)
    state = batch_scoring(
        ScoringSource(source=str(source), id_column="doc_id"),
        registered_model_name=name,
        chunk_size=16,
        return_state=True,
    )
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.rows == 50 and summary.blank_texts == 1 and summary.model_version == f"{name}/{version}+pytorch"
    assert summary.output_path.parent == project_env.resolve() / "predictions" / name

    table = pq.read_table(summary.output_path)
    labels = sorted(summary.label_counts)
    assert table.num_rows == 50 and table.num_rows == pq.ParquetFile(summary.output_path).metadata.num_rows
    names = table.column_names
    assert names[:3] == ["id", "label", "probability"] and names[-2:] == ["model_version", "scored_at"]
    assert sorted(names[3:-2]) == ["proba_food", "proba_sport", "proba_tech"]
    assert str(table.schema.field("probability").type) == "float" and "timestamp" in str(
        table.schema.field("scored_at").type
    )
    frame = table.to_pandas()
    assert frame["id"].tolist() == texts_frame["doc_id"].tolist()
    assert pd.isna(frame.loc[3, "label"]) and frame["label"].drop(index=3).notna().all()
    assert set(labels) <= {"food", "sport", "tech"}
    # The same answers as the registered model in MLflow.
    import mlflow.pyfunc

    scored = frame.drop(index=3)
    expected = (
        mlflow.pyfunc.load_model(f"models:/{name}@champion")
        .predict(texts_frame.drop(index=3)["text"].tolist())["label"]
        .tolist()
    )
    assert scored["label"].tolist() == expected

    # A summary in the monitoring experiment and a table artifact in Prefect.
    client = MlflowClient(servers["mlflow"])
    experiment = client.get_experiment_by_name("text-classifier-monitoring")
    (run,) = client.search_runs(
        [experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{state.state_details.flow_run_id}'"
    )
    assert run.data.metrics["rows"] == 50 and 0 < run.data.metrics["mean_probability"] <= 1
    assert sum(v for k, v in run.data.metrics.items() if k.startswith("label_share_")) == pytest.approx(1)
    _, artifacts = flow_run_and_artifacts(servers["prefect"], state.state_details.flow_run_id)
    assert any(a["key"] == "batch-scoring-summary" and a["type"] == "table" for a in artifacts)


@pytest.mark.integration
def test_batch_scoring_flow_through_the_bento_endpoint(
    project_env, servers, champion, tuned_fixture, texts_frame, tmp_path
):
    from tasks.promotion.bento import import_to_bento_store, stop_bento_server

    name, version = champion
    model_tag = import_to_bento_store(tuned_fixture.model_dir, "text-classifier", name, version)
    process, url = serve_from_repository({**os.environ, "TEXTCLF_BENTO_MODEL": model_tag}, tmp_path / "serve.log")
    try:
        source = tmp_path / "incoming.csv"
        texts_frame.to_csv(source, index=False)
        summary = batch_scoring(
            ScoringSource(source=str(source)),
            registered_model_name=name,
            mode="endpoint",
            endpoint_url=url,
            chunk_size=20,
        )
    finally:
        stop_bento_server(process.pid)
    assert summary.rows == 50 and summary.model_version == f"{name}/{version}+pytorch"
    frame = pd.read_parquet(summary.output_path)
    assert frame["id"].tolist() == [f"incoming.csv:{i}" for i in range(50)]
    from tasks.serving.classifier import TextClassifier

    assert (
        frame["label"].tolist()
        == TextClassifier(tuned_fixture.model_dir).predict(texts_frame["text"].tolist())["label"].tolist()
    )


@pytest.mark.integration
def test_a_killed_run_leaves_no_output_and_the_next_run_cleans_up(
    project_env, servers, champion, texts_frame, tmp_path
):
    """SIGKILL mid-run: no predictions file appears; the orphaned temporary is removed by the next run."""
    name, _ = champion
    big = pd.concat([texts_frame] * 400, ignore_index=True)  # 20,000 texts: long enough to kill mid-way
    source = tmp_path / "big.parquet"
    big.to_parquet(source, index=False)
    script = (
        "import sys; from flows.batch_scoring import batch_scoring; from tasks.scoring.batch_score import ScoringSource; "
        f"batch_scoring(ScoringSource(source={str(source)!r}), registered_model_name={name!r}, chunk_size=500)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    folder = project_env / "predictions" / name
    try:
        deadline = __import__("time").monotonic() + 300
        while not any(folder.glob(f".*{PARTIAL_MARK}*")):
            assert process.poll() is None, "the run ended before it could be interrupted"
            assert __import__("time").monotonic() < deadline
            __import__("time").sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not list(folder.glob("*.parquet"))  # nothing that looks like output
    small = tmp_path / "small.csv"
    texts_frame.to_csv(small, index=False)
    summary = batch_scoring(ScoringSource(source=str(small)), registered_model_name=name)
    assert [p.name for p in folder.iterdir()] == [summary.output_path.name]


@pytest.mark.integration
def test_a_scheduled_run_with_nothing_new_succeeds_and_writes_nothing(project_env, servers, champion, tmp_path):
    name, _ = champion
    summary = batch_scoring(ScoringSource(source=str(tmp_path / "incoming" / "*.jsonl")), registered_model_name=name)
    assert summary.rows == 0 and summary.output_path is None and summary.label_counts == {}
    assert not (project_env / "predictions" / name).exists() or not any(
        (project_env / "predictions" / name).glob("*.parquet")
    )


@pytest.mark.integration
def test_batch_scoring_flow_abstains_below_min_confidence(project_env, servers, champion, texts_frame, tmp_path):
    """min_confidence=1.0 answers every text 'unknown' (probabilities kept), logged as abstained_share; the champion's
    training run holds the suggested threshold (metric and version tag) and the accuracy-vs-coverage curve."""
    name, version = champion
    source = tmp_path / "incoming.csv"
    texts_frame.to_csv(source, index=False)
    state = batch_scoring(
        ScoringSource(source=str(source)), registered_model_name=name, min_confidence=1.0, return_state=True
    )
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.label_counts == {"unknown": 50} and summary.abstained_texts == 50 and summary.min_confidence == 1.0
    frame = pd.read_parquet(summary.output_path)
    assert (frame["label"] == "unknown").all() and frame["probability"].between(0, 1).all()
    client = MlflowClient(servers["mlflow"])
    experiment = client.get_experiment_by_name("text-classifier-monitoring")
    (run,) = client.search_runs(
        [experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{state.state_details.flow_run_id}'"
    )
    assert run.data.metrics["abstained_share"] == 1.0 and run.data.params["min_confidence"] == "1.0"
    registered = client.get_model_version(name, str(version))
    training_run = client.get_run(registered.run_id)
    suggested = training_run.data.metrics["suggested_min_confidence"]
    assert 0 < suggested <= 1 and registered.tags["suggested_min_confidence"] == f"{suggested:.4f}"
    assert "evaluation/accuracy_coverage.png" in {
        a.path for a in client.list_artifacts(registered.run_id, "evaluation")
    }
