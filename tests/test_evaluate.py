"""Evaluate stage: metric helpers on known values, and the artifacts of a real evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.training.evaluate import evaluate, expected_calibration_error, one_vs_rest_auc


def test_expected_calibration_error_of_known_bins():
    # Two bins: confidence 0.9 with 50% right (gap 0.4), confidence 0.3 with 0% right (gap 0.3).
    confidence = np.array([0.9, 0.9, 0.3, 0.3])
    correct = np.array([1, 0, 0, 0])
    ece, per_bin = expected_calibration_error(confidence, correct, bins=10)
    assert ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.3)
    assert per_bin["count"].sum() == 4


def test_perfectly_calibrated_predictions_have_zero_ece():
    ece, _ = expected_calibration_error(np.ones(10), np.ones(10), bins=15)
    assert ece == pytest.approx(0.0)


def test_one_vs_rest_auc_binary_multiclass_and_missing_class():
    assert one_vs_rest_auc(np.array([0, 1, 0, 1]), np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])) == 1.0
    probabilities = np.eye(3)[[0, 1, 2, 0]] * 0.8 + 0.2 / 3
    assert one_vs_rest_auc(np.array([0, 1, 2, 0]), probabilities) == 1.0
    # Class 2 absent from the test labels: averaged over the classes present, not an error.
    absent = np.eye(3)[[0, 1, 0, 1]] * 0.8 + 0.2 / 3
    assert one_vs_rest_auc(np.array([0, 1, 0, 1]), absent) == 1.0
    assert np.isnan(one_vs_rest_auc(np.array([1, 1]), probabilities[:2]))


def test_evaluation_writes_metrics_plots_report_and_baseline(tuned_fixture, prepared_fixture, tmp_path):
    _, prepared = prepared_fixture
    result = evaluate(tuned_fixture, prepared, tmp_path / "eval", context={"data version": prepared.data_version})
    metrics = result.metrics
    assert 0 <= metrics["test_macro_f1"] <= 1 and metrics["test_size"] == prepared.split_sizes["test"]
    assert metrics["baseline_macro_f1"] > 0.8  # topic words make the fixture easy for TF-IDF
    for label in prepared.label_names:
        assert f"test_f1_{label}" in metrics and f"test_precision_{label}" in metrics
    files = {p.name for p in result.artifacts_dir.iterdir()}
    assert {
        "confusion_matrix.png",
        "reliability_diagram.png",
        "per_class_f1.png",
        "metrics.json",
        "report.md",
        "test_predictions.parquet",
        "per_class.csv",
        "length_slices.csv",
    } <= files
    assert json.loads((result.artifacts_dir / "metrics.json").read_text()) == metrics
    report = result.report_markdown
    for section in (
        "## Test metrics",
        "TF-IDF",
        "## Per class",
        "## By text length",
        "## Known limits",
        prepared.data_version,
    ):
        assert section in report
    assert (result.artifacts_dir / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_failed_evaluation_leaves_no_partial_folder(tuned_fixture, prepared_fixture, tmp_path, monkeypatch):
    _, prepared = prepared_fixture
    import tasks.training.evaluate as stage

    def broken_report(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(stage, "_report", broken_report)
    with pytest.raises(RuntimeError, match="disk full"):
        evaluate(tuned_fixture, prepared, tmp_path / "eval")
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_did_not_earn_its_cost_gets_hints_naming_the_options():
    from tasks.training.evaluate import improvement_hints

    fine = {"test_macro_f1": 0.95, "baseline_macro_f1": 0.90, "test_predicted_classes": 3}
    assert improvement_hints(fine) == []
    collapsed = {
        "test_macro_f1": 0.264,
        "baseline_macro_f1": 0.390,
        "test_predicted_classes": 1,
        "train_class_imbalance": 6.2,
        "truncated_share": 0.35,
    }
    one_class, beaten = improvement_hints(collapsed)
    assert "answers one class only" in one_class and "--class-weighted-loss" in one_class
    assert "baseline beats the fine-tuned model (macro-F1 0.3900 vs 0.2640)" in beaten
    assert "--class-weighted-loss (the largest class is 6x the smallest)" in beaten
    assert "--truncation chunks or head+tail (35% of the test texts" in beaten and "textclf sweep" in beaten


def test_the_report_says_what_to_try_and_records_the_predicted_classes(tuned_fixture, prepared_fixture, tmp_path):
    from tasks.training.evaluate import EvaluationConfig, evaluate

    _, prepared = prepared_fixture
    result = evaluate(tuned_fixture, prepared, tmp_path / "eval", config=EvaluationConfig(latency_samples=1))
    assert result.metrics["test_predicted_classes"] == 3 and result.metrics["train_class_imbalance"] >= 1
    assert ("## What to try" in result.report_markdown) == (
        result.metrics["test_macro_f1"] < result.metrics["baseline_macro_f1"]
    )
