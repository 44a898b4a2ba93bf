"""Writing a benchmark's JSON result: whole or not at all (a temporary file in the same folder, flushed to disk,
then renamed over the target), so a killed run never leaves a half-written result behind."""

import json
import os
import tempfile
from pathlib import Path


def write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(payload, file, indent=2)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
