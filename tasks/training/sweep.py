"""Hyperparameter search (the `sweep` flow's stages): an Optuna study over the fine-tune's settings.

TPE sampling (seeded), a pruner driven by the validation macro-F1 that the fine-tune reports each epoch, and the
study kept in Optuna's RDB storage (SQLite under the data folder by default, PostgreSQL when configured), so a
re-run with the same study name continues it and several flow runs can work on one study. Each trial reuses the
preprocess and fine-tune stages unchanged (the pruning callback goes in through `fine_tune(callbacks=...)`) and
is an MLflow child run of the study's parent run. Only the best trial's model goes on to evaluation on the test
split and registration; the test split never guides the search.

Heartbeats: a trial left RUNNING by a killed process stops beating; once its heartbeat is older than the grace
period, the next trial to start marks it failed and queues a retry with the same parameters (which resumes from
the fine-tune's last checkpoint, since the same data and settings map to the same fine-tune folder)."""

from __future__ import annotations

import logging
import shutil
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NotRequired, Protocol, TypedDict, TypeVar, cast

from prefect import task
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tasks.common.atomic import atomic_directory
from tasks.contracts import DatasetSnapshot, FineTunedModel, PreparedDataset
from tasks.serving.windows import Truncation
from tasks.tracking import TrackingRef, end_tracking_run, log_metrics, log_params, start_tracking_run

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from optuna import Study, Trial
    from optuna.pruners import BasePruner
    from optuna.storages import BaseStorage, RDBStorage
    from optuna.trial import FrozenTrial, TrialState
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

PARENT_RUN_TAG = "mlflow.parentRunId"  # what the MLflow UI nests child runs under
STATE_TAG = "optuna.state"  # complete / pruned / failed on every trial's run
TRIAL_RUN_ATTR = "mlflow_run_id"  # trial user attributes: where its run, model and data are
TRIAL_MODEL_ATTR = "fine_tuned_model"
TRIAL_DATA_ATTR = "prepared_dataset"
TRIAL_ERROR_ATTR = "error"
STUDY_KEY_ATTR = "textclf_study_key"
PACKAGED_BASE_MODEL = "all-MiniLM-L6-v2"  # as flows.training names it (resolved there, not here)

BatchSize = Annotated[int, Field(ge=1, le=1024)]
MaxLength = Annotated[int, Field(ge=8, le=8192)]


class SweepInputError(ValueError):
    """A search space or study setting that cannot work; the message names the field and the fix."""


_T = TypeVar("_T")


def _unique(values: list[_T]) -> list[_T]:
    return list(dict.fromkeys(values))


class SearchSpace(BaseModel):
    """What the study searches. A range whose min equals its max fixes that setting; a one-item list fixes a choice."""

    model_config = ConfigDict(frozen=True)

    learning_rate_min: float = Field(default=1e-5, gt=0, le=0.1, description="Smallest peak learning rate (log scale).")
    learning_rate_max: float = Field(default=2e-4, gt=0, le=0.1, description="Largest peak learning rate (log scale).")
    batch_sizes: list[BatchSize] = Field(default=[16, 32], description="Training batch sizes to choose from.")
    epochs_min: int = Field(default=2, ge=1, le=50, description="Fewest epochs a trial trains.")
    epochs_max: int = Field(default=4, ge=1, le=50, description="Most epochs a trial trains.")
    warmup_ratio_min: float = Field(default=0.0, ge=0, lt=1, description="Smallest share of steps for linear warmup.")
    warmup_ratio_max: float = Field(default=0.2, ge=0, lt=1, description="Largest share of steps for linear warmup.")
    weight_decay_min: float = Field(default=0.0, ge=0, le=1, description="Smallest AdamW weight decay.")
    weight_decay_max: float = Field(default=0.1, ge=0, le=1, description="Largest AdamW weight decay.")
    max_lengths: list[MaxLength] = Field(default=[128], description="Max lengths (tokens per window) to choose from.")
    truncations: list[Truncation] = Field(
        default=["head", "head+tail", "chunks"],
        description="How texts longer than max length are read: head, tail, head+tail or chunks (see training).",
    )
    class_weighted_losses: list[bool] = Field(
        default=[False],
        description="Weight the loss by inverse class frequency: [false] never, [true] always, [false, true] search "
        "both (imbalanced data such as drug-reviews needs it).",
    )
    base_models: list[str] = Field(
        default=[PACKAGED_BASE_MODEL],
        description=f"Base models to choose from: '{PACKAGED_BASE_MODEL}' (packaged), local folders or hub ids.",
    )

    @field_validator("batch_sizes", "max_lengths", "truncations", "class_weighted_losses", "base_models")
    @classmethod
    def _choices_given(cls, values: list[_T], info: ValidationInfo) -> list[_T]:
        if not values:
            raise ValueError(f"search_space.{info.field_name} is empty: give at least one value to choose from.")
        if info.field_name == "base_models" and not all(str(v).strip() for v in values):
            raise ValueError("search_space.base_models has an empty name: give a model folder or hub id.")
        return _unique(values)  # a repeated choice would only weigh that choice twice

    @model_validator(mode="after")
    def _ranges_ordered(self) -> SearchSpace:
        for name in ("learning_rate", "epochs", "warmup_ratio", "weight_decay"):
            low, high = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if low > high:
                raise ValueError(
                    f"search_space.{name}_min ({low}) is greater than search_space.{name}_max ({high}): set "
                    f"{name}_min <= {name}_max (equal values fix {name})."
                )
        return self


class StudyParameters(BaseModel):
    """The Optuna study: its name (a re-run with the same name continues it), size, parallelism and pruner."""

    model_config = ConfigDict(frozen=True)

    study_name: str = Field(
        default="text-classifier-sweep",
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$",
        description="Optuna study name; a run with an existing name continues that study.",
    )
    n_trials: int = Field(
        default=20,
        ge=1,
        le=1000,
        description="Trials the study should have finished in all (complete, pruned or failed); a re-run of an "
        "interrupted study runs only the rest.",
    )
    parallel_trials: int = Field(default=1, ge=1, le=64, description="Trials that run at the same time.")
    pruner: Literal["median", "successive-halving", "none"] = Field(
        default="median",
        description="median: stop a trial whose epoch's validation macro-F1 is below the median of earlier trials "
        "at that epoch; successive-halving: keep the best share at each rung; none: never prune.",
    )
    pruner_startup_trials: int = Field(
        default=3, ge=0, le=1000, description="median: trials that finish unpruned before pruning starts."
    )
    pruner_warmup_epochs: int = Field(
        default=0, ge=0, le=50, description="median: epochs of each trial that are never pruned."
    )
    sampler_startup_trials: int = Field(
        default=5, ge=1, le=1000, description="TPE: random trials before the sampler models the results."
    )
    seed: int = Field(default=42, ge=0, description="Seed of the sampler, the split and every trial's training.")
    heartbeat_seconds: int = Field(
        default=60, ge=1, le=3600, description="How often a running trial records that it is alive."
    )
    grace_period_seconds: int = Field(
        default=180,
        ge=1,
        le=24 * 3600,
        description="A trial silent this long is taken as dead (its process was killed) and retried.",
    )
    max_retries: int = Field(default=2, ge=0, le=10, description="Retries of a trial whose process died.")

    @model_validator(mode="after")
    def _grace_longer_than_heartbeat(self) -> StudyParameters:
        if self.grace_period_seconds <= self.heartbeat_seconds:
            raise ValueError(
                f"study.grace_period_seconds ({self.grace_period_seconds}) must be longer than "
                f"study.heartbeat_seconds ({self.heartbeat_seconds}), or live trials would be retried: raise it to "
                f"at least {2 * self.heartbeat_seconds}."
            )
        return self


class TrialSettings(BaseModel):
    """Fine-tune settings that every trial shares (the search space varies the rest)."""

    model_config = ConfigDict(frozen=True)

    early_stopping_patience: int = Field(
        default=2, ge=0, le=50, description="Epochs without a better validation macro-F1 before a trial stops; 0 never."
    )


class StudyRef(BaseModel):
    """A reference to the study: where it is stored and how to sample and prune (not the Optuna objects)."""

    model_config = ConfigDict(frozen=True)

    storage_url: str
    parameters: StudyParameters

    @property
    def name(self) -> str:
        return self.parameters.study_name


class TrialPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    study_key: str = Field(description="Unique id of the study in its storage (a study made anew gets a new one).")
    trials_to_run: int
    trials_finished: int
    first_sampler_seed: int


class TrialOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    number: int
    state: Literal["complete", "pruned", "failed"]
    value: float | None
    params: dict[str, object]
    epochs_run: int
    run_id: str | None


class BestTrial(BaseModel):
    """The best complete trial: its model and data (references), its MLflow run, its parameters."""

    model_config = ConfigDict(frozen=True)

    number: int
    validation_macro_f1: float
    params: dict[str, object]
    model: FineTunedModel
    prepared: PreparedDataset
    tracking: TrackingRef


class StudySummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    study_name: str
    trials: dict[str, int]
    best_trial: int | None
    best_validation_macro_f1: float | None
    epochs_run: int
    epochs_without_pruning: int
    markdown: str
    artifacts_dir: Path


# ----------------------------------------------------------------------------------------------------------------
# Storage and study
# ----------------------------------------------------------------------------------------------------------------


def redacted(url: str) -> str:
    """A storage URL fit for logs and reports: no password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_storage(ref: StudyRef) -> RDBStorage:
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine_kwargs: dict[str, Any] = {}
    if ref.storage_url.startswith("sqlite:///"):
        Path(ref.storage_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Parallel trials and their heartbeat threads write to one file: wait for the lock instead of failing.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return RDBStorage(
                ref.storage_url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=ref.parameters.heartbeat_seconds,
                grace_period=ref.parameters.grace_period_seconds,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                    max_retry=ref.parameters.max_retries, inherit_intermediate_values=True
                ),
            )
        except Exception as error:
            raise SweepInputError(
                f"Cannot open the Optuna storage {redacted(ref.storage_url)} ({type(error).__name__}: {error}). "
                f"Check TEXTCLF_OPTUNA_STORAGE (an SQLAlchemy URL such as "
                f"postgresql+psycopg://user@host:5432/db), or unset it for the SQLite file under TEXTCLF_HOME."
            ) from error


def make_pruner(parameters: StudyParameters) -> BasePruner:
    import optuna

    if parameters.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=parameters.pruner_startup_trials, n_warmup_steps=parameters.pruner_warmup_epochs
        )
    if parameters.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    return optuna.pruners.NopPruner()


def load_study(ref: StudyRef, storage: BaseStorage, sampler_seed: int | None = None) -> Study:
    import optuna

    # Each trial builds its sampler afresh (the study lives in the database, not in a process), so each gets its
    # own seed: one seed for all would draw the same random start-up trials again and again.
    sampler = optuna.samplers.TPESampler(
        seed=ref.parameters.seed if sampler_seed is None else sampler_seed,
        n_startup_trials=ref.parameters.sampler_startup_trials,
    )
    return optuna.create_study(
        study_name=ref.name,
        storage=storage,
        direction="maximize",
        sampler=sampler,
        pruner=make_pruner(ref.parameters),
        load_if_exists=True,
    )


def _retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    return {number for trial in trials for number in trial.system_attrs.get("retry_history", [])}


def _counts_against_budget(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Finished trials, except the dead ones that a retry replaced (the retry counts instead)."""
    from optuna.trial import TrialState

    retried = _retried_numbers(trials)
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t for t in trials if t.state in finished and t.number not in retried]


def prepare_study(ref: StudyRef) -> TrialPlan:
    """Create the study or load the existing one, retry trials whose process died, and say how many trials are left
    to run (a re-run continues an interrupted study up to its n_trials)."""
    import optuna
    from optuna.trial import TrialState

    storage = open_storage(ref)
    try:
        study = load_study(ref, storage)
        if STUDY_KEY_ATTR not in study.user_attrs:
            study.set_user_attr(STUDY_KEY_ATTR, uuid.uuid4().hex)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # dead trials become FAIL, with a WAITING retry queued
        trials = study.get_trials(deepcopy=False)
        finished = len(_counts_against_budget(trials))
        running = sum(t.state == TrialState.RUNNING for t in trials)  # other flow runs on the same study
        return TrialPlan(
            study_key=study.user_attrs[STUDY_KEY_ATTR],
            trials_to_run=max(0, ref.parameters.n_trials - finished - running),
            trials_finished=finished,
            first_sampler_seed=ref.parameters.seed + len(trials),
        )
    finally:
        storage.engine.dispose()


# ----------------------------------------------------------------------------------------------------------------
# One trial
# ----------------------------------------------------------------------------------------------------------------


class TrialConfig(BaseModel):
    """Everything one trial needs, as references and settings (what a trial task receives)."""

    model_config = ConfigDict(frozen=True)

    study: StudyRef
    space: SearchSpace
    settings: TrialSettings
    snapshot: DatasetSnapshot
    base_models: dict[str, str] = Field(description="Search-space base model name -> local folder or hub id to load.")
    parent: TrackingRef
    experiment_name: str = Field(description="MLflow experiment of the parent run (the trials' runs go there too).")
    preprocess_cache_dir: Path
    fine_tune_dir: Path
    validation_fraction: float = Field(default=0.1, gt=0, lt=0.5, description="Share held out for validation.")
    test_fraction: float = Field(default=0.1, gt=0, lt=0.5, description="Share held out for the test.")
    run_tags: dict[str, str] = Field(default_factory=dict)


class TrialTraining(Protocol):
    """Preprocess and fine-tune one trial's hyperparameters (`params`, from `suggest`) under its MLflow child run,
    with `callbacks` (the pruning) in the Trainer; returns the prepared data and the model. The flow wires it
    (flows/sweep.py `train_trial`): a trial is two other stages, and stages do not import each other."""

    def __call__(
        self, config: TrialConfig, params: dict[str, Any], tracking: TrackingRef, callbacks: list[Any]
    ) -> tuple[PreparedDataset, FineTunedModel]: ...


class _TrialRecord(TypedDict):
    """What a running trial leaves for its task to report (run_trial reads it after the study ran the trial)."""

    number: int | None
    params: dict[str, object]
    run_id: str | None
    work_dir: NotRequired[Path]  # the fine-tune's work folder, once training began


def suggest(trial: Trial, space: SearchSpace) -> dict[str, object]:
    """The trial's settings from the search space. Categorical choices go through as strings or ints."""
    return {
        "learning_rate": trial.suggest_float(
            "learning_rate", space.learning_rate_min, space.learning_rate_max, log=True
        ),
        "batch_size": trial.suggest_categorical("batch_size", space.batch_sizes),
        "epochs": trial.suggest_int("epochs", space.epochs_min, space.epochs_max),
        "warmup_ratio": trial.suggest_float("warmup_ratio", space.warmup_ratio_min, space.warmup_ratio_max),
        "weight_decay": trial.suggest_float("weight_decay", space.weight_decay_min, space.weight_decay_max),
        "max_length": trial.suggest_categorical("max_length", space.max_lengths),
        "truncation": trial.suggest_categorical("truncation", space.truncations),
        "class_weighted_loss": trial.suggest_categorical("class_weighted_loss", space.class_weighted_losses),
        "base_model": trial.suggest_categorical("base_model", space.base_models),
    }


def pruning_callback(
    trial: Trial, tracking: TrackingRef | None = None, outcome: _TrialRecord | None = None
) -> TrainerCallback:
    """A transformers TrainerCallback: after each epoch's evaluation, report the validation macro-F1 (already pooled
    per text by the fine-tune's metric) to Optuna at that epoch, log it per epoch, and prune if the pruner says so."""
    import optuna
    from transformers import TrainerCallback

    class OptunaPruning(TrainerCallback):
        def on_train_begin(
            self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
        ) -> None:
            if outcome is not None:  # the fine-tune's work folder: removed if the trial is pruned
                # transformers sets output_dir in __post_init__ (never None after it); the field's hint keeps None
                outcome["work_dir"] = Path(args.output_dir).parent  # type: ignore[arg-type]

        def on_evaluate(
            self,
            args: TrainingArguments,
            state: TrainerState,
            control: TrainerControl,
            metrics: dict[str, float] | None = None,
            **kwargs: Any,
        ) -> None:
            if not metrics or "eval_macro_f1" not in metrics:
                return
            epoch = int(round(state.epoch or 0))
            trial.report(float(metrics["eval_macro_f1"]), step=epoch)
            if tracking is not None:
                try:
                    log_metrics(
                        tracking,
                        {
                            f"epoch/validation_{k[5:]}": v
                            for k, v in metrics.items()
                            if k.startswith("eval_") and isinstance(v, (int, float))
                        },
                        step=epoch,
                    )
                except Exception as error:
                    logger.warning("Could not log epoch metrics to MLflow: %s", error)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation macro-F1 {metrics['eval_macro_f1']:.4f} at epoch {epoch}")

    return OptunaPruning()


def _train_trial(config: TrialConfig, trial: Trial, outcome: _TrialRecord, train: TrialTraining) -> float:
    """One trial: its settings, its MLflow child run, the (cached) preprocess and the fine-tune with pruning."""
    params = suggest(trial, config.space)
    outcome["params"] = params
    tracking = start_tracking_run(
        config.parent.tracking_uri,
        config.experiment_name,
        run_name=f"trial-{trial.number}",
        idempotency_key=f"{config.parent.run_id}:trial:{trial.number}",
        tags={
            PARENT_RUN_TAG: config.parent.run_id,
            "optuna.study_name": config.study.name,
            "optuna.trial_number": str(trial.number),
            **config.run_tags,
        },
    )
    outcome["run_id"] = tracking.run_id
    trial.set_user_attr(TRIAL_RUN_ATTR, tracking.run_id)
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    retried = frozen.system_attrs.get("failed_trial")  # set on a retry of a trial whose process died
    log_params(
        tracking,
        {
            **params,
            **config.settings.model_dump(),
            "seed": config.study.parameters.seed,
            **({"retry_of_trial": retried} if retried is not None else {}),
        },
    )
    prepared, model = train(config, params, tracking, [pruning_callback(trial, tracking, outcome)])
    # The model folder is what the best trial hands on; its checkpoints only served a resume.
    shutil.rmtree(model.model_dir.parent / "checkpoints", ignore_errors=True)
    trial.set_user_attr(TRIAL_MODEL_ATTR, model.model_dump(mode="json"))
    trial.set_user_attr(TRIAL_DATA_ATTR, prepared.model_dump(mode="json"))
    return model.best_validation_macro_f1


def _objective(config: TrialConfig, outcome: _TrialRecord, train: TrialTraining) -> Callable[[Trial], float]:
    import optuna

    def objective(trial: Trial) -> float:
        outcome["number"] = trial.number
        try:
            return _train_trial(config, trial, outcome, train)
        except optuna.TrialPruned:
            raise
        except Exception as error:
            trial.set_user_attr(TRIAL_ERROR_ATTR, f"{type(error).__name__}: {error}"[:2000])
            raise

    return objective


def _finish_trial_run(run_id: str | None, parent: TrackingRef, state: str, note: str | None) -> None:
    if run_id is None:
        return
    tracking = parent.model_copy(update={"run_id": run_id})
    tracking.client().set_tag(run_id, STATE_TAG, state)
    if note:
        tracking.client().set_tag(run_id, "optuna.note", note[:5000])
    end_tracking_run(tracking, status={"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}[state])


def run_trial(config: TrialConfig, sampler_seed: int, train: TrialTraining) -> TrialOutcome:
    """Ask the study for one trial (a queued retry first), fine-tune it with pruning, tell the study the result.
    A pruned or failed trial is recorded as such and returned, never raised: it must not fail the study."""
    import optuna
    from optuna.trial import TrialState

    storage = open_storage(config.study)
    outcome: _TrialRecord = {"number": None, "params": {}, "run_id": None}
    try:
        study = load_study(config.study, storage, sampler_seed=sampler_seed)
        # optimize(n_trials=1) rather than ask/tell: it runs the heartbeat thread, fails stale trials first, and
        # turns TrialPruned into PRUNED and any other exception into FAIL (catch) instead of raising.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(_objective(config, outcome, train), n_trials=1, catch=(Exception,), gc_after_trial=True)
        frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == outcome["number"]), None)
    finally:
        storage.engine.dispose()
    if frozen is None:
        raise RuntimeError(f"Study {config.study.name}: no trial was created (see the log above).")
    names: dict[TrialState, Literal["complete", "pruned"]] = {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
    }
    state: Literal["complete", "pruned", "failed"] = names.get(frozen.state, "failed")
    note = None
    if state == "pruned":
        # A pruned trial's checkpoints can never be resumed into anything useful.
        if outcome.get("work_dir"):
            shutil.rmtree(outcome["work_dir"], ignore_errors=True)
        note = f"pruned after epoch {max(frozen.intermediate_values, default=0)}"
    elif state == "failed":
        note = frozen.user_attrs.get(TRIAL_ERROR_ATTR, "see the trial task's log for the error")
        logger.warning("Trial %s failed (the study goes on): %s", frozen.number, note)
    try:
        _finish_trial_run(outcome["run_id"], config.parent, state, note)
    except Exception as error:
        logger.warning("Could not close the MLflow run of trial %s: %s", frozen.number, error)
    return TrialOutcome(
        number=frozen.number,
        state=state,
        value=frozen.value,
        params=frozen.params,
        epochs_run=len(frozen.intermediate_values),
        run_id=outcome["run_id"],
    )


# ----------------------------------------------------------------------------------------------------------------
# After the trials
# ----------------------------------------------------------------------------------------------------------------


def _value_of(trial: FrozenTrial) -> float:
    """A complete trial's objective value (Optuna types `value` for every state: None until a trial completes)."""
    return cast(float, trial.value)


def best_trial(ref: StudyRef, parent: TrackingRef) -> BestTrial:
    from optuna.trial import TrialState

    storage = open_storage(ref)
    try:
        study = load_study(ref, storage)
        complete = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if TRIAL_MODEL_ATTR in t.user_attrs
        ]
    finally:
        storage.engine.dispose()
    if not complete:
        raise SweepInputError(
            f"Study {ref.name}: no trial completed, so there is no model to evaluate. Look at the failed trials' "
            f"logs; widen the search space or raise study.pruner_startup_trials if every trial was pruned."
        )
    best = max(complete, key=lambda t: (t.value, -t.number))  # ties: the earlier trial
    model = FineTunedModel.model_validate(best.user_attrs[TRIAL_MODEL_ATTR])
    if not model.model_dir.is_dir():
        raise SweepInputError(
            f"Study {ref.name}: the best trial's model folder {model.model_dir} is missing. Trials that ran on another "
            f"machine must share TEXTCLF_HOME; or run the study again under a new name."
        )
    return BestTrial(
        number=best.number,
        validation_macro_f1=float(_value_of(best)),
        params=best.params,
        model=model,
        prepared=PreparedDataset.model_validate(best.user_attrs[TRIAL_DATA_ATTR]),
        tracking=parent.model_copy(update={"run_id": best.user_attrs[TRIAL_RUN_ATTR]}),
    )


def _close_dead_trial_runs(trials: Sequence[FrozenTrial], parent: TrackingRef) -> None:
    """Runs of trials whose process was killed stay RUNNING in MLflow: mark them failed."""
    from optuna.trial import TrialState

    client = parent.client()
    for trial in trials:
        run_id = trial.user_attrs.get(TRIAL_RUN_ATTR)
        if trial.state == TrialState.FAIL and run_id and client.get_run(run_id).info.status == "RUNNING":
            _finish_trial_run(run_id, parent, "failed", "the trial's process died; it was retried as a new trial")


def _plots(study: Study, folder: Path) -> list[str]:
    """Optimization history, intermediate values and parameter importances as PNG; a plot that cannot be drawn
    (importances need two complete trials and a varied parameter) is left out and named in the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    missing: list[str] = []
    for name, plot in (
        ("optimization_history", optuna_plots.plot_optimization_history),
        ("intermediate_values", optuna_plots.plot_intermediate_values),
        ("param_importances", optuna_plots.plot_param_importances),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)  # matplotlib: "no artists with labels" on a 1-line plot
                axes = plot(study)
            # Optuna draws each plot on a new top-level figure (matplotlib's hints allow a subfigure too)
            figure = cast("Figure", (axes.flat[0] if hasattr(axes, "flat") else axes).figure)
            figure.set_size_inches(9, 5)
            figure.tight_layout()
            figure.savefig(folder / f"{name}.png", dpi=100)
            plt.close(figure)
        except Exception as error:
            missing.append(f"{name} ({error})")
            plt.close("all")
    return missing


def _markdown(
    ref: StudyRef,
    trials: Sequence[FrozenTrial],
    counts: dict[str, int],
    epochs_run: int,
    epochs_full: int,
    missing_plots: list[str],
) -> str:
    from optuna.trial import TrialState

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    saved = 1 - epochs_run / epochs_full if epochs_full else 0.0
    lines = [
        f"# Hyperparameter search: study `{ref.name}`",
        "",
        f"Storage `{redacted(ref.storage_url)}`, pruner `{ref.parameters.pruner}`, TPE seed {ref.parameters.seed}. "
        "Objective: validation macro-F1 (the test split is used only for the best trial, after the search).",
        "",
        "| trials | " + " | ".join(counts) + " |",
        "|---|" + "---:|" * len(counts),
        "| count | " + " | ".join(str(v) for v in counts.values()) + " |",
        "",
        f"Trial-epochs run: **{epochs_run}**; without pruning: {epochs_full} ({saved:.0%} saved by pruning).",
        "",
    ]
    if best is not None:
        lines += [
            f"**Best trial: {best.number}**, validation macro-F1 **{best.value:.4f}**",
            "",
            "| parameter | value |",
            "|---|---|",
        ]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in best.params.items()]
        lines.append("")
    names = sorted({k for t in trials for k in t.params})
    lines += [
        "## Trials",
        "",
        "| trial | state | validation macro-F1 | epochs run | " + " | ".join(names) + " |",
        "|---:|---|---:|---:|" + "---|" * len(names),
    ]
    for t in trials:
        value = (
            f"{t.value:.4f}"
            if t.value is not None
            else (
                f"{t.intermediate_values[max(t.intermediate_values)]:.4f} (last epoch)" if t.intermediate_values else ""
            )
        )
        lines.append(
            f"| {t.number} | {t.state.name.lower()} | {value} | {len(t.intermediate_values)} | "
            + " | ".join(_fmt(t.params.get(k, "")) for k in names)
            + " |"
        )
    if missing_plots:
        lines += ["", "Plots left out: " + "; ".join(missing_plots)]
    return "\n".join(lines) + "\n"


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def pruning_savings(trials: Sequence[FrozenTrial]) -> tuple[int, int]:
    """(trial-epochs run, trial-epochs had no trial been pruned): a pruned trial would have run its planned epochs."""
    from optuna.trial import TrialState

    run = sum(len(t.intermediate_values) for t in trials)
    full = sum(
        int(t.params.get("epochs", len(t.intermediate_values)))
        if t.state == TrialState.PRUNED
        else len(t.intermediate_values)
        for t in trials
    )
    return run, full


def summarize_study(ref: StudyRef, parent: TrackingRef, output_dir: Path) -> StudySummary:
    """Plots and a markdown summary of the study, logged to the parent run (and returned for the Prefect artifact)."""
    from optuna.trial import TrialState

    storage = open_storage(ref)
    try:
        study = load_study(ref, storage)
        trials = study.get_trials(deepcopy=True)
        with atomic_directory(output_dir) as staging:
            missing = _plots(study, staging)
            counts = {
                state.name.lower(): sum(t.state == state for t in trials)
                for state in (
                    TrialState.COMPLETE,
                    TrialState.PRUNED,
                    TrialState.FAIL,
                    TrialState.RUNNING,
                    TrialState.WAITING,
                )
            }
            epochs_run, epochs_full = pruning_savings(trials)
            markdown = _markdown(ref, trials, counts, epochs_run, epochs_full, missing)
            (staging / "summary.md").write_text(markdown)
    finally:
        storage.engine.dispose()
    _close_dead_trial_runs(trials, parent)
    client = parent.client()
    client.log_artifacts(parent.run_id, str(output_dir), "study")
    log_metrics(
        parent,
        {
            "trials_complete": counts["complete"],
            "trials_pruned": counts["pruned"],
            "trials_failed": counts["fail"],
            "trial_epochs_run": epochs_run,
            "trial_epochs_without_pruning": epochs_full,
        },
    )
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    if best is not None:
        log_metrics(parent, {"best_validation_macro_f1": _value_of(best)})
        client.set_tag(parent.run_id, "best_trial", str(best.number))
    return StudySummary(
        study_name=ref.name,
        trials=counts,
        best_trial=best.number if best else None,
        best_validation_macro_f1=best.value if best else None,
        epochs_run=epochs_run,
        epochs_without_pruning=epochs_full,
        markdown=markdown,
        artifacts_dir=output_dir,
    )


prepare_study_task = task(name="prepare-study", retries=2, retry_delay_seconds=5)(prepare_study)
# No retries: a trial that failed is recorded in the study as failed; one whose process died is retried by the
# study itself (heartbeats), with the same parameters.
summarize_study_task = task(name="summarize-study", retries=2, retry_delay_seconds=5)(summarize_study)
best_trial_task = task(name="best-trial")(best_trial)  # its errors are about the study: no retry
