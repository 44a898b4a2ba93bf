#!/usr/bin/env python
"""LoRA against a full fine-tune: trainable parameters, peak memory, training throughput and test macro-F1.

Both variants fine-tune the same base model (the packaged MiniLM by default) on the same PreparedDataset (one
ingest + preprocess of drug-reviews by default), with the same epochs, batch size, seed and device, through the
product's own stages (tasks/training/fine_tune.py `fine_tune`, then `evaluate` on the test split). Only the
`peft` setting differs, and the learning rate (LoRA's adapters start at zero and are usually trained at a higher
rate: --lora-learning-rate). Each variant runs in a child process of its own, so its peak resident memory (and, on
CUDA, torch's peak allocated memory) is its own; the children alternate order with --repeats.

Run from the repository root:  .venv/bin/python bench/lora.py                 (about 10 minutes on 2 cores)
                               .venv/bin/python bench/lora.py --source bbc-news --epochs 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import offline_env  # noqa: F401  (first: no hub look-ups, no telemetry; see bench/offline_env.py)
from results_json import write_json_atomically

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUTPUT = REPO / "bench" / "results" / "lora.json"
DEFAULT_WORK = REPO / "bench" / "results" / "work-lora"  # git-ignored (bench/results/)
VARIANTS = ("full", "lora")


def variant_arguments(
    description: str, variants: tuple[str, ...], source: str, epochs: int, output: Path, work: Path
) -> argparse.ArgumentParser:
    """The options every fine-tune variant benchmark shares (this one and bench/precision.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--source", default=source, help="dataset: packaged name, file or folder")
    parser.add_argument("--base-model", default="all-MiniLM-L6-v2", help="packaged name, local folder or hub id")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="the full fine-tune's")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--output", type=Path, default=output)
    parser.add_argument("--work-dir", type=Path, default=work)
    parser.add_argument("--variant", choices=variants, help=argparse.SUPPRESS)  # a child process: one variant
    parser.add_argument("--prepared", type=Path, help=argparse.SUPPRESS)
    return parser


def result_document(benchmark: str, args: argparse.Namespace, runs: dict, median: dict, comparison: dict) -> dict:
    """The JSON a variant benchmark writes: machine, settings, the median run of each variant, every run, and the
    comparison of the variants under its own key."""
    return {
        "benchmark": benchmark,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "settings": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("variant", "prepared")
        },
        "variants": median,
        "runs": runs,
        **comparison,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = variant_arguments(__doc__.split("\n\n")[0], VARIANTS, "drug-reviews", 3, DEFAULT_OUTPUT, DEFAULT_WORK)
    parser.add_argument("--lora-learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-target-modules", default="", help="empty: peft's default for the architecture")
    parser.add_argument("--class-weighted-loss", action="store_true", help="for imbalanced data (drug-reviews)")
    return parser.parse_args(argv)


def fine_tune_config(args: argparse.Namespace, variant: str, base_model: str):
    from tasks.training.fine_tune import FineTuneConfig

    lora = variant == "lora"
    return FineTuneConfig(
        base_model=base_model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lora_learning_rate if lora else args.learning_rate,
        early_stopping_patience=0,  # the same number of steps for both
        class_weighted_loss=args.class_weighted_loss,
        device=args.device,
        peft="lora" if lora else "none",
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_target_modules=args.lora_target_modules,
    )


def run_variant(args: argparse.Namespace) -> dict:
    """In the child: fine-tune and evaluate one variant; its own peak memory."""
    from flows.training import resolve_base_model

    return fine_tune_and_evaluate(args, fine_tune_config(args, args.variant, resolve_base_model(args.base_model)))


def fine_tune_and_evaluate(args: argparse.Namespace, config) -> dict:
    """The product's fine-tune and evaluate stages on the prepared data (`args.prepared`), with this process's
    peak memory and the figures the variant benchmarks compare."""
    import torch

    from tasks.contracts import PreparedDataset
    from tasks.training.evaluate import EvaluationConfig, evaluate

    prepared = PreparedDataset.model_validate_json(args.prepared.read_text())
    root = args.work_dir / f"{args.variant}-{time.time_ns()}"  # a fresh run: never a finished one reused
    started = time.perf_counter()
    from tasks.training.fine_tune import fine_tune

    tuned = fine_tune(prepared, config, root / "fine-tune")
    wall = time.perf_counter() - started
    evaluation = evaluate(tuned, prepared, root / "evaluation", config=EvaluationConfig(latency_samples=5))
    cuda = torch.cuda.is_available() and tuned.device == "cuda"
    return {
        "variant": args.variant,
        "learning_rate": config.learning_rate,
        "trainable_parameters": tuned.trainable_parameters,
        "total_parameters": tuned.total_parameters,
        "trainable_share": tuned.trainable_parameters / tuned.total_parameters,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: kilobytes
        "cuda_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "device": tuned.device,
        "precision": tuned.precision,
        "steps": tuned.global_step,
        "train_samples_per_second": tuned.train_samples_per_second,
        "train_runtime_s": tuned.train_runtime_s,
        "wall_s": wall,
        "best_validation_macro_f1": tuned.best_validation_macro_f1,
        "test_macro_f1": evaluation.metrics["test_macro_f1"],
        "test_accuracy": evaluation.metrics["test_accuracy"],
        "baseline_macro_f1": evaluation.metrics["baseline_macro_f1"],
    }


def prepare(args: argparse.Namespace) -> Path:
    from flows.training import resolve_base_model
    from tasks.training.ingest import IngestConfig, ingest
    from tasks.training.preprocess import PreprocessConfig, preprocess

    snapshot = ingest(IngestConfig(source=args.source), args.work_dir / "snapshots")
    prepared = preprocess(
        snapshot,
        PreprocessConfig(tokenizer=resolve_base_model(args.base_model), max_length=args.max_length),
        args.work_dir / "cache",
    )
    path = args.work_dir / "prepared.json"
    path.write_text(prepared.model_dump_json())
    return path


def run_variants(script: str, args: argparse.Namespace, argv: list[str] | None, variants: tuple[str, ...]):
    """Prepare the data once, then run `script --variant V` for each variant in a child process of its own, in
    alternating order over `args.repeats`: (every run by variant, the median run by samples/s by variant)."""
    args.work_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare(args)
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    for repeat in range(args.repeats):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:
            child = [sys.executable, script, "--variant", variant, "--prepared", str(prepared)]
            child += [a for a in (argv if argv is not None else sys.argv[1:])]
            done = subprocess.run(child, cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"the {variant} variant failed (exit {done.returncode})")
            line = next(line for line in done.stdout.splitlines()[::-1] if line.startswith("RESULT "))
            runs[variant].append(json.loads(line.removeprefix("RESULT ")))
            print(f"{variant}: {runs[variant][-1]}", flush=True)
    median = {
        variant: sorted(rs, key=lambda r: r["train_samples_per_second"])[len(rs) // 2] for variant, rs in runs.items()
    }
    return runs, median


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)))
        return 0
    runs, median = run_variants(__file__, args, argv, VARIANTS)
    full, lora = median["full"], median["lora"]
    comparison = {
        "lora_over_full": {
            "trainable_parameters": lora["trainable_parameters"] / full["trainable_parameters"],
            "peak_rss": lora["peak_rss_mb"] / full["peak_rss_mb"],
            "train_samples_per_second": lora["train_samples_per_second"] / full["train_samples_per_second"],
            "test_macro_f1_points": 100 * (lora["test_macro_f1"] - full["test_macro_f1"]),
        }
    }
    result = result_document("lora", args, runs, median, comparison)
    write_json_atomically(args.output, result)
    print(json.dumps(result["lora_over_full"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
