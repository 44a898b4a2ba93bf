"""Abstaining on low confidence: below `min_confidence` (the top class's softmax probability) an answer's label is
`unknown`; its probabilities are still given. One place for the rule, used by the service, batch scoring, the
evaluate stage (which suggests a threshold for a target coverage on the validation split) and bench/abstain.py.

Depends only on numpy, so the service and the MLflow model can import it cheaply."""

from __future__ import annotations

import math
import os

import numpy as np

UNKNOWN_LABEL = "unknown"


def check_min_confidence(value: float | None, what: str = "min_confidence") -> float | None:
    """None (never abstain) or a number in [0, 1]; anything else is a ValueError naming `what`."""
    if value is None:
        return None
    if not (0.0 <= float(value) <= 1.0):  # NaN fails too
        raise ValueError(f"{what}={value} must be between 0 and 1 (unset it to never abstain)")
    return float(value)


def check_label_names(names: list[str], min_confidence: float | None) -> None:
    """A model with a class named `unknown` cannot abstain: the answer would be ambiguous."""
    if min_confidence is not None and UNKNOWN_LABEL in names:
        raise ValueError(
            f"the model has a class named {UNKNOWN_LABEL!r}, so abstaining (min_confidence="
            f"{min_confidence}) would be ambiguous: unset min_confidence or rename the class"
        )


def abstains(confidence: np.ndarray, min_confidence: float | None) -> np.ndarray:
    """True where the top-class probability is below `min_confidence` (never with None)."""
    confidence = np.asarray(confidence, dtype=float)
    if min_confidence is None:
        return np.zeros(confidence.shape, dtype=bool)
    return confidence < min_confidence


def answer_label(label: str, confidence: float, min_confidence: float | None) -> str:
    return UNKNOWN_LABEL if min_confidence is not None and confidence < min_confidence else label


def threshold_for_coverage(confidence: np.ndarray, target_coverage: float) -> float:
    """The highest max-softmax threshold that still answers at least `target_coverage` of these texts (the answered
    ones are those with confidence >= threshold; ties can make the coverage a little higher than the target)."""
    confidence = np.sort(np.asarray(confidence, dtype=float))[::-1]
    if not len(confidence):
        return 0.0
    keep = min(len(confidence), max(1, math.ceil(target_coverage * len(confidence) - 1e-9)))
    return float(confidence[keep - 1])


def coverage_at(confidence: np.ndarray, correct: np.ndarray, threshold: float | None) -> tuple[float, float]:
    """(coverage, accuracy on the answered texts) at `threshold`; accuracy is NaN when nothing is answered."""
    answered = ~abstains(confidence, threshold)
    coverage = float(answered.mean()) if len(answered) else 0.0
    accuracy = float(np.asarray(correct, dtype=float)[answered].mean()) if answered.any() else float("nan")
    return coverage, accuracy


def accuracy_coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and accuracy on the answered texts when the k most confident texts are answered, k = 1..n (the
    selective-classification risk-coverage curve, as accuracy)."""
    order = np.argsort(-np.asarray(confidence, dtype=float), kind="stable")
    hits = np.cumsum(np.asarray(correct, dtype=float)[order])
    answered = np.arange(1, len(order) + 1)
    return answered / max(1, len(order)), hits / answered


def plot_accuracy_coverage(
    path: str | os.PathLike[str],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    title: str,
    marks: dict[str, tuple[float, float]] | None = None,
) -> None:
    """One line per curve (label -> (coverage, accuracy)); `marks` are labelled points (coverage, accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4.5))
    for label, (coverage, accuracy) in curves.items():
        axes.plot(coverage, accuracy, label=label)
    for label, (mark_coverage, mark_accuracy) in (marks or {}).items():
        axes.plot([mark_coverage], [mark_accuracy], "o", color="black")
        axes.annotate(
            label, (mark_coverage, mark_accuracy), textcoords="offset points", xytext=(-10, -14), ha="right", fontsize=8
        )
    axes.set_xlabel("coverage (share of texts answered)")
    axes.set_ylabel("accuracy on the answered texts")
    axes.set_xlim(0, 1.01)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
