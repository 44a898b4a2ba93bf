"""Multi-label classification (problem_type multi_label): label lists read from delimited strings, lists and list
literals; an iterative-stratified split; sigmoid outputs with per-class thresholds chosen on validation; multi-label
metrics against a one-vs-rest TF-IDF baseline; the registered model, the promotion gate, a real `bentoml serve`
answering every class above its threshold, its request log, batch scoring and per-label drift."""

from __future__ import annotations

import json
import os

import httpx
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from tasks.contracts import DatasetValidationError
from tasks.training.ingest import IngestConfig, ingest, label_set
from tests.fixtures import TOPICS, make_multi_label_texts, serve_from_repository


def _csv(tmp_path, frame, delimiter="|"):
    path = tmp_path / "multi.csv"
    frame.assign(labels=frame["labels"].map(delimiter.join)).to_csv(path, index=False)
    return path


@pytest.mark.unit
def test_label_cells_are_read_as_lists_delimited_strings_or_list_literals():
    assert label_set(["b", "a", "a"], None) == ["a", "b"]
    assert label_set(np.array(["x"]), None) == ["x"]
    assert label_set("sport | tech|", "|") == ["sport", "tech"]
    assert label_set('["tech", "sport"]', None) == ["sport", "tech"]  # JSON, as exported by many tools
    assert label_set("['tech', 'sport']", None) == ["sport", "tech"]  # what pandas writes for a list column
    assert label_set("", ",") == [] and label_set(None, None) == [] and label_set(float("nan"), None) == []
    with pytest.raises(ValueError, match="no label delimiter"):
        label_set("sport,tech", None)


@pytest.mark.unit
def test_multi_label_ingest_names_the_option_for_strings_and_for_lists_without_it(tmp_path):
    frame = make_multi_label_texts(per_combination=6)
    path = _csv(tmp_path, frame, ",")
    with pytest.raises(DatasetValidationError, match=r"--label-delimiter.*dataset\.label_delimiter"):
        ingest(IngestConfig(source=str(path), label_column="labels", problem_type="multi_label"), tmp_path / "s")
    jsonl = tmp_path / "multi.jsonl"
    frame.to_json(jsonl, orient="records", lines=True)
    with pytest.raises(DatasetValidationError, match=r"hold lists.*--problem-type"):
        ingest(IngestConfig(source=str(jsonl), label_column="labels"), tmp_path / "s")
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").iterdir())  # nothing half-written

    from_lists = ingest(
        IngestConfig(source=str(jsonl), label_column="labels", problem_type="multi_label"), tmp_path / "s"
    )
    from_strings = ingest(
        IngestConfig(source=str(path), label_column="labels", problem_type="multi_label", label_delimiter=","),
        tmp_path / "s",
    )
    # The same label lists, however they were written: the same dataset version.
    assert from_lists.version == from_strings.version and from_lists.problem_type == "multi_label"
    # Each class counts the texts that carry it (one or two topics each, and some texts with none).
    assert from_lists.label_counts == {topic: 6 * 3 for topic in sorted(TOPICS)}
    # The same cells read as one label each are another dataset (and a blank one is a missing label there).
    labelled = frame[frame["labels"].map(len) > 0]
    single = ingest(IngestConfig(source=str(_csv(tmp_path, labelled, ",")), label_column="labels"), tmp_path / "one")
    again = ingest(
        IngestConfig(
            source=str(_csv(tmp_path, labelled, ",")),
            label_column="labels",
            problem_type="multi_label",
            label_delimiter=",",
        ),
        tmp_path / "one",
    )
    assert single.version != again.version and "food,sport" in single.label_counts


@pytest.mark.unit
def test_one_indicator_column_per_class_reads_as_label_lists(tmp_path):
    """The layout of Jigsaw-style data: a 0/1 column per class."""
    frame = make_multi_label_texts(per_combination=6)
    table = pd.DataFrame({"comment": frame["text"]})
    for topic in sorted(TOPICS):
        table[topic] = frame["labels"].map(lambda labels, topic=topic: int(topic in labels))
    table["sport"] = table["sport"].map({1: "true", 0: "false"})  # true/false work too
    path = tmp_path / "indicators.csv"
    table.to_csv(path, index=False)
    config = IngestConfig(
        source=str(path), text_column="comment", label_columns="food, sport,tech", problem_type="multi_label"
    )
    snapshot = ingest(config, tmp_path / "s")
    stored = pd.read_parquet(snapshot.path)
    assert [list(labels) for labels in stored["label"]] == frame["labels"].tolist()
    assert snapshot.label_counts == {topic: 18 for topic in sorted(TOPICS)}

    table.loc[3, "tech"] = 2
    table.to_csv(path, index=False)
    with pytest.raises(DatasetValidationError, match=r"indicator column 'tech' holds '2' at row\(s\) 4.*0 or 1"):
        ingest(config, tmp_path / "s")
    with pytest.raises(DatasetValidationError, match=r"no column 'toxic'.*--label-columns"):
        ingest(config.model_copy(update={"label_columns": "food,toxic"}), tmp_path / "s")
    with pytest.raises(DatasetValidationError, match=r"--problem-type"):
        ingest(config.model_copy(update={"problem_type": "single_label"}), tmp_path / "s")


@pytest.mark.unit
def test_a_datasets_sequence_of_class_ids_reads_as_label_names(tmp_path):
    """The layout of multi-label Hugging Face datasets (go_emotions: `labels`, a sequence of ClassLabel ids), from a
    local datasets folder (no network): the ids become the class names."""
    import datasets

    frame = make_multi_label_texts(per_combination=6)
    names = sorted(TOPICS)
    features = datasets.Features(
        {"text": datasets.Value("string"), "labels": datasets.Sequence(datasets.ClassLabel(names=names))}
    )
    ids = [[names.index(label) for label in labels] for labels in frame["labels"]]
    (tmp_path / "hub").mkdir()
    datasets.Dataset.from_dict({"text": frame["text"].tolist(), "labels": ids}, features=features).to_parquet(
        str(tmp_path / "hub" / "train.parquet")
    )
    config = IngestConfig(source=f"hub:{tmp_path / 'hub'}", label_column="labels", problem_type="multi_label")
    snapshot = ingest(config, tmp_path / "s")
    assert [list(labels) for labels in pd.read_parquet(snapshot.path)["label"]] == frame["labels"].tolist()


@pytest.mark.unit
def test_thresholds_are_chosen_on_a_coarse_grid_per_class_where_it_has_enough_positives():
    from tasks.training.fine_tune import choose_thresholds

    probabilities = np.array([[0.9, 0.30], [0.8, 0.25], [0.5, 0.32], [0.1, 0.1]])
    targets = np.array([[1, 1], [1, 1], [0, 0], [0, 0]])
    # Too few positives for a class's own: the one shared threshold, the best micro-F1 over every text-class cell.
    assert choose_thresholds(probabilities, targets, ["a", "b"]) == {"a": 0.25, "b": 0.25}
    own = choose_thresholds(probabilities, targets, ["a", "b"], min_positives=2)
    assert own["a"] == 0.55  # 0.55 to 0.8 separate a (its negative is at 0.5): the one nearest the shared 0.25
    assert own["b"] == 0.25  # b's positives sit low: its threshold follows them
    assert choose_thresholds(probabilities, np.zeros((4, 2)), ["a", "b"]) == {"a": 0.5, "b": 0.5}


@pytest.mark.unit
def test_label_set_scores_and_the_per_label_rate_drift_test():
    from tasks.monitoring.statistics import label_rates_test
    from tasks.promotion.optimize_runtime import RuntimeGateConfig, judge_variant
    from tasks.promotion.scores import score_answers

    truth = [["a"], ["a", "b"], [], ["b"]]
    scores = score_answers(truth, [["a"], ["a"], [], ["b"]], ["a", "b"])
    assert scores.per_class_f1 == {"a": 1.0, "b": pytest.approx(2 / 3)} and scores.accuracy == 0.75
    _, _, agreement, *_ = judge_variant(
        "onnx-int8", [["b", "a"], ["a"]], [["a", "b"], ["a"]], truth[:2], ["a", "b"], 1.0, RuntimeGateConfig()
    )
    assert agreement == 1.0  # the same classes in another order agree

    same = [["a"]] * 50 + [["b"]] * 50
    p, change, *_ = label_rates_test(same, list(reversed(same)))
    assert p == 1.0 and change == 0.0
    p, change, name, before, after = label_rates_test(same, [["a", "b"]] * 60)
    assert p < 1e-6 and name == "a" and before == 0.5 and after == 1.0 and change == 0.5


@pytest.mark.e2e
def test_multi_label_from_training_flow_to_served_answers_batch_scores_and_drift(
    project_env, servers, tiny_model_dir, tmp_path, monkeypatch
):
    from flows.training import DatasetParameters, ModelParameters, TrainingParameters, training
    from tasks.contracts import ScoringSource
    from tasks.monitoring.drift import detect_drift
    from tasks.monitoring.statistics import DriftThresholds
    from tasks.monitoring.windows import reference_from_test_split, window_from_request_log
    from tasks.promotion.bento import import_to_bento_store, stop_bento_server
    from tasks.promotion.gate import GateConfig, decide, score_versions
    from tasks.registry import download_model_version
    from tasks.scoring.batch_score import score_in_process
    from tasks.serving.classifier import TextClassifier

    frame = make_multi_label_texts(per_combination=40)
    name = "multi-topics"
    state = training(
        DatasetParameters(
            source=str(_csv(tmp_path, frame)), label_column="labels", problem_type="multi_label", label_delimiter="|"
        ),
        ModelParameters(base_model=str(tiny_model_dir), max_length=32),
        TrainingParameters(epochs=20, batch_size=8, learning_rate=3e-3, early_stopping_patience=0),
        registered_model_name=name,
        return_state=True,
    )
    assert state.is_completed(), state.message
    version = state.result()
    client = MlflowClient(servers["mlflow"])
    run = client.get_run(version.run_id)
    metrics = run.data.metrics
    for key in (
        "test_micro_f1",
        "test_macro_f1",
        "test_subset_accuracy",
        "test_roc_auc_macro",
        "test_hamming_loss",
        "baseline_micro_f1",
        "baseline_hamming_loss",
        "test_threshold_food",
        "test_f1_tech",
        "validation/micro_f1",
    ):
        assert key in metrics, key
    # It learned which topics a text mentions (a constant answer scores macro-F1 0.5 at best here).
    assert metrics["test_macro_f1"] >= 0.8 and metrics["test_hamming_loss"] <= 0.2, metrics
    assert run.data.tags["problem_type"] == "multi_label"
    report = client.download_artifacts(version.run_id, "evaluation/report.md", str(tmp_path))
    assert "one-vs-rest" in open(report).read()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers["mlflow"])
    texts = ["match goal pasta sauce the", "the a new very", "software cloud with"]
    predicted = mlflow.pyfunc.load_model(version.alias_uri).predict(texts)
    downloaded = download_model_version(servers["mlflow"], name, version.version, tmp_path / "download")
    classifier = TextClassifier(downloaded.model_dir)
    settings = json.loads((downloaded.model_dir / "textclf.json").read_text())
    assert settings["problem_type"] == "multi_label" and set(settings["thresholds"]) == set(TOPICS)
    expected = classifier.label_sets(classifier.predict_proba(texts))
    assert [list(labels) for labels in predicted["labels"]] == expected
    # The registered signature declares the answer's classes a list of strings, whatever the examples held.
    from mlflow.models import get_model_info

    outputs = get_model_info(version.alias_uri).signature.outputs.to_dict()
    assert {"type": "array", "items": {"type": "string"}, "name": "labels", "required": True} in outputs

    # The promotion gate scores label sets: its macro-F1 is the evaluation's, and a first champion is promoted.
    test_split = client.download_artifacts(version.run_id, "evaluation/test_predictions.parquet", str(tmp_path))
    scores = score_versions(servers["mlflow"], name, [version.version], pd.read_parquet(test_split))[version.version]
    assert scores.macro_f1 == pytest.approx(metrics["test_macro_f1"], abs=1e-6)
    assert decide(scores, None, GateConfig(), version.version, None).promote
    # The runtime gate compares the label sets of the ONNX variants with PyTorch's.
    from tasks.promotion.optimize_runtime import RuntimeGateConfig, export_variants, gate_runtimes

    variants = export_variants(downloaded.model_dir, tmp_path / "variants")
    gate = gate_runtimes(downloaded.model_dir, variants, test_split, RuntimeGateConfig(), tmp_path / "gate")
    assert gate.score("pytorch").macro_f1 == pytest.approx(metrics["test_macro_f1"], abs=1e-6)
    fp32 = gate.score("onnx-fp32")
    assert fp32.passed and fp32.label_agreement == 1.0, fp32.reason

    # A real `bentoml serve` answers every class at or above its threshold, and logs the answers' classes.
    log_dir = tmp_path / "request-log"
    model_tag = import_to_bento_store(downloaded.model_dir, "text-classifier", name, version.version)
    env = {**os.environ, "TEXTCLF_BENTO_MODEL": model_tag, "TEXTCLF_REQUEST_LOG_DIR": str(log_dir)}
    env["TEXTCLF_REQUEST_LOG_FLUSH_SECONDS"] = "0.2"
    food_texts = [t for t, labels in zip(frame["text"], frame["labels"]) if labels == ["food"]]
    process, url = serve_from_repository(env, tmp_path / "serve.log")
    try:
        answers = httpx.post(f"{url}/classify", json={"texts": texts}, timeout=60).json()
        for start in range(0, len(food_texts), 20):
            served = httpx.post(f"{url}/classify", json={"texts": food_texts[start : start + 20]}, timeout=60)
            assert served.status_code == 200, served.text
        docs = httpx.get(f"{url}/docs.json", timeout=30).json()
    finally:
        stop_bento_server(process.pid)
    assert [answer["labels"] for answer in answers] == expected
    for answer in answers:
        assert answer["label"] == max(answer["probabilities"], key=answer["probabilities"].get)
    assert "labels" in json.dumps(docs["components"]["schemas"])

    # Batch scoring writes each text's classes.
    source = tmp_path / "incoming.csv"
    pd.DataFrame({"text": texts}).to_csv(source, index=False)
    summary = score_in_process(ScoringSource(source=str(source)), downloaded.model_dir, f"{name}/1", tmp_path / "o.pq")
    assert [list(row) for row in pd.read_parquet(summary.output_path)["labels"]] == expected
    assert sum(summary.label_counts.values()) == sum(len(row) for row in expected)

    # Drift on per-label rates: a window of food-only texts, read from the server's request log.
    reference = reference_from_test_split(test_split, f"{name}/{version.version}", tmp_path / "reference.parquet")
    assert reference.multi_label
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    window = window_from_request_log(
        log_dir,
        now - dt.timedelta(hours=1),
        now + dt.timedelta(minutes=1),
        answers[0]["model_version"],
        tmp_path / "window.parquet",
        multi_label=reference.multi_label,
    )
    assert window.multi_label and window.rows == len(food_texts) + len(texts)
    thresholds = DriftThresholds(min_window_size=10, min_reference_size=10)
    report = detect_drift(reference, window, None, thresholds, tmp_path / "drift")
    rates = next(test for test in report.decision.tests if test.name == "label_rates")
    assert rates.ran and rates.drift, report.decision.reason

    # Retraining data for the drifted champion: its training snapshot plus new rows labelled the same way ('|').
    from flows.monitoring_actions import build_retraining_dataset
    from flows.settings import Settings

    new = make_multi_label_texts(per_combination=2, seed=5)
    (tmp_path / "new").mkdir()
    combined = build_retraining_dataset(
        servers["mlflow"],
        name,
        version.version,
        str(_csv(tmp_path / "new", new)),
        Settings().snapshot_dir,
        tmp_path / "retraining",
        label_column="labels",
    )
    assert combined.problem_type == "multi_label" and combined.num_rows == len(frame) + len(new)
    assert combined.label_counts["food"] == 40 * 3 + 2 * 3
