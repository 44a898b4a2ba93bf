"""Drift monitoring: compare a window of production inputs with the champion's training reference.

The reference is the champion's held-out test split (`evaluation/test_predictions.parquet` of its training run):
the texts the training flow held out, with what the champion predicted on them and how confident it was. The
window is either a set of texts (any `ScoringSource`: the monitor scores them with the champion) or the
service's request log over the last hours.

The stage the flow (flows/monitoring.py) calls is `detect_drift`; the work is in one module per job:

- tasks/monitoring/windows.py: reading the reference and the window into Parquet windows (`Window`);
- tasks/monitoring/features.py: what is measured per text (labels, confidences, lengths, unknown tokens,
  embeddings);
- tasks/monitoring/statistics.py: the six two-sample tests, Holm's correction and the decision
  (`compare_samples`, `DriftThresholds`, `DriftDecision`);
- tasks/monitoring/report.py: the plots, the markdown report, the metrics and their MLflow logging.

What the flow does on drift (the Prefect event, the notification, the retraining run) is flow-side, in
flows/monitoring_actions.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from prefect import task

from tasks.monitoring.features import TextModels, measure_window
from tasks.monitoring.report import DriftReport, log_drift_report, write_report_folder
from tasks.monitoring.statistics import DriftThresholds, compare_samples
from tasks.monitoring.windows import Window, reference_from_test_split, window_from_request_log, window_from_source

RAW_TEXT_SKIP = "needs raw texts, which the request log does not hold (TEXTCLF_REQUEST_LOG_TEXT=true logs them)"


def detect_drift(
    reference: Window,
    window: Window,
    model_dir: Path | None,
    thresholds: DriftThresholds,
    output_dir: Path,
    context: dict[str, str] | None = None,
    seed: int = 0,
) -> DriftReport:
    """Compare the window with the reference, write `output_dir/report.md` with its PNG plots and
    `drift.json`, and return the decision. `model_dir` (the champion) gives the tokenizer for the unknown-token
    rate and the encoder for the embeddings; without it, or without raw texts, those two tests are skipped."""
    ref_frame, win_frame = reference.frame(), window.frame()
    rng = np.random.default_rng(seed)
    models: TextModels | None = None
    skip_notes: dict[str, str] = {}
    has_texts = bool(reference.texts) and bool(window.texts)
    if not window.texts:
        skip_notes = {"unknown_tokens": RAW_TEXT_SKIP, "embedding": RAW_TEXT_SKIP}
    elif model_dir is None:
        skip_notes = {
            name: "no model given to tokenize and embed the texts" for name in ("unknown_tokens", "embedding")
        }
    elif has_texts:
        models = TextModels.load(model_dir)
        if models.tokenizer.unk_token_id is None:
            skip_notes["unknown_tokens"] = (
                "the champion's tokenizer has no unknown token (byte-level): nothing to count"
            )
    reference_sample = measure_window(ref_frame, models, thresholds.max_embedding_texts, rng)
    window_sample = measure_window(win_frame, models, thresholds.max_embedding_texts, rng)
    if window.texts and window.texts < thresholds.min_window_size and window.texts < window.rows:
        # Too few logged raw texts for the text-based tests to mean anything.
        window_sample = replace(window_sample, unknown=None, tokens=None, embeddings=None)
        why = f"only {window.texts} requests have raw text (minimum {thresholds.min_window_size})"
        skip_notes.update(unknown_tokens=why, embedding=why)
    diagnostics: dict[str, Any] = {}
    decision = compare_samples(
        reference_sample, window_sample, thresholds, seed=seed, diagnostics=diagnostics, skip_notes=skip_notes
    )
    return write_report_folder(
        output_dir, reference, window, reference_sample, window_sample, decision, thresholds, diagnostics, context or {}
    )


class _FinalState(Protocol):
    def result(self) -> object: ...


def retry_unless_misconfigured(task: object, task_run: object, state: _FinalState) -> bool:
    """A Prefect `retry_condition_fn`: retry what may pass on a second try (a webhook or a file system that was
    down), not a wrong setting (a ValueError names it)."""
    try:
        state.result()
    except ValueError:
        return False
    except Exception:
        return True
    return False


reference_from_test_split_task = task(name="drift-reference")(reference_from_test_split)
window_from_source_task = task(name="drift-window-from-source")(window_from_source)
window_from_request_log_task = task(
    name="drift-window-from-request-log",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_misconfigured,
)(window_from_request_log)
detect_drift_task = task(name="detect-drift")(detect_drift)
log_drift_report_task = task(name="log-drift-report", retries=2, retry_delay_seconds=5)(log_drift_report)
