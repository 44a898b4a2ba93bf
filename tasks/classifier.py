"""Inference on a fine-tuned model folder: one tokenizer and model loaded once, batched prediction.
Used by evaluation, by the MLflow pyfunc model, and by the service. Depends only on torch, transformers,
numpy and pandas, because MLflow copies this package into every logged model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

LABELS_FILE = "labels.json"
PREDICTION_COLUMNS = ("label", "probability")


class TextClassifier:
    """A fine-tuned sequence classifier, ready to predict label strings from raw texts."""

    def __init__(self, model_dir: str | Path, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.model_dir).to(self.device).eval()
        self.label_names: list[str] = json.loads((self.model_dir / LABELS_FILE).read_text())
        self.max_length = int(json.loads((self.model_dir / "textclf.json").read_text())["max_length"])

    def predict_proba(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities, one row per text, in input order. Texts are batched by length to pad little."""
        import torch

        order = np.argsort([len(t) for t in texts], kind="stable")
        probabilities = np.zeros((len(texts), len(self.label_names)), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                index = order[start : start + batch_size]
                encoded = self.tokenizer(
                    [texts[i] for i in index],
                    truncation=True,
                    max_length=self.max_length,
                    padding=True,
                    return_tensors="pt",
                ).to(self.device)
                logits = self.model(**encoded).logits.float()
                probabilities[index] = torch.softmax(logits, dim=-1).cpu().numpy()
        return probabilities

    def classify(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """One batch, tokenized once: class probabilities and, per text, whether it was cut at max_length.
        (The fast tokenizer's overflow mapping says which texts overflowed; only their first window is scored.)"""
        import torch

        encoded = self.tokenizer(
            texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt",
            return_overflowing_tokens=True, stride=0,
        )
        sample_of_row = encoded.pop("overflow_to_sample_mapping").tolist()
        first_rows = [sample_of_row.index(i) for i in range(len(texts))]
        truncated = [sample_of_row.count(i) > 1 for i in range(len(texts))]
        inputs = {key: value[first_rows].to(self.device) for key, value in encoded.items()}
        with torch.inference_mode():
            logits = self.model(**inputs).logits.float()
        return torch.softmax(logits, dim=-1).cpu().numpy(), truncated

    def predict(self, texts: list[str], batch_size: int = 64) -> pd.DataFrame:
        """Label, its probability, and one `proba_<label>` column per class."""
        probabilities = self.predict_proba(texts, batch_size)
        best = probabilities.argmax(axis=1)
        frame = pd.DataFrame(
            {
                "label": [self.label_names[i] for i in best],
                "probability": probabilities[np.arange(len(texts)), best].astype(float),
            }
        )
        for index, name in enumerate(self.label_names):
            frame[f"proba_{name}"] = probabilities[:, index].astype(float)
        return frame


def as_texts(model_input) -> list[str]:
    """Accept what MLflow users pass: a list of strings, a Series, or a DataFrame with a `text` column."""
    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return model_input[column].astype(str).tolist()
    if isinstance(model_input, (pd.Series, np.ndarray)):
        return [str(t) for t in model_input.tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(t) for t in model_input]
