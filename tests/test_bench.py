"""The fine-tune benchmark keeps working: a tiny run writes its JSON with both variants and their ratio.
(Speed itself is judged from the benchmark's figures, never in a test.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tiny_service_model(fixture_frame, folder: Path) -> Path:
    """The tiny BERT as a TextClassifier folder (2 labels, max length 32), for the serving benchmarks."""
    from tests.fixtures import make_tiny_bert

    model_dir = make_tiny_bert(folder, fixture_frame["text"].tolist())
    (model_dir / "labels.json").write_text(json.dumps(["negative", "positive"]))  # the tiny BERT has 2 labels
    (model_dir / "textclf.json").write_text(json.dumps({"max_length": 32}))
    return model_dir


def _run_benchmark(script: str, tmp_path, *arguments: str) -> dict:
    """Run bench/<script> with --output and --work-dir under tmp_path; its JSON."""
    output = tmp_path / "result.json"
    command = [sys.executable, f"bench/{script}", *arguments, "--output", str(output), "--work-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(output.read_text())


@pytest.mark.integration
def test_lora_benchmark_compares_lora_with_a_full_fine_tune(fixture_csv, tiny_model_dir, tmp_path):
    options = ["--source", str(fixture_csv), "--base-model", str(tiny_model_dir), "--max-length", "32"]
    result = _run_benchmark("lora.py", tmp_path, *options, "--epochs", "1", "--batch-size", "16")
    full, lora = result["variants"]["full"], result["variants"]["lora"]
    assert full["steps"] == lora["steps"] > 0  # same data, same batch size
    assert lora["trainable_parameters"] < full["trainable_parameters"] == full["total_parameters"]
    assert full["peak_rss_mb"] > 0 and lora["train_samples_per_second"] > 0
    assert 0 <= lora["test_macro_f1"] <= 1 and "test_macro_f1_points" in result["lora_over_full"]


@pytest.mark.integration
def test_precision_benchmark_compares_bf16_with_fp32(fixture_csv, tiny_model_dir, tmp_path):
    options = ["--source", str(fixture_csv), "--base-model", str(tiny_model_dir), "--max-length", "32"]
    result = _run_benchmark("precision.py", tmp_path, *options, "--epochs", "1", "--batch-size", "16")
    fp32, bf16 = result["variants"]["fp32"], result["variants"]["bf16"]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert fp32["steps"] == bf16["steps"] > 0 and bf16["train_samples_per_second"] > 0
    assert set(result["bf16_over_fp32"]) == {"train_samples_per_second", "test_macro_f1_points"}


@pytest.mark.integration
def test_fine_tune_benchmark_writes_both_variants(fixture_csv, tiny_model_dir, tmp_path):
    output = tmp_path / "result.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/fine_tune_throughput.py",
            "--dataset",
            str(fixture_csv),
            "--base-model",
            str(tiny_model_dir),
            "--max-length",
            "32",
            "--train-samples",
            "48",
            "--epochs",
            "1",
            "--output",
            str(output),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())
    ours, plain = result["variants"]["ours"], result["variants"]["plain"]
    assert ours["steps"] == plain["steps"] == 3  # same data, same batch size: the same optimizer steps
    assert ours["train_samples_per_second"] > 0 and plain["train_samples_per_second"] > 0
    assert set(result["ratio_ours_over_plain"]) >= {"train_samples_per_second", "wall_samples_per_second"}
    assert "target_met" in result


@pytest.mark.integration
def test_serving_load_benchmark_runs_every_variant(fixture_frame, tmp_path):
    """Tiny model, two low concurrency levels, one second each: every variant answers, without errors, and the
    JSON holds the results and the targets section."""
    texts = fixture_frame["text"].tolist()
    model_dir = _tiny_service_model(fixture_frame, tmp_path / "model")
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    output = tmp_path / "serving.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/serving_load.py",
            "--model-dir",
            str(model_dir),
            "--texts",
            str(tmp_path / "texts.txt"),
            "--duration",
            "1",
            "--warmup",
            "0.5",
            "--clients",
            "1,4",
            "--output",
            str(output),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(output.read_text())
    variants = {r["variant"]: r for r in result["results"].values()}
    assert set(variants) == {
        "in-process",
        "bento-batching",
        "bento-batching-logging",
        "bento-batching-spans",
        "bento-no-batching",
        "fastapi-pipeline",
    }
    assert variants["in-process"]["texts_per_second"] > 0
    check = variants["bento-batching-logging"]["request_log"]  # counted after the server's graceful stop
    assert check["rows"] == check["answered_ok"] > 0 and check["rows_equal_answered"], check
    assert "request_log_throughput" in result["targets"]
    for name in (
        "bento-batching",
        "bento-batching-logging",
        "bento-batching-spans",
        "bento-no-batching",
        "fastapi-pipeline",
    ):
        assert "failed" not in variants[name], variants[name]["failed"]
        assert set(variants[name]["levels"]) == {"1", "4"}
        for level in variants[name]["levels"].values():
            assert level["requests_per_second"] > 0, (name, level)
            assert level["errors"] == 0, (name, level["error_kinds"], level["error_samples"])
            assert level["latency_ms"]["p99"] >= level["latency_ms"]["p50"] > 0
    assert set(result["targets"]) >= {
        "requests_per_second_vs_fastapi",
        "requests_per_second_vs_in_process",
        "p99_latency",
        "errors_at_64_clients",
        "all_targets_met",
    }
    assert result["targets"]["variant"].startswith("bento-batching[")
    assert set(result["spans"]["levels"]) == {"1", "4"}  # BentoML's spans on classify against the service as is
    assert not list((tmp_path / "work").iterdir())  # working files removed


@pytest.mark.integration
def test_sweep_benchmark_compares_the_sweep_with_the_default(fixture_csv, tiny_model_dir, tmp_path):
    """Two one-epoch trials on the fixture: both variants scored on the test split, the pruning figures present, and
    a dataset that is absent (ATIS without ../shared) skipped with a note rather than failing the run."""
    output = tmp_path / "sweep.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/sweep.py",
            "--datasets",
            f"{fixture_csv},atis",
            "--shared-data",
            str(tmp_path / "no-shared"),
            "--base-model",
            str(tiny_model_dir),
            "--max-length",
            "32",
            "--trials",
            "2",
            "--epochs-max",
            "1",
            "--output",
            str(output),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())
    topics = result["results"]["topics"]
    assert 0 <= topics["default"]["test_macro_f1"] <= 1 and 0 <= topics["sweep"]["test_macro_f1"] <= 1
    assert len(topics["sweep"]["trials"]) == 2
    assert topics["sweep"]["trial_epochs_run"] <= topics["sweep"]["trial_epochs_without_pruning"] == 2
    assert "test_macro_f1_sweep_minus_default" in topics
    assert any("ATIS skipped" in note for note in result["notes"])
    assert not (tmp_path / "work").exists()  # working files removed


@pytest.mark.integration
@pytest.mark.shared_data
def test_quality_benchmark_runs_the_training_flow_on_each_real_dataset(tiny_model_dir, tmp_path):
    """A smoke run (tiny model, a few hundred rows a dataset, one epoch): the product's training flow completes on
    each dataset and the JSON holds its figures, the anchors and the target checks."""
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "atis").exists() or not (SHARED_DATA / "sms_spam_collection").exists():
        pytest.skip(f"the shared datasets are absent ({SHARED_DATA})")
    output = tmp_path / "quality.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/quality.py",
            "--datasets",
            "atis,sms-spam,drug-reviews,atis-multi-label",
            "--base-model",
            str(tiny_model_dir),
            "--max-length",
            "32",
            "--epochs",
            "1",
            "--max-rows",
            "200",
            "--output",
            str(output),
            "--work-dir",
            str(tmp_path / "work"),
            "--shared-data",
            str(SHARED_DATA),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(output.read_text())
    assert set(result["results"]) == {"atis", "sms-spam", "drug-reviews", "atis-multi-label"}
    for figures in result["results"].values():
        assert figures["status"] == "completed" and 0 <= figures["test_macro_f1"] <= 1
        assert 0 <= figures["baseline_macro_f1"] <= 1 and figures["wall_seconds"] > 0
    assert result["results"]["atis"]["anchors"]["joint_bert_intent_accuracy"] == 0.975
    assert result["results"]["atis"]["unlearnable_test_rows"] >= 1
    assert "test_spam_f1" in result["results"]["sms-spam"]
    assert {"atis_accuracy_at_least_0.975", "sms_accuracy_at_least_0.992"} <= set(result["targets"])
    multi = result["results"]["atis-multi-label"]  # the combined intents as label lists
    assert "test_micro_f1" in multi and "test_hamming_loss" in multi and multi["unlearnable_test_rows"] >= 1


@pytest.mark.integration
def test_inference_runtimes_benchmark_measures_every_runtime(fixture_frame, tmp_path):
    """Tiny model, two batch sizes, a fraction of a second each: PyTorch, ONNX fp32 and ONNX int8 are all measured,
    the ONNX variants compared with PyTorch, and the working files removed."""
    texts = fixture_frame["text"].tolist()
    model_dir = _tiny_service_model(fixture_frame, tmp_path / "model")
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    output = tmp_path / "runtimes.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/inference_runtimes.py",
            "--model-dir",
            str(model_dir),
            "--texts",
            str(tmp_path / "texts.txt"),
            "--batch-sizes",
            "1,8",
            "--duration",
            "0.4",
            "--rounds",
            "2",
            "--agreement-texts",
            "32",
            "--output",
            str(output),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(output.read_text())
    assert set(result["results"]) == {"pytorch", "onnx-fp32", "onnx-int8"}
    for figures in result["results"].values():
        assert set(figures["batch_sizes"]) == {"1", "8"} and figures["best_batch_size"] in (1, 8)
        assert figures["best_texts_per_second"] > 0
        assert all(len(level["texts_per_second_by_round"]) == 2 for level in figures["batch_sizes"].values())
    assert result["agreement_with_pytorch"]["onnx-fp32"]["max_abs_probability_diff"] < 1e-4
    assert result["agreement_with_pytorch"]["onnx-fp32"]["label_agreement"] == 1.0
    assert 0 <= result["agreement_with_pytorch"]["onnx-int8"]["label_agreement"] <= 1
    assert set(result["speedup_at_best_batch"]) == {"onnx-fp32_over_pytorch", "onnx-int8_over_pytorch"}
    assert result["anchor"]["onnx-int8_over_pytorch"] == 3.0
    assert not list((tmp_path / "work").iterdir())  # working files removed


@pytest.mark.integration
def test_overload_benchmark_measures_levels_and_recovery(fixture_frame, tmp_path):
    """wrk against the guarded server, one short level: the JSON holds the level, the recovery and the targets."""
    output = tmp_path / "overload.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/overload.py",
            "--model-dir",
            str(_tiny_service_model(fixture_frame, tmp_path / "m")),
            "--variants",
            "guarded",
            "--connections",
            "4",
            "--duration",
            "2",
            "--idle-seconds",
            "1",
            "--recovery-seconds",
            "2",
            "--texts",
            "short",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(output.read_text())
    level = result["variants"]["guarded"]["levels"]["4"]
    assert level["ok"] > 0 and level["non_2xx"] == 0
    assert result["variants"]["guarded"]["after_load"] and "targets" in result


@pytest.mark.integration
def test_hostile_input_benchmark_reports_every_probe(fixture_frame, tmp_path):
    output = tmp_path / "hostile.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/hostile_input.py",
            "--model-dir",
            str(_tiny_service_model(fixture_frame, tmp_path / "m")),
            "--paths",
            "100",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["unknown_paths"]["statuses"] == [404]
    assert result["body_50mb"]["status"] == 413 and result["request_64x20000_chars"]["status"] == 400
    assert result["multipart_without_boundary"] == 415 and result["invisible_texts"] == 400
    assert result["log"]["tracebacks"] == 0


@pytest.mark.integration
def test_drift_monitor_benchmark_runs_its_scenarios(tmp_path):
    """A tiny run of the drift benchmark (the TF-IDF stand-in, MiniLM embeddings, a few windows) on the packaged BBC
    News texts and a small SMS-like file: it calls the monitor's own statistics and writes its JSON."""
    sms = tmp_path / "shared" / "sms_spam_collection" / "SMSSpamCollection"
    sms.parent.mkdir(parents=True)
    sms.write_text("".join(f"ham\tsee you at {i} tonight, ok? bring the {i % 7} tickets\n" for i in range(150)))
    output = tmp_path / "drift.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/drift_monitor.py",
            *("--train-size", "1900", "--reference-size", "60", "--window-size", "100"),
            *("--references", "1", "--windows", "2", "--shift-windows", "1", "--shift-pool", "150"),
            *("--shared-data", str(tmp_path / "shared"), "--output", str(output)),
            *("--work-dir", str(tmp_path / "work")),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())
    scenarios = result["scenarios"]
    assert scenarios["same_distribution"]["windows"] == 2 and scenarios["sms"]["windows"] == 1
    assert "skipped" in scenarios["atis"]  # no ATIS files given
    assert result["data"]["sms_present"] and not result["data"]["atis_present"]
    assert 0 <= result["false_alarm_rate"] <= 1
