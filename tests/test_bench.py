"""The fine-tune benchmark keeps working: a tiny run writes its JSON with both variants and their ratio.
(Speed itself is judged from the benchmark's figures, never in a test.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fine_tune_benchmark_writes_both_variants(fixture_csv, tiny_model_dir, tmp_path):
    output = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, "bench/fine_tune_throughput.py", "--dataset", str(fixture_csv), "--base-model",
         str(tiny_model_dir), "--max-length", "32", "--train-samples", "48", "--epochs", "1",
         "--output", str(output), "--work-dir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())
    ours, plain = result["variants"]["ours"], result["variants"]["plain"]
    assert ours["steps"] == plain["steps"] == 3  # same data, same batch size: the same optimizer steps
    assert ours["train_samples_per_second"] > 0 and plain["train_samples_per_second"] > 0
    assert set(result["ratio_ours_over_plain"]) >= {"train_samples_per_second", "wall_samples_per_second"}
    assert "target_met" in result
