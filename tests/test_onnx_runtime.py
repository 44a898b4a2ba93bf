"""The optimized inference runtime: the tuned fixture model exported to ONNX and quantized to int8, each variant
gated against PyTorch on the fixture's test split, picked up by TextClassifier from the model folder, and served by
the Bento that the promotion flow builds (real MLflow, Prefect and `bentoml serve`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.promotion.optimize_runtime import (
    RuntimeGateConfig,
    export_onnx,
    export_variants,
    gate_runtimes,
    judge_variant,
)
from tasks.serving.classifier import TextClassifier
from tasks.serving.onnx_runtime import (
    ONNX_DIR,
    RUNTIME_FILE,
    RuntimeFileError,
    folder_runtime,
    install_runtime,
)


@pytest.fixture(scope="module")
def variants(tuned_fixture, tmp_path_factory) -> dict:
    made = export_variants(tuned_fixture.model_dir, tmp_path_factory.mktemp("onnx-variants"))
    assert set(made) == {"onnx-fp32", "onnx-int8"}
    assert all(isinstance(path, Path) and path.is_file() for path in made.values()), made
    return made


@pytest.fixture(scope="module")
def test_split(prepared_fixture) -> pd.DataFrame:
    return prepared_fixture[1].split("test")


def _folder_with(tuned, variants: dict, target: Path) -> Path:
    """A copy of the tuned model folder with both ONNX files under onnx/ and no runtime.json."""
    shutil.copytree(tuned.model_dir, target)
    (target / ONNX_DIR).mkdir()
    for path in variants.values():
        shutil.copy2(path, target / ONNX_DIR / path.name)
    return target


def test_export_has_dynamic_batch_and_sequence_axes(variants):
    import onnx

    model = onnx.load(str(variants["onnx-fp32"]))
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(dims == ["batch", "sequence"] for dims in inputs.values()), inputs
    assert [o.name for o in model.graph.output] == ["logits"]
    assert variants["onnx-int8"].stat().st_size < variants["onnx-fp32"].stat().st_size  # int8 weights


def test_onnx_fp32_logits_match_pytorch_and_int8_agrees_on_labels(tuned_fixture, variants, test_split, tmp_path):
    folder = _folder_with(tuned_fixture, variants, tmp_path / "model")
    texts = test_split["text"].tolist()
    pytorch = TextClassifier(folder, runtime="pytorch")
    fp32, int8 = TextClassifier(folder, runtime="onnx-fp32"), TextClassifier(folder, runtime="onnx-int8")
    assert (pytorch.runtime, fp32.runtime, int8.runtime) == ("pytorch", "onnx-fp32", "onnx-int8")
    from tasks.serving.windows import encode_windows

    encoded = encode_windows(pytorch.tokenizer, texts, pytorch.windowing)
    for batch_size in (1, 7, 64):  # padding differs with the batch: the dynamic axes must hold for every shape
        assert np.allclose(
            fp32.window_logits(encoded, batch_size), pytorch.window_logits(encoded, batch_size), atol=1e-4
        )
    reference = pytorch.predict(texts)["label"].tolist()
    assert fp32.predict(texts)["label"].tolist() == reference
    assert int8.predict(texts)["label"].tolist() == reference
    assert np.abs(int8.predict_proba(texts) - pytorch.predict_proba(texts)).max() < 0.1


def test_the_folder_says_which_runtime_answers_and_runtime_overrides_it(tuned_fixture, variants, test_split, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tuned_fixture.model_dir, folder)
    assert folder_runtime(folder) == "pytorch" and TextClassifier(folder).runtime == "pytorch"  # as trained
    gate = gate_runtimes(
        tuned_fixture.model_dir,
        {"onnx-int8": variants["onnx-int8"]},
        test_split,
        RuntimeGateConfig(),
        tmp_path / "gate",
    )
    # Whatever is faster here, force the int8 choice to test the switch: the gate's files for int8.
    int8 = gate.score("onnx-int8")
    assert int8.passed and int8.label_agreement == 1.0, int8.reason
    files = tmp_path / "files"
    (files / ONNX_DIR).mkdir(parents=True)
    shutil.copy2(variants["onnx-int8"], files / ONNX_DIR / variants["onnx-int8"].name)
    from tasks.serving.onnx_runtime import sha256_of

    (files / RUNTIME_FILE).write_text(
        json.dumps({"runtime": "onnx-int8", "file": "onnx/model.int8.onnx", "sha256": sha256_of(variants["onnx-int8"])})
    )
    install_runtime(folder, files)
    assert sorted(p.name for p in (folder / ONNX_DIR).iterdir()) == ["model.int8.onnx"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert folder_runtime(folder) == "onnx-int8" and TextClassifier(folder).runtime == "onnx-int8"
    assert TextClassifier(folder, runtime="pytorch").runtime == "pytorch"
    with pytest.raises(RuntimeFileError, match=r"onnx/model\.onnx, which does not exist.*promotion flow"):
        TextClassifier(folder, runtime="onnx-fp32")  # not installed here
    with pytest.raises(ValueError, match="not one of pytorch, onnx-fp32, onnx-int8"):
        TextClassifier(folder, runtime="tensorrt")
    texts = test_split["text"].tolist()
    assert (
        TextClassifier(folder).predict(texts)["label"].tolist()
        == TextClassifier(folder, runtime="pytorch").predict(texts)["label"].tolist()
    )


def test_chunks_pool_the_same_windows_in_every_runtime(tuned_fixture, variants, fixture_frame, tmp_path):
    folder = _folder_with(tuned_fixture, variants, tmp_path / "model")
    settings = json.loads((folder / "textclf.json").read_text())
    (folder / "textclf.json").write_text(json.dumps({**settings, "truncation": "chunks", "max_length": 12}))
    texts = [" ".join(fixture_frame["text"].iloc[i : i + 4]) for i in range(0, 80, 4)]  # 4 texts in one: long
    answers = {
        runtime: TextClassifier(folder, runtime=runtime).classify(texts)
        for runtime in ("pytorch", "onnx-fp32", "onnx-int8")
    }
    truncated = answers["pytorch"][1]
    assert any(truncated) and all(answer[1] == truncated for answer in answers.values())
    assert np.allclose(answers["onnx-fp32"][0], answers["pytorch"][0], atol=1e-5)
    labels = {runtime: answer[0].argmax(axis=1).tolist() for runtime, answer in answers.items()}
    assert labels["onnx-int8"] == labels["pytorch"] == labels["onnx-fp32"]


def test_the_gate_rejects_a_variant_that_disagrees(tuned_fixture, variants, test_split, tmp_path):
    """A deliberately broken fp32 variant (the classifier's bias pushed to one class) fails on label agreement; at a
    threshold nothing can pass, PyTorch serves."""
    import torch
    from transformers import AutoModelForSequenceClassification

    broken_dir = tmp_path / "broken"
    shutil.copytree(tuned_fixture.model_dir, broken_dir)
    model = AutoModelForSequenceClassification.from_pretrained(broken_dir)
    with torch.no_grad():
        model.classifier.bias[0] += 100.0
    model.save_pretrained(broken_dir)
    broken = export_onnx(broken_dir, tmp_path / "broken-onnx" / "model.onnx")
    gate = gate_runtimes(
        tuned_fixture.model_dir,
        {"onnx-fp32": broken, "onnx-int8": variants["onnx-int8"]},
        test_split,
        RuntimeGateConfig(),
        tmp_path / "gate",
    )
    fp32 = gate.score("onnx-fp32")
    assert not fp32.passed and "fails, label agreement" in fp32.reason and fp32.label_agreement < 0.6
    assert gate.score("onnx-int8").passed and gate.chosen in ("onnx-int8", "pytorch")  # the fastest passing one
    assert gate.chosen != "onnx-fp32"
    assert [s.runtime for s in gate.variants] == ["pytorch", "onnx-fp32", "onnx-int8"]

    # Unreachable thresholds: every variant fails, PyTorch serves, and the files say so.
    strict = RuntimeGateConfig(min_label_agreement=1.0, max_macro_f1_drop=0.0)
    gate = gate_runtimes(tuned_fixture.model_dir, {"onnx-fp32": broken}, test_split, strict, tmp_path / "strict")
    assert gate.chosen == "pytorch" and "no ONNX variant passed" in gate.reason
    assert json.loads((gate.files_dir / RUNTIME_FILE).read_text())["runtime"] == "pytorch"
    assert not (gate.files_dir / ONNX_DIR).exists()


def test_judge_variant_on_the_thresholds():
    config = RuntimeGateConfig()
    truth = ["a"] * 100 + ["b"] * 100
    reference = list(truth)
    one_off = ["b"] + truth[1:]  # 99.5 % agreement: exactly at the threshold passes
    passed, reason, agreement, macro_f1, drop = judge_variant(
        "onnx-int8", one_off, reference, truth, ["a", "b"], 0.999, config
    )
    assert passed and agreement == pytest.approx(0.995) and drop == pytest.approx(0.999 - macro_f1), reason
    assert 0 < drop < 0.005
    passed, reason, *_ = judge_variant("onnx-int8", one_off, reference, truth, ["a", "b"], 1.0, config)
    assert not passed and "macro-F1 drop 0.50 points > 0.50" in reason and "label agreement" not in reason
    two_off = ["b", "b"] + truth[2:]
    passed, reason, *_ = judge_variant("onnx-int8", two_off, reference, truth, ["a", "b"], 1.0, config)
    assert not passed and "label agreement 99.00% < 99.50%" in reason and "macro-F1 drop" in reason


def test_a_corrupt_onnx_file_says_which_file_and_what_to_do(tuned_fixture, variants, tmp_path):
    folder = _folder_with(tuned_fixture, variants, tmp_path / "model")
    (folder / ONNX_DIR / "model.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(RuntimeFileError, match=r"model\.onnx is not a loadable ONNX model.*promotion flow again"):
        TextClassifier(folder, runtime="onnx-fp32")
    # Recorded with a SHA-256 (what promotion writes): a changed file is caught before ONNX Runtime reads it.
    from tasks.serving.onnx_runtime import sha256_of

    (folder / RUNTIME_FILE).write_text(
        json.dumps({"runtime": "onnx-int8", "file": "onnx/model.int8.onnx", "sha256": sha256_of(variants["onnx-int8"])})
    )
    assert TextClassifier(folder).runtime == "onnx-int8"
    with open(folder / ONNX_DIR / "model.int8.onnx", "r+b") as file:
        file.truncate(1000)
    with pytest.raises(RuntimeFileError, match=r"model\.int8\.onnx is corrupt: its SHA-256 differs"):
        TextClassifier(folder)
    (folder / RUNTIME_FILE).write_text("{not json")
    with pytest.raises(RuntimeFileError, match=r"runtime\.json is not a valid runtime file.*delete"):
        TextClassifier(folder)


def test_installing_a_corrupt_runtime_leaves_the_folder_as_it_was(tuned_fixture, variants, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tuned_fixture.model_dir, folder)
    source = tmp_path / "source"
    (source / ONNX_DIR).mkdir(parents=True)
    shutil.copy2(variants["onnx-int8"], source / ONNX_DIR / "model.int8.onnx")
    (source / RUNTIME_FILE).write_text(
        json.dumps({"runtime": "onnx-int8", "file": "onnx/model.int8.onnx", "sha256": "0" * 64})
    )
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(RuntimeFileError, match="is corrupt"):
        install_runtime(folder, source)
    assert sorted(p.name for p in folder.iterdir()) == before  # no runtime.json, no onnx/, no temporary
    assert TextClassifier(folder).runtime == "pytorch"


def test_the_drift_window_counts_every_runtime_of_the_champion(tmp_path):
    from tasks.monitoring.windows import window_from_request_log_frame

    rows = 6
    log = pd.DataFrame(
        {
            "label": ["x"] * rows,
            "probability": [0.9] * rows,
            "length_chars": [10] * rows,
            "model_version": ["m/2+onnx-int8", "m/2+onnx-int8", "m/2", "m/2+pytorch", "m/1+onnx-int8", "m/1"],
            "text_sha256": [str(i) for i in range(rows)],
        }
    )
    window = window_from_request_log_frame(log, "m/2", tmp_path / "window.parquet")
    assert window.rows == 4
    assert any("2 of 6 requests were served by other model versions (m/1, m/1+onnx-int8)" in n for n in window.notes)


@pytest.mark.integration
def test_promotion_chooses_a_runtime_records_it_and_the_bento_answers_with_it(
    project_env, servers, prepared_fixture, tuned_fixture, tmp_path
):
    from mlflow import MlflowClient

    from flows.promotion import promotion
    from tasks.contracts import RUNTIME_TAG, RUNTIME_URI_TAG
    from tasks.registry import download_model_version
    from tests.fixtures import flow_run_and_artifacts, register_model_versions

    uri, name = servers["mlflow"], "onnx-promo"
    (good,) = register_model_versions(servers, prepared_fixture, tuned_fixture, tmp_path, name, ["good"])
    state = promotion(name, candidate_version=good, containerize=False, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    gate = result.runtime
    assert gate is not None and [s.runtime for s in gate.variants] == ["pytorch", "onnx-fp32", "onnx-int8"]
    assert all(s.passed for s in gate.variants), [s.reason for s in gate.variants]  # the fixture agrees fully
    fastest = max(gate.variants, key=lambda s: s.texts_per_second)
    assert gate.chosen == fastest.runtime == result.bento.runtime
    # The smoke test passed: the served Bento answered `<name>/<version>+<runtime>` with the registered labels.

    client = MlflowClient(uri)
    version = client.get_model_version(name, str(good))
    assert version.tags[RUNTIME_TAG] == gate.chosen
    run = client.get_run(version.tags["promotion.run_id"])
    for runtime in ("pytorch", "onnx-fp32", "onnx-int8"):
        assert run.data.metrics[f"runtime.{runtime}.label_agreement"] == pytest.approx(1.0)
        assert run.data.metrics[f"runtime.{runtime}.texts_per_second"] > 0
        assert f"runtime.{runtime}.macro_f1" in run.data.metrics
    assert run.data.params["runtime_chosen"] == gate.chosen
    _, artifacts = flow_run_and_artifacts(servers["prefect"], state.state_details.flow_run_id)
    markdown = next(a for a in artifacts if a["key"] == "promotion-decision")["data"]
    assert "## Inference runtime" in markdown and f"**{gate.chosen}**" in markdown and "| onnx-int8 |" in markdown

    # Batch scoring and monitoring download the version with the same runtime, ONNX files included.
    downloaded = download_model_version(uri, name, good, tmp_path / "downloads")
    assert folder_runtime(downloaded.model_dir) == gate.chosen
    if gate.chosen != "pytorch":
        assert version.tags[RUNTIME_URI_TAG].endswith("/runtime")
        assert (downloaded.model_dir / json.loads((downloaded.model_dir / RUNTIME_FILE).read_text())["file"]).is_file()
    import bentoml

    packed = bentoml.models.get(_packed_model(result.bento.dockerfile))  # what the Bento serves
    assert folder_runtime(packed.path) == gate.chosen and packed.info.labels["runtime"] == gate.chosen


def _packed_model(dockerfile: Path) -> str:
    import yaml

    manifest = yaml.safe_load((dockerfile.parents[2] / "bento.yaml").read_text())
    return manifest["services"][0]["models"][0]["tag"]


def test_with_optimization_off_pytorch_serves_and_nothing_is_exported(tuned_fixture, test_split, tmp_path):
    from tasks.promotion.optimize_runtime import optimize_runtime

    gate = optimize_runtime(
        tuned_fixture.model_dir, test_split, tmp_path / "work", RuntimeGateConfig(optimize_runtime=False)
    )
    assert gate.chosen == "pytorch" and "optimization is off" in gate.reason
    assert [s.runtime for s in gate.variants] == ["pytorch"] and not (tmp_path / "work" / ONNX_DIR).exists()
