"""Data-parallel fine-tuning for real on the CPU: two processes with the gloo backend (torchrun, started by the
fine-tune stage), against one process on the same data and seed; and a SIGKILL of one process, then a resume."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tasks.common.processes import descendants, process_alive
from tasks.serving.classifier import TextClassifier
from tasks.training.fine_tune import FineTuneConfig, fine_tune, last_complete_checkpoint, run_key
from tests.fixtures import fine_tune_until_first_checkpoint

pytestmark = pytest.mark.integration  # several processes, each training the tiny BERT


def _config(tiny_model_dir: Path, processes: int, epochs: int = 8) -> FineTuneConfig:
    return FineTuneConfig(
        base_model=str(tiny_model_dir),
        epochs=epochs,
        batch_size=8,  # the global batch: 4 per process with 2 processes
        learning_rate=2e-3,
        early_stopping_patience=0,
        device="cpu",
        processes=processes,
    )


def _test_split(prepared) -> pd.DataFrame:
    splits = pd.read_parquet(prepared.splits_path)
    return splits[splits["split"] == "test"]


def test_two_gloo_processes_train_to_the_metrics_of_one(prepared_fixture, tiny_model_dir, tmp_path):
    _, prepared = prepared_fixture
    one = fine_tune(prepared, _config(tiny_model_dir, 1), tmp_path / "one")
    two = fine_tune(prepared, _config(tiny_model_dir, 2), tmp_path / "two")
    assert (one.processes, two.processes) == (1, 2)
    # Each process takes half of every global batch of 8, so both take about the same optimizer steps.
    assert abs(one.global_step - two.global_step) <= 1 and two.epochs_completed == 8
    assert one.best_validation_macro_f1 > 0.8 and two.best_validation_macro_f1 > 0.8
    assert abs(one.best_validation_macro_f1 - two.best_validation_macro_f1) <= 0.1
    test = _test_split(prepared)
    labels_one = TextClassifier(one.model_dir).predict(test["text"].tolist())["label"]
    labels_two = TextClassifier(two.model_dir).predict(test["text"].tolist())["label"]
    assert (labels_one == labels_two).mean() >= 0.9  # the same model within tolerance, not a different one
    assert (labels_two.to_numpy() == test["label"].to_numpy()).mean() >= 0.8  # and it learned
    # Only the first process saved: one model folder, no stray staging folders of the others.
    assert sorted(p.name for p in two.model_dir.parent.iterdir() if p.name.startswith(".model")) == []


def _rank_pids(parent: int) -> list[int]:
    found = []
    for pid in descendants(parent):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "tasks.training.fine_tune_rank" in command and "torch.distributed.run" not in command:
            found.append(pid)
    return found


def test_a_sigkilled_process_fails_the_run_and_a_rerun_resumes_from_its_checkpoint(
    prepared_fixture, tiny_model_dir, tmp_path
):
    _, prepared = prepared_fixture
    config = _config(tiny_model_dir, 2, epochs=12)
    work = tmp_path / run_key(prepared, config)
    log = tmp_path / "child.log"
    process = fine_tune_until_first_checkpoint(prepared, config, tmp_path, log)
    try:
        ranks = _rank_pids(process.pid)
        assert len(ranks) == 2, ranks
        subprocess.run(["kill", "-KILL", str(ranks[1])], check=True)  # one process dies, as on an OOM kill
        assert process.wait(timeout=120) != 0  # torchrun stops the other one and the stage fails
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    deadline = time.monotonic() + 30
    while any(process_alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(pid) for pid in ranks), "a training process outlived the failed run"
    assert "data-parallel fine-tune (2 processes) failed" in log.read_text()
    assert not (work / "result.json").exists()
    steps_done = int(last_complete_checkpoint(work / "checkpoints").name.split("-")[1])

    result = fine_tune(prepared, config, tmp_path)

    assert result.processes == 2 and result.resumed_from_checkpoint is not None
    assert int(result.resumed_from_checkpoint.split("-")[1]) >= steps_done
    assert result.epochs_completed == 12 and result.best_validation_macro_f1 > 0.8
