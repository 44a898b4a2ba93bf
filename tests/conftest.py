from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.fixtures import make_texts, make_tiny_bert

# No test may reach a hub: transformers, datasets and huggingface_hub stay offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
# BentoML reads its store location once per process: every test (and every `bentoml` subprocess that inherits the
# environment) uses a throw-away store, never the user's ~/bentoml.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="textclf-tests-bentoml-")
atexit.register(shutil.rmtree, os.environ["BENTOML_HOME"], ignore_errors=True)
# Bento servers started by tests log their requests here, never into the project's .textclf/request-log.
os.environ["TEXTCLF_REQUEST_LOG_DIR"] = tempfile.mkdtemp(prefix="textclf-tests-request-log-")
atexit.register(shutil.rmtree, os.environ["TEXTCLF_REQUEST_LOG_DIR"], ignore_errors=True)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def fixture_frame():
    return make_texts(per_class=40)


@pytest.fixture(scope="session")
def fixture_csv(tmp_path_factory, fixture_frame) -> Path:
    path = tmp_path_factory.mktemp("data") / "topics.csv"
    fixture_frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, fixture_frame) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), fixture_frame["text"].tolist())


@pytest.fixture(scope="session")
def bento_env(tmp_path_factory, tuned_fixture) -> dict:
    """Environment for `bentoml serve` from the repository: a throw-away BentoML store that holds the tuned fixture
    model (registered model "topics", version 7), named by TEXTCLF_BENTO_MODEL; the service's defaults otherwise: no
    API token, no tracing switch or BentoML configuration, no request-log settings but the tests' folder (tests
    that need other settings add them)."""
    import subprocess
    import sys

    env = {
        k: v for k, v in os.environ.items() if not k.startswith("TEXTCLF_REQUEST_LOG") or k == "TEXTCLF_REQUEST_LOG_DIR"
    }
    for name in ("TEXTCLF_API_TOKEN", "TEXTCLF_TRACING", "BENTOML_CONFIG", "BENTOML_CONFIG_OPTIONS"):
        env.pop(name, None)
    env.update(BENTOML_HOME=str(tmp_path_factory.mktemp("bentoml-home")), BENTOML_DO_NOT_TRACK="true")
    script = (
        "import sys; from pathlib import Path; from tasks.promotion.bento import import_to_bento_store; "
        "print(import_to_bento_store(Path(sys.argv[1]), 'text-classifier', 'topics', 7))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tuned_fixture.model_dir)],
        cwd=Path(__file__).parents[1],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    env["TEXTCLF_BENTO_MODEL"] = done.stdout.strip().splitlines()[-1]
    return env


@pytest.fixture(scope="session")
def in_process_bento_model(tuned_fixture) -> str:
    """The tuned fixture model (registered model "topics", version 7) in this process's throw-away BentoML store, for
    the service's app run in-process (tests.fixtures.service_in_process); its tag."""
    from tasks.promotion.bento import import_to_bento_store

    return import_to_bento_store(tuned_fixture.model_dir, "text-classifier", "topics", 7)


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """A real MLflow tracking server and a real Prefect server, each on a free loopback port and SQLite,
    started with the same code that starts the embedded default stack."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.local_stack import ensure_mlflow_server, ensure_prefect_server, stop_local_servers
    from tasks.common.ports import free_port

    root = tmp_path_factory.mktemp("stack")
    try:
        mlflow = ensure_mlflow_server(root, port=free_port())
        prefect = ensure_prefect_server(root, port=free_port())
        with temporary_settings(updates={PREFECT_API_URL: prefect.url}):
            yield {"mlflow": mlflow.url, "prefect": prefect.url, "root": root}
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()  # send the last flow-run logs before the server goes away
    finally:
        stop_local_servers(root)


@pytest.fixture(scope="session")
def session_champion(servers, tuned_fixture, tiny_model_dir, tmp_path_factory) -> dict:
    """The tuned fixture model registered once per session as @champion of `session-topics` on the test MLflow
    server, with a test split of 108 held-out fixture texts (enough to be the drift monitor's reference; the session
    fixture's split has 12): the champion that batch scoring, the drift monitor and the CLI's `score` and `monitor`
    read. Its name, version and the snapshot it was registered with. Tests must not move its aliases (a test that
    promotes registers its own model)."""
    from tasks.registry import move_aliases
    from tasks.tracking import start_tracking_run
    from tasks.training.evaluate import EvaluationConfig, evaluate
    from tasks.training.ingest import IngestConfig, ingest
    from tasks.training.preprocess import PreprocessConfig, preprocess
    from tasks.training.register import RegisterConfig, register

    name = "session-topics"
    root = tmp_path_factory.mktemp("session-champion")
    make_texts(per_class=80, seed=11).to_csv(root / "topics.csv", index=False)
    snapshot = ingest(IngestConfig(source=str(root / "topics.csv")), root / "snapshots")
    prepared = preprocess(
        snapshot, PreprocessConfig(tokenizer=str(tiny_model_dir), max_length=32, test_fraction=0.45), root / "cache"
    )
    evaluation = evaluate(tuned_fixture, prepared, root / "evaluation", config=EvaluationConfig(latency_samples=1))
    tracking = start_tracking_run(servers["mlflow"], f"{name}-training", "train", idempotency_key=name)
    version = register(
        tuned_fixture,
        evaluation,
        snapshot,
        prepared,
        tracking,
        RegisterConfig(registered_model_name=name),
        {"purpose": "the session's champion"},
        "test",
    )
    move_aliases(servers["mlflow"], name, version.version)
    return {"name": name, "version": version.version, "snapshot": snapshot}


@pytest.fixture()
def project_env(servers, tmp_path, monkeypatch):
    """Environment for running a flow in-process against the test servers, with its own data folder."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers["mlflow"])
    monkeypatch.setenv("PREFECT_API_URL", servers["prefect"])
    monkeypatch.setenv("TEXTCLF_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="session")
def prepared_fixture(tmp_path_factory, fixture_csv, tiny_model_dir):
    """The fixture CSV ingested and preprocessed for the tiny BERT (max length 32)."""
    from tasks.training.ingest import IngestConfig, ingest
    from tasks.training.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("prepared")
    snapshot = ingest(IngestConfig(source=str(fixture_csv)), root / "snapshots")
    prepared = preprocess(snapshot, PreprocessConfig(tokenizer=str(tiny_model_dir), max_length=32), root / "cache")
    return snapshot, prepared


@pytest.fixture(scope="session")
def tuned_fixture(tmp_path_factory, prepared_fixture, tiny_model_dir):
    from tasks.training.fine_tune import FineTuneConfig, fine_tune

    _, prepared = prepared_fixture
    config = FineTuneConfig(
        base_model=str(tiny_model_dir), epochs=8, batch_size=8, learning_rate=2e-3, early_stopping_patience=0
    )
    return fine_tune(prepared, config, tmp_path_factory.mktemp("fine-tune"))


POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}  # the machine's PostgreSQL (trust auth)


def _postgres_admin():
    import psycopg

    return psycopg.connect(dbname="postgres", connect_timeout=5, autocommit=True, **POSTGRES)


@pytest.fixture(scope="session")
def production_stack(tmp_path_factory):
    """The production shape on one machine: a Prefect server and an MLflow server on PostgreSQL (fresh databases),
    the work pools and every deployment of prefect.yaml registered by `textclf deploy`'s code, and a `process`
    worker on each pool (`gpu` and `cpu`; without a GPU the fine-tune falls back to the CPU)."""
    import sys
    import uuid

    import psycopg

    from flows.deploy import deploy
    from flows.local_stack import ensure_mlflow_server, ensure_prefect_server, stop_local_servers
    from tasks.common.ports import free_port
    from tasks.common.processes import start_process, stop_process_tree

    try:
        admin = _postgres_admin()
    except psycopg.OperationalError as error:
        pytest.fail(f"PostgreSQL is not answering on 127.0.0.1:5432 ({error}); the production-shaped tests need it.")
    suffix = uuid.uuid4().hex[:8]
    databases = {"prefect": f"textclf_prefect_{suffix}", "mlflow": f"textclf_mlflow_{suffix}"}
    with admin.cursor() as cursor:
        for database in databases.values():
            cursor.execute(f"CREATE DATABASE {database}")
    root = tmp_path_factory.mktemp("production")
    url = "postgresql{driver}://{user}@{host}:{port}/{database}"
    workers = []
    try:
        mlflow = ensure_mlflow_server(
            root, port=free_port(), backend_store_uri=url.format(driver="", database=databases["mlflow"], **POSTGRES)
        )
        prefect = ensure_prefect_server(
            root,
            port=free_port(),
            database_url=url.format(driver="+asyncpg", database=databases["prefect"], **POSTGRES),
        )
        deployments = deploy(prefect.url, "process")
        env = {
            **os.environ,
            "PREFECT_API_URL": prefect.url,
            "MLFLOW_TRACKING_URI": mlflow.url,
            "TEXTCLF_HOME": str(root / "home"),
            "PREFECT_WORKER_QUERY_SECONDS": "2",
        }
        prefect_cli = str(Path(sys.executable).parent / "prefect")
        for pool in ("gpu", "cpu"):
            command = [prefect_cli, "worker", "start", "--pool", pool, "--type", "process"]
            workers.append(start_process(command, root / f"worker-{pool}.log", env))
        yield {
            "prefect": prefect.url,
            "mlflow": mlflow.url,
            "root": root,
            "deployments": deployments,
            "databases": databases,
        }
    finally:
        for worker in workers:  # a worker busy with a flow run may ignore SIGTERM: SIGKILL after 30 s
            stop_process_tree(worker.pid, timeout_seconds=30)
        stop_local_servers(root)
        with admin.cursor() as cursor:
            for database in databases.values():
                cursor.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        admin.close()
