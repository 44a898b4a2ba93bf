"""Stage 6b, optimize the runtime: at promotion, after the gate decided to promote and before the Bento is built.

1. `export_variants`: the candidate's fine-tuned folder exported to ONNX (`torch.onnx.export`, the TorchScript
   exporter, `dynamo=False`: it needs no onnxscript and works offline; dynamic batch and sequence axes) and a
   dynamically quantized int8 copy of it (`onnxruntime.quantization.quantize_dynamic`, int8 weights, activations
   quantized per batch at run time). A variant that cannot be exported is recorded as failed, never fatal.
2. `gate_runtimes`: the PyTorch model (what the registered MLflow model answers with) and each variant classify
   the candidate's test split through `TextClassifier(runtime=...)`, so windows and pooling are the product's own.
   A variant passes when its labels agree with PyTorch's on at least `min_label_agreement` of the texts (99.5 %)
   and its macro-F1 is at most `max_macro_f1_drop` (0.5 points) below PyTorch's. The fastest variant that passes
   (texts/s of that same scoring, in-process) is chosen; PyTorch when none passes.
3. `record_runtime`: the figures of every variant go to the promotion run (metrics `runtime.<variant>.*`, params
   `runtime_*`); the chosen variant's files (`runtime.json` and its one ONNX file) are logged as the promotion run's
   artifacts under `runtime/`, and the model version gets the tags `runtime` (the chosen runtime) and
   `runtime.artifact_uri` (where its files are). The registered MLflow model itself is never changed.
4. `fetch_runtime` (called by tasks/promotion/bento.py `download_model_version`, which the Bento build, batch scoring and
   drift monitoring all use): makes a downloaded model folder match its version's tags, so every consumer answers
   with the same runtime as the Bento.

A stage function reads no environment variables and touches no global MLflow state."""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.common.atomic import atomic_file
from tasks.contracts import RUNTIME_ARTIFACT_PATH, RUNTIME_TAG, RUNTIME_URI_TAG
from tasks.promotion.scores import answer_classes, as_answers, is_label_sets, score_answers
from tasks.serving.classifier import load_sequence_classifier
from tasks.serving.onnx_runtime import (
    ONNX_DIR,
    ONNX_FILES,
    PYTORCH,
    RUNTIME_FILE,
    install_runtime,
    sha256_of,
)
from tasks.tracking import TrackingRef, log_metrics, log_params

if TYPE_CHECKING:
    from tasks.serving.classifier import TextClassifier

TOLERANCE = 1e-9
ONNX_OPSET = 17


class RuntimeGateConfig(BaseModel):
    """Which optimized runtimes the promotion tries, and when one may serve instead of PyTorch."""

    model_config = ConfigDict(frozen=True)

    optimize_runtime: bool = Field(
        default=True,
        description="Export ONNX fp32 and int8 variants of the candidate at "
        "promotion and serve the fastest one that passes the runtime gate (PyTorch otherwise).",
    )
    min_label_agreement: float = Field(
        default=0.995,
        ge=0,
        le=1,
        description="Share of the test texts on which a variant's label must equal the PyTorch model's.",
    )
    max_macro_f1_drop: float = Field(
        default=0.005,
        ge=0,
        le=1,
        description="Most a variant's test macro-F1 may be below the PyTorch model's (0.005 = 0.5 points).",
    )
    runtime_batch_size: int = Field(
        default=64, ge=1, le=512, description="Batch size of the runtime gate's scoring and timing."
    )


class VariantScore(BaseModel):
    """One runtime on the test split, against PyTorch."""

    model_config = ConfigDict(frozen=True)

    runtime: str
    passed: bool
    reason: str
    label_agreement: float | None = None
    macro_f1: float | None = None
    macro_f1_drop: float | None = None
    max_probability_diff: float | None = None
    texts_per_second: float | None = None
    file: str | None = None  # relative to the folder: onnx/model.int8.onnx
    size_bytes: int | None = None


class RuntimeGate(BaseModel):
    """The runtime chosen for a model version, the figures it was chosen on, and the folder holding its files
    (runtime.json and, for an ONNX runtime, its ONNX file under onnx/)."""

    model_config = ConfigDict(frozen=True)

    chosen: str
    reason: str
    texts: int
    variants: list[VariantScore]
    files_dir: Path

    def score(self, runtime: str) -> VariantScore | None:
        return next((v for v in self.variants if v.runtime == runtime), None)


# ----------------------------------------------------------------------------------------------------------
# Export and quantization
# ----------------------------------------------------------------------------------------------------------


def export_onnx(model_dir: Path, target: Path, opset: int = ONNX_OPSET) -> Path:
    """The fine-tuned folder's model as one ONNX file (fp32) with dynamic batch and sequence axes; inputs as the
    tokenizer makes them (BERT: input_ids, attention_mask, token_type_ids), output `logits`. Written to a temporary
    file, then renamed."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:  # plain matmul attention exports to a graph that ONNX Runtime fuses and quantizes better than SDPA
        model = load_sequence_classifier(model_dir, attn_implementation="eager")
    except (ValueError, TypeError, ImportError):  # a second try without it (an adapter error is raised again)
        model = load_sequence_classifier(model_dir)
    model = model.to("cpu").eval()
    sample = tokenizer(
        ["a short text", "a somewhat longer text, padded to the longest"], padding=True, return_tensors="pt"
    )
    # The exporter binds positional inputs in the order of forward()'s parameters.
    names = [name for name in inspect.signature(model.forward).parameters if name in sample]
    with atomic_file(target, suffix=".onnx") as tmp, warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            model,
            tuple(sample[name] for name in names),
            str(tmp),
            dynamo=False,
            input_names=names,
            output_names=["logits"],
            opset_version=opset,
            do_constant_folding=True,
            dynamic_axes={**{name: {0: "batch", 1: "sequence"} for name in names}, "logits": {0: "batch"}},
        )
    return target


def quantize_int8(fp32_path: Path, target: Path) -> Path:
    """ONNX Runtime's dynamic quantization: int8 weights for MatMul/Gemm/Attention, activations quantized per batch
    at run time (no calibration data needed). Written to a temporary file, then renamed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_file(target, suffix=".onnx") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(fp32_path), str(tmp), weight_type=QuantType.QInt8)
    return target


def export_variants(model_dir: Path, work_dir: Path) -> dict[str, Path | str]:
    """Both ONNX variants into `work_dir/onnx/` (built in a temporary folder, renamed when both are tried).
    Returns {runtime: file} for each variant made, {runtime: error message} for each that failed."""
    work_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{ONNX_DIR}-", dir=work_dir))
    made: dict[str, Path | str] = {}
    try:
        fp32 = staging / ONNX_FILES["onnx-fp32"]
        try:
            export_onnx(model_dir, fp32)
            made["onnx-fp32"] = fp32
        except Exception as error:  # an architecture the exporter cannot trace: serve PyTorch, say why
            made["onnx-fp32"] = made["onnx-int8"] = f"ONNX export failed: {type(error).__name__}: {error}"[:500]
        if isinstance(made["onnx-fp32"], Path):
            try:
                made["onnx-int8"] = quantize_int8(fp32, staging / ONNX_FILES["onnx-int8"])
            except Exception as error:
                made["onnx-int8"] = f"int8 quantization failed: {type(error).__name__}: {error}"[:500]
        final = work_dir / ONNX_DIR
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {runtime: final / value.name if isinstance(value, Path) else value for runtime, value in made.items()}


# ----------------------------------------------------------------------------------------------------------
# The runtime gate
# ----------------------------------------------------------------------------------------------------------


def _scoring_folder(model_dir: Path, variants: dict[str, Path | str], target: Path) -> Path:
    """A folder that looks like the model folder (links to its files) with the variants' ONNX files under onnx/ and
    no runtime.json, so that `TextClassifier(folder, runtime=...)` loads each variant."""
    shutil.rmtree(target, ignore_errors=True)
    (target / ONNX_DIR).mkdir(parents=True)
    for entry in model_dir.iterdir():
        if entry.name not in (RUNTIME_FILE, ONNX_DIR):
            (target / entry.name).symlink_to(entry.resolve())
    for runtime, made in variants.items():
        if isinstance(made, Path):
            (target / ONNX_DIR / ONNX_FILES[runtime]).symlink_to(made.resolve())
    return target


def _classify(classifier: TextClassifier, texts: list[str], batch_size: int) -> tuple[npt.NDArray[np.float32], float]:
    classifier.classify(texts[: min(len(texts), 8)], batch_size)  # warm-up: first-run allocations, thread pools
    started = time.perf_counter()
    probabilities, _ = classifier.classify(texts, batch_size)
    seconds = time.perf_counter() - started
    return probabilities, len(texts) / seconds if seconds > 0 else float("inf")


def _same(answer: Any, reference: Any) -> bool:
    if isinstance(answer, str):
        return bool(answer == reference)
    return set(answer) == set(reference)


def judge_variant(
    runtime: str,
    labels: list[Any],
    reference: list[Any],
    truth: list[Any],
    classes: list[str],
    reference_f1: float,
    config: RuntimeGateConfig,
) -> tuple[bool, str, float, float, float]:
    """(passed, reason, agreement, macro-F1, macro-F1 drop) of one variant's labels against PyTorch's. Pure. A
    multi-label model's answers are label lists: they agree when they hold the same classes."""

    agreement = float(np.mean([_same(a, b) for a, b in zip(labels, reference)])) if reference else 0.0
    macro_f1 = score_answers(truth, labels, classes).macro_f1
    drop = reference_f1 - macro_f1
    problems = []
    if agreement + TOLERANCE < config.min_label_agreement:
        problems.append(f"label agreement {agreement:.2%} < {config.min_label_agreement:.2%}")
    if drop > config.max_macro_f1_drop + TOLERANCE:
        problems.append(f"macro-F1 drop {drop * 100:.2f} points > {config.max_macro_f1_drop * 100:.2f}")
    figures = f"agreement {agreement:.2%}, macro-F1 {macro_f1:.4f} ({-drop * 100 + 0.0:+.2f} points)"
    return (
        not problems,
        f"{runtime}: {figures}" + (f": fails, {'; '.join(problems)}" if problems else ": passes"),
        agreement,
        macro_f1,
        drop,
    )


def _answers(classifier: TextClassifier, multi_label: bool) -> Callable[[npt.NDArray[np.float32]], list[Any]]:
    """Probabilities to the answers the gate compares: the top class, or a multi-label model's label lists (each
    class at its threshold)."""
    names, sets = classifier.label_names, classifier.label_sets
    if multi_label:
        return sets
    return lambda probabilities: [names[i] for i in probabilities.argmax(axis=1)]


def gate_runtimes(
    model_dir: Path,
    variants: dict[str, Path | str],
    test: pd.DataFrame | Path,
    config: RuntimeGateConfig,
    work_dir: Path,
) -> RuntimeGate:
    """Score PyTorch and every variant on the test split, judge each variant against PyTorch, choose the fastest
    that passes, and lay out the chosen runtime's files in `work_dir/files` (runtime.json, onnx/<file>)."""
    from tasks.serving.classifier import TextClassifier

    if isinstance(test, (str, Path)):
        test = pd.read_parquet(test)
    texts, truth = test["text"].astype(str).tolist(), as_answers(test["label"].tolist())
    if not texts:
        raise ValueError("The test split is empty: there is nothing to gate the runtimes on.")
    classes = answer_classes(truth)
    reference = TextClassifier(model_dir, runtime=PYTORCH)
    ref_probabilities, ref_speed = _classify(reference, texts, config.runtime_batch_size)
    answers = _answers(reference, is_label_sets(truth))
    del reference
    ref_labels = answers(ref_probabilities)
    ref_f1 = score_answers(truth, ref_labels, classes).macro_f1
    scores = [
        VariantScore(
            runtime=PYTORCH,
            passed=True,
            reason="the reference (the registered model)",
            label_agreement=1.0,
            macro_f1=ref_f1,
            macro_f1_drop=0.0,
            max_probability_diff=0.0,
            texts_per_second=ref_speed,
        )
    ]
    folder = _scoring_folder(model_dir, variants, work_dir / "scoring") if variants else None
    try:
        for runtime, made in variants.items():
            if not isinstance(made, Path):
                scores.append(VariantScore(runtime=runtime, passed=False, reason=f"{runtime}: {made}"))
                continue
            assert folder is not None  # made above whenever there are variants
            try:
                classifier = TextClassifier(folder, runtime=runtime)
                probabilities, speed = _classify(classifier, texts, config.runtime_batch_size)
                del classifier
            except Exception as error:  # a variant that does not load or run is not served, and says why
                scores.append(
                    VariantScore(
                        runtime=runtime,
                        passed=False,
                        reason=f"{runtime}: does not run: {type(error).__name__}: {error}"[:500],
                    )
                )
                continue
            labels = answers(probabilities)
            passed, reason, agreement, macro_f1, drop = judge_variant(
                runtime, labels, ref_labels, truth, classes, ref_f1, config
            )
            scores.append(
                VariantScore(
                    runtime=runtime,
                    passed=passed,
                    reason=reason,
                    label_agreement=agreement,
                    macro_f1=macro_f1,
                    macro_f1_drop=drop,
                    max_probability_diff=float(np.abs(probabilities - ref_probabilities).max()),
                    texts_per_second=speed,
                    file=f"{ONNX_DIR}/{made.name}",
                    size_bytes=made.stat().st_size,
                )
            )
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    passing = [s for s in scores if s.passed]
    best = max(passing, key=lambda s: s.texts_per_second or 0.0)
    pytorch = scores[0]
    if best.runtime == PYTORCH:
        reason = (
            "PyTorch serves: no ONNX variant passed the runtime gate"
            if len(scores) > 1
            else "PyTorch serves: no ONNX variant was tried"
        )
    else:
        best_speed, pytorch_speed = best.texts_per_second, pytorch.texts_per_second
        assert best_speed is not None and pytorch_speed is not None  # every runtime that passed was timed
        reason = (
            f"{best.runtime} serves: the fastest variant that passed ({best_speed:.1f} texts/s, "
            f"{best_speed / max(pytorch_speed, 1e-9):.2f}x PyTorch's "
            f"{pytorch_speed:.1f})"
        )
    files = _runtime_files(work_dir / "files", best, variants, scores)
    return RuntimeGate(chosen=best.runtime, reason=reason, texts=len(texts), variants=scores, files_dir=files)


def _runtime_files(
    target: Path, chosen: VariantScore, variants: dict[str, Path | str], scores: list[VariantScore]
) -> Path:
    """runtime.json (+ the chosen ONNX file) in `target`, the layout tasks/serving/onnx_runtime.py installs from."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    spec: dict[str, object] = {
        "runtime": chosen.runtime,
        "gate": {s.runtime: s.model_dump(exclude={"file", "size_bytes"}) for s in scores},
    }
    if chosen.runtime != PYTORCH:
        source = variants[chosen.runtime]
        assert isinstance(source, Path)  # only a variant that was made can pass the gate
        (target / ONNX_DIR).mkdir()
        shutil.copy2(source, target / ONNX_DIR / source.name)
        spec.update(file=f"{ONNX_DIR}/{source.name}", sha256=sha256_of(target / ONNX_DIR / source.name))
    (target / RUNTIME_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return target


def optimize_runtime(
    model_dir: Path, test: pd.DataFrame | Path, work_dir: Path, config: RuntimeGateConfig = RuntimeGateConfig()
) -> RuntimeGate:
    """Export, quantize and gate: the runtime the model version should be served with, and its files."""
    work_dir.mkdir(parents=True, exist_ok=True)
    variants = export_variants(model_dir, work_dir) if config.optimize_runtime else {}
    gate = gate_runtimes(model_dir, variants, test, config, work_dir)
    if not config.optimize_runtime:
        gate = gate.model_copy(
            update={"reason": "PyTorch serves: runtime optimization is off (optimize_runtime=false)"}
        )
    return gate


def folder_with_runtime(model_dir: Path, runtime: str, target: Path) -> Path:
    """A copy of `model_dir` at `target` that answers with `runtime` (exported here when it is an ONNX one), without
    any gate: for benchmarks and experiments that want one runtime whatever the gate would say."""
    from tasks.serving.onnx_runtime import check_runtime

    check_runtime(runtime)
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns(RUNTIME_FILE, ONNX_DIR))
    if runtime == PYTORCH:
        return target
    made = export_variants(target, target.parent / f".{target.name}-export")
    try:
        file = made[runtime]
        if not isinstance(file, Path):
            raise RuntimeError(f"{runtime} for {model_dir}: {file}")
        files = target.parent / f".{target.name}-export" / "files"
        (files / ONNX_DIR).mkdir(parents=True)
        shutil.copy2(file, files / ONNX_DIR / file.name)
        (files / RUNTIME_FILE).write_text(
            json.dumps({"runtime": runtime, "file": f"{ONNX_DIR}/{file.name}", "sha256": sha256_of(file)})
        )
        install_runtime(target, files)
    finally:
        shutil.rmtree(target.parent / f".{target.name}-export", ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------------------
# MLflow: record the choice, and bring it to every consumer of the model version
# ----------------------------------------------------------------------------------------------------------


def runtime_metrics(gate: RuntimeGate) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for score in gate.variants:
        for field in ("label_agreement", "macro_f1", "macro_f1_drop", "max_probability_diff", "texts_per_second"):
            value = getattr(score, field)
            if value is not None:
                metrics[f"runtime.{score.runtime}.{field}"] = value
        metrics[f"runtime.{score.runtime}.passed"] = float(score.passed)
    return metrics


def record_runtime(
    tracking: TrackingRef, name: str, version: int, gate: RuntimeGate, config: RuntimeGateConfig | None = None
) -> str | None:
    """Log the gate's figures and the chosen runtime's files to the promotion run, and tag the model version with
    the runtime and where its files are. Returns the files' artifact URI (None for PyTorch). Safe to retry."""
    client = tracking.client()
    log_metrics(tracking, runtime_metrics(gate))
    params: dict[str, object] = {
        "runtime_chosen": gate.chosen,
        "runtime_reason": gate.reason,
        **{f"runtime_{s.runtime}_result": s.reason for s in gate.variants},
    }
    if config is not None:
        params.update({f"runtime_gate_{key}": value for key, value in config.model_dump().items()})
    log_params(tracking, params)
    client.set_tag(tracking.run_id, "promotion.runtime", gate.chosen)
    uri = None
    if gate.chosen != PYTORCH:
        uri = f"{client.get_run(tracking.run_id).info.artifact_uri}/{RUNTIME_ARTIFACT_PATH}"
        spec = json.loads((gate.files_dir / RUNTIME_FILE).read_text())
        (gate.files_dir / RUNTIME_FILE).write_text(json.dumps({**spec, "source": uri}, indent=2) + "\n")
        client.log_artifacts(tracking.run_id, str(gate.files_dir), RUNTIME_ARTIFACT_PATH)
    else:
        client.log_artifacts(tracking.run_id, str(gate.files_dir), RUNTIME_ARTIFACT_PATH)  # the figures
    version_key = str(version)
    client.set_model_version_tag(name, version_key, RUNTIME_TAG, gate.chosen)
    if uri:
        client.set_model_version_tag(name, version_key, RUNTIME_URI_TAG, uri)
    elif RUNTIME_URI_TAG in client.get_model_version(name, version_key).tags:
        client.delete_model_version_tag(name, version_key, RUNTIME_URI_TAG)
    return uri


def runtime_markdown(gate: RuntimeGate, config: RuntimeGateConfig) -> str:
    """The runtime section of the promotion's markdown artifact."""

    def show(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = [
        f"| {s.runtime} | {show(s.label_agreement, '.2%')} | {show(s.macro_f1, '.4f')} | "
        f"{show(None if s.macro_f1_drop is None else -s.macro_f1_drop * 100, '+.2f')} | "
        f"{show(s.texts_per_second, '.1f')} | {'yes' if s.passed else 'no'} |"
        for s in gate.variants
    ]
    return (
        "\n".join(
            [
                "## Inference runtime",
                "",
                f"**{gate.chosen}**. {gate.reason}. Gate: label agreement with PyTorch >= {config.min_label_agreement:.1%} "
                f"and macro-F1 drop <= {config.max_macro_f1_drop * 100:.2f} points, on the {gate.texts} test texts.",
                "",
                "| runtime | label agreement | test macro-F1 | change (points) | texts/s (in-process) | passes |",
                "|---|---|---|---|---|---|",
                *rows,
                "",
            ]
        )
        + "\n"
    )


export_variants_task = task(name="export-onnx-variants")(export_variants)
optimize_runtime_task = task(name="optimize-runtime")(optimize_runtime)
record_runtime_task = task(name="record-runtime", retries=2, retry_delay_seconds=5)(record_runtime)
