"""Drift monitoring: compare a window of production inputs with the champion's training reference.

The reference is the champion's held-out test split (`evaluation/test_predictions.parquet` of its training run):
the texts the training flow held out, with what the champion predicted on them and how confident it was. The
window is either a set of texts (any `ScoringSource`: the monitor scores them with the champion) or the
service's request log over the last hours.

Six two-sample tests, each with a test statistic, a p-value and an effect size:

| test | p-value | effect size (must also reach its threshold) |
|---|---|---|
| `label`: predicted-label distribution | chi-square test of homogeneity (Monte Carlo when counts are small) | PSI |
| `confidence`: top-class probability | Kolmogorov-Smirnov two-sample | KS distance D |
| `low_confidence`: share of predictions below a probability | Fisher exact test | change of the share |
| `length`: text length in characters | Kolmogorov-Smirnov two-sample | PSI on reference deciles |
| `unknown_tokens`: share of the tokenizer's unknown token | permutation test over texts | change of the rate |
| `embedding`: mean-pooled encoder embeddings | MMD, RBF kernel (median heuristic), permutation | MMD² |

Decision: the p-values of the tests that ran are adjusted with Holm's step-down method, so that the chance of any
false alarm on a same-distribution window is at most `alpha` per run; a test reports drift when its adjusted
p-value is at most `alpha` *and* its effect size reaches its threshold (significant and large enough to matter:
with big windows tiny, harmless shifts are significant too). The window drifts when any test does. Windows (or
references) smaller than the minimum size are "insufficient data", never drift.

Everything is a plain function of numpy arrays (`compare_samples`) wrapped by the stages the flow calls; the
benchmark calls the same functions."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.scoring.batch_score import ScoringSource
from tasks.tracking import TrackingRef

logger = logging.getLogger(__name__)

DRIFT_EVENT = "textclf.drift.detected"
REPORT_FILE = "report.md"
RESULT_FILE = "drift.json"
REQUEST_LOG_COLUMNS = (
    "time",
    "request_id",
    "text_sha256",
    "text",
    "length_chars",
    "label",
    "probability",
    "truncated",
    "model_version",
    "latency_ms",
)
WINDOW_COLUMNS = ("text", "label", "probability", "length_chars")
RAW_TEXT_NOTE = (
    "The request log holds no raw texts for this window (raw-text logging is off), so embedding "
    "drift and unknown-token drift were not measured. Turn on raw-text logging in the service "
    "(TEXTCLF_REQUEST_LOG_TEXT=true) to monitor them, or point the monitor at the texts themselves "
    "(`source`)."
)
RAW_TEXT_SKIP = "needs raw texts, which the request log does not hold (TEXTCLF_REQUEST_LOG_TEXT=true logs them)"
TEST_TITLES = {
    "label": "Predicted-label distribution",
    "confidence": "Confidence (top-class probability)",
    "low_confidence": "Share of low-confidence predictions",
    "length": "Text length (characters)",
    "unknown_tokens": "Unknown-token rate",
    "embedding": "Sentence embeddings",
}
Status = Literal["drift", "no_drift", "insufficient_data"]


# ----------------------------------------------------------------------------------------------------------
# Configuration and results
# ----------------------------------------------------------------------------------------------------------


class DriftThresholds(BaseModel):
    """When a window counts as drifted. A test fires only when it is significant after Holm's correction *and*
    its effect size reaches its threshold."""

    model_config = ConfigDict(frozen=True)

    alpha: float = Field(
        default=0.01,
        gt=0,
        lt=0.5,
        description="Family-wise false-alarm probability per run: Holm-adjusted p-values must be at most this.",
    )
    min_window_size: int = Field(
        default=100,
        ge=10,
        le=1_000_000,
        description="Fewest (deduplicated) texts a window needs; smaller windows are 'insufficient data'.",
    )
    min_reference_size: int = Field(
        default=50,
        ge=10,
        le=1_000_000,
        description="Fewest reference texts (the champion's test split) the comparison needs.",
    )
    label_psi: float = Field(
        default=0.2, ge=0, description="PSI of the predicted-label distribution that counts as drift."
    )
    confidence_ks: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Kolmogorov-Smirnov distance of the confidence distributions that counts as drift.",
    )
    low_confidence_threshold: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="Predictions whose probability is below this count as low-confidence.",
    )
    low_confidence_share_change: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Change of the low-confidence share (absolute) that counts as drift.",
    )
    length_psi: float = Field(
        default=0.2, ge=0, description="PSI of the text-length distribution (reference deciles) that counts as drift."
    )
    unknown_token_rate_change: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="Change of the unknown-token rate (absolute) that counts as drift.",
    )
    embedding_mmd2: float = Field(
        default=0.0,
        ge=0,
        description="MMD² of the embeddings that counts as drift (0: significance alone).",
    )
    max_embedding_texts: int = Field(
        default=500,
        ge=20,
        le=5000,
        description="Texts per side (sampled) for the embedding test: keeps it seconds on a CPU.",
    )
    permutations: int = Field(
        default=1000,
        ge=100,
        le=100_000,
        description="Permutations of the permutation tests (raised automatically when alpha needs more).",
    )


class DriftTest(BaseModel):
    """One test: its statistic, p-value (raw and Holm-adjusted), effect size and whether it fired."""

    model_config = ConfigDict(frozen=True)

    name: str
    title: str
    method: str
    statistic: float | None = None
    p_value: float | None = None
    p_adjusted: float | None = None
    effect_name: str = ""
    effect: float | None = None
    threshold: float | None = None
    reference_value: float | None = None
    window_value: float | None = None
    drift: bool = False
    skipped: str | None = None  # why the test did not run

    @property
    def ran(self) -> bool:
        return self.skipped is None


class DriftDecision(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: Status
    reason: str
    reference_size: int
    window_size: int
    alpha: float
    tests: tuple[DriftTest, ...] = ()

    @property
    def drift_detected(self) -> bool:
        return self.status == "drift"

    def test(self, name: str) -> DriftTest | None:
        return next((t for t in self.tests if t.name == name), None)

    @property
    def fired(self) -> list[str]:
        return [t.name for t in self.tests if t.drift]


class Window(BaseModel):
    """A reference to one side of the comparison, written as Parquet with columns text (null when unknown),
    label, probability and length_chars."""

    model_config = ConfigDict(frozen=True)

    path: Path
    rows: int
    texts: int  # rows whose text is known
    description: str
    model_version: str
    duplicates_dropped: int = 0
    rows_seen: int = 0
    notes: tuple[str, ...] = ()

    def frame(self) -> pd.DataFrame:
        return pd.read_parquet(self.path)


class DriftReport(BaseModel):
    """What the comparison found, and where its report (markdown + PNG plots) is."""

    model_config = ConfigDict(frozen=True)

    decision: DriftDecision
    report_dir: Path
    markdown: str
    notes: tuple[str, ...] = ()

    @property
    def report_path(self) -> Path:
        return self.report_dir / REPORT_FILE


# ----------------------------------------------------------------------------------------------------------
# Statistics (pure)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One side of the comparison as arrays; None where a quantity is not known (e.g. no raw texts)."""

    labels: np.ndarray | None = None  # predicted label per text
    confidence: np.ndarray | None = None  # top-class probability per text
    length: np.ndarray | None = None  # characters per text
    unknown: np.ndarray | None = None  # unknown tokens per text
    tokens: np.ndarray | None = None  # tokens per text
    embeddings: np.ndarray | None = None  # one row per (sampled) text

    @property
    def size(self) -> int:
        for values in (self.labels, self.confidence, self.length, self.tokens, self.embeddings):
            if values is not None:
                return len(values)
        return 0


def psi(reference_counts: np.ndarray, window_counts: np.ndarray, smoothing: float = 0.5) -> float:
    """Population stability index sum((w - r) * ln(w / r)) over bins, with `smoothing` pseudo-counts per bin so
    that an empty bin costs a finite amount."""
    r = np.asarray(reference_counts, dtype=float) + smoothing
    w = np.asarray(window_counts, dtype=float) + smoothing
    r, w = r / r.sum(), w / w.sum()
    return float(np.sum((w - r) * np.log(w / r)))


def label_test(
    reference: np.ndarray, window: np.ndarray, rng: np.random.Generator, simulations: int = 2000
) -> tuple[float, float, float, str, list[str], np.ndarray, np.ndarray]:
    """Chi-square test of homogeneity of two label samples (the reference is a sample too, so this is a 2 x k
    contingency test, not goodness of fit against fixed proportions). When an expected count is below 5 the
    p-value is a Monte Carlo one: window counts drawn from the multivariate hypergeometric distribution, which
    is exactly the permutation distribution of the table. Returns (chi2, p, psi, method, labels, ref counts,
    window counts)."""
    from scipy.stats import chi2_contingency

    labels = sorted(set(map(str, reference)) | set(map(str, window)))
    ref_counts = np.array([np.sum(reference == label) for label in labels])
    win_counts = np.array([np.sum(window == label) for label in labels])
    index = psi(ref_counts, win_counts)
    if len(labels) < 2:
        return 0.0, 1.0, index, "one label only", labels, ref_counts, win_counts
    table = np.vstack([ref_counts, win_counts])
    totals, n_window, n = table.sum(axis=0), win_counts.sum(), table.sum()
    expected = np.outer(table.sum(axis=1), totals) / n

    def chi2(window_counts: np.ndarray) -> np.ndarray:
        observed = np.stack([totals - window_counts, window_counts], axis=-2)
        return np.sum((observed - expected) ** 2 / expected, axis=(-2, -1))

    statistic = float(chi2(win_counts))
    if expected.min() >= 5:
        _, p_value, _, _ = chi2_contingency(table, correction=False)
        return statistic, float(p_value), index, "chi-square test of homogeneity", labels, ref_counts, win_counts
    draws = rng.multivariate_hypergeometric(totals, n_window, size=simulations)
    p_value = (1 + np.sum(chi2(draws) >= statistic - 1e-12)) / (1 + simulations)
    return (
        statistic,
        float(p_value),
        index,
        f"chi-square, Monte Carlo p ({simulations} draws)",
        labels,
        ref_counts,
        win_counts,
    )


def decile_psi(reference: np.ndarray, window: np.ndarray, bins: int = 10) -> float:
    """PSI of a continuous quantity over bins at the reference's quantiles."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    return psi(
        np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1),
        np.bincount(np.searchsorted(edges, window, side="right"), minlength=len(edges) + 1),
    )


def rate_permutation_test(
    ref_hits: np.ndarray,
    ref_totals: np.ndarray,
    win_hits: np.ndarray,
    win_totals: np.ndarray,
    rng: np.random.Generator,
    permutations: int,
) -> tuple[float, float, float, float]:
    """Two-sided permutation test of a pooled rate sum(hits)/sum(totals) (e.g. unknown tokens per token), with
    whole texts as the exchangeable units: tokens of one text are not independent, so a per-token z-test would
    be over-confident. Returns (window rate - reference rate, p, reference rate, window rate)."""
    hits = np.concatenate([ref_hits, win_hits]).astype(float)
    totals = np.concatenate([ref_totals, win_totals]).astype(float)
    n_ref = len(ref_hits)

    def difference(in_window: np.ndarray) -> np.ndarray:  # in_window: (..., N) booleans
        w_hits, w_tot = in_window @ hits, in_window @ totals
        r_hits, r_tot = hits.sum() - w_hits, totals.sum() - w_tot
        return w_hits / np.maximum(w_tot, 1) - r_hits / np.maximum(r_tot, 1)

    observed_mask = np.r_[np.zeros(n_ref, bool), np.ones(len(win_hits), bool)]
    observed = float(difference(observed_mask.astype(float)))
    if hits.sum() == 0:
        return 0.0, 1.0, 0.0, 0.0
    exceed = 0
    for start in range(0, permutations, 500):
        count = min(500, permutations - start)
        masks = observed_mask[rng.random((count, len(observed_mask))).argsort(axis=1)].astype(float)
        exceed += int(np.sum(np.abs(difference(masks)) >= abs(observed) - 1e-12))
    reference_rate = ref_hits.sum() / max(ref_totals.sum(), 1)
    return observed, (1 + exceed) / (1 + permutations), float(reference_rate), float(reference_rate + observed)


def mmd_permutation_test(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, permutations: int
) -> tuple[float, float, np.ndarray, float]:
    """Maximum mean discrepancy between two samples with a Gaussian (RBF) kernel whose bandwidth is the median
    pairwise distance of the pooled sample (the median heuristic), and a permutation p-value. The statistic is
    the biased estimate w'Kw with w = (1/n for x, -1/m for y); the kernel matrix is computed once and every
    permutation only re-weights it. Returns (MMD², p, null statistics, bandwidth)."""
    z = np.vstack([x, y]).astype(np.float64)
    n, total = len(x), len(z)
    squared = np.sum(z**2, axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2 * z @ z.T, 0.0)
    upper = distances[np.triu_indices(total, k=1)]
    median = float(np.median(upper[upper > 0])) if np.any(upper > 0) else 1.0
    kernel = np.exp(-distances / (2 * median))
    weights = np.r_[np.full(n, 1.0 / n), np.full(total - n, -1.0 / (total - n))]
    observed = float(weights @ kernel @ weights)
    null = []
    for start in range(0, permutations, 250):
        count = min(250, permutations - start)
        columns = weights[rng.random((count, total)).argsort(axis=1)].T
        null.append(np.sum(columns * (kernel @ columns), axis=0))
    null_stats = np.concatenate(null)
    p_value = (1 + np.sum(null_stats >= observed - 1e-12)) / (1 + permutations)
    return observed, float(p_value), null_stats, math.sqrt(median)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control, valid under any dependence)."""
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def _skipped(name: str, why: str, effect_name: str = "") -> DriftTest:
    return DriftTest(name=name, title=TEST_TITLES[name], method="not run", effect_name=effect_name, skipped=why)


def compare_samples(
    reference: Sample,
    window: Sample,
    thresholds: DriftThresholds = DriftThresholds(),
    seed: int = 0,
    diagnostics: dict[str, Any] | None = None,
    skip_notes: dict[str, str] | None = None,
) -> DriftDecision:
    """Run every test both samples have the data for, adjust the p-values (Holm) and decide.
    `skip_notes` says why a test whose data is missing was not run (default: "no data")."""
    from scipy.stats import fisher_exact, ks_2samp

    t = thresholds
    rng = np.random.default_rng(seed)
    n_ref, n_win = reference.size, window.size
    skip_notes = skip_notes or {}
    if n_win < t.min_window_size or n_ref < t.min_reference_size:
        reason = (
            f"insufficient data: the window has {n_win} texts (minimum {t.min_window_size}) and the "
            f"reference {n_ref} (minimum {t.min_reference_size}); nothing was tested"
        )
        return DriftDecision(
            status="insufficient_data", reason=reason, reference_size=n_ref, window_size=n_win, alpha=t.alpha
        )
    expected_tests = 6
    permutations = max(t.permutations, math.ceil(2 * expected_tests / t.alpha))
    tests: list[DriftTest] = []

    def missing(name: str, effect_name: str) -> DriftTest:
        return _skipped(name, skip_notes.get(name, "no data for it on both sides"), effect_name)

    if reference.labels is not None and window.labels is not None:
        statistic, p, index, method, *_ = label_test(
            np.asarray(reference.labels, str), np.asarray(window.labels, str), rng, simulations=max(2000, permutations)
        )
        tests.append(
            DriftTest(
                name="label",
                title=TEST_TITLES["label"],
                method=method,
                statistic=statistic,
                p_value=p,
                effect_name="PSI",
                effect=index,
                threshold=t.label_psi,
            )
        )
    else:
        tests.append(missing("label", "PSI"))

    if reference.confidence is not None and window.confidence is not None:
        ks = ks_2samp(reference.confidence, window.confidence)
        tests.append(
            DriftTest(
                name="confidence",
                title=TEST_TITLES["confidence"],
                method="Kolmogorov-Smirnov two-sample",
                statistic=float(ks.statistic),
                p_value=float(ks.pvalue),
                effect_name="KS distance",
                effect=float(ks.statistic),
                threshold=t.confidence_ks,
                reference_value=float(np.mean(reference.confidence)),
                window_value=float(np.mean(window.confidence)),
            )
        )
        ref_low = int(np.sum(reference.confidence < t.low_confidence_threshold))
        win_low = int(np.sum(window.confidence < t.low_confidence_threshold))
        odds, p = fisher_exact([[ref_low, n_ref - ref_low], [win_low, n_win - win_low]])
        ref_share, win_share = ref_low / n_ref, win_low / n_win
        tests.append(
            DriftTest(
                name="low_confidence",
                title=TEST_TITLES["low_confidence"],
                method=f"Fisher exact test (probability < {t.low_confidence_threshold:g})",
                statistic=float(odds) if np.isfinite(odds) else None,
                p_value=float(p),
                effect_name="share change",
                effect=abs(win_share - ref_share),
                threshold=t.low_confidence_share_change,
                reference_value=ref_share,
                window_value=win_share,
            )
        )
    else:
        tests += [missing("confidence", "KS distance"), missing("low_confidence", "share change")]

    if reference.length is not None and window.length is not None:
        ks = ks_2samp(reference.length, window.length)
        tests.append(
            DriftTest(
                name="length",
                title=TEST_TITLES["length"],
                method="Kolmogorov-Smirnov two-sample",
                statistic=float(ks.statistic),
                p_value=float(ks.pvalue),
                effect_name="PSI (reference deciles)",
                effect=decile_psi(np.asarray(reference.length, float), np.asarray(window.length, float)),
                threshold=t.length_psi,
                reference_value=float(np.median(reference.length)),
                window_value=float(np.median(window.length)),
            )
        )
    else:
        tests.append(missing("length", "PSI (reference deciles)"))

    if all(v is not None for v in (reference.unknown, reference.tokens, window.unknown, window.tokens)):
        change, p, ref_rate, win_rate = rate_permutation_test(
            reference.unknown, reference.tokens, window.unknown, window.tokens, rng, permutations
        )
        tests.append(
            DriftTest(
                name="unknown_tokens",
                title=TEST_TITLES["unknown_tokens"],
                method=f"permutation test over texts ({permutations} permutations)",
                statistic=change,
                p_value=p,
                effect_name="rate change",
                effect=abs(change),
                threshold=t.unknown_token_rate_change,
                reference_value=ref_rate,
                window_value=win_rate,
            )
        )
    else:
        tests.append(missing("unknown_tokens", "rate change"))

    if reference.embeddings is not None and window.embeddings is not None:
        x, y = reference.embeddings, window.embeddings
        cap = t.max_embedding_texts
        x = x[rng.choice(len(x), cap, replace=False)] if len(x) > cap else x
        y = y[rng.choice(len(y), cap, replace=False)] if len(y) > cap else y
        mmd2, p, null, bandwidth = mmd_permutation_test(x, y, rng, permutations)
        if diagnostics is not None:
            diagnostics.update(mmd_null=null, mmd2=mmd2, bandwidth=bandwidth)
        tests.append(
            DriftTest(
                name="embedding",
                title=TEST_TITLES["embedding"],
                method=f"MMD, RBF kernel (median heuristic, bandwidth {bandwidth:.3g}), {permutations} permutations, "
                f"{len(x)} vs {len(y)} texts",
                statistic=mmd2,
                p_value=p,
                effect_name="MMD²",
                effect=mmd2,
                threshold=t.embedding_mmd2,
            )
        )
    else:
        tests.append(missing("embedding", "MMD²"))

    ran = [test for test in tests if test.ran]
    adjusted = holm([test.p_value for test in ran]) if ran else []
    decided = {}
    for test, p_adj in zip(ran, adjusted):
        fires = p_adj <= t.alpha and (test.effect or 0.0) >= (test.threshold or 0.0)
        decided[test.name] = test.model_copy(update={"p_adjusted": p_adj, "drift": bool(fires)})
    tests = [decided.get(test.name, test) for test in tests]
    fired = [test for test in tests if test.drift]
    if fired:
        status: Status = "drift"
        reason = "drift: " + "; ".join(
            f"{test.title.lower()} ({test.effect_name} {test.effect:.3g} >= {test.threshold:g}, Holm-adjusted "
            f"p {test.p_adjusted:.2g} <= {t.alpha:g})"
            for test in fired
        )
    else:
        status = "no_drift"
        significant = [test for test in tests if test.ran and test.p_adjusted <= t.alpha]
        reason = f"no drift: no test both significant (Holm-adjusted p <= {t.alpha:g}) and above its effect threshold"
        if significant:
            reason += (
                " (significant but below the effect threshold: "
                + ", ".join(
                    f"{test.name} {test.effect_name} {test.effect:.3g} < {test.threshold:g}" for test in significant
                )
                + ")"
            )
    return DriftDecision(
        status=status, reason=reason, reference_size=n_ref, window_size=n_win, alpha=t.alpha, tests=tuple(tests)
    )


# ----------------------------------------------------------------------------------------------------------
# Text features: unknown tokens and sentence embeddings
# ----------------------------------------------------------------------------------------------------------


def unknown_token_counts(tokenizer, texts: list[str], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(unknown tokens, tokens) per text, over the whole text (no truncation, no special tokens)."""
    unknown_id = tokenizer.unk_token_id
    unknown, totals = np.zeros(len(texts), np.int64), np.zeros(len(texts), np.int64)
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(texts[start : start + batch_size], add_special_tokens=False, truncation=False, verbose=False)[
            "input_ids"
        ]
        for offset, row in enumerate(ids):
            unknown[start + offset] = sum(1 for token in row if token == unknown_id)
            totals[start + offset] = len(row)
    return unknown, totals


def embed_texts(tokenizer, encoder, texts: list[str], max_length: int, batch_size: int = 32) -> np.ndarray:
    """Sentence embeddings: the encoder's last hidden state mean-pooled over the real tokens, L2-normalised.
    Texts are batched by length so little is padded."""
    import torch

    device = next(encoder.parameters()).device
    order = np.argsort([len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            index = order[start : start + batch_size]
            encoded = tokenizer(
                [texts[i] for i in index], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            ).to(device)
            hidden = encoder(**encoded).last_hidden_state.float()
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            pooled = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
            if out is None:
                out = np.zeros((len(texts), pooled.shape[1]), np.float32)
            out[index] = pooled
    return out if out is not None else np.zeros((0, 0), np.float32)


# ----------------------------------------------------------------------------------------------------------
# Windows: the reference, texts from files, the request log
# ----------------------------------------------------------------------------------------------------------


def _write_parquet_atomically(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _window_frame(text, label, probability, length) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "text": pd.Series(text, dtype=object),
            "label": pd.Series(label, dtype=object).astype(str),
            "probability": pd.Series(probability, dtype=float),
            "length_chars": pd.Series(length, dtype="Int64"),  # null where the request log could not read the text
        }
    )


def reference_from_test_split(test_split: Path, model_version: str, target: Path) -> Window:
    """The champion's held-out test split (text, label, predicted, probability) as the reference window: what
    the champion predicted, and how confidently, on in-distribution texts it was not trained on."""
    frame = pd.read_parquet(test_split)
    missing = {"text", "predicted", "probability"} - set(frame.columns)
    if missing:
        raise ValueError(
            f"{test_split} lacks column(s) {', '.join(sorted(missing))}: it is not the evaluation stage's "
            f"test_predictions.parquet. Register models with the training flow, which writes it."
        )
    texts = frame["text"].astype(str)
    window = _window_frame(
        texts.to_numpy(),
        frame["predicted"].astype(str).to_numpy(),
        frame["probability"].to_numpy(),
        texts.str.len().to_numpy(),
    )
    _write_parquet_atomically(window, target)
    return Window(
        path=target,
        rows=len(window),
        texts=len(window),
        rows_seen=len(frame),
        model_version=model_version,
        description=f"test split of {model_version} ({len(window)} held-out texts)",
    )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def collect_texts(
    source: ScoringSource, max_texts: int, seed: int = 0, chunk_size: int = 10_000
) -> tuple[list[str], int, int]:
    """The source's texts, normalised like the training data (tasks.training.preprocess.clean_text), blank ones and
    exact duplicates dropped (the reference has none either), and at most `max_texts` of them: a uniform random
    sample when there are more. Returns (texts, texts read, duplicates dropped)."""
    from tasks.scoring.batch_score import iter_text_chunks
    from tasks.training.preprocess import clean_text

    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    kept = pd.DataFrame({"key": pd.Series(dtype=float), "text": pd.Series(dtype=object)})
    read = duplicates = 0
    for chunk in iter_text_chunks(source, chunk_size):
        texts = [clean_text(str(t)) for t in chunk["text"] if isinstance(t, str)]
        read += len(chunk)
        fresh = []
        for text in texts:
            if not text:
                continue
            digest = _digest(text)
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            fresh.append(text)
        if fresh:  # random keys, keep the smallest: a uniform sample without replacement, in bounded memory
            kept = pd.concat([kept, pd.DataFrame({"key": rng.random(len(fresh)), "text": fresh})], ignore_index=True)
            if len(kept) > max_texts:
                kept = kept.nsmallest(max_texts, "key")
    return kept.sort_index()["text"].tolist(), read, duplicates


def window_from_source(
    source: ScoringSource, model_dir: Path, model_version: str, target: Path, max_texts: int = 10_000, seed: int = 0
) -> Window:
    """Texts from files (or a hub dataset), scored here by the champion: labels, confidences and the texts."""
    from tasks.serving.classifier import TextClassifier

    texts, read, duplicates = collect_texts(source, max_texts, seed)
    notes = []
    if read - duplicates > max_texts:
        notes.append(f"{read - duplicates} distinct texts in the source; a uniform sample of {max_texts} was compared.")
    if texts:
        classifier = TextClassifier(model_dir)
        probabilities = classifier.predict_proba(texts)
        best = probabilities.argmax(axis=1)
        labels = [classifier.label_names[i] for i in best]
        confidence = probabilities.max(axis=1)
    else:
        labels, confidence = [], np.zeros(0)
    frame = _window_frame(texts, labels, confidence, [len(t) for t in texts])
    _write_parquet_atomically(frame, target)
    return Window(
        path=target,
        rows=len(frame),
        texts=len(frame),
        rows_seen=read,
        duplicates_dropped=duplicates,
        model_version=model_version,
        notes=tuple(notes),
        description=f"{source.source}: {read} texts read, {len(frame)} distinct compared",
    )


def window_from_request_log_frame(
    log: pd.DataFrame,
    model_version: str,
    target: Path,
    max_texts: int = 10_000,
    seed: int = 0,
    description: str = "request log",
) -> Window:
    """Requests of the log (columns of `tasks.serving.request_log.read_request_log`) served by `model_version`,
    deduplicated by text hash, as a window. Texts are kept where the log has them (raw-text logging on)."""
    missing = {"label", "probability", "length_chars", "model_version"} - set(log.columns)
    if missing:
        raise ValueError(
            f"The request log lacks column(s) {', '.join(sorted(missing))}; expected the columns "
            f"{', '.join(REQUEST_LOG_COLUMNS)}."
        )
    notes = []
    rows = len(log)
    # The service answers `<name>/<version>+<runtime>` (the runtime that answered, tasks/serving/onnx_runtime.py): every
    # runtime of the version counts as that version (older logs have no `+<runtime>`).
    ours = log["model_version"].astype(str).str.split("+", n=1).str[0] == model_version.split("+", 1)[0]
    served = log[ours]
    if len(served) < rows:
        others = log.loc[~ours, "model_version"].astype(str)
        notes.append(
            f"{rows - len(served)} of {rows} requests were served by other model versions "
            f"({', '.join(sorted(others.unique())[:5])}) and are not compared with {model_version}'s reference."
        )
    served = served[served["label"].notna() & served["probability"].notna()]
    before = len(served)
    if "text_sha256" in served.columns:  # the same text asked again (retries, popular texts) counts once
        served = served[served["text_sha256"].isna() | ~served["text_sha256"].duplicated()]
    duplicates = before - len(served)
    if len(served) > max_texts:
        served = served.sample(n=max_texts, random_state=seed).sort_index()
        notes.append(
            f"{before - duplicates} distinct requests in the window; a uniform sample of {max_texts} was compared."
        )
    text = served["text"] if "text" in served.columns else pd.Series([None] * len(served), index=served.index)
    text = text.where(text.notna(), None)
    frame = _window_frame(
        text.to_numpy(), served["label"].to_numpy(), served["probability"].to_numpy(), served["length_chars"].to_numpy()
    )
    known = int(frame["text"].notna().sum())
    if known < len(frame):
        notes.append(
            RAW_TEXT_NOTE
            if known == 0
            else f"Only {known} of {len(frame)} requests have their raw text logged: embedding and unknown-token "
            f"drift use those only."
        )
    notes.append(
        "Request-log lengths are of the raw request texts; the reference lengths are of the training "
        "data's normalised texts (whitespace runs collapsed), which can be slightly shorter."
    )
    _write_parquet_atomically(frame, target)
    return Window(
        path=target,
        rows=len(frame),
        texts=known,
        rows_seen=rows,
        duplicates_dropped=duplicates,
        model_version=model_version,
        notes=tuple(notes),
        description=f"{description}: {rows} requests, {len(frame)} distinct served by {model_version}",
    )


def default_request_log_dir() -> Path:
    """Where the service writes its request log by default: TEXTCLF_REQUEST_LOG_DIR, else
    <TEXTCLF_HOME or .textclf>/request-log (the service's own rule, tasks.serving.request_log.RequestLogSettings)."""
    from tasks.serving.request_log import RequestLogSettings

    return RequestLogSettings.from_env().resolved_directory()


def window_from_request_log(
    log_dir: Path | None, since, until, model_version: str, target: Path, max_texts: int = 10_000, seed: int = 0
) -> Window:
    """The service's request log between `since` and `until` (read with tasks.serving.request_log.read_request_log);
    `log_dir` None: the folder the service writes to by default."""
    from tasks.serving.request_log import read_request_log

    log_dir = Path(log_dir) if log_dir is not None else default_request_log_dir()
    if not log_dir.is_dir():
        raise ValueError(
            f"Request log folder {log_dir} does not exist: set request_log_dir (or "
            f"TEXTCLF_REQUEST_LOG_DIR) to the folder the service writes its request log to, or give "
            f"`source` to monitor a set of texts instead."
        )
    log = read_request_log(log_dir, since=since, until=until)
    return window_from_request_log_frame(
        log,
        model_version,
        target,
        max_texts,
        seed,
        description=f"request log {log_dir} from {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC",
    )


# ----------------------------------------------------------------------------------------------------------
# The comparison stage: features, tests, plots, report
# ----------------------------------------------------------------------------------------------------------


def _text_sample(
    frame: pd.DataFrame, tokenizer, encoder, max_length: int, thresholds: DriftThresholds, rng: np.random.Generator
) -> Sample:
    known = frame["text"].notna().to_numpy()
    lengths = frame["length_chars"].dropna().to_numpy(float)
    sample = Sample(
        labels=frame["label"].astype(str).to_numpy(),
        confidence=frame["probability"].to_numpy(float),
        length=lengths if len(lengths) else None,
    )
    if tokenizer is None or known.sum() == 0:
        return sample
    texts = frame.loc[known, "text"].astype(str).tolist()
    unknown = tokens = None
    if tokenizer.unk_token_id is not None:
        unknown, tokens = unknown_token_counts(tokenizer, texts)
    chosen = np.sort(rng.choice(len(texts), min(len(texts), thresholds.max_embedding_texts), replace=False))
    embeddings = (
        embed_texts(tokenizer, encoder, [texts[i] for i in chosen], max_length) if encoder is not None else None
    )
    return replace(sample, unknown=unknown, tokens=tokens, embeddings=embeddings)


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
    tokenizer = encoder = None
    max_length = 128
    skip_notes: dict[str, str] = {}
    has_texts = bool(reference.texts) and bool(window.texts)
    if not window.texts:
        skip_notes = {"unknown_tokens": RAW_TEXT_SKIP, "embedding": RAW_TEXT_SKIP}
    elif model_dir is None:
        skip_notes = {
            name: "no model given to tokenize and embed the texts" for name in ("unknown_tokens", "embedding")
        }
    elif has_texts:
        from tasks.serving.classifier import TextClassifier

        classifier = TextClassifier(model_dir)
        tokenizer, encoder, max_length = classifier.tokenizer, classifier.model.base_model, classifier.max_length
        if tokenizer.unk_token_id is None:
            skip_notes["unknown_tokens"] = (
                "the champion's tokenizer has no unknown token (byte-level): nothing to count"
            )
    reference_sample = _text_sample(ref_frame, tokenizer, encoder, max_length, thresholds, rng)
    window_sample = _text_sample(win_frame, tokenizer, encoder, max_length, thresholds, rng)
    if window.texts and window.texts < thresholds.min_window_size and window.texts < window.rows:
        # Too few logged raw texts for the text-based tests to mean anything.
        window_sample = replace(window_sample, unknown=None, tokens=None, embeddings=None)
        why = f"only {window.texts} requests have raw text (minimum {thresholds.min_window_size})"
        skip_notes.update(unknown_tokens=why, embedding=why)
    diagnostics: dict[str, Any] = {}
    decision = compare_samples(
        reference_sample, window_sample, thresholds, seed=seed, diagnostics=diagnostics, skip_notes=skip_notes
    )
    notes = (*reference.notes, *window.notes)
    staging = Path(tempfile.mkdtemp(dir=_mkdir(output_dir.parent), prefix=f".{output_dir.name}."))
    try:
        plots = write_plots(staging, reference_sample, window_sample, decision, thresholds, diagnostics)
        markdown = report_markdown(decision, reference, window, thresholds, plots, notes, context or {})
        (staging / REPORT_FILE).write_text(markdown)
        (staging / RESULT_FILE).write_text(json.dumps(decision.model_dump(mode="json"), indent=2))
        shutil.rmtree(output_dir, ignore_errors=True)
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return DriftReport(decision=decision, report_dir=output_dir, markdown=markdown, notes=notes)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_plots(
    folder: Path,
    reference: Sample,
    window: Sample,
    decision: DriftDecision,
    thresholds: DriftThresholds,
    diagnostics: dict[str, Any],
) -> list[tuple[str, str]]:
    """PNG plots of reference vs window; returns (file name, caption) pairs."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: list[tuple[str, str]] = []
    colors = {"reference": "#4C72B0", "window": "#DD8452"}
    if reference.labels is not None and window.labels is not None and window.size:
        labels = sorted(set(map(str, reference.labels)) | set(map(str, window.labels)))
        shares = {
            name: np.array([np.mean(np.asarray(values, str) == label) for label in labels])
            for name, values in (("reference", reference.labels), ("window", window.labels))
        }
        figure, axes = plt.subplots(figsize=(max(5.0, 0.8 * len(labels) + 2), 3.6))
        x = np.arange(len(labels))
        for offset, (name, values) in zip((-0.2, 0.2), shares.items()):
            axes.bar(
                x + offset,
                values,
                width=0.4,
                label=f"{name} (n={getattr(decision, name + '_size')})",
                color=colors[name],
            )
        axes.set_xticks(x, labels, rotation=30, ha="right")
        axes.set_ylabel("share of predictions")
        axes.set_title("Predicted labels")
        axes.legend()
        plots.append(_save(figure, folder / "labels.png", "Predicted-label shares, reference vs window"))
    if reference.confidence is not None and window.confidence is not None and window.size:
        figure, axes = plt.subplots(figsize=(6, 3.6))
        bins = np.linspace(0, 1, 21)
        for name, values in (("reference", reference.confidence), ("window", window.confidence)):
            axes.hist(values, bins=bins, density=True, alpha=0.55, label=name, color=colors[name])
        axes.axvline(
            thresholds.low_confidence_threshold,
            color="black",
            linestyle="--",
            linewidth=1,
            label="low-confidence threshold",
        )
        axes.set_xlabel("top-class probability")
        axes.set_ylabel("density")
        axes.set_title("Confidence")
        axes.legend()
        plots.append(_save(figure, folder / "confidence.png", "Confidence histograms, reference vs window"))
    if reference.length is not None and window.length is not None and window.size:
        figure, axes = plt.subplots(figsize=(6, 3.6))
        pooled = np.concatenate([reference.length, window.length]).astype(float)
        low, high = max(1.0, pooled.min()), max(2.0, pooled.max())
        bins = np.geomspace(low, high * 1.001, 30)
        for name, values in (("reference", reference.length), ("window", window.length)):
            axes.hist(
                np.maximum(np.asarray(values, float), low),
                bins=bins,
                density=True,
                alpha=0.55,
                label=name,
                color=colors[name],
            )
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes.set_xlabel("characters (log scale)")
        axes.set_ylabel("density")
        axes.set_title("Text length")
        axes.legend()
        plots.append(_save(figure, folder / "length.png", "Text-length histograms, reference vs window"))
    if reference.embeddings is not None and window.embeddings is not None and len(window.embeddings):
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        pooled = np.vstack([reference.embeddings, window.embeddings]).astype(float)
        centred = pooled - pooled.mean(axis=0)
        _, _, components = np.linalg.svd(centred, full_matrices=False)
        projected = centred @ components[:2].T
        n = len(reference.embeddings)
        left.scatter(*projected[:n].T, s=8, alpha=0.6, label="reference", color=colors["reference"])
        left.scatter(*projected[n:].T, s=8, alpha=0.6, label="window", color=colors["window"])
        left.set_title("Embeddings, first two principal components")
        left.legend()
        if "mmd_null" in diagnostics:
            right.hist(diagnostics["mmd_null"], bins=40, color="#999999", label="permutation null")
            right.axvline(
                diagnostics["mmd2"], color="#C44E52", linewidth=2, label=f"observed {diagnostics['mmd2']:.3g}"
            )
            right.set_xlabel("MMD²")
            right.set_title("MMD permutation test")
            right.legend()
        plots.append(
            _save(
                figure,
                folder / "embeddings.png",
                "Embeddings (PCA) and the MMD statistic against its permutation distribution",
            )
        )
    return plots


def _save(figure, path: Path, caption: str) -> tuple[str, str]:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name, caption


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def report_markdown(
    decision: DriftDecision,
    reference: Window,
    window: Window,
    thresholds: DriftThresholds,
    plots: list[tuple[str, str]],
    notes: tuple[str, ...],
    context: dict[str, str],
) -> str:
    verdict = {"drift": "DRIFT DETECTED", "no_drift": "no drift", "insufficient_data": "insufficient data"}[
        decision.status
    ]
    lines = [f"# Drift report: **{verdict}**", "", decision.reason[0].upper() + decision.reason[1:] + ".", ""]
    lines += [f"- **{key}:** {value}" for key, value in context.items()]
    lines += [f"- **Reference:** {reference.description}", f"- **Window:** {window.description}"]
    if window.duplicates_dropped:
        lines.append(f"- **Duplicates dropped from the window:** {window.duplicates_dropped}")
    lines += [
        "",
        f"Decision rule: each test's p-value is Holm-adjusted across the tests that ran (family-wise "
        f"false-alarm probability {thresholds.alpha:g} per run); a test reports drift when its adjusted "
        f"p-value is at most {thresholds.alpha:g} and its effect size reaches the threshold. Windows "
        f"under {thresholds.min_window_size} texts (references under {thresholds.min_reference_size}) "
        f"are not tested.",
        "",
    ]
    if decision.tests:
        lines += [
            "| test | method | statistic | p | Holm p | effect | threshold | reference | window | drift |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for test in decision.tests:
            if not test.ran:
                lines.append(f"| {test.title} | not run: {test.skipped} | | | | | | | | |")
                continue
            lines.append(
                f"| {test.title} | {test.method} | {_number(test.statistic)} | {_number(test.p_value, 2)} | "
                f"{_number(test.p_adjusted, 2)} | {test.effect_name} {_number(test.effect)} | {_number(test.threshold)} | "
                f"{_number(test.reference_value)} | {_number(test.window_value)} | {'**yes**' if test.drift else 'no'} |"
            )
        lines.append("")
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{caption}]({name})" for name, caption in plots]
        lines.append("")
    return "\n".join(lines)


def drift_metrics(report: DriftReport) -> dict[str, float]:
    """The numbers logged to MLflow on every run, so they form a time series across monitoring runs."""
    decision = report.decision
    metrics = {
        "drift_detected": float(decision.drift_detected),
        "drift_insufficient_data": float(decision.status == "insufficient_data"),
        "drift_window_size": float(decision.window_size),
        "drift_reference_size": float(decision.reference_size),
    }
    names = {
        "label": "drift_label",
        "confidence": "drift_confidence_ks",
        "low_confidence": "drift_low_confidence",
        "length": "drift_length",
        "unknown_tokens": "drift_unknown_tokens",
        "embedding": "drift_mmd",
    }
    for test in decision.tests:
        if not test.ran:
            continue
        prefix = names[test.name]
        metrics[f"{prefix}_pvalue"] = test.p_value
        metrics[f"{prefix}_pvalue_holm"] = test.p_adjusted
        metrics[f"{prefix}_drift"] = float(test.drift)
    extra = {
        "drift_label_psi": ("label", "effect"),
        "drift_label_chi2": ("label", "statistic"),
        "drift_confidence_ks": ("confidence", "statistic"),
        "drift_mean_confidence": ("confidence", "window_value"),
        "drift_low_confidence_share": ("low_confidence", "window_value"),
        "drift_low_confidence_share_reference": ("low_confidence", "reference_value"),
        "drift_length_psi": ("length", "effect"),
        "drift_length_ks": ("length", "statistic"),
        "drift_median_length": ("length", "window_value"),
        "drift_unknown_token_rate": ("unknown_tokens", "window_value"),
        "drift_unknown_token_rate_reference": ("unknown_tokens", "reference_value"),
        "drift_mmd2": ("embedding", "statistic"),
    }
    for key, (name, attribute) in extra.items():
        test = decision.test(name)
        if test is not None and test.ran and getattr(test, attribute) is not None:
            metrics[key] = getattr(test, attribute)
    return {key: float(value) for key, value in metrics.items() if value is not None and math.isfinite(value)}


def log_drift_report(tracking: TrackingRef, report: DriftReport) -> None:
    """The report folder as the run's `drift/` artifacts, the decision as tags."""
    client = tracking.client()
    client.log_artifacts(tracking.run_id, str(report.report_dir), "drift")
    client.set_tag(tracking.run_id, "drift.status", report.decision.status)
    client.set_tag(tracking.run_id, "drift.reason", report.decision.reason[:5000])


# ----------------------------------------------------------------------------------------------------------
# Acting on drift: event, notification, retraining
# ----------------------------------------------------------------------------------------------------------


def emit_drift_event(
    name: str, model_version: int, report: DriftReport, links: dict[str, str] | None = None
) -> str | None:
    """A `textclf.drift.detected` Prefect event about the registered model (automations can react to it).
    Returns the event id (None when events are off)."""
    from prefect.events import emit_event

    event = emit_event(
        event=DRIFT_EVENT,
        resource={
            "prefect.resource.id": f"textclf.registered-model.{name}",
            "prefect.resource.name": name,
            "textclf.model-version": str(model_version),
        },
        payload={
            "status": report.decision.status,
            "reason": report.decision.reason,
            "fired": report.decision.fired,
            "metrics": drift_metrics(report),
            **(links or {}),
        },
    )
    return str(event.id) if event is not None else None


def notify(block_slug: str | None, subject: str, body: str) -> bool:
    """Send through the Prefect notification block `block_slug` ('<block type>/<name>', e.g.
    'custom-webhook/drift-alerts' or 'slack-webhook/ml-alerts'); without one, a WARNING log line. A failed send
    raises, so the flow run shows it. Returns whether a block was used."""
    from prefect import get_run_logger
    from prefect.blocks.core import Block
    from prefect.exceptions import MissingContextError

    try:
        log = get_run_logger()
    except MissingContextError:
        log = logger
    if not block_slug:
        log.warning("%s\n%s", subject, body)
        return False
    if "/" not in block_slug:
        raise ValueError(
            f"notification_block {block_slug!r} is not a block slug: use '<block type>/<block name>', "
            f"e.g. 'custom-webhook/drift-alerts' or 'slack-webhook/ml-alerts'."
        )
    try:
        block = Block.load(block_slug)
    except ValueError as error:
        raise ValueError(
            f"Cannot load notification block {block_slug!r} ({error}): create it in the Prefect UI "
            f"(Blocks) or with Block.save(), or fix the name."
        ) from error
    if not callable(getattr(block, "notify", None)):
        raise ValueError(
            f"Block {block_slug!r} is a {type(block).__name__}, which cannot send notifications: use a "
            f"notification block (custom-webhook, slack-webhook, ...)."
        )
    raise_on_failure = getattr(block, "raise_on_failure", None)
    if raise_on_failure is not None:
        with raise_on_failure():
            block.notify(body, subject)
    else:
        block.notify(body, subject)
    log.info("Drift notification sent through %s", block_slug)
    return True


def _params_to_ingest_config(params: dict[str, str], source: str):
    from tasks.training.ingest import IngestConfig

    values: dict[str, object] = {}
    for key in IngestConfig.model_fields:
        if key in params:
            values[key] = None if params[key] == "None" else params[key]
    values["source"] = source
    return IngestConfig.model_validate(values)


def training_snapshot(
    tracking_uri: str, name: str, version: int, snapshot_dir: Path
) -> tuple[pd.DataFrame, str, list[str]]:
    """The dataset snapshot the model version was trained on (text, label, split), found from its training run:
    the Parquet named by its dataset input, else `snapshot_dir/<data_version>.parquet`, else the run's
    `data_source` ingested again with the run's ingest parameters. Returns (frame, where it came from, notes)."""
    from mlflow import MlflowClient

    from tasks.training.ingest import SNAPSHOT_COLUMNS, content_version, ingest

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(client.get_model_version(name, str(version)).run_id)
    data_version, data_source = run.data.tags.get("data_version"), run.data.tags.get("data_source")
    candidates: list[Path] = []
    for dataset_input in run.inputs.dataset_inputs if run.inputs else []:
        try:
            uri = json.loads(dataset_input.dataset.source).get("uri", "")
        except (TypeError, ValueError, AttributeError):
            continue
        if uri:
            candidates.append(Path(uri.removeprefix("file://")))
    if data_version:
        candidates.append(snapshot_dir / f"{data_version}.parquet")
    notes: list[str] = []
    for path in candidates:
        if path.is_file():
            frame = pd.read_parquet(path)
            if data_version and content_version(frame) != data_version:
                notes.append(f"{path} does not hold data version {data_version}; skipped.")
                continue
            return frame[SNAPSHOT_COLUMNS], str(path), notes
    if not data_source:
        raise ValueError(
            f"Cannot find the training data of {name} version {version}: its run {run.info.run_id} has no snapshot "
            f"reachable here ({', '.join(map(str, candidates)) or 'none recorded'}) and no data_source tag."
        )
    config = _params_to_ingest_config(run.data.params, data_source)
    with tempfile.TemporaryDirectory(prefix="textclf-reingest-") as folder:
        snapshot = ingest(config, Path(folder))
        frame = pd.read_parquet(snapshot.path)
    if data_version and snapshot.version != data_version:
        notes.append(
            f"The training data source {data_source!r} changed since {name} version {version} was trained "
            f"(data version {data_version}, now {snapshot.version}); its current content was used."
        )
    return frame[SNAPSHOT_COLUMNS], f"{data_source} (ingested again)", notes


def build_retraining_dataset(
    tracking_uri: str,
    name: str,
    version: int,
    new_labelled_data: str,
    snapshot_dir: Path,
    target_dir: Path,
    text_column: str = "text",
    label_column: str = "label",
):
    """The champion's training snapshot plus the new labelled rows, validated like any dataset and written
    atomically (content-addressed) under `target_dir`. When the training data has its own splits the new rows
    join `train`; otherwise the training flow splits the combined data. Returns the DatasetSnapshot."""
    from tasks.training.ingest import DatasetValidationError, IngestConfig, read_source, validate, write_snapshot

    base, origin, notes = training_snapshot(tracking_uri, name, version, snapshot_dir)
    for note in notes:
        logger.warning(note)
    path = Path(new_labelled_data).expanduser()
    if not path.is_file():
        raise ValueError(
            f"new_labelled_data {new_labelled_data!r}: no such file. Give a CSV, TSV, JSONL or Parquet "
            f"file with columns {text_column!r} and {label_column!r}."
        )
    new = read_source(IngestConfig(source=str(path), text_column=text_column, label_column=label_column))
    if new.empty:
        raise DatasetValidationError(f"{path} holds no rows: there is nothing to add to the training data.")
    has_splits = bool(base["split"].notna().any())
    new = new.assign(split="train" if has_splits else None)
    base = base.assign(origin=origin, row=range(1, len(base) + 1))
    combined = pd.concat([base, new[["text", "label", "split", "origin", "row"]]], ignore_index=True)
    source = f"{origin} + {path}"
    frame = validate(combined, IngestConfig(source=source))
    return write_snapshot(frame, target_dir, source=source)


def trigger_retraining(
    deployment: str,
    dataset_path: Path,
    registered_model_name: str,
    data_version: str,
    extra_parameters: dict[str, Any] | None = None,
) -> str:
    """Start a run of the retraining deployment on the combined dataset, without waiting for it. The
    idempotency key is the combined data's version: drift that persists over several monitoring runs with the
    same new data starts one retraining, not one a day."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        name=deployment,
        parameters={
            "dataset": {"source": str(dataset_path)},
            "registered_model_name": registered_model_name,
            **(extra_parameters or {}),
        },
        timeout=0,
        idempotency_key=f"textclf-drift-retraining-{registered_model_name}-{data_version}",
        tags=["textclf", "drift-retraining"],
    )
    return str(flow_run.id)


def since_until(window_hours: float, until=None):
    import datetime as dt

    end = until or dt.datetime.now(dt.UTC)
    if end.tzinfo is None:
        end = end.replace(tzinfo=dt.UTC)
    return end - dt.timedelta(hours=window_hours), end


def _retry_unless_misconfigured(task, task_run, state) -> bool:
    """Retry what may pass on a second try (a webhook or a file system that was down), not a wrong setting
    (a ValueError names it)."""
    try:
        state.result()
    except ValueError:
        return False
    except Exception:
        return True
    return False


reference_from_test_split_task = task(reference_from_test_split, name="drift-reference")
window_from_source_task = task(window_from_source, name="drift-window-from-source")
window_from_request_log_task = task(
    window_from_request_log,
    name="drift-window-from-request-log",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=_retry_unless_misconfigured,
)
detect_drift_task = task(detect_drift, name="detect-drift")
log_drift_report_task = task(log_drift_report, name="log-drift-report", retries=2, retry_delay_seconds=5)
emit_drift_event_task = task(emit_drift_event, name="emit-drift-event")
notify_task = task(
    notify, name="notify-drift", retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_unless_misconfigured
)
build_retraining_dataset_task = task(build_retraining_dataset, name="build-retraining-dataset")
trigger_retraining_task = task(trigger_retraining, name="trigger-retraining", retries=2, retry_delay_seconds=10)
