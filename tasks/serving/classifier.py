"""Inference on a fine-tuned model folder: one tokenizer and model loaded once, batched prediction.
Used by evaluation, by the MLflow pyfunc model, batch scoring, drift monitoring and the service. Depends only on
torch, transformers, numpy, pandas, tasks/serving/windows.py and tasks/serving/onnx_runtime.py, because MLflow copies these modules
into every logged model.

The runtime that computes the logits is the folder's (its runtime.json, written by the promotion flow: PyTorch,
ONNX fp32 or ONNX int8; see tasks/serving/onnx_runtime.py) unless `runtime=` names one. torch is imported only for the
PyTorch runtime, so a folder that answers with ONNX Runtime needs no torch at inference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.serving.onnx_runtime import PYTORCH, OnnxLogits, check_runtime, folder_runtime, onnx_file
from tasks.serving.windows import EncodedWindows, Windowing, encode_windows, pool_logits, sigmoid, softmax

LABELS_FILE = "labels.json"
MODEL_SETTINGS_FILE = "textclf.json"  # max length, truncation strategy, base model, data version
PREDICTION_COLUMNS = ("label", "probability")
MULTI_LABEL = "multi_label"  # textclf.json `problem_type` of a model that answers any number of classes per text
DEFAULT_THRESHOLD = 0.5  # a multi-label class without a threshold chosen on validation
ADAPTER_CONFIG = "adapter_config.json"  # a LoRA model saved as adapters only (fine-tune lora_merge=false)


def is_adapter_folder(model_dir: Path) -> bool:
    return (Path(model_dir) / ADAPTER_CONFIG).exists()


def load_sequence_classifier(model_dir: str | Path, **kwargs: Any) -> Any:
    """The folder's transformers sequence classifier. An adapter folder (LoRA adapters and the head, saved with
    lora_merge=false) loads its base model (textclf.json `base_model`: a local folder or a hub id, which must be
    loadable here), applies the adapters with peft and merges them, so it runs as fast as a plain model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    if not is_adapter_folder(model_dir):
        return AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs)
    from peft import PeftModel

    base = json.loads((model_dir / MODEL_SETTINGS_FILE).read_text()).get("base_model")
    labels = json.loads((model_dir / LABELS_FILE).read_text())
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            ignore_mismatched_sizes=True,  # the head comes from the adapter folder
            **kwargs,
        )
    except OSError as error:
        raise ValueError(
            f"{model_dir} holds LoRA adapters only, and their base model {base!r} cannot be loaded here ({error}). "
            "Make that folder or hub model available where the model is scored, or fine-tune with lora_merge=true "
            "to register merged weights."
        ) from error
    model.config.pad_token_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id  # as in training
    return PeftModel.from_pretrained(model, model_dir).merge_and_unload()


def save_merged(model_dir: Path, target: Path) -> None:
    """An adapter folder written to `target` as a plain model folder (merged weights, the same tokenizer, labels
    and settings); a plain folder copied as it is."""
    import shutil

    if not is_adapter_folder(model_dir):
        shutil.copytree(model_dir, target, dirs_exist_ok=True)
        return
    shutil.copytree(
        model_dir, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(ADAPTER_CONFIG, "adapter_model.*")
    )
    load_sequence_classifier(model_dir).save_pretrained(str(target))


class TextClassifier:
    """A fine-tuned sequence classifier, ready to predict label strings from raw texts. Long texts are fed to it
    with the truncation strategy it was trained with (textclf.json; see tasks/serving/windows.py).

    `runtime`: None answers with what the folder says (runtime.json, else PyTorch); "pytorch", "onnx-fp32" or
    "onnx-int8" overrides it. `self.runtime` is the runtime that answers. `device` applies to PyTorch (ONNX Runtime
    runs on the CPU)."""

    def __init__(self, model_dir: str | Path, device: str | None = None, runtime: str | None = None):
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self.runtime = check_runtime(runtime) if runtime is not None else folder_runtime(self.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if self.runtime == PYTORCH:
            import torch

            self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model = load_sequence_classifier(self.model_dir).to(self.device).eval()
        else:
            self.device = "cpu"
            self.model = OnnxLogits(onnx_file(self.model_dir, self.runtime))
        self.label_names: list[str] = json.loads((self.model_dir / LABELS_FILE).read_text())
        settings = json.loads((self.model_dir / MODEL_SETTINGS_FILE).read_text())
        self.windowing = Windowing.from_dict(settings)
        self.max_length = self.windowing.max_length
        # multi_label: sigmoid probabilities, and a class is answered when its probability reaches its threshold
        # (chosen per class on the validation split by the fine-tune; textclf.json `thresholds`).
        self.multi_label = settings.get("problem_type") == MULTI_LABEL
        chosen = settings.get("thresholds") or {}
        self.thresholds = np.asarray(
            [float(chosen.get(name, DEFAULT_THRESHOLD)) for name in self.label_names], dtype=np.float32
        )

    def window_logits(self, encoded: EncodedWindows, batch_size: int = 64) -> np.ndarray:
        """The model's logits for every window, in window order; windows are batched by length to pad little.
        The one place where the runtimes differ."""
        lengths = [len(ids) for ids in encoded.input_ids]
        order = np.argsort(lengths, kind="stable")
        logits = np.zeros((len(lengths), len(self.label_names)), dtype=np.float32)
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        if self.runtime != PYTORCH:
            for index in batches:
                logits[index] = self.model(self.tokenizer, [encoded.input_ids[i] for i in index])
            return logits
        import torch

        with torch.inference_mode():
            for index in batches:
                batch = self.tokenizer.pad({"input_ids": [encoded.input_ids[i] for i in index]}, return_tensors="pt")
                logits[index] = self.model(**batch.to(self.device)).logits.float().cpu().numpy()
        return logits

    def encode(self, texts: list[str]) -> EncodedWindows:
        """The texts tokenized once and cut into the model's windows (its truncation strategy)."""
        return encode_windows(self.tokenizer, list(texts), self.windowing)

    def classify_encoded(self, encoded: EncodedWindows, batch_size: int = 64) -> np.ndarray:
        """Class probabilities of encoded texts, one row per text in input order (`chunks`: windows' logits
        averaged): a softmax over the classes, or for a multi-label model each class's sigmoid."""
        if not encoded.truncated:
            return np.zeros((0, len(self.label_names)), dtype=np.float32)
        pooled = pool_logits(self.window_logits(encoded, batch_size), encoded.owner, len(encoded.truncated))
        return sigmoid(pooled) if self.multi_label else softmax(pooled)

    def label_sets(self, probabilities: np.ndarray) -> list[list[str]]:
        """Per text, the classes it is answered with, most probable first: for a multi-label model every class whose
        probability reaches its threshold (maybe none), else the most probable class."""
        answers = []
        for row in np.asarray(probabilities):
            if self.multi_label:
                above = np.flatnonzero(row >= self.thresholds)
                answers.append([self.label_names[i] for i in above[np.argsort(-row[above], kind="stable")]])
            else:
                answers.append([self.label_names[int(row.argmax())]])
        return answers

    def classify(self, texts: list[str], batch_size: int = 64) -> tuple[np.ndarray, list[bool]]:
        """Class probabilities, one row per text in input order, and per text whether it did not fit in one
        window. Each text is tokenized once; with `chunks` its windows' logits are averaged."""
        encoded = self.encode(texts)
        return self.classify_encoded(encoded, batch_size), encoded.truncated

    def predict_proba(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities, one row per text, in input order."""
        return self.classify(texts, batch_size)[0]

    def predict(self, texts: list[str], batch_size: int = 64) -> pd.DataFrame:
        """Label (the most probable class), its probability, and one `proba_<label>` column per class; a
        multi-label model adds `labels`, the classes at or above their thresholds (its answer)."""
        probabilities = self.predict_proba(texts, batch_size)
        best = probabilities.argmax(axis=1)
        frame = pd.DataFrame(
            {
                "label": [self.label_names[i] for i in best],
                "probability": probabilities[np.arange(len(texts)), best].astype(float),
            }
        )
        if self.multi_label:
            frame["labels"] = self.label_sets(probabilities)
        for index, name in enumerate(self.label_names):
            frame[f"proba_{name}"] = probabilities[:, index].astype(float)
        return frame


def as_texts(model_input: Any) -> list[str]:
    """Accept what MLflow users pass: a list of strings, a Series, or a DataFrame with a `text` column."""
    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        texts: list[str] = model_input[column].astype(str).tolist()
        return texts
    if isinstance(model_input, (pd.Series, np.ndarray)):
        return [str(t) for t in model_input.tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(t) for t in model_input]
