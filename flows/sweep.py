"""The sweep flow: a hyperparameter search (Optuna) over the fine-tune, then the best trial's model evaluated on the
test split and registered as @candidate, exactly as the training flow registers its model. Wiring only; the stages
are in tasks/training/sweep.py (the search) and the training stages it reuses."""

from __future__ import annotations

import threading
from typing import Annotated, Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows.settings import Settings
from flows.training import DatasetParameters, code_version, resolve_base_model
from tasks.contracts import REGISTERED_MODEL_NAME, FineTunedModel, PreparedDataset, RegisteredModelVersion
from tasks.tracking import TrackingRef, finished_on_exit, start_tracking_run_task
from tasks.training.evaluate import evaluate_task
from tasks.training.fine_tune import FineTuneConfig, fine_tune
from tasks.training.ingest import IngestConfig, ingest_task
from tasks.training.preprocess import PreprocessConfig, preprocess
from tasks.training.register import RegisterConfig, register_task
from tasks.training.sweep import (
    SearchSpace,
    StudyParameters,
    StudyRef,
    TrialConfig,
    TrialOutcome,
    TrialSettings,
    best_trial_task,
    prepare_study_task,
    run_trial,
    summarize_study_task,
)

# Two trials in one process that need the same preprocessed data must not build the same cache folder at once.
_PREPROCESS_LOCK = threading.Lock()


def train_trial(
    config: TrialConfig, params: dict[str, Any], tracking: TrackingRef, callbacks: list[Any]
) -> tuple[PreparedDataset, FineTunedModel]:
    """One trial's training, wired from the two stages it is: the (cached) preprocess at the trial's max length and
    truncation, then the fine-tune with its hyperparameters and the pruning callback."""
    base_model = config.base_models[params["base_model"]]
    preprocess_config = PreprocessConfig(
        tokenizer=base_model,
        max_length=params["max_length"],
        truncation=params["truncation"],
        seed=config.study.parameters.seed,
        validation_fraction=config.validation_fraction,
        test_fraction=config.test_fraction,
    )
    with _PREPROCESS_LOCK:
        prepared = preprocess(config.snapshot, preprocess_config, config.preprocess_cache_dir)
    fine_tune_config = FineTuneConfig(
        base_model=base_model,
        epochs=params["epochs"],
        batch_size=params["batch_size"],
        learning_rate=params["learning_rate"],
        warmup_ratio=params["warmup_ratio"],
        weight_decay=params["weight_decay"],
        class_weighted_loss=bool(params["class_weighted_loss"]),
        early_stopping_patience=config.settings.early_stopping_patience,
        seed=config.study.parameters.seed,
        processes=1,  # one process per trial: the pruning callback runs in it (trials run side by side instead)
    )
    model = fine_tune(prepared, fine_tune_config, config.fine_tune_dir, tracking=tracking, callbacks=callbacks)
    return prepared, model


@task(name="trial", retries=0, cache_policy=NO_CACHE)  # a trial is never a cached result: each asks for a new one
def run_trial_task(config: TrialConfig, sampler_seed: int) -> TrialOutcome:
    return run_trial(config, sampler_seed, train=train_trial)


@flow(name="sweep", log_prints=True)
def sweep(
    dataset: DatasetParameters = DatasetParameters(),
    search_space: SearchSpace = SearchSpace(),
    study: StudyParameters = StudyParameters(),
    trial_settings: TrialSettings = TrialSettings(),
    registered_model_name: Annotated[
        str, Field(min_length=1, max_length=256, description="MLflow registered-model name of the best model.")
    ] = REGISTERED_MODEL_NAME,
) -> RegisteredModelVersion:
    settings = Settings()
    study_ref = StudyRef(storage_url=settings.resolved_optuna_storage, parameters=study)
    ingest_config = IngestConfig(**dataset.model_dump(include=set(IngestConfig.model_fields)))
    study_dir = settings.sweep_dir / study.study_name

    plan = prepare_study_task(study_ref)
    # One MLflow parent run per study (keyed by the study's id in its storage): a continued study adds to it.
    parent = start_tracking_run_task(
        settings.resolved_mlflow_tracking_uri,
        settings.experiment_name,
        run_name=f"sweep-{study.study_name}",
        idempotency_key=f"sweep:{study.study_name}:{plan.study_key}",
        tags={"optuna.study_name": study.study_name},
    )
    with finished_on_exit(parent):
        snapshot = ingest_task(ingest_config, settings.snapshot_dir)
        trial_config = TrialConfig(
            study=study_ref,
            space=search_space,
            settings=trial_settings,
            snapshot=snapshot,
            base_models={name: resolve_base_model(name) for name in search_space.base_models},
            parent=parent,
            experiment_name=settings.experiment_name,
            preprocess_cache_dir=settings.preprocess_cache_dir,
            fine_tune_dir=study_dir / "fine-tune",
            validation_fraction=dataset.validation_fraction,
            test_fraction=dataset.test_fraction,
            run_tags={"prefect.flow_run_id": str(flow_run.get_id())},
        )
        # Trials run in a thread pool of this flow run, `parallel_trials` at a time (the task runner is built here
        # because its size is a parameter). To spread one study over several workers or machines, start more
        # sweep runs with the same study name on a shared storage (PostgreSQL) and TEXTCLF_HOME: the study in the
        # database is what they share, and each run asks it for the next trial.
        trial_runner: Any  # prefect 3 types submit() for async tasks only
        with ThreadPoolTaskRunner(max_workers=study.parallel_trials) as trial_runner:
            trial_futures = [
                trial_runner.submit(run_trial_task, {"config": trial_config, "sampler_seed": seed})
                for seed in range(plan.first_sampler_seed, plan.first_sampler_seed + plan.trials_to_run)
            ]
            outcomes = [future.result() for future in trial_futures]  # pruned and failed trials return, never raise
        summary = summarize_study_task(study_ref, parent, study_dir / "summary")
        create_markdown_artifact(
            key="sweep-summary",
            markdown=summary.markdown,
            description=f"Optuna study {study.study_name}: trials, best parameters, pruning.",
        )
        best = best_trial_task(study_ref, parent)
        evaluation = evaluate_task(
            best.model,
            best.prepared,
            settings.evaluation_dir / best.tracking.run_id,
            context={
                "data source": snapshot.source,
                "data version": snapshot.version,
                "base model": best.model.base_model,
                "study": study.study_name,
                "best trial": str(best.number),
                "hyperparameters": str(best.params),
                "device": f"{best.model.device} ({best.model.precision})",
            },
        )
        version = register_task(
            best.model,
            evaluation,
            snapshot,
            best.prepared,
            best.tracking,
            RegisterConfig(registered_model_name=registered_model_name),
            params={
                **ingest_config.model_dump(),
                **best.prepared.windowing.model_dump(),
                **best.params,
                "optuna_study": study.study_name,
                "optuna_trial": best.number,
            },
            code_version=code_version(),
        )
        create_markdown_artifact(
            key="sweep-evaluation-report",
            markdown=evaluation.report_markdown
            + f"\n\nBest of {len(outcomes)} trial(s) run now in study `{study.study_name}`: trial {best.number} "
            f"(validation macro-F1 {best.validation_macro_f1:.4f}). Registered **{version.name}** version "
            f"**{version.version}** as `@{version.alias}`.\n",
            description="Test metrics of the sweep's best model next to the TF-IDF baseline.",
        )
    return version
