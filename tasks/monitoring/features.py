"""What the drift monitor measures per text: the champion's predicted label and confidence, the length, the
tokenizer's unknown tokens and a sentence embedding (the champion's encoder, mean-pooled). `measure_window` turns
one window (tasks/monitoring/windows.py) into the arrays the statistics compare (tasks/monitoring/statistics.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from tasks.monitoring.statistics import Sample

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TextModels:
    """The champion's tokenizer (unknown tokens) and encoder (embeddings), and how many tokens it reads."""

    tokenizer: PreTrainedTokenizerBase
    encoder: torch.nn.Module
    max_length: int

    @classmethod
    def load(cls, model_dir: Path) -> TextModels:
        """From a fine-tuned model folder: its tokenizer and the encoder under its classification head. Always the
        PyTorch model: a folder that answers with ONNX Runtime (runtime.json) keeps its PyTorch weights, and only
        they expose the encoder."""
        from tasks.serving.classifier import TextClassifier
        from tasks.serving.onnx_runtime import PYTORCH

        classifier = TextClassifier(model_dir, runtime=PYTORCH)
        return cls(classifier.tokenizer, classifier.model.base_model, classifier.max_length)


NO_LABEL = "(none)"  # a multi-label model's window label for a text answered with no class


def window_label(label_set: list[str]) -> str:
    """A multi-label answer's one label for the label-distribution test: its most probable class, or NO_LABEL.
    Every window (test split, scored source, request log) derives it the same way."""
    return str(label_set[0]) if len(label_set) else NO_LABEL


def label_lists(values: pd.Series) -> list[list[str]] | None:
    """A column of label lists (Parquet gives numpy arrays) as lists; None when it is not one (single-label)."""
    if not len(values) or values.isna().any() or isinstance(values.iloc[0], str):
        return None
    return [[str(c) for c in row] for row in values]


def predict_labels(
    model_dir: Path, texts: list[str]
) -> tuple[list[str], npt.NDArray[np.floating[Any]], list[list[str]] | None]:
    """The champion's label for each text and its probability (the top-class probability); for a multi-label
    champion also the classes each text is answered with (its label is then `window_label` of them)."""
    from tasks.serving.classifier import TextClassifier

    if not texts:
        return [], np.zeros(0), None
    classifier = TextClassifier(model_dir)
    probabilities = classifier.predict_proba(texts)
    confidence: npt.NDArray[np.floating[Any]] = probabilities.max(axis=1)
    if classifier.multi_label:
        sets = classifier.label_sets(probabilities)
        return [window_label(s) for s in sets], confidence, sets
    best = probabilities.argmax(axis=1)
    return [classifier.label_names[i] for i in best], confidence, None


def unknown_token_counts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int = 256
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(unknown tokens, tokens) per text, over the whole text (no truncation, no special tokens)."""
    unknown_id = tokenizer.unk_token_id
    unknown, totals = np.zeros(len(texts), np.int64), np.zeros(len(texts), np.int64)
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(texts[start : start + batch_size], add_special_tokens=False, truncation=False, verbose=False)[
            "input_ids"
        ]
        for offset, row in enumerate(ids):
            unknown[start + offset] = sum(1 for token in row if token == unknown_id)
            totals[start + offset] = len(row)
    return unknown, totals


def embed_texts(
    tokenizer: PreTrainedTokenizerBase,
    encoder: torch.nn.Module,
    texts: list[str],
    max_length: int,
    batch_size: int = 32,
) -> npt.NDArray[np.float32]:
    """Sentence embeddings: the encoder's last hidden state mean-pooled over the real tokens, L2-normalised.
    Texts are batched by length so little is padded."""
    import torch

    device = next(encoder.parameters()).device
    order = np.argsort([len(t) for t in texts], kind="stable")
    out: npt.NDArray[np.float32] | None = None
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            index = order[start : start + batch_size]
            encoded = tokenizer(
                [texts[i] for i in index], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            ).to(device)
            hidden = encoder(**encoded).last_hidden_state.float()
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            normalised = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
            if out is None:
                out = np.zeros((len(texts), normalised.shape[1]), np.float32)
            out[index] = normalised
    return out if out is not None else np.zeros((0, 0), np.float32)


def measure_window(
    frame: pd.DataFrame, models: TextModels | None, max_embedding_texts: int, rng: np.random.Generator
) -> Sample:
    """The per-text quantities of a window frame (columns text, label, probability, length_chars): labels,
    confidences and lengths always; with `models` and where texts are known, unknown-token counts and the
    embeddings of at most `max_embedding_texts` of them (a uniform sample)."""
    known = frame["text"].notna().to_numpy()
    lengths = frame["length_chars"].dropna().to_numpy(float)
    label_sets = label_lists(frame["labels"]) if "labels" in frame.columns else None
    sample = Sample(
        labels=frame["label"].astype(str).to_numpy(),
        label_sets=label_sets,
        confidence=frame["probability"].to_numpy(float),
        length=lengths if len(lengths) else None,
    )
    if models is None or known.sum() == 0:
        return sample
    texts = frame.loc[known, "text"].astype(str).tolist()
    unknown = tokens = None
    if models.tokenizer.unk_token_id is not None:
        unknown, tokens = unknown_token_counts(models.tokenizer, texts)
    chosen = np.sort(rng.choice(len(texts), min(len(texts), max_embedding_texts), replace=False))
    embeddings = embed_texts(models.tokenizer, models.encoder, [texts[i] for i in chosen], models.max_length)
    return replace(sample, unknown=unknown, tokens=tokens, embeddings=embeddings)
