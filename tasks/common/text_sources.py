"""Reading texts from where batch scoring and the drift monitor find them: a CSV/TSV/JSONL/Parquet file, a folder of
.txt files (and tables), a glob of those, or 'hub:<dataset>' (a Hugging Face hub dataset, streamed). Texts come in
chunks of bounded size, so memory stays bounded whatever the source's size. Files are read by the product's one
reader (tasks/common/tables.py), decoding with `errors="replace"`.

A source is anything with the attributes of `TextSource` (`tasks.contracts.ScoringSource` is one); this module
imports nothing of the project but tasks/common, so that any stage can read texts the same way."""

from __future__ import annotations

import glob as globbing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from tasks.common.tables import TABLE_SUFFIXES, Decoding, TableReadError, iter_table_chunks, read_text_file, reraised_as


class TextSource(Protocol):
    """Where texts come from: `source` (a path, a glob or 'hub:<dataset>') and the columns and hub settings."""

    @property
    def source(self) -> str: ...

    @property
    def text_column(self) -> str: ...

    @property
    def id_column(self) -> str | None: ...

    @property
    def hub_config(self) -> str | None: ...

    @property
    def hub_split(self) -> str: ...


class ScoringSourceError(TableReadError):
    """The source cannot be read as asked: the message says what is missing and how to fix it."""


def resolve_files(source: str) -> list[Path]:
    """The files a source names, sorted. A glob that matches nothing is an empty list (nothing new to score);
    a plain path that does not exist is an error."""
    if any(char in source for char in "*?["):
        return sorted(Path(p) for p in globbing.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file())
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in {*TABLE_SUFFIXES, ".txt"})
        if not files:
            raise ScoringSourceError(f"{path} holds no .txt, .csv, .tsv, .jsonl or .parquet files to score.")
        return files
    if not path.exists():
        raise ScoringSourceError(f"{path} does not exist. Pass a file, a folder, a glob or 'hub:<dataset>'.")
    return [path]


# Production texts: a stray byte is replaced (U+FFFD), never a failed night's run; binary files are still refused.
SCORING_DECODING = Decoding(errors="replace")


def _table_chunks(path: Path, config: TextSource, chunk_size: int) -> Iterator[pd.DataFrame]:
    columns = [c for c in (config.text_column, config.id_column) if c]
    with reraised_as(ScoringSourceError):
        yield from iter_table_chunks(path, chunk_size, SCORING_DECODING, columns)


def _text_file(path: Path) -> str:
    with reraised_as(ScoringSourceError):
        return read_text_file(path, SCORING_DECODING)


def iter_text_chunks(config: TextSource, chunk_size: int) -> Iterator[pd.DataFrame]:
    """Chunks of at most `chunk_size` rows with columns `id` and `text`, in source order."""
    if config.source.startswith("hub:"):
        yield from _hub_chunks(config, chunk_size)
        return
    files = resolve_files(config.source)
    text_files = [p for p in files if p.suffix.lower() == ".txt"]
    for start in range(0, len(text_files), chunk_size):
        batch = text_files[start : start + chunk_size]
        yield pd.DataFrame({"id": [str(p) for p in batch], "text": [_text_file(p) for p in batch]})
    for path in (p for p in files if p.suffix.lower() != ".txt"):
        offset = 0
        for frame in _table_chunks(path, config, chunk_size):
            if config.text_column not in frame.columns:
                raise ScoringSourceError(
                    f"{path}: no column {config.text_column!r} (columns: {', '.join(map(str, frame.columns))}). "
                    f"Set text_column."
                )
            if config.id_column and config.id_column not in frame.columns:
                raise ScoringSourceError(f"{path}: no id column {config.id_column!r}. Set id_column or leave it unset.")
            ids = (
                frame[config.id_column].astype(str)
                if config.id_column
                else pd.Series([f"{path.name}:{offset + i}" for i in range(len(frame))])
            )
            yield pd.DataFrame({"id": ids.to_numpy(), "text": frame[config.text_column].to_numpy()})
            offset += len(frame)


def _hub_chunks(config: TextSource, chunk_size: int) -> Iterator[pd.DataFrame]:
    import datasets

    name = config.source.removeprefix("hub:")
    stream = datasets.load_dataset(name, config.hub_config, split=config.hub_split, streaming=True)
    rows: list[dict[str, Any]] = []
    for index, row in enumerate(stream):
        if config.text_column not in row:
            raise ScoringSourceError(f"hub:{name}: no column {config.text_column!r} (columns: {', '.join(row)}).")
        rows.append(
            {
                "id": str(row[config.id_column]) if config.id_column else f"{name}:{index}",
                "text": row[config.text_column],
            }
        )
        if len(rows) == chunk_size:
            yield pd.DataFrame(rows)
            rows = []
    if rows:
        yield pd.DataFrame(rows)


def count_rows(config: TextSource) -> int | None:
    """Total rows when cheap to know (Parquet metadata, .txt files), for the progress bar; else None."""
    if config.source.startswith("hub:"):
        return None
    total = 0
    for path in resolve_files(config.source):
        if path.suffix.lower() == ".txt":
            total += 1
        elif path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        else:
            return None
    return total
