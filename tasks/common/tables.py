"""The one reader of the product's file formats: tables (CSV, TSV, JSONL, Parquet) and text files. Ingest reads whole
files and decodes strictly (training data must be exactly what the user has: a byte that is not valid in the declared
encoding is an error naming its line); batch scoring and the drift monitor read bounded chunks and decode with
`errors="replace"` (a stray byte in one of a night's production texts must not fail the whole run). Either way a file
that is not what its name says is called what it is (a gzip file, a zip archive, a binary file) and a broken JSONL
line is named by its number. Errors are `TableReadError`, whose message says what was wrong and how to fix it."""

from __future__ import annotations

import codecs
import contextlib
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import pandas as pd

# Suffix -> field separator (None: not a delimited text format).
TABLE_SUFFIXES: dict[str, str | None] = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".json": None, ".parquet": None}
# Files that are not text at all, by their first bytes: named as what they are, with what to do.
ARCHIVES = {
    b"\x1f\x8b": ("a gzip file", "decompress it (`gunzip {name}`)"),
    b"PK\x03\x04": ("a zip archive", "extract it (`unzip {name}`)"),
    b"BZh": ("a bzip2 file", "decompress it (`bunzip2 {name}`)"),
    b"\xfd7zXZ\x00": ("an xz file", "decompress it (`unxz {name}`)"),
    b"\x28\xb5\x2f\xfd": ("a zstd file", "decompress it (`unzstd {name}`)"),
}
ARCHIVE_SUFFIXES = {".gz", ".zip", ".bz2", ".xz", ".zst"}
_WIDE_ENCODINGS = ("utf-16", "utf-32")  # text in these has NUL bytes
_SNIFF_BYTES = 1 << 16


class TableReadError(ValueError):
    """A file cannot be read as its name says: the message names the file (and line) and how to fix it."""


@contextlib.contextmanager
def reraised_as(error_class: type[ValueError]) -> Iterator[None]:
    """A TableReadError raised inside becomes the caller's own error class (same message, same cause), so each stage
    keeps the error type its users catch (ingest's DatasetValidationError, scoring's ScoringSourceError)."""
    try:
        yield
    except TableReadError as error:
        if isinstance(error, error_class):
            raise
        raise error_class(str(error)) from error.__cause__


@dataclass(frozen=True)
class Decoding:
    """How text files are decoded. `encoding_option` and `encodings_option` name how the caller's user sets the
    encoding (and its fallback), for the error messages; None where the user cannot set it."""

    encoding: str = "utf-8"
    fallback_encoding: str | None = None
    errors: Literal["strict", "replace"] = "strict"
    encoding_option: str | None = None
    encodings_option: str | None = None


def refuse_archive(head: bytes, path: Path) -> None:
    for magic, (what, action) in ARCHIVES.items():
        if head.startswith(magic):
            raise TableReadError(
                f"{path} is {what}; {action.format(name=path.name)} and pass the .csv/.tsv/.jsonl/.parquet file inside, "
                f"or a folder of them, as the source."
            )


def refuse_binary(head: bytes, path: Path, decoding: Decoding) -> None:
    """A compressed or binary file gets a message that says so, not a decoding error at some byte."""
    refuse_archive(head, path)
    names = {codecs.lookup(e).name for e in (decoding.encoding, decoding.fallback_encoding) if e}
    nul = head.find(b"\x00", 0, _SNIFF_BYTES)
    if nul >= 0 and not any(name.startswith(_WIDE_ENCODINGS) for name in names):
        utf16 = f"; if it is UTF-16 text, set {decoding.encoding_option} to utf-16" if decoding.encoding_option else ""
        raise TableReadError(
            f"{path} is a binary file (a NUL byte at byte {nul}), not {path.suffix[1:].upper() or 'text'}. "
            f"Pass the text file itself{utf16}."
        )


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


def decode(raw: bytes, path: Path, decoding: Decoding) -> str:
    refuse_binary(raw, path, decoding)
    # A UTF-8 byte-order mark is skipped here (not with 'utf-8-sig', whose error offsets would then be relative
    # to the text after the mark, so the reported line and byte would be wrong), for every spelling of UTF-8.
    skipped = len(codecs.BOM_UTF8) if _is_utf8(decoding.encoding) and raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skipped:].decode(decoding.encoding, errors=decoding.errors)
    except UnicodeDecodeError as error:
        if decoding.fallback_encoding:
            return raw.decode(decoding.fallback_encoding, errors="strict")
        start = skipped + error.start
        line = raw[:start].count(b"\n") + 1
        how = f"set {decoding.encodings_option} to the file's real encoding (e.g. cp1252)"
        raise TableReadError(
            f"{path}: not valid {decoding.encoding} at line {line} (byte {start}: {raw[start : start + 1]!r}). "
            f"Re-save the file as UTF-8 (e.g. `iconv -f cp1252 -t utf-8`)"
            + (f", or {how}." if decoding.encodings_option else ".")
        ) from None


def read_text_file(path: Path, decoding: Decoding) -> str:
    return decode(path.read_bytes(), path, decoding)


def _raise_bad_json_line(lines: Iterable[str], path: Path) -> None:
    """Name the first line of a JSONL file that is not one JSON object (only called once pandas has failed)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise TableReadError(
                f"{path} line {number} is not valid JSON: {error.msg} (column {error.colno}): {line[:80]!r}. "
                f'Each line must be one JSON object such as {{"text": "...", "label": "..."}}; fix or '
                f"remove that line."
            ) from None
        if not isinstance(value, dict):
            raise TableReadError(
                f"{path} line {number} is a JSON {type(value).__name__}, not an object: {line[:80]!r}. Each line must "
                f'be one JSON object such as {{"text": "...", "label": "..."}}.'
            )


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        with path.open("rb") as handle:
            refuse_archive(handle.read(8), path)  # data.csv.gz: "a gzip file", not "unsupported type '.gz'"
        raise TableReadError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(sorted(TABLE_SUFFIXES))}."
        )
    return suffix


def read_table(path: Path, decoding: Decoding) -> pd.DataFrame:
    """The whole table, every column as read (CSV/TSV cells as strings, never NaN)."""
    suffix = _check_suffix(path)
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        text = read_text_file(path, decoding)
        if suffix in {".csv", ".tsv"}:
            return pd.read_csv(io.StringIO(text), sep=TABLE_SUFFIXES[suffix], dtype=str, keep_default_na=False)
        try:
            return pd.read_json(io.StringIO(text), lines=True, dtype=False)
        except ValueError:
            _raise_bad_json_line(text.splitlines(), path)
            raise
    except TableReadError:
        raise
    except Exception as error:  # the parsers' own errors, with the file named
        raise TableReadError(f"{path}: cannot be read as {suffix[1:].upper()}: {error}") from error


def iter_table_chunks(
    path: Path, chunk_size: int, decoding: Decoding, columns: Sequence[str] | None = None
) -> Iterator[pd.DataFrame]:
    """The table in chunks of at most `chunk_size` rows, read as it is consumed (memory bounded by the chunk, not the
    file). `columns`: read only these from Parquet (a missing one is an error naming the file's columns)."""
    suffix = _check_suffix(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        missing = [c for c in columns or () if c not in parquet.schema_arrow.names]
        if missing:
            raise TableReadError(
                f"{path}: no column {missing[0]!r} (columns: {', '.join(parquet.schema_arrow.names)})."
            )
        for batch in parquet.iter_batches(batch_size=chunk_size, columns=list(columns) if columns else None):
            yield batch.to_pandas()
        return
    with path.open("rb") as handle:
        refuse_binary(handle.read(_SNIFF_BYTES), path, decoding)
    encoding = "utf-8-sig" if _is_utf8(decoding.encoding) else decoding.encoding
    try:
        with path.open(encoding=encoding, errors=decoding.errors, newline="") as text:
            if suffix in {".csv", ".tsv"}:
                yield from pd.read_csv(
                    text, sep=TABLE_SUFFIXES[suffix], chunksize=chunk_size, dtype=str, keep_default_na=False
                )
            else:
                try:
                    yield from pd.read_json(text, lines=True, chunksize=chunk_size, dtype=False)
                except ValueError:
                    with path.open(encoding=encoding, errors=decoding.errors) as lines:
                        _raise_bad_json_line(lines, path)
                    raise
    except TableReadError:
        raise
    except UnicodeDecodeError:  # strict decoding: name the line, as the whole-file reader does
        decode(path.read_bytes(), path, replace(decoding, fallback_encoding=None))
        raise
    except Exception as error:
        raise TableReadError(f"{path}: cannot be read as {suffix[1:].upper()}: {error}") from error
