"""The real third-party datasets in ../shared/data as tables the product's ingest stage reads (text, label, split),
for the benchmarks. Each reader follows the dataset's README (layout, quirks) and returns None when the files are
absent, so a benchmark can skip that dataset with a note."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "data"
ATIS_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


def _tsv_rows(path: Path) -> list[list[str]]:
    # Both READMEs: no header, tabs, stray quote characters -> csv with QUOTE_NONE (default quoting merges lines).
    with path.open(encoding="utf-8", newline="") as handle:
        return [row for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if len(row) >= 2]


def atis_frame(shared: Path = DEFAULT_SHARED, multi_intent: str = "keep", min_examples: int = 2) -> pd.DataFrame | None:
    """ATIS intents with the source's own train/dev/test split (dev -> validation). `multi_intent`: "keep" the
    combined `a#b` labels as classes (the protocol of the published 97.5 % anchor, Chen et al. 2019), map them
    to their "first" intent, or "split" them into label lists (a multi-label dataset of the 18 atomic intents: a
    test row's combination need not occur in training, only its intents; rows with an intent that has fewer than
    `min_examples` rows in train and validation are left out, and counted). Classes with fewer than `min_examples` rows in train and validation are left out
    (four 1-row combined intents, none in the test split), and so are test rows whose label never occurs in train
    or validation, which a single-label classifier cannot learn: `attrs["unlearnable_test_rows"]` counts them."""
    files = {split: shared / "atis" / f"{split}.tsv" for split in ATIS_SPLITS}
    if not all(path.exists() for path in files.values()):
        return None
    rows = [
        {
            "text": row[1],
            "label": row[0] if multi_intent == "keep" else row[0].split("#")[0],
            "split": ATIS_SPLITS[split],
        }
        for split, path in files.items()
        for row in _tsv_rows(path)
    ]
    frame = pd.DataFrame(rows)
    if multi_intent == "split":
        frame["label"] = frame["label"].str.split("#")
        atomic = frame.loc[frame["split"] != "test", "label"].explode().value_counts()
        learnable = set(atomic[atomic >= min_examples].index)
        usable = frame["label"].map(lambda intents: set(intents) <= learnable)
        kept = frame[usable].reset_index(drop=True)
        kept.attrs.update(
            unlearnable_test_rows=int(((frame["split"] == "test") & ~usable).sum()),
            source_test_rows=int((frame["split"] == "test").sum()),
        )
        return kept
    learning_counts = frame.loc[frame["split"] != "test", "label"].value_counts()
    learnable = set(learning_counts[learning_counts >= min_examples].index)
    unlearnable = (frame["split"] == "test") & ~frame["label"].isin(learnable)
    kept = frame[frame["label"].isin(learnable)].reset_index(drop=True)
    kept.attrs.update(
        unlearnable_test_rows=int(unlearnable.sum()), source_test_rows=int((frame["split"] == "test").sum())
    )
    return kept


def sms_spam_frame(shared: Path = DEFAULT_SHARED) -> pd.DataFrame | None:
    """SMS Spam Collection: 5,574 messages, ham/spam, no source split (the training flow makes a seeded one)."""
    path = shared / "sms_spam_collection" / "SMSSpamCollection"
    if not path.exists():
        return None
    return pd.DataFrame([{"label": row[0], "text": row[1]} for row in _tsv_rows(path)])


def write_table(frame: pd.DataFrame, target: Path) -> Path:
    """As Parquet: lossless for any text (quotes, tabs, newlines), and one of the formats ingest reads."""
    target.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(target, index=False)
    return target
