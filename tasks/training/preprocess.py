"""Stage 2, preprocess: clean texts, drop exact duplicates, split train/validation/test (stratified, seeded,
respecting the source's own splits), persist the label map and tokenize. The result is cached on disk under a
key of (data version, tokenizer content, max length, split settings), so a re-run does not redo it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from prefect import task
from pydantic import ConfigDict, Field
from sklearn.model_selection import train_test_split

from tasks.common.atomic import atomic_directory
from tasks.common.text import clean_text
from tasks.contracts import DatasetSnapshot, DatasetValidationError, PreparedDataset, WindowingConfig
from tasks.serving.windows import encode_windows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Bump when cleaning or splitting changes, so that old caches are not reused.
PREPROCESS_VERSION = "3"
SPLITS = ("train", "validation", "test")
# When a text occurs in several splits, keep the copy in the split that matters most for honest scores.
SPLIT_PRIORITY = {"test": 0, "validation": 1, "train": 2}


class PreprocessConfig(WindowingConfig):
    model_config = ConfigDict(frozen=True)

    tokenizer: str = Field(description="Local model folder or hub id whose tokenizer is used.")
    validation_fraction: float = Field(
        default=0.1, gt=0, lt=0.5, description="Share of the data held out for validation (sources without splits)."
    )
    test_fraction: float = Field(
        default=0.1, gt=0, lt=0.5, description="Share of the data held out for the test (sources without splits)."
    )
    seed: int = Field(default=42, ge=0, description="Seed of the stratified split.")


def drop_duplicates(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep one row per cleaned text, preferring the copy in test, then validation, so no text is in two splits."""
    priority = frame["split"].map(SPLIT_PRIORITY).fillna(len(SPLIT_PRIORITY))
    ordered = frame.assign(_priority=priority).sort_values("_priority", kind="stable")
    kept = ordered.drop_duplicates("text", keep="first").drop(columns="_priority").sort_index()
    return kept, len(frame) - len(kept)


def multi_hot(label_sets: pd.Series, label_names: list[str]) -> np.ndarray:
    """One row per text, one 0/1 column per class of `label_names` (float32, what the multi-label loss takes)."""
    index = {name: i for i, name in enumerate(label_names)}
    matrix = np.zeros((len(label_sets), len(label_names)), dtype=np.float32)
    for row, labels in enumerate(label_sets):
        matrix[row, [index[label] for label in labels]] = 1.0
    return matrix


def _carve(train: pd.DataFrame, size: int, seed: int) -> pd.Index:
    """`size` rows of `train`, stratified: by class, or for label lists by iterative stratification (Sechidis et al.
    2011, the iterative-stratification package), which keeps each class's share in both parts."""
    if len(train) and not isinstance(train["label"].iloc[0], str):
        from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

        names = sorted({label for labels in train["label"] for label in labels})
        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=size, random_state=seed)
        _, carved = next(splitter.split(np.zeros(len(train)), multi_hot(train["label"], names)))
        return train.index[carved]
    _, carved = train_test_split(train.index, test_size=size, stratify=train["label"], random_state=seed)
    return pd.Index(carved)


def split_dataset(frame: pd.DataFrame, config: PreprocessConfig) -> pd.DataFrame:
    """Stratified, seeded train/validation/test split. Splits the source already has are kept as they are;
    only the missing ones are carved out of train."""
    has_splits = frame["split"].notna().any()
    frame = frame.assign(split=frame["split"].fillna("train")) if has_splits else frame.assign(split="train")
    for name, fraction in (("test", config.test_fraction), ("validation", config.validation_fraction)):
        if frame["split"].eq(name).any():
            continue
        train = frame[frame["split"] == "train"]
        # Fractions are of the whole dataset, so the two carved splits have comparable sizes.
        classes = train["label"].nunique() if isinstance(train["label"].iloc[0], str) else 1
        size = max(int(round(fraction * len(frame))), classes)
        try:
            carved = _carve(train, size, config.seed)
        except ValueError as error:
            raise DatasetValidationError(
                f"Cannot carve a stratified {name} split out of {len(train)} training rows: {error}. "
                f"Add examples to the smallest classes or lower the fraction."
            ) from error
        frame.loc[carved, "split"] = name
    return frame


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what the tokenizer does (its vocabulary and rules), not of where it was loaded from."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(json.dumps(tokenizer.all_special_tokens).encode())
    return digest.hexdigest()[:16]


def cache_key(data_version: str, fingerprint: str, config: PreprocessConfig) -> str:
    parts = [PREPROCESS_VERSION, data_version, fingerprint, config.model_dump_json(exclude={"tokenizer"})]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class BaseModelNotFound(ValueError):
    pass


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as error:
        raise BaseModelNotFound(
            f"Base model {name_or_path!r}: no tokenizer found. It is neither a local model folder nor a hub model "
            f"that can be loaded (offline, or no such model). Pass a local folder, a hub id (with network access "
            f"or in the local Hugging Face cache), or 'all-MiniLM-L6-v2' for the packaged one. ({error})"
        ) from error


def training_windows(owner: np.ndarray, per_text: int) -> np.ndarray:
    """Which windows a `chunks` model trains on: per text its first window, then up to `per_text` in all, spread
    evenly to its last. Training on every window would cost as many times more as texts have windows."""
    keep = np.zeros(len(owner), dtype=bool)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    ends = np.r_[starts[1:], len(owner)]
    for start, end in zip(starts, ends):
        chosen = np.unique(np.linspace(start, end - 1, min(per_text, end - start)).round().astype(int))
        keep[chosen] = True
    return keep


def _split_rows(frame: pd.DataFrame, split: str) -> pd.DataFrame:
    """The split's texts and their targets (`labels`: a class id, or a multi-hot vector for label lists)."""
    target = "label_vector" if "label_vector" in frame.columns else "label_id"
    rows = frame.loc[frame["split"] == split, ["text", target]].rename(columns={target: "labels"})
    return rows.reset_index(drop=True).rename_axis("text_index").reset_index()


def _build(
    snapshot: DatasetSnapshot, config: PreprocessConfig, tokenizer: PreTrainedTokenizerBase, target: Path
) -> dict[str, Any]:
    import datasets

    frame = pd.read_parquet(snapshot.path)
    multi_label = snapshot.problem_type == "multi_label"
    if multi_label:  # Parquet gives numpy arrays back
        frame["label"] = frame["label"].map(lambda labels: sorted(str(label) for label in labels))
    frame["text"] = frame["text"].map(clean_text)
    frame = frame[frame["text"] != ""]
    frame, duplicates = drop_duplicates(frame)
    frame = split_dataset(frame.reset_index(drop=True), config)
    assert not frame.groupby("text")["split"].nunique().gt(1).any(), "a text is in two splits"

    def classes(labels: pd.Series) -> set[str]:
        return {label for row in labels for label in row} if multi_label else set(labels)

    label_names = sorted(classes(frame["label"]))
    missing_in_train = set(label_names) - classes(frame.loc[frame["split"] == "train", "label"])
    if missing_in_train:
        raise DatasetValidationError(
            f"Class(es) {sorted(missing_in_train)} appear only outside the train split; the model cannot learn them. "
            f"Add training examples for them or drop them."
        )
    frame = frame.reset_index(drop=True)
    if multi_label:
        frame["label_vector"] = list(multi_hot(frame["label"], label_names))
    else:
        frame["label_id"] = frame["label"].map({label: index for index, label in enumerate(label_names)})
    frame.to_parquet(target / "splits.parquet", index=False)
    (target / "labels.json").write_text(json.dumps(label_names, indent=2))

    windowing = config.windowing()

    def tokenize(batch: dict[str, list[Any]], split: str) -> dict[str, list[Any]]:
        """One row per window the model sees. Validation and test keep every window of a text and `text_index`
        (which text it belongs to), so that their scores pool windows exactly as prediction does."""
        encoded = encode_windows(tokenizer, batch["text"], windowing)
        keep = np.ones(len(encoded.owner), dtype=bool)
        if split == "train" and config.truncation == "chunks":
            keep = training_windows(encoded.owner, config.chunks_per_training_text)
        rows = np.flatnonzero(keep)
        input_ids = [encoded.input_ids[i] for i in rows]
        return {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(ids) for ids in input_ids],
            "labels": [batch["labels"][encoded.owner[i]] for i in rows],
            "length": [len(ids) for ids in input_ids],
            "text_index": [int(batch["text_index"][encoded.owner[i]]) for i in rows],
        }

    dataset = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_pandas(
                _split_rows(frame, split),
                preserve_index=False,
            ).map(
                tokenize,
                batched=True,
                batch_size=1000,
                fn_kwargs={"split": split},
                remove_columns=["text", "labels", "text_index"],
                new_fingerprint=f"{target.name}-{split}",
            )
            for split in SPLITS
        }
    )
    dataset.save_to_disk(str(target / "tokenized"))
    return {
        "label_names": label_names,
        "split_sizes": {split: int(frame["split"].eq(split).sum()) for split in SPLITS},
        "duplicates_removed": int(duplicates),
        "problem_type": snapshot.problem_type,
    }


def preprocess(snapshot: DatasetSnapshot, config: PreprocessConfig, cache_dir: Path) -> PreparedDataset:
    tokenizer = load_tokenizer(config.tokenizer)
    key = cache_key(snapshot.version, tokenizer_fingerprint(tokenizer), config)
    target = cache_dir / key
    summary_path = target / "summary.json"
    cache_hit = summary_path.exists()
    if not cache_hit:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_directory(target) as building:  # replaces a stale folder without summary.json (incomplete)
            summary = _build(snapshot, config, tokenizer, building)
            (building / "summary.json").write_text(json.dumps(summary, indent=2))
    summary = json.loads(summary_path.read_text())
    return PreparedDataset(
        path=target,
        cache_key=key,
        data_version=snapshot.version,
        windowing=WindowingConfig(**config.model_dump(include=set(WindowingConfig.model_fields))),
        cache_hit=cache_hit,
        **summary,
    )


preprocess_task = task(name="preprocess")(preprocess)
