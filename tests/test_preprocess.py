"""Stage 2, preprocess: cleaning, de-duplication, the seeded stratified split (respecting source splits), the label
map, tokenization, and the on-disk cache (hits, misses, and no half-built folders). Uses the tiny offline BERT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tasks.contracts import DatasetSnapshot, DatasetValidationError
from tasks.training import preprocess as preprocess_module
from tasks.training.ingest import IngestConfig, ingest
from tasks.training.preprocess import (
    PreprocessConfig,
    cache_key,
    clean_text,
    drop_duplicates,
    load_tokenizer,
    preprocess,
    tokenizer_fingerprint,
)
from tests.fixtures import make_texts

# ----------------------------------------------------------------------------------------------------------
# clean_text
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("I&#039;ve seen it", "I've seen it"),
        ("I&amp;#039;ve seen it", "I've seen it"),  # double-escaped, as in the drug-review data
        ("Tom &amp; Jerry &lt;3 &quot;ok&quot;", 'Tom & Jerry <3 "ok"'),
        ("ＡＢＣ１２３", "ABC123"),  # full-width letters and digits (NFKC)
        ("caf\u00e9 vs cafe\u0301", "café vs café"),  # composed and decomposed accents agree
        ("ﬁne", "fine"),  # ligature
        ("a\u00a0b", "a b"),  # non-breaking space
        ("  many   spaces\t\ttabs\n\nnewlines  ", "many spaces tabs newlines"),
        ("a&nbsp;&nbsp;b", "a b"),  # entity that becomes whitespace, then collapsed
    ],
)
def test_clean_text_normalises(raw, clean):
    assert clean_text(raw) == clean


@pytest.mark.parametrize(
    "text",
    ["Hello, World!", "NOT good... at ALL?!", "3 < 4 and 5 > 2", "e-mail: a.b@c.de (50%)", "Don't; stop: now"],
)
def test_clean_text_keeps_meaning(text):
    assert clean_text(text) == text  # punctuation, case and symbols untouched


def test_clean_text_is_idempotent():
    once = clean_text("  I&amp;#039;ve  ＡＢＣ\u00a0ok ")
    assert clean_text(once) == once == "I've ABC ok"


# ----------------------------------------------------------------------------------------------------------
# drop_duplicates
# ----------------------------------------------------------------------------------------------------------


def test_drop_duplicates_removes_and_counts_exact_duplicates():
    frame = pd.DataFrame(
        {"text": ["a", "b", "a", "c", "a", "b"], "label": ["x", "y", "x", "x", "x", "y"], "split": None}
    )
    kept, removed = drop_duplicates(frame)
    assert removed == 3
    assert kept["text"].tolist() == ["a", "b", "c"]
    assert kept.index.tolist() == [0, 1, 3]  # first copies, original order


def test_drop_duplicates_is_exact_not_fuzzy():
    frame = pd.DataFrame({"text": ["Good", "good", "good "], "label": ["x"] * 3, "split": None})
    kept, removed = drop_duplicates(frame)
    assert removed == 0
    assert len(kept) == 3


def test_drop_duplicates_keeps_the_test_copy():
    frame = pd.DataFrame(
        {
            "text": ["shared", "only train", "shared", "shared", "val and train", "val and train"],
            "label": ["x", "x", "y", "z", "x", "x"],
            "split": ["train", "train", "test", "validation", "train", "validation"],
        }
    )
    kept, removed = drop_duplicates(frame)
    assert removed == 3
    assert kept.set_index("text")["split"].to_dict() == {
        "shared": "test",
        "only train": "train",
        "val and train": "validation",
    }
    assert kept.loc[kept["text"] == "shared", "label"].item() == "y"  # the test row itself, with its label
    assert kept.index.is_monotonic_increasing


# ----------------------------------------------------------------------------------------------------------
# preprocess
# ----------------------------------------------------------------------------------------------------------


def snapshot_of(frame: pd.DataFrame, folder: Path) -> DatasetSnapshot:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "source.csv"
    frame.to_csv(path, index=False)
    return ingest(IngestConfig(source=str(path)), folder / "snapshots")


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def topics_snapshot(tmp_path_factory, fixture_frame) -> DatasetSnapshot:
    return snapshot_of(fixture_frame, tmp_path_factory.mktemp("topics"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, topics_snapshot, tokenizer_dir):
    """One preprocess run shared by the read-only tests (120 texts, 3 classes of 40, no source splits)."""
    return preprocess(
        topics_snapshot, PreprocessConfig(tokenizer=tokenizer_dir, max_length=32), tmp_path_factory.mktemp("cache")
    )


def test_split_sizes_add_up(prepared, fixture_frame):
    assert set(prepared.split_sizes) == {"train", "validation", "test"}
    assert sum(prepared.split_sizes.values()) == len(fixture_frame) == 120
    assert prepared.split_sizes == {"train": 96, "validation": 12, "test": 12}  # 10 % of all rows each
    assert prepared.duplicates_removed == 0
    assert prepared.cache_hit is False
    assert prepared.max_length == 32
    for name, size in prepared.split_sizes.items():
        assert len(prepared.split(name)) == size


def test_split_is_stratified(prepared):
    overall = prepared.split("train")["label"].value_counts(normalize=True)
    for name in ("validation", "test"):
        counts = prepared.split(name)["label"].value_counts()
        assert set(counts.index) == {"sport", "tech", "food"}
        assert counts.max() - counts.min() <= 1  # classes are balanced, so each gets a third
    assert (overall - 1 / 3).abs().max() < 0.02


def test_no_text_in_two_splits(prepared, fixture_frame):
    splits = pd.read_parquet(prepared.splits_path)
    assert splits["text"].is_unique
    assert set(splits["text"]) == set(fixture_frame["text"])


def test_labels_json_is_sorted_and_matches_ids(prepared):
    labels = json.loads((prepared.path / "labels.json").read_text())
    assert labels == ["food", "sport", "tech"]
    assert prepared.label_names == labels
    splits = pd.read_parquet(prepared.splits_path)
    assert (splits["label_id"] == splits["label"].map(labels.index)).all()


def test_tokenized_dataset_on_disk(prepared):
    import datasets

    tokenized = datasets.load_from_disk(str(prepared.tokenized_path))
    assert set(tokenized) == {"train", "validation", "test"}
    for name, part in tokenized.items():
        assert {"input_ids", "attention_mask", "labels", "length", "text_index"} == set(part.column_names)
        # One row per window; every text of the split has at least one, in order, with its own label.
        owners = list(part["text_index"])
        assert sorted(set(owners)) == list(range(prepared.split_sizes[name])) and owners == sorted(owners)
        assert all(1 < len(ids) <= 32 for ids in part["input_ids"])
        assert [len(m) for m in part["attention_mask"]] == [len(ids) for ids in part["input_ids"]]
        labels = prepared.split(name)["label_id"].tolist()
        assert list(part["labels"]) == [labels[i] for i in owners]


def test_summary_persisted(prepared, topics_snapshot):
    summary = json.loads((prepared.path / "summary.json").read_text())
    assert summary["split_sizes"] == prepared.split_sizes
    assert summary["label_names"] == prepared.label_names
    assert prepared.path.name == prepared.cache_key
    assert prepared.data_version == topics_snapshot.version


def test_long_texts_are_truncated_to_max_length(tmp_path, topics_snapshot, tokenizer_dir):
    import datasets

    result = preprocess(topics_snapshot, PreprocessConfig(tokenizer=tokenizer_dir, max_length=8), tmp_path)
    lengths = [len(ids) for ids in datasets.load_from_disk(str(result.tokenized_path))["train"]["input_ids"]]
    assert max(lengths) == 8  # many fixture texts are longer than 8 tokens
    assert min(lengths) < 8


def test_same_seed_same_split_different_seed_different_split(tmp_path, topics_snapshot, tokenizer_dir, prepared):
    same = preprocess(topics_snapshot, PreprocessConfig(tokenizer=tokenizer_dir, max_length=32), tmp_path / "a")
    assert same.cache_hit is False  # a fresh cache: really recomputed
    assert pd.read_parquet(same.splits_path).equals(pd.read_parquet(prepared.splits_path))

    other = preprocess(
        topics_snapshot, PreprocessConfig(tokenizer=tokenizer_dir, max_length=32, seed=7), tmp_path / "b"
    )
    assert other.cache_key != prepared.cache_key
    assert set(other.split("test")["text"]) != set(prepared.split("test")["text"])
    assert other.split_sizes == prepared.split_sizes


def test_source_splits_are_respected(tmp_path, tokenizer_dir):
    frame = make_texts(per_class=40, seed=3)
    frame["split"] = "train"
    test_rows = frame.groupby("label").head(10).index
    frame.loc[test_rows, "split"] = "test"
    snapshot = snapshot_of(frame, tmp_path / "data")

    result = preprocess(snapshot, PreprocessConfig(tokenizer=tokenizer_dir, max_length=32), tmp_path / "cache")

    assert result.split("test")["text"].tolist() == frame.loc[frame["split"] == "test", "text"].tolist()
    source_train = set(frame.loc[frame["split"] == "train", "text"])
    assert set(result.split("validation")["text"]) <= source_train
    assert set(result.split("train")["text"]) <= source_train
    assert result.split_sizes == {"train": 78, "validation": 12, "test": 30}
    assert result.split("validation")["label"].value_counts().to_dict() == {"food": 4, "sport": 4, "tech": 4}


def test_source_validation_split_is_kept_and_only_test_carved(tmp_path, tokenizer_dir):
    frame = make_texts(per_class=40, seed=4)
    frame["split"] = "train"
    frame.loc[frame.groupby("label").head(5).index, "split"] = "validation"
    snapshot = snapshot_of(frame, tmp_path / "data")

    result = preprocess(snapshot, PreprocessConfig(tokenizer=tokenizer_dir, max_length=32), tmp_path / "cache")

    assert set(result.split("validation")["text"]) == set(frame.loc[frame["split"] == "validation", "text"])
    assert result.split_sizes == {"train": 93, "validation": 15, "test": 12}


def test_cleaning_and_cross_split_duplicates(tmp_path, tokenizer_dir):
    frame = make_texts(per_class=20, seed=5)
    frame["split"] = "train"
    frame.loc[frame.groupby("label").head(4).index, "split"] = "test"
    test_text = frame.loc[frame["split"] == "test", "text"].iloc[0]
    label = frame.loc[frame["split"] == "test", "label"].iloc[0]
    extra = pd.DataFrame(
        {
            # the same text after cleaning, in train: must be dropped in favour of the test copy
            "text": ["  " + test_text.replace(" ", "\u00a0 ") + " ", "Tom&amp;#039;s   recipe"],
            "label": [label, "food"],
            "split": ["train", "train"],
        }
    )
    snapshot = snapshot_of(pd.concat([frame, extra], ignore_index=True), tmp_path / "data")

    result = preprocess(snapshot, PreprocessConfig(tokenizer=tokenizer_dir, max_length=32), tmp_path / "cache")

    splits = pd.read_parquet(result.splits_path)
    assert result.duplicates_removed == 1
    assert splits.loc[splits["text"] == test_text, "split"].tolist() == ["test"]
    assert "Tom's recipe" in set(splits["text"])
    assert splits["text"].is_unique
    assert sum(result.split_sizes.values()) == len(frame) + 1


def test_second_call_is_a_cache_hit(tmp_path, topics_snapshot, tokenizer_dir, monkeypatch):
    config = PreprocessConfig(tokenizer=tokenizer_dir, max_length=32)
    first = preprocess(topics_snapshot, config, tmp_path)
    marker = first.path / "tokenized" / "untouched"
    marker.write_text("kept")

    def must_not_build(*args, **kwargs):
        raise AssertionError("a cache hit must not rebuild")

    monkeypatch.setattr(preprocess_module, "_build", must_not_build)
    second = preprocess(topics_snapshot, config, tmp_path)

    assert second.cache_hit is True
    assert second.path == first.path
    assert second.model_dump(exclude={"cache_hit"}) == first.model_dump(exclude={"cache_hit"})
    assert marker.read_text() == "kept"


def test_same_tokenizer_elsewhere_is_a_cache_hit(tmp_path, topics_snapshot, tokenizer_dir):
    first = preprocess(topics_snapshot, PreprocessConfig(tokenizer=tokenizer_dir, max_length=32), tmp_path / "cache")
    copy = shutil.copytree(tokenizer_dir, tmp_path / "moved-model")
    second = preprocess(topics_snapshot, PreprocessConfig(tokenizer=str(copy), max_length=32), tmp_path / "cache")
    assert second.cache_hit is True
    assert second.cache_key == first.cache_key


@pytest.mark.parametrize(
    "change",
    [{"max_length": 16}, {"seed": 1}, {"validation_fraction": 0.2}, {"test_fraction": 0.2}],
    ids=lambda c: next(iter(c)),
)
def test_changed_settings_are_a_cache_miss(tmp_path, topics_snapshot, tokenizer_dir, change):
    first = preprocess(topics_snapshot, PreprocessConfig(tokenizer=tokenizer_dir, max_length=32), tmp_path)
    second = preprocess(
        topics_snapshot, PreprocessConfig(tokenizer=tokenizer_dir, **{"max_length": 32, **change}), tmp_path
    )
    assert second.cache_hit is False
    assert second.path != first.path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.cache_key, second.cache_key])


def test_changed_data_is_a_cache_miss(tmp_path, fixture_frame, tokenizer_dir):
    config = PreprocessConfig(tokenizer=tokenizer_dir, max_length=32)
    first = preprocess(snapshot_of(fixture_frame, tmp_path / "a"), config, tmp_path / "cache")
    changed = fixture_frame.copy()
    changed.loc[0, "text"] = "a brand new sentence about the match"
    second = preprocess(snapshot_of(changed, tmp_path / "b"), config, tmp_path / "cache")
    assert second.cache_hit is False
    assert second.cache_key != first.cache_key


def test_failure_mid_build_leaves_nothing_behind(tmp_path, topics_snapshot, tokenizer_dir, monkeypatch):
    cache_dir = tmp_path / "cache"
    config = PreprocessConfig(tokenizer=tokenizer_dir, max_length=32)
    real_build = preprocess_module._build
    seen = []

    def broken_build(snapshot, config, tokenizer, target):
        seen.append(target)
        (target / "splits.parquet").write_text("half written")
        (target / "tokenized").mkdir()
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(preprocess_module, "_build", broken_build)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        preprocess(topics_snapshot, config, cache_dir)
    assert seen and seen[0].parent == cache_dir
    assert list(cache_dir.iterdir()) == []  # neither the cache folder nor the temporary one

    monkeypatch.setattr(preprocess_module, "_build", real_build)
    result = preprocess(topics_snapshot, config, cache_dir)
    assert result.cache_hit is False
    assert [p.name for p in cache_dir.iterdir()] == [result.cache_key]


def test_incomplete_cache_folder_is_rebuilt(tmp_path, topics_snapshot, tokenizer_dir):
    config = PreprocessConfig(tokenizer=tokenizer_dir, max_length=32)
    key = cache_key(topics_snapshot.version, tokenizer_fingerprint(load_tokenizer(tokenizer_dir)), config)
    stale = tmp_path / key
    stale.mkdir(parents=True)
    (stale / "splits.parquet").write_text("left over from a crash")

    result = preprocess(topics_snapshot, config, tmp_path)

    assert result.cache_hit is False
    assert result.path == stale
    assert len(pd.read_parquet(result.splits_path)) == 120
    assert [p.name for p in tmp_path.iterdir()] == [key]


def test_class_without_training_rows_is_rejected(tmp_path, tokenizer_dir):
    # Every 'rare' training row duplicates a test row, so de-duplication leaves it with none in train.
    frame = make_texts(per_class=20, seed=6)
    frame["split"] = "train"
    rare = [f"rare text {i}" for i in range(5)]
    frame = pd.concat(
        [
            frame,
            pd.DataFrame({"text": rare, "label": "rare", "split": "train"}),
            pd.DataFrame({"text": rare, "label": "rare", "split": "test"}),
        ],
        ignore_index=True,
    )
    snapshot = snapshot_of(frame, tmp_path / "data")
    cache_dir = tmp_path / "cache"
    with pytest.raises(DatasetValidationError, match=r"\['rare'\] appear only outside the train split"):
        preprocess(snapshot, PreprocessConfig(tokenizer=tokenizer_dir, max_length=32), cache_dir)
    assert list(cache_dir.iterdir()) == []


def test_too_small_class_for_a_stratified_split(tmp_path, tokenizer_dir):
    # 'tech' passes ingest (2 rows in train + validation) but has a single training row: no stratified test split.
    frame = pd.DataFrame(
        {
            "text": [f"sport text {i}" for i in range(30)] + ["tech a", "tech b"],
            "label": ["sport"] * 30 + ["tech"] * 2,
            "split": ["train"] * 27 + ["validation"] * 3 + ["train", "validation"],
        }
    )
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    snapshot = ingest(IngestConfig(source=str(path), min_examples_per_class=2), tmp_path / "snapshots")
    with pytest.raises(DatasetValidationError, match="Cannot carve a stratified test split out of 28 training rows"):
        preprocess(snapshot, PreprocessConfig(tokenizer=tokenizer_dir, max_length=32), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
