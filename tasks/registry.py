"""The model registry: every read and write of registered-model versions and aliases, in one place. Resolving an alias,
finding the version a training run registered, moving `champion` / `previous-champion` (and rolling them back),
downloading a version's model folder with the runtime its promotion chose, and fetching the test split it was
evaluated on. Everything goes through an explicit `MlflowClient` for a given tracking URI (no global MLflow state)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from pydantic import BaseModel, ConfigDict

from tasks.contracts import (
    CHAMPION_ALIAS,
    MODEL_DIR_ARTIFACT,
    PREVIOUS_CHAMPION_ALIAS,
    RUNTIME_TAG,
    RUNTIME_URI_TAG,
    TEST_SPLIT_ARTIFACT,
)
from tasks.serving.onnx_runtime import (
    PYTORCH,
    RUNTIME_FILE,
    RuntimeFileError,
    install_runtime,
    read_runtime_file,
    remove_runtime,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient


class NotATextclfModel(ValueError):
    """A registered version that the training flow did not make (its MLmodel lacks the fine-tuned folder)."""


def mlflow_client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _error_code(error: BaseException) -> str:
    return str(getattr(error, "error_code", ""))


def resolve_alias(tracking_uri: str, name: str, alias: str) -> int | None:
    """The version number an alias points at, or None when the alias (or the registered model) does not exist.
    Any other registry error (invalid alias name, server down) is raised."""
    from mlflow.exceptions import MlflowException

    try:
        version = mlflow_client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as error:
        code = _error_code(error)
        if "RESOURCE_DOES_NOT_EXIST" in code:  # no such registered model (or version)
            return None
        # A missing alias is reported as INVALID_PARAMETER_VALUE ("Registered model alias X not found."),
        # the same code as an invalid alias name, which must not pass for "no champion".
        if "INVALID_PARAMETER_VALUE" in code and "not found" in str(error.message).lower():
            return None
        raise
    return int(version.version)


def version_of_flow_run(tracking_uri: str, name: str, flow_run_id: str) -> int:
    """The version of `name` that the training flow run `flow_run_id` registered (tag `prefect.flow_run_id`)."""
    versions = mlflow_client(tracking_uri).search_model_versions(
        f"name = '{name}' and tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    if not versions:
        raise ValueError(
            f"No version of registered model '{name}' was registered by training flow run {flow_run_id}: did that "
            f"run register under another registered_model_name?"
        )
    return max(int(v.version) for v in versions)


def fetch_test_split(tracking_uri: str, name: str, version: int, target_root: Path) -> Path:
    """The held-out test split of the training run behind model version `version` (texts and true labels), as
    `target_root/<name>-v<version>-test.parquet`. Both candidate and champion are scored on it."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    run_id = mlflow_client(tracking_uri).get_model_version(name, str(version)).run_id
    target = target_root / f"{name}-v{version}-test.parquet"
    target_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_root, prefix=".download-") as staging:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=TEST_SPLIT_ARTIFACT, dst_path=staging, tracking_uri=tracking_uri
            )
        except MlflowException as error:
            raise ValueError(
                f"Model version {name}/{version} has no test split to gate on: its run {run_id} lacks the artifact "
                f"'{TEST_SPLIT_ARTIFACT}'. Register candidates with the training flow, which logs it."
            ) from error
        shutil.move(local, target)
    return target


def move_aliases(tracking_uri: str, name: str, candidate_version: int) -> tuple[int | None, int]:
    """Make the candidate the champion: `previous-champion` -> current champion (if any and different), then
    `champion` -> candidate. In that order, a failure never leaves `champion` pointing nowhere, and a retry
    finishes the job. Returns (previous champion, new champion)."""
    client = mlflow_client(tracking_uri)
    candidate = int(candidate_version)
    client.get_model_version(name, str(candidate))  # a missing version fails here, before any alias moves
    current = resolve_alias(tracking_uri, name, CHAMPION_ALIAS)
    previous: int | None
    if current is not None and current != candidate:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION_ALIAS, str(current))
        previous = current
    else:
        # First champion, or already the champion (a retry): whatever previous-champion says stays.
        previous = resolve_alias(tracking_uri, name, PREVIOUS_CHAMPION_ALIAS)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, str(candidate))
    return previous, candidate


def rollback(tracking_uri: str, name: str) -> tuple[int, int | None]:
    """Swap `champion` and `previous-champion`: the previous champion serves again, and the demoted one stays
    one rollback away. `champion` is set first so it always points somewhere. Not idempotent (a second call
    swaps back), so its task has no retries. Returns (new champion, new previous champion)."""
    client = mlflow_client(tracking_uri)
    previous = resolve_alias(tracking_uri, name, PREVIOUS_CHAMPION_ALIAS)
    if previous is None:
        raise ValueError(
            f"Registered model '{name}' has no '{PREVIOUS_CHAMPION_ALIAS}' alias: there is no previous champion "
            f"to roll back to."
        )
    current = resolve_alias(tracking_uri, name, CHAMPION_ALIAS)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, str(previous))
    if current is not None and current != previous:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION_ALIAS, str(current))
        return previous, current
    # No champion to demote (or both aliases on one version): nothing left to roll back to afterwards.
    client.delete_registered_model_alias(name, PREVIOUS_CHAMPION_ALIAS)
    return previous, None


class DownloadedModel(BaseModel):
    model_config = ConfigDict(frozen=True)

    pyfunc_dir: Path  # loadable with mlflow.pyfunc.load_model
    model_dir: Path  # the fine-tuned Hugging Face folder inside it


def download_model_version(tracking_uri: str, name: str, version: int, target_root: Path) -> DownloadedModel:
    """Download registered model `name` version `version` into `target_root/<name>/<version>` (atomically:
    into a temporary folder, then renamed), or reuse an earlier complete download."""
    import mlflow.artifacts
    import yaml
    from mlflow import MlflowClient

    target = target_root / name / str(version)
    if not (target / "MLmodel").exists():
        source = MlflowClient(tracking_uri=tracking_uri).get_model_version_download_uri(name, str(version))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=str(staging), tracking_uri=tracking_uri
                )
            )
            shutil.rmtree(target, ignore_errors=True)
            local.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    flavor = yaml.safe_load((target / "MLmodel").read_text()).get("flavors", {}).get("python_function", {})
    artifact = flavor.get("artifacts", {}).get(MODEL_DIR_ARTIFACT, {}).get("path")
    if not artifact:
        raise NotATextclfModel(
            f"Model version {name}/{version} is not a textclf model: its MLmodel has no '{MODEL_DIR_ARTIFACT}' "
            f"artifact. Register models with the training flow."
        )
    fetch_runtime(tracking_uri, name, version, target / artifact)
    return DownloadedModel(pyfunc_dir=target, model_dir=target / artifact)


def fetch_runtime(tracking_uri: str, name: str, version: int, model_dir: Path) -> str:
    """Make the downloaded `model_dir` of `name` version `version` answer with the runtime its tags name: download
    the runtime files when the folder lacks them (or has others), remove them when the version has none. Returns
    the runtime. A version whose files cannot be fetched raises, naming the URI and what to do."""
    import mlflow.artifacts
    from mlflow import MlflowClient

    tags = MlflowClient(tracking_uri=tracking_uri).get_model_version(name, str(version)).tags
    runtime, source = tags.get(RUNTIME_TAG, PYTORCH), tags.get(RUNTIME_URI_TAG)
    if runtime == PYTORCH or not source:
        remove_runtime(model_dir)
        return PYTORCH
    try:
        current = read_runtime_file(model_dir)
    except RuntimeFileError:
        current = {}
    if current.get("runtime") == runtime and current.get("source") == source:
        from tasks.serving.onnx_runtime import onnx_file

        try:
            onnx_file(model_dir, runtime)  # present and intact: nothing to fetch
            return runtime
        except RuntimeFileError:
            pass
    staging = Path(tempfile.mkdtemp(prefix=".runtime-", dir=model_dir.parent))
    try:
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=str(staging), tracking_uri=tracking_uri
                )
            )
        except Exception as error:
            raise RuntimeFileError(
                f"Model version {name}/{version} is tagged {RUNTIME_TAG}={runtime} with its files at {source}, which "
                f"cannot be downloaded ({type(error).__name__}: {error}). Run the promotion flow again for this "
                f"version, or delete its tag '{RUNTIME_TAG}' to serve it with PyTorch."
            ) from error
        spec = install_runtime(model_dir, local)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if spec["runtime"] != runtime:
        raise RuntimeFileError(
            f"{source}/{RUNTIME_FILE} names runtime {spec['runtime']}, but model version "
            f"{name}/{version} is tagged {RUNTIME_TAG}={runtime}: run the promotion flow again."
        )
    return runtime


version_of_flow_run_task = task(name="version-of-flow-run", retries=2, retry_delay_seconds=5)(version_of_flow_run)
resolve_alias_task = task(name="resolve-alias", retries=2, retry_delay_seconds=5)(resolve_alias)
fetch_test_split_task = task(name="fetch-test-split", retries=2, retry_delay_seconds=5)(fetch_test_split)
move_aliases_task = task(name="move-aliases", retries=2, retry_delay_seconds=5)(move_aliases)
rollback_task = task(name="rollback")(rollback)
download_model_version_task = task(name="download-model-version", retries=2, retry_delay_seconds=5)(
    download_model_version
)
fetch_runtime_task = task(name="fetch-runtime", retries=2, retry_delay_seconds=5)(fetch_runtime)
