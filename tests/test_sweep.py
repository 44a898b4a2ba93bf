"""The sweep flow (hyperparameter search): search-space validation, then end to end on the tiny BERT against real
Prefect and MLflow servers: trials as Prefect task runs and MLflow child runs, pruning, resuming a study whose
process was killed, the best model registered as @candidate, and the study on PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from flows.sweep import sweep
from flows.training import DatasetParameters
from tasks.training.sweep import PARENT_RUN_TAG, STATE_TAG, SearchSpace, StudyParameters, TrialSettings
from tests.fixtures import flow_run_and_artifacts

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = "postgresql+psycopg://root@127.0.0.1:5432/{database}"


def _space(model_dir, **changes) -> SearchSpace:
    # Learning rates from far too small (the tiny model stays at chance) to good: the pruner has work to do.
    return SearchSpace(
        **{
            "learning_rate_min": 1e-5,
            "learning_rate_max": 5e-3,
            "batch_sizes": [8],
            "epochs_min": 3,
            "epochs_max": 3,
            "max_lengths": [32],
            "truncations": ["head", "chunks"],
            "base_models": [str(model_dir)],
            **changes,
        }
    )


def _study(name, **changes) -> StudyParameters:
    return StudyParameters(
        **{
            "study_name": name,
            "n_trials": 4,
            "pruner": "median",
            "pruner_startup_trials": 1,
            "sampler_startup_trials": 10,
            "seed": 3,
            **changes,
        }
    )


def _optuna_study(storage_url: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=storage_url)


# ---------------------------------------------------------------------------------------------------------------
# Parameters: bad input is refused with the field named and the fix
# ---------------------------------------------------------------------------------------------------------------


def test_search_space_refuses_a_reversed_range_naming_the_fields():
    with pytest.raises(
        ValueError,
        match=r"search_space\.learning_rate_min \(0\.01\) is greater than "
        r"search_space\.learning_rate_max \(0\.001\): set learning_rate_min <= ",
    ):
        SearchSpace(learning_rate_min=0.01, learning_rate_max=0.001)
    with pytest.raises(ValueError, match=r"search_space\.epochs_min \(5\) is greater than search_space\.epochs_max"):
        SearchSpace(epochs_min=5, epochs_max=2)


@pytest.mark.parametrize("field", ["batch_sizes", "max_lengths", "truncations", "class_weighted_losses", "base_models"])
def test_search_space_refuses_an_empty_choice(field):
    with pytest.raises(ValueError, match=rf"search_space\.{field} is empty: give at least one value"):
        SearchSpace(**{field: []})


def test_search_space_checks_each_choice_and_drops_repeats():
    with pytest.raises(ValueError, match="truncations"):
        SearchSpace(truncations=["middle"])
    with pytest.raises(ValueError, match="batch_sizes"):
        SearchSpace(batch_sizes=[0])
    assert SearchSpace(batch_sizes=[16, 16, 32]).batch_sizes == [16, 32]


def test_class_weighting_is_a_choice_of_the_search_space():
    import optuna

    from flows.cli import build_parser
    from tasks.training.sweep import suggest

    argv = ["sweep", "--source", "data.csv", "--class-weighted-losses", "false", "true"]
    args = build_parser(argv).parse_args(argv)
    space = args.options.values(args)["search_space"]
    assert space.class_weighted_losses == [False, True]
    searched, default = (optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)) for _ in range(2))
    assert {suggest(searched.ask(), space)["class_weighted_loss"] for _ in range(20)} == {False, True}  # both tried
    assert {suggest(default.ask(), SearchSpace())["class_weighted_loss"] for _ in range(5)} == {False}  # the default


def test_study_parameters_refuse_a_grace_period_shorter_than_the_heartbeat():
    with pytest.raises(
        ValueError,
        match=r"study\.grace_period_seconds \(30\) must be longer than "
        r"study\.heartbeat_seconds \(60\).*at least 120",
    ):
        StudyParameters(heartbeat_seconds=60, grace_period_seconds=30)


def test_flow_parameters_validate_and_describe_every_field():
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema

    with pytest.raises(ParameterTypeError, match="learning_rate_min"):
        sweep.validate_parameters({"search_space": {"learning_rate_min": 0.01, "learning_rate_max": 0.001}})
    with pytest.raises(ParameterTypeError, match="parallel_trials"):
        sweep.validate_parameters({"study": {"parallel_trials": 0}})
    schema = parameter_schema(sweep).model_dump_for_openapi()
    assert set(schema["properties"]) == {"dataset", "search_space", "study", "trial_settings", "registered_model_name"}
    definitions = schema["definitions"]
    assert definitions["StudyParameters"]["properties"]["pruner"]["enum"] == ["median", "successive-halving", "none"]
    for model in ("SearchSpace", "StudyParameters", "TrialSettings"):
        for name, field in definitions[model]["properties"].items():
            assert field.get("description"), f"{model}.{name} has no description in the UI form"


# ---------------------------------------------------------------------------------------------------------------
# End to end on the real servers
# ---------------------------------------------------------------------------------------------------------------


def _task_runs(api_url: str, flow_run_id) -> list[dict]:
    return (
        httpx.post(
            f"{api_url}/task_runs/filter",
            json={
                "task_runs": {"flow_run_id": {"any_": [str(flow_run_id)]}},
                "limit": 200,
            },
        )
        .raise_for_status()
        .json()
    )


@pytest.mark.integration
def test_sweep_prunes_tracks_every_trial_and_registers_the_best_as_candidate(
    project_env, servers, fixture_csv, tiny_model_dir
):
    name = f"sweep-e2e-{uuid.uuid4().hex[:6]}"
    state = sweep(
        DatasetParameters(source=str(fixture_csv)),
        _space(tiny_model_dir),
        _study(name),
        TrialSettings(early_stopping_patience=0),
        registered_model_name=name,
        return_state=True,
    )
    assert state.is_completed(), state.message
    version = state.result()
    assert version.name == name and version.alias == "candidate"

    # Four trials, each a Prefect task run of this flow run; the summary is a markdown artifact.
    flow_run_id = state.state_details.flow_run_id
    trial_runs = [r for r in _task_runs(servers["prefect"], flow_run_id) if r["task_key"].startswith("run_trial")]
    assert len(trial_runs) == 4 and all(r["state"]["type"] == "COMPLETED" for r in trial_runs)
    _, artifacts = flow_run_and_artifacts(servers["prefect"], flow_run_id)
    summary = next(a for a in artifacts if a["key"] == "sweep-summary")["data"]
    assert f"study `{name}`" in summary and "Best trial" in summary and "saved by pruning" in summary

    # The study: at least one trial pruned (and it stopped early), the rest complete.
    study = _optuna_study(f"sqlite:///{project_env / 'optuna' / 'studies.db'}", name)
    states = [t.state.name for t in study.trials]
    assert len(states) == 4 and "PRUNED" in states and "COMPLETE" in states, states
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert any(len(t.intermediate_values) < t.params["epochs"] for t in pruned)  # stopped before its last epoch

    # MLflow: one parent run with the plots and summary, one child run per trial with its state and epoch metrics.
    client = MlflowClient(servers["mlflow"])
    parent_run = client.get_run(client.get_run(version.run_id).data.tags[PARENT_RUN_TAG])
    children = client.search_runs(
        [parent_run.info.experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run.info.run_id}'"
    )
    assert len(children) == 4
    by_trial = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    for trial in study.trials:
        run = by_trial[trial.number]
        assert run.data.tags[STATE_TAG] == trial.state.name.lower().replace("fail", "failed")
        assert run.data.params["learning_rate"] == str(trial.params["learning_rate"])
        history = client.get_metric_history(run.info.run_id, "epoch/validation_macro_f1")
        assert [m.step for m in history] == sorted(trial.intermediate_values)
    assert {r.data.tags[STATE_TAG] for r in children} >= {"complete", "pruned"}
    study_artifacts = {a.path for a in client.list_artifacts(parent_run.info.run_id, "study")}
    assert {"study/optimization_history.png", "study/param_importances.png", "study/summary.md"} <= study_artifacts
    assert parent_run.data.metrics["trials_pruned"] >= 1
    assert parent_run.data.metrics["trial_epochs_run"] < parent_run.data.metrics["trial_epochs_without_pruning"]

    # Only the best trial is evaluated on the test split and registered, with @candidate, from its own run.
    assert version.run_id == by_trial[study.best_trial.number].info.run_id
    assert client.get_model_version_by_alias(name, "candidate").version == str(version.version)
    registered_run = client.get_run(version.run_id)
    assert "test_macro_f1" in registered_run.data.metrics
    assert registered_run.data.tags["prefect.flow_run_id"] == str(flow_run_id)  # what the promotion trigger finds
    assert sum("test_macro_f1" in r.data.metrics for r in children) == 1


SWEEP_SCRIPT = """
import sys
from flows.sweep import sweep
from flows.training import DatasetParameters
from tasks.training.sweep import SearchSpace, StudyParameters, TrialSettings
csv, model_dir, name = sys.argv[1:4]
sweep(DatasetParameters(source=csv),
      SearchSpace(learning_rate_min=2e-3, learning_rate_max=2e-3, batch_sizes=[8], epochs_min=6, epochs_max=6,
                  max_lengths=[32], truncations=["head"], base_models=[model_dir]),
      StudyParameters(study_name=name, n_trials=2, pruner="none", heartbeat_seconds=1, grace_period_seconds=3),
      TrialSettings(early_stopping_patience=0), registered_model_name=name)
"""


@pytest.mark.integration
def test_a_study_killed_mid_trial_resumes_with_the_same_name(
    project_env, servers, fixture_csv, tiny_model_dir, tmp_path
):
    """SIGKILL the sweep's process after the first trial saved a checkpoint; the same study name then retries that
    trial (its heartbeat stopped), resuming its fine-tune from the checkpoint, and completes the study."""
    name = f"sweep-resume-{uuid.uuid4().hex[:6]}"
    log = (tmp_path / "killed.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", SWEEP_SCRIPT, str(fixture_csv), str(tiny_model_dir), name],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    checkpoints = project_env / "sweeps" / name / "fine-tune"
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("*/checkpoints/checkpoint-*/trainer_state.json")):
        assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the first trial saved no checkpoint in time"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)

    storage = f"sqlite:///{project_env / 'optuna' / 'studies.db'}"
    (killed,) = _optuna_study(storage, name).trials
    assert killed.state.name == "RUNNING"  # left behind by the dead process
    time.sleep(4)  # past the grace period: its heartbeat is stale

    state = sweep(
        DatasetParameters(source=str(fixture_csv)),
        SearchSpace(
            learning_rate_min=2e-3,
            learning_rate_max=2e-3,
            batch_sizes=[8],
            epochs_min=6,
            epochs_max=6,
            max_lengths=[32],
            truncations=["head"],
            base_models=[str(tiny_model_dir)],
        ),
        StudyParameters(study_name=name, n_trials=2, pruner="none", heartbeat_seconds=1, grace_period_seconds=3),
        TrialSettings(early_stopping_patience=0),
        registered_model_name=name,
        return_state=True,
    )
    assert state.is_completed(), state.message
    trials = _optuna_study(storage, name).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    retry = trials[1]
    assert retry.system_attrs["failed_trial"] == killed.number and retry.params == killed.params
    assert retry.user_attrs["fine_tuned_model"]["resumed_from_checkpoint"], "the retry started from scratch"
    client = MlflowClient(servers["mlflow"])
    dead_run = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert dead_run.info.status == "FAILED" and dead_run.data.tags[STATE_TAG] == "failed"
    assert client.get_model_version_by_alias(name, "candidate").version == str(state.result().version)

    # Done studies run nothing more: the same name again adds no trial.
    again = sweep(
        DatasetParameters(source=str(fixture_csv)),
        _space(tiny_model_dir, epochs_min=6, epochs_max=6, learning_rate_min=2e-3),
        StudyParameters(study_name=name, n_trials=2, pruner="none"),
        TrialSettings(early_stopping_patience=0),
        registered_model_name=name,
        return_state=True,
    )
    assert again.is_completed(), again.message
    assert len(_optuna_study(storage, name).trials) == 3


@pytest.mark.integration
def test_the_study_lives_in_postgresql_when_configured(project_env, servers, fixture_csv, tiny_model_dir, monkeypatch):
    import psycopg

    database = f"textclf_optuna_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(
            dbname="postgres", host="127.0.0.1", port=5432, user="root", connect_timeout=5, autocommit=True
        )
    except psycopg.OperationalError as error:
        pytest.fail(f"PostgreSQL is not answering on 127.0.0.1:5432 ({error}); this test needs it.")
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {database}")
    try:
        url = POSTGRES_URL.format(database=database)
        monkeypatch.setenv("TEXTCLF_OPTUNA_STORAGE", url)
        name = f"sweep-pg-{uuid.uuid4().hex[:6]}"
        state = sweep(
            DatasetParameters(source=str(fixture_csv)),
            _space(tiny_model_dir, epochs_min=1, epochs_max=1, learning_rate_min=2e-3),
            _study(name, n_trials=2, parallel_trials=2),
            TrialSettings(early_stopping_patience=0),
            registered_model_name=name,
            return_state=True,
        )
        assert state.is_completed(), state.message
        study = _optuna_study(url, name)
        assert len(study.trials) == 2 and study.best_trial.state.name == "COMPLETE"
        assert not (project_env / "optuna" / "studies.db").exists()  # nothing went to the SQLite default
        with psycopg.connect(dbname=database, host="127.0.0.1", port=5432, user="root") as connection:
            (count,) = connection.execute("SELECT count(*) FROM trials").fetchone()
        assert count == 2
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        admin.close()
