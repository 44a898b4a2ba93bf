"""Stage 5, register: log the model (tokenizer and label names included), its parameters, metrics, plots,
report and dataset to the MLflow run; register a new model version and point the `candidate` alias at it.
Idempotent: a retried task finds the version its first attempt registered instead of making a second one."""

from __future__ import annotations

import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.contracts import (
    FLOW_RUN_TAG,
    MODEL_ARTIFACT_PATH,
    DatasetSnapshot,
    EvaluationResult,
    FineTunedModel,
    PreparedDataset,
    RegisteredModelVersion,
)
from tasks.tracking import TrackingRef, log_metrics, log_params

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models import ModelSignature

# What a model's environment needs to load and run it (exact versions of this environment).
# onnxruntime: a model folder fetched with its promoted runtime (runtime.json, onnx/) answers with ONNX Runtime.
MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "numpy", "pandas", "safetensors", "onnxruntime")


class RegisterConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    registered_model_name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
    alias: str = Field(default="candidate")


def _code_package(staging: Path) -> Path:
    """A copy of the modules the pyfunc model imports (`tasks/serving/`: the classifier, its windows and runtimes),
    laid out as the `tasks` package, so that the logged model loads anywhere MLflow and its requirements are
    installed."""
    source = Path(__file__).resolve().parents[1] / "serving"
    package = staging / "code" / "tasks"
    (package / "serving").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for module in ("__init__.py", "classifier.py", "windows.py", "onnx_runtime.py", "mlflow_model.py"):
        shutil.copy2(source / module, package / "serving" / module)
    return package


def save_pyfunc_model(model: FineTunedModel, examples: list[str], target: Path) -> None:
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    from tasks.serving.classifier import TextClassifier, is_adapter_folder
    from tasks.serving.mlflow_model import MlflowTextClassifier

    # LoRA adapters saved alone (lora_merge=false) are applied with peft when the model loads
    requirements = [*MODEL_REQUIREMENTS, *(["peft"] if is_adapter_folder(model.model_dir) else [])]

    # An unnamed string column: both a plain list of texts and a one-column DataFrame satisfy it.
    example_input = list(examples)
    example_output = TextClassifier(model.model_dir).predict(examples)
    mlflow.pyfunc.save_model(
        path=str(target),
        python_model=MlflowTextClassifier(),
        artifacts={"model_dir": str(model.model_dir)},
        code_paths=[str(_code_package(target.parent))],
        signature=_with_label_lists(infer_signature(example_input, example_output)),
        input_example=example_input,
        pip_requirements=[f"{name}=={metadata.version(name)}" for name in requirements],
    )


def _with_label_lists(signature: ModelSignature) -> ModelSignature:
    """A multi-label model's `labels` output column declared a list of strings: inferred from examples that all
    have no class it would be `Any`."""
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, Schema

    outputs = signature.outputs
    if outputs is None or "labels" not in outputs.input_names():
        return signature
    columns = [ColSpec(Array(DataType.string), "labels") if spec.name == "labels" else spec for spec in outputs.inputs]
    return ModelSignature(inputs=signature.inputs, outputs=Schema(columns))


def _existing_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    return max(versions, key=lambda v: int(v.version)) if versions else None


def _log_dataset(tracking: TrackingRef, snapshot: DatasetSnapshot) -> None:
    from mlflow.data.pandas_dataset import from_pandas  # what mlflow.data.from_pandas is, set there at import time
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    frame = pd.read_parquet(snapshot.path)
    dataset = from_pandas(
        frame,
        source=str(snapshot.path),
        targets="label",
        name=f"{snapshot.source}@{snapshot.version}",
        digest=snapshot.version,
    )
    tracking.client().log_inputs(
        tracking.run_id,
        datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])],
    )


def register(
    model: FineTunedModel,
    evaluation: EvaluationResult,
    snapshot: DatasetSnapshot,
    data: PreparedDataset,
    tracking: TrackingRef,
    config: RegisterConfig,
    params: dict[str, object],
    code_version: str,
) -> RegisteredModelVersion:
    from mlflow.exceptions import MlflowException

    client = tracking.client()
    name = config.registered_model_name
    version = _existing_version(client, name, tracking.run_id)
    if version is None:
        tags = {
            "data_version": snapshot.version,
            "data_source": snapshot.source,
            "code_version": code_version,
            "base_model": model.base_model,
            "preprocess_cache_key": data.cache_key,
            "preprocess_cache_hit": str(data.cache_hit).lower(),
            "device": model.device,
            "precision": model.precision,
            "training_processes": str(model.processes),
            "problem_type": data.problem_type,
        }
        flow_run_id = client.get_run(tracking.run_id).data.tags.get(FLOW_RUN_TAG)
        if flow_run_id:  # lets the promotion automation find the version a training flow run registered
            tags[FLOW_RUN_TAG] = flow_run_id
        for key, value in tags.items():
            client.set_tag(tracking.run_id, key, value)
        log_params(tracking, params)
        log_metrics(
            tracking,
            {
                **evaluation.metrics,
                "best_validation_macro_f1": model.best_validation_macro_f1,
                "train_samples_per_second": model.train_samples_per_second,
                "epochs_completed": model.epochs_completed,
                **{
                    name: float(count)
                    for name, count in (
                        ("trainable_parameters", model.trainable_parameters),
                        ("total_parameters", model.total_parameters),
                    )
                    if count is not None
                },
            },
        )
        client.log_artifacts(tracking.run_id, str(evaluation.artifacts_dir), "evaluation")
        _log_dataset(tracking, snapshot)

        with tempfile.TemporaryDirectory(prefix="textclf-model-") as staging:
            target = Path(staging) / MODEL_ARTIFACT_PATH
            save_pyfunc_model(model, data.split("test")["text"].head(3).tolist(), target)
            client.log_artifacts(tracking.run_id, str(target), MODEL_ARTIFACT_PATH)

        try:
            client.create_registered_model(name, description="Text classifier fine-tuned by textclf.")
        except MlflowException as error:
            if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
                raise
        source = f"{client.get_run(tracking.run_id).info.artifact_uri}/{MODEL_ARTIFACT_PATH}"
        version = client.create_model_version(
            name,
            source,
            run_id=tracking.run_id,
            tags={
                **tags,
                "test_macro_f1": f"{evaluation.metrics['test_macro_f1']:.4f}",
                # a documented suggestion for TEXTCLF_MIN_CONFIDENCE (README "Abstaining"); serving never applies it
                **(
                    {"suggested_min_confidence": f"{evaluation.metrics['suggested_min_confidence']:.4f}"}
                    if "suggested_min_confidence" in evaluation.metrics
                    else {}
                ),
            },
        )
    # Setting the alias is idempotent; doing it last means a failure above leaves the alias where it was.
    client.set_registered_model_alias(name, config.alias, version.version)
    return RegisteredModelVersion(
        name=name,
        version=int(version.version),
        alias=config.alias,
        run_id=tracking.run_id,
        tracking_uri=tracking.tracking_uri,
    )


register_task = task(name="register", retries=2, retry_delay_seconds=[10, 30])(register)
