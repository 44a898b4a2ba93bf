#!/usr/bin/env python
"""Abstaining on low confidence, in and out of domain: a BBC News model (trained by the product's own training flow
on the packaged default, or `--model-dir`) scores the BBC test split (in-domain) and ATIS + SMS Spam texts
(out-of-domain, ../shared/data), and the max-softmax probability is judged as an out-of-domain detector and as an
abstention rule.

Reported (bench/results/abstain.json, plot bench/results/abstain.png):
- OOD AUROC of the max-softmax probability (sklearn roc_auc_score, in-domain = positive), per OOD dataset and for
  both together. Published anchor: 0.942 for BERT-base on CLINC150 (the Hendrycks & Gimpel max-softmax baseline, as
  reported for CLINC150); a different dataset pair, so a reference point, not a target.
- The threshold the evaluate stage suggests (validation split, target coverage, default 95 %), and at it: coverage
  and accuracy on the answered in-domain test texts, and the share of OOD texts still answered (not "unknown").
- Accuracy of the answered in-domain test texts at fixed coverages, and a curve over a mixed stream: the in-domain
  test texts and as many OOD texts (a seeded sample of both datasets), where an answered OOD text counts as an error.

Training (default): one process starts a Prefect and an MLflow server on free loopback ports (SQLite, in the work
folder) and runs flows/training.py on BBC News like bench/quality.py, with the caps below (recorded in the JSON);
the suggested threshold and the in-domain test predictions are read back from the run it registered. With
`--model-dir` nothing is trained: the in-domain texts (`--in-domain`, a table with text and label; default the
packaged BBC News, which that model may have been trained on) are split in half, seeded: one half picks the
threshold, the other is the test. Nothing reaches the network.

Run from the repository root:  .venv/bin/python bench/abstain.py                 (18 minutes on 2 shared cores)
                               .venv/bin/python bench/abstain.py --model-dir <fine-tuned folder>
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import offline_env  # noqa: F401  (first: no hub look-ups, no telemetry; see bench/offline_env.py)
import pandas as pd
from real_datasets import DEFAULT_SHARED, atis_frame, sms_spam_frame
from results_json import write_json_atomically

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUTPUT = REPO / "bench" / "results" / "abstain.json"
DEFAULT_WORK = REPO / "bench" / "results" / "work-abstain"  # git-ignored (bench/results/)
ANCHOR = {
    "max_softmax_ood_auroc_bert_base_clinc150": 0.942,
    "source": "Hendrycks & Gimpel max-softmax baseline, as reported for BERT-base on CLINC150",
}
COVERAGES = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="A fine-tuned model folder: no training.")
    parser.add_argument(
        "--in-domain",
        type=Path,
        default=None,
        help="With --model-dir: a CSV/Parquet table (text, label) of in-domain texts; default the packaged BBC News.",
    )
    parser.add_argument("--epochs", type=int, default=2, help="Training epochs (the flow's default is 3).")
    parser.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help="Cap BBC News at this many rows before the split (seeded, per class); default all 2,225.",
    )
    parser.add_argument("--max-length", type=int, default=None, help="Default: the training flow's (128).")
    parser.add_argument(
        "--target-coverage",
        type=float,
        default=0.95,
        help="With --model-dir: the validation coverage of the threshold (training: the flow's, 0.95).",
    )
    parser.add_argument(
        "--max-ood-texts",
        type=int,
        default=2000,
        help="Seeded sample of at most this many texts from each OOD dataset.",
    )
    parser.add_argument(
        "--shared-data", type=Path, default=DEFAULT_SHARED, help="Folder with atis/ and sms_spam_collection/."
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--plot", type=Path, default=None, help="Default: the output's name with .png.")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    return parser.parse_args(argv)


def ood_texts(args) -> tuple[dict[str, list[str]], dict[str, str]]:
    texts, skipped = {}, {}
    for name, frame in (("atis", atis_frame(args.shared_data)), ("sms-spam", sms_spam_frame(args.shared_data))):
        if frame is None:
            skipped[name] = f"skipped: not found under {args.shared_data}"
            continue
        unique = frame["text"].drop_duplicates()
        texts[name] = unique.sample(min(len(unique), args.max_ood_texts), random_state=0).tolist()
    return texts, skipped


def train_bbc(args, work: Path) -> tuple[Path, pd.DataFrame, float, dict]:
    """The training flow on BBC News; returns the model folder, its test predictions (text, label, predicted,
    probability), the suggested threshold and what was run."""
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.local_stack import ensure_mlflow_server, ensure_prefect_server, stop_local_servers
    from flows.training import DatasetParameters, ModelParameters, TrainingParameters, training
    from tasks.common.ports import free_port
    from tasks.registry import download_model_version

    os.environ["TEXTCLF_HOME"] = str(work / "home")
    source = "bbc-news"
    if args.max_rows:
        from quality import capped_packaged

        source = str(capped_packaged("bbc-news", args.max_rows, work))
    try:
        mlflow = ensure_mlflow_server(work / "stack", port=free_port())
        prefect = ensure_prefect_server(work / "stack", port=free_port())
        os.environ["MLFLOW_TRACKING_URI"] = mlflow.url
        with temporary_settings(updates={PREFECT_API_URL: prefect.url}):
            model = ModelParameters(**({"max_length": args.max_length} if args.max_length else {}))
            started = time.perf_counter()
            state = training(
                DatasetParameters(source=source),
                model,
                TrainingParameters(epochs=args.epochs),
                registered_model_name="abstain-bbc-news",
                return_state=True,
            )
            wall = time.perf_counter() - started
            if not state.is_completed():
                raise SystemExit(f"training failed: {state.message}")
            version = state.result()
            client = MlflowClient(mlflow.url)
            run = client.get_run(version.run_id)
            predictions = pd.read_parquet(
                client.download_artifacts(
                    version.run_id, "evaluation/test_predictions.parquet", str(work / "artifacts")
                )
            )
            folder = download_model_version(mlflow.url, version.name, version.version, work / "models").model_dir
    finally:
        stop_local_servers(work / "stack")
    metrics, params = run.data.metrics, run.data.params
    trained = {
        "flow": "flows/training.py",
        "source": source,
        "wall_seconds": round(wall, 1),
        "settings": {
            k: params.get(k)
            for k in ("base_model", "max_length", "truncation", "epochs", "batch_size", "learning_rate")
        },
        "test_macro_f1": round(metrics["test_macro_f1"], 4),
        "target_coverage": metrics["target_coverage"],
        "validation_coverage_at_suggested": round(metrics["validation_coverage_at_suggested"], 4),
    }
    return Path(folder), predictions, float(metrics["suggested_min_confidence"]), trained


def given_model(args, classifier) -> tuple[pd.DataFrame, float, dict]:
    """--model-dir: half the in-domain texts pick the threshold, the other half is the test."""
    from tasks.serving.abstention import threshold_for_coverage

    if args.in_domain is not None:
        frame = (
            pd.read_parquet(args.in_domain) if args.in_domain.suffix == ".parquet" else pd.read_csv(args.in_domain)
        )[["text", "label"]]
    else:
        from tasks.training.ingest import IngestConfig, ingest

        snapshot = ingest(IngestConfig(source="bbc-news"), args.work_dir.resolve() / "snapshots")
        frame = pd.read_parquet(snapshot.path)[["text", "label"]]
    frame = frame.drop_duplicates("text").sample(frac=1.0, random_state=0).reset_index(drop=True)
    validation, test = frame.iloc[: len(frame) // 2], frame.iloc[len(frame) // 2 :]
    threshold = threshold_for_coverage(
        classifier.predict_proba(validation["text"].tolist()).max(axis=1), args.target_coverage
    )
    probabilities = classifier.predict_proba(test["text"].tolist())
    names = classifier.label_names
    predictions = pd.DataFrame(
        {
            "text": test["text"].tolist(),
            "label": test["label"].astype(str).tolist(),
            "predicted": [names[i] for i in probabilities.argmax(axis=1)],
            "probability": probabilities.max(axis=1),
        }
    )
    return (
        predictions,
        threshold,
        {
            "model_dir": str(args.model_dir),
            "in_domain": str(args.in_domain or "bbc-news"),
            "split": "seeded halves: validation (threshold) and test",
            "target_coverage": args.target_coverage,
        },
    )


def main(argv: list[str] | None = None) -> int:
    from sklearn.metrics import roc_auc_score

    from tasks.serving.abstention import accuracy_coverage_curve, coverage_at, plot_accuracy_coverage
    from tasks.serving.classifier import TextClassifier

    args = parse_args(argv)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ood, skipped = ood_texts(args)
    if args.model_dir is None:
        model_dir, predictions, threshold, model_info = train_bbc(args, work)
        classifier = TextClassifier(model_dir)
    else:
        classifier = TextClassifier(args.model_dir)
        predictions, threshold, model_info = given_model(args, classifier)
    confidence = predictions["probability"].to_numpy(dtype=float)
    correct = (predictions["label"] == predictions["predicted"]).to_numpy()
    scoring_started = time.perf_counter()
    ood_confidence = {name: classifier.predict_proba(texts).max(axis=1).astype(float) for name, texts in ood.items()}
    scoring_seconds = time.perf_counter() - scoring_started

    def auroc(outside: np.ndarray) -> float:
        scores = np.concatenate([confidence, outside])
        return round(float(roc_auc_score(np.r_[np.ones(len(confidence)), np.zeros(len(outside))], scores)), 4)

    coverage, answered_accuracy = coverage_at(confidence, correct, threshold)
    curve_coverage, curve_accuracy = accuracy_coverage_curve(confidence, correct)
    at_coverage = {
        f"{c:.2f}": round(float(curve_accuracy[max(0, int(np.ceil(c * len(confidence))) - 1)]), 4) for c in COVERAGES
    }
    ood_results = {
        name: {
            "texts": len(values),
            "auroc_max_softmax": auroc(values),
            "mean_max_softmax": round(float(values.mean()), 4),
            "answered_share_at_threshold": round(float((values >= threshold).mean()), 4),
        }
        for name, values in ood_confidence.items()
    }
    every_ood = np.concatenate(list(ood_confidence.values())) if ood_confidence else np.zeros(0)
    curves = {"in-domain test": (curve_coverage, curve_accuracy)}
    marks = {f"threshold {threshold:.3f}": (coverage, answered_accuracy)}
    if len(every_ood):
        ood_results["all-ood"] = {
            "texts": len(every_ood),
            "auroc_max_softmax": auroc(every_ood),
            "answered_share_at_threshold": round(float((every_ood >= threshold).mean()), 4),
        }
        # Half in-domain, half OOD: as many OOD texts as in-domain test texts (seeded), so neither swamps the curve.
        sample = np.random.default_rng(0).permutation(every_ood)[: len(confidence)]
        mixed_confidence, mixed_correct = np.r_[confidence, sample], np.r_[correct, np.zeros(len(sample), bool)]
        curves["in-domain test + as many OOD (OOD answered = error)"] = accuracy_coverage_curve(
            mixed_confidence, mixed_correct
        )
        mixed_coverage, mixed_accuracy = coverage_at(mixed_confidence, mixed_correct, threshold)
        marks[f"mixed at {threshold:.3f}"] = (mixed_coverage, mixed_accuracy)
    plot = args.plot or args.output.with_suffix(".png")
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_accuracy_coverage(plot, curves, "BBC News model: accuracy vs coverage (max-softmax)", marks)
    payload = {
        "benchmark": "abstain",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "command": " ".join([".venv/bin/python", "bench/abstain.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": model_info,
        "runtime": classifier.runtime,
        "in_domain_test": {
            "texts": len(confidence),
            "accuracy": round(float(correct.mean()), 4),
            "suggested_min_confidence": round(threshold, 4),
            "coverage_at_threshold": round(coverage, 4),
            "accuracy_answered_at_threshold": round(answered_accuracy, 4),
            "accuracy_at_coverage": at_coverage,
        },
        "out_of_domain": ood_results,
        "mixed_stream_at_threshold": (
            None
            if not len(every_ood)
            else {
                "in_domain_texts": len(confidence),
                "ood_texts": len(sample),
                "coverage": round(mixed_coverage, 4),
                "accuracy_answered": round(mixed_accuracy, 4),
                "accuracy_answered_without_abstaining": round(float(mixed_correct.mean()), 4),
            }
        ),
        "max_ood_texts_per_dataset": args.max_ood_texts,
        "ood_scoring_seconds": round(scoring_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "skipped": skipped,
        "anchor": ANCHOR,
        "plot": str(plot),
    }
    write_json_atomically(args.output, payload)
    print(f"in-domain: {payload['in_domain_test']}\nout-of-domain: {ood_results}\nwrote {args.output} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
