"""The inference runtime of a model folder, and the ONNX Runtime code that answers with it.

A fine-tuned model folder (tasks/training/fine_tune.py) answers with PyTorch. The promotion flow may add an optimized
runtime to it (tasks/promotion/optimize_runtime.py): the model exported to ONNX (`onnx/model.onnx`, fp32) and dynamically
quantized to int8 (`onnx/model.int8.onnx`), each gated on the candidate's test split against the PyTorch model.
It writes the one that won into the folder as `runtime.json`:

    {"runtime": "onnx-int8", "file": "onnx/model.int8.onnx", "sha256": "...", "source": "<MLflow artifact URI>",
     "gate": {...the figures of every variant...}}

`runtime.json` is the switch: without it (a folder straight from training, or a version promoted before runtimes
existed) the folder answers with PyTorch. `tasks.serving.classifier.TextClassifier(model_dir, runtime=None)` reads it;
`runtime="pytorch" | "onnx-fp32" | "onnx-int8"` overrides it. Only `window_logits` depends on the runtime: the
tokenizer, the truncation windows and the pooling (tasks/serving/windows.py) are the same for every runtime.

Depends only on numpy, onnxruntime and a transformers tokenizer (no torch), because it ships inside the Bento
(bentofile.yaml `include`) and inside every logged MLflow model (tasks/training/register.py `_code_package`). Writes are
atomic: a temporary file or folder next to the target, then a rename, so a reader never sees half a runtime."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tasks.common.atomic import write_text_atomically

RUNTIME_FILE = "runtime.json"
ONNX_DIR = "onnx"
PYTORCH = "pytorch"
ONNX_FILES = {"onnx-fp32": "model.onnx", "onnx-int8": "model.int8.onnx"}  # under ONNX_DIR
RUNTIMES: tuple[str, ...] = (PYTORCH, *ONNX_FILES)


class RuntimeFileError(RuntimeError):
    """A model folder's runtime files are missing, corrupt or inconsistent; the message names the file and what to
    do about it."""


def _remedy(model_dir: Path) -> str:
    return (
        f"Run the promotion flow again for this model version (it re-exports and re-gates the ONNX variants and "
        f"rewrites them), or delete {model_dir / RUNTIME_FILE} (and {model_dir / ONNX_DIR}) to answer with "
        f"PyTorch"
    )


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    return runtime


def read_runtime_file(model_dir: str | Path) -> dict[str, Any]:
    """The folder's runtime.json, or {"runtime": "pytorch"} when there is none. Raises RuntimeFileError when it
    cannot be read or names an unknown runtime."""
    model_dir = Path(model_dir)
    path = model_dir / RUNTIME_FILE
    if not path.exists():
        return {"runtime": PYTORCH}
    try:
        spec: dict[str, Any] = json.loads(path.read_text())
        runtime = spec["runtime"]
        check_runtime(runtime)
        if runtime != PYTORCH and not spec.get("file"):
            raise KeyError("file")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RuntimeFileError(
            f"{path} is not a valid runtime file ({type(error).__name__}: {error}). {_remedy(model_dir)}."
        ) from error
    return spec


def folder_runtime(model_dir: str | Path) -> str:
    """The runtime a model folder answers with by default: what its runtime.json says, else PyTorch."""
    runtime: str = read_runtime_file(model_dir)["runtime"]
    return runtime


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def onnx_file(model_dir: str | Path, runtime: str) -> Path:
    """The ONNX file of `runtime` in the folder. When the folder's runtime.json names that runtime, the file must
    exist and match the SHA-256 recorded there (a truncated download or a disk error is caught here, not as a
    cryptic protobuf error)."""
    model_dir = Path(model_dir)
    check_runtime(runtime)
    if runtime == PYTORCH:
        raise ValueError("the PyTorch runtime has no ONNX file")
    spec = read_runtime_file(model_dir)
    path = model_dir / (spec["file"] if spec["runtime"] == runtime else f"{ONNX_DIR}/{ONNX_FILES[runtime]}")
    if not path.is_file():
        raise RuntimeFileError(f"Runtime {runtime} needs {path}, which does not exist. {_remedy(model_dir)}.")
    if spec["runtime"] == runtime and spec.get("sha256") and sha256_of(path) != spec["sha256"]:
        raise RuntimeFileError(
            f"{path} is corrupt: its SHA-256 differs from the one in {model_dir / RUNTIME_FILE}. {_remedy(model_dir)}."
        )
    return path


class OnnxLogits:
    """An ONNX Runtime session on an exported sequence classifier: token ids in, logits out (CPU)."""

    def __init__(self, path: str | Path, intra_op_threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own InvalidProtobuf, Fail, NoSuchFile, ... (pybind)
            model_dir = self.path.parent.parent if self.path.parent.name == ONNX_DIR else self.path.parent
            raise RuntimeFileError(
                f"{self.path} is not a loadable ONNX model ({type(error).__name__}: {str(error)[:300]}). "
                f"{_remedy(model_dir)}."
            ) from error
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, tokenizer: Any, input_ids: list[list[int]]) -> npt.NDArray[np.float32]:
        """Logits of one batch of windows (each a list of token ids with special tokens), padded as the tokenizer
        pads; the session gets the inputs it declares (BERT: input_ids, attention_mask, token_type_ids)."""
        batch = tokenizer.pad({"input_ids": input_ids}, return_tensors="np")
        feed: dict[str, npt.NDArray[np.int64]] = {}
        for name in self.input_names:
            if name in batch:
                feed[name] = np.asarray(batch[name], dtype=np.int64)
            elif name == "token_type_ids":  # a tokenizer that does not return them: one segment
                feed[name] = np.zeros_like(np.asarray(batch["input_ids"], dtype=np.int64))
            else:
                raise RuntimeFileError(f"{self.path} expects an input {name!r} that the tokenizer does not make.")
        return np.asarray(self.session.run([self.output_name], feed)[0], dtype=np.float32)


def _write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2) + "\n")


def install_runtime(model_dir: str | Path, source_dir: str | Path) -> dict[str, Any]:
    """Make `model_dir` answer with the runtime described by `source_dir/runtime.json` (its ONNX file beside it,
    under onnx/). The ONNX folder is copied to a temporary folder, checked, and renamed into place; runtime.json is
    written last, so an interrupted install leaves the folder answering as before. Returns the runtime spec."""
    model_dir, source_dir = Path(model_dir), Path(source_dir)
    spec = read_runtime_file(source_dir)
    if not (source_dir / RUNTIME_FILE).exists():
        raise RuntimeFileError(f"{source_dir} has no {RUNTIME_FILE} to install.")
    if spec["runtime"] == PYTORCH:
        remove_runtime(model_dir)
        _write_json_atomically(model_dir / RUNTIME_FILE, spec)
        return spec
    onnx_file(source_dir, spec["runtime"])  # exists and matches its SHA-256, else a RuntimeFileError
    staging = Path(tempfile.mkdtemp(prefix=f".{ONNX_DIR}-", dir=model_dir))
    try:
        relative = Path(spec["file"])
        (staging / relative.name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source_dir / relative, staging / relative.name)
        (model_dir / RUNTIME_FILE).unlink(missing_ok=True)  # the folder answers with PyTorch while files move
        old = model_dir / ONNX_DIR
        if old.exists():
            shutil.rmtree(old)
        staging.rename(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    spec = {**spec, "file": f"{ONNX_DIR}/{Path(spec['file']).name}"}
    _write_json_atomically(model_dir / RUNTIME_FILE, spec)
    return spec


def remove_runtime(model_dir: str | Path) -> None:
    """Back to PyTorch: runtime.json first (the switch), then the ONNX files."""
    model_dir = Path(model_dir)
    (model_dir / RUNTIME_FILE).unlink(missing_ok=True)
    shutil.rmtree(model_dir / ONNX_DIR, ignore_errors=True)
