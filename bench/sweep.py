#!/usr/bin/env python
"""Hyperparameter search: the sweep's best model against the training flow's default settings, and the compute
that pruning saved.

For each dataset, in ONE process on the same machine and the same data (same snapshot, same split, same base
model and max length):

  default  one fine-tune with the training flow's defaults (flows.training.TrainingParameters: lr 1e-4, batch 16,
           3 epochs, warmup 0.1, early stopping 2), evaluated on the test split;
  sweep    the sweep's stages (tasks/training/sweep.py: TPE + median pruner on validation macro-F1, RDB storage) with a
           fixed trial budget (--trials); only the best trial's model is evaluated on the test split.

Reported: test macro-F1 of both (and the difference), wall time of both, and the trial-epochs the sweep ran
against the trial-epochs it would have run without pruning (a pruned trial would have run its planned epochs).
MLflow tracking goes to an SQLite file in the work folder (no server needed); nothing reaches the network.

Datasets: `drug-reviews` (packaged), `atis` (../shared/data/atis; skipped with a note when absent) or any table
file the ingest stage reads. --train-samples / --eval-samples cap the splits (seeded) for a modest budget.

Run from the repository root:  nice -n 19 .venv/bin/python bench/sweep.py --trials 6   (see bench/README.md)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import offline_env  # noqa: F401  (first: no hub look-ups, no telemetry; see bench/offline_env.py)
from real_datasets import DEFAULT_SHARED, atis_frame, write_table
from results_json import write_json_atomically

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUTPUT = REPO / "bench" / "results" / "sweep.json"
DEFAULT_WORK = REPO / "bench" / "results" / "work-sweep"  # git-ignored (bench/results/)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--datasets",
        default="drug-reviews,atis",
        help="Comma-separated: drug-reviews, atis, or table files the ingest stage reads.",
    )
    parser.add_argument("--trials", type=int, default=6, help="The sweep's trial budget per dataset.")
    parser.add_argument("--base-model", default="all-MiniLM-L6-v2", help="all-MiniLM-L6-v2 (packaged) or a folder.")
    parser.add_argument("--max-length", type=int, default=64, help="Same for the default and every trial.")
    parser.add_argument("--epochs-max", type=int, default=3, help="Most epochs a trial trains (the default trains 3).")
    parser.add_argument("--train-samples", type=int, default=None, help="Cap on training examples (seeded sample).")
    parser.add_argument("--eval-samples", type=int, default=None, help="Cap on validation and test examples each.")
    parser.add_argument("--pruner", choices=["median", "successive-halving", "none"], default="median")
    parser.add_argument("--pruner-startup-trials", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED, help="Folder with atis/.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--keep-work", action="store_true", help="Keep the work folder (studies, models).")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def capped_table(
    snapshot_path: Path, target: Path, train_samples: int | None, eval_samples: int | None, seed: int
) -> tuple[Path, dict]:
    """The snapshot with each split capped (seeded, per class in proportion, at least 5 rows a class: what ingest
    asks for by default), and classes with fewer than 6 training rows left out (the split and the per-class scores
    need a few of each)."""
    import pandas as pd

    frame = pd.read_parquet(snapshot_path)[["text", "label", "split"]]
    if frame["split"].isna().any():  # no source split: make one the way preprocess would be asked to
        from sklearn.model_selection import train_test_split

        train, rest = train_test_split(frame, test_size=0.2, stratify=frame["label"], random_state=seed)
        validation, test = train_test_split(rest, test_size=0.5, stratify=rest["label"], random_state=seed)
        frame = pd.concat(
            [train.assign(split="train"), validation.assign(split="validation"), test.assign(split="test")]
        )
    counts = frame[frame["split"] == "train"]["label"].value_counts()
    frame = frame[frame["label"].isin(counts[counts >= 6].index)]
    if "validation" not in set(frame["split"]):
        from sklearn.model_selection import train_test_split

        train = frame[frame["split"] == "train"]
        keep, validation = train_test_split(train, test_size=0.1, stratify=train["label"], random_state=seed)
        frame = pd.concat([keep, validation.assign(split="validation"), frame[frame["split"] != "train"]])
    parts = []
    for split, part in frame.groupby("split"):
        cap = train_samples if split == "train" else eval_samples
        if cap and len(part) > cap:
            part = pd.concat(
                [
                    rows.sample(min(len(rows), max(5, round(len(rows) * cap / len(part)))), random_state=seed)
                    for _, rows in part.groupby("label")
                ]
            )
        parts.append(part)
    capped = pd.concat(parts).sample(frac=1.0, random_state=seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    capped.to_csv(target, index=False)
    return target, {
        **{split: int(n) for split, n in capped["split"].value_counts().items()},
        "classes": int(capped["label"].nunique()),
    }


# ---------------------------------------------------------------------------------------------------------------
# The two variants
# ---------------------------------------------------------------------------------------------------------------


def run_default(snapshot, base_model, args, work: Path) -> dict:
    from flows.training import ModelParameters, TrainingParameters
    from tasks.contracts import WindowingConfig
    from tasks.training.evaluate import EvaluationConfig, evaluate
    from tasks.training.fine_tune import FineTuneConfig, fine_tune
    from tasks.training.preprocess import PreprocessConfig, preprocess

    defaults, model_defaults = TrainingParameters(seed=args.seed), ModelParameters(max_length=args.max_length)
    started = time.perf_counter()
    prepared = preprocess(
        snapshot,
        PreprocessConfig(
            tokenizer=base_model, seed=args.seed, **model_defaults.model_dump(include=set(WindowingConfig.model_fields))
        ),
        work / "cache",
    )
    config = FineTuneConfig(base_model=base_model, **defaults.model_dump(exclude={"timeout_minutes"}))
    model = fine_tune(prepared, config, work / "default-fine-tune")
    evaluation = evaluate(model, prepared, work / "default-evaluation", config=EvaluationConfig(latency_samples=1))
    return {
        "settings": {
            **config.model_dump(exclude={"base_model", "device"}),
            "max_length": args.max_length,
            "truncation": model_defaults.truncation,
        },
        "test_macro_f1": evaluation.metrics["test_macro_f1"],
        "test_accuracy": evaluation.metrics["test_accuracy"],
        "baseline_macro_f1": evaluation.metrics["baseline_macro_f1"],
        "validation_macro_f1": model.best_validation_macro_f1,
        "epochs_run": model.epochs_completed,
        "wall_seconds": time.perf_counter() - started,
    }


def run_sweep(snapshot, base_model, args, work: Path, name: str) -> dict:
    from flows.sweep import train_trial
    from tasks.tracking import start_tracking_run
    from tasks.training.evaluate import EvaluationConfig, evaluate
    from tasks.training.sweep import (
        SearchSpace,
        StudyParameters,
        StudyRef,
        TrialConfig,
        TrialSettings,
        best_trial,
        prepare_study,
        run_trial,
        summarize_study,
    )

    started = time.perf_counter()
    space = SearchSpace(
        learning_rate_min=1e-5,
        learning_rate_max=3e-4,
        batch_sizes=[8, 16, 32],
        epochs_min=1,
        epochs_max=args.epochs_max,
        warmup_ratio_min=0.0,
        warmup_ratio_max=0.2,
        weight_decay_min=0.0,
        weight_decay_max=0.1,
        max_lengths=[args.max_length],
        truncations=["head", "head+tail", "chunks"],
        base_models=[args.base_model],
    )
    study = StudyParameters(
        study_name=name,
        n_trials=args.trials,
        pruner=args.pruner,
        pruner_startup_trials=args.pruner_startup_trials,
        seed=args.seed,
        sampler_startup_trials=max(2, args.trials // 2),
    )
    ref = StudyRef(storage_url=f"sqlite:///{work / 'optuna.db'}", parameters=study)
    plan = prepare_study(ref)
    parent = start_tracking_run(
        f"sqlite:///{work / 'mlflow.db'}", "bench-sweep", f"sweep-{name}", idempotency_key=f"{name}:{plan.study_key}"
    )
    config = TrialConfig(
        study=ref,
        space=space,
        settings=TrialSettings(),
        snapshot=snapshot,
        base_models={args.base_model: base_model},
        parent=parent,
        experiment_name="bench-sweep",
        preprocess_cache_dir=work / "cache",
        fine_tune_dir=work / "sweep-fine-tune",
    )
    # The product's own trial, as the sweep flow wires it (flows/sweep.py train_trial), run in this process.
    outcomes = [
        run_trial(config, sampler_seed=plan.first_sampler_seed + i, train=train_trial)
        for i in range(plan.trials_to_run)
    ]
    summary = summarize_study(ref, parent, work / "summary")
    best = best_trial(ref, parent)
    evaluation = evaluate(
        best.model, best.prepared, work / "sweep-evaluation", config=EvaluationConfig(latency_samples=1)
    )
    return {
        "trials": [outcome.model_dump(exclude={"run_id"}) for outcome in outcomes],
        "trial_states": summary.trials,
        "best_trial": best.number,
        "best_params": best.params,
        "validation_macro_f1": best.validation_macro_f1,
        "test_macro_f1": evaluation.metrics["test_macro_f1"],
        "test_accuracy": evaluation.metrics["test_accuracy"],
        "trial_epochs_run": summary.epochs_run,
        "trial_epochs_without_pruning": summary.epochs_without_pruning,
        "pruning_saved_share": 1 - summary.epochs_run / summary.epochs_without_pruning
        if summary.epochs_without_pruning
        else 0.0,
        "wall_seconds": time.perf_counter() - started,
    }


def dataset_source(name: str, args, work: Path) -> tuple[str | None, str | None]:
    """(ingest source, note); the source is None when the dataset is absent."""
    if name == "atis":
        frame = atis_frame(args.shared_data, multi_intent="first")
        if frame is None:
            return None, f"ATIS skipped: {args.shared_data / 'atis'} (train/dev/test.tsv) is absent."
        return str(write_table(frame, work / "atis.parquet")), "multi-intent labels mapped to their first intent"
    return name, None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    from flows.training import resolve_base_model
    from tasks.training.ingest import IngestConfig, ingest

    base_model = resolve_base_model(args.base_model)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results, notes = {}, []
    try:
        for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
            key = Path(name).stem if Path(name).suffix else name
            work = args.work_dir / key
            shutil.rmtree(work, ignore_errors=True)  # each run starts a fresh study
            source, note = dataset_source(name, args, work)
            if source is None:
                notes.append(note)
                print(note)
                continue
            raw = ingest(IngestConfig(source=source), work / "snapshots")
            table, sizes = capped_table(raw.path, work / "capped.csv", args.train_samples, args.eval_samples, args.seed)
            snapshot = ingest(IngestConfig(source=str(table)), work / "snapshots")
            print(f"{key}: {sizes}")
            default = run_default(snapshot, base_model, args, work)
            print(f"{key} default: test macro-F1 {default['test_macro_f1']:.4f} in {default['wall_seconds']:.0f} s")
            sweep = run_sweep(snapshot, base_model, args, work, name=f"bench-{key}")
            print(
                f"{key} sweep: test macro-F1 {sweep['test_macro_f1']:.4f}, trial-epochs "
                f"{sweep['trial_epochs_run']} of {sweep['trial_epochs_without_pruning']} in "
                f"{sweep['wall_seconds']:.0f} s"
            )
            results[key] = {
                "split_sizes": sizes,
                "note": note,
                "default": default,
                "sweep": sweep,
                "test_macro_f1_sweep_minus_default": sweep["test_macro_f1"] - default["test_macro_f1"],
                "sweep_wall_over_default": sweep["wall_seconds"] / default["wall_seconds"],
            }
    finally:
        if not args.keep_work:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        notes.append(f"load average {load:.1f} above the CPU count during the run: wall times are inflated.")
    payload = {
        "benchmark": "sweep",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpus": os.cpu_count(),
            "cuda": torch.cuda.is_available(),
            "load_average_end": load,
        },
        "results": results,
        "notes": notes,
    }
    write_json_atomically(args.output, payload)
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
