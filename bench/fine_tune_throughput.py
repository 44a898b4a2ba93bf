#!/usr/bin/env python
"""Fine-tune throughput: our fine-tune stage against a plain, tutorial-style transformers Trainer.

Both variants run in ONE process on the same machine, one after the other, on the identical training examples
(a fixed, seeded subset of the `train` split of one PreparedDataset), with the same base model, max length,
batch size, epochs, learning rate, seed, device and precision, so they take the same number of optimizer steps.

  ours   `tasks.training.fine_tune.fine_tune()` unchanged: pre-tokenized data, dynamic padding (DataCollatorWithPadding),
         length-grouped batches, plus what the stage does besides training: validation each epoch, a checkpoint
         each epoch, reloading the best checkpoint and saving the final model.
  plain  the classic tutorial: `tokenizer(text, padding="max_length", truncation=True, max_length=L)` up front,
         default random sampler and default collator,
         `TrainingArguments(eval_strategy="epoch", report_to=[])` as in Hugging Face's "Fine-tune a pretrained
         model" tutorial: it evaluates on the same validation examples each epoch, and saves nothing in a short run.

Two throughput measures per variant, both in training samples per second (samples x epochs / seconds):
  train_samples_per_second  the Trainer's own metric (its train() loop; for ours it includes the per-epoch
                            validation and checkpoint saves, which happen inside that loop);
  wall_samples_per_second   wall clock of the whole variant: model load and Trainer set-up, train(), and for ours
                            the best-model reload and final save. Tokenization is outside for both (ours did it in
                            the preprocess stage, plain does it before the model is loaded, as tutorials do).

Run from the repository root:  .venv/bin/python bench/fine_tune_throughput.py  (see bench/README.md)
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import offline_env  # noqa: F401  (first: no hub look-ups, no telemetry; see bench/offline_env.py)
from results_json import write_json_atomically

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUTPUT = REPO / "bench" / "results" / "fine_tune_throughput.json"
DEFAULT_WORK = REPO / "bench" / "results" / "work"  # git-ignored (bench/results/)
WARMUP_STEPS = 2


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training throughput of our fine-tune stage against a plain tutorial-style Trainer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        default="bbc-news",
        help="Ingest source: bbc-news, drug-reviews, or a CSV/TSV/JSONL/Parquet file or folder.",
    )
    parser.add_argument(
        "--base-model", default="all-MiniLM-L6-v2", help="all-MiniLM-L6-v2 (packaged) or a local model folder."
    )
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--train-samples",
        type=int,
        default=320,
        help="Training examples both variants train on (a seeded subset of the train split).",
    )
    parser.add_argument(
        "--validation-samples",
        default="auto",
        help="Validation examples our task evaluates each epoch: 'auto' keeps the production "
        "validation:train ratio of the full dataset, 'all' the whole split, or a number.",
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="The training flow's default.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Measure each variant this many times, alternating which goes first; medians reported.",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Where the JSON result is written.")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK,
        help="Working files: snapshot and preprocess caches, per-run folders (removed afterwards).",
    )
    parser.add_argument("--keep-work", action="store_true", help="Keep this run's checkpoints and models.")
    args = parser.parse_args(argv)
    for name in ("max_length", "batch_size", "train_samples", "epochs", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.validation_samples not in ("auto", "all"):
        try:
            if int(args.validation_samples) < 1:
                raise ValueError
        except ValueError:
            parser.error("--validation-samples must be 'auto', 'all' or a positive number")
    return args


# ----------------------------------------------------------------------------------------------------------
# Data: the same PreparedDataset for both variants, cut to a fixed subset
# ----------------------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, base_model: str):
    """Ingest and preprocess exactly as the training flow does (content-keyed caches under the work folder)."""
    from tasks.training.ingest import IngestConfig, ingest
    from tasks.training.preprocess import PreprocessConfig, preprocess

    cache = args.work_dir / "cache"
    snapshot = ingest(IngestConfig(source=args.dataset), cache / "snapshots")
    prepared = preprocess(
        snapshot,
        PreprocessConfig(tokenizer=base_model, max_length=args.max_length, seed=args.seed),
        cache / "preprocess",
    )
    return snapshot, prepared


def subset(prepared, n_train: int, validation: str, seed: int, target: Path):
    """A PreparedDataset whose train split is a seeded subset of `n_train` examples of the original's.

    Seeded shuffle then the first N: a sample with the dataset's own length distribution (the first N rows
    could be one class or one source file). The validation split is cut the same way; `auto` keeps the
    validation:train ratio of the full data, so the per-epoch validation our task does costs about what it
    costs in production, instead of evaluating a full validation split after a few hundred training samples."""
    import datasets

    full = datasets.load_from_disk(str(prepared.tokenized_path))
    n_train = min(n_train, len(full["train"]))
    if validation == "all":
        n_val = len(full["validation"])
    elif validation == "auto":
        n_val = max(1, round(len(full["validation"]) * n_train / len(full["train"])))
    else:
        n_val = int(validation)
    n_val = min(n_val, len(full["validation"]))

    def cut(split, n):
        return split.shuffle(seed=seed).select(range(n)).flatten_indices()

    parts = datasets.DatasetDict(
        {"train": cut(full["train"], n_train), "validation": cut(full["validation"], n_val), "test": full["test"]}
    )
    target.mkdir(parents=True, exist_ok=True)
    parts.save_to_disk(str(target / "tokenized"))
    shutil.copy2(prepared.splits_path, target / "splits.parquet")  # the texts the windows' text_index names
    key = hashlib.sha256(f"{prepared.cache_key}|train={n_train}|validation={n_val}|seed={seed}".encode())
    return prepared.model_copy(
        update={
            "path": target,
            "cache_key": key.hexdigest()[:16],
            "split_sizes": {"train": n_train, "validation": n_val, "test": len(full["test"])},
            "cache_hit": False,
        }
    )


def tokenize_plain(prepared, base_model: str, max_length: int):
    """The tutorial's tokenization of the same train texts, padded to max_length; and whether, pads aside, it
    gives exactly the token ids our preprocess stage stored (same tokenizer, same truncation)."""
    import datasets
    from transformers import AutoTokenizer

    ours = datasets.load_from_disk(str(prepared.tokenized_path))["train"]
    tokenizer = AutoTokenizer.from_pretrained(base_model)

    def tokenize_function(examples):
        return tokenizer(examples["text"], padding="max_length", truncation=True, max_length=max_length)

    def texts_and_labels(split: str, rows):
        # The tokenized rows are windows; `text_index` names the text of the split each one comes from.
        texts = prepared.split(split)["text"].tolist()
        return datasets.Dataset.from_dict({"text": [texts[i] for i in rows["text_index"]], "labels": rows["labels"]})

    plain = texts_and_labels("train", ours).map(tokenize_function, batched=True)
    validation = datasets.load_from_disk(str(prepared.tokenized_path))["validation"]
    plain_validation = texts_and_labels("validation", validation).map(tokenize_function, batched=True)
    same = all(
        list(ids[: sum(mask)]) == list(reference)
        for ids, mask, reference in zip(plain["input_ids"], plain["attention_mask"], ours["input_ids"])
    )
    data_pad_share = 1.0 - sum(map(sum, plain["attention_mask"])) / (len(plain) * max_length)
    return plain, plain_validation, same, data_pad_share


# ----------------------------------------------------------------------------------------------------------
# Instrumentation: counts what the training dataloader actually feeds, and times validation and saves
# ----------------------------------------------------------------------------------------------------------


class PadCounter:
    """Wraps a data collator; counts the batches it builds (token positions, pad positions, samples).

    Installed on the training dataloader only (evaluation batches are not counted). The counting is one
    sum over the attention mask of a CPU tensor per batch, before it is moved to the device: the same
    negligible cost for both variants."""

    def __init__(self, inner=None, pad_token_id: int | None = None):
        self.inner = inner
        self.pad_token_id = pad_token_id
        self.batches = self.samples = self.positions = self.pads = 0
        self.max_batch_length = 0

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        if mask is None:
            mask = batch["input_ids"] != self.pad_token_id
        self.batches += 1
        self.samples += int(mask.shape[0])
        self.positions += int(mask.numel())
        self.pads += int(mask.numel() - int(mask.sum()))
        self.max_batch_length = max(self.max_batch_length, int(mask.shape[-1]))
        return batch

    def summary(self) -> dict:
        return {
            "padding_tokens_share": self.pads / self.positions if self.positions else None,
            "batches_fed": self.batches,
            "samples_fed": self.samples,
            "token_positions_fed": self.positions,
            "pad_tokens_fed": self.pads,
            "mean_batch_length": self.positions / self.samples if self.samples else None,
            "max_batch_length": self.max_batch_length,
        }


def phase_timer():
    """A callback timing what happens inside train() besides training: after on_epoch_end the Trainer evaluates
    (ends with on_evaluate), then saves a checkpoint (ends with on_save)."""
    from transformers import TrainerCallback

    class PhaseTimer(TrainerCallback):
        def __init__(self):
            self.mark = None
            self.eval_s = self.save_s = 0.0
            self.evaluations = self.saves = 0

        def on_epoch_end(self, args, state, control, **kwargs):
            self.mark = time.perf_counter()

        def on_evaluate(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.mark is not None:
                self.eval_s += now - self.mark
            self.evaluations += 1
            self.mark = now

        def on_save(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.mark is not None:
                self.save_s += now - self.mark
            self.saves += 1
            self.mark = None

    return PhaseTimer()


def instrument(trainer):
    counter = PadCounter(pad_token_id=getattr(trainer.model.config, "pad_token_id", None))
    original = trainer.get_train_dataloader

    def get_train_dataloader(*args, **kwargs):
        collator = trainer.data_collator
        counter.inner = collator
        trainer.data_collator = counter  # captured by the training DataLoader only
        try:
            return original(*args, **kwargs)
        finally:
            trainer.data_collator = collator

    trainer.get_train_dataloader = get_train_dataloader
    timer = phase_timer()
    trainer.add_callback(timer)
    return counter, timer


def trainer_train_metrics(trainer) -> dict:
    """The Trainer's own end-of-training metrics (train_runtime, train_samples_per_second, ...)."""
    for entry in reversed(trainer.state.log_history):
        if "train_samples_per_second" in entry:
            return entry
    raise RuntimeError("the Trainer logged no train_samples_per_second")


def settle(device: str) -> None:
    """Release the previous variant's memory so it does not weigh on the next one."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# The two variants
# ----------------------------------------------------------------------------------------------------------


def run_ours(prepared, args, base_model: str, run_dir: Path) -> dict:
    """`fine_tune()` as the flow calls it (minus MLflow tracking). `build_trainer` is wrapped only to observe
    the Trainer it returns (count the fed batches, time validation/saves); the Trainer itself is unchanged."""
    import tasks.training.fine_tune as ft

    config = ft.FineTuneConfig(
        base_model=base_model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        device=args.device,
        # Early stopping could end our run before the last epoch, i.e. with fewer optimizer steps than the plain
        # Trainer; off, both take exactly ceil(N / batch) * epochs steps. It does no per-step work either way.
        early_stopping_patience=0,
    )
    seen = {}  # what the observed build saw: setup time, the trainer, its counters
    original_build = ft.build_trainer

    def observed_build(*a, **kw):
        started = time.perf_counter()
        trainer = original_build(*a, **kw)
        seen["setup_s"] = time.perf_counter() - started
        seen["trainer"] = trainer
        seen["counter"], seen["timer"] = instrument(trainer)
        return trainer

    ft.build_trainer = observed_build
    try:
        started = time.perf_counter()
        result = ft.fine_tune(prepared, config, run_dir / "ours")
        wall = time.perf_counter() - started
    finally:
        ft.build_trainer = original_build
    if result.reused or "trainer" not in seen:
        raise RuntimeError(f"fine_tune reused an earlier result in {run_dir}; the benchmark needs a fresh folder")

    trainer, counter, timer = seen.pop("trainer"), seen["counter"], seen["timer"]
    metrics = trainer_train_metrics(trainer)
    samples = len(trainer.train_dataset) * args.epochs
    loop_s = metrics["train_runtime"] - timer.eval_s - timer.save_s
    out = {
        "train_samples_per_second": float(metrics["train_samples_per_second"]),
        "wall_samples_per_second": samples / wall,
        "train_runtime_s": float(metrics["train_runtime"]),
        "wall_s": wall,
        "steps": int(result.global_step),
        **counter.summary(),
        "samples_trained": samples,
        "epochs_completed": result.epochs_completed,
        "setup_s": seen["setup_s"],
        "validation_s": timer.eval_s,
        "validations": timer.evaluations,
        "checkpoint_save_s": timer.save_s,
        "checkpoint_saves": timer.saves,
        "after_train_s": wall - seen["setup_s"] - float(result.train_runtime_s),
        # Training alone: the Trainer's runtime without the validation and checkpoint time inside it.
        "train_loop_only_samples_per_second": samples / loop_s if loop_s > 0 else None,
        "device": result.device,
        "precision": result.precision,
        "validation_macro_f1": result.best_validation_macro_f1,
        "train_loss": metrics.get("train_loss"),
    }
    seen.clear()
    del trainer
    return out


def _accuracy(eval_prediction) -> dict[str, float]:
    import numpy as np

    return {"accuracy": float((np.asarray(eval_prediction.predictions).argmax(-1) == eval_prediction.label_ids).mean())}


def run_plain(
    plain_train,
    plain_validation,
    num_labels: int,
    args,
    base_model: str,
    device: str,
    precision: str,
    run_dir: Path,
    max_steps: int | None = None,
) -> dict:
    """The tutorial Trainer (Hugging Face's "Fine-tune a pretrained model"): evaluates on the validation split
    each epoch, as ours does, and keeps the default save strategy (every 500 steps: no save in a short run).
    Timed from the model load on, like ours (whose wall clock starts in build_trainer)."""
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    started = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model,
        num_labels=num_labels,
        ignore_mismatched_sizes=True,  # as ours: a base model with another head
    )
    training_args = TrainingArguments(
        output_dir=str(run_dir / "plain"),
        num_train_epochs=args.epochs,
        max_steps=max_steps if max_steps else -1,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        eval_strategy="epoch" if plain_validation is not None else "no",
        save_strategy="no",
        report_to=[],
        # Same device and precision as ours, so the comparison is about the pipeline, not about autocast.
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=plain_train,
        eval_dataset=plain_validation,
        compute_metrics=_accuracy,
    )
    counter, timer = instrument(trainer)
    setup_s = time.perf_counter() - started
    trainer.train()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    wall = time.perf_counter() - started

    metrics = trainer_train_metrics(trainer)
    samples = counter.samples if max_steps else len(plain_train) * args.epochs
    out = {
        "train_samples_per_second": float(metrics["train_samples_per_second"]),
        "wall_samples_per_second": samples / wall,
        "train_runtime_s": float(metrics["train_runtime"]),
        "wall_s": wall,
        "steps": int(trainer.state.global_step),
        **counter.summary(),
        "samples_trained": samples,
        "epochs_completed": float(trainer.state.epoch or 0),
        "setup_s": setup_s,
        "validation_s": timer.eval_s,
        "checkpoint_save_s": timer.save_s,
        "train_loop_only_samples_per_second": samples
        / max(1e-9, metrics["train_runtime"] - timer.eval_s - timer.save_s),
        "device": device,
        "precision": precision,
        "train_loss": metrics.get("train_loss"),
    }
    del trainer, model
    return out


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def environment(device: str, precision: str) -> dict:
    import accelerate
    import datasets
    import torch
    import transformers

    from flows.training import code_version

    return {
        "device": device,
        "precision": precision,
        "cuda_device_name": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "cuda_version": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "code_version": code_version(),
    }


MEASURES = ("train_samples_per_second", "wall_samples_per_second")
MEDIAN_KEYS = MEASURES + (
    "train_runtime_s",
    "wall_s",
    "train_loop_only_samples_per_second",
    "setup_s",
    "validation_s",
    "checkpoint_save_s",
)


def combine(runs: list[dict]) -> dict:
    """One variant over its repeats: medians of the timings; counts (identical across repeats) from the first."""
    combined = dict(runs[0])
    for key in MEDIAN_KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            combined[key] = statistics.median(values)
    combined["steps"] = runs[0]["steps"]
    combined["padding_tokens_share"] = runs[0]["padding_tokens_share"]
    if len(runs) > 1:
        combined["runs"] = runs
    return combined


def print_summary(result: dict) -> None:
    c, e, ours, plain = result["config"], result["environment"], result["variants"]["ours"], result["variants"]["plain"]
    ratio = result["ratio_ours_over_plain"]
    print()
    print(
        f"fine-tune throughput: {c['dataset']} / {Path(c['base_model']).name}, {e['device']} {e['precision']}"
        f" ({e['cuda_device_name'] or str(e['torch_num_threads']) + ' threads'}), {c['train_samples']} samples x "
        f"{c['epochs']} epoch(s), batch {c['batch_size']}, max_length {c['max_length']}, repeats {c['repeats']}"
    )
    rows = [
        (
            "Trainer samples/s",
            ours["train_samples_per_second"],
            plain["train_samples_per_second"],
            ratio["train_samples_per_second"],
        ),
        (
            "wall-clock samples/s",
            ours["wall_samples_per_second"],
            plain["wall_samples_per_second"],
            ratio["wall_samples_per_second"],
        ),
        (
            "train-loop-only samples/s",
            ours["train_loop_only_samples_per_second"],
            plain["train_loop_only_samples_per_second"],
            None,
        ),
        ("Trainer runtime (s)", ours["train_runtime_s"], plain["train_runtime_s"], None),
        ("wall clock (s)", ours["wall_s"], plain["wall_s"], None),
        ("optimizer steps", ours["steps"], plain["steps"], None),
        ("pad share of fed tokens", ours["padding_tokens_share"], plain["padding_tokens_share"], None),
    ]
    print(f"  {'':28}{'ours':>12}{'plain':>12}{'ours/plain':>12}")
    for name, a, b, r in rows:
        fmt = (lambda v: f"{v:>12d}") if isinstance(a, int) else (lambda v: f"{v:>12.3f}")
        print(f"  {name:28}{fmt(a)}{fmt(b)}{(f'{r:>12.3f}' if r is not None else '')}")
    print(
        f"  ours also ran {ours['validations']} validation(s) ({ours['validation_s']:.2f}s) and "
        f"{ours['checkpoint_saves']} checkpoint save(s) ({ours['checkpoint_save_s']:.2f}s) inside train()"
    )
    met = result["target_met_by_measure"]
    print(
        f"  target (ours >= plain): {'MET' if result['target_met'] else 'NOT MET'} "
        f"(Trainer metric: {'yes' if met['train_samples_per_second'] else 'no'}, "
        f"wall clock: {'yes' if met['wall_samples_per_second'] else 'no'})"
    )
    for note in result["notes"]:
        print(f"  note: {note}")


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.work_dir = args.work_dir.resolve()
    import transformers

    from flows.training import resolve_base_model
    from tasks.training.fine_tune import choose_device

    transformers.logging.set_verbosity_warning()
    base_model = resolve_base_model(args.base_model)
    # The device and precision our task will choose (and, on the CPU, its thread count: choose_device sets
    # torch's threads to every core, process-wide, so the plain Trainer gets the same threads).
    device, precision = choose_device(args.device)
    env = environment(device, precision)

    snapshot, prepared = prepare(args, base_model)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    run_root = Path(tempfile.mkdtemp(dir=args.work_dir, prefix="run-"))
    try:
        data = subset(prepared, args.train_samples, args.validation_samples, args.seed, run_root / "data")
        n_train = data.split_sizes["train"]
        plain_train, plain_validation, same_tokens, data_pad_share = tokenize_plain(data, base_model, args.max_length)
        num_labels = len(data.label_names)

        # Warm-up, untimed: the first model load in a process pays for imports (Trainer, accelerate), reading
        # the weights from disk into the page cache, torch's thread pools and kernel selection (on a GPU: the
        # CUDA context and cuBLAS handles). Whoever ran first would pay that, so a few steps of the plain
        # Trainer on a few batches go first. That warms the plain Trainer's fixed max_length shape best, which
        # if anything favours plain, i.e. errs against our target. With --repeats > 1 the order then
        # alternates as well (plain first in even repeats) and medians are reported.
        warm_n = min(n_train, WARMUP_STEPS * args.batch_size)
        started = time.perf_counter()
        run_plain(
            plain_train.select(range(warm_n)),
            None,
            num_labels,
            args,
            base_model,
            device,
            precision,
            run_root / "warmup",
            max_steps=WARMUP_STEPS,
        )
        warmup_s = time.perf_counter() - started
        settle(device)

        runs: dict[str, list[dict]] = {"ours": [], "plain": []}
        for repeat in range(args.repeats):
            order = ("plain", "ours") if repeat % 2 == 0 else ("ours", "plain")
            for position, variant in enumerate(order):
                run_dir = run_root / f"repeat-{repeat}"
                if variant == "ours":
                    measured = run_ours(data, args, base_model, run_dir)
                else:
                    measured = run_plain(
                        plain_train, plain_validation, num_labels, args, base_model, device, precision, run_dir
                    )
                measured.update(repeat=repeat, position=position)
                runs[variant].append(measured)
                settle(device)
                print(
                    f"[{variant}] repeat {repeat}: {measured['train_samples_per_second']:.2f} samples/s (Trainer), "
                    f"{measured['wall_samples_per_second']:.2f} samples/s (wall)",
                    flush=True,
                )
                if not args.keep_work:
                    shutil.rmtree(run_dir / variant, ignore_errors=True)
    finally:
        if not args.keep_work:
            shutil.rmtree(run_root, ignore_errors=True)

    ours, plain = combine(runs["ours"]), combine(runs["plain"])
    expected_steps = math.ceil(n_train / args.batch_size) * args.epochs
    ratio = {m: ours[m] / plain[m] for m in MEASURES}
    met = {m: ours[m] >= plain[m] for m in MEASURES}
    notes = []
    if not (ours["steps"] == plain["steps"] == expected_steps):
        notes.append(f"optimizer steps differ: ours {ours['steps']}, plain {plain['steps']}, expected {expected_steps}")
    if not same_tokens:
        notes.append("the tutorial tokenization does not give the token ids our preprocess stored")
    if n_train < args.train_samples:
        notes.append(f"the train split has only {n_train} examples (asked for {args.train_samples})")
    if device == "cpu" and env["load_average_at_start"] and env["load_average_at_start"][0] > env["cpus_usable"]:
        # With more runnable threads than cores, torch's OpenMP threads wait on each other at every parallel
        # region; step times then depend on tensor sizes and on the other load far more than on the model.
        notes.append(
            f"the machine was busy (load average {env['load_average_at_start'][0]:.1f} on "
            f"{env['cpus_usable']} CPUs, torch using {env['torch_num_threads']} threads): thread "
            f"contention makes these numbers, and their ratio, unreliable; re-run on an idle machine"
        )
    result = {
        "benchmark": "fine_tune_throughput",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {
            "dataset": args.dataset,
            "data_version": snapshot.version,
            "base_model": args.base_model,
            "base_model_path": base_model,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "train_samples": n_train,
            "train_samples_requested": args.train_samples,
            "validation_samples": data.split_sizes["validation"],
            "validation_samples_option": args.validation_samples,
            "full_split_sizes": prepared.split_sizes,
            "num_labels": num_labels,
            "epochs": args.epochs,
            "learning_rate": args.learning_rate,
            "seed": args.seed,
            "device_requested": args.device,
            "repeats": args.repeats,
            "warmup": f"plain Trainer, {WARMUP_STEPS} steps on {warm_n} examples, untimed ({warmup_s:.2f}s)",
            "order": "plain then ours in even repeats, ours then plain in odd ones",
            "expected_steps": expected_steps,
        },
        "environment": {**env, "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "variants": {
            "ours": {
                "description": "tasks.training.fine_tune.fine_tune(): dynamic padding, length-grouped batches, "
                "validation + checkpoint each epoch, best-model reload, final save",
                **ours,
            },
            "plain": {
                "description": "tutorial Trainer: padding='max_length' at tokenization, random sampler, "
                "default collator, no eval, no saves",
                "padding_tokens_share_from_data": data_pad_share,
                "same_token_ids_as_ours": same_tokens,
                **plain,
            },
        },
        "ratio_ours_over_plain": ratio,
        "target_met": all(met.values()),
        "target_met_by_measure": met,
        "notes": notes,
    }
    output = args.output if args.output.is_absolute() else Path.cwd() / args.output
    write_json_atomically(output, result)
    print_summary(result)
    print(f"  written: {output}")
    return result


if __name__ == "__main__":
    main()
