"""Abstaining on low confidence (issue 12 section 5): the rule and the threshold for a target coverage on known
values; the evaluate stage's suggested threshold and its accuracy-vs-coverage curve; batch scoring with
min_confidence on the tuned fixture model; the service through a real `bentoml serve` with TEXTCLF_MIN_CONFIDENCE
1.0 (everything abstains), 0 (nothing does) and a bad value (the start-up stops, naming the variable); and a smoke
run of bench/abstain.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.serving.abstention import (
    UNKNOWN_LABEL,
    abstains,
    accuracy_coverage_curve,
    check_min_confidence,
    coverage_at,
    threshold_for_coverage,
)

ROOT = Path(__file__).resolve().parents[1]


def test_threshold_for_a_target_coverage_and_the_rule_on_known_values():
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.99])
    assert threshold_for_coverage(confidence, 0.8) == 0.3  # the 8 most confident are >= 0.3
    assert threshold_for_coverage(confidence, 0.75) == 0.3  # ceil(7.5) = 8 texts answered
    assert threshold_for_coverage(confidence, 1.0) == 0.1
    assert coverage_at(confidence, np.ones(10), 0.3) == (0.8, 1.0)
    assert abstains(confidence, None).sum() == 0 and abstains(confidence, 0.0).sum() == 0
    assert abstains(confidence, 1.0).all()
    coverage, accuracy = accuracy_coverage_curve(np.array([0.9, 0.6, 0.8]), np.array([True, False, True]))
    assert coverage.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0]) and accuracy.tolist() == pytest.approx([1, 1, 2 / 3])
    assert check_min_confidence(None) is None and check_min_confidence(0.5) == 0.5
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="between 0 and 1"):
            check_min_confidence(bad)


def test_evaluate_picks_the_threshold_of_the_target_coverage_on_validation(tuned_fixture, prepared_fixture, tmp_path):
    from tasks.serving.classifier import TextClassifier
    from tasks.training.evaluate import EvaluationConfig, evaluate

    _, prepared = prepared_fixture
    result = evaluate(
        tuned_fixture, prepared, tmp_path / "eval", config=EvaluationConfig(latency_samples=1, target_coverage=0.8)
    )
    metrics = result.metrics
    threshold = metrics["suggested_min_confidence"]
    classifier = TextClassifier(tuned_fixture.model_dir)
    validation = classifier.predict_proba(prepared.split("validation")["text"].tolist()).max(axis=1)
    answered = validation >= threshold
    assert answered.mean() >= 0.8 and metrics["validation_coverage_at_suggested"] == pytest.approx(answered.mean())
    assert (validation > threshold).mean() < 0.8  # the highest threshold that still answers 80 %
    test = classifier.predict(prepared.split("test")["text"].tolist())
    kept = test["probability"] >= threshold
    assert metrics["test_coverage_at_suggested"] == pytest.approx(kept.mean())
    truth = np.array([prepared.label_names[i] for i in prepared.split("test")["label_id"]])
    if kept.any():
        assert metrics["test_accuracy_at_suggested"] == pytest.approx((test["label"][kept] == truth[kept]).mean())
    assert (result.artifacts_dir / "accuracy_coverage.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Abstaining on low confidence" in result.report_markdown


def test_batch_scoring_with_min_confidence(tuned_fixture, fixture_frame, tmp_path):
    from tasks.contracts import ScoringSource
    from tasks.scoring.batch_score import score_in_process

    source = tmp_path / "incoming.csv"
    fixture_frame.head(30).to_csv(source, index=False)
    config = ScoringSource(source=str(source))
    runs = {}
    for name, value in (("never", None), ("none", 0.0), ("all", 1.0)):
        runs[name] = score_in_process(
            config,
            tuned_fixture.model_dir,
            "topics/1",
            tmp_path / f"{name}.parquet",
            chunk_size=8,
            min_confidence=value,
        )
    never = pq.read_table(runs["never"].output_path).to_pandas()
    assert runs["never"].abstained_texts == 0 and UNKNOWN_LABEL not in set(never["label"])
    assert pq.read_table(runs["none"].output_path).to_pandas()["label"].tolist() == never["label"].tolist()
    everything = pq.read_table(runs["all"].output_path).to_pandas()
    assert runs["all"].abstained_texts == 30 and runs["all"].label_counts == {UNKNOWN_LABEL: 30}
    assert (everything["label"] == UNKNOWN_LABEL).all()
    assert everything["probability"].tolist() == pytest.approx(never["probability"].tolist())  # still the top class's
    # In between: exactly the texts below the threshold abstain.
    middle = float(np.median(never["probability"]))
    summary = score_in_process(
        config, tuned_fixture.model_dir, "topics/1", tmp_path / "middle.parquet", min_confidence=middle
    )
    frame = pq.read_table(summary.output_path).to_pandas()
    below = never["probability"] < middle
    assert (frame["label"] == UNKNOWN_LABEL).tolist() == below.tolist() and summary.abstained_texts == below.sum()
    assert frame.loc[~below, "label"].tolist() == never.loc[~below, "label"].tolist()


@pytest.mark.integration
def test_a_bad_min_confidence_stops_the_start_up_naming_the_variable(bento_env, tmp_path):
    from tasks.common.ports import free_port

    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "bentoml"),
            "serve",
            "service:TextClassifierService",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ],
        cwd=ROOT,
        env={**bento_env, "TEXTCLF_MIN_CONFIDENCE": "1.5"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode != 0
    assert "TEXTCLF_MIN_CONFIDENCE=1.5 must be a finite number, between 0 and 1" in done.stdout + done.stderr


def _stand_in_shared_data(folder: Path) -> Path:
    """Tiny files in the layouts of ../shared/data's ATIS and SMS Spam Collection, so the smoke test runs where the
    shared datasets are absent (the core suite must pass without them)."""
    (folder / "atis").mkdir(parents=True)
    queries = ["show me flights from boston to denver", "what is the fare to dallas", "list airlines at atlanta"]
    for split in ("train", "dev", "test"):
        rows = [f"atis_{['flight', 'airfare', 'airline'][i % 3]}\t{queries[i % 3]} {split} {i}\tO" for i in range(12)]
        (folder / "atis" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    (folder / "sms_spam_collection").mkdir()
    messages = [f"{'spam' if i % 4 == 0 else 'ham'}\tare we still on for dinner tonight {i}" for i in range(40)]
    (folder / "sms_spam_collection" / "SMSSpamCollection").write_text("\n".join(messages) + "\n")
    return folder


@pytest.mark.integration
def test_abstain_benchmark_smoke(tuned_fixture, fixture_csv, tmp_path):
    output = tmp_path / "abstain.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/abstain.py",
            "--model-dir",
            str(tuned_fixture.model_dir),
            "--in-domain",
            str(fixture_csv),
            "--max-ood-texts",
            "30",
            "--output",
            str(output),
            "--work-dir",
            str(tmp_path / "work"),
            "--shared-data",
            str(_stand_in_shared_data(tmp_path / "shared")),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["in_domain_test"]["texts"] == 60
    for name in ("atis", "sms-spam", "all-ood"):
        assert 0 <= result["out_of_domain"][name]["auroc_max_softmax"] <= 1
    assert result["anchor"]["max_softmax_ood_auroc_bert_base_clinc150"] == 0.942
    assert Path(result["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_textclf_score_takes_min_confidence_from_the_flow_parameter(capsys):
    from flows.cli import _flow_parameters, build_parser, main
    from flows.settings import Settings

    parse = build_parser(["score"]).parse_args
    assert (
        _flow_parameters(parse(["score", "--source", "x.csv", "--min-confidence", "0.8"]), Settings())["min_confidence"]
        == 0.8
    )
    assert "min_confidence" not in _flow_parameters(parse(["score", "--source", "x.csv"]), Settings())
    with pytest.raises(SystemExit) as exit_:
        main(["score", "--source", "x.csv", "--min-confidence", "1.5"])
    assert exit_.value.code == 2
    assert "--min-confidence: Input should be less than or equal to 1" in capsys.readouterr().err
