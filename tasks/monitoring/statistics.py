"""The statistics of drift monitoring: two samples (the reference and the window) in, a decision out.

Six two-sample tests (seven for multi-label models), each with a test statistic, a p-value and an effect size:

| test | p-value | effect size (must also reach its threshold) |
|---|---|---|
| `label`: predicted-label distribution | chi-square test of homogeneity (Monte Carlo when counts are small) | PSI |
| `label_rates` (multi-label models): share of texts answered with each class | Fisher exact test per class, Bonferroni over the classes | largest change of a class's share |
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

Everything here is a plain function of numpy arrays (`compare_samples`); the drift stage (tasks/monitoring/drift.py)
and the benchmark (bench/drift_monitor.py) call the same functions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

Status = Literal["drift", "no_drift", "insufficient_data"]
FloatArray = npt.NDArray[np.float64]
Labels = npt.NDArray[np.str_] | npt.NDArray[np.object_]  # one predicted label per text
Numbers = npt.NDArray[np.floating[Any]] | npt.NDArray[np.integer[Any]]  # one number per text (or per bin)
TEST_TITLES = {
    "label": "Predicted-label distribution",
    "label_rates": "Per-label answer rates (multi-label)",
    "confidence": "Confidence (top-class probability)",
    "low_confidence": "Share of low-confidence predictions",
    "length": "Text length (characters)",
    "unknown_tokens": "Unknown-token rate",
    "embedding": "Sentence embeddings",
}


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
    label_rate_change: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Multi-label models: change of the share of texts answered with one class that counts as drift.",
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


@dataclass(frozen=True)
class Sample:
    """One side of the comparison as arrays; None where a quantity is not known (e.g. no raw texts)."""

    labels: Labels | None = None  # predicted label per text
    label_sets: list[list[str]] | None = None  # multi-label models: the classes each text was answered with
    confidence: Numbers | None = None  # top-class probability per text
    length: Numbers | None = None  # characters per text
    unknown: Numbers | None = None  # unknown tokens per text
    tokens: Numbers | None = None  # tokens per text
    embeddings: npt.NDArray[np.floating[Any]] | None = None  # one row per (sampled) text

    @property
    def size(self) -> int:
        for values in (self.labels, self.confidence, self.length, self.tokens, self.embeddings):
            if values is not None:
                return len(values)
        return 0


def psi(reference_counts: npt.ArrayLike, window_counts: npt.ArrayLike, smoothing: float = 0.5) -> float:
    """Population stability index sum((w - r) * ln(w / r)) over bins, with `smoothing` pseudo-counts per bin so
    that an empty bin costs a finite amount."""
    r = np.asarray(reference_counts, dtype=float) + smoothing
    w = np.asarray(window_counts, dtype=float) + smoothing
    r, w = r / r.sum(), w / w.sum()
    return float(np.sum((w - r) * np.log(w / r)))


def label_rates_test(reference: list[list[str]], window: list[list[str]]) -> tuple[float, float, str, float, float]:
    """Per class, Fisher's exact test of the share of texts answered with it (reference vs window); the p-value is
    the smallest one times the number of classes (Bonferroni), the effect the largest absolute change of a share.
    Returns (p, effect, the class that changed most, its reference share, its window share)."""
    from scipy.stats import fisher_exact

    classes = sorted({c for row in reference for c in row} | {c for row in window for c in row})
    if not classes or not reference or not window:
        return 1.0, 0.0, "", 0.0, 0.0
    change, changed, ref_most, win_most = 0.0, "", 0.0, 0.0
    smallest = 1.0
    for name in classes:
        ref_in = sum(name in row for row in reference)
        win_in = sum(name in row for row in window)
        _, p = fisher_exact([[ref_in, len(reference) - ref_in], [win_in, len(window) - win_in]])
        smallest = min(smallest, float(p))
        ref_share, win_share = ref_in / len(reference), win_in / len(window)
        if abs(win_share - ref_share) > change:
            change, changed, ref_most, win_most = abs(win_share - ref_share), name, ref_share, win_share
    return min(1.0, smallest * len(classes)), change, changed, ref_most, win_most


def label_test(
    reference: Labels, window: Labels, rng: np.random.Generator, simulations: int = 2000
) -> tuple[float, float, float, str, list[str], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Chi-square test of homogeneity of two label samples (the reference is a sample too, so this is a 2 x k
    contingency test, not goodness of fit against fixed proportions). When an expected count is below 5 the
    p-value is a Monte Carlo one: window counts drawn from the multivariate hypergeometric distribution, which
    is exactly the permutation distribution of the table. Returns (chi2, p, psi, method, labels, ref counts,
    window counts)."""
    from scipy.stats import chi2_contingency

    labels = sorted(set(map(str, reference)) | set(map(str, window)))
    ref_counts = np.array([np.sum(reference == label) for label in labels], dtype=np.int64)
    win_counts = np.array([np.sum(window == label) for label in labels], dtype=np.int64)
    index = psi(ref_counts, win_counts)
    if len(labels) < 2:
        return 0.0, 1.0, index, "one label only", labels, ref_counts, win_counts
    table = np.vstack([ref_counts, win_counts])
    totals, n_window, n = table.sum(axis=0), win_counts.sum(), table.sum()
    expected = np.outer(table.sum(axis=1), totals) / n

    def chi2(window_counts: npt.NDArray[np.int64]) -> FloatArray:
        observed = np.stack([totals - window_counts, window_counts], axis=-2)
        statistics: FloatArray = np.sum((observed - expected) ** 2 / expected, axis=(-2, -1))
        return statistics

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


def decile_psi(reference: FloatArray, window: FloatArray, bins: int = 10) -> float:
    """PSI of a continuous quantity over bins at the reference's quantiles."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    return psi(
        np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1),
        np.bincount(np.searchsorted(edges, window, side="right"), minlength=len(edges) + 1),
    )


def rate_permutation_test(
    ref_hits: Numbers,
    ref_totals: Numbers,
    win_hits: Numbers,
    win_totals: Numbers,
    rng: np.random.Generator,
    permutations: int,
) -> tuple[float, float, float, float]:
    """Two-sided permutation test of a pooled rate sum(hits)/sum(totals) (e.g. unknown tokens per token), with
    whole texts as the exchangeable units: tokens of one text are not independent, so a per-token z-test would
    be over-confident. Returns (window rate - reference rate, p, reference rate, window rate)."""
    hits = np.concatenate([ref_hits, win_hits]).astype(float)
    totals = np.concatenate([ref_totals, win_totals]).astype(float)
    n_ref = len(ref_hits)

    def difference(in_window: FloatArray) -> FloatArray:  # in_window: (..., N) 0/1 weights
        w_hits, w_tot = in_window @ hits, in_window @ totals
        r_hits, r_tot = hits.sum() - w_hits, totals.sum() - w_tot
        rates: FloatArray = w_hits / np.maximum(w_tot, 1) - r_hits / np.maximum(r_tot, 1)
        return rates

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
    x: npt.NDArray[np.floating[Any]], y: npt.NDArray[np.floating[Any]], rng: np.random.Generator, permutations: int
) -> tuple[float, float, FloatArray, float]:
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
    null: list[FloatArray] = []
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

    if reference.label_sets is not None and window.label_sets is not None:
        p, change, name, ref_share, win_share = label_rates_test(reference.label_sets, window.label_sets)
        tests.append(
            DriftTest(
                name="label_rates",
                title=TEST_TITLES["label_rates"],
                method="Fisher exact test per class, Bonferroni over the classes"
                + (f" (largest change: '{name}')" if name else ""),
                statistic=change,
                p_value=p,
                effect_name="largest share change",
                effect=change,
                threshold=t.label_rate_change,
                reference_value=ref_share,
                window_value=win_share,
            )
        )

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

    ref_unknown, ref_tokens, win_unknown, win_tokens = (
        reference.unknown,
        reference.tokens,
        window.unknown,
        window.tokens,
    )
    if ref_unknown is not None and ref_tokens is not None and win_unknown is not None and win_tokens is not None:
        change, p, ref_rate, win_rate = rate_permutation_test(
            ref_unknown, ref_tokens, win_unknown, win_tokens, rng, permutations
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

    ran = [test for test in tests if test.ran and test.p_value is not None]
    adjusted = holm([test.p_value for test in ran if test.p_value is not None]) if ran else []
    decided: dict[str, DriftTest] = {}
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
        significant = [test for test in tests if test.p_adjusted is not None and test.p_adjusted <= t.alpha]
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
