"""Stage 3, fine-tune: a transformers sequence classifier on the preprocessed data.

Dynamic padding with length-grouped batches, linear warmup and decay, optional class-weighted loss, early
stopping on validation macro-F1, a fixed seed. CUDA with bf16/fp16 autocast when there is a GPU, otherwise
every CPU core (bf16 autocast where the CPU computes bf16 natively). Data-parallel over several GPUs (or CPU
processes) with torchrun. A checkpoint each epoch; re-running the same fine-tune resumes from the last complete
one."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.common.atomic import write_text_atomically
from tasks.common.processes import start_process, stop_process_tree
from tasks.contracts import FineTunedModel, PreparedDataset
from tasks.serving.classifier import LABELS_FILE, MODEL_SETTINGS_FILE
from tasks.tracking import TrackingRef

if TYPE_CHECKING:
    from collections.abc import Sized

    import numpy as np
    import numpy.typing as npt
    import torch
    from transformers import (
        EvalPrediction,
        PreTrainedTokenizerBase,
        Trainer,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

logger = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: its presence means the checkpoint is complete
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class _ClassifierOutput(Protocol):
    """What the loss reads of a sequence classifier's output (a transformers SequenceClassifierOutput, whose
    `logits` the type hints allow to be None; a forward pass always returns them)."""

    logits: torch.Tensor


class FineTuneConfig(BaseModel):
    """How to fine-tune. These fields own their defaults and bounds: the training flow's form and `textclf train`
    reuse them (flows/training.py `TrainingParameters`)."""

    model_config = ConfigDict(frozen=True)

    base_model: str = Field(description="Local model folder or hub id to fine-tune.")
    epochs: int = Field(default=3, ge=1, le=100, description="Most epochs to train (early stopping may end sooner).")
    batch_size: int = Field(default=16, ge=1, le=1024, description="Training batch size.")
    learning_rate: float = Field(default=1e-4, gt=0, le=0.1, description="Peak learning rate (AdamW).")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Share of the steps with a linear warmup.")
    weight_decay: float = Field(default=0.01, ge=0, le=1, description="AdamW weight decay.")
    class_weighted_loss: bool = Field(default=False, description="Weight the loss by inverse class frequency.")
    early_stopping_patience: int = Field(
        default=2, ge=0, le=100, description="Epochs without a better validation macro-F1 before stopping; 0: never."
    )
    seed: int = Field(
        default=42,
        ge=0,
        description="Seed of the weight initialisation and the data order (the training flow splits the data with it too).",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="auto: CUDA when a GPU is visible, else all CPU cores."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Mixed precision of the forward and backward passes (the weights stay fp32). auto: bf16 on a GPU "
        "that supports it, else fp16; on the CPU bf16 where it has native bf16 instructions (AVX512-BF16, AMX, Arm "
        "BF16), else fp32. fp16 is for GPUs only.",
    )
    peft: Literal["none", "lora"] = Field(
        default="none",
        description="lora: train low-rank adapters (the peft library) and the classification head instead of every "
        "weight; the adapters are merged into the saved model, which serves like any other.",
    )
    lora_rank: int = Field(default=8, ge=1, le=512, description="LoRA rank r (with peft=lora).")
    lora_alpha: int = Field(default=16, ge=1, le=4096, description="LoRA scaling alpha (with peft=lora).")
    lora_dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA branch (with peft=lora).")
    lora_target_modules: str = Field(
        default="",
        max_length=1000,
        description="Comma-separated module names the adapters wrap, e.g. 'q_proj,v_proj' (with peft=lora); empty: "
        "peft's default for the architecture (the attention projections).",
    )
    lora_merge: bool = Field(
        default=True,
        description="With peft=lora: true saves the adapters merged into the base weights (a plain model, served as "
        "any); false saves only the adapters and the head with the base model's reference (a small registry entry; "
        "the base model must load where the model is scored; the Bento gets the merged weights).",
    )
    load_in: Literal["full", "8bit", "4bit"] = Field(
        default="full",
        description="8bit/4bit: load the base model quantized (bitsandbytes, CUDA only; with peft=lora, QLoRA).",
    )
    processes: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Data-parallel training processes (torchrun, started by the task): 0: one per visible GPU, 1 "
        "without a GPU; N: N processes, on GPUs with NCCL or on the CPU with gloo, each on its share of the cores. "
        "batch_size stays the global batch: each process takes batch_size / N.",
    )


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU computes bf16 natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16). Elsewhere oneDNN emulates
    bf16, slower than fp32. Linux's /proc/cpuinfo; False where it cannot be read."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags = set(value.split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def choose_device(requested: str, precision: str = "auto") -> tuple[str, str]:
    """(device, precision): CUDA with bf16 where supported, else fp16; the CPU on all its cores (its share of them in
    one of several data-parallel processes), in bf16 where it has native bf16 instructions (1.4-1.5x the fp32
    samples/s of MiniLM on this project's AVX512-BF16 CI machine, bench/precision.py), else fp32. An explicit
    precision is kept, fp16 on a CPU refused."""
    import torch

    if requested in ("auto", "cuda") and torch.cuda.is_available():
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "cuda", precision
    if requested == "cuda":
        logger.warning("CUDA was requested but no GPU is visible; fine-tuning on the CPU instead.")
    if precision == "fp16":
        raise ValueError("precision fp16 needs a GPU and none is visible: use precision auto, bf16 or fp32 on the CPU.")
    # every core; one of several data-parallel processes on the CPU gets its share of them
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // data_parallel_process()[1]))
    if precision == "auto":
        precision = "bf16" if cpu_has_native_bf16() else "fp32"
    elif precision == "bf16" and not cpu_has_native_bf16():
        logger.warning("precision bf16 on a CPU without native bf16 instructions: emulated, slower than fp32.")
    return "cpu", precision


def training_processes(config: FineTuneConfig, device: str) -> int:
    """How many data-parallel processes this fine-tune trains with; an error naming the setting where it cannot."""
    import torch

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    processes = config.processes or max(1, gpus)
    if device == "cuda" and processes > gpus:
        raise ValueError(f"processes={processes} needs as many GPUs and {gpus} are visible: set processes to 0 (auto).")
    if config.batch_size % processes:
        raise ValueError(
            f"batch_size={config.batch_size} is the global batch and must divide evenly over processes={processes}: "
            f"use a multiple of {processes}."
        )
    return processes


def data_parallel_process() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless it is one of several data-parallel processes, whose process
    group tasks/training/fine_tune_rank.py joined before calling `fine_tune`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_key(data: PreparedDataset, config: FineTuneConfig) -> str:
    """Same data and same settings: same folder, so a re-run finds the checkpoints of an interrupted one."""
    return hashlib.sha256(f"{data.cache_key}|{config.model_dump_json()}".encode()).hexdigest()[:16]


def _checkpoints(checkpoint_dir: Path) -> list[Path]:
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, key=lambda step_and_path: step_and_path[0])]


def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint whose trainer state was written (a run killed mid-save leaves one without)."""
    complete = [p for p in _checkpoints(checkpoint_dir) if (p / TRAINER_STATE).exists()]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(checkpoint_dir: Path) -> None:
    for checkpoint in _checkpoints(checkpoint_dir):
        if not (checkpoint / TRAINER_STATE).exists():
            shutil.rmtree(checkpoint, ignore_errors=True)


def class_weights(labels: list[int], num_labels: int) -> torch.Tensor:
    import torch

    counts = torch.bincount(torch.tensor(labels), minlength=num_labels).float().clamp(min=1)
    return counts.sum() / (num_labels * counts)


def positive_weights(vectors: list[list[float]]) -> torch.Tensor:
    """Multi-label class weighting: per class, its negatives over its positives (the `pos_weight` of the binary
    cross-entropy), so a rare class's few positives weigh as much as its many negatives."""
    import torch

    targets = torch.tensor(vectors, dtype=torch.float32)
    positives = targets.sum(dim=0).clamp(min=1)
    return (len(targets) - positives).clamp(min=1) / positives


def pooled_macro_f1(
    text_index: Sequence[int], multi_label: bool = False
) -> Callable[[EvalPrediction], dict[str, float]]:
    """Validation metrics per text, not per window: a text's windows' logits are averaged first, exactly as the
    classifier does when it predicts (tasks/serving/windows.py). The eval dataloader keeps the dataset's order.
    Multi-label: a class is predicted at probability 0.5 here (the per-class thresholds are chosen after training)."""
    import numpy as np

    from tasks.serving.windows import pool_logits

    owner = np.unique(np.asarray(text_index), return_inverse=True)[1]

    def compute(eval_prediction: EvalPrediction) -> dict[str, float]:
        logits = np.asarray(eval_prediction.predictions, dtype=np.float32)
        texts = int(owner.max()) + 1 if len(owner) else 0
        pooled = pool_logits(logits, owner, texts)
        first_window = np.unique(owner, return_index=True)[1]
        labels = np.asarray(eval_prediction.label_ids)[first_window]
        if multi_label:
            return _multi_label_scores((pooled >= 0).astype(int), labels.astype(int))  # logit 0 = probability 0.5
        return _scores(pooled.argmax(axis=-1), labels)

    return compute


def _scores(predicted: npt.NDArray[np.integer[Any]], labels: npt.NDArray[np.integer[Any]]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(labels, predicted)),
    }


def _multi_label_scores(
    predicted: npt.NDArray[np.integer[Any]], labels: npt.NDArray[np.integer[Any]]
) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(labels, predicted, average="micro", zero_division=0)),
        "accuracy": float(accuracy_score(labels, predicted)),  # subset accuracy: every class of the text right
    }


THRESHOLD_GRID = tuple(round(0.05 * step, 2) for step in range(1, 20))  # 0.05 .. 0.95
MIN_POSITIVES_FOR_OWN_THRESHOLD = 10


def _best_threshold(truth: np.ndarray, probabilities: np.ndarray, prefer: float) -> float:
    """The THRESHOLD_GRID value with the best F1 (micro over every cell given), ties to the one nearest `prefer`."""
    from sklearn.metrics import f1_score

    scored = [
        (float(f1_score(truth.ravel(), (probabilities >= t).ravel(), zero_division=0)), -abs(t - prefer), t)
        for t in THRESHOLD_GRID
    ]
    return max(scored)[2]


def choose_thresholds(
    probabilities: np.ndarray,
    targets: np.ndarray,
    label_names: list[str],
    min_positives: int = MIN_POSITIVES_FOR_OWN_THRESHOLD,
) -> dict[str, float]:
    """The probability threshold of each class, chosen on the validation split: one threshold for every class first
    (the best micro-F1 over all text-class cells, ties nearest 0.5), then a class's own best-F1 threshold where the
    split holds at least `min_positives` texts of it (ties nearest the shared one). A coarse grid (THRESHOLD_GRID)
    and the shared fallback, because a threshold fitted to a handful of positives overfits them: on ATIS, per-class
    thresholds of 1-3 validation examples cost more on the test split than they gained."""
    targets = targets.astype(int)
    shared = _best_threshold(targets, probabilities, 0.5) if targets.any() else 0.5
    chosen = {}
    for column, name in enumerate(label_names):
        if targets[:, column].sum() >= min_positives:
            chosen[name] = _best_threshold(targets[:, column], probabilities[:, column], shared)
        else:
            chosen[name] = shared
    return chosen


def _mlflow_callback(tracking: TrackingRef) -> TrainerCallback:
    from transformers import TrainerCallback

    class MlflowStepMetrics(TrainerCallback):
        """Step metrics to MLflow while training runs. A tracking hiccup must not kill a long fine-tune."""

        def on_log(
            self,
            args: TrainingArguments,
            state: TrainerState,
            control: TrainerControl,
            logs: dict[str, float] | None = None,
            **kwargs: Any,
        ) -> None:
            from tasks.tracking import log_metrics

            numeric = {
                f"train/{k}" if not k.startswith("eval_") else f"validation/{k[5:]}": v
                for k, v in (logs or {}).items()
                if isinstance(v, (int, float))
            }
            try:
                log_metrics(tracking, numeric, step=state.global_step)
            except Exception as error:
                logger.warning("Could not log step metrics to MLflow: %s", error)

    return MlflowStepMetrics()  # added on the first data-parallel process only (build_trainer)


class _PaddingModelInputs:
    """Dynamic padding to the longest window in the batch; drops the bookkeeping fields (`length`, which the
    length-grouped sampler reads, and `text_index`, which the pooled validation metric reads)."""

    BOOKKEEPING = ("length", "text_index")

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        from transformers import DataCollatorWithPadding

        self.pad = DataCollatorWithPadding(tokenizer)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.pad([{k: v for k, v in f.items() if k not in self.BOOKKEEPING} for f in features])


def with_padding_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Decoder tokenizers (Llama, Qwen, GPT-2) often have no padding token; batches need one: their end-of-text token
    (else the unknown token) pads, as is usual for sequence classification with them."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(
                f"The tokenizer of the base model ({type(tokenizer).__name__}) has no padding, end-of-text or unknown "
                "token to pad batches with: set one (tokenizer.pad_token) in the model folder."
            )
        tokenizer.pad_token = fallback
    return tokenizer


def quantized_loading(config: FineTuneConfig, device: str) -> dict[str, Any]:
    """from_pretrained arguments for `load_in` 8bit/4bit (bitsandbytes, CUDA only); a clear error where it cannot."""
    if config.load_in == "full":
        return {}
    if device != "cuda":
        raise ValueError(
            f"load_in={config.load_in} quantizes the base model with bitsandbytes, which needs a CUDA GPU; this run is "
            f"on the {device}. Use load_in=full here, or run on the gpu pool."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"load_in={config.load_in} needs the bitsandbytes package on the worker: pip install bitsandbytes "
            "(or use load_in=full)."
        )
    import torch
    from transformers import BitsAndBytesConfig

    if config.load_in == "8bit":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}  # type: ignore[no-untyped-call]
    return {
        "quantization_config": BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    }


def with_lora_adapters(model: Any, config: FineTuneConfig) -> Any:
    """The model with LoRA adapters on its target modules; only the adapters and the classification head (peft's
    `modules_to_save` for sequence classification) are trained."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if config.load_in != "full":
        model = prepare_model_for_kbit_training(model)  # type: ignore[no-untyped-call]
    targets = [name.strip() for name in config.lora_target_modules.split(",") if name.strip()]
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets or None,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as error:  # peft names the modules it could not find, or that it has no default for the model
        raise ValueError(
            f"LoRA cannot wrap {config.lora_target_modules or 'the default modules'} of {config.base_model}: {error} "
            "Set lora_target_modules to names of its linear layers (e.g. 'query,value' for BERT, 'q_proj,v_proj' "
            "for Llama/Qwen)."
        ) from error


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, all) parameters of a model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def build_trainer(
    config: FineTuneConfig,
    data: PreparedDataset,
    checkpoint_dir: Path,
    device: str,
    precision: str,
    tracking: TrackingRef | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> Trainer:
    """The transformers Trainer for this fine-tune; also used by the benchmark and the sweep (`callbacks`: extra
    transformers TrainerCallbacks, such as a pruning callback)."""
    import datasets
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        EarlyStoppingCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    # Model inputs plus the precomputed `length` (which the length-grouped sampler reads instead of re-measuring
    # every row) and `text_index`; the collator drops both before the batch reaches the model.
    tokenized = datasets.load_from_disk(str(data.tokenized_path))
    num_labels = len(data.label_names)
    tokenizer = with_padding_token(AutoTokenizer.from_pretrained(config.base_model))
    set_seed(config.seed)  # before the model load: the fresh classification head is initialised here
    multi_label = data.multi_label
    model = AutoModelForSequenceClassification.from_pretrained(
        config.base_model,
        num_labels=num_labels,
        **({"problem_type": "multi_label_classification"} if multi_label else {}),
        id2label=dict(enumerate(data.label_names)),
        label2id={name: i for i, name in enumerate(data.label_names)},
        ignore_mismatched_sizes=True,  # a base model with another head: start a fresh one
        **quantized_loading(config, device),
    )
    # Decoder models (Llama, Qwen, GPT-2) classify from the last non-padding token: the model must know the padding.
    model.config.pad_token_id = tokenizer.pad_token_id
    if config.peft == "lora":
        model = with_lora_adapters(model, config)
    steps_per_epoch = -(-len(tokenized["train"]) // config.batch_size)
    rank, world = data_parallel_process()
    arguments = TrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size // world,  # batch_size is the global batch
        per_device_eval_batch_size=max(config.batch_size, 32) // world,
        ddp_backend="gloo" if world > 1 and device == "cpu" else None,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=int(config.warmup_ratio * steps_per_epoch * config.epochs),
        train_sampling_strategy="group_by_length",
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=max(1, min(50, steps_per_epoch // 4)),
        seed=config.seed,
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        report_to=[],
        remove_unused_columns=False,
        dataloader_pin_memory=device == "cuda",
        disable_tqdm=False,
    )
    weights = None
    if config.class_weighted_loss:
        train_labels = tokenized["train"]["labels"]
        weights = (positive_weights(train_labels) if multi_label else class_weights(train_labels, num_labels)).to(
            device
        )

    def weighted_loss(
        outputs: _ClassifierOutput,
        labels: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        import torch.nn.functional as F

        if multi_label:
            # One binary cross-entropy per class (fp32 logits, also under bf16 autocast), summed over the classes and
            # averaged over the texts, not averaged over both (BCEWithLogitsLoss's default): on ATIS (17 intents, 10
            # epochs) validation macro-F1 at 0.5 reached 0.36 against 0.18 (bench/README.md, multi-label).
            per_class = F.binary_cross_entropy_with_logits(
                outputs.logits.float(), labels.float(), pos_weight=weights, reduction="none"
            )
            return per_class.sum(dim=1).mean()
        return F.cross_entropy(outputs.logits.float(), labels, weight=weights)

    class WindowTrainer(Trainer):
        """The pooled validation metric needs the eval predictions in the dataset's order (text_index tells which
        text each window belongs to). transformers length-groups (shuffles) eval batches with group_by_length."""

        def _get_eval_sampler(
            self, eval_dataset: torch.utils.data.Dataset[Any]
        ) -> torch.utils.data.Sampler[int] | None:
            if eval_dataset is None:
                return super()._get_eval_sampler(eval_dataset)
            # With several processes accelerate shards these batches in turn and gathers them back in this order.
            return SequentialSampler(cast("Sized", eval_dataset))  # a datasets.Dataset, which has a length

    callbacks = list(callbacks or [])
    if config.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    if tracking is not None and rank == 0:  # one process logs, not each
        callbacks.append(_mlflow_callback(tracking))
    return WindowTrainer(
        model=model,
        args=arguments,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        processing_class=tokenizer,
        data_collator=_PaddingModelInputs(tokenizer),
        compute_metrics=pooled_macro_f1(tokenized["validation"]["text_index"], multi_label),
        compute_loss_func=weighted_loss if weights is not None or multi_label else None,
        callbacks=callbacks,
    )


def fine_tune(
    data: PreparedDataset,
    config: FineTuneConfig,
    output_root: Path,
    tracking: TrackingRef | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> FineTunedModel:
    work_dir = output_root / run_key(data, config)
    checkpoint_dir, model_dir, result_path = work_dir / "checkpoints", work_dir / "model", work_dir / "result.json"
    if result_path.exists():  # the same fine-tune already finished: its model is the answer
        return FineTunedModel.model_validate_json(result_path.read_text()).model_copy(update={"reused": True})

    device, precision = choose_device(config.device, config.precision)
    processes = training_processes(config, device)
    rank, world = data_parallel_process()
    if world == 1:  # the task's own process (a data-parallel one finds this done)
        remove_incomplete_checkpoints(checkpoint_dir)
        if processes > 1:
            if callbacks:
                raise ValueError("callbacks run in the task's process only: use processes=1 with them (the sweep does)")
            return run_data_parallel(data, config, output_root, tracking, processes, work_dir)
    resume_from = last_complete_checkpoint(checkpoint_dir)
    if resume_from:
        logger.info("Resuming fine-tune from %s", resume_from)
    trainer = build_trainer(config, data, checkpoint_dir, device, precision, tracking, callbacks)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    runtime = time.perf_counter() - started

    trainable, total = parameter_counts(trainer.model)
    state = trainer.state
    result = FineTunedModel(
        model_dir=model_dir,
        base_model=config.base_model,
        device=device,
        precision=precision,
        epochs_completed=float(state.epoch or 0),
        global_step=int(state.global_step),
        best_validation_macro_f1=float(state.best_metric or 0.0),
        train_samples_per_second=float(output.metrics.get("train_samples_per_second", 0.0)),
        train_runtime_s=runtime,
        resumed_from_checkpoint=resume_from.name if resume_from else None,
        trainable_parameters=trainable,
        total_parameters=total,
        processes=processes,
    )
    if rank != 0:  # every process holds the same weights; the first one saves them
        return result
    staging = work_dir / ".model.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    if config.peft == "lora" and config.lora_merge:  # the adapters merged into the base: a plain transformers model
        cast(Any, trainer.model).merge_and_unload().save_pretrained(str(staging))
    elif config.peft == "lora":  # adapter_config.json (it names the base model) and the adapters and head only
        cast(Any, trainer.model).save_pretrained(str(staging))
    else:
        trainer.save_model(str(staging))  # the best epoch's weights: load_best_model_at_end restored them
    # build_trainer passes the tokenizer as the processing class
    cast("PreTrainedTokenizerBase", trainer.processing_class).save_pretrained(str(staging))
    (staging / LABELS_FILE).write_text(json.dumps(data.label_names, indent=2))
    settings = {
        **data.windowing.windowing().as_dict(),
        "base_model": config.base_model,
        "data_version": data.data_version,
        "problem_type": data.problem_type,
    }
    (staging / MODEL_SETTINGS_FILE).write_text(json.dumps(settings))
    if data.multi_label:  # the thresholds are part of the model: every place that predicts applies the same ones
        settings["thresholds"] = validation_thresholds(staging, data)
        (staging / MODEL_SETTINGS_FILE).write_text(json.dumps(settings))
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)
    result_path.write_text(result.model_dump_json(indent=2))
    return result


def validation_thresholds(model_dir: Path, data: PreparedDataset) -> dict[str, float]:
    """The per-class thresholds of a multi-label model, chosen on the validation split with the saved model itself
    (the classifier every consumer predicts with), never on the test split."""
    import numpy as np

    from tasks.serving.classifier import TextClassifier

    validation = data.split("validation")
    probabilities = TextClassifier(model_dir).predict_proba(validation["text"].tolist())
    return choose_thresholds(probabilities, np.stack(validation["label_vector"].to_numpy()), data.label_names)


class DataParallelJob(BaseModel):
    """What each data-parallel process is given (a JSON file): the fine-tune call it makes as one rank."""

    data: PreparedDataset
    config: FineTuneConfig
    output_root: Path
    tracking: TrackingRef | None = None


def run_data_parallel(
    data: PreparedDataset,
    config: FineTuneConfig,
    output_root: Path,
    tracking: TrackingRef | None,
    processes: int,
    work_dir: Path,
) -> FineTunedModel:
    """Train in `processes` data-parallel processes: torchrun (torch.distributed.run, rendezvous on a free loopback
    port) as a child of this task, each process calling `fine_tune` as one rank (tasks/training/fine_tune_rank.py);
    the gradients are averaged over the processes each step (DDP: NCCL on GPUs, gloo on the CPU). Rank 0 saves the
    model and its result.json, read back here. Their output goes to this process's stderr. A failed or killed
    process fails the run with the end of that output; re-running the same fine-tune resumes from its last
    complete checkpoint."""
    job = work_dir / "data-parallel-job.json"
    write_text_atomically(
        job, DataParallelJob(data=data, config=config, output_root=output_root, tracking=tracking).model_dump_json()
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # one machine: a c10d rendezvous on localhost, on a free port
        f"--nproc-per-node={processes}",
        "-m",
        "tasks.training.fine_tune_rank",
        str(job),
    ]
    repository = Path(__file__).resolve().parents[2]  # where `tasks` is importable from, whatever the cwd
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(repository), *filter(None, sys.path)]),  # this process's imports
        "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // processes)),
    }
    logger.info("Fine-tuning in %d data-parallel processes: %s", processes, " ".join(command))
    process = start_process(command, subprocess.PIPE, env=env)
    tail: deque[str] = deque(maxlen=40)
    try:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace")
            tail.append(line)
            sys.stderr.write(line)
        code = process.wait()
    finally:
        if process.poll() is None:  # this task was interrupted (timeout, Ctrl-C): stop the processes with it
            stop_process_tree(process.pid)
    result_path = work_dir / "result.json"
    if code != 0 or not result_path.exists():
        raise RuntimeError(
            f"The data-parallel fine-tune ({processes} processes) failed (torchrun exit code {code}). Re-running "
            f"the same fine-tune resumes from its last complete checkpoint. Last output:\n{''.join(tail)}"
        )
    return FineTunedModel.model_validate_json(result_path.read_text())


# No retries: a failed fine-tune is re-run deliberately, and then resumes from its last checkpoint.
fine_tune_task = task(name="fine-tune", retries=0, timeout_seconds=6 * 3600)(fine_tune)
