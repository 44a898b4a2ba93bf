"""The drift report: PNG plots of reference against window, the markdown report that explains the decision, the
decision as JSON, written together into one folder; and what goes to MLflow (the folder as the run's `drift/`
artifacts, the decision as tags, the numbers as metrics that form a time series across monitoring runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from tasks.common.atomic import atomic_directory
from tasks.monitoring.statistics import DriftDecision, DriftThresholds, Sample
from tasks.monitoring.windows import Window
from tasks.tracking import TrackingRef

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_FILE = "report.md"
RESULT_FILE = "drift.json"


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


def write_report_folder(
    output_dir: Path,
    reference: Window,
    window: Window,
    reference_sample: Sample,
    window_sample: Sample,
    decision: DriftDecision,
    thresholds: DriftThresholds,
    diagnostics: dict[str, Any],
    context: dict[str, str],
) -> DriftReport:
    """`output_dir/report.md` with its PNG plots and `drift.json`, written in a staging folder and renamed into
    place, so a reader never sees half a report."""
    notes = (*reference.notes, *window.notes)
    with atomic_directory(output_dir) as staging:
        plots = write_plots(staging, reference_sample, window_sample, decision, thresholds, diagnostics)
        markdown = report_markdown(decision, reference, window, thresholds, plots, notes, context)
        (staging / REPORT_FILE).write_text(markdown)
        (staging / RESULT_FILE).write_text(json.dumps(decision.model_dump(mode="json"), indent=2))
    return DriftReport(decision=decision, report_dir=output_dir, markdown=markdown, notes=notes)


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
        bins = np.linspace(0, 1, 21).tolist()  # a list: matplotlib's stubs take a sequence, not an array
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
        edges = np.geomspace(low, high * 1.001, 30).tolist()
        for name, values in (("reference", reference.length), ("window", window.length)):
            axes.hist(
                np.maximum(np.asarray(values, float), low),
                bins=edges,
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


def _save(figure: Figure, path: Path, caption: str) -> tuple[str, str]:
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
    metrics: dict[str, float | None] = {
        "drift_detected": float(decision.drift_detected),
        "drift_insufficient_data": float(decision.status == "insufficient_data"),
        "drift_window_size": float(decision.window_size),
        "drift_reference_size": float(decision.reference_size),
    }
    names = {
        "label": "drift_label",
        "label_rates": "drift_label_rates",
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
        found = decision.test(name)
        if found is not None and found.ran and getattr(found, attribute) is not None:
            metrics[key] = getattr(found, attribute)
    return {key: float(value) for key, value in metrics.items() if value is not None and math.isfinite(value)}


def log_drift_report(tracking: TrackingRef, report: DriftReport) -> None:
    """The report folder as the run's `drift/` artifacts, the decision as tags."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    client.log_artifacts(tracking.run_id, str(report.report_dir), "drift")
    client.set_tag(tracking.run_id, "drift.status", report.decision.status)
    client.set_tag(tracking.run_id, "drift.reason", report.decision.reason[:5000])
