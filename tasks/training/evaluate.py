"""Stage 4, evaluate: score the fine-tuned model on the test split, next to a TF-IDF + logistic regression
baseline trained on the same train split. Writes metrics.json, PNG plots, predictions and a markdown report.

Abstaining: on the validation split it picks the max-softmax threshold that answers `target_coverage` of the texts
(metric `suggested_min_confidence`, a suggestion for TEXTCLF_MIN_CONFIDENCE / `textclf score --min-confidence`), and
reports on the test split the coverage and the accuracy on the answered texts at that threshold, with the
accuracy-vs-coverage curve (accuracy_coverage.png)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pandas as pd
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.common.atomic import atomic_directory
from tasks.contracts import EvaluationResult, FineTunedModel, PreparedDataset
from tasks.serving.abstention import (
    accuracy_coverage_curve,
    coverage_at,
    plot_accuracy_coverage,
    threshold_for_coverage,
)

if TYPE_CHECKING:
    from tasks.serving.classifier import TextClassifier


class EvaluationConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    batch_size: int = Field(default=64, ge=1, le=4096)
    calibration_bins: int = Field(default=15, ge=2, le=100)
    latency_samples: int = Field(default=20, ge=1, le=1000, description="Single-text calls timed for latency.")
    target_coverage: float = Field(
        default=0.95,
        gt=0,
        le=1,
        description="Share of the validation texts the suggested abstention threshold (suggested_min_confidence, the "
        "max-softmax probability below which a text is answered 'unknown') still answers.",
    )


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int) -> tuple[float, pd.DataFrame]:
    """ECE over equal-width confidence bins, and the per-bin table behind the reliability diagram."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table = pd.DataFrame({"bin": index, "confidence": confidence, "correct": correct.astype(float)})
    per_bin = table.groupby("bin").agg(
        count=("correct", "size"), accuracy=("correct", "mean"), confidence=("confidence", "mean")
    )
    per_bin = per_bin.reindex(range(bins)).fillna({"count": 0})
    per_bin["lower"], per_bin["upper"] = edges[:-1], edges[1:]
    filled = per_bin[per_bin["count"] > 0]
    ece = float((filled["count"] / len(confidence) * (filled["accuracy"] - filled["confidence"]).abs()).sum())
    return ece, per_bin


def one_vs_rest_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    # Classes absent from the test split have no ROC curve: average over the classes present.
    scores = [roc_auc_score(labels == k, probabilities[:, k]) for k in present]
    return float(np.mean(scores))


def tfidf_baseline(train: pd.DataFrame, test: pd.DataFrame, seed: int = 0) -> npt.NDArray[np.int64]:
    """The cheap baseline a fine-tune has to beat: word 1-2-gram TF-IDF + logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipeline = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, max_features=200_000),
        LogisticRegression(max_iter=2000, C=10.0, random_state=seed),
    )
    pipeline.fit(train["text"], train["label_id"])
    predicted: npt.NDArray[np.int64] = pipeline.predict(test["text"])  # the label ids, as trained on
    return predicted


def tfidf_one_vs_rest_baseline(
    train: pd.DataFrame, test: pd.DataFrame, num_labels: int, seed: int = 0
) -> npt.NDArray[np.int64]:
    """The multi-label baseline: the same TF-IDF features, one logistic regression per class (one-vs-rest), a class
    predicted at probability 0.5. A class every training text has (or none has) is predicted constant."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline

    targets = np.stack(train["label_vector"].to_numpy()).astype(int)
    predicted = np.zeros((len(test), num_labels), dtype=np.int64)
    varying = np.flatnonzero(targets.min(axis=0) != targets.max(axis=0))
    predicted[:, targets.min(axis=0) == 1] = 1
    if len(varying):
        pipeline = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, max_features=200_000),
            OneVsRestClassifier(LogisticRegression(max_iter=2000, C=10.0, random_state=seed)),
        )
        pipeline.fit(train["text"], targets[:, varying])
        predicted[:, varying] = np.asarray(pipeline.predict(test["text"])).reshape(len(test), len(varying))
    return predicted


def _length_slices(token_lengths: np.ndarray) -> pd.Series:
    """Three slices by token length (terciles)."""
    lengths = pd.Series(token_lengths)
    slices = pd.Series("all", index=lengths.index, dtype=object)
    if lengths.nunique() >= 3:
        bins = pd.qcut(lengths, 3, duplicates="drop")
        slices = bins.map(lambda b: f"{int(b.left) + 1}-{int(b.right)} tokens").astype(object)
    return slices


def _slice_scores(slices: pd.Series, labels: np.ndarray, predicted: np.ndarray, baseline: np.ndarray) -> pd.DataFrame:
    from sklearn.metrics import accuracy_score, f1_score

    frame = pd.DataFrame({"slice": slices.to_numpy(), "y": labels, "p": predicted, "b": baseline})
    return frame.groupby("slice", sort=False).apply(
        lambda g: pd.Series(
            {
                "texts": len(g),
                "accuracy": accuracy_score(g["y"], g["p"]),
                "macro_f1": f1_score(g["y"], g["p"], average="macro", zero_division=0),
                "baseline_accuracy": accuracy_score(g["y"], g["b"]),
            }
        ),
        include_groups=False,
    )


def _plots(
    folder: Path,
    label_names: list[str],
    confusion: npt.NDArray[np.int64],
    per_bin: pd.DataFrame,
    per_class: pd.DataFrame,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.6 * len(label_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(confusion, cmap="Blues")
    axes.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right")
    axes.set_yticks(range(len(label_names)), label_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, column), value in np.ndenumerate(confusion):
        axes.text(
            column, row, str(value), ha="center", va="center", color="white" if value > confusion.max() / 2 else "black"
        )
    axes.set_title("Confusion matrix (test)")
    figure.tight_layout()
    figure.savefig(folder / "confusion_matrix.png", dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(5, 5))
    centers = (per_bin["lower"] + per_bin["upper"]) / 2
    filled = per_bin["count"] > 0
    axes.bar(
        centers[filled],
        per_bin.loc[filled, "accuracy"],
        width=1 / len(per_bin),
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    axes.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.set_title("Reliability diagram (test)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(folder / "reliability_diagram.png", dpi=120)
    plt.close(figure)

    _per_class_plot(folder, label_names, per_class)


def _per_class_plot(folder: Path, label_names: list[str], per_class: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(5.0, 0.8 * len(label_names) + 2), 4))
    positions = np.arange(len(label_names))
    axes.bar(positions - 0.2, per_class["f1"], width=0.4, label="fine-tuned")
    axes.bar(positions + 0.2, per_class["baseline_f1"], width=0.4, label="TF-IDF baseline")
    axes.set_xticks(positions, label_names, rotation=45, ha="right")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("F1")
    axes.set_title("Per-class F1 (test)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(folder / "per_class_f1.png", dpi=120)
    plt.close(figure)


def _imbalance(label_ids: np.ndarray, num_labels: int) -> float:
    """Largest class count over smallest (classes present in the split)."""
    counts = np.bincount(label_ids, minlength=num_labels)
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def improvement_hints(metrics: dict[str, float]) -> list[str]:
    """What to try when the fine-tuned model did not earn its cost: it answers one class only, or the TF-IDF
    baseline beats it. Each hint names the option that sets it (the same in `textclf train` and the Prefect form)."""
    hints = []
    if metrics.get("test_predicted_classes", 2) <= 1:
        hints.append(
            "The fine-tuned model answers one class only on the test split: it learned the majority class. With "
            "imbalanced classes set --class-weighted-loss; otherwise train longer (--epochs) or at a higher "
            "--learning-rate."
        )
    model, baseline = metrics.get("test_macro_f1", 0.0), metrics.get("baseline_macro_f1", 0.0)
    if model < baseline:
        tries = []
        if metrics.get("train_class_imbalance", 1.0) >= 3:
            tries.append(
                f"--class-weighted-loss (the largest class is {metrics['train_class_imbalance']:.0f}x the smallest)"
            )
        if metrics.get("truncated_share", 0.0) >= 0.2:
            tries.append(
                f"--truncation chunks or head+tail ({metrics['truncated_share']:.0%} of the test texts are longer "
                "than one window)"
            )
        tries += ["more --epochs", "a search over the settings (textclf sweep)"]
        hints.append(
            f"The TF-IDF + logistic regression baseline beats the fine-tuned model (macro-F1 {baseline:.4f} vs "
            f"{model:.4f}). Try " + "; ".join(tries) + "."
        )
    return hints


def _class_and_length_tables(per_class: pd.DataFrame, long_short: pd.DataFrame, how_long: str) -> list[str]:
    """The report's per-class table and its long-vs-short-texts table, as markdown lines."""
    return [
        "## Per class",
        "",
        per_class.to_markdown(floatfmt=".4f"),
        "",
        f"## Long and short texts ({how_long})",
        "",
        long_short.to_markdown(floatfmt=".4f"),
        "",
    ]


def _report(
    metrics: dict[str, float],
    per_class: pd.DataFrame,
    slices: pd.DataFrame,
    long_short: pd.DataFrame,
    context: dict[str, str],
    truncation: str,
    max_length: int,
) -> str:
    reads = {
        "head": "only their first tokens",
        "tail": "only their last tokens",
        "head+tail": "only their first and last tokens",
        "chunks": "overlapping windows over the whole text, whose logits are averaged",
    }[truncation]
    lines = ["# Model report", ""]
    lines += [f"- **{key}**: {value}" for key, value in context.items()]
    hints = improvement_hints(metrics)
    if hints:
        lines += ["", "## What to try", "", *[f"- {hint}" for hint in hints]]
    lines += [
        "",
        "## Test metrics",
        "",
        "| metric | fine-tuned | TF-IDF + logistic regression |",
        "|---|---:|---:|",
        f"| accuracy | {metrics['test_accuracy']:.4f} | {metrics['baseline_accuracy']:.4f} |",
        f"| macro F1 | {metrics['test_macro_f1']:.4f} | {metrics['baseline_macro_f1']:.4f} |",
        f"| weighted F1 | {metrics['test_weighted_f1']:.4f} | {metrics['baseline_weighted_f1']:.4f} |",
        "",
        f"- One-vs-rest ROC-AUC (macro over classes present): {metrics['test_roc_auc_ovr']:.4f}",
        f"- Expected calibration error: {metrics['test_ece']:.4f} (see reliability_diagram.png)",
        f"- Latency: {metrics['latency_ms_per_text_batched']:.2f} ms a text in batches, "
        f"{metrics['latency_ms_single_text_p50']:.2f} ms p50 for a single text",
        f"- Test texts: {int(metrics['test_size'])}",
        "",
        "## Abstaining on low confidence",
        "",
        f"- Suggested `min_confidence` (TEXTCLF_MIN_CONFIDENCE): {metrics['suggested_min_confidence']:.4f}, the "
        f"max-softmax threshold that answers {metrics['target_coverage']:.0%} of the validation texts "
        f"(validation coverage {metrics['validation_coverage_at_suggested']:.1%}).",
        f"- On the test split at that threshold: coverage {metrics['test_coverage_at_suggested']:.1%}, accuracy on "
        f"the answered texts {metrics['test_accuracy_at_suggested']:.4f} (all texts: {metrics['test_accuracy']:.4f}); "
        "see accuracy_coverage.png. Below it the service answers `unknown` once TEXTCLF_MIN_CONFIDENCE is set.",
        "",
        *_class_and_length_tables(
            per_class, long_short, f"one window is {max_length} tokens; truncation `{truncation}`"
        ),
        "## By text length",
        "",
        slices.to_markdown(floatfmt=".4f"),
        "",
        "## Known limits",
        "",
        "- Scores come from one test split; small classes have wide uncertainty.",
        f"- Texts longer than the max length ({metrics['truncated_share']:.0%} of the test texts): the model reads {reads}.",
        "- The model knows only the classes it was trained on; anything else is forced into one of them, unless "
        "a `min_confidence` is set (then texts below it are answered `unknown`; see above).",
        "",
    ]
    return "\n".join(lines)


def evaluate(
    model: FineTunedModel,
    data: PreparedDataset,
    output_dir: Path,
    context: dict[str, str] | None = None,
    config: EvaluationConfig = EvaluationConfig(),
) -> EvaluationResult:
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    from tasks.serving.classifier import TextClassifier

    classifier = TextClassifier(model.model_dir)
    if data.multi_label:
        return evaluate_multi_label(classifier, data, output_dir, context or {}, config)
    train, test = data.split("train"), data.split("test")
    texts, labels = test["text"].tolist(), test["label_id"].to_numpy()
    names = data.label_names
    label_ids = list(range(len(names)))

    started = time.perf_counter()
    encoded = classifier.encode(texts)  # tokenized once: the predictions and the length slices both use it
    probabilities = classifier.classify_encoded(encoded, batch_size=config.batch_size)
    truncated = np.asarray(encoded.truncated, dtype=bool)
    batched_ms = (time.perf_counter() - started) * 1000 / max(1, len(texts))
    validation = data.split("validation")
    validation_confidence = classifier.predict_proba(validation["text"].tolist(), batch_size=config.batch_size).max(
        axis=1
    )
    single = []
    for text in texts[: config.latency_samples]:
        started = time.perf_counter()
        classifier.predict_proba([text], batch_size=1)
        single.append((time.perf_counter() - started) * 1000)
    predicted = probabilities.argmax(axis=1)
    baseline = tfidf_baseline(train, test)

    confidence = probabilities.max(axis=1)
    ece, per_bin = expected_calibration_error(confidence, predicted == labels, config.calibration_bins)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=label_ids, zero_division=0
    )
    baseline_f1 = f1_score(labels, baseline, labels=label_ids, average=None, zero_division=0)
    per_class = pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1, "support": support, "baseline_f1": baseline_f1},
        index=pd.Index(names, name="class"),
    )
    token_lengths = np.asarray(encoded.token_lengths)
    slices = _slice_scores(_length_slices(token_lengths), labels, predicted, baseline)
    fits = pd.Series(np.where(truncated, "long (more than one window)", "short (fits one window)"))
    long_short = _slice_scores(fits, labels, predicted, baseline)
    metrics = {
        "test_accuracy": accuracy_score(labels, predicted),
        "test_macro_f1": f1_score(labels, predicted, average="macro", labels=label_ids, zero_division=0),
        "test_weighted_f1": f1_score(labels, predicted, average="weighted", labels=label_ids, zero_division=0),
        "test_roc_auc_ovr": one_vs_rest_auc(labels, probabilities),
        "test_ece": ece,
        "test_size": len(texts),
        "baseline_accuracy": accuracy_score(labels, baseline),
        "baseline_macro_f1": f1_score(labels, baseline, average="macro", labels=label_ids, zero_division=0),
        "baseline_weighted_f1": f1_score(labels, baseline, average="weighted", labels=label_ids, zero_division=0),
        "latency_ms_per_text_batched": batched_ms,
        "latency_ms_single_text_p50": float(np.median(single)) if single else float("nan"),
        "truncated_share": float(truncated.mean()) if len(texts) else 0.0,
        "test_predicted_classes": len(np.unique(predicted)),
        "train_class_imbalance": _imbalance(train["label_id"].to_numpy(), len(names)),
    }
    for name, key in (("long (more than one window)", "long"), ("short (fits one window)", "short")):
        if name in long_short.index:
            metrics[f"test_macro_f1_{key}_texts"] = long_short.loc[name, "macro_f1"]
            metrics[f"test_accuracy_{key}_texts"] = long_short.loc[name, "accuracy"]
    for name, row in per_class.iterrows():
        metrics.update({f"test_{k}_{name}": row[k] for k in ("precision", "recall", "f1")})
        metrics[f"baseline_f1_{name}"] = row["baseline_f1"]
    suggested = threshold_for_coverage(validation_confidence, config.target_coverage)
    test_coverage, test_answered_accuracy = coverage_at(confidence, predicted == labels, suggested)
    metrics.update(
        {
            "target_coverage": config.target_coverage,
            "suggested_min_confidence": suggested,
            "validation_coverage_at_suggested": coverage_at(validation_confidence, np.ones(len(validation)), suggested)[
                0
            ],
            "test_coverage_at_suggested": test_coverage,
            "test_accuracy_at_suggested": test_answered_accuracy,
        }
    )
    metrics = {key: float(value) for key, value in metrics.items()}

    with atomic_directory(output_dir) as staging:
        _plots(staging, names, confusion_matrix(labels, predicted, labels=label_ids), per_bin, per_class)
        plot_accuracy_coverage(
            staging / "accuracy_coverage.png",
            {"test": accuracy_coverage_curve(confidence, predicted == labels)},
            "Accuracy vs coverage (test, max-softmax)",
            {f"suggested min_confidence {suggested:.3f}": (test_coverage, test_answered_accuracy)},
        )
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        per_class.to_csv(staging / "per_class.csv")
        slices.to_csv(staging / "length_slices.csv")
        long_short.to_csv(staging / "long_short_texts.csv")
        pd.DataFrame(
            {
                "text": texts,
                "label": [names[i] for i in labels],
                "predicted": [names[i] for i in predicted],
                "probability": confidence,
            }
        ).to_parquet(staging / "test_predictions.parquet", index=False)
        (staging / "report.md").write_text(
            _report(
                metrics,
                per_class,
                slices,
                long_short,
                context or {},
                classifier.windowing.strategy,
                classifier.max_length,
            )
        )
    return EvaluationResult(metrics=metrics, artifacts_dir=output_dir, report_path=output_dir / "report.md")


def multi_label_scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Multi-label scores of 0/1 matrices (one row per text, one column per class): micro and macro F1 (macro over
    every class, one absent from both counting F1 0 as sklearn's zero_division does), weighted F1, subset accuracy
    (every class of a text right) and Hamming loss (share of wrong text-class cells)."""
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss

    return {
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)),
        "weighted_f1": float(f1_score(truth, predicted, average="weighted", zero_division=0)),
        "subset_accuracy": float(accuracy_score(truth, predicted)),
        "hamming_loss": float(hamming_loss(truth, predicted)),
    }


def _macro_roc_auc(truth: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC-AUC per class (threshold-free), averaged over the classes with both positives and negatives in the test."""
    from sklearn.metrics import roc_auc_score

    scored = [
        float(roc_auc_score(truth[:, k], probabilities[:, k]))
        for k in range(truth.shape[1])
        if 0 < truth[:, k].sum() < len(truth)
    ]
    return float(np.mean(scored)) if scored else float("nan")


def _multi_label_report(
    metrics: dict[str, float], per_class: pd.DataFrame, long_short: pd.DataFrame, context: dict[str, str]
) -> str:
    lines = ["# Model report (multi-label)", ""]
    lines += [f"- **{key}**: {value}" for key, value in context.items()]
    hints = improvement_hints(metrics)
    if hints:
        lines += ["", "## What to try", "", *[f"- {hint}" for hint in hints]]
    rows = [
        ("micro F1", "micro_f1"),
        ("macro F1", "macro_f1"),
        ("weighted F1", "weighted_f1"),
        ("subset accuracy", "subset_accuracy"),
        ("Hamming loss (lower is better)", "hamming_loss"),
    ]
    lines += [
        "",
        "## Test metrics",
        "",
        "A class is answered when its sigmoid probability reaches its threshold, chosen per class on the validation "
        "split (column `threshold` below); the baseline is TF-IDF + one logistic regression per class at 0.5.",
        "",
        "| metric | fine-tuned | TF-IDF + one-vs-rest logistic regression |",
        "|---|---:|---:|",
        *[f"| {title} | {metrics['test_' + key]:.4f} | {metrics['baseline_' + key]:.4f} |" for title, key in rows],
        "",
        f"- ROC-AUC (per class, macro over classes with both outcomes in the test split): "
        f"{metrics['test_roc_auc_macro']:.4f}",
        f"- Labels per text: {metrics['test_label_cardinality']:.2f} true, {metrics['test_predicted_cardinality']:.2f} "
        f"predicted; texts with no label: {metrics['test_texts_without_labels']:.0f}",
        f"- Latency: {metrics['latency_ms_per_text_batched']:.2f} ms a text in batches",
        f"- Test texts: {int(metrics['test_size'])}",
        "",
        *_class_and_length_tables(per_class, long_short, "fits one window or not"),
        "## Known limits",
        "",
        "- Scores come from one test split; small classes have wide uncertainty.",
        "- Thresholds were chosen on the validation split; a class rare there has a noisy threshold.",
        "",
    ]
    return "\n".join(lines)


def evaluate_multi_label(
    classifier: TextClassifier,
    data: PreparedDataset,
    output_dir: Path,
    context: dict[str, str],
    config: EvaluationConfig,
) -> EvaluationResult:
    """The multi-label evaluation: the model's answers (each class at its validation threshold) against the true
    label sets of the test split, next to a one-vs-rest TF-IDF baseline."""
    from sklearn.metrics import precision_recall_fscore_support

    names = data.label_names
    train, test = data.split("train"), data.split("test")
    texts = test["text"].tolist()
    truth = np.stack(test["label_vector"].to_numpy()).astype(int)
    started = time.perf_counter()
    encoded = classifier.encode(texts)
    probabilities = classifier.classify_encoded(encoded, batch_size=config.batch_size)
    batched_ms = (time.perf_counter() - started) * 1000 / max(1, len(texts))
    predicted = (probabilities >= classifier.thresholds).astype(int)
    baseline = tfidf_one_vs_rest_baseline(train, test, len(names))
    truncated = np.asarray(encoded.truncated, dtype=bool)

    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, zero_division=0)
    baseline_f1 = precision_recall_fscore_support(truth, baseline, zero_division=0)[2]
    per_class = pd.DataFrame(
        {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support,
            "threshold": classifier.thresholds,
            "baseline_f1": baseline_f1,
        },
        index=pd.Index(names, name="class"),
    )
    model_scores, baseline_scores = multi_label_scores(truth, predicted), multi_label_scores(truth, baseline)
    train_positives = np.stack(train["label_vector"].to_numpy()).sum(axis=0)
    metrics: dict[str, float] = {
        **{f"test_{key}": value for key, value in model_scores.items()},
        **{f"baseline_{key}": value for key, value in baseline_scores.items()},
        "test_accuracy": model_scores["subset_accuracy"],  # what single-label reports call accuracy
        "test_roc_auc_macro": _macro_roc_auc(truth, probabilities),
        "baseline_accuracy": baseline_scores["subset_accuracy"],
        "test_size": float(len(texts)),
        "test_label_cardinality": float(truth.sum(axis=1).mean()) if len(texts) else 0.0,
        "test_predicted_cardinality": float(predicted.sum(axis=1).mean()) if len(texts) else 0.0,
        "test_texts_without_labels": float((truth.sum(axis=1) == 0).sum()),
        "test_predicted_classes": float((predicted.sum(axis=0) > 0).sum()),
        "train_class_imbalance": float(train_positives.max() / max(1.0, train_positives.min())),
        "latency_ms_per_text_batched": batched_ms,
        "truncated_share": float(truncated.mean()) if len(texts) else 0.0,
    }
    for name, row in per_class.iterrows():
        metrics.update({f"test_{k}_{name}": float(row[k]) for k in ("precision", "recall", "f1", "threshold")})
        metrics[f"baseline_f1_{name}"] = float(row["baseline_f1"])
    long_short_rows = {}
    for title, mask in (("long (more than one window)", truncated), ("short (fits one window)", ~truncated)):
        if mask.any():
            scores = multi_label_scores(truth[mask], predicted[mask])
            long_short_rows[title] = {"texts": int(mask.sum()), **scores}
            key = "long" if title.startswith("long") else "short"
            metrics[f"test_macro_f1_{key}_texts"] = scores["macro_f1"]
    long_short = pd.DataFrame.from_dict(long_short_rows, orient="index")

    with atomic_directory(output_dir) as staging:
        _per_class_plot(staging, names, per_class)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        per_class.to_csv(staging / "per_class.csv")
        long_short.to_csv(staging / "long_short_texts.csv")
        answers = classifier.label_sets(probabilities)
        pd.DataFrame(
            {
                "text": texts,
                "label": test["label"].tolist(),  # the true label lists: the promotion gate scores on them
                "predicted": answers,
                "probability": probabilities.max(axis=1) if len(texts) else np.zeros(0),
            }
        ).to_parquet(staging / "test_predictions.parquet", index=False)
        (staging / "report.md").write_text(_multi_label_report(metrics, per_class, long_short, context))
    return EvaluationResult(metrics=metrics, artifacts_dir=output_dir, report_path=output_dir / "report.md")


evaluate_task = task(name="evaluate")(evaluate)
