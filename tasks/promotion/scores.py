"""Test-split scores of one model on the texts the promotion judges it by: what the gate compares (candidate vs
champion) and what the runtime gate compares (ONNX variants vs PyTorch). One typed result, computed one way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def score_label_sets(
    truth: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]], labels: Sequence[str]
) -> TestScores:
    """Multi-label scores: per class the F1 of "the text has this class", macro-F1 their mean, and `accuracy` the
    subset accuracy (the whole set of a text's classes right)."""
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    binarizer = MultiLabelBinarizer(classes=list(labels))
    known = set(labels)
    true_matrix = binarizer.fit_transform([[c for c in row if c in known] for row in truth])
    predicted_matrix = binarizer.transform([[c for c in row if c in known] for row in predicted])
    per_class = f1_score(true_matrix, predicted_matrix, average=None, zero_division=0)
    exact = sum(set(t) == set(p) for t, p in zip(truth, predicted, strict=True))
    return TestScores(
        macro_f1=float(per_class.mean()) if len(labels) else 0.0,
        per_class_f1={label: float(value) for label, value in zip(labels, per_class, strict=True)},
        accuracy=float(exact / max(1, len(truth))),
        n=len(truth),
    )


def is_label_sets(values: Sequence[object]) -> bool:
    """Whether a column holds label lists (a multi-label test split or answer) rather than one label per text."""
    return len(values) > 0 and not isinstance(values[0], str) and hasattr(values[0], "__len__")


def score_answers(truth: Sequence[Any], predicted: Sequence[Any], labels: Sequence[str]) -> TestScores:
    """`score_label_sets` for label lists (multi-label), else `score_labels`."""
    if is_label_sets(truth):
        return score_label_sets(truth, predicted, labels)
    return score_labels(truth, predicted, labels)


def answer_classes(truth: Sequence[Any]) -> list[str]:
    """The classes present in a test split's labels (single labels or label lists), sorted."""
    if is_label_sets(truth):
        return sorted({str(c) for row in truth for c in row})
    return sorted({str(c) for c in truth})


def as_answers(values: Sequence[Any]) -> list[Any]:
    """A column of labels as plain Python values: str per text, or for label lists a list of str per text (Parquet
    gives numpy arrays back)."""
    if is_label_sets(values):
        return [[str(c) for c in row] for row in values]
    return [str(v) for v in values]
