"""Test-split scores of one model on the texts the promotion judges it by: what the gate compares (candidate vs
champion) and what the runtime gate compares (ONNX variants vs PyTorch). One typed result, computed one way."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict


class TestScores(BaseModel):
    """Macro-F1, per-class F1 (by label string), accuracy and the number of texts scored."""

    __test__ = False  # not a pytest test class, despite its name
    model_config = ConfigDict(frozen=True)

    macro_f1: float
    per_class_f1: dict[str, float] = {}
    accuracy: float = 0.0
    n: int = 0


def score_labels(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> TestScores:
    """Scores of `predicted` against `truth` over the classes `labels` (a class never predicted scores F1 0)."""
    from sklearn.metrics import f1_score

    per_class = f1_score(list(truth), list(predicted), labels=list(labels), average=None, zero_division=0)
    return TestScores(
        macro_f1=float(per_class.mean()) if len(labels) else 0.0,
        per_class_f1={label: float(value) for label, value in zip(labels, per_class, strict=True)},
        accuracy=float(sum(t == p for t, p in zip(truth, predicted, strict=True)) / max(1, len(truth))),
        n=len(truth),
    )
