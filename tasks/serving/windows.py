"""How a text longer than the model's max length is fed to it: the truncation strategies.

One implementation for training (preprocess), evaluation, the MLflow pyfunc, batch scoring and the Bento service,
so that what the model was trained and validated on is what it sees when it serves. It works on token ids of the
text without special tokens, and lets the tokenizer add its own ([CLS] ... [SEP] for BERT, nothing for GPT-2):

- `head`: the first tokens that fit (what a tokenizer's `truncation=True` does);
- `tail`: the last tokens that fit;
- `head+tail`: the first `head_share` of the window and the rest from the end (Sun et al. 2019, "How to
  Fine-Tune BERT for Text Classification?", found head+tail best on long reviews);
- `chunks`: windows that cover the whole text, each repeating `chunk_overlap` of the one before (at most
  `max_chunks`, the last one ending at the text's end); each window is classified and
  the logits are averaged per text.

A text is `truncated` when it does not fit in one window, whatever the strategy. Depends only on numpy (MLflow
copies this module into every logged model and the Bento ships it)."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Truncation = Literal["head", "tail", "head+tail", "chunks"]
TRUNCATION_STRATEGIES: tuple[str, ...] = ("head", "tail", "head+tail", "chunks")


def has_visible_character(text: str) -> bool:
    """Whether `text` holds anything to read: a character that is not a separator (spaces), a control or a format
    character (zero-width ones, NUL). The service refuses texts without one; batch scoring leaves them unscored."""
    return any(not unicodedata.category(character).startswith(("Z", "C")) for character in text)


@dataclass(frozen=True)
class Windowing:
    """Where the windows of a text are cut. `max_length` counts the tokenizer's special tokens too."""

    strategy: str = "head"
    max_length: int = 128
    head_share: float = 0.25  # head+tail: share of the window taken from the start
    chunk_overlap: float = 0.25  # chunks: share of a window that the next window repeats
    max_chunks: int = 32  # chunks: most windows per text (bounds the cost of one very long text)

    def __post_init__(self) -> None:
        if self.strategy not in TRUNCATION_STRATEGIES:
            raise ValueError(f"truncation {self.strategy!r} is not one of {', '.join(TRUNCATION_STRATEGIES)}")
        if not 0 <= self.head_share <= 1:
            raise ValueError(f"head_share {self.head_share} must be between 0 and 1")
        if not 0 <= self.chunk_overlap < 1:
            raise ValueError(f"chunk_overlap {self.chunk_overlap} must be at least 0 and less than 1")
        if self.max_chunks < 1:
            raise ValueError(f"max_chunks {self.max_chunks} must be at least 1")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Windowing:
        """From a model folder's textclf.json; a model saved before strategies existed was trained on `head`."""
        names = {
            "strategy": "truncation",
            "max_length": "max_length",
            "head_share": "head_share",
            "chunk_overlap": "chunk_overlap",
            "max_chunks": "max_chunks",
        }
        return cls(**{field: values[key] for field, key in names.items() if key in values})

    def as_dict(self) -> dict[str, Any]:
        return {
            "truncation": self.strategy,
            "max_length": self.max_length,
            "head_share": self.head_share,
            "chunk_overlap": self.chunk_overlap,
            "max_chunks": self.max_chunks,
        }


def content_windows(ids: list[int], budget: int, windowing: Windowing) -> list[list[int]]:
    """The windows (lists of at most `budget` content token ids) that the model sees for one text."""
    if budget < 1:
        raise ValueError(f"max_length {windowing.max_length} leaves no room for text after the special tokens")
    if len(ids) <= budget:
        return [list(ids)]
    strategy = windowing.strategy
    if strategy == "head":
        return [list(ids[:budget])]
    if strategy == "tail":
        return [list(ids[-budget:])]
    if strategy == "head+tail":
        head = int(round(windowing.head_share * budget))
        return [list(ids[:head]) + (list(ids[-(budget - head) :]) if budget > head else [])]
    # chunks: windows of `budget` tokens every `step` tokens; the last one ends at the text's end.
    overlap = min(int(round(windowing.chunk_overlap * budget)), budget - 1)
    step = budget - overlap
    starts = list(range(0, len(ids) - budget, step))[: windowing.max_chunks - 1] + [len(ids) - budget]
    if windowing.max_chunks == 1:
        starts = [0]
    return [list(ids[start : start + budget]) for start in starts]


@dataclass(frozen=True)
class EncodedWindows:
    """Model inputs for a list of texts: one row per window, `owner[i]` is the text window i belongs to."""

    input_ids: list[list[int]]
    owner: npt.NDArray[np.int64]
    truncated: list[bool]  # per text: it did not fit in one window
    token_lengths: list[int]  # per text: its tokens, the tokenizer's special tokens included (as one window would)

    @property
    def windows_per_text(self) -> npt.NDArray[np.intp]:
        return np.bincount(self.owner, minlength=len(self.truncated))


def _quiet(tokenizer: Any) -> Any:
    # Tokenizing without truncation warns once that the text is longer than the model's maximum: windows follow.
    getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


@lru_cache(maxsize=16)  # once per tokenizer, not on every serving batch
def special_tokens(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids the tokenizer puts before and after a single text ([CLS] and [SEP] for BERT, <s> and </s> for
    RoBERTa, none for GPT-2), read off a probe text encoded with and without them."""
    probe = "windows probe"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start]), tuple(full[start + len(plain) :])
    raise ValueError(f"Cannot tell the special tokens of {type(tokenizer).__name__}: {full} does not contain {plain}")


def encode_windows(tokenizer: Any, texts: list[str], windowing: Windowing) -> EncodedWindows:
    """Tokenize `texts` once (fast tokenizer, no special tokens) and cut each into its windows, with the
    tokenizer's special tokens added to every window."""
    prefix, suffix = special_tokens(tokenizer)
    budget = windowing.max_length - len(prefix) - len(suffix)
    content = _quiet(tokenizer)(list(texts), add_special_tokens=False, truncation=False)["input_ids"] if texts else []
    input_ids: list[list[int]] = []
    owner: list[int] = []
    truncated: list[bool] = []
    specials = len(prefix) + len(suffix)
    for index, ids in enumerate(content):
        truncated.append(len(ids) > budget)
        for window in content_windows(ids, budget, windowing):
            input_ids.append([*prefix, *window, *suffix])
            owner.append(index)
    return EncodedWindows(
        input_ids=input_ids,
        owner=np.asarray(owner, dtype=np.int64),
        truncated=truncated,
        token_lengths=[len(ids) + specials for ids in content],
    )


def pool_logits(
    window_logits: npt.NDArray[np.floating[Any]], owner: npt.NDArray[np.integer[Any]], texts: int
) -> npt.NDArray[np.float32]:
    """Mean of the windows' logits per text (a text with one window keeps its logits)."""
    sums = np.zeros((texts, window_logits.shape[1]), dtype=np.float64)
    np.add.at(sums, owner, window_logits)
    counts = np.bincount(owner, minlength=texts).clip(min=1)
    pooled: npt.NDArray[np.float32] = (sums / counts[:, None]).astype(np.float32)
    return pooled


def softmax(logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.floating[Any]]:
    """Row-wise softmax, in the dtype of `logits`."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities: npt.NDArray[np.floating[Any]] = shifted / shifted.sum(axis=1, keepdims=True)
    return probabilities


def sigmoid(logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.floating[Any]]:
    """Element-wise logistic function (multi-label models: each class's own probability), in the dtype of `logits`."""
    probabilities: npt.NDArray[np.floating[Any]] = 0.5 * (1.0 + np.tanh(0.5 * logits))  # no overflow for large |x|
    return probabilities
