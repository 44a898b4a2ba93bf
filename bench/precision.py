#!/usr/bin/env python
"""Mixed precision on the CPU: the fine-tune stage in fp32 against bf16 autocast, samples/s and test macro-F1.

Both variants fine-tune the same base model (the packaged MiniLM by default) on the same PreparedDataset (one
ingest + preprocess of BBC News by default), with the same epochs, batch size, learning rate, seed and device,
through the product's own stages (tasks/training/fine_tune.py `fine_tune`, then `evaluate` on the test split).
Only `precision` differs. Each variant runs in a child process of its own (bench/lora.py's runner), alternating
order with --repeats. bf16 pays off only where the CPU has native bf16 instructions (AVX512-BF16, AMX, Arm BF16):
the fine-tune's `precision: auto` picks it there; elsewhere oneDNN emulates it and fp32 is faster.

Run from the repository root:  .venv/bin/python bench/precision.py          (about 10 minutes on 2 cores)
                               .venv/bin/python bench/precision.py --source drug-reviews --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import offline_env  # noqa: F401  (first: no hub look-ups, no telemetry; see bench/offline_env.py)
from lora import fine_tune_and_evaluate, result_document, run_variants, variant_arguments
from results_json import write_json_atomically

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUTPUT = REPO / "bench" / "results" / "precision.json"
DEFAULT_WORK = REPO / "bench" / "results" / "work-precision"  # git-ignored (bench/results/)
VARIANTS = ("fp32", "bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = variant_arguments(__doc__.split("\n\n")[0], VARIANTS, "bbc-news", 1, DEFAULT_OUTPUT, DEFAULT_WORK)
    parser.set_defaults(device="cpu")
    return parser.parse_args(argv)


def run_variant(args: argparse.Namespace) -> dict:
    from flows.training import resolve_base_model
    from tasks.training.fine_tune import FineTuneConfig, cpu_has_native_bf16

    config = FineTuneConfig(
        base_model=resolve_base_model(args.base_model),
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        early_stopping_patience=0,  # the same number of steps for both
        device=args.device,
        precision=args.variant,
    )
    return {**fine_tune_and_evaluate(args, config), "cpu_has_native_bf16": cpu_has_native_bf16()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)))
        return 0
    runs, median = run_variants(__file__, args, argv, VARIANTS)
    fp32, bf16 = median["fp32"], median["bf16"]
    comparison = {
        "bf16_over_fp32": {
            "train_samples_per_second": bf16["train_samples_per_second"] / fp32["train_samples_per_second"],
            "test_macro_f1_points": 100 * (bf16["test_macro_f1"] - fp32["test_macro_f1"]),
        }
    }
    result = result_document("precision", args, runs, median, comparison)
    write_json_atomically(args.output, result)
    print(json.dumps(result["bf16_over_fp32"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
